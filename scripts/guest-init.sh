#!/bin/sh
# /init of the e2e guest (busybox). Runs the checks of one phase, prints
# "VUB-CHECK <name> PASS|FAIL [detail]" lines on the serial console, then
# powers off (or reboots, between boot 1 and boot 2).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null || mdev -s
exec </dev/console >/dev/console 2>&1

for a in $(cat /proc/cmdline); do
    case "$a" in
        vub.phase=*) PHASE=${a#vub.phase=} ;;
        vub.sectors=*) SECTORS=${a#vub.sectors=} ;;
        vub.serial=*) SERIAL=${a#vub.serial=} ;;
        vub.serial2=*) SERIAL2=${a#vub.serial2=} ;;
        vub.iface=*) IFACE=${a#vub.iface=} ;;
        vub.resize=*) RESIZE=${a#vub.resize=} ;;
        vub.quick=*) SERIAL=${a#vub.quick=} ;;
        vub.packed=*) PACKED=${a#vub.packed=} ;;
        vub.jobs=*) JOBS=${a#vub.jobs=} ;;
        vub.engines=*) ENGINES=${a#vub.engines=} ;;
        vub.runtime=*) RUNTIME=${a#vub.runtime=} ;;
    esac
done
echo "VUB-BOOTED phase=$PHASE"
[ "$PHASE" = probe ] && { poweroff -f; sleep 10; }

ok() { echo "VUB-CHECK $1 PASS $2"; }
bad() { echo "VUB-CHECK $1 FAIL $2"; }
verdict() { # name status detail
    if [ "$2" -eq 0 ]; then ok "$1" "$3"; else bad "$1" "$3"; fi
}
finish() {
    echo "VUB-DONE $1"
    sync
    poweroff -f
    sleep 30
}

for m in $(cat /lib/modules/load); do
    insmod /lib/modules/$m.ko 2>/dev/null
done
# Wait for the disks.
i=0
while [ $i -lt 120 ]; do
    n=0
    for b in /sys/block/vd*; do [ -e "$b" ] && n=$((n + 1)); done
    [ $n -ge 3 ] && break
    case "$PHASE" in quick | boot | bench | upgrade) [ $n -ge 1 ] && break ;; esac
    sleep 0.5
    i=$((i + 1))
done
mdev -s 2>/dev/null

# Find our disks by serial.
DISK=""
DISK2=""
RO=""
for b in /sys/block/vd*; do
    s=$(cat $b/serial 2>/dev/null)
    [ "$s" = "$SERIAL" ] && DISK=/dev/$(basename $b)
    [ -n "$SERIAL2" ] && [ "$s" = "$SERIAL2" ] && DISK2=/dev/$(basename $b)
    [ "$s" = "VUB-RO" ] && RO=/dev/$(basename $b)
done
D=$(basename "$DISK")
MARK_OFF=200 # MiB: the reboot marker
MiB=1048576

region_md5() { # offset_mib count_mib
    dd if="$DISK" bs=1M skip=$1 count=$2 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}

fio_ioengine=libaio
fio --enghelp 2>/dev/null | grep -q libaio || fio_ioengine=psync

case "$PHASE" in
main)
    if [ -z "$DISK" ]; then
        bad disk-found "no virtio disk with serial $SERIAL"
        finish main
    fi
    marker=$(dd if="$DISK" bs=1M skip=$MARK_OFF count=1 iflag=direct 2>/dev/null | head -c 64 | tr -d '\0')
    case "$marker" in
    VUBMARK*)
        # Second boot, after the guest rebooted: the first boot's data is there.
        want=${marker#VUBMARK }
        got=$(region_md5 0 32)
        [ "$got" = "$want" ]; verdict reboot-sees-first-boot-data $? "$got"
        dd if=/dev/zero of="$DISK" bs=1M seek=$MARK_OFF count=1 oflag=direct 2>/dev/null
        finish reboot
        ;;
    esac
    ok disk-found "$DISK"

    # The PCI function and its driver.
    dev=""
    for p in /sys/bus/pci/devices/*; do
        if [ "$(cat $p/vendor)" = 0x1af4 ] && [ "$(cat $p/device)" = 0x1001 ] && [ -e $p/virtio*/block/$D ]; then
            dev=$p
        fi
    done
    [ -n "$dev" ]; verdict pci-1af4-1001 $? "$dev"
    drv=$(basename "$(readlink $dev/driver 2>/dev/null)")
    [ "$drv" = virtio-pci ]; verdict virtio-pci-driver-bound $? "$drv"
    # A transitional device: revision 0, so that legacy drivers bind.
    [ "$(cat $dev/revision)" = 0x00 ]; verdict transitional-revision-0 $? "$(cat $dev/revision)"
    # The interface the driver chose: bit 32 (VERSION_1) of the negotiated
    # features is set on the modern interface, clear on the legacy one
    # (virtio_pci.force_legacy=1).
    feats=$(cat $dev/virtio*/features 2>/dev/null)
    bit32=$(echo "$feats" | cut -c33)
    if [ "$IFACE" = legacy ]; then want=0; else want=1; fi
    [ "$bit32" = "$want" ]; verdict "virtio-interface-${IFACE:-modern}" $? "features $feats"
    nvec=$(ls $dev/msi_irqs 2>/dev/null | wc -l)
    [ "$nvec" -ge 2 ]; verdict msix-vectors-in-use $? "$nvec vectors"

    size=$(cat /sys/block/$D/size)
    [ "$size" = "$SECTORS" ]; verdict capacity $? "$size sectors"
    s=$(cat /sys/block/$D/serial)
    [ "$s" = "$SERIAL" ]; verdict serial $? "$s"
    nq=$(ls /sys/block/$D/mq | wc -l)
    [ "$nq" = 2 ]; verdict two-hardware-queues $? "$nq"

    fio --name=randwrite --filename="$DISK" --ioengine=$fio_ioengine --direct=1 --rw=randwrite \
        --bs=4k --iodepth=16 --offset=0 --size=32M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --randrepeat=1 --output=/tmp/fio1.txt >/dev/null 2>&1
    r=$?; verdict fio-randwrite-crc32c $r "$(grep -o 'IOPS=[^,]*' /tmp/fio1.txt | head -1)"
    fio --name=randwrite --filename="$DISK" --ioengine=$fio_ioengine --direct=1 --rw=randwrite \
        --bs=4k --iodepth=16 --offset=0 --size=32M --verify=crc32c --verify_only=1 \
        --verify_fatal=1 --randrepeat=1 --output=/tmp/fio2.txt >/dev/null 2>&1
    verdict fio-full-verify-read $? ""
    fio --name=seq --filename="$DISK" --ioengine=$fio_ioengine --direct=1 --rw=write \
        --bs=128k --iodepth=4 --offset=32M --size=32M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output=/tmp/fio3.txt >/dev/null 2>&1
    verdict fio-sequential-128k $? "$(grep -o 'BW=[^ ]*' /tmp/fio3.txt | head -1)"
    echo "VUB-MD5 fio-region $(region_md5 0 32)"

    # Two disks of one target process at once: fio with verification on
    # both, in one run ([128 MiB, 144 MiB) of the main disk, the first
    # 16 MiB of the second).
    n=$(ls -d /sys/block/vd* | wc -l)
    [ "$n" -ge 3 ]; verdict three-disks-seen $? "$n"
    if [ -n "$DISK2" ]; then
        fio --ioengine=$fio_ioengine --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
            --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=1 \
            --name=one --filename="$DISK" --offset=128M \
            --name=two --filename="$DISK2" --offset=0 \
            --output=/tmp/fio4.txt >/dev/null 2>&1
        verdict fio-two-disks-at-once $? "$(grep -o 'IOPS=[^,]*' /tmp/fio4.txt | tr '\n' ' ')"
        m1=$(dd if="$DISK" bs=1M skip=128 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        m2=$(dd if="$DISK2" bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        echo "VUB-MD5 two-disks $m1 $m2"
        # The host grows the second disk through the management socket
        # while we run; the kernel sees the configuration interrupt.
        D2=$(basename "$DISK2")
        before=$(cat /sys/block/$D2/size)
        echo "VUB-RESIZE-READY"
        i=0
        while [ $i -lt 240 ] && [ "$(cat /sys/block/$D2/size)" = "$before" ]; do
            sleep 0.5
            i=$((i + 1))
        done
        after=$(cat /sys/block/$D2/size)
        [ "$after" = "${RESIZE:-262144}" ]; verdict resize-seen-by-guest $? "$before -> $after sectors"
    else
        bad second-disk-found "no disk with serial $SERIAL2"
    fi

    # ext4 on a loop device over [64 MiB, 128 MiB).
    losetup -o $((64 * MiB)) --sizelimit $((64 * MiB)) /dev/loop0 "$DISK" 2>/dev/null \
        || losetup -o $((64 * MiB)) /dev/loop0 "$DISK"
    mkfs.ext4 -q -F /dev/loop0 65536 >/dev/null 2>&1; verdict mkfs-ext4 $? ""
    mount -t ext4 /dev/loop0 /mnt; verdict mount-ext4 $? ""
    for f in 1 2 3; do
        dd if=/dev/urandom of=/mnt/file$f bs=64k count=$((f * 8)) 2>/dev/null
    done
    (cd /mnt && md5sum file1 file2 file3) >/tmp/files.md5
    sync
    umount /mnt; verdict umount-ext4 $? ""
    e2fsck -f -n /dev/loop0 >/tmp/fsck.txt 2>&1; verdict fsck-clean $? "$(tail -1 /tmp/fsck.txt)"
    mount -t ext4 /dev/loop0 /mnt && (cd /mnt && md5sum -c /tmp/files.md5 >/dev/null 2>&1)
    verdict ext4-files-intact $? ""
    umount /mnt
    losetup -d /dev/loop0

    # blkdiscard on [192 MiB, 200 MiB), after filling it: reads back zeros.
    dd if=/dev/urandom of="$DISK" bs=1M seek=192 count=8 oflag=direct 2>/dev/null
    zero=$(dd if=/dev/zero bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)
    blkdiscard -o $((192 * MiB)) -l $((8 * MiB)) "$DISK"; r=$?
    got=$(region_md5 192 8)
    [ $r -eq 0 ] && [ "$got" = "$zero" ]; verdict blkdiscard-reads-zeros $? "$got"

    # The read-only device refuses writes.
    if [ -n "$RO" ]; then
        R=$(basename $RO)
        [ "$(cat /sys/block/$R/ro)" = 1 ]; verdict readonly-flag $? ""
        before=$(dd if=$RO bs=4k count=1 iflag=direct 2>/dev/null | md5sum)
        dd if=/dev/zero of=$RO bs=4k count=1 oflag=direct 2>/dev/null
        w=$?
        after=$(dd if=$RO bs=4k count=1 iflag=direct 2>/dev/null | md5sum)
        [ $w -ne 0 ] && [ "$before" = "$after" ]; verdict readonly-refuses-writes $? ""
    else
        bad readonly-disk-found ""
    fi

    # Reboot: the second boot must see this boot's data.
    printf 'VUBMARK %s' "$(region_md5 0 32)" | dd of="$DISK" bs=1M seek=$MARK_OFF conv=notrunc oflag=direct 2>/dev/null
    sync
    echo "VUB-DONE main"
    reboot -f
    sleep 30
    ;;
bench)
    # scripts/guest-bench.sh: the same fio jobs on the one disk, whatever
    # serves it; each job's JSON between markers on the console.
    B=$(ls -d /sys/block/vd* | head -1)
    DEV=/dev/$(basename "$B")
    NQ=$(ls "$B/mq" | wc -l)
    echo "VUB-BENCH-START queues=$NQ"
    for eng in $(echo "${ENGINES:-libaio}" | tr , ' '); do
        fio --enghelp 2>/dev/null | grep -q "$eng" || { echo "VUB-BENCH-NOENGINE $eng"; continue; }
        for job in $(echo "$JOBS" | tr , ' '); do
            case "$job" in
            randread-qd1) a="--rw=randread --bs=4k --iodepth=1 --numjobs=1" ;;
            randread-qd32) a="--rw=randread --bs=4k --iodepth=$((32 / NQ)) --numjobs=$NQ" ;;
            randwrite-qd32) a="--rw=randwrite --bs=4k --iodepth=$((32 / NQ)) --numjobs=$NQ" ;;
            seqread-128k) a="--rw=read --bs=128k --iodepth=8 --numjobs=1" ;;
            seqwrite-128k) a="--rw=write --bs=128k --iodepth=8 --numjobs=1" ;;
            mix70-qd32) a="--rw=randrw --rwmixread=70 --bs=4k --iodepth=$((32 / NQ)) --numjobs=$NQ" ;;
            *) echo "VUB-BENCH-UNKNOWN $job"; continue ;;
            esac
            echo "VUB-JOB-START $job $eng"
            # shellcheck disable=SC2086
            fio --name="$job" --filename="$DEV" --direct=1 --ioengine="$eng" $a \
                --group_reporting --time_based --runtime="${RUNTIME:-3}" --ramp_time=1 \
                --size=192M --output-format=json --output=/tmp/j.json >/dev/null 2>&1
            echo "VUB-JSON-BEGIN $job $eng"
            cat /tmp/j.json
            echo "VUB-JSON-END"
        done
    done
    echo "VUB-BENCH-END"
    # The host reads QEMU's CPU time when it sees the line above.
    sleep 2
    finish bench
    ;;
boot)
    # Booted by SeaBIOS and extlinux from our disk: the boot loader put
    # BOOT_IMAGE on the command line, and the disk holds its partition.
    grep -q 'BOOT_IMAGE=' /proc/cmdline; b=$?
    part=""
    for p in /sys/block/vd*/vd*1; do [ -e "$p" ] && part=$(basename "$p"); done
    [ $b -eq 0 ] && [ -n "$part" ]; verdict boot-from-disk $? "$(cat /proc/cmdline | cut -c1-60) on $part"
    finish boot
    ;;
quick)
    # One disk, on the modern interface: fio with verification, and what
    # the driver negotiated.
    if [ -z "$DISK" ]; then
        bad disk-found "no virtio disk with serial $SERIAL"
        finish quick
    fi
    ok disk-found "$DISK"
    feats=""
    for v in /sys/bus/virtio/devices/virtio*; do
        [ -e "$v/block/$D" ] && feats=$(cat "$v/features")
    done
    [ "$(echo "$feats" | cut -c33)" = 1 ]; verdict virtio-interface-modern $? "features $feats"
    if [ "$PACKED" = 1 ]; then
        [ "$(echo "$feats" | cut -c35)" = 1 ]; verdict packed-ring-negotiated $? ""
    fi
    fio --name=randwrite --filename="$DISK" --ioengine=$fio_ioengine --direct=1 --rw=randwrite \
        --bs=4k --iodepth=16 --offset=0 --size=16M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --randrepeat=1 --output=/tmp/fq1.txt >/dev/null 2>&1
    verdict fio-randwrite-crc32c $? "$(grep -o 'IOPS=[^,]*' /tmp/fq1.txt | head -1)"
    fio --name=seq --filename="$DISK" --ioengine=$fio_ioengine --direct=1 --rw=write \
        --bs=128k --iodepth=4 --offset=16M --size=16M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output=/tmp/fq2.txt >/dev/null 2>&1
    verdict fio-sequential-128k $? "$(grep -o 'BW=[^ ]*' /tmp/fq2.txt | head -1)"
    nq=$(ls /sys/block/$D/mq | wc -l)
    [ "$nq" = 2 ]; verdict two-hardware-queues $? "$nq"
    echo "VUB-MD5 quick $(region_md5 0 32)"
    finish quick
    ;;
upgrade)
    # fio with verification while the host upgrades the target under it
    # (it starts when it sees VUB-UPGRADE-FIO-START), then the kernel log
    # must hold no I/O error.
    if [ -z "$DISK" ]; then
        bad disk-found "no virtio disk with serial $SERIAL"
        finish upgrade
    fi
    dmesg -c >/dev/null 2>&1
    echo "VUB-UPGRADE-FIO-START"
    fio --name=upgrade --filename="$DISK" --ioengine=$fio_ioengine --direct=1 --rw=randwrite \
        --bs=4k --iodepth=16 --offset=0 --size=32M --time_based --runtime=${RUNTIME:-25} \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=1024 \
        --output=/tmp/fu.txt >/dev/null 2>&1
    verdict fio-verify-across-upgrades $? "$(grep -o 'IOPS=[^,]*' /tmp/fu.txt | head -1)"
    fio --name=upgrade-check --filename="$DISK" --ioengine=$fio_ioengine --direct=1 \
        --rw=read --bs=128k --iodepth=4 --offset=0 --size=32M --output=/tmp/fu2.txt >/dev/null 2>&1
    verdict read-back-after-upgrades $? ""
    errs=$(dmesg | grep -ci 'error\|blk_update_request\|timed out\|hung')
    [ "$errs" = 0 ]; verdict no-io-errors-in-kernel-log $? "$errs line(s) since fio started"
    echo "VUB-MD5 quick $(region_md5 0 32)"
    finish upgrade
    ;;
fio-kill)
    losetup -o $((64 * MiB)) /dev/loop0 "$DISK"
    mount -t ext4 /dev/loop0 /mnt || bad fio-kill-mount ""
    echo "VUB-FIO-RUNNING"
    fio --name=churn --directory=/mnt --ioengine=$fio_ioengine --rw=randwrite --bs=4k \
        --size=8M --nrfiles=4 --iodepth=8 --fsync=16 --time_based --runtime=600 >/dev/null 2>&1
    finish fio-kill
    ;;
after-kill)
    losetup -o $((64 * MiB)) /dev/loop0 "$DISK"
    # Mounting replays the journal left by the killed guest.
    mount -t ext4 /dev/loop0 /mnt; verdict remount-after-kill $? ""
    umount /mnt
    e2fsck -f -n /dev/loop0 >/tmp/fsck.txt 2>&1; verdict fsck-clean-after-kill $? "$(tail -1 /tmp/fsck.txt)"
    finish after-kill
    ;;
*)
    bad phase "unknown phase $PHASE"
    finish unknown
    ;;
esac
