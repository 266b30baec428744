//! A service's spec as it is stored in the cluster document (JSON), and the
//! port specs of `uc run -p`, parsed the way Uncloud parses them.
//!
//! Port specs have two forms:
//! - ingress (published through the cluster's ingress machines):
//!   `[HOSTNAME:][LB_PORT:]CONTAINER_PORT[/PROTO]`, PROTO one of `tcp`,
//!   `udp`, `http`, `https` (default `tcp`);
//! - host (bound on the machine that runs the container):
//!   `[IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]@host`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which runtime runs a service's containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// OCI containers through the Docker Engine API.
    Docker,
    /// systemd-nspawn containers of root filesystems.
    Nspawn,
    /// QEMU microVMs.
    Vm,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Docker, RuntimeKind::Nspawn, RuntimeKind::Vm];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Nspawn => "nspawn",
            Self::Vm => "vm",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "docker" => Ok(Self::Docker),
            "nspawn" => Ok(Self::Nspawn),
            "vm" => Ok(Self::Vm),
            _ => Err(format!(
                "unknown runtime {s:?}: expected docker, nspawn or vm"
            )),
        }
    }
}

/// How many containers a service runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Mode {
    /// This many, spread over the machines that can run them.
    Replicated { replicas: u32 },
    /// One on every machine that can run it, including machines that join later.
    Global,
}

/// What `uc run` asks for; stored as the service's spec in the cluster document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub image: String,
    pub runtime: RuntimeKind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Port specs in their canonical text form (see [`PortSpec`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(flatten)]
    pub mode: Mode,
    /// Machine ids the containers may be placed on (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
    /// CPU limit in cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// OpenSSH public keys written into each nspawn container's
    /// `/root/.ssh/authorized_keys` (see [`check_ssh_key`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
}

/// The key types OpenSSH accepts in `authorized_keys`.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Checks one OpenSSH public key line, `TYPE BASE64 [COMMENT]` (what `id_ed25519.pub`
/// holds): a known type, a base64 body, one line.
pub fn check_ssh_key(key: &str) -> Result<(), String> {
    let key = key.trim();
    if key.contains(['\n', '\r', '\0']) {
        return Err("an SSH public key is one line".into());
    }
    if key.starts_with("-----BEGIN") {
        return Err(if key.contains("PRIVATE KEY") {
            "this is a private key: give the public one (the .pub file)".into()
        } else {
            "this key is in RFC 4716 or PEM form: convert it with ssh-keygen -i -f FILE".into()
        });
    }
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(body)) = (parts.next(), parts.next()) else {
        return Err(format!(
            "{:?} is not an SSH public key (TYPE BASE64 [COMMENT], as in ~/.ssh/id_ed25519.pub)",
            short(key)
        ));
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "SSH key type {:?} is not one of {}",
            short(kind),
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let base64 = body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    if body.len() < 16 || body.len() % 4 != 0 || !base64 {
        return Err(format!("the body of SSH key {kind} is not base64"));
    }
    Ok(())
}

fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

impl ServiceSpec {
    /// The spec of a service from the document's JSON.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(v.clone())
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a ServiceSpec always serializes")
    }

    /// The parsed port specs (the stored ones were checked when written).
    pub fn port_specs(&self) -> Vec<PortSpec> {
        self.ports.iter().filter_map(|p| p.parse().ok()).collect()
    }

    /// The ports published on the machine of each container (`...@host`), with the container
    /// port each one forwards to.
    pub fn host_ports(&self) -> Vec<(HostPort, u16)> {
        self.port_specs()
            .into_iter()
            .filter_map(|p| match p.mode {
                PortMode::Host { ip, host_port } => Some((
                    HostPort {
                        // 0.0.0.0 (or ::) is every address, as no address is.
                        ip: ip.filter(|ip| !ip.is_unspecified()),
                        port: host_port,
                        udp: p.proto.is_udp(),
                    },
                    p.container_port,
                )),
                PortMode::Ingress { .. } => None,
            })
            .collect()
    }

    /// The host ports alone, without the container ports they go to.
    pub fn held_ports(&self) -> Vec<HostPort> {
        self.host_ports().into_iter().map(|(p, _)| p).collect()
    }
}

/// A port a container takes on its machine: `[ip:]port/tcp|udp`, on every address of the
/// machine when `ip` is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    pub ip: Option<IpAddr>,
    pub port: u16,
    pub udp: bool,
}

impl HostPort {
    /// Whether two containers on one machine could not both have these: same port and
    /// protocol, and the same address or either on every address.
    pub fn clashes(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.udp == other.udp
            && (self.ip.is_none() || other.ip.is_none() || self.ip == other.ip)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = if self.udp { "udp" } else { "tcp" };
        match self.ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}/{proto}", self.port),
            Some(ip) => write!(f, "{ip}:{}/{proto}", self.port),
            None => write!(f, "{}/{proto}", self.port),
        }
    }
}

/// Protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProto {
    Tcp,
    Udp,
    Http,
    Https,
}

impl PortProto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Http => "http",
            Self::Https => "https",
        }
    }

    /// The transport under it.
    pub fn is_udp(self) -> bool {
        self == Self::Udp
    }
}

/// Where a port is published.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortMode {
    /// Through the ingress machines; `hostname` for http(s), `lb_port` the
    /// public port (default: 80 for http, 443 for https, else the container port).
    Ingress {
        hostname: Option<String>,
        lb_port: Option<u16>,
    },
    /// Bound on the machine that runs the container.
    Host { ip: Option<IpAddr>, host_port: u16 },
}

/// One parsed `-p` spec.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub mode: PortMode,
    pub container_port: u16,
    pub proto: PortProto,
}

/// A port spec that does not parse; the message names the part that is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad port spec {spec:?}: {why}")]
pub struct PortSpecError {
    pub spec: String,
    pub why: String,
}

fn port_number(what: &str, s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 && !s.starts_with('+') => Ok(p),
        _ => Err(format!("{what} {s:?} is not a port number from 1 to 65535")),
    }
}

/// A DNS name: labels of letters, digits and hyphens, not starting or ending
/// with a hyphen, at least one dot, not all digits.
fn check_hostname(s: &str) -> Result<(), String> {
    let bad = || format!("hostname {s:?} is not a valid DNS name");
    if s.len() > 253 || !s.contains('.') {
        return Err(bad());
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    if s.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad());
    }
    Ok(())
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(spec: &str) -> Result<Self, PortSpecError> {
        parse_port(spec).map_err(|why| PortSpecError {
            spec: spec.to_owned(),
            why,
        })
    }
}

fn parse_port(spec: &str) -> Result<PortSpec, String> {
    if spec.is_empty() {
        return Err("it is empty".into());
    }
    let (body, host_mode) = match spec.rsplit_once('@') {
        Some((body, "host")) => (body, true),
        Some((_, other)) => {
            return Err(format!(
                "mode {other:?} is not known: the only mode after @ is \"host\""
            ));
        }
        None => (spec, false),
    };
    let (addr, proto) = match body.rsplit_once('/') {
        Some((addr, p)) => {
            let proto = match p {
                "tcp" => PortProto::Tcp,
                "udp" => PortProto::Udp,
                "http" => PortProto::Http,
                "https" => PortProto::Https,
                _ => {
                    return Err(format!(
                        "protocol {p:?} is not one of tcp, udp, http, https"
                    ));
                }
            };
            (addr, proto)
        }
        None => (body, PortProto::Tcp),
    };
    if host_mode {
        if matches!(proto, PortProto::Http | PortProto::Https) {
            return Err(format!(
                "protocol {} cannot be published @host: only tcp and udp can",
                proto.as_str()
            ));
        }
        // [IP:]HOST_PORT:CONTAINER_PORT, IP may be [v6].
        let (ip, rest) = if let Some(after) = addr.strip_prefix('[') {
            let (ip, rest) = after
                .split_once("]:")
                .ok_or_else(|| "an IPv6 address in [] must be followed by :".to_string())?;
            let ip = ip
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("host IP {ip:?} is not an IPv6 address"))?;
            (Some(IpAddr::V6(ip)), rest)
        } else {
            let parts: Vec<&str> = addr.split(':').collect();
            match parts.len() {
                2 => (None, addr),
                3 => {
                    let ip = parts[0]
                        .parse::<std::net::Ipv4Addr>()
                        .map_err(|_| format!("host IP {:?} is not an IP address", parts[0]))?;
                    (Some(IpAddr::V4(ip)), &addr[parts[0].len() + 1..])
                }
                1 => {
                    return Err("a port published @host needs HOST_PORT:CONTAINER_PORT".to_string());
                }
                _ => return Err("too many ':' (put an IPv6 address in [])".to_string()),
            }
        };
        let (hp, cp) = rest
            .split_once(':')
            .ok_or_else(|| "a port published @host needs HOST_PORT:CONTAINER_PORT".to_string())?;
        let host_port = port_number("host port", hp)?;
        let container_port = port_number("container port", cp)?;
        return Ok(PortSpec {
            mode: PortMode::Host { ip, host_port },
            container_port,
            proto,
        });
    }
    let parts: Vec<&str> = addr.split(':').collect();
    let (hostname, lb, cp) = match parts.as_slice() {
        [cp] => (None, None, *cp),
        [a, cp] if !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()) => (None, Some(*a), *cp),
        [h, cp] => (Some(*h), None, *cp),
        [h, lb, cp] => (Some(*h), Some(*lb), *cp),
        _ => return Err("too many ':' parts".to_string()),
    };
    if let Some(h) = hostname {
        check_hostname(h)?;
        if !matches!(proto, PortProto::Http | PortProto::Https) {
            return Err(format!(
                "a hostname is only for http and https ports, not {}",
                proto.as_str()
            ));
        }
    }
    let lb_port = lb
        .map(|p| port_number("load balancer port", p))
        .transpose()?;
    let container_port = port_number("container port", cp)?;
    Ok(PortSpec {
        mode: PortMode::Ingress {
            hostname: hostname.map(|h| h.to_ascii_lowercase()),
            lb_port,
        },
        container_port,
        proto,
    })
}

impl fmt::Display for PortSpec {
    /// The canonical form: parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mode {
            PortMode::Ingress { hostname, lb_port } => {
                if let Some(h) = hostname {
                    write!(f, "{h}:")?;
                }
                if let Some(p) = lb_port {
                    write!(f, "{p}:")?;
                }
                write!(f, "{}/{}", self.container_port, self.proto.as_str())
            }
            PortMode::Host { ip, host_port } => {
                match ip {
                    Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
                    Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
                    None => {}
                }
                write!(
                    f,
                    "{host_port}:{}/{}@host",
                    self.container_port,
                    self.proto.as_str()
                )
            }
        }
    }
}

/// A memory size as `uc run --memory` takes it: bytes, or a number with
/// `k`, `m`, `g` (powers of 1024; an optional trailing `b`/`i`/`ib`).
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let t = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'm')) => (&t[..i], 1 << 20),
        Some((i, 'g')) => (&t[..i], 1 << 30),
        Some((i, 't')) => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("memory {s:?} is not a size such as 512m or 2g"))?;
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("memory {s:?} must be more than 0"));
    }
    let bytes = n * mult as f64;
    if bytes < (4u64 << 20) as f64 {
        return Err(format!("memory {s:?} is less than 4m"));
    }
    if bytes > u64::MAX as f64 {
        return Err(format!("memory {s:?} is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> PortSpec {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn ingress_forms() {
        assert_eq!(
            p("80"),
            PortSpec {
                mode: PortMode::Ingress {
                    hostname: None,
                    lb_port: None
                },
                container_port: 80,
                proto: PortProto::Tcp
            }
        );
        assert_eq!(p("8080/https").proto, PortProto::Https);
        let s = p("App.Example.com:8000/https");
        assert_eq!(
            s.mode,
            PortMode::Ingress {
                hostname: Some("app.example.com".into()),
                lb_port: None
            }
        );
        assert_eq!(s.to_string(), "app.example.com:8000/https");
        let s = p("5353:53/udp");
        assert_eq!(
            s.mode,
            PortMode::Ingress {
                hostname: None,
                lb_port: Some(5353)
            }
        );
        let s = p("a.example.org:8443:80/https");
        assert_eq!(
            s.mode,
            PortMode::Ingress {
                hostname: Some("a.example.org".into()),
                lb_port: Some(8443)
            }
        );
    }

    #[test]
    fn host_forms() {
        let s = p("127.0.0.1:5432:5432@host");
        assert_eq!(
            s.mode,
            PortMode::Host {
                ip: Some("127.0.0.1".parse().unwrap()),
                host_port: 5432
            }
        );
        assert_eq!(s.to_string(), "127.0.0.1:5432:5432/tcp@host");
        let s = p("53:5353/udp@host");
        assert_eq!(
            s.mode,
            PortMode::Host {
                ip: None,
                host_port: 53
            }
        );
        assert_eq!(s.proto, PortProto::Udp);
        let s = p("[::1]:80:8080@host");
        assert_eq!(s.to_string(), "[::1]:80:8080/tcp@host");
    }

    #[test]
    fn errors_name_the_part() {
        let e = |s: &str| s.parse::<PortSpec>().unwrap_err().why;
        assert!(e("").contains("empty"));
        assert!(e("70000").contains("container port \"70000\""));
        assert!(e("0").contains("container port \"0\""));
        assert!(e("80/sctp").contains("protocol \"sctp\""));
        assert!(e("80@cluster").contains("mode \"cluster\""));
        assert!(e("80@host").contains("HOST_PORT:CONTAINER_PORT"));
        assert!(e("80:80/https@host").contains("protocol https"));
        assert!(e("x:80:80@host").contains("host IP \"x\""));
        assert!(e("99999:80").contains("load balancer port"));
        assert!(e("bad_name.com:80/http").contains("hostname"));
        assert!(e("example.com:80/tcp").contains("only for http and https"));
        assert!(e("a:b:c:d").contains("too many"));
        assert!(e("+80").contains("container port"));
    }

    #[test]
    fn host_ports_and_their_clashes() {
        let spec = ServiceSpec {
            image: "demo".into(),
            runtime: RuntimeKind::Nspawn,
            command: vec![],
            env: BTreeMap::new(),
            ports: vec![
                "8080:80@host".into(),
                "127.0.0.1:5353:53/udp@host".into(),
                "app.example.com:8000/https".into(),
                "0.0.0.0:9000:90@host".into(),
            ],
            mode: Mode::Global,
            machines: vec![],
            cpu: None,
            memory: None,
            ssh_keys: vec![],
        };
        let hp = spec.host_ports();
        assert_eq!(hp.len(), 3, "the ingress port is not a host port: {hp:?}");
        assert_eq!(hp[2].0.to_string(), "9000/tcp", "0.0.0.0 is every address");
        let (any, to) = hp[0];
        assert_eq!((any.to_string().as_str(), to), ("8080/tcp", 80));
        let (lo, to) = hp[1];
        assert_eq!((lo.to_string().as_str(), to), ("127.0.0.1:5353/udp", 53));
        let at = |ip: Option<&str>, port, udp| HostPort {
            ip: ip.map(|i| i.parse().unwrap()),
            port,
            udp,
        };
        assert!(any.clashes(&at(Some("10.0.0.1"), 8080, false)));
        assert!(at(Some("10.0.0.1"), 8080, false).clashes(&any));
        assert!(!any.clashes(&at(None, 8080, true)), "tcp and udp are apart");
        assert!(!any.clashes(&at(None, 8081, false)));
        assert!(!at(Some("10.0.0.1"), 1, false).clashes(&at(Some("10.0.0.2"), 1, false)));
        assert!(at(Some("10.0.0.1"), 1, false).clashes(&at(Some("10.0.0.1"), 1, false)));
    }

    #[test]
    fn ssh_keys_are_checked() {
        let good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvbh6GzPSbS1k2bJqTjXl5xWdXbPiSd2S4hVYp2Kv7X me@laptop";
        assert_eq!(check_ssh_key(good), Ok(()));
        assert_eq!(
            check_ssh_key(&format!("{good}\n")),
            Ok(()),
            "a trailing newline is fine"
        );
        for (bad, why) in [
            ("", "not an SSH public key"),
            ("hello", "not an SSH public key"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
            ("---- BEGIN SSH2 PUBLIC KEY ----", "is not one of"),
            ("-----BEGIN RSA PUBLIC KEY-----", "ssh-keygen -i"),
            ("ssh-dss AAAAB3NzaC1kc3MAAACBAP1 x", "type \"ssh-dss\""),
            ("ssh-ed25519 not*base64*at*all!", "not base64"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\nssh-rsa AAAA", "one line"),
        ] {
            let e = check_ssh_key(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m"), Ok(512 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("1.5gib"), Ok(3 << 29));
        assert_eq!(parse_memory("8388608"), Ok(8 << 20));
        assert!(parse_memory("1k").unwrap_err().contains("less than 4m"));
        assert!(parse_memory("lots").unwrap_err().contains("not a size"));
        assert!(parse_memory("-1g").is_err());
    }

    #[test]
    fn spec_json_round_trip() {
        let spec = ServiceSpec {
            image: "demo".into(),
            runtime: RuntimeKind::Nspawn,
            command: vec!["httpd".into(), "-f".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            ports: vec!["80/http".into()],
            mode: Mode::Replicated { replicas: 2 },
            machines: vec![],
            cpu: Some(0.5),
            memory: None,
            ssh_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvbh6GzPSbS1k2bJqTjXl5xWdXbPiSd2S4hVYp2Kv7X"
                    .into(),
            ],
        };
        let j = spec.to_json();
        assert_eq!(j["mode"], "replicated");
        assert_eq!(j["replicas"], 2);
        assert_eq!(ServiceSpec::from_json(&j).unwrap(), spec);
        let g = ServiceSpec {
            mode: Mode::Global,
            ..spec
        };
        assert_eq!(ServiceSpec::from_json(&g.to_json()).unwrap(), g);
    }

    fn arb_spec() -> impl Strategy<Value = PortSpec> {
        let proto = prop_oneof![
            Just(PortProto::Tcp),
            Just(PortProto::Udp),
            Just(PortProto::Http),
            Just(PortProto::Https)
        ];
        let host = "[a-z][a-z0-9-]{0,10}[a-z0-9](\\.[a-z][a-z0-9]{0,8}){1,3}";
        (
            any::<bool>(),
            proto,
            proptest::option::of(host),
            proptest::option::of(1u16..),
            1u16..,
            proptest::option::of(any::<std::net::IpAddr>()),
        )
            .prop_map(|(host_mode, proto, hostname, lb, cp, ip)| {
                if host_mode {
                    let proto = if proto.is_udp() {
                        PortProto::Udp
                    } else {
                        PortProto::Tcp
                    };
                    PortSpec {
                        mode: PortMode::Host {
                            ip,
                            host_port: lb.unwrap_or(cp),
                        },
                        container_port: cp,
                        proto,
                    }
                } else {
                    let hostname =
                        hostname.filter(|_| matches!(proto, PortProto::Http | PortProto::Https));
                    PortSpec {
                        mode: PortMode::Ingress {
                            hostname,
                            lb_port: lb,
                        },
                        container_port: cp,
                        proto,
                    }
                }
            })
    }

    proptest! {
        #[test]
        fn canonical_form_parses_back(spec in arb_spec()) {
            let text = spec.to_string();
            prop_assert_eq!(text.parse::<PortSpec>(), Ok(spec));
        }

        #[test]
        fn any_text_parses_or_errs_without_panic(s in "\\PC{0,40}") {
            if let Ok(spec) = s.parse::<PortSpec>() {
                // Whatever parses has a canonical form that parses to it.
                prop_assert_eq!(spec.to_string().parse::<PortSpec>(), Ok(spec));
            }
        }

        #[test]
        fn port_like_text_never_panics(s in "[0-9a-z.:/@\\[\\]]{0,30}") {
            let _ = s.parse::<PortSpec>();
        }
    }
}
