//! The pure core: what the cluster's names are, and the answer to one question about them. No
//! I/O; the view is built by the agent from its replica of the state.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Every record uc serves lives this long in caches: names follow the state closely.
pub const TTL: u32 = 5;
/// The zone uc answers for.
pub const ZONE: &str = "internal";

/// A machine of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineRec {
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// One container of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRec {
    /// Its name in `<container>.<machine>.machine.internal` (lower case).
    pub name: String,
    pub machine: String,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    /// Only healthy containers are answered for the service's name.
    pub healthy: bool,
}

/// A published port of a service: `_<name>._<proto>.<service>.internal` SRV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRec {
    pub name: String,
    pub tcp: bool,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRec {
    pub containers: Vec<ContainerRec>,
    pub ports: Vec<PortRec>,
}

/// The cluster's names as one machine sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsView {
    /// The machine answering (for `nearest.`).
    pub this_machine: String,
    /// By machine name.
    pub machines: BTreeMap<String, MachineRec>,
    /// By service name.
    pub services: BTreeMap<String, ServiceRec>,
    /// Changes with the state, for the SOA serial.
    pub serial: u32,
}

/// The answer to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The name exists and has these records of the asked type.
    Records(Vec<Record>),
    /// The name exists but has no records of that type.
    NoData,
    /// No such name under `internal`.
    NxDomain,
    /// Not uc's zone: ask upstream.
    Forward,
}

/// Lower-case labels of `name`, without the root.
fn labels(name: &Name) -> Vec<String> {
    name.iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect()
}

fn name_of(s: &str) -> Option<Name> {
    Name::from_ascii(format!("{s}.")).ok()
}

fn address_records(owner: &Name, v4: &[Ipv4Addr], v6: &[Ipv6Addr], qtype: RecordType) -> Answer {
    let mut out = Vec::new();
    if matches!(qtype, RecordType::A | RecordType::ANY) {
        out.extend(
            v4.iter()
                .map(|ip| Record::from_rdata(owner.clone(), TTL, RData::A(A(*ip)))),
        );
    }
    if matches!(qtype, RecordType::AAAA | RecordType::ANY) {
        out.extend(
            v6.iter()
                .map(|ip| Record::from_rdata(owner.clone(), TTL, RData::AAAA(AAAA(*ip)))),
        );
    }
    if out.is_empty() {
        Answer::NoData
    } else {
        Answer::Records(out)
    }
}

/// The zone's SOA, for negative answers.
pub fn soa(view: &DnsView) -> Record {
    let zone = name_of(ZONE).expect("a valid zone name");
    let mname =
        name_of(&format!("{}.machine.{ZONE}", view.this_machine)).unwrap_or_else(|| zone.clone());
    let rname = name_of(&format!("hostmaster.{ZONE}")).unwrap_or_else(|| zone.clone());
    Record::from_rdata(
        zone,
        TTL,
        RData::SOA(SOA::new(mname, rname, view.serial, 60, 10, 600, TTL)),
    )
}

/// Answers `qtype` for `qname`; `rotate` turns the order of a service's addresses (a counter
/// per query spreads clients over the containers).
pub fn answer(view: &DnsView, qname: &Name, qtype: RecordType, rotate: usize) -> Answer {
    answer_turning(view, qname, qtype, rotate).0
}

/// [`answer`], and the period of its rotation: `rotate` and `rotate + period` give the same
/// answer (1 when nothing turns).
pub fn answer_turning(
    view: &DnsView,
    qname: &Name,
    qtype: RecordType,
    rotate: usize,
) -> (Answer, usize) {
    let l = labels(qname);
    if l.last().map(String::as_str) != Some(ZONE) {
        return (Answer::Forward, 1);
    }
    let l = &l[..l.len() - 1];
    match l {
        // nearest.<service>.internal: this machine's containers first.
        [nearest, service] if nearest == "nearest" && service != "machine" => {
            match view.services.get(service) {
                Some(svc) => {
                    let (mut here, mut there): (Vec<&ContainerRec>, Vec<&ContainerRec>) = svc
                        .containers
                        .iter()
                        .filter(|c| c.healthy)
                        .partition(|c| c.machine == view.this_machine);
                    let period = lcm(here.len().max(1), there.len().max(1));
                    rotate_vec(&mut here, rotate);
                    rotate_vec(&mut there, rotate);
                    here.extend(there);
                    (service_records(qname, &here, qtype), period)
                }
                None => (Answer::NxDomain, 1),
            }
        }
        // <service>.internal
        [service] if service != "machine" && view.services.contains_key(service) => {
            let svc = &view.services[service];
            let mut healthy: Vec<&ContainerRec> =
                svc.containers.iter().filter(|c| c.healthy).collect();
            let period = healthy.len().max(1);
            rotate_vec(&mut healthy, rotate);
            (service_records(qname, &healthy, qtype), period)
        }
        // _<port>._<proto>.<service>.internal
        [port, proto, service]
            if port.starts_with('_') && proto.starts_with('_') && service != "machine" =>
        {
            srv_records(view, qname, qtype, rotate, port, proto, service)
        }
        _ => (fixed(view, qname, qtype, l), 1),
    }
}

/// The names whose answer does not turn.
fn fixed(view: &DnsView, qname: &Name, qtype: RecordType, l: &[String]) -> Answer {
    match l {
        // The zone's apex.
        [] => match qtype {
            RecordType::SOA | RecordType::ANY => Answer::Records(vec![soa(view)]),
            _ => Answer::NoData,
        },
        // machine.internal: a name that exists (it has children), with no records.
        [m] if m == "machine" => Answer::NoData,
        // <machine>.machine.internal
        [machine, m] if m == "machine" => match view.machines.get(machine) {
            Some(rec) => address_records(qname, &[rec.v4], &[rec.v6], qtype),
            None => Answer::NxDomain,
        },
        // <container>.<machine>.machine.internal
        [container, machine, m] if m == "machine" => {
            let found = view
                .services
                .values()
                .flat_map(|s| &s.containers)
                .find(|c| {
                    &c.machine == machine
                        && (&c.name == container
                            || (container.len() >= 12 && c.name.starts_with(container.as_str())))
                });
            match found {
                Some(c) => {
                    address_records(qname, &[c.v4], &c.v6.into_iter().collect::<Vec<_>>(), qtype)
                }
                None => Answer::NxDomain,
            }
        }
        _ => Answer::NxDomain,
    }
}

/// `_<port>._<proto>.<service>.internal`: SRV records to the service's healthy containers.
fn srv_records(
    view: &DnsView,
    qname: &Name,
    qtype: RecordType,
    rotate: usize,
    port: &str,
    proto: &str,
    service: &str,
) -> (Answer, usize) {
    let Some(svc) = view.services.get(service) else {
        return (Answer::NxDomain, 1);
    };
    let tcp = match proto {
        "_tcp" => true,
        "_udp" => false,
        _ => return (Answer::NxDomain, 1),
    };
    let want = &port[1..];
    let Some(p) = svc
        .ports
        .iter()
        .find(|p| p.tcp == tcp && (p.name == want || p.port.to_string() == want))
    else {
        return (Answer::NxDomain, 1);
    };
    if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
        return (Answer::NoData, 1);
    }
    let mut records: Vec<Record> = svc
        .containers
        .iter()
        .filter(|c| c.healthy)
        .filter_map(|c| {
            let target = name_of(&format!("{}.{}.machine.{ZONE}", c.name, c.machine))?;
            Some(Record::from_rdata(
                qname.clone(),
                TTL,
                RData::SRV(SRV::new(10, 10, p.port, target)),
            ))
        })
        .collect();
    let period = records.len().max(1);
    rotate_vec(&mut records, rotate);
    if records.is_empty() {
        (Answer::NoData, 1)
    } else {
        (Answer::Records(records), period)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

fn service_records(owner: &Name, containers: &[&ContainerRec], qtype: RecordType) -> Answer {
    let v4: Vec<Ipv4Addr> = containers.iter().map(|c| c.v4).collect();
    let v6: Vec<Ipv6Addr> = containers.iter().filter_map(|c| c.v6).collect();
    address_records(owner, &v4, &v6, qtype)
}

fn rotate_vec<T>(v: &mut [T], by: usize) {
    if !v.is_empty() {
        let n = by % v.len();
        v.rotate_left(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> DnsView {
        let mut v = DnsView {
            this_machine: "pi".into(),
            serial: 7,
            ..Default::default()
        };
        for (i, m) in ["vps", "pi"].iter().enumerate() {
            let x = i as u8 + 1;
            v.machines.insert(
                m.to_string(),
                MachineRec {
                    name: m.to_string(),
                    v4: Ipv4Addr::new(10, 210, x, 1),
                    v6: format!("fd00:0:0:{x}::1").parse().unwrap(),
                },
            );
        }
        let c = |name: &str, machine: &str, last: u8, healthy: bool| ContainerRec {
            name: name.into(),
            machine: machine.into(),
            v4: Ipv4Addr::new(10, 210, if machine == "vps" { 1 } else { 2 }, last),
            v6: None,
            healthy,
        };
        v.services.insert(
            "web".into(),
            ServiceRec {
                containers: vec![
                    c("aaaaaaaaaaaaaaaa", "vps", 2, true),
                    c("bbbbbbbbbbbbbbbb", "pi", 2, true),
                    c("cccccccccccccccc", "vps", 3, false),
                ],
                ports: vec![PortRec {
                    name: "http".into(),
                    tcp: true,
                    port: 80,
                }],
            },
        );
        v
    }

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn v4s(a: &Answer) -> Vec<String> {
        match a {
            Answer::Records(r) => r
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0.to_string()),
                    RData::SRV(s) => Some(format!("{}:{}", s.target, s.port)),
                    _ => None,
                })
                .collect(),
            other => vec![format!("{other:?}")],
        }
    }

    #[test]
    fn every_name_form() {
        let v = view();
        assert_eq!(
            v4s(&answer(&v, &n("web.internal."), RecordType::A, 0)),
            ["10.210.1.2", "10.210.2.2"]
        );
        // Rotation per query; unhealthy containers are never answered.
        assert_eq!(
            v4s(&answer(&v, &n("WEB.internal."), RecordType::A, 1)),
            ["10.210.2.2", "10.210.1.2"]
        );
        // nearest: this machine's first.
        for r in 0..3 {
            assert_eq!(
                v4s(&answer(&v, &n("nearest.web.internal."), RecordType::A, r))[0],
                "10.210.2.2"
            );
        }
        assert_eq!(
            v4s(&answer(&v, &n("pi.machine.internal."), RecordType::A, 0)),
            ["10.210.2.1"]
        );
        assert!(
            matches!(answer(&v, &n("pi.machine.internal."), RecordType::AAAA, 0), Answer::Records(r) if r.len() == 1)
        );
        assert_eq!(
            v4s(&answer(
                &v,
                &n("bbbbbbbbbbbbbbbb.pi.machine.internal."),
                RecordType::A,
                0
            )),
            ["10.210.2.2"]
        );
        // A 12-character prefix of a container id works too.
        assert_eq!(
            v4s(&answer(
                &v,
                &n("aaaaaaaaaaaa.vps.machine.internal."),
                RecordType::A,
                0
            )),
            ["10.210.1.2"]
        );
        assert_eq!(
            v4s(&answer(
                &v,
                &n("_http._tcp.web.internal."),
                RecordType::SRV,
                0
            )),
            [
                "aaaaaaaaaaaaaaaa.vps.machine.internal.:80",
                "bbbbbbbbbbbbbbbb.pi.machine.internal.:80"
            ]
        );
        assert_eq!(
            v4s(&answer(
                &v,
                &n("_80._tcp.web.internal."),
                RecordType::SRV,
                0
            ))
            .len(),
            2
        );
        assert!(matches!(
            answer(&v, &n("internal."), RecordType::SOA, 0),
            Answer::Records(_)
        ));
    }

    #[test]
    fn answers_repeat_after_their_period() {
        let mut v = view();
        // Two healthy on vps, one on pi: nearest turns with lcm(1, 2) on pi.
        v.services.get_mut("web").unwrap().containers[2].healthy = true;
        for (name, qtype, period) in [
            ("web.internal.", RecordType::A, 3),
            ("nearest.web.internal.", RecordType::A, 2),
            ("_http._tcp.web.internal.", RecordType::SRV, 3),
            ("pi.machine.internal.", RecordType::A, 1),
            ("db.internal.", RecordType::A, 1),
            ("example.com.", RecordType::A, 1),
        ] {
            for r in 0..7 {
                let (a, p) = answer_turning(&v, &n(name), qtype, r);
                assert_eq!(p, period, "{name}");
                assert_eq!(
                    answer_turning(&v, &n(name), qtype, r + p).0,
                    a,
                    "{name} {r}"
                );
            }
        }
        // A service named like the machine zone does not hide it.
        v.services.insert("machine".into(), ServiceRec::default());
        assert_eq!(
            answer(&v, &n("machine.internal."), RecordType::A, 0),
            Answer::NoData
        );
        assert_eq!(
            v4s(&answer(&v, &n("pi.machine.internal."), RecordType::A, 0)),
            ["10.210.2.1"]
        );
    }

    #[test]
    fn unknown_names_and_types() {
        let v = view();
        for name in [
            "db.internal.",
            "x.pi.machine.internal.",
            "nope.machine.internal.",
            "_http._udp.web.internal.",
            "a.b.c.d.internal.",
        ] {
            assert_eq!(
                answer(&v, &n(name), RecordType::A, 0),
                Answer::NxDomain,
                "{name}"
            );
        }
        assert_eq!(
            answer(&v, &n("web.internal."), RecordType::MX, 0),
            Answer::NoData
        );
        assert_eq!(
            answer(&v, &n("web.internal."), RecordType::AAAA, 0),
            Answer::NoData
        );
        assert_eq!(
            answer(&v, &n("machine.internal."), RecordType::A, 0),
            Answer::NoData
        );
        assert_eq!(
            answer(&v, &n("example.com."), RecordType::A, 0),
            Answer::Forward
        );
        assert_eq!(
            answer(&v, &n("internal.example.com."), RecordType::A, 0),
            Answer::Forward
        );
        assert_eq!(answer(&v, &n("."), RecordType::NS, 0), Answer::Forward);
    }
}
