//! Moves the bulk state: after a local write it pushes to every live peer at
//! once, and whenever a peer's gossiped heads digest differs from ours it
//! runs an anti-entropy sync session with it. Also decides when a restarted
//! agent has caught up.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uc_proto::MachineId;
use uc_proto::v1::peer_client::PeerClient;

use crate::node::{Liveness, Metrics, Node};
use crate::peer;

/// A peer whose digest differs is synced again at most this often, unless a
/// local write needs pushing.
const ANTI_ENTROPY_COOLDOWN: Duration = Duration::from_millis(400);
const FAILURE_BACKOFF: Duration = Duration::from_secs(1);
/// How long a peer's digest must differ from ours before an anti-entropy
/// session is started for it.
const ANTI_ENTROPY_DELAY: Duration = Duration::from_millis(1500);

struct PeerSlot {
    client: Option<(String, PeerClient<tonic::transport::Channel>)>,
    in_flight: bool,
    again: bool,
    next_allowed: Instant,
    /// Since when the peer's gossiped heads have differed from ours.
    differs_since: Option<Instant>,
}

pub fn spawn(node: Arc<Node>, tracker: &TaskTracker, shutdown: CancellationToken) {
    let inner_tracker = tracker.clone();
    tracker.spawn(async move {
        let started = Instant::now();
        let mut writes = node.subscribe_local_writes();
        let mut peer_changes = node.subscribe_peer_changes();
        // Wakes for news (local writes, peers' liveness or heads changing,
        // finished sessions); the tick only retries after cool-downs and
        // checks the catch-up deadline.
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (done_tx, mut done_rx) = mpsc::channel::<(MachineId, bool)>(64);
        let mut slots: HashMap<MachineId, PeerSlot> = HashMap::new();
        let mut active: (String, HashSet<MachineId>) = (String::new(), HashSet::new());
        loop {
            let mut push_all = false;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = writes.changed() => { if r.is_err() { break; } push_all = true; }
                _ = tick.tick() => {
                    // Received changes reach the disk within a tick.
                    let n = node.clone();
                    if let Err(e) = tokio::task::spawn_blocking(move || n.flush()).await.unwrap_or(Ok(())) {
                        tracing::error!(error = %e, "storing received changes failed");
                    }
                }
                r = peer_changes.changed() => { if r.is_err() { break; } }
                Some((id, ok)) = done_rx.recv() => {
                    if let Some(slot) = slots.get_mut(&id) {
                        slot.in_flight = false;
                        if ok {
                            Metrics::inc(&node.metrics.sync_sessions_ok);
                            node.set_ready();
                            slot.next_allowed = Instant::now() + ANTI_ENTROPY_COOLDOWN;
                        } else {
                            Metrics::inc(&node.metrics.sync_sessions_failed);
                            slot.next_allowed = Instant::now() + FAILURE_BACKOFF;
                            slot.client = None;
                        }
                    }
                }
            }
            let now = Instant::now();
            let ours = node.heads();
            let peers = node.peers();
            // Reading the document is the costly part of a tick: only redo
            // it when the document changed.
            if active.0 != ours {
                active = (ours.clone(), node.active_machines());
            }
            let active = &active.1;
            if !node.is_ready() {
                let alone = active.iter().all(|id| *id == node.machine_id);
                if alone {
                    node.set_ready();
                } else if now.duration_since(started) > node.config.catch_up_timeout {
                    tracing::warn!("no peer answered within {:?}; serving the state this machine has, which may be stale", node.config.catch_up_timeout);
                    node.set_ready();
                }
            }
            for (id, info) in &peers {
                if !active.contains(id) || !matches!(info.liveness, Liveness::Live | Liveness::Suspect) {
                    continue;
                }
                let Some(addr) = info.peer_addr else { continue };
                let slot = slots.entry(id.clone()).or_insert(PeerSlot {
                    client: None,
                    in_flight: false,
                    again: false,
                    next_allowed: now,
                    differs_since: None,
                });
                // Gossiped digests lag behind pushes: right after a write,
                // every peer's digest differs for a moment. Anti-entropy is
                // for differences that last; a machine still catching up
                // does not wait.
                let differs = info.heads.as_deref() != Some(ours.as_str());
                slot.differs_since = if differs { slot.differs_since.or(Some(now)) } else { None };
                let lasting = slot
                    .differs_since
                    .is_some_and(|t| now.duration_since(t) >= ANTI_ENTROPY_DELAY || !node.is_ready());
                let wanted = push_all || slot.again || (lasting && now >= slot.next_allowed);
                if !wanted {
                    continue;
                }
                if slot.in_flight {
                    slot.again = true;
                    continue;
                }
                slot.again = false;
                let addr = addr.to_string();
                if slot.client.as_ref().map(|(a, _)| a != &addr).unwrap_or(true) {
                    match peer::client(&addr) {
                        Ok(c) => slot.client = Some((addr.clone(), c)),
                        Err(e) => {
                            tracing::warn!(peer = %id, %addr, error = %e, "bad peer address");
                            continue;
                        }
                    }
                }
                let Some((_, mut client)) = slot.client.clone() else { continue };
                slot.in_flight = true;
                let node = node.clone();
                let done = done_tx.clone();
                let id = id.clone();
                inner_tracker.spawn(async move {
                    let ok = match tokio::time::timeout(Duration::from_secs(30), peer::sync_session(&node, &mut client)).await {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %id, error = %e, "sync session failed");
                            false
                        }
                        Err(_) => {
                            tracing::warn!(peer = %id, "sync session timed out");
                            false
                        }
                    };
                    let _ = done.send((id, ok)).await;
                });
            }
        }
    });
}
