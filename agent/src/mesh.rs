//! The agent's side of the mesh: brings up this machine's WireGuard
//! interface from the cluster state and keeps it matching the state, one
//! peer change at a time (the planning itself is `uc_mesh`'s, without I/O).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uc_crdt::ClusterState;
use uc_mesh::device::DeviceError;
use uc_mesh::endpoint::Observed;
use uc_mesh::plan::{PlanError, parse_endpoint};
use uc_mesh::{
    Backend, BackendChoice, EndpointChooser, KernelDevice, KeyPair, MeshAddressing, MeshDevice,
    MeshMachine, PeerConfig, PeerOp, Plan, PublicKey, UserspaceDevice,
};
use uc_proto::v1::{WgPeer, WgShowResponse};

use crate::node::{Node, now_ms};

/// How often the interface is compared with the state even when the state
/// did not change (endpoint rotation, learned endpoints, the end of a
/// removed machine's grace).
const TICK: Duration = Duration::from_secs(4);
/// A machine removed from the state stays a peer this long, for its
/// management address only (its /24 is free at once), so that it can still
/// learn of its removal (and reset itself) before the mesh forgets it.
const REMOVAL_GRACE: Duration = Duration::from_secs(10);

struct Applied {
    peers: BTreeMap<PublicKey, PeerConfig>,
    chooser: EndpointChooser,
    names: BTreeMap<PublicKey, (String, String)>,
    addresses: Vec<(IpAddr, u8)>,
    /// Machines that were peers here when this agent saw them removed, and when.
    removed_seen: BTreeMap<String, u64>,
}

/// This machine's mesh interface.
pub struct Mesh {
    pub interface: String,
    pub backend: Backend,
    pub backend_note: String,
    pub public_key: PublicKey,
    /// This machine's management address: gossip, sync and the peer API
    /// live there (it does not change when the machine's /24 does).
    pub management: Ipv6Addr,
    addressing: MeshAddressing,
    device: Mutex<Box<dyn MeshDevice>>,
    applied: Mutex<Applied>,
}

/// Sends one datagram into the tunnel of each peer just added, so that the
/// handshake starts now rather than when the first real packet (or the
/// peer's own retry, up to 5 s later) comes along. It goes to the discard
/// port of the peer's mesh address; an ICMP "port unreachable" comes back.
fn poke(added: &std::collections::BTreeSet<PublicKey>, peers: &BTreeMap<PublicKey, PeerConfig>) {
    let Ok(sock) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return;
    };
    for k in added {
        let target = peers.get(k).and_then(|c| {
            c.allowed_ips.iter().find_map(|a| match a.addr {
                IpAddr::V4(net) => Some(Ipv4Addr::from(u32::from(net) | 1)),
                IpAddr::V6(_) => None,
            })
        });
        if let Some(ip) = target {
            let _ = sock.send_to(&[], (ip, 9));
        }
    }
}

/// The machines of the state as the planner sees them.
pub fn mesh_machines(doc: &ClusterState) -> Vec<MeshMachine> {
    doc.machines()
        .into_iter()
        .map(|m| MeshMachine {
            public_key: m.public_key.parse().ok(),
            endpoints: m
                .endpoints
                .iter()
                .filter_map(|e| parse_endpoint(e, uc_proto::DEFAULT_WG_PORT))
                .collect(),
            id: m.id.to_string(),
            active: m.is_active(),
            name: m.name,
            subnet: m.subnet,
            leaving: false,
            created_at_ms: m.created_at_ms,
        })
        .collect()
}

/// Makes the WireGuard device the configuration asks for, and says why
/// that one when it was not asked for by name.
fn create_device(
    cfg: &crate::config::Config,
    keys: &KeyPair,
) -> anyhow::Result<(Box<dyn MeshDevice>, String)> {
    let (name, port) = (&cfg.wg_interface, cfg.wg_port);
    let userspace = || -> anyhow::Result<Box<dyn MeshDevice>> {
        let dev = UserspaceDevice::create(name, &keys.private, port).with_context(|| {
            format!("starting WireGuard (userspace) on {name}, port {port}/udp")
        })?;
        Ok(Box::new(dev))
    };
    match cfg.wg_backend {
        BackendChoice::Userspace => Ok((userspace()?, "chosen with --wg-backend userspace".into())),
        BackendChoice::Kernel => {
            let dev = KernelDevice::create(name, &keys.private, port).with_context(|| {
                format!("starting WireGuard (kernel) on {name}, port {port}/udp")
            })?;
            Ok((Box::new(dev), String::new()))
        }
        BackendChoice::Auto => match KernelDevice::create(name, &keys.private, port) {
            Ok(dev) => Ok((Box::new(dev), String::new())),
            Err(DeviceError::NoKernelModule { .. }) => {
                Ok((userspace()?, "no WireGuard kernel module".into()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "the kernel's WireGuard failed; using userspace");
                Ok((userspace()?, format!("the kernel's WireGuard failed: {e}")))
            }
        },
    }
}

impl Mesh {
    /// Creates the interface, gives it its addresses and its peers.
    pub async fn start(node: &Arc<Node>, keys: &KeyPair) -> anyhow::Result<Arc<Mesh>> {
        let cfg = &node.config;
        let (addressing, plan) = node.read(|doc| {
            let addressing = MeshAddressing::new(&doc.cluster_id(), doc.network());
            let plan = uc_mesh::plan(
                &addressing,
                &mesh_machines(doc),
                node.machine_id.as_str(),
                &keys.public,
                uc_mesh::KEEPALIVE_SECS,
            );
            (addressing, plan)
        });
        let plan = match plan {
            Err(PlanError::Removed(_)) => anyhow::bail!(
                "this machine was removed from the cluster (uc machine rm); to join again, move {} \
                 away and start with --join and a new token",
                cfg.state_path().display()
            ),
            p => p.context("planning this machine's mesh interface")?,
        };
        let (device, backend_note) = create_device(cfg, keys)?;
        let addresses = plan.addresses();
        uc_mesh::netlink::configure(&cfg.wg_interface, &addresses, uc_mesh::MTU)
            .await
            .with_context(|| format!("configuring {}", cfg.wg_interface))?;
        let mesh = Arc::new(Mesh {
            interface: cfg.wg_interface.clone(),
            backend: device.backend(),
            backend_note,
            public_key: keys.public,
            management: plan.management,
            addressing,
            device: Mutex::new(device),
            applied: Mutex::new(Applied {
                peers: BTreeMap::new(),
                chooser: EndpointChooser::new(),
                names: BTreeMap::new(),
                addresses,
                removed_seen: BTreeMap::new(),
            }),
        });
        tracing::info!(
            interface = %mesh.interface,
            backend = mesh.backend.as_str(),
            address = %plan.v4,
            address_v6 = %plan.v6,
            management = %plan.management,
            port = cfg.wg_port,
            "mesh interface up"
        );
        mesh.apply_plan(Ok(plan)).await?;
        Ok(mesh)
    }

    fn plan(&self, node: &Node, mut machines: Vec<MeshMachine>) -> Result<Plan, PlanError> {
        // Endpoints other machines learned from a machine's handshakes are
        // tried after the ones it advertises.
        for info in node.peers().values() {
            for (id, addr) in &info.learned_endpoints {
                if let Some(m) = machines.iter_mut().find(|m| &m.id == id)
                    && !m.endpoints.contains(addr)
                {
                    m.endpoints.push(*addr);
                }
            }
        }
        let now = now_ms();
        let mut a = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let current: std::collections::BTreeSet<&str> =
            a.names.values().map(|(id, _)| id.as_str()).collect();
        let mut graced = Vec::new();
        for m in machines.iter_mut().filter(|m| !m.active) {
            let seen = match a.removed_seen.get(&m.id) {
                Some(t) => Some(*t),
                None if current.contains(m.id.as_str()) => Some(now),
                None => None,
            };
            if let Some(t) = seen {
                graced.push((m.id.clone(), t));
                if now.saturating_sub(t) < REMOVAL_GRACE.as_millis() as u64 {
                    m.leaving = true;
                }
            }
        }
        a.removed_seen = graced.into_iter().collect();
        drop(a);
        // A machine added at the same endpoint (the same host, joined again) ends the grace at
        // once: the userspace device keeps one connected socket per peer, and two peers at one
        // address would take each other's packets.
        let active_endpoints: std::collections::BTreeSet<std::net::SocketAddr> = machines
            .iter()
            .filter(|m| m.active)
            .flat_map(|m| m.endpoints.iter().copied())
            .collect();
        for m in machines.iter_mut().filter(|m| m.leaving) {
            if m.endpoints.iter().any(|e| active_endpoints.contains(e)) {
                m.leaving = false;
            }
        }
        uc_mesh::plan(
            &self.addressing,
            &machines,
            node.machine_id.as_str(),
            &self.public_key,
            uc_mesh::KEEPALIVE_SECS,
        )
    }

    /// Brings the interface in line with `plan`: peer changes only where
    /// something changed. A removed machine keeps no peers.
    async fn apply_plan(&self, plan: Result<Plan, PlanError>) -> anyhow::Result<()> {
        let plan = match plan {
            Ok(p) => Some(p),
            Err(PlanError::Removed(_)) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot plan the mesh; leaving it as it is");
                return Ok(());
            }
        };
        // A moved /24 (the state's conflict rules): the new addresses replace
        // the old ones, so that traffic from this machine carries an address
        // its peers accept. Gossip and sync are not disturbed: they live on
        // the management address, which does not move.
        if let Some(p) = &plan {
            let want = p.addresses();
            let have = self
                .applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .addresses
                .clone();
            if have != want {
                tracing::warn!(address = %p.v4, address_v6 = %p.v6, "this machine moved to another /24 (an older machine holds the old one)");
                // Old ones first: removing a primary IPv4 address takes the
                // secondaries of its subnet with it.
                let stale: Vec<_> = have.into_iter().filter(|a| !want.contains(a)).collect();
                uc_mesh::netlink::remove_addresses(&self.interface, &stale).await?;
                uc_mesh::netlink::configure(&self.interface, &want, uc_mesh::MTU).await?;
                self.applied
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .addresses = want;
            }
        }
        tokio::task::block_in_place(|| self.apply_peers(plan.as_ref()))
    }

    fn apply_peers(&self, plan: Option<&Plan>) -> anyhow::Result<()> {
        let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let status = dev.status()?;
        let observed: BTreeMap<PublicKey, Observed> = status
            .peers
            .iter()
            .map(|p| {
                (
                    p.public_key,
                    Observed {
                        endpoint: p.endpoint,
                        handshake_age: p.last_handshake_age,
                    },
                )
            })
            .collect();
        let mut a = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        let mut desired = BTreeMap::new();
        let mut names = BTreeMap::new();
        for (key, peer) in plan.map(|p| &p.peers).into_iter().flatten() {
            let endpoint = a
                .chooser
                .choose(*key, &peer.endpoints, observed.get(key).copied(), now);
            desired.insert(
                *key,
                PeerConfig {
                    allowed_ips: peer.allowed_ips.clone(),
                    endpoint,
                    keepalive: peer.keepalive,
                },
            );
            names.insert(*key, (peer.machine_id.clone(), peer.name.clone()));
        }
        a.chooser.retain(|k| desired.contains_key(k));
        // An endpoint the device learned by itself is already in place:
        // record it rather than reconfigure (which would restart the session).
        for (key, cfg) in a.peers.iter_mut() {
            if let (Some(o), Some(d)) = (observed.get(key), desired.get(key))
                && o.endpoint.is_some()
                && o.endpoint == d.endpoint
            {
                cfg.endpoint = o.endpoint;
            }
        }
        let ops = uc_mesh::diff(&a.peers, &desired);
        if !ops.is_empty() {
            dev.apply(&ops)?;
            let added: std::collections::BTreeSet<PublicKey> = ops
                .iter()
                .filter_map(|op| match op {
                    PeerOp::Add(k, _) => Some(*k),
                    PeerOp::Remove(_) => None,
                })
                .collect();
            for op in &ops {
                match op {
                    PeerOp::Remove(k) if !added.contains(k) => {
                        let name = a.names.get(k).map(|n| n.1.as_str());
                        tracing::info!(peer = ?name, key = %k, "mesh peer removed");
                    }
                    PeerOp::Remove(_) => {}
                    PeerOp::Add(k, c) => {
                        let name = names.get(k).map(|n| n.1.as_str());
                        let endpoint = c.endpoint.map(|e| e.to_string());
                        let what = if a.peers.contains_key(k) {
                            "mesh peer changed"
                        } else {
                            "mesh peer added"
                        };
                        tracing::info!(peer = ?name, key = %k, endpoint = ?endpoint, "{what}");
                    }
                }
            }
            uc_mesh::diff::apply_to(&mut a.peers, &ops);
            poke(&added, &desired);
        }
        a.names = names;
        Ok(())
    }

    /// Keeps the interface matching the state until `shutdown`.
    pub fn spawn(
        self: &Arc<Self>,
        node: Arc<Node>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        let mesh = self.clone();
        let mut heads = node.subscribe_heads();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The machines of the state, read again only when it changed.
            let mut machines = node.read(mesh_machines);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = heads.changed() => {
                        if r.is_err() { break }
                        heads.borrow_and_update();
                        machines = node.read(mesh_machines);
                    }
                    _ = tick.tick() => {}
                }
                let plan = mesh.plan(&node, machines.clone());
                let removed = matches!(plan, Err(PlanError::Removed(_)));
                if let Err(e) = mesh.apply_plan(plan).await {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "updating the mesh interface failed"
                    );
                }
                if removed {
                    tracing::warn!("this machine was removed from the cluster (uc machine rm): the agent stops and sets its state aside");
                    node.removed.store(true, std::sync::atomic::Ordering::SeqCst);
                    shutdown.cancel();
                    break;
                }
            }
        });
    }

    /// Endpoints this machine learned from peers' handshakes that they do
    /// not advertise, as `ID=IP:PORT,...` for gossip.
    pub fn learned_text(&self) -> String {
        let a = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        a.names
            .iter()
            .filter_map(|(k, (id, _))| a.chooser.learned(k).map(|ep| format!("{id}={ep}")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// What `uc wg show` prints.
    pub fn show(&self, node: &Node) -> anyhow::Result<WgShowResponse> {
        let status = tokio::task::block_in_place(|| {
            self.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .status()
        })?;
        let a = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let mut peers: Vec<WgPeer> = status
            .peers
            .iter()
            .map(|p| {
                let (id, name) = a.names.get(&p.public_key).cloned().unwrap_or_default();
                WgPeer {
                    machine_id: id,
                    machine_name: name,
                    public_key: p.public_key.to_string(),
                    endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                    allowed_ips: p.allowed_ips.iter().map(|x| x.to_string()).collect(),
                    last_handshake_age_secs: p
                        .last_handshake_age
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(-1),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    keepalive_secs: u32::from(p.keepalive),
                }
            })
            .collect();
        peers.sort_by(|x, y| x.machine_name.cmp(&y.machine_name));
        Ok(WgShowResponse {
            machine_id: node.machine_id.to_string(),
            machine_name: node.config.name.clone(),
            interface: self.interface.clone(),
            backend: self.backend.as_str().to_string(),
            public_key: self.public_key.to_string(),
            listen_port: u32::from(status.listen_port),
            addresses: a
                .addresses
                .iter()
                .map(|(ip, p)| format!("{ip}/{p}"))
                .collect(),
            peers,
            backend_note: self.backend_note.clone(),
        })
    }

    /// The management address of machine `id`, where its peer API and
    /// gossip listen.
    pub fn management_of(&self, id: &str) -> Ipv6Addr {
        self.addressing.management(id)
    }

    /// The mesh addresses of a machine of the state (for `uc machine ls`).
    pub fn addresses_of(&self, subnet: uc_proto::Subnet) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let v4 = self.addressing.machine_v4(subnet);
        (v4, v4.and_then(|v| self.addressing.v6_of(v)))
    }
}
