//! The `sim::Growth` benchmark scenario at a size that suits a debug test
//! run; `examples/sim_bench.rs` runs it at 1,000 replicas.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uc_crdt::sim::Growth;

use crate::common::assert_invariants;

#[test]
fn growth_scenario_converges() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let scenario = Growth {
        replicas: 40,
        network: "10.0.0.0/14".parse().unwrap(),
        joins_per_round: 5,
        edits_per_round: 3,
        loss_per_mille: 100,
        max_rounds: 60,
    };
    let (report, mut sim) = scenario.run(move || rng.next_u64()).unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.machines, 40);
    assert!(report.services > 0);
    assert!(sim.converged());
    assert!(sim.replicas[0].resolve_conflicts().is_empty());
    assert_invariants(&sim.replicas[0]);
}
