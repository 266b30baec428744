//! Workloads on one machine: the pure cores of placement (`place`) and
//! reconciliation (`reconcile`), and the I/O around them: the image store,
//! the machine's workload bridge and per-workload network namespaces, the
//! shim that runs a workload's process, its cgroups, and the runtimes
//! (systemd-nspawn, Docker and QEMU microVMs).

pub mod cgroup;
pub mod docker;
pub mod exec;
pub mod image;
pub mod net;
pub mod nspawn;
pub mod place;
pub mod ports;
pub mod reconcile;
pub mod rootfs;
pub mod runtime;
pub mod shim;
pub mod vm;

/// 8 random bytes (for temporary names).
pub(crate) fn random8() -> [u8; 8] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source works");
    b
}
