//! A Docker engine of a test's own: `dockerd` (and the containerd it starts) inside one
//! machine's network namespace, with its data, state and socket in a directory of its own.
//!
//! dockerd changes the network it runs in: it turns on IP forwarding, sets the iptables
//! FORWARD policy to DROP and adds its chains, and loads `br_netfilter` (which makes every
//! bridge's traffic pass iptables). Inside a namespace the test made, the first two vanish with
//! the namespace; the module is host-wide, so [`Dockerd::stop`] puts the root namespace's
//! forwarding and bridge-netfilter settings, and its FORWARD policy, back as they were.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::run_with_timeout;
use crate::workloads::{processes_mentioning, unmount_all_under};

/// The root namespace's settings that a dockerd may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNetFacts {
    pub ip_forward: String,
    /// `bridge-nf-call-iptables` and friends; `None` while `br_netfilter` is not loaded.
    pub bridge_nf: Option<Vec<(String, String)>>,
    /// `iptables -S FORWARD`'s policy line, if iptables is installed.
    pub forward_policy: Option<String>,
}

const BRIDGE_NF: [&str; 3] = [
    "bridge-nf-call-iptables",
    "bridge-nf-call-ip6tables",
    "bridge-nf-call-arptables",
];

impl HostNetFacts {
    /// Read in the calling thread's namespace (the root one, for test code).
    pub fn read() -> HostNetFacts {
        let sys = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let bridge_nf = Path::new("/proc/sys/net/bridge").exists().then(|| {
            BRIDGE_NF
                .iter()
                .map(|k| (k.to_string(), sys(&format!("/proc/sys/net/bridge/{k}"))))
                .collect()
        });
        let forward_policy = run_with_timeout(
            Command::new("iptables").args(["-w", "-S", "FORWARD"]),
            Duration::from_secs(10),
        )
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.starts_with("-P FORWARD"))
                .map(str::to_owned)
        });
        HostNetFacts {
            ip_forward: sys("/proc/sys/net/ipv4/ip_forward"),
            bridge_nf,
            forward_policy,
        }
    }

    /// Puts back what differs from `self`; says what it could not.
    pub fn restore(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let now = HostNetFacts::read();
        let mut write = |p: &str, v: &str| {
            if let Err(e) = std::fs::write(p, v) {
                problems.push(format!("writing {v} to {p}: {e}"));
            }
        };
        if now.ip_forward != self.ip_forward {
            write("/proc/sys/net/ipv4/ip_forward", &self.ip_forward);
        }
        if let Some(now_nf) = &now.bridge_nf {
            for (k, v) in now_nf {
                // A module loaded by the test is turned off: as if it were not there.
                let want = match &self.bridge_nf {
                    Some(before) => before
                        .iter()
                        .find(|(bk, _)| bk == k)
                        .map(|(_, bv)| bv.as_str())
                        .unwrap_or("0"),
                    None => "0",
                };
                if v != want {
                    write(&format!("/proc/sys/net/bridge/{k}"), want);
                }
            }
        }
        if let (Some(before), Some(after)) = (&self.forward_policy, &now.forward_policy)
            && before != after
        {
            let policy = before.rsplit(' ').next().unwrap_or("ACCEPT");
            if let Err(e) = run_with_timeout(
                Command::new("iptables").args(["-w", "-P", "FORWARD", policy]),
                Duration::from_secs(10),
            ) {
                problems.push(format!("restoring the FORWARD policy: {e}"));
            }
        }
        problems
    }
}

/// A dockerd running in a namespace; stopped and cleaned away by [`Dockerd::stop`] or on drop.
pub struct Dockerd {
    dir: PathBuf,
    child: Option<Child>,
    before: HostNetFacts,
    stopped: bool,
}

impl Dockerd {
    /// The directory a dockerd would use, to give its socket to an agent before it starts.
    pub fn new_dir() -> anyhow::Result<PathBuf> {
        let dir = tempfile::Builder::new()
            .prefix("uc-dockerd-")
            .tempdir_in("/var/tmp")
            .context("making a directory for dockerd")?;
        Ok(dir.keep())
    }

    /// The engine's socket in `dir`, as a `--docker-host` value.
    pub fn host_of(dir: &Path) -> String {
        format!("unix://{}", dir.join("docker.sock").display())
    }

    /// The docker CLI: Debian's (`/usr/bin/docker`, which speaks its dockerd's API) if there.
    pub fn cli() -> &'static str {
        if Path::new("/usr/bin/docker").exists() {
            "/usr/bin/docker"
        } else {
            "docker"
        }
    }

    /// Starts dockerd in namespace `netns` with everything in `dir`, and waits until it answers.
    pub fn start(netns: &str, dir: &Path) -> anyhow::Result<Dockerd> {
        let before = HostNetFacts::read();
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg("dockerd")
            .arg(format!("--data-root={}", dir.join("data").display()))
            .arg(format!("--exec-root={}", dir.join("exec").display()))
            .arg(format!("--pidfile={}", dir.join("dockerd.pid").display()))
            .arg(format!("--host={}", Self::host_of(dir)))
            // No docker0: uc makes its own network; and no engine-wide side doors.
            .arg("--bridge=none")
            .arg("--shutdown-timeout=2")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (is docker.io installed?)")?;
        let mut d = Dockerd {
            dir: dir.to_owned(),
            child: Some(child),
            before,
            stopped: false,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if d.docker(&["version", "--format", "{{.Server.APIVersion}}"])
                .is_ok_and(|o| o.status.success())
            {
                return Ok(d);
            }
            if let Some(Ok(Some(status))) = d.child.as_mut().map(|c| c.try_wait()) {
                let log = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
                bail!("dockerd exited ({status}): {log}");
            }
            if Instant::now() >= deadline {
                bail!("dockerd did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs the docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        run_with_timeout(
            Command::new(Self::cli())
                .arg("-H")
                .arg(Self::host_of(&self.dir))
                .args(args),
            Duration::from_secs(60),
        )
    }

    /// Stops the engine and every container it has, unmounts and deletes its directory, and
    /// puts the host's network settings back. Returns what it could not do.
    pub fn stop(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let mut problems = Vec::new();
        if let Ok(o) = self.docker(&["ps", "-aq"]) {
            let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.docker(&args);
            }
        }
        if let Some(mut child) = self.child.take() {
            // nsenter execs dockerd: the child's pid is dockerd's.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        problems.push("dockerd did not stop on SIGTERM".into());
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        // containerd and its shims name the directory in their command lines.
        let needle = self.dir.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = processes_mentioning(&needle);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for p in &left {
                    let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
                }
                if Instant::now() >= deadline + Duration::from_secs(5) {
                    problems.push(format!("processes of dockerd left: {left:?}"));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        problems.extend(unmount_all_under(&self.dir));
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            problems.push(format!("removing {}: {e}", self.dir.display()));
        }
        problems.extend(self.before.restore());
        problems
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        for p in self.stop() {
            eprintln!("dockerd cleanup: {p}");
        }
    }
}
