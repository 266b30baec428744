#!/usr/bin/env bash
# Mesh benchmark: uc's mesh beside the raw veth link, wireguard-go and stock
# boringtun-cli between the same two network namespaces (throughput, ping,
# CPU per GB), and the time from a join to a WireGuard session with every
# machine; written into docs/benchmarks.md. Needs root. About 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh nftables iputils-ping iperf3 wireguard-go wireguard-tools
if ! command -v boringtun-cli >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/boringtun-cli" ]; then
  cargo install boringtun-cli --locked
fi
cargo build --profile dist --locked -p uc-agent -p uc-cli
cargo build --release --locked -p uc-bench
T="${CARGO_TARGET_DIR:-target}/release"
D="${CARGO_TARGET_DIR:-target}/dist"
exec "$T"/uc-bench-mesh --bin-dir "$D" --out docs/benchmarks.md "$@"
