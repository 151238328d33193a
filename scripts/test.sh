#!/usr/bin/env bash
# The project's test command: formatting, lints, unit and integration tests,
# the README's examples as written (scripts/readme-check.sh), then the
# real-guest test (scripts/qemu-e2e.sh) when running as root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The RBD tests run against a one-node Ceph cluster of their own
# (scripts/ceph-cluster.sh): as root, Ceph's packages are installed when
# missing, and the tests then fail rather than skip without a cluster.
# The NBD tests run against Debian's nbdkit and qemu-nbd: as root they
# are installed when missing, and the tests then fail rather than skip
# without them.
if [ "$(id -u)" = 0 ]; then
    scripts/ceph-cluster.sh install
    export VUB_REQUIRE_CEPH=1
    for p in nbdkit:nbdkit qemu-nbd:qemu-utils qemu-img:qemu-utils; do
        command -v "${p%%:*}" >/dev/null 2>&1 ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${p##*:}" >/dev/null ||
            { apt-get update -q >/dev/null &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${p##*:}" >/dev/null; }
    done
    export VUB_REQUIRE_NBD=1
fi
cargo test --all-targets
# The README's examples, run as written (a release build; as root, curl is
# installed when missing).
scripts/readme-check.sh

if [ "$(id -u)" != 0 ]; then
    echo "qemu-e2e: SKIPPED (needs root: debootstrap, chroot and bind mounts)"
    exit 0
fi
rc=0
scripts/qemu-e2e.sh || rc=$?
case $rc in
    0) echo "qemu-e2e: all checks passed" ;;
    77) echo "qemu-e2e: SKIPPED (the Debian mirror could not be reached; this is not a pass)" ;;
    *) echo "qemu-e2e: FAILED (exit $rc)"; exit "$rc" ;;
esac
