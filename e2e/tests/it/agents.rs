//! Clusters of real agents: convergence, partitions, crashes, joins, refused joins and garbage input.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use uc_e2e::{Bootstrap, Cluster, ClusterBuilder, GOSSIP_PORT, PEER_PORT, eventually};

use crate::{SETTLE, converged, liveness, noise, services, uc_ok, with_cluster};

#[test]
fn five_machines_converge() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(5), |c| {
        // `ip netns exec` execs: the pid the harness holds is ucd's.
        for i in 0..c.len() {
            let pid = c.machine(i).pid().context("agent running")?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
            ensure!(
                exe.ends_with("ucd"),
                "pid {pid} of {} is {}",
                c.machine(i).name,
                exe.display()
            );
        }
        let mut subnets_seen = None;
        for i in 0..c.len() {
            let ms = c.machines_seen_by(i)?;
            ensure!(
                ms.len() == 5,
                "{} lists {} machines: {ms:?}",
                c.machine(i).name,
                ms.len()
            );
            for m in &ms {
                ensure!(m["state"] == "active", "{m}");
                ensure!(
                    m["is_self"] == Value::Bool(true) || m["liveness"] == "live",
                    "{} sees {m}",
                    c.machine(i).name
                );
                ensure!(
                    (m["is_self"] == Value::Bool(true))
                        == (m["name"] == c.machine(i).name.as_str()),
                    "is_self wrong in {m}"
                );
            }
            let subnets: BTreeSet<(String, String)> = ms
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or("").to_string(),
                        m["subnet"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            let distinct: BTreeSet<&String> = subnets.iter().map(|(_, s)| s).collect();
            ensure!(distinct.len() == 5, "subnets not distinct: {subnets:?}");
            match &subnets_seen {
                None => subnets_seen = Some(subnets),
                Some(first) => ensure!(
                    first == &subnets,
                    "machines disagree on subnets: {first:?} vs {subnets:?}"
                ),
            }
        }
        uc_ok(
            c,
            2,
            &[
                "state",
                "put-service",
                "web",
                "--spec",
                r#"{"image":"nginx"}"#,
            ],
        )?;
        let dump = converged(c, &[0, 1, 2, 3, 4])?;
        ensure!(
            services(&dump).contains_key("web"),
            "web missing from {dump}"
        );
        Ok(())
    })
}

#[test]
fn partition_two_three_then_heal_merges_every_write() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(5), |c| {
        let side_a = [0usize, 1];
        let side_b = [2usize, 3, 4];
        c.partition(&side_a)?;
        eventually(
            SETTLE,
            "each side to see the other as suspect or dead",
            || {
                for i in 0..5 {
                    let seen = liveness(c, i)?;
                    let (own, other) = if side_a.contains(&i) {
                        (&side_a[..], &side_b[..])
                    } else {
                        (&side_b[..], &side_a[..])
                    };
                    for &j in other {
                        let l = seen
                            .get(&c.machine(j).name)
                            .map(String::as_str)
                            .unwrap_or("missing");
                        ensure!(
                            l == "suspect" || l == "dead",
                            "{} sees {} as {l}",
                            c.machine(i).name,
                            c.machine(j).name
                        );
                    }
                    for &j in own {
                        let l = seen
                            .get(&c.machine(j).name)
                            .map(String::as_str)
                            .unwrap_or("missing");
                        ensure!(
                            l == "live" || l == "self",
                            "{} sees {} (same side) as {l}",
                            c.machine(i).name,
                            c.machine(j).name
                        );
                    }
                }
                Ok(())
            },
        )?;
        // Writes on both sides, each acknowledged; "shared" is created on both.
        let writes: [(usize, &str, &str); 8] = [
            (0, "a-web", "A-web"),
            (1, "a-db", "A-db"),
            (0, "shared", "A-shared"),
            (1, "a-cache", "A-cache"),
            (2, "b-web", "B-web"),
            (3, "shared", "B-shared"),
            (4, "b-queue", "B-queue"),
            (3, "b-worker", "B-worker"),
        ];
        for (i, name, marker) in writes {
            uc_ok(
                c,
                i,
                &[
                    "state",
                    "put-service",
                    name,
                    "--spec",
                    &format!(r#"{{"marker":"{marker}"}}"#),
                ],
            )?;
        }
        c.heal()?;
        c.wait_membership()?;
        let dump = converged(c, &[0, 1, 2, 3, 4])?;
        let svcs = services(&dump);
        for (_, name, marker) in writes.iter().filter(|w| w.1 != "shared") {
            let rec = svcs
                .get(*name)
                .with_context(|| format!("{name} lost in the merge: {dump}"))?;
            ensure!(
                rec.to_string().contains(marker),
                "{name} is {rec}, want marker {marker}"
            );
        }
        // The two "shared" services: one keeps the name, the other becomes shared-<6 hex>.
        let renamed: Vec<&String> = svcs
            .keys()
            .filter(|n| {
                n.strip_prefix("shared-").is_some_and(|h| {
                    h.len() == 6
                        && h.chars()
                            .all(|ch| ch.is_ascii_hexdigit() && !ch.is_ascii_uppercase())
                })
            })
            .collect();
        ensure!(
            renamed.len() == 1,
            "want exactly one renamed shared-<6 hex>, got {renamed:?} in {:?}",
            svcs.keys()
        );
        let kept = svcs
            .get("shared")
            .context("no service keeps the name shared")?;
        let other = &svcs[renamed[0]];
        let markers: BTreeSet<bool> = [kept, other]
            .iter()
            .map(|r| r.to_string().contains("A-shared"))
            .collect();
        ensure!(
            markers.len() == 2,
            "both sides' shared services must survive: {kept} / {other}"
        );
        ensure!(
            [kept, other]
                .iter()
                .any(|r| r.to_string().contains("B-shared")),
            "B's shared service lost: {kept} / {other}"
        );
        ensure!(
            svcs.len() == writes.len(),
            "unexpected services: {:?}",
            svcs.keys()
        );
        Ok(())
    })
}

#[test]
fn kill9_during_a_burst_of_writes_loses_no_acknowledged_write() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(3), |c| {
        let client = c.client(1)?;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::<String>::new()));
        let writer = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("burst-{n}");
                    n += 1;
                    if let Ok(out) =
                        client.run(&["state", "put-service", &name, "--spec", r#"{"burst":true}"#])
                        && out.status.success()
                    {
                        acked.lock().unwrap().push(name);
                    }
                }
            })
        };
        let wait = eventually(SETTLE, "some writes acknowledged", || {
            let n = acked.lock().unwrap().len();
            ensure!(n >= 15, "{n} so far");
            Ok(())
        });
        if let Err(e) = wait {
            stop.store(true, Ordering::Relaxed);
            let _ = writer.join();
            return Err(e);
        }
        c.kill9(1)?;
        // Let the writer see the dead agent a few times before it stops.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?;
        let acked = acked.lock().unwrap().clone();
        c.restart(1)?;
        c.wait_ready(1)?;
        // The restarted agent itself has every acknowledged write, before anything else.
        let own = services(&c.dump(1)?);
        let lost: Vec<&String> = acked.iter().filter(|n| !own.contains_key(*n)).collect();
        ensure!(
            lost.is_empty(),
            "{} of {} acknowledged writes lost on restart: {lost:?}",
            lost.len(),
            acked.len()
        );
        c.wait_membership()?;
        let dump = converged(c, &[0, 1, 2])?;
        let svcs = services(&dump);
        let lost: Vec<&String> = acked.iter().filter(|n| !svcs.contains_key(*n)).collect();
        ensure!(
            lost.is_empty(),
            "acknowledged writes missing on the others: {lost:?}"
        );
        Ok(())
    })
}

#[test]
fn a_joiner_serves_everything_once_ready() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(3), |c| {
        for k in 0..30 {
            uc_ok(
                c,
                k % 3,
                &[
                    "state",
                    "put-service",
                    &format!("svc-{k}"),
                    "--spec",
                    &format!(r#"{{"k":{k}}}"#),
                ],
            )?;
        }
        let before = services(&converged(c, &[0, 1, 2])?);
        ensure!(before.len() == 30, "{:?}", before.keys());
        let j = c.add_machine_no_wait()?;
        eventually(SETTLE, "the joiner to say ready", || {
            if let Some(status) = c.agent_exited(j)? {
                return Err(uc_e2e::Fatal(format!("the joiner exited: {status}")).into());
            }
            let s = c.status(j)?;
            ensure!(s["ready"] == Value::Bool(true), "{s}");
            Ok(())
        })
        .map_err(|e| e.context(c.logs_tail(&[j], 30)))?;
        // Its first dump after ready must not be stale (Uncloud bug #41).
        let first = services(&c.dump(j)?);
        let missing: Vec<&String> = before.keys().filter(|n| !first.contains_key(*n)).collect();
        ensure!(
            missing.is_empty(),
            "the joiner said ready but lacks {missing:?}"
        );
        c.wait_membership()?;
        converged(c, &[0, 1, 2, 3])?;
        Ok(())
    })
}

fn machine_count(c: &Cluster, i: usize) -> anyhow::Result<usize> {
    Ok(liveness(c, i)?.len())
}

#[test]
fn a_wrong_join_token_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(3), |c| {
        let j = c.add_namespace()?;
        let good = c.token(0)?;
        // After making the token: making one may itself be a write.
        let dump_before = c.dump(0)?;
        // A token that is not one, and a real token with its last character changed.
        let mut tampered: Vec<char> = good.chars().collect();
        let last = tampered.last_mut().context("empty token")?;
        *last = if *last == 'A' { 'B' } else { 'A' };
        let tampered: String = tampered.into_iter().collect();
        for bad in ["not-a-token".to_string(), tampered] {
            let out = c.run_agent_once(
                j,
                Bootstrap::Join {
                    peer: c.machine(0).join_addr(),
                    token: bad.clone(),
                },
                &[],
                Duration::from_secs(30),
            )?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(!out.status.success(), "ucd accepted token {bad:?}: {text}");
            ensure!(
                text.to_lowercase().contains("refused"),
                "no clear refusal for token {bad:?}: {text}"
            );
        }
        for i in 0..3 {
            ensure!(
                machine_count(c, i)? == 3,
                "{} lists a machine that was refused",
                c.machine(i).name
            );
        }
        std::thread::sleep(Duration::from_secs(2));
        for i in 0..3 {
            ensure!(
                machine_count(c, i)? == 3,
                "{} lists a refused machine later",
                c.machine(i).name
            );
        }
        let dump_after = c.dump(0)?;
        ensure!(
            dump_after == dump_before,
            "a refused join changed the cluster state from\n{dump_before:#}\nto\n{dump_after:#}"
        );
        // The refused attempts left no state behind: the same data directory joins with a good token.
        c.start_agent(
            j,
            Bootstrap::Join {
                peer: c.machine(0).join_addr(),
                token: good,
            },
            &[],
        )?;
        c.wait_membership()?;
        ensure!(machine_count(c, 0)? == 4);
        Ok(())
    })
}

/// Sends garbage to machine 0's gossip (UDP) and peer (TCP) ports on its management address, from
/// machine 1's namespace (so through the mesh), and to its underlay ports: WireGuard (UDP) and the
/// join endpoint (TCP).
fn send_garbage(c: &Cluster) -> anyhow::Result<()> {
    let mesh = c.mgmt_ip(0)?;
    let gossip = SocketAddr::from((mesh, GOSSIP_PORT));
    let peer = SocketAddr::from((mesh, PEER_PORT));
    let wg: SocketAddr = c.machine(0).wg_addr().parse()?;
    let join: SocketAddr = c.machine(0).join_addr().parse()?;
    c.in_netns(1, move || -> anyhow::Result<()> {
        let udp = UdpSocket::bind(("0.0.0.0", 0))?;
        let udp6 = UdpSocket::bind(("::", 0))?;
        // WireGuard's port: noise, and things shaped like its messages (type 1 to 4).
        for k in 0..200u64 {
            let mut bytes = noise(k + 1000, [1usize, 32, 148, 92, 64, 1400][k as usize % 6]);
            if let Some(b) = bytes.first_mut() {
                *b = (k % 5) as u8;
            }
            udp.send_to(&bytes, wg)
                .context("sending to the WireGuard port")?;
        }
        let sizes = [0usize, 1, 7, 64, 512, 1400, 9000, 60000];
        for k in 0..200u64 {
            let mut bytes = noise(k, sizes[k as usize % sizes.len()]);
            if k % 5 == 0 && !bytes.is_empty() {
                bytes[0] = 0; // plausible-looking protocol versions too
            }
            udp6.send_to(&bytes, gossip)
                .context("sending to the gossip port")?;
            if k % 20 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let talk_to = |to: SocketAddr, payload: &[u8]| -> anyhow::Result<()> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .context("connecting to the peer port")?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            // The agent may close on us at any point: write errors are fine.
            let _ = s.write_all(payload);
            let _ = s.shutdown(Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
            Ok(())
        };
        let talk = |payload: &[u8]| talk_to(peer, payload);
        for target in [peer, join] {
            talk_to(target, &noise(1, 1))?;
            talk_to(target, &noise(2, 100))?;
            talk_to(target, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
        }
        talk(&noise(1, 1))?;
        talk(&noise(2, 100))?;
        talk(&noise(3, 200_000))?;
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // A bogus HTTP/2 request: an empty SETTINGS frame, then HEADERS for stream 1 whose HPACK block is noise.
        let mut h2 = preface.clone();
        h2.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let block = noise(4, 40);
        h2.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]);
        h2.extend_from_slice(&block);
        talk(&h2)?;
        // A frame that claims 16 MB, and a DATA frame on a stream never opened.
        let mut h2 = preface.clone();
        h2.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0x1, 0, 0, 0, 3]);
        h2.extend_from_slice(&noise(5, 1000));
        talk(&h2)?;
        let mut h2 = preface;
        h2.extend_from_slice(&[
            0, 0, 0, 0x4, 0, 0, 0, 0, 0, 0, 0, 4, 0x0, 0x1, 0, 0, 0, 7, 1, 2, 3, 4,
        ]);
        talk(&h2)?;
        // A plain HTTP/1 request.
        talk(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
        Ok(())
    })?
}

#[test]
fn garbage_on_the_gossip_and_peer_ports_is_dropped() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(2), |c| {
        let status_before = c.status(0)?;
        let dump_before = c.dump(0)?;
        let counter = |s: &Value, k: &str| -> anyhow::Result<u64> {
            s[k].as_u64().with_context(|| format!("no {k} in {s}"))
        };
        let gossip_before = counter(&status_before, "gossip_garbage_dropped")?;
        send_garbage(c)?;
        if let Some(status) = c.agent_exited(0)? {
            bail!(
                "the agent died of garbage ({status}):\n{}",
                c.logs_tail(&[0], 40)
            );
        }
        let sync_before = counter(&status_before, "sync_garbage_dropped")?;
        eventually(SETTLE, "the garbage counters to grow", || {
            let s = c.status(0)?;
            let now = counter(&s, "gossip_garbage_dropped")?;
            ensure!(
                now > gossip_before,
                "gossip_garbage_dropped still {now}: {s}"
            );
            // Four of the TCP connections do not even start like HTTP/2.
            let sync = counter(&s, "sync_garbage_dropped")?;
            ensure!(
                sync >= sync_before + 4,
                "sync_garbage_dropped only {sync} (was {sync_before}): {s}"
            );
            Ok(())
        })?;
        ensure!(c.agent_exited(0)?.is_none(), "the agent died of garbage");
        ensure!(
            c.dump(0)? == dump_before,
            "garbage changed the cluster state"
        );
        // Still a working cluster.
        c.wait_membership()?;
        uc_ok(c, 0, &["state", "put-service", "after-garbage"])?;
        let dump = converged(c, &[0, 1])?;
        ensure!(services(&dump).contains_key("after-garbage"));
        Ok(())
    })
}
