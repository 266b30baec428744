//! The smallest set of peer changes from the interface as it is to the
//! interface as planned. Peers that did not change are never touched, so
//! adding or removing one machine leaves every other tunnel's session alone.
//!
//! A changed peer is removed and added again: boringtun 0.7 cannot modify
//! a peer in place (it panics when asked to), so that is the one way a
//! change reaches it. Only that peer's session restarts.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::addr::AllowedIp;
use crate::keys::PublicKey;

/// One peer as configured on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub allowed_ips: Vec<AllowedIp>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: u16,
}

/// One change to the device's peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerOp {
    Remove(PublicKey),
    Add(PublicKey, PeerConfig),
}

/// The changes that turn `current` into `desired`: removals first, then
/// additions, each in key order.
pub fn diff(
    current: &BTreeMap<PublicKey, PeerConfig>,
    desired: &BTreeMap<PublicKey, PeerConfig>,
) -> Vec<PeerOp> {
    let mut removes = Vec::new();
    let mut adds = Vec::new();
    for (k, c) in current {
        match desired.get(k) {
            None => removes.push(PeerOp::Remove(*k)),
            Some(d) if d != c => {
                removes.push(PeerOp::Remove(*k));
                adds.push(PeerOp::Add(*k, d.clone()));
            }
            Some(_) => {}
        }
    }
    for (k, d) in desired {
        if !current.contains_key(k) {
            adds.push(PeerOp::Add(*k, d.clone()));
        }
    }
    removes.extend(adds);
    removes
}

/// Applies `ops` to a map of peers, as a device would.
pub fn apply_to(peers: &mut BTreeMap<PublicKey, PeerConfig>, ops: &[PeerOp]) {
    for op in ops {
        match op {
            PeerOp::Remove(k) => {
                peers.remove(k);
            }
            PeerOp::Add(k, c) => {
                peers.insert(*k, c.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use proptest::prelude::*;

    fn key(n: u8) -> PublicKey {
        PrivateKey::from_bytes([n; 32]).public_key()
    }

    fn cfg(x: u8, ep: u8) -> PeerConfig {
        PeerConfig {
            allowed_ips: vec![format!("10.210.{x}.0/24").parse().unwrap()],
            endpoint: Some(SocketAddr::from(([172, 31, 0, ep], 51820))),
            keepalive: 25,
        }
    }

    #[test]
    fn adding_one_machine_touches_only_it() {
        let current: BTreeMap<_, _> = [(key(1), cfg(1, 1)), (key(2), cfg(2, 2))].into();
        let mut desired = current.clone();
        desired.insert(key(3), cfg(3, 3));
        assert_eq!(
            diff(&current, &desired),
            vec![PeerOp::Add(key(3), cfg(3, 3))]
        );
        let mut less = current.clone();
        less.remove(&key(1));
        assert_eq!(diff(&current, &less), vec![PeerOp::Remove(key(1))]);
        let mut moved = current.clone();
        moved.insert(key(2), cfg(2, 9));
        assert_eq!(
            diff(&current, &moved),
            vec![PeerOp::Remove(key(2)), PeerOp::Add(key(2), cfg(2, 9))]
        );
        assert!(diff(&current, &current).is_empty());
    }

    proptest! {
        /// Applying the diff gives the desired peers; peers equal on both
        /// sides are never named in it.
        #[test]
        fn diff_reaches_desired_and_spares_the_rest(
            a in proptest::collection::btree_map(0u8..10, (0u8..3, 0u8..3), 0..8),
            b in proptest::collection::btree_map(0u8..10, (0u8..3, 0u8..3), 0..8),
        ) {
            let to = |m: &BTreeMap<u8, (u8, u8)>| -> BTreeMap<PublicKey, PeerConfig> {
                m.iter().map(|(k, (x, e))| (key(*k), cfg(*x, *e))).collect()
            };
            let (cur, des) = (to(&a), to(&b));
            let ops = diff(&cur, &des);
            let mut got = cur.clone();
            apply_to(&mut got, &ops);
            prop_assert_eq!(&got, &des);
            for op in &ops {
                let k = match op { PeerOp::Remove(k) | PeerOp::Add(k, _) => k };
                prop_assert!(cur.get(k) != des.get(k));
            }
        }
    }
}
