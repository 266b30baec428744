//! The deterministic simulation: 50 replicas of one document, concurrent
//! joins and edits on both sides of partitions, a lossy reordering network,
//! then healing; every acknowledged write must be in the converged document.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uc_crdt::sim::{ChangeId, History, Sim};
use uc_crdt::{ClusterState, Container, DesiredState, Error, NewMachine};
use uc_proto::{ContainerId, MachineId, ServiceId};

use crate::common::{assert_invariants, cid, mid, network, sid};

const REPLICAS: usize = 50;
const STEPS: u64 = 20;
const WRITERS_PER_STEP: u64 = 6;
/// Like an agent syncing with one random peer every few gossip intervals.
const SESSIONS_PER_ROUND: usize = 15;
const SERVICE_NAMES: [&str; 6] = ["web", "db", "cache", "queue", "api", "auth"];
const TAGS: [&str; 4] = ["gpu", "ssd", "edge", "arm"];

#[derive(Default)]
struct MachineExpect {
    name: String,
    endpoints: Vec<(ChangeId, Vec<String>)>,
    tags: BTreeMap<String, Vec<(ChangeId, bool)>>,
}

struct ServiceExpect {
    name: String,
    specs: Vec<(ChangeId, serde_json::Value)>,
    removed: bool,
}

struct ContainerExpect {
    service: ServiceId,
    removed: bool,
}

/// What the acknowledged writes must leave behind.
#[derive(Default)]
struct Expect {
    machines: BTreeMap<MachineId, MachineExpect>,
    services: BTreeMap<ServiceId, ServiceExpect>,
    containers: BTreeMap<ContainerId, ContainerExpect>,
    acknowledged: Vec<ChangeId>,
}

struct World {
    sim: Sim,
    expect: Expect,
    now: u64,
    counter: u64,
    failed_writes: usize,
}

impl World {
    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let i = self.sim.below(items.len() as u64) as usize;
        Some(items[i].clone())
    }

    /// Runs a write on replica `r`; returns its change if acknowledged.
    fn write<T>(
        &mut self,
        r: usize,
        f: impl FnOnce(&mut ClusterState) -> Result<T, Error>,
    ) -> Option<(T, Option<ChangeId>)> {
        match self.sim.write(r, f) {
            Ok((out, change)) => {
                self.expect.acknowledged.extend(change);
                Some((out, change))
            }
            Err(_) => {
                self.failed_writes += 1;
                None
            }
        }
    }

    /// Replica `r` adds its own machine; a name taken in its view makes it
    /// pick another, as a user would.
    fn join(&mut self, r: usize) {
        let shared = format!("node{}", r % 35);
        for name in [shared, format!("node{r}x")] {
            let m = NewMachine {
                id: mid(r as u64),
                name: name.clone(),
                public_key: format!("pk{r}"),
                endpoints: vec![format!("192.0.2.{r}:51000")],
                tags: BTreeSet::new(),
            };
            let endpoints = m.endpoints.clone();
            let now = self.now;
            if let Some((_, Some(change))) = self.write(r, |s| s.add_machine(m, now)) {
                self.expect.machines.insert(
                    mid(r as u64),
                    MachineExpect {
                        name,
                        endpoints: vec![(change, endpoints)],
                        tags: BTreeMap::new(),
                    },
                );
                return;
            }
        }
        panic!("replica {r} could not add its machine");
    }

    fn random_edit(&mut self, r: usize) {
        self.counter += 1;
        let n = self.counter;
        let now = self.now;
        let local_services = self.sim.replicas[r].services();
        let local_machines: Vec<_> = self.sim.replicas[r]
            .machines()
            .into_iter()
            .filter(|m| m.is_active())
            .collect();
        let own = mid(r as u64);
        match self.sim.below(100) {
            0..20 => {
                let name = self.pick(&SERVICE_NAMES).unwrap().to_owned();
                let spec = serde_json::json!({ "image": name, "v": n });
                let id = sid(n);
                if let Some((_, Some(c))) =
                    self.write(r, |s| s.put_service(id.clone(), &name, spec.clone(), now))
                {
                    self.expect.services.insert(
                        id,
                        ServiceExpect {
                            name,
                            specs: vec![(c, spec)],
                            removed: false,
                        },
                    );
                }
            }
            20..35 => {
                let Some(svc) = self.pick(&local_services) else {
                    return;
                };
                let spec = serde_json::json!({ "image": svc.name, "v": n, "by": r });
                if let Some((_, Some(c))) = self.write(r, |s| {
                    s.put_service(svc.id.clone(), &svc.name, spec.clone(), now)
                }) {
                    self.expect
                        .services
                        .get_mut(&svc.id)
                        .unwrap()
                        .specs
                        .push((c, spec));
                }
            }
            35..43 => {
                let Some(svc) = self.pick(&local_services) else {
                    return;
                };
                if self.write(r, |s| s.remove_service(&svc.id)).is_some() {
                    self.expect.services.get_mut(&svc.id).unwrap().removed = true;
                }
            }
            43..63 => {
                let Some(svc) = self.pick(&local_services) else {
                    return;
                };
                let machine = match local_machines.iter().find(|m| m.id == own) {
                    Some(m) if self.sim.below(2) == 0 => m.clone(),
                    _ => match self.pick(&local_machines) {
                        Some(m) => m,
                        None => return,
                    },
                };
                let host = 1 + self.sim.below(254) as u32;
                let c = Container {
                    id: cid(n),
                    service: svc.id.clone(),
                    machine: machine.id.clone(),
                    address: machine.subnet.host(host),
                    desired: DesiredState::Running,
                    created_at_ms: now,
                };
                if let Some((_, Some(_))) = self.write(r, |s| s.put_container(c)) {
                    self.expect.containers.insert(
                        cid(n),
                        ContainerExpect {
                            service: svc.id,
                            removed: false,
                        },
                    );
                }
            }
            63..70 => {
                let local = self.sim.replicas[r].containers();
                let Some(c) = self.pick(&local) else { return };
                if self.write(r, |s| s.remove_container(&c.id)).is_some() {
                    self.expect.containers.get_mut(&c.id).unwrap().removed = true;
                }
            }
            70..90 => {
                let Some(m) = self.pick(&local_machines) else {
                    return;
                };
                let tag = self.pick(&TAGS).unwrap();
                let present = self.sim.below(3) != 0;
                if let Some((_, Some(c))) =
                    self.write(r, |s| s.set_machine_tag(&m.id, tag, present))
                {
                    let e = self.expect.machines.get_mut(&m.id).unwrap();
                    e.tags.entry(tag.to_owned()).or_default().push((c, present));
                }
            }
            _ => {
                if !local_machines.iter().any(|m| m.id == own) {
                    return;
                }
                let endpoints = vec![format!("198.51.100.{r}:{n}")];
                if let Some((_, Some(c))) =
                    self.write(r, |s| s.set_machine_endpoints(&own, endpoints.clone()))
                {
                    self.expect
                        .machines
                        .get_mut(&own)
                        .unwrap()
                        .endpoints
                        .push((c, endpoints));
                }
            }
        }
    }
}

/// Values written by the maximal (not causally overwritten) writes: the
/// converged value must be one of them.
fn winners<T: Clone>(history: &History, writes: &[(ChangeId, T)]) -> Vec<T> {
    let ids: Vec<ChangeId> = writes.iter().map(|(c, _)| *c).collect();
    let max = history.maximal(&ids);
    writes
        .iter()
        .filter(|(c, _)| max.contains(c))
        .map(|(_, v)| v.clone())
        .collect()
}

fn renamed_from(name: &str, base: &str) -> bool {
    name == base || name.starts_with(&format!("{base}-"))
}

struct Outcome {
    rounds_to_converge: usize,
    acknowledged: usize,
    failed: usize,
    lost: u64,
    bytes: u64,
    fixes: u64,
}

fn run(seed: u64, replicas: usize) -> Outcome {
    let mut setup = ChaCha8Rng::seed_from_u64(seed);
    let mut actor = || {
        let mut a = [0u8; 16];
        setup.fill_bytes(&mut a);
        a
    };
    let mut root = ClusterState::new_cluster("sim", network(), actor(), 0).unwrap();
    let saved = root.save();
    let states: Vec<ClusterState> = (0..replicas)
        .map(|_| ClusterState::load(&saved, actor()).unwrap())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut world = World {
        sim: Sim::new(states, move || rng.next_u64()),
        expect: Expect::default(),
        now: 1,
        counter: 0,
        failed_writes: 0,
    };
    world.sim.set_loss_per_mille(200);
    world.sim.set_sessions_per_round(Some(SESSIONS_PER_ROUND));

    // Three sides; the first 12 replicas join at the same instant, so all of
    // them pick 10.210.1.0/24; replicas r and r+35 pick the same name.
    world
        .sim
        .partition((0..replicas).map(|i| (i % 3) as u32).collect());
    for r in 0..12 {
        world.join(r);
    }
    for step in 0..STEPS {
        world.now += 1;
        // The others join a few at a time, still concurrently with each other.
        if (1..=8).contains(&step) {
            let first = 12 + (step as usize - 1) * 5;
            for r in first..(first + 5).min(replicas) {
                world.join(r);
            }
        }
        match step {
            7 => world
                .sim
                .partition((0..replicas).map(|i| (i % 2) as u32).collect()),
            14 => world.sim.heal(),
            _ => {}
        }
        for _ in 0..WRITERS_PER_STEP {
            let r = world.sim.below(replicas as u64) as usize;
            world.random_edit(r);
        }
        world.sim.round();
    }

    world.sim.heal();
    world.sim.set_loss_per_mille(0);
    world.sim.set_sessions_per_round(None);
    let rounds = world
        .sim
        .run_until_converged(100)
        .expect("replicas converge after healing");
    let stats = world.sim.stats.clone();
    assert_eq!(stats.receive_errors, 0);

    // Identical everywhere.
    let json = world.sim.replicas[0].to_json();
    let digest = world.sim.replicas[0].heads_digest();
    for (i, r) in world.sim.replicas.iter_mut().enumerate() {
        assert_eq!(r.heads_digest(), digest, "replica {i}");
        assert_eq!(r.to_json(), json, "replica {i}");
    }
    assert!(world.sim.replicas[0].resolve_conflicts().is_empty());
    assert_invariants(&world.sim.replicas[0]);

    // Every acknowledged write is in the history, and left what it should.
    let history = world.sim.history(0);
    let expect = &world.expect;
    for c in &expect.acknowledged {
        assert!(history.contains(*c), "acknowledged write {c:?} lost");
    }
    let state = &world.sim.replicas[0];
    assert_eq!(state.machines().len(), replicas);
    for (id, e) in &expect.machines {
        let m = state
            .machine(id)
            .unwrap_or_else(|| panic!("machine {id} lost"));
        assert!(m.is_active());
        assert!(
            renamed_from(&m.name, &e.name),
            "machine {id} named {} not {}",
            m.name,
            e.name
        );
        assert!(
            winners(&history, &e.endpoints).contains(&m.endpoints),
            "machine {id} endpoints {:?}",
            m.endpoints
        );
        for tag in TAGS {
            let writes = e.tags.get(tag).map(Vec::as_slice).unwrap_or_default();
            let present = winners(&history, writes).contains(&true);
            assert_eq!(m.tags.contains(tag), present, "machine {id} tag {tag}");
        }
    }
    for (id, e) in &expect.services {
        match state.service(id) {
            None => assert!(e.removed, "service {id} lost"),
            Some(s) => {
                assert!(!e.removed, "removed service {id} is back");
                assert!(
                    renamed_from(&s.name, &e.name),
                    "service {id} named {}",
                    s.name
                );
                assert!(
                    winners(&history, &e.specs).contains(&s.spec),
                    "service {id} spec {}",
                    s.spec
                );
            }
        }
    }
    assert_eq!(
        state.services().len(),
        expect.services.values().filter(|e| !e.removed).count()
    );
    for (id, e) in &expect.containers {
        let gone = e.removed || expect.services[&e.service].removed;
        assert_eq!(state.container(id).is_none(), gone, "container {id}");
    }
    assert_eq!(
        state.containers().len(),
        expect
            .containers
            .values()
            .filter(|e| !e.removed && !expect.services[&e.service].removed)
            .count()
    );

    Outcome {
        rounds_to_converge: rounds,
        acknowledged: expect.acknowledged.len(),
        failed: world.failed_writes,
        lost: stats.messages_lost,
        bytes: stats.bytes_sent,
        fixes: stats.fixes.values().sum(),
    }
}

#[test]
fn fifty_replicas_converge_without_losing_acknowledged_writes() {
    for seed in 1..=5 {
        let start = Instant::now();
        let o = run(seed, REPLICAS);
        eprintln!(
            "seed {seed}: {} acknowledged writes ({} refused), {} messages lost, {} bytes sent, {} fixes, converged {} rounds after healing, {:?}",
            o.acknowledged,
            o.failed,
            o.lost,
            o.bytes,
            o.fixes,
            o.rounds_to_converge,
            start.elapsed()
        );
        assert!(o.acknowledged > 100);
        assert!(o.lost > 0);
    }
}

#[test]
fn the_simulation_is_deterministic() {
    let a = run(42, 16);
    let b = run(42, 16);
    assert_eq!(
        (a.acknowledged, a.failed, a.lost, a.bytes),
        (b.acknowledged, b.failed, b.lost, b.bytes)
    );
}
