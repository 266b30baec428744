//! The kernel backend against the kernel's own WireGuard module. When this
//! machine's kernel has none, the test boots Debian's cloud kernel (which
//! has it) under QEMU, with this very test binary on the guest's disk, and
//! runs the same test in there: the guest's serial console carries the
//! test's output back. The guest has no network device at all.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use uc_mesh::{KernelDevice, KeyPair, MeshDevice, PeerConfig, PeerOp, PeerStatus, UserspaceDevice};

use super::{Netns, configure, digest_server_at, payload, sha256, tcp_exchange, veth};

/// Set in the guest: run the scenario, whatever the probe says.
const IN_GUEST: &str = "UC_MESH_IN_GUEST";
/// The modules the scenario needs in the guest, loaded in this order after
/// their dependencies.
const GUEST_MODULES: &str = "veth tun wireguard";
const PORT: u16 = 51850;
const WG: &str = "ucwg";

#[test]
fn kernel_devices_carry_traffic_with_each_other_and_with_uc_userspace_devices() {
    if std::env::var_os(IN_GUEST).is_some() || host_has_wireguard() {
        scenario();
    } else {
        run_in_guest(
            "kernel::kernel_devices_carry_traffic_with_each_other_and_with_uc_userspace_devices",
        );
    }
}

/// Whether this kernel makes WireGuard interfaces (tried in a namespace of
/// the test's own).
fn host_has_wireguard() -> bool {
    let ns = Netns::new("kprobe");
    ns.run(
        || match KernelDevice::create("uckprobe", &KeyPair::generate().unwrap().private, 0) {
            Ok(_) => true,
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("no WireGuard module"), "an unclear error: {e}");
                eprintln!("{e}: the test runs in a QEMU guest");
                false
            }
        },
    )
}

fn cfg(x: u8, endpoint: &str) -> PeerConfig {
    PeerConfig {
        allowed_ips: vec![format!("10.210.{x}.0/24").parse().unwrap()],
        endpoint: Some(SocketAddr::new(endpoint.parse().unwrap(), PORT)),
        keepalive: 25,
    }
}

/// TCP from `from` to machine `x` (in `to`): what arrives is what was sent.
fn exchange(from: &Netns, to: &Netns, x: u8, port: u16) {
    let data = payload(256 << 10, x);
    let at = SocketAddr::from(([10, 210, x, 1], port));
    let server = digest_server_at(&to.0, at, b"ok".to_vec());
    let sent = data.clone();
    let back = from
        .run(move || tcp_exchange(at, &sent))
        .unwrap_or_else(|e| panic!("TCP from {} to {at}: {e}", from.0));
    server.join().unwrap();
    assert_eq!(
        back[..32],
        sha256(&data)[..],
        "what arrived at {at} changed"
    );
    assert_eq!(&back[32..], b"ok");
}

fn peer_of(dev: &mut dyn MeshDevice, key: &KeyPair) -> Option<PeerStatus> {
    let st = dev.status().unwrap();
    st.peers.into_iter().find(|p| p.public_key == key.public)
}

/// Machines 1 and 2 on the kernel's WireGuard, machine 3 on uc's userspace
/// device; a veth between each two of them.
fn scenario() {
    let (n1, n2, n3) = (Netns::new("k1"), Netns::new("k2"), Netns::new("u3"));
    veth(&n1, "172.31.12.1", &n2, "172.31.12.2", "12");
    veth(&n1, "172.31.13.1", &n3, "172.31.13.3", "13");
    veth(&n2, "172.31.23.2", &n3, "172.31.23.3", "23");
    let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate().unwrap()).collect();
    let kernel = |ns: &Netns, k: &KeyPair| {
        let private = k.private.clone();
        ns.run(move || KernelDevice::create(WG, &private, PORT).unwrap())
    };
    let mut d1 = kernel(&n1, &keys[0]);
    let mut d2 = kernel(&n2, &keys[1]);
    let private = keys[2].private.clone();
    let mut d3 = n3.run(move || UserspaceDevice::create(WG, &private, PORT).unwrap());
    for (ns, x) in [(&n1, 1), (&n2, 2), (&n3, 3)] {
        configure(ns, WG, x);
    }

    // Kernel to kernel.
    d1.apply(&[PeerOp::Add(keys[1].public, cfg(2, "172.31.12.2"))])
        .unwrap();
    d2.apply(&[PeerOp::Add(keys[0].public, cfg(1, "172.31.12.1"))])
        .unwrap();
    exchange(&n1, &n2, 2, 5101);
    let st = d1.status().unwrap();
    assert_eq!(st.public_key, Some(keys[0].public));
    assert_eq!(st.listen_port, PORT);
    let p = peer_of(&mut d1, &keys[1]).expect("machine 2 is a peer of machine 1");
    assert_eq!(p.endpoint, Some("172.31.12.2:51850".parse().unwrap()));
    assert_eq!(p.allowed_ips, cfg(2, "172.31.12.2").allowed_ips);
    assert_eq!(p.keepalive, 25);
    assert!(p.tx_bytes > 256 << 10 && p.rx_bytes > 0, "{p:?}");
    let first = p.last_handshake_age.expect("a handshake with machine 2");

    // A third machine, on the userspace device: both kernels reach it and
    // it reaches them, and the first tunnel's session is left alone.
    d1.apply(&[PeerOp::Add(keys[2].public, cfg(3, "172.31.13.3"))])
        .unwrap();
    d2.apply(&[PeerOp::Add(keys[2].public, cfg(3, "172.31.23.3"))])
        .unwrap();
    d3.apply(&[
        PeerOp::Add(keys[0].public, cfg(1, "172.31.13.1")),
        PeerOp::Add(keys[1].public, cfg(2, "172.31.23.2")),
    ])
    .unwrap();
    exchange(&n1, &n3, 3, 5102);
    exchange(&n3, &n2, 2, 5103);
    let again = peer_of(&mut d1, &keys[1])
        .unwrap()
        .last_handshake_age
        .unwrap();
    assert!(
        again >= first,
        "adding a peer redid machine 2's handshake ({first:?}, then {again:?})"
    );

    // A change (the diff's removal and addition of one peer) is made in
    // place: the session survives it.
    let mut changed = cfg(2, "172.31.12.2");
    changed.keepalive = 10;
    d1.apply(&[
        PeerOp::Remove(keys[1].public),
        PeerOp::Add(keys[1].public, changed),
    ])
    .unwrap();
    let p = peer_of(&mut d1, &keys[1]).unwrap();
    assert_eq!(p.keepalive, 10);
    assert!(
        p.last_handshake_age.unwrap() >= again,
        "the change redid the handshake: {p:?}"
    );
    exchange(&n1, &n2, 2, 5104);

    // A removed peer is gone, and nothing reaches it any more.
    d1.apply(&[PeerOp::Remove(keys[1].public)]).unwrap();
    assert!(peer_of(&mut d1, &keys[1]).is_none());
    assert_eq!(d1.status().unwrap().peers.len(), 1);
    let gone = n1.run(|| tcp_exchange("10.210.2.1:5105".parse().unwrap(), b"hello"));
    assert!(gone.is_err(), "machine 1 still reaches a removed peer");

    // Another device on a port in use: a clear error.
    let private = keys[1].private.clone();
    let taken = n2.run(move || KernelDevice::create("ucwg9", &private, PORT).err());
    let taken = taken
        .expect("a second device took a port in use")
        .to_string();
    assert!(
        taken.contains("51850") && taken.contains("taken"),
        "{taken}"
    );
    // A name that belongs to an interface of another kind is never taken over.
    let private = keys[1].private.clone();
    let other = n2.run(move || KernelDevice::create("ucv12b", &private, PORT + 1).err());
    let other = other.expect("a veth was replaced").to_string();
    assert!(other.contains("another kind"), "{other}");
    assert!(link_exists(&n2, "ucv12b"));

    // An agent killed without dropping its device leaves the interface; the
    // next start replaces it, and dropping the device removes it.
    std::mem::forget(d1);
    assert!(link_exists(&n1, WG));
    let private = keys[0].private.clone();
    let mut d1 = n1.run(move || KernelDevice::create(WG, &private, PORT).unwrap());
    assert!(
        d1.status().unwrap().peers.is_empty(),
        "the old interface's peers survived"
    );
    drop(d1);
    assert!(!link_exists(&n1, WG), "a dropped device left its interface");
    drop((d2, d3));
}

fn link_exists(ns: &Netns, link: &str) -> bool {
    Command::new("ip")
        .args(["-n", &ns.0, "link", "show", link])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Runs test `name` of this binary inside a QEMU guest whose kernel has
/// WireGuard (`scripts/vm-kit.sh guest`), and fails with the guest's console
/// if it fails there.
fn run_in_guest(name: &str) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("bash")
        .arg(repo.join("scripts/vm-kit.sh"))
        .args(["guest", "-m", GUEST_MODULES])
        .arg("-b")
        .arg(format!("{}:/uc-test", exe.display()))
        .args([
            "-b",
            "ip",
            "-e",
            &format!("{IN_GUEST}=1"),
            "-e",
            "RUST_BACKTRACE=1",
        ])
        .args([
            "--",
            "/uc-test",
            name,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "the guest's console:\n{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the guest ended with {}", out.status);
    assert!(
        console.contains("test result: ok. 1 passed"),
        "the test did not pass in the guest"
    );
}
