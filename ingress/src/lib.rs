//! uc's ingress: public HTTP, HTTPS and TCP on the machines tagged `ingress`, routed by host to a
//! service's containers over the mesh.
//!
//! Pure cores: `routes` (the services' published ports and containers in, a route table out),
//! `balance` (the order in which to try a route's backends). I/O shells: `tls` (certificates by
//! SNI), `proxy` (the HTTP/HTTPS/TCP listeners on sockets the caller bound, with a shutdown
//! token), `upstream` (kept-alive HTTP/1.1 connections to the backends), `workers` (threads
//! with a single-threaded runtime each, that serve every listener), `acme` (certificates from
//! an ACME CA, HTTP-01 answered by every ingress).

pub mod acme;
pub mod balance;
pub mod proxy;
pub mod routes;
pub mod tls;
mod upstream;
pub mod workers;

pub use proxy::{Ingress, Limits, serve};
pub use routes::{Backend, ContainerInput, HttpRoute, Listener, RouteTable, ServiceInput};
pub use tls::{Cert, CertStore};
pub use workers::Workers;

/// What can go wrong in the ingress.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate: {0}")]
    Cert(String),
    #[error("ACME: {0}")]
    Acme(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
