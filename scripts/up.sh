#!/usr/bin/env bash
# README command 1: install what uc needs, build it, put `uc` and `ucd` in
# /usr/local/bin, and start a local cluster of 3 machines (network
# namespaces on this host, each running the real agent).
set -euo pipefail
cd "$(dirname "$0")/.."
# nftables: each local machine firewalls its underlay like a real one would.
# systemd-container: systemd-nspawn runs workloads.
# pebble: the local ACME CA (and its DNS, pebble-challtestsrv) that issues the local ingress's
# certificates; curl: the README's examples.
source scripts/deps.sh nftables iputils-ping systemd-container pebble curl
# QEMU and the microVM boot kit, for `uc run --runtime vm`; without them the rest still works.
bash scripts/vm-deps.sh || echo "warning: scripts/vm-deps.sh failed: microVMs will be unavailable" >&2
# The demo image `uc local up` imports (busybox, serves HTTP on port 80).
[ -f /var/lib/uc/demo-image.tar ] || scripts/demo-image.sh /var/lib/uc/demo-image.tar
machines="${UC_LOCAL_MACHINES:-3}"
echo "building uc (optimized, the dist profile; the first build takes several minutes)"
cargo build --profile dist --locked -p uc-agent -p uc-cli
T="${CARGO_TARGET_DIR:-target}/dist"
install -m 0755 "$T/uc" "$T/ucd" /usr/local/bin/
if [ -f /var/lib/uc/local/cluster.json ]; then
  /usr/local/bin/uc local down
fi
/usr/local/bin/uc local up --machines "$machines"
/usr/local/bin/uc machine ls
