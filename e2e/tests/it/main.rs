//! End-to-end tests: the real `ucd` and `uc` on machines made of network namespaces.
//!
//! Needs root and the binaries (`cargo build --workspace --bins`); run with
//! `cargo nextest run -p uc-e2e` (see `.config/nextest.toml`: these tests run one at a time).

mod agents;
mod dns;
mod harness;
mod ingress;
mod local;
mod machine_ssh;
mod mesh;
mod sshlab;
mod workloads;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use uc_e2e::{Cluster, ClusterBuilder, eventually};

/// How long tests wait for gossip and sync to settle.
pub const SETTLE: Duration = Duration::from_secs(60);

/// Starts a cluster, runs `test` on it, and on failure adds the tails of the agents' logs to the
/// error (the cluster, and its logs, are gone once this returns).
pub fn with_cluster(
    b: ClusterBuilder,
    test: impl FnOnce(&mut Cluster) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut c = Cluster::start(b)?;
    test(&mut c).map_err(|e| c.with_logs(e, &[]))
}

/// The services of a state dump, by name, whatever the document's shape for them
/// (a map keyed by id whose values carry `name`, or a list of records).
pub fn services(dump: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    match &dump["services"] {
        Value::Object(map) => {
            for (key, rec) in map {
                let name = rec["name"].as_str().unwrap_or(key).to_string();
                out.insert(name, rec.clone());
            }
        }
        Value::Array(list) => {
            for rec in list {
                if let Some(name) = rec["name"].as_str() {
                    out.insert(name.to_string(), rec.clone());
                }
            }
        }
        _ => {}
    }
    out
}

/// Machine name -> liveness as machine `i` sees it (`self` for itself), removed machines left out.
pub fn liveness(c: &Cluster, i: usize) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for m in c.machines_seen_by(i)? {
        if m["state"] == "removed" {
            continue;
        }
        let name = m["name"]
            .as_str()
            .context("machine without a name")?
            .to_string();
        let l = if m["is_self"] == Value::Bool(true) {
            "self"
        } else {
            m["liveness"].as_str().unwrap_or("?")
        };
        out.insert(name, l.to_string());
    }
    Ok(out)
}

/// Runs `uc ARGS` on machine `i` and fails with its stderr unless it succeeds.
pub fn uc_ok(c: &Cluster, i: usize, args: &[&str]) -> anyhow::Result<String> {
    let out = c.uc(i, args)?;
    if !out.status.success() {
        bail!(
            "uc {} on {} failed ({}): {}",
            args.join(" "),
            c.machine(i).name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits at most `within` until every machine's DNS (`uc dns lookup` on it) answers `name`
/// with NXDOMAIN.
pub fn nxdomain_everywhere(c: &Cluster, name: &str, within: Duration) -> anyhow::Result<()> {
    let mut gone = vec![false; c.len()];
    eventually(
        within,
        &format!("{name} NXDOMAIN on every machine within {within:?}"),
        || {
            for (i, g) in gone.iter_mut().enumerate() {
                if !*g {
                    let v: Value = serde_json::from_str(&uc_ok(
                        c,
                        i,
                        &["-o", "json", "dns", "lookup", name],
                    )?)?;
                    *g = v["response_code"] == "Non-Existent Domain";
                }
            }
            anyhow::ensure!(
                gone.iter().all(|g| *g),
                "answered on {gone:?} (true: NXDOMAIN)"
            );
            Ok(())
        },
    )
}

/// Waits until `machines` all have the same state dump and heads digest; returns the dump.
pub fn converged(c: &Cluster, machines: &[usize]) -> anyhow::Result<Value> {
    eventually(SETTLE, "identical state on every machine", || {
        let first = machines[0];
        let dump = c.dump(first)?;
        let digest = c.status(first)?["heads_digest"].clone();
        for &i in &machines[1..] {
            let other = c.dump(i)?;
            if other != dump {
                let a: BTreeSet<String> = services(&dump).into_keys().collect();
                let b: BTreeSet<String> = services(&other).into_keys().collect();
                bail!(
                    "dumps of {} and {} differ (services only on {}: {:?}; only on {}: {:?})",
                    c.machine(first).name,
                    c.machine(i).name,
                    c.machine(first).name,
                    a.difference(&b).collect::<Vec<_>>(),
                    c.machine(i).name,
                    b.difference(&a).collect::<Vec<_>>()
                );
            }
            let d = c.status(i)?["heads_digest"].clone();
            if d != digest {
                bail!(
                    "heads_digest of {} is {d}, of {} {digest}",
                    c.machine(i).name,
                    c.machine(first).name
                );
            }
        }
        Ok(dump)
    })
}

/// Deterministic pseudo-random bytes (xorshift), so a failing garbage test can be replayed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
