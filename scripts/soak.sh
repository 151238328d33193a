#!/usr/bin/env bash
# Soak test: kills clients at random points and checks that the server
# keeps every acknowledged write, writes nothing else, and does not leak.
#
# Builds both workspace members in release mode, starts the server on a
# private temporary folder (one or two disks created with --size, and a
# management socket), then runs `vfio-user-blk-bench soak`: each cycle
# spawns a client (`soak-client`) that attaches (legacy or modern, 1 to 4
# queues) and submits verified writes, flushes and reads, SIGKILLs it after
# a random delay, waits until the server has torn it down, verifies the
# whole image against the clients' journals, and samples the server's
# descriptors, threads and RSS. With --devices 2 a second client runs all
# along on the second disk and must progress in every cycle; its image is
# verified at the end. Exits with the soak's status (0: PASS).
#
#   scripts/soak.sh --cycles N [--devices 1|2] [--seed S]
#                   [--io-engine io-uring|threads] [--io-threads N]
#                   [--size SIZE] [--server-args "..."] [--device-opts K=V,...]
#                   [--server-bin PATH]
#                   [--verify-every K] [--keep-going] [--keep] [--nbd]
#                   [--upgrade-every K]
#
#   --device-opts more keys for each --device (e.g. direct=on)
#   --server-bin  another build of the server to soak (default: this tree's)
#   --verify-every  verifies the image every K cycles only (the next
#                 client then attaches right after the teardown)
#   --keep-going  counts the cycles that lose data instead of stopping at
#                 the first (each bad sector is then taken as it is found)
#   --upgrade-every  upgrades the server in place (target_upgrade) in every
#                 K-th cycle, half-way through the client's life
#   --keep        keeps the folder (images, journals, logs) and says where
#   --nbd         serves each image through nbdkit's file plugin (one
#                 nbdkit per disk, on a socket in the folder) and each disk
#                 as an NBD disk of it: the soak then checks the NBD
#                 client's teardown under killed clients
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

cycles=100
devices=1
seed=""
engine=io-uring
io_threads=8
size=32M
server_args=""
device_opts=""
server_bin=""
keep_going=""
verify_every=1
keep=0
nbd=0
die() { echo "soak: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cycles) cycles="${2:?}"; shift 2 ;;
        --devices) devices="${2:?}"; shift 2 ;;
        --seed) seed="${2:?}"; shift 2 ;;
        --io-engine) engine="${2:?}"; shift 2 ;;
        --io-threads) io_threads="${2:?}"; shift 2 ;;
        --size) size="${2:?}"; shift 2 ;;
        --server-args) server_args="${2?}"; shift 2 ;;
        --device-opts) device_opts=",${2:?}"; shift 2 ;;
        --server-bin) server_bin="${2:?}"; shift 2 ;;
        --keep-going) keep_going=--keep-going; shift ;;
        --verify-every) verify_every="${2:?}"; shift 2 ;;
        --keep) keep=1; shift ;;
        --nbd) nbd=1; shift ;;
        --upgrade-every) upgrade_every="${2:?}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case "$devices" in 1|2) ;; *) die "--devices is 1 or 2" ;; esac
case "$cycles" in ''|*[!0-9]*|0) die "--cycles takes a number from 1" ;; esac

cargo build --release --workspace -q
bin="${CARGO_TARGET_DIR:-target}/release"
server_bin="${server_bin:-$bin/vfio-user-blk}"
[ -x "$server_bin" ] || die "no server binary at $server_bin"

dir=$(mktemp -d "${TMPDIR:-/tmp}/vub-soak.XXXXXX")
server_pid=""
soak_pid=""
nbd_pids=()
cleanup() {
    local rc=$?
    # The soak's clients die with it (they ask for SIGKILL when their
    # parent goes).
    if [ -n "$soak_pid" ] && kill -0 "$soak_pid" 2>/dev/null; then
        kill -TERM "$soak_pid" 2>/dev/null || true
        wait "$soak_pid" 2>/dev/null || true
    fi
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    for p in "${nbd_pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ] && [ -s "$dir/server.log" ]; then
        echo "soak: the server's log ends with:" >&2
        tail -n 20 "$dir/server.log" | sed 's/^/    /' >&2
    fi
    if [ "$keep" = 1 ]; then
        echo "soak: kept $dir" >&2
    else
        rm -rf "$dir"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

server_devs=()
soak_devs=()
for i in $(seq 0 $((devices - 1))); do
    if [ "$nbd" = 1 ]; then
        command -v nbdkit >/dev/null || die "--nbd needs nbdkit (apt-get install nbdkit)"
        truncate -s "$size" "$dir/d$i.img"
        nbdkit -f --exit-with-parent -U "$dir/nbd$i.sock" file "$dir/d$i.img" \
            2>"$dir/nbdkit$i.log" &
        nbd_pids+=($!)
        for _ in $(seq 100); do [ -S "$dir/nbd$i.sock" ] && break; sleep 0.05; done
        disk="nbd+unix:///?socket=$dir/nbd$i.sock"
    else
        disk="$dir/d$i.img,size=$size"
    fi
    server_devs+=(--device "name=d$i,socket=$dir/d$i.sock,disk=$disk,queues=4$device_opts")
    soak_devs+=(--device "d$i,$dir/d$i.sock,$dir/d$i.img")
done
# shellcheck disable=SC2086 # --server-args is split on purpose
"$server_bin" --rpc-socket "$dir/rpc.sock" "${server_devs[@]}" \
    --io-engine "$engine" --io-threads "$io_threads" --log-level info $server_args \
    2>"$dir/server.log" &
server_pid=$!
for _ in $(seq 200); do
    kill -0 "$server_pid" 2>/dev/null || die "the server exited: $(tail -n 3 "$dir/server.log")"
    ready=1
    for s in rpc $(seq -f 'd%g' 0 $((devices - 1))); do
        [ -S "$dir/$s.sock" ] || ready=0
    done
    [ "$ready" = 1 ] && break
    sleep 0.05
done
[ "${ready:-0}" = 1 ] || die "the server did not create its sockets in 10 s"

# In the background, so that a signal to this script is handled at once
# (bash runs traps only between commands, and `wait` is one).
"$bin/vfio-user-blk-bench" soak --server-pid "$server_pid" --rpc-socket "$dir/rpc.sock" \
    "${soak_devs[@]}" --cycles "$cycles" --io-threads "$io_threads" --workdir "$dir" \
    --verify-every "$verify_every" --upgrade-every "${upgrade_every:-0}" \
    ${seed:+--seed "$seed"} ${keep_going:+"$keep_going"} &
soak_pid=$!
rc=0
wait "$soak_pid" || rc=$?
soak_pid=""
exit "$rc"
