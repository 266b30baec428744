//! Gossip at scale, simulated: N chitchat instances configured as `ucd`
//! configures them, on chitchat's in-memory transport (every message is
//! serialized and counted), in virtual time. Measures how long membership
//! takes to converge, how long a changed heads digest takes to reach every
//! machine, and gossip bytes per second per machine. Prints Markdown and,
//! with `--out`, writes it into docs/benchmarks.md between the `gossip-sim`
//! markers.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use chitchat::transport::ChannelTransport;
use chitchat::{ChitchatHandle, ChitchatId, ProtocolVersion, spawn_chitchat};
use clap::Parser;
use tokio::time::Instant;
use uc_proto::Subnet;

/// The smallest cluster network (from 10.0.0.0, a /8 at most) that holds
/// `n` machines.
fn network_for(n: usize) -> Subnet {
    (8..=22u8)
        .rev()
        .map(|p| Subnet::new(std::net::Ipv4Addr::new(10, 0, 0, 0), p).expect("10.0.0.0 is aligned"))
        .find(|s| uc_crdt::machine_slots(*s) as usize >= n)
        .unwrap_or_else(|| "10.0.0.0/8".parse().expect("a network"))
}

#[derive(Parser)]
struct Args {
    /// Numbers of machines to simulate (254 fills the default /16; 1,000
    /// needs a /14, the largest network a cluster may have).
    #[arg(long, value_delimiter = ',', default_value = "100,254,1000")]
    sizes: Vec<usize>,
    /// Gossip interval in milliseconds (default: ucd's).
    #[arg(long, default_value_t = uc_agent::config::DEFAULT_GOSSIP_INTERVAL.as_millis() as u64)]
    gossip_ms: u64,
    /// Failure detector threshold (default: ucd's).
    #[arg(long, default_value_t = uc_agent::config::DEFAULT_PHI)]
    phi: f64,
    /// Virtual seconds of steady state over which bytes are counted.
    #[arg(long, default_value_t = 10)]
    window_secs: u64,
    /// chitchat wire protocol, 0 or 1, for every size; by default each
    /// size gets what ucd would run: the protocol of the smallest cluster
    /// network that holds it (`uc_agent::membership::protocol_for`).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=1))]
    protocol: Option<u8>,
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Row {
    n: usize,
    network: Subnet,
    protocol: ProtocolVersion,
    membership: Option<Duration>,
    heads: Option<Duration>,
    bytes_per_sec_per_machine: f64,
    messages_per_sec_per_machine: f64,
    /// (observer, machine) pairs not live at one sample, in steady state.
    not_live_mean: f64,
    not_live_max: u64,
    wall: Duration,
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        Ipv4Addr::new(10, 99, (i / 250) as u8, (i % 250 + 1) as u8).into(),
        51001,
    )
}

async fn run(n: usize, args: &Args) -> anyhow::Result<Row> {
    let wall = std::time::Instant::now();
    let transport = ChannelTransport::with_mtu(65_507);
    let interval = Duration::from_millis(args.gossip_ms);
    let network = network_for(n);
    let protocol = match args.protocol {
        Some(0) => ProtocolVersion::V0,
        Some(_) => ProtocolVersion::V1,
        None => uc_agent::membership::protocol_for(network),
    };
    let mut handles: Vec<ChitchatHandle> = Vec::new();
    for i in 0..n {
        let mut config = uc_agent::membership::chitchat_config(
            ChitchatId::new(
                format!("{:032x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
                1_700_000_000_000,
                addr(i),
            ),
            "0123456789abcdef0123456789abcdef".into(),
            interval,
            args.phi,
            addr(i),
            (0..3.min(n))
                .filter(|s| *s != i)
                .map(|s| addr(s).to_string())
                .collect(),
            protocol,
        );
        // The failure detector keeps a window of 1,000 heartbeat intervals
        // (8 KB) per peer: 8 GB for 1,000 agents in one process. It does
        // not change what is sent; 100 keeps the run in memory.
        config.failure_detector_config.sampling_window_size = 100;
        let kvs = vec![
            ("heads".to_string(), "0123456789abcdef".to_string()),
            ("peer".to_string(), format!("{}:51000", addr(i).ip())),
            ("ep".to_string(), addr(i).ip().to_string()),
            ("load".to_string(), "0.12".to_string()),
        ];
        handles.push(spawn_chitchat(config, kvs, &transport).await?);
    }
    let start = Instant::now();
    let limit = Duration::from_secs(600);
    // Membership: every machine has seen every machine live. (At 1,000
    // machines a few of the million pairs are always briefly not live, so
    // "all live at one instant" may never come; steady state counts them.)
    let mut seen: Vec<HashSet<ChitchatId>> = vec![HashSet::new(); n];
    let mut reported = Duration::ZERO;
    let membership = loop {
        let mut converged = 0;
        for (h, seen) in handles.iter().zip(seen.iter_mut()) {
            if seen.len() < n {
                h.with_chitchat(|c| seen.extend(c.live_nodes().cloned()))
                    .await;
            }
            if seen.len() >= n {
                converged += 1;
            }
        }
        if converged == n {
            break Some(start.elapsed());
        }
        // Large sizes take many minutes of wall time: show progress.
        if start.elapsed() >= reported + Duration::from_secs(1) {
            reported = start.elapsed();
            eprintln!(
                "N={n}: {:.1} virtual s, {converged} machines have seen all {n} live, wall {:.0?}",
                reported.as_secs_f64(),
                wall.elapsed()
            );
        }
        if start.elapsed() > limit {
            break None;
        }
        tokio::time::sleep(interval / 2).await;
    };
    drop(seen);
    // A changed heads digest on machine 0 reaching everyone.
    let t0 = Instant::now();
    let id0 = handles[0].chitchat_id().clone();
    handles[0]
        .with_chitchat(|c| c.self_node_state().set("heads", "fedcba9876543210"))
        .await;
    let heads = loop {
        let mut all = true;
        for h in &handles[1..] {
            let seen = h
                .with_chitchat(|c| {
                    c.node_state(&id0)
                        .and_then(|s| s.get("heads"))
                        .map(|v| v == "fedcba9876543210")
                })
                .await;
            if seen != Some(true) {
                all = false;
                break;
            }
        }
        if all {
            break Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Steady state: traffic, and (observer, machine) pairs not live, sampled
    // every half interval.
    let before = transport.statistics();
    let window_start = Instant::now();
    let window = Duration::from_secs(args.window_secs);
    let (mut samples, mut not_live_sum, mut not_live_max) = (0u64, 0u64, 0u64);
    while window_start.elapsed() < window {
        tokio::time::sleep(interval / 2).await;
        let mut not_live = 0;
        for h in &handles {
            not_live += n - h.with_chitchat(|c| c.live_nodes().count()).await.min(n);
        }
        samples += 1;
        not_live_sum += not_live as u64;
        not_live_max = not_live_max.max(not_live as u64);
    }
    let after = transport.statistics();
    let secs = args.window_secs as f64;
    for h in handles {
        h.shutdown().await?;
    }
    Ok(Row {
        n,
        network,
        protocol,
        membership,
        heads,
        bytes_per_sec_per_machine: (after.num_bytes_total - before.num_bytes_total) as f64
            / secs
            / n as f64,
        messages_per_sec_per_machine: (after.num_messages_total - before.num_messages_total) as f64
            / secs
            / n as f64,
        not_live_mean: not_live_sum as f64 / samples.max(1) as f64,
        not_live_max,
        wall: wall.elapsed(),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    for &n in &args.sizes {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()?;
        let row = rt.block_on(run(n, &args))?;
        eprintln!(
            "N={n}: membership {:?}, heads {:?}, {:.0} B/s/machine, pairs not live mean {:.1} max {}, wall {:?}",
            row.membership,
            row.heads,
            row.bytes_per_sec_per_machine,
            row.not_live_mean,
            row.not_live_max,
            row.wall
        );
        rows.push(row);
    }
    let fmt = |d: Option<Duration>| {
        d.map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "did not converge in 600 s".into())
    };
    let marker = "gossip-sim";
    let mut md = format!(
        "<!-- {marker}:begin -->\n### Gossip at scale, simulated (`bench/gossip-sim.sh`)\n\n"
    );
    md.push_str(&format!(
        "chitchat configured as ucd configures it (gossip every {} ms, dead after phi {}, 3 peers a round, ucd's four keys per machine; the wire protocol ucd picks for the smallest cluster network that holds the machines: V0 up to a /16, V1, compressed digests, beyond) on chitchat's in-memory transport, which serializes and counts every message, in virtual time (tokio paused clock). The failure detector's window is cut from 1,000 intervals to 100 to fit 1,000 agents in one process; it changes nothing that is sent. Membership: until every machine has seen every machine live. Heads: until a changed heads digest on one machine is seen by all. Bytes: steady state over {} virtual seconds (a round is a digest out, a digest back, and the deltas; a digest lists every machine). Not live: (observer, machine) pairs in which the observer does not hold the machine live, sampled every half interval over the same steady state, of N(N-1) pairs: what a false suspicion looks like at that size.\n\n",
        args.gossip_ms, args.phi, args.window_secs
    ));
    md.push_str("| machines | network, protocol | membership converged | heads digest everywhere | pairs not live, mean / worst | gossip bytes/s per machine | messages/s per machine | bytes per message |\n|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {}, {:?} | {} | {} | {:.1} / {} of {} | {:.0} ({:.1} KiB/s) | {:.0} | {:.0} |\n",
            r.n,
            r.network,
            r.protocol,
            fmt(r.membership),
            fmt(r.heads),
            r.not_live_mean,
            r.not_live_max,
            r.n * (r.n - 1),
            r.bytes_per_sec_per_machine,
            r.bytes_per_sec_per_machine / 1024.0,
            r.messages_per_sec_per_machine,
            r.bytes_per_sec_per_machine / r.messages_per_sec_per_machine.max(1.0),
        ));
    }
    md.push('\n');
    md.push_str(&format!("<!-- {marker}:end -->"));
    println!("{md}");
    if let Some(out) = &args.out {
        uc_bench::splice(out, marker, &md)?;
    }
    Ok(())
}
