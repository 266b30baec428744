//! Wire and API types of uc: typed identifiers, the subnet type, and the gRPC
//! definitions (`uc.v1`). The only crate where wire formats live.

#[cfg(feature = "client")]
pub mod client;
mod ids;
pub mod spec;
mod subnet;

pub use ids::{ContainerId, IdError, MachineId, ServiceId, machine_name_from_host};
pub use subnet::{Subnet, SubnetError};

/// Generated gRPC code for `proto/uc.proto`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("uc.v1");
}

/// Default UDP port of the gossip (membership) protocol, on the mesh address.
pub const DEFAULT_GOSSIP_PORT: u16 = 51001;
/// Default TCP port of the peer API (state sync, agent to agent), on the
/// mesh address.
pub const DEFAULT_PEER_PORT: u16 = 51000;
/// Default TCP port of the join endpoint, the one API on the underlay.
pub const DEFAULT_JOIN_PORT: u16 = 51002;
/// Default UDP port of WireGuard, on the underlay.
pub const DEFAULT_WG_PORT: u16 = 51820;
/// Largest gRPC message accepted on the peer API: a first sync carries the
/// whole document history in one message.
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
