#!/usr/bin/env bash
# Gossip at scale in virtual time (no root, no network): membership
# convergence, heads propagation and gossip bytes per machine at N = 100,
# 254 and 1,000, each on the wire protocol ucd would pick for it,
# written into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p uc-bench
exec "${CARGO_TARGET_DIR:-target}"/release/uc-bench-gossip-sim --out docs/benchmarks.md "$@"
