//! The server checked with rust-vmm's `vfio_user::Client`, code we did not
//! write: negotiation, device/region/IRQ info, config space, BAR sizing,
//! DMA, interrupts, reset, disconnect and reconnect.

mod support;

use std::os::fd::AsRawFd;

use support::*;
use vfio_bindings::bindings::vfio::*;
use vfio_user::Client;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn cfg_read(c: &mut Client, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off, &mut b)
        .unwrap();
    b
}

fn cfg_read32(c: &mut Client, off: u64) -> u32 {
    u32::from_le_bytes(cfg_read(c, off, 4).try_into().unwrap())
}

fn cfg_write32(c: &mut Client, off: u64, v: u32) {
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, &v.to_le_bytes())
        .unwrap();
}

/// SET_IRQS through rust-vmm's client. The client does not look at the
/// error flag of the reply, so the tests check the effect instead.
fn set_irqs(c: &mut Client, index: u32, flags: u32, start: u32, count: u32, fds: &[i32]) {
    c.set_irqs(index, flags, start, count, fds).unwrap();
}

#[test]
fn regions_and_irqs_as_a_client_sees_them() {
    let srv = ServerProcess::start(&["--disk", "null:1G", "--queues", "2"]);
    let mut c = Client::new(&srv.socket).unwrap();
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let r0 = c.region(VFIO_PCI_BAR0_REGION_INDEX).unwrap();
    assert_eq!((r0.size, r0.flags), (0x80, rw));
    assert!(r0.size.is_power_of_two());
    let r1 = c.region(VFIO_PCI_BAR1_REGION_INDEX).unwrap();
    assert_eq!((r1.size, r1.flags), (0x1000, rw));
    let r7 = c.region(VFIO_PCI_CONFIG_REGION_INDEX).unwrap();
    assert_eq!((r7.size, r7.flags), (256, rw));
    // BAR4: the modern virtio structures, not mappable by default (so
    // that QEMU posts the writes to it).
    let r4 = c.region(VFIO_PCI_BAR4_REGION_INDEX).unwrap();
    assert_eq!((r4.size, r4.flags), (0x4000, rw));
    assert!(r4.file_offset.is_none() && r4.sparse_areas.is_empty());
    for i in [2, 3, 5, 6, 8] {
        let r = c.region(i).unwrap();
        assert_eq!((r.size, r.flags), (0, 0), "region {i}");
        assert!(r.file_offset.is_none());
    }
    assert!(c.region(9).is_none());

    let intx = c.get_irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap();
    assert_eq!(intx.count, 1);
    assert_eq!(
        intx.flags,
        VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
    );
    assert_eq!(c.get_irq_info(VFIO_PCI_MSI_IRQ_INDEX).unwrap().count, 0);
    let msix = c.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!((msix.count, msix.flags), (3, VFIO_IRQ_INFO_EVENTFD));
    assert_eq!(c.get_irq_info(VFIO_PCI_ERR_IRQ_INDEX).unwrap().count, 1);
    assert_eq!(c.get_irq_info(VFIO_PCI_REQ_IRQ_INDEX).unwrap().count, 0);
    c.shutdown().unwrap();
}

#[test]
fn config_space_bytes() {
    let srv = ServerProcess::start(&["--disk", "null:1G"]);
    let mut c = Client::new(&srv.socket).unwrap();
    let cfg = cfg_read(&mut c, 0, 256);
    let r16 = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    let r32 = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(r16(0x00), 0x1af4, "vendor");
    assert_eq!(r16(0x02), 0x1001, "transitional virtio-blk");
    assert_eq!(cfg[0x08], 0, "legacy ABI revision");
    assert_eq!(&cfg[0x09..0x0c], &[0x00, 0x00, 0x01], "mass storage class");
    assert_eq!(cfg[0x0e], 0, "type 0 header");
    assert_eq!(r32(0x10) & 0x3, 0x1, "BAR0 is I/O");
    assert_eq!(
        r32(0x14) & 0xf,
        0x0,
        "BAR1 is 32-bit non-prefetchable memory"
    );
    assert_eq!(r32(0x20), 0xc, "BAR4 is 64-bit prefetchable memory");
    for o in [0x18, 0x1c, 0x24, 0x30] {
        assert_eq!(r32(o), 0, "unused BAR/ROM at {o:#x}");
    }
    assert_eq!(r16(0x2c), 0x1af4, "subsystem vendor");
    assert_eq!(r16(0x2e), 2, "subsystem id: block");
    assert_ne!(r16(0x06) & 0x10, 0, "capability list");
    assert_eq!(cfg[0x3d], 1, "interrupt pin A");
    // Walk the capability chain.
    let mut ptr = cfg[0x34] as usize;
    let mut found = None;
    let mut hops = 0;
    let mut virtio_types = Vec::new();
    while ptr != 0 {
        hops += 1;
        assert!(hops < 48 && (0x40..256).contains(&ptr));
        if cfg[ptr] == 0x11 {
            found = Some(ptr);
        }
        if cfg[ptr] == 0x09 {
            // A virtio capability: cfg_type, and a BAR of 4.
            assert!(cfg[ptr + 2] >= 16, "cap_len");
            virtio_types.push(cfg[ptr + 3]);
            if cfg[ptr + 3] != 5 {
                assert_eq!(cfg[ptr + 4], 4, "in BAR4");
            }
        }
        ptr = cfg[ptr + 1] as usize;
    }
    assert_eq!(
        virtio_types,
        vec![1, 2, 3, 4, 5],
        "common, notify, ISR, device, PCI config access"
    );
    let m = found.expect("MSI-X capability");
    let ctl = r16(m + 2);
    assert_eq!(ctl & 0x7ff, 1, "2 vectors for 1 queue + config");
    assert_eq!(ctl & 0xc000, 0, "MSI-X off at power-on");
    assert_eq!(r32(m + 4), 0x0000_0001, "table in BAR1 at 0");
    assert_eq!(r32(m + 8), 0x0000_0801, "PBA in BAR1 at 0x800");
    // Table and PBA fit the BAR and do not overlap.
    let table_end = 16 * ((ctl & 0x7ff) as u64 + 1);
    assert!(table_end <= 0x800 && 0x800 + 8 <= c.region(1).unwrap().size);
    c.shutdown().unwrap();
}

#[test]
fn bar_sizing_and_straddling_accesses() {
    let srv = ServerProcess::start(&["--disk", "null:1G"]);
    let mut c = Client::new(&srv.socket).unwrap();
    cfg_write32(&mut c, 0x10, 0xffff_ffff);
    assert_eq!(cfg_read32(&mut c, 0x10), !(0x80 - 1) | 1);
    cfg_write32(&mut c, 0x14, 0xffff_ffff);
    assert_eq!(cfg_read32(&mut c, 0x14), !(0x1000 - 1));
    // Address-mask-only probe.
    cfg_write32(&mut c, 0x14, 0xffff_fff0);
    assert_eq!(cfg_read32(&mut c, 0x14), !(0x1000 - 1));
    cfg_write32(&mut c, 0x10, 0xc000);
    assert_eq!(cfg_read32(&mut c, 0x10), 0xc001);
    cfg_write32(&mut c, 0x30, 0xffff_f800);
    assert_eq!(cfg_read32(&mut c, 0x30), 0, "no ROM");
    // One write over command+status: only writable command bits stick.
    cfg_write32(&mut c, 0x04, 0xffff_ffff);
    let v = cfg_read32(&mut c, 0x04);
    assert_eq!(v & 0xffff, 0x0547);
    assert_eq!(v >> 16, 0x0010);
    // Odd-sized, unaligned reads return the same bytes as a full read.
    let full = cfg_read(&mut c, 0, 256);
    assert_eq!(cfg_read(&mut c, 0x3b, 3), full[0x3b..0x3e].to_vec());
    assert_eq!(cfg_read(&mut c, 0x41, 7), full[0x41..0x48].to_vec());
    c.shutdown().unwrap();
}

#[test]
fn legacy_registers_carry_the_disk_capacity() {
    let srv = ServerProcess::start(&["--disk", "ram:64M"]);
    let mut c = Client::new(&srv.socket).unwrap();
    let mut cap = [0u8; 8];
    // MSI-X off: device config at 20.
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, 20, &mut cap)
        .unwrap();
    assert_eq!(u64::from_le_bytes(cap), (64 << 20) / 512);
    // MSI-X on: device config moves to 24.
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x42, &0x8001u16.to_le_bytes())
        .unwrap();
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, 24, &mut cap)
        .unwrap();
    assert_eq!(u64::from_le_bytes(cap), (64 << 20) / 512);
    c.shutdown().unwrap();
}

#[test]
fn dma_table_is_visible_to_the_device_while_connected() {
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("dma");
    let socket = dir.path("s.sock");
    let opts = <vfio_user_blk::cli::Options as clap::Parser>::parse_from([
        "x",
        "--socket",
        socket.to_str().unwrap(),
        "--disk",
        "null:1G",
    ]);
    let mut server = vfio_user_blk::cli::build(&opts).unwrap();
    let memory = server.memory();
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let t = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        server.serve(stream);
        server
    });
    let mut c = Client::new(&socket).unwrap();
    let f = vfio_user_blk::util::memfd("guest").unwrap();
    f.set_len(0x30000).unwrap();
    f.write_all_at(b"hello from the guest", 0x1234).unwrap();
    c.dma_map(0x1000, 0x100000, 0x10000, f.as_raw_fd()).unwrap();
    c.dma_map(0x11000, 0x110000, 0x10000, f.as_raw_fd())
        .unwrap();
    let _ = cfg_read(&mut c, 0, 4); // the maps are processed in order before this
    let mut buf = [0u8; 20];
    // Window 1 starts at file offset 0x1000, so file 0x1234 is IOVA 0x100234.
    memory
        .memory()
        .read_slice(&mut buf, GuestAddress(0x100234))
        .unwrap();
    assert_eq!(&buf, b"hello from the guest");
    // The device writes, the guest sees it: the mapping is shared.
    memory
        .memory()
        .write_slice(b"device", GuestAddress(0x110000))
        .unwrap();
    let mut back = [0u8; 6];
    f.read_exact_at(&mut back, 0x11000).unwrap();
    assert_eq!(&back, b"device");
    // A buffer spanning the two adjacent windows works.
    memory
        .memory()
        .write_slice(b"across", GuestAddress(0x10fffd))
        .unwrap();
    let mut across = [0u8; 6];
    f.read_exact_at(&mut across, 0x10ffd).unwrap();
    assert_eq!(&across, b"across");
    c.dma_unmap(0x110000, 0x10000).unwrap();
    assert!(memory
        .memory()
        .read_slice(&mut back, GuestAddress(0x110000))
        .is_err());
    assert!(memory
        .memory()
        .read_slice(&mut buf, GuestAddress(0x100234))
        .is_ok());
    c.shutdown().unwrap();
    let server = t.join().unwrap();
    assert_eq!(server.dma_windows(), 0);
    assert!(memory
        .memory()
        .read_slice(&mut buf, GuestAddress(0x100234))
        .is_err());
}

#[test]
fn msix_eventfds_deliver_interrupts() {
    let srv = ServerProcess::start(&["--disk", "null:1G"]);
    let mut c = Client::new(&srv.socket).unwrap();
    // Enable MSI-X in config space, as QEMU forwards it.
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x42, &0x8000u16.to_le_bytes())
        .unwrap();
    let e0 = EventFd::new(EFD_NONBLOCK).unwrap();
    let e1 = EventFd::new(EFD_NONBLOCK).unwrap();
    set_irqs(
        &mut c,
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        2,
        &[e0.as_raw_fd(), e1.as_raw_fd()],
    );
    // Fire vector 1 through the server (software trigger).
    set_irqs(
        &mut c,
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        1,
        1,
        &[],
    );
    assert_eq!(e1.read().unwrap(), 1);
    assert!(e0.read().is_err(), "vector 0 must stay quiet");
    // Swap vector 1's eventfd: the new one is used from now on.
    let e1b = EventFd::new(EFD_NONBLOCK).unwrap();
    set_irqs(
        &mut c,
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        1,
        1,
        &[e1b.as_raw_fd()],
    );
    set_irqs(
        &mut c,
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        1,
        1,
        &[],
    );
    assert_eq!(e1b.read().unwrap(), 1);
    assert!(e1.read().is_err());
    // De-assign with no descriptors (QEMU's "enabled, no vectors"), then the
    // whole-index teardown; both succeed.
    set_irqs(
        &mut c,
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[],
    );
    set_irqs(
        &mut c,
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
    );
    // INTx trigger eventfd, fired by software trigger.
    let ei = EventFd::new(EFD_NONBLOCK).unwrap();
    set_irqs(
        &mut c,
        VFIO_PCI_INTX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[ei.as_raw_fd()],
    );
    set_irqs(
        &mut c,
        VFIO_PCI_INTX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[],
    );
    assert_eq!(ei.read().unwrap(), 1);
    c.shutdown().unwrap();
}

#[test]
fn device_interrupt_waits_for_its_eventfd() {
    // A vector raised before the client installed its eventfd is latched in
    // the PBA and delivered when the eventfd arrives.
    let ts = ThreadServer::start(&["--disk", "null:1G"]);
    let mut c = Client::new(&ts.socket).unwrap();
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x42, &0x8000u16.to_le_bytes())
        .unwrap();
    let irqs = ts.interrupts();
    assert!(irqs.signal_msix(1), "MSI-X is enabled");
    let mut pba = [0u8; 8];
    c.region_read(VFIO_PCI_BAR1_REGION_INDEX, 0x800, &mut pba)
        .unwrap();
    assert_eq!(u64::from_le_bytes(pba), 0b10, "vector 1 pending");
    let e1 = EventFd::new(EFD_NONBLOCK).unwrap();
    set_irqs(
        &mut c,
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        1,
        1,
        &[e1.as_raw_fd()],
    );
    assert_eq!(e1.read().unwrap(), 1);
    c.region_read(VFIO_PCI_BAR1_REGION_INDEX, 0x800, &mut pba)
        .unwrap();
    assert_eq!(u64::from_le_bytes(pba), 0);
    assert!(irqs.signal_msix(1), "MSI-X is enabled");
    assert_eq!(e1.read().unwrap(), 1, "delivered at once now");
    c.shutdown().unwrap();
    ts.finish();
}

#[test]
fn reset_returns_config_to_power_on() {
    let srv = ServerProcess::start(&["--disk", "null:1G"]);
    let mut c = Client::new(&srv.socket).unwrap();
    cfg_write32(&mut c, 0x04, 0x0000_0007);
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x42, &0x8000u16.to_le_bytes())
        .unwrap();
    cfg_write32(&mut c, 0x10, 0xc000);
    // Legacy virtio state: status and guest features.
    c.region_write(VFIO_PCI_BAR0_REGION_INDEX, 18, &[0x3])
        .unwrap();
    c.reset().unwrap();
    assert_eq!(cfg_read32(&mut c, 0x04) & 0xffff, 0);
    assert_eq!(cfg_read(&mut c, 0x42, 2), vec![0x01, 0x00]);
    assert_eq!(cfg_read32(&mut c, 0x10), 1);
    let mut st = [0xffu8];
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, 18, &mut st)
        .unwrap();
    assert_eq!(st[0], 0);
    c.shutdown().unwrap();
}

#[test]
fn a_second_client_after_disconnect_sees_a_fresh_device() {
    let mut srv = ServerProcess::start(&["--disk", "null:1G"]);
    let fds_before = srv.open_fds();
    {
        let mut c = Client::new(&srv.socket).unwrap();
        cfg_write32(&mut c, 0x04, 0x0000_0007);
        c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x42, &0x8000u16.to_le_bytes())
            .unwrap();
        let f = vfio_user_blk::util::memfd("guest").unwrap();
        f.set_len(0x10000).unwrap();
        c.dma_map(0, 0, 0x10000, f.as_raw_fd()).unwrap();
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        set_irqs(
            &mut c,
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[e.as_raw_fd()],
        );
        // Dropped without a goodbye, like a killed QEMU.
    }
    wait_until("the server to drop the first client's descriptors", || {
        srv.open_fds() <= fds_before
    });
    let mut c = Client::new(&srv.socket).unwrap();
    assert_eq!(cfg_read32(&mut c, 0x04) & 0xffff, 0);
    assert_eq!(cfg_read(&mut c, 0x42, 2), vec![0x01, 0x00]);
    // The first client's window is gone: mapping the same range again works.
    let f = vfio_user_blk::util::memfd("guest2").unwrap();
    f.set_len(0x10000).unwrap();
    c.dma_map(0, 0, 0x10000, f.as_raw_fd()).unwrap();
    c.dma_unmap(0, 0x10000).unwrap();
    c.shutdown().unwrap();
    srv.assert_alive();
    assert!(!srv.log_text().contains("panicked"));
}

/// The PCI-config access capability of the modern interface: the first
/// one in the capability list.
fn window_cap(cfg: &[u8; 256]) -> usize {
    let mut ptr = usize::from(cfg[0x34]);
    while ptr != 0 {
        if cfg[ptr] == 0x09 && cfg[ptr + 3] == vfio_user_blk::virtio::modern::CAP_PCI_CFG {
            return ptr;
        }
        ptr = usize::from(cfg[ptr + 1]);
    }
    panic!("no window capability");
}

#[test]
fn straddling_and_whole_space_config_writes_keep_read_only_bytes() {
    let (mut srv, _img) = support::driver::image_server("review-window", 4 << 20, &[]);
    let mut c = vfio_user::Client::new(&srv.socket).unwrap();
    let mut before = [0u8; 256];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut before)
        .unwrap();
    let cap = window_cap(&before);
    // One write covering bar..data: bar 4, offset DEVICE_STATUS, length 1,
    // data 0x01: the access uses the new fields.
    let mut w = vec![4u8, 0xee, 0xee, 0xee];
    w.extend_from_slice(
        &u32::try_from(vfio_user_blk::virtio::modern::DEVICE_STATUS)
            .unwrap()
            .to_le_bytes(),
    );
    w.extend_from_slice(&1u32.to_le_bytes());
    w.extend_from_slice(&[1, 0, 0, 0]);
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, cap as u64 + 4, &w)
        .unwrap();
    let mut st = [0u8];
    c.region_read(
        VFIO_PCI_BAR4_REGION_INDEX,
        vfio_user_blk::virtio::modern::DEVICE_STATUS,
        &mut st,
    )
    .unwrap();
    assert_eq!(st[0], 1);
    // All ones over all of config space, then every width at every offset
    // around the capability.
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0, &[0xff; 256])
        .unwrap();
    for off in cap - 4..cap + 24 {
        for width in [1usize, 2, 3, 4, 8] {
            if off + width <= 256 {
                c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off as u64, &vec![0xff; width])
                    .unwrap();
                let mut r = vec![0u8; width];
                c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off as u64, &mut r)
                    .unwrap();
            }
        }
    }
    let mut after = [0u8; 256];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut after)
        .unwrap();
    // Read-only parts of the window capability and of the other caps.
    for i in [cap, cap + 1, cap + 2, cap + 3, cap + 5, cap + 6, cap + 7] {
        assert_eq!(after[i], before[i], "config byte {i:#x}");
    }
    // (MSI-X control's enable and mask bits at 0x43 are writable.)
    assert_eq!(
        &after[0x44..cap],
        &before[0x44..cap],
        "caps before the window"
    );
    assert_eq!(&after[..4], &before[..4]);
    drop(c);
    srv.assert_healthy();
}
