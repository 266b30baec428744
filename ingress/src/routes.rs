//! The pure core of routing: the services' published ingress ports and their containers in, one
//! route table out (which public ports to listen on, which host goes where), with the clashes it
//! had to settle named. No I/O: the agent builds the input from its replica of the state.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;
use uc_proto::spec::{PortMode, PortProto, PortSpec};

/// One container that can serve a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Backend {
    /// The container's mesh address and the container port.
    pub addr: SocketAddr,
    /// The container runs on this machine (tried first).
    pub local: bool,
}

/// A container of a service as the route table needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContainerInput {
    pub ip: std::net::IpAddr,
    pub local: bool,
}

/// A service with its ingress ports, in the order that settles clashes (older first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInput {
    pub name: String,
    pub ports: Vec<PortSpec>,
    /// Its containers that may take traffic (running, on a machine not known dead).
    pub containers: Vec<ContainerInput>,
}

/// What a listener on a public port speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Listener {
    /// Plain HTTP, routed by host; also answers ACME HTTP-01 challenges and redirects https
    /// routes' hosts to HTTPS.
    Http,
    /// TLS (certificate by SNI), then HTTP routed by host.
    Https,
    /// Raw TCP to one service.
    Tcp,
}

/// A route by hostname on an HTTP or HTTPS listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpRoute {
    /// Lowercase, without a trailing dot; `None` serves every host no other route names.
    pub host: Option<String>,
    pub service: String,
    pub tls: bool,
    pub public_port: u16,
    pub backends: Vec<Backend>,
}

/// A raw TCP route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcpRoute {
    pub service: String,
    pub public_port: u16,
    pub backends: Vec<Backend>,
}

/// A published port the table could not take, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refused {
    pub service: String,
    pub port: String,
    pub why: String,
}

/// Every route of the cluster as one ingress machine serves them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    /// Public port → what it speaks.
    pub listeners: BTreeMap<u16, Listener>,
    /// (public port, host) → route; host `None` is the port's fallback.
    http: BTreeMap<(u16, Option<String>), HttpRoute>,
    tcp: BTreeMap<u16, TcpRoute>,
    pub refused: Vec<Refused>,
}

/// The form of a host used for matching: lowercase, no port, no trailing dot.
pub fn normalize_host(host: &str) -> String {
    let h = if host.starts_with('[') {
        // An IPv6 literal: keep the brackets' content.
        host.split(']')
            .next()
            .unwrap_or(host)
            .trim_start_matches('[')
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

impl RouteTable {
    /// Builds the table. Services come older first: when two claim the same host on the same
    /// port, or one port for different kinds of listener, the older keeps it and the other is
    /// listed in `refused`.
    pub fn build(services: &[ServiceInput]) -> Self {
        let mut t = RouteTable::default();
        for s in services {
            for p in &s.ports {
                let PortMode::Ingress { hostname, lb_port } = &p.mode else {
                    continue;
                };
                let refuse = |t: &mut RouteTable, why: String| {
                    t.refused.push(Refused {
                        service: s.name.clone(),
                        port: p.to_string(),
                        why,
                    })
                };
                let (kind, public_port) = match p.proto {
                    PortProto::Http => (Listener::Http, lb_port.unwrap_or(80)),
                    PortProto::Https => (Listener::Https, lb_port.unwrap_or(443)),
                    PortProto::Tcp => (Listener::Tcp, lb_port.unwrap_or(p.container_port)),
                    PortProto::Udp => {
                        refuse(&mut t, "the ingress does not forward UDP".into());
                        continue;
                    }
                };
                if kind == Listener::Https && hostname.is_none() {
                    refuse(
                        &mut t,
                        "an https port needs a hostname (HOST:PORT/https) to get a certificate"
                            .into(),
                    );
                    continue;
                }
                match t.listeners.get(&public_port).copied() {
                    Some(k) if k != kind => {
                        let who = t.owner_of(public_port).unwrap_or_default();
                        refuse(
                            &mut t,
                            format!(
                                "port {public_port} is already a {} port of service {who:?}",
                                listener_name(k)
                            ),
                        );
                        continue;
                    }
                    _ => {}
                }
                let backends = backends(&s.containers, p.container_port);
                if kind == Listener::Tcp {
                    if let Some(other) = t.tcp.get(&public_port) {
                        let why = format!(
                            "tcp port {public_port} is already published by service {:?}",
                            other.service
                        );
                        refuse(&mut t, why);
                        continue;
                    }
                    t.tcp.insert(
                        public_port,
                        TcpRoute {
                            service: s.name.clone(),
                            public_port,
                            backends,
                        },
                    );
                } else {
                    let host = hostname.as_deref().map(normalize_host);
                    let key = (public_port, host.clone());
                    if let Some(other) = t.http.get(&key) {
                        let why = format!(
                            "{} on port {public_port} is already routed to service {:?}",
                            host.as_deref().unwrap_or("every other host"),
                            other.service
                        );
                        refuse(&mut t, why);
                        continue;
                    }
                    t.http.insert(
                        key,
                        HttpRoute {
                            host,
                            service: s.name.clone(),
                            tls: kind == Listener::Https,
                            public_port,
                            backends,
                        },
                    );
                }
                t.listeners.insert(public_port, kind);
            }
        }
        t
    }

    fn owner_of(&self, port: u16) -> Option<String> {
        if let Some(r) = self.tcp.get(&port) {
            return Some(r.service.clone());
        }
        self.http
            .range((port, None)..)
            .next()
            .filter(|((p, _), _)| *p == port)
            .map(|(_, r)| r.service.clone())
    }

    /// The route for `host` (as sent by the client) on public port `port`: the host's own, else
    /// the port's fallback.
    pub fn http_route(&self, port: u16, host: &str) -> Option<&HttpRoute> {
        let host = normalize_host(host);
        self.http
            .get(&(port, Some(host)))
            .or_else(|| self.http.get(&(port, None)))
    }

    /// The HTTPS route that a plain HTTP request for `host` should be redirected to, if any.
    pub fn https_route_for(&self, host: &str) -> Option<&HttpRoute> {
        let host = normalize_host(host);
        self.http
            .values()
            .filter(|r| r.tls && r.host.as_deref() == Some(host.as_str()))
            .min_by_key(|r| (r.public_port != 443, r.public_port))
    }

    pub fn tcp_route(&self, port: u16) -> Option<&TcpRoute> {
        self.tcp.get(&port)
    }

    pub fn http_routes(&self) -> impl Iterator<Item = &HttpRoute> {
        self.http.values()
    }

    pub fn tcp_routes(&self) -> impl Iterator<Item = &TcpRoute> {
        self.tcp.values()
    }

    /// The hostnames that need a certificate (every https route's), sorted, without repeats.
    pub fn tls_hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .http
            .values()
            .filter(|r| r.tls)
            .filter_map(|r| r.host.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn listener_name(k: Listener) -> &'static str {
    match k {
        Listener::Http => "http",
        Listener::Https => "https",
        Listener::Tcp => "tcp",
    }
}

fn backends(containers: &[ContainerInput], port: u16) -> Vec<Backend> {
    let mut v: Vec<Backend> = containers
        .iter()
        .map(|c| Backend {
            addr: SocketAddr::new(c.ip, port),
            local: c.local,
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn svc(name: &str, ports: &[&str], ips: &[(u8, bool)]) -> ServiceInput {
        ServiceInput {
            name: name.into(),
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
            containers: ips
                .iter()
                .map(|(last, local)| ContainerInput {
                    ip: IpAddr::V4(Ipv4Addr::new(10, 210, 1, *last)),
                    local: *local,
                })
                .collect(),
        }
    }

    #[test]
    fn hosts_route_to_their_service_and_https_hosts_get_redirected() {
        let t = RouteTable::build(&[
            svc(
                "web",
                &["app.example.com:8000/https"],
                &[(2, true), (3, false)],
            ),
            svc("blog", &["Blog.Example.com:80/http"], &[(4, false)]),
        ]);
        assert_eq!(
            t.listeners,
            BTreeMap::from([(80, Listener::Http), (443, Listener::Https)])
        );
        let r = t.http_route(443, "APP.example.com.").unwrap();
        assert_eq!(r.service, "web");
        assert_eq!(r.backends.len(), 2);
        assert_eq!(r.backends[0].addr.port(), 8000);
        assert_eq!(
            t.http_route(80, "blog.example.com:80").unwrap().service,
            "blog"
        );
        assert!(t.http_route(80, "app.example.com").is_none());
        assert_eq!(t.https_route_for("app.example.com").unwrap().service, "web");
        assert!(t.https_route_for("blog.example.com").is_none());
        assert!(t.http_route(443, "other.example.com").is_none());
        assert_eq!(t.tls_hosts(), ["app.example.com"]);
    }

    #[test]
    fn the_older_service_keeps_a_host_and_a_port() {
        let t = RouteTable::build(&[
            svc("a", &["x.example.com:80/http", "5432/tcp"], &[]),
            svc(
                "b",
                &["X.example.com:81/http", "y.example.com:5432:80/http"],
                &[],
            ),
            svc("c", &["6000:5432/tcp", "53/udp", "8443/https"], &[]),
        ]);
        assert_eq!(t.http_route(80, "x.example.com").unwrap().service, "a");
        assert_eq!(t.tcp_route(5432).unwrap().service, "a");
        let why: Vec<&str> = t.refused.iter().map(|r| r.why.as_str()).collect();
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(
            why[0].contains("already routed to service \"a\""),
            "{why:?}"
        );
        assert!(why[1].contains("port 5432 is already a tcp port of service \"a\""));
        assert!(why[2].contains("does not forward UDP"));
        assert!(why[3].contains("needs a hostname"));
        assert_eq!(t.tcp_route(6000).unwrap().service, "c");
        assert_eq!(t.tcp_route(6000).unwrap().backends, vec![]);
    }

    #[test]
    fn a_route_without_hostname_is_its_ports_fallback() {
        let t = RouteTable::build(&[
            svc("named", &["n.example.com:80/http"], &[]),
            svc("any", &["8080/http"], &[]),
        ]);
        assert_eq!(t.http_route(80, "n.example.com").unwrap().service, "named");
        assert_eq!(t.http_route(80, "whatever.test").unwrap().service, "any");
    }

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("A.B.c:8443"), "a.b.c");
        assert_eq!(normalize_host("a.b.c."), "a.b.c");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("a.b"), "a.b");
    }
}
