//! The systemd-nspawn runtime: a container is an overlayfs fork of an image's
//! root filesystem (`upper`, `work`, `merged` in its directory) with its host
//! name, `resolv.conf` and `hosts` written in, run by `systemd-nspawn
//! --as-pid2` under the shim, in its own network namespace plugged into the
//! machine's bridge. No daemon.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uc_proto::ContainerId;
use uc_proto::spec::RuntimeKind;

use crate::image::ImageStore;
use crate::reconcile::Seen;
use crate::runtime::{Meta, Runtime, RuntimeError, Status, Workload, WorkloadDirs, io_err};
use crate::{cgroup, net, shim};

/// MTU inside workloads: the mesh's, so packets to other machines need no fragmenting.
pub const WORKLOAD_MTU: u32 = 1420;

pub struct Nspawn {
    pub images: ImageStore,
    pub dirs: WorkloadDirs,
    /// The program that runs `shim` (ucd itself).
    pub shim_exe: PathBuf,
    /// `systemd-nspawn`.
    pub nspawn: PathBuf,
}

impl Nspawn {
    pub fn new(images: ImageStore, dirs: WorkloadDirs, shim_exe: PathBuf) -> Self {
        Self {
            images,
            dirs,
            shim_exe,
            nspawn: PathBuf::from("systemd-nspawn"),
        }
    }

    fn merged(&self, id: &ContainerId) -> PathBuf {
        self.dirs.dir(id).join("merged")
    }

    fn netns(&self, id: &ContainerId) -> PathBuf {
        self.dirs.dir(id).join("netns")
    }

    fn mount_overlay(&self, id: &ContainerId, image: &str) -> Result<(), RuntimeError> {
        let dir = self.dirs.dir(id);
        let merged = self.merged(id);
        if is_mountpoint(&merged) {
            return Ok(());
        }
        for d in ["upper", "work", "merged"] {
            let p = dir.join(d);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        let lower = self.images.rootfs(image);
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| io_err("mounting an overlay on", &merged)(e.into()))
    }

    /// Writes the container's identity into its upper layer.
    fn write_identity(&self, w: &Workload) -> Result<(), RuntimeError> {
        let etc = self.merged(&w.id).join("etc");
        fs::create_dir_all(&etc).map_err(io_err("creating", &etc))?;
        let host = w.hostname();
        let files = [
            ("hostname", format!("{host}\n")),
            (
                "resolv.conf",
                format!(
                    "nameserver {}\nsearch internal\noptions ndots:1\n",
                    w.gateway
                ),
            ),
            (
                "hosts",
                format!(
                    "127.0.0.1 localhost\n::1 localhost\n{} {host} {}\n",
                    w.address, w.service
                ),
            ),
        ];
        for (name, text) in files {
            let p = etc.join(name);
            // An image may ship these as symlinks (to /run/...): replace them.
            let _ = fs::remove_file(&p);
            fs::write(&p, text).map_err(io_err("writing", &p))?;
        }
        Ok(())
    }

    fn command(
        &self,
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
        let mut a = vec![
            self.nspawn.display().to_string(),
            "--quiet".into(),
            "--register=no".into(),
            "--keep-unit".into(),
            "--as-pid2".into(),
            "--console=pipe".into(),
            "--resolv-conf=off".into(),
            "--timezone=off".into(),
            "--link-journal=no".into(),
            format!("--directory={}", self.merged(&w.id).display()),
            format!("--machine=uc-{}", &w.id.as_str()[..12]),
            format!("--hostname={}", w.hostname()),
            format!("--network-namespace-path={}", self.netns(&w.id).display()),
        ];
        for e in &image.env {
            a.push(format!("--setenv={e}"));
        }
        for (k, v) in &w.spec.env {
            a.push(format!("--setenv={k}={v}"));
        }
        if !image.workdir.is_empty() {
            a.push(format!("--chdir={}", image.workdir));
        }
        a.push("--".into());
        a.extend(cmd);
        Ok(a)
    }

    async fn spawn_shim(&self, w: &Workload) -> Result<(), RuntimeError> {
        let image = self.images.require(&w.spec.image)?;
        let argv = self.command(w, &image)?;
        let dir = self.dirs.dir(&w.id);
        let mut cmd = tokio::process::Command::new(&self.shim_exe);
        cmd.arg("shim")
            .arg("--dir")
            .arg(&dir)
            .arg("--id")
            .arg(w.id.as_str());
        if let Some(m) = w.spec.memory {
            cmd.arg("--memory").arg(m.to_string());
        }
        if let Some(c) = w.spec.cpu {
            cmd.arg("--cpu").arg(c.to_string());
        }
        cmd.arg("--").args(&argv);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let _ = fs::remove_file(shim::exit_path(&dir));
        let _ = fs::remove_file(shim::shim_pid_path(&dir));
        let mut child = cmd
            .spawn()
            .map_err(io_err("starting the shim", &self.shim_exe))?;
        // Reap it when it ends; a restarted agent's init-reparented shims are reaped by init.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        // The shim writes its pid first thing; wait for it so that a
        // status right after says running.
        for _ in 0..200 {
            if self.dirs.live_shim(&w.id).is_some() || shim::exit_path(&dir).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// The workload's spec as it was created (kept for restarts).
    fn saved_workload(&self, id: &ContainerId) -> Result<Workload, RuntimeError> {
        let p = self.dirs.dir(id).join("workload.json");
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

    async fn start_workload(&self, w: &Workload) -> Result<(), RuntimeError> {
        net::ensure_bridge(w.gateway, w.prefix).await?;
        self.mount_overlay(&w.id, &w.spec.image)?;
        self.write_identity(w)?;
        let ns = self.netns(&w.id);
        if !is_mountpoint(&ns) {
            net::create_netns(&ns)?;
        }
        let host_if = net::host_ifname(w.id.as_str());
        if !net::has_link(&host_if).await? {
            net::attach(&ns, &host_if, w.address, w.prefix, w.gateway, WORKLOAD_MTU).await?;
        }
        if let Some(mut m) = self.dirs.read_meta(&w.id) {
            m.started_ms = shim::now_ms();
            self.dirs.write_meta(&m)?;
        }
        self.spawn_shim(w).await
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedWorkload {
    service: String,
    spec: uc_proto::spec::ServiceSpec,
    address: std::net::Ipv4Addr,
    prefix: u8,
    gateway: std::net::Ipv4Addr,
    machine: String,
    digest: String,
}

pub fn is_mountpoint(p: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(p) = p.to_str() else { return false };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mount(m) == p)
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[async_trait::async_trait]
impl Runtime for Nspawn {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Nspawn
    }

    async fn available(&self) -> Result<(), String> {
        let out = tokio::process::Command::new(&self.nspawn)
            .arg("--version")
            .output()
            .await
            .map_err(|e| {
                format!(
                    "{} not found ({e}); install systemd-container",
                    self.nspawn.display()
                )
            })?;
        if !out.status.success() {
            return Err(format!("{} --version failed", self.nspawn.display()));
        }
        if !Path::new("/sys/fs/cgroup")
            .join("cgroup.controllers")
            .exists()
            && !Path::new("/sys/fs/cgroup/systemd/cgroup.procs").exists()
        {
            return Err("no cgroup hierarchy is mounted at /sys/fs/cgroup".into());
        }
        Ok(())
    }

    async fn list(&self) -> Vec<Status> {
        self.dirs
            .all(RuntimeKind::Nspawn)
            .into_iter()
            .map(|meta| {
                let seen = self.dirs.seen(&meta);
                let pid = match seen {
                    Seen::Running { .. } => self.dirs.child_pid(&meta.id),
                    Seen::Exited { .. } => None,
                };
                Status { meta, seen, pid }
            })
            .collect()
    }

    async fn create(&self, w: &Workload) -> Result<(), RuntimeError> {
        let image = self.images.require(&w.spec.image)?;
        self.command(w, &image)?;
        let dir = self.dirs.dir(&w.id);
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
        self.dirs.write_meta(&Meta {
            id: w.id.clone(),
            service: w.service.clone(),
            runtime: RuntimeKind::Nspawn,
            digest: w.digest.clone(),
            address: w.address,
            image: w.spec.image.clone(),
            created_ms: shim::now_ms(),
            started_ms: shim::now_ms(),
            restarts: 0,
        })?;
        if let Err(e) = self.start_workload(w).await {
            let _ = self.remove(&w.id).await;
            return Err(e);
        }
        Ok(())
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        if self.dirs.live_shim(id).is_some() {
            return Ok(());
        }
        let w = self.saved_workload(id)?;
        if let Some(mut m) = self.dirs.read_meta(id) {
            m.restarts += 1;
            self.dirs.write_meta(&m)?;
        }
        self.start_workload(&w).await
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let Some(shim_pid) = self.dirs.live_shim(id) else {
            return Ok(());
        };
        if let Some(pid) = self.dirs.child_pid(id) {
            // nspawn turns SIGTERM into an orderly stop of the container;
            // SIGKILL would orphan the container's init.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while pid_alive(shim_pid) && self.dirs.live_shim(id).is_some() {
            if tokio::time::Instant::now() >= deadline {
                for p in cgroup::pids(id.as_str()) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                if let Some(pid) = self.dirs.child_pid(id) {
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

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        self.stop(id, Duration::from_secs(10)).await?;
        net::detach(&net::host_ifname(id.as_str())).await?;
        net::delete_netns(&self.netns(id))?;
        let merged = self.merged(id);
        if is_mountpoint(&merged) {
            nix::mount::umount2(&merged, MntFlags::MNT_DETACH)
                .map_err(|e| io_err("unmounting", &merged)(e.into()))?;
        }
        cgroup::remove(id.as_str());
        let dir = self.dirs.dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &dir)(e)),
        }
    }

    async fn logs(&self, id: &ContainerId, n: usize) -> Vec<shim::LogLine> {
        shim::tail(&self.dirs.dir(id), n)
    }
}
