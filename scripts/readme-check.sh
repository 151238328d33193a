#!/usr/bin/env bash
# Runs the README's shell examples as they are written there, so that the
# README cannot drift from the program (issue 22, item 8).
#
# The blocks to run are marked in README.md by an HTML comment on the line
# just before an indented (or fenced) code block, invisible on GitHub:
#
#   <!-- readme-check: NAME -->
#
# Each marked block is taken from README.md (nothing of it is retyped
# here) and run as its own bash session, one command after another, in a
# private temporary folder: HOME is a folder in it (so ~/vblk is too), and
# the working directory is a copy of the checkout made of symbolic links
# to its entries (target/ included), so that the README's `cargo` and
# `target/release/...` lines work as in the checkout while whatever they
# create (the first command's vblk.img and vblk.sock) lands in the
# temporary folder. The bare `vfio-user-blk` of the examples is this
# tree's release build (target/release is put first in PATH).
#
# How a command is run:
#   - every command's exit status is checked, and its output shown when it
#     fails;
#   - a command that starts the target (a `vfio-user-blk` or `cargo run`
#     line that is not `rpc`, `completions` or `man`), in the foreground as
#     in the README or with a trailing `&`, is started in the background;
#     the check waits (bounded) until each of its sockets exists, its
#     management socket answers and its metrics port accepts connections,
#     and fails if it exits first. A metrics port already taken by another
#     process fails the check with a message saying so (the README's 9135
#     is used as written);
#   - the servers of every block keep running until all blocks have run,
#     as the terminals of someone who follows the README one example after
#     another: examples that fight over a socket, an image or a port fail.
#     Then each is stopped with SIGTERM and must exit 0 within 15 s,
#     having removed its sockets;
#   - a redirection to an absolute path (`> /etc/...`, the completion
#     script and the manual page) is the one change made to a command: it
#     goes to the same path under the temporary folder, and the file must
#     not be empty;
#   - a `curl` line (the README's fetch the metrics endpoint) must print
#     Prometheus text: the target's `# TYPE vfio_user_blk_...` lines, and
#     `# EOF` last (a wrong path answers 404, which `curl -s` exits 0 on);
#   - when curl is missing it is installed (as root, with apt-get) or, as
#     another user, replaced by a bash function that fetches http:// URLs
#     through /dev/tcp.
#
# Not run (not marked), because they need what a test machine cannot
# assume or what must not run here: `scripts/test.sh` (this check is a part
# of it), the QEMU command lines (a guest kernel, and a QEMU 10.1+), the
# "Try it with QEMU" server line (the image it names is the real-guest
# test's), the Ceph and NBD examples (a cluster, an NBD server), and the
# systemd steps (copying the unit to /etc/systemd/system and systemctl:
# root and a running systemd; `systemd-analyze verify` of the example units
# is a test in tests/operator.rs).
#
# VUB_README_KEEP=1 keeps the temporary folder (the generated sessions,
# the servers' logs) and says where.
#
# Output: one line per block, `readme-check: NAME ok`, or the failing
# command with its output (exit 1). The temporary folder, the servers and
# their sockets are removed on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
readme=$repo/README.md
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
# The examples run with another HOME: cargo and rustup must keep theirs.
export CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
[ -d "${RUSTUP_HOME:-$HOME/.rustup}" ] && export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
# The README's paths are the checkout's target/.
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR
# Nothing of the caller's service manager or logging reaches the examples.
unset NOTIFY_SOCKET LISTEN_FDS LISTEN_PID LISTEN_FDNAMES RUST_LOG

# The blocks that must be marked: a marker that goes missing fails.
expected=(main-command quick-start several-disks managing completions)

say() { printf 'readme-check: %s\n' "$*"; }
die() { say "$*" >&2; exit 1; }

# --- the release build the examples use -------------------------------
cargo build --release -q || die "cargo build --release failed"
bin=$repo/target/release/vfio-user-blk
[ -x "$bin" ] || die "$bin is missing after cargo build --release"

if ! command -v curl >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >/dev/null; } ||
        die "curl is missing and could not be installed"
fi

# --- the temporary folder, and its removal on every exit ---------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/readme-check.XXXXXX")
cleanup() {
    local f pid i
    for f in "$tmp"/run/server-*.pid; do
        [ -s "$f" ] || continue
        [ -f "${f%.pid}.status" ] && continue
        pid=$(cat "$f")
        kill -KILL "$pid" 2>/dev/null || true
    done
    # Their waiters write the status as they go: then the folder can go.
    for f in "$tmp"/run/server-*.pid; do
        for ((i = 0; i < 100; i++)); do
            { [ -s "$f" ] && [ ! -f "${f%.pid}.status" ]; } || break
            sleep 0.02
        done
    done
    if [ -n "${VUB_README_KEEP:-}" ]; then
        echo "readme-check: kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -m 700 "$tmp/home" "$tmp/checkout" "$tmp/run" "$tmp/root" "$tmp/blocks"
# Only what the repository holds, and the build: a developer's own
# vblk.img or vblk.sock in the checkout (what the first command makes
# there) is neither served nor fought over by the check. (The checkout may
# be another user's, as a CI runner's is for root; outside git, from a
# tarball, everything but those two files is taken.)
tracked=$(git -c safe.directory='*' -C "$repo" ls-files 2>/dev/null | cut -d/ -f1 | sort -u || true)
for e in "$repo"/*; do
    b=$(basename "$e")
    if [ -n "$tracked" ]; then
        [ "$b" = target ] || grep -qxF -- "$b" <<<"$tracked" || continue
    else
        case $b in vblk.img | vblk.sock) continue ;; esac
    fi
    ln -s "$e" "$tmp/checkout/"
done

# --- the marked blocks, from README.md ---------------------------------
# names[i], and the block's text in $tmp/blocks/NAME.txt
mapfile -t lines <"$readme"
names=()
i=0
n=${#lines[@]}
while [ "$i" -lt "$n" ]; do
    line=${lines[i]}
    i=$((i + 1))
    [[ $line =~ ^\<!--\ readme-check:\ ([a-z0-9-]+)\ --\>$ ]] || continue
    name=${BASH_REMATCH[1]}
    for m in "${names[@]}"; do
        [ "$m" = "$name" ] && die "README.md: two blocks are marked $name"
    done
    out=$tmp/blocks/$name.txt
    : >"$out"
    if [[ ${lines[i]:-} == '```'* ]]; then
        i=$((i + 1))
        while [ "$i" -lt "$n" ] && [[ ${lines[i]} != '```'* ]]; do
            printf '%s\n' "${lines[i]}" >>"$out"
            i=$((i + 1))
        done
        i=$((i + 1))
    elif [[ ${lines[i]:-} == '    '* ]]; then
        # Indented: up to the first line that is neither indented nor
        # blank (blank lines inside the block belong to it).
        while [ "$i" -lt "$n" ] && [[ ${lines[i]} == '    '* || -z ${lines[i]} ]]; do
            printf '%s\n' "${lines[i]#    }" >>"$out"
            i=$((i + 1))
        done
    else
        die "README.md line $i: the marker of $name is not followed by a code block"
    fi
    [ -s "$out" ] || die "README.md: the block marked $name is empty"
    names+=("$name")
done
for e in "${expected[@]}"; do
    found=0
    for m in "${names[@]}"; do [ "$m" = "$e" ] && found=1; done
    [ "$found" = 1 ] || die "README.md: no block is marked $e (<!-- readme-check: $e -->)"
done

# --- what each block's session sources ---------------------------------
cat >"$tmp/lib.sh" <<'LIB'
# Helpers of the generated sessions (readme-check.sh); their names start
# with __rc_ so that the README's own variables cannot clash with them.
__rc_fail() { # MESSAGE [FILE whose text is shown]
    printf 'readme-check: %s FAILED: %s\n' "$__rc_block" "$1"
    if [ -n "${2:-}" ] && [ -f "$2" ]; then
        sed 's/^/    | /' "$2"
    fi
    exit 1
}
__rc_check() { # STATUS: of the command in $__rc_cmd
    [ "$1" = 0 ] || __rc_fail "exit status $1 of
    \$ $__rc_cmd
  its output:" "$__rc_run/out"
}
__rc_nonempty() { # FILE: what a redirection wrote
    [ -s "$1" ] || __rc_fail "$__rc_cmd wrote nothing to ${1#"$__rc_root"}"
}
__rc_exposition() { # the output of a /metrics fetch: Prometheus text
    grep -q '^# TYPE vfio_user_blk_' "$__rc_run/out" && [ "$(tail -n 1 "$__rc_run/out")" = '# EOF' ] ||
        __rc_fail "no Prometheus exposition from
    \$ $__rc_cmd
  its output:" "$__rc_run/out"
}
# A stand-in for `curl -s http://HOST:PORT/PATH` when curl is missing
# (non-root machines): bash's /dev/tcp, HTTP/1.0, the body printed.
if ! command -v curl >/dev/null 2>&1; then
    curl() {
        local a url='' rest hostport path host port line body=0 fd
        for a; do
            case $a in
            -s | --silent) ;;
            http://*) url=$a ;;
            *) echo "curl (readme-check's stand-in): $a is not supported" >&2; return 2 ;;
            esac
        done
        [ -n "$url" ] || return 2
        rest=${url#http://}
        hostport=${rest%%/*}
        path=/
        [[ $rest == */* ]] && path=/${rest#*/}
        host=${hostport%:*}
        port=80
        [[ $hostport == *:* ]] && port=${hostport##*:}
        exec {fd}<>"/dev/tcp/$host/$port" || return 7
        printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hostport" >&"$fd"
        while IFS= read -r line <&"$fd" || [ -n "$line" ]; do
            if [ "$body" = 1 ]; then
                printf '%s\n' "$line"
            elif [ "$line" = $'\r' ] || [ -z "$line" ]; then
                body=1
            fi
        done
        exec {fd}<&-
    }
fi
# The sockets and endpoints of a target's command line (its words, as
# the shell expanded them): "sock PATH", "rpc PATH", "metrics HOST PORT".
__rc_endpoints() {
    local a prev='' kv
    for a; do
        case $prev in
        --socket) echo "sock $a" ;;
        --rpc-socket) echo "sock $a"; echo "rpc $a" ;;
        --metrics)
            if [[ $a == *:* ]]; then echo "metrics ${a%:*} ${a##*:}"; else echo "metrics 127.0.0.1 $a"; fi ;;
        --device)
            local IFS=,
            for kv in $a; do [[ $kv == socket=* ]] && echo "sock ${kv#socket=}"; done
            ;;
        esac
        case $a in
        --socket=*) echo "sock ${a#--socket=}" ;;
        --rpc-socket=*) echo "sock ${a#--rpc-socket=}"; echo "rpc ${a#--rpc-socket=}" ;;
        --metrics=*) a=${a#--metrics=}; echo "metrics ${a%:*} ${a##*:}" ;;
        esac
        prev=$a
    done
}
__rc_port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
__rc_server_pre() { # WORDS...: a port another process has fails here
    local kind a b
    while read -r kind a b; do
        [ "$kind" = metrics ] || continue
        if __rc_port_open "$a" "$b"; then
            __rc_fail "port $b on $a is taken by another process, and
    \$ $__rc_cmd
  needs it (the README's port is used as written): stop what listens there"
        fi
    done < <(__rc_endpoints "$@")
}
__rc_server_wait() { # N WORDS...: until server N listens everywhere
    local k=$1 kind a b ready i
    shift
    __rc_endpoints "$@" >"$__rc_run/server-$k.endpoints"
    printf '%s\n' "$__rc_cmd" >"$__rc_run/server-$k.cmd"
    printf '%s\n' "$__rc_block" >"$__rc_run/server-$k.block"
    for ((i = 0; i < 1200; i++)); do # 60 s at most
        if [ -f "$__rc_run/server-$k.status" ]; then
            __rc_fail "exited with status $(cat "$__rc_run/server-$k.status") before it listened:
    \$ $__rc_cmd
  its output:" "$__rc_run/server-$k.log"
        fi
        ready=0
        if [ -s "$__rc_run/server-$k.pid" ]; then
            ready=1
            while read -r kind a b; do
                case $kind in
                sock) [ -S "$a" ] || ready=0 ;;
                rpc) "$__rc_bin" rpc --rpc-socket "$a" target_version >/dev/null 2>&1 || ready=0 ;;
                metrics) __rc_port_open "$a" "$b" || ready=0 ;;
                esac
            done <"$__rc_run/server-$k.endpoints"
        fi
        [ "$ready" = 1 ] && return 0
        sleep 0.05
    done
    __rc_fail "did not listen within 60 s:
    \$ $__rc_cmd
  its output:" "$__rc_run/server-$k.log"
}
LIB

# --- one generated session per block ------------------------------------
# starts_target WORDS: a line that starts the target (not one of its
# client subcommands, nor a variable set to a command line).
starts_target() {
    local w=("$@") args
    while [[ ${w[0]:-} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
        [[ ${w[0]} == *[\"\']* ]] && return 1
        w=("${w[@]:1}")
    done
    if [ "${w[0]:-}" = cargo ] && [ "${w[1]:-}" = run ]; then
        args=()
        local j seen=0
        for ((j = 2; j < ${#w[@]}; j++)); do
            [ "$seen" = 1 ] && args+=("${w[j]}")
            [ "${w[j]}" = -- ] && seen=1
        done
    elif [ "${w[0]##*/}" = vfio-user-blk ]; then
        args=("${w[@]:1}")
    else
        return 1
    fi
    case ${args[0]:-} in rpc | completions | man | help) return 1 ;; esac
    for a in "${args[@]}"; do
        case $a in -h | --help | -V | --version) return 1 ;; esac
    done
    return 0
}

servers=0
gen_block() { # NAME: writes $tmp/blocks/NAME.sh
    local name=$1 text cmd k
    local gen=$tmp/blocks/$name.sh
    {
        printf '__rc_block=%q __rc_run=%q __rc_root=%q __rc_bin=%q\n' \
            "$name" "$tmp/run" "$tmp/root" "$bin"
        printf 'source %q\n' "$tmp/lib.sh"
    } >"$gen"
    cmd=''
    while IFS= read -r text || [ -n "$text" ]; do
        if [ -z "$cmd" ] && { [ -z "${text// /}" ] || [[ $text =~ ^[[:space:]]*# ]]; }; then
            continue
        fi
        cmd+=$text
        if [[ $text == *\\ ]]; then
            cmd+=$'\n'
            continue
        fi
        gen_command "$cmd" >>"$gen"
        cmd=''
    done <"$tmp/blocks/$name.txt"
    [ -z "$cmd" ] || die "README.md, block $name: its last line ends with a backslash"
}
gen_command() { # COMMAND (its lines as written)
    local cmd=$1 shown words bg=0 run target
    shown=${cmd//$'\\\n'/}
    printf '__rc_cmd=%q\n' "$shown"
    read -ra words <<<"${cmd//$'\\\n'/ }"
    local re_bg='[^&]&[[:space:]]*$'
    [[ $cmd =~ $re_bg ]] && bg=1
    if starts_target "${words[@]}" || [ "$bg" = 1 ]; then
        servers=$((servers + 1))
        k=$servers
        run=$cmd
        if [ "$bg" = 0 ]; then
            [[ $cmd == *' #'* ]] && die "README.md, block $name: cannot start in the background, a comment follows it: $shown"
            run+=' &'
        fi
        # Its words again, without the `&`, for the helpers: the shell
        # expands them as it does the command's.
        target=${cmd%&*}
        [ "$bg" = 1 ] || target=$cmd
        printf '__rc_server_pre %s\n' "$target"
        printf '( { %s\n} >%q 2>&1 </dev/null\n' "$run" "$tmp/run/server-$k.log"
        printf '  echo $! >%q; wait $!; echo $? >%q ) >/dev/null 2>&1 &\n' \
            "$tmp/run/server-$k.pid" "$tmp/run/server-$k.status"
        printf '__rc_server_wait %s %s\n' "$k" "$target"
        return
    fi
    # Redirections to an absolute path go under the temporary root.
    local files=() rest=$cmd re_out='>[[:space:]]*(/[^[:space:]]+)'
    while [[ $rest =~ $re_out ]]; do
        [[ ${BASH_REMATCH[1]} == /dev/* ]] || files+=("${BASH_REMATCH[1]}")
        rest=${rest#*"${BASH_REMATCH[0]}"}
    done
    run=$cmd
    for f in "${files[@]}"; do
        printf 'mkdir -p %q\n' "$tmp/root${f%/*}"
        run=${run//">$f"/">$tmp/root$f"}
        run=${run//"> $f"/"> $tmp/root$f"}
    done
    printf '{\n%s\n} >%q 2>&1 </dev/null\n__rc_check $?\n' "$run" "$tmp/run/out"
    for f in "${files[@]}"; do
        printf '__rc_nonempty %q\n' "$tmp/root$f"
    done
    if [ "${words[0]}" = curl ]; then
        echo __rc_exposition
    fi
}

export PATH="$repo/target/release:$PATH"
for name in "${names[@]}"; do
    gen_block "$name"
done

# --- run them ------------------------------------------------------------
start=$SECONDS
for name in "${names[@]}"; do
    (cd "$tmp/checkout" && HOME=$tmp/home bash "$tmp/blocks/$name.sh") ||
        exit 1
    say "$name ok"
done

# Every server still runs; each stops on SIGTERM, exits 0 and removes its
# sockets.
failed=0
stopped=()
for ((k = 1; k <= servers; k++)); do
    f=$tmp/run/server-$k
    [ -f "$f.pid" ] || continue
    name=$(cat "$f.block")
    if [ -f "$f.status" ]; then
        say "$name FAILED: its server exited (status $(cat "$f.status")) before the other examples had run:"
        sed 's/^/    | /' "$f.cmd" "$f.log"
        failed=1
        continue
    fi
    kill -TERM "$(cat "$f.pid")"
    stopped+=("$k")
done
for k in "${stopped[@]}"; do
    f=$tmp/run/server-$k
    for ((i = 0; i < 300; i++)); do # 15 s at most
        [ -f "$f.status" ] && break
        sleep 0.05
    done
    name=$(cat "$f.block")
    if [ ! -f "$f.status" ]; then
        say "$name FAILED: its server did not stop within 15 s of SIGTERM:"
        sed 's/^/    | /' "$f.cmd" "$f.log"
        failed=1
        continue
    fi
    st=$(cat "$f.status")
    if [ "$st" != 0 ]; then
        say "$name FAILED: its server exited with status $st at SIGTERM:"
        sed 's/^/    | /' "$f.cmd" "$f.log"
        failed=1
        continue
    fi
    while read -r kind a _; do
        [[ $a == /* ]] || a=$tmp/checkout/$a
        if [ "$kind" = sock ] && [ -e "$a" ]; then
            say "$name FAILED: its server left its socket $a behind at SIGTERM"
            failed=1
        fi
    done <"$f.endpoints"
done
[ "$failed" = 0 ] || exit 1
say "all ${#names[@]} blocks ran as written; ${#stopped[@]} servers stopped cleanly ($((SECONDS - start)) s)"
