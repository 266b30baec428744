#!/usr/bin/env bash
# Regenerates agent/ucd.order, the order in which the linker lays out ucd's
# code (see agent/build.rs): it runs a local cluster of 4 machines whose
# first two agents (one starting the cluster, one joining it) run under
# valgrind's callgrind, asks them what `uc machine ls`, `uc ps` and
# `uc state dump` ask, lets them idle for a minute, and lists every function
# of ucd that ran, the most run first.
#
# Run it after a compiler or dependency update (the names carry hashes of the
# build), then rebuild: bash scripts/ucd-order.sh && cargo build --profile dist
# It takes about 10 minutes and uses the local cluster's place, so no local
# cluster may be running.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh valgrind python3 nftables iputils-ping systemd-container pebble
if [ -f /var/lib/uc/local/cluster.json ]; then
  echo "a local cluster is running: uc local down first" >&2
  exit 1
fi
cargo build --profile dist --locked -p uc-agent -p uc-cli
D="$(realpath "${CARGO_TARGET_DIR:-target}/dist")"
W="$(mktemp -d /var/tmp/ucd-order.XXXXXX)"
cp "$D/uc" "$W/uc"
# uc local up starts the ucd beside uc: this one profiles m0 and m1.
cat > "$W/ucd" <<WRAP
#!/usr/bin/env bash
case " \$* " in
  *" --name m0 "*|*" --name m1 "*)
    exec valgrind --tool=callgrind --demangle=no --compress-strings=no \
      --compress-pos=no --dump-line=no --callgrind-out-file="$W/callgrind.%p" "$D/ucd" "\$@" ;;
  *) exec "$D/ucd" "\$@" ;;
esac
WRAP
chmod +x "$W/ucd"
cleanup() {
  pkill -TERM -f "callgrind-out-file=$W/" || true
  for _ in $(seq 60); do pgrep -f "callgrind-out-file=$W/" >/dev/null || break; sleep 1; done
  "$W/uc" local down || true
}
trap cleanup EXIT
"$W/uc" local up --machines 4
"$W/uc" machine ls
"$W/uc" ps >/dev/null
"$W/uc" state dump >/dev/null
sleep 60
cleanup
trap - EXIT
python3 scripts/callgrind-order.py "$D/ucd" "$W"/callgrind.* > agent/ucd.order
echo "agent/ucd.order: $(wc -l < agent/ucd.order) functions; profiles in $W"
