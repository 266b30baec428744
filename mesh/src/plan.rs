//! The planner: cluster state in, this machine's desired WireGuard
//! interface out. Pure and deterministic: every machine computes the same
//! peer set from the same state (up to leaving itself out).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use uc_proto::Subnet;

use crate::addr::{AllowedIp, MeshAddressing, ULA_PREFIX};
use crate::keys::PublicKey;

/// What the planner needs to know of one machine of the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshMachine {
    pub id: String,
    pub name: String,
    /// None when the machine has published no valid key yet.
    pub public_key: Option<PublicKey>,
    /// Where its WireGuard listens, in the order to try them.
    pub endpoints: Vec<SocketAddr>,
    pub subnet: Subnet,
    /// Removed machines are not peers.
    pub active: bool,
    /// A removed machine still being told of its removal: a peer for its management address
    /// only, so its /24 and /64 are free at once for a machine that takes them.
    pub leaving: bool,
    pub created_at_ms: u64,
}

/// One peer of the planned interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPeer {
    pub machine_id: String,
    pub name: String,
    pub allowed_ips: Vec<AllowedIp>,
    pub endpoints: Vec<SocketAddr>,
    pub keepalive: u16,
}

/// The interface this machine should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// This machine's mesh address (10.210.X.1), with the cluster network's
    /// prefix so the whole network routes into the interface.
    pub v4: Ipv4Addr,
    pub v4_prefix: u8,
    /// This machine's IPv6 mesh address (`<ula>:X::1`), with the cluster's /48.
    pub v6: Ipv6Addr,
    pub v6_prefix: u8,
    /// This machine's management address (a /128, see
    /// [`MeshAddressing::management`]).
    pub management: Ipv6Addr,
    pub peers: BTreeMap<PublicKey, PlannedPeer>,
}

impl Plan {
    /// The addresses the interface carries: the IPv4 and IPv6 mesh
    /// addresses (with the prefixes that route the whole mesh into it) and
    /// the management /128.
    pub fn addresses(&self) -> Vec<(IpAddr, u8)> {
        vec![
            (IpAddr::V4(self.v4), self.v4_prefix),
            (IpAddr::V6(self.v6), self.v6_prefix),
            (IpAddr::V6(self.management), 128),
        ]
    }
}

/// Why there is no plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("machine {0} is not in the cluster state")]
    NotInState(String),
    #[error("machine {0} has been removed from the cluster")]
    Removed(String),
    #[error("subnet {subnet} of machine {machine} is not a /24 of the cluster network {network}")]
    BadSubnet {
        machine: String,
        subnet: Subnet,
        network: Subnet,
    },
}

/// Plans the interface of machine `self_id`.
///
/// Rules, applied in the order of the machines' age (older first, then id),
/// so that every machine resolves a transient conflict the same way: a
/// machine is a peer when it is active, not this machine, and has a valid
/// public key that is not this machine's and not an older machine's; its
/// AllowedIPs are its /24, its /64 and its management /128, less anything
/// that overlaps this
/// machine's own or an older peer's (the state's conflict rules move the
/// younger machine soon after; until then no two peers share an address).
pub fn plan(
    addressing: &MeshAddressing,
    machines: &[MeshMachine],
    self_id: &str,
    self_key: &PublicKey,
    keepalive: u16,
) -> Result<Plan, PlanError> {
    let me = machines
        .iter()
        .find(|m| m.id == self_id)
        .ok_or_else(|| PlanError::NotInState(self_id.to_string()))?;
    if !me.active {
        return Err(PlanError::Removed(self_id.to_string()));
    }
    let bad = || PlanError::BadSubnet {
        machine: me.name.clone(),
        subnet: me.subnet,
        network: addressing.network,
    };
    let v4 = addressing.machine_v4(me.subnet).ok_or_else(bad)?;
    let v6_net = addressing.machine_v6_net(me.subnet).ok_or_else(bad)?;
    let IpAddr::V6(v6_base) = v6_net.addr else {
        return Err(bad());
    };
    let v6 = Ipv6Addr::from(u128::from(v6_base) | 1);

    let management = addressing.management(self_id);
    let mgmt = |ip| AllowedIp {
        addr: IpAddr::V6(ip),
        prefix: 128,
    };
    let mut taken: Vec<AllowedIp> = vec![AllowedIp::v4(me.subnet), v6_net, mgmt(management)];
    let mut ordered: Vec<&MeshMachine> = machines.iter().collect();
    ordered.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    let mut peers = BTreeMap::new();
    for m in ordered {
        if m.id == self_id || !(m.active || m.leaving) {
            continue;
        }
        let Some(key) = m.public_key else { continue };
        if key == *self_key || peers.contains_key(&key) {
            continue;
        }
        let mut allowed = Vec::new();
        if m.active && addressing.index(m.subnet).is_some() {
            allowed.push(AllowedIp::v4(m.subnet));
            allowed.extend(addressing.machine_v6_net(m.subnet));
        }
        allowed.push(mgmt(addressing.management(&m.id)));
        allowed.retain(|a| !taken.iter().any(|t| t.overlaps(a)));
        taken.extend(allowed.iter().copied());
        peers.insert(
            key,
            PlannedPeer {
                machine_id: m.id.clone(),
                name: m.name.clone(),
                allowed_ips: allowed,
                endpoints: m.endpoints.clone(),
                keepalive,
            },
        );
    }
    Ok(Plan {
        v4,
        v4_prefix: addressing.network.prefix(),
        v6,
        v6_prefix: ULA_PREFIX,
        management,
        peers,
    })
}

/// Parses an endpoint as the state holds it: `IP:PORT`, `[IPv6]:PORT`, or
/// a bare IP (then `default_port`). Host names are not resolved here.
pub fn parse_endpoint(s: &str, default_port: u16) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    s.trim_matches(['[', ']'])
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, default_port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use proptest::prelude::*;

    fn key(n: u8) -> PublicKey {
        PrivateKey::from_bytes([n; 32]).public_key()
    }

    fn machine(n: u8, subnet_x: u8, created: u64) -> MeshMachine {
        MeshMachine {
            id: format!("m{n:02}"),
            name: format!("name{n}"),
            public_key: Some(key(n)),
            endpoints: vec![SocketAddr::from(([172, 31, 0, n], 51820))],
            subnet: format!("10.210.{subnet_x}.0/24").parse().unwrap(),
            active: true,
            leaving: false,
            created_at_ms: created,
        }
    }

    #[test]
    fn a_leaving_machine_keeps_only_its_management_address() {
        let a = addressing();
        // m2 was removed and is being told so; m3 joined since and took its /24.
        let mut old = machine(2, 2, 10);
        old.active = false;
        old.leaving = true;
        let ms = vec![machine(1, 1, 1), old.clone(), machine(3, 2, 20)];
        let p = plan(&a, &ms, "m01", &key(1), 25).unwrap();
        let leaving = &p.peers[&key(2)];
        assert_eq!(leaving.allowed_ips.len(), 1);
        assert_eq!(leaving.allowed_ips[0].addr, IpAddr::V6(a.management("m02")));
        let new = &p.peers[&key(3)];
        assert!(
            new.allowed_ips
                .contains(&AllowedIp::v4("10.210.2.0/24".parse().unwrap()))
        );
        assert_eq!(new.allowed_ips.len(), 3);
        // Once it is gone for good, it is no peer at all.
        old.leaving = false;
        let p = plan(&a, &[machine(1, 1, 1), old], "m01", &key(1), 25).unwrap();
        assert!(p.peers.is_empty());
    }

    fn addressing() -> MeshAddressing {
        MeshAddressing::new("cluster", "10.210.0.0/16".parse().unwrap())
    }

    #[test]
    fn three_machines() {
        let ms = vec![machine(1, 1, 1), machine(2, 2, 2), machine(3, 3, 3)];
        let p = plan(&addressing(), &ms, "m01", &key(1), 25).unwrap();
        assert_eq!(p.v4, Ipv4Addr::new(10, 210, 1, 1));
        assert_eq!(p.v4_prefix, 16);
        assert_eq!(p.v6.segments()[3], 1);
        assert_eq!(p.v6.segments()[7], 1);
        assert_eq!(p.peers.len(), 2);
        let b = &p.peers[&key(2)];
        assert_eq!(b.machine_id, "m02");
        assert_eq!(b.allowed_ips[0].to_string(), "10.210.2.0/24");
        assert_eq!(b.allowed_ips[1].prefix, 64);
        assert_eq!(b.allowed_ips[2].prefix, 128);
        assert_eq!(b.allowed_ips.len(), 3);
        assert_eq!(b.endpoints[0].to_string(), "172.31.0.2:51820");
    }

    #[test]
    fn removed_keyless_and_duplicate_machines_are_not_peers() {
        let mut removed = machine(2, 2, 2);
        removed.active = false;
        let mut keyless = machine(3, 3, 3);
        keyless.public_key = None;
        let mut same_key_as_older = machine(5, 5, 9);
        same_key_as_older.public_key = Some(key(4));
        // A younger machine on the same /24 as an older one: a peer with no
        // AllowedIPs until the state moves it.
        let clash = machine(6, 4, 10);
        let ms = vec![
            machine(1, 1, 1),
            removed,
            keyless,
            machine(4, 4, 4),
            same_key_as_older,
            clash,
        ];
        let p = plan(&addressing(), &ms, "m01", &key(1), 25).unwrap();
        let ids: Vec<&str> = p.peers.values().map(|x| x.machine_id.as_str()).collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&"m04") && ids.contains(&"m06"));
        assert_eq!(p.peers[&key(4)].allowed_ips.len(), 3);
        // Only its management address is its own.
        assert_eq!(p.peers[&key(6)].allowed_ips.len(), 1);
        assert_eq!(p.peers[&key(6)].allowed_ips[0].prefix, 128);
        assert_eq!(
            plan(&addressing(), &ms, "zz", &key(1), 25),
            Err(PlanError::NotInState("zz".into()))
        );
        assert!(matches!(
            plan(&addressing(), &ms, "m02", &key(2), 25),
            Err(PlanError::Removed(_))
        ));
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            parse_endpoint("1.2.3.4", 51820),
            Some("1.2.3.4:51820".parse().unwrap())
        );
        assert_eq!(
            parse_endpoint("1.2.3.4:7", 51820),
            Some("1.2.3.4:7".parse().unwrap())
        );
        assert_eq!(
            parse_endpoint("fd00::1", 51820),
            Some("[fd00::1]:51820".parse().unwrap())
        );
        assert_eq!(parse_endpoint("pi.lan", 51820), None);
    }

    fn arb_machines() -> impl Strategy<Value = Vec<MeshMachine>> {
        proptest::collection::vec((0u8..12, 1u8..6, 0u64..5, any::<bool>(), 0u8..4), 1..12)
            .prop_map(|specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (k, x, created, active, ep))| MeshMachine {
                        id: format!("m{i:02}"),
                        name: format!("n{i}"),
                        public_key: (k != 0).then(|| key(k)),
                        endpoints: (0..ep)
                            .map(|e| SocketAddr::from(([172, 31, e, i as u8], 51820)))
                            .collect(),
                        subnet: format!("10.210.{x}.0/24").parse().unwrap(),
                        active: active || i == 0,
                        leaving: false,
                        created_at_ms: created,
                    })
                    .collect()
            })
    }

    proptest! {
        /// No two peers share an address, no peer overlaps this machine's
        /// own, and the plan does not depend on the order of the state's
        /// machines.
        #[test]
        fn no_shared_allowed_ips_and_order_independent(ms in arb_machines(), seed in any::<u64>()) {
            let me = ms[0].clone();
            let my_key = me.public_key.unwrap_or(key(200));
            let a = addressing();
            let p = plan(&a, &ms, &me.id, &my_key, 25).unwrap();
            let all: Vec<AllowedIp> = p.peers.values().flat_map(|x| x.allowed_ips.clone()).collect();
            for (i, x) in all.iter().enumerate() {
                prop_assert!(!x.overlaps(&AllowedIp::v4(me.subnet)));
                prop_assert!(x.addr != IpAddr::V6(p.management));
                prop_assert!(!x.overlaps(&a.machine_v6_net(me.subnet).unwrap()));
                for y in &all[i + 1..] {
                    prop_assert!(!x.overlaps(y), "{x} and {y} overlap");
                }
            }
            prop_assert!(!p.peers.contains_key(&my_key));
            let mut shuffled = ms.clone();
            let n = shuffled.len();
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(plan(&a, &shuffled, &me.id, &my_key, 25).unwrap(), p);
        }

        /// In a state whose conflicts are settled (distinct keys and /24s),
        /// every machine plans the same peer for each other machine: same
        /// AllowedIPs, endpoints and keepalive.
        #[test]
        fn every_machine_agrees_on_each_peer(ms in arb_machines()) {
            let a = addressing();
            let mut keys = std::collections::BTreeSet::new();
            let mut subnets = std::collections::BTreeSet::new();
            let settled: Vec<MeshMachine> = ms
                .into_iter()
                .filter(|m| m.active && m.public_key.is_some())
                .filter(|m| keys.insert(m.public_key) && subnets.insert(m.subnet))
                .collect();
            let mut seen: BTreeMap<PublicKey, PlannedPeer> = BTreeMap::new();
            for m in &settled {
                let p = plan(&a, &settled, &m.id, &m.public_key.unwrap(), 25).unwrap();
                prop_assert_eq!(p.peers.len(), settled.len() - 1);
                for (k, peer) in p.peers {
                    prop_assert_eq!(peer.allowed_ips.len(), 3);
                    if let Some(prev) = seen.get(&k) {
                        prop_assert_eq!(prev, &peer);
                    } else {
                        seen.insert(k, peer);
                    }
                }
            }
        }
    }
}
