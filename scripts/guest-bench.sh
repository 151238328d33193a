#!/usr/bin/env bash
# Our device side by side with QEMU's own virtio-blk, in the same guest:
# the e2e test's Debian root, stock kernel and initramfs with fio, booted
# once per configuration on the same raw image, running the same fio jobs
# (4 KiB random read QD1 and QD32, 4 KiB random write QD32, 128 KiB
# sequential read and write, a 70/30 mix; numjobs = the disk's queues).
# Runs are interleaved and repeated; the report (vfio-user-blk-bench
# --guest-report) takes medians and prints IOPS, p50/p99 latency, the host CPU
# of QEMU and of our server, and ours / the best QEMU configuration per job.
#
#   scripts/guest-bench.sh [--quick] [--repeat N] [--runtime S] [--out DIR]
#
# --quick: 3 jobs, libaio, 5 configurations, 1 run (under 5 minutes).
# Otherwise all 6 jobs with libaio and io_uring, 12 configurations.
# Writes DIR/guest.txt, DIR/guest.json and DIR/guest.svg (DIR: bench/).
# Runs as root (it mounts the e2e root). KVM when it boots a stock kernel,
# TCG otherwise; the table says which (under TCG only ratios mean anything).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
. "$HERE/scripts/lib-root.sh"

quick=0
repeat=""
runtime=""
out=bench
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; shift ;;
        --repeat) repeat=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "guest-bench: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "guest-bench: run as root (it mounts the e2e root)" >&2; exit 2; }
if [ $quick = 1 ]; then
    JOBS=randread-qd1,randread-qd32,randwrite-qd32
    ENGINES=libaio
    repeat=${repeat:-1}
    runtime=${runtime:-3}
else
    JOBS=randread-qd1,randread-qd32,randwrite-qd32,seqread-128k,seqwrite-128k,mix70-qd32
    ENGINES=libaio,io_uring
    repeat=${repeat:-3}
    runtime=${runtime:-5}
fi

CACHE=${VUB_E2E_CACHE:-/var/cache/vfio-user-blk}
ROOT=$CACHE/trixie-root
mkdir -p "$ROOT/tmp"
W=$(mktemp -d "$ROOT/tmp/vub-gbench.XXXXXX")
GW=/tmp/$(basename "$W") # the same folder, seen from inside the root
cleanup() {
    local rc=$?
    stop_background_jobs
    umount_root_fs "$ROOT"
    rm -rf "$W"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "guest-bench: preparing the guest (the e2e root, kernel and initramfs)"
VUB_E2E_PREPARE_ONLY=$W bash "$HERE/scripts/qemu-e2e.sh" >"$W/prepare.log" 2>&1 ||
    { tail -20 "$W/prepare.log"; exit 1; }
cargo build --release --workspace -q
BIN=$HERE/target/release/vfio-user-blk
mount_root_fs "$ROOT"
QEMU=(chroot "$ROOT" qemu-system-x86_64)

IMG=$W/disk.img
# A written image (not sparse), the same for every configuration.
dd if=/dev/urandom of="$IMG" bs=1M count=256 status=none

run_guest() { # log accel args...
    local log=$1 accel=$2
    shift 2
    : >"$log"
    "${QEMU[@]}" -nodefaults -no-user-config -nographic -display none \
        -machine q35,memory-backend=mem -accel "$accel" -cpu max -smp 2 -m 1G \
        -object memory-backend-memfd,id=mem,size=1G,share=on \
        -kernel "$GW/vmlinuz" -initrd "$GW/initramfs.cpio" \
        -serial "file:${log/#$W/$GW}" -no-reboot "$@" >"$log.qemu" 2>&1 &
    QPID=$!
}

ACCEL=tcg
if [ -c /dev/kvm ]; then
    run_guest "$W/probe.log" kvm -append "console=ttyS0 panic=-1 vub.phase=probe"
    for _ in $(seq 60); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.5; done
    kill "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
    grep -aq VUB-BOOTED "$W/probe.log" && ACCEL=kvm
fi
echo "guest-bench: accelerator $ACCEL; jobs $JOBS; engines $ENGINES; $repeat run(s) of ${runtime} s per job"

cpu_ticks() { # pid: utime + stime of the process and its threads
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

# name | QEMU disk options | our server options ("" for QEMU's own disk)
CONFIGS=(
    "qemu-modern-iothread-native|-object iothread,id=io -drive file=$GW/disk.img,format=raw,if=none,id=d,cache=none,aio=native -device virtio-blk-pci,drive=d,iothread=io,num-queues=2|"
    "qemu-legacy-iothread-native|-object iothread,id=io -drive file=$GW/disk.img,format=raw,if=none,id=d,cache=none,aio=native -device virtio-blk-pci,drive=d,iothread=io,num-queues=2,disable-modern=on|"
    "qemu-modern-iothread-io_uring|-object iothread,id=io -drive file=$GW/disk.img,format=raw,if=none,id=d,cache=none,aio=io_uring -device virtio-blk-pci,drive=d,iothread=io,num-queues=2|"
    "ours-busy-direct||--poll-mode busy --direct"
    "ours-adaptive-direct||--poll-mode adaptive --direct"
)
if [ $quick = 0 ]; then
    CONFIGS+=(
        "qemu-modern-native|-drive file=$GW/disk.img,format=raw,if=none,id=d,cache=none,aio=native -device virtio-blk-pci,drive=d,num-queues=2|"
        "qemu-legacy-native|-drive file=$GW/disk.img,format=raw,if=none,id=d,cache=none,aio=native -device virtio-blk-pci,drive=d,num-queues=2,disable-modern=on|"
        "qemu-modern-io_uring|-drive file=$GW/disk.img,format=raw,if=none,id=d,cache=none,aio=io_uring -device virtio-blk-pci,drive=d,num-queues=2|"
        "qemu-legacy-iothread-io_uring|-object iothread,id=io -drive file=$GW/disk.img,format=raw,if=none,id=d,cache=none,aio=io_uring -device virtio-blk-pci,drive=d,iothread=io,num-queues=2,disable-modern=on|"
        "ours-busy-buffered||--poll-mode busy"
        "ours-adaptive-buffered||--poll-mode adaptive"
        "ours-legacy-busy-direct||--poll-mode busy --direct|legacy"
    )
fi

RAW=$W/raw
mkdir -p "$RAW"
total=$((repeat * ${#CONFIGS[@]}))
n=0
for rep in $(seq "$repeat"); do
    for c in "${CONFIGS[@]}"; do
        IFS='|' read -r name qopts sopts iface <<<"$c"
        n=$((n + 1))
        echo "guest-bench: run $n/$total: $name"
        extra="vub.phase=bench vub.jobs=$JOBS vub.engines=$ENGINES vub.runtime=$runtime"
        [ "${iface:-}" = legacy ] && extra="$extra virtio_pci.force_legacy=1"
        SPID=""
        if [ -n "$sopts" ]; then
            rm -f "$W/ours.sock"
            # shellcheck disable=SC2086
            "$BIN" --socket "$W/ours.sock" --disk "$IMG" --queues 2 $sopts >"$W/server.log" 2>&1 &
            SPID=$!
            for _ in $(seq 100); do [ -S "$W/ours.sock" ] && break; sleep 0.1; done
            dev=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$GW/ours.sock\",\"type\":\"unix\"}}")
        else
            read -r -a dev <<<"$qopts"
        fi
        log=$RAW/$name-$rep.log
        run_guest "$log" "$ACCEL" -append "console=ttyS0 panic=-1 loglevel=4 $extra" "${dev[@]}"
        q0=""; s0=""; q1=0; s1=0
        for _ in $(seq 2400); do
            if [ -z "$q0" ] && grep -aq VUB-BENCH-START "$log"; then
                q0=$(cpu_ticks "$QPID"); s0=$([ -n "$SPID" ] && cpu_ticks "$SPID" || echo 0)
                t0=$(date +%s.%N)
            fi
            if grep -aq VUB-BENCH-END "$log"; then
                q1=$(cpu_ticks "$QPID"); s1=$([ -n "$SPID" ] && cpu_ticks "$SPID" || echo 0)
                t1=$(date +%s.%N)
                break
            fi
            kill -0 "$QPID" 2>/dev/null || break
            sleep 0.25
        done
        wait "$QPID" 2>/dev/null || true
        [ -n "$SPID" ] && { kill "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; }
        if [ -n "$q0" ] && grep -aq VUB-BENCH-END "$log"; then
            hz=$(getconf CLK_TCK)
            echo "$name $rep $ACCEL $(( q1 - q0 )) $(( s1 - s0 )) $hz $t0 $t1" >"$RAW/$name-$rep.cpu"
        else
            echo "guest-bench: $name did not finish; see the log" >&2
            tail -5 "$log" >&2 || true
        fi
    done
done
mkdir -p "$out"
"$HERE/target/release/vfio-user-blk-bench" --guest-report "$RAW" \
    --json "$out/guest.json" --svg "$out/guest.svg" | tee "$out/guest.txt"
