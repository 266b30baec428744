//! WireGuard devices behind one trait. The userspace backend
//! ([`crate::userspace`]) runs in this process: it creates a TUN device in
//! the calling thread's network namespace and runs its own threads, and is
//! configured by direct calls (no socket file, so several agents on one
//! host never collide).

use std::net::SocketAddr;
use std::time::Duration;

use crate::addr::AllowedIp;
use crate::diff::PeerOp;
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

/// A device that failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("creating WireGuard interface {name}: {message}")]
    Create { name: String, message: String },
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
