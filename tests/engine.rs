//! The shared engine (issue 9): several devices on one reactor, one device's
//! lifecycle events while the others work, a backend that is stuck across
//! reset, unmap and disconnect, and unmap pausing only the queues it touches.
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::driver::*;
use support::gate::{stuck_read, stuck_reads};
use support::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MB: u64 = 1 << 20;

/// Four disks in one process on one reactor, I/O on all of them at once,
/// every byte checked against the images.
#[test]
fn four_devices_on_one_reactor_do_io_at_once() {
    let dir = TempDir::new("four");
    let (guard, socks, imgs) = devices_on_one_reactor(&dir, 4, ",queues=2");
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
    let text = std::fs::read_to_string(dir.path("server.log")).unwrap();
    assert_eq!(text.matches("reactor(s)").count(), 1, "one engine: {text}");
    assert!(!text.contains("on reactors [1"), "one reactor only");
    drop(guard);
}

/// A server process, killed (by PID) and reaped on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
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
    let (guard, socks, _imgs) = devices_on_one_reactor(&dir, 2, "");
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
    let (be, _dir, mut d) = stuck_reads(&["--poll-mode", "interrupt"]);
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

/// A backend stuck across a disconnect: the departed client's windows are
/// revoked (private memory here), so the late read reaches neither its
/// memory nor its rings, and the next client is served at once, untouched
/// by the old request.
#[test]
fn a_stuck_backend_across_a_disconnect_leaves_the_next_client_untouched() {
    let (be, dir, mut d) = stuck_reads(&["--poll-mode", "adaptive"]);
    let s = stuck_read(&mut d, 64);
    be.wait_entered();
    // What the old client's memory and used ring look like from outside.
    let (view, used) = (d.watch(), d.queues[0].used);
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

/// A server with `n` devices on one reactor, each on an 8 MiB image of its
/// own in `dir` (with `extra` device keys, and serial `disk-I`), once all
/// listen; and their sockets and images.
fn devices_on_one_reactor(
    dir: &TempDir,
    n: usize,
    extra: &str,
) -> (KillOnDrop, Vec<PathBuf>, Vec<PathBuf>) {
    let mut args: Vec<String> = vec!["--pollers".into(), "1".into()];
    let (mut socks, mut imgs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let img = dir.image(&format!("d{i}.img"), 8 * MB);
        let sock = dir.path(&format!("d{i}.sock"));
        args.push("--device".into());
        args.push(format!(
            "socket={},disk={}{extra},serial=disk-{i}",
            sock.display(),
            img.display()
        ));
        socks.push(sock);
        imgs.push(img);
    }
    let log = dir.path("server.log");
    let child = std::process::Command::new(bin())
        .args(&args)
        .env("RUST_LOG", "info")
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child);
    wait_until(&format!("{n} sockets"), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.matches("listening on").count() == n
    });
    (guard, socks, imgs)
}
