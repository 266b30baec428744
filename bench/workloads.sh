#!/usr/bin/env bash
# Workload start benchmark: `uc run` to the first HTTP answer over the mesh, per runtime, beside bare
# systemd-nspawn, bare `docker run` and bare QEMU starting the same image; written into docs/benchmarks.md. Needs root. About
# 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh nftables iputils-ping systemd-container docker.io iptables
bash scripts/vm-deps.sh
cargo build --profile dist --locked -p uc-agent -p uc-cli
cargo build --release --locked -p uc-bench
T="${CARGO_TARGET_DIR:-target}/release"
D="${CARGO_TARGET_DIR:-target}/dist"
export UC_DEMO_IMAGE="${UC_DEMO_IMAGE:-${XDG_CACHE_HOME:-$HOME/.cache}/uc/demo-image.tar}"
[ -f "$UC_DEMO_IMAGE" ] || scripts/demo-image.sh "$UC_DEMO_IMAGE"
UC_BIN_DIR="$D" exec "$T"/uc-bench-workloads --out docs/benchmarks.md "$@"
