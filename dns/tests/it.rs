//! Component tests: the real server on loopback sockets, asked by hickory's resolver and by
//! `dig` (package dnsutils); an upstream resolver run by the test for forwarded names.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uc_dns::{ContainerRec, DnsView, ForwardConfig, Handler, MachineRec, PortRec, ServiceRec};

fn view(web_replicas: u8) -> DnsView {
    let mut v = DnsView {
        this_machine: "pi".into(),
        serial: 1,
        ..Default::default()
    };
    v.machines.insert(
        "pi".into(),
        MachineRec {
            name: "pi".into(),
            v4: Ipv4Addr::new(10, 210, 2, 1),
            v6: "fd00:0:0:2::1".parse().unwrap(),
        },
    );
    let containers = (0..web_replicas)
        .map(|i| ContainerRec {
            name: format!("c{i:015}"),
            machine: "pi".into(),
            v4: Ipv4Addr::new(10, 210, 2, 10 + i),
            v6: None,
            healthy: true,
        })
        .collect();
    v.services.insert(
        "web".into(),
        ServiceRec {
            containers,
            ports: vec![PortRec {
                name: "http".into(),
                tcp: true,
                port: 80,
            }],
        },
    );
    v
}

/// A tiny upstream: `www.example.test` is 192.0.2.7, everything else NXDOMAIN.
async fn upstream() -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
            r.queries = q.queries.clone();
            let name = q.queries[0].name().clone();
            if name.to_ascii() == "www.example.test." {
                r.answers.push(Record::from_rdata(
                    name,
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
                ));
            } else {
                r.metadata.response_code = ResponseCode::NXDomain;
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    addr
}

struct Running {
    addr: SocketAddr,
    views: watch::Sender<Arc<DnsView>>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(v: DnsView, upstreams: Vec<SocketAddr>) -> Running {
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (views, rx) = watch::channel(Arc::new(v));
    let handler = Handler::new(
        rx,
        ForwardConfig {
            upstreams,
            timeout: Duration::from_millis(500),
            ..Default::default()
        },
        &[addr],
    );
    let stop = CancellationToken::new();
    tokio::spawn(uc_dns::serve(handler, vec![udp], vec![tcp], stop.clone()));
    Running { addr, views, stop }
}

/// `dig @addr -p port ARGS +short`-style output lines, with the full text for checks.
async fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", addr.ip()))
        .args(["-p", &addr.port().to_string(), "+time=2", "+tries=1"])
        .args(args);
    let out = tokio::task::spawn_blocking(move || {
        cmd.output().expect("dig (package dnsutils) is needed")
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn dig_sees_every_name_form_nxdomain_and_forwarding() {
    let up = upstream().await;
    let s = start(view(2), vec![up]).await;
    let short = dig(s.addr, &["web.internal", "A", "+short"]).await;
    let mut got: Vec<&str> = short.lines().collect();
    got.sort();
    assert_eq!(got, ["10.210.2.10", "10.210.2.11"], "{short}");
    assert_eq!(
        dig(s.addr, &["pi.machine.internal", "+short"]).await.trim(),
        "10.210.2.1"
    );
    assert_eq!(
        dig(s.addr, &["pi.machine.internal", "AAAA", "+short"])
            .await
            .trim(),
        "fd00:0:0:2::1"
    );
    assert_eq!(
        dig(s.addr, &["c000000000000001.pi.machine.internal", "+short"])
            .await
            .trim(),
        "10.210.2.11"
    );
    let srv = dig(s.addr, &["_http._tcp.web.internal", "SRV", "+short"]).await;
    assert!(
        srv.contains("10 10 80 c000000000000000.pi.machine.internal."),
        "{srv}"
    );
    // Unknown names: NXDOMAIN with the zone's SOA.
    let nx = dig(s.addr, &["db.internal"]).await;
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains("IN\tSOA"),
        "{nx}"
    );
    // Forwarded: the upstream's answer, and its NXDOMAIN.
    assert_eq!(
        dig(s.addr, &["www.example.test", "+short"]).await.trim(),
        "192.0.2.7"
    );
    let fnx = dig(s.addr, &["nope.example.test"]).await;
    assert!(fnx.contains("status: NXDOMAIN"), "{fnx}");
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let s = start(view(100), vec![]).await;
    let udp = dig(s.addr, &["web.internal", "+noedns", "+ignore"]).await;
    assert!(udp.contains(" tc"), "no TC flag: {udp}");
    // dig retries over TCP when truncated.
    let full = dig(s.addr, &["web.internal", "+noedns", "+short"]).await;
    assert_eq!(full.lines().count(), 100, "{full}");
}

#[tokio::test]
async fn records_follow_the_view_while_serving() {
    let s = start(view(1), vec![]).await;
    assert_eq!(
        dig(s.addr, &["web.internal", "+short"]).await.trim(),
        "10.210.2.10"
    );
    let mut v = view(0);
    v.services.remove("web");
    s.views.send(Arc::new(v)).unwrap();
    let nx = dig(s.addr, &["web.internal"]).await;
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
}

#[tokio::test]
async fn hickorys_resolver_gets_answers_and_rotation() {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    let s = start(view(3), vec![]).await;
    let mut ns = NameServerConfig::udp_and_tcp(s.addr.ip());
    for c in &mut ns.connections {
        c.port = s.addr.port();
    }
    let mut b = hickory_resolver::Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], vec![ns]),
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    );
    b.options_mut().cache_size = 0;
    let r = b.build().unwrap();
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let ips: Vec<_> = r.lookup_ip("web.internal.").await.unwrap().iter().collect();
        assert_eq!(ips.len(), 3);
        firsts.insert(ips[0]);
    }
    assert!(firsts.len() > 1, "the order never rotated: {firsts:?}");
}

#[tokio::test]
async fn garbage_and_loops_do_not_hurt() {
    let s = start(view(1), vec![]).await;
    // Garbage on the port.
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for n in [0usize, 1, 11, 12, 300] {
        junk.send_to(&vec![0xffu8; n], s.addr).await.unwrap();
    }
    assert_eq!(
        dig(s.addr, &["web.internal", "+short"]).await.trim(),
        "10.210.2.10"
    );
    // Its own address as upstream is dropped: a forwarded name fails fast instead of looping.
    let (_tx, rx) = watch::channel(Arc::new(view(1)));
    let h = Handler::new(
        rx,
        ForwardConfig {
            upstreams: vec![s.addr],
            ..Default::default()
        },
        &[s.addr],
    );
    assert!(h.upstreams().is_empty());
    let fail = dig(s.addr, &["www.example.test"]).await;
    assert!(fail.contains("status: SERVFAIL"), "{fail}");
}
