//! A live upgrade's side of the protocol: a device's thread stops at a
//! message boundary (never in the middle of a message: what the client
//! sends meanwhile waits in the socket for the next binary), its device
//! freezes, and the thread hands over the connection, the DMA windows and
//! the device's state, then waits for the process image to be replaced or
//! for the upgrade to be called off. The accept thread stops between
//! accepts likewise. The new binary restores all of it
//! ([`Server::restore`]) and goes on serving ([`Server::run_restored`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};

use super::server::{Control, Server};
use super::Device;
use crate::handover::{FdBag, Outgoing};

/// Asks a device's thread to stop for an upgrade.
pub struct Park {
    /// How long the device may take to have nothing in flight.
    pub limit: Duration,
    pub reply: Sender<Result<Parked, String>>,
}

/// A device stopped for an upgrade: its state and descriptors. Dropping
/// `go` (the upgrade called off, or failed before the exec) lets the
/// device go on.
pub struct Parked {
    pub state: Value,
    pub fds: Outgoing,
    pub go: Sender<()>,
}

/// The client connection as the upgrade carries it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedClient {
    pub fd: i64,
    /// VERSION was answered: the connection is past negotiation.
    pub negotiated: bool,
    pub max_xfer: u32,
}

/// One DMA window (fd -1: a window the device does not reach).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedWindow {
    pub iova: u64,
    pub size: u64,
    pub offset: u64,
    pub fd: i64,
}

/// A device's protocol state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavedServer {
    pub client: Option<SavedClient>,
    pub windows: Vec<SavedWindow>,
    pub device: Value,
}

/// A client to go on serving in the new binary.
pub struct Resumed {
    pub stream: UnixStream,
    pub negotiated: bool,
    pub max_xfer: u32,
}

/// A non-blocking eventfd that wakes a thread from its wait on a socket.
pub(super) fn wake_fd() -> Option<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    // SAFETY: a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn kick(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to our eventfd.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

fn drain(fd: BorrowedFd<'_>) {
    let mut b = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer (non-blocking).
    unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
}

/// Waits until `fd` is readable or `wake` is: true for `fd`. Interrupted
/// waits are retried; an error says so.
pub(super) fn wait_readable(fd: RawFd, wake: Option<&OwnedFd>) -> io::Result<bool> {
    let (ready, woken) = crate::util::poll_two(fd, wake.map_or(-1, AsRawFd::as_raw_fd), -1)?;
    if woken {
        if let Some(w) = wake {
            drain(w.as_fd());
        }
    }
    Ok(ready)
}

impl<D: Device> Server<D> {
    /// Stops for an upgrade: freezes the device, hands the state over and
    /// waits. Returns once the upgrade was called off (the device is
    /// thawed and serves on).
    pub(super) fn park(&mut self, req: Park, client: Option<SavedClient>, out: Outgoing) {
        if let Err(why) = self.device.freeze(req.limit) {
            let _ = req.reply.send(Err(why));
            return;
        }
        let mut out = out;
        let windows = self.dma.save(&mut out);
        let state = SavedServer {
            client,
            windows,
            device: self.device.save(&mut out),
        };
        let (go, wait) = crossbeam_channel::bounded::<()>(0);
        let parked = Parked {
            state: serde_json::to_value(state).unwrap_or_default(),
            fds: out,
            go,
        };
        let reply = req.reply;
        let sent = reply.send(Ok(parked)).is_ok();
        // Ours gone, an answer the upgrade never takes (it gave up on this
        // device) is dropped with the channel, and `go` with it.
        drop(reply);
        if sent {
            // Only a call-off ends this: an upgrade that goes through
            // replaces the process image first.
            let _ = wait.recv();
        }
        self.device.thaw();
        crate::dev_log!(self.log, Info, "upgrade called off: serving on");
    }

    /// Takes a saved state into this new server (DMA windows, device)
    /// before anything runs; the client to go on serving, if any.
    pub fn restore(&mut self, state: &Value, fds: &mut FdBag) -> Result<Option<Resumed>, String> {
        let s: SavedServer =
            serde_json::from_value(state.clone()).map_err(|e| format!("protocol state: {e}"))?;
        for w in &s.windows {
            let fd = fds.take_opt(w.fd)?;
            let flags = if fd.is_some() {
                VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE
            } else {
                VFIO_DMA_MAP_FLAG_READ
            };
            self.dma
                .map(w.iova, w.size, w.offset, flags, fd)
                .map_err(|e| format!("DMA window: {e}"))?;
        }
        self.device.restore(&s.device, fds)?;
        let Some(c) = s.client else { return Ok(None) };
        if c.max_xfer == 0 || c.max_xfer > self.config.max_data_xfer_size {
            return Err(format!("client max_data_xfer_size {}", c.max_xfer));
        }
        let stream = UnixStream::from(fds.take(c.fd)?);
        // A unix socket (its client may have left meanwhile: that is seen
        // when it is read, as for any client).
        if stream.local_addr().is_err() {
            return Err(format!("client descriptor {} is not a unix socket", c.fd));
        }
        Ok(Some(Resumed {
            stream,
            negotiated: c.negotiated,
            max_xfer: c.max_xfer,
        }))
    }

    /// The upgrade is committed: the device runs again.
    pub fn start_restored(&mut self) {
        self.device.start_restored();
    }
}

impl Control {
    /// Asks the device's thread to stop for an upgrade; the answer comes
    /// on `req.reply`.
    pub fn park(&self, req: Park) {
        let _ = self.park_tx.send(req);
        if let Some(w) = &self.wake {
            kick(w);
        }
    }

    /// Stops the accept thread between accepts; a connection it had taken
    /// and not yet handed to the device is kept for the upgrade. True once
    /// it is stopped (within `limit`).
    pub fn pause_accept(&self, limit: Duration) -> bool {
        self.accept.paused.store(true, Ordering::SeqCst);
        if let Some(w) = &self.accept_wake {
            kick(w);
        }
        let until = Instant::now() + limit;
        while !self.accept.parked.load(Ordering::SeqCst) {
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// The accept thread goes on.
    pub fn resume_accept(&self) {
        self.accept.paused.store(false, Ordering::SeqCst);
        let _g = self.accept.lock.lock();
        self.accept.cv.notify_all();
    }

    /// A connection accepted and not yet served (kept while paused).
    pub fn take_pending(&self) -> Option<UnixStream> {
        self.accept.pending.lock().take()
    }

    pub(super) fn park_requests(&self) -> &Receiver<Park> {
        &self.park_rx
    }
}
