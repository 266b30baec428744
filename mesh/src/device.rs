//! WireGuard devices behind one trait. The kernel backend
//! ([`crate::kernel`]) configures the kernel's module over netlink. The userspace backend
//! ([`crate::userspace`]) runs in this process: it creates a TUN device in
//! the calling thread's network namespace and runs its own threads, and is
//! configured by direct calls (no socket file, so several agents on one
//! host never collide).

use std::net::SocketAddr;
use std::time::Duration;

use crate::addr::AllowedIp;
use crate::diff::PeerOp;
pub use crate::kernel::KernelDevice;
use crate::keys::PublicKey;
pub use crate::userspace::UserspaceDevice;

/// Which WireGuard implementation carries the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Userspace,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Userspace => "userspace (uc, boringtun's Noise)",
        }
    }
}

/// Which backend an agent asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The kernel's WireGuard where the kernel has it, else userspace.
    Auto,
    Kernel,
    Userspace,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            _ => Err(format!(
                "WireGuard backend {s:?} is not one of auto, kernel, userspace"
            )),
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

/// A device that failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("creating WireGuard interface {name}: {message}")]
    Create { name: String, message: String },
    #[error("creating WireGuard interface {name}: this kernel has no WireGuard module")]
    NoKernelModule { name: String },
    #[error("WireGuard interface {name}: {what}: {source}")]
    Netlink {
        name: String,
        what: String,
        source: std::io::Error,
    },
}

/// One peer as the device reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<AllowedIp>,
    /// Time since the last handshake.
    pub last_handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub keepalive: u16,
}

/// The device as it reports itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStatus {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
}

/// A WireGuard interface whose peers can be changed one by one.
pub trait MeshDevice: Send {
    fn backend(&self) -> Backend;
    /// Applies peer changes; peers not named are left alone.
    fn apply(&mut self, ops: &[PeerOp]) -> Result<(), DeviceError>;
    fn status(&mut self) -> Result<DeviceStatus, DeviceError>;
}
