//! Benchmark of the mesh, side by side in one run and between the same two
//! network namespaces: TCP throughput (iperf3, one stream and four), ping
//! latency and CPU seconds per GB moved, over the raw veth link, over uc's
//! mesh (the real agents), over wireguard-go and over Cloudflare's stock
//! boringtun-cli (each configured with `wg`, MTU 1420). Then the time from a
//! new machine's key appearing in the state (its join) until a first packet
//! from every other machine has gone through its tunnel (and back). Prints a
//! Markdown section and, with `--out`, writes it into docs/benchmarks.md
//! between the `mesh` markers.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::Value;
use uc_bench::{cpu_secs, percentile};
use uc_e2e::{Cluster, ClusterBuilder, eventually};

#[derive(Parser)]
struct Args {
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Pings per path.
    #[arg(long, default_value_t = 100)]
    pings: usize,
    /// Rounds: every path is measured once a round; figures are medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Machines that join, one after the other, for the join-to-tunnel figure.
    #[arg(long, default_value_t = 5)]
    joins: usize,
    /// Directory holding release builds of `ucd` and `uc`.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where boringtun-cli is (default: on PATH or in ~/.cargo/bin).
    #[arg(long)]
    boringtun_cli: Option<PathBuf>,
    /// Markdown file to update (between `<!-- mesh:begin -->` and `<!-- mesh:end -->`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What one path between the two namespaces achieved.
struct PathFigures {
    name: String,
    single_mbit: f64,
    single_retrans: u64,
    four_mbit: f64,
    ping_p50_ms: f64,
    ping_p99_ms: f64,
    /// CPU seconds of the tunnel processes (both ends) per GB received.
    cpu_s_per_gb: Option<f64>,
}

/// Runs `argv` inside namespace `ns` and returns its stdout; fails on a non-zero exit.
fn exec(ns: &str, argv: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .with_context(|| format!("running {argv:?} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `argv` to run inside namespace `ns`, its standard streams closed.
fn in_ns(ns: &str, argv: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn spawn_in(ns: &str, argv: &[&str]) -> anyhow::Result<Child> {
    in_ns(ns, argv)
        .spawn()
        .with_context(|| format!("starting {argv:?} in {ns}"))
}

/// One iperf3 run from `client_ns` to a server in `server_ns` on `ip`:
/// (Mbit/s received, retransmits, bytes received).
fn iperf(
    client_ns: &str,
    server_ns: &str,
    ip: Ipv4Addr,
    secs: u64,
    streams: usize,
) -> anyhow::Result<(f64, u64, f64)> {
    let mut server = spawn_in(server_ns, &["iperf3", "-s", "-1", "-B", &ip.to_string()])?;
    std::thread::sleep(Duration::from_millis(300));
    let out = exec(
        client_ns,
        &[
            "iperf3",
            "-c",
            &ip.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_str(&out?)?;
    let recv = &v["end"]["sum_received"];
    let sent = &v["end"]["sum_sent"];
    Ok((
        recv["bits_per_second"].as_f64().context("no throughput")? / 1e6,
        sent["retransmits"].as_u64().unwrap_or(0),
        recv["bytes"].as_f64().unwrap_or(0.0),
    ))
}

/// Round-trip times of `n` pings, in ms.
fn pings(ns: &str, ip: Ipv4Addr, n: usize) -> anyhow::Result<Vec<f64>> {
    let out = exec(
        ns,
        &[
            "ping",
            "-n",
            "-c",
            &n.to_string(),
            "-i",
            "0.02",
            &ip.to_string(),
        ],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect())
}

fn measure(
    name: &str,
    (a, b): (&str, &str),
    ip: Ipv4Addr,
    pids: &[u32],
    args: &Args,
) -> anyhow::Result<PathFigures> {
    eprintln!("mesh bench: {name}");
    let rtts = pings(a, ip, args.pings)?;
    let cpu = |pids: &[u32]| {
        pids.iter()
            .map(|p| cpu_secs(*p).unwrap_or(0.0))
            .sum::<f64>()
    };
    let c0 = cpu(pids);
    let (single, retrans, bytes1) = iperf(a, b, ip, args.secs, 1)?;
    let c1 = cpu(pids);
    let (four, _, _) = iperf(a, b, ip, args.secs, 4)?;
    Ok(PathFigures {
        name: name.to_string(),
        single_mbit: single,
        single_retrans: retrans,
        four_mbit: four,
        ping_p50_ms: percentile(&rtts, 50.0),
        ping_p99_ms: percentile(&rtts, 99.0),
        cpu_s_per_gb: (!pids.is_empty() && bytes1 > 0.0).then(|| (c1 - c0) / (bytes1 / 1e9)),
    })
}

/// The median of each figure over the runs of one path.
fn median_of(runs: Vec<PathFigures>) -> PathFigures {
    let med =
        |f: &dyn Fn(&PathFigures) -> f64| percentile(&runs.iter().map(f).collect::<Vec<_>>(), 50.0);
    PathFigures {
        name: runs[0].name.clone(),
        single_mbit: med(&|p| p.single_mbit),
        single_retrans: med(&|p| p.single_retrans as f64) as u64,
        four_mbit: med(&|p| p.four_mbit),
        ping_p50_ms: med(&|p| p.ping_p50_ms),
        ping_p99_ms: med(&|p| p.ping_p99_ms),
        cpu_s_per_gb: runs[0]
            .cpu_s_per_gb
            .map(|_| med(&|p| p.cpu_s_per_gb.unwrap_or(f64::NAN))),
    }
}

/// A stock userspace WireGuard (`wireguard-go` or `boringtun-cli`) between the two namespaces,
/// configured with `wg`; killed on drop.
struct Stock {
    children: Vec<Child>,
    sockets: Vec<PathBuf>,
}

impl Stock {
    fn start(
        program: &str,
        extra: &[&str],
        tag: &str,
        (a, b): (&str, &str),
        (ip_a, ip_b): (Ipv4Addr, Ipv4Addr),
        net: u8,
    ) -> anyhow::Result<(Stock, Vec<u32>)> {
        let keys: Vec<(String, String)> = (0..2)
            .map(|_| -> anyhow::Result<(String, String)> {
                let private = String::from_utf8(Command::new("wg").arg("genkey").output()?.stdout)?
                    .trim()
                    .to_string();
                let mut p = Command::new("wg")
                    .arg("pubkey")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()?;
                p.stdin
                    .take()
                    .context("stdin")?
                    .write_all(private.as_bytes())?;
                let public = String::from_utf8(p.wait_with_output()?.stdout)?
                    .trim()
                    .to_string();
                Ok((private, public))
            })
            .collect::<anyhow::Result<_>>()?;
        let sock = |i: usize| PathBuf::from(format!("/var/run/wireguard/{tag}{i}.sock"));
        // A killed daemon leaves its socket behind: never mistake it for a new one.
        for i in 0..2 {
            let _ = std::fs::remove_file(sock(i));
        }
        let mut s = Stock {
            children: vec![],
            sockets: (0..2).map(sock).collect(),
        };
        let mut pids = vec![];
        let dir = tempfile_dir(tag)?;
        for (i, ns) in [a, b].into_iter().enumerate() {
            let ifname = format!("{tag}{i}");
            let mut argv = vec![program];
            argv.extend_from_slice(extra);
            argv.push(&ifname);
            let child = in_ns(ns, &argv)
                .env("WG_SUDO", "1")
                .spawn()
                .with_context(|| format!("starting {program}"))?;
            pids.push(child.id());
            s.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(sock(0).exists() && sock(1).exists()) {
            if Instant::now() > deadline {
                bail!("{program} did not create its UAPI sockets");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (i, ns) in [a, b].into_iter().enumerate() {
            let (me, other) = (i, 1 - i);
            let keyfile = dir.join(format!("key{i}"));
            std::fs::write(&keyfile, &keys[me].0)?;
            let ifname = format!("{tag}{i}");
            let other_ip = [ip_a, ip_b][other];
            exec(
                ns,
                &[
                    "wg",
                    "set",
                    &ifname,
                    "private-key",
                    &keyfile.display().to_string(),
                    "listen-port",
                    &(52000 + u16::from(net) * 2 + me as u16).to_string(),
                    "peer",
                    &keys[other].1,
                    "endpoint",
                    &format!("{other_ip}:{}", 52000 + u16::from(net) * 2 + other as u16),
                    "allowed-ips",
                    &format!("10.{net}.{other}.0/24"),
                ],
            )?;
            exec(
                ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.{net}.{me}.1/16"),
                    "dev",
                    &ifname,
                ],
            )?;
            exec(ns, &["ip", "link", "set", &ifname, "mtu", "1420", "up"])?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok((s, pids))
    }
}

impl Drop for Stock {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn tempfile_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("uc-bench-mesh-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn find_boringtun(arg: &Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = arg {
        return Some(p.clone());
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo = PathBuf::from(home).join(".cargo/bin/boringtun-cli");
    if cargo.exists() {
        return Some(cargo);
    }
    Command::new("sh")
        .args(["-c", "command -v boringtun-cli"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

/// Join-to-tunnel: machines join a 3-machine cluster one after the other; for each, the time from
/// the join answer (its key is in the state) until every other machine has a WireGuard session
/// with it, in ms.
fn join_to_tunnel(bin_dir: &PathBuf, joins: usize) -> anyhow::Result<Vec<f64>> {
    let mut c = Cluster::start(ClusterBuilder::new(3).bin_dir(bin_dir))?;
    let mut out = Vec::new();
    for _ in 0..joins {
        let others = c.running();
        let addr = next_machine_addr(&c, others[0])?;
        let new = c.add_namespace()?;
        // Every other machine pings the new machine's mesh address every
        // 5 ms from before the join: the first reply is the first packet
        // through the tunnel (until then the device has no peer to send to).
        let probes = others
            .iter()
            .map(|&i| {
                let argv = ["ping", "-D", "-n", "-c", "1", "-i", "0.005", "-w", "30"];
                in_ns(&c.machine(i).netns, &argv)
                    .arg(addr.to_string())
                    .stdout(Stdio::piped())
                    .spawn()
                    .context("starting ping")
            })
            .collect::<anyhow::Result<Vec<Child>>>()?;
        c.start_joiner(new)?;
        // The join answer is logged by the joiner as soon as it holds the state with its key.
        let joined_at = eventually(Duration::from_secs(30), "the join", || {
            let log = std::fs::read_to_string(&c.machine(new).log)?;
            let line = log
                .lines()
                .find(|l| l.contains("joined the cluster"))
                .context("not joined yet")?;
            Ok(line.split_whitespace().next().unwrap_or("").to_string())
        })?;
        let t0 = parse_log_time(&joined_at).context("log time")?;
        let mut last = 0f64;
        for (probe, &i) in probes.into_iter().zip(&others) {
            let output = probe.wait_with_output()?;
            let text = String::from_utf8_lossy(&output.stdout);
            let first = text
                .lines()
                .find(|l| l.contains("bytes from"))
                .and_then(|l| l.strip_prefix('['))
                .and_then(|l| l.split(']').next())
                .and_then(|t| t.parse::<f64>().ok())
                .with_context(|| {
                    format!(
                        "{} never reached {addr} through the mesh",
                        c.machine(i).name
                    )
                })?;
            last = last.max(first);
        }
        let got = c.machines_seen_by(new)?;
        let name = c.machine(new).name.clone();
        let subnet = got
            .iter()
            .find(|m| m["name"] == name.as_str())
            .and_then(|m| m["subnet"].as_str())
            .unwrap_or("");
        if subnet_index(subnet) != Some(addr.octets()[2]) {
            bail!("{name} got {subnet}, not the /24 of {addr} that was pinged");
        }
        out.push((last - t0) * 1000.0);
        c.wait_membership()?;
    }
    Ok(out)
}

/// The mesh address the next machine to join gets: the first of the
/// lowest free /24, as the cluster state allots them.
fn next_machine_addr(c: &Cluster, i: usize) -> anyhow::Result<Ipv4Addr> {
    let taken: Vec<u8> = c
        .machines_seen_by(i)?
        .iter()
        .filter_map(|m| subnet_index(m["subnet"].as_str()?))
        .collect();
    let x = (1..=254u8)
        .find(|x| !taken.contains(x))
        .context("no free /24")?;
    Ok(Ipv4Addr::new(10, 210, x, 1))
}

/// X in `10.210.X.0/24`.
fn subnet_index(subnet: &str) -> Option<u8> {
    let ip: Ipv4Addr = subnet.split('/').next()?.parse().ok()?;
    Some(ip.octets()[2])
}

/// Parses the RFC 3339 timestamp at the start of a log line (`2026-11-23T20:41:40.420664Z`)
/// into Unix seconds.
fn parse_log_time(s: &str) -> Option<f64> {
    let out = Command::new("date")
        .args(["-u", "-d", s, "+%s.%N"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = uc_bench::bin_dir(&args.bin_dir)?;
    for bin in ["iperf3", "wireguard-go", "wg", "ping"] {
        if !uc_bench::have(bin) {
            bail!("{bin} is not installed (bench/mesh.sh installs it)");
        }
    }
    let boringtun = find_boringtun(&args.boringtun_cli)
        .context("boringtun-cli not found (cargo install boringtun-cli; bench/mesh.sh does)")?;

    // Two machines, no underlay firewall (iperf3 runs over the raw link too).
    let c = Cluster::start(
        ClusterBuilder::new(2)
            .bin_dir(&bin_dir)
            .underlay_firewall(false),
    )?;
    let (a, b) = (c.machine(0).netns.clone(), c.machine(1).netns.clone());
    let ns = (a.as_str(), b.as_str());
    let underlay = (c.machine(0).ip, c.machine(1).ip);
    // Every tunnel is up at once (own interfaces, ports and addresses), and
    // the paths take turns, round after round: the machine is shared and
    // noisy, so each figure is the median of the rounds.
    let _wgg;
    let _wgb;
    let mut paths: Vec<(&str, Ipv4Addr, Vec<u32>)> = vec![
        ("raw veth (no tunnel)", underlay.1, vec![]),
        (
            "uc mesh (ucd: batched, TUN offloads, UDP GSO/GRO)",
            c.mesh_ip(1)?,
            (0..2).filter_map(|i| c.machine(i).pid()).collect(),
        ),
    ];
    {
        let (g, pids) = Stock::start("wireguard-go", &["-f"], "wgg", ns, underlay, 98)?;
        _wgg = g;
        paths.push(("wireguard-go (Debian)", Ipv4Addr::new(10, 98, 1, 1), pids));
        let bt = boringtun.display().to_string();
        let (g, pids) = Stock::start(
            &bt,
            &["-f", "--disable-drop-privileges"],
            "wgb",
            ns,
            underlay,
            99,
        )?;
        _wgb = g;
        paths.push((
            "boringtun-cli (stock, 4 threads)",
            Ipv4Addr::new(10, 99, 1, 1),
            pids,
        ));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut runs: Vec<Vec<PathFigures>> = (0..paths.len()).map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        eprintln!("mesh bench: round {}", round + 1);
        for (k, (name, ip, pids)) in paths.iter().enumerate() {
            runs[k].push(measure(name, ns, *ip, pids, &args)?);
        }
    }
    let paths: Vec<PathFigures> = runs.into_iter().map(median_of).collect();
    drop(c);
    eprintln!("mesh bench: join to tunnel");
    let joins = join_to_tunnel(&bin_dir, args.joins)?;

    let text = render(&paths, &joins, &args);
    println!("{text}");
    if let Some(out) = &args.out {
        uc_bench::splice(out, "mesh", &text)?;
    }
    Ok(())
}

fn render(paths: &[PathFigures], joins: &[f64], args: &Args) -> String {
    let mut s =
        String::from("<!-- mesh:begin -->\n## Mesh: throughput, latency, CPU, join to tunnel\n\n");
    s.push_str(&format!(
        "`bench/mesh.sh`, {}. Two machines (network namespaces on one bridge), every path up at once between the same two namespaces and measured in turn, {} rounds; each figure is the median of the rounds. Per run: iperf3 {} s with 1 and 4 streams, {} pings at 20 ms intervals, CPU of the tunnel processes at both ends (user + system) per GB received in the single-stream run. MTU 1420 on every tunnel.\n\n",
        uc_bench::date_utc(),
        args.rounds,
        args.secs,
        args.pings
    ));
    s.push_str("| path | 1 stream Mbit/s | retransmits | 4 streams Mbit/s | ping p50 / p99 ms | CPU-s per GB |\n|---|---:|---:|---:|---:|---:|\n");
    for p in paths {
        s.push_str(&format!(
            "| {} | {:.0} | {} | {:.0} | {:.3} / {:.3} | {} |\n",
            p.name,
            p.single_mbit,
            p.single_retrans,
            p.four_mbit,
            p.ping_p50_ms,
            p.ping_p99_ms,
            p.cpu_s_per_gb
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "-".into())
        ));
    }
    let find = |prefix: &str| paths.iter().find(|p| p.name.starts_with(prefix));
    if let (Some(uc), Some(bt)) = (find("uc mesh"), find("boringtun-cli")) {
        s.push_str(&format!(
            "\nuc against stock boringtun-cli: single stream {:.2}x, 4 streams {:.2}x, ping p50 {:.2}x, CPU per GB {}.\n",
            uc.single_mbit / bt.single_mbit,
            uc.four_mbit / bt.four_mbit,
            uc.ping_p50_ms / bt.ping_p50_ms,
            match (uc.cpu_s_per_gb, bt.cpu_s_per_gb) {
                (Some(a), Some(b)) => format!("{:.2}x", a / b),
                _ => "-".into(),
            }
        ));
    }
    s.push_str(&format!(
        "\nJoin to tunnel: a machine joins a running cluster ({} joins, one after the other, starting from 3 machines); time from the join answer (its key is in the state) until a packet from every other machine has gone through its tunnel and back (the first reply to pings sent every 5 ms from each of them to its mesh address, from before the join): median {:.0} ms, max {:.0} ms.\n",
        joins.len(),
        percentile(joins, 50.0),
        percentile(joins, 100.0)
    ));
    s.push_str("<!-- mesh:end -->");
    s
}
