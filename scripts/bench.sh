#!/usr/bin/env bash
# Runs the standard benchmark set in release mode: our device (io_uring and
# thread-pool engines), QEMU's qemu-storage-daemon (vhost-user-blk, with
# aio=threads, io_uring and, on O_DIRECT, native) and the image itself
# (threads, and io_uring on O_DIRECT), interleaved, medians of --repeat
# runs; then 4 disks served by one process, by four, and by one
# qemu-storage-daemon. Writes bench/results.json, bench/results.txt and
# bench/iops.svg.
#
# The benchmark is its own crate (bench/) in the workspace; it starts the
# server binary found next to its own, so both are built. Options given
# here override the defaults below (the last value wins).
#
#   scripts/bench.sh [extra vfio-user-blk-bench options]
#   scripts/bench.sh --quick                 # the short set, about 7 minutes here
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v qemu-storage-daemon >/dev/null 2>&1; then
    echo "bench: installing qemu-utils (qemu-storage-daemon)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-utils >/dev/null
fi
cargo build --release --workspace -q
mkdir -p bench
# The direct-* workloads run on a loop device over memory (as root; else on
# a file next to the image, which must then be on a real disk, not tmpfs).
df -hT bench | tail -n 1 | awk '{print "bench: images on " $1 " (" $2 ")"}' >&2
"${CARGO_TARGET_DIR:-target}/release/vfio-user-blk-bench" \
    --image bench/bench.img --size 1G --seconds 2 \
    --json bench/results.json --svg bench/iops.svg "$@" | tee bench/results.txt
