//! A deterministic simulation of many replicas syncing over an in-memory
//! network with message loss, reordering and partitions (feature `sim`; for
//! tests and benchmarks, never for production).
//!
//! Sync is modelled as sessions between pairs of replicas, like the agent's
//! gRPC streams: a session starts with fresh [`PeerSync`] states on both
//! sides, each side sends its first message, and every delivered message is
//! answered until neither side has anything to send. Messages of one session
//! arrive in order (a stream), but the messages of all sessions of a round are
//! delivered in a random interleaving. A lost message aborts its session
//! (both sides drop their `PeerSync`), as a broken stream would. When a
//! session ends or breaks, each side that received changes in it calls
//! [`ClusterState::resolve_conflicts`].
//!
//! All randomness comes from the `next_u64` function given to [`Sim::new`];
//! the same seed gives the same run.

use std::collections::{HashMap, HashSet, VecDeque};

use automerge::ChangeHash;

use crate::{ClusterState, Error, PeerSync};

/// Identifies one change of the document (an acknowledged write), so that a
/// test can ask whether one write causally precedes another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChangeId(ChangeHash);

/// Counters over the whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub rounds: u64,
    pub sessions: u64,
    /// Sessions cut by a partition, a lost message or the message cap.
    pub sessions_aborted: u64,
    pub messages_sent: u64,
    pub messages_lost: u64,
    /// Bytes of every message sent, lost ones included.
    pub bytes_sent: u64,
    /// Messages the receiver rejected (should stay 0).
    pub receive_errors: u64,
    /// Sessions not opened because both replicas had the same heads digest
    /// (what the agent learns from gossip before it syncs).
    pub sessions_skipped: u64,
    /// `resolve_conflicts` calls that changed something.
    pub resolutions: u64,
    /// Fixes made, by kind (`machine_moved`, `container_readdressed`, ...).
    pub fixes: std::collections::BTreeMap<&'static str, u64>,
}

/// Upper bound on messages per session; a session that exceeds it is aborted.
const MAX_SESSION_MESSAGES: usize = 200;

struct Session {
    a: usize,
    b: usize,
    state_a: PeerSync,
    state_b: PeerSync,
    /// Messages in flight from a to b, and from b to a.
    to_b: VecDeque<Vec<u8>>,
    to_a: VecDeque<Vec<u8>>,
    messages: usize,
    /// Whether a received message changed a's (b's) document.
    changed_a: bool,
    changed_b: bool,
}

/// Replicas plus the network between them.
pub struct Sim {
    pub replicas: Vec<ClusterState>,
    /// Partition group of each replica: replicas talk only within a group.
    groups: Vec<u32>,
    loss_per_mille: u64,
    sessions_per_round: Option<usize>,
    next_u64: Box<dyn FnMut() -> u64>,
    pub stats: Stats,
}

impl Sim {
    /// `next_u64` is the only source of randomness (a seeded RNG in tests).
    pub fn new(replicas: Vec<ClusterState>, next_u64: impl FnMut() -> u64 + 'static) -> Self {
        let n = replicas.len();
        Self {
            replicas,
            groups: vec![0; n],
            loss_per_mille: 0,
            sessions_per_round: None,
            next_u64: Box::new(next_u64),
            stats: Stats::default(),
        }
    }

    /// A uniform number in `0..n` (n > 0), from the simulation's randomness.
    pub fn below(&mut self, n: u64) -> u64 {
        (self.next_u64)() % n.max(1)
    }

    /// Probability, in thousandths, that a message is lost.
    pub fn set_loss_per_mille(&mut self, loss: u64) {
        self.loss_per_mille = loss.min(1000);
    }

    /// How many replicas (chosen at random) open a session in each round;
    /// `None` (the default): every replica does.
    pub fn set_sessions_per_round(&mut self, n: Option<usize>) {
        self.sessions_per_round = n;
    }

    /// Cuts the network: replica `i` reaches only replicas with the same `groups[i]`.
    pub fn partition(&mut self, groups: Vec<u32>) {
        assert_eq!(groups.len(), self.replicas.len(), "one group per replica");
        self.groups = groups;
    }

    pub fn heal(&mut self) {
        self.groups = vec![0; self.replicas.len()];
    }

    /// Runs a local write on replica `i`; on Ok, returns the change it made
    /// (None if it changed nothing). Every mutating method makes exactly one
    /// change, which becomes the replica's only head.
    pub fn write<T>(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut ClusterState) -> Result<T, Error>,
    ) -> Result<(T, Option<ChangeId>), Error> {
        let replica = &mut self.replicas[i];
        let before = replica.doc.get_heads();
        let out = f(replica)?;
        let after = replica.doc.get_heads();
        let change = match after.as_slice() {
            [head] if after != before => Some(ChangeId(*head)),
            _ => None,
        };
        Ok((out, change))
    }

    /// One round: every replica (or `sessions_per_round` random ones) opens
    /// a session with a random other replica, unless both have the same heads;
    /// all sessions run at once, their messages delivered in random order.
    /// Returns how many messages changed their receiver's document.
    pub fn round(&mut self) -> usize {
        self.stats.rounds += 1;
        let n = self.replicas.len();
        if n < 2 {
            return 0;
        }
        let initiators: Vec<usize> = match self.sessions_per_round {
            None => (0..n).collect(),
            Some(k) => (0..k).map(|_| self.below(n as u64) as usize).collect(),
        };
        let mut sessions: Vec<Option<Session>> = Vec::with_capacity(initiators.len());
        for a in initiators {
            let b = (a + 1 + self.below(n as u64 - 1) as usize) % n;
            if self.replicas[a].heads_digest() == self.replicas[b].heads_digest() {
                self.stats.sessions_skipped += 1;
                continue;
            }
            self.stats.sessions += 1;
            if self.groups[a] != self.groups[b] {
                self.stats.sessions_aborted += 1;
                continue;
            }
            let mut s = Session {
                a,
                b,
                state_a: PeerSync::new(),
                state_b: PeerSync::new(),
                to_b: VecDeque::new(),
                to_a: VecDeque::new(),
                messages: 0,
                changed_a: false,
                changed_b: false,
            };
            self.refill(&mut s);
            sessions.push(Some(s));
        }
        let mut ready: Vec<usize> = (0..sessions.len())
            .filter(|&i| sessions[i].is_some())
            .collect();
        let mut changed = 0;
        while !ready.is_empty() {
            let pick = self.below(ready.len() as u64) as usize;
            let id = ready[pick];
            let Some(mut s) = sessions[id].take() else {
                ready.swap_remove(pick);
                continue;
            };
            let finished = match self.deliver_one(&mut s) {
                Delivery::Aborted => {
                    self.stats.sessions_aborted += 1;
                    true
                }
                Delivery::Delivered { changed: c } => {
                    changed += usize::from(c);
                    if s.to_a.is_empty() && s.to_b.is_empty() {
                        self.refill(&mut s);
                    }
                    if s.to_a.is_empty() && s.to_b.is_empty() {
                        true
                    } else if s.messages >= MAX_SESSION_MESSAGES {
                        self.stats.sessions_aborted += 1;
                        true
                    } else {
                        false
                    }
                }
            };
            if finished {
                ready.swap_remove(pick);
                // Like the agent: resolve once a sync stream has ended (or
                // broken) and brought changes.
                for (replica, changed) in [(s.a, s.changed_a), (s.b, s.changed_b)] {
                    if changed {
                        self.resolve(replica);
                    }
                }
            } else {
                sessions[id] = Some(s);
            }
        }
        changed
    }

    fn resolve(&mut self, replica: usize) {
        let fixes = self.replicas[replica].resolve_conflicts();
        if !fixes.is_empty() {
            self.stats.resolutions += 1;
        }
        for fix in fixes {
            let kind = match fix {
                crate::Fix::MachineMoved { .. } => "machine_moved",
                crate::Fix::MachineRenamed { .. } => "machine_renamed",
                crate::Fix::ServiceRenamed { .. } => "service_renamed",
                crate::Fix::ContainerReaddressed { .. } => "container_readdressed",
                crate::Fix::ContainerRemoved { .. } => "container_removed",
            };
            *self.stats.fixes.entry(kind).or_default() += 1;
        }
    }

    /// Asks both sides of a session for their next message.
    fn refill(&mut self, s: &mut Session) {
        if let Some(m) = self.replicas[s.a].generate_sync_message(&mut s.state_a) {
            self.count_sent(&m);
            s.to_b.push_back(m);
        }
        if let Some(m) = self.replicas[s.b].generate_sync_message(&mut s.state_b) {
            self.count_sent(&m);
            s.to_a.push_back(m);
        }
    }

    fn count_sent(&mut self, m: &[u8]) {
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += m.len() as u64;
    }

    fn deliver_one(&mut self, s: &mut Session) -> Delivery {
        let to_b = match (s.to_b.is_empty(), s.to_a.is_empty()) {
            (false, false) => self.below(2) == 0,
            (false, true) => true,
            (true, false) => false,
            (true, true) => return Delivery::Delivered { changed: false },
        };
        let (queue, receiver, state) = if to_b {
            (&mut s.to_b, s.b, &mut s.state_b)
        } else {
            (&mut s.to_a, s.a, &mut s.state_a)
        };
        let Some(msg) = queue.pop_front() else {
            return Delivery::Delivered { changed: false };
        };
        s.messages += 1;
        if self.below(1000) < self.loss_per_mille {
            self.stats.messages_lost += 1;
            return Delivery::Aborted;
        }
        let replica = &mut self.replicas[receiver];
        let changed = match replica.receive_sync_message(state, &msg) {
            Ok(changed) => changed,
            Err(_) => {
                self.stats.receive_errors += 1;
                return Delivery::Aborted;
            }
        };
        if changed {
            if to_b {
                s.changed_b = true;
            } else {
                s.changed_a = true;
            }
        }
        if let Some(reply) = replica.generate_sync_message(state) {
            self.count_sent(&reply);
            if to_b {
                s.to_a.push_back(reply)
            } else {
                s.to_b.push_back(reply)
            }
        }
        Delivery::Delivered { changed }
    }

    /// Whether every replica has the same heads.
    pub fn converged(&mut self) -> bool {
        let mut digests = self.replicas.iter_mut().map(ClusterState::heads_digest);
        let first = digests.next();
        digests.all(|d| Some(d) == first)
    }

    /// Runs rounds until every replica has the same heads; returns the number
    /// of rounds run, or None if `max_rounds` were not enough.
    pub fn run_until_converged(&mut self, max_rounds: usize) -> Option<usize> {
        for r in 0..=max_rounds {
            if self.converged() {
                return Some(r);
            }
            if r < max_rounds {
                self.round();
            }
        }
        None
    }

    /// The causal history of replica `i`, to ask which writes precede which.
    pub fn history(&mut self, i: usize) -> History {
        let changes = self.replicas[i].doc.get_changes(&[]);
        History {
            deps: changes
                .iter()
                .map(|c| (c.hash(), c.deps().to_vec()))
                .collect(),
        }
    }
}

enum Delivery {
    Delivered { changed: bool },
    Aborted,
}

/// The change graph of one replica.
pub struct History {
    deps: HashMap<ChangeHash, Vec<ChangeHash>>,
}

impl History {
    pub fn contains(&self, c: ChangeId) -> bool {
        self.deps.contains_key(&c.0)
    }

    /// Whether `a` is a strict causal ancestor of `b` (b's author had seen a).
    pub fn precedes(&self, a: ChangeId, b: ChangeId) -> bool {
        let mut seen = HashSet::new();
        let mut todo: Vec<ChangeHash> = self.deps.get(&b.0).cloned().unwrap_or_default();
        while let Some(h) = todo.pop() {
            if h == a.0 {
                return true;
            }
            if seen.insert(h) {
                todo.extend(self.deps.get(&h).into_iter().flatten().copied());
            }
        }
        false
    }

    /// The writes among `writes` that no other write in `writes` follows:
    /// the concurrent "last" writes, one of which must have won.
    pub fn maximal(&self, writes: &[ChangeId]) -> Vec<ChangeId> {
        writes
            .iter()
            .copied()
            .filter(|&w| !writes.iter().any(|&o| o != w && self.precedes(w, o)))
            .collect()
    }
}

/// A scenario for benchmarks: `replicas` agents start from one saved
/// document; each round `joins_per_round` of them add their own machine
/// (concurrently, so subnets and names collide), and `edits_per_round`
/// random replicas create or update a service; then the network heals and
/// runs without loss until every replica has the same document.
#[derive(Clone, Debug)]
pub struct Growth {
    pub replicas: usize,
    pub network: uc_proto::Subnet,
    pub joins_per_round: usize,
    pub edits_per_round: usize,
    /// Loss while machines join and edit; the final convergence is lossless.
    pub loss_per_mille: u64,
    pub max_rounds: usize,
}

/// What a [`Growth`] run measured.
#[derive(Clone, Debug)]
pub struct GrowthReport {
    /// Rounds while machines joined and edits happened.
    pub busy_rounds: usize,
    /// Lossless rounds after that until every replica was identical.
    pub rounds_to_converge: usize,
    pub stats: Stats,
    /// Size of the final document, saved.
    pub document_bytes: usize,
    pub machines: usize,
    pub services: usize,
}

impl Growth {
    /// Runs the scenario; `next_u64` is the only randomness. Returns the
    /// simulation too, so that callers can check the converged replicas.
    pub fn run(
        &self,
        mut next_u64: impl FnMut() -> u64 + 'static,
    ) -> Result<(GrowthReport, Sim), Error> {
        let mut actor = || {
            let mut a = [0u8; 16];
            a[..8].copy_from_slice(&next_u64().to_le_bytes());
            a[8..].copy_from_slice(&next_u64().to_le_bytes());
            a
        };
        let mut root = ClusterState::new_cluster("growth", self.network, actor(), 0)?;
        let saved = root.save();
        let replicas = (0..self.replicas)
            .map(|_| ClusterState::load(&saved, actor()))
            .collect::<Result<Vec<_>, _>>()?;
        let machine_ids: Vec<[u8; 16]> = (0..self.replicas).map(|_| actor()).collect();
        let service_ids: Vec<uc_proto::ServiceId> = (0..64)
            .map(|_| uc_proto::ServiceId::from_bytes(actor()))
            .collect();
        let mut sim = Sim::new(replicas, next_u64);
        sim.set_loss_per_mille(self.loss_per_mille);
        let mut joined = 0;
        let mut busy_rounds = 0;
        let mut counter: u64 = 0;
        while joined < self.replicas {
            for _ in 0..self.joins_per_round.min(self.replicas - joined) {
                let r = joined;
                joined += 1;
                let id = uc_proto::MachineId::from_bytes(machine_ids[r]);
                for name in [format!("m{}", r % 97), format!("m{r}x")] {
                    let m = crate::NewMachine {
                        id: id.clone(),
                        name,
                        public_key: format!("pk{r}"),
                        endpoints: vec![format!("192.0.2.1:{}", 1000 + r)],
                        tags: Default::default(),
                    };
                    if sim
                        .write(r, |s| s.add_machine(m, busy_rounds as u64))
                        .is_ok()
                    {
                        break;
                    }
                }
            }
            for _ in 0..self.edits_per_round {
                counter += 1;
                let r = sim.below(joined as u64) as usize;
                let id = service_ids[sim.below(64) as usize].clone();
                let name = format!("svc{}", sim.below(64));
                let spec = serde_json::json!({ "image": "nginx", "v": counter });
                // Name conflicts are expected and refused locally.
                let _ = sim.write(r, |s| s.put_service(id, &name, spec, counter));
            }
            sim.round();
            busy_rounds += 1;
        }
        sim.heal();
        sim.set_loss_per_mille(0);
        let rounds_to_converge = sim.run_until_converged(self.max_rounds).ok_or_else(|| {
            Error::Malformed(format!("no convergence in {} rounds", self.max_rounds))
        })?;
        let first = &mut sim.replicas[0];
        let report = GrowthReport {
            busy_rounds,
            rounds_to_converge,
            stats: sim.stats.clone(),
            document_bytes: first.save().len(),
            machines: first.machines().len(),
            services: first.services().len(),
        };
        Ok((report, sim))
    }
}
