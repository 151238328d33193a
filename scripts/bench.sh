#!/usr/bin/env bash
# Runs the standard benchmark set in release mode: our device, QEMU's
# qemu-storage-daemon (vhost-user-blk) and direct I/O on the same image,
# interleaved, medians of --repeat runs. Writes bench/results.json,
# bench/results.txt and bench/iops.svg.
#
# The benchmark is its own crate (bench/) in the workspace; it starts the
# server binary found next to its own, so both are built.
#
#   scripts/bench.sh [extra vfio-user-blk-bench options]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v qemu-storage-daemon >/dev/null 2>&1; then
    echo "bench: installing qemu-utils (qemu-storage-daemon)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-utils >/dev/null
fi
cargo build --release --workspace -q
mkdir -p bench
./target/release/vfio-user-blk-bench \
    --image bench/bench.img --size 1G --seconds 2 --repeat 3 \
    --json bench/results.json --svg bench/iops.svg "$@" | tee bench/results.txt
