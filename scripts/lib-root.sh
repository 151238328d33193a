# Sourced by qemu-e2e.sh and guest-bench.sh: build (or reuse) a Debian trixie root with QEMU
# 10.1+ from trixie-backports and a stock kernel. Only distribution
# packages are downloaded.

ROOT_PACKAGES="qemu-system-x86 linux-image-amd64 busybox-static fio e2fsprogs util-linux kmod extlinux syslinux-common fdisk ovmf- "
ROOT_STAMP_VERSION=3

root_ready() {
    local root=$1
    [ -f "$root/.vub-root-ready" ] \
        && [ "$(cat "$root/.vub-root-ready")" = "$ROOT_STAMP_VERSION" ] \
        && [ -x "$root/usr/bin/qemu-system-x86_64" ] \
        && ls "$root"/boot/vmlinuz-* >/dev/null 2>&1 \
        && [ -x "$root/bin/busybox" ] \
        && [ -x "$root/usr/bin/fio" ]
}

build_root() {
    local root=$1 mirror=$2
    echo "e2e: building a Debian trixie root in $root (a few minutes, once)"
    # A run interrupted while the host's /dev, /proc and /sys were bound in
    # must not take them with it.
    umount_root_fs "$root"
    rm -rf --one-file-system "$root"
    mkdir -p "$root"
    debootstrap --variant=minbase trixie "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
        tail -20 "$root.debootstrap.log"
        return 1
    }
    cat >"$root/etc/apt/sources.list" <<SRC
deb $mirror trixie main
deb $mirror trixie-backports main
SRC
    mount_root_fs "$root"
    local rc=0
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c "
        apt-get update -q &&
        apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86 &&
        apt-get install -y -q --no-install-recommends linux-image-amd64 busybox-static fio e2fsprogs util-linux kmod extlinux syslinux-common fdisk &&
        apt-get clean" >"$root.apt.log" 2>&1 || rc=$?
    umount_root_fs "$root"
    if [ $rc -ne 0 ]; then
        tail -30 "$root.apt.log"
        return 1
    fi
    echo "$ROOT_STAMP_VERSION" >"$root/.vub-root-ready"
}

# The boot loader (and sfdisk) for the boot-from-disk image, added to a root built
# before it was part of the package list. Needs the mirror; 1 if missing.
ensure_boot_tools() {
    local root=$1
    local have='[ -x "$root/usr/bin/extlinux" ] && [ -f "$root/usr/lib/syslinux/mbr/mbr.bin" ] && [ -x "$root/usr/sbin/sfdisk" ]'
    eval "$have" && return 0
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c "
        apt-get update -q &&
        apt-get install -y -q --no-install-recommends extlinux syslinux-common fdisk &&
        apt-get clean" >"$root.apt-boot.log" 2>&1 || {
        tail -10 "$root.apt-boot.log"
        return 1
    }
    eval "$have"
}

mount_root_fs() {
    local root=$1
    for d in dev proc sys; do
        mountpoint -q "$root/$d" || mount --rbind "/$d" "$root/$d"
        mount --make-rslave "$root/$d" 2>/dev/null || true
    done
}

umount_root_fs() {
    local root=$1
    for d in sys proc dev; do
        mountpoint -q "$root/$d" && umount -R "$root/$d" 2>/dev/null || umount -l "$root/$d" 2>/dev/null || true
    done
}

# Ends the background jobs of the calling shell that are still running, by
# their PIDs (never by name), and reaps them: only jobs still running, since a
# PID reaped earlier may belong to another process by now. For EXIT traps.
stop_background_jobs() {
    local live p
    live=$(jobs -p)
    for p in $live; do kill "$p" 2>/dev/null || true; done
    for p in $live; do wait "$p" 2>/dev/null || true; done
}
