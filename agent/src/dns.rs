//! The agent's DNS server: answers the cluster's names from this replica of the state (so they
//! work during a partition) on the machine's mesh addresses (IPv4 and IPv6, following them when
//! the machine's /24 moves), port 53, UDP and TCP; forwards other names to the machine's
//! upstream resolvers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uc_crdt::{ClusterState, DesiredState};
use uc_dns::{ContainerRec, DnsView, ForwardConfig, MachineRec, PortRec, ServiceRec};
use uc_mesh::MeshAddressing;
use uc_proto::MachineId;

use crate::node::Node;

/// The cluster's names as machine `me` serves them; `heads` (the state's heads digest) gives
/// the SOA serial, so any change of the state gives another one.
pub fn view(doc: &ClusterState, me: &MachineId, heads: &str) -> DnsView {
    let addressing = MeshAddressing::new(&doc.cluster_id(), doc.network());
    let machines = doc.machines();
    let mut v = DnsView {
        this_machine: machines
            .iter()
            .find(|m| &m.id == me)
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        serial: u32::from_str_radix(heads.get(..8).unwrap_or("0"), 16).unwrap_or(0),
        ..Default::default()
    };
    let mut names = BTreeMap::new();
    for m in machines.iter().filter(|m| m.is_active()) {
        names.insert(m.id.clone(), m.name.clone());
        if let Some(v4) = addressing.machine_v4(m.subnet) {
            v.machines.insert(
                m.name.clone(),
                MachineRec {
                    name: m.name.clone(),
                    v4,
                    v6: addressing
                        .v6_of(v4)
                        .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
                },
            );
        }
    }
    let mut by_id = BTreeMap::new();
    for s in doc.services() {
        by_id.insert(s.id.clone(), s.name.clone());
        v.services.insert(
            s.name.clone(),
            ServiceRec {
                containers: Vec::new(),
                ports: ports(&s.spec),
            },
        );
    }
    for c in doc.containers() {
        let (Some(service), Some(machine), Some(v4)) =
            (by_id.get(&c.service), names.get(&c.machine), c.address)
        else {
            continue;
        };
        if let Some(s) = v.services.get_mut(service) {
            s.containers.push(ContainerRec {
                name: c.id.to_string(),
                machine: machine.clone(),
                v4,
                v6: addressing.v6_of(v4),
                healthy: c.desired == DesiredState::Running,
            });
        }
    }
    v
}

/// A service's published ports from its spec: `"ports": ["80/tcp", {"name": "http", "port":
/// 80, "protocol": "tcp"}]`.
fn ports(spec: &serde_json::Value) -> Vec<PortRec> {
    let Some(list) = spec.get("ports").and_then(|p| p.as_array()) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|p| {
            let (port, proto, name) = match p {
                serde_json::Value::String(s) => {
                    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
                    let port = port.rsplit(':').next()?.parse::<u16>().ok()?;
                    (port, proto.to_string(), None)
                }
                serde_json::Value::Number(n) => {
                    (u16::try_from(n.as_u64()?).ok()?, "tcp".into(), None)
                }
                serde_json::Value::Object(o) => (
                    u16::try_from(o.get("port")?.as_u64()?).ok()?,
                    o.get("protocol")
                        .and_then(|v| v.as_str())
                        .unwrap_or("tcp")
                        .to_string(),
                    o.get("name").and_then(|v| v.as_str()).map(str::to_string),
                ),
                _ => return None,
            };
            Some(PortRec {
                name: name.unwrap_or_else(|| port.to_string()),
                tcp: proto != "udp",
                port,
            })
        })
        .collect()
}

/// The upstream resolvers: configured ones, else the machine's /etc/resolv.conf.
pub fn upstreams(configured: &[SocketAddr]) -> Vec<SocketAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    uc_dns::parse_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
}

/// The addresses DNS listens on: this machine's mesh addresses, IPv4 first (none before the
/// machine has a /24).
fn listen_ips(node: &Node, mesh: &crate::mesh::Mesh) -> Vec<IpAddr> {
    let Some((v4, v6)) = node
        .read(|doc| doc.machine(&node.machine_id))
        .map(|m| mesh.addresses_of(m.subnet))
    else {
        return Vec::new();
    };
    v4.map(IpAddr::V4)
        .into_iter()
        .chain(v6.map(IpAddr::V6))
        .collect()
}

/// Sockets bound on port `port` of each of `ips`, UDP and TCP.
struct Bound {
    addrs: Vec<SocketAddr>,
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
}

async fn bind(ips: &[IpAddr], port: u16) -> anyhow::Result<Bound> {
    let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
    let (mut udp, mut tcp) = (Vec::new(), Vec::new());
    for addr in &addrs {
        udp.push(
            tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding DNS on {addr}/udp"))?,
        );
        tcp.push(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding DNS on {addr}/tcp"))?,
        );
    }
    Ok(Bound { addrs, udp, tcp })
}

/// Serves the view on `bound` until `stop`.
fn spawn_server(
    bound: Bound,
    view: watch::Receiver<Arc<DnsView>>,
    upstream: &[SocketAddr],
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let handler = uc_dns::Handler::new(
        view,
        ForwardConfig {
            upstreams: upstreams(upstream),
            ..Default::default()
        },
        &bound.addrs,
    );
    tracing::info!(addrs = ?bound.addrs, upstreams = ?handler.upstreams(), "DNS serving");
    tracker.spawn(async move {
        if let Err(e) = uc_dns::serve(handler, bound.udp, bound.tcp, stop).await {
            tracing::error!(error = %e, "DNS server stopped");
        }
    });
}

/// Serves DNS on this machine's mesh addresses, port `port`, UDP and TCP, until shutdown: keeps
/// the view current and, when the machine's /24 moves (the state's clash rule), listens on its
/// new addresses instead (`Node::dns` says where it listens). Serves nothing if the machine has
/// no /24 when it starts.
pub async fn start(
    node: Arc<Node>,
    mesh: Arc<crate::mesh::Mesh>,
    port: u16,
    upstream: &[SocketAddr],
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut ips = listen_ips(&node, &mesh);
    if ips.is_empty() {
        return Ok(());
    }
    let bound = bind(&ips, port).await?;
    node.set_dns(Some(bound.addrs[0]));
    let mut heads = node.subscribe_heads();
    let digest = heads.borrow_and_update().clone();
    let (tx, rx) = watch::channel(Arc::new(
        node.read(|doc| view(doc, &node.machine_id, &digest)),
    ));
    let mut serving = shutdown.child_token();
    spawn_server(bound, rx.clone(), upstream, tracker, serving.clone());
    let (upstream, tracker2) = (upstream.to_vec(), tracker.clone());
    tracker.spawn(async move {
        // While the addresses moved but are not on the interface yet, binding is retried.
        let mut retry = tokio::time::interval(Duration::from_millis(200));
        let mut moved = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = heads.changed() => {
                    if r.is_err() { break }
                    let digest = heads.borrow_and_update().clone();
                    let v = node.read(|doc| view(doc, &node.machine_id, &digest));
                    if **tx.borrow() != v {
                        tx.send_replace(Arc::new(v));
                    }
                }
                _ = retry.tick(), if moved => {}
            }
            let want = listen_ips(&node, &mesh);
            moved = !want.is_empty() && want != ips;
            if !moved {
                continue;
            }
            // The old server goes first: its addresses left the interface with the move, and
            // one the new set shares would not bind while it holds it.
            serving.cancel();
            match bind(&want, port).await {
                Ok(bound) => {
                    tracing::warn!(from = ?ips, to = ?want, "this machine's mesh addresses moved; DNS follows");
                    serving = shutdown.child_token();
                    node.set_dns(Some(bound.addrs[0]));
                    spawn_server(bound, rx.clone(), &upstream, &tracker2, serving.clone());
                    ips = want;
                    moved = false;
                }
                Err(e) => tracing::debug!(error = %e, "DNS cannot listen on the new addresses yet"),
            }
        }
    });
    Ok(())
}

/// Asks the DNS server at `server` for `name` `rtype` over UDP (TCP when the answer is
/// truncated): response code, answer lines, authority lines.
pub async fn query(
    server: SocketAddr,
    name: &str,
    rtype: &str,
) -> anyhow::Result<(String, Vec<String>, Vec<String>)> {
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let qtype: RecordType = rtype
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown record type {rtype:?}"))?;
    let qname = Name::from_ascii(if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    })
    .map_err(|e| anyhow::anyhow!("invalid name {name:?}: {e}"))?;
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.queries.push(Query::query(qname, qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    msg.edns = Some(edns);
    let bytes = msg.to_vec()?;
    let bind = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(&bytes).await?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .context("no answer within 3 s")??;
    let mut reply = Message::from_vec(&buf[..n])?;
    if reply.metadata.truncation {
        let mut tcp = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(server),
        )
        .await
        .context("no TCP connection within 3 s")??;
        tcp.write_all(&(bytes.len() as u16).to_be_bytes()).await?;
        tcp.write_all(&bytes).await?;
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).await?;
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        tcp.read_exact(&mut body).await?;
        reply = Message::from_vec(&body)?;
    }
    let line = |r: &hickory_proto::rr::Record| {
        format!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data)
    };
    Ok((
        reply.metadata.response_code.to_string(),
        reply.answers.iter().map(line).collect(),
        reply.authorities.iter().map(line).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        let spec = serde_json::json!({"ports": ["80/tcp", "8080:53/udp", 443, {"name": "http", "port": 8000}, "junk"]});
        let p: Vec<(String, bool, u16)> = ports(&spec)
            .into_iter()
            .map(|p| (p.name, p.tcp, p.port))
            .collect();
        assert_eq!(
            p,
            [
                ("80".into(), true, 80),
                ("53".into(), false, 53),
                ("443".into(), true, 443),
                ("http".into(), true, 8000)
            ]
        );
    }
}
