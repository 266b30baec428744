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
# ucd's layout (agent/build.rs) holds only for the names of the build it was
# made from: say so when it no longer fits, as idle RSS then grows.
found=$(nm --defined-only "$D/ucd" | awk '{print $3}' | sort -u | comm -12 - <(sort -u agent/ucd.order) | wc -l)
listed=$(wc -l < agent/ucd.order)
if [ $((found * 10)) -lt $((listed * 9)) ]; then
  echo "warning: only $found of the $listed functions of agent/ucd.order are in ucd; run scripts/ucd-order.sh" >&2
fi
exec "$T"/uc-bench-spine --bin-dir "$D" --out docs/benchmarks.md "$@"
