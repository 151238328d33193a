//! DMA_UNMAP while the device works: an unmap waits only for what uses
//! its window (per-queue fences), requests in flight finish before the
//! reply, nothing is written into a window after it is given back, and a
//! ring unmapped and mapped again goes on.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::driver::*;
use support::gate::{gated, stuck_read, stuck_reads, Stuck};
use support::*;
use vm_memory::{Bytes, GuestAddress};
use vub_testkit::driver_ring::{Buf, SplitRing};

const MB: u64 = 1 << 20;

/// A backend stuck across DMA_UNMAP: the unmap is answered only once the
/// request has returned; from then on nothing writes into the window the
/// client took back.
#[test]
fn a_stuck_backend_holds_an_unmap_and_nothing_writes_after_it() {
    let (be, _dir, mut d) = stuck_reads(&["--poll-mode", "busy"]);
    let view = d.watch();
    let s = stuck_read(&mut d, 64);
    be.wait_entered();
    let range = (0, d.ram_size);
    let d = unmap_held_until_released(d, range, &be, "a request was in the backend");
    // The request finished before the reply: its data and status are there.
    let (st, data) = (view.read_obj::<u8>(GuestAddress(s.status_addr)).unwrap(), {
        let mut b = vec![0u8; 4096];
        view.read_slice(&mut b, GuestAddress(s.in_addr)).unwrap();
        b
    });
    assert_eq!((st, data), (S_OK, vec![0x5a; 4096]));
    // The client now owns the window again: scribble on it and check that
    // nothing of ours lands there any more.
    let mut snapshot = vec![0u8; 1 << 20];
    view.write_slice(&vec![0x77u8; 1 << 20], GuestAddress(0))
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    view.read_slice(&mut snapshot, GuestAddress(0)).unwrap();
    assert!(
        snapshot.iter().all(|&b| b == 0x77),
        "written after the unmap"
    );
    drop(d);
}

/// DMA_UNMAP pauses only what the window holds: with queue 1's request
/// stuck on a buffer in the upper window, unmapping that window waits, and
/// meanwhile queue 0 (rings and buffers in the lower window) keeps serving.
#[test]
fn unmap_pauses_only_the_queues_in_the_window() {
    let (be, _dir, mut d) = gated(
        Stuck::Reads,
        &["--poll-mode", "busy", "--queues", "2"],
        DriverOptions::split_dma(),
    );
    let half = d.ram_size / 2;
    // Queue 1's stuck read into the upper window.
    d.set_alloc(half + 0x1000);
    let s = d.submit(1, &Request::read(64, 4096));
    d.force_kick(1);
    be.wait_entered();
    let view = d.watch();
    // Queue 0 has not been used: a fresh driver-side ring over the same
    // memory drives it while `d` is blocked in the unmap on another thread
    // (busy mode: no doorbell needed).
    let r = &d.queues[0];
    let mut q0 = SplitRing::new(&view, r.size, r.desc, r.avail, r.used, r.event_idx());
    let (tx, rx) = std::sync::mpsc::channel();
    let unmapper = thread::spawn(move || {
        d.c.dma_unmap(half, half).unwrap();
        tx.send(()).unwrap();
        d
    });
    thread::sleep(Duration::from_millis(100));
    assert!(
        rx.try_recv().is_err(),
        "unmap of a window in use answered early"
    );
    for k in 0..8u64 {
        let base = 0x200000 + k * 0x2000;
        let mut h = Vec::new();
        h.extend_from_slice(&T_IN.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&(8 + k).to_le_bytes());
        view.write_slice(&h, GuestAddress(base)).unwrap();
        view.write_obj(0xffu8, GuestAddress(base + 0x1000 + 512))
            .unwrap();
        let bufs = [
            Buf {
                addr: base,
                len: 16,
                write: false,
            },
            Buf {
                addr: base + 0x1000,
                len: 512,
                write: true,
            },
            Buf {
                addr: base + 0x1000 + 512,
                len: 1,
                write: true,
            },
        ];
        let head = q0.add(&view, &bufs, None).unwrap();
        q0.publish(&view, head);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((h, _)) = q0.pop_used(&view) {
                assert_eq!(h, head);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "queue 0 request {k} not served while queue 1's window is being unmapped"
            );
            thread::yield_now();
        }
        let st: u8 = view.read_obj(GuestAddress(base + 0x1000 + 512)).unwrap();
        assert_eq!(st, S_OK);
    }
    assert!(rx.try_recv().is_err(), "the unmap still waits for queue 1");
    be.release();
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let d = unmapper.join().unwrap();
    let status: u8 = view.read_obj(GuestAddress(s.status_addr)).unwrap();
    assert_eq!(status, S_OK);
    drop(d);
}

/// The status byte counts too: a stuck request whose data lies in the lower
/// window but whose status byte lies in the upper one holds an unmap of the
/// upper window, which is answered only after the status was written.
#[test]
fn unmap_waits_for_a_request_whose_status_byte_is_in_the_window() {
    let (be, _dir, mut d) = gated(
        Stuck::Reads,
        &["--poll-mode", "busy"],
        DriverOptions::split_dma(),
    );
    let half = d.ram_size / 2;
    let h = d.header_buf(T_IN, 64);
    let data = d.alloc(4096);
    let status = half + 0x4000;
    d.place(
        0,
        &[(h, 16, false), (data, 4096, true), (status, 1, true)],
        false,
    );
    d.force_kick(0);
    be.wait_entered();
    let view = d.watch();
    view.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    let why = "a request would still write its status byte there";
    let d = unmap_held_until_released(d, (half, half), &be, why);
    let st: u8 = view.read_obj(GuestAddress(status)).unwrap();
    assert_eq!(
        st, S_OK,
        "the status was written before the unmap was answered"
    );
    drop(d);
}

#[test]
fn dma_unmap_with_io_in_flight() {
    let (mut srv, mut d) = flooded(&["--io-threads", "1", "--poll-mode", "interrupt"]);
    let t = Instant::now();
    d.c.dma_unmap(0, d.ram_size).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    // After the unmap reply the device must not touch that memory.
    used_is_stable(&d);
    drop(d);
    serves_again(&mut srv);
}

/// Regression (seen with SeaBIOS under QEMU): QEMU removes and re-adds the
/// RAM window holding the ring while firmware toggles shadow RAM. The queue
/// must wait for its memory, not break.
#[test]
fn ring_unmapped_and_remapped_keeps_working() {
    use std::os::fd::AsRawFd;
    for mode in ["busy", "adaptive", "interrupt"] {
        let (mut srv, img, mut d) = image_driver(4 * MB, &["--poll-mode", mode]);
        assert_eq!(d.write(0, 0, &[1u8; 512]), S_OK);
        d.c.dma_unmap(0, d.ram_size).unwrap();
        // A request published while the window is gone...
        let s = d.submit(0, &Request::write(8, &vec![2u8; 512]));
        d.force_kick(0);
        std::thread::sleep(Duration::from_millis(50));
        // ...is served once the window is back, with no second kick: SeaBIOS
        // kicks once and then polls. (Regression, issue 8 bug 3: this test
        // used to kick again here, which hid a lost wakeup.)
        let fd = d.ram.as_raw_fd();
        d.c.dma_map(0, 0, d.ram_size, fd).unwrap();
        let used = d.wait_used(0, 1, Duration::from_secs(10));
        assert_eq!(used[0].0, s.head);
        assert_eq!(d.result(&s).0, S_OK);
        let mut b = [0u8; 512];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut b, 8 * 512)
            .unwrap();
        assert_eq!(b, [2u8; 512]);
        assert!(!srv.log_text().contains("is broken"), "{mode}");
        drop(d);
        serves_again(&mut srv);
    }
}

/// DMA_UNMAP of a window that neither the ring nor any request in flight
/// uses: the queue keeps running under the fence. A request answered
/// without backend I/O (GET_ID) whose buffer lies in the window is not
/// checked against the fence, and is written through the guest-memory
/// snapshot the poll took before the table changed. Is anything written
/// into the window after the DMA_UNMAP reply?
#[test]
fn request_answered_without_io_never_writes_into_a_window_after_its_unmap_reply() {
    let srv = ServerProcess::start(&["--disk", "null:1G", "--poll-mode", "busy"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::split_dma());
    let half = d.ram_size / 2;
    let view = d.watch();
    let r = &d.queues[0];
    let mut q = SplitRing::new(&view, r.size, r.desc, r.avail, r.used, r.event_idx());
    put_header(&view, 0xf000, T_IN, 0);
    put_header(&view, 0xf100, T_GET_ID, 0);
    let segs: u64 = 48;
    let mut a = vec![Buf {
        addr: 0xf000,
        len: 16,
        write: false,
    }];
    for i in 0..segs {
        a.push(Buf {
            addr: 0x0100_0000 + (i % 14) * MB,
            len: 1 << 20,
            write: true,
        });
    }
    a.push(Buf {
        addr: 0xff00,
        len: 1,
        write: true,
    });
    let b_data = half + 0x1000;
    let b = [
        Buf {
            addr: 0xf100,
            len: 16,
            write: false,
        },
        Buf {
            addr: b_data,
            len: 20,
            write: true,
        },
        Buf {
            addr: 0xff10,
            len: 1,
            write: true,
        },
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let gets = Arc::new(AtomicU64::new(0));
    let g = {
        let view = view.clone();
        let stop = stop.clone();
        let gets = gets.clone();
        thread::spawn(move || {
            let mut next_a = true;
            let mut out = 0usize;
            let mut kinds = std::collections::HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                while let Some((h, _)) = q.pop_used(&view) {
                    out -= 1;
                    if kinds.remove(&h) == Some(false) {
                        gets.fetch_add(1, Ordering::Relaxed);
                    }
                }
                while out < 64 && q.free_descriptors() >= 3 {
                    let head = if next_a {
                        q.add(&view, &a, Some(0x80000)).unwrap()
                    } else {
                        q.add(&view, &b, None).unwrap()
                    };
                    kinds.insert(head, next_a);
                    q.publish(&view, head);
                    next_a = !next_a;
                    out += 1;
                }
                thread::yield_now();
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    let trials: usize = 20;
    let mut hits = 0;
    for t in 0..trials {
        let before = gets.load(Ordering::Relaxed);
        d.c.dma_unmap(half, half).unwrap();
        // The client owns the window again.
        view.write_slice(&[0u8; 20], GuestAddress(b_data)).unwrap();
        thread::sleep(Duration::from_millis(150));
        let mut got = [0u8; 20];
        view.read_slice(&mut got, GuestAddress(b_data)).unwrap();
        if got != [0u8; 20] {
            hits += 1;
            eprintln!(
                "trial {t}: after the DMA_UNMAP reply the window now holds {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        d.c.dma_map(half, half, half, d.ram.as_raw_fd()).unwrap();
        // The guest thread may wait for a CPU a while on two cores.
        wait_until("GET_IDs served again after the remap", || {
            gets.load(Ordering::Relaxed) > before
        });
    }
    stop.store(true, Ordering::Relaxed);
    g.join().unwrap();
    eprintln!("{hits}/{trials} trials wrote into the window after the unmap reply");
    assert_eq!(hits, 0);
}

/// Unmaps `range` (iova, size) on a thread while `be` holds a request:
/// the unmap must still wait after 300 ms (else: answered while `why`),
/// and is answered once the request is released.
fn unmap_held_until_released(
    mut d: Driver,
    range: (u64, u64),
    be: &support::gate::Gate,
    why: &str,
) -> Driver {
    let unmapper = thread::spawn(move || {
        d.c.dma_unmap(range.0, range.1).unwrap();
        d
    });
    thread::sleep(Duration::from_millis(300));
    assert!(!unmapper.is_finished(), "unmap answered while {why}");
    be.release();
    unmapper.join().unwrap()
}
