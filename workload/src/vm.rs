//! The QEMU microVM runtime. A container is a `microvm` machine booted from uc's kit (a
//! kernel and an initrd whose /init runs one workload and powers off when it exits, made by
//! `scripts/vm-kit.sh kit`), with two disks: a qcow2 overlay of the image's base disk (an
//! ext4 of its root filesystem, made once per image digest and shared by its instances), and
//! a raw seed holding what to run (a tar of `cmd`, `env`, `workdir`). Its network is a tap on
//! the machine's bridge; address, gateway, DNS and host name go on the kernel command line.
//! QEMU runs under the shim like nspawn does, so its serial console is the workload's log.
//!
//! KVM is used when it boots the kit's kernel (probed once: a boot that only says "probe
//! ok"); otherwise TCG.

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use uc_proto::ContainerId;
use uc_proto::spec::RuntimeKind;

use crate::image::{ImageMeta, ImageStore};
use crate::reconcile::Seen;
use crate::runtime::{Runtime, RuntimeError, Status, Workload, WorkloadDirs, check_tool, io_err};
use crate::{cgroup, net, shim};

/// Where `scripts/vm-deps.sh` installs the kit.
pub const DEFAULT_KIT: &str = "/var/lib/uc/vm-kit";
/// Guest memory when the service sets none.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Less than this and the kit's kernel does not reach /init.
pub const MIN_MEMORY: u64 = 80 << 20;
/// What QEMU needs beyond the guest's memory (TCG's translation cache is capped at
/// [`TB_SIZE_MIB`]): the memory limit of the VM's cgroup is the guest's plus this.
const QEMU_OVERHEAD: u64 = 192 << 20;
const TB_SIZE_MIB: u32 = 64;
/// How long a KVM probe boot may take before KVM is taken not to work.
const PROBE_TIMEOUT: Duration = Duration::from_secs(8);
/// Seconds the guest gives its workload between SIGTERM and SIGKILL on a power-button stop.
const GUEST_STOP_GRACE: u64 = 10;
/// Free space of a base disk beyond the image's files, for the instances' writes (sparse).
const DISK_FREE: u64 = 1 << 30;
/// Kernel arguments that shorten the boot (measured in docs/microvm.md); `mitigations=off`
/// only drops hardening inside a guest that runs one workload.
const FAST_APPEND: &str = "quiet pci=off 8250.nr_uarts=1 cryptomgr.notests mitigations=off \
     nokaslr init_on_alloc=0 page_alloc.shuffle=0 audit=0 lsm=lockdown,yama,integrity";

/// Which accelerator QEMU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM if a probe boot works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            _ => Err(format!("accelerator {s:?} is not one of auto, kvm, tcg")),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// The MAC of the VM with `addr`: locally administered, and unique in the cluster because
/// the address is.
pub fn mac_for(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The guest's memory for a service that asks for `memory` bytes (rounded down to MiB).
pub fn guest_memory(memory: Option<u64>) -> Result<u64, RuntimeError> {
    let m = memory.unwrap_or(DEFAULT_MEMORY);
    if m < MIN_MEMORY {
        return Err(RuntimeError::Other(format!(
            "a microVM needs at least {} MiB of memory; --memory {} MiB is too little",
            MIN_MEMORY >> 20,
            m >> 20
        )));
    }
    Ok(m >> 20 << 20)
}

/// The kernel command line of a workload's VM (the guest contract of `scripts/vm-kit.sh`).
pub fn kernel_cmdline(w: &Workload, accel: Accel) -> String {
    let mut a = String::from("console=ttyS0 panic=-1 ");
    if accel != Accel::Kvm {
        // microvm under TCG cannot calibrate the TSC without these.
        a.push_str("tsc_early_khz=2000000 tsc=reliable ");
    }
    a.push_str(FAST_APPEND);
    a.push_str(&format!(
        " uc.hostname={} uc.stop_grace={GUEST_STOP_GRACE} uc.ip={}/{} uc.gw={} uc.dns={} uc.mtu={} uc.seed=1",
        w.hostname(),
        w.address,
        w.prefix,
        w.gateway,
        w.gateway,
        crate::nspawn::WORKLOAD_MTU
    ));
    a
}

/// The seed disk's contents: `cmd` (one argument a line), `env` (K=V a line), `workdir`.
pub fn seed_files(
    w: &Workload,
    image: &ImageMeta,
) -> Result<Vec<(&'static str, String)>, RuntimeError> {
    let cmd = crate::runtime::command_of(w, image)?;
    let env: Vec<String> = image
        .env
        .iter()
        .cloned()
        .chain(w.spec.env.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    for (what, v) in cmd
        .iter()
        .map(|a| ("an argument", a))
        .chain(env.iter().map(|e| ("an environment variable", e)))
        .chain([("the working directory", &image.workdir)])
    {
        if v.contains('\n') {
            return Err(RuntimeError::Other(format!(
                "{what} has a line break, which a microVM cannot be given: {v:?}"
            )));
        }
    }
    let lines = |v: &[String]| v.iter().map(|l| format!("{l}\n")).collect::<String>();
    Ok(vec![
        ("cmd", lines(&cmd)),
        ("env", lines(&env)),
        ("workdir", image.workdir.clone()),
    ])
}

/// A tar archive of `files`, as the guest's /init reads it from the seed disk.
pub fn seed_tar(files: &[(&str, String)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, text) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, text.as_bytes())
            .expect("writing to memory works");
    }
    b.into_inner().expect("writing to memory works")
}

/// QEMU's arguments for a VM of the kit in `kit`, before its disks and network.
pub fn machine_args(kit: &Path, accel: Accel, cpus: u32, memory: u64, append: &str) -> Vec<String> {
    let (accel_arg, cpu) = match accel {
        Accel::Kvm => ("kvm".to_string(), "host"),
        _ => (format!("tcg,tb-size={TB_SIZE_MIB}"), "max"),
    };
    [
        "-M",
        "microvm,acpi=on,rtc=on,pic=off,pit=off,pcie=off,usb=off",
        "-accel",
        &accel_arg,
        "-cpu",
        cpu,
        "-smp",
        &cpus.to_string(),
        "-m",
        &format!("{}M", memory >> 20),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        &kit_kernel(kit).display().to_string(),
        "-initrd",
        &kit.join("initrd.img").display().to_string(),
        "-append",
        append,
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// QEMU's arguments for a VM's disks (its overlay and its seed), its NIC on the tap `tap`
/// with the MAC of `address`, and, if given, its QMP socket.
pub fn device_args(
    overlay: &Path,
    seed: &Path,
    tap: &str,
    address: Ipv4Addr,
    qmp: Option<&Path>,
) -> Vec<String> {
    let mut a = vec![
        "-drive".to_string(),
        format!(
            "id=d0,file={},format=qcow2,if=none,cache=writeback,discard=unmap",
            opt_value(overlay)
        ),
        "-device".into(),
        "virtio-blk-device,drive=d0".into(),
        "-drive".into(),
        format!(
            "id=d1,file={},format=raw,if=none,readonly=on",
            opt_value(seed)
        ),
        "-device".into(),
        "virtio-blk-device,drive=d1".into(),
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"),
        "-device".into(),
        format!("virtio-net-device,netdev=n0,mac={}", mac_for(address)),
    ];
    if let Some(q) = qmp {
        a.push("-qmp".into());
        a.push(format!("unix:{},server=on,wait=off", opt_value(q)));
    }
    a
}

/// The kit's kernel: `vmlinuz`, booted through the Linux boot protocol. (The uncompressed
/// `vmlinux` the kit also has boots 0.3 to 0.5 s sooner through PVH, but then, with three
/// virtio-mmio devices, the guest sometimes finds no ACPI tables and no disks: measured here.)
pub fn kit_kernel(kit: &Path) -> PathBuf {
    kit.join("vmlinuz")
}

pub struct Vm {
    images: ImageStore,
    dirs: WorkloadDirs,
    shim_exe: PathBuf,
    /// The boot kit: `vmlinuz` and `initrd.img`.
    kit: PathBuf,
    /// Base disks, one per image digest.
    disks: PathBuf,
    pub qemu: PathBuf,
    accel: Accel,
    /// What `Auto` came to, once probed.
    resolved: tokio::sync::OnceCell<Accel>,
    probe: crate::runtime::ProbeCache,
}

impl Vm {
    /// `data` is the agent's data directory (base disks go in `DATA/vm-disks`).
    pub fn new(
        images: ImageStore,
        dirs: WorkloadDirs,
        shim_exe: PathBuf,
        data: &Path,
        kit: PathBuf,
        accel: Accel,
    ) -> Self {
        Self {
            images,
            dirs,
            shim_exe,
            kit,
            disks: data.join("vm-disks"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel,
            resolved: tokio::sync::OnceCell::new(),
            probe: Default::default(),
        }
    }

    /// Runs the tools a microVM needs (see [`crate::runtime::ProbeCache`]).
    async fn probe_now(&self) -> Result<(), String> {
        check_tool(
            &self.qemu,
            "--version",
            "qemu-system-x86 (scripts/vm-deps.sh does)",
        )
        .await?;
        if !self.kernel().is_file() || !self.initrd().is_file() {
            return Err(format!(
                "no microVM kit (kernel and initrd) in {}; scripts/vm-deps.sh makes it",
                self.kit.display()
            ));
        }
        for (prog, arg, pkg) in [
            ("qemu-img", "--version", "qemu-utils"),
            ("mkfs.ext4", "-V", "e2fsprogs"),
            ("ip", "-V", "iproute2"),
        ] {
            check_tool(Path::new(prog), arg, pkg).await?;
        }
        Ok(())
    }

    fn kernel(&self) -> PathBuf {
        kit_kernel(&self.kit)
    }

    fn initrd(&self) -> PathBuf {
        self.kit.join("initrd.img")
    }

    fn overlay(&self, id: &ContainerId) -> PathBuf {
        self.dirs.dir(id).join("disk.qcow2")
    }

    fn seed(&self, id: &ContainerId) -> PathBuf {
        self.dirs.dir(id).join("seed.tar")
    }

    /// QMP's socket: under /run, because a socket path has at most 107 bytes.
    fn qmp(&self, id: &ContainerId) -> PathBuf {
        Path::new("/run/uc/vm").join(format!("{}.qmp", id.as_str()))
    }

    /// The accelerator to use; the first call of `Auto` probes.
    pub async fn accel(&self) -> Accel {
        match self.accel {
            Accel::Auto => {
                *self
                    .resolved
                    .get_or_init(|| async {
                        let a = if self.kvm_boots().await {
                            Accel::Kvm
                        } else {
                            Accel::Tcg
                        };
                        tracing::info!(accel = %a, "microVM accelerator chosen");
                        a
                    })
                    .await
            }
            a => a,
        }
    }

    /// Whether KVM runs the kit's kernel: a probe boot that says "probe ok" in time.
    async fn kvm_boots(&self) -> bool {
        if fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return false;
        }
        let append = "console=ttyS0 panic=-1 quiet uc.probe=1";
        let mut cmd = tokio::process::Command::new(&self.qemu);
        cmd.args(machine_args(&self.kit, Accel::Kvm, 1, 128 << 20, append))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).contains("uc-init: probe ok"),
            _ => {
                tracing::info!("a KVM guest did not boot in time: using TCG");
                false
            }
        }
    }

    /// The full QEMU argv of a workload.
    fn argv(&self, w: &Workload, accel: Accel) -> Result<Vec<String>, RuntimeError> {
        let memory = guest_memory(w.spec.memory)?;
        let cpus = w.spec.cpu.map_or(1, |c| c.ceil().max(1.0) as u32);
        let mut a = vec![self.qemu.display().to_string()];
        a.extend(machine_args(
            &self.kit,
            accel,
            cpus,
            memory,
            &kernel_cmdline(w, accel),
        ));
        a.extend(device_args(
            &self.overlay(&w.id),
            &self.seed(&w.id),
            &net::host_ifname(w.id.as_str()),
            w.address,
            Some(&self.qmp(&w.id)),
        ));
        Ok(a)
    }

    /// The image's base disk (made on first use): an ext4 of its root filesystem with room
    /// for the instances' writes, never changed after, so its overlays stay valid.
    async fn base_disk(&self, image: &ImageMeta) -> Result<PathBuf, RuntimeError> {
        let name: String = image
            .digest
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = self.disks.join(format!("{name}.ext4"));
        if path.is_file() {
            return Ok(path);
        }
        fs::create_dir_all(&self.disks).map_err(io_err("creating", &self.disks))?;
        let rootfs = self.images.rootfs(&image.name);
        let tree = rootfs.clone();
        let bytes = tokio::task::spawn_blocking(move || tree_bytes(&tree))
            .await
            .unwrap_or(0);
        let tmp = self
            .disks
            .join(format!(".{name}.{}.tmp", hex::encode(crate::random8())));
        let made = async {
            let f = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
            f.set_len(bytes * 5 / 4 + DISK_FREE)
                .map_err(io_err("sizing", &tmp))?;
            drop(f);
            run(tokio::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "uc-root", "-i", "8192"])
                .args(["-E", "root_owner=0:0", "-d"])
                .arg(&rootfs)
                .arg(&tmp))
            .await?;
            fs::rename(&tmp, &path).map_err(io_err("renaming", &tmp))
        }
        .await;
        if made.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        made.map(|()| path)
    }

    /// Makes what the VM needs that it does not have yet: overlay, seed, tap.
    async fn prepare(&self, w: &Workload) -> Result<(), RuntimeError> {
        let image = self.images.require(&w.spec.image)?;
        let seed = self.seed(&w.id);
        if !seed.is_file() {
            let tar = seed_tar(&seed_files(w, &image)?);
            shim::write_atomic(&seed, &tar).map_err(io_err("writing", &seed))?;
        }
        let overlay = self.overlay(&w.id);
        if !overlay.is_file() {
            let base = self.base_disk(&image).await?;
            let tmp = overlay.with_extension("qcow2.tmp");
            run(tokio::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&base)
                .arg(&tmp))
            .await?;
            fs::rename(&tmp, &overlay).map_err(io_err("renaming", &tmp))?;
        }
        let tap = net::host_ifname(w.id.as_str());
        if !net::has_link(&tap).await? {
            run(tokio::process::Command::new("ip")
                .args(["tuntap", "add", "dev", &tap, "mode", "tap"]))
            .await?;
        }
        run(tokio::process::Command::new("ip").args([
            "link",
            "set",
            "dev",
            &tap,
            "mtu",
            &crate::nspawn::WORKLOAD_MTU.to_string(),
            "master",
            net::BRIDGE,
            "up",
        ]))
        .await?;
        // uc chose the guest's MAC, so the host needs no ARP: without this, a packet sent
        // before the guest is up waits out ARP's one-second retry.
        run(tokio::process::Command::new("ip").args([
            "neigh",
            "replace",
            &w.address.to_string(),
            "lladdr",
            &mac_for(w.address),
            "dev",
            net::BRIDGE,
            "nud",
            "permanent",
        ]))
        .await?;
        let qmp = self.qmp(&w.id);
        if let Some(d) = qmp.parent() {
            fs::create_dir_all(d).map_err(io_err("creating", d))?;
        }
        Ok(())
    }

    async fn start_workload(&self, w: &Workload) -> Result<(), RuntimeError> {
        net::ensure_bridge(w.gateway, w.prefix).await?;
        self.prepare(w).await?;
        let accel = self.accel().await;
        let argv = self.argv(w, accel)?;
        self.dirs.mark_started(&w.id)?;
        let limit = guest_memory(w.spec.memory)? + QEMU_OVERHEAD;
        crate::runtime::spawn_shim(&self.dirs, &self.shim_exe, w, &argv, Some(limit)).await
    }
}

/// A path as a value in QEMU's `key=value,...` options, where a comma is written twice.
fn opt_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Runs a helper program; its stderr is the error if it fails.
async fn run(cmd: &mut tokio::process::Command) -> Result<(), RuntimeError> {
    let what = format!("{:?}", cmd.as_std().get_program());
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| RuntimeError::Other(format!("running {what}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let args: Vec<_> = cmd
        .as_std()
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    Err(RuntimeError::Other(format!(
        "{what} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// The bytes of the files under `dir` (not following symlinks).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => 4096 + tree_bytes(&e.path()),
            // ext4 gives every file whole 4 KiB blocks.
            Ok(m) => m.len().div_ceil(4096).max(1) * 4096,
            Err(_) => 0,
        })
        .sum()
}

/// Sends one QMP command and waits for its answer.
async fn qmp(sock: &Path, command: &str) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let talk = async {
        let s = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| format!("connecting to {}: {e}", sock.display()))?;
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let mut next = async || -> Result<serde_json::Value, String> {
            let l = lines
                .next_line()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("QEMU closed its QMP socket")?;
            serde_json::from_str(&l).map_err(|e| format!("QMP sent {l:?}: {e}"))
        };
        next().await?; // the greeting
        for c in ["qmp_capabilities", command] {
            w.write_all(format!("{{\"execute\":\"{c}\"}}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let v = next().await?;
                if v.get("return").is_some() {
                    break;
                }
                if let Some(e) = v.get("error") {
                    return Err(format!("QMP {c}: {e}"));
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(3), talk)
        .await
        .map_err(|_| "QMP did not answer in 3 s".to_string())?
}

/// The workload's own exit code, which the guest's /init writes last on the console
/// (QEMU itself exits 0 when the guest powers off).
fn guest_exit(dir: &Path) -> Option<i32> {
    shim::tail(dir, 20)
        .iter()
        .rev()
        .find_map(|l| l.text.strip_prefix("uc-init: exit ")?.trim().parse().ok())
}

#[async_trait::async_trait]
impl Runtime for Vm {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Vm
    }

    async fn available(&self) -> Result<(), String> {
        if !Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun: microVMs need tap devices".into());
        }
        let (kernel, initrd) = (self.kernel(), self.initrd());
        let files = [
            self.qemu.as_path(),
            Path::new("qemu-img"),
            Path::new("mkfs.ext4"),
            Path::new("ip"),
            kernel.as_path(),
            initrd.as_path(),
        ];
        self.probe.get(&files, || self.probe_now()).await?;
        self.accel().await;
        Ok(())
    }

    async fn list(&self) -> Vec<Status> {
        let mut all = self.dirs.statuses(RuntimeKind::Vm);
        for s in &mut all {
            if let Seen::Exited { code: code @ 0, .. } = &mut s.seen
                && let Some(c) = guest_exit(&self.dirs.dir(&s.meta.id))
            {
                *code = c;
            }
        }
        all
    }

    async fn create(&self, w: &Workload) -> Result<(), RuntimeError> {
        let image = self.images.require(&w.spec.image)?;
        seed_files(w, &image)?;
        guest_memory(w.spec.memory)?;
        self.dirs.save_workload(w, RuntimeKind::Vm)?;
        let started = self.start_workload(w).await;
        crate::runtime::undo_if_failed(self, &w.id, started).await
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        match self.dirs.to_restart(id)? {
            Some(w) => self.start_workload(&w).await,
            None => Ok(()),
        }
    }

    /// The power button first: the guest's /init SIGTERMs the workload, SIGKILLs it after
    /// its own grace, and powers off. If QEMU is still there after `grace` (and a little
    /// for the poweroff), the shim's stop ends QEMU.
    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        if self.dirs.live_shim(id).is_none() {
            return Ok(());
        }
        match qmp(&self.qmp(id), "system_powerdown").await {
            Ok(()) => {
                let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(3);
                while self.dirs.live_shim(id).is_some() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Err(e) => tracing::info!(container = %id.short(), error = %e, "no graceful stop"),
        }
        self.dirs.stop_shim(id, Duration::from_secs(2)).await
    }

    /// Every step is tried even when one fails (a permanent neighbour entry left behind
    /// would make the address's next workload unreachable); the first failure is returned.
    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let stopped = self.stop(id, Duration::from_secs(GUEST_STOP_GRACE)).await;
        let detached = net::detach(&net::host_ifname(id.as_str()))
            .await
            .map_err(RuntimeError::from);
        let forgotten = match self.dirs.read_meta(id) {
            Some(m) => net::remove_neighbor(m.address)
                .await
                .map_err(RuntimeError::from),
            None => Ok(()),
        };
        let _ = fs::remove_file(self.qmp(id));
        cgroup::remove(id.as_str());
        stopped?;
        detached?;
        forgotten?;
        // Its directory goes last, and only when all else went: it is how a retry finds it.
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

    async fn exec(
        &self,
        _: &ContainerId,
        _: crate::exec::ExecRequest,
    ) -> Result<crate::exec::Exec, RuntimeError> {
        Err(RuntimeError::Other(
            "uc exec cannot reach into a microVM yet (its guest runs no agent); \
             reach its service over the network instead"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uc_proto::spec::{Mode, ServiceSpec};

    fn spec() -> ServiceSpec {
        ServiceSpec {
            image: "demo".into(),
            runtime: RuntimeKind::Vm,
            command: vec![],
            env: Default::default(),
            ports: vec![],
            mode: Mode::Replicated { replicas: 1 },
            machines: vec![],
            cpu: None,
            memory: None,
            ssh_keys: vec![],
        }
    }

    fn workload(spec: ServiceSpec) -> Workload {
        Workload {
            id: ContainerId::from_bytes([7; 16]),
            service: "web".into(),
            spec,
            address: Ipv4Addr::new(10, 210, 3, 9),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 210, 3, 1),
            machine: "m3".into(),
            digest: "d".into(),
        }
    }

    fn image() -> ImageMeta {
        ImageMeta {
            name: "demo".into(),
            digest: "sha256:ab".into(),
            size_bytes: 1,
            created_ms: 0,
            cmd: vec!["httpd".into(), "-f".into()],
            env: vec!["A=1".into()],
            workdir: "/srv".into(),
        }
    }

    #[test]
    fn the_mac_follows_the_address() {
        assert_eq!(mac_for(Ipv4Addr::new(10, 210, 3, 9)), "52:54:0a:d2:03:09");
        assert_ne!(
            mac_for(Ipv4Addr::new(10, 210, 3, 9)),
            mac_for(Ipv4Addr::new(10, 210, 9, 3))
        );
    }

    #[test]
    fn the_kernel_gets_address_gateway_name_and_seed() {
        let w = workload(spec());
        let tcg = kernel_cmdline(&w, Accel::Tcg);
        for want in [
            "uc.ip=10.210.3.9/24",
            "uc.gw=10.210.3.1",
            "uc.dns=10.210.3.1",
            "uc.hostname=web-07070707",
            "uc.seed=1",
            "uc.mtu=1420",
            "tsc_early_khz=",
        ] {
            assert!(tcg.contains(want), "{want} missing in {tcg}");
        }
        assert!(!kernel_cmdline(&w, Accel::Kvm).contains("tsc_early_khz"));
    }

    #[test]
    fn the_seed_holds_the_command_and_the_environment() {
        let mut spec = spec();
        spec.env.insert("B".into(), "2".into());
        let files = seed_files(&workload(spec.clone()), &image()).unwrap();
        assert_eq!(files[0], ("cmd", "httpd\n-f\n".to_string()));
        assert_eq!(files[1], ("env", "A=1\nB=2\n".to_string()));
        assert_eq!(files[2], ("workdir", "/srv".to_string()));

        let tar = seed_tar(&files);
        assert_eq!(tar.len() % 512, 0);
        assert_eq!(&tar[257..262], b"ustar", "the guest finds the seed by this");
        let mut a = tar::Archive::new(&tar[..]);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["cmd", "env", "workdir"]);

        spec.command = vec!["sh".into(), "-c".into(), "echo a\necho b".into()];
        let e = seed_files(&workload(spec), &image()).unwrap_err();
        assert!(e.to_string().contains("line break"), "{e}");
    }

    #[test]
    fn memory_has_a_floor_and_a_default() {
        assert_eq!(guest_memory(None).unwrap(), DEFAULT_MEMORY);
        assert_eq!(guest_memory(Some((300 << 20) + 5)).unwrap(), 300 << 20);
        let e = guest_memory(Some(64 << 20)).unwrap_err();
        assert!(e.to_string().contains("at least 80 MiB"), "{e}");
    }

    #[test]
    fn accelerators_parse() {
        assert_eq!("auto".parse(), Ok(Accel::Auto));
        assert_eq!("tcg".parse(), Ok(Accel::Tcg));
        assert!("xen".parse::<Accel>().is_err());
    }
}
