#!/usr/bin/env bash
# End-to-end test with a real guest: QEMU 10.1+ attaches vfio-user-blk with
# -device vfio-user-pci, and a stock Debian kernel's own virtio_pci (legacy)
# and virtio_blk drivers use it. Run as root on a Debian-like machine.
#
#   scripts/qemu-e2e.sh
#
# Exit status: 0 all checks passed, 1 a check failed, 77 skipped (the
# distribution mirror could not be reached to build the QEMU root).
#
# Environment: VUB_E2E_CACHE (root cache, default /var/cache/vfio-user-blk),
# VUB_DEBIAN_MIRROR (default http://deb.debian.org/debian),
# VUB_E2E_KEEP=1 keeps the work folder for inspection.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VUB_E2E_CACHE:-/var/cache/vfio-user-blk}
MIRROR=${VUB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$CACHE/trixie-root
EXIT_SKIP=77
# shellcheck source=scripts/lib-root.sh
. "$HERE/scripts/lib-root.sh"

say() { printf 'e2e: %s\n' "$*"; }
die() { printf 'e2e: FATAL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, bind mounts)"

WORK=$(mktemp -d /tmp/vub-e2e.XXXXXX)
ROOT_MOUNTED=""
cleanup() {
    local rc=$?
    stop_background_jobs
    # The RBD section's cluster, when it was interrupted.
    [ -n "${CEPH_DIR:-}" ] && { "$HERE/scripts/ceph-cluster.sh" stop "$CEPH_DIR" >/dev/null 2>&1 || true; }
    # A boot image interrupted while it was being built.
    [ -n "${BOOT_MNT:-}" ] && { umount "$BOOT_MNT" 2>/dev/null || true; }
    [ -n "${BOOT_LOOP:-}" ] && { losetup -d "$BOOT_LOOP" 2>/dev/null || true; }
    if [ -n "$ROOT_MOUNTED" ]; then
        umount "$ROOT$WORK" 2>/dev/null || umount -l "$ROOT$WORK" 2>/dev/null || true
        rmdir "$ROOT$WORK" 2>/dev/null || true
        umount_root_fs "$ROOT"
    fi
    if [ "${VUB_E2E_KEEP:-0}" = 1 ]; then
        say "work folder kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- QEMU ----
need_pkg() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    say "installing $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null 2>&1; }
}

mirror_reachable() {
    if command -v curl >/dev/null 2>&1; then
        curl -sf --max-time 20 -o /dev/null "$MIRROR/dists/trixie-backports/Release"
    else
        python3 - "$MIRROR/dists/trixie-backports/Release" <<'PY'
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=20).read(1)
PY
    fi
}

host_qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    local v
    v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    set -- $v
    [ "${1:-0}" -gt 10 ] || { [ "${1:-0}" -eq 10 ] && [ "${2:-0}" -ge 1 ]; } || return 1
    qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vfio-user-pci"'
}

for c in cpio:cpio xz:xz-utils; do need_pkg "${c%%:*}" "${c##*:}" || die "cannot install ${c##*:}"; done

if host_qemu_ok; then
    say "using the host's $(qemu-system-x86_64 --version | head -1)"
    QEMU=(qemu-system-x86_64)
    need_pkg debootstrap debootstrap || true
fi
# The guest kernel, busybox and fio come from the trixie root either way.
if ! root_ready "$ROOT"; then
    if ! mirror_reachable; then
        echo "e2e: SKIPPED: the Debian mirror $MIRROR cannot be reached to build the QEMU root"
        exit $EXIT_SKIP
    fi
    need_pkg debootstrap debootstrap || die "cannot install debootstrap"
    mkdir -p "$CACHE"
    build_root "$ROOT" "$MIRROR" || {
        if ! mirror_reachable; then
            echo "e2e: SKIPPED: the Debian mirror went away while building the root"
            exit $EXIT_SKIP
        fi
        die "building the trixie root failed"
    }
    root_ready "$ROOT" || die "the trixie root is incomplete after building it"
fi
mount_root_fs "$ROOT"
mkdir -p "$ROOT$WORK"
mount --bind "$WORK" "$ROOT$WORK"
ROOT_MOUNTED=1
if [ -z "${QEMU+x}" ]; then
    QEMU=(chroot "$ROOT" qemu-system-x86_64)
    say "using $("${QEMU[@]}" --version | head -1) from $ROOT"
fi

# ------------------------------------------------------------ the server ----
say "building vfio-user-blk (release)"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
(cd "$HERE" && cargo build --release -q) || die "cargo build failed"
BIN=$HERE/target/release/vfio-user-blk

DISK_MB=256
SERIAL=VUB-E2E-0001
SERIAL2=VUB-E2E-0002
IMG=$WORK/disk.img
IMG2=$WORK/disk2.img
RO_IMG=$WORK/ro.img
truncate -s ${DISK_MB}M "$IMG"
truncate -s 64M "$IMG2"
truncate -s 16M "$RO_IMG"
printf 'read-only disk\n' | dd of="$RO_IMG" conv=notrunc status=none
SOCK=$WORK/vblk.sock
SOCK2=$WORK/vblk2.sock
RO_SOCK=$WORK/ro.sock

# One target process serves all three disks, their queues shared by two
# reactors: the main disk (one-disk options), a second read-write disk
# and a read-only one (--device).
RPC_SOCK=$WORK/rpc.sock
"$BIN" --socket "$SOCK" --disk "$IMG" --queues 2 --serial "$SERIAL" --pollers 2 \
    --rpc-socket "$RPC_SOCK" \
    --device "name=second,socket=$SOCK2,disk=$IMG2,serial=$SERIAL2" \
    --device "socket=$RO_SOCK,disk=$RO_IMG,readonly=on,serial=VUB-RO" \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for s in "$SOCK" "$SOCK2" "$RO_SOCK"; do
    for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.1; done
    [ -S "$s" ] || die "server did not create $s: $(cat "$WORK"/server*.log)"
done

# ------------------------------------------------------------- the guest ----
KVER=$(ls "$ROOT/lib/modules" | sort -V | tail -1)
[ -f "$ROOT/boot/vmlinuz-$KVER" ] || die "no kernel in $ROOT/boot"
# The work folder is visible at the same path inside the root, so QEMU
# finds the kernel there whether it runs from the host or the root.
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
KERNEL=$WORK/vmlinuz

# Modules and everything they depend on, from modules.dep.
mod_closure() {
    local dep=$ROOT/lib/modules/$KVER/modules.dep todo=("$@") seen=() m path
    while [ ${#todo[@]} -gt 0 ]; do
        m=${todo[0]}
        todo=("${todo[@]:1}")
        path=$(grep -E "(^|/)${m}\.ko(\.[a-z]+)?:" "$dep" | head -1 | cut -d: -f1) || true
        [ -n "$path" ] || continue
        case " ${seen[*]} " in *" $path "*) continue ;; esac
        seen+=("$path")
        for d in $(grep -E "^${path}:" "$dep" | cut -d: -f2); do
            todo+=("$(basename "$d" | sed 's/\.ko.*//')")
        done
    done
    printf '%s\n' "${seen[@]}"
}

build_initramfs() {
    local ir=$WORK/initramfs
    rm -rf "$ir"
    mkdir -p "$ir"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,etc}
    cp "$ROOT/bin/busybox" "$ir/bin/busybox"
    for app in $(chroot "$ROOT" /bin/busybox --list); do
        [ -e "$ir/bin/$app" ] || ln -s busybox "$ir/bin/$app"
    done
    # Dynamic tools with their libraries (resolved inside the root).
    for tool in /usr/bin/fio /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/losetup; do
        mkdir -p "$ir$(dirname "$tool")"
        cp "$ROOT$tool" "$ir$tool"
        chroot "$ROOT" ldd "$tool" | grep -o '/[^ ]*' | while read -r lib; do
            mkdir -p "$ir$(dirname "$lib")"
            cp -L "$ROOT$lib" "$ir$lib"
        done
    done
    ln -sf /usr/sbin/mke2fs "$ir/sbin/mkfs.ext4"
    ln -sf /usr/sbin/e2fsck "$ir/sbin/fsck.ext4"
    # The virtio drivers (virtio_pci and its legacy part are built in to
    # Debian's kernel; modules.dep finds whatever is modular), ext4, loop.
    : >"$ir/lib/modules/load"
    for path in $(mod_closure virtio_pci virtio_pci_legacy_dev virtio_blk crc32c_generic ext4 loop | tac); do
        local name
        name=$(basename "$path" | sed 's/\.ko.*//')
        case "$path" in
            *.xz) xz -dc "$ROOT/lib/modules/$KVER/$path" >"$ir/lib/modules/$name.ko" ;;
            *.zst) zstd -qdc "$ROOT/lib/modules/$KVER/$path" >"$ir/lib/modules/$name.ko" ;;
            *) cp "$ROOT/lib/modules/$KVER/$path" "$ir/lib/modules/$name.ko" ;;
        esac
        echo "$name" >>"$ir/lib/modules/load"
    done
    cp "$HERE/scripts/guest-init.sh" "$ir/init"
    chmod +x "$ir/init"
    (cd "$ir" && find . | cpio -o -H newc --quiet) >"$WORK/initramfs.cpio"
}
say "building the initramfs (kernel $KVER)"
build_initramfs
# scripts/guest-bench.sh only wants the guest: the kernel and initramfs.
if [ -n "${VUB_E2E_PREPARE_ONLY:-}" ]; then
    cp "$KERNEL" "$WORK/initramfs.cpio" "$VUB_E2E_PREPARE_ONLY/"
    exit 0
fi

SECTORS=$((DISK_MB * 2048))
QEMU_LOG_N=0
# A log name other than the phase's, and more kernel arguments (main_run).
LOG_TAG=""
APPEND_EXTRA=""
vdev() { printf '{"driver":"vfio-user-pci","socket":{"path":"%s","type":"unix"}}' "$1"; }
# The guest's devices: the three disks of the main server.
QDEVS=(-device "$(vdev "$SOCK")" -device "$(vdev "$SOCK2")" -device "$(vdev "$RO_SOCK")")
# qemu_cmd PHASE [extra args...]: the QEMU command line, in QCMD.
qemu_cmd() {
    local phase=$1
    shift
    QEMU_LOG=$WORK/serial-${LOG_TAG:-$phase}.log
    : >"$QEMU_LOG"
    QCMD=("${QEMU[@]}"
        -nodefaults -no-user-config -nographic -display none
        -machine q35,memory-backend=mem -accel "$ACCEL" -cpu max -smp 2 -m 1G
        -object memory-backend-memfd,id=mem,size=1G,share=on
        -kernel "$KERNEL" -initrd "$WORK/initramfs.cpio"
        -append "console=ttyS0 panic=-1 loglevel=4 vub.phase=$phase vub.sectors=$SECTORS vub.serial=$SERIAL vub.serial2=$SERIAL2 $APPEND_EXTRA"
        -serial "file:$QEMU_LOG"
        "${QDEVS[@]}"
        "$@")
}
# run_qemu PHASE TIMEOUT [extra args...]
run_qemu() {
    local phase=$1 t=$2
    shift 2
    qemu_cmd "$phase" "$@"
    # In the background, so that a signal to this script is handled at once
    # and cleanup ends QEMU too (timeout passes the signal on).
    timeout --signal=KILL "$t" "${QCMD[@]}" &
    local p=$!
    wait "$p"
}

# --------------------------------------------------------- acceleration ----
ACCEL=tcg
if [ -c /dev/kvm ]; then
    ACCEL=kvm
    if run_qemu probe 60 -no-reboot >/dev/null 2>&1 && grep -q 'VUB-BOOTED' "$WORK/serial-probe.log"; then
        say "KVM boots a stock kernel here: using it"
    else
        ACCEL=tcg
        say "KVM cannot boot a stock kernel here (paravirtual /dev/kvm?): using TCG"
    fi
else
    say "no /dev/kvm: using TCG"
fi

# ---------------------------------------------------------------- checks ----
RESULTS=$WORK/results.txt
: >"$RESULTS"
check() { # name PASS|FAIL [detail]
    printf '%-28s %s %s\n' "$1" "$2" "${3:-}" | tee -a "$RESULTS"
}
collect() { # serial-log [prefix]: the guest's own PASS/FAIL lines
    { grep -a '^VUB-CHECK ' "$1" || true; } | while read -r _ name verdict rest; do
        check "${2:-}$name" "$verdict" "$rest"
    done
}
server_alive() {
    kill -0 "$SERVER_PID" 2>/dev/null
}

# While the guest runs: when it says it is ready, grow the second disk
# through the management socket; the guest checks that it sees the size.
resize_when_ready() { # serial-log size
    (
        for _ in $(seq 1800); do
            if grep -aq 'VUB-RESIZE-READY' "$1" 2>/dev/null; then
                "$BIN" rpc --rpc-socket "$RPC_SOCK" device_resize name=second size="$2" \
                    >>"$WORK/resize.out" 2>&1 || true
                exit 0
            fi
            sleep 0.5
        done
    ) &
}

# main_run TAG INTERFACE RESIZE_MB [kernel args]: boot 1 (checks), reboot,
# boot 2 (data survives), then the host compares the images with what the
# guest read. Check names of runs after the first carry TAG/.
main_run() {
    local tag=$1 iface=$2 mb=$3 prefix=""
    shift 3
    [ "$tag" = main ] || prefix="$tag/"
    say "$tag: boot 1 (checks, $iface interface), reboot, boot 2 (data survives) under $ACCEL"
    LOG_TAG=$tag
    APPEND_EXTRA="vub.iface=$iface vub.resize=$((mb * 2048)) $*"
    resize_when_ready "$WORK/serial-$tag.log" "${mb}M"
    if run_qemu main 900; then :; else say "QEMU exited with $?"; fi
    LOG_TAG=""
    APPEND_EXTRA=""
    collect "$QEMU_LOG" "$prefix"
    grep -aq 'VUB-DONE main' "$QEMU_LOG" || check "${prefix}guest-finished" FAIL "see $QEMU_LOG"
    grep -aq 'VUB-DONE reboot' "$QEMU_LOG" && check "${prefix}reboot-second-boot" PASS ||
        check "${prefix}reboot-second-boot" FAIL
    local g h g2 h1 h2
    g=$(grep -a '^VUB-MD5 fio-region ' "$QEMU_LOG" | head -1 | tr -d '\r' | awk '{print $3}')
    h=$(dd if="$IMG" bs=1M count=32 status=none | md5sum | awk '{print $1}')
    if [ -n "$g" ] && [ "$g" = "$h" ]; then
        check "${prefix}host-image-matches-guest" PASS "$h"
    else
        check "${prefix}host-image-matches-guest" FAIL "guest ${g:-none} host $h"
    fi
    # The guest wrote the same pattern to both read-write disks at once.
    g2=$(grep -a '^VUB-MD5 two-disks ' "$QEMU_LOG" | head -1 | tr -d '\r' | awk '{print $3" "$4}')
    h1=$(dd if="$IMG" bs=1M skip=128 count=16 status=none | md5sum | awk '{print $1}')
    h2=$(dd if="$IMG2" bs=1M count=16 status=none | md5sum | awk '{print $1}')
    if [ "$g2" = "$h1 $h2" ]; then
        check "${prefix}two-disks-host-images-match" PASS
    else
        check "${prefix}two-disks-host-images-match" FAIL "host $h1 $h2"
    fi
    server_alive && check "${prefix}server-survived-reboot" PASS ||
        check "${prefix}server-survived-reboot" FAIL
}

# quick_run TAG SOCKET SERIAL [append]: the quick checks (fio with
# verification) in a guest whose one disk is the target on SOCKET; the
# guest's md5 of the fio region in QUICK_MD5.
quick_run() {
    local tag=$1 sock=$2 serial=$3 saved
    saved=("${QDEVS[@]}")
    QDEVS=(-device "$(vdev "$sock")")
    APPEND_EXTRA="vub.quick=$serial ${4:-}"
    if run_qemu quick 600 -no-reboot; then :; else say "QEMU exited with $?"; fi
    APPEND_EXTRA=""
    QDEVS=("${saved[@]}")
    collect "$QEMU_LOG" "$tag/"
    grep -aq 'VUB-DONE quick' "$QEMU_LOG" || check "$tag/guest-finished" FAIL "see $QEMU_LOG"
    QUICK_MD5=$(grep -a '^VUB-MD5 quick ' "$QEMU_LOG" | head -1 | tr -d '\r' | awk '{print $3}')
}

# same_md5 CHECK HOST-MD5 [how the host read it]: the guest's QUICK_MD5
# against what the host read of the disk.
same_md5() {
    if [ -n "$QUICK_MD5" ] && [ "$QUICK_MD5" = "$2" ]; then
        check "$1" PASS "$2${3:+ ($3)}"
    else
        check "$1" FAIL "guest ${QUICK_MD5:-none} host $2${3:+ ($3)}"
    fi
}

# wait_socket PATH: until the target listens there (10 s at most).
wait_socket() {
    for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
    return 1
}

# The default: Linux binds the modern interface. Then the same guest with
# virtio_pci.force_legacy=1 drives the legacy one.
main_run main modern 128
main_run legacy legacy 192 virtio_pci.force_legacy=1

# A second target with doorbells in a shared page QEMU maps (--notify mmap)
# and the packed ring offered: the guest's modern driver takes both.
say "notify-mmap-packed: a disk with --notify mmap --packed under $ACCEL"
MM_SOCK=$WORK/mmap.sock
MM_IMG=$WORK/mmap.img
truncate -s 64M "$MM_IMG"
"$BIN" --socket "$MM_SOCK" --disk "$MM_IMG" --queues 2 --serial VUB-E2E-MMAP \
    --notify mmap --packed --poll-mode adaptive >"$WORK/server-mmap.log" 2>&1 &
MM_PID=$!
wait_socket "$MM_SOCK" || true
quick_run mmap "$MM_SOCK" VUB-E2E-MMAP vub.packed=1
same_md5 mmap/host-image-matches-guest "$(dd if="$MM_IMG" bs=1M count=32 status=none | md5sum | awk '{print $1}')"
if grep -q 'RING_PACKED' "$WORK/server-mmap.log" && ! grep -q panicked "$WORK/server-mmap.log"; then
    check mmap/server-saw-packed-driver PASS
else
    check mmap/server-saw-packed-driver FAIL "$(tail -3 "$WORK/server-mmap.log")"
fi
# QEMU mapped the notify page: not one doorbell came as a message (the
# server counts them and says so when the client goes).
for _ in $(seq 50); do
    grep -q 'doorbell message(s) through' "$WORK/server-mmap.log" && break
    sleep 0.1
done
# (The line names the device: "disk0: 0 doorbell message(s) ...".)
if grep -q '[] ][^ ]*: 0 doorbell message(s) through the modern notify area.*Mmap' "$WORK/server-mmap.log"; then
    main_bells=$(grep -o '[0-9]* doorbell message(s)' "$WORK/server.log" | awk '{print $1}' | sort -n | tail -1)
    check mmap/doorbells-through-the-mapped-page PASS "0 doorbell messages (the main disk, without it: ${main_bells:-?})"
else
    check mmap/doorbells-through-the-mapped-page FAIL "$(grep 'doorbell message' "$WORK/server-mmap.log" | tail -1)"
fi
kill "$MM_PID" 2>/dev/null || true
wait "$MM_PID" 2>/dev/null || true

# ------------------------------------------------------- live upgrade ----
# fio with verification in the guest while the target replaces its own
# binary 10 times (target_upgrade): no error in the guest, the data right,
# the same process throughout.
say "upgrade: fio with verification while the target is upgraded 10 times under $ACCEL"
UP_SOCK=$WORK/up.sock
UP_IMG=$WORK/up.img
UP_RPC=$WORK/up-rpc.sock
truncate -s 64M "$UP_IMG"
"$BIN" --socket "$UP_SOCK" --disk "$UP_IMG" --queues 2 --serial VUB-E2E-UPG \
    --rpc-socket "$UP_RPC" >"$WORK/server-up.log" 2>&1 &
UP_PID=$!
wait_socket "$UP_SOCK" || true
: >"$WORK/upgrades.out"
(
    for _ in $(seq 2400); do
        grep -aq 'VUB-UPGRADE-FIO-START' "$WORK/serial-upgrade.log" 2>/dev/null && break
        sleep 0.25
    done
    sleep 2
    for i in $(seq 10); do
        "$BIN" rpc --rpc-socket "$UP_RPC" target_upgrade >>"$WORK/upgrades.out" 2>&1 ||
            echo "UPGRADE-FAILED $i" >>"$WORK/upgrades.out"
        sleep 1
    done
) &
UPGRADER=$!
saved_devs=("${QDEVS[@]}")
QDEVS=(-device "$(vdev "$UP_SOCK")")
APPEND_EXTRA="vub.quick=VUB-E2E-UPG vub.runtime=25"
if run_qemu upgrade 900 -no-reboot; then :; else say "QEMU exited with $?"; fi
APPEND_EXTRA=""
QDEVS=("${saved_devs[@]}")
wait "$UPGRADER" 2>/dev/null || true
collect "$QEMU_LOG" upgrade/
grep -aq 'VUB-DONE upgrade' "$QEMU_LOG" || check upgrade/guest-finished FAIL "see $QEMU_LOG"
pauses=$(grep -o '"pause_ms": [0-9.]*' "$WORK/upgrades.out" | awk '{printf "%.1f ", $2}')
n=$(grep -c '"pause_ms"' "$WORK/upgrades.out" || true)
if [ "$n" = 10 ]; then
    check upgrade/ten-upgrades-under-fio PASS "pauses (ms): $pauses"
else
    check upgrade/ten-upgrades-under-fio FAIL "$n of 10: $(grep -v pause_ms "$WORK/upgrades.out" | tail -3)"
fi
QUICK_MD5=$(grep -a '^VUB-MD5 quick ' "$QEMU_LOG" | head -1 | tr -d '\r' | awk '{print $3}')
same_md5 upgrade/host-image-matches-guest "$(dd if="$UP_IMG" bs=1M count=32 status=none | md5sum | awk '{print $1}')"
if kill -0 "$UP_PID" 2>/dev/null && ! grep -q panicked "$WORK/server-up.log"; then
    check upgrade/same-process-no-panic PASS "pid $UP_PID"
else
    check upgrade/same-process-no-panic FAIL "$(tail -3 "$WORK/server-up.log")"
fi
kill "$UP_PID" 2>/dev/null || true
wait "$UP_PID" 2>/dev/null || true

# ----------------------------------------------------------- an RBD disk ----
# A one-node Ceph cluster (the project's script), an image on it served as
# the guest's disk: fio with verification in the guest, then the image as
# librbd reads it (rbd export) compared with what the guest read.
say "rbd: a guest on a Ceph RBD image under $ACCEL"
CEPH_DIR=/tmp/vub-e2e-ceph.$$
if ! "$HERE/scripts/ceph-cluster.sh" install >/dev/null 2>&1; then
    check rbd/cluster FAIL "cannot install Ceph's packages"
elif ! "$HERE/scripts/ceph-cluster.sh" start "$CEPH_DIR" >"$WORK/ceph-start.log" 2>&1; then
    check rbd/cluster FAIL "$(tail -5 "$WORK/ceph-start.log")"
else
    RBD_SOCK=$WORK/rbd.sock
    rbd -c "$CEPH_DIR/ceph.conf" create rbd/e2e --size 64M
    "$BIN" --socket "$RBD_SOCK" --disk "rbd:rbd/e2e:conf=$CEPH_DIR/ceph.conf" --queues 2 \
        --serial VUB-E2E-RBD >"$WORK/server-rbd.log" 2>&1 &
    RBD_PID=$!
    wait_socket "$RBD_SOCK" || true
    quick_run rbd "$RBD_SOCK" VUB-E2E-RBD
    kill "$RBD_PID" 2>/dev/null || true
    wait "$RBD_PID" 2>/dev/null || true
    # (Exported whole: a pipe cut short by head would fail the pipeline.)
    h=none
    if rbd -c "$CEPH_DIR/ceph.conf" export --no-progress rbd/e2e "$WORK/rbd-export.img" >/dev/null 2>&1; then
        h=$(dd if="$WORK/rbd-export.img" bs=1M count=32 status=none | md5sum | awk '{print $1}')
    fi
    same_md5 rbd/image-matches-guest "$h" "rbd export"
    if grep -q panicked "$WORK/server-rbd.log"; then
        check rbd/server-healthy FAIL "$(grep panicked "$WORK/server-rbd.log" | head -1)"
    fi
fi
"$HERE/scripts/ceph-cluster.sh" stop "$CEPH_DIR" >/dev/null 2>&1 || true

# ------------------------------------------------ an NBD disk (qcow2) ----
# A qcow2 image exported by qemu-nbd, served by the target as an
# nbd+unix:// disk: fio with verification in the guest, then the image as
# qemu-img reads it (converted to raw) compared with what the guest read.
say "nbd: a guest on a qcow2 image through qemu-nbd under $ACCEL"
need_pkg qemu-nbd qemu-utils
NBD_IMG=$WORK/nbd.qcow2
QNBD_SOCK=$WORK/qnbd.sock
NBD_SOCK=$WORK/nbd.sock
qemu-img create -q -f qcow2 "$NBD_IMG" 64M
qemu-nbd --persistent --shared=4 --cache=none --aio=threads -f qcow2 \
    --socket="$QNBD_SOCK" "$NBD_IMG" >"$WORK/qemu-nbd.log" 2>&1 &
QNBD_PID=$!
for _ in $(seq 100); do [ -S "$QNBD_SOCK" ] && break; sleep 0.1; done
"$BIN" --socket "$NBD_SOCK" --disk "nbd+unix:///?socket=$QNBD_SOCK" --queues 2 \
    --serial VUB-E2E-NBD >"$WORK/server-nbd.log" 2>&1 &
NBD_PID=$!
if wait_socket "$NBD_SOCK"; then
    quick_run nbd "$NBD_SOCK" VUB-E2E-NBD
else
    check nbd/server-started FAIL "$(tail -3 "$WORK/server-nbd.log")"
fi
kill "$NBD_PID" 2>/dev/null || true
wait "$NBD_PID" 2>/dev/null || true
kill "$QNBD_PID" 2>/dev/null || true
wait "$QNBD_PID" 2>/dev/null || true
h=none
if qemu-img convert -f qcow2 -O raw "$NBD_IMG" "$WORK/nbd-out.raw" 2>/dev/null; then
    h=$(dd if="$WORK/nbd-out.raw" bs=1M count=32 status=none | md5sum | awk '{print $1}')
fi
same_md5 nbd/qcow2-image-matches-guest "$h" "qemu-img convert"
if grep -q panicked "$WORK/server-nbd.log"; then
    check nbd/server-healthy FAIL "$(grep panicked "$WORK/server-nbd.log" | head -1)"
fi

# --------------------------------------------------- boot from the disk ----
# A raw image with a partition table, ext4, the kernel, the initramfs and
# extlinux (Debian's), cached by the md5 of what it holds. SeaBIOS boots it
# from our device with no -kernel; the guest's init reports the boot.
build_boot_image() { # image
    # Built in the work folder (which the root sees), then moved in.
    local img=$1 tmp=$WORK/boot.img.tmp mnt=$ROOT/tmp/vub-boot-mnt loop
    local start=2048
    rm -f "$tmp"
    truncate -s 96M "$tmp"
    printf 'label: dos\nstart=%s, type=83, bootable\n' "$start" |
        chroot "$ROOT" sfdisk -q "$tmp" >/dev/null || return 1
    dd if="$ROOT/usr/lib/syslinux/mbr/mbr.bin" of="$tmp" bs=440 count=1 conv=notrunc status=none || return 1
    loop=$(losetup -f --show -o $((start * 512)) "$tmp") || return 1
    BOOT_LOOP=$loop
    # extlinux reads ext4 without the 64bit and metadata_csum features.
    chroot "$ROOT" mkfs.ext4 -q -F -L vubboot -O ^64bit,^metadata_csum "$loop" || { losetup -d "$loop"; BOOT_LOOP=""; return 1; }
    mkdir -p "$mnt"
    mount "$loop" "$mnt" || { losetup -d "$loop"; BOOT_LOOP=""; return 1; }
    BOOT_MNT=$mnt
    local rc=0
    mkdir -p "$mnt/boot/extlinux"
    cp "$KERNEL" "$mnt/boot/vmlinuz" && cp "$WORK/initramfs.cpio" "$mnt/boot/initramfs.cpio" || rc=1
    cat >"$mnt/boot/extlinux/extlinux.conf" <<CONF
DEFAULT vub
PROMPT 0
TIMEOUT 1
LABEL vub
    LINUX /boot/vmlinuz
    INITRD /boot/initramfs.cpio
    APPEND console=ttyS0 panic=-1 loglevel=4 vub.phase=boot
CONF
    [ $rc -eq 0 ] && { chroot "$ROOT" extlinux --install /tmp/vub-boot-mnt/boot/extlinux >/dev/null 2>&1 || rc=1; }
    umount "$mnt"
    BOOT_MNT=""
    losetup -d "$loop"
    BOOT_LOOP=""
    rmdir "$mnt" 2>/dev/null || true
    # The file system went in through a loop device at an offset, which
    # tells extlinux that it starts at sector 0: its boot sector's hidden
    # sectors field (offset 0x1c) gets the partition's real start.
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((start & 255)) $(((start >> 8) & 255)) \
        $(((start >> 16) & 255)) $(((start >> 24) & 255)))" |
        dd of="$tmp" bs=1 seek=$((start * 512 + 0x1c)) count=4 conv=notrunc status=none || rc=1
    [ $rc -eq 0 ] && mv "$tmp" "$img"
}

say "boot-from-disk: SeaBIOS boots a guest from our device (no -kernel) under $ACCEL"
BOOT_SUM=$(cat "$KERNEL" "$WORK/initramfs.cpio" | md5sum | cut -c1-12)
BOOT_IMG=$CACHE/boot-$BOOT_SUM.img
if ! ensure_boot_tools "$ROOT"; then
    check boot-from-disk FAIL "extlinux could not be installed in $ROOT (is the Debian mirror reachable?)"
elif [ ! -f "$BOOT_IMG" ] && ! build_boot_image "$BOOT_IMG"; then
    check boot-from-disk FAIL "building the boot image failed"
else
    # Older images of other kernels or initramfs go.
    find "$CACHE" -maxdepth 1 -name 'boot-*.img' ! -name "$(basename "$BOOT_IMG")" -delete
    BOOT_SOCK=$WORK/boot.sock
    "$BIN" --socket "$BOOT_SOCK" --disk "$BOOT_IMG" --readonly --serial VUB-BOOT \
        >"$WORK/server-boot.log" 2>&1 &
    BOOT_PID=$!
    for _ in $(seq 100); do [ -S "$BOOT_SOCK" ] && break; sleep 0.1; done
    QEMU_LOG=$WORK/serial-boot.log
    : >"$QEMU_LOG"
    # Real-mode firmware and the boot loader run under any KVM, even one
    # that cannot run the kernel; TCG cannot boot from an out-of-process
    # disk at all (it does not see another process's writes into pages it
    # has already translated code from: qemu-storage-daemon's
    # vhost-user-blk stops at the same point).
    BOOT_ACCEL=$ACCEL
    [ "$BOOT_ACCEL" = tcg ] && [ -c /dev/kvm ] && BOOT_ACCEL=kvm
    "${QEMU[@]}" \
        -nodefaults -no-user-config -nographic -display none \
        -machine q35,memory-backend=mem -accel "$BOOT_ACCEL" -cpu max -smp 2 -m 1G \
        -object memory-backend-memfd,id=mem,size=1G,share=on \
        -serial "file:$QEMU_LOG" -no-reboot \
        -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$BOOT_SOCK\",\"type\":\"unix\"},\"bootindex\":1}" \
        >"$WORK/qemu-boot.log" 2>&1 &
    QPID=$!
    for _ in $(seq 240); do
        grep -aq 'VUB-DONE boot' "$QEMU_LOG" && break
        kill -0 "$QPID" 2>/dev/null || break
        # A KVM that cannot run the kernel stops after the loader's banner.
        if [ "$ACCEL" = tcg ] && grep -aq 'SYSLINUX' "$QEMU_LOG"; then
            sleep 5
            break
        fi
        sleep 0.5
    done
    kill "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
    if [ "$BOOT_ACCEL" = tcg ]; then
        check boot-loader-from-disk SKIP "no /dev/kvm, and TCG cannot boot any out-of-process disk"
    elif grep -aq 'SYSLINUX' "$QEMU_LOG"; then
        check boot-loader-from-disk PASS "SeaBIOS booted the disk's MBR and extlinux read its loader through our device ($BOOT_ACCEL)"
    else
        check boot-loader-from-disk FAIL "no boot loader banner; see $QEMU_LOG"
    fi
    if grep -aq 'VUB-DONE boot' "$QEMU_LOG"; then
        collect "$QEMU_LOG"
    elif [ "$ACCEL" = tcg ]; then
        check boot-from-disk SKIP "the kernel needs KVM that can run one (this machine's cannot), and TCG cannot boot any out-of-process disk"
    else
        collect "$QEMU_LOG"
        check boot-from-disk FAIL "the guest did not come up from the disk; see $QEMU_LOG"
    fi
    kill "$BOOT_PID" 2>/dev/null || true
    wait "$BOOT_PID" 2>/dev/null || true
fi

say "QEMU killed with SIGKILL during fio, then a new QEMU on the same socket"
qemu_cmd fio-kill -no-reboot
# chroot execs QEMU, so this PID is QEMU's own.
"${QCMD[@]}" >/dev/null 2>&1 &
QPID=$!
for _ in $(seq 600); do
    grep -aq 'VUB-FIO-RUNNING' "$QEMU_LOG" 2>/dev/null && break
    kill -0 "$QPID" 2>/dev/null || break
    sleep 1
done
if grep -aq 'VUB-FIO-RUNNING' "$QEMU_LOG"; then
    sleep 5
    kill -9 "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
    check qemu-killed-mid-fio PASS
else
    kill -9 "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
    check qemu-killed-mid-fio FAIL "fio never started; see $QEMU_LOG"
fi
server_alive && check server-survived-kill PASS || check server-survived-kill FAIL
run_qemu after-kill 600 -no-reboot >/dev/null 2>&1 || true
collect "$WORK/serial-after-kill.log"
grep -aq 'VUB-DONE after-kill' "$WORK/serial-after-kill.log" || check after-kill-finished FAIL

if server_alive && ! grep -q panicked "$WORK/server.log"; then
    check server-never-restarted-no-panic PASS
else
    check server-never-restarted-no-panic FAIL
fi

echo "----"
PASSES=$(grep -c ' PASS' "$RESULTS" || true)
FAILS=$(grep -c ' FAIL' "$RESULTS" || true)
if [ "$FAILS" -ne 0 ]; then
    say "server log tail:"
    tail -20 "$WORK/server.log" | sed 's/^/  /'
    for f in "$WORK"/serial-*.log; do
        say "$(basename "$f") tail:"
        tail -30 "$f" | sed 's/^/  /'
    done
fi
echo "e2e: $PASSES passed, $FAILS failed"
[ "$FAILS" -eq 0 ] && [ "$PASSES" -gt 0 ]
