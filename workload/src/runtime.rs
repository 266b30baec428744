//! The runtime trait, and the directory every local workload keeps:
//! `DATA/workloads/<id>/` with `meta.json`, the shim's files (`log`, `exit`,
//! `shim.pid`, `pid`) and whatever its runtime needs.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use serde::{Deserialize, Serialize};
use uc_proto::ContainerId;
use uc_proto::spec::{RuntimeKind, ServiceSpec};

use crate::reconcile::Seen;
use crate::shim;

/// Everything a runtime needs to make one container.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub id: ContainerId,
    pub service: String,
    pub spec: ServiceSpec,
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The machine's address in its /24: gateway and DNS server.
    pub gateway: Ipv4Addr,
    pub machine: String,
    /// See [`crate::reconcile::Want::digest`].
    pub digest: String,
}

impl Workload {
    /// The container's host name: the service's name and the id's first 8 digits.
    pub fn hostname(&self) -> String {
        format!("{}-{}", self.service, self.id.short())
    }
}

/// What the machine keeps of a workload, in `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub id: ContainerId,
    pub service: String,
    pub runtime: RuntimeKind,
    pub digest: String,
    pub address: Ipv4Addr,
    pub image: String,
    pub created_ms: u64,
    /// When it was last started.
    #[serde(default)]
    pub started_ms: u64,
    #[serde(default)]
    pub restarts: u32,
}

/// A workload as its runtime sees it now.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    pub meta: Meta,
    pub seen: Seen,
    /// The main process, while it runs.
    pub pid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime {0} is not available on this machine: {1}")]
    Unavailable(RuntimeKind, String),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container {0} not found on this machine")]
    NotFound(ContainerId),
    #[error("{0}")]
    Other(String),
}

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A way to run containers (nspawn, Docker, QEMU). Implementations keep their
/// bookkeeping on the machine's disk, so a restarted agent finds (adopts)
/// what runs.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    /// Ok if this machine can run this kind of container; else why not.
    async fn available(&self) -> Result<(), String>;
    /// The containers of this runtime on this machine.
    async fn list(&self) -> Vec<Status>;
    /// Makes the container (image fork, network) and starts it.
    async fn create(&self, w: &Workload) -> Result<(), RuntimeError>;
    /// Starts a container that exited.
    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError>;
    /// Stops it: SIGTERM, then after `grace` everything it started is killed.
    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError>;
    /// Stops it and deletes all it has: processes, mounts, links, files.
    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError>;
    /// The last `n` lines of its output.
    async fn logs(&self, id: &ContainerId, n: usize) -> Vec<shim::LogLine>;
    /// Runs a command inside the running container (`uc exec`).
    async fn exec(
        &self,
        id: &ContainerId,
        req: crate::exec::ExecRequest,
    ) -> Result<crate::exec::Exec, RuntimeError> {
        let _ = (id, req);
        Err(RuntimeError::Other(format!(
            "uc exec does not work in {} containers",
            self.kind()
        )))
    }
}

/// The environment a command run in a workload starts with: a default PATH, HOME and
/// HOSTNAME, then the image's, the service's and the asker's (later ones win).
pub(crate) fn exec_env(
    w: &Workload,
    image: Option<&crate::image::ImageMeta>,
    extra: &[String],
) -> Vec<(String, String)> {
    let mut env: std::collections::BTreeMap<String, String> = [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("HOSTNAME".into(), w.hostname());
    let kv = |e: &String| {
        e.split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
    };
    env.extend(image.into_iter().flat_map(|i| i.env.iter()).filter_map(kv));
    env.extend(w.spec.env.clone());
    env.extend(extra.iter().filter_map(kv));
    env.into_iter().collect()
}

/// For a runtime's `create`: when making or starting the container failed, removes what was
/// made of it, and passes the failure on.
pub(crate) async fn undo_if_failed<R: Runtime + ?Sized>(
    rt: &R,
    id: &ContainerId,
    made: Result<(), RuntimeError>,
) -> Result<(), RuntimeError> {
    if made.is_err() {
        let _ = rt.remove(id).await;
    }
    made
}

/// A workload as it was created, kept in `workload.json` for restarts.
#[derive(Serialize, Deserialize)]
struct SavedWorkload {
    service: String,
    spec: ServiceSpec,
    address: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    machine: String,
    digest: String,
}

/// The command a workload runs: the service's, else its image's default.
pub(crate) fn command_of(
    w: &Workload,
    image: &crate::image::ImageMeta,
) -> Result<Vec<String>, RuntimeError> {
    let cmd = if w.spec.command.is_empty() {
        image.cmd.clone()
    } else {
        w.spec.command.clone()
    };
    if cmd.is_empty() {
        return Err(RuntimeError::Other(format!(
            "image {:?} has no default command: give one after the image",
            image.name
        )));
    }
    Ok(cmd)
}

/// Starts `ucd shim` for the workload, running `argv` with at most `memory` bytes, and waits
/// until it has written its pid (so that a status right after says running). Used by the
/// runtimes whose process uc runs itself (nspawn, QEMU).
pub(crate) async fn spawn_shim(
    dirs: &WorkloadDirs,
    shim_exe: &Path,
    w: &Workload,
    argv: &[String],
    memory: Option<u64>,
) -> Result<(), RuntimeError> {
    let dir = dirs.dir(&w.id);
    let mut cmd = tokio::process::Command::new(shim_exe);
    cmd.arg("shim")
        .arg("--dir")
        .arg(&dir)
        .arg("--id")
        .arg(w.id.as_str());
    if let Some(m) = memory {
        cmd.arg("--memory").arg(m.to_string());
    }
    if let Some(c) = w.spec.cpu {
        cmd.arg("--cpu").arg(c.to_string());
    }
    cmd.arg("--").args(argv);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let _ = fs::remove_file(shim::exit_path(&dir));
    let _ = fs::remove_file(shim::shim_pid_path(&dir));
    let mut child = cmd.spawn().map_err(io_err("starting the shim", shim_exe))?;
    // Reap it when it ends; a restarted agent's init-reparented shims are reaped by init.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    for _ in 0..200 {
        if dirs.live_shim(&w.id).is_some() || shim::exit_path(&dir).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The workloads directory of a machine.
#[derive(Clone, Debug)]
pub struct WorkloadDirs {
    root: PathBuf,
}

impl WorkloadDirs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn dir(&self, id: &ContainerId) -> PathBuf {
        self.root.join(id.as_str())
    }

    pub fn read_meta(&self, id: &ContainerId) -> Option<Meta> {
        serde_json::from_slice(&fs::read(self.dir(id).join("meta.json")).ok()?).ok()
    }

    pub fn write_meta(&self, m: &Meta) -> Result<(), RuntimeError> {
        let p = self.dir(&m.id).join("meta.json");
        shim::write_atomic(&p, &serde_json::to_vec_pretty(m).expect("meta serializes"))
            .map_err(io_err("writing", &p))
    }

    /// Makes the workload's directory with `workload.json` and `meta.json`.
    pub fn save_workload(&self, w: &Workload, kind: RuntimeKind) -> Result<(), RuntimeError> {
        let dir = self.dir(&w.id);
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let saved = SavedWorkload {
            service: w.service.clone(),
            spec: w.spec.clone(),
            address: w.address,
            prefix: w.prefix,
            gateway: w.gateway,
            machine: w.machine.clone(),
            digest: w.digest.clone(),
        };
        let p = dir.join("workload.json");
        shim::write_atomic(&p, &serde_json::to_vec_pretty(&saved).expect("serializes"))
            .map_err(io_err("writing", &p))?;
        self.write_meta(&Meta {
            id: w.id.clone(),
            service: w.service.clone(),
            runtime: kind,
            digest: w.digest.clone(),
            address: w.address,
            image: w.spec.image.clone(),
            created_ms: shim::now_ms(),
            started_ms: shim::now_ms(),
            restarts: 0,
        })
    }

    /// For a shim-run runtime's `start`: the saved workload of a container whose shim does not
    /// run, with its restart counted; None if it runs.
    pub fn to_restart(&self, id: &ContainerId) -> Result<Option<Workload>, RuntimeError> {
        if self.live_shim(id).is_some() {
            return Ok(None);
        }
        let w = self.saved_workload(id)?;
        if let Some(mut m) = self.read_meta(id) {
            m.restarts += 1;
            self.write_meta(&m)?;
        }
        Ok(Some(w))
    }

    /// Records in `meta.json` that the workload starts now.
    pub fn mark_started(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        match self.read_meta(id) {
            Some(mut m) => {
                m.started_ms = shim::now_ms();
                self.write_meta(&m)
            }
            None => Ok(()),
        }
    }

    /// The workload as [`Self::save_workload`] kept it.
    pub fn saved_workload(&self, id: &ContainerId) -> Result<Workload, RuntimeError> {
        let p = self.dir(id).join("workload.json");
        let bytes = fs::read(&p).map_err(|_| RuntimeError::NotFound(id.clone()))?;
        let s: SavedWorkload = serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::Other(format!("{}: {e}", p.display())))?;
        Ok(Workload {
            id: id.clone(),
            service: s.service,
            spec: s.spec,
            address: s.address,
            prefix: s.prefix,
            gateway: s.gateway,
            machine: s.machine,
            digest: s.digest,
        })
    }

    /// The statuses of this runtime's workloads, from their directories and shims.
    pub fn statuses(&self, kind: RuntimeKind) -> Vec<Status> {
        self.all(kind)
            .into_iter()
            .map(|meta| {
                let seen = self.seen(&meta);
                let pid = match seen {
                    Seen::Running { .. } => self.child_pid(&meta.id),
                    Seen::Exited { .. } => None,
                };
                Status { meta, seen, pid }
            })
            .collect()
    }

    /// Stops a shim's workload: SIGTERM to its process, then after `grace` SIGKILL to all of
    /// its cgroup.
    pub async fn stop_shim(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let Some(shim_pid) = self.live_shim(id) else {
            return Ok(());
        };
        if let Some(pid) = self.child_pid(id) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while pid_alive(shim_pid) && self.live_shim(id).is_some() {
            if tokio::time::Instant::now() >= deadline {
                for p in crate::cgroup::pids(id.as_str()) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                if let Some(pid) = self.child_pid(id) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
            if tokio::time::Instant::now() >= deadline + Duration::from_secs(5) {
                return Err(RuntimeError::Other(format!(
                    "container {} did not stop",
                    id.short()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Every workload directory with a readable `meta.json` of this runtime.
    pub fn all(&self, kind: RuntimeKind) -> Vec<Meta> {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<ContainerId>().ok())
            .filter_map(|id| self.read_meta(&id))
            .filter(|m| m.runtime == kind)
            .collect()
    }

    /// The shim's pid if it still runs (checked against its command line, so
    /// a reused pid is not taken for it).
    pub fn live_shim(&self, id: &ContainerId) -> Option<u32> {
        let dir = self.dir(id);
        let pid: u32 = fs::read_to_string(shim::shim_pid_path(&dir))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // A zombie has exited; its parent has not reaped it yet.
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        (cmdline.contains("shim") && cmdline.contains(dir.to_str()?) && !zombie).then_some(pid)
    }

    /// The workload's main process if its shim runs.
    pub fn child_pid(&self, id: &ContainerId) -> Option<u32> {
        self.live_shim(id)?;
        fs::read_to_string(shim::child_pid_path(&self.dir(id)))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// What the files say of the workload.
    pub fn seen(&self, m: &Meta) -> Seen {
        if self.live_shim(&m.id).is_some() {
            return Seen::Running {
                since_ms: m.started_ms,
            };
        }
        let exit = fs::read(shim::exit_path(&self.dir(&m.id)))
            .ok()
            .and_then(|b| serde_json::from_slice::<shim::ExitStatus>(&b).ok());
        match exit {
            Some(e) => Seen::Exited {
                code: e.code,
                at_ms: e.at_ms,
            },
            // The shim died without saying how (killed), or never started.
            None => Seen::Exited {
                code: -1,
                at_ms: m.started_ms,
            },
        }
    }
}

/// Runs `prog arg` (`--version` and the like) to see that a tool a runtime needs is there and
/// works; the error says what to install.
pub async fn check_tool(prog: &Path, arg: &str, install: &str) -> Result<(), String> {
    let out = tokio::process::Command::new(prog)
        .arg(arg)
        .output()
        .await
        .map_err(|e| format!("{} not found ({e}); install {install}", prog.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {arg} failed; install {install}",
            prog.display()
        ));
    }
    Ok(())
}

/// A runtime's last answer to "do you work here?", kept while the files it depends on stay the
/// same. Asking means running programs (`systemd-nspawn --version`, `qemu-system-x86_64
/// --version`, ...), which an idle agent would otherwise do every few seconds; a stat of each
/// file tells whether anything was installed, upgraded or removed since.
#[derive(Default)]
pub struct ProbeCache {
    last: std::sync::Mutex<Option<Probed>>,
}

/// The files' stamps when a probe ran, and its answer.
type Probed = (Vec<FileStamp>, Result<(), String>);

/// What identifies a file's version: inode, size, modification time; `None` if it is missing.
pub type FileStamp = Option<(u64, u64, i64, i64)>;

/// The stamp of `prog`: a path, or a bare name looked up in `PATH` like a shell would.
pub fn stamp(prog: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let meta = |p: &Path| {
        fs::metadata(p)
            .ok()
            .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
    };
    if prog.components().count() > 1 {
        return meta(prog);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|d| meta(&d.join(prog)))
}

impl ProbeCache {
    /// The cached answer while `files` are as they were when it was given; else `probe`'s.
    pub async fn get<F, Fut>(&self, files: &[&Path], probe: F) -> Result<(), String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let now: Vec<FileStamp> = files.iter().map(|f| stamp(f)).collect();
        if let Some((then, answer)) = &*self.last.lock().unwrap_or_else(|p| p.into_inner())
            && *then == now
        {
            return answer.clone();
        }
        let answer = probe().await;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, answer.clone()));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_probe_is_asked_again_only_when_its_files_change() {
        let dir = std::env::temp_dir().join(format!("uc-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("tool");
        fs::write(&tool, "v1").unwrap();
        let cache = ProbeCache::default();
        let calls = AtomicUsize::new(0);
        let ask = |answer: Result<(), String>| {
            let calls = &calls;
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                answer
            }
        };
        assert_eq!(cache.get(&[&tool], ask(Ok(()))).await, Ok(()));
        assert_eq!(
            cache.get(&[&tool], ask(Err("x".into()))).await,
            Ok(()),
            "cached"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        fs::write(&tool, "version 2").unwrap();
        assert_eq!(
            cache.get(&[&tool], ask(Err("gone".into()))).await,
            Err("gone".into())
        );
        fs::remove_file(&tool).unwrap();
        assert_eq!(
            cache.get(&[&tool], ask(Err("missing".into()))).await,
            Err("missing".into())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(
            stamp(Path::new("sh")).is_some(),
            "bare names are looked up in PATH"
        );
        assert!(stamp(Path::new("no-such-program-uc")).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
