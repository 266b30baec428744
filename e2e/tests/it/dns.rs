//! The internal DNS on namespace machines: every agent answers the cluster's names from its own
//! replica, on its mesh address, to `dig` run on the machine as a workload would, and to
//! `uc dns lookup`, also across the mesh (IPv4 and IPv6) and during a partition.

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use uc_e2e::{Bootstrap, Cluster, ClusterBuilder, eventually};

use crate::{SETTLE, nxdomain_everywhere, uc_ok, with_cluster};

/// `uc -o json dns lookup NAME` on machine `i` (asking machine `via`'s server when given).
fn lookup(c: &Cluster, i: usize, name: &str, via: Option<&str>) -> anyhow::Result<Value> {
    let mut args = vec!["-o", "json", "dns", "lookup", name];
    if let Some(m) = via {
        args.extend(["--machine", m]);
    }
    Ok(serde_json::from_str(&uc_ok(c, i, &args)?)?)
}

fn rcode(v: &Value) -> String {
    v["response_code"].as_str().unwrap_or("").to_string()
}

#[test]
fn every_machine_answers_the_clusters_names() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(3), |c| {
        let ips: Vec<String> = (0..3)
            .map(|i| c.mesh_ip(i).map(|ip| ip.to_string()))
            .collect::<Result<_, _>>()?;
        for i in 0..3 {
            for (j, ip) in ips.iter().enumerate() {
                let name = format!("m{j}.machine.internal");
                let v = lookup(c, i, &name, None)?;
                let answers = v["answers"].as_array().context("no answers")?;
                ensure!(
                    answers.len() == 1 && answers[0].as_str().unwrap_or("").ends_with(ip.as_str()),
                    "m{i} answers {name} with {v}"
                );
            }
            // As a workload on the machine asks: dig at the machine's mesh address.
            let out = c.exec_in(
                i,
                &[
                    "dig",
                    &format!("@{}", ips[i]),
                    "+short",
                    "+time=2",
                    "m1.machine.internal",
                ],
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(text.trim() == ips[1], "dig on m{i}: {text:?}");
        }
        // Over IPv6: m0 asks m2's server at m2's IPv6 mesh address, across the mesh.
        let (_, m1_v6) = c.mesh_addresses(1)?;
        let (_, m2_v6) = c.mesh_addresses(2)?;
        let out = c.exec_in(
            0,
            &[
                "dig",
                &format!("@{m2_v6}"),
                "+short",
                "+time=2",
                "AAAA",
                "m1.machine.internal",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.trim().parse::<std::net::Ipv6Addr>().ok() == Some(m1_v6),
            "dig over IPv6 at {m2_v6}: {text:?}, expected {m1_v6}"
        );
        // Another machine's server, over the mesh.
        let v = lookup(c, 0, "m0.machine.internal", Some("m2"))?;
        ensure!(
            v["server"].as_str().unwrap_or("").starts_with(&ips[2]),
            "{v}"
        );
        ensure!(rcode(&v) == "No Error", "{v}");
        let nx = lookup(c, 0, "nothing.internal", None)?;
        ensure!(
            rcode(&nx) == "Non-Existent Domain"
                && nx["authorities"][0].as_str().unwrap_or("").contains("SOA"),
            "{nx}"
        );
        Ok(())
    })
}

#[test]
fn names_follow_the_state_and_each_side_of_a_partition_answers_from_its_own() -> anyhow::Result<()>
{
    with_cluster(ClusterBuilder::new(3), |c| {
        uc_ok(c, 0, &["state", "put-service", "web"])?;
        // A service with no containers yet: the name exists, with no addresses.
        for i in 0..3 {
            eventually(SETTLE, "web.internal exists everywhere", || {
                let v = lookup(c, i, "web.internal", None)?;
                ensure!(rcode(&v) == "No Error", "m{i}: {v}");
                Ok(())
            })?;
        }
        uc_ok(c, 1, &["state", "rm-service", "web"])?;
        // Every machine, the writer and the two that learn it by replication, within 1 s.
        nxdomain_everywhere(c, "web.internal", Duration::from_secs(1))?;
        // Partition {0} | {1, 2}: a service made on one side is answered there only.
        c.partition(&[0])?;
        uc_ok(c, 0, &["state", "put-service", "solo"])?;
        ensure!(rcode(&lookup(c, 0, "solo.internal", None)?) == "No Error");
        std::thread::sleep(Duration::from_secs(1));
        for i in [1, 2] {
            let v = lookup(c, i, "solo.internal", None)?;
            ensure!(
                rcode(&v) == "Non-Existent Domain",
                "m{i} during the partition: {v}"
            );
        }
        c.heal()?;
        for i in 0..3 {
            eventually(SETTLE, "solo.internal everywhere after the heal", || {
                let v = lookup(c, i, "solo.internal", None)?;
                ensure!(rcode(&v) == "No Error", "m{i}: {v}");
                Ok(())
            })?;
        }
        Ok(())
    })
}

/// Two machines join on the two sides of a partition and are given the same /24; after the heal
/// one of them moves to another (the state's rule), and its DNS server moves with it.
#[test]
fn dns_follows_its_machine_to_a_new_subnet() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(2), |c| {
        c.partition(&[0])?;
        // m2 joins through m1, on m1's side; m3 through m0, on m0's side.
        let (a, b) = (c.add_namespace()?, c.add_namespace()?);
        c.partition(&[0, b])?;
        for (i, via) in [(a, 1), (b, 0)] {
            let (peer, token) = (c.machine(via).join_addr(), c.token(via)?);
            c.start_agent(i, Bootstrap::Join { peer, token }, &[])?;
            c.wait_ready(i)?;
        }
        let before = (c.mesh_ip(a)?, c.mesh_ip(b)?);
        ensure!(
            before.0 == before.1,
            "both sides should give the lowest free /24: {before:?}"
        );
        c.heal()?;
        let (mover, moved_to) = eventually(SETTLE, "one of the two moves to another /24", || {
            let now = (c.mesh_ip(a)?, c.mesh_ip(b)?);
            ensure!(now.0 != now.1, "both still on {}", now.0);
            Ok(if now.0 != before.0 {
                (a, now.0)
            } else {
                (b, now.1)
            })
        })?;
        let m0 = c.mesh_ip(0)?.to_string();
        eventually(SETTLE, "DNS answers on the new address", || {
            let out = c.exec_in(
                mover,
                &[
                    "dig",
                    &format!("@{moved_to}"),
                    "+short",
                    "+time=1",
                    "+tries=1",
                    "m0.machine.internal",
                ],
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(text.trim() == m0, "dig @{moved_to}: {text:?}");
            // And `uc dns lookup` asks the server where it now is.
            let v = lookup(c, mover, "m0.machine.internal", None)?;
            ensure!(
                v["server"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&moved_to.to_string()),
                "{v}"
            );
            Ok(())
        })?;
        Ok(())
    })
}
