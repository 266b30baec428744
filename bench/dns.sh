#!/usr/bin/env bash
# DNS benchmark: dnsperf against uc's DNS server beside dnsmasq and unbound serving the same
# 1,000 names (server on core 0, dnsperf on core 1, loopback), internal and forwarded names;
# written into docs/benchmarks.md. Medians of 3 rounds, the servers taking turns: about 4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
# dnsmasq and unbound are run by the benchmark only: keep their packages from starting services.
if [ ! -e /usr/sbin/policy-rc.d ] && { ! command -v unbound || ! command -v dnsmasq || ! command -v dnsperf; } >/dev/null 2>&1; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
source scripts/deps.sh dnsperf dnsmasq-base unbound dnsutils util-linux
cargo build --release --locked -p uc-bench
T="${CARGO_TARGET_DIR:-target}/release"
"$T"/uc-bench-dns --out docs/benchmarks.md "$@"
