//! Helpers shared by the integration tests: ids, operations on a replica,
//! and the invariants every resolved document must satisfy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use uc_crdt::ClusterState;
use uc_proto::{ContainerId, MachineId, ServiceId, Subnet};

pub fn network() -> Subnet {
    "10.210.0.0/16".parse().unwrap()
}

/// Distinct, random-looking ids (like the agent's random ones), so that
/// their first hex digits differ.
fn bytes(kind: u8, n: u64) -> [u8; 16] {
    let mut z = (n << 8 | u64::from(kind)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&z.to_be_bytes());
    b[8..].copy_from_slice(&n.to_be_bytes());
    b[15] ^= kind;
    b
}

pub fn mid(n: u64) -> MachineId {
    MachineId::from_bytes(bytes(1, n))
}

pub fn sid(n: u64) -> ServiceId {
    ServiceId::from_bytes(bytes(2, n))
}

pub fn cid(n: u64) -> ContainerId {
    ContainerId::from_bytes(bytes(3, n))
}

/// Checks the invariants the conflict rules guarantee on a resolved document.
pub fn assert_invariants(s: &ClusterState) {
    let machines = s.machines();
    let active: Vec<_> = machines.iter().filter(|m| m.is_active()).collect();
    let mut subnets = BTreeSet::new();
    let mut names = BTreeSet::new();
    for m in &active {
        assert!(
            subnets.insert(m.subnet),
            "two active machines in {}",
            m.subnet
        );
        assert!(
            names.insert(m.name.clone()),
            "two active machines named {}",
            m.name
        );
        assert!(s.network().contains(m.subnet.addr()));
    }
    let mut service_names = BTreeSet::new();
    let services: BTreeSet<ServiceId> = s
        .services()
        .into_iter()
        .map(|sv| {
            assert!(
                service_names.insert(sv.name.clone()),
                "two services named {}",
                sv.name
            );
            sv.id
        })
        .collect();
    let subnet_of: BTreeMap<MachineId, Subnet> =
        active.iter().map(|m| (m.id.clone(), m.subnet)).collect();
    let mut addresses: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for c in s.containers() {
        assert!(
            services.contains(&c.service),
            "container {} of a missing service",
            c.id
        );
        let subnet = subnet_of
            .get(&c.machine)
            .unwrap_or_else(|| panic!("container {} on an inactive machine", c.id));
        if let Some(a) = c.address {
            assert!(
                subnet.contains(a),
                "container {} address {a} outside {subnet}",
                c.id
            );
            assert!(addresses.insert(a), "two containers at {a}");
        }
    }
}
