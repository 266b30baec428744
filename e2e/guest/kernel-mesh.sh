#!/bin/sh
# Two real agents whose mesh runs on the kernel's WireGuard, inside a QEMU guest whose kernel
# has the module (e2e/tests/it/mesh.rs starts it with `scripts/vm-kit.sh guest`; the host's
# kernel may have none). In the guest: /ucd, /uc, ip, and busybox. Machine one starts a cluster,
# machine two joins it over a veth; both must pick the kernel backend, reach each other's mesh
# address through it, and come back after one is killed with SIGKILL (its interface outlives
# it) and restarted. Prints "kernel mesh: ok" at the end; any failure prints the agents' logs
# and exits non-zero.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/.uc/bin
# iproute2's ip, not busybox's applet (this busybox sh prefers its applets to PATH).
IPBIN=
for p in /usr/sbin/ip /usr/bin/ip /sbin/ip /bin/ip; do
    if [ -x "$p" ]; then IPBIN=$p; break; fi
done
[ -n "$IPBIN" ] || { echo "FAIL: no iproute2 ip in the guest"; exit 1; }
ip() { "$IPBIN" "$@"; }

fail() {
    echo "FAIL: $*"
    for n in 1 2; do
        echo "--- machine $n: uc machine ls, uc wg show, addresses, routes"
        /uc --socket "/d$n/api.sock" machine ls 2>&1 || true
        /uc --socket "/d$n/api.sock" wg show 2>&1 || true
        ip -n "m$n" addr 2>&1 || true
        ip -n "m$n" route 2>&1 || true
        ip -n "m$n" -6 route 2>&1 || true
    done
    for f in /m1.log /m2.log; do
        [ -f "$f" ] || continue
        echo "--- last lines of $f"
        tail -n 40 "$f"
    done
    exit 1
}

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 0.1 s until it succeeds.
wait_for() {
    limit=$(($1 * 10)) what=$2 i=0
    shift 2
    while ! "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -lt "$limit" ] || fail "$what"
        usleep 100000
    done
}

uc1() { /uc --socket /d1/api.sock "$@"; }
uc2() { /uc --socket /d2/api.sock "$@"; }

start() { # start N NAME ARGS...: machine N's agent, in namespace mN
    n=$1 name=$2
    shift 2
    ip netns exec "m$n" /ucd --data-dir "/d$n" --name "$name" --advertise-addr "172.31.0.$n" \
        --dns-upstream 127.0.0.1:53 "$@" >>"/m$n.log" 2>&1 &
    eval "pid$n=\$!"
}

# "kernel" as the backend of both machines, and the other one live, as machine $1 sees them.
both_on_kernel() {
    /uc --socket "/d$1/api.sock" machine ls -o json >/tmp/ls.json || return 1
    [ "$(grep -c '"mesh_backend": "kernel"' /tmp/ls.json)" = 2 ] &&
        [ "$(grep -c '"liveness": "live"' /tmp/ls.json)" = 1 ]
}

# The mesh address of machine NAME, from machine one's list.
mesh_address() {
    uc1 machine ls -o json | tr -d '\n ' | sed 's/},{/}\n{/g' | grep "\"name\":\"$1\"" |
        sed -n 's/.*"mesh_address":"\([0-9.]*\)".*/\1/p'
}

ip netns add m1
ip netns add m2
ip link add u1 netns m1 type veth peer name u2 netns m2
for n in 1 2; do
    ip -n "m$n" addr add "172.31.0.$n/24" dev "u$n"
    ip -n "m$n" link set "u$n" up
    ip -n "m$n" link set lo up
done

start 1 one --init
wait_for 60 "machine one's API socket" test -S /d1/api.sock
wait_for 60 "a join token from machine one" sh -c '/uc --socket /d1/api.sock machine token -o json >/tmp/token.json'
token=$(sed -n 's/.*"token":"\([^"]*\)".*/\1/p' /tmp/token.json)
peer=$(sed -n 's/.*"peer_addresses":\["\([^"]*\)".*/\1/p' /tmp/token.json)
[ -n "$token" ] && [ -n "$peer" ] || fail "no token in $(cat /tmp/token.json)"
start 2 two --join "$peer" --token "$token"
wait_for 30 "both machines live on the kernel backend, as one sees them" both_on_kernel 1
wait_for 30 "both machines live on the kernel backend, as two sees them" both_on_kernel 2
ip -n m1 -d link show uc0 | grep -q wireguard || fail "machine one's uc0 is not a kernel WireGuard interface"

a1=$(mesh_address one) a2=$(mesh_address two)
[ -n "$a1" ] && [ -n "$a2" ] || fail "no mesh addresses in machine one's list"
wait_for 30 "one pings two's mesh address $a2" ip netns exec m1 ping -c1 -W1 "$a2"
wait_for 30 "two pings one's mesh address $a1" ip netns exec m2 ping -c1 -W1 "$a1"
uc1 wg show >/tmp/wg.txt
grep -q kernel /tmp/wg.txt || fail "uc wg show does not say kernel: $(cat /tmp/wg.txt)"
echo "machine one's uc wg show:"
cat /tmp/wg.txt

# Killed with SIGKILL, machine two leaves its interface behind; started again, it replaces it
# and the tunnel comes back.
eval "kill -9 \$pid2"
eval "wait \$pid2" || true
ip -n m2 link show uc0 >/dev/null 2>&1 || fail "the kernel interface went away with its agent"
start 2 two
wait_for 60 "machine two's agent back" sh -c '/uc --socket /d2/api.sock machine ls >/dev/null'
wait_for 60 "one pings two's mesh address $a2 after two restarted" ip netns exec m1 ping -c1 -W1 "$a2"
[ "$(ip -n m2 -o link show type wireguard | wc -l)" = 1 ] || fail "machine two has more than one WireGuard interface"
echo "kernel mesh: ok"
