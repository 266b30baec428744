//! Benchmark of the spine, side by side with HashiCorp Serf in the same kind
//! of network namespaces and in the same run: propagation of a write to every
//! machine (N = 5, 10, 20), failure detection of a kill -9'd agent, an idle
//! agent's memory and CPU, and false deaths in an idle cluster. Prints a
//! Markdown section and, with `--out`, writes it into docs/benchmarks.md
//! between the `spine` markers.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tonic::transport::Channel;
use uc_bench::percentile;
use uc_e2e::{Cluster, ClusterBuilder};
use uc_proto::v1::api_client::ApiClient;
use uc_proto::v1::{
    ListMachinesRequest, MachineInfo, PutServiceRequest, StatusRequest, WatchHeadsRequest,
};

#[derive(Parser)]
struct Args {
    /// Cluster sizes for propagation and failure detection.
    #[arg(long, value_delimiter = ',', default_value = "5,10,20")]
    sizes: Vec<usize>,
    /// Writes (and Serf events) per size.
    #[arg(long, default_value_t = 50)]
    writes: usize,
    /// Seconds an idle agent with 3 peers is watched for RSS and CPU.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Seconds an idle cluster of the largest size is watched for false deaths (0: skip).
    #[arg(long, default_value_t = 600)]
    soak_secs: u64,
    /// Directory holding release builds of `ucd` and `uc`.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Markdown file to update (between `<!-- spine:begin -->` and `<!-- spine:end -->`).
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Figures {
    propagation: Vec<(usize, Vec<f64>, Vec<f64>, usize)>, // n, ucd ms, serf ms
    detection: Vec<(usize, Vec<f64>, Vec<f64>)>, // n, ucd per-observer ms, serf per-observer ms
    idle: Option<(Idle, Idle)>,
    soak: Option<Soak>,
}

#[derive(Clone, Copy)]
struct Idle {
    rss_kb: u64,
    /// Anonymous memory (heap, stacks): RSS without the mapped files
    /// (the program's code, which the agents on this host share).
    anon_kb: u64,
    /// Memory the process touched during the window (its working set):
    /// pages whose accessed bit was set again after being cleared at the
    /// start (`/proc/PID/clear_refs`, `Referenced:`).
    referenced_kb: u64,
    /// Size of the program's executable mappings (its code, resident or not).
    code_kb: u64,
    cpu_percent: f64,
}

struct Soak {
    n: usize,
    secs: u64,
    polls: u64,
    suspect_observations: u64,
    dead_observations: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = uc_bench::bin_dir(&args.bin_dir)?;
    which("serf")?;
    let mut fig = Figures {
        propagation: vec![],
        detection: vec![],
        idle: None,
        soak: None,
    };
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    for &n in &args.sizes {
        eprintln!("== N = {n}");
        let mut cluster = Cluster::start(
            // No underlay firewall: Serf talks over the underlay; ucd's own
            // traffic goes through its WireGuard mesh either way.
            ClusterBuilder::new(n)
                .bin_dir(&bin_dir)
                .underlay_firewall(false)
                .timeout(Duration::from_secs(120)),
        )?;
        let clients = connect_all(&cluster).await?;
        let ucd_prop = ucd_propagation(&clients, args.writes).await?;
        eprintln!(
            "ucd propagation p50 {:.0} ms p99 {:.0} ms",
            percentile(&ucd_prop, 50.0),
            percentile(&ucd_prop, 99.0)
        );
        if n == largest && args.soak_secs > 0 {
            let soak = ucd_soak(&clients, n, args.soak_secs).await?;
            eprintln!(
                "soak: {} dead, {} suspect observations in {} polls",
                soak.dead_observations, soak.suspect_observations, soak.polls
            );
            fig.soak = Some(soak);
        }
        let ucd_det = ucd_detection(&mut cluster, &clients).await?;
        eprintln!(
            "ucd detection: all after {:.0} ms",
            percentile(&ucd_det, 100.0)
        );
        for i in 0..n - 1 {
            cluster.kill9(i)?;
        }
        let mut serf = Serf::start(&cluster)?;
        let serf_prop = serf.propagation(args.writes)?;
        eprintln!(
            "serf propagation p50 {:.0} ms p99 {:.0} ms",
            percentile(&serf_prop, 50.0),
            percentile(&serf_prop, 99.0)
        );
        let serf_det = serf.detection()?;
        eprintln!(
            "serf detection: all after {:.0} ms",
            percentile(&serf_det, 100.0)
        );
        fig.propagation.push((n, ucd_prop, serf_prop, serf.lost));
        fig.detection.push((n, ucd_det, serf_det));
        drop(serf);
    }
    if args.idle_secs > 0 {
        eprintln!("== idle, 1 agent with 3 peers, {} s", args.idle_secs);
        let cluster = Cluster::start(
            ClusterBuilder::new(4)
                .bin_dir(&bin_dir)
                .underlay_firewall(false),
        )?;
        // Serf runs beside the agents, in the same namespaces, so that both
        // are measured over the same window (this machine is shared).
        let serf = Serf::start(&cluster)?;
        let pids = [
            cluster.machine(0).pid().context("no pid")?,
            serf.children[0].id(),
        ];
        let mut both = idle(&pids, args.idle_secs)?.into_iter();
        drop(serf);
        let (ucd, serf_idle) = (
            both.next().context("no figures")?,
            both.next().context("no figures")?,
        );
        fig.idle = Some((ucd, serf_idle));
    }
    let md = render(&fig, &args);
    println!("{md}");
    if let Some(out) = &args.out {
        uc_bench::splice(out, "spine", &md)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn which(bin: &str) -> anyhow::Result<()> {
    if !uc_bench::have(bin) {
        bail!("{bin} is not installed (apt-get install {bin})");
    }
    Ok(())
}

async fn connect_all(c: &Cluster) -> anyhow::Result<Vec<ApiClient<Channel>>> {
    let mut v = Vec::new();
    for i in 0..c.len() {
        v.push(
            uc_proto::client::connect_unix(&c.machine(i).socket)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    Ok(v)
}

type HeadsLog = Arc<Mutex<Vec<(Instant, String)>>>;

/// Time from the start of a write on one machine until every machine's
/// replica has the writer's new heads, per write.
async fn ucd_propagation(
    clients: &[ApiClient<Channel>],
    writes: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut logs: Vec<HeadsLog> = Vec::new();
    for c in clients {
        let log: HeadsLog = Arc::default();
        let mut stream = c
            .clone()
            .watch_heads(WatchHeadsRequest {})
            .await?
            .into_inner();
        let l = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.message().await {
                l.lock().unwrap().push((Instant::now(), ev.heads_digest));
            }
        });
        logs.push(log);
    }
    let mut out = Vec::new();
    for w in 0..writes {
        let writer = w % clients.len();
        let mut c = clients[writer].clone();
        let t0 = Instant::now();
        c.put_service(PutServiceRequest {
            name: format!("bench-{w}"),
            spec_json: "{}".into(),
        })
        .await?;
        let target = c.status(StatusRequest {}).await?.into_inner().heads_digest;
        let deadline = t0 + Duration::from_secs(20);
        let all = loop {
            let seen: Vec<Option<Instant>> = logs
                .iter()
                .map(|l| {
                    l.lock()
                        .unwrap()
                        .iter()
                        .find(|(t, h)| *t >= t0 && *h == target)
                        .map(|(t, _)| *t)
                })
                .collect();
            if seen.iter().all(Option::is_some) {
                break seen.into_iter().flatten().max().unwrap();
            }
            if Instant::now() > deadline {
                bail!("write {w} did not reach every machine within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        out.push(all.duration_since(t0).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(out)
}

/// What one agent says of every machine.
async fn machines(c: &ApiClient<Channel>) -> anyhow::Result<Vec<MachineInfo>> {
    Ok(c.clone()
        .list_machines(ListMachinesRequest {})
        .await?
        .into_inner()
        .machines)
}

/// Kills the last machine and times, per other machine, until it says dead.
async fn ucd_detection(
    cluster: &mut Cluster,
    clients: &[ApiClient<Channel>],
) -> anyhow::Result<Vec<f64>> {
    let victim = clients.len() - 1;
    let name = cluster.machine(victim).name.clone();
    cluster.kill9(victim)?;
    let t0 = Instant::now();
    let mut found: HashMap<usize, f64> = HashMap::new();
    while found.len() < victim {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("not every machine marked {name} dead within 60 s");
        }
        for (i, c) in clients.iter().enumerate().take(victim) {
            if found.contains_key(&i) {
                continue;
            }
            let ms = machines(c).await?;
            if ms.iter().any(|m| m.name == name && m.liveness == "dead") {
                found.insert(i, t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(found.into_values().collect())
}

/// Polls every machine once a second for `secs`; counts any other machine
/// seen as anything but live.
async fn ucd_soak(clients: &[ApiClient<Channel>], n: usize, secs: u64) -> anyhow::Result<Soak> {
    let mut s = Soak {
        n,
        secs,
        polls: 0,
        suspect_observations: 0,
        dead_observations: 0,
    };
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        for c in clients {
            let ms = machines(c).await?;
            s.polls += 1;
            for m in ms.iter().filter(|m| !m.is_self) {
                match m.liveness.as_str() {
                    "live" => {}
                    "suspect" => s.suspect_observations += 1,
                    other => {
                        eprintln!("soak: {} seen {other}", m.name);
                        s.dead_observations += 1
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(s)
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// RSS at the end, CPU and the memory touched over the same `secs` of each
/// of the idle processes `pids`.
fn idle(pids: &[u32], secs: u64) -> anyhow::Result<Vec<Idle>> {
    std::thread::sleep(Duration::from_secs(5));
    // Clear the accessed bits of every page, so that `Referenced:` at the end
    // counts what the window touched.
    for pid in pids {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "1")
            .with_context(|| format!("clearing /proc/{pid}/clear_refs"))?;
    }
    let t0: Vec<f64> = pids
        .iter()
        .map(|p| uc_bench::cpu_secs(*p))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let wall = start.elapsed().as_secs_f64();
    pids.iter()
        .zip(t0)
        .map(|(pid, t0)| footprint(*pid, t0, wall))
        .collect()
}

/// The memory of `pid` now and its CPU since `t0` CPU-seconds, `wall` seconds ago.
fn footprint(pid: u32, t0: f64, wall: f64) -> anyhow::Result<Idle> {
    let t1 = uc_bench::cpu_secs(pid)?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        Ok(rollup
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .with_context(|| format!("no {name} in smaps_rollup"))?
            .parse()?)
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let code_kb = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (range, perms, path) = (f.first()?, f.get(1)?, f.get(5)?);
            if !perms.contains('x') || std::path::Path::new(path) != exe {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let a = u64::from_str_radix(a, 16).ok()?;
            let b = u64::from_str_radix(b, 16).ok()?;
            Some((b - a) / 1024)
        })
        .sum();
    Ok(Idle {
        rss_kb: field("Rss:")?,
        anon_kb: field("Anonymous:")?,
        referenced_kb: field("Referenced:")?,
        code_kb,
        cpu_percent: (t1 - t0) / wall * 100.0,
    })
}

/// Serf agents in the cluster's namespaces, with an event handler that logs
/// the arrival time of every event.
struct Serf {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    netns: Vec<String>,
    names: Vec<String>,
    /// Events that did not reach every agent within 10 s.
    lost: usize,
}

impl Serf {
    fn start(cluster: &Cluster) -> anyhow::Result<Serf> {
        let dir = cluster.dir().join("serf");
        std::fs::create_dir_all(&dir)?;
        let mut s = Serf {
            children: vec![],
            logs: vec![],
            netns: vec![],
            names: vec![],
            lost: 0,
        };
        let first_ip = cluster.machine(0).ip;
        for i in 0..cluster.len() {
            let m = cluster.machine(i);
            let log = dir.join(format!("events-{i}.log"));
            let handler = dir.join(format!("handler-{i}.sh"));
            std::fs::write(
                &handler,
                format!(
                    "#!/bin/sh\nnow=$(date +%s%N)\nif [ \"$SERF_EVENT\" = user ]; then echo \"$now user $SERF_USER_EVENT\" >> {log}; \
                     else while read -r line; do echo \"$now $SERF_EVENT $line\" >> {log}; done; fi\n",
                    log = log.display()
                ),
            )?;
            Command::new("chmod").arg("+x").arg(&handler).status()?;
            let out = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("serf-{i}.out")))?;
            let name = format!("s{i}");
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &m.netns, "serf", "agent"])
                .arg(format!("-node={name}"))
                .arg(format!("-bind={}:7946", m.ip))
                .arg("-rpc-addr=127.0.0.1:7373")
                .arg(format!("-event-handler={}", handler.display()))
                .arg("-log-level=err");
            if i > 0 {
                cmd.arg(format!("-retry-join={first_ip}:7946"))
                    .arg("-retry-interval=1s");
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()?;
            s.children.push(child);
            s.logs.push(log);
            s.netns.push(m.netns.clone());
            s.names.push(name);
        }
        let t0 = Instant::now();
        loop {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &s.netns[0],
                    "serf",
                    "members",
                    "-rpc-addr=127.0.0.1:7373",
                    "-status=alive",
                ])
                .output()?;
            let alive = String::from_utf8_lossy(&out.stdout).lines().count();
            if alive == cluster.len() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!(
                    "serf: only {alive} of {} members alive after 60 s",
                    cluster.len()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(2));
        Ok(s)
    }

    fn first_time(&self, i: usize, pattern: &str) -> Option<u128> {
        let text = std::fs::read_to_string(&self.logs[i]).ok()?;
        text.lines()
            .filter(|l| l.contains(pattern))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .min()
    }

    fn propagation(&mut self, events: usize) -> anyhow::Result<Vec<f64>> {
        let mut out = Vec::new();
        for w in 0..events {
            let sender = w % self.netns.len();
            let name = format!("bench{w}x");
            let t0 = uc_bench::unix_ns();
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.netns[sender],
                    "serf",
                    "event",
                    "-coalesce=false",
                    "-rpc-addr=127.0.0.1:7373",
                    &name,
                ])
                .stdout(Stdio::null())
                .status()?
                .success();
            if !ok {
                bail!("serf event failed");
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            let pattern = format!("user {name}");
            let all = loop {
                let times: Vec<Option<u128>> = (0..self.logs.len())
                    .map(|i| self.first_time(i, &pattern))
                    .collect();
                if times.iter().all(Option::is_some) {
                    break times.into_iter().flatten().max();
                }
                if Instant::now() > deadline {
                    let got = times.iter().filter(|t| t.is_some()).count();
                    eprintln!(
                        "serf event {w} reached only {got} of {} agents within 10 s",
                        times.len()
                    );
                    self.lost += 1;
                    break None;
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            if let Some(all) = all {
                out.push(all.saturating_sub(t0) as f64 / 1e6);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(out)
    }

    /// Kills the last agent and polls `serf members` on every other agent
    /// (each in its own thread, every 50 ms) until it says failed.
    fn detection(&mut self) -> anyhow::Result<Vec<f64>> {
        let victim = self.children.len() - 1;
        let name = self.names[victim].clone();
        self.children[victim].kill()?;
        let t0 = Instant::now();
        let handles: Vec<_> = self.netns[..victim]
            .iter()
            .cloned()
            .map(|ns| {
                let name = name.clone();
                std::thread::spawn(move || -> anyhow::Result<f64> {
                    loop {
                        let out = Command::new("ip")
                            .args([
                                "netns",
                                "exec",
                                &ns,
                                "serf",
                                "members",
                                "-rpc-addr=127.0.0.1:7373",
                                "-status=failed",
                            ])
                            .arg(format!("-name=^{name}$"))
                            .output()?;
                        if String::from_utf8_lossy(&out.stdout).contains(&name) {
                            return Ok(t0.elapsed().as_secs_f64() * 1000.0);
                        }
                        if t0.elapsed() > Duration::from_secs(120) {
                            bail!("serf in {ns} did not mark {name} failed within 120 s");
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("poller panicked"))?)
            .collect()
    }
}

impl Drop for Serf {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn render(f: &Figures, args: &Args) -> String {
    let mut s = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    // The agents inherit the environment, so settings given through it apply.
    let env = |k: &str| std::env::var(k).ok();
    let gossip = env("UCD_GOSSIP_INTERVAL_MS")
        .and_then(|v| v.parse().ok())
        .map_or(
            uc_agent::config::DEFAULT_GOSSIP_INTERVAL,
            Duration::from_millis,
        );
    let phi: f64 = env("UCD_FAILURE_PHI")
        .and_then(|v| v.parse().ok())
        .unwrap_or(uc_agent::config::DEFAULT_PHI);
    let settings = if env("UCD_GOSSIP_INTERVAL_MS").is_some() || env("UCD_FAILURE_PHI").is_some() {
        "set through UCD_GOSSIP_INTERVAL_MS / UCD_FAILURE_PHI"
    } else {
        "the defaults"
    };
    let profile = args
        .bin_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("?");
    s.push_str("<!-- spine:begin -->\n## Spine: membership and state propagation (issue 2)\n\n");
    s.push_str(&format!(
        "Measured by `bench/spine.sh` on {} ({} cores, {cpu}); ucd and Serf in the same run, in the same network namespaces (one per machine, a bridge in a hub namespace). ucd: {profile} build, gossip every {} ms, dead after phi {} ({settings}); its gossip and sync travel inside its WireGuard mesh (userspace: a receiving, a sending and a timer thread per agent), Serf's over the bare link. Serf: Debian's `serf` with default LAN settings.\n\n",
        uc_bench::date_utc(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        gossip.as_millis(),
        phi,
    ));
    s.push_str(&format!(
        "### Propagation: a write on one machine visible on every machine ({} writes per size; writers rotate)\n\n",
        args.writes
    ));
    s.push_str("| N | ucd p50 | ucd p99 | Serf p50 | Serf p99 | p99 ucd/Serf | Serf events lost |\n|---|---|---|---|---|---|---|\n");
    for (n, u, sf, lost) in &f.propagation {
        s.push_str(&format!(
            "| {n} | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} ms | {:.2} | {lost} |\n",
            percentile(u, 50.0),
            percentile(u, 99.0),
            percentile(sf, 50.0),
            percentile(sf, 99.0),
            percentile(u, 99.0) / percentile(sf, 99.0)
        ));
    }
    s.push_str("\nucd: from the start of `PutService` on the writer (which returns after the write is committed to disk) until every agent's `WatchHeads` stream shows the writer's new heads. Serf: from just before `serf event` until the last agent's event handler ran.\n\n");
    s.push_str("### Failure detection: a kill -9'd agent marked dead by every other machine\n\n");
    s.push_str("| N | ucd first | ucd median | ucd all | Serf first | Serf median | Serf all | all ucd/Serf |\n|---|---|---|---|---|---|---|---|\n");
    for (n, u, sf) in &f.detection {
        s.push_str(&format!(
            "| {n} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} |\n",
            percentile(u, 0.0) / 1000.0,
            percentile(u, 50.0) / 1000.0,
            percentile(u, 100.0) / 1000.0,
            percentile(sf, 0.0) / 1000.0,
            percentile(sf, 50.0) / 1000.0,
            percentile(sf, 100.0) / 1000.0,
            percentile(u, 100.0) / percentile(sf, 100.0)
        ));
    }
    s.push_str("\nucd: `ListMachines` polled every 20 ms on each other machine until it says `dead`. Serf: `serf members -status=failed` polled every 50 ms on each other agent until it lists the victim.\n\n");
    if let Some(soak) = &f.soak {
        s.push_str(&format!(
            "### False deaths while idle\n\nN = {}, {} s idle, every machine polled once a second ({} polls): {} observations of a live machine as dead, {} as suspect.\n\n",
            soak.n, soak.secs, soak.polls, soak.dead_observations, soak.suspect_observations
        ));
    }
    if let Some((u, sf)) = f.idle {
        s.push_str(&format!(
            "### Idle agent with 3 peers ({} s)\n\n| | RSS | of which anonymous (heap, stacks) | of which file pages (code) | touched in the window | CPU (share of one core) |\n|---|---|---|---|---|---|\n| ucd | {:.1} MB | {:.1} MB | {:.1} MB | {:.1} MB | {:.2} % |\n| Serf | {:.1} MB | {:.1} MB | {:.1} MB | {:.1} MB | {:.2} % |\n| ratio ucd/Serf | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n\nFile pages are the program's code and data as mapped from its binary, shared by every process running it (the 4 agents here). Both clusters run at once in the same namespaces, and both agents are measured over the same window. The kernel maps code around every page a program first runs, 64 KB at a time, and a page stays counted until memory runs short. ucd is one binary for everything (mesh, DNS, ingress, workloads, ACME): {:.1} MB of code, against Serf's {:.1} MB. The shipped build lays out the functions ucd runs together, in the order of `agent/ucd.order`, and optimizes its control plane for size, so that start-up and idling map a few MB of it. Touched in the window: the pages, anonymous or mapped, the process used during the {} s (its working set), from the accessed bits cleared at the start (`/proc/PID/clear_refs`).\n\n",
            args.idle_secs,
            mb(u.rss_kb),
            mb(u.anon_kb),
            mb(u.rss_kb.saturating_sub(u.anon_kb)),
            mb(u.referenced_kb),
            u.cpu_percent,
            mb(sf.rss_kb),
            mb(sf.anon_kb),
            mb(sf.rss_kb.saturating_sub(sf.anon_kb)),
            mb(sf.referenced_kb),
            sf.cpu_percent,
            u.rss_kb as f64 / sf.rss_kb as f64,
            u.anon_kb as f64 / sf.anon_kb as f64,
            u.rss_kb.saturating_sub(u.anon_kb) as f64 / sf.rss_kb.saturating_sub(sf.anon_kb) as f64,
            u.referenced_kb as f64 / sf.referenced_kb as f64,
            u.cpu_percent / sf.cpu_percent,
            mb(u.code_kb),
            mb(sf.code_kb),
            args.idle_secs,
        ));
    }
    s.push_str("<!-- spine:end -->");
    s
}
