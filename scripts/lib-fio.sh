# Sourced by bench-rbd.sh and bench-nbd.sh: fio driving a disk directly
# (no device), as the reference the benchmark's rows are compared with.
# Uses RUNS and SECS from the caller.

# fio_row LABEL CPU NAME RW BS QD FIO-ARGS...: RUNS runs of one row on
# CPU, printed as the median IOPS and every run's IOPS/p50.
fio_row() {
    local label=$1 cpu=$2 name=$3 rw=$4 bs=$5 qd=$6 best="" iops p50 all=()
    shift 6
    for _ in $(seq "$RUNS"); do
        read -r iops p50 < <(taskset -c "$cpu" fio --name="$name" "$@" \
            --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
            --time_based --runtime="$SECS" --output-format=json 2>/dev/null |
            python3 -c '
import json, sys
t = sys.stdin.read()
j = json.loads(t[t.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
print(round(side["iops"]), round(side["clat_ns"]["percentile"]["50.000000"] / 1000, 1))')
        all+=("$iops")
        best="$best $iops/$p50"
    done
    local med
    med=$(printf '%s\n' "${all[@]}" | sort -n | sed -n "$(( (${#all[@]} + 1) / 2 ))p")
    printf '%-20s fio-%s median %8s IOPS   (runs, IOPS/p50 us:%s)\n' "$name" "$label" "$med" "$best"
}

# fio_rows LABEL CPU FIO-ARGS...: the benchmark's six network-disk rows.
fio_rows() {
    local label=$1 cpu=$2
    shift 2
    fio_row "$label" "$cpu" 4k-randread-qd1 randread 4k 1 "$@"
    fio_row "$label" "$cpu" 4k-randread-qd32 randread 4k 32 "$@"
    fio_row "$label" "$cpu" 4k-randwrite-qd1 randwrite 4k 1 "$@"
    fio_row "$label" "$cpu" 4k-randwrite-qd32 randwrite 4k 32 "$@"
    fio_row "$label" "$cpu" 128k-seqread-qd8 read 128k 8 "$@"
    fio_row "$label" "$cpu" 128k-seqwrite-qd8 write 128k 8 "$@"
}
