#!/usr/bin/env bash
# `uc machine add` benchmark: from the command to the new machine reachable over the mesh from
# every machine, step by step, on hosts reached over real SSH (cold: binary copied; prepared:
# binary there), beside the bare ssh round trip and copy; written into docs/benchmarks.md.
# Needs root. About 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh nftables iputils-ping openssh-server openssh-client
cargo build --profile dist --locked -p uc-agent -p uc-cli
cargo build --release --locked -p uc-bench
T="${CARGO_TARGET_DIR:-target}/release"
D="${CARGO_TARGET_DIR:-target}/dist"
UC_BIN_DIR="$D" exec "$T"/uc-bench-join --out docs/benchmarks.md "$@"
