//! Errors of the cluster state: one enum for the whole crate.

use std::net::Ipv4Addr;

use uc_proto::{ContainerId, MachineId, ServiceId, Subnet};

/// Why a join token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinTokenProblem {
    Unknown,
    Expired { at_ms: u64 },
}

impl std::fmt::Display for JoinTokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown => f.write_str("unknown (already used, or never issued)"),
            Self::Expired { at_ms } => write!(f, "expired at {at_ms} ms"),
        }
    }
}

/// Everything that can go wrong with the cluster state. A call that returns an
/// error has left the document unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading cluster state ({len} bytes): {reason}")]
    Load { len: usize, reason: String },
    #[error("cluster state document is malformed: {0}")]
    Malformed(String),
    #[error("sync message ({len} bytes) rejected: {reason}")]
    Sync { len: usize, reason: String },
    #[error("network {0} is too small for /24 machine subnets: use a prefix of /22 or shorter")]
    NetworkTooSmall(Subnet),
    #[error(
        "network {0} is too large: a cluster holds at most 1022 machines (a /14); use a prefix of /14 or longer"
    )]
    NetworkTooLarge(Subnet),
    #[error("no free /24 left in network {0}")]
    NetworkFull(Subnet),
    #[error(
        "invalid {kind} name {name:?}: use 1 to 63 lower-case letters, digits and '-', not starting or ending with '-'"
    )]
    InvalidName { kind: &'static str, name: String },
    #[error("{kind} name {name:?} is taken by {kind} {by}")]
    NameTaken {
        kind: &'static str,
        name: String,
        by: String,
    },
    #[error("machine {0} already exists")]
    MachineExists(MachineId),
    #[error("machine {0} not found")]
    UnknownMachine(MachineId),
    #[error("machine {0} is removed")]
    MachineRemoved(MachineId),
    #[error("service {0} not found")]
    UnknownService(ServiceId),
    #[error("container {0} not found")]
    UnknownContainer(ContainerId),
    #[error(
        "container {container} address {address} is outside subnet {subnet} of machine {machine}"
    )]
    AddressOutsideSubnet {
        container: ContainerId,
        address: Ipv4Addr,
        subnet: Subnet,
        machine: MachineId,
    },
    #[error("container {container} address {address} is already used by container {by}")]
    AddressTaken {
        container: ContainerId,
        address: Ipv4Addr,
        by: ContainerId,
    },
    #[error("join token {hash}: {problem}")]
    JoinToken {
        hash: String,
        problem: JoinTokenProblem,
    },
    #[error("invalid join token hash {0:?}: expected a non-empty string without '/'")]
    InvalidTokenHash(String),
}
