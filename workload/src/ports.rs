//! Host ports (`-p [ip:]port:container_port[/tcp|udp]@host`): the machine forwards a port of
//! its own to a container, in the kernel, by destination NAT. The rules live in one nftables
//! table of uc's own, `ip uc`, which is replaced as a whole, atomically, whenever the set of
//! forwards changes; they stay while the agent is down, as the workloads do.
//!
//! - `prerouting`: traffic from outside (the machine's own networks, the mesh, its
//!   workloads) to a local address of the machine on the port is sent to the container.
//! - `output`: the same for connections the machine makes itself, `localhost` included.
//!   Packets from 127.0.0.1 may leave through the bridge only with `route_localnet` on it
//!   ([`route_localnet`], on while there are forwards);
//!   `guard` drops anything arriving on the bridge to or from 127.0.0.0/8, so that setting
//!   opens nothing else.
//! - `postrouting`: such localhost connections, and a workload's connections to another
//!   workload of the same bridge through a published port, leave with the bridge's address
//!   as their source, so the answers come back the same way.
//!
//! [`ruleset`] is the pure part; [`apply`] hands its text to `nft`.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use uc_proto::ContainerId;
use uc_proto::spec::HostPort;

use crate::net::BRIDGE;

/// The nftables table uc owns.
pub const TABLE: &str = "uc";

/// One published port: `port` on the machine to `to` in a container.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forward {
    pub port: HostPort,
    pub to: SocketAddrV4,
    pub container: ContainerId,
}

#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error("publishing host ports needs nftables, and `nft` could not be run: {0}")]
    NoNft(std::io::Error),
    #[error("nft refused uc's port rules: {0}")]
    Nft(String),
    #[error("setting {path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
}

/// A container that wants host ports on this machine.
#[derive(Clone, Debug)]
pub struct Claim {
    pub container: ContainerId,
    pub service: String,
    pub created_at_ms: u64,
    pub address: Ipv4Addr,
    /// Host port, and the container port it goes to.
    pub ports: Vec<(HostPort, u16)>,
}

/// Settles who gets which host port: placement keeps clashing containers apart, but two
/// machines on either side of a partition may each place one here. The oldest container
/// (then the lowest id) gets its ports; a later one that clashes gets none of its ports
/// and is returned with why, so that it is not run. Every machine settles it the same way.
pub fn claim(mut claims: Vec<Claim>) -> (Vec<Forward>, Vec<(ContainerId, String)>) {
    claims.sort_by(|a, b| (a.created_at_ms, &a.container).cmp(&(b.created_at_ms, &b.container)));
    let mut held: Vec<(HostPort, &str)> = Vec::new();
    let mut forwards = Vec::new();
    let mut refused = Vec::new();
    for c in &claims {
        let clash = c.ports.iter().find_map(|(p, _)| {
            held.iter()
                .find(|(h, _)| p.clashes(h))
                .map(|(h, s)| format!("host port {p}: service {s:?} holds {h} on this machine"))
        });
        if let Some(why) = clash {
            refused.push((c.container.clone(), why));
            continue;
        }
        for (p, to) in &c.ports {
            held.push((*p, &c.service));
            forwards.push(Forward {
                port: *p,
                to: SocketAddrV4::new(c.address, *to),
                container: c.container.clone(),
            });
        }
    }
    forwards.sort();
    (forwards, refused)
}

/// The nft script that makes table `ip uc` hold exactly `forwards` (none: no table). It
/// creates the table first so that deleting it never fails, and nft runs a script as one
/// transaction, so no packet sees a half-made table.
pub fn ruleset(forwards: &[Forward]) -> String {
    let mut s = format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n");
    if forwards.is_empty() {
        return s;
    }
    let mut dnat = String::new();
    for f in forwards {
        let dest = match f.port.ip {
            Some(IpAddr::V4(ip)) => format!("ip daddr {ip}"),
            // IPv6 host addresses are refused when a service is run; never match one.
            Some(IpAddr::V6(_)) => continue,
            None => "fib daddr type local".to_string(),
        };
        let proto = if f.port.udp { "udp" } else { "tcp" };
        dnat.push_str(&format!(
            "\t\t{dest} {proto} dport {} dnat to {} comment \"{}\"\n",
            f.port.port,
            f.to,
            f.container.short()
        ));
    }
    s.push_str(&format!(
        "table ip {TABLE} {{\n\
         \tchain guard {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname \"{BRIDGE}\" ip daddr 127.0.0.0/8 drop\n\
         \t\tiifname \"{BRIDGE}\" ip saddr 127.0.0.0/8 drop\n\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         {dnat}\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         {dnat}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{BRIDGE}\" ip saddr 127.0.0.0/8 masquerade\n\
         \t\toifname \"{BRIDGE}\" iifname \"{BRIDGE}\" ct status dnat masquerade\n\
         \t}}\n\
         }}\n"
    ));
    s
}

/// Makes the kernel forward exactly `forwards`: runs [`ruleset`] through `nft -f -`. With
/// nothing to forward and no `nft` on the machine there is nothing to undo: Ok.
pub async fn apply(forwards: &[Forward]) -> Result<(), PortsError> {
    let child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if forwards.is_empty() && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(PortsError::NoNft(e)),
    };
    let script = ruleset(forwards);
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(PortsError::NoNft)?;
    }
    let out = child.wait_with_output().await.map_err(PortsError::NoNft)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PortsError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Whether table `ip uc` is in the kernel (someone may flush the whole ruleset: restarting
/// `nftables.service` does).
pub async fn table_present() -> bool {
    tokio::process::Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Lets packets from 127.0.0.0/8 leave through the bridge (`route_localnet`), which a
/// forward of a connection to localhost needs, while there are forwards (and so the table's
/// `guard`); off again when there are none. Nothing to do before the bridge exists: called
/// again after every pass.
pub fn route_localnet(on: bool) -> Result<(), PortsError> {
    let path = format!("/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet");
    let want = if on { "1" } else { "0" };
    match std::fs::read_to_string(&path) {
        Ok(now) if now.trim() == want => Ok(()),
        Ok(_) => std::fs::write(&path, want).map_err(|source| PortsError::Sysctl { path, source }),
        Err(_) => Ok(()),
    }
}

/// Why `port` cannot be published on this machine, if a program here holds it or `ip` is not
/// an address of this machine: binding it ourselves fails.
pub fn unavailable(port: &HostPort) -> Option<String> {
    let ip = match port.ip {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(ip) => ip,
    };
    let addr = std::net::SocketAddr::new(ip, port.port);
    let r = if port.udp {
        std::net::UdpSocket::bind(addr).map(drop)
    } else {
        std::net::TcpListener::bind(addr).map(drop)
    };
    match r {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(format!(
            "host port {port} is in use by a program on this machine; the container starts \
             once it is free"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => Some(format!(
            "host port {port}: {ip} is not an address of this machine"
        )),
        Err(e) => Some(format!("host port {port}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(ip: Option<&str>, port: u16, udp: bool, to: &str, id: u8) -> Forward {
        Forward {
            port: HostPort {
                ip: ip.map(|i| i.parse().unwrap()),
                port,
                udp,
            },
            to: to.parse().unwrap(),
            container: ContainerId::from_bytes([id; 16]),
        }
    }

    #[test]
    fn the_oldest_claim_wins_a_clash() {
        let c = |id: u8, at: u64, port: u16, addr: &str| Claim {
            container: ContainerId::from_bytes([id; 16]),
            service: format!("s{id}"),
            created_at_ms: at,
            address: addr.parse().unwrap(),
            ports: vec![(
                HostPort {
                    ip: None,
                    port,
                    udp: false,
                },
                80,
            )],
        };
        // Given in any order: 2 is older than 1 and takes 8080; 3 has its own port.
        let (fwd, refused) = claim(vec![
            c(1, 20, 8080, "10.210.1.2"),
            c(3, 30, 9090, "10.210.1.4"),
            c(2, 10, 8080, "10.210.1.3"),
        ]);
        let to: Vec<String> = fwd.iter().map(|f| format!("{}>{}", f.port, f.to)).collect();
        assert_eq!(to, vec!["8080/tcp>10.210.1.3:80", "9090/tcp>10.210.1.4:80"]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, ContainerId::from_bytes([1; 16]));
        assert!(
            refused[0].1.contains("service \"s2\" holds 8080/tcp"),
            "{}",
            refused[0].1
        );
        // Same time: the lower id wins.
        let (_, refused) = claim(vec![c(5, 10, 1, "10.210.1.5"), c(4, 10, 1, "10.210.1.6")]);
        assert_eq!(refused[0].0, ContainerId::from_bytes([5; 16]));
    }

    #[test]
    fn no_forwards_leave_no_table() {
        let s = ruleset(&[]);
        assert_eq!(s, "table ip uc {}\ndelete table ip uc\n");
    }

    #[test]
    fn forwards_become_dnat_rules_in_prerouting_and_output() {
        let s = ruleset(&[
            fwd(None, 8080, false, "10.210.2.2:80", 1),
            fwd(Some("192.0.2.1"), 5353, true, "10.210.2.3:53", 2),
        ]);
        assert!(s.starts_with("table ip uc {}\ndelete table ip uc\ntable ip uc {\n"));
        let any = "fib daddr type local tcp dport 8080 dnat to 10.210.2.2:80 comment \"01010101\"";
        let one = "ip daddr 192.0.2.1 udp dport 5353 dnat to 10.210.2.3:53 comment \"02020202\"";
        for rule in [any, one] {
            assert_eq!(
                s.matches(rule).count(),
                2,
                "{rule} once per nat chain:\n{s}"
            );
        }
        assert!(s.contains("type nat hook prerouting priority dstnat"));
        assert!(s.contains("type nat hook output priority -100"));
        assert!(s.contains("iifname \"ucbr0\" ip daddr 127.0.0.0/8 drop"));
        assert!(s.contains("oifname \"ucbr0\" ip saddr 127.0.0.0/8 masquerade"));
    }

    #[test]
    fn ipv6_host_addresses_get_no_rule() {
        let s = ruleset(&[fwd(Some("2001:db8::1"), 80, false, "10.210.2.2:80", 1)]);
        assert!(!s.contains("dport 80"), "{s}");
    }

    #[test]
    fn a_held_port_is_unavailable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let held = HostPort {
            ip: Some("127.0.0.1".parse().unwrap()),
            port,
            udp: false,
        };
        let why = unavailable(&held).expect("held");
        assert!(why.contains("in use"), "{why}");
        drop(l);
        assert_eq!(unavailable(&held), None);
        let elsewhere = HostPort {
            ip: Some("192.0.2.200".parse().unwrap()),
            port,
            udp: false,
        };
        let why = unavailable(&elsewhere).expect("not ours");
        assert!(why.contains("not an address of this machine"), "{why}");
    }
}
