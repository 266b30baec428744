//! Gossip membership (chitchat over UDP): announces this machine's small
//! facts (state heads digest, peer address, endpoints, load) and turns the
//! failure detector's view into live / suspect / dead per machine.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use chitchat::transport::UdpTransport;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uc_proto::MachineId;

use crate::node::{Liveness, Node, PeerInfo, now_ms};

/// Gossip keys. Values stay short: every datagram carries them.
pub const KEY_HEADS: &str = "heads";
pub const KEY_PEER_ADDR: &str = "peer";
pub const KEY_ENDPOINTS: &str = "ep";
pub const KEY_LOAD: &str = "load";
/// The machine's WireGuard backend.
pub const KEY_MESH: &str = "wg";
/// Endpoints this machine learned from peers' handshakes that those peers do
/// not advertise (a peer behind NAT): `ID=IP:PORT,...`. Usually empty.
pub const KEY_LEARNED: &str = "wgl";
/// Runtimes that work on the machine: `nspawn,docker`.
pub const KEY_RUNTIMES: &str = "rt";
/// Names of the images in its store, comma-separated.
pub const KEY_IMAGES: &str = "img";
/// Memory available, bytes.
pub const KEY_MEMORY: &str = "mem";

/// Datagrams on the gossip port that chitchat could not decode. chitchat
/// drops them inside its transport and only logs; `GarbageCounter` (a
/// tracing layer installed by `init_tracing`) counts those log events.
pub static GOSSIP_GARBAGE: AtomicU64 = AtomicU64::new(0);

/// Counts chitchat's "invalid payload" events.
pub struct GarbageCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for GarbageCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        if meta.target().starts_with("chitchat") && *meta.level() == tracing::Level::WARN {
            struct Find(bool);
            impl tracing::field::Visit for Find {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message"
                        && format!("{value:?}").contains("invalid-chitchat-payload")
                    {
                        self.0 = true;
                    }
                }
            }
            let mut f = Find(false);
            event.record(&mut f);
            if f.0 {
                GOSSIP_GARBAGE.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub struct Membership {
    handle: ChitchatHandle,
}

impl Membership {
    pub async fn shutdown(self) {
        if let Err(e) = self.handle.shutdown().await {
            tracing::warn!(error = %e, "gossip did not shut down cleanly");
        }
    }
}

/// Starts gossip and the tasks that keep `node`'s view of its peers fresh.
/// Gossip binds to `mesh_ip` (this machine's management address) and
/// announces the peer API there.
pub async fn start(
    node: Arc<Node>,
    mesh_ip: std::net::IpAddr,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<Membership> {
    let cfg = &node.config;
    let gossip_interval = cfg.gossip_interval;
    let phi = cfg.failure_phi;
    let gossip_addr = SocketAddr::new(mesh_ip, cfg.gossip_port);
    let chitchat_id = ChitchatId::new(node.machine_id.to_string(), now_ms(), gossip_addr);
    // Seeds: every other machine's management address (gossip runs inside the mesh).
    let (addressing, network) = node.read(|doc| {
        (
            uc_mesh::MeshAddressing::new(&doc.cluster_id(), doc.network()),
            doc.network(),
        )
    });
    let mut seeds: Vec<String> = others_active(&node)
        .into_iter()
        .map(|id| SocketAddr::new(addressing.management(id.as_str()).into(), cfg.gossip_port))
        .map(|a| a.to_string())
        .collect();
    seeds.sort();
    seeds.dedup();
    let config = chitchat_config(
        chitchat_id,
        node.cluster_id.clone(),
        gossip_interval,
        phi,
        gossip_addr,
        seeds,
        protocol_for(network),
    );
    let kvs = vec![
        (KEY_HEADS.to_string(), node.heads()),
        (
            KEY_PEER_ADDR.to_string(),
            SocketAddr::new(mesh_ip, cfg.peer_port).to_string(),
        ),
        (KEY_ENDPOINTS.to_string(), cfg.endpoints.join(",")),
        (KEY_LOAD.to_string(), load_average()),
        (KEY_MEMORY.to_string(), mem_available()),
        (
            KEY_RUNTIMES.to_string(),
            node.workloads
                .get()
                .map(|w| w.subscribe_runtimes().borrow().clone())
                .unwrap_or_default(),
        ),
        (
            KEY_IMAGES.to_string(),
            node.workloads
                .get()
                .map(|w| w.subscribe_images().borrow().clone())
                .unwrap_or_default(),
        ),
        (
            KEY_MESH.to_string(),
            node.mesh
                .get()
                .map(|m| m.backend.as_str().to_string())
                .unwrap_or_default(),
        ),
    ];
    let handle = spawn_chitchat(config, kvs, &UdpTransport)
        .await
        .with_context(|| format!("starting gossip on {gossip_addr}/udp"))?;

    // Publish the heads digest whenever the document changes.
    let chitchat = handle.chitchat();
    let mut heads_rx = node.subscribe_heads();
    let stop = shutdown.clone();
    let publisher = node.clone();
    tracker.spawn(async move {
        let node = publisher;
        let mut load_tick = tokio::time::interval(Duration::from_secs(5));
        let mut images_rx = node.workloads.get().map(|w| w.subscribe_images());
        let mut runtimes_rx = node.workloads.get().map(|w| w.subscribe_runtimes());
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = heads_rx.changed() => {
                    if changed.is_err() { break; }
                    let heads = heads_rx.borrow_and_update().clone();
                    chitchat.lock().await.self_node_state().set(KEY_HEADS, heads);
                }
                text = next_text(&mut images_rx) => match text {
                    Some(t) => chitchat.lock().await.self_node_state().set(KEY_IMAGES, t),
                    None => break,
                },
                text = next_text(&mut runtimes_rx) => match text {
                    Some(t) => chitchat.lock().await.self_node_state().set(KEY_RUNTIMES, t),
                    None => break,
                },
                _ = load_tick.tick() => {
                    let learned = node.mesh.get().map(|m| m.learned_text()).unwrap_or_default();
                    let mut c = chitchat.lock().await;
                    c.self_node_state().set(KEY_LOAD, load_average());
                    c.self_node_state().set(KEY_MEMORY, mem_available());
                    if c.self_node_state().get(KEY_LEARNED).unwrap_or("") != learned {
                        c.self_node_state().set(KEY_LEARNED, learned);
                    }
                }
            }
        }
    });

    // Turn chitchat's view into per-machine liveness, once a gossip round.
    let chitchat = handle.chitchat();
    let self_id = handle.chitchat_id().clone();
    tracker.spawn(async move {
        let mut seen: HashMap<ChitchatId, (u64, Instant, u64)> = HashMap::new();
        let mut unheard = Unheard::default();
        let mut doc_rx = node.subscribe_heads();
        let mut active = others_active(&node);
        let mut tick = tokio::time::interval(gossip_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let mut peers: HashMap<MachineId, (u64, PeerInfo)> = HashMap::new();
            {
                let g = chitchat.lock().await;
                let live: std::collections::HashSet<&ChitchatId> = g.live_nodes().collect();
                for (id, state) in g.node_states() {
                    if *id == self_id {
                        continue;
                    }
                    let Ok(machine) = id.node_id.parse::<MachineId>() else {
                        continue;
                    };
                    let hb = u64::from(state.heartbeat());
                    let entry = seen.entry(id.clone()).or_insert((hb, now, now_ms()));
                    if entry.0 != hb {
                        *entry = (hb, now, now_ms());
                    }
                    let since = now.duration_since(entry.1);
                    let liveness = if live.contains(id) {
                        let timeout = g
                            .failure_detection_timeout(id)
                            .unwrap_or(gossip_interval.mul_f64(phi));
                        if since > timeout / 2 {
                            Liveness::Suspect
                        } else {
                            Liveness::Live
                        }
                    } else {
                        Liveness::Dead
                    };
                    let info = PeerInfo {
                        liveness,
                        last_seen_unix_ms: entry.2,
                        peer_addr: state.get(KEY_PEER_ADDR).and_then(|a| a.parse().ok()),
                        heads: state.get(KEY_HEADS).map(str::to_string),
                        mesh_backend: state.get(KEY_MESH).map(str::to_string),
                        learned_endpoints: parse_learned(state.get(KEY_LEARNED).unwrap_or("")),
                        runtimes: state
                            .get(KEY_RUNTIMES)
                            .map(|r| r.split(',').filter_map(|k| k.parse().ok()).collect()),
                        images: state
                            .get(KEY_IMAGES)
                            .unwrap_or("")
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect(),
                        free_memory: state.get(KEY_MEMORY).and_then(|m| m.parse().ok()),
                    };
                    // A restarted machine has a newer generation: it wins.
                    match peers.get(&machine) {
                        Some((gen_id, _)) if *gen_id > id.generation_id => {}
                        _ => {
                            peers.insert(machine, (id.generation_id, info));
                        }
                    }
                }
            }
            let mut peers: HashMap<MachineId, PeerInfo> =
                peers.into_iter().map(|(k, (_, v))| (k, v)).collect();
            if doc_rx.has_changed().unwrap_or(false) {
                doc_rx.borrow_and_update();
                active = others_active(&node);
            }
            unheard.fill(&mut peers, &active, now, UNHEARD_DEAD_AFTER);
            node.set_peers(peers);
        }
    });
    Ok(Membership { handle })
}

/// How long gossip forgets a dead machine after its death. Each restart of
/// an agent is a new generation in gossip, and every datagram's digest lists
/// every generation gossip still holds: with chitchat's own grace of a day,
/// an agent in a crash loop grew every machine's digest past one datagram
/// within the hour, and gossip stopped everywhere. A dead generation leaves
/// the digests at half this time and the state at this time.
pub const DEAD_FORGOTTEN_AFTER: Duration = Duration::from_secs(600);

/// A machine of the state that gossip has never mentioned for this long
/// (since this agent noticed it) is dead: gossip forgot it or never had it.
const UNHEARD_DEAD_AFTER: Duration = Duration::from_secs(10);

/// Every other active machine of the state.
fn others_active(node: &Node) -> HashSet<MachineId> {
    let mut active = node.active_machines();
    active.remove(&node.machine_id);
    active
}

/// The machines of the state that gossip says nothing about: one it knew
/// and forgot (dead for `DEAD_FORGOTTEN_AFTER`) stays dead with the time it
/// was last seen; one it never had is dead once it has been missing a while
/// (a new machine is in gossip within a few rounds).
#[derive(Default)]
struct Unheard {
    last_seen_ms: HashMap<MachineId, u64>,
    missing_since: HashMap<MachineId, Instant>,
}

impl Unheard {
    fn fill(
        &mut self,
        peers: &mut HashMap<MachineId, PeerInfo>,
        active: &HashSet<MachineId>,
        now: Instant,
        after: Duration,
    ) {
        self.last_seen_ms.retain(|id, _| active.contains(id));
        self.missing_since
            .retain(|id, _| active.contains(id) && !peers.contains_key(id));
        for (id, p) in peers.iter() {
            self.last_seen_ms.insert(id.clone(), p.last_seen_unix_ms);
        }
        for id in active {
            if peers.contains_key(id) {
                continue;
            }
            let since = *self.missing_since.entry(id.clone()).or_insert(now);
            let last = self.last_seen_ms.get(id).copied();
            if last.is_some() || now.duration_since(since) >= after {
                peers.insert(
                    id.clone(),
                    PeerInfo::bare(Liveness::Dead, last.unwrap_or(0)),
                );
            }
        }
    }
}

/// The gossip wire protocol for a cluster on `network`, the same on every
/// machine. Every datagram carries a digest of every machine gossip knows,
/// about 73 bytes each in V0, and a digest must fit in one UDP datagram
/// (65,507 bytes; chitchat's gossip task panics when it does not): V0 holds
/// about 890 entries. A /16 or smaller network (254 machines at most) stays
/// on V0, with room for the old generations of restarted machines. Larger
/// networks (up to a /14, 1022 machines: the state refuses larger ones) use
/// V1, which zstd-compresses the digest; it costs an idle agent more CPU
/// (zstd contexts per datagram, perf), which V0 spares the usual small
/// cluster. bench/gossip-sim.sh measures both.
pub fn protocol_for(network: uc_proto::Subnet) -> ProtocolVersion {
    if network.prefix() >= 16 {
        ProtocolVersion::V0
    } else {
        ProtocolVersion::V1
    }
}

/// How every agent configures chitchat (also used by the gossip simulation
/// benchmark, so that it measures what runs).
pub fn chitchat_config(
    chitchat_id: ChitchatId,
    cluster_id: String,
    gossip_interval: Duration,
    phi_threshold: f64,
    listen_addr: SocketAddr,
    seed_nodes: Vec<String>,
    protocol_version: ProtocolVersion,
) -> ChitchatConfig {
    ChitchatConfig {
        chitchat_id,
        cluster_id,
        gossip_interval,
        listen_addr,
        seed_nodes,
        failure_detector_config: FailureDetectorConfig {
            // Dead after about `phi_threshold` gossip intervals without
            // news (bench/spine.sh measures it, and counts false deaths in
            // an idle cluster).
            phi_threshold,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(10),
            initial_interval: gossip_interval,
            dead_node_grace_period: DEAD_FORGOTTEN_AFTER,
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version,
    }
}

/// Parses a `KEY_LEARNED` value; malformed entries are skipped.
pub fn parse_learned(v: &str) -> Vec<(String, SocketAddr)> {
    v.split(',')
        .filter_map(|e| {
            let (id, addr) = e.split_once('=')?;
            Some((id.to_string(), addr.parse().ok()?))
        })
        .collect()
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| (kb * 1024).to_string())
        .unwrap_or_default()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// The next value of a watched text (None once its sender is gone); never ready without one.
async fn next_text(rx: &mut Option<tokio::sync::watch::Receiver<String>>) -> Option<String> {
    match rx.as_mut() {
        Some(rx) => {
            rx.changed().await.ok()?;
            Some(rx.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::net::SocketAddr;
    use std::time::Duration;

    use chitchat::transport::ChannelTransport;
    use chitchat::{ChitchatId, ProtocolVersion, spawn_chitchat};
    use tokio::time::Instant;
    use uc_proto::MachineId;

    use super::{Unheard, chitchat_config};
    use crate::node::{Liveness, PeerInfo};

    fn machine(i: u8) -> MachineId {
        MachineId::from_bytes([i; 16])
    }

    fn live(last_seen_unix_ms: u64) -> PeerInfo {
        PeerInfo::bare(Liveness::Live, last_seen_unix_ms)
    }

    #[test]
    fn a_machine_gossip_forgot_or_never_had_is_dead() {
        let (a, b, c) = (machine(1), machine(2), machine(3));
        let active: HashSet<MachineId> = [a.clone(), b.clone(), c.clone()].into();
        let after = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut unheard = Unheard::default();
        // a and b in gossip; c (just added to the state) not yet.
        let mut peers = HashMap::from([(a.clone(), live(100)), (b.clone(), live(200))]);
        unheard.fill(&mut peers, &active, t0, after);
        assert_eq!(peers.len(), 2, "c is not dead yet: it may be joining");
        // Gossip forgets b (dead for a while); c is still missing.
        let mut peers = HashMap::from([(a.clone(), live(300))]);
        unheard.fill(&mut peers, &active, t0 + Duration::from_secs(5), after);
        assert_eq!(peers[&b].liveness, Liveness::Dead);
        assert_eq!(peers[&b].last_seen_unix_ms, 200);
        assert!(!peers.contains_key(&c));
        // c, never heard of for 10 s, is dead, never seen.
        let mut peers = HashMap::from([(a.clone(), live(400))]);
        unheard.fill(&mut peers, &active, t0 + Duration::from_secs(10), after);
        assert_eq!(peers[&c].liveness, Liveness::Dead);
        assert_eq!(peers[&c].last_seen_unix_ms, 0);
        // c shows up: gossip's word wins; b removed from the state: gone.
        let active: HashSet<MachineId> = [a.clone(), c.clone()].into();
        let mut peers = HashMap::from([(a.clone(), live(500)), (c.clone(), live(501))]);
        unheard.fill(&mut peers, &active, t0 + Duration::from_secs(11), after);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[&c].liveness, Liveness::Live);
    }

    /// An agent in a crash loop: every start is a new generation that every
    /// digest lists until gossip forgets it. With chitchat's grace of a day,
    /// about 900 restarts made a digest larger than a datagram and the
    /// other machines' gossip task panicked.
    #[tokio::test(start_paused = true)]
    async fn gossip_survives_an_agent_restarting_a_thousand_times() {
        let transport = ChannelTransport::with_mtu(65_507);
        let addr = |i: u8| SocketAddr::from(([10, 210, i, 1], 51001));
        let interval = Duration::from_millis(300);
        let node = |i: u8, generation: u64| {
            chitchat_config(
                ChitchatId::new(format!("{:032x}", i), generation, addr(i)),
                "c".into(),
                interval,
                crate::config::DEFAULT_PHI,
                addr(i),
                (1..=3)
                    .filter(|j| *j != i)
                    .map(|j| addr(j).to_string())
                    .collect(),
                ProtocolVersion::V0,
            )
        };
        let a = spawn_chitchat(node(1, 1), Vec::new(), &transport)
            .await
            .unwrap();
        // 1,100 starts of machine 2, 0.6 s apart: 11 minutes.
        for generation in 0..1100u64 {
            let b = spawn_chitchat(node(2, generation), Vec::new(), &transport)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            b.shutdown().await.unwrap();
        }
        let in_digest = a
            .with_chitchat(|c| {
                let leaving: HashSet<&ChitchatId> = c.scheduled_for_deletion_nodes().collect();
                c.node_states()
                    .keys()
                    .filter(|id| id.node_id.ends_with('2') && !leaving.contains(id))
                    .count()
            })
            .await;
        // A generation leaves the digests 5 minutes after its death: about
        // 500 of the 1,100 are still listed.
        assert!(
            (400..700).contains(&in_digest),
            "machine 1's digest lists {in_digest} generations of machine 2"
        );
        // Machine 1's gossip still runs: a new machine is seen live.
        let c = spawn_chitchat(node(3, 1), Vec::new(), &transport)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let sees = a
            .with_chitchat(|ch| ch.live_nodes().any(|id| id.node_id.ends_with('3')))
            .await;
        assert!(sees, "machine 1's gossip stopped");
        c.shutdown().await.unwrap();
        a.shutdown().await.unwrap();
    }

    #[test]
    fn networks_larger_than_a_slash_16_gossip_compressed_digests() {
        let v = |n: &str| super::protocol_for(n.parse().unwrap());
        assert_eq!(v("10.210.0.0/16"), ProtocolVersion::V0);
        assert_eq!(v("10.9.0.0/22"), ProtocolVersion::V0);
        assert_eq!(v("10.208.0.0/15"), ProtocolVersion::V1);
        assert_eq!(v("10.208.0.0/14"), ProtocolVersion::V1);
    }

    #[test]
    fn learned_endpoints_parse() {
        let v = super::parse_learned("a=1.2.3.4:5,bad,b=[fd00::1]:7,c=x");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0, "a");
        assert_eq!(v[1].1.to_string(), "[fd00::1]:7");
        assert!(super::parse_learned("").is_empty());
    }
}
