//! The WireGuard mesh between real agents: machines whose underlay lets only WireGuard's UDP port
//! and the join endpoint through (`UNDERLAY_FIREWALL`), so whatever else works between them went
//! through the tunnels.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use uc_e2e::{Bootstrap, Cluster, ClusterBuilder, JOIN_PORT, PEER_PORT, eventually};

use crate::{SETTLE, converged, noise, uc_ok, with_cluster};

/// Waits until every pair of `machines` pings each other's mesh addresses, IPv4 and IPv6.
fn all_reach_all(c: &Cluster, machines: &[usize]) -> anyhow::Result<()> {
    let addrs: Vec<(Ipv4Addr, std::net::Ipv6Addr)> = machines
        .iter()
        .map(|&i| c.mesh_addresses(i))
        .collect::<anyhow::Result<_>>()?;
    for (a, &i) in machines.iter().enumerate() {
        for (b, _) in machines.iter().enumerate() {
            if a == b {
                continue;
            }
            let (v4, v6) = addrs[b];
            for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
                eventually(SETTLE, &format!("{} pings {ip}", c.machine(i).name), || {
                    ensure!(c.ping(i, ip, 1)?, "no answer");
                    Ok(())
                })?;
            }
        }
    }
    Ok(())
}

/// Machine `i`'s WireGuard peers by machine name.
fn peers(c: &Cluster, i: usize) -> anyhow::Result<BTreeMap<String, Value>> {
    let w = c.wg_show(i)?;
    let list = w["peers"]
        .as_array()
        .with_context(|| format!("no peers in {w}"))?;
    Ok(list
        .iter()
        .map(|p| (p["machine"].as_str().unwrap_or("").to_string(), p.clone()))
        .collect())
}

fn bytes(p: &Value) -> (u64, u64) {
    (
        p["rx_bytes"].as_u64().unwrap_or(0),
        p["tx_bytes"].as_u64().unwrap_or(0),
    )
}

/// A peer whose session was never reset has counters that only grow: a peer removed and added
/// again starts from zero.
fn untouched(before: &Value, after: &Value) -> bool {
    let (r0, t0) = bytes(before);
    let (r1, t1) = bytes(after);
    r1 >= r0 && t1 >= t0
}

#[test]
fn three_machines_reach_each_other_only_through_the_mesh() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(3), |c| {
        all_reach_all(c, &[0, 1, 2])?;
        // The underlay carries nothing else: no ping, no peer API.
        let under = IpAddr::V4(c.machine(1).ip);
        ensure!(
            !c.ping(0, under, 1)?,
            "the underlay answered a ping: the firewall is not in place"
        );
        let mesh1 = c.mgmt_ip(1)?;
        let (to_under, to_mesh) = c.in_netns(0, || {
            let under = SocketAddr::from((c.machine(1).ip, PEER_PORT));
            let mesh = SocketAddr::from((mesh1, PEER_PORT));
            (
                TcpStream::connect_timeout(&under, Duration::from_secs(1)).is_ok(),
                TcpStream::connect_timeout(&mesh, Duration::from_secs(5)).is_ok(),
            )
        })?;
        ensure!(!to_under, "the peer API answered on the underlay");
        ensure!(to_mesh, "the peer API did not answer on the mesh");

        // `uc wg show`: two peers, each with a handshake, on its advertised endpoint.
        for i in 0..3 {
            let ps = peers(c, i)?;
            ensure!(
                ps.len() == 2,
                "{} has peers {:?}",
                c.machine(i).name,
                ps.keys()
            );
            for (name, p) in &ps {
                let j: usize = name.trim_start_matches('m').parse()?;
                ensure!(
                    p["endpoint"] == c.machine(j).wg_addr().as_str(),
                    "{name} endpoint {p}"
                );
                ensure!(
                    p["last_handshake_age_secs"].is_u64(),
                    "no handshake with {name}: {p}"
                );
                // Its /24, its /64 and its management address.
                ensure!(p["allowed_ips"].as_array().map(Vec::len) == Some(3), "{p}");
            }
        }
        // Any machine answers for any other, over the mesh.
        let remote = c.uc_json(0, &["wg", "show", "--machine", "m2"])?;
        ensure!(remote["machine"] == "m2", "{remote}");
        ensure!(
            remote["backend"]
                .as_str()
                .unwrap_or("")
                .starts_with("userspace"),
            "{remote}"
        );
        let ms = c.machines_seen_by(1)?;
        for m in &ms {
            ensure!(
                m["mesh_backend"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("userspace"),
                "{m}"
            );
        }
        // The private key stays in the data directory, private.
        let key = c.machine(0).data_dir.join("wg.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
        ensure!(mode & 0o077 == 0, "{} has mode {mode:o}", key.display());
        let secret = std::fs::read_to_string(&key)?;
        let dump = serde_json::to_string(&c.dump(0)?)?;
        ensure!(
            !dump.contains(secret.trim()),
            "the private key is in the state"
        );
        let log = std::fs::read_to_string(&c.machine(0).log)?;
        ensure!(
            !log.contains(secret.trim()),
            "the private key is in the log"
        );
        Ok(())
    })
}

#[test]
fn machines_join_leave_and_restart_without_disturbing_the_others() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(3), |c| {
        all_reach_all(c, &[0, 1, 2])?;
        let before = peers(c, 0)?;

        // A fourth machine joins: everyone reaches it, and m0's other tunnels are untouched.
        let d = c.add_machine()?;
        all_reach_all(c, &[0, 1, 2, d])?;
        let after = peers(c, 0)?;
        ensure!(after.len() == 3, "{:?}", after.keys());
        for name in ["m1", "m2"] {
            ensure!(
                untouched(&before[name], &after[name]),
                "joining m3 reset m0's tunnel to {name}: {} then {}",
                before[name],
                after[name]
            );
        }

        // m2 restarts (kill -9): the mesh comes back with the same key and addresses; m0's
        // tunnel to m1 is untouched.
        let before = peers(c, 0)?;
        let (key2, addrs2) = (c.wg_show(2)?["public_key"].clone(), c.mesh_addresses(2)?);
        c.kill9(2)?;
        c.restart(2)?;
        c.wait_ready(2)?;
        all_reach_all(c, &[0, 1, 2, d])?;
        let after = peers(c, 0)?;
        ensure!(
            untouched(&before["m1"], &after["m1"]),
            "restarting m2 reset m0's tunnel to m1"
        );
        ensure!(
            c.wg_show(2)?["public_key"] == key2,
            "m2's key changed on restart"
        );
        ensure!(
            c.mesh_addresses(2)? == addrs2,
            "m2's addresses changed on restart"
        );

        // m3 is removed: nobody keeps it as a peer or routes to it, and it reaches no one.
        let m3 = c.mesh_ip(d)?;
        let before = peers(c, 0)?;
        uc_ok(c, 1, &["machine", "rm", "m3"])?;
        for i in [0, 1, 2] {
            eventually(SETTLE, &format!("{} forgets m3", c.machine(i).name), || {
                let ps = peers(c, i)?;
                ensure!(!ps.contains_key("m3"), "{:?}", ps.keys());
                ensure!(ps.len() == 2, "{:?}", ps.keys());
                Ok(())
            })?;
            ensure!(
                !c.ping(i, IpAddr::V4(m3), 1)?,
                "{} still reaches m3",
                c.machine(i).name
            );
        }
        let m0 = c.mesh_ip(0)?;
        // m3 learns it was removed: its agent stops by itself (status 0, so no supervisor
        // restarts it), taking its interface down, and sets its identity and state aside.
        let status = eventually(SETTLE, "m3's agent stops by itself", || {
            c.agent_exited(d)?.context("still running")
        })?;
        ensure!(status.success(), "m3's agent exited with {status}");
        let data = c.machine(d).data_dir.clone();
        ensure!(
            !data.join("state.redb").exists() && !data.join("wg.key").exists(),
            "m3's state was not set aside"
        );
        let aside: Vec<_> = std::fs::read_dir(&data)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("removed-"))
            .collect();
        ensure!(
            aside.len() == 1 && aside[0].path().join("state.redb").exists(),
            "m3's state is not kept in removed-*/"
        );
        ensure!(
            !c.ping(d, IpAddr::V4(m0), 1)?,
            "the removed m3 still reaches m0"
        );
        let after = peers(c, 0)?;
        for name in ["m1", "m2"] {
            ensure!(
                untouched(&before[name], &after[name]),
                "removing m3 reset {name}"
            );
        }
        // Removing a machine that does not exist says which ones do.
        let out = c.uc(0, &["machine", "rm", "nope"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("machines: m0"),
            "{err}"
        );
        Ok(())
    })
}

#[test]
fn an_outsider_with_its_own_key_reaches_nothing() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(2), |c| {
        all_reach_all(c, &[0, 1])?;
        // The outsider: a namespace on the same bridge, no firewall, its own WireGuard key, and
        // every cluster machine configured as its peer (public keys are public). A second
        // outsider, peered with the first, shows that the outsider's tunnels work at all.
        let o = c.add_namespace()?;
        let o2 = c.add_namespace()?;
        let (ko, ko2) = (uc_mesh::KeyPair::generate()?, uc_mesh::KeyPair::generate()?);
        let mut ops = Vec::new();
        let mut targets = Vec::new();
        let mut mgmt = Vec::new();
        for i in 0..2 {
            let w = c.wg_show(i)?;
            let key: uc_mesh::PublicKey = w["public_key"].as_str().context("key")?.parse()?;
            mgmt.push(c.mgmt_ip(i)?);
            ops.push(uc_mesh::PeerOp::Add(
                key,
                uc_mesh::PeerConfig {
                    allowed_ips: vec![
                        format!("{}/32", c.mesh_ip(i)?)
                            .parse()
                            .map_err(anyhow::Error::msg)?,
                        format!("{}/128", c.mgmt_ip(i)?)
                            .parse()
                            .map_err(anyhow::Error::msg)?,
                    ],
                    endpoint: Some(c.machine(i).wg_addr().parse()?),
                    keepalive: 1,
                },
            ));
            targets.push(c.mesh_ip(i)?);
        }
        let peer_op =
            |k: &uc_mesh::KeyPair, net: &str, at: &str| -> anyhow::Result<uc_mesh::PeerOp> {
                Ok(uc_mesh::PeerOp::Add(
                    k.public,
                    uc_mesh::PeerConfig {
                        allowed_ips: vec![net.parse().map_err(anyhow::Error::msg)?],
                        endpoint: Some(at.parse()?),
                        keepalive: 0,
                    },
                ))
            };
        ops.push(peer_op(&ko2, "10.210.251.0/24", &c.machine(o2).wg_addr())?);
        let ops2 = vec![peer_op(&ko, "10.210.250.0/24", &c.machine(o).wg_addr())?];
        // An address in the cluster's ULA too, so the outsider routes the management addresses
        // into its tunnel.
        let mut seg = mgmt[0].segments();
        seg[3] = 0xfa;
        seg[4..].fill(0);
        seg[7] = 1;
        let outsider_v6 = std::net::Ipv6Addr::from(seg);
        let start = |keys: uc_mesh::KeyPair, addr: Ipv4Addr, ops: Vec<uc_mesh::PeerOp>| {
            move || -> anyhow::Result<uc_mesh::UserspaceDevice> {
                use uc_mesh::MeshDevice;
                let mut dev = uc_mesh::UserspaceDevice::create("ucx0", &keys.private, 51820)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(uc_mesh::netlink::configure(
                    "ucx0",
                    &[(IpAddr::V4(addr), 16), (IpAddr::V6(outsider_v6), 48)],
                    uc_mesh::MTU,
                ))?;
                dev.apply(&ops)?;
                Ok(dev)
            }
        };
        let device = c.in_netns(o, start(ko, Ipv4Addr::new(10, 210, 250, 1), ops))??;
        let _device2 = c.in_netns(o2, start(ko2, Ipv4Addr::new(10, 210, 251, 1), ops2))??;
        eventually(SETTLE, "the two outsiders reach each other", || {
            ensure!(c.ping(o, IpAddr::V4(Ipv4Addr::new(10, 210, 251, 1)), 1)?);
            Ok(())
        })?;
        for t in &targets {
            ensure!(!c.ping(o, IpAddr::V4(*t), 2)?, "the outsider reached {t}");
        }
        // Nor the agents' ports, on the mesh address or the underlay.
        let under: Vec<Ipv4Addr> = (0..2).map(|i| c.machine(i).ip).collect();
        let reached = c.in_netns(o, move || {
            let mut reached = Vec::new();
            // The mesh and management addresses: nothing. The underlay: only the join endpoint.
            let mesh = targets
                .iter()
                .map(|ip| IpAddr::V4(*ip))
                .chain(mgmt.iter().map(|ip| IpAddr::V6(*ip)))
                .flat_map(|ip| [(ip, PEER_PORT), (ip, JOIN_PORT)]);
            let under = under.iter().map(|ip| (IpAddr::V4(*ip), PEER_PORT));
            for (ip, port) in mesh.chain(under) {
                let a = SocketAddr::new(ip, port);
                if TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok() {
                    reached.push(a);
                }
            }
            reached
        })?;
        ensure!(reached.is_empty(), "the outsider connected to {reached:?}");
        // Gossip: a datagram to the underlay gossip port gets no answer and changes no one's view.
        let ms_before = c.machines_seen_by(0)?.len();
        c.in_netns(o, || -> anyhow::Result<()> {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            for k in 0..50 {
                s.send_to(&noise(k, 200), (c.machine(0).ip, uc_e2e::GOSSIP_PORT))?;
            }
            Ok(())
        })??;
        ensure!(c.machines_seen_by(0)?.len() == ms_before);
        // The handshakes it tried never completed.
        use uc_mesh::MeshDevice;
        let mut device = device;
        let st = device.status()?;
        for p in st.peers.iter().filter(|p| p.allowed_ips[0].prefix == 32) {
            ensure!(
                p.last_handshake_age.is_none(),
                "the outsider completed a handshake: {p:?}"
            );
        }
        ensure!(st.peers.len() == 3);
        drop(device);
        Ok(())
    })
}

/// Two machines join at once on the two sides of a partition and get the same /24. After the
/// heal the state's conflict rule moves the younger one, and the mesh follows: its gossip and peer
/// API move to its new address, and every machine reaches every other at the settled addresses.
#[test]
fn a_machine_moved_by_a_subnet_clash_stays_in_the_mesh() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(2), |c| {
        all_reach_all(c, &[0, 1])?;
        let (a, b) = (c.add_namespace()?, c.add_namespace()?);
        c.partition(&[1, b])?;
        let (t0, t1) = (c.token(0)?, c.token(1)?);
        let (via0, via1) = (c.machine(0).join_addr(), c.machine(1).join_addr());
        c.start_agent(
            a,
            Bootstrap::Join {
                peer: via0,
                token: t0,
            },
            &[],
        )?;
        c.start_agent(
            b,
            Bootstrap::Join {
                peer: via1,
                token: t1,
            },
            &[],
        )?;
        c.wait_ready(a)?;
        c.wait_ready(b)?;
        let clash = c.mesh_ip(a)?;
        ensure!(
            clash == c.mesh_ip(b)?,
            "the two joiners did not get the same /24"
        );
        c.heal()?;
        eventually(SETTLE, "the clash settled", || {
            ensure!(c.mesh_ip(a)? != c.mesh_ip(b)?, "both still on {clash}");
            Ok(())
        })?;
        c.wait_membership()?;
        all_reach_all(c, &[0, 1, a, b])?;
        converged(c, &[0, 1, a, b])?;
        Ok(())
    })
}

/// Each machine advertises a dead endpoint first and its real one second: the mesh forms anyway,
/// on the real ones (each side moves on to the next endpoint when no handshake comes, and adopts
/// the endpoint a peer's handshake arrives from).
#[test]
fn a_dead_first_endpoint_is_skipped() -> anyhow::Result<()> {
    let b = ClusterBuilder::new(2)
        .machine_args(
            0,
            &["--endpoint", "172.31.0.250", "--endpoint", "172.31.0.10"],
        )
        .machine_args(
            1,
            &["--endpoint", "172.31.0.251", "--endpoint", "172.31.0.11"],
        )
        .timeout(Duration::from_secs(90));
    with_cluster(b, |c| {
        all_reach_all(c, &[0, 1])?;
        let ms = c.machines_seen_by(0)?;
        ensure!(
            ms.iter().any(|m| m["endpoints"][0] == "172.31.0.251:51820"),
            "the dead endpoint is not published first: {ms:?}"
        );
        for (i, j) in [(0, 1), (1, 0)] {
            let ps = peers(c, i)?;
            let p = &ps[&c.machine(j).name];
            ensure!(p["endpoint"] == c.machine(j).wg_addr().as_str(), "{p}");
        }
        Ok(())
    })
}

/// Garbage on the WireGuard port (shaped like its messages too) from a machine of the cluster:
/// dropped, and the mesh keeps working.
#[test]
fn garbage_on_the_wireguard_port_is_dropped() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(2), |c| {
        all_reach_all(c, &[0, 1])?;
        let wg: SocketAddr = c.machine(0).wg_addr().parse()?;
        c.in_netns(1, || -> anyhow::Result<()> {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            for k in 0..2000u64 {
                let len = [0usize, 1, 4, 32, 92, 148, 1400, 9000][k as usize % 8];
                let mut b = noise(k, len);
                if let Some(x) = b.first_mut() {
                    *x = (k % 6) as u8;
                }
                s.send_to(&b, wg)?;
            }
            Ok(())
        })??;
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = c.agent_exited(0)? {
            bail!("the agent died of garbage on its WireGuard port ({status})");
        }
        all_reach_all(c, &[0, 1])?;
        c.wait_membership()?;
        Ok(())
    })
}

/// Two agents on the kernel's WireGuard (the default where the kernel has the module): they
/// pick it, reach each other through it, and one killed with SIGKILL and restarted replaces the
/// interface it left behind. This machine's kernel may have no WireGuard, so it runs in a QEMU
/// guest on Debian's cloud kernel, which has (e2e/guest/kernel-mesh.sh, the guest's side).
#[test]
fn agents_on_the_kernels_wireguard_reach_each_other_and_survive_a_kill() -> anyhow::Result<()> {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace")?;
    let bins = uc_e2e::Bins::find(None)?;
    let out = std::process::Command::new("bash")
        .arg(repo.join("scripts/vm-kit.sh"))
        .args(["guest", "-m", "veth tun wireguard", "-b", "ip"])
        .arg("-b")
        .arg(format!("{}:/ucd", bins.ucd.display()))
        .arg("-b")
        .arg(format!("{}:/uc", bins.uc.display()))
        .arg("-b")
        .arg(format!(
            "{}:/kernel-mesh.sh",
            repo.join("e2e/guest/kernel-mesh.sh").display()
        ))
        .args(["--", "/.uc/bin/sh", "/kernel-mesh.sh"])
        .stdin(std::process::Stdio::null())
        .output()?;
    let console = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "the guest's console:\n{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "the guest ended with {}", out.status);
    ensure!(
        console.contains("kernel mesh: ok"),
        "the guest did not finish"
    );
    Ok(())
}
