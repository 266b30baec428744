//! Tests of the harness itself, with placeholder processes instead of agents: namespaces, links,
//! partitions, kill, detach, and cleanup after a panic or a dead test run.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use uc_e2e::{Cluster, ClusterBuilder, eventually, netns};

/// Whether a UDP datagram from machine `from` reaches machine `to` (a few tries).
fn reaches(c: &Cluster, from: usize, to: usize) -> bool {
    let to_ip = c.machine(to).ip;
    let from_ip = c.machine(from).ip;
    let rx = c
        .in_netns(to, || UdpSocket::bind((to_ip, 0)))
        .unwrap()
        .unwrap();
    let tx = c
        .in_netns(from, || UdpSocket::bind((from_ip, 0)))
        .unwrap()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let dest: SocketAddr = rx.local_addr().unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..4 {
        tx.send_to(b"ping", dest).unwrap();
        if let Ok((n, src)) = rx.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"ping");
            assert_eq!(src.ip(), from_ip);
            return true;
        }
    }
    false
}

#[test]
fn drop_removes_everything_even_after_a_panic() {
    /// What the cluster made: namespaces, processes, directory.
    type Made = (Vec<String>, Vec<u32>, PathBuf);
    let made: Mutex<Option<Made>> = Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = Cluster::start(ClusterBuilder::new(3).placeholder_agents()).unwrap();
        let mut names: Vec<String> = (0..c.len()).map(|i| c.machine(i).netns.clone()).collect();
        names.push(c.hub().to_string());
        let pids = (0..c.len()).map(|i| c.machine(i).pid().unwrap()).collect();
        let listed = netns::list().unwrap();
        for n in &names {
            assert!(listed.contains(n), "{n} missing from {listed:?}");
        }
        *made.lock().unwrap() = Some((names, pids, c.dir().to_path_buf()));
        panic!("a test failing while it holds a cluster");
    }));
    assert!(result.is_err());
    let (names, pids, dir) = made.lock().unwrap().take().expect("the cluster was made");
    let listed = netns::list().unwrap();
    for n in &names {
        assert!(!listed.contains(n), "{n} survived the panic: {listed:?}");
    }
    for pid in pids {
        assert!(
            !netns::alive(pid as i32),
            "process {pid} survived the panic"
        );
    }
    assert!(!dir.exists(), "{} survived the panic", dir.display());
}

#[test]
fn partition_cuts_groups_and_heal_restores() {
    let mut c = Cluster::start(ClusterBuilder::new(4).placeholder_agents()).unwrap();
    for (a, b) in [(0, 1), (0, 3), (2, 1), (3, 2)] {
        assert!(reaches(&c, a, b), "{a} -> {b} before the partition");
    }
    c.partition(&[0, 1]).unwrap();
    assert!(
        reaches(&c, 0, 1) && reaches(&c, 1, 0),
        "inside the cut-off group"
    );
    assert!(reaches(&c, 2, 3) && reaches(&c, 3, 2), "inside the rest");
    for (a, b) in [(0, 2), (2, 0), (1, 3), (3, 1)] {
        assert!(!reaches(&c, a, b), "{a} -> {b} across the partition");
    }
    c.heal().unwrap();
    for (a, b) in [(0, 2), (2, 0), (1, 3), (3, 1)] {
        assert!(reaches(&c, a, b), "{a} -> {b} after heal");
    }
    c.set_link(3, false).unwrap();
    assert!(!reaches(&c, 0, 3) && !reaches(&c, 3, 0), "link of 3 down");
    assert!(reaches(&c, 0, 2));
    c.heal().unwrap();
    assert!(reaches(&c, 0, 3), "link of 3 back up");
}

#[test]
fn machines_sit_in_their_own_namespaces_and_not_in_the_root_one() {
    let c = Cluster::start(ClusterBuilder::new(2).placeholder_agents()).unwrap();
    let out = c
        .exec_in(1, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{}/16", c.machine(1).ip)), "{text}");
    // The root namespace has no route into the test network.
    let root = std::process::Command::new("ip")
        .args(["-o", "-4", "addr"])
        .output()
        .unwrap();
    let root = String::from_utf8_lossy(&root.stdout);
    assert!(!root.contains(&format!(" {}/", c.machine(0).ip)), "{root}");
}

#[test]
fn kill9_kills_the_process_itself_not_a_wrapper() {
    let mut c = Cluster::start(ClusterBuilder::new(1).placeholder_agents()).unwrap();
    let pid = c.machine(0).pid().unwrap();
    // `ip netns exec` execs its command, so the child pid is the command's.
    eventually(
        Duration::from_secs(5),
        "the placeholder to be exec'd",
        || {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
            anyhow::ensure!(exe.ends_with("sleep"), "pid {pid} is {}", exe.display());
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(netns::pids(&c.machine(0).netns), vec![pid as i32]);
    c.kill9(0).unwrap();
    assert!(netns::pids(&c.machine(0).netns).is_empty());
    assert!(!netns::alive(pid as i32));
}

#[test]
fn detach_leaves_it_running_and_teardown_removes_it() {
    let base = netns::default_root().join(format!("detach-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let tag = format!("{}x9999", std::process::id());
    let c = Cluster::start(
        ClusterBuilder::new(2)
            .placeholder_agents()
            .tag(&tag)
            .base_dir(&base),
    )
    .unwrap();
    let names = [
        c.machine(0).netns.clone(),
        c.machine(1).netns.clone(),
        c.hub().to_string(),
    ];
    let pid = c.machine(0).pid().unwrap();
    let state = c.detach().unwrap();
    assert_eq!(state, base.join("cluster.json"));
    assert!(state.is_file());
    let listed = netns::list().unwrap();
    assert!(
        names.iter().all(|n| listed.contains(n)),
        "detached namespaces must stay: {listed:?}"
    );
    assert!(
        netns::alive(pid as i32),
        "detached process must keep running"
    );
    Cluster::teardown_detached(&state).unwrap();
    let listed = netns::list().unwrap();
    assert!(names.iter().all(|n| !listed.contains(n)), "{listed:?}");
    assert!(!base.exists());
    eventually(
        Duration::from_secs(5),
        "the detached process to die",
        || {
            anyhow::ensure!(!netns::alive(pid as i32));
            Ok(())
        },
    )
    .unwrap();
    Cluster::teardown_detached(&state).expect("teardown is idempotent");
}

#[test]
fn sweep_removes_leftovers_of_dead_runs_only() {
    // pid_max is at most 2^22, so this pid is never alive.
    let dead = netns::machine_ns_name("9999999x0", 0);
    let mine = netns::machine_ns_name(&format!("{}x8888", std::process::id()), 0);
    let _ = netns::delete(&dead);
    let _ = netns::delete(&mine);
    netns::add(&dead).unwrap();
    netns::add(&mine).unwrap();
    let mut orphan = std::process::Command::new("ip")
        .args(["netns", "exec", &dead, "sleep", "600"])
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the orphan to enter its namespace",
        || {
            anyhow::ensure!(!netns::pids(&dead).is_empty());
            Ok(())
        },
    )
    .unwrap();
    // Another test's cluster start may sweep it first; either way it must be gone.
    netns::sweep_stale(&netns::default_root()).unwrap();
    let listed = netns::list().unwrap();
    let _ = netns::delete(&mine);
    assert!(!listed.contains(&dead), "{listed:?}");
    assert!(listed.contains(&mine), "a live run's namespace must stay");
    let status = orphan.wait().unwrap();
    assert!(!status.success(), "the leftover process was killed");
}
