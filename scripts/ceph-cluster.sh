#!/usr/bin/env bash
# A throwaway one-node Ceph cluster for integration tests: one monitor on
# 127.0.0.1 (msgr v2 and v1, ports chosen free), one bluestore OSD on a
# sparse 4 GiB file, no mgr, cephx, and a replicated pool "rbd" of size 1
# initialised for RBD. Everything (configuration, keys, data, sockets, logs)
# lives in DIR. Written for Ceph 16 (pacific) as shipped by Debian 12.
#
#   scripts/ceph-cluster.sh start DIR   creates DIR (0700) and the cluster in
#                                       it; waits until an RBD image can be
#                                       created, then prints CEPH_CONF=DIR/ceph.conf
#   scripts/ceph-cluster.sh stop DIR    stops the daemons (by their pid files)
#                                       and removes DIR; idempotent
#   scripts/ceph-cluster.sh install     installs the Debian packages if missing
#
# Clients use `-c DIR/ceph.conf` (or CEPH_CONF=DIR/ceph.conf) as client.admin;
# the keyring DIR/keyring is named in the [client] section.
#
# The daemons run as the current user, in the foreground of their own
# session, with stdout and stderr in DIR/mon.log and DIR/osd.log and their
# own logs in DIR/log/. When this script has exited, their parent is PID 1
# (or the nearest subreaper): if that does not reap, a stopped daemon stays a
# zombie, which `stop` counts as gone.
#
# CEPH_CLUSTER_TIMEOUT (seconds, default 90) bounds `start`; past it, what
# was started is stopped, the ends of the logs are printed and the exit
# status is 1 (DIR is kept for a look; `stop DIR` removes it and `start DIR`
# starts afresh in it).
set -euo pipefail

PROG=ceph-cluster.sh
MARKER=.ceph-cluster     # marks DIR as made by this script (stop removes only such)
OSD_SIZE=4294967296      # the sparse file behind the OSD
PG_NUM=8

usage() {
    echo "usage: $0 start DIR | stop DIR | install" >&2
    exit 2
}

say() { echo "$PROG: $*" >&2; }

# DIR as an absolute path, without trailing slashes (it need not exist).
absolute() {
    local d=$1
    [ -n "$d" ] || usage
    case $d in /*) ;; *) d=$PWD/$d ;; esac
    while [ "${#d}" -gt 1 ] && [ "${d%/}" != "$d" ]; do d=${d%/}; done
    [ "$d" != / ] || { say "refusing to use / as the cluster folder"; exit 2; }
    printf '%s\n' "$d"
}

# ---------------------------------------------------------------- processes

# The pid in DIR/NAME.pid when that process is one of this cluster's daemons
# and still running (a zombie is not running); empty otherwise. The command
# line must name DIR/ceph.conf, which guards against a recycled pid.
live_pid() {
    local name=$1 pid state cmdline
    [ -f "$DIR/$name.pid" ] || return 0
    pid=$(cat "$DIR/$name.pid" 2>/dev/null || true)
    case $pid in '' | *[!0-9]*) return 0 ;; esac
    state=$(awk '$1 == "State:" { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    case $state in '' | Z | X) return 0 ;; esac
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
    case $cmdline in *" $DIR/ceph.conf "*) printf '%s\n' "$pid" ;; esac
}

# Stops the daemon NAME (SIGTERM, then SIGKILL after 5 s) and waits until
# it is gone; removes its pid file. SIGCONT after SIGTERM: a test may have
# left it stopped (SIGSTOP).
stop_daemon() {
    local name=$1 pid i
    pid=$(live_pid "$name")
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        kill -CONT "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [ -n "$(live_pid "$name")" ] || break
            sleep 0.1
        done
        if [ -n "$(live_pid "$name")" ]; then
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [ -n "$(live_pid "$name")" ] || break
                sleep 0.1
            done
        fi
        if [ -n "$(live_pid "$name")" ]; then
            say "$name (pid $pid) survives SIGKILL"
            return 1
        fi
    fi
    rm -f "$DIR/$name.pid"
}

stop_all() {
    local rc=0
    stop_daemon osd || rc=1
    stop_daemon mgr || rc=1
    stop_daemon mon || rc=1
    return $rc
}

# Starts a daemon NAME in the background, in its own session, stdin from
# /dev/null, output to DIR/NAME.log and no other descriptor inherited (a
# caller reading our stdout through a pipe must see it close); records the
# pid in DIR/NAME.pid.
spawn() {
    local name=$1
    shift
    (
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done
        exec setsid "$@" </dev/null >"$DIR/$name.log" 2>&1
    ) &
    echo $! >"$DIR/$name.pid"
    # Out of the job table: bash then reaps it without a word when it dies
    # before this script has exited (no "Killed" line from a failed start).
    disown $!
}

# ------------------------------------------------------------------- start

DEADLINE=0
STARTED=()   # "name pid" of the daemons this start has spawned

# Seconds left before the deadline (at least 1, so that `timeout` is valid).
left() {
    local n=$((DEADLINE - SECONDS))
    [ $n -ge 1 ] || n=1
    echo $n
}

# Whether PID runs (not a zombie); builtins only, as it is polled.
running() {
    local f
    read -r -a f 2>/dev/null <"/proc/$1/stat" || return 1
    [ "${f[2]}" != Z ] && [ "${f[2]}" != X ]
}

# Fails (stopping everything) when a daemon spawned by this start has exited
# or when the deadline has passed.
check_alive() {
    local d
    for d in "${STARTED[@]}"; do
        running "${d#* }" || fail "${d% *} exited"
    done
    [ $SECONDS -lt $DEADLINE ] || fail "not ready within ${TIMEOUT}s"
}

# Runs a client command, bounded by N seconds and by the deadline, while
# watching the daemons: one that exits fails the start at once rather than
# at the client's timeout. The command's stderr goes to DIR/start.out (shown
# when start fails).
CLIENT_PID=
client() {
    local n=$1 l d rc=0
    shift
    l=$(left)
    [ "$n" -le "$l" ] || n=$l
    timeout -k 2 "$n" "$@" 2>>"$DIR/start.out" &
    CLIENT_PID=$!
    while running "$CLIENT_PID"; do
        for d in "${STARTED[@]}"; do
            running "${d#* }" || fail "${d% *} exited"
        done
        sleep 0.1
    done
    wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=
    return $rc
}

FAILING=0
fail() {
    FAILING=1
    trap '' INT TERM HUP
    # An EXIT trap runs with the redirections of the command that failed:
    # back to the stderr we were given (saved as fd 3 by cmd_start).
    exec 2>&3
    say "start failed in $DIR: $*"
    # timeout(1) passes SIGTERM on to the client it runs.
    if [ -n "$CLIENT_PID" ]; then
        kill -TERM "$CLIENT_PID" 2>/dev/null || true
        wait "$CLIENT_PID" 2>/dev/null || true
    fi
    # Also stops an unfinished ceph-osd --mkfs (its pid is in DIR/osd.pid).
    stop_all || true
    if [ -n "${MKFS_PID:-}" ]; then wait "$MKFS_PID" 2>/dev/null || true; fi
    local f
    for f in "$DIR/start.out" "$DIR/osd-mkfs.log" "$DIR/mon.log" "$DIR/osd.log" \
        "$DIR/log/mon.a.log" "$DIR/log/osd.0.log"; do
        [ -s "$f" ] || continue
        echo "---- last lines of $f" >&2
        grep -v '^$' "$f" | tail -n 15 >&2
    done
    exit 1
}

on_start_exit() {
    local rc=$?
    if [ $rc -ne 0 ] && [ $FAILING = 0 ]; then
        fail "exit status $rc"
    fi
}

# Two TCP ports, from 20000 to 31999 (below the ephemeral range), that no
# socket on this machine is bound to.
free_ports() {
    local used=" " local_addr state a b
    while read -r _ local_addr _ state _; do
        [ "$state" != st ] || continue
        used+="$((16#${local_addr##*:})) "
    done < <(cat /proc/net/tcp /proc/net/tcp6 2>/dev/null)
    while :; do
        a=$((20000 + RANDOM % 12000))
        b=$((20000 + RANDOM % 12000))
        [ $a != $b ] || continue
        case $used in *" $a "* | *" $b "*) continue ;; esac
        echo "$a $b"
        return
    done
}

write_conf() {
    local fsid=$1 v2=$2 v1=$3
    cat >"$DIR/ceph.conf.tmp" <<EOF
# Written by scripts/ceph-cluster.sh: a throwaway one-node test cluster.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
ms bind ipv4 = true
ms bind ipv6 = false
run dir = $DIR/run
crash dir = $DIR/crash
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
osd crush chooseleaf type = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = $PG_NUM
osd pool default pgp num = $PG_NUM
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 2
mon data avail crit = 1
osd client watch timeout = 5

[mon]
mon data = $DIR/mon
paxos propose interval = 0.1
mon mgr mkfs grace = 31536000

[osd]
osd data = $DIR/osd
osd objectstore = bluestore
bluestore block path = $DIR/osd-block
bluestore block create = true
bluestore block size = $OSD_SIZE
bluestore fsck on mkfs = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 67108864

[client]
keyring = $DIR/keyring
admin socket = $DIR/run/\$name.\$pid.\$cctid.asok
objecter tick interval = 1
EOF
    mv -f "$DIR/ceph.conf.tmp" "$DIR/ceph.conf"
}

cmd_start() {
    local tool
    for tool in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd setsid timeout; do
        command -v "$tool" >/dev/null || { say "$tool not found (try: $0 install)"; exit 1; }
    done
    # Unix socket paths are limited to 107 bytes: DIR/run/client.admin.PID.CCTID.asok.
    if [ ${#DIR} -gt 60 ]; then
        say "$DIR: path too long for the admin sockets in it (60 bytes at most)"
        exit 2
    fi
    mkdir -p "$DIR"
    chmod 0700 "$DIR"
    # Bluestore opens its file with O_DIRECT (which tmpfs has only since Linux 6.6).
    if ! dd if=/dev/zero of="$DIR/.odirect" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
        rm -f "$DIR/.odirect"
        say "$DIR: its file system does not take O_DIRECT, which bluestore needs"
        exit 2
    fi
    rm -f "$DIR/.odirect"
    if [ -n "$(live_pid mon)$(live_pid osd)$(live_pid mgr)" ]; then
        say "a cluster is running in $DIR (stop it first: $0 stop $DIR)"
        exit 1
    fi
    touch "$DIR/$MARKER"
    # What an earlier, failed start may have left.
    rm -rf "$DIR/ceph.conf" "$DIR/ceph.conf.tmp" "$DIR/keyring" "$DIR/mkfs.keyring" \
        "$DIR/monmap" "$DIR/mon" "$DIR/osd" "$DIR/osd-block" "$DIR/run" "$DIR/log" "$DIR/crash" \
        "$DIR"/*.pid "$DIR"/*.log "$DIR/start.out" "$DIR/osd-secret.json" "$DIR/osd-id" "$DIR/osd-stat"
    mkdir -m 0700 "$DIR/run" "$DIR/log" "$DIR/crash" "$DIR/osd"

    exec 3>&2
    TIMEOUT=${CEPH_CLUSTER_TIMEOUT:-90}
    DEADLINE=$((SECONDS + TIMEOUT))
    trap on_start_exit EXIT
    trap 'fail interrupted' INT TERM HUP

    local fsid osd_uuid osd_key v1 v2 conf=$DIR/ceph.conf
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    read -r v2 v1 <<<"$(free_ports)"
    write_conf "$fsid" "$v2" "$v1"

    # Keys: client.admin in DIR/keyring; the monitor's own key only in its
    # data folder (mkfs copies it from a temporary keyring holding both).
    osd_key=$(ceph-authtool --gen-print-key)
    {
        ceph-authtool "$DIR/keyring" --create-keyring --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
        ceph-authtool "$DIR/mkfs.keyring" --create-keyring --gen-key -n mon. --cap mon 'allow *'
        ceph-authtool "$DIR/mkfs.keyring" --import-keyring "$DIR/keyring"
        ceph-authtool "$DIR/osd/keyring" --create-keyring -n osd.0 --add-key "$osd_key"
    } >>"$DIR/start.out" 2>&1

    # The OSD's store does not need the monitor: made while the monitor
    # starts. In the foreground (-f), or ceph-osd forks and the pid is that of
    # a parent waiting for it; in DIR/osd.pid until the OSD replaces it, so
    # that `stop` finds it after a start that was killed.
    nice -n 10 ceph-osd -c "$conf" -i 0 -f --mkfs --no-mon-config --osd-uuid "$osd_uuid" \
        </dev/null >"$DIR/osd-mkfs.log" 2>&1 &
    MKFS_PID=$!
    echo "$MKFS_PID" >"$DIR/osd.pid"

    monmaptool -c "$conf" --create --fsid "$fsid" \
        --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" "$DIR/monmap" >>"$DIR/start.out" 2>&1
    ceph-mon -c "$conf" -i a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/mkfs.keyring" \
        >>"$DIR/start.out" 2>&1
    rm -f "$DIR/monmap" "$DIR/mkfs.keyring"
    spawn mon ceph-mon -c "$conf" -i a -f
    STARTED+=("mon $(cat "$DIR/mon.pid")")

    # The monitor answers.
    until client 10 ceph -c "$conf" --connect-timeout 5 health >/dev/null; do
        check_alive
        sleep 0.5
    done

    # The pool (monitor only), then the OSD in the map with its key.
    client 20 ceph -c "$conf" osd pool create rbd "$PG_NUM" "$PG_NUM" replicated \
        >/dev/null || fail "osd pool create"
    client 20 ceph -c "$conf" osd pool set rbd size 1 --yes-i-really-mean-it \
        >/dev/null || fail "osd pool set rbd size 1"
    printf '{"cephx_secret": "%s"}' "$osd_key" >"$DIR/osd-secret.json"
    client 20 ceph -c "$conf" osd new "$osd_uuid" -i "$DIR/osd-secret.json" \
        >"$DIR/osd-id" || fail "osd new"
    rm -f "$DIR/osd-secret.json"
    [ "$(cat "$DIR/osd-id")" = 0 ] || fail "osd new gave id '$(cat "$DIR/osd-id")', not 0"
    rm -f "$DIR/osd-id"

    if ! wait "$MKFS_PID"; then
        MKFS_PID=
        fail "ceph-osd --mkfs"
    fi
    MKFS_PID=
    rm -f "$DIR/osd.pid"
    spawn osd ceph-osd -c "$conf" -i 0 -f
    STARTED+=("osd $(cat "$DIR/osd.pid")")

    # rbd pool init waits for the pool's placement groups to be active.
    until client 30 rbd -c "$conf" pool init rbd >/dev/null; do
        check_alive
        sleep 0.5
    done
    client 20 ceph -c "$conf" osd stat -f json >"$DIR/osd-stat" || fail "osd stat"
    case $(cat "$DIR/osd-stat") in
        *'"num_up_osds":1,'*'"num_in_osds":1,'*) rm -f "$DIR/osd-stat" ;;
        *) fail "osd.0 is not up and in: $(cat "$DIR/osd-stat")" ;;
    esac
    client 30 rbd -c "$conf" create rbd/probe --size 16M >/dev/null || fail "rbd create"
    client 30 rbd -c "$conf" rm --no-progress rbd/probe >/dev/null || fail "rbd rm"
    client 20 ceph -c "$conf" health >/dev/null || fail "ceph health"

    trap - EXIT INT TERM HUP
    rm -f "$DIR/start.out"
    echo "CEPH_CONF=$conf"
}

# -------------------------------------------------------------------- stop

cmd_stop() {
    [ -e "$DIR" ] || return 0
    if [ ! -e "$DIR/$MARKER" ]; then
        if rmdir "$DIR" 2>/dev/null; then return 0; fi
        say "$DIR was not made by this script (no $MARKER in it); left alone"
        exit 1
    fi
    stop_all || { say "$DIR kept: a daemon could not be stopped"; exit 1; }
    rm -rf --one-file-system "$DIR"
}

# ----------------------------------------------------------------- install

cmd_install() {
    local pkg missing=()
    for pkg in ceph-mon ceph-osd ceph-common; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ]; then
        say "missing ${missing[*]}; as root, run:"
        echo "apt-get install -y --no-install-recommends ${missing[*]}"
        exit 1
    fi
    local log
    log=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >"$log" 2>&1; then
        # A fresh machine may have no package lists yet.
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                "${missing[@]}"; } >>"$log" 2>&1; then
            tail -n 20 "$log" >&2
            rm -f "$log"
            say "could not install ${missing[*]}"
            exit 1
        fi
    fi
    rm -f "$log"
    say "installed ${missing[*]}"
}

case ${1:-} in
    start) [ $# -eq 2 ] || usage; DIR=$(absolute "$2"); cmd_start ;;
    stop) [ $# -eq 2 ] || usage; DIR=$(absolute "$2"); cmd_stop ;;
    install) [ $# -eq 1 ] || usage; cmd_install ;;
    *) usage ;;
esac
