#!/usr/bin/env bash
# README command 2: install what the tests need and run the whole suite:
# formatting, clippy, then every test (unit, simulation, component, and the
# end-to-end tests that run real agents in network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
# nftables: the e2e machines firewall their underlay; iputils-ping: the mesh is pinged;
# openssh-server, openssh-client: the e2e SSH lab (hosts run sshd, the laptop ssh);
# systemd: systemd-analyze checks the unit that `uc machine init|add` installs;
# python3: the SSH tests hold ports on a host with it; dnsutils: dig asks the DNS server.
# systemd-container: systemd-nspawn runs workloads; docker.io, iptables: a test machine runs its
# own dockerd (inside its namespace) for the Docker runtime. The demo image is built from Debian's
# busybox-static (scripts/demo-image.sh downloads it). pebble: the ACME test server (and its DNS
# server, pebble-challtestsrv) that issues the ingress's certificates in tests.
source scripts/deps.sh nftables iputils-ping openssh-server openssh-client systemd python3 dnsutils \
  systemd-container docker.io iptables pebble
# QEMU and the microVM boot kit (in /var/lib/uc/vm-kit, where ucd looks) for the vm runtime.
bash scripts/vm-deps.sh
export UC_DEMO_IMAGE="${UC_DEMO_IMAGE:-${XDG_CACHE_HOME:-$HOME/.cache}/uc/demo-image.tar}"
[ -f "$UC_DEMO_IMAGE" ] || scripts/demo-image.sh "$UC_DEMO_IMAGE"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The e2e tests run the real binaries: build them first.
cargo build --locked --workspace --bins
cargo nextest run --locked --workspace --no-fail-fast "$@"
# The DNS request path under libFuzzer for a bounded time (cargo fuzz needs a nightly toolchain).
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
  fi
  (cd dns && cargo +nightly fuzz run request --target-dir "${CARGO_TARGET_DIR:-../target}/fuzz" -- \
    -max_total_time="${UC_FUZZ_SECS:-60}" -rss_limit_mb=2048)
else
  echo "warning: no nightly Rust toolchain: the DNS fuzz target did not run" >&2
fi
