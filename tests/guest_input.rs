//! Malformed guest input and lifecycle events with I/O in flight. Every
//! test ends by showing the server still serves a new client.

mod support;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use support::driver::*;
use support::*;
use vm_memory::Bytes;

const MB: u64 = 1 << 20;

fn wait_log(srv: &ServerProcess, needle: &str) {
    wait_until(&format!("log line '{needle}'"), || {
        srv.log_text().contains(needle)
    });
}

#[test]
fn descriptor_loop_breaks_the_queue_until_reset() {
    let (mut srv, _img, mut d) = image_driver(4 * MB, &[]);
    let h = d.header_buf(T_IN, 0);
    d.raw_desc(0, 0, h, 16, DESC_F_NEXT, 1);
    d.raw_desc(0, 1, h, 16, DESC_F_NEXT, 0);
    d.publish(0, 0);
    d.force_kick(0);
    wait_log(&srv, "is broken");
    assert!(srv.log_text().contains("loops"));
    // The broken queue takes no more requests...
    let before = d.used_idx(0);
    d.reset_alloc();
    let s = d.submit(
        0,
        &Request {
            kind: T_GET_ID,
            sector: 0,
            out: vec![],
            in_len: 20,
            layout: Layout::default(),
        },
    );
    d.force_kick(0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(d.used_idx(0), before);
    let _ = s;
    // ...until the driver resets the device and sets it up again.
    d.reset();
    d.init(0);
    assert_eq!(d.write(0, 8, &[1u8; 512]), S_OK);
    drop(d);
    serves_again(&mut srv);
}

#[test]
fn chain_without_a_writable_status_byte_is_not_executed() {
    let (mut srv, img, mut d) = image_driver(4 * MB, &[]);
    let h = d.header_buf(T_OUT, 0);
    let data = d.alloc(512);
    d.mem
        .write_slice(&[0x42u8; 512], vm_memory::GuestAddress(data))
        .unwrap();
    let head = d.place(0, &[(h, 16, false), (data, 512, false)], false);
    d.force_kick(0);
    let used = d.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used, vec![(head, 0)]);
    let mut b = [0u8; 512];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut b, 0)
        .unwrap();
    assert_eq!(b, [0u8; 512], "the write was not executed");
    assert!(srv.log_text().contains("no status byte"));
    // The queue goes on.
    assert_eq!(d.write(0, 0, &[1u8; 512]), S_OK);
    drop(d);
    serves_again(&mut srv);
}

#[test]
fn short_header_and_addresses_outside_memory_answer_ioerr() {
    let (mut srv, img, mut d) = image_driver(4 * MB, &[]);
    // Header of 8 bytes.
    let h = d.header_buf(T_OUT, 0);
    let st = d.alloc(1);
    d.place(0, &[(h, 8, false), (st, 1, true)], false);
    d.force_kick(0);
    d.wait_used(0, 1, Duration::from_secs(10));
    let status: u8 = Bytes::read_obj(&d.mem, vm_memory::GuestAddress(st)).unwrap();
    assert_eq!(status, S_IOERR);
    // Data far outside guest memory, for a write and for a read.
    for (kind, w) in [(T_OUT, false), (T_IN, true)] {
        let h = d.header_buf(kind, 0);
        let st = d.alloc(1);
        d.place(
            0,
            &[(h, 16, false), (0x7fff_0000_0000, 4096, w), (st, 1, true)],
            false,
        );
        d.force_kick(0);
        d.wait_used(0, 1, Duration::from_secs(10));
        let status: u8 = Bytes::read_obj(&d.mem, vm_memory::GuestAddress(st)).unwrap();
        assert_eq!(status, S_IOERR);
    }
    // A buffer that starts inside guest memory and runs past its end.
    let h = d.header_buf(T_IN, 0);
    let st = d.alloc(1);
    d.place(
        0,
        &[
            (h, 16, false),
            (d.ram_size - 512, 4096, true),
            (st, 1, true),
        ],
        false,
    );
    d.force_kick(0);
    d.wait_used(0, 1, Duration::from_secs(10));
    let status: u8 = Bytes::read_obj(&d.mem, vm_memory::GuestAddress(st)).unwrap();
    assert_eq!(status, S_IOERR);
    assert!(srv.log_text().contains("outside guest memory"));
    let mut b = [0u8; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut b, 0)
        .unwrap();
    assert_eq!(b, [0u8; 4096]);
    drop(d);
    serves_again(&mut srv);
}

#[test]
fn a_buffer_spanning_two_dma_windows_works() {
    let (mut srv, img) = image_server("gi", 4 * MB, &[]);
    let mut d = Driver::new(&srv.socket, DriverOptions::split_dma());
    let half = d.ram_size / 2;
    let data = pattern(9, 8192);
    // Place the data buffer across the boundary between the two windows.
    let h = d.header_buf(T_OUT, 16);
    let st = d.alloc(1);
    let buf = half - 4096;
    d.mem
        .write_slice(&data, vm_memory::GuestAddress(buf))
        .unwrap();
    d.place(
        0,
        &[(h, 16, false), (buf, 8192, false), (st, 1, true)],
        false,
    );
    d.force_kick(0);
    d.wait_used(0, 1, Duration::from_secs(10));
    let status: u8 = Bytes::read_obj(&d.mem, vm_memory::GuestAddress(st)).unwrap();
    assert_eq!(status, S_OK);
    let mut b = vec![0u8; 8192];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut b, 16 * 512)
        .unwrap();
    assert_eq!(b, data);
    // And read back into a spanning buffer.
    d.mem
        .write_slice(&vec![0u8; 8192], vm_memory::GuestAddress(buf))
        .unwrap();
    let h = d.header_buf(T_IN, 16);
    let st = d.alloc(1);
    d.place(
        0,
        &[(h, 16, false), (buf, 8192, true), (st, 1, true)],
        false,
    );
    d.force_kick(0);
    d.wait_used(0, 1, Duration::from_secs(10));
    let mut got = vec![0u8; 8192];
    d.mem
        .read_slice(&mut got, vm_memory::GuestAddress(buf))
        .unwrap();
    assert_eq!(got, data);
    drop(d);
    serves_again(&mut srv);
}

#[test]
fn avail_index_running_ahead_breaks_the_queue() {
    let (mut srv, _img, mut d) = image_driver(4 * MB, &[]);
    let size = d.queues[0].size;
    let idx = d.avail_idx(0);
    d.set_avail_idx(0, idx.wrapping_add(size + 1));
    d.force_kick(0);
    wait_log(&srv, "is broken");
    drop(d);
    serves_again(&mut srv);
}

#[test]
fn a_head_reused_while_in_flight_breaks_the_queue() {
    let (mut srv, _img, mut d) = image_driver(4 * MB, &["--poll-mode", "interrupt"]);
    let s = d.submit(0, &Request::write(0, &vec![1u8; 65536]));
    d.publish(0, s.head); // the same head again, before it completed
    d.force_kick(0);
    wait_log(&srv, "reused while in flight");
    drop(d);
    serves_again(&mut srv);
}

#[test]
fn rings_outside_guest_memory_are_waited_for_not_served() {
    let (mut srv, _img, mut d) = image_driver(4 * MB, &[]);
    d.reset();
    // Queue 0 at a page frame far outside the 64 MiB of guest RAM.
    d.c.region_write(0, 14, &0u16.to_le_bytes()).unwrap();
    d.c.region_write(0, 8, &0x0fff_0000u32.to_le_bytes())
        .unwrap();
    d.c.region_write(0, 18, &[7]).unwrap();
    wait_log(&srv, "ring is not inside guest memory; waiting");
    drop(d);
    serves_again(&mut srv);
}

/// Submits `n` large writes (indirect) and kicks; returns when queued.
#[test]
fn device_reset_with_io_in_flight() {
    let (mut srv, mut d) = flooded(&["--io-threads", "1", "--poll-mode", "interrupt"]);
    let t = Instant::now();
    d.reset();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "reset answered within QEMU's timeout"
    );
    used_is_stable(&d);
    d.reset_alloc();
    d.init(0);
    assert_eq!(d.write(0, 0, &[5u8; 512]), S_OK);
    drop(d);
    serves_again(&mut srv);
}

#[test]
fn client_disconnect_with_io_in_flight_then_a_new_client() {
    let (mut srv, d) = flooded(&["--io-threads", "1"]);
    d.c.shutdown().unwrap();
    drop(d);
    serves_again(&mut srv);
}

#[test]
fn backend_errors_answer_ioerr_or_stop_the_queue() {
    for (policy, stops) in [("report", false), ("stop", true)] {
        let (mut srv, img, mut d) = image_driver(4 * MB, &["--on-error", policy]);
        // Shrink the image under the server: reads past the new end are short.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(MB)
            .unwrap();
        if stops {
            let s = d.submit(0, &Request::read(4096, 4096));
            d.force_kick(0);
            wait_log(&srv, "--on-error stop");
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(d.used_idx(0), 0, "the failed request is held, not answered");
            let _ = s;
            d.reset();
            d.reset_alloc();
            d.init(0);
            assert_eq!(d.read(0, 0, 512).0, S_OK);
        } else {
            assert_eq!(d.read(0, 4096, 4096).0, S_IOERR);
            assert!(srv.log_text().contains("backend error"));
            assert_eq!(d.read(0, 0, 512).0, S_OK, "the queue goes on");
        }
        drop(d);
        serves_again(&mut srv);
    }
}

/// Regression: buffers whose address plus length wraps past 2^64 must be
/// refused, not wrapped around to low guest addresses (nor panic).
#[test]
fn buffers_that_wrap_the_address_space_are_refused() {
    let (mut srv, img, mut d) = image_driver(4 * MB, &[]);
    // A status byte that would sit at a wrapped address: the chain has no
    // usable status byte, so nothing is executed and nothing is written.
    let low: Vec<u8> = {
        let mut b = vec![0u8; 64];
        d.mem
            .read_slice(&mut b, vm_memory::GuestAddress(0))
            .unwrap();
        b
    };
    let h = d.header_buf(T_OUT, 0);
    let data = d.alloc(512);
    d.mem
        .write_slice(&[7u8; 512], vm_memory::GuestAddress(data))
        .unwrap();
    let head = d.place(
        0,
        &[(h, 16, false), (data, 512, false), (u64::MAX - 7, 16, true)],
        false,
    );
    d.force_kick(0);
    assert_eq!(d.wait_used(0, 1, Duration::from_secs(10)), vec![(head, 0)]);
    // Data buffers that wrap answer IOERR, for reads and writes.
    for (kind, w) in [(T_OUT, false), (T_IN, true)] {
        let h = d.header_buf(kind, 0);
        let st = d.alloc(1);
        d.place(
            0,
            &[(h, 16, false), (u64::MAX - 255, 512, w), (st, 1, true)],
            false,
        );
        d.force_kick(0);
        d.wait_used(0, 1, Duration::from_secs(10));
        let status: u8 = Bytes::read_obj(&d.mem, vm_memory::GuestAddress(st)).unwrap();
        assert_eq!(status, S_IOERR);
    }
    let mut after = vec![0u8; 64];
    d.mem
        .read_slice(&mut after, vm_memory::GuestAddress(0))
        .unwrap();
    assert_eq!(after, low, "nothing written at a wrapped-around address");
    let mut b = [0u8; 512];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut b, 0)
        .unwrap();
    assert_eq!(b, [0u8; 512], "nothing written to the disk");
    drop(d);
    serves_again(&mut srv);
}
