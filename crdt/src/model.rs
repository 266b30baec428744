//! The records of the cluster state as callers see them, and the fixes the
//! conflict rules make.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use uc_proto::{ContainerId, MachineId, ServiceId, Subnet};

/// A machine of the cluster. Removed machines stay in the document as
/// tombstones, so that a stale replica cannot bring them back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub id: MachineId,
    pub name: String,
    pub public_key: String,
    pub endpoints: Vec<String>,
    pub subnet: Subnet,
    pub tags: BTreeSet<String>,
    pub state: MachineState,
    pub created_at_ms: u64,
}

impl Machine {
    pub fn is_active(&self) -> bool {
        self.state == MachineState::Active
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Active,
    Removed,
}

impl MachineState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Removed => "removed",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "removed" => Some(Self::Removed),
            _ => None,
        }
    }
}

/// What a caller supplies to add a machine; the subnet is allocated by
/// [`crate::ClusterState::add_machine`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMachine {
    pub id: MachineId,
    pub name: String,
    pub public_key: String,
    pub endpoints: Vec<String>,
    pub tags: BTreeSet<String>,
}

/// A service: a name and an opaque JSON spec (interpreted by the agent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: ServiceId,
    pub name: String,
    pub spec: serde_json::Value,
    pub created_at_ms: u64,
}

/// One container (replica) of a service, placed on a machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: ContainerId,
    pub service: ServiceId,
    pub machine: MachineId,
    pub address: Option<Ipv4Addr>,
    pub desired: DesiredState,
    pub created_at_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Stopped,
}

impl DesiredState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Self::Running),
            "stopped" => Some(Self::Stopped),
            _ => None,
        }
    }
}

/// A change made by [`crate::ClusterState::resolve_conflicts`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "fix")]
pub enum Fix {
    /// The machine shared its subnet with an older machine and moved to a free one.
    MachineMoved {
        machine: MachineId,
        from: Subnet,
        to: Subnet,
    },
    /// The machine shared its name with an older active machine.
    MachineRenamed {
        machine: MachineId,
        from: String,
        to: String,
    },
    /// The service shared its name with an older service.
    ServiceRenamed {
        service: ServiceId,
        from: String,
        to: String,
    },
    /// The container's address moved: it followed its machine to a new subnet,
    /// or it collided with an older container's address.
    ContainerReaddressed {
        container: ContainerId,
        from: Ipv4Addr,
        to: Ipv4Addr,
    },
    /// The container's service was removed, or its machine was, concurrently
    /// with the container being placed.
    ContainerRemoved { container: ContainerId },
}
