#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for a bounded time and prints, per
# target, the executions, the rate and the findings. Exits 1 on a finding
# (the input is kept in fuzz/artifacts/TARGET/ and named in the output).
#
#   scripts/fuzz.sh                 30 s per target
#   scripts/fuzz.sh --seconds 20    (what CI runs)
#   scripts/fuzz.sh --minutes 10 chain protocol
#
# Installs cargo-fuzz from crates.io when missing and builds with the
# machine's stable toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its
# instrumentation flags). No sanitizer: the targets check their own
# invariants, and uninstrumented speed buys more executions.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

secs=30
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) secs="$2"; shift 2 ;;
        --minutes) secs=$(( $2 * 60 )); shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=(chain packed protocol device)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked >/dev/null
fi
export RUSTC_BOOTSTRAP=1
flags=(--sanitizer none -O)
cargo fuzz build "${flags[@]}" >/dev/null

logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT
failed=0
printf '%-10s %14s %10s %s\n' target execs execs/s findings
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    rc=0
    cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout=20 -rss_limit_mb=4096 \
        >"$logdir/$t.log" 2>&1 || rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logdir/$t.log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$logdir/$t.log" | grep -o '[0-9]*$' | tail -1)
    after=$(find "fuzz/artifacts/$t" -type f | wc -l)
    found=$(( after - before ))
    if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
        failed=1
        printf '%-10s %14s %10s %s\n' "$t" "${execs:-?}" "${rate:-?}" "FAILED (exit $rc, $found new input(s))"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$logdir/$t.log" | head -20 || true
    else
        printf '%-10s %14s %10s %s\n' "$t" "${execs:-?}" "${rate:-?}" "none"
    fi
done
exit "$failed"
