#!/usr/bin/env bash
# vm-kit.sh: prototype of uc's microVM runtime, in shell, so that each step can
# later be done the same way by the Rust runtime.
#
#   vm-kit.sh kit OUTDIR
#       Builds the shared boot kit once (cached): OUTDIR/vmlinuz (Debian's cloud
#       kernel), OUTDIR/vmlinux (the same, uncompressed, booted via PVH: faster)
#       and OUTDIR/initrd.img (busybox-static, the virtio modules and uc's
#       /init). OUTDIR/modules.txt lists the modules, in load order.
#   vm-kit.sh disk [-e K=V]... [-w WORKDIR] ROOTFS_DIR OUT.qcow2 [CMD...]
#       Makes a base disk: ext4 of ROOTFS_DIR plus /.uc/{cmd,env,workdir}, as
#       qcow2. Without CMD, cmd/env/workdir come from ROOTFS_DIR/.uc-image.json.
#   vm-kit.sh overlay BASE.qcow2 INST.qcow2
#       Makes a per-instance copy-on-write overlay of a base disk.
#   vm-kit.sh argv KITDIR INST.qcow2
#       Prints the QEMU argv (one element per line) for an instance; settings
#       come from the environment (VM_* variables below). `run` execs it.
#   vm-kit.sh run KITDIR INST.qcow2
#       Runs QEMU in the foreground under `timeout` (in the current netns).
#   vm-kit.sh stop QMP_SOCKET [powerdown|quit]
#       Asks a running VM to stop through its QMP socket.
#   vm-kit.sh guest [-m MODULES] [-b FILE[:DEST]]... [-e K=V]... -- CMD...
#       Runs CMD in a throw-away guest with no network device, and prints its
#       console. The guest's disk holds each FILE at DEST (default: FILE's own
#       path; a bare name is looked up in PATH; ELF files lose their debug
#       sections) and every shared library FILE loads, at its own path. MODULES:
#       kernel modules beyond the disk's, loaded before CMD (the kit for them is
#       made once and cached in ~/.cache/uc/guest-kit-*). Exits with CMD's
#       status. Tests use it to run on Debian's cloud kernel what this
#       machine's kernel lacks (WireGuard).
#   vm-kit.sh demo [RUNS]
#       End-to-end self-test: kit + demo image disk + namespace/bridge/tap,
#       boots RUNS times (default 1), times qemu start -> first HTTP answer,
#       stops the VM gracefully, cleans up everything it made.
#
# Guest contract (what /init in the initrd does), see GUEST_INIT below:
#   kernel command line: uc.ip=ADDR/PREFIX uc.gw=GW uc.dns=DNS uc.hostname=NAME
#                        [uc.mtu=N] [uc.stop_grace=SECONDS] [uc.seed=1] [uc.probe=1]
#   disks: the root filesystem, ext4. What to run: with uc.seed=1, a second disk
#         holding a tar archive (raw, found by its ustar magic) of cmd (argv, one
#         element a line), env (K=V a line) and workdir; without it, the same
#         three files in /.uc on the root disk (what `disk` makes).
#         This is what ucd's vm runtime (workload/src/vm.rs) relies on.
#   uc.probe=1: init says "uc-init: probe ok" and powers off at once (ucd boots
#         this to learn whether KVM runs the kernel, else it uses TCG).
#   serial (ttyS0): the workload's stdout+stderr, plus lines starting with
#         "uc-init: " from init; the last one is "uc-init: exit N".
#   power button (QMP system_powerdown): SIGTERM to the workload, SIGKILL
#         after uc.stop_grace seconds (default 10), then poweroff.
#   the guest always powers off when the workload exits, so QEMU exits.
#
# Needs root, and: qemu-system-x86 (tested 10.0.2 from bookworm-backports, to
# match the machine's qemu-utils 10), qemu-utils, busybox-static, e2fsprogs,
# binutils (readelf), lz4 (optional: the PVH vmlinux), iproute2 + curl (demo),
# python3 (`stop`, `demo`), jq or python3 (to read .uc-image.json).
set -euo pipefail

# ---------------------------------------------------------------- settings --
# All overridable from the environment.
KERNEL_PKG=${KERNEL_PKG:-linux-image-cloud-amd64}  # meta package -> versioned one
# Modules /init loads, in this order after their dependencies (resolved from
# each .ko's `depends=`). virtio_mmio finds the devices through microvm's ACPI
# tables (this kernel has no CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). ext4, jbd2,
# crc16 and crc32c are built in, so the disk needs no more. button + evdev give
# the power button, which is how the host asks for a graceful stop.
KIT_MODULES=${KIT_MODULES:-"virtio_mmio virtio_blk virtio_net button evdev"}
KIT_VERSION=11         # bump when the kit layout changes (GUEST_INIT is hashed)

VM_MEM=${VM_MEM:-256}              # MiB of guest RAM
VM_SMP=${VM_SMP:-1}
VM_CPU=${VM_CPU:-max}
VM_IP=${VM_IP:-10.210.7.5/24}
VM_GW=${VM_GW:-10.210.7.1}
VM_DNS=${VM_DNS:-10.210.7.1}
VM_HOSTNAME=${VM_HOSTNAME:-uc-vm}
VM_TAP=${VM_TAP:-}                 # empty: no NIC
VM_MAC=${VM_MAC:-52:54:00:d7:07:05}
VM_SERIAL=${VM_SERIAL:-stdio}      # "stdio" or a file path for the console log
VM_QMP=${VM_QMP:-}                 # unix socket path for QMP (empty: none)
VM_TIMEOUT=${VM_TIMEOUT:-600}      # hard limit for the whole VM (a hung TCG guest pauses)
VM_STOP_GRACE=${VM_STOP_GRACE:-10} # seconds between SIGTERM and SIGKILL in the guest
VM_EXTRA_APPEND=${VM_EXTRA_APPEND:-}
# Boot-time savers under TCG (measured in NOTES.md): together about -0.5 s.
# mitigations=off only drops guest-internal hardening (one workload per VM).
VM_FAST_APPEND=${VM_FAST_APPEND-"quiet pci=off 8250.nr_uarts=1 cryptomgr.notests mitigations=off nokaslr init_on_alloc=0 page_alloc.shuffle=0 audit=0 lsm=lockdown,yama,integrity"}
VM_DISK_CACHE=${VM_DISK_CACHE:-writeback}  # "unsafe" is fine for throw-away overlays
VM_KERNEL=${VM_KERNEL:-}           # default: KITDIR/vmlinux (PVH) if there, else vmlinuz

QEMU=${QEMU:-qemu-system-x86_64}
WORK=${VMKIT_TMP:-/var/tmp/vmkit/tmp}   # apt needs a TMPDIR nobody cleans

log() { printf 'vm-kit: %s\n' "$*" >&2; }
die() { printf 'vm-kit: error: %s\n' "$*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "needs root"; }

# ------------------------------------------------------------- guest init --
# /init inside the initrd: PID 1 of the guest for its whole life. It does not
# switch_root: it chroots the workload into /newroot and stays PID 1, so it can
# reap, report the exit status and power off. The workload is started through
# the initrd's busybox, bind-mounted read-only at /.uc/bin in the new root (to
# cd into the workdir and set a clean environment, even in images without a
# shell).
read -r -d '' GUEST_INIT <<'INIT' || true
#!/bin/sh
# uc guest init (generated by scripts/vm-kit.sh)
export PATH=/bin
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
say() { echo "uc-init: $*"; }
halt_now() { sync; poweroff -f; sleep 5; reboot -f; }
fail() { say "fatal: $*"; say "exit 255"; halt_now; }

# Settings from the kernel command line.
set -f
UC_IP='' UC_GW='' UC_DNS='' UC_MTU='' UC_HOSTNAME=uc UC_GRACE=10 UC_SEED='' UC_PROBE=''
for w in $(cat /proc/cmdline); do
    case "$w" in
        uc.seed=*) UC_SEED=${w#*=} ;;
        uc.mtu=*) UC_MTU=${w#*=} ;;
        uc.probe=*) UC_PROBE=${w#*=} ;;
        uc.ip=*) UC_IP=${w#*=} ;;
        uc.gw=*) UC_GW=${w#*=} ;;
        uc.dns=*) UC_DNS=${w#*=} ;;
        uc.hostname=*) UC_HOSTNAME=${w#*=} ;;
        uc.stop_grace=*) UC_GRACE=${w#*=} ;;
    esac
done
set +f
# A probe boot (does this accelerator run the kernel at all?): say so and stop.
if [ -n "$UC_PROBE" ]; then say "probe ok"; halt_now; fi

# Drivers: virtio-mmio transport, block, net (and the power button).
while read -r m; do
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done </lib/modules/load-order

# Disks: the root filesystem (ext4), and with uc.seed=1 a second one holding a tar
# archive of cmd, env and workdir (found by its "ustar" magic: probe order is not fixed).
want=1; [ -z "$UC_SEED" ] || want=2
i=0
while [ "$(ls /dev/vd? 2>/dev/null | wc -l)" -lt $want ]; do
    i=$((i + 1)); [ $i -lt 500 ] || fail "found $(ls /dev/vd? 2>/dev/null | wc -l) of $want disks"; usleep 10000
done
ROOTDEV='' SEEDDEV=''
for d in /dev/vd?; do
    if [ -n "$UC_SEED" ] && [ -z "$SEEDDEV" ] &&
       [ "$(dd if=$d bs=512 count=1 2>/dev/null | tail -c +258 | head -c 5)" = ustar ]; then
        SEEDDEV=$d
    elif [ -z "$ROOTDEV" ]; then
        ROOTDEV=$d
    fi
done
[ -n "$ROOTDEV" ] || fail "no root disk"
R=/newroot
mount -t ext4 -o noatime $ROOTDEV $R || fail "cannot mount $ROOTDEV"
# What to run: from the seed, else from /.uc on the root disk (vm-kit.sh disk).
S=$R/.uc
if [ -n "$UC_SEED" ]; then
    [ -n "$SEEDDEV" ] || fail "no seed disk"
    S=/run/seed; mkdir -p $S
    tar -xf $SEEDDEV -C $S || fail "cannot read the seed on $SEEDDEV"
fi
[ -f $S/cmd ] || fail "no cmd in $S"

# Identity and name resolution, written into the instance's disk (rm first:
# an image's symlink must not redirect the write into the initramfs).
hostname "$UC_HOSTNAME"
mkdir -p $R/etc
rm -f $R/etc/hostname $R/etc/hosts
echo "$UC_HOSTNAME" >$R/etc/hostname
if [ -n "$UC_DNS" ]; then
    rm -f $R/etc/resolv.conf
    printf 'nameserver %s\nsearch internal\n' "$UC_DNS" >$R/etc/resolv.conf
fi
{
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
    [ -z "$UC_IP" ] || printf '%s\t%s\n' "${UC_IP%/*}" "$UC_HOSTNAME"
} >$R/etc/hosts

# Network (the kernel's, so it outlives the chroot).
ip link set lo up
if [ -n "$UC_IP" ]; then
    i=0
    while [ ! -e /sys/class/net/eth0 ]; do
        i=$((i + 1)); [ $i -lt 200 ] || fail "no eth0"; usleep 10000
    done
    [ -z "$UC_MTU" ] || ip link set eth0 mtu "$UC_MTU" || say "cannot set mtu $UC_MTU"
    ip link set eth0 up
    ip addr add "$UC_IP" dev eth0 || fail "bad uc.ip $UC_IP"
    [ -z "$UC_GW" ] || ip route add default via "$UC_GW" || say "cannot add route via $UC_GW"
fi

# The workload's view: /proc, /sys, /dev like a container's.
for d in proc sys dev .uc/bin; do mkdir -p "$R/$d"; done
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm $R/dev/shm
mount --bind /bin $R/.uc/bin && mount -o remount,bind,ro $R/.uc/bin

# argv: env -i [defaults] [image env] sh -c 'cd WORKDIR && exec "$@"' uc-exec WORKDIR CMD...
WD=/
[ ! -s $S/workdir ] || WD=$(cat $S/workdir)
set -- PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root HOSTNAME="$UC_HOSTNAME" TERM=linux
if [ -f $S/env ]; then
    while IFS= read -r l || [ -n "$l" ]; do [ -z "$l" ] || set -- "$@" "$l"; done <$S/env
fi
set -- "$@" /.uc/bin/sh -c 'cd "$1" || exit 126; shift; unset OLDPWD SHLVL; exec "$@"' uc-exec "$WD"
n=$#
while IFS= read -r l || [ -n "$l" ]; do set -- "$@" "$l"; done <$S/cmd
[ $# -gt $n ] || fail "empty cmd"

# stdout+stderr go through a pipe (as under Docker without -t: the workload
# sees no tty, so it buffers and colours as it would there); cat copies the
# pipe to the serial console.
mkdir -p /run && mkfifo /run/uc-out
cat /run/uc-out &
copier=$!
read -r UP _ </proc/uptime
say "start ${UP}s"
chroot $R /.uc/bin/env -i "$@" </dev/null >/run/uc-out 2>&1 &
pid=$!

# Graceful stop: any event from the power button (QMP system_powerdown).
for e in /sys/class/input/event*; do
    [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] || continue
    (
        dd if="/dev/input/${e##*/}" of=/dev/null bs=24 count=1 2>/dev/null || exit 0
        say "power button: SIGTERM"
        kill -TERM $pid 2>/dev/null
        sleep "$UC_GRACE"
        say "grace over: SIGKILL"
        kill -KILL $pid 2>/dev/null
    ) &
    watcher=$!
    break
done

wait $pid 2>/dev/null   # (2>: no "Terminated"/"Killed" line from the shell)
rc=$?
[ -z "${watcher:-}" ] || kill "$watcher" 2>/dev/null
# Let the copier drain the pipe (it ends when no process holds it open any more,
# so give up after 1 s: a leftover child of the workload may hold it).
i=0; while [ $i -lt 100 ] && kill -0 $copier 2>/dev/null; do usleep 10000; i=$((i + 1)); done
kill -TERM -1 2>/dev/null; usleep 100000; kill -KILL -1 2>/dev/null
umount $R/.uc/bin $R/dev/shm $R/dev/pts $R/dev $R/sys $R/proc 2>/dev/null
umount $R 2>/dev/null || mount -o remount,ro $R 2>/dev/null
say "exit $rc"
halt_now
INIT

# -------------------------------------------------------------------- kit --
# Prints the module names of $1 and its dependencies, dependencies first,
# from the `depends=` field of each .ko (no depmod/modinfo needed).
mod_path() { find "$MODROOT" -name "$1.ko" -print -quit; }
resolve_mod() {
    local m=$1 f d
    case " $RESOLVED " in *" $m "*) return 0 ;; esac
    f=$(mod_path "$m"); [ -n "$f" ] || die "module $m not found in the kernel package"
    for d in $(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
        resolve_mod "$d"
    done
    RESOLVED="$RESOLVED $m"
}

# What the cached kit must match: layout version, module list, /init's hash.
kit_key() {
    echo "$KIT_VERSION $(printf '%s' "$GUEST_INIT" | sha256sum | cut -c1-16) $KIT_MODULES"
}

cmd_kit() {
    need_root
    local out=${1:?usage: kit OUTDIR}
    mkdir -p "$out"; out=$(cd "$out" && pwd)
    if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] &&
       [ "$(cat "$out/kit.version" 2>/dev/null)" = "$(kit_key)" ]; then
        log "kit cached in $out"; return 0
    fi
    local w; mkdir -p "$WORK"; w=$(mktemp -d "$WORK/kit.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$w'; trap - RETURN" RETURN
    export TMPDIR=$WORK

    # 1. The kernel: the meta package names the versioned one.
    ( cd "$w" && { apt-get download "$KERNEL_PKG" >/dev/null 2>&1 ||
                   { apt-get update -qq && apt-get download "$KERNEL_PKG" >/dev/null; }; } )
    local real
    real=$(dpkg-deb -f "$w"/"$KERNEL_PKG"_*.deb Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -n1)
    [ -n "$real" ] || die "cannot tell which kernel $KERNEL_PKG depends on"
    ( cd "$w" && apt-get download "$real" >/dev/null 2>&1 )
    dpkg -x "$w"/"$real"_*.deb "$w/k"
    local kver; kver=$(ls "$w/k/lib/modules")
    MODROOT=$w/k/lib/modules/$kver

    # 2. The initramfs tree.
    local r=$w/root
    mkdir -p "$r"/{bin,dev,proc,sys,run,newroot,lib/modules,etc}
    cp /bin/busybox "$r/bin/busybox"
    ! readelf -l "$r/bin/busybox" | grep -q INTERP || die "/bin/busybox is not static (install busybox-static)"
    local a
    for a in $("$r/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$r/bin/$a"; done
    mknod -m 600 "$r/dev/console" c 5 1
    RESOLVED=
    for a in $KIT_MODULES; do resolve_mod "$a"; done
    : >"$r/lib/modules/load-order"
    for a in $RESOLVED; do
        cp "$(mod_path "$a")" "$r/lib/modules/$a.ko"
        echo "$a" >>"$r/lib/modules/load-order"
    done
    printf '%s\n' "$GUEST_INIT" >"$r/init"; chmod 755 "$r/init"
    echo "$kver" >"$r/etc/uc-kernel"

    # 3. Pack (newc, gzip; the kernel has CONFIG_RD_GZIP) and install atomically.
    ( cd "$r" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null | gzip -9 >"$out/initrd.img.tmp" )
    cp "$w/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
    # The uncompressed ELF vmlinux inside the bzImage (LZ4 in Debian's build):
    # QEMU boots it through its PVH entry point, skipping the real-mode setup
    # and the decompression (about 0.4 s under TCG). Optional: needs `lz4`.
    rm -f "$out/vmlinux"
    if command -v lz4 >/dev/null; then
        local off
        off=$(LC_ALL=C grep -aboP '\x02\x21\x4c\x18' "$out/vmlinuz.tmp" | head -n1 | cut -d: -f1 || true)
        if [ -n "$off" ]; then
            tail -c +$((off + 1)) "$out/vmlinuz.tmp" | lz4 -dc >"$out/vmlinux.tmp" 2>/dev/null || true
            if [ "$(head -c 4 "$out/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] &&
               readelf -n "$out/vmlinux.tmp" 2>/dev/null | grep -q 0x00000012; then
                mv "$out/vmlinux.tmp" "$out/vmlinux"
            else
                rm -f "$out/vmlinux.tmp"; log "no PVH vmlinux in the kernel; will boot vmlinuz"
            fi
        fi
    fi
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"; mv "$out/initrd.img.tmp" "$out/initrd.img"
    cp "$r/lib/modules/load-order" "$out/modules.txt"
    echo "$kver" >"$out/kernel.version"
    kit_key >"$out/kit.version"
    log "kit in $out: kernel $kver, modules: $(tr '\n' ' ' <"$out/modules.txt")"
}

# ------------------------------------------------------------------- disk --
cmd_disk() {
    need_root
    local envs=() wd='' a
    while [ $# -gt 0 ]; do
        case "$1" in
            -e) envs+=("$2"); shift 2 ;;
            -w) wd=$2; shift 2 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    local rootfs=${1:?usage: disk [-e K=V]... [-w DIR] ROOTFS_DIR OUT.qcow2 [CMD...]}
    local out=${2:?usage: disk ROOTFS_DIR OUT.qcow2 [CMD...]}
    shift 2
    [ -d "$rootfs" ] || die "$rootfs is not a directory"
    local cmd=("$@")
    local w; mkdir -p "$WORK"; w=$(mktemp -d "$WORK/disk.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$w'; trap - RETURN" RETURN

    # Without CMD: the image's own default command, env and workdir.
    if [ ${#cmd[@]} -eq 0 ]; then
        local j=$rootfs/.uc-image.json
        [ -f "$j" ] || die "no CMD given and no $j"
        if command -v jq >/dev/null; then
            mapfile -t cmd < <(jq -r '.cmd[]' "$j")
            mapfile -t a < <(jq -r '(.env // [])[]' "$j"); envs=("${a[@]}" "${envs[@]}")
            [ -n "$wd" ] || wd=$(jq -r '.workdir // ""' "$j")
        else
            mapfile -t cmd < <(python3 -c 'import json,sys;[print(x) for x in json.load(open(sys.argv[1]))["cmd"]]' "$j")
            mapfile -t a < <(python3 -c 'import json,sys;[print(x) for x in json.load(open(sys.argv[1])).get("env") or []]' "$j")
            envs=("${a[@]}" "${envs[@]}")
            [ -n "$wd" ] || wd=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1])).get("workdir") or "")' "$j")
        fi
        [ ${#cmd[@]} -gt 0 ] || die "$j has an empty cmd"
    fi
    for a in "${cmd[@]}" "${envs[@]}" "$wd"; do
        case "$a" in *$'\n'*) die "newlines are not allowed in cmd/env/workdir" ;; esac
    done
    printf '%s\n' "${cmd[@]}" >"$w/cmd"
    if [ ${#envs[@]} -gt 0 ]; then printf '%s\n' "${envs[@]}" >"$w/env"; else : >"$w/env"; fi
    printf '%s' "$wd" >"$w/workdir"

    # Size: what the tree uses, +25% and +64 MiB for the instance's writes;
    # inodes: the tree's count +25% +4096 (mkfs's default ratio is too low for
    # trees of small files).
    local kb files mb
    kb=$(du -sk --apparent-size "$rootfs" | cut -f1)
    files=$(find "$rootfs" -xdev | wc -l)
    mb=$(( (kb * 5 / 4) / 1024 + ${DISK_EXTRA_MB:-64} ))
    truncate -s "${mb}M" "$w/fs.ext4"
    mkfs.ext4 -q -F -L uc-root -N $(( files * 5 / 4 + 4096 )) -E root_owner=0:0 \
        -d "$rootfs" "$w/fs.ext4" >/dev/null
    # /.uc/* written with debugfs: the source tree stays untouched.
    debugfs -w "$w/fs.ext4" -f - >/dev/null 2>&1 <<EOF
mkdir /.uc
write $w/cmd /.uc/cmd
write $w/env /.uc/env
write $w/workdir /.uc/workdir
EOF
    debugfs -R 'cat /.uc/cmd' "$w/fs.ext4" 2>/dev/null | cmp -s - "$w/cmd" || die "could not write /.uc/cmd"
    qemu-img convert -q -f raw -O qcow2 "$w/fs.ext4" "$out.tmp"
    mv "$out.tmp" "$out"
    log "disk $out: ${mb} MiB ext4, cmd: ${cmd[*]}"
}

cmd_overlay() {
    local base=${1:?usage: overlay BASE.qcow2 INST.qcow2} inst=${2:?usage: overlay BASE.qcow2 INST.qcow2}
    base=$(cd "$(dirname "$base")" && pwd)/$(basename "$base")
    qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$inst"
}

# -------------------------------------------------------------------- run --
# The QEMU argv, one element a line. Notes on each choice are in NOTES.md.
cmd_argv() {
    local kit=${1:?usage: argv KITDIR INST.qcow2} disk=${2:?usage: argv KITDIR INST.qcow2}
    local kernel=${VM_KERNEL:-}
    if [ -z "$kernel" ]; then kernel=$kit/vmlinux; [ -s "$kernel" ] || kernel=$kit/vmlinuz; fi
    local append="console=ttyS0 panic=-1 tsc_early_khz=2000000 tsc=reliable $VM_FAST_APPEND"
    append+=" uc.hostname=$VM_HOSTNAME uc.stop_grace=$VM_STOP_GRACE"
    [ -z "$VM_TAP" ] || append+=" uc.ip=$VM_IP uc.gw=$VM_GW uc.dns=$VM_DNS"
    [ -z "$VM_EXTRA_APPEND" ] || append+=" $VM_EXTRA_APPEND"
    local serial=stdio; [ "$VM_SERIAL" = stdio ] || serial=file:$VM_SERIAL
    printf '%s\n' timeout --kill-after=5 "$VM_TIMEOUT" "$QEMU" \
        -M microvm,acpi=on,rtc=on,pic=off,pit=off,pcie=off,usb=off \
        -accel tcg -cpu "$VM_CPU" -smp "$VM_SMP" -m "$VM_MEM" \
        -nodefaults -no-user-config -display none -no-reboot \
        -serial "$serial" \
        -kernel "$kernel" -initrd "$kit/initrd.img" -append "$append" \
        -drive "id=d0,file=$disk,format=qcow2,if=none,cache=$VM_DISK_CACHE,discard=unmap" \
        -device virtio-blk-device,drive=d0
    [ -z "$VM_TAP" ] || printf '%s\n' \
        -netdev "tap,id=n0,ifname=$VM_TAP,script=no,downscript=no,vhost=off" \
        -device "virtio-net-device,netdev=n0,mac=$VM_MAC"
    [ -z "$VM_QMP" ] || printf '%s\n' -qmp "unix:$VM_QMP,server=on,wait=off"
}

cmd_run() {
    local argv; mapfile -t argv < <(cmd_argv "$@")
    exec "${argv[@]}"
}

# Sends one QMP command. powerdown = ACPI power button (graceful: the guest
# SIGTERMs the workload and powers off); quit = QEMU stops at once.
cmd_stop() {
    local sock=${1:?usage: stop QMP_SOCKET [powerdown|quit]} how=${2:-powerdown}
    local c=system_powerdown; [ "$how" = quit ] && c=quit
    python3 - "$sock" "$c" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()                                    # greeting
for cmd in ("qmp_capabilities", sys.argv[2]):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while True:                                 # skip async events
        r = json.loads(f.readline())
        if "return" in r or "error" in r: break
    if "error" in r: sys.exit("qmp: %s" % r["error"])
PY
}

# ------------------------------------------------------------------ guest --
cmd_guest() {
    need_root
    local mods='' envs=() bins=()
    while [ $# -gt 0 ]; do
        case "$1" in
            -m) mods=$2; shift 2 ;;
            -b) bins+=("$2"); shift 2 ;;
            -e) envs+=(-e "$2"); shift 2 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    [ $# -gt 0 ] || die "usage: guest [-m MODULES] [-b FILE[:DEST]]... [-e K=V]... -- CMD..."
    KIT_MODULES="virtio_mmio virtio_blk $mods"
    local kit
    kit=${XDG_CACHE_HOME:-$HOME/.cache}/uc/guest-kit-$(printf '%s' "$KIT_MODULES" | sha256sum | cut -c1-12)
    cmd_kit "$kit"
    mkdir -p "$WORK"
    GUEST_DIR=$(mktemp -d "$WORK/guest.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$GUEST_DIR'" EXIT
    local w=$GUEST_DIR r=$GUEST_DIR/root b src dest lib
    mkdir -p "$r"/{run,tmp,proc,sys,dev,etc}
    for b in "${bins[@]}"; do
        src=${b%%:*} dest=${b#*:}
        [ "$dest" != "$b" ] || dest=$src
        case "$src" in
            */*) ;;
            *) src=$(command -v "$src") || die "$b: not found in PATH"; [ "$dest" != "${b%%:*}" ] || dest=$src ;;
        esac
        [ -f "$src" ] || die "$src: no such file"
        mkdir -p "$r$(dirname "$dest")"
        objcopy --strip-debug "$src" "$r$dest" 2>/dev/null || cp -L "$src" "$r$dest"
        chmod 755 "$r$dest"
        for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*' || true); do
            [ -e "$r$lib" ] && continue
            mkdir -p "$r$(dirname "$lib")"
            cp -L "$lib" "$r$lib"
        done
    done
    cmd_disk "${envs[@]}" "$r" "$w/disk.qcow2" "$@" 2>/dev/null
    local argv rc=0
    VM_SERIAL=$w/console.log VM_TAP='' VM_MEM=${VM_MEM:-768} VM_HOSTNAME=uc-guest
    mapfile -t argv < <(cmd_argv "$kit" "$w/disk.qcow2")
    "${argv[@]}" </dev/null >/dev/null 2>"$w/qemu.err" || rc=$?
    sed 's/\r$//' "$w/console.log" 2>/dev/null || true
    [ $rc -eq 0 ] || { cat "$w/qemu.err" >&2; die "qemu ended with status $rc"; }
    local st
    st=$(sed -n 's/^uc-init: exit \([0-9]*\).*/\1/p' "$w/console.log" | tail -n1)
    [ -n "$st" ] || die "the guest ended without saying how its command did"
    return "$st"
}

# ------------------------------------------------------------------- demo --
cmd_demo() {
    need_root
    local runs=${1:-1}
    local base=/var/tmp/vmkit
    local kit=$base/kit br=ucbr0 tap=uctap0
    # Globals, not locals: the EXIT trap runs after this function has returned.
    DEMO_NS='' DEMO_RUN=$base/run.$$ DEMO_QPID=''
    local ns="vmk-$$" run=$DEMO_RUN
    mkdir -p "$base" "$run"
    demo_cleanup() {
        set +e
        if [ -n "${DEMO_QPID:-}" ]; then
            kill -TERM "$DEMO_QPID" 2>/dev/null; wait "$DEMO_QPID" 2>/dev/null
        fi
        [ -z "$DEMO_NS" ] || ip netns del "$DEMO_NS" 2>/dev/null  # takes the bridge and tap along
        rm -rf "$DEMO_RUN"
    }
    trap demo_cleanup EXIT
    trap 'exit 130' INT TERM

    cmd_kit "$kit"
    if [ ! -s "$base/demo.qcow2" ]; then
        [ -s "$base/demo.tar" ] || /work/main/scripts/demo-image.sh "$base/demo.tar" >/dev/null
        rm -rf "$run/rootfs"; mkdir -p "$run/rootfs"
        tar -C "$run/rootfs" --numeric-owner -xf "$base/demo.tar"
        cmd_disk "$run/rootfs" "$base/demo.qcow2"
    fi

    # A namespace of our own: bridge at VM_GW (10.210.7.1/24) + tap; nothing in the root netns.
    ip netns add "$ns"
    DEMO_NS=$ns   # ours from here on: the EXIT trap removes it
    ip -n "$ns" link set lo up
    ip -n "$ns" link add "$br" type bridge
    ip -n "$ns" addr add "$VM_GW/${VM_IP#*/}" dev "$br"
    ip -n "$ns" link set "$br" up
    ip -n "$ns" tuntap add dev "$tap" mode tap
    ip -n "$ns" link set "$tap" master "$br"
    ip -n "$ns" link set "$tap" up
    # The host chose the guest's MAC, so it needs no ARP: without this entry a
    # probe sent before the guest is up waits out ARP's 1 s retry.
    ip -n "$ns" neigh replace "${VM_IP%/*}" lladdr "$VM_MAC" dev "$br" nud permanent

    local i times=()
    for i in $(seq 1 "$runs"); do
        cmd_overlay "$base/demo.qcow2" "$run/inst.qcow2"
        VM_TAP=$tap VM_SERIAL=$run/console.log VM_QMP=$run/qmp.sock VM_HOSTNAME=demo-$i VM_TIMEOUT=120
        export VM_TAP VM_SERIAL VM_QMP VM_HOSTNAME VM_TIMEOUT
        local argv; mapfile -t argv < <(cmd_argv "$kit" "$run/inst.qcow2")
        [ "$i" -gt 1 ] || { log "qemu argv:"; printf '  %q' "${argv[@]}" >&2; echo >&2; }
        rm -f "$run/console.log" "$run/qmp.sock"
        local t0 t1 ok=
        t0=$(date +%s%N)
        ip netns exec "$ns" "${argv[@]}" &
        DEMO_QPID=$!
        while kill -0 "$DEMO_QPID" 2>/dev/null; do
            if ip netns exec "$ns" curl -s --connect-timeout 0.2 -m 2 -o "$run/body" "http://${VM_IP%/*}/" 2>/dev/null; then ok=1; break; fi
            sleep 0.05
        done
        t1=$(date +%s%N)
        [ -n "$ok" ] || { cat "$run/console.log" >&2; die "run $i: no HTTP answer, qemu ended"; }
        local ms=$(( (t1 - t0) / 1000000 ))
        times+=("$ms")
        local hello; hello=$(ip netns exec "$ns" curl -s -m 2 "http://${VM_IP%/*}/cgi-bin/hello" || true)
        log "run $i: first HTTP answer after ${ms} ms ($(head -c 60 "$run/body" | tr -d '\n')); cgi: $hello"

        # Graceful stop: power button -> guest SIGTERMs httpd -> poweroff -> qemu exits.
        local s0 s1 rc=0
        s0=$(date +%s%N)
        cmd_stop "$run/qmp.sock" powerdown
        wait "$DEMO_QPID" || rc=$?
        s1=$(date +%s%N)
        DEMO_QPID=
        log "run $i: stopped in $(( (s1 - s0) / 1000000 )) ms, qemu exit $rc; console:"
        sed 's/\r$//; s/^/    | /' "$run/console.log" >&2
    done
    local sorted; sorted=$(printf '%s\n' "${times[@]}" | sort -n | tr '\n' ' ')
    local med; med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (${#times[@]} + 1) / 2 ))p")
    echo "boot-to-first-HTTP ms: $sorted(median $med)"
}

main() {
    local c=${1:-}; [ $# -gt 0 ] && shift
    case "$c" in
        kit) cmd_kit "$@" ;;
        disk) cmd_disk "$@" ;;
        overlay) cmd_overlay "$@" ;;
        argv) cmd_argv "$@" ;;
        run) cmd_run "$@" ;;
        stop) cmd_stop "$@" ;;
        guest) cmd_guest "$@" ;;
        demo) cmd_demo "$@" ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    esac
}
main "$@"
