#!/usr/bin/env bash
# The NBD benchmark: ours serving an NBD export against qemu-storage-daemon
# exporting the same export through QEMU's nbd driver (vhost-user-blk),
# both driven by the benchmark's synthetic guest (ours in busy mode, as
# `ours`, and in adaptive mode, as `ours-adaptive`), and against fio's nbd
# engine (libnbd) driving the export directly (no device at all). Two
# exports: nbdkit's memory plugin, and qemu-nbd serving a raw file (in the
# page cache). 4 KiB random read and write at QD 1 and 32, 128 KiB
# sequential at QD 8.
#
# Placement: the benchmark puts the device servers (ours, qsd) on CPU 1
# and its synthetic guest on CPU 0. The export's server runs on CPU 0 too,
# beside the guest, so that the device servers have CPU 1 to themselves,
# as they would with the export on another host; fio, the direct
# reference, runs on CPU 1, where the device servers run.
#
#   scripts/bench-nbd.sh [--runs N] [--seconds S] [--only nbdkit|qemu-nbd]
#
# As root it installs nbdkit, qemu-utils and fio when missing. Writes
# bench/nbd-results.txt (per export: the benchmark's table, then fio's
# figures) and bench/nbd-results-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-fio.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
RUNS=3
SECS=5
ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --seconds) SECS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        *) echo "usage: $0 [--runs N] [--seconds S] [--only nbdkit|qemu-nbd]" >&2; exit 2 ;;
    esac
done
say() { echo "bench-nbd: $*" >&2; }
for p in nbdkit:nbdkit qemu-nbd:qemu-utils fio:fio; do
    command -v "${p%%:*}" >/dev/null ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${p##*:}" >/dev/null
done

DIR=$(mktemp -d /tmp/vub-bench-nbd.XXXXXX)
SRV_PID=""
stop_server() {
    if [ -n "$SRV_PID" ]; then
        kill "$SRV_PID" 2>/dev/null || true
        wait "$SRV_PID" 2>/dev/null || true
        SRV_PID=""
    fi
}
trap 'stop_server; rm -rf "$DIR"' EXIT

cargo build --release --workspace -q
mkdir -p bench
OUT=bench/nbd-results.txt
: >"$OUT"

one_export() { # name uri
    say "$1: the benchmark ($RUNS runs of ${SECS}s per row and target)"
    {
        echo "== $1 ($2) =="
        target/release/vfio-user-blk-bench --nbd "$2" --size 1G \
            --targets ours,ours-adaptive,qsd-threads --repeat "$RUNS" --seconds "$SECS" \
            --json "bench/nbd-results-$1.json"
        echo
        echo "fio --ioengine=nbd on the same export (driven directly, no device):"
        # On the device servers' CPU.
        fio_rows nbd 1 --ioengine=nbd --uri="$2" --size=1G
        echo
    } >>"$OUT"
}

if [ "$ONLY" != qemu-nbd ]; then
    # The memory plugin's default thread model serves requests in parallel.
    taskset -c 0 nbdkit -f --exit-with-parent -U "$DIR/nbdkit.sock" memory size=1G &
    SRV_PID=$!
    for _ in $(seq 100); do [ -S "$DIR/nbdkit.sock" ] && break; sleep 0.1; done
    # Written whole first, so that reads find data.
    taskset -c 0 fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$DIR/nbdkit.sock" \
        --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null
    one_export nbdkit "nbd+unix:///?socket=$DIR/nbdkit.sock"
    stop_server
fi
if [ "$ONLY" != nbdkit ]; then
    IMG=$DIR/export.raw
    dd if=/dev/urandom of="$IMG" bs=1M count=1024 status=none
    taskset -c 0 qemu-nbd --persistent --shared=8 -f raw --aio=threads \
        --socket="$DIR/qnbd.sock" "$IMG" &
    SRV_PID=$!
    for _ in $(seq 100); do [ -S "$DIR/qnbd.sock" ] && break; sleep 0.1; done
    one_export qemu-nbd "nbd+unix:///?socket=$DIR/qnbd.sock"
    stop_server
fi
cat "$OUT"
