//! Property tests: merging is commutative and idempotent, and the conflict
//! rules are deterministic.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use proptest::prelude::*;
use uc_crdt::{ClusterState, Container, DesiredState, NewMachine};

use crate::common::{assert_invariants, cid, mid, network, sid};

#[derive(Clone, Debug)]
enum Op {
    AddMachine {
        id: u64,
        name: u8,
    },
    RemoveMachine(u64),
    Tag {
        machine: u64,
        tag: u8,
        present: bool,
    },
    Endpoints {
        machine: u64,
        n: u8,
    },
    Rename {
        machine: u64,
        name: u8,
    },
    PutService {
        id: u64,
        name: u8,
        spec: u8,
    },
    RemoveService(u64),
    PutContainer {
        id: u64,
        service: u64,
        machine: u64,
        host: u8,
    },
    RemoveContainer(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6u64, 0..4u8).prop_map(|(id, name)| Op::AddMachine { id, name }),
        1 => (0..6u64).prop_map(Op::RemoveMachine),
        2 => (0..6u64, 0..3u8, any::<bool>()).prop_map(|(machine, tag, present)| Op::Tag { machine, tag, present }),
        1 => (0..6u64, 0..3u8).prop_map(|(machine, n)| Op::Endpoints { machine, n }),
        1 => (0..6u64, 0..4u8).prop_map(|(machine, name)| Op::Rename { machine, name }),
        3 => (0..4u64, 0..3u8, 0..5u8).prop_map(|(id, name, spec)| Op::PutService { id, name, spec }),
        1 => (0..4u64).prop_map(Op::RemoveService),
        3 => (0..8u64, 0..4u64, 0..6u64, 1..4u8).prop_map(|(id, service, machine, host)| Op::PutContainer { id, service, machine, host }),
        1 => (0..8u64).prop_map(Op::RemoveContainer),
    ]
}

/// Applies `op`; errors (name taken, unknown ids, ...) are part of the game.
fn apply(s: &mut ClusterState, op: &Op, now: u64) {
    let _ = match op {
        Op::AddMachine { id, name } => s
            .add_machine(
                NewMachine {
                    id: mid(*id),
                    name: format!("m{name}"),
                    public_key: format!("k{id}"),
                    endpoints: vec![],
                    tags: BTreeSet::new(),
                },
                now,
            )
            .map(drop),
        Op::RemoveMachine(id) => s.remove_machine(&mid(*id)),
        Op::Tag {
            machine,
            tag,
            present,
        } => s.set_machine_tag(&mid(*machine), &format!("t{tag}"), *present),
        Op::Endpoints { machine, n } => {
            s.set_machine_endpoints(&mid(*machine), vec![format!("192.0.2.{n}:1")])
        }
        Op::Rename { machine, name } => s.rename_machine(&mid(*machine), &format!("m{name}")),
        Op::PutService { id, name, spec } => s
            .put_service(
                sid(*id),
                &format!("s{name}"),
                serde_json::json!({ "v": spec }),
                now,
            )
            .map(drop),
        Op::RemoveService(id) => s.remove_service(&sid(*id)),
        Op::PutContainer {
            id,
            service,
            machine,
            host,
        } => {
            let address = s
                .machine(&mid(*machine))
                .map(|m| m.subnet.host(u32::from(*host)).unwrap());
            s.put_container(Container {
                id: cid(*id),
                service: sid(*service),
                machine: mid(*machine),
                address,
                desired: DesiredState::Running,
                created_at_ms: now,
            })
        }
        Op::RemoveContainer(id) => s.remove_container(&cid(*id)),
    };
}

fn copy(s: &mut ClusterState, actor: u8) -> ClusterState {
    ClusterState::load(&s.save(), [actor; 16]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn merge_commutes_is_idempotent_and_resolution_is_deterministic(
        base in prop::collection::vec(op(), 0..6),
        left in prop::collection::vec(op(), 0..12),
        right in prop::collection::vec(op(), 0..12),
    ) {
        let mut root = ClusterState::new_cluster("c", network(), [1; 16], 0).unwrap();
        for (i, o) in base.iter().enumerate() {
            apply(&mut root, o, i as u64);
        }
        let mut a = copy(&mut root, 2);
        let mut b = copy(&mut root, 3);
        for (i, o) in left.iter().enumerate() {
            apply(&mut a, o, 100 + i as u64);
        }
        for (i, o) in right.iter().enumerate() {
            apply(&mut b, o, 100 + i as u64);
        }

        let mut ab = copy(&mut a, 4);
        ab.merge(&mut b).unwrap();
        let mut ba = copy(&mut b, 5);
        ba.merge(&mut a).unwrap();
        prop_assert_eq!(ab.to_json(), ba.to_json());
        prop_assert_eq!(ab.heads_digest(), ba.heads_digest());

        // Idempotent: merging again changes nothing.
        let digest = ab.heads_digest();
        ab.merge(&mut b).unwrap();
        ab.merge(&mut a).unwrap();
        prop_assert_eq!(ab.heads_digest(), digest);

        // Resolution: the same fixes on both, a valid document, and the two
        // (concurrent, identical) resolutions merge into the same state.
        let fixes_ab = ab.resolve_conflicts();
        let fixes_ba = ba.resolve_conflicts();
        prop_assert_eq!(&fixes_ab, &fixes_ba);
        prop_assert_eq!(ab.to_json(), ba.to_json());
        assert_invariants(&ab);
        let resolved = ab.to_json();
        ab.merge(&mut ba).unwrap();
        ba.merge(&mut ab).unwrap();
        prop_assert_eq!(ab.heads_digest(), ba.heads_digest());
        prop_assert_eq!(ab.to_json(), resolved);
        prop_assert!(ab.resolve_conflicts().is_empty());
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut s = ClusterState::new_cluster("c", network(), [1; 16], 0).unwrap();
        let digest = s.heads_digest();
        let _ = ClusterState::load(&bytes, [2; 16]);
        if s.load_incremental(&bytes).is_err() {
            prop_assert_eq!(s.heads_digest(), digest.clone());
        }
        if s.receive_sync_message(&mut uc_crdt::PeerSync::new(), &bytes).is_err() {
            prop_assert_eq!(s.heads_digest(), digest);
        }
    }
}

#[test]
fn container_addresses_follow_a_moved_machine() {
    let mut root = ClusterState::new_cluster("c", network(), [1; 16], 0).unwrap();
    root.put_service(sid(1), "web", serde_json::json!({}), 0)
        .unwrap();
    let mut a = copy(&mut root, 2);
    let mut b = copy(&mut root, 3);
    apply(&mut a, &Op::AddMachine { id: 1, name: 1 }, 5);
    apply(&mut b, &Op::AddMachine { id: 2, name: 2 }, 6);
    for h in 1..=3 {
        apply(
            &mut b,
            &Op::PutContainer {
                id: u64::from(h),
                service: 1,
                machine: 2,
                host: h,
            },
            7,
        );
    }
    a.merge(&mut b).unwrap();
    a.resolve_conflicts();
    let subnet = a.machine(&mid(2)).unwrap().subnet;
    // Machine 1 (older) keeps 10.210.1.0/24; machine 2 moves elsewhere.
    assert_eq!(
        a.machine(&mid(1)).unwrap().subnet.to_string(),
        "10.210.1.0/24"
    );
    assert_ne!(subnet.to_string(), "10.210.1.0/24");
    assert_eq!(subnet.prefix(), 24);
    assert!(
        "10.210.0.0/16"
            .parse::<uc_proto::Subnet>()
            .unwrap()
            .contains(subnet.addr())
    );
    let mut hosts: Vec<Ipv4Addr> = a
        .containers()
        .into_iter()
        .filter_map(|c| c.address)
        .collect();
    hosts.sort();
    assert_eq!(
        hosts,
        (1..=3).map(|h| subnet.host(h).unwrap()).collect::<Vec<_>>()
    );
    assert_invariants(&a);
}
