//! Workloads on namespace machines: `uc run` places nspawn containers of the demo image, they
//! serve HTTP over the mesh to workloads on other machines, `uc rm` leaves nothing behind, an
//! agent killed with -9 leaves its workloads running and adopts them when it restarts, a
//! crashed workload is restarted, and bad input is refused with nothing written. A machine that
//! runs its own dockerd runs Docker containers on the same mesh.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use uc_e2e::dockerd::{Dockerd, HostNetFacts};
use uc_e2e::workloads::{demo_image, mounts_under, processes_mentioning};
use uc_e2e::{Cluster, ClusterBuilder, eventually};

use crate::{nxdomain_everywhere, uc_ok, with_cluster};

const WAIT: Duration = Duration::from_secs(60);

pub(crate) fn import_demo(c: &Cluster, i: usize) -> anyhow::Result<()> {
    let image = demo_image()?;
    uc_ok(c, i, &["image", "import", image.to_str().context("path")?])?;
    Ok(())
}

fn ps(c: &Cluster, i: usize) -> anyhow::Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&uc_ok(c, i, &["-o", "json", "ps"])?)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// `curl` from machine `i`'s namespace (the machine itself, not a workload).
fn curl_from_machine(c: &Cluster, i: usize, url: &str) -> anyhow::Result<String> {
    let out = c.exec_in(i, &["curl", "-sS", "-m", "5", url])?;
    ensure!(
        out.status.success(),
        "curl {url} from {}: {}",
        c.machine(i).name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The network namespace file of a container on machine `i`.
fn workload_netns(c: &Cluster, i: usize, id: &str) -> PathBuf {
    c.machine(i)
        .data_dir
        .join("workloads")
        .join(id)
        .join("netns")
}

/// Runs `cmd` inside a container's network namespace: traffic leaves from its address, as its
/// own processes' would.
fn in_workload(c: &Cluster, i: usize, id: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let ns = workload_netns(c, i, id);
    let out = uc_e2e::process::run_with_timeout(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .arg("--")
            .args(cmd),
        Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success(),
        "{cmd:?} in container {id} on {}: {}",
        c.machine(i).name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn machine_index(c: &Cluster, name: &str) -> anyhow::Result<usize> {
    (0..c.len())
        .find(|&i| c.machine(i).name == name)
        .with_context(|| format!("no machine {name}"))
}

/// Links named like a workload's veth in machine `i`'s namespace.
fn workload_links(c: &Cluster, i: usize) -> anyhow::Result<Vec<String>> {
    let out = c.exec_in(i, &["ip", "-o", "link", "show"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("uc-"))
        .collect())
}

#[test]
fn nspawn_replicas_serve_http_across_the_mesh_and_rm_leaves_nothing() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(3), |c| {
        c.wait_membership()?;
        import_demo(c, 0)?;
        let out = uc_ok(
            c,
            0,
            &["-o", "json", "run", "-n", "web", "--replicas", "2", "demo"],
        )?;
        let run: Value = serde_json::from_str(&out)?;
        let placed = run["containers"].as_array().context("containers")?;
        ensure!(placed.len() == 2, "placed {run}");
        let containers = ps(c, 1)?;
        ensure!(containers.len() == 2, "ps: {containers:?}");
        let machines: BTreeSet<&str> = containers
            .iter()
            .map(|v| v["machine"].as_str().unwrap_or(""))
            .collect();
        ensure!(
            machines.len() == 2,
            "both replicas on one machine: {containers:?}"
        );
        for v in &containers {
            ensure!(v["state"] == "running", "not running: {v}");
        }
        // Every machine reaches every replica by its mesh address. ("running" means its process
        // started, as with `docker run`: the server in it listens a moment later.)
        for v in &containers {
            let addr = v["address"].as_str().context("address")?;
            let id = v["id"].as_str().context("id")?;
            for i in 0..3 {
                eventually(WAIT, "a replica answers", || {
                    let body = curl_from_machine(c, i, &format!("http://{addr}/cgi-bin/hello"))?;
                    ensure!(
                        body.trim() == format!("hello from web-{}", &id[..8]),
                        "{addr} from m{i}: {body:?}"
                    );
                    Ok(())
                })?;
            }
        }
        // A workload on A fetches from the replica on B, from its own address (no NAT).
        let (a, b) = (&containers[0], &containers[1]);
        let (a_id, b_addr) = (a["id"].as_str().unwrap(), b["address"].as_str().unwrap());
        let a_machine = machine_index(c, a["machine"].as_str().unwrap())?;
        let b_machine = machine_index(c, b["machine"].as_str().unwrap())?;
        let body = in_workload(
            c,
            a_machine,
            a_id,
            &["curl", "-sS", "-m", "5", &format!("http://{b_addr}/")],
        )?;
        ensure!(body.contains("Hello from uc"), "A -> B: {body:?}");
        let log = std::fs::read_to_string(
            c.machine(b_machine)
                .data_dir
                .join("workloads")
                .join(b["id"].as_str().unwrap())
                .join("log"),
        )?;
        let a_addr = a["address"].as_str().unwrap();
        ensure!(
            log.contains(&format!("{a_addr}]:")) || log.contains(&format!("{a_addr}:")),
            "B's log does not show A's address {a_addr}: {log}"
        );
        // The workload's resolver is its machine's DNS, which knows the service.
        let dig = in_workload(
            c,
            a_machine,
            a_id,
            &[
                "dig",
                "+short",
                "+time=2",
                "+tries=2",
                &format!("@{}", c.mesh_ip(a_machine)?),
                "web.internal",
            ],
        )?;
        let got: BTreeSet<&str> = dig.lines().collect();
        let want: BTreeSet<&str> = containers
            .iter()
            .map(|v| v["address"].as_str().unwrap())
            .collect();
        ensure!(
            got == want,
            "web.internal from a workload: {got:?}, want {want:?}"
        );
        // A workload on the machine with no replica resolves web.internal through its own
        // resolver (its machine's DNS) to the replicas on the other two, and connects by name.
        let third = (0..3)
            .find(|&i| !machines.contains(c.machine(i).name.as_str()))
            .context("a machine with no replica")?;
        let third_name = c.machine(third).name.clone();
        uc_ok(
            c,
            0,
            &["run", "-n", "client", "--machine", &third_name, "demo"],
        )?;
        eventually(
            WAIT,
            "the client resolves web.internal and connects by name",
            || {
                let out = c.uc(third, &["exec", "client", "nslookup", "web.internal"])?;
                let text = String::from_utf8_lossy(&out.stdout);
                for a in &want {
                    ensure!(
                        text.contains(a),
                        "nslookup web.internal in the client: {text}"
                    );
                }
                // (busybox 1.35's wget crashes with -T or -qO-.)
                let url = "http://web.internal/cgi-bin/hello";
                let out = c.uc(third, &["exec", "client", "wget", "-q", "-O", "-", url])?;
                let body = String::from_utf8_lossy(&out.stdout);
                ensure!(
                    out.status.success() && body.trim().starts_with("hello from web-"),
                    "wget {url} in the client: {body:?}"
                );
                Ok(())
            },
        )?;
        // Logs merged across machines: the request A made shows up.
        let logs = uc_ok(c, 2, &["logs", "web"])?;
        ensure!(logs.contains(a_addr), "uc logs web: {logs}");

        uc_ok(c, 2, &["rm", "web"])?;
        // Its name is gone on every machine within 1 s.
        nxdomain_everywhere(c, "web.internal", Duration::from_secs(1))?;
        uc_ok(c, 0, &["rm", "client"])?;
        eventually(WAIT, "nothing left of web", || {
            ensure!(ps(c, 0)?.is_empty(), "ps not empty");
            for i in 0..3 {
                let m = c.machine(i);
                let dirs: Vec<_> = std::fs::read_dir(m.data_dir.join("workloads"))
                    .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                ensure!(dirs.is_empty(), "{}: workload dirs left: {dirs:?}", m.name);
                let mounts = mounts_under(&m.data_dir);
                ensure!(mounts.is_empty(), "{}: mounts left: {mounts:?}", m.name);
                let links = workload_links(c, i)?;
                ensure!(links.is_empty(), "{}: links left: {links:?}", m.name);
                let procs = processes_mentioning(m.data_dir.join("workloads").to_str().unwrap());
                ensure!(procs.is_empty(), "{}: processes left: {procs:?}", m.name);
            }
            for v in &containers {
                let cg = PathBuf::from("/sys/fs/cgroup/systemd/uc").join(v["id"].as_str().unwrap());
                ensure!(!cg.exists(), "cgroup left: {}", cg.display());
            }
            Ok(())
        })?;
        Ok(())
    })
}

#[test]
fn kill9_of_an_agent_leaves_workloads_running_and_the_restart_adopts_them() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(2), |c| {
        c.wait_membership()?;
        import_demo(c, 0)?;
        uc_ok(
            c,
            0,
            &["run", "-n", "web", "-m", "m1", "-p", "8080:80@host", "demo"],
        )?;
        let before = ps(c, 0)?;
        ensure!(
            before.len() == 1 && before[0]["machine"] == "m1",
            "{before:?}"
        );
        let id = before[0]["id"].as_str().unwrap().to_string();
        let addr = before[0]["address"].as_str().unwrap().to_string();
        let pid = before[0]["pid"].as_u64().context("pid")?;
        ensure!(pid > 0, "no pid: {before:?}");
        eventually(WAIT, "m1:8080 answers", || {
            let body = curl_from_machine(c, 1, "http://127.0.0.1:8080/")?;
            ensure!(body.contains("Hello from uc"), "{body:?}");
            Ok(())
        })?;

        c.kill9(1)?;
        // The workload still serves on its machine. (Across the mesh it waits for the agent:
        // the userspace WireGuard backend runs inside the agent.)
        let body = curl_from_machine(c, 1, &format!("http://{addr}/"))?;
        ensure!(
            body.contains("Hello from uc"),
            "with m1's agent dead: {body:?}"
        );
        // So does its host port: the kernel forwards it, not the agent.
        let body = curl_from_machine(c, 1, "http://127.0.0.1:8080/")?;
        ensure!(
            body.contains("Hello from uc"),
            "m1:8080 with m1's agent dead: {body:?}"
        );
        c.restart(1)?;
        c.wait_ready(1)?;
        let after = eventually(WAIT, "m1 reports its container", || {
            let p = ps(c, 1)?;
            ensure!(p.len() == 1 && p[0]["state"] == "running", "{p:?}");
            Ok(p)
        })?;
        ensure!(after[0]["id"] == id.as_str(), "{after:?}");
        ensure!(
            after[0]["pid"].as_u64() == Some(pid),
            "not adopted: pid {pid} -> {}",
            after[0]["pid"]
        );
        ensure!(after[0]["restarts"] == 0, "restarted: {after:?}");
        eventually(WAIT, "m0 reaches the workload over the mesh again", || {
            let body = curl_from_machine(c, 0, &format!("http://{addr}/"))?;
            ensure!(body.contains("Hello from uc"), "{body:?}");
            Ok(())
        })?;
        let dirs = std::fs::read_dir(c.machine(1).data_dir.join("workloads"))?.count();
        ensure!(dirs == 1, "{dirs} workload dirs on m1");

        // A crash of the workload's process: restarted, with the same address.
        let payload: Vec<i32> = uc_workload::cgroup::pids(&id)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "httpd")
            })
            .collect();
        ensure!(!payload.is_empty(), "no httpd in the container's cgroup");
        for p in payload {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            )?;
        }
        eventually(WAIT, "the crashed workload runs again", || {
            let p = ps(c, 0)?;
            ensure!(p.len() == 1, "{p:?}");
            ensure!(
                p[0]["state"] == "running" && p[0]["restarts"].as_u64() >= Some(1),
                "{p:?}"
            );
            let body = curl_from_machine(c, 0, &format!("http://{addr}/"))?;
            ensure!(body.contains("Hello from uc"), "{body:?}");
            Ok(())
        })?;
        Ok(())
    })
}

/// `uc run` that must fail, with `want` in its error; the cluster's services are unchanged.
fn run_refused(c: &Cluster, args: &[&str], want: &str) -> anyhow::Result<()> {
    let before = c.dump(0)?["services"].clone();
    let out = c.uc(0, args)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "uc {args:?} succeeded");
    ensure!(err.contains(want), "uc {args:?}: {err:?} lacks {want:?}");
    ensure!(c.dump(0)?["services"] == before, "uc {args:?} wrote");
    Ok(())
}

/// machine `i`'s `route_localnet` on the workloads' bridge.
fn route_localnet(c: &Cluster, i: usize) -> anyhow::Result<String> {
    let out = c.exec_in(i, &["cat", "/proc/sys/net/ipv4/conf/ucbr0/route_localnet"])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// machine `i`'s nftables table of host ports, or "" when it has none.
fn ports_table(c: &Cluster, i: usize) -> anyhow::Result<String> {
    let out = c.exec_in(i, &["nft", "list", "table", "ip", "uc"])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn host_ports_forward_to_their_container_and_clashes_are_refused() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(2), |c| {
        c.wait_membership()?;
        import_demo(c, 0)?;
        uc_ok(
            c,
            0,
            &["run", "-n", "web", "-m", "m1", "-p", "8080:80@host", "demo"],
        )?;
        let m1_mesh = c.mesh_ip(1)?;
        let m1_underlay = c.machine(1).ip;
        eventually(WAIT, "m1's port 8080 answers from everywhere", || {
            for (from, url) in [
                (0, format!("http://{m1_mesh}:8080/")),
                (0, format!("http://{m1_underlay}:8080/")),
                (1, "http://127.0.0.1:8080/".to_string()),
                (1, format!("http://{m1_mesh}:8080/")),
            ] {
                let body = curl_from_machine(c, from, &url)?;
                ensure!(
                    body.contains("Hello from uc"),
                    "{url} from m{from}: {body:?}"
                );
            }
            Ok(())
        })?;

        ensure!(
            route_localnet(c, 1)? == "1",
            "route_localnet is off while forwarding"
        );
        // Someone deletes uc's table (restarting nftables.service flushes everything): the
        // agent notices within seconds and makes it again.
        let out = c.exec_in(1, &["nft", "delete", "table", "ip", "uc"])?;
        ensure!(out.status.success(), "nft delete table: {out:?}");
        eventually(WAIT, "m1's table comes back", || {
            ensure!(ports_table(c, 1)?.contains("tcp dport 8080"), "no table");
            let body = curl_from_machine(c, 0, &format!("http://{m1_mesh}:8080/"))?;
            ensure!(body.contains("Hello from uc"), "{body:?}");
            Ok(())
        })?;
        // Clashes are refused before anything is written, naming who holds the port.
        run_refused(
            c,
            &[
                "run",
                "-n",
                "web2",
                "-m",
                "m1",
                "-p",
                "8080:81@host",
                "demo",
            ],
            "host port 8080/tcp: m1: service \"web\" publishes 8080/tcp there",
        )?;
        run_refused(
            c,
            &[
                "run",
                "-n",
                "many",
                "--replicas",
                "3",
                "-p",
                "9090:80@host",
                "demo",
            ],
            "no machine can take another container publishing host port 9090/tcp",
        )?;
        run_refused(
            c,
            &[
                "run",
                "-n",
                "g",
                "--mode",
                "global",
                "-p",
                "8080:80@host",
                "demo",
            ],
            "machine \"m1\" cannot publish host port 8080/tcp: service \"web\" publishes",
        )?;
        run_refused(
            c,
            &["run", "-n", "v6", "-p", "[::1]:9090:80@host", "demo"],
            "IPv6",
        )?;
        // 8080/udp is another port: it may go to m1.
        uc_ok(
            c,
            0,
            &[
                "run",
                "-n",
                "dns",
                "-m",
                "m1",
                "-p",
                "8080:53/udp@host",
                "demo",
            ],
        )?;

        // A program on m1 holds 7070: the container waits, saying why, and starts once the
        // program lets go.
        let holder = c.in_netns(1, || std::net::TcpListener::bind("0.0.0.0:7070"))??;
        // `uc run` waits for the container and says why it does not run; the service stays.
        let out = c.uc(
            0,
            &[
                "run",
                "-n",
                "held",
                "-m",
                "m1",
                "-p",
                "7070:80@host",
                "demo",
            ],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("host port 7070/tcp is in use by a program"),
            "{err}"
        );
        eventually(WAIT, "m1 says why held does not run", || {
            let p = ps(c, 0)?;
            let held = p
                .iter()
                .find(|x| x["service"] == "held")
                .context("no held")?;
            let err = held["error"].as_str().unwrap_or_default();
            ensure!(err.contains("host port 7070/tcp is in use"), "{held:?}");
            Ok(())
        })?;
        ensure!(
            !ports_table(c, 1)?.contains("dport 7070"),
            "7070 forwarded while held"
        );
        drop(holder);
        eventually(WAIT, "held runs and m1:7070 answers", || {
            let body = curl_from_machine(c, 0, &format!("http://{m1_mesh}:7070/"))?;
            ensure!(body.contains("Hello from uc"), "{body:?}");
            Ok(())
        })?;

        // Removing a service takes its forward away; the last one takes the table.
        uc_ok(c, 0, &["rm", "web"])?;
        eventually(WAIT, "8080/tcp is no longer forwarded", || {
            let t = ports_table(c, 1)?;
            ensure!(!t.contains("tcp dport 8080"), "{t}");
            ensure!(
                t.contains("tcp dport 7070") && t.contains("udp dport 8080"),
                "{t}"
            );
            Ok(())
        })?;
        let gone = c.exec_in(
            0,
            &["curl", "-sS", "-m", "2", &format!("http://{m1_mesh}:8080/")],
        )?;
        ensure!(!gone.status.success(), "8080 still answers after uc rm web");
        uc_ok(c, 0, &["rm", "held"])?;
        uc_ok(c, 0, &["rm", "dns"])?;
        eventually(
            WAIT,
            "m1 has no port table and route_localnet is off",
            || {
                ensure!(ports_table(c, 1)?.is_empty(), "{}", ports_table(c, 1)?);
                ensure!(route_localnet(c, 1)? == "0", "route_localnet still on");
                Ok(())
            },
        )?;
        Ok(())
    })
}

#[test]
fn memory_and_cpu_limits_hold_in_the_container() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(1), |c| {
        c.wait_ready(0)?;
        import_demo(c, 0)?;
        uc_ok(
            c,
            0,
            &[
                "run", "-n", "lim", "--memory", "64m", "--cpu", "0.5", "demo",
            ],
        )?;
        let p = ps(c, 0)?;
        let id = p[0]["id"].as_str().context("id")?.to_string();
        // The limits are the kernel's, on the container's own cgroups (v2, or v1's memory and
        // cpu hierarchies).
        let dirs = uc_workload::cgroup::dirs(&id);
        let read = |file: &str| -> Option<String> {
            dirs.iter()
                .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
                .map(|s| s.trim().to_string())
        };
        match (read("memory.max"), read("memory.limit_in_bytes")) {
            (Some(v), _) | (None, Some(v)) => ensure!(v == (64u64 << 20).to_string(), "memory {v}"),
            (None, None) => bail!("no memory limit file in {dirs:?}"),
        }
        match (read("cpu.max"), read("cpu.cfs_quota_us")) {
            (Some(v), _) => ensure!(v == "50000 100000", "cpu.max {v}"),
            (None, Some(v)) => ensure!(v == "50000", "cpu.cfs_quota_us {v}"),
            (None, None) => bail!("no CPU limit file in {dirs:?}"),
        }
        // What runs in it cannot take more memory than that: 100 MB in a shell variable is
        // killed, 10 MB is not. (uc exec runs in the container's cgroups too.)
        let grow = |mb: u32| {
            c.uc(
                0,
                &[
                    "exec",
                    "lim",
                    "sh",
                    "-c",
                    &format!("x=$(head -c {mb}000000 /dev/zero | tr '\\0' a); echo ${{#x}}"),
                ],
            )
        };
        let small = grow(10)?;
        ensure!(
            small.status.success() && String::from_utf8_lossy(&small.stdout).trim() == "10000000",
            "10 MB: {small:?}"
        );
        let big = grow(100)?;
        ensure!(
            !big.status.success() && !String::from_utf8_lossy(&big.stdout).contains("100000000"),
            "100 MB under a 64 MiB limit: {big:?}"
        );
        // The workload itself still serves.
        let addr = p[0]["address"].as_str().context("address")?;
        let body = curl_from_machine(c, 0, &format!("http://{addr}/"))?;
        ensure!(body.contains("Hello from uc"), "{body:?}");
        Ok(())
    })
}

#[test]
fn bad_runs_are_refused_with_clear_errors_and_nothing_written() -> anyhow::Result<()> {
    // m1 has no microVM kit, so the vm runtime is unavailable there.
    let b = ClusterBuilder::new(2).machine_args(1, &["--vm-kit", "/nonexistent/uc-vm-kit"]);
    with_cluster(b, |c| {
        c.wait_membership()?;
        import_demo(c, 0)?;
        uc_ok(c, 0, &["run", "-n", "taken", "demo"])?;
        let services_before = c.dump(0)?["services"].clone();
        let cases: &[(&[&str], &str)] = &[
            (
                &["run", "-n", "x", "nosuchimage"],
                "image \"nosuchimage\" not found on any machine; images: demo",
            ),
            (
                &["run", "-n", "x", "-m", "pi", "demo"],
                "machine \"pi\" not found; machines: m0, m1",
            ),
            (
                &["run", "-n", "x", "-p", "80/sctp", "demo"],
                "protocol \"sctp\"",
            ),
            (
                &["run", "-n", "x", "-p", "99999:80", "demo"],
                "load balancer port \"99999\"",
            ),
            (
                &["run", "-n", "taken", "demo"],
                "service \"taken\" already exists",
            ),
            (
                &["run", "-n", "x", "--runtime", "vm", "-m", "m1", "demo"],
                "runtime vm is not available on machine \"m1\"",
            ),
            (
                &[
                    "run",
                    "-n",
                    "x",
                    "--runtime",
                    "vm",
                    "--memory",
                    "64m",
                    "demo",
                ],
                "a microVM needs at least 80 MiB of memory",
            ),
            (
                &["run", "-n", "x", "--memory", "100000g", "demo"],
                "of memory free; the service asks for",
            ),
            (&["run", "-n", "Bad_Name", "demo"], "service name"),
        ];
        for (args, want) in cases {
            let out = c.uc(0, args)?;
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(!out.status.success(), "uc {args:?} succeeded");
            ensure!(
                err.contains(want),
                "uc {args:?}: {err:?} does not say {want:?}"
            );
        }
        ensure!(
            c.dump(0)?["services"] == services_before,
            "a refused run changed the state"
        );
        let p = ps(c, 0)?;
        if p.len() != 1 {
            bail!("containers: {p:?}");
        }
        Ok(())
    })
}

/// Docker containers of the engine in the container's machine, with the uc label.
fn docker_containers(d: &Dockerd) -> anyhow::Result<Vec<String>> {
    let out = d.docker(&["ps", "-aq", "--filter", "label=uc.id"])?;
    ensure!(out.status.success(), "docker ps: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

#[test]
fn a_docker_service_on_a_machine_with_its_own_dockerd_serves_over_the_mesh() -> anyhow::Result<()> {
    let host_before = HostNetFacts::read();
    let dir = Dockerd::new_dir()?;
    let host = Dockerd::host_of(&dir);
    let result = with_cluster(
        ClusterBuilder::new(3).machine_args(2, &["--docker-host", &host]),
        |c| {
            c.wait_membership()?;
            import_demo(c, 0)?;
            // No engine on m0: the runtime is unavailable there, and a run says so.
            let out = c.uc(
                0,
                &["run", "-n", "x", "--runtime", "docker", "-m", "m0", "demo"],
            )?;
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(
                !out.status.success()
                    && err.contains("runtime docker is not available on machine \"m0\""),
                "{err:?}"
            );
            // m2's engine starts after its agent: the agent finds it on its own.
            let mut d = Dockerd::start(&c.machine(2).netns, &dir)?;
            // dockerd drops forwarded traffic into bridges it does not manage: an nspawn
            // container on m2's bridge is still reached from the other machines once m2's agent
            // has seen the engine, before any Docker container exists.
            uc_ok(c, 0, &["run", "-n", "n2", "-m", "m2", "demo"])?;
            let n2 = ps(c, 0)?
                .into_iter()
                .find(|v| v["service"] == "n2")
                .context("n2")?;
            let n2_addr = n2["address"].as_str().context("address")?.to_string();
            eventually(WAIT, "m0 reaches the nspawn container on m2", || {
                let body = curl_from_machine(c, 0, &format!("http://{n2_addr}/"))?;
                ensure!(body.contains("Hello from uc"), "{body:?}");
                Ok(())
            })?;
            uc_ok(c, 0, &["rm", "n2"])?;
            eventually(WAIT, "m2's agent finds its Docker engine", || {
                let out = c.uc(
                    0,
                    &[
                        "run",
                        "-n",
                        "dweb",
                        "--runtime",
                        "docker",
                        "-m",
                        "m2",
                        "-p",
                        "8081:80@host",
                        "demo",
                    ],
                )?;
                let err = String::from_utf8_lossy(&out.stderr);
                if !out.status.success() && !err.contains("not available") {
                    return Err(uc_e2e::Fatal(format!("uc run: {err}")).into());
                }
                ensure!(out.status.success(), "{err}");
                Ok(())
            })?;
            let p = ps(c, 0)?;
            ensure!(p.len() == 1, "{p:?}");
            let (id, addr) = (
                p[0]["id"].as_str().context("id")?.to_string(),
                p[0]["address"].as_str().context("address")?.to_string(),
            );
            ensure!(
                p[0]["state"] == "running" && p[0]["machine"] == "m2",
                "{p:?}"
            );
            ensure!(
                docker_containers(&d)?.len() == 1,
                "not one Docker container"
            );
            // Every machine reaches it by its mesh address.
            for i in 0..3 {
                eventually(WAIT, "the Docker container answers", || {
                    let body = curl_from_machine(c, i, &format!("http://{addr}/cgi-bin/hello"))?;
                    ensure!(
                        body.trim() == format!("hello from dweb-{}", &id[..8]),
                        "m{i}: {body:?}"
                    );
                    Ok(())
                })?;
            }
            // Its host port, through the underlay: dockerd's FORWARD policy drops forwarded
            // traffic, except what uc accepts (destination-NATed connections).
            let m2_underlay = c.machine(2).ip;
            eventually(WAIT, "m2:8081 answers from m0", || {
                let body =
                    curl_from_machine(c, 0, &format!("http://{m2_underlay}:8081/cgi-bin/hello"))?;
                ensure!(
                    body.trim() == format!("hello from dweb-{}", &id[..8]),
                    "{body:?}"
                );
                Ok(())
            })?;
            // An nspawn workload on m0 and the Docker container reach each other, by address and
            // by name, without NAT.
            uc_ok(c, 0, &["run", "-n", "web", "-m", "m0", "demo"])?;
            let web = ps(c, 0)?
                .into_iter()
                .find(|v| v["machine"] == "m0")
                .context("web on m0")?;
            let (web_id, web_addr) = (
                web["id"].as_str().context("id")?.to_string(),
                web["address"].as_str().context("address")?.to_string(),
            );
            let body = in_workload(
                c,
                0,
                &web_id,
                &["curl", "-sS", "-m", "5", &format!("http://{addr}/")],
            )?;
            ensure!(body.contains("Hello from uc"), "nspawn -> docker: {body:?}");
            let name = format!("uc-dweb-{}", &id[..8]);
            for url in [
                format!("http://{web_addr}/cgi-bin/hello"),
                "http://web.internal/cgi-bin/hello".into(),
            ] {
                // (busybox 1.35's wget crashes with -T or -qO-.)
                let out = d.docker(&["exec", &name, "wget", "-q", "-O", "-", &url])?;
                let body = String::from_utf8_lossy(&out.stdout);
                ensure!(
                    out.status.success()
                        && body.trim() == format!("hello from web-{}", &web_id[..8]),
                    "docker -> nspawn {url}: {body:?} {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // uc exec reaches into the Docker container, from another machine, exit code too.
            let out = c.uc(1, &["exec", "dweb", "sh", "-c", "hostname; exit 5"])?;
            ensure!(
                out.status.code() == Some(5)
                    && String::from_utf8_lossy(&out.stdout).trim() == format!("dweb-{}", &id[..8]),
                "uc exec dweb: {out:?}"
            );
            let out = c
                .client(0)?
                .run_with_input(&["exec", "-i", "dweb", "cat"], b"through docker\n")?;
            ensure!(
                out.status.success() && out.stdout == b"through docker\n",
                "uc exec -i dweb: {out:?}"
            );
            // The request came from the workload's own address: httpd -v logs the peer.
            eventually(WAIT, "uc logs shows the request from m0's workload", || {
                let logs = uc_ok(c, 1, &["logs", "dweb"])?;
                ensure!(logs.contains(&web_addr), "{logs:?}");
                Ok(())
            })?;

            // kill -9 of m2's agent: the container keeps serving; the restarted agent adopts it.
            let pid = p[0]["pid"].as_u64().context("pid")?;
            c.kill9(2)?;
            let body = curl_from_machine(c, 2, &format!("http://{addr}/"))?;
            ensure!(
                body.contains("Hello from uc"),
                "with m2's agent dead: {body:?}"
            );
            c.restart(2)?;
            c.wait_ready(2)?;
            eventually(WAIT, "m2 reports the same container", || {
                let p = ps(c, 2)?;
                let d = p
                    .iter()
                    .find(|v| v["machine"] == "m2")
                    .context("none on m2")?;
                ensure!(d["id"] == id.as_str() && d["state"] == "running", "{p:?}");
                ensure!(d["pid"].as_u64() == Some(pid), "not adopted: {d}");
                Ok(())
            })?;
            ensure!(
                docker_containers(&d)?.len() == 1,
                "a second Docker container"
            );

            // rm: no container left in the engine.
            uc_ok(c, 0, &["rm", "dweb"])?;
            eventually(WAIT, "the Docker container is removed", || {
                let left = docker_containers(&d)?;
                ensure!(left.is_empty(), "{left:?}");
                Ok(())
            })?;
            let problems = d.stop();
            ensure!(problems.is_empty(), "{problems:?}");
            ensure!(
                mounts_under(&dir).is_empty(),
                "mounts left under {}",
                dir.display()
            );
            ensure!(
                processes_mentioning(dir.to_str().context("dir")?).is_empty(),
                "dockerd's processes left"
            );
            Ok(())
        },
    );
    // Whatever happened, the engine is gone before the host is checked.
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let host_after = HostNetFacts::read();
    ensure!(
        host_after == host_before,
        "the host's network settings changed: {host_before:?} -> {host_after:?}"
    );
    Ok(())
}

#[test]
fn scale_stop_start_inspect_and_global_services() -> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(2), |c| {
        c.wait_membership()?;
        import_demo(c, 0)?;
        uc_ok(c, 0, &["run", "-n", "web", "demo"])?;
        // Up to 3: placed like run places them, spread over both machines, all running.
        let out: Value = serde_json::from_str(&uc_ok(c, 1, &["-o", "json", "scale", "web", "3"])?)?;
        ensure!(out["added"].as_array().map(Vec::len) == Some(2), "{out}");
        let p = ps(c, 0)?;
        ensure!(
            p.len() == 3 && p.iter().all(|v| v["state"] == "running"),
            "{p:?}"
        );
        let on_m0 = p.iter().filter(|v| v["machine"] == "m0").count();
        ensure!(on_m0 == 1 || on_m0 == 2, "not spread: {p:?}");
        let insp: Value = serde_json::from_str(&uc_ok(c, 0, &["-o", "json", "inspect", "web"])?)?;
        ensure!(insp["spec"]["replicas"] == 3, "{insp}");
        ensure!(
            insp["containers"].as_array().map(Vec::len) == Some(3),
            "{insp}"
        );
        let ls: Value = serde_json::from_str(&uc_ok(c, 1, &["-o", "json", "ls"])?)?;
        let web = ls
            .as_array()
            .and_then(|l| l.iter().find(|s| s["name"] == "web"))
            .with_context(|| format!("uc ls: {ls}"))?;
        ensure!(web["containers"] == 3 && web["running"] == 3, "{web}");
        let text = uc_ok(c, 0, &["inspect", "web"])?;
        ensure!(
            text.contains("replicated, 3 replicas") && text.contains("image    demo"),
            "{text}"
        );

        // Down to 1: the others are removed from the state and from their machines.
        let out: Value = serde_json::from_str(&uc_ok(c, 0, &["-o", "json", "scale", "web", "1"])?)?;
        ensure!(out["removed"].as_array().map(Vec::len) == Some(2), "{out}");
        eventually(
            WAIT,
            "the removed containers are gone from their machines",
            || {
                let dirs: usize = (0..2)
                    .map(|i| {
                        std::fs::read_dir(c.machine(i).data_dir.join("workloads"))
                            .map(|d| d.count())
                            .unwrap_or(0)
                    })
                    .sum();
                ensure!(dirs == 1, "{dirs} workload dirs");
                Ok(())
            },
        )?;
        let p = ps(c, 0)?;
        ensure!(p.len() == 1, "{p:?}");
        let addr = p[0]["address"].as_str().context("address")?.to_string();
        let id = p[0]["id"].as_str().context("id")?.to_string();

        // Stop: it stays placed, with its address, and stops answering; start: it answers again.
        uc_ok(c, 0, &["stop", "web"])?;
        let p = ps(c, 1)?;
        ensure!(
            p.len() == 1 && p[0]["state"] == "exited" && p[0]["id"] == id.as_str(),
            "{p:?}"
        );
        let out = c.exec_in(0, &["curl", "-sS", "-m", "2", &format!("http://{addr}/")])?;
        ensure!(!out.status.success(), "a stopped container answered");
        // The reconciler leaves a stopped container stopped.
        std::thread::sleep(Duration::from_secs(2));
        ensure!(
            ps(c, 0)?[0]["state"] == "exited",
            "it started again by itself"
        );
        uc_ok(c, 1, &["start", "web"])?;
        let p = ps(c, 0)?;
        ensure!(
            p.len() == 1 && p[0]["state"] == "running" && p[0]["address"] == addr.as_str(),
            "{p:?}"
        );
        eventually(WAIT, "the started container answers", || {
            let body = curl_from_machine(c, 0, &format!("http://{addr}/"))?;
            ensure!(body.contains("Hello from uc"), "{body:?}");
            Ok(())
        })?;

        // Exec: a command in the container, from either machine, with its output, its exit
        // code, stdin with -i and a terminal with -t.
        for i in 0..2 {
            let out = c.uc(i, &["exec", "web", "hostname"])?;
            ensure!(
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout).trim() == format!("web-{}", &id[..8]),
                "uc exec web hostname from m{i}: {out:?}"
            );
        }
        let out = c.uc(
            1,
            &["exec", "web", "sh", "-c", "echo out; echo err >&2; exit 7"],
        )?;
        ensure!(
            out.status.code() == Some(7)
                && out.stdout == b"out\n"
                && String::from_utf8_lossy(&out.stderr).contains("err"),
            "{out:?}"
        );
        let out = c.client(0)?.run_with_input(
            &["exec", "-i", "web", "sh", "-c", "tr a-z A-Z"],
            b"piped in\n",
        )?;
        ensure!(
            out.status.success() && out.stdout == b"PIPED IN\n",
            "exec -i: {out:?}"
        );
        let out = c.uc(
            0,
            &["exec", "-t", "web", "sh", "-c", "tty -s && echo on-a-tty"],
        )?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("on-a-tty"),
            "exec -t: {out:?}"
        );
        let out = c.uc(0, &["exec", "nope", "true"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("service \"nope\" not found"),
            "{err:?}"
        );

        // An SSH key given to uc run is root's authorized key in each container, private.
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvbh6GzPSbS1k2bJqTjXl5xWdXbPiSd2S4hVYp2Kv7X e2e@uc";
        let key_file = c.machine(0).data_dir.join("e2e_key.pub");
        std::fs::write(&key_file, format!("{key}\n"))?;
        let key_arg = key_file.to_str().context("path")?;
        uc_ok(
            c,
            0,
            &[
                "run",
                "-n",
                "keyed",
                "-m",
                "m1",
                "--ssh-key",
                key_arg,
                "demo",
            ],
        )?;
        let out = uc_ok(
            c,
            0,
            &[
                "exec",
                "keyed",
                "sh",
                "-c",
                "stat -c %a /root/.ssh /root/.ssh/authorized_keys; cat /root/.ssh/authorized_keys",
            ],
        )?;
        ensure!(out == format!("700\n600\n{key}\n"), "{out:?}");
        uc_ok(c, 0, &["rm", "keyed"])?;

        // Global: one container on every machine, and on a machine that joins later.
        uc_ok(c, 0, &["run", "-n", "g", "--mode", "global", "demo"])?;
        let of_g = |c: &Cluster| -> anyhow::Result<Vec<Value>> {
            Ok(ps(c, 0)?
                .into_iter()
                .filter(|v| v["service"] == "g")
                .collect())
        };
        let g = of_g(c)?;
        let machines: BTreeSet<&str> = g.iter().filter_map(|v| v["machine"].as_str()).collect();
        ensure!(g.len() == 2 && machines.len() == 2, "{g:?}");
        let out = c.uc(0, &["scale", "g", "5"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("is global"),
            "{err:?}"
        );
        let out = c.uc(0, &["scale", "nope", "2"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("service \"nope\" not found; services: g, web"),
            "{err:?}"
        );
        let i = c.add_machine()?;
        c.wait_membership()?;
        let new = c.machine(i).name.clone();
        eventually(WAIT, "the new machine runs the global service", || {
            let g = of_g(c)?;
            let on_new: Vec<&Value> = g.iter().filter(|v| v["machine"] == new.as_str()).collect();
            ensure!(
                g.len() == 3 && on_new.len() == 1 && on_new[0]["state"] == "running",
                "{g:?}"
            );
            Ok(())
        })?;
        Ok(())
    })
}

/// Whether machine `i`'s bridge has a neighbour entry for `addr`.
fn has_neighbor(c: &Cluster, i: usize, addr: &str) -> anyhow::Result<bool> {
    let out = c.exec_in(i, &["ip", "neigh", "show", addr, "dev", "ucbr0"])?;
    Ok(!String::from_utf8_lossy(&out.stdout).trim().is_empty())
}

#[test]
fn a_microvm_boots_answers_over_the_mesh_stops_gracefully_and_rm_leaves_nothing()
-> anyhow::Result<()> {
    with_cluster(ClusterBuilder::new(3), |c| {
        c.wait_membership()?;
        import_demo(c, 0)?;
        // The runtime is there (qemu and the kit are installed by scripts/vm-deps.sh).
        eventually(WAIT, "m1 gossips that it runs microVMs", || {
            let ms: Value = serde_json::from_str(&uc_ok(c, 0, &["-o", "json", "machine", "ls"])?)?;
            let m1 = ms
                .as_array()
                .and_then(|l| l.iter().find(|m| m["name"] == "m1"))
                .context("no m1")?;
            let rt = m1["runtimes"].as_array().context("runtimes")?;
            ensure!(rt.iter().any(|r| r == "vm"), "{m1}");
            Ok(())
        })?;
        uc_ok(
            c,
            0,
            &[
                "run",
                "-n",
                "vmweb",
                "--runtime",
                "vm",
                "-m",
                "m1",
                "--memory",
                "192m",
                "demo",
            ],
        )?;
        let p = ps(c, 2)?;
        ensure!(p.len() == 1 && p[0]["machine"] == "m1", "{p:?}");
        let addr = p[0]["address"].as_str().context("address")?.to_string();
        let id = p[0]["id"].as_str().context("id")?.to_string();
        // It boots (TCG: seconds) and answers every machine over the mesh, with its own name.
        for i in [0, 2, 1] {
            eventually(WAIT, "the microVM answers", || {
                let body = curl_from_machine(c, i, &format!("http://{addr}/cgi-bin/hello"))?;
                ensure!(
                    body.trim() == format!("hello from vmweb-{}", &id[..8]),
                    "{body:?}"
                );
                Ok(())
            })
            .with_context(|| {
                let dir = c.machine(1).data_dir.join("workloads").join(&id);
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                format!("from m{i}; its log:\n{log}")
            })?;
        }
        let logs = uc_ok(c, 0, &["logs", "vmweb"])?;
        ensure!(logs.contains("uc-init: start"), "uc logs vmweb: {logs}");
        ensure!(has_neighbor(c, 1, &addr)?, "no neighbour entry for {addr}");

        // Stop: the power button, so the guest stops its workload and powers off.
        uc_ok(c, 0, &["stop", "vmweb"])?;
        let p = ps(c, 0)?;
        ensure!(p[0]["state"] == "exited", "{p:?}");
        let out = c.exec_in(0, &["curl", "-sS", "-m", "2", &format!("http://{addr}/")])?;
        ensure!(!out.status.success(), "a stopped microVM answered");
        let logs = uc_ok(c, 0, &["logs", "vmweb"])?;
        ensure!(
            logs.contains("power button: SIGTERM") && logs.contains("uc-init: exit"),
            "not a graceful stop: {logs}"
        );
        uc_ok(c, 2, &["start", "vmweb"])?;
        eventually(WAIT, "the restarted microVM answers", || {
            let body = curl_from_machine(c, 0, &format!("http://{addr}/"))?;
            ensure!(body.contains("Hello from uc"), "{body:?}");
            Ok(())
        })?;

        let out = c.uc(0, &["exec", "vmweb", "true"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("cannot reach into a microVM"),
            "{err:?}"
        );

        uc_ok(c, 2, &["rm", "vmweb"])?;
        let m = c.machine(1);
        eventually(WAIT, "nothing left of vmweb", || {
            ensure!(ps(c, 0)?.is_empty(), "ps not empty");
            let dirs: Vec<_> = std::fs::read_dir(m.data_dir.join("workloads"))
                .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            ensure!(dirs.is_empty(), "workload dirs left: {dirs:?}");
            let links = workload_links(c, 1)?;
            ensure!(links.is_empty(), "links left: {links:?}");
            ensure!(
                !has_neighbor(c, 1, &addr)?,
                "neighbour entry left for {addr}"
            );
            let procs = processes_mentioning(&id);
            ensure!(procs.is_empty(), "processes left: {procs:?}");
            let qmp = PathBuf::from("/run/uc/vm").join(format!("{id}.qmp"));
            ensure!(!qmp.exists(), "{} left", qmp.display());
            Ok(())
        })?;
        Ok(())
    })
}
