//! Management connections across a live upgrade: each connection's thread,
//! between two requests, waits on its socket and on the upgrade's wake-up;
//! an upgrade stops them there (never in the middle of a request: what a
//! client sends meanwhile waits in its socket for the next binary) and
//! hands their sockets over, and the next binary serves them on.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Where a connection's thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// Reading or answering a request.
    Busy,
    /// Stopped between requests for an upgrade: its socket, and whether
    /// it is subscribed to events.
    Parked(RawFd, bool),
    /// The accept thread, stopped between accepts (what connects
    /// meanwhile waits in the listening socket for the next binary).
    AcceptParked,
}

struct Hold {
    paused: AtomicBool,
    /// Readable while paused (never drained by the connections).
    wake: Option<OwnedFd>,
    conns: Mutex<HashMap<u64, At>>,
    cv: Condvar,
    next: AtomicU64,
}

fn hold() -> &'static Hold {
    static H: OnceLock<Hold> = OnceLock::new();
    H.get_or_init(|| {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        Hold {
            paused: AtomicBool::new(false),
            // SAFETY: a new descriptor that nothing else owns.
            wake: (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }),
            conns: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
            next: AtomicU64::new(1),
        }
    })
}

/// A connection known to the hold for as long as this lives.
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        let h = hold();
        h.conns.lock().remove(&self.0);
        h.cv.notify_all();
    }
}

pub fn register() -> Registered {
    let h = hold();
    let id = h.next.fetch_add(1, Ordering::Relaxed);
    h.conns.lock().insert(id, At::Busy);
    Registered(id)
}

impl Registered {
    pub fn id(&self) -> u64 {
        self.0
    }

    /// Between two requests: waits up to `timeout` (None: no limit) for
    /// the socket `fd` to be readable (true), or stops here for an
    /// upgrade and goes on once it was called off. False: the time ran
    /// out (or the wait failed).
    pub fn wait(
        &self,
        fd: RawFd,
        timeout: Option<Duration>,
        subscribed: bool,
        out: &Mutex<std::os::unix::net::UnixStream>,
    ) -> bool {
        let h = hold();
        let until = timeout.map(|t| Instant::now() + t);
        loop {
            if h.paused.load(Ordering::SeqCst) {
                // No answer or event is half written when the process image
                // is replaced: the lock they go through is held.
                let _quiet = out.lock();
                self.park(fd, subscribed);
                continue;
            }
            let left = until.map(|u| u.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return false;
            }
            let ms = left.map_or(-1, |l| {
                i32::try_from(l.as_millis().max(1)).unwrap_or(i32::MAX)
            });
            let wake = h.wake.as_ref().map_or(-1, AsRawFd::as_raw_fd);
            match crate::util::poll_two(fd, wake, ms) {
                Ok((true, _)) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// The accept thread, between two accepts: waits until the listening
    /// socket `fd` is readable, stopping here while an upgrade is under
    /// way. (Each connection accepted is registered before this is
    /// called again: an upgrade that finds this thread stopped knows
    /// every connection it took.)
    pub fn wait_accept(&self, fd: RawFd) {
        let h = hold();
        loop {
            if h.paused.load(Ordering::SeqCst) {
                self.stop_at(At::AcceptParked);
                continue;
            }
            let wake = h.wake.as_ref().map_or(-1, AsRawFd::as_raw_fd);
            match crate::util::poll_two(fd, wake, -1) {
                Ok((true, _)) if !h.paused.load(Ordering::SeqCst) => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn park(&self, fd: RawFd, subscribed: bool) {
        self.stop_at(At::Parked(fd, subscribed));
    }

    fn stop_at(&self, at: At) {
        let h = hold();
        let mut g = h.conns.lock();
        g.insert(self.0, at);
        h.cv.notify_all();
        while h.paused.load(Ordering::SeqCst) {
            h.cv.wait_for(&mut g, Duration::from_millis(100));
        }
        g.insert(self.0, At::Busy);
    }
}

/// Stops every management connection but `except` between two requests:
/// the sockets (and whether each is subscribed) of those that stopped
/// within `limit`; the others will be closed by the exec.
pub fn pause(except: Option<u64>, limit: Duration) -> Vec<(RawFd, bool)> {
    let h = hold();
    h.paused.store(true, Ordering::SeqCst);
    if let Some(w) = &h.wake {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(w.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
    let until = Instant::now() + limit;
    let mut g = h.conns.lock();
    loop {
        let busy = g
            .iter()
            .filter(|(id, at)| Some(**id) != except && **at == At::Busy)
            .count();
        if busy == 0 || Instant::now() >= until {
            if busy > 0 {
                log::warn!(
                    "upgrade: {busy} management connection(s) busy with a request: they close"
                );
            }
            return g
                .values()
                .filter_map(|at| match at {
                    At::Parked(fd, sub) => Some((*fd, *sub)),
                    At::Busy | At::AcceptParked => None,
                })
                .collect();
        }
        h.cv.wait_until(&mut g, until);
    }
}

/// The upgrade was called off: the connections go on.
pub fn resume() {
    let h = hold();
    h.paused.store(false, Ordering::SeqCst);
    if let Some(w) = &h.wake {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer (non-blocking).
        unsafe { libc::read(w.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
    }
    let _g = h.conns.lock();
    h.cv.notify_all();
}
