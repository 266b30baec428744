#!/usr/bin/env bash
# Installs what uc needs on a Debian machine: system packages (apt) and, if
# missing, the Rust toolchain and cargo-nextest. Safe to run again.
# Usage: scripts/deps.sh [extra apt packages...]
set -euo pipefail

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: this needs root (it installs packages and creates network namespaces); try: sudo $0" >&2
    exit 1
  fi
}
need_root

packages=(iproute2 ca-certificates curl gcc libc6-dev pkg-config procps "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  # Something on some machines cleans /tmp while apt runs: give apt its own TMPDIR
  # (apt's alone: this file is sourced, and the directory is gone afterwards).
  apt_tmp=$(mktemp -d /var/tmp/uc-apt.XXXXXX)
  export DEBIAN_FRONTEND=noninteractive
  # Packages such as docker.io and openssh-server start their daemon when installed. uc
  # starts what it needs itself (the tests run their own dockerd inside a network
  # namespace); a daemon started here would change this machine's firewall. So, unless
  # the machine has its own policy, no service starts while apt runs.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    own_policy=1
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
  fi
  trap '[ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
  TMPDIR=$apt_tmp apt-get update -qq
  TMPDIR=$apt_tmp apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
  trap - EXIT
  rm -rf "$apt_tmp"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "installing the Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
