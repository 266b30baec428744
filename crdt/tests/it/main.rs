//! Integration tests of uc-crdt: merge laws (proptest), the deterministic
//! multi-replica simulation, and a larger-scale convergence run.

mod common;
mod merge_laws;
mod scale;
mod simulation;
