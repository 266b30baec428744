//! Simulated convergence of many replicas: sync rounds and bytes sent.
//!
//! `cargo run --release -p uc-crdt --features sim --example sim_bench -- [REPLICAS] [SEED]`
//!
//! FIXME: 1,000 replicas are not practical yet. Measured before a moved
//! machine probed for its /24 from a hash of its id (it took the lowest free
//! one, and concurrent moves collided again after every heal): 100 replicas
//! took 300 s and 440 MB of sync traffic in a release build. The probing cut
//! the 50-replica test from about 85 s to about 20 s; the other cause remains:
//! every replica that sees a conflict writes the same fix as its own change.

use std::time::Instant;

use uc_crdt::sim::Growth;

/// splitmix64: a tiny seeded generator, so the example needs no RNG crate.
fn splitmix(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let replicas: usize = args
        .next()
        .map_or(1000, |a| a.parse().expect("REPLICAS is a number"));
    let seed: u64 = args
        .next()
        .map_or(1, |a| a.parse().expect("SEED is a number"));
    let scenario = Growth {
        replicas,
        // The largest network a cluster may have: 1022 machines.
        network: "10.0.0.0/14".parse().expect("valid network"),
        joins_per_round: (replicas / 20).max(1),
        edits_per_round: 5,
        loss_per_mille: 100,
        max_rounds: 200,
    };
    let start = Instant::now();
    let (report, mut sim) = scenario.run(splitmix(seed)).expect("replicas converge");
    assert!(sim.converged(), "replicas differ");
    let s = &report.stats;
    println!("replicas: {replicas}, seed {seed}, {:?}", start.elapsed());
    println!("rounds while joining/editing: {}", report.busy_rounds);
    println!(
        "rounds to converge after healing: {}",
        report.rounds_to_converge
    );
    println!(
        "sessions: {} ({} aborted), messages: {} ({} lost), bytes sent: {} ({:.1} KiB per replica)",
        s.sessions,
        s.sessions_aborted,
        s.messages_sent,
        s.messages_lost,
        s.bytes_sent,
        s.bytes_sent as f64 / 1024.0 / replicas as f64
    );
    println!(
        "conflict resolutions that changed something: {}",
        s.resolutions
    );
    println!(
        "final document: {} bytes saved, {} machines, {} services",
        report.document_bytes, report.machines, report.services
    );
}
