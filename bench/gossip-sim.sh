#!/usr/bin/env bash
# Gossip at scale in virtual time (no root, no network): membership
# convergence, heads propagation and gossip bytes per machine at N = 100
# and 500 (see docs/benchmarks.md for why not 1,000 with protocol V0),
# written into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p uc-bench
exec target/release/uc-bench-gossip-sim --out docs/benchmarks.md "$@"
