//! The agent's shared core: this machine's identity, its replica of the
//! cluster document with the store that makes writes durable, and what
//! membership currently knows about the other machines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use uc_crdt::ClusterState;
use uc_proto::MachineId;

use crate::config::Config;
use crate::store::{Store, StoreError};

/// What failure detection says of a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Live,
    Suspect,
    Dead,
    /// Never seen in gossip since this agent started.
    Unknown,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Live => "live",
            Liveness::Suspect => "suspect",
            Liveness::Dead => "dead",
            Liveness::Unknown => "unknown",
        }
    }
}

/// What gossip tells about one peer.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub liveness: Liveness,
    pub last_seen_unix_ms: u64,
    pub peer_addr: Option<SocketAddr>,
    pub heads: Option<String>,
    /// Its WireGuard backend, as it says.
    pub mesh_backend: Option<String>,
    /// Endpoints it learned from other machines' handshakes (machine id, address).
    pub learned_endpoints: Vec<(String, SocketAddr)>,
    /// Runtimes that work there (`None`: it has not said).
    pub runtimes: Option<Vec<uc_proto::spec::RuntimeKind>>,
    /// Names of the images in its store.
    pub images: Vec<String>,
    /// Memory it has available, in bytes.
    pub free_memory: Option<u64>,
}

impl PeerInfo {
    /// A peer of which nothing is known beyond its liveness and when it was
    /// last seen.
    pub fn bare(liveness: Liveness, last_seen_unix_ms: u64) -> PeerInfo {
        PeerInfo {
            liveness,
            last_seen_unix_ms,
            peer_addr: None,
            heads: None,
            mesh_backend: None,
            learned_endpoints: Vec::new(),
            runtimes: None,
            images: Vec::new(),
            free_memory: None,
        }
    }
}

/// Counters shown by `uc status`.
#[derive(Default, Debug)]
pub struct Metrics {
    pub gossip_garbage_dropped: AtomicU64,
    pub sync_garbage_dropped: AtomicU64,
    pub sync_sessions_ok: AtomicU64,
    pub sync_sessions_failed: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A write that did not happen, or happened only in memory.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Rejected(#[from] uc_crdt::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Replica {
    doc: ClusterState,
    store: Store,
}

/// Shared by every task of the agent.
pub struct Node {
    pub config: Config,
    pub machine_id: MachineId,
    pub cluster_id: String,
    replica: Mutex<Replica>,
    /// The heads digest after every change of the document, local or remote.
    heads_tx: watch::Sender<String>,
    /// Bumped on every local write, so the replicator pushes at once.
    local_write_tx: watch::Sender<u64>,
    ready_tx: watch::Sender<bool>,
    peers: RwLock<HashMap<MachineId, PeerInfo>>,
    /// Bumped when a peer's liveness, address or heads change (not on
    /// every heartbeat), so the replicator wakes only when there is news.
    peers_changed_tx: watch::Sender<u64>,
    pub metrics: Metrics,
    /// The mesh interface, once it is up.
    pub mesh: std::sync::OnceLock<std::sync::Arc<crate::mesh::Mesh>>,
    /// Set when this machine learns it was removed from the cluster: the agent stops and sets
    /// its state aside, so the machine can be added again (to this or another cluster).
    pub removed: std::sync::atomic::AtomicBool,
    /// Where this machine's DNS server listens (its first address), once it does.
    dns: std::sync::Mutex<Option<std::net::SocketAddr>>,
    /// This machine's runtimes, images and workloads, once started.
    pub workloads: std::sync::OnceLock<std::sync::Arc<crate::workloads::Workloads>>,
    /// This machine's ingress (serving only while the machine is tagged `ingress`).
    pub ingress: std::sync::OnceLock<std::sync::Arc<crate::ingress::IngressAgent>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// Where this machine's DNS server listens (its IPv4 mesh address), once it does.
    pub fn dns(&self) -> Option<std::net::SocketAddr> {
        *self.dns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_dns(&self, addr: Option<std::net::SocketAddr>) {
        *self.dns.lock().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    pub fn new(
        config: Config,
        machine_id: MachineId,
        mut doc: ClusterState,
        store: Store,
        ready: bool,
    ) -> Node {
        let cluster_id = doc.cluster_id();
        let (heads_tx, _) = watch::channel(doc.heads_digest());
        let (local_write_tx, _) = watch::channel(0);
        let (ready_tx, _) = watch::channel(ready);
        Node {
            config,
            machine_id,
            cluster_id,
            replica: Mutex::new(Replica { doc, store }),
            heads_tx,
            local_write_tx,
            ready_tx,
            peers: RwLock::new(HashMap::new()),
            peers_changed_tx: watch::channel(0).0,
            metrics: Metrics::default(),
            mesh: std::sync::OnceLock::new(),
            removed: std::sync::atomic::AtomicBool::new(false),
            dns: std::sync::Mutex::new(None),
            workloads: std::sync::OnceLock::new(),
            ingress: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Replica> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of the document's active machines, this one included.
    pub fn active_machines(&self) -> std::collections::HashSet<MachineId> {
        self.read(|doc| {
            doc.machines()
                .into_iter()
                .filter(|m| m.is_active())
                .map(|m| m.id)
                .collect()
        })
    }

    /// Reads the document.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.lock().doc)
    }

    /// The digest of the document's heads (cheap; cached).
    pub fn heads(&self) -> String {
        self.heads_tx.borrow().clone()
    }

    pub fn subscribe_heads(&self) -> watch::Receiver<String> {
        self.heads_tx.subscribe()
    }

    pub fn subscribe_local_writes(&self) -> watch::Receiver<u64> {
        self.local_write_tx.subscribe()
    }

    /// A local write: mutate, settle conflicts, persist, and only then return.
    /// The document lock is held until the change is on disk, so changes
    /// reach disk in the order they were made and a synced-out change is
    /// always already durable here.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut ClusterState) -> Result<T, uc_crdt::Error>,
    ) -> Result<T, WriteError> {
        let out = {
            let mut r = self.lock();
            let Replica { doc, store } = &mut *r;
            let out = f(doc);
            if out.is_ok() {
                for fix in doc.resolve_conflicts() {
                    tracing::info!(?fix, "settled a conflict");
                }
            }
            // Persist even when `f` failed part-way: whatever it committed
            // in memory must reach disk too, or memory and disk would part.
            store.persist(doc)?;
            if self.publish_heads(doc) {
                self.local_write_tx.send_modify(|n| *n += 1);
            }
            out?
        };
        Ok(out)
    }

    /// Runs one step of a sync session against this replica: applies and
    /// stores what it received, and says what to send back.
    pub fn sync_step(
        &self,
        peer: &mut uc_crdt::PeerSync,
        incoming: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>, WriteError> {
        let mut r = self.lock();
        let Replica { doc, store } = &mut *r;
        if let Some(msg) = incoming
            && doc.receive_sync_message(peer, msg)?
        {
            for fix in doc.resolve_conflicts() {
                tracing::info!(?fix, "settled a conflict");
            }
            // Received changes are held by the sender too: visible at once,
            // on disk without waiting for it (see `Store::persist_lazily`).
            store.persist_lazily(doc)?;
            self.publish_heads(doc);
        }
        Ok(doc.generate_sync_message(peer))
    }

    /// Announces the document's heads digest if it changed; true if it did.
    fn publish_heads(&self, doc: &mut ClusterState) -> bool {
        let heads = doc.heads_digest();
        self.heads_tx.send_if_modified(|h| {
            if *h == heads {
                false
            } else {
                *h = heads;
                true
            }
        })
    }

    /// Makes lazily stored received changes durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut r = self.lock();
        let Replica { doc, store } = &mut *r;
        store.flush(doc)
    }

    /// The whole document, for a joiner.
    pub fn save_document(&self) -> Vec<u8> {
        self.lock().doc.save()
    }

    pub fn set_ready(&self) {
        if !*self.ready_tx.borrow() {
            tracing::info!("caught up with the cluster; serving state");
            self.ready_tx.send_replace(true);
        }
    }

    pub fn is_ready(&self) -> bool {
        *self.ready_tx.borrow()
    }

    /// Waits until this replica has caught up, at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.ready_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .is_ok()
    }

    pub fn set_peers(&self, peers: HashMap<MachineId, PeerInfo>) {
        let mut current = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let news = current.len() != peers.len()
            || peers.iter().any(|(id, p)| {
                current.get(id).is_none_or(|c| {
                    (c.liveness, c.peer_addr, &c.heads) != (p.liveness, p.peer_addr, &p.heads)
                })
            });
        *current = peers;
        drop(current);
        if news {
            self.peers_changed_tx.send_modify(|n| *n += 1);
        }
    }

    pub fn subscribe_peer_changes(&self) -> watch::Receiver<u64> {
        self.peers_changed_tx.subscribe()
    }

    /// Where machine `id`'s peer API listens: its management address on the
    /// mesh. `None` until the mesh interface is up.
    pub fn peer_api_addr(&self, id: &MachineId) -> Option<SocketAddr> {
        let mesh = self.mesh.get()?;
        Some(SocketAddr::new(
            mesh.management_of(id.as_str()).into(),
            self.config.peer_port,
        ))
    }

    /// This machine's workloads, once started; else the API's "unavailable".
    pub fn workloads(&self) -> Result<std::sync::Arc<crate::workloads::Workloads>, tonic::Status> {
        self.workloads.get().cloned().ok_or_else(|| {
            tonic::Status::unavailable("workloads are not started yet on this machine")
        })
    }

    pub fn peers(&self) -> HashMap<MachineId, PeerInfo> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
