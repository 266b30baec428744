//! The systemd-nspawn runtime: a container is an overlayfs fork of an image's
//! root filesystem (`upper`, `work`, `merged` in its directory) with its host
//! name, `resolv.conf` and `hosts` written in, run by `systemd-nspawn
//! --as-pid2` under the shim, in its own network namespace plugged into the
//! machine's bridge. No daemon.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};
use uc_proto::ContainerId;
use uc_proto::spec::RuntimeKind;

use crate::exec::{Exec, ExecRequest};
use crate::image::ImageStore;
use crate::rootfs::Root;
use crate::runtime::{Runtime, RuntimeError, Status, Workload, WorkloadDirs, io_err};
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
    probe: crate::runtime::ProbeCache,
}

impl Nspawn {
    pub fn new(images: ImageStore, dirs: WorkloadDirs, shim_exe: PathBuf) -> Self {
        Self {
            images,
            dirs,
            shim_exe,
            nspawn: PathBuf::from("systemd-nspawn"),
            probe: Default::default(),
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

    /// Writes the container's identity into its upper layer: every path resolved inside the
    /// container's root ([`crate::rootfs`]), so an image's symlinks cannot send these writes to
    /// the host's own files.
    fn write_identity(&self, w: &Workload) -> Result<(), RuntimeError> {
        let merged = self.merged(&w.id);
        let root = Root::open(&merged).map_err(io_err("opening", &merged))?;
        let at = |rel: &str| merged.join(rel);
        root.mkdir_all("etc", 0o755)
            .map_err(io_err("creating", &at("etc")))?;
        let host = w.hostname();
        let files = [
            ("etc/hostname", format!("{host}\n")),
            (
                "etc/resolv.conf",
                format!(
                    "nameserver {}\nsearch internal\noptions ndots:1\n",
                    w.gateway
                ),
            ),
            (
                "etc/hosts",
                format!(
                    "127.0.0.1 localhost\n::1 localhost\n{} {host} {}\n",
                    w.address, w.service
                ),
            ),
        ];
        for (rel, text) in files {
            // An image may ship these as symlinks (to /run/...): they are replaced.
            root.write(rel, text.as_bytes(), 0o644)
                .map_err(io_err("writing", &at(rel)))?;
        }
        if !w.spec.ssh_keys.is_empty() {
            // Root's `~/.ssh/authorized_keys`: the service's keys, after any the image has.
            let rel = "root/.ssh/authorized_keys";
            root.mkdir_all("root/.ssh", 0o700)
                .and_then(|()| root.chmod("root/.ssh", 0o700))
                .map_err(io_err("creating", &at("root/.ssh")))?;
            let mut text = root
                .read(rel)
                .map_err(io_err("reading", &at(rel)))?
                .unwrap_or_default();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            for k in &w.spec.ssh_keys {
                if !text.lines().any(|l| l.trim() == k.trim()) {
                    text.push_str(k.trim());
                    text.push('\n');
                }
            }
            root.write(rel, text.as_bytes(), 0o600)
                .map_err(io_err("writing", &at(rel)))?;
        }
        Ok(())
    }

    fn command(
        &self,
        w: &Workload,
        image: &crate::image::ImageMeta,
    ) -> Result<Vec<String>, RuntimeError> {
        let cmd = crate::runtime::command_of(w, image)?;
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
        crate::runtime::spawn_shim(&self.dirs, &self.shim_exe, w, &argv, w.spec.memory).await
    }

    async fn start_workload(&self, w: &Workload) -> Result<(), RuntimeError> {
        let t = std::time::Instant::now();
        net::ensure_bridge(w.gateway, w.prefix).await?;
        let bridge_us = t.elapsed().as_micros();
        self.mount_overlay(&w.id, &w.spec.image)?;
        self.write_identity(w)?;
        let fs_us = t.elapsed().as_micros();
        let ns = self.netns(&w.id);
        if !is_mountpoint(&ns) {
            net::create_netns(&ns)?;
        }
        let netns_us = t.elapsed().as_micros();
        let host_if = net::host_ifname(w.id.as_str());
        if !net::has_link(&host_if).await? {
            net::attach(&ns, &host_if, w.address, w.prefix, w.gateway, WORKLOAD_MTU).await?;
        }
        let link_us = t.elapsed().as_micros();
        self.dirs.mark_started(&w.id)?;
        let r = self.spawn_shim(w).await;
        tracing::debug!(container = %w.id.short(), bridge_us, fs_us, netns_us, link_us, shim_us = t.elapsed().as_micros(), "nspawn start phases");
        r
    }
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

#[async_trait::async_trait]
impl Runtime for Nspawn {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Nspawn
    }

    async fn available(&self) -> Result<(), String> {
        if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
            && !Path::new("/sys/fs/cgroup/systemd/cgroup.procs").exists()
        {
            return Err("no cgroup hierarchy is mounted at /sys/fs/cgroup".into());
        }
        // Runs systemd-nspawn only when it changed (see `ProbeCache`).
        self.probe
            .get(&[self.nspawn.as_path()], || {
                crate::runtime::check_tool(&self.nspawn, "--version", "systemd-container")
            })
            .await
    }

    async fn list(&self) -> Vec<Status> {
        self.dirs.statuses(RuntimeKind::Nspawn)
    }

    async fn create(&self, w: &Workload) -> Result<(), RuntimeError> {
        let image = self.images.require(&w.spec.image)?;
        self.command(w, &image)?;
        self.dirs.save_workload(w, RuntimeKind::Nspawn)?;
        let started = self.start_workload(w).await;
        crate::runtime::undo_if_failed(self, &w.id, started).await
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        match self.dirs.to_restart(id)? {
            Some(w) => self.start_workload(&w).await,
            None => Ok(()),
        }
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        // nspawn turns SIGTERM into an orderly stop of the container; SIGKILL would orphan
        // the container's init.
        self.dirs.stop_shim(id, grace).await
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

    /// `ucd enter` into the namespaces, root and working directory of the container's main
    /// process, in its cgroups.
    async fn exec(&self, id: &ContainerId, req: ExecRequest) -> Result<Exec, RuntimeError> {
        if req.argv.is_empty() {
            return Err(RuntimeError::Other("no command to run".into()));
        }
        let w = self.dirs.saved_workload(id)?;
        let not_running =
            || RuntimeError::Other(format!("container {} is not running", id.short()));
        let nspawn = self.dirs.child_pid(id).ok_or_else(not_running)?;
        // nspawn's child is the container's init; with --as-pid2 the workload is its child.
        let init = children(nspawn)
            .into_iter()
            .next()
            .ok_or_else(not_running)?;
        let target = children(init).into_iter().next().unwrap_or(init);
        let image = self.images.get(&w.spec.image);
        // `ucd enter` joins the container's cgroups and namespaces, then runs the command.
        // Its environment goes under a prefix: none of it may act on host programs.
        let mut cmd = std::process::Command::new(&self.shim_exe);
        cmd.args(["enter", "--target", &target.to_string()]);
        for d in cgroup::dirs(id.as_str()) {
            cmd.arg("--cgroup-procs").arg(d.join("cgroup.procs"));
        }
        if req.tty {
            cmd.arg("--tty");
        }
        cmd.arg("--").args(&req.argv).env_clear().envs(
            crate::runtime::exec_env(&w, image.as_ref(), &req.env)
                .into_iter()
                .map(|(k, v)| (format!("{}{k}", crate::exec::ENV_PREFIX), v)),
        );
        // The terminal comes from the container's own devpts, so that it has a name there.
        let ptmx = PathBuf::from(format!("/proc/{target}/root/dev/pts/ptmx"));
        crate::exec::spawn(cmd, &req, &ptmx)
            .map_err(io_err("running a command in", &self.dirs.dir(id)))
    }
}

/// The children of process `pid` (from /proc), oldest first.
fn children(pid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut kids: Vec<(u64, u32)> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // Fields after the command name: state ppid ... starttime (the 20th of those).
            let rest: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
            let ppid: u32 = rest.get(1)?.parse().ok()?;
            let start: u64 = rest.get(19)?.parse().ok()?;
            (ppid == pid).then_some((start, p))
        })
        .collect();
    kids.sort();
    kids.into_iter().map(|(_, p)| p).collect()
}
