//! A hostile client and a hostile guest (issue 8): each test holds the raw
//! input of one bug that crashed, wedged or bloated the server, and shows
//! the server still serves afterwards.
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::os::fd::AsRawFd;
use std::time::Duration;

use support::driver::*;
use support::*;
use vfio_bindings::bindings::vfio::*;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

const MB: u64 = 1 << 20;
const EINVAL: u32 = 22;

/// SET_IRQS: trigger MSI-X vector `start` (one) on the eventfd sent with it.
fn msix_trigger_payload(start: u32) -> Vec<u8> {
    let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    [20, flags, VFIO_PCI_MSIX_IRQ_INDEX, start, 1]
        .iter()
        .flat_map(|w: &u32| w.to_le_bytes())
        .collect()
}

fn dma_map_payload(iova: u64, size: u64, offset: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&32u32.to_le_bytes());
    p.extend_from_slice(&(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE).to_le_bytes());
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&iova.to_le_bytes());
    p.extend_from_slice(&size.to_le_bytes());
    p
}

/// Bug 1: DMA_MAP of 16 MiB from a 4 KiB memfd was accepted, and a ring
/// placed there killed the server with SIGBUS at DRIVER_OK. Now the map is
/// refused with EINVAL and a log line, before anything is mapped.
#[test]
fn dma_window_past_the_end_of_its_file_is_refused() {
    let (mut srv, _img) = image_server("hostile", MB, &[]);
    let mut raw = Raw::negotiated(&srv.socket);
    let f = vfio_user_blk::util::memfd("small").unwrap();
    f.set_len(4096).unwrap();
    let r = raw.call_fds(2, &dma_map_payload(0, 16 * MB, 0), &[f.as_raw_fd()]);
    assert_eq!(r.flags & ERROR, ERROR, "{r:?}");
    assert_eq!(r.error, EINVAL);
    assert!(srv.log_text().contains("past the end of its file"));
    // The ring the bug placed there: legacy queue 0 at pfn 1, DRIVER_OK.
    let bar0 = |off: u64, data: &[u8]| {
        let mut p = region_read_payload(VFIO_PCI_BAR0_REGION_INDEX, off, data.len() as u32);
        p.extend_from_slice(data);
        p
    };
    raw.call(10, &bar0(18, &[1]));
    raw.call(10, &bar0(18, &[3]));
    raw.call(10, &bar0(8, &1u32.to_le_bytes()));
    raw.call(10, &bar0(18, &[7]));
    raw.call(10, &bar0(16, &0u16.to_le_bytes()));
    std::thread::sleep(Duration::from_millis(200));
    srv.assert_alive();
    drop(raw);
    serves_again(&mut srv);
}

/// Bug 1, the later half: guest memory that shrinks after it was mapped
/// (a memfd that takes no seals, truncated by the client) used to kill the
/// server with SIGBUS on the poller's next look at the ring. The pages that
/// vanished now read as zeros and the server says so.
#[test]
fn guest_memory_truncated_under_a_busy_poller_does_not_kill_the_server() {
    let (mut srv, _img) = image_server("hostile", 4 * MB, &["--poll-mode", "busy"]);
    let mut d = Driver::new(
        &srv.socket,
        DriverOptions {
            ram_size: 4 * MB,
            ..Default::default()
        },
    );
    assert_eq!(d.write(0, 0, &[1u8; 512]), S_OK);
    // The rings live in the first MiB; cut everything, rings included.
    d.ram.set_len(0).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    survived_the_cut(&mut srv, d);
}

/// Bug 1 with `--direct`: a misaligned guest buffer goes through the bounce
/// buffer, whose copy from guest memory used to die of SIGBUS when the
/// buffer lay past the end of the (shrunk) guest-memory file.
#[test]
fn direct_bounce_from_truncated_guest_memory_does_not_kill_the_server() {
    let (mut srv, _img) =
        image_server("hostile", 4 * MB, &["--direct", "--poll-mode", "interrupt"]);
    let mut d = Driver::new(
        &srv.socket,
        DriverOptions {
            ram_size: 4 * MB,
            ..Default::default()
        },
    );
    // Header at BUF_BASE, data 16 bytes further: misaligned for O_DIRECT.
    let s = d.submit(0, &Request::write(0, &vec![9u8; 4096]));
    // Buffers start at 1 MiB; keep the rings, cut the buffers, then kick.
    d.ram.set_len(MB).unwrap();
    d.force_kick(0);
    let used = d.wait_used(0, 1, Duration::from_secs(10));
    assert_eq!(used[0].0, s.head);
    survived_the_cut(&mut srv, d);
}

/// Bug 2: a blocking eventfd whose counter is at its maximum wedged the
/// poller on the first interrupt, forever. Interrupt descriptors are now
/// made non-blocking, and a full counter counts as "already signalled".
#[test]
fn a_blocking_eventfd_at_its_maximum_does_not_wedge_the_server() {
    let (mut srv, _img, mut d) = image_driver(4 * MB, &[]);
    let hostile = EventFd::new(0).unwrap();
    hostile.write(0xffff_ffff_ffff_fffe).unwrap();
    let fds: Vec<i32> = std::iter::repeat_n(hostile.as_raw_fd(), d.vectors.len()).collect();
    d.c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        fds.len() as u32,
        &fds,
    )
    .unwrap();
    for i in 0..4u8 {
        assert_eq!(d.write(0, u64::from(i), &[i; 512]), S_OK, "request {i}");
    }
    // The protocol thread answers too.
    assert!(d.capacity() > 0);
    drop(d);
    serves_again(&mut srv);
}

/// Bug 2: a pipe (which a full buffer would block) or a socket given as an
/// interrupt descriptor is refused with EINVAL.
#[test]
fn interrupt_descriptors_that_are_not_eventfds_are_refused() {
    let (mut srv, _img) = image_server("hostile", MB, &[]);
    let mut raw = Raw::negotiated(&srv.socket);
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    for fd in [fds[1], a.as_raw_fd()] {
        let p = msix_trigger_payload(0);
        let r = raw.call_fds(8, &p, &[fd]);
        assert_eq!((r.flags & ERROR, r.error), (ERROR, EINVAL), "{r:?}");
    }
    // SAFETY: closing the pipe we made.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert!(srv.log_text().contains("not an eventfd"));
    drop(raw);
    serves_again(&mut srv);
}

/// Bug 4: the guest sized our allocations. Chains of 64 descriptors of
/// 1 MiB (a 64 MiB request) with misaligned buffers made `--direct` bounce
/// the whole request through one allocation, per request in flight, and an
/// indirect table of 65,535 descriptors cost megabytes of vectors. With
/// seg_max/size_max enforced, tables capped at the queue size and a
/// fixed-size bounce buffer, the server's peak memory stays flat.
#[test]
fn maximal_chains_do_not_grow_the_servers_memory() {
    let (mut srv, _img) = image_server(
        "hostile",
        512 * MB,
        &["--direct", "--io-threads", "4", "--poll-mode", "busy"],
    );
    let mut d = Driver::new(
        &srv.socket,
        DriverOptions {
            ram_size: 64 * MB,
            ..Default::default()
        },
    );
    // Warm up: the pool threads exist and have bounced once.
    for _ in 0..4 {
        assert_eq!(d.read(0, 1, 4096).0, S_OK);
    }
    let pid = srv.pid();
    let before = proc_status(pid, "VmHWM:").expect("a field of /proc/PID/status");

    // One 1 MiB data buffer at an odd 16-byte offset, shared by every
    // descriptor: the guest memory the server touches stays small.
    d.set_alloc(2 * MB);
    let data = d.alloc(MB as usize + 16) + 16;
    let mut heads = Vec::new();
    for i in 0..8u64 {
        let h = d.header_buf(T_IN, i * 128 * 1024);
        let st = d.alloc(1);
        let mut bufs = vec![(h, 16, false)];
        bufs.extend(std::iter::repeat_n((data, MB as u32, true), 64));
        bufs.push((st, 1, true));
        heads.push((d.place(0, &bufs, true), st, S_OK));
    }
    // Indirect tables of 65,535 descriptors: refused without being read
    // past the queue size (nothing written, used length 0).
    for _ in 0..4 {
        let h = d.header_buf(T_IN, 0);
        let mut bufs = vec![(h, 16, false)];
        bufs.extend(std::iter::repeat_n((data, 512, true), 65_534));
        heads.push((d.place(0, &bufs, true), 0, 0));
    }
    // A segment over size_max: IOERR. (With the default queue size,
    // seg_max + 2 is the queue size: longer chains are the case above.)
    let h = d.header_buf(T_IN, 0);
    let st = d.alloc(1);
    let bufs = vec![(h, 16, false), (data, 2 * MB as u32, true), (st, 1, true)];
    heads.push((d.place(0, &bufs, true), st, S_IOERR));
    d.force_kick(0);
    let used = d.wait_used(0, heads.len(), Duration::from_secs(60));
    let after = proc_status(pid, "VmHWM:").expect("a field of /proc/PID/status");
    let grown = after.saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "peak memory grew by {grown} KiB serving maximal chains"
    );
    for (head, st, want) in &heads {
        let (_, len) = used.iter().find(|u| u.0 == *head).expect("completed");
        if *st == 0 {
            assert_eq!(*len, 0, "an oversized table is returned untouched");
        } else {
            let got: u8 = d.mem.read_obj(vm_memory::GuestAddress(*st)).unwrap();
            assert_eq!(got, *want, "head {head}");
        }
    }
    assert!(srv.log_text().contains("longer than the queue"));
    drop(d);
    serves_again(&mut srv);
}

/// 10,000 malformed requests of every kind, some carrying descriptors: the
/// server's resident memory and descriptor count stay flat.
#[test]
fn ten_thousand_malformed_requests_leave_memory_and_descriptors_flat() {
    let (mut srv, _img) = image_server("hostile", MB, &[]);
    let pid = srv.pid();
    let memfd = vfio_user_blk::util::memfd("m").unwrap();
    memfd.set_len(4096).unwrap();
    let efd = EventFd::new(0).unwrap();
    let round = |raw: &mut Raw, i: u32| {
        match i % 8 {
            // Unknown command with a payload.
            0 => {
                let r = raw.call(40 + (i % 7) as u16, &[0u8; 64]);
                assert_eq!(r.flags & ERROR, ERROR);
            }
            // DMA_MAP past the end of its file, with a descriptor.
            1 => {
                let r = raw.call_fds(2, &dma_map_payload(0, 2 * MB, 0), &[memfd.as_raw_fd()]);
                assert_eq!(r.error, EINVAL);
            }
            // SET_IRQS with a descriptor for a sub-index that does not exist.
            2 => {
                let p = msix_trigger_payload(1000);
                let r = raw.call_fds(8, &p, &[efd.as_raw_fd()]);
                assert_eq!(r.error, EINVAL);
            }
            // Region access out of range.
            3 => {
                let r = raw.call(9, &region_read_payload(7, 4090, 64));
                assert_eq!(r.error, EINVAL);
            }
            // Short payloads.
            4 => {
                let r = raw.call(2, &[1, 2, 3]);
                assert_eq!(r.error, EINVAL);
            }
            // A descriptor on a command that takes none.
            5 => {
                let r = raw.call_fds(9, &region_read_payload(7, 0, 4), &[efd.as_raw_fd()]);
                assert_eq!(r.error, EINVAL);
            }
            // DMA_UNMAP of a window that does not exist.
            6 => {
                let mut p = Vec::new();
                p.extend_from_slice(&24u32.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&0x1000u64.to_le_bytes());
                p.extend_from_slice(&0x1000u64.to_le_bytes());
                assert_ne!(raw.call(3, &p).error, 0);
            }
            // A reply sent as a request (discarded, no answer), then a good read.
            _ => {
                let id = raw.id();
                raw.send(&message(id, 9, REPLY, &[0u8; 8]));
                let r = raw.call(9, &region_read_payload(7, 0, 4));
                assert_eq!(r.flags, REPLY);
            }
        }
    };
    let mut raw = Raw::negotiated(&srv.socket);
    for i in 0..800 {
        round(&mut raw, i);
    }
    let (rss0, fds0) = (
        proc_status(pid, "VmRSS:").expect("a field of /proc/PID/status"),
        srv.open_fds(),
    );
    for i in 0..10_000 {
        round(&mut raw, i);
    }
    let (rss1, fds1) = (
        proc_status(pid, "VmRSS:").expect("a field of /proc/PID/status"),
        srv.open_fds(),
    );
    assert_eq!(fds1, fds0, "descriptors leaked");
    assert!(
        rss1 < rss0 + 2048,
        "resident memory grew from {rss0} to {rss1} KiB"
    );
    drop(raw);
    serves_again(&mut srv);
}

/// A guest that repeats a bad request cannot flood the host log: the
/// warning it causes is rate-limited per call site.
#[test]
fn a_guest_repeating_bad_requests_cannot_flood_the_log() {
    let (mut srv, _img, mut d) = image_driver(4 * MB, &[]);
    for _ in 0..20 {
        // 24 requests past the end of the disk per round.
        for _ in 0..24 {
            d.submit(0, &Request::read(1 << 40, 512));
        }
        d.force_kick(0);
        d.wait_used(0, 24, Duration::from_secs(10));
    }
    let lines = srv
        .log_text()
        .lines()
        .filter(|l| l.contains("past the end of the disk"))
        .count();
    assert!(
        (1..=40).contains(&lines),
        "{lines} log lines for 480 bad requests"
    );
    drop(d);
    serves_again(&mut srv);
}

/// The server loop runs over any transport: the same message handling,
/// driven from memory, as a fuzzer does it.
#[test]
fn the_server_loop_runs_over_an_in_memory_transport() {
    use clap::Parser;
    use vfio_user_blk::vfio_user::MemTransport;
    let opts = vfio_user_blk::cli::Options::parse_from([
        "x",
        "--socket",
        "/nonexistent",
        "--disk",
        "null:1M",
    ]);
    let mut server = vfio_user_blk::cli::build_with(&opts, true).unwrap();
    let mut t = MemTransport::new();
    let mut v = vec![0, 0, 0, 0];
    v.extend_from_slice(br#"{"capabilities":{}}"#);
    v.push(0);
    t.push(&message(1, 1, 0, &v), Vec::new());
    t.push(&message(2, 9, 0, &region_read_payload(7, 0, 4)), Vec::new());
    t.push(&message(3, 77, 0, &[1, 2, 3]), Vec::new());
    let out = server.serve_on(t).output;
    // VERSION reply, then the config read, then ENOSYS.
    let mut pos = 0;
    let mut replies = Vec::new();
    while pos < out.len() {
        let size = u32::from_le_bytes(out[pos + 4..pos + 8].try_into().unwrap()) as usize;
        replies.push(out[pos..pos + size].to_vec());
        pos += size;
    }
    assert_eq!(replies.len(), 3);
    assert_eq!(&replies[1][32..36], &0x1001_1af4u32.to_le_bytes());
    assert_eq!(
        u32::from_le_bytes(replies[2][12..16].try_into().unwrap()),
        38,
        "ENOSYS"
    );
}

/// After a client cut its guest memory short under the device: the server
/// lives, says so in its log, and serves the next client once this one
/// (memory grown back) has gone.
fn survived_the_cut(srv: &mut ServerProcess, d: Driver) {
    srv.assert_alive();
    wait_until("the SIGBUS log line", || {
        srv.log_text().contains("vanished")
    });
    d.ram.set_len(4 * MB).unwrap();
    drop(d);
    serves_again(srv);
}
