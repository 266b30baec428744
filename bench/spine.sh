#!/usr/bin/env bash
# Spine benchmark: ucd beside Serf in network namespaces (propagation,
# failure detection, idle footprint, false deaths), written into
# docs/benchmarks.md. Needs root. Takes about 20 minutes with the defaults;
# pass flags through, e.g. `bench/spine.sh --soak-secs 0 --idle-secs 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh serf
cargo build --profile dist --locked -p uc-agent -p uc-cli
cargo build --release --locked -p uc-bench
T="${CARGO_TARGET_DIR:-target}/release"
D="${CARGO_TARGET_DIR:-target}/dist"
exec "$T"/uc-bench-spine --bin-dir "$D" --out docs/benchmarks.md "$@"
