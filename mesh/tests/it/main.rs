//! Component tests of the userspace WireGuard device: a real TUN interface
//! in a network namespace the test makes (and deletes, by name, even when it
//! fails). Needs root.

use std::fs::File;
use std::net::SocketAddr;
use std::process::Command;

use uc_mesh::{KeyPair, MeshDevice, PeerConfig, PeerOp, PublicKey, UserspaceDevice};

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
        UserspaceDevice::create("uct0", &KeyPair::generate().unwrap().private, 51820, 1).unwrap()
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
        UserspaceDevice::create("uct1", &KeyPair::generate().unwrap().private, 51830, 1)
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
        let dev = UserspaceDevice::create("uct2", &KeyPair::generate().unwrap().private, 51840, 1)
            .unwrap();
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
