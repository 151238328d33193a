#!/usr/bin/env bash
# The RBD benchmark: ours serving an image of a one-node Ceph cluster
# (scripts/ceph-cluster.sh) against qemu-storage-daemon exporting the same
# image through QEMU's rbd driver (vhost-user-blk), both driven by the
# benchmark's synthetic guest (ours in busy mode, as `ours`, and in adaptive
# mode, as `ours-adaptive`: on a machine that runs the cluster too, a
# spinning reactor takes a core from the OSD), and against fio's rbd
# engine driving the
# image directly (no device at all). 4 KiB random read and write at QD 1
# and 32, 128 KiB sequential at QD 8.
#
#   scripts/bench-rbd.sh [--runs N] [--seconds S]
#
# As root it installs what it needs: Ceph's packages, fio, and the rbd
# module of the installed qemu-storage-daemon (Debian's qemu-block-extra of
# the same version). Writes bench/rbd-results.txt (the benchmark's table,
# then fio's figures and the ratios) and bench/rbd-results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib-fio.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
RUNS=3
SECS=5
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --seconds) SECS=$2; shift 2 ;;
        *) echo "usage: $0 [--runs N] [--seconds S]" >&2; exit 2 ;;
    esac
done
say() { echo "bench-rbd: $*" >&2; }

scripts/ceph-cluster.sh install
command -v fio >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q fio >/dev/null

DIR=/tmp/vub-bench-ceph.$$
trap 'scripts/ceph-cluster.sh stop "$DIR" >/dev/null 2>&1 || true' EXIT
scripts/ceph-cluster.sh start "$DIR" >/dev/null
CONF=$DIR/ceph.conf
export CEPH_CONF=$CONF
rbd create rbd/bench --size 1G
# Written whole, so that reads find data in every object.
rbd bench --io-type write --io-pattern seq --io-size 4M --io-total 1G rbd/bench >/dev/null

# qemu-storage-daemon's rbd driver is a module (qemu-block-extra).
if ! qemu-img info --image-opts "driver=rbd,pool=rbd,image=bench,conf=$CONF" >/dev/null 2>&1; then
    ver=$(dpkg-query -W -f='${Version}' qemu-utils)
    say "installing qemu-block-extra $ver (QEMU's rbd driver)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "qemu-block-extra=$ver" >/dev/null 2>&1; then
        case $ver in
            *bpo12*)
                # The backports build of QEMU: its module is in backports.
                echo "deb http://deb.debian.org/debian bookworm-backports main" \
                    >/etc/apt/sources.list.d/vub-bookworm-backports.list
                apt-get update -q >/dev/null
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                    "qemu-block-extra=$ver" >/dev/null
                ;;
            *) say "cannot install qemu-block-extra $ver"; exit 1 ;;
        esac
    fi
fi

cargo build --release --workspace -q
mkdir -p bench
OUT=bench/rbd-results.txt
target/release/vfio-user-blk-bench --rbd "rbd:rbd/bench:conf=$CONF" --size 1G \
    --targets ours,ours-adaptive,qsd-threads --repeat "$RUNS" --seconds "$SECS" \
    --json bench/rbd-results.json >"$OUT"

# fio's rbd engine on the image itself, pinned as the benchmark pins its
# guest (CPU 0), each row as many times as the others; librbd's cache off,
# as ours and qemu-storage-daemon's (cache=none) have it.
sed '/^\[client\]/a rbd cache = false' "$CONF" >"$DIR/fio.conf"
{
    echo
    echo "fio --ioengine=rbd on the same image (the image driven directly, no device):"
    CEPH_CONF=$DIR/fio.conf fio_rows rbd 0 --ioengine=rbd --clientname=admin \
        --pool=rbd --rbdname=bench
} >>"$OUT"
cat "$OUT"
