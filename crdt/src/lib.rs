//! The cluster state document of uc: machines, services, containers and join
//! tokens in one automerge CRDT, with deterministic conflict rules and thin
//! wrappers around automerge's sync protocol.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and draws
//! no random numbers. Time (`now_ms`), ids and actor bytes come from the caller.

mod error;
mod ingress;
mod model;
mod resolve;
mod state;

#[cfg(feature = "sim")]
pub mod sim;

pub use error::{Error, JoinTokenProblem};
pub use ingress::{AcmeAccount, CertRecord, Challenge, OrderStatus};
pub use model::{Container, DesiredState, Fix, Machine, MachineState, NewMachine, Service};
pub use resolve::machine_slots;
pub use state::{ClusterState, PeerSync, check_name};

#[cfg(test)]
mod tests;
