//! The modern (virtio 1.x) interface in BAR4, end to end: the real server
//! binary driven by the test support's modern driver over rust-vmm's
//! client, every byte checked against the image file.

mod support;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use support::driver::*;
use support::*;
use vfio_bindings::bindings::vfio::*;
use vfio_user_blk::virtio::modern;

const MB: u64 = 1 << 20;
const VERSION_1: u64 = 1 << 32;

fn modern_opts() -> DriverOptions {
    DriverOptions::modern()
}

#[test]
fn a_modern_driver_does_io_byte_for_byte_on_every_queue() {
    let (mut srv, img) = image_server("modern-io", 16 * MB, &["--queues", "2"]);
    let mut d = Driver::new(&srv.socket, modern_opts());
    assert_ne!(d.features64 & VERSION_1, 0, "VERSION_1 negotiated");
    assert_eq!(d.queues.len(), 2);
    assert_eq!(d.capacity(), 16 * MB / 512);
    for q in 0..2 {
        let data = pattern(q as u64 + 1, 64 * 1024);
        let sector = 1000 * (q as u64 + 1);
        assert_eq!(d.write(q, sector, &data), S_OK);
        assert_eq!(image_bytes(&img, sector * 512, data.len()), data);
        let host = pattern(10 + q as u64, 8192);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(&host, (sector + 200) * 512)
            .unwrap();
        // Each queue signals its own vector.
        let (status, data, fired) = d.run_signalled(q, &Request::read(sector + 200, 8192));
        assert_eq!((status, data), (S_OK, host));
        assert_eq!(fired, vec![q + 1], "queue {q}'s interrupt");
    }
    let log = srv.log_text();
    assert!(log.contains("VERSION_1"), "{log}");
    srv.assert_healthy();
}

#[test]
fn a_smaller_queue_wraps_around() {
    let (mut srv, img) = image_server("modern-small", 4 * MB, &["--queue-size", "256"]);
    let mut d = Driver::new(
        &srv.socket,
        DriverOptions {
            queue_size: Some(8),
            ..DriverOptions::modern()
        },
    );
    assert_eq!(d.queues[0].size, 8);
    // Several times round the ring (8 descriptors: two requests of three
    // in flight at once).
    for round in 0..10u64 {
        let subs: Vec<_> = (0..2u64)
            .map(|i| {
                let sector = round * 64 + i * 8;
                d.submit(0, &Request::write(sector, &pattern(round * 4 + i, 4096)))
            })
            .collect();
        d.kick(0);
        let used = d.wait_used(0, subs.len(), Duration::from_secs(10));
        assert_eq!(used.len(), 2);
        for s in &subs {
            assert_eq!(d.result(s).0, S_OK);
        }
    }
    for round in 0..10u64 {
        for i in 0..2u64 {
            let sector = round * 64 + i * 8;
            assert_eq!(
                image_bytes(&img, sector * 512, 4096),
                pattern(round * 4 + i, 4096)
            );
        }
    }
    srv.assert_healthy();
}

#[test]
fn features_ok_is_refused_for_what_was_not_offered_or_without_version_1() {
    let (mut srv, _img) = image_server("modern-fok", 4 * MB, &[]);
    let mut d = Driver::new(&srv.socket, modern_opts());
    let offered = d.features64;
    d.reset();
    let wr = |d: &mut Driver, s: u8| {
        d.c.region_write(VFIO_PCI_BAR4_REGION_INDEX, modern::DEVICE_STATUS, &[s])
            .unwrap()
    };
    // A feature that was not offered (bit 40).
    wr(&mut d, 3);
    let e = d.negotiate_modern(offered | 1 << 40).unwrap_err();
    assert!(e.contains("refused"), "{e}");
    // DRIVER_OK after the refusal starts nothing.
    wr(&mut d, 0xf);
    assert_eq!(d.status() & 0x4, 0, "not started");
    // No VERSION_1.
    d.reset();
    wr(&mut d, 3);
    assert!(d.negotiate_modern(offered & !VERSION_1).is_err());
    // What was offered is accepted, and the device works after a reset.
    d.reset();
    d.init_modern(0, None).unwrap();
    assert_eq!(d.write(0, 0, &[7u8; 4096]), S_OK);
    assert_eq!(d.read(0, 0, 4096), (S_OK, vec![7u8; 4096]));
    let log = srv.log_text();
    assert!(log.contains("FEATURES_OK refused"), "{log}");
    srv.assert_healthy();
}

#[test]
fn a_refused_feature_keeps_its_effect_off() {
    // Refusing DISCARD on the modern interface turns it off; refusing
    // FLUSH leaves the cache write-through.
    let (mut srv, _img) = image_server("modern-refuse", 4 * MB, &[]);
    let mut d = Driver::new(
        &srv.socket,
        DriverOptions {
            modern: true,
            refuse: F_FLUSH | F_DISCARD,
            ..Default::default()
        },
    );
    assert_eq!(d.features & (F_FLUSH | F_DISCARD), 0);
    let seg = dwz_segment(0, 8, 0);
    assert_eq!(d.simple(0, T_DISCARD, 0, seg, 0).0, S_UNSUPP);
    let log = srv.log_text();
    assert!(log.contains("write cache write-through"), "{log}");
    srv.assert_healthy();
}

#[test]
fn reset_and_restart_on_either_interface() {
    let (mut srv, img) = image_server("modern-reset", 4 * MB, &[]);
    let mut d = Driver::new(&srv.socket, modern_opts());
    assert_eq!(d.write(0, 8, &pattern(1, 4096)), S_OK);
    // The driver goes away (modern reset) and a legacy one takes over on
    // the same connection, as when a guest reboots into a legacy-only
    // kernel; then a modern one again.
    d.reset();
    d.modern = false;
    d.init(0);
    assert_eq!(d.features & (1 << 31), 0);
    assert_eq!(d.read(0, 8, 4096), (S_OK, pattern(1, 4096)));
    assert_eq!(d.write(0, 16, &pattern(2, 4096)), S_OK);
    d.reset();
    d.modern = true;
    d.init_modern(0, None).unwrap();
    assert_eq!(d.read(0, 16, 4096), (S_OK, pattern(2, 4096)));
    assert_eq!(image_bytes(&img, 16 * 512, 4096), pattern(2, 4096));
    srv.assert_healthy();
}

#[test]
fn a_driver_that_mixes_interfaces_gets_the_first_one() {
    let (mut srv, _img) = image_server("modern-mix", 4 * MB, &[]);
    let mut d = Driver::new(&srv.socket, modern_opts());
    // Legacy writes while the modern driver runs: ignored (the queue PFN
    // and a legacy doorbell change nothing), the device keeps working.
    d.c.region_write(VFIO_PCI_BAR0_REGION_INDEX, 14, &0u16.to_le_bytes())
        .unwrap();
    d.c.region_write(VFIO_PCI_BAR0_REGION_INDEX, 8, &0u32.to_le_bytes())
        .unwrap();
    d.c.region_write(VFIO_PCI_BAR0_REGION_INDEX, 18, &[1])
        .unwrap();
    assert_eq!(d.status() & 0x4, 0x4, "still running");
    assert_eq!(d.write(0, 0, &[3u8; 512]), S_OK);
    let log = srv.log_text();
    assert!(log.contains("while using the Modern one"), "{log}");
    srv.assert_healthy();
}

#[test]
fn a_broken_queue_sets_needs_reset_and_raises_the_config_vector() {
    let (mut srv, _img) = image_server("modern-broken", 4 * MB, &[]);
    let mut d = Driver::new(&srv.socket, modern_opts());
    assert_eq!(d.write(0, 0, &[1u8; 512]), S_OK);
    while d.vectors[0].read().is_ok() {}
    // A head index past the ring: the queue breaks.
    d.publish(0, 999);
    d.force_kick(0);
    wait_until("NEEDS_RESET", || d.status() & 0x40 != 0);
    wait_until("the configuration interrupt", || {
        d.vectors[0].read().is_ok()
    });
    // A reset clears it, and the device works again.
    d.reset();
    assert_eq!(d.status(), 0);
    d.init_modern(0, None).unwrap();
    assert_eq!(d.read(0, 0, 512), (S_OK, vec![1u8; 512]));
    srv.assert_healthy();
}

/// Writes the PCI-config access capability's bar, offset and length.
fn window(c: &mut vfio_user::Client, cap: u64, bar: u8, offset: u32, length: u32) {
    let w = |c: &mut vfio_user::Client, off: u64, d: &[u8]| {
        c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, d)
            .unwrap();
    };
    w(c, cap + 4, &[bar]);
    w(c, cap + 8, &offset.to_le_bytes());
    w(c, cap + 12, &length.to_le_bytes());
}

#[test]
fn the_pci_config_window_reaches_the_modern_bar() {
    let (mut srv, _img) = image_server("modern-window", 4 * MB, &[]);
    let mut c = vfio_user::Client::new(&srv.socket).unwrap();
    let mut cfg = [0u8; 256];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
        .unwrap();
    let mut ptr = usize::from(cfg[0x34]);
    let mut cap = None;
    while ptr != 0 {
        if cfg[ptr] == 0x09 && cfg[ptr + 3] == modern::CAP_PCI_CFG {
            cap = Some(ptr as u64);
        }
        ptr = usize::from(cfg[ptr + 1]);
    }
    let cap = cap.expect("PCI config access capability");
    let data = cap + 16;
    let rd = |c: &mut vfio_user::Client| {
        let mut b = [0u8; 4];
        c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, data, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    };
    // The capacity, through the window: 4 MiB = 8192 sectors.
    window(
        &mut c,
        cap,
        4,
        u32::try_from(modern::DEVICE_OFFSET).unwrap(),
        4,
    );
    assert_eq!(rd(&mut c), 8192);
    // A write through it: the device status.
    window(
        &mut c,
        cap,
        4,
        u32::try_from(modern::DEVICE_STATUS).unwrap(),
        1,
    );
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, data, &[1, 0, 0, 0])
        .unwrap();
    let mut st = [0u8];
    c.region_read(VFIO_PCI_BAR4_REGION_INDEX, modern::DEVICE_STATUS, &mut st)
        .unwrap();
    assert_eq!(st[0], 1);
    assert_eq!(rd(&mut c) & 0xff, 1);
    // Outside the BAR, a length that is no access width, or a BAR that is
    // not there: zeros, nothing written, and the server goes on.
    for (bar, off, len) in [
        (4u8, 0x3ffe_u32, 4u32),
        (4, 0x0, 3),
        (2, 0x0, 4),
        (4, u32::MAX, 4),
    ] {
        window(&mut c, cap, bar, off, len);
        assert_eq!(rd(&mut c), 0, "bar {bar} offset {off:#x} length {len}");
        c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, data, &[0xff; 4])
            .unwrap();
    }
    c.region_read(VFIO_PCI_BAR4_REGION_INDEX, modern::DEVICE_STATUS, &mut st)
        .unwrap();
    assert_eq!(st[0], 1);
    srv.assert_healthy();
}

#[test]
fn notify_mmap_offers_the_page_and_polls_without_doorbell_messages() {
    // Interrupt mode: without the mmap the reactor would sleep until a
    // doorbell message that never comes.
    let (mut srv, img) = image_server(
        "modern-mmap",
        4 * MB,
        &["--notify", "mmap", "--poll-mode", "interrupt"],
    );
    let c = vfio_user::Client::new(&srv.socket).unwrap();
    let r4 = c.region(VFIO_PCI_BAR4_REGION_INDEX).unwrap();
    assert_ne!(r4.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert!(
        r4.file_offset.is_some(),
        "the page's file comes with the reply"
    );
    assert_eq!(r4.sparse_areas.len(), 1);
    assert_eq!(
        (r4.sparse_areas[0].offset, r4.sparse_areas[0].size),
        (modern::NOTIFY_OFFSET, modern::NOTIFY_AREA)
    );
    c.shutdown().unwrap();
    drop(c);
    let mut d = Driver::new(&srv.socket, modern_opts());
    // Kicks go to the page; every request still completes, one at a time
    // (a lost wakeup would show on the first).
    for i in 0..20u64 {
        let data = pattern(i, 4096);
        assert_eq!(d.write(0, i * 8, &data), S_OK);
        assert_eq!(image_bytes(&img, i * 4096, 4096), data);
    }
    // The legacy interface of the same device still works with messages.
    d.reset();
    d.modern = false;
    d.init(0);
    assert_eq!(d.read(0, 0, 4096), (S_OK, pattern(0, 4096)));
    srv.assert_healthy();
}

fn packed_opts(queue_size: Option<u16>, refuse: u32) -> DriverOptions {
    DriverOptions {
        modern: true,
        queue_size,
        refuse,
        ..Default::default()
    }
}

/// Many requests of every layout on every packed queue, two in flight at
/// once, byte for byte against the image.
fn packed_traffic(d: &mut Driver, img: &std::path::Path, rounds: u64) {
    let l = Layout::default();
    let layouts = [l, l.indirect(), l.split().chunks(4096)];
    for q in 0..d.packed.len() {
        for round in 0..rounds {
            let layout = layouts[(round % 3) as usize];
            let sector = (q as u64 * 4096) + round * 16;
            let data = pattern(round * 7 + q as u64, 8192);
            let s = d.submit(q, &Request::write(sector, &data).laid(layout));
            let r = d.submit(q, &Request::read(sector + 100_000, 4096).laid(layout));
            d.kick(q);
            let used = d.wait_used(q, 2, Duration::from_secs(10));
            assert_eq!(used.len(), 2);
            assert_eq!(d.result(&s).0, S_OK);
            let (st, got) = d.result(&r);
            assert_eq!(st, S_OK);
            assert_eq!(got, image_bytes(img, (sector + 100_000) * 512, 4096));
            assert_eq!(
                image_bytes(img, sector * 512, 8192),
                data,
                "q {q} round {round}"
            );
        }
    }
}

#[test]
fn packed_rings_do_io_byte_for_byte_and_wrap() {
    let (mut srv, img) = image_server(
        "packed-io",
        128 * MB,
        &["--packed", "--queues", "2", "--queue-size", "128"],
    );
    // A queue size that is no power of two: allowed for packed rings.
    let mut d = Driver::new(&srv.socket, packed_opts(Some(11), 0));
    assert_ne!(d.features64 & F_RING_PACKED, 0, "packed negotiated");
    assert_eq!(d.packed.len(), 2);
    assert_eq!(d.packed[0].size, 11);
    packed_traffic(&mut d, &img, 30);
    // Without EVENT_IDX the interrupt and doorbell flags alone decide.
    d.reset();
    d.init_modern(u64::from(F_EVENT_IDX), Some(16)).unwrap();
    assert_eq!(d.features & F_EVENT_IDX, 0);
    packed_traffic(&mut d, &img, 12);
    let log = srv.log_text();
    assert!(log.contains("RING_PACKED"), "{log}");
    srv.assert_healthy();
}

#[test]
fn packed_is_offered_only_when_asked_for_and_only_on_the_modern_interface() {
    let (mut srv, _img) = image_server("packed-offer", 4 * MB, &[]);
    let d = Driver::new(&srv.socket, modern_opts());
    assert_eq!(d.features64 & F_RING_PACKED, 0);
    drop(d);
    srv.assert_healthy();
    let (mut srv, img, mut d) = image_driver(4 * MB, &["--packed"]);
    assert!(d.packed.is_empty(), "a legacy driver gets split rings");
    assert_eq!(d.write(0, 0, &[5u8; 4096]), S_OK);
    // A modern driver that refuses it gets split rings too.
    d.reset();
    d.modern = true;
    d.init_modern(F_RING_PACKED, None).unwrap();
    assert!(d.packed.is_empty());
    assert_eq!(d.read(0, 0, 4096), (S_OK, vec![5u8; 4096]));
    // And one that takes it, packed ones.
    d.reset();
    d.init_modern(0, None).unwrap();
    assert_eq!(d.packed.len(), 1);
    assert_eq!(d.read(0, 0, 4096), (S_OK, vec![5u8; 4096]));
    assert_eq!(image_bytes(&img, 0, 4096), vec![5u8; 4096]);
    srv.assert_healthy();
}

#[test]
fn a_broken_packed_chain_breaks_the_queue_until_reset() {
    let (mut srv, _img) = image_server("packed-broken", 4 * MB, &["--packed"]);
    let mut d = Driver::new(&srv.socket, packed_opts(Some(8), 0));
    assert_eq!(d.write(0, 0, &[1u8; 512]), S_OK);
    while d.vectors[0].read().is_ok() {}
    // One write took descriptors 0-2 of the first lap. Every descriptor
    // now says NEXT and looks available for that lap: a chain with no end.
    let desc = d.packed[0].desc;
    for i in 0..8u64 {
        vub_testkit::driver_ring::PackedRing::write_raw(
            &d.mem,
            desc + 16 * i,
            0x100000,
            16,
            0,
            1 | 1 << 7,
        );
    }
    d.force_kick(0);
    wait_until("NEEDS_RESET", || d.status() & 0x40 != 0);
    wait_until("the configuration interrupt", || {
        d.vectors[0].read().is_ok()
    });
    let log = srv.log_text();
    assert!(log.contains("longer than the queue"), "{log}");
    d.reset();
    d.init_modern(0, Some(8)).unwrap();
    assert_eq!(d.read(0, 0, 512), (S_OK, vec![1u8; 512]));
    srv.assert_healthy();
}
