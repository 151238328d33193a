//! A disk that gets stuck on purpose: a backend over an 8 MiB memfd whose
//! reads or writes of one sector block until the test releases them (a
//! hung NFS server, a dying disk), and a server in this process on it.
#![allow(dead_code)]

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use clap::Parser;
use vfio_user_blk::backend::io::{Backend, FileBackend, GuestIov};

use super::driver::{Driver, DriverOptions, Request, Submitted};
use super::{wait_until, TempDir};

pub const SIZE: u64 = 8 << 20;

/// What blocks at the gate's sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stuck {
    /// Every read there, until released.
    Reads,
    /// The first write there only (later ones go through).
    FirstWrite,
}

pub struct Gate {
    inner: FileBackend,
    /// Added to every read (a network disk); zero for a gate.
    read_delay: std::time::Duration,
    /// The byte offset that blocks; None: nothing does.
    at: Option<u64>,
    what: Stuck,
    armed: AtomicBool,
    open: Mutex<bool>,
    cv: Condvar,
    /// Requests that reached the gate.
    pub entered: AtomicU64,
}

impl Gate {
    /// A disk whose `what` at `sector` blocks; the 4 KiB there hold 0x5a.
    pub fn new(what: Stuck, sector: u64) -> Arc<Gate> {
        Gate::build(what, Some(sector), std::time::Duration::ZERO)
    }

    /// A disk where nothing gets stuck but every read takes `delay` (a
    /// network disk).
    pub fn slow_reads(delay: std::time::Duration) -> Arc<Gate> {
        Gate::build(Stuck::Reads, None, delay)
    }

    fn build(what: Stuck, sector: Option<u64>, read_delay: std::time::Duration) -> Arc<Gate> {
        use std::os::unix::fs::FileExt;
        let f = vfio_user_blk::util::memfd("gate").unwrap();
        f.set_len(SIZE).unwrap();
        if let Some(sector) = sector {
            f.write_all_at(&[0x5au8; 4096], sector * 512).unwrap();
        }
        Arc::new(Gate {
            inner: FileBackend::new(f, false, 512, true, false),
            read_delay,
            at: sector.map(|s| s * 512),
            what,
            armed: AtomicBool::new(true),
            open: Mutex::new(false),
            cv: Condvar::new(),
            entered: AtomicU64::new(0),
        })
    }

    pub fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    pub fn wait_entered(&self) {
        wait_until("a request to be stuck at the gate", || {
            self.entered.load(Ordering::SeqCst) > 0
        });
    }

    /// `len` bytes of the disk at `sector`.
    pub fn read_back(&self, sector: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        // SAFETY: `b` outlives the iovec, used only for this read.
        let iov = [unsafe { GuestIov::new(b.as_mut_ptr(), len) }];
        self.inner.read_at(&iov, sector * 512).unwrap();
        b
    }

    fn pass(&self, offset: u64, write: bool) {
        let stuck = Some(offset) == self.at
            && match self.what {
                Stuck::Reads => !write,
                Stuck::FirstWrite => write && self.armed.swap(false, Ordering::SeqCst),
            };
        if stuck {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
    }
}

impl Backend for Gate {
    fn read_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        if !self.read_delay.is_zero() {
            thread::sleep(self.read_delay);
        }
        self.pass(offset, false);
        self.inner.read_at(iov, offset)
    }
    fn write_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        self.pass(offset, true);
        self.inner.write_at(iov, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn inline(&self) -> bool {
        false
    }
    fn resize(&self, size: Option<u64>) -> io::Result<u64> {
        self.inner.resize(size)
    }
}

/// A server in this process on `backend` (a disk of SIZE bytes), serving
/// clients one after another until the test ends: its folder and socket.
pub fn serve_on(backend: Arc<dyn Backend>, extra: &[&str]) -> (TempDir, PathBuf) {
    let dir = TempDir::new("gate");
    let sock = dir.path("s.sock");
    let mut argv = vec!["x", "--socket", sock.to_str().unwrap(), "--disk", "null:8M"];
    argv.extend_from_slice(extra);
    let opts = vfio_user_blk::cli::Options::parse_from(argv);
    let mut server = vfio_user_blk::cli::build_on_backend(&opts, backend, SIZE).unwrap();
    let listener = UnixListener::bind(&sock).unwrap();
    thread::spawn(move || server.run(listener));
    (dir, sock)
}

/// A gate stuck on `stuck` at sector 64, a server in this process on it
/// (with `extra` options), and a driver attached with `opts`.
pub fn gated(stuck: Stuck, extra: &[&str], opts: DriverOptions) -> (Arc<Gate>, TempDir, Driver) {
    let be = Gate::new(stuck, 64);
    let (dir, sock) = serve_on(be.clone(), extra);
    let d = Driver::new(&sock, opts);
    (be, dir, d)
}

/// [`gated`] on reads, with a driver of the default options.
pub fn stuck_reads(extra: &[&str]) -> (Arc<Gate>, TempDir, Driver) {
    gated(Stuck::Reads, extra, DriverOptions::default())
}

/// A 4 KiB read of `sector` on queue 0, made available and kicked: the
/// one that gets stuck at a [`Stuck::Reads`] gate there.
pub fn stuck_read(d: &mut Driver, sector: u64) -> Submitted {
    let s = d.submit(0, &Request::read(sector, 4096));
    d.force_kick(0);
    s
}
