//! Hosts reachable over real SSH, and a laptop to reach them from: for tests of what `uc` does
//! to a machine over SSH (`uc machine init root@HOST` installing an agent).
//!
//! ```text
//!   hub uch-<tag>: br0 ── host 0   ucm-<tag>-0   172.31.0.10   sshd, firewall: 22, 51002, udp 51820
//!                     ├── host 1   ucm-<tag>-1   172.31.0.11   sshd, ...
//!                     └── laptop   ucm-<tag>-N   172.31.0.(10+N)   no sshd, no firewall
//! ```
//!
//! A lab is a [`Cluster`] of placeholder machines. Each host runs its own `sshd` in its network
//! namespace and in a mount namespace of its own, where `/run` is a fresh tmpfs (so no
//! `/run/systemd/system`: an installer takes its non-systemd path) and per-host directories of the
//! lab are bind-mounted over [`HOST_DIRS`] (`/usr/local`, `/etc/uc`, `/var/lib/uc`, `/root`,
//! `/tmp`): what is installed on a host over SSH lands in that host's directories
//! ([`SshLab::host_path`]), not in another host's or this machine's. The rest of the filesystem
//! (`/usr`, `/etc`, `/var/log`, ...) is this machine's, shared by every host: hosts are separate
//! machines only as far as those directories go.
//!
//! `/root` is the host's own (with `/etc/skel`'s dotfiles) not only for isolation: this machine's
//! `/root/.bashrc`, which bash sources for every command run over SSH, takes about 0.3 s (pyenv),
//! more than the whole SSH round trip without it, and puts a developer's `PATH` on the hosts.
//!
//! The laptop is a network namespace only: commands run there ([`SshLab::uc`],
//! [`SshLab::laptop_run`]) see the real filesystem, with `HOME` set to the lab's laptop home,
//! whose `.ssh/id_ed25519` every host authorizes. OpenSSH finds `~/.ssh` through the passwd entry,
//! not `$HOME`, so the laptop's identity and `known_hosts` reach `ssh` through an ssh_config file
//! ([`SshLab::ssh_config`]), which the CLI under test passes with `-F` when `UC_SSH_CONFIG` names
//! it.
//!
//! Architecture invariant: nothing of a lab is mounted in this machine's mount namespace. The bind
//! mounts live only in each sshd's mount namespace, which dies with the last process in it. Every
//! process started over SSH (or by [`SshLab::host_sh`]), detached or not, stays in its host's
//! network namespace, so dropping the lab, which kills every process in the hosts' namespaces and
//! waits until none is left, removes them all, mounts included.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::{Bins, nft, run_ok, run_with_timeout};
use crate::{Cluster, ClusterBuilder, Fatal, UNDERLAY_FIREWALL, eventually, netns};

/// How long [`SshLab::uc`] and [`SshLab::laptop_run`] commands may take.
pub const LAPTOP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`SshLab::host_sh`] commands may take.
pub const HOST_TIMEOUT: Duration = Duration::from_secs(60);

/// The directories each host has of its own; everything else is this machine's.
pub const HOST_DIRS: [&str; 5] = ["/usr/local", "/etc/uc", "/var/lib/uc", "/root", "/tmp"];

/// `PATH` of commands run on a host, as an SSH session of root gets it.
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Run by `sh` inside a host's fresh mount namespace: `$1` is the host's root of per-host
/// directories, `$2` its sshd_config, the rest [`HOST_DIRS`]. `exec` keeps the pid: the child the
/// lab holds is sshd.
const SSHD_SCRIPT: &str = r#"set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755,nosuid,nodev,size=64m uc-sshlab /run
mkdir -m 0755 /run/sshd
mkdir -m 1777 /run/lock
root=$1 config=$2
shift 2
for d in "$@"; do mount --bind "$root$d" "$d"; done
exec /usr/sbin/sshd -D -e -f "$config"
"#;

/// One host's sshd and files.
struct Host {
    /// Holds the per-host directories at their paths: `<root>/usr/local`, `<root>/etc/uc`, ...
    root: PathBuf,
    log: PathBuf,
    /// `ip netns exec` and `unshare` exec, `sh` execs: this is sshd itself.
    sshd: Child,
}

/// `n` hosts running sshd and one laptop; dropping it kills everything started in them and
/// deletes the namespaces and files.
pub struct SshLab {
    // Dropped after `Drop::drop` has emptied the hosts: deletes namespaces and directories.
    cluster: Cluster,
    hosts: Vec<Host>,
    laptop_home: PathBuf,
    wrong_key: PathBuf,
    ssh_config: PathBuf,
}

impl SshLab {
    /// Starts `hosts` hosts (machines `0..hosts` of the cluster, 172.31.0.(10+i)) each with its
    /// own sshd on port 22 (a throwaway ed25519 host key, `UsePAM no`, `StrictModes no`,
    /// `PermitRootLogin prohibit-password`, only the lab key authorized) behind the underlay
    /// firewall plus tcp 22, and a laptop (machine `hosts`) with no firewall. Returns once every
    /// sshd accepts connections from the laptop.
    pub fn start(hosts: usize) -> anyhow::Result<SshLab> {
        if hosts == 0 {
            bail!("a lab needs at least one host");
        }
        for tool in ["/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen"] {
            if !Path::new(tool).is_file() {
                bail!("{tool} not found (install openssh-server: scripts/deps.sh openssh-server)");
            }
        }
        // The mount points must exist in the real filesystem; empty directories are harmless.
        for d in HOST_DIRS {
            std::fs::create_dir_all(d).with_context(|| format!("creating mount point {d}"))?;
        }
        let cluster = Cluster::start(
            ClusterBuilder::new(hosts + 1)
                .placeholder_agents()
                .underlay_firewall(false),
        )?;
        if let Some(d) = HOST_DIRS.iter().find(|d| cluster.dir().starts_with(d)) {
            bail!(
                "the lab directory {} is below {d}, which each host mounts over: set UC_E2E_DIR elsewhere",
                cluster.dir().display()
            );
        }
        let dir = cluster.dir().join("sshlab");
        let laptop_home = cluster.machine(hosts).data_dir.join("home");
        let mut lab = SshLab {
            cluster,
            hosts: Vec::new(),
            wrong_key: dir.join("wrong_key"),
            ssh_config: dir.join("ssh_config"),
            laptop_home,
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ssh_dir = lab.laptop_home.join(".ssh");
        std::fs::create_dir_all(&ssh_dir)
            .with_context(|| format!("creating {}", ssh_dir.display()))?;
        set_mode(&ssh_dir, 0o700)?;
        std::fs::create_dir_all(lab.laptop_home.join(".config"))?;
        let lab_key = ssh_dir.join("id_ed25519");
        keygen(&lab_key, "uc-sshlab laptop")?;
        keygen(&lab.wrong_key, "uc-sshlab wrong key")?;
        let authorized = dir.join("authorized_keys");
        std::fs::copy(lab_key.with_extension("pub"), &authorized)
            .with_context(|| format!("writing {}", authorized.display()))?;
        std::fs::write(
            &lab.ssh_config,
            format!(
                "# The laptop's ssh settings: OpenSSH takes ~ from passwd, not $HOME.\n\
                 Host *\n  \
                   IdentityFile {key}\n  \
                   UserKnownHostsFile {home}/.ssh/known_hosts\n  \
                   GlobalKnownHostsFile /dev/null\n  \
                   StrictHostKeyChecking accept-new\n  \
                   BatchMode yes\n  \
                   ConnectTimeout 5\n  \
                   UpdateHostKeys no\n",
                key = lab_key.display(),
                home = lab.laptop_home.display(),
            ),
        )
        .with_context(|| format!("writing {}", lab.ssh_config.display()))?;
        let firewall = host_firewall();
        for i in 0..hosts {
            lab.start_host(i, &authorized, &firewall)?;
        }
        for i in 0..hosts {
            lab.wait_sshd(i)?;
        }
        Ok(lab)
    }

    /// Makes host `i`'s files and firewall and starts its sshd (without waiting for it).
    fn start_host(&mut self, i: usize, authorized: &Path, firewall: &str) -> anyhow::Result<()> {
        let m = self.cluster.machine(i);
        let ns = m.netns.clone();
        let root = m.data_dir.join("fs");
        for d in HOST_DIRS {
            let p = root.join(d.trim_start_matches('/'));
            std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        // What a fresh Debian system holds there, so an installer finds the usual places.
        for d in ["bin", "sbin", "lib", "etc", "share", "include", "src"] {
            std::fs::create_dir_all(root.join("usr/local").join(d))?;
        }
        set_mode(&root.join("root"), 0o700)?;
        set_mode(&root.join("tmp"), 0o1777)?;
        for f in [".bashrc", ".profile"] {
            let skel = Path::new("/etc/skel").join(f);
            if skel.is_file() {
                std::fs::copy(&skel, root.join("root").join(f))
                    .with_context(|| format!("copying {}", skel.display()))?;
            }
        }
        let key = m.data_dir.join("ssh_host_ed25519_key");
        keygen(&key, &format!("uc-sshlab host {i}"))?;
        let config = m.data_dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port 22\n\
                 HostKey {key}\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\n\
                 AuthorizedKeysFile {authorized}\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UseDNS no\n\
                 PrintMotd no\n\
                 PidFile none\n\
                 Subsystem sftp internal-sftp\n",
                key = key.display(),
                authorized = authorized.display(),
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        nft(&ns, firewall)?;
        let log = m.data_dir.join("sshd.log");
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let sshd = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", SSHD_SCRIPT, "sh"])
            .arg(&root)
            .arg(&config)
            .args(HOST_DIRS)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting sshd in {ns}"))?;
        self.hosts.push(Host { root, log, sshd });
        Ok(())
    }

    /// Waits until host `i`'s sshd accepts TCP connections from the laptop.
    fn wait_sshd(&mut self, i: usize) -> anyhow::Result<()> {
        let addr = SocketAddr::from((self.host_ip(i), 22));
        let laptop = self.laptop_index();
        let r = eventually(
            Duration::from_secs(20),
            &format!("sshd of host {i} listening"),
            || {
                if let Some(status) = self.hosts[i].sshd.try_wait()? {
                    return Err(Fatal(format!("sshd of host {i} exited: {status}")).into());
                }
                self.cluster
                    .in_netns(laptop, || {
                        TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    })?
                    .with_context(|| format!("connecting to {addr}"))?;
                Ok(())
            },
        );
        r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.sshd_log_text(i)))
    }

    /// Host `i`'s sshd log, for error messages.
    fn sshd_log_text(&self, i: usize) -> String {
        let log = &self.hosts[i].log;
        format!(
            "--- {} ---\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    }

    /// How many hosts the lab has.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// The laptop's machine index in [`SshLab::cluster`] (the number of hosts).
    pub fn laptop_index(&self) -> usize {
        self.hosts.len()
    }

    /// `root@172.31.0.(10+i)`.
    pub fn host_target(&self, i: usize) -> String {
        format!("root@{}", self.host_ip(i))
    }

    /// Host `i`'s address, 172.31.0.(10+i).
    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        assert!(
            i < self.hosts.len(),
            "no host {i}: the lab has {}",
            self.hosts.len()
        );
        self.cluster.machine(i).ip
    }

    /// The laptop's `HOME`: `.ssh/id_ed25519` (+ `.pub`) in it is the key every host authorizes;
    /// the laptop's `.ssh/known_hosts` and `.config/uc/` live here too.
    pub fn laptop_home(&self) -> &Path {
        &self.laptop_home
    }

    /// The private half of a key pair that no host authorizes (`.pub` next to it).
    pub fn wrong_key(&self) -> &Path {
        &self.wrong_key
    }

    /// The laptop's ssh_config (identity, known_hosts, `BatchMode`, `accept-new`, 5 s connect
    /// timeout); `ssh -F` it. [`SshLab::uc`] passes it in `UC_SSH_CONFIG`.
    pub fn ssh_config(&self) -> &Path {
        &self.ssh_config
    }

    /// The pid of host `i`'s sshd: its network and mount namespaces are the host's.
    pub fn sshd_pid(&self, i: usize) -> u32 {
        self.hosts[i].sshd.id()
    }

    /// Host `i`'s sshd log (`sshd -D -e`: connections, authentication failures).
    pub fn sshd_log(&self, i: usize) -> &Path {
        &self.hosts[i].log
    }

    /// `e` followed by every host's sshd log, for test failures.
    pub fn with_logs(&self, e: anyhow::Error) -> anyhow::Error {
        let logs: Vec<String> = (0..self.hosts.len())
            .map(|i| self.sshd_log_text(i))
            .collect();
        anyhow::anyhow!("{e:#}\n{}", logs.join("\n"))
    }

    /// A command that runs `program` in the laptop's namespace with the laptop's environment:
    /// `HOME` = [`SshLab::laptop_home`], `PATH` starting with the directory of `uc` and `ucd`,
    /// `UC_SSH_CONFIG` = [`SshLab::ssh_config`], and no `XDG_CONFIG_HOME`, `SSH_AUTH_SOCK` or
    /// other inherited `UC_*` variables. Add arguments and run it (the caller sets the timeout).
    pub fn laptop_command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let bins = Bins::find(None)?;
        let bin_dir = bins.uc.parent().context("uc has no directory")?;
        let mut path = std::ffi::OsString::from(bin_dir);
        if let Some(p) = std::env::var_os("PATH") {
            path.push(":");
            path.push(p);
        }
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.cluster.machine(self.laptop_index()).netns,
        ])
        .arg(program)
        .current_dir(&self.laptop_home);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("UC_") {
                cmd.env_remove(k);
            }
        }
        cmd.env_remove("XDG_CONFIG_HOME")
            .env_remove("SSH_AUTH_SOCK")
            .env("HOME", &self.laptop_home)
            .env("PATH", path)
            .env("UC_SSH_CONFIG", &self.ssh_config);
        Ok(cmd)
    }

    /// Runs `argv` in the laptop's namespace with the laptop's environment (see
    /// [`SshLab::laptop_command`]), under [`LAPTOP_TIMEOUT`]; returns how it ended, whatever the
    /// exit status.
    pub fn laptop_run(&self, argv: &[&str]) -> anyhow::Result<Output> {
        let (program, args) = argv.split_first().context("an empty command line")?;
        run_with_timeout(self.laptop_command(program)?.args(args), LAPTOP_TIMEOUT)
    }

    /// Runs `uc ARGS` (the built `uc`, see [`Bins::find`]) on the laptop (see
    /// [`SshLab::laptop_command`]), under [`LAPTOP_TIMEOUT`]; returns how it ended, whatever the
    /// exit status.
    pub fn uc(&self, args: &[&str]) -> anyhow::Result<Output> {
        let uc = Bins::find(None)?.uc;
        run_with_timeout(self.laptop_command(uc)?.args(args), LAPTOP_TIMEOUT)
    }

    /// Runs `ssh -F <ssh_config> root@<host i> CMD` on the laptop; returns how it ended.
    pub fn ssh(&self, i: usize, cmd: &str) -> anyhow::Result<Output> {
        let config = self.ssh_config.display().to_string();
        self.laptop_run(&["ssh", "-F", &config, &self.host_target(i), cmd])
    }

    /// Runs `sh -c CMD` as root "on host i" without SSH: in host `i`'s network and mount
    /// namespaces (those of its sshd), with the environment of a root SSH session, under
    /// [`HOST_TIMEOUT`]; returns how it ended, whatever the exit status. What it starts in the
    /// background stays in the host and is killed with the lab; redirect its output
    /// (`{ setsid CMD >LOG 2>&1 </dev/null & }`), or the call waits for it to close the pipes.
    pub fn host_sh(&self, i: usize, cmd: &str) -> anyhow::Result<Output> {
        run_with_timeout(
            Command::new("nsenter")
                .args(["-t", &self.sshd_pid(i).to_string(), "-n", "-m", "--wd=/"])
                .args(["sh", "-c", cmd])
                .env_clear()
                .env("PATH", HOST_PATH)
                .env("HOME", "/root")
                .env("USER", "root")
                .env("LOGNAME", "root")
                .env("SHELL", "/bin/sh"),
            HOST_TIMEOUT,
        )
    }

    /// Where host `i`'s view of `path` (absolute, one of [`HOST_DIRS`] or below one) is in this
    /// machine's filesystem. Panics for other paths: those are shared by every host.
    pub fn host_path(&self, i: usize, path: &str) -> PathBuf {
        let p = Path::new(path);
        assert!(
            HOST_DIRS.iter().any(|d| p.starts_with(d)) && !path.contains(".."),
            "{path} is not below one of a host's own directories {HOST_DIRS:?}"
        );
        self.hosts[i].root.join(p.strip_prefix("/").unwrap_or(p))
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn cluster_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

impl Drop for SshLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.hosts.len() {
                eprintln!("uc-e2e: sshlab host {i}:\n{}", self.sshd_log_text(i));
            }
        }
        // The sshds are our children: kill and reap them. Then whatever their sessions left
        // (the cluster's drop, which follows, would kill those too, but without waiting): once
        // the last process of a host is gone, so is its mount namespace with the bind mounts, and
        // the cluster removes the directories behind them.
        for h in &mut self.hosts {
            let _ = h.sshd.kill();
            let _ = h.sshd.wait();
        }
        for i in 0..self.hosts.len() {
            let ns = &self.cluster.machine(i).netns;
            let r = eventually(Duration::from_secs(5), "host processes gone", || {
                netns::kill_all(ns);
                match netns::pids(ns).as_slice() {
                    [] => Ok(()),
                    left => bail!("pids {left:?} still in {ns}"),
                }
            });
            if let Err(e) = r {
                eprintln!("uc-e2e: {e:#}");
            }
        }
    }
}

/// The underlay firewall of every machine, plus SSH.
fn host_firewall() -> String {
    let open = "tcp dport 51002 accept\n";
    assert!(
        UNDERLAY_FIREWALL.contains(open),
        "UNDERLAY_FIREWALL changed shape"
    );
    UNDERLAY_FIREWALL.replace(open, &format!("{open}    tcp dport 22 accept\n"))
}

/// A new ed25519 key pair without passphrase at `path` and `path.pub`.
fn keygen(path: &Path, comment: &str) -> anyhow::Result<()> {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
        Duration::from_secs(20),
    )?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_firewall_is_the_underlay_one_plus_ssh() {
        let fw = host_firewall();
        assert!(fw.contains("tcp dport 22 accept"), "{fw}");
        assert_eq!(
            fw.replace("    tcp dport 22 accept\n", ""),
            UNDERLAY_FIREWALL
        );
    }
}
