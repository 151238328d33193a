//! The shared engine (issue 9): several devices on one reactor, one device's
//! lifecycle events while the others work, a backend that is stuck across
//! reset, unmap and disconnect, and unmap pausing only the queues it touches.
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::driver::*;
use support::gate::{gated, stuck_read, Stuck};
use support::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vub_testkit::driver_ring::{Buf, SplitRing};

const MB: u64 = 1 << 20;

/// Four disks in one process on one reactor, I/O on all of them at once,
/// every byte checked against the images.
#[test]
fn four_devices_on_one_reactor_do_io_at_once() {
    let dir = TempDir::new("four");
    let mut args: Vec<String> = vec!["--pollers".into(), "1".into()];
    let mut socks = Vec::new();
    let mut imgs = Vec::new();
    for i in 0..4 {
        let img = dir.path(&format!("d{i}.img"));
        File::create(&img).unwrap().set_len(8 * MB).unwrap();
        let sock = dir.path(&format!("d{i}.sock"));
        args.push("--device".into());
        args.push(format!(
            "socket={},disk={},queues=2,serial=disk-{i}",
            sock.display(),
            img.display()
        ));
        socks.push(sock);
        imgs.push(img);
    }
    let mut child = std::process::Command::new(bin())
        .args(&args)
        .env("RUST_LOG", "info")
        .stderr(File::create(dir.path("server.log")).unwrap())
        .spawn()
        .unwrap();
    let log = dir.path("server.log");
    let guard = KillOnDrop(&mut child);
    wait_until("four sockets", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("listening on")
            .count()
            == 4
    });
    let workers: Vec<_> = socks
        .iter()
        .enumerate()
        .map(|(i, sock)| {
            let sock = sock.clone();
            thread::spawn(move || {
                let mut d = Driver::new(&sock, DriverOptions::default());
                for k in 0..64u64 {
                    let data = pattern(i as u64 * 1000 + k, 4096);
                    let q = (k % 2) as usize;
                    assert_eq!(d.write(q, k * 8, &data), S_OK);
                    assert_eq!(d.read(1 - q, k * 8, 4096), (S_OK, data));
                }
                let (st, id, _) = d.simple(0, T_GET_ID, 0, vec![], 20);
                assert_eq!(st, S_OK);
                assert!(id.starts_with(format!("disk-{i}").as_bytes()));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    for (i, img) in imgs.iter().enumerate() {
        let f = File::open(img).unwrap();
        for k in 0..64u64 {
            let mut b = vec![0u8; 4096];
            f.read_exact_at(&mut b, k * 4096).unwrap();
            assert_eq!(b, pattern(i as u64 * 1000 + k, 4096), "disk {i} block {k}");
        }
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("reactor(s)").count(), 1, "one engine: {text}");
    assert!(!text.contains("on reactors [1"), "one reactor only");
    drop(guard);
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// While one device is reset, DMA-unmapped and disconnected, another
/// device of the same process, on the same reactor, keeps serving I/O.
#[test]
fn one_device_reset_unmapped_and_disconnected_while_another_works() {
    let dir = TempDir::new("iso");
    let mut args: Vec<String> = vec!["--pollers".into(), "1".into()];
    let mut socks = Vec::new();
    for i in 0..2 {
        let img = dir.path(&format!("d{i}.img"));
        File::create(&img).unwrap().set_len(8 * MB).unwrap();
        let sock = dir.path(&format!("d{i}.sock"));
        args.push("--device".into());
        args.push(format!("socket={},disk={}", sock.display(), img.display()));
        socks.push(sock);
    }
    let log = dir.path("server.log");
    let mut child = std::process::Command::new(bin())
        .args(&args)
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(&mut child);
    wait_until("two sockets", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("listening on")
            .count()
            == 2
    });
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let worker = {
        let (sock, stop, done) = (socks[0].clone(), stop.clone(), done.clone());
        thread::spawn(move || {
            let mut d = Driver::new(&sock, DriverOptions::default());
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data = pattern(k, 4096);
                assert_eq!(d.write(0, (k % 512) * 8, &data), S_OK);
                assert_eq!(d.read(0, (k % 512) * 8, 4096), (S_OK, data));
                done.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
        })
    };
    let progress = |what: &str| {
        let before = done.load(Ordering::Relaxed);
        wait_until(what, || done.load(Ordering::Relaxed) > before + 20);
    };
    let mut d = Driver::new(&socks[1], DriverOptions::default());
    assert_eq!(d.write(0, 0, &[1u8; 512]), S_OK);
    progress("I/O on disk 0 before");
    for round in 0..3 {
        d.reset();
        progress("I/O on disk 0 across a reset of disk 1");
        d.reset_alloc();
        d.init(0);
        assert_eq!(d.write(0, 1, &[round; 512]), S_OK);
        d.c.dma_unmap(0, d.ram_size).unwrap();
        progress("I/O on disk 0 while disk 1 has no memory");
        let fd = d.ram.as_raw_fd();
        d.c.dma_map(0, 0, d.ram_size, fd).unwrap();
        assert_eq!(d.read(0, 1, 512), (S_OK, vec![round; 512]));
    }
    drop(d);
    progress("I/O on disk 0 across a disconnect of disk 1");
    let mut d = Driver::new(&socks[1], DriverOptions::default());
    assert_eq!(d.read(0, 1, 512), (S_OK, vec![2u8; 512]));
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    drop(d);
    drop(guard);
}

fn used_idx(mem: &GuestMemoryMmap, d_used: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(d_used + 2)).unwrap()
}

/// A backend stuck across a device reset: the reset is answered only once
/// the request has returned, and the request of the old activation writes
/// neither its status byte nor a used entry; the next activation starts
/// clean.
#[test]
fn a_stuck_backend_holds_a_reset_and_its_late_completion_writes_nothing() {
    let (be, _dir, mut d) = gated(
        Stuck::Reads,
        &["--poll-mode", "interrupt"],
        DriverOptions::default(),
    );
    let view = d.watch();
    let used = d.queues[0].used;
    let s = stuck_read(&mut d, 64);
    be.wait_entered();
    let t0 = Instant::now();
    let resetter = thread::spawn(move || {
        d.reset();
        d
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        !resetter.is_finished(),
        "reset answered while a request was in the backend"
    );
    be.release();
    let mut d = resetter.join().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        used_idx(&view, used),
        0,
        "no used entry for the old activation"
    );
    let status: u8 = view.read_obj(GuestAddress(s.status_addr)).unwrap();
    assert_eq!(status, 0xa5, "no status byte for the old activation");
    // The next activation: its used ring counts only its own requests.
    d.reset_alloc();
    d.init(0);
    assert_eq!(d.read(0, 64, 4096), (S_OK, vec![0x5a; 4096]));
    assert_eq!(used_idx(&view, d.queues[0].used), 1);
}

/// A backend stuck across DMA_UNMAP: the unmap is answered only once the
/// request has returned; from then on nothing writes into the window the
/// client took back.
#[test]
fn a_stuck_backend_holds_an_unmap_and_nothing_writes_after_it() {
    let (be, _dir, mut d) = gated(
        Stuck::Reads,
        &["--poll-mode", "busy"],
        DriverOptions::default(),
    );
    let view = d.watch();
    let s = stuck_read(&mut d, 64);
    be.wait_entered();
    let unmapper = thread::spawn(move || {
        d.c.dma_unmap(0, d.ram_size).unwrap();
        d
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        !unmapper.is_finished(),
        "unmap answered while a request was in the backend"
    );
    be.release();
    let d = unmapper.join().unwrap();
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

/// A backend stuck across a disconnect: the departed client's windows are
/// revoked (private memory here), so the late read reaches neither its
/// memory nor its rings, and the next client is served at once, untouched
/// by the old request.
#[test]
fn a_stuck_backend_across_a_disconnect_leaves_the_next_client_untouched() {
    let (be, dir, mut d) = gated(
        Stuck::Reads,
        &["--poll-mode", "adaptive"],
        DriverOptions::default(),
    );
    let view = d.watch();
    let used = d.queues[0].used;
    let s = stuck_read(&mut d, 64);
    be.wait_entered();
    drop(d);
    thread::sleep(Duration::from_millis(200));
    // The next client is served while the old request is still stuck.
    let mut d2 = Driver::new(&dir.path("s.sock"), DriverOptions::default());
    assert_eq!(d2.write(0, 16, &[4u8; 512]), S_OK);
    be.release();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(used_idx(&view, used), 0, "the old client got no used entry");
    let mut old = vec![0u8; 4097];
    view.read_slice(&mut old, GuestAddress(s.in_addr)).unwrap();
    assert!(
        old.iter().all(|&b| b == 0xa5),
        "the late read wrote into the memory of a client that had left"
    );
    assert_eq!(d2.write(0, 8, &[3u8; 512]), S_OK);
    assert_eq!(used_idx(&d2.mem, d2.queues[0].used), 2);
    assert_eq!(d2.read(0, 64, 512), (S_OK, vec![0x5a; 512]));
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
    let unmapper = thread::spawn(move || {
        d.c.dma_unmap(half, half).unwrap();
        d
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        !unmapper.is_finished(),
        "unmap answered while a request would still write its status byte there"
    );
    be.release();
    let d = unmapper.join().unwrap();
    let st: u8 = view.read_obj(GuestAddress(status)).unwrap();
    assert_eq!(
        st, S_OK,
        "the status was written before the unmap was answered"
    );
    drop(d);
}
