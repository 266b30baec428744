//! Wire and API types of uc: typed identifiers, the subnet type, and the gRPC
//! definitions (`uc.v1`). The only crate where wire formats live.

#[cfg(feature = "client")]
pub mod client;
mod ids;
mod subnet;

pub use ids::{ContainerId, IdError, MachineId, ServiceId};
pub use subnet::{Subnet, SubnetError};

/// Generated gRPC code for `proto/uc.proto`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("uc.v1");
}

/// Default UDP port of the gossip (membership) protocol.
pub const DEFAULT_GOSSIP_PORT: u16 = 51001;
/// Default TCP port of the peer API (state sync, join).
pub const DEFAULT_PEER_PORT: u16 = 51000;
/// Largest gRPC message accepted on the peer API: a first sync carries the
/// whole document history in one message.
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
