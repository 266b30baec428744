//! DNS benchmark: dnsperf against uc's DNS server (the same `uc_dns::serve` the agent runs)
//! serving 1,000 service names, side by side in one run with dnsmasq and unbound serving the
//! same names from local data. Each server is pinned to core 0, dnsperf to core 1; everything on
//! loopback. Two query sets: the 1,000 internal names, and 1,000 names each server forwards to
//! an upstream (a dnsmasq on another port, TTL 300 s, on core 1 with dnsperf). Prints a Markdown section
//! and, with `--out`, writes it into docs/benchmarks.md between the `dns` markers.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use uc_bench::{percentile, rss_mb, spawn_pinned};

const SERVER_PORT: u16 = 15354;
const UPSTREAM_PORT: u16 = 15353;

#[derive(Parser)]
struct Args {
    /// Seconds of each dnsperf run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Rounds; each runs every server on both query sets, and medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Names served (and forwarded).
    #[arg(long, default_value_t = 1000)]
    names: usize,
    /// Queries dnsperf keeps outstanding.
    #[arg(long, default_value_t = 100)]
    outstanding: usize,
    /// Internal: run uc's DNS server on 127.0.0.1:SERVER_PORT until killed.
    #[arg(long, hide = true)]
    serve_uc: bool,
    /// Markdown file to update (between `<!-- dns:begin -->` and `<!-- dns:end -->`).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn svc_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 210, 1 + (i / 250) as u8, 2 + (i % 250) as u8)
}

fn serve_uc(names: usize) -> anyhow::Result<()> {
    let mut view = uc_dns::DnsView {
        this_machine: "bench".into(),
        serial: 1,
        ..Default::default()
    };
    for i in 0..names {
        view.services.insert(
            format!("svc{i}"),
            uc_dns::ServiceRec {
                containers: vec![uc_dns::ContainerRec {
                    name: format!("c{i:015}"),
                    machine: "bench".into(),
                    v4: svc_ip(i),
                    v6: None,
                    healthy: true,
                }],
                ports: vec![],
            },
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = SocketAddr::from(([127, 0, 0, 1], SERVER_PORT));
        let udp = tokio::net::UdpSocket::bind(addr).await?;
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(view));
        let handler = uc_dns::Handler::new(
            rx,
            uc_dns::ForwardConfig {
                upstreams: vec![SocketAddr::from(([127, 0, 0, 1], UPSTREAM_PORT))],
                ..Default::default()
            },
            &[addr],
        );
        let stop = tokio_util::sync::CancellationToken::new();
        uc_dns::serve(handler, vec![udp], vec![tcp], stop).await?;
        anyhow::Ok(())
    })
}

/// The time from a change of the state to the server answering it, on one machine: the
/// service's removal written to a cluster document of `names` services (each with a running
/// container), the DNS view rebuilt from it as the agent does on every change of the state
/// (`uc_agent::dns::view`), and a query until it says NXDOMAIN. Returns (view rebuild, write to
/// answer) durations in milliseconds.
fn state_to_answer(names: usize, samples: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    use uc_crdt::{ClusterState, Container, DesiredState, NewMachine};
    use uc_proto::{ContainerId, MachineId, ServiceId};
    let id = |n: usize, kind: u8| {
        let mut b = [0u8; 16];
        b[0] = kind;
        b[8..].copy_from_slice(&(n as u64).to_be_bytes());
        b
    };
    let now = uc_bench::unix_ns() as u64 / 1_000_000;
    let mut doc = ClusterState::new_cluster("bench", "10.210.0.0/16".parse()?, id(0, 9), now)?;
    // 250 containers per machine (a /24 each, 10.210.1.0/24 first, as `svc_ip` counts).
    let machines: Vec<MachineId> = (0..names.div_ceil(250).max(1))
        .map(|m| MachineId::from_bytes(id(m, 1)))
        .collect();
    for (m, mid) in machines.iter().enumerate() {
        doc.add_machine(
            NewMachine {
                id: mid.clone(),
                name: format!("m{m}"),
                public_key: String::new(),
                endpoints: Vec::new(),
                tags: Default::default(),
            },
            now,
        )?;
    }
    let me = machines[0].clone();
    let mut services = Vec::new();
    for i in 0..names {
        let sid = ServiceId::from_bytes(id(i, 2));
        doc.put_service(sid.clone(), &format!("svc{i}"), serde_json::json!({}), now)?;
        doc.put_container(Container {
            id: ContainerId::from_bytes(id(i, 3)),
            service: sid.clone(),
            machine: machines[i / 250].clone(),
            address: Some(svc_ip(i)),
            desired: DesiredState::Running,
            created_at_ms: now,
        })?;
        services.push(sid);
    }
    let heads = doc.heads_digest();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(uc_agent::dns::view(&doc, &me, &heads)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let udp = rt.block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))?;
    let tcp = rt.block_on(tokio::net::TcpListener::bind(udp.local_addr()?))?;
    let server = udp.local_addr()?;
    let handler = uc_dns::Handler::new(rx, uc_dns::ForwardConfig::default(), &[server]);
    let stop = tokio_util::sync::CancellationToken::new();
    rt.spawn(uc_dns::serve(handler, vec![udp], vec![tcp], stop.clone()));
    let client = std::net::UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(1)))?;
    let ask = |name: &str| -> anyhow::Result<hickory_proto::op::ResponseCode> {
        use hickory_proto::op::{Message, MessageType, OpCode, Query};
        let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            hickory_proto::rr::Name::from_ascii(name)?,
            hickory_proto::rr::RecordType::A,
        ));
        client.send_to(&m.to_vec()?, server)?;
        let mut buf = [0u8; 4096];
        let n = client.recv(&mut buf)?;
        Ok(Message::from_vec(&buf[..n])?.metadata.response_code)
    };
    let (mut rebuild, mut total) = (Vec::new(), Vec::new());
    for (k, sid) in services.iter().take(samples).enumerate() {
        let name = format!("svc{k}.internal.");
        // Asked once first, so the answer is in the server's cache.
        anyhow::ensure!(ask(&name)? == hickory_proto::op::ResponseCode::NoError);
        let t0 = Instant::now();
        doc.remove_service(sid)?;
        let heads = doc.heads_digest();
        let t1 = Instant::now();
        tx.send_replace(Arc::new(uc_agent::dns::view(&doc, &me, &heads)));
        let t2 = Instant::now();
        while ask(&name)? != hickory_proto::op::ResponseCode::NXDomain {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(5),
                "{name} still answered"
            );
        }
        rebuild.push((t2 - t1).as_secs_f64() * 1000.0);
        total.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    stop.cancel();
    Ok((rebuild, total))
}

fn rand_id() -> u16 {
    (uc_bench::unix_ns() & 0xffff) as u16
}

/// Waits until something on `port` answers `name`.
fn wait_answers(port: u16, name: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+short",
                "+time=1",
                "+tries=1",
                name,
            ])
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing answers {name} on port {port}")
}

#[derive(Clone, Copy)]
struct Figures {
    qps: f64,
    p50_ms: f64,
    p99_ms: f64,
    lost_pct: f64,
}

/// The median of runs, each figure on its own.
fn median(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| percentile(&runs.iter().map(f).collect::<Vec<_>>(), 50.0);
    Figures {
        qps: m(|r| r.qps),
        p50_ms: m(|r| r.p50_ms),
        p99_ms: m(|r| r.p99_ms),
        lost_pct: m(|r| r.lost_pct),
    }
}

fn dnsperf(queries: &Path, secs: u64, outstanding: usize) -> anyhow::Result<Figures> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            &SERVER_PORT.to_string(),
        ])
        .arg("-d")
        .arg(queries)
        .args([
            "-l",
            &secs.to_string(),
            "-q",
            &outstanding.to_string(),
            "-v",
        ])
        .output()
        .context("running dnsperf (package dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lat = Vec::new();
    let (mut qps, mut sent, mut lost) = (0.0, 0.0, 0.0);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("> ") {
            if let Some(s) = rest
                .split_whitespace()
                .last()
                .and_then(|s| s.parse::<f64>().ok())
            {
                lat.push(s * 1000.0);
            }
        } else if let Some(v) = line.trim().strip_prefix("Queries per second:") {
            qps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.trim().strip_prefix("Queries sent:") {
            sent = v
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(v) = line.trim().strip_prefix("Queries lost:") {
            lost = v
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
        }
    }
    if lat.is_empty() {
        bail!(
            "dnsperf reported nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Figures {
        qps,
        p50_ms: percentile(&lat, 50.0),
        p99_ms: percentile(&lat, 99.0),
        lost_pct: if sent > 0.0 { 100.0 * lost / sent } else { 0.0 },
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.serve_uc {
        return serve_uc(args.names);
    }
    let dir = std::env::temp_dir().join(format!("uc-bench-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = scopeguard(dir.clone());
    // The names, as each server's local data, and the query files.
    let (mut hosts, mut fwd_hosts, mut internal_q, mut forward_q) =
        (String::new(), String::new(), String::new(), String::new());
    let mut unbound_data = String::new();
    for i in 0..args.names {
        let ip = svc_ip(i);
        writeln!(hosts, "{ip} svc{i}.internal")?;
        writeln!(
            unbound_data,
            "  local-data: \"svc{i}.internal. 5 IN A {ip}\""
        )?;
        writeln!(fwd_hosts, "192.0.2.{} fwd{i}.example.test", 1 + i % 250)?;
        writeln!(internal_q, "svc{i}.internal A")?;
        writeln!(forward_q, "fwd{i}.example.test A")?;
    }
    for (f, t) in [
        ("hosts", &hosts),
        ("fwd-hosts", &fwd_hosts),
        ("internal.q", &internal_q),
        ("forward.q", &forward_q),
    ] {
        std::fs::write(dir.join(f), t)?;
    }
    let unbound_conf = format!(
        "server:\n  interface: 127.0.0.1\n  port: {SERVER_PORT}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  num-threads: 1\n  do-not-query-localhost: no\n  domain-insecure: \"example.test\"\n  local-zone: \"internal.\" static\n{unbound_data}forward-zone:\n  name: \"example.test.\"\n  forward-addr: 127.0.0.1@{UPSTREAM_PORT}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("unbound.conf"), unbound_conf)?;
    let d = |f: &str| dir.join(f).display().to_string();

    // The upstream every server forwards example.test to.
    let _upstream = spawn_pinned(
        "1",
        &[
            "dnsmasq",
            "--no-daemon",
            &format!("--port={UPSTREAM_PORT}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--local-ttl=300",
            &format!("--addn-hosts={}", d("fwd-hosts")),
        ],
        &[],
    )?;
    wait_answers(UPSTREAM_PORT, "fwd1.example.test")?;

    let me = std::env::current_exe()?.display().to_string();
    let names = args.names.to_string();
    let servers: Vec<(&str, Vec<String>)> = vec![
        (
            "uc (uc-dns)",
            vec![
                me.clone(),
                "--serve-uc".into(),
                "--names".into(),
                names.clone(),
            ],
        ),
        (
            "dnsmasq",
            vec![
                "dnsmasq".into(),
                "--no-daemon".into(),
                format!("--port={SERVER_PORT}"),
                "--listen-address=127.0.0.1".into(),
                "--bind-interfaces".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                format!("--addn-hosts={}", d("hosts")),
                format!("--server=/example.test/127.0.0.1#{UPSTREAM_PORT}"),
                "--cache-size=10000".into(),
            ],
        ),
        (
            "unbound",
            vec![
                "unbound".into(),
                "-d".into(),
                "-c".into(),
                d("unbound.conf"),
            ],
        ),
    ];
    // The machine is shared and noisy: the servers take turns, round after round, and each
    // figure is the median of its rounds.
    let mut runs: Vec<(Vec<Figures>, Vec<Figures>, Vec<f64>)> =
        servers.iter().map(|_| Default::default()).collect();
    for round in 0..args.rounds.max(1) {
        for ((label, argv), run) in servers.iter().zip(&mut runs) {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let server = spawn_pinned("0", &argv, &[])?;
            wait_answers(SERVER_PORT, "svc1.internal")?;
            let internal = dnsperf(&dir.join("internal.q"), args.secs, args.outstanding)?;
            let forward = dnsperf(&dir.join("forward.q"), args.secs, args.outstanding)?;
            let rss = rss_mb(server.0.id());
            eprintln!(
                "round {round} {label}: internal {:.0} QPS p99 {:.2} ms; forwarded {:.0} QPS p99 {:.2} ms; {rss:.0} MB",
                internal.qps, internal.p99_ms, forward.qps, forward.p99_ms
            );
            run.0.push(internal);
            run.1.push(forward);
            run.2.push(rss);
            drop(server);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let rows: Vec<(String, Figures, Figures, f64)> = servers
        .iter()
        .zip(&runs)
        .map(|((label, _), (i, f, rss))| {
            (
                label.to_string(),
                median(i),
                median(f),
                percentile(rss, 50.0),
            )
        })
        .collect();

    let samples = 50.min(args.names);
    let (rebuild, total) = state_to_answer(args.names, samples)?;
    eprintln!(
        "state to answer: median {:.2} ms, p99 {:.2} ms (view rebuild median {:.2} ms)",
        percentile(&total, 50.0),
        percentile(&total, 99.0),
        percentile(&rebuild, 50.0)
    );

    let mut md = String::from("<!-- dns:begin -->\n## DNS: 1,000 names, dnsperf (issue 6)\n\n");
    writeln!(
        md,
        "_{} · `bench/dns.sh` · each server pinned to core 0, dnsperf (and the upstream for forwarded names, a dnsmasq) to core 1, loopback · medians of {} rounds of {} s per run, the servers taking turns, {} queries outstanding · uc is the same `uc_dns::serve` the agent runs (its UDP loop, reading and sending in batches with recvmmsg/sendmmsg, and its answer cache; hickory for TCP), on one worker thread_\n",
        uc_bench::date_utc(),
        args.rounds.max(1),
        args.secs,
        args.outstanding
    )?;
    md.push_str("| server | internal names QPS | p50 | p99 | lost | forwarded names QPS | p50 | p99 | lost | RSS |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (label, i, f, rss) in &rows {
        writeln!(
            md,
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {:.1}% | {:.0} | {:.2} ms | {:.2} ms | {:.1}% | {rss:.0} MB |",
            i.qps, i.p50_ms, i.p99_ms, i.lost_pct, f.qps, f.p50_ms, f.p99_ms, f.lost_pct
        )?;
    }
    let (uc, unbound) = (&rows[0], &rows[2]);
    let verdict = |u: &Figures, b: &Figures| {
        if u.qps >= b.qps && u.p99_ms <= b.p99_ms {
            "met"
        } else {
            "NOT met"
        }
    };
    writeln!(
        md,
        "\nuc / unbound, internal names: {:.2}x the QPS, p99 {:.2}x ({}); forwarded names: {:.2}x the QPS, p99 {:.2}x ({}). Target: at least unbound's QPS with p99 no higher. Forwarded names: the upstream gives its records a TTL of 300 s; each server answers from its cache after the first queries (uc from its answer cache, filled through hickory's resolver).",
        uc.1.qps / unbound.1.qps,
        uc.1.p99_ms / unbound.1.p99_ms,
        verdict(&uc.1, &unbound.1),
        uc.2.qps / unbound.2.qps,
        uc.2.p99_ms / unbound.2.p99_ms,
        verdict(&uc.2, &unbound.2),
    )?;
    writeln!(
        md,
        "\n### A change of the state to the answer\n\nA service removed from a cluster document of {} services (one running container each, 250 to a machine): the removal written, the DNS view rebuilt from the document as the agent does on every change (`uc_agent::dns::view`), and the name asked over UDP until the server says NXDOMAIN; {samples} removals, the name's answer in the server's cache before each. Write to NXDOMAIN: median {:.2} ms, p99 {:.2} ms; of which the view's rebuild: median {:.2} ms. (Between machines, replication comes first: see the spine's propagation figures.)",
        args.names,
        percentile(&total, 50.0),
        percentile(&total, 99.0),
        percentile(&rebuild, 50.0),
    )?;
    md.push_str("<!-- dns:end -->");
    print!("{md}");
    if let Some(out) = &args.out {
        uc_bench::splice(out, "dns", &md).with_context(|| format!("updating {}", out.display()))?;
    }
    Ok(())
}

/// Removes `dir` when dropped.
fn scopeguard(dir: PathBuf) -> impl Drop {
    struct G(PathBuf);
    impl Drop for G {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    G(dir)
}
