//! Many machines on one host: network namespaces running the real `ucd`, for end-to-end tests and `uc local`.
//!
//! A [`Cluster`] owns a hub namespace with the bridges and one namespace per machine; each machine
//! runs `ucd` with its own data directory, and the harness talks to every agent with the real `uc`
//! through the agent's Unix socket. Dropping a cluster kills its agents and deletes everything it
//! made, also when a test panics; [`Cluster::detach`] instead leaves it running for `uc local up`.
//! An [`SshLab`] is a cluster of hosts running sshd and a laptop to reach them from, for what `uc`
//! does to a machine over SSH.
//!
//! Architecture invariant: nothing of a test topology is in the root network namespace, and no test
//! packet goes anywhere but loopback or a namespace this crate made.

pub mod acme;
mod cluster;
pub mod dockerd;
pub mod netns;
pub mod process;
pub mod sshlab;
pub mod workloads;

use std::time::{Duration, Instant};

pub use cluster::{
    Bootstrap, Cluster, ClusterBuilder, GOSSIP_PORT, HUB_IP, JOIN_PORT, MachineHandle, PEER_PORT,
    UNDERLAY_FIREWALL, Uc, WG_PORT,
};
pub use process::{Bins, run_ok, run_with_timeout};
pub use sshlab::SshLab;

/// An error that [`eventually`] does not retry: waiting longer cannot help (an agent exited, say).
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// Calls `f` every 50 ms until it succeeds or `timeout` has passed; the error names `what` and
/// carries `f`'s last error. An error holding a [`Fatal`] ends the wait at once.
pub fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.downcast_ref::<Fatal>().is_some() => {
                return Err(e.context(format!(
                    "waiting for {what}: gave up after {attempts} attempts"
                )));
            }
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!(
                    "waiting for {what}: still failing after {timeout:?} ({attempts} attempts)"
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_retries_until_success() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "three tries", || {
            n += 1;
            if n < 3 {
                anyhow::bail!("try {n}")
            } else {
                Ok(n)
            }
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn eventually_reports_what_and_the_last_error() {
        let e = eventually(
            Duration::from_millis(120),
            "the impossible",
            || -> anyhow::Result<()> { anyhow::bail!("nope") },
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("the impossible") && msg.contains("nope"),
            "{msg}"
        );
    }

    #[test]
    fn eventually_stops_at_a_fatal_error() {
        let start = Instant::now();
        let mut n = 0;
        let e = eventually(Duration::from_secs(30), "x", || -> anyhow::Result<()> {
            n += 1;
            Err(Fatal("agent exited".into()).into())
        })
        .unwrap_err();
        assert_eq!(n, 1);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(format!("{e:#}").contains("agent exited"));
    }
}
