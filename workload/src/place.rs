//! Placement, a pure core: which machines get a service's new containers,
//! and which address of each machine's /24 each one takes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use uc_crdt::Container;
use uc_proto::spec::{HostPort, RuntimeKind};
use uc_proto::{MachineId, ServiceId, Subnet};

/// A machine as placement sees it: from the document (id, name, subnet) and
/// from gossip (live, which runtimes work there, free memory).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: MachineId,
    pub name: String,
    pub subnet: Subnet,
    pub live: bool,
    /// Runtimes that work on it; `None` while gossip has not said.
    pub runtimes: Option<BTreeSet<RuntimeKind>>,
    /// Memory it has free, in bytes, if known.
    pub free_memory: Option<u64>,
}

/// Why a service cannot be placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlaceError {
    #[error("machine {name:?} not found; machines: {known}")]
    UnknownMachine { name: String, known: String },
    #[error("machine {name:?} is not reachable now (gossip says it is not live)")]
    NotLive { name: String },
    #[error("runtime {runtime} is not available on machine {name:?} (it has: {has})")]
    RuntimeUnavailable {
        name: String,
        runtime: RuntimeKind,
        has: String,
    },
    #[error("no live machine can run {runtime} containers; machines: {machines}")]
    NoMachine {
        runtime: RuntimeKind,
        machines: String,
    },
    #[error("machine {name:?} has {free} MiB of memory free; the service asks for {need} MiB")]
    NotEnoughMemory { name: String, free: u64, need: u64 },
    #[error("subnet {subnet} of machine {name:?} has no free address")]
    SubnetFull { name: String, subnet: Subnet },
    #[error("no machine can take another container publishing host port {ports}: {why}")]
    HostPorts { ports: String, why: String },
    #[error("machine {name:?} cannot publish host port {ports}: {why}")]
    HostPortTaken {
        name: String,
        ports: String,
        why: String,
    },
}

/// The host ports the containers on each machine hold, with their service's name.
pub type TakenPorts = BTreeMap<MachineId, Vec<(HostPort, String)>>;

/// The machines where a service publishing `wanted` cannot go, each with why: another
/// service's container there holds a clashing host port.
pub fn port_clashes(wanted: &[HostPort], taken: &TakenPorts) -> BTreeMap<MachineId, String> {
    let mut out = BTreeMap::new();
    for (machine, held) in taken {
        let clash = wanted
            .iter()
            .find_map(|w| held.iter().find(|(h, _)| w.clashes(h)));
        if let Some((h, service)) = clash {
            out.insert(
                machine.clone(),
                format!("service {service:?} publishes {h} there"),
            );
        }
    }
    out
}

/// The host ports of `wanted`, for messages: `8080/tcp, 53/udp`.
pub fn ports_text(wanted: &[HostPort]) -> String {
    wanted
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn has(c: &Candidate) -> String {
    match &c.runtimes {
        None => "unknown yet".into(),
        Some(r) if r.is_empty() => "none".into(),
        Some(r) => r.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "),
    }
}

/// The machines a service may use: the named ones (by name or id; each must
/// exist, be live and have the runtime) or, when none are named, every live
/// machine with the runtime. Sorted by name.
pub fn eligible<'a>(
    candidates: &'a [Candidate],
    named: &[String],
    runtime: RuntimeKind,
) -> Result<Vec<&'a Candidate>, PlaceError> {
    let runs = |c: &Candidate| c.runtimes.as_ref().is_some_and(|r| r.contains(&runtime));
    let mut out = Vec::new();
    if named.is_empty() {
        out.extend(candidates.iter().filter(|c| c.live && runs(c)));
        if out.is_empty() {
            return Err(PlaceError::NoMachine {
                runtime,
                machines: candidates
                    .iter()
                    .map(|c| {
                        format!(
                            "{} ({}, runtimes: {})",
                            c.name,
                            if c.live { "live" } else { "not live" },
                            has(c)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
    } else {
        for n in named {
            let c = candidates
                .iter()
                .find(|c| &c.name == n || c.id.as_str() == n)
                .ok_or_else(|| PlaceError::UnknownMachine {
                    name: n.clone(),
                    known: {
                        let mut names: Vec<_> =
                            candidates.iter().map(|c| c.name.as_str()).collect();
                        names.sort();
                        names.join(", ")
                    },
                })?;
            if !c.live {
                return Err(PlaceError::NotLive {
                    name: c.name.clone(),
                });
            }
            if !runs(c) {
                return Err(PlaceError::RuntimeUnavailable {
                    name: c.name.clone(),
                    runtime,
                    has: has(c),
                });
            }
            if !out.iter().any(|o: &&Candidate| o.id == c.id) {
                out.push(c);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The lowest free address of `subnet` for a container: `.2` up to the last
/// host (`.1` is the machine), skipping `used`.
pub fn free_address(subnet: Subnet, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let hosts = (1u32 << (32 - subnet.prefix())) - 2;
    (2..=hosts)
        .filter_map(|h| subnet.host(h))
        .find(|a| !used.contains(a))
}

/// Places `count` new containers of `service`: each goes to the eligible
/// machine with the fewest containers of this service, then the fewest
/// containers in all, then by name; each takes the lowest free address of
/// its machine's /24. `memory` (bytes per container) must fit in a machine's
/// free memory where that is known. A service that publishes host ports runs
/// at most one container per machine, and none on the `blocked` machines
/// (see [`port_clashes`]).
pub fn place(
    eligible: &[&Candidate],
    existing: &[Container],
    service: &ServiceId,
    count: usize,
    memory: Option<u64>,
    host_ports: &[HostPort],
    blocked: &BTreeMap<MachineId, String>,
) -> Result<Vec<(MachineId, Ipv4Addr)>, PlaceError> {
    let mut used: BTreeSet<Ipv4Addr> = existing.iter().filter_map(|c| c.address).collect();
    let mut of_service: BTreeMap<&MachineId, usize> = BTreeMap::new();
    let mut total: BTreeMap<&MachineId, usize> = BTreeMap::new();
    for c in existing {
        *total.entry(&c.machine).or_default() += 1;
        if &c.service == service {
            *of_service.entry(&c.machine).or_default() += 1;
        }
    }
    let mut reserved: BTreeMap<&MachineId, u64> = BTreeMap::new();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let fits =
            |c: &Candidate, reserved: &BTreeMap<&MachineId, u64>| match (memory, c.free_memory) {
                (Some(need), Some(free)) => {
                    free.saturating_sub(reserved.get(&c.id).copied().unwrap_or(0)) >= need
                }
                _ => true,
            };
        let ports_ok = |c: &Candidate, of_service: &BTreeMap<&MachineId, usize>| {
            !blocked.contains_key(&c.id)
                && (host_ports.is_empty() || of_service.get(&c.id).copied().unwrap_or(0) == 0)
        };
        if !eligible.iter().any(|c| ports_ok(c, &of_service)) {
            let why = eligible
                .iter()
                .map(|c| match blocked.get(&c.id) {
                    Some(b) => format!("{}: {b}", c.name),
                    None => format!("{} runs one of this service already", c.name),
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(PlaceError::HostPorts {
                ports: ports_text(host_ports),
                why,
            });
        }
        let best = eligible
            .iter()
            .filter(|c| ports_ok(c, &of_service) && fits(c, &reserved))
            .min_by_key(|c| {
                (
                    of_service.get(&c.id).copied().unwrap_or(0),
                    total.get(&c.id).copied().unwrap_or(0),
                    c.name.as_str(),
                )
            });
        let Some(best) = best else {
            let c = eligible
                .iter()
                .max_by_key(|c| c.free_memory.unwrap_or(u64::MAX))
                .expect("eligible is never empty");
            return Err(PlaceError::NotEnoughMemory {
                name: c.name.clone(),
                free: c
                    .free_memory
                    .unwrap_or(0)
                    .saturating_sub(reserved.get(&c.id).copied().unwrap_or(0))
                    >> 20,
                need: memory.unwrap_or(0) >> 20,
            });
        };
        let addr = free_address(best.subnet, &used).ok_or_else(|| PlaceError::SubnetFull {
            name: best.name.clone(),
            subnet: best.subnet,
        })?;
        used.insert(addr);
        *of_service.entry(&best.id).or_default() += 1;
        *total.entry(&best.id).or_default() += 1;
        *reserved.entry(&best.id).or_default() += memory.unwrap_or(0);
        out.push((best.id.clone(), addr));
    }
    Ok(out)
}

/// Which `count` of a service's containers a scale-down removes: first those on machines that
/// are not live, then one at a time from the machine with the most of them (so the rest stay
/// spread), the newest there first.
pub fn pick_to_remove(
    of_service: &[Container],
    live: &BTreeSet<MachineId>,
    count: usize,
) -> Vec<uc_proto::ContainerId> {
    let mut left: Vec<&Container> = of_service.iter().collect();
    let mut out = Vec::new();
    while out.len() < count && !left.is_empty() {
        let mut per_machine: BTreeMap<&MachineId, usize> = BTreeMap::new();
        for c in &left {
            *per_machine.entry(&c.machine).or_default() += 1;
        }
        let (i, _) = left
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| {
                (
                    !live.contains(&c.machine),
                    per_machine[&c.machine],
                    c.created_at_ms,
                    c.id.clone(),
                )
            })
            .expect("left is not empty");
        out.push(left.remove(i).id.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use uc_crdt::DesiredState;
    use uc_proto::ContainerId;

    #[test]
    fn host_ports_take_one_container_per_machine_and_avoid_clashes() {
        let all = [
            m(1, true, &[RuntimeKind::Nspawn]),
            m(2, true, &[RuntimeKind::Nspawn]),
            m(3, true, &[RuntimeKind::Nspawn]),
        ];
        let el = eligible(&all, &[], RuntimeKind::Nspawn).unwrap();
        let svc = ServiceId::from_bytes([9; 16]);
        let web = HostPort {
            ip: None,
            port: 8080,
            udp: false,
        };
        // m2 holds 8080/tcp on one address for another service: the wildcard clashes.
        let mut taken = TakenPorts::new();
        taken.insert(
            all[1].id.clone(),
            vec![(
                HostPort {
                    ip: Some("192.0.2.7".parse().unwrap()),
                    ..web
                },
                "other".to_string(),
            )],
        );
        // 8080/udp on m3 does not clash with 8080/tcp.
        taken.insert(
            all[2].id.clone(),
            vec![(HostPort { udp: true, ..web }, "dns".to_string())],
        );
        let blocked = port_clashes(&[web], &taken);
        assert_eq!(blocked.keys().collect::<Vec<_>>(), vec![&all[1].id]);
        assert!(blocked[&all[1].id].contains("\"other\" publishes 192.0.2.7:8080/tcp"));

        let p = place(&el, &[], &svc, 2, None, &[web], &blocked).unwrap();
        let machines: BTreeSet<_> = p.iter().map(|(m, _)| m.clone()).collect();
        assert_eq!(
            machines,
            BTreeSet::from([all[0].id.clone(), all[2].id.clone()])
        );

        let err = place(&el, &[], &svc, 3, None, &[web], &blocked).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("host port 8080/tcp"), "{text}");
        assert!(
            text.contains("m1 runs one of this service already"),
            "{text}"
        );
        assert!(
            text.contains("m2: service \"other\" publishes 192.0.2.7:8080/tcp there"),
            "{text}"
        );

        // Without host ports the same service may stack on a machine.
        assert_eq!(
            place(&el, &[], &svc, 5, None, &[], &BTreeMap::new())
                .unwrap()
                .len(),
            5
        );
    }

    fn m(i: u8, live: bool, rts: &[RuntimeKind]) -> Candidate {
        Candidate {
            id: MachineId::from_bytes([i; 16]),
            name: format!("m{i}"),
            subnet: format!("10.210.{i}.0/24").parse().unwrap(),
            live,
            runtimes: Some(rts.iter().copied().collect()),
            free_memory: None,
        }
    }

    fn container(i: u8, svc: &ServiceId, machine: &Candidate, host: u32) -> Container {
        Container {
            id: ContainerId::from_bytes([i; 16]),
            service: svc.clone(),
            machine: machine.id.clone(),
            address: machine.subnet.host(host),
            desired: DesiredState::Running,
            created_at_ms: u64::from(i),
        }
    }

    const N: RuntimeKind = RuntimeKind::Nspawn;

    #[test]
    fn spreads_over_live_machines_with_the_runtime() {
        let ms = [
            m(1, true, &[N]),
            m(2, true, &[N, RuntimeKind::Docker]),
            m(3, false, &[N]),
            m(4, true, &[RuntimeKind::Docker]),
        ];
        let el = eligible(&ms, &[], N).unwrap();
        assert_eq!(
            el.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["m1", "m2"]
        );
        let svc = ServiceId::from_bytes([9; 16]);
        let p = place(&el, &[], &svc, 3, None, &[], &BTreeMap::new()).unwrap();
        assert_eq!(p[0], (ms[0].id.clone(), "10.210.1.2".parse().unwrap()));
        assert_eq!(p[1], (ms[1].id.clone(), "10.210.2.2".parse().unwrap()));
        assert_eq!(p[2], (ms[0].id.clone(), "10.210.1.3".parse().unwrap()));
    }

    #[test]
    fn prefers_machines_with_fewer_of_the_service_and_skips_used_addresses() {
        let ms = [m(1, true, &[N]), m(2, true, &[N])];
        let svc = ServiceId::from_bytes([9; 16]);
        let other = ServiceId::from_bytes([8; 16]);
        let existing = [
            container(1, &svc, &ms[0], 2),
            container(2, &other, &ms[1], 2),
            container(3, &other, &ms[1], 3),
        ];
        let el = eligible(&ms, &[], N).unwrap();
        let p = place(&el, &existing, &svc, 1, None, &[], &BTreeMap::new()).unwrap();
        assert_eq!(p, [(ms[1].id.clone(), "10.210.2.4".parse().unwrap())]);
    }

    #[test]
    fn named_machines_are_checked() {
        let ms = [m(1, true, &[N]), m(2, false, &[N]), m(3, true, &[])];
        assert_eq!(
            eligible(&ms, &["pi".into()], N).unwrap_err(),
            PlaceError::UnknownMachine {
                name: "pi".into(),
                known: "m1, m2, m3".into()
            }
        );
        assert!(matches!(
            eligible(&ms, &["m2".into()], N).unwrap_err(),
            PlaceError::NotLive { .. }
        ));
        let e = eligible(&ms, &["m3".into()], N).unwrap_err();
        assert_eq!(
            e.to_string(),
            "runtime nspawn is not available on machine \"m3\" (it has: none)"
        );
        let by_id = eligible(&ms, &[ms[0].id.to_string(), "m1".into()], N).unwrap();
        assert_eq!(by_id.len(), 1);
        let none = eligible(&ms[1..], &[], N).unwrap_err();
        assert!(none.to_string().contains("m2 (not live"), "{none}");
    }

    #[test]
    fn memory_and_full_subnets() {
        let mut a = m(1, true, &[N]);
        a.free_memory = Some(300 << 20);
        let el = vec![&a];
        let svc = ServiceId::from_bytes([9; 16]);
        assert_eq!(
            place(&el, &[], &svc, 2, Some(128 << 20), &[], &BTreeMap::new())
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            place(&el, &[], &svc, 3, Some(128 << 20), &[], &BTreeMap::new()).unwrap_err(),
            PlaceError::NotEnoughMemory {
                name: "m1".into(),
                free: 44,
                need: 128
            }
        );
        let full: Vec<Container> = (2..=254)
            .map(|h| {
                let mut c = container(0, &svc, &a, h);
                c.id = ContainerId::from_bytes([h as u8; 16]);
                c
            })
            .collect();
        assert!(matches!(
            place(&el, &full, &svc, 1, None, &[], &BTreeMap::new()).unwrap_err(),
            PlaceError::SubnetFull { .. }
        ));
    }

    proptest::proptest! {
        #[test]
        fn placed_addresses_are_distinct_and_inside_their_machine(
            n_machines in 1u8..5, count in 0usize..40, pre in 0usize..20,
        ) {
            let ms: Vec<Candidate> = (1..=n_machines).map(|i| m(i, true, &[N])).collect();
            let svc = ServiceId::from_bytes([9; 16]);
            let existing: Vec<Container> = (0..pre)
                .map(|i| {
                    let mac = &ms[i % ms.len()];
                    let mut c = container(0, &svc, mac, 2 + (i as u32 * 7) % 200);
                    c.id = ContainerId::from_bytes([i as u8; 16]);
                    c
                })
                .collect();
            let el = eligible(&ms, &[], N).unwrap();
            let p = place(&el, &existing, &svc, count, None, &[], &BTreeMap::new()).unwrap();
            proptest::prop_assert_eq!(p.len(), count);
            let mut seen: BTreeSet<Ipv4Addr> = existing.iter().filter_map(|c| c.address).collect();
            for (mid, addr) in &p {
                let mac = ms.iter().find(|c| &c.id == mid).unwrap();
                proptest::prop_assert!(mac.subnet.contains(*addr));
                proptest::prop_assert!(seen.insert(*addr), "address {} used twice", addr);
            }
            // Spread: the service's containers per machine differ by at most one
            // when there were none before.
            if pre == 0 {
                let mut per: BTreeMap<&MachineId, usize> = BTreeMap::new();
                for (mid, _) in &p { *per.entry(mid).or_default() += 1; }
                let max = per.values().max().copied().unwrap_or(0);
                let min = if per.len() < ms.len() { 0 } else { per.values().min().copied().unwrap_or(0) };
                proptest::prop_assert!(max - min <= 1);
            }
        }
    }

    #[test]
    fn scale_down_takes_dead_machines_then_the_fullest_then_the_newest() {
        let svc = ServiceId::from_bytes([9; 16]);
        let (a, b, d) = (m(1, true, &[N]), m(2, true, &[N]), m(3, false, &[N]));
        let cs = vec![
            container(1, &svc, &a, 2),
            container(2, &svc, &a, 3),
            container(3, &svc, &a, 4),
            container(4, &svc, &b, 2),
            container(5, &svc, &d, 2),
        ];
        let live: BTreeSet<MachineId> = [a.id.clone(), b.id.clone()].into();
        let ids = |v: &[u8]| -> Vec<ContainerId> {
            v.iter()
                .map(|i| ContainerId::from_bytes([*i; 16]))
                .collect()
        };
        // d is not live: its container goes first; then a has the most: its newest.
        assert_eq!(pick_to_remove(&cs, &live, 1), ids(&[5]));
        assert_eq!(pick_to_remove(&cs, &live, 3), ids(&[5, 3, 2]));
        // Then a and b have one each: the newer (b's) goes.
        assert_eq!(pick_to_remove(&cs, &live, 4), ids(&[5, 3, 2, 4]));
        assert_eq!(pick_to_remove(&cs, &live, 9).len(), 5);
        assert!(pick_to_remove(&cs, &live, 0).is_empty());
    }
}
