//! Unit tests of `ClusterState`: accessors, errors, persistence, sync and
//! merges of concurrent edits.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use uc_proto::{ContainerId, MachineId, ServiceId, Subnet};

use crate::{
    ClusterState, Container, DesiredState, Error, Fix, JoinTokenProblem, MachineState, NewMachine,
    PeerSync,
};

fn net() -> Subnet {
    "10.210.0.0/16".parse().unwrap()
}

fn sn(s: &str) -> Subnet {
    s.parse().unwrap()
}

fn mid(n: u8) -> MachineId {
    MachineId::from_bytes([n; 16])
}

fn sid(n: u8) -> ServiceId {
    ServiceId::from_bytes([n; 16])
}

fn cid(n: u8) -> ContainerId {
    ContainerId::from_bytes([n; 16])
}

fn new_machine(n: u8, name: &str) -> NewMachine {
    NewMachine {
        id: mid(n),
        name: name.to_owned(),
        public_key: format!("key-{n}"),
        endpoints: vec![format!("192.0.2.{n}:51000")],
        tags: BTreeSet::from(["linux".to_owned()]),
    }
}

fn cluster() -> ClusterState {
    ClusterState::new_cluster("c1", net(), [1; 16], 1000).unwrap()
}

/// A second replica of `a`, as a joining machine gets it.
fn replica(a: &mut ClusterState, actor: u8) -> ClusterState {
    ClusterState::load(&a.save(), [actor; 16]).unwrap()
}

fn container(n: u8, service: u8, machine: u8, address: Option<Ipv4Addr>, at: u64) -> Container {
    Container {
        id: cid(n),
        service: sid(service),
        machine: mid(machine),
        address,
        desired: DesiredState::Running,
        created_at_ms: at,
    }
}

/// Syncs two replicas over one session until neither has anything to send.
fn sync(a: &mut ClusterState, b: &mut ClusterState) -> usize {
    let (mut pa, mut pb) = (PeerSync::new(), PeerSync::new());
    let mut messages = 0;
    loop {
        let mut progressed = false;
        if let Some(m) = a.generate_sync_message(&mut pa) {
            b.receive_sync_message(&mut pb, &m).unwrap();
            progressed = true;
            messages += 1;
        }
        if let Some(m) = b.generate_sync_message(&mut pb) {
            a.receive_sync_message(&mut pa, &m).unwrap();
            progressed = true;
            messages += 1;
        }
        if !progressed {
            return messages;
        }
        assert!(messages < 100, "sync does not end");
    }
}

/// Asserts that `f` fails and leaves the document unchanged.
fn assert_unchanged<T: std::fmt::Debug>(
    s: &mut ClusterState,
    f: impl FnOnce(&mut ClusterState) -> Result<T, Error>,
) -> Error {
    s.save_incremental();
    let before = s.heads_digest();
    let json = s.to_json();
    let err = f(s).unwrap_err();
    assert_eq!(s.heads_digest(), before, "{err}");
    assert_eq!(s.to_json(), json);
    assert!(s.save_incremental().is_empty());
    err
}

#[test]
fn new_cluster_accessors() {
    let mut s = cluster();
    assert_eq!(s.cluster_id(), "c1");
    assert_eq!(s.network(), net());
    assert_eq!(s.created_at_ms(), 1000);
    assert!(s.machines().is_empty() && s.services().is_empty() && s.containers().is_empty());
    assert!(s.join_tokens().is_empty());
    let d = s.heads_digest();
    assert_eq!(d.len(), 16);
    assert!(d.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        s.to_json(),
        serde_json::json!({
            "cluster": {"id": "c1", "network": "10.210.0.0/16", "created_at_ms": 1000},
            "machines": {}, "services": {}, "containers": {}, "join_tokens": {},
            "certificates": {}, "acme_orders": {},
        })
    );
    let err = ClusterState::new_cluster("c1", sn("10.210.0.0/23"), [1; 16], 0).unwrap_err();
    assert!(matches!(err, Error::NetworkTooSmall(_)), "{err}");
    assert!(err.to_string().contains("10.210.0.0/23"), "{err}");
    let err = ClusterState::new_cluster("c1", sn("10.0.0.0/13"), [1; 16], 0).unwrap_err();
    assert!(matches!(err, Error::NetworkTooLarge(_)), "{err}");
    assert!(err.to_string().contains("10.0.0.0/13"), "{err}");
    assert!(ClusterState::new_cluster("c1", sn("10.0.0.0/14"), [1; 16], 0).is_ok());
}

#[test]
fn add_machine_allocates_lowest_free_subnet() {
    let mut s = cluster();
    let a = s.add_machine(new_machine(1, "a"), 10).unwrap();
    assert_eq!(a.subnet, sn("10.210.1.0/24"));
    assert_eq!(a.state, MachineState::Active);
    assert_eq!(a.created_at_ms, 10);
    let b = s.add_machine(new_machine(2, "b"), 20).unwrap();
    assert_eq!(b.subnet, sn("10.210.2.0/24"));
    assert_eq!(s.machine(&mid(1)), Some(a.clone()));
    assert_eq!(s.machine_by_name("b"), Some(b.clone()));
    assert_eq!(s.machine_by_name("zz"), None);
    assert_eq!(s.machine(&mid(9)), None);
    assert_eq!(s.machines(), vec![a.clone(), b]);

    // A removed machine frees its subnet and its name.
    s.remove_machine(&mid(1)).unwrap();
    let c = s.add_machine(new_machine(3, "a"), 30).unwrap();
    assert_eq!(c.subnet, sn("10.210.1.0/24"));
    assert_eq!(s.machine_by_name("a").unwrap().id, mid(3));
    assert_eq!(s.machines().len(), 3);
}

#[test]
fn add_machine_errors() {
    let mut s = cluster();
    s.add_machine(new_machine(1, "a"), 10).unwrap();
    let e = assert_unchanged(&mut s, |s| s.add_machine(new_machine(1, "other"), 10));
    assert!(
        matches!(e, Error::MachineExists(ref id) if *id == mid(1)),
        "{e}"
    );
    let e = assert_unchanged(&mut s, |s| s.add_machine(new_machine(2, "a"), 10));
    assert!(
        matches!(
            e,
            Error::NameTaken {
                kind: "machine",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!("machine name \"a\" is taken by machine {}", mid(1))
    );
    for bad in ["", "A", "-a", "a-", "a b", &"x".repeat(64)] {
        let e = assert_unchanged(&mut s, |s| s.add_machine(new_machine(2, bad), 10));
        assert!(matches!(e, Error::InvalidName { .. }), "{e}");
    }
    // A /22 has four /24s; the first and last are never used.
    let mut small = ClusterState::new_cluster("c", sn("10.9.0.0/22"), [1; 16], 0).unwrap();
    assert_eq!(
        small.add_machine(new_machine(1, "a"), 0).unwrap().subnet,
        sn("10.9.1.0/24")
    );
    assert_eq!(
        small.add_machine(new_machine(2, "b"), 0).unwrap().subnet,
        sn("10.9.2.0/24")
    );
    let e = assert_unchanged(&mut small, |s| s.add_machine(new_machine(3, "c"), 0));
    assert_eq!(e.to_string(), "no free /24 left in network 10.9.0.0/22");
}

#[test]
fn a_slash_16_holds_254_machines() {
    let mut s = cluster();
    for i in 0..254u32 {
        let id = MachineId::from_bytes(u128::from(i + 1).to_be_bytes());
        let m = NewMachine {
            id,
            name: format!("m{i}"),
            public_key: String::new(),
            endpoints: vec![],
            tags: BTreeSet::new(),
        };
        assert_eq!(
            s.add_machine(m, 0).unwrap().subnet,
            net().child(24, i + 1).unwrap()
        );
    }
    let e = s.add_machine(new_machine(0, "last"), 0).unwrap_err();
    assert!(matches!(e, Error::NetworkFull(_)), "{e}");
}

#[test]
fn machine_edits() {
    let mut s = cluster();
    s.add_machine(new_machine(1, "a"), 10).unwrap();
    s.add_machine(new_machine(2, "b"), 10).unwrap();
    s.set_machine_endpoints(
        &mid(1),
        vec!["198.51.100.1:51000".into(), "[2001:db8::1]:51000".into()],
    )
    .unwrap();
    s.set_machine_tag(&mid(1), "gpu", true).unwrap();
    s.set_machine_tag(&mid(1), "linux", false).unwrap();
    s.set_machine_tag(&mid(1), "absent", false).unwrap();
    s.rename_machine(&mid(1), "alpha").unwrap();
    s.set_machine_public_key(&mid(1), "pubkey-a").unwrap();
    let m = s.machine(&mid(1)).unwrap();
    assert_eq!(m.public_key, "pubkey-a");
    assert_eq!(
        m.endpoints,
        vec!["198.51.100.1:51000", "[2001:db8::1]:51000"]
    );
    assert_eq!(m.tags, BTreeSet::from(["gpu".to_owned()]));
    assert_eq!(m.name, "alpha");
    assert_eq!(s.machine_by_name("a"), None);

    let e = assert_unchanged(&mut s, |s| s.rename_machine(&mid(1), "b"));
    assert!(matches!(e, Error::NameTaken { .. }), "{e}");
    let e = assert_unchanged(&mut s, |s| s.rename_machine(&mid(9), "x"));
    assert_eq!(e.to_string(), format!("machine {} not found", mid(9)));
    let e = assert_unchanged(&mut s, |s| s.set_machine_endpoints(&mid(9), vec![]));
    assert!(matches!(e, Error::UnknownMachine(_)), "{e}");
    let e = assert_unchanged(&mut s, |s| s.set_machine_tag(&mid(9), "t", true));
    assert!(matches!(e, Error::UnknownMachine(_)), "{e}");
    let e = assert_unchanged(&mut s, |s| s.set_machine_public_key(&mid(9), "k"));
    assert!(matches!(e, Error::UnknownMachine(_)), "{e}");

    // No-op edits make no change.
    s.save_incremental();
    s.rename_machine(&mid(1), "alpha").unwrap();
    s.set_machine_tag(&mid(1), "gpu", true).unwrap();
    s.set_machine_public_key(&mid(1), "pubkey-a").unwrap();
    s.set_machine_endpoints(&mid(1), m.endpoints.clone())
        .unwrap();
    assert!(s.save_incremental().is_empty());
}

#[test]
fn remove_machine_keeps_a_tombstone_and_drops_its_containers() {
    let mut s = cluster();
    s.add_machine(new_machine(1, "a"), 10).unwrap();
    s.add_machine(new_machine(2, "b"), 10).unwrap();
    s.put_service(sid(1), "web", serde_json::json!({}), 10)
        .unwrap();
    s.put_container(container(1, 1, 1, Some(Ipv4Addr::new(10, 210, 1, 5)), 10))
        .unwrap();
    s.put_container(container(2, 1, 2, None, 10)).unwrap();
    s.remove_machine(&mid(1)).unwrap();
    s.remove_machine(&mid(1)).unwrap(); // idempotent
    let m = s.machine(&mid(1)).unwrap();
    assert_eq!(m.state, MachineState::Removed);
    assert!(!m.is_active());
    assert_eq!(s.machine_by_name("a"), None);
    assert_eq!(
        s.containers()
            .iter()
            .map(|c| c.id.clone())
            .collect::<Vec<_>>(),
        vec![cid(2)]
    );
    let e = assert_unchanged(&mut s, |s| s.set_machine_endpoints(&mid(1), vec![]));
    assert_eq!(e.to_string(), format!("machine {} is removed", mid(1)));
    let e = assert_unchanged(&mut s, |s| s.rename_machine(&mid(1), "z"));
    assert!(matches!(e, Error::MachineRemoved(_)), "{e}");
    let e = assert_unchanged(&mut s, |s| s.remove_machine(&mid(9)));
    assert!(matches!(e, Error::UnknownMachine(_)), "{e}");
    let e = assert_unchanged(&mut s, |s| s.put_container(container(3, 1, 1, None, 10)));
    assert!(matches!(e, Error::MachineRemoved(_)), "{e}");
}

#[test]
fn services() {
    let mut s = cluster();
    let web = s
        .put_service(
            sid(1),
            "web",
            serde_json::json!({"image": "nginx", "replicas": 2}),
            10,
        )
        .unwrap();
    assert_eq!(web.created_at_ms, 10);
    s.put_service(sid(2), "db", serde_json::json!({"image": "postgres"}), 20)
        .unwrap();
    assert_eq!(s.service(&sid(1)), Some(web.clone()));
    assert_eq!(s.service_by_name("web"), Some(web));
    assert_eq!(
        s.services()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        vec!["web", "db"]
    );

    let updated = s
        .put_service(sid(1), "www", serde_json::json!({"image": "caddy"}), 99)
        .unwrap();
    assert_eq!(updated.created_at_ms, 10);
    assert_eq!(s.service(&sid(1)), Some(updated));
    assert_eq!(s.service_by_name("web"), None);

    let e = assert_unchanged(&mut s, |s| {
        s.put_service(sid(3), "db", serde_json::json!(1), 0)
    });
    assert_eq!(
        e.to_string(),
        format!("service name \"db\" is taken by service {}", sid(2))
    );
    let e = assert_unchanged(&mut s, |s| {
        s.put_service(sid(3), "Bad Name", serde_json::json!(1), 0)
    });
    assert!(
        matches!(
            e,
            Error::InvalidName {
                kind: "service",
                ..
            }
        ),
        "{e}"
    );
    let e = assert_unchanged(&mut s, |s| s.remove_service(&sid(9)));
    assert_eq!(e.to_string(), format!("service {} not found", sid(9)));

    s.add_machine(new_machine(1, "a"), 10).unwrap();
    s.put_container(container(1, 1, 1, None, 10)).unwrap();
    s.put_container(container(2, 2, 1, None, 10)).unwrap();
    s.remove_service(&sid(1)).unwrap();
    assert_eq!(s.service(&sid(1)), None);
    assert_eq!(
        s.containers()
            .iter()
            .map(|c| c.id.clone())
            .collect::<Vec<_>>(),
        vec![cid(2)]
    );
}

#[test]
fn containers() {
    let mut s = cluster();
    s.add_machine(new_machine(1, "a"), 10).unwrap();
    s.put_service(sid(1), "web", serde_json::json!({}), 10)
        .unwrap();
    let ip = |h| Ipv4Addr::new(10, 210, 1, h);
    let c1 = container(1, 1, 1, Some(ip(2)), 10);
    s.put_container(c1.clone()).unwrap();
    s.put_container(container(2, 1, 1, None, 5)).unwrap();
    assert_eq!(s.container(&cid(1)), Some(c1.clone()));
    assert_eq!(
        s.containers()
            .iter()
            .map(|c| c.id.clone())
            .collect::<Vec<_>>(),
        vec![cid(2), cid(1)]
    );

    // Update: created_at_ms keeps its first value.
    let mut c1b = c1.clone();
    c1b.desired = DesiredState::Stopped;
    c1b.address = Some(ip(3));
    c1b.created_at_ms = 777;
    s.put_container(c1b).unwrap();
    let got = s.container(&cid(1)).unwrap();
    assert_eq!(
        (got.desired, got.address, got.created_at_ms),
        (DesiredState::Stopped, Some(ip(3)), 10)
    );

    let e = assert_unchanged(&mut s, |s| s.put_container(container(3, 9, 1, None, 0)));
    assert!(matches!(e, Error::UnknownService(_)), "{e}");
    let e = assert_unchanged(&mut s, |s| s.put_container(container(3, 1, 9, None, 0)));
    assert!(matches!(e, Error::UnknownMachine(_)), "{e}");
    let e = assert_unchanged(&mut s, |s| {
        s.put_container(container(3, 1, 1, Some(Ipv4Addr::new(10, 210, 2, 1)), 0))
    });
    assert_eq!(
        e.to_string(),
        format!(
            "container {} address 10.210.2.1 is outside subnet 10.210.1.0/24 of machine {}",
            cid(3),
            mid(1)
        )
    );
    let e = assert_unchanged(&mut s, |s| {
        s.put_container(container(3, 1, 1, Some(ip(3)), 0))
    });
    assert!(
        matches!(e, Error::AddressTaken { ref by, .. } if *by == cid(1)),
        "{e}"
    );

    s.remove_container(&cid(1)).unwrap();
    assert_eq!(s.container(&cid(1)), None);
    let e = assert_unchanged(&mut s, |s| s.remove_container(&cid(1)));
    assert_eq!(e.to_string(), format!("container {} not found", cid(1)));
}

#[test]
fn join_tokens() {
    let mut s = cluster();
    s.add_join_token("h1", 100).unwrap();
    s.add_join_token("h2", 50).unwrap();
    s.add_join_token("h3", 500).unwrap();
    assert_eq!(s.join_tokens().len(), 3);
    let e = assert_unchanged(&mut s, |s| s.add_join_token("", 1));
    assert!(matches!(e, Error::InvalidTokenHash(_)), "{e}");

    // Expired: refused, nothing changes (even the expired ones stay until a success).
    let e = assert_unchanged(&mut s, |s| s.consume_join_token("h2", 50));
    assert!(
        matches!(
            e,
            Error::JoinToken {
                problem: JoinTokenProblem::Expired { at_ms: 50 },
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.to_string(), "join token h2: expired at 50 ms");
    let e = assert_unchanged(&mut s, |s| s.consume_join_token("nope", 0));
    assert!(
        matches!(
            e,
            Error::JoinToken {
                problem: JoinTokenProblem::Unknown,
                ..
            }
        ),
        "{e}"
    );

    // Success deletes the token and every expired one.
    s.consume_join_token("h1", 60).unwrap();
    assert_eq!(
        s.join_tokens().into_iter().collect::<Vec<_>>(),
        vec![("h3".to_owned(), 500)]
    );
    let e = s.consume_join_token("h1", 60).unwrap_err();
    assert!(
        matches!(
            e,
            Error::JoinToken {
                problem: JoinTokenProblem::Unknown,
                ..
            }
        ),
        "{e}"
    );

    assert_eq!(s.drop_expired_join_tokens(499).unwrap(), 0);
    assert_eq!(s.drop_expired_join_tokens(500).unwrap(), 1);
    assert!(s.join_tokens().is_empty());
}

fn populated() -> ClusterState {
    let mut s = cluster();
    s.add_machine(new_machine(1, "a"), 10).unwrap();
    s.add_machine(new_machine(2, "b"), 11).unwrap();
    s.put_service(sid(1), "web", serde_json::json!({"image": "nginx"}), 12)
        .unwrap();
    s.put_container(container(1, 1, 2, Some(Ipv4Addr::new(10, 210, 2, 9)), 13))
        .unwrap();
    s.add_join_token("abc", 99).unwrap();
    s.remove_machine(&mid(1)).unwrap();
    s
}

#[test]
fn save_and_load_round_trip() {
    let mut s = populated();
    let bytes = s.save();
    let mut t = ClusterState::load(&bytes, [2; 16]).unwrap();
    assert_eq!(t.to_json(), s.to_json());
    assert_eq!(t.heads_digest(), s.heads_digest());
    assert_eq!(t.cluster_id(), "c1");
    assert_eq!(t.network(), net());
    // Nothing new since the load.
    assert!(t.save_incremental().is_empty());
    let json = t.to_json();
    assert_eq!(json["machines"][mid(1).as_str()]["state"], "removed");
    assert_eq!(json["services"][sid(1).as_str()]["spec"]["image"], "nginx");
    assert_eq!(json["containers"][cid(1).as_str()]["address"], "10.210.2.9");
    assert_eq!(json["join_tokens"]["abc"], 99);
}

#[test]
fn load_rejects_garbage() {
    let mut s = populated();
    let bytes = s.save();
    for bad in [
        &b""[..],
        b"hello",
        &bytes[..bytes.len() / 2],
        &bytes[..bytes.len() - 1],
    ] {
        let e = ClusterState::load(bad, [2; 16]).unwrap_err();
        assert!(matches!(e, Error::Load { .. } | Error::Malformed(_)), "{e}");
    }
    let mut flipped = bytes.clone();
    let mid_byte = flipped.len() / 2;
    flipped[mid_byte] ^= 0x55;
    assert!(ClusterState::load(&flipped, [2; 16]).is_err());
    // A valid automerge document that is not a cluster state.
    let mut other = automerge::AutoCommit::new();
    automerge::transaction::Transactable::put(&mut other, automerge::ROOT, "x", 1).unwrap();
    let e = ClusterState::load(&other.save(), [2; 16]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cluster state document is malformed: missing cluster"
    );
}

#[test]
fn save_incremental_round_trip() {
    let mut a = cluster();
    let mut b = replica(&mut a, 2);
    assert!(a.save_incremental().is_empty() || b.save_incremental().is_empty());
    a.save_incremental();
    a.add_machine(new_machine(1, "a"), 10).unwrap();
    let inc1 = a.save_incremental();
    assert!(!inc1.is_empty());
    a.put_service(sid(1), "web", serde_json::json!({"v": 1}), 11)
        .unwrap();
    let inc2 = a.save_incremental();
    assert!(a.save_incremental().is_empty());
    // Out of order: the second change waits for the first.
    b.load_incremental(&inc2).unwrap();
    b.load_incremental(&inc1).unwrap();
    assert_eq!(b.to_json(), a.to_json());
    assert_eq!(b.heads_digest(), a.heads_digest());
    // Changes received from elsewhere are part of the next incremental save.
    let inc_b = b.save_incremental();
    let mut c = replica(&mut a, 3);
    c.load_incremental(&inc_b).unwrap();
    assert_eq!(c.heads_digest(), a.heads_digest());
    // A full save followed by incrementals loads as one document.
    let mut d = cluster();
    let mut log = d.save();
    d.add_machine(new_machine(1, "a"), 10).unwrap();
    log.extend(d.save_incremental());
    assert_eq!(
        ClusterState::load(&log, [4; 16]).unwrap().to_json(),
        d.to_json()
    );
    // Corrupt or truncated input: an error, and nothing applied.
    a.add_machine(new_machine(2, "b"), 12).unwrap();
    a.add_machine(new_machine(3, "c"), 13).unwrap();
    let inc = a.save_incremental();
    let mut corrupt = vec![
        b"\x85\x6f\x4a\x83garbage".to_vec(),
        inc[..inc.len() - 1].to_vec(),
        inc[..inc.len() / 2 + 3].to_vec(),
    ];
    for i in [0, 5, 9, inc.len() / 3, inc.len() - 1] {
        let mut m = inc.clone();
        m[i] ^= 0x10;
        corrupt.push(m);
    }
    for bad in corrupt {
        let e = assert_unchanged(&mut b, |b| b.load_incremental(&bad));
        assert!(matches!(e, Error::Load { .. }), "{e}");
    }
    b.load_incremental(&inc).unwrap();
    assert_eq!(b.to_json(), a.to_json());
}

#[test]
fn sync_two_replicas() {
    let mut a = cluster();
    let mut b = replica(&mut a, 2);
    a.add_machine(new_machine(1, "a"), 10).unwrap();
    b.put_service(sid(1), "web", serde_json::json!({}), 10)
        .unwrap();
    assert_ne!(a.heads_digest(), b.heads_digest());
    assert!(sync(&mut a, &mut b) > 0);
    assert_eq!(a.heads_digest(), b.heads_digest());
    assert_eq!(a.to_json(), b.to_json());
    assert_eq!(a.machines().len(), 1);
    assert_eq!(a.services().len(), 1);
    // In sync: a fresh session ends after the first exchange.
    assert!(sync(&mut a, &mut b) <= 2);
}

#[test]
fn malformed_sync_message_is_an_error_and_changes_nothing() {
    let mut a = cluster();
    let mut b = replica(&mut a, 2);
    b.add_machine(new_machine(1, "a"), 10).unwrap();
    let good = b.generate_sync_message(&mut PeerSync::new()).unwrap();
    let mut bad = vec![
        vec![],
        b"not a sync message".to_vec(),
        good[..good.len() / 2].to_vec(),
        good[..1].to_vec(),
        vec![0x42, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    ];
    let mut flipped = good.clone();
    flipped[0] = 0x99;
    bad.push(flipped);
    for msg in bad {
        let e = assert_unchanged(&mut a, |a| {
            a.receive_sync_message(&mut PeerSync::new(), &msg)
        });
        assert!(matches!(e, Error::Sync { .. }), "{e}");
        assert!(e.to_string().starts_with("sync message ("), "{e}");
    }
    // Any other corruption: never a panic; an error changes nothing.
    for i in 0..good.len() {
        let mut m = good.clone();
        m[i] ^= 0xa5;
        let before = a.heads_digest();
        if a.receive_sync_message(&mut PeerSync::new(), &m).is_err() {
            assert_eq!(a.heads_digest(), before);
        }
    }
    // The good message still applies.
    let mut peer = PeerSync::new();
    a.receive_sync_message(&mut peer, &good).unwrap();
}

#[test]
fn concurrent_edits_to_different_fields_of_one_machine_survive() {
    let mut a = cluster();
    a.add_machine(new_machine(1, "m"), 10).unwrap();
    let mut b = replica(&mut a, 2);
    let mut c = replica(&mut a, 3);
    a.set_machine_endpoints(&mid(1), vec!["203.0.113.1:51000".into()])
        .unwrap();
    b.set_machine_tag(&mid(1), "gpu", true).unwrap();
    c.set_machine_tag(&mid(1), "ssd", true).unwrap();
    c.rename_machine(&mid(1), "renamed").unwrap();
    a.merge(&mut b).unwrap();
    a.merge(&mut c).unwrap();
    let m = a.machine(&mid(1)).unwrap();
    assert_eq!(m.endpoints, vec!["203.0.113.1:51000"]);
    assert_eq!(
        m.tags,
        BTreeSet::from(["gpu".into(), "linux".into(), "ssd".into()])
    );
    assert_eq!(m.name, "renamed");
    assert!(a.resolve_conflicts().is_empty());
}

#[test]
fn concurrent_tag_add_and_remove_add_wins() {
    let mut a = cluster();
    a.add_machine(new_machine(1, "m"), 10).unwrap();
    let mut b = replica(&mut a, 2);
    a.set_machine_tag(&mid(1), "linux", false).unwrap();
    b.set_machine_tag(&mid(1), "linux", false).unwrap();
    b.set_machine_tag(&mid(1), "linux", true).unwrap();
    a.merge(&mut b).unwrap();
    assert!(a.machine(&mid(1)).unwrap().tags.contains("linux"));
}

#[test]
fn concurrent_remove_service_wins_over_update() {
    let mut a = cluster();
    a.put_service(sid(1), "web", serde_json::json!(1), 10)
        .unwrap();
    let mut b = replica(&mut a, 2);
    a.remove_service(&sid(1)).unwrap();
    b.put_service(sid(1), "web", serde_json::json!(2), 10)
        .unwrap();
    a.merge(&mut b).unwrap();
    b.merge(&mut a).unwrap();
    assert_eq!(a.service(&sid(1)), None);
    assert_eq!(a.to_json(), b.to_json());
}

#[test]
fn concurrent_joins_conflict_and_resolve_the_same_way_everywhere() {
    let mut a = cluster();
    let mut b = replica(&mut a, 2);
    a.put_service(sid(1), "web", serde_json::json!({}), 1)
        .unwrap();
    // Both take 10.210.1.0/24 and the name "pi"; b's machine is younger.
    a.add_machine(new_machine(1, "pi"), 100).unwrap();
    b.add_machine(new_machine(2, "pi"), 200).unwrap();
    b.put_service(sid(2), "web", serde_json::json!({}), 202)
        .unwrap();
    b.put_container(container(1, 2, 2, Some(Ipv4Addr::new(10, 210, 1, 7)), 201))
        .unwrap();
    a.merge(&mut b).unwrap();
    b.merge(&mut a).unwrap();

    // The loser probes for a free /24 from a hash of its id.
    let mut used = std::collections::BTreeSet::new();
    used.insert(sn("10.210.1.0/24"));
    let moved_to = crate::resolve::probed_free_subnet(net(), &used, mid(2).as_str()).unwrap();
    let host7 = moved_to.host(7).unwrap();
    let fixes_a = a.resolve_conflicts();
    let fixes_b = b.resolve_conflicts();
    assert_eq!(fixes_a, fixes_b);
    let renamed = format!("pi-{}", &mid(2).as_str()[..6]);
    assert_eq!(
        fixes_a,
        vec![
            Fix::MachineMoved {
                machine: mid(2),
                from: sn("10.210.1.0/24"),
                to: moved_to
            },
            Fix::MachineRenamed {
                machine: mid(2),
                from: "pi".into(),
                to: renamed.clone()
            },
            Fix::ServiceRenamed {
                service: sid(2),
                from: "web".into(),
                to: format!("web-{}", &sid(2).as_str()[..6])
            },
            Fix::ContainerReaddressed {
                container: cid(1),
                from: Ipv4Addr::new(10, 210, 1, 7),
                to: host7
            },
        ]
    );
    // Identical concurrent fixes converge to the same document.
    a.merge(&mut b).unwrap();
    b.merge(&mut a).unwrap();
    assert_eq!(a.to_json(), b.to_json());
    assert_eq!(a.heads_digest(), b.heads_digest());
    assert!(a.resolve_conflicts().is_empty());
    assert_eq!(a.machine_by_name("pi").unwrap().id, mid(1));
    assert_eq!(a.machine_by_name(&renamed).unwrap().subnet, moved_to);
}

#[test]
fn containers_of_a_concurrently_removed_machine_or_service_go() {
    let mut a = cluster();
    a.add_machine(new_machine(1, "a"), 1).unwrap();
    a.put_service(sid(1), "web", serde_json::json!({}), 1)
        .unwrap();
    a.put_service(sid(2), "db", serde_json::json!({}), 1)
        .unwrap();
    let mut b = replica(&mut a, 2);
    a.remove_machine(&mid(1)).unwrap();
    a.remove_service(&sid(2)).unwrap();
    b.put_container(container(1, 1, 1, None, 5)).unwrap();
    b.put_container(container(2, 2, 1, None, 5)).unwrap();
    a.merge(&mut b).unwrap();
    assert_eq!(a.containers().len(), 2);
    let fixes = a.resolve_conflicts();
    assert_eq!(
        fixes,
        vec![
            Fix::ContainerRemoved { container: cid(1) },
            Fix::ContainerRemoved { container: cid(2) }
        ]
    );
    assert!(a.containers().is_empty());
}

#[test]
fn concurrent_duplicate_container_addresses_are_separated() {
    let mut a = cluster();
    a.add_machine(new_machine(1, "a"), 1).unwrap();
    a.put_service(sid(1), "web", serde_json::json!({}), 1)
        .unwrap();
    let mut b = replica(&mut a, 2);
    let ip = |h| Some(Ipv4Addr::new(10, 210, 1, h));
    a.put_container(container(1, 1, 1, ip(1), 5)).unwrap();
    b.put_container(container(2, 1, 1, ip(1), 6)).unwrap();
    b.put_container(container(3, 1, 1, ip(2), 7)).unwrap();
    a.merge(&mut b).unwrap();
    let fixes = a.resolve_conflicts();
    assert_eq!(
        fixes,
        vec![Fix::ContainerReaddressed {
            container: cid(2),
            from: ip(1).unwrap(),
            to: ip(3).unwrap()
        }]
    );
}

#[test]
fn heads_digest_is_stable_and_follows_content() {
    let mut a = cluster();
    let mut b = replica(&mut a, 2);
    assert_eq!(a.heads_digest(), b.heads_digest());
    b.add_join_token("t", 1).unwrap();
    assert_ne!(a.heads_digest(), b.heads_digest());
    a.merge(&mut b).unwrap();
    assert_eq!(a.heads_digest(), b.heads_digest());
}
