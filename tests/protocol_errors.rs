//! Malformed messages over a raw socket, one class per test. Each ends by
//! showing the server still serves: a fresh connection through rust-vmm's
//! client must work.

mod support;

use std::os::fd::AsRawFd;
use std::time::Duration;

use support::*;
use vfio_bindings::bindings::vfio::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const EINVAL: u32 = 22;

fn assert_error(r: &Reply, errno: u32) {
    assert_eq!(r.flags, REPLY | ERROR, "{r:?}");
    assert_eq!(r.error, errno, "{r:?}");
    assert!(r.payload.is_empty(), "error replies are header-only");
}

/// Proves the stream is still in sync: a config read on the same connection.
fn still_in_sync(raw: &mut Raw) {
    let r = raw.call(9, &region_read_payload(7, 0, 4));
    assert_eq!(r.flags, REPLY, "{r:?}");
    assert_eq!(&r.payload[16..20], &0x1001_1af4u32.to_le_bytes());
}

fn server() -> ServerProcess {
    ServerProcess::start(&["--disk", "null:1G"])
}

#[test]
fn truncated_header_then_close() {
    let mut srv = server();
    let mut raw = Raw::connect(&srv.socket);
    raw.send(&header(1, 1, 64, 0)[..9]);
    drop(raw);
    fresh_client_works(&srv.socket);
    srv.assert_alive();
}

#[test]
fn message_smaller_than_a_header_closes_the_connection() {
    let mut srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    raw.send(&header(7, 4, 8, 0));
    assert!(raw.closed_by_peer());
    fresh_client_works(&srv.socket);
    srv.assert_alive();
}

#[test]
fn oversize_message_is_refused_before_allocation() {
    let mut srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    raw.send(&header(7, 10, 0xffff_fff0, 0));
    assert!(raw.closed_by_peer());
    assert!(srv.log_text().contains("claims size"));
    fresh_client_works(&srv.socket);
    srv.assert_alive();
}

#[test]
fn truncated_payload_then_close() {
    let mut srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    let mut m = header(7, 10, 16 + 16 + 4, 0);
    m.extend_from_slice(&region_read_payload(7, 0, 4)[..10]);
    raw.send(&m);
    drop(raw);
    fresh_client_works(&srv.socket);
    srv.assert_alive();
}

#[test]
fn unknown_command_gets_enosys_and_its_payload_is_consumed() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    let r = raw.call(99, &[0xaa; 100]);
    assert_error(&r, libc::ENOSYS as u32);
    // Commands the server does not implement: ENOTSUP, also consumed.
    for cmd in [6u16, 11, 12, 14, 16, 17, 18] {
        let r = raw.call(cmd, &[0x55; 40]);
        assert_error(&r, libc::ENOTSUP as u32);
    }
    still_in_sync(&mut raw);
    drop(raw);
    fresh_client_works(&srv.socket);
}

#[test]
fn a_reply_sent_as_a_request_is_discarded() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    raw.send(&message(55, 9, REPLY, &region_read_payload(7, 0, 4)));
    // The next reply must be for the next request, not for the stray reply.
    still_in_sync(&mut raw);
    assert!(srv.log_text().contains("unexpected reply"));
}

#[test]
fn invalid_message_type_closes_the_connection() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    raw.send(&message(55, 9, 0x7, &region_read_payload(7, 0, 4)));
    assert!(raw.closed_by_peer());
    fresh_client_works(&srv.socket);
}

#[test]
fn no_reply_request_is_never_answered_even_on_error() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    raw.send(&message(60, 99, NO_REPLY, &[1, 2, 3]));
    raw.send(&message(61, 9, NO_REPLY, &region_read_payload(7, 0, 4)));
    raw.send(&message(
        62,
        9,
        NO_REPLY,
        &region_read_payload(7, 0x1000, 4),
    ));
    // A posted write takes effect without a reply.
    let mut w = region_read_payload(7, 0x3c, 1);
    w.push(0x5a);
    raw.send(&message(63, 10, NO_REPLY, &w));
    let r = raw.call(9, &region_read_payload(7, 0x3c, 1));
    assert_eq!(r.payload[16], 0x5a);
}

#[test]
fn requests_before_version_and_bad_versions_are_refused() {
    let srv = server();
    let mut raw = Raw::connect(&srv.socket);
    let r = raw.call(9, &region_read_payload(7, 0, 4));
    assert_error(&r, EINVAL);
    // Major version 1 is not ours: refused, connection closed.
    let r = raw.call(1, &[1, 0, 0, 0, b'{', b'}', 0]);
    assert_error(&r, EINVAL);
    assert!(raw.closed_by_peer());
    // Broken JSON.
    let mut raw = Raw::connect(&srv.socket);
    let r = raw.call(1, b"\0\0\0\0{\"capabilities\":\0");
    assert_error(&r, EINVAL);
    // A known capability of the wrong type.
    let mut raw = Raw::connect(&srv.socket);
    let r = raw.call(
        1,
        b"\0\0\0\0{\"capabilities\":{\"max_msg_fds\":\"many\"}}\0",
    );
    assert_error(&r, EINVAL);
    // Short payload.
    let mut raw = Raw::connect(&srv.socket);
    let r = raw.call(1, &[0, 0]);
    assert_error(&r, EINVAL);
    assert!(raw.closed_by_peer());
    fresh_client_works(&srv.socket);
}

#[test]
fn version_reply_only_lowers_what_the_client_offered() {
    let srv = server();
    let mut raw = Raw::connect(&srv.socket);
    let r = raw.call(
        1,
        b"\0\0\x05\0{\"capabilities\":{\"max_msg_fds\":4,\"max_data_xfer_size\":8192,\"max_dma_maps\":10,\"pgsizes\":12288}}\0",
    );
    assert_eq!(r.flags, REPLY);
    assert_eq!(&r.payload[..4], &[0, 0, 0, 0], "version 0.0");
    assert_eq!(*r.payload.last().unwrap(), 0, "NUL-terminated");
    let json: serde_json::Value =
        serde_json::from_slice(&r.payload[4..r.payload.len() - 1]).unwrap();
    let caps = &json["capabilities"];
    assert_eq!(caps["max_msg_fds"], 4);
    assert_eq!(caps["max_data_xfer_size"], 8192);
    assert_eq!(caps["max_dma_maps"], 10);
    assert_eq!(caps["pgsizes"], 4096);
    assert!(r.payload.len() < 150, "fits QEMU's reply buffer");
    // The lowered transfer size is enforced.
    let r = raw.call(9, &region_read_payload(7, 0, 8193));
    assert_error(&r, EINVAL);
    let r = raw.call(1, b"\0\0\0\0{}\0");
    assert_error(&r, EINVAL); // VERSION twice
}

#[test]
fn region_accesses_out_of_range() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    for (region, off, count) in [
        (7u32, 250u64, 8u32), // past the end of config space
        (7, u64::MAX - 1, 4), // offset + count wraps
        (2, 0, 4),            // absent BAR
        (9, 0, 4),            // no such region
        (0, 0x80, 1),         // just past BAR0
        (1, 0, 2 << 20),      // larger than max_data_xfer_size
    ] {
        let r = raw.call(9, &region_read_payload(region, off, count));
        assert_error(&r, EINVAL);
    }
    // Write whose count disagrees with its data.
    let mut w = region_read_payload(7, 0x3c, 4);
    w.push(1);
    assert_error(&raw.call(10, &w), EINVAL);
    // Short region access payload.
    assert_error(&raw.call(9, &[0u8; 12]), EINVAL);
    still_in_sync(&mut raw);
}

#[test]
fn info_queries_with_bad_arguments() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    // GET_REGION_INFO: argsz below the struct, index out of range, short payload.
    let ri = |argsz: u32, index: u32| {
        let mut p = vec![0u8; 32];
        p[0..4].copy_from_slice(&argsz.to_le_bytes());
        p[8..12].copy_from_slice(&index.to_le_bytes());
        p
    };
    assert_error(&raw.call(5, &ri(16, 0)), EINVAL);
    assert_error(&raw.call(5, &ri(32, 9)), EINVAL);
    assert_error(&raw.call(5, &ri(32, 0)[..20]), EINVAL);
    let ok = raw.call(5, &ri(4096, 7));
    assert_eq!(ok.payload.len(), 32, "never more than the struct");
    assert_eq!(
        u64::from_le_bytes(ok.payload[16..24].try_into().unwrap()),
        256
    );
    // GET_IRQ_INFO: index out of range.
    let mut p = vec![0u8; 16];
    p[0..4].copy_from_slice(&16u32.to_le_bytes());
    p[8..12].copy_from_slice(&5u32.to_le_bytes());
    assert_error(&raw.call(7, &p), EINVAL);
    // GET_INFO with argsz too small.
    assert_error(
        &raw.call(4, &[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        EINVAL,
    );
    still_in_sync(&mut raw);
}

fn irq_set(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    let mut p = Vec::new();
    for v in [20u32, flags, index, start, count] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

#[test]
fn set_irqs_validation() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    let trig = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    let efd = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_error(&raw.call(8, &irq_set(trig, 5, 0, 1)), EINVAL); // no such index
    assert_error(&raw.call(8, &irq_set(trig, 2, 1, u32::MAX)), EINVAL); // wraps
    assert_error(&raw.call(8, &irq_set(trig, 2, 0, 3)), EINVAL); // past 2 vectors
    assert_error(&raw.call(8, &irq_set(0, 2, 0, 1)), EINVAL); // no action, no data
    assert_error(&raw.call(8, &irq_set(0x3 | 0x20, 2, 0, 1)), EINVAL); // two data kinds
    assert_error(&raw.call(8, &irq_set(0x1 | 0x30, 2, 0, 1)), EINVAL); // two actions
    assert_error(&raw.call(8, &irq_set(0x1 | 0x40, 2, 0, 1)), EINVAL); // unknown bit
                                                                       // DATA_BOOL with the wrong number of bytes.
    let mut b = irq_set(
        VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
        2,
        0,
        2,
    );
    b.push(1);
    assert_error(&raw.call(8, &b), EINVAL);
    // One eventfd for two vectors.
    let e = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_error(
        &raw.call_fds(8, &irq_set(efd, 2, 0, 2), &[e.as_raw_fd()]),
        EINVAL,
    );
    // ERR takes only a trigger eventfd; MASK on it is refused.
    assert_error(
        &raw.call(
            8,
            &irq_set(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK, 3, 0, 1),
        ),
        EINVAL,
    );
    // The accepted forms QEMU sends.
    assert_eq!(raw.call(8, &irq_set(trig, 2, 0, 0)).flags, REPLY);
    assert_eq!(raw.call(8, &irq_set(efd, 2, 0, 1)).flags, REPLY);
    assert_eq!(
        raw.call_fds(8, &irq_set(efd, 3, 0, 1), &[e.as_raw_fd()])
            .flags,
        REPLY
    );
    assert_eq!(raw.call(8, &irq_set(trig, 1, 0, 0)).flags, REPLY); // MSI teardown
                                                                   // MSI-X mask/unmask take no eventfds.
    assert_error(
        &raw.call_fds(
            8,
            &irq_set(
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_MASK,
                2,
                0,
                1,
            ),
            &[e.as_raw_fd()],
        ),
        EINVAL,
    );
    still_in_sync(&mut raw);
}

#[test]
fn intx_mask_unmask_and_resample_eventfd_are_accepted() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    let base = srv.open_fds();
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    let efd = VFIO_IRQ_SET_DATA_EVENTFD;
    let none = VFIO_IRQ_SET_DATA_NONE;
    // The KVM sequence QEMU sends for INTx.
    for (flags, fds) in [
        (efd | VFIO_IRQ_SET_ACTION_TRIGGER, vec![trigger.as_raw_fd()]),
        (none | VFIO_IRQ_SET_ACTION_MASK, vec![]),
        (efd | VFIO_IRQ_SET_ACTION_UNMASK, vec![resample.as_raw_fd()]),
        (none | VFIO_IRQ_SET_ACTION_UNMASK, vec![]),
    ] {
        assert_eq!(raw.call_fds(8, &irq_set(flags, 0, 0, 1), &fds).flags, REPLY);
    }
    // The trigger fd is kept, the resample fd is closed.
    assert_eq!(srv.open_fds(), base + 1);
    // A software trigger reaches the trigger eventfd.
    let r = raw.call(8, &irq_set(none | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, 1));
    assert_eq!(r.flags, REPLY);
    assert_eq!(trigger.read().unwrap(), 1);
    // Teardown drops it.
    assert_eq!(
        raw.call(8, &irq_set(none | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, 0))
            .flags,
        REPLY
    );
    assert_eq!(srv.open_fds(), base);
    still_in_sync(&mut raw);
}

#[test]
fn dma_errors() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    let map = |iova: u64, size: u64, flags: u32| {
        let mut p = Vec::new();
        p.extend_from_slice(&32u32.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&iova.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p
    };
    let unmap = |iova: u64, size: u64, flags: u32| {
        let mut p = Vec::new();
        p.extend_from_slice(&24u32.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&iova.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p
    };
    let f = vfio_user_blk::util::memfd("g").unwrap();
    f.set_len(0x4000).unwrap();
    let fd = f.as_raw_fd();
    assert_eq!(
        raw.call_fds(2, &map(0x10000, 0x4000, 3), &[fd]).flags,
        REPLY
    );
    assert_error(
        &raw.call_fds(2, &map(0x12000, 0x4000, 3), &[fd]),
        libc::EEXIST as u32,
    );
    assert_error(
        &raw.call_fds(2, &map(0x20000, 0x4000, 3), &[fd, fd]),
        EINVAL,
    );
    assert_error(&raw.call(2, &map(0x20000, 0, 3)), EINVAL);
    assert_error(&raw.call(2, &map(!0xfff, 0x2000, 3)), EINVAL);
    assert_error(&raw.call(2, &map(0x20000, 0x1000, 0x100)), EINVAL);
    assert_error(&raw.call(2, &map(0x20000, 0x1000, 3)[..24]), EINVAL);
    // Without an fd: accepted (ROM, or RAM QEMU cannot share).
    assert_eq!(raw.call(2, &map(0xfffc0000, 0x40000, 1)).flags, REPLY);
    assert_error(
        &raw.call(3, &unmap(0x10000, 0x2000, 0)),
        libc::ENOENT as u32,
    );
    assert_error(
        &raw.call(3, &unmap(0x10000, 0x4000, 1)),
        libc::ENOTSUP as u32,
    );
    assert_error(&raw.call(3, &unmap(0x10000, 0x4000, 2)), EINVAL); // ALL with a range
    let r = raw.call(3, &unmap(0x10000, 0x4000, 0));
    assert_eq!(r.flags, REPLY);
    assert_eq!(
        r.payload,
        unmap(0x10000, 0x4000, 0),
        "unmap reply echoes the request"
    );
    assert_eq!(raw.call(3, &unmap(0, 0, 2)).flags, REPLY);
    assert_eq!(
        raw.call_fds(2, &map(0x10000, 0x4000, 3), &[fd]).flags,
        REPLY
    );
    still_in_sync(&mut raw);
}

#[test]
fn descriptors_sent_with_rejected_requests_are_closed() {
    let srv = server();
    let mut raw = Raw::negotiated(&srv.socket);
    let base = srv.open_fds();
    let efds: Vec<EventFd> = (0..10)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let raws: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    // Descriptors on a command that takes none.
    assert_error(
        &raw.call_fds(9, &region_read_payload(7, 0, 4), &raws[..3]),
        EINVAL,
    );
    // More descriptors than max_msg_fds.
    assert_error(
        &raw.call_fds(
            8,
            &irq_set(
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                2,
                0,
                2,
            ),
            &raws,
        ),
        EINVAL,
    );
    // An unknown command carrying descriptors.
    assert_error(&raw.call_fds(99, &[0; 8], &raws[..2]), EINVAL);
    // A valid SET_IRQS whose range is wrong.
    assert_error(
        &raw.call_fds(
            8,
            &irq_set(
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                2,
                1,
                2,
            ),
            &raws[..2],
        ),
        EINVAL,
    );
    // A DMA_MAP that is refused.
    let mut p = Vec::new();
    p.extend_from_slice(&32u32.to_le_bytes());
    p.extend_from_slice(&3u32.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&0x800u64.to_le_bytes()); // misaligned
    p.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_error(&raw.call_fds(2, &p, &raws[..1]), EINVAL);
    still_in_sync(&mut raw);
    assert_eq!(srv.open_fds(), base, "every received descriptor was closed");
    // A reply-typed message with descriptors: discarded, descriptors closed.
    raw.send_fds(
        &message(5, 9, REPLY, &region_read_payload(7, 0, 4)),
        &raws[..2],
    );
    still_in_sync(&mut raw);
    assert_eq!(srv.open_fds(), base);
}

#[test]
fn a_second_concurrent_client_is_turned_away_and_the_first_keeps_working() {
    let srv = server();
    let mut first = Raw::negotiated(&srv.socket);
    let mut second = Raw::connect(&srv.socket);
    second
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(second.closed_by_peer());
    still_in_sync(&mut first);
    drop(first);
    fresh_client_works(&srv.socket);
}
