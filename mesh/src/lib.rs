//! The uc mesh: a flat WireGuard network over the cluster's machines.
//!
//! A pure core ([`plan`], [`diff`], [`endpoint`], [`addr`]) turns the
//! cluster state into the interface this machine should have and into the
//! smallest set of peer changes that gets it there; it does no I/O and is
//! tested without root. Around it, I/O shells: [`keys`] (the private key file),
//! [`device`] (the WireGuard backends behind one trait), [`kernel`] (the
//! kernel's WireGuard, configured over netlink), [`userspace`] (uc's
//! batched userspace WireGuard) and [`netlink`]
//! (addresses and link state through rtnetlink).

pub mod addr;
pub mod device;
pub mod diff;
pub mod endpoint;
pub mod kernel;
pub mod keys;
pub mod netlink;
pub mod plan;
pub mod userspace;

pub use addr::{AllowedIp, MeshAddressing};
pub use device::{
    Backend, BackendChoice, DeviceStatus, KernelDevice, MeshDevice, PeerStatus, UserspaceDevice,
};
pub use diff::{PeerConfig, PeerOp, diff};
pub use endpoint::EndpointChooser;
pub use keys::{KeyError, KeyPair, PrivateKey, PublicKey};
pub use plan::{MeshMachine, Plan, PlannedPeer, plan};

/// The mesh interface's MTU: 1500 minus WireGuard's overhead over IPv6.
pub const MTU: u32 = 1420;
/// Keepalive every 25 s, so NAT mappings in front of a machine stay open.
pub const KEEPALIVE_SECS: u16 = 25;
