#!/usr/bin/env bash
# Installs what uc's microVM runtime (`uc run --runtime vm`) needs on a Debian machine, and
# makes its boot kit. Safe to run again: the kit is rebuilt only when its recipe changed.
# Usage: scripts/vm-deps.sh [KITDIR]   (default /var/lib/uc/vm-kit, where ucd looks)
#
# QEMU comes from the release's own suite when that works. Some machines carry a newer
# qemu-utils from backports, which Breaks the release's qemu-system; there QEMU is taken
# from <release>-backports too, through a private apt configuration, so /etc/apt is left
# as it was.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kit=${1:-/var/lib/uc/vm-kit}

# busybox-static, binutils (readelf), lz4: the kit's initrd and PVH kernel; e2fsprogs:
# base disks; qemu-utils: overlays; iproute2: taps.
source "$here/deps.sh" busybox-static binutils lz4 e2fsprogs qemu-utils iproute2

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  # apt's own TMPDIR, for apt alone (vm-kit.sh runs after it is gone).
  apt_tmp=$(mktemp -d /var/tmp/uc-apt.XXXXXX)
  export DEBIAN_FRONTEND=noninteractive
  echo "installing: qemu-system-x86"
  if ! TMPDIR=$apt_tmp apt-get install -y -qq --no-install-recommends qemu-system-x86 >"$apt_tmp/plain.log" 2>&1; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || { cat "$apt_tmp/plain.log" >&2; echo "error: cannot install qemu-system-x86" >&2; exit 1; }
    echo "qemu-system-x86 from $codename does not install here; taking it from $codename-backports"
    bpo=/var/tmp/uc-apt-backports
    mkdir -p "$bpo/lists/partial"
    # The machine's own sources (sources.list and sources.list.d) plus Debian's backports;
    # the package lists are kept apart from the machine's.
    { cat /etc/apt/sources.list 2>/dev/null || true
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $codename-backports main"
    } >"$bpo/backports.list"
    cat >"$bpo/apt.conf" <<EOF
Dir::Etc::SourceList "$bpo/backports.list";
Dir::State::Lists "$bpo/lists";
EOF
    TMPDIR=$apt_tmp APT_CONFIG=$bpo/apt.conf apt-get update -qq
    TMPDIR=$apt_tmp APT_CONFIG=$bpo/apt.conf apt-get install -y -qq --no-install-recommends \
      -t "$codename-backports" qemu-system-x86 >/dev/null
  fi
  rm -rf "$apt_tmp"
fi
qemu-system-x86_64 --version | head -n1

bash "$here/vm-kit.sh" kit "$kit"
