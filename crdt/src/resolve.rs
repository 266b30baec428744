//! The deterministic conflict rules, as a pure function from a snapshot of
//! the records to the fixes to make.
//!
//! Rules, in order; "priority" is the smaller (created_at_ms, id):
//! 1. Active machines sharing a subnet: the highest-priority one keeps it;
//!    the others, in priority order, move to a free /24 found by probing
//!    from a hash of their id (not the lowest free one: machines moved at
//!    the same time on both sides of a partition would all pick the same
//!    lowest /24 and collide again after the heal).
//! 2. Active machines sharing a name: the others are renamed
//!    `<name>-<first 6 hex digits of id>` (more digits if that name is in
//!    use too). Same for services.
//! 3. A container whose service is gone, or whose machine is removed or
//!    unknown, is removed (it was placed concurrently with the removal).
//! 4. A container whose address is outside its machine's subnet (its machine
//!    moved) gets the same host number inside the machine's subnet; then a
//!    container whose address is used by a higher-priority container moves
//!    to the lowest free host of its machine's subnet.
//!
//! Removed machines hold no subnet and no name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use uc_proto::{MachineId, ServiceId, Subnet};

use crate::model::{Container, Fix, Machine, Service};

/// Machine subnets are /24s.
pub(crate) const MACHINE_PREFIX: u8 = 24;

/// How many machines `network` holds: its /24s but the first and the last
/// (254 for a /16; none for a network smaller than a /23).
pub fn machine_slots(network: Subnet) -> u32 {
    MACHINE_PREFIX
        .checked_sub(network.prefix())
        .and_then(|bits| 1u32.checked_shl(u32::from(bits)))
        .map_or(0, |count| count.saturating_sub(2))
}

/// The lowest /24 of `network` not in `used`, skipping the first and the
/// last /24 of the network (for a /16: indices 1..=254).
pub(crate) fn lowest_free_subnet(network: Subnet, used: &BTreeSet<Subnet>) -> Option<Subnet> {
    (1..=machine_slots(network))
        .filter_map(|i| network.child(MACHINE_PREFIX, i))
        .find(|s| !used.contains(s))
}

/// The first /24 of `network` not in `used`, probing from a place derived
/// from `id` (FNV-1a), skipping the first and the last /24 of the network.
pub(crate) fn probed_free_subnet(
    network: Subnet,
    used: &BTreeSet<Subnet>,
    id: &str,
) -> Option<Subnet> {
    let usable = machine_slots(network);
    if usable == 0 {
        return None;
    }
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let start = (hash % u64::from(usable)) as u32;
    (0..usable)
        .map(|k| 1 + (start + k) % usable)
        .filter_map(|i| network.child(MACHINE_PREFIX, i))
        .find(|s| !used.contains(s))
}

/// `<name>-<first 6 hex digits of id>`, or more digits of the id while that
/// name is in `taken` (ids are unique, so the whole id always ends it), cut
/// to fit a DNS label's 63 characters.
pub(crate) fn suffixed_name(name: &str, id: &str, taken: &BTreeSet<String>) -> String {
    let mut candidate = String::new();
    for digits in (6..=id.len().max(6)).step_by(2) {
        let suffix: String = id.chars().take(digits).collect();
        let base: String = name
            .chars()
            .take(62usize.saturating_sub(suffix.len()))
            .collect();
        candidate = format!("{base}-{suffix}");
        if !taken.contains(&candidate) {
            break;
        }
    }
    candidate
}

/// One round of the rules over a snapshot. Applying the returned fixes in
/// order gives a state where no rule applies (a second round finds nothing),
/// unless the network is full.
pub(crate) fn plan(
    network: Subnet,
    machines: &[Machine],
    services: &[Service],
    containers: &[Container],
) -> Vec<Fix> {
    let mut fixes = Vec::new();

    let mut active: Vec<Machine> = machines.iter().filter(|m| m.is_active()).cloned().collect();
    active.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));

    // Rule 1: subnets.
    let mut used: BTreeSet<Subnet> = active.iter().map(|m| m.subnet).collect();
    let mut holders: BTreeSet<Subnet> = BTreeSet::new();
    for m in &mut active {
        if holders.insert(m.subnet) {
            continue;
        }
        if let Some(to) = probed_free_subnet(network, &used, m.id.as_str()) {
            used.insert(to);
            holders.insert(to);
            fixes.push(Fix::MachineMoved {
                machine: m.id.clone(),
                from: m.subnet,
                to,
            });
            m.subnet = to;
        }
        // else: the network is full; nothing deterministic to do but wait
        // for a machine to be removed.
    }

    // Rule 2: names. A new name avoids every name in use, so one round
    // settles all of them.
    let mut names: BTreeSet<String> = active.iter().map(|m| m.name.clone()).collect();
    let mut holders: BTreeSet<&str> = BTreeSet::new();
    for m in &active {
        if !holders.insert(&m.name) {
            let to = suffixed_name(&m.name, m.id.as_str(), &names);
            names.insert(to.clone());
            fixes.push(Fix::MachineRenamed {
                machine: m.id.clone(),
                from: m.name.clone(),
                to,
            });
        }
    }
    let mut services: Vec<&Service> = services.iter().collect();
    services.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    let mut names: BTreeSet<String> = services.iter().map(|s| s.name.clone()).collect();
    let mut holders: BTreeSet<&str> = BTreeSet::new();
    for s in &services {
        if !holders.insert(&s.name) {
            let to = suffixed_name(&s.name, s.id.as_str(), &names);
            names.insert(to.clone());
            fixes.push(Fix::ServiceRenamed {
                service: s.id.clone(),
                from: s.name.clone(),
                to,
            });
        }
    }

    // Rules 3 and 4: containers.
    let subnets: HashMap<&MachineId, Subnet> = active.iter().map(|m| (&m.id, m.subnet)).collect();
    let service_ids: BTreeSet<&ServiceId> = services.iter().map(|s| &s.id).collect();
    let mut containers: Vec<&Container> = containers.iter().collect();
    containers.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    let mut kept: Vec<(&Container, Subnet)> = Vec::new();
    for c in containers {
        match subnets.get(&c.machine) {
            Some(subnet) if service_ids.contains(&c.service) => kept.push((c, *subnet)),
            _ => fixes.push(Fix::ContainerRemoved {
                container: c.id.clone(),
            }),
        }
    }
    // Addresses of every kept container count as used before anyone moves,
    // so that a moved container never takes the address of one that stays.
    let mut taken: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for (c, _) in &kept {
        if let Some(a) = c.address {
            *taken.entry(a).or_default() += 1;
        }
    }
    let mut placed: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for (c, subnet) in kept {
        let Some(from) = c.address else { continue };
        let mut to = from;
        if !subnet.contains(to) {
            let host = u32::from(from) & 0xff;
            to = match subnet.host(host) {
                Some(a) if (1..=254).contains(&host) && !placed.contains(&a) => a,
                _ => from,
            };
        }
        if !subnet.contains(to) || placed.contains(&to) || (to != from && taken.contains_key(&to)) {
            let free = (1..=254)
                .filter_map(|h| subnet.host(h))
                .find(|a| !placed.contains(a) && !taken.contains_key(a));
            if let Some(a) = free {
                to = a;
            }
        }
        placed.insert(to);
        if to != from {
            if let Some(n) = taken.get_mut(&from) {
                *n -= 1;
                if *n == 0 {
                    taken.remove(&from);
                }
            }
            taken.insert(to, 1);
            fixes.push(Fix::ContainerReaddressed {
                container: c.id.clone(),
                from,
                to,
            });
        }
    }

    fixes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixed_names_avoid_names_in_use() {
        let id = "abcdef0123456789abcdef0123456789";
        let none = BTreeSet::new();
        assert_eq!(suffixed_name("pi", id, &none), "pi-abcdef");
        let taken = BTreeSet::from(["pi-abcdef".to_owned(), "pi-abcdef01".to_owned()]);
        assert_eq!(suffixed_name("pi", id, &taken), "pi-abcdef0123");
        let long = "x".repeat(63);
        let n = suffixed_name(&long, id, &none);
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("-abcdef"));
    }

    #[test]
    fn probed_free_subnets_spread_and_skip_used_first_and_last() {
        let net: Subnet = "10.210.0.0/16".parse().unwrap();
        let mut used = BTreeSet::new();
        let a = probed_free_subnet(net, &used, "aaaa").unwrap();
        let b = probed_free_subnet(net, &used, "bbbb").unwrap();
        assert_ne!(a, b, "different ids start probing at different places");
        assert_eq!(
            probed_free_subnet(net, &used, "aaaa"),
            Some(a),
            "deterministic"
        );
        used.insert(a);
        let a2 = probed_free_subnet(net, &used, "aaaa").unwrap();
        assert_ne!(a2, a);
        for i in 1..255 {
            used.insert(net.child(24, i).unwrap());
        }
        assert_eq!(probed_free_subnet(net, &used, "aaaa"), None, "full network");
        let first_and_last = [net.child(24, 0).unwrap(), net.child(24, 255).unwrap()];
        let mut none = BTreeSet::new();
        for id in ["x", "y", "z", "w", "v"] {
            let s = probed_free_subnet(net, &none, id).unwrap();
            assert!(!first_and_last.contains(&s));
            none.insert(s);
        }
    }

    #[test]
    fn lowest_free_subnet_skips_first_and_last() {
        let net: Subnet = "10.1.0.0/22".parse().unwrap();
        let mut used = BTreeSet::new();
        let a = lowest_free_subnet(net, &used).unwrap();
        assert_eq!(a.to_string(), "10.1.1.0/24");
        used.insert(a);
        let b = lowest_free_subnet(net, &used).unwrap();
        assert_eq!(b.to_string(), "10.1.2.0/24");
        used.insert(b);
        assert_eq!(lowest_free_subnet(net, &used), None);
        let tiny: Subnet = "10.1.0.0/25".parse().unwrap();
        assert_eq!(lowest_free_subnet(tiny, &BTreeSet::new()), None);
        let slots = |n: &str| machine_slots(n.parse().unwrap());
        assert_eq!(
            (
                slots("10.1.0.0/22"),
                slots("10.1.0.0/16"),
                slots("10.0.0.0/14")
            ),
            (2, 254, 1022)
        );
        assert_eq!((slots("10.1.0.0/24"), slots("10.1.0.0/25")), (0, 0));
    }
}
