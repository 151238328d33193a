//! No heap allocation per request on the hot path (issue 9): a counting
//! allocator sees what every thread other than the test's own (the
//! reactor, the protocol thread) allocates while the driver runs
//! thousands of requests in steady state.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use support::driver::*;
use support::*;
use vfio_user_blk::backend::io::GuestIov;

struct Counting;

static TOTAL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static MINE: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counters are a relaxed atomic and a const-initialised thread-local cell,
// neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        TOTAL.fetch_add(1, Ordering::Relaxed);
        let _ = MINE.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as for System.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for System.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        TOTAL.fetch_add(1, Ordering::Relaxed);
        let _ = MINE.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as for System.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocations made by other threads so far.
fn others() -> u64 {
    TOTAL.load(Ordering::SeqCst) - MINE.with(Cell::get)
}

/// The tests of this file run one at a time: another test's driver thread
/// would count as "other threads".
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn steady_state(args: &[&str]) -> (u64, u64) {
    steady_state_with(args, 0)
}

/// Allocations outside the driver for 2500 writes and 2500 reads of 4 KiB,
/// after 1000 of each to warm up.
fn steady_allocations(d: &mut Driver) -> u64 {
    let data = pattern(5, 4096);
    let mut run = |n: u64| {
        for k in 0..n {
            assert_eq!(d.write(0, (k % 256) * 8, &data), S_OK);
            assert_eq!(d.read(0, (k % 256) * 8, 4096).0, S_OK);
        }
    };
    run(1000);
    let before = others();
    run(2500);
    others() - before
}

fn steady_state_with(args: &[&str], refuse: u32) -> (u64, u64) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let srv = ThreadServer::start(args);
    let mut d = Driver::new(&srv.socket, DriverOptions::refusing(refuse));
    let allocs = steady_allocations(&mut d);
    eprintln!("{args:?}: {allocs} allocations outside the driver for 5000 requests");
    drop(d);
    drop(srv.finish());
    (allocs, 5000)
}

#[test]
fn no_allocation_per_request_on_a_memory_disk() {
    let (allocs, requests) = steady_state(&["--disk", "ram:16M", "--poll-mode", "busy"]);
    assert!(
        allocs * 100 < requests,
        "{allocs} allocations outside the driver for {requests} requests"
    );
}

/// A file backend that lets io_uring take every read and write (it says
/// its buffers need no alignment, as an O_DIRECT file with aligned guest
/// buffers would): the engine's io_uring path, submit and reap, on every
/// request.
struct UringOnly(vfio_user_blk::backend::io::FileBackend);

impl vfio_user_blk::backend::io::Backend for UringOnly {
    fn read_at(&self, iov: &[GuestIov], offset: u64) -> std::io::Result<()> {
        self.0.read_at(iov, offset)
    }
    fn write_at(&self, iov: &[GuestIov], offset: u64) -> std::io::Result<()> {
        self.0.write_at(iov, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.0.write_zeroes(offset, len, unmap)
    }
    fn inline(&self) -> bool {
        false
    }
    fn uring_target(&self) -> Option<vfio_user_blk::backend::io::UringTarget> {
        self.0
            .uring_target()
            .map(|t| vfio_user_blk::backend::io::UringTarget {
                direct_align: Some(1),
                ..t
            })
    }
}

#[test]
fn no_allocation_per_request_on_the_io_uring_path() {
    use clap::Parser;
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("alloc-uring");
    let sock = dir.path("s.sock");
    let f = vfio_user_blk::util::memfd("uring-only").unwrap();
    f.set_len(16 << 20).unwrap();
    let be = std::sync::Arc::new(UringOnly(vfio_user_blk::backend::io::FileBackend::new(
        f, false, 512, true, false,
    )));
    let opts = vfio_user_blk::cli::Options::parse_from([
        "x",
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        "null:16M",
        "--poll-mode",
        "busy",
        "--io-engine",
        "io-uring",
    ]);
    let mut server = vfio_user_blk::cli::build_on_backend(&opts, be, 16 << 20).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        server.serve(s);
    });
    let mut d = Driver::new(&sock, DriverOptions::default());
    let allocs = steady_allocations(&mut d);
    eprintln!("io_uring path: {allocs} allocations outside the driver for 5000 requests");
    drop(d);
    t.join().unwrap();
    assert!(
        allocs * 100 < 5000,
        "{allocs} allocations for 5000 requests"
    );
}

/// The thread pool's path (here: write-through writes, which go to the
/// pool) allocates only the blocks of its channels, one per 31 messages.
#[test]
fn the_thread_pool_path_allocates_only_channel_blocks() {
    let dir = TempDir::new("alloc");
    let img = dir.image("d.img", 16 << 20);
    let (allocs, requests) = steady_state_with(
        &["--disk", img.to_str().unwrap(), "--poll-mode", "busy"],
        F_FLUSH,
    );
    assert!(
        allocs * 10 < requests,
        "{allocs} allocations outside the driver for {requests} requests"
    );
}
