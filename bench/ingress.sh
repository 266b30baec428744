#!/usr/bin/env bash
# Ingress benchmark: wrk through uc's ingress beside nginx, HAProxy and Caddy proxying the same
# backend with the same certificate (proxy on core 0, wrk and backend on core 1, loopback),
# keep-alive and a new TLS connection per request, and what each proxy holds a new connection for
# (tcpdump); written into docs/benchmarks.md. About 4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
# nginx, haproxy and caddy are run by the benchmark only: keep their packages from starting services.
if [ ! -e /usr/sbin/policy-rc.d ] && { ! command -v nginx || ! command -v haproxy || ! command -v caddy || ! command -v wrk; } >/dev/null 2>&1; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
source scripts/deps.sh nginx haproxy caddy wrk tcpdump util-linux
cargo build --release --locked -p uc-bench --bin uc-bench-ingress
T="${CARGO_TARGET_DIR:-target}/release"
"$T"/uc-bench-ingress --out docs/benchmarks.md "$@"
