//! Component tests of the userspace WireGuard device: a real TUN interface
//! in a network namespace the test makes (and deletes, by name, even when it
//! fails). Needs root.

use std::fs::File;
use std::net::SocketAddr;
use std::process::Command;

use uc_mesh::{KeyPair, MeshDevice, PeerConfig, PeerOp, PublicKey, UserspaceDevice};

mod kernel;

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("ucmt-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
        Netns(name)
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/run/netns/{}", self.0)).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn peer(x: u8, ep: u8) -> PeerConfig {
    PeerConfig {
        allowed_ips: vec![format!("10.210.{x}.0/24").parse().unwrap()],
        endpoint: Some(SocketAddr::from(([172, 31, 0, ep], 51820))),
        keepalive: 25,
    }
}

#[test]
fn peers_change_one_at_a_time_and_the_others_stay() {
    let ns = Netns::new("peers");
    let (a, b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let mut dev = ns.run(|| {
        UserspaceDevice::create("uct0", &KeyPair::generate().unwrap().private, 51820).unwrap()
    });
    let endpoint_of = |dev: &mut UserspaceDevice, k: &PublicKey| {
        dev.status()
            .unwrap()
            .peers
            .into_iter()
            .find(|p| p.public_key == *k)
            .map(|p| (p.endpoint, p.allowed_ips, p.keepalive))
    };
    dev.apply(&[
        PeerOp::Add(a.public, peer(1, 1)),
        PeerOp::Add(b.public, peer(2, 2)),
    ])
    .unwrap();
    let st = dev.status().unwrap();
    assert_eq!(st.listen_port, 51820);
    assert_eq!(st.peers.len(), 2);
    // A change is a removal and an addition of that peer, in one apply.
    dev.apply(&[PeerOp::Remove(a.public), PeerOp::Add(a.public, peer(1, 9))])
        .unwrap();
    let (ep, ips, ka) = endpoint_of(&mut dev, &a.public).expect("a is still a peer");
    assert_eq!(ep, Some("172.31.0.9:51820".parse().unwrap()));
    assert_eq!(ips[0].to_string(), "10.210.1.0/24");
    assert_eq!(ka, 25);
    assert!(endpoint_of(&mut dev, &b.public).is_some());
    // Adding a peer the device already has replaces it instead of crashing boringtun.
    dev.apply(&[PeerOp::Add(b.public, peer(2, 7))]).unwrap();
    assert_eq!(
        endpoint_of(&mut dev, &b.public).unwrap().0,
        Some("172.31.0.7:51820".parse().unwrap())
    );
    dev.apply(&[PeerOp::Remove(b.public)]).unwrap();
    let st = dev.status().unwrap();
    assert_eq!(st.peers.len(), 1);
    assert_eq!(st.peers[0].public_key, a.public);
    drop(dev);
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let ns = Netns::new("port");
    let err = ns.run(|| {
        let _hold = std::net::UdpSocket::bind("0.0.0.0:51830").unwrap();
        UserspaceDevice::create("uct1", &KeyPair::generate().unwrap().private, 51830)
            .err()
            .map(|e| e.to_string())
    });
    let err = err.expect("the device started on a taken port");
    assert!(err.contains("51830") && err.contains("taken"), "{err}");
}

#[test]
fn configured_addresses_can_be_bound_at_once() {
    // The agent binds gossip and its peer API to the management address right after
    // configuring it: an IPv6 address still "tentative" (DAD pending) would refuse that.
    let ns = Netns::new("addr");
    let v4: std::net::IpAddr = "10.210.7.1".parse().unwrap();
    let v6: std::net::IpAddr = "fd12:3456:789a:0:1:2:3:4".parse().unwrap();
    let (dev, bound) = ns.run(|| {
        let dev =
            UserspaceDevice::create("uct2", &KeyPair::generate().unwrap().private, 51840).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(uc_mesh::netlink::configure(
            "uct2",
            &[(v4, 24), (v6, 128)],
            uc_mesh::MTU,
        ))
        .unwrap();
        let bound = [v4, v6].map(|ip| std::net::TcpListener::bind((ip, 0)).map(|_| ()));
        (dev, bound)
    });
    for r in &bound {
        assert!(r.is_ok(), "binding a configured address: {r:?}");
    }
    let out = Command::new("ip")
        .args(["-n", &ns.0, "-6", "addr", "show", "dev", "uct2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fd12:3456:789a:0:1:2:3:4/128"), "{text}");
    assert!(
        text.contains("nodad") && !text.contains("tentative"),
        "{text}"
    );
    drop(dev);
}

/// Runs `f` on a new thread inside namespace `ns` (the thread outlives
/// this call; join it).
fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// `n` bytes that differ from run to run and from side to side.
fn payload(n: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32 ^ (u32::from(seed) << 24) ^ std::process::id();
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// Sends `data` to `to` over TCP and reads back what the other side sends
/// until it closes.
fn tcp_exchange(to: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3))?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    c.set_write_timeout(Some(std::time::Duration::from_secs(20)))?;
    c.write_all(data)?;
    c.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    c.read_to_end(&mut back)?;
    Ok(back)
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().unwrap();
    assert!(ok.success(), "ip {args:?}");
}

/// A veth pair `ucv{tag}a` in `a`, `ucv{tag}b` in `b`, with the /24
/// addresses given, up (and each namespace's loopback up).
fn veth(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str, tag: &str) {
    let (la, lb) = (format!("ucv{tag}a"), format!("ucv{tag}b"));
    ip(&[
        "link", "add", &la, "netns", &a.0, "type", "veth", "peer", "name", &lb, "netns", &b.0,
    ]);
    for (ns, link, addr) in [(a, &la, a_ip), (b, &lb, b_ip)] {
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            link,
        ]);
        ip(&["-n", &ns.0, "link", "set", link, "up"]);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    }
}

/// Gives `link` in `ns` machine `x`'s mesh address (10.210.x.1/16) and
/// brings it up.
fn configure(ns: &Netns, link: &str, x: u8) {
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ip = std::net::IpAddr::from([10, 210, x, 1]);
        rt.block_on(uc_mesh::netlink::configure(link, &[(ip, 16)], uc_mesh::MTU))
            .unwrap();
    });
}

/// Two machines, each with a device, joined by a veth pair between two
/// namespaces of the test's own.
struct Pair {
    a: Netns,
    b: Netns,
    dev_a: UserspaceDevice,
    dev_b: UserspaceDevice,
    key_a: PublicKey,
    key_b: PublicKey,
}

fn pair() -> Pair {
    let (a, b) = (Netns::new("dpa"), Netns::new("dpb"));
    veth(&a, "172.31.9.1", &b, "172.31.9.2", "");
    let (ka, kb) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let up = |ns: &Netns, key: &KeyPair, x: u8| {
        let private = key.private.clone();
        let dev = ns.run(move || UserspaceDevice::create("uct3", &private, 51850).unwrap());
        configure(ns, "uct3", x);
        dev
    };
    let mut dev_a = up(&a, &ka, 1);
    let mut dev_b = up(&b, &kb, 2);
    let cfg = |x: u8, ep: u8| PeerConfig {
        allowed_ips: vec![format!("10.210.{x}.0/24").parse().unwrap()],
        endpoint: Some(SocketAddr::from(([172, 31, 9, ep], 51850))),
        keepalive: 25,
    };
    dev_a.apply(&[PeerOp::Add(kb.public, cfg(2, 2))]).unwrap();
    dev_b.apply(&[PeerOp::Add(ka.public, cfg(1, 1))]).unwrap();
    Pair {
        a,
        b,
        dev_a,
        dev_b,
        key_a: ka.public,
        key_b: kb.public,
    }
}

/// A TCP server in `ns` on 10.210.2.1:port that reads everything, then
/// answers with the SHA-256 of it followed by `reply`.
fn digest_server(ns: &str, port: u16, reply: Vec<u8>) -> std::thread::JoinHandle<()> {
    digest_server_at(ns, SocketAddr::from(([10, 210, 2, 1], port)), reply)
}

/// [`digest_server`] on any address.
fn digest_server_at(ns: &str, at: SocketAddr, reply: Vec<u8>) -> std::thread::JoinHandle<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = spawn_in(ns, move || {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind(at).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        c.write_all(&sha256(&got)).unwrap();
        c.write_all(&reply).unwrap();
    });
    rx.recv().unwrap();
    h
}

#[test]
fn two_devices_carry_tcp_and_udp_intact_in_both_directions() {
    let p = pair();
    // TCP in both directions: big writes become 64 KiB TSO segments on the
    // TUN device, GSO runs on the wire, and coalesced writes on the far side.
    let (up, down) = (payload(24 << 20, 1), payload(16 << 20, 2));
    let server = digest_server(&p.b.0, 5001, down.clone());
    let sent = up.clone();
    let back =
        p.a.run(move || tcp_exchange("10.210.2.1:5001".parse().unwrap(), &sent))
            .expect("TCP through the tunnel");
    server.join().unwrap();
    assert_eq!(back.len(), 32 + down.len());
    assert_eq!(back[..32], sha256(&up)[..], "what A sent arrived changed");
    assert!(back[32..] == down[..], "what B sent arrived changed");

    // UDP, which the offloads leave as single packets.
    let (tx, rx) = std::sync::mpsc::channel();
    let udp_server = spawn_in(&p.b.0, move || {
        let s = std::net::UdpSocket::bind("10.210.2.1:5002").unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        tx.send(()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2000];
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    });
    rx.recv().unwrap();
    p.a.run(|| {
        let s = std::net::UdpSocket::bind("10.210.1.1:0").unwrap();
        for i in 0..100u8 {
            s.send_to(&[i; 1200], "10.210.2.1:5002").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
    let got = udp_server.join().unwrap();
    assert!(got.len() >= 95, "{} of 100 datagrams arrived", got.len());
    for d in &got {
        assert!(
            d.len() == 1200 && d.iter().all(|b| *b == d[0]),
            "a datagram changed"
        );
    }

    // Each side reports the other with a handshake and the bytes moved.
    let mut dev_a = p.dev_a;
    let st = dev_a.status().unwrap();
    let peer = st.peers.iter().find(|x| x.public_key == p.key_b).unwrap();
    assert!(peer.last_handshake_age.is_some());
    assert!(
        peer.tx_bytes > 24 << 20 && peer.rx_bytes > 16 << 20,
        "{peer:?}"
    );
    drop(dev_a);
    drop(p.dev_b);
}

#[test]
fn a_peer_sending_from_outside_its_allowed_ips_is_dropped() {
    let mut p = pair();
    // B believes A owns 10.210.9.0/24 only: what A sends from 10.210.1.1
    // authenticates, and is dropped for its source.
    let wrong = PeerConfig {
        allowed_ips: vec!["10.210.9.0/24".parse().unwrap()],
        endpoint: Some(SocketAddr::from(([172, 31, 9, 1], 51850))),
        keepalive: 25,
    };
    p.dev_b
        .apply(&[PeerOp::Remove(p.key_a), PeerOp::Add(p.key_a, wrong)])
        .unwrap();
    let before = p.dev_b.dropped();
    let r =
        p.a.run(|| tcp_exchange("10.210.2.1:5003".parse().unwrap(), b"hello"));
    assert!(
        r.is_err(),
        "a connection through the tunnel succeeded: {r:?}"
    );
    assert!(p.dev_b.dropped() > before, "B dropped nothing");
    // The handshake itself succeeded: only the inner packets were refused.
    let st = p.dev_b.status().unwrap();
    let peer = st.peers.iter().find(|x| x.public_key == p.key_a).unwrap();
    assert!(peer.last_handshake_age.is_some(), "{peer:?}");
}

#[test]
fn an_underlay_with_a_smaller_mtu_still_carries_full_sized_packets() {
    // Behind PPPoE, say: 1,400 bytes on the wire, while the tunnel sends
    // 1,420-byte packets that become 1,480-byte datagrams. They must be
    // fragmented, not dropped.
    let p = pair();
    for (ns, link) in [(&p.a, "ucva"), (&p.b, "ucvb")] {
        let ok = Command::new("ip")
            .args(["-n", &ns.0, "link", "set", link, "mtu", "1400"])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let up = payload(4 << 20, 3);
    let server = digest_server(&p.b.0, 5004, b"ok".to_vec());
    let sent = up.clone();
    let back =
        p.a.run(move || tcp_exchange("10.210.2.1:5004".parse().unwrap(), &sent))
            .expect("TCP through the tunnel over a 1,400-byte underlay");
    server.join().unwrap();
    assert_eq!(back[..32], sha256(&up)[..]);
    assert_eq!(&back[32..], b"ok");
}
