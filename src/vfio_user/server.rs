//! The server loop: accept one client at a time on a listening socket, read
//! messages in order, validate them, dispatch to the [`Device`], reply.
//!
//! Rules kept on every path: a request gets exactly one reply unless it is
//! flagged no-reply; an error reply carries a non-zero errno; the payload of
//! every message is consumed before it is judged, so the stream stays in
//! sync; descriptors that a request did not use are closed when it is done.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

use crate::events::Event;
use crate::util::DeviceLog;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
};

use super::dma::{DmaTable, DMA_PAGE_SIZE};
use super::socket::{RecvHeader, Transport, MAX_RECV_FDS};
use super::wire::*;
use super::{Device, Errno, IrqAction, IrqData, IrqSet};
use crate::memory::GuestMemoryHandle;

/// Limits the server advertises and enforces.
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Largest `count` of a REGION_READ/WRITE.
    pub max_data_xfer_size: u32,
    /// Most DMA windows held at once.
    pub max_dma_maps: u32,
    /// Most descriptors we take on one message (advertised as max_msg_fds).
    pub max_msg_fds: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: 1 << 20,
            max_dma_maps: 4096,
            max_msg_fds: 8,
        }
    }
}

/// What the management plane sees of, and does to, a running server.
pub struct Control {
    stopping: AtomicBool,
    /// At the end of the current client, wait for its requests before the
    /// device lets go of them (graceful shutdown).
    drain: Arc<AtomicBool>,
    listener: Mutex<Option<UnixListener>>,
    /// The attached client's stream and credentials.
    client: Mutex<Option<(UnixStream, Option<PeerCred>)>>,
    /// Upgrade requests for the device's thread (see `park`).
    pub(super) park_tx: crossbeam_channel::Sender<super::park::Park>,
    pub(super) park_rx: crossbeam_channel::Receiver<super::park::Park>,
    /// Wakes the device's thread from its wait on the client's socket.
    pub(super) wake: Option<OwnedFd>,
    /// Wakes the accept thread from its wait on the listening socket.
    pub(super) accept_wake: Option<OwnedFd>,
    pub(super) accept: AcceptHold,
}

/// Holding the accept thread between accepts (a live upgrade).
#[derive(Default)]
pub(super) struct AcceptHold {
    pub(super) paused: AtomicBool,
    pub(super) parked: AtomicBool,
    pub(super) lock: parking_lot::Mutex<()>,
    pub(super) cv: parking_lot::Condvar,
    /// A connection accepted while the device could not take it.
    pub(super) pending: Mutex<Option<UnixStream>>,
}

impl Default for Control {
    fn default() -> Self {
        let (park_tx, park_rx) = crossbeam_channel::unbounded();
        Control {
            stopping: AtomicBool::new(false),
            drain: Arc::default(),
            listener: Mutex::new(None),
            client: Mutex::new(None),
            park_tx,
            park_rx,
            wake: super::park::wake_fd(),
            accept_wake: super::park::wake_fd(),
            accept: AcceptHold::default(),
        }
    }
}

/// Who is on the other end of a socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Control {
    /// The client being served, if any: its credentials.
    pub fn client(&self) -> Option<Option<PeerCred>> {
        self.client.lock().as_ref().map(|(_, c)| *c)
    }

    /// Ends the connection of the client being served (the server then
    /// resets the device as for any disconnect).
    pub fn disconnect_client(&self) {
        if let Some((s, _)) = self.client.lock().as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Ends the current client's connection after its requests in flight
    /// have completed and been answered (graceful shutdown).
    pub fn drain_and_disconnect(&self) {
        self.drain.store(true, Ordering::SeqCst);
        if let Some((s, _)) = self.client.lock().as_ref() {
            // The client's further messages are not read: the loop sees
            // the end of its stream and closes after the drain.
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    }

    /// Keeps a handle on the listening socket, so that `stop` can wake its
    /// accept (done by `run_controlled` if the caller did not).
    pub fn watch_listener(&self, l: &UnixListener) -> io::Result<()> {
        let mut slot = self.listener.lock();
        if slot.is_none() {
            *slot = Some(l.try_clone()?);
        }
        Ok(())
    }

    /// Whether the server's loop has returned (see `stop`).
    pub fn stopped(&self) -> bool {
        self.stopping.load(Ordering::SeqCst) && self.client.lock().is_none()
    }

    /// Stops taking clients; the current one is served to its end (or
    /// until `disconnect_client`). `run_controlled` then returns.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(l) = self.listener.lock().as_ref() {
            // Wakes the accept thread (accept fails with EINVAL).
            // SAFETY: shutdown on a socket we own; no memory is passed.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(w) = &self.accept_wake {
            super::park::kick(w);
        }
        self.resume_accept();
    }

    /// The listening socket (a live upgrade hands it over).
    pub fn listener(&self) -> Option<UnixListener> {
        self.listener
            .lock()
            .as_ref()
            .and_then(|l| l.try_clone().ok())
    }
}

fn peer_cred(s: &UnixStream) -> Option<PeerCred> {
    // SAFETY: ucred is plain data; zeroed is valid and getsockopt fills it.
    let mut c: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = u32::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: the pointer and length describe `c`, which outlives the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(PeerCred {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    })
}

/// Extra room over the largest data transfer for headers and fixed structs.
/// Nothing legitimate is larger than this; anything that claims to be is
/// refused before a byte of it is allocated.
const MSG_OVERHEAD: u32 = 4096;

/// How long a reply may wait for the client to read: past it the client is
/// treated as gone.
const REPLY_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the rest of a message may take once its first byte came (the
/// thread only reads after poll says a message starts): a client that
/// stops in the middle of one would otherwise hold the device's thread,
/// its graceful stop and every live upgrade of the target, forever. QEMU
/// sends each message whole.
const MESSAGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// Between clients, how often windows still held by the last client's
/// requests are looked at again.
const RETIRED_SWEEP: std::time::Duration = std::time::Duration::from_millis(200);

/// How long a new connection waits for the previous client's teardown.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A request the server refuses: the errno for the reply, and why (for the log).
struct Reject {
    errno: Errno,
    why: String,
}

fn reject<T>(errno: Errno, why: impl Into<String>) -> Result<T, Reject> {
    Err(Reject {
        errno,
        why: why.into(),
    })
}

/// How one message ended for the connection.
enum Next {
    Continue,
    Close,
}

pub struct Server<D: Device> {
    pub(super) device: D,
    pub(super) dma: DmaTable,
    pub(super) config: ServerConfig,
    /// Set: at the end of a client, wait for its requests in flight first.
    drain_on_close: Arc<AtomicBool>,
    pub(super) log: Arc<DeviceLog>,
    /// The management plane's handle, once running under one.
    control: Option<Arc<Control>>,
}

/// Per-connection protocol state.
struct Conn<T: Transport> {
    stream: T,
    negotiated: bool,
    max_xfer: u32,
    /// Reply under construction: header space, then the payload. Reused
    /// for every message.
    reply: Vec<u8>,
    /// A descriptor to send with the reply (a mappable region's file).
    reply_fd: Option<std::os::fd::RawFd>,
}

/// The accept thread: takes connections and hands each to the device's
/// thread, which serves one at a time; stops between accepts while an
/// upgrade holds it.
fn accept_loop(
    listener: &UnixListener,
    ctl: &Control,
    tx: &crossbeam_channel::Sender<UnixStream>,
    log: &DeviceLog,
) {
    // Readiness comes from poll, so that an upgrade can wake the thread.
    let _ = listener.set_nonblocking(true);
    loop {
        if ctl.stopping.load(Ordering::SeqCst) {
            return;
        }
        if ctl.accept.paused.load(Ordering::SeqCst) {
            let mut g = ctl.accept.lock.lock();
            ctl.accept.parked.store(true, Ordering::SeqCst);
            while ctl.accept.paused.load(Ordering::SeqCst) && !ctl.stopping.load(Ordering::SeqCst) {
                ctl.accept
                    .cv
                    .wait_for(&mut g, std::time::Duration::from_millis(100));
            }
            ctl.accept.parked.store(false, Ordering::SeqCst);
            continue;
        }
        match super::park::wait_readable(listener.as_raw_fd(), ctl.accept_wake.as_ref()) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                crate::dev_log!(log, Error, "waiting for clients failed: {e}");
                thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        }
        match listener.accept() {
            Ok(_) if ctl.stopping.load(Ordering::SeqCst) => return,
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if !hand_over(ctl, tx, stream, log) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) if ctl.stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                crate::dev_log!(log, Error, "accept failed: {e}");
                thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Gives an accepted connection to the device's thread; false once that
/// thread is gone. A client that just left may still be being torn down:
/// the newcomer waits a moment before it is called a second client. An
/// upgrade that pauses the thread meanwhile keeps the connection.
fn hand_over(
    ctl: &Control,
    tx: &crossbeam_channel::Sender<UnixStream>,
    stream: UnixStream,
    log: &DeviceLog,
) -> bool {
    let until = std::time::Instant::now() + HANDOVER_WAIT;
    let mut s = stream;
    loop {
        if ctl.accept.paused.load(Ordering::SeqCst) {
            *ctl.accept.pending.lock() = Some(s);
            return true;
        }
        match tx.send_timeout(s, std::time::Duration::from_millis(10)) {
            Ok(()) => return true,
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
            Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                if std::time::Instant::now() >= until {
                    crate::dev_log!(
                        log,
                        Warn,
                        "refusing a second client: this device serves one client at a time"
                    );
                    return true;
                }
                s = back;
            }
        }
    }
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_VERSION => "VERSION",
        CMD_DMA_MAP => "DMA_MAP",
        CMD_DMA_UNMAP => "DMA_UNMAP",
        CMD_DEVICE_GET_INFO => "DEVICE_GET_INFO",
        CMD_DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        CMD_DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        CMD_DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        CMD_DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        CMD_REGION_READ => "REGION_READ",
        CMD_REGION_WRITE => "REGION_WRITE",
        CMD_DMA_READ => "DMA_READ",
        CMD_DMA_WRITE => "DMA_WRITE",
        CMD_DEVICE_RESET => "DEVICE_RESET",
        _ => "unknown command",
    }
}

impl<D: Device> Server<D> {
    /// `memory` is the guest memory handle the device reads and writes
    /// through; the server's DMA table fills it in.
    /// `share` is the device's part of the process's budget of windows
    /// (see [`super::budget`]).
    pub fn new(
        device: D,
        memory: GuestMemoryHandle,
        config: ServerConfig,
        share: Arc<super::budget::Share>,
        log: Arc<DeviceLog>,
    ) -> Server<D> {
        let dma = DmaTable::new(memory, config.max_dma_maps as usize, share, log.clone());
        Server {
            device,
            dma,
            config,
            drain_on_close: Arc::default(),
            log,
            control: None,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The guest memory the DMA table fills in.
    pub fn memory(&self) -> GuestMemoryHandle {
        self.dma.memory()
    }

    /// Number of DMA windows currently mapped.
    pub fn dma_windows(&self) -> usize {
        self.dma.len()
    }

    /// Serves clients one after the other, forever. A client that connects
    /// while another is being served is told so in the log and disconnected
    /// at once, rather than left waiting for a reply that cannot come.
    pub fn run(&mut self, listener: UnixListener) -> io::Result<()> {
        self.run_controlled(listener, &Arc::new(Control::default()))
    }

    /// [`run`](Self::run), until `control` says stop.
    pub fn run_controlled(
        &mut self,
        listener: UnixListener,
        control: &Arc<Control>,
    ) -> io::Result<()> {
        self.run_with(listener, control, None)
    }

    /// [`run_controlled`](Self::run_controlled) in a new binary after a
    /// live upgrade: first on with the client the old binary served.
    pub fn run_restored(
        &mut self,
        listener: UnixListener,
        control: &Arc<Control>,
        client: Option<super::park::Resumed>,
    ) -> io::Result<()> {
        self.run_with(listener, control, client)
    }

    fn run_with(
        &mut self,
        listener: UnixListener,
        control: &Arc<Control>,
        first: Option<super::park::Resumed>,
    ) -> io::Result<()> {
        let (tx, rx) = crossbeam_channel::bounded::<UnixStream>(0);
        control.watch_listener(&listener)?;
        self.drain_on_close = control.drain.clone();
        self.control = Some(control.clone());
        let ctl = control.clone();
        let log = self.log.clone();
        thread::Builder::new()
            .name("vfio-user-accept".into())
            .spawn(move || accept_loop(&listener, &ctl, &tx, &log))?;
        if let Some(r) = first {
            self.attach(control, r.stream, Some((r.negotiated, r.max_xfer)));
        }
        let parks = control.park_requests().clone();
        while !control.stopping.load(Ordering::SeqCst) {
            crossbeam_channel::select! {
                recv(rx) -> s => match s {
                    Ok(s) => self.attach(control, s, None),
                    Err(_) => break,
                },
                recv(parks) -> p => {
                    if let Ok(p) = p {
                        self.park(p, None, crate::handover::Outgoing::default());
                    }
                }
                // Between clients: give back the windows the last one's
                // requests held a little longer than the client itself.
                default(RETIRED_SWEEP) => self.dma.sweep(),
            }
        }
        Ok(())
    }

    /// Serves one accepted client (or, `resumed`, one a previous binary
    /// served: past VERSION, with its transfer size) to its end.
    fn attach(&mut self, control: &Arc<Control>, stream: UnixStream, resumed: Option<(bool, u32)>) {
        if control.stopping.load(Ordering::SeqCst) {
            return;
        }
        let cred = peer_cred(&stream);
        // A client that stops reading its replies must not hold this
        // thread (and a graceful shutdown) forever: QEMU reads every
        // reply at once.
        let _ = stream.set_write_timeout(Some(REPLY_WRITE_TIMEOUT));
        // (Reads start only once poll saw a message begin: see
        // `between_messages`.)
        let _ = stream.set_read_timeout(Some(MESSAGE_DEADLINE));
        *control.client.lock() = stream.try_clone().ok().map(|s| (s, cred));
        let pid = cred.map_or(-1, |c| c.pid);
        if resumed.is_none() {
            self.log.event(Event::ClientAttached {
                pid,
                uid: cred.map_or(u32::MAX, |c| c.uid),
                gid: cred.map_or(u32::MAX, |c| c.gid),
            });
        }
        self.serve_from(stream, resumed);
        *control.client.lock() = None;
        self.log.event(Event::ClientDetached { pid });
    }

    /// Serves one client until it disconnects or breaks the stream, then
    /// returns the device to its power-on state with no DMA windows and no
    /// interrupt descriptors, ready for the next client.
    pub fn serve(&mut self, stream: UnixStream) {
        self.serve_on(stream);
    }

    /// Serves one client over any transport (see [`Transport`]); the same
    /// loop as on a socket, so a fuzzer or a test can drive it in memory.
    /// Returns the transport, with what the server sent.
    pub fn serve_on<T: Transport>(&mut self, stream: T) -> T {
        self.serve_from(stream, None)
    }

    fn serve_from<T: Transport>(&mut self, stream: T, resumed: Option<(bool, u32)>) -> T {
        if resumed.is_none() {
            crate::dev_log!(self.log, Info, "client connected");
            // What the last client's requests still held is back by now,
            // or stays counted.
            self.dma.sweep();
            self.dma.set_max_windows(self.config.max_dma_maps as usize);
        }
        let (negotiated, max_xfer) = resumed.unwrap_or((false, self.config.max_data_xfer_size));
        let mut conn = Conn {
            stream,
            negotiated,
            max_xfer,
            reply: Vec::new(),
            reply_fd: None,
        };
        let mut payload = Vec::new();
        loop {
            match self.between_messages(&conn) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    crate::dev_log!(self.log, Warn, "connection error: {e}");
                    break;
                }
            }
            match self.handle_one(&mut conn, &mut payload) {
                Ok(Next::Continue) => {}
                Ok(Next::Close) => break,
                Err(e) => {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        crate::dev_log!(
                            self.log,
                            Warn,
                            "client closed the socket in the middle of a message"
                        );
                    } else {
                        crate::dev_log!(self.log, Warn, "connection error: {e}");
                    }
                    break;
                }
            }
        }
        if self.drain_on_close.load(Ordering::SeqCst) {
            // Graceful: what the client asked for completes and is answered.
            self.device.quiesce(None);
        }
        // The queues stop at once (nothing more is written for this client,
        // and nothing waits for a backend that may be stuck), then the
        // windows become private memory, so that I/O still in flight cannot
        // reach the client's, then they go.
        self.device.disconnect();
        self.dma.revoke_all();
        self.dma.clear();
        crate::dev_log!(
            self.log,
            Info,
            "client disconnected; device reset, DMA windows and interrupt descriptors dropped"
        );
        conn.stream
    }

    /// Before reading a message: waits for one (true), or for an upgrade's
    /// request to stop, which is answered here (false: look again).
    fn between_messages<T: Transport>(&mut self, conn: &Conn<T>) -> io::Result<bool> {
        let (Some(fd), Some(control)) = (conn.stream.fd(), self.control.clone()) else {
            return Ok(true);
        };
        if let Ok(p) = control.park_requests().try_recv() {
            let mut out = crate::handover::Outgoing::default();
            // SAFETY: the connection's descriptor, open while `conn` lives.
            let n = out.add(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
            let client = super::park::SavedClient {
                fd: n,
                negotiated: conn.negotiated,
                max_xfer: conn.max_xfer,
            };
            self.park(p, Some(client), out);
            return Ok(false);
        }
        super::park::wait_readable(fd, control.wake.as_ref())
    }

    fn handle_one<T: Transport>(
        &mut self,
        conn: &mut Conn<T>,
        payload: &mut Vec<u8>,
    ) -> io::Result<Next> {
        let Some((hdr, rh)) = self.receive(conn, payload)? else {
            return Ok(Next::Close);
        };
        match hdr.msg_type() {
            FLAG_TYPE_COMMAND => {}
            FLAG_TYPE_REPLY => {
                crate::dev_log!(self.log, Warn,
                    "unexpected reply (id {}, command {}) from the client: we sent no request; discarded",
                    hdr.msg_id, hdr.command
                );
                return Ok(Next::Continue);
            }
            t => {
                crate::dev_log!(
                    self.log,
                    Warn,
                    "message {} has invalid type {t}: closing",
                    hdr.msg_id
                );
                return Ok(Next::Close);
            }
        }
        let mut out = std::mem::take(&mut conn.reply);
        out.clear();
        out.resize(HEADER_SIZE, 0);
        let mut close_after = false;
        let result = match self.admit(conn, &hdr, &rh) {
            Err(r) => Err(r),
            Ok(()) => {
                let r = self.dispatch(conn, hdr.command, payload, rh.fds, &mut out);
                // A VERSION its handler refused ends the connection.
                close_after = hdr.command == CMD_VERSION && r.is_err();
                r
            }
        };
        let sent = self.reply(conn, &hdr, result, &mut out);
        conn.reply = out;
        sent?;
        Ok(if close_after {
            Next::Close
        } else {
            Next::Continue
        })
    }

    /// Reads one message: its header, descriptors and payload (into
    /// `payload`). None: the stream ended, or cannot go on.
    fn receive<T: Transport>(
        &mut self,
        conn: &mut Conn<T>,
        payload: &mut Vec<u8>,
    ) -> io::Result<Option<(Header, RecvHeader)>> {
        let Some(rh) = conn.stream.recv_header()? else {
            return Ok(None);
        };
        let hdr = Header::decode(&rh.bytes);
        let cap = self.config.max_data_xfer_size.saturating_add(MSG_OVERHEAD);
        if (hdr.msg_size as usize) < HEADER_SIZE {
            crate::dev_log!(self.log, Warn,
                "message {} claims size {} < {HEADER_SIZE}: the stream cannot be resynchronised, closing",
                hdr.msg_id, hdr.msg_size
            );
            return Ok(None);
        }
        if hdr.msg_size > cap {
            crate::dev_log!(
                self.log,
                Warn,
                "message {} ({}) claims size {} > limit {cap}: closing",
                hdr.msg_id,
                command_name(hdr.command),
                hdr.msg_size
            );
            return Ok(None);
        }
        let body = hdr.msg_size as usize - HEADER_SIZE;
        payload.clear();
        payload.resize(body, 0);
        conn.stream.recv_exact(payload)?;
        Ok(Some((hdr, rh)))
    }

    /// What every command must pass before its handler sees it.
    fn admit<T: Transport>(
        &self,
        conn: &Conn<T>,
        hdr: &Header,
        rh: &RecvHeader,
    ) -> Result<(), Reject> {
        if rh.fds_truncated {
            return reject(
                libc::EINVAL,
                format!("more than {MAX_RECV_FDS} descriptors; the kernel dropped some"),
            );
        }
        if rh.fds.len() > self.config.max_msg_fds as usize {
            return reject(
                libc::EINVAL,
                format!(
                    "{} descriptors > max_msg_fds {}",
                    rh.fds.len(),
                    self.config.max_msg_fds
                ),
            );
        }
        if !conn.negotiated && hdr.command != CMD_VERSION {
            return reject(libc::EINVAL, "VERSION must come first");
        }
        Ok(())
    }

    /// Sends the reply to `hdr` (unless the client asked for none): `out`
    /// holds room for the header and the payload the handler wrote; an
    /// error reply is the header alone.
    fn reply<T: Transport>(
        &mut self,
        conn: &mut Conn<T>,
        hdr: &Header,
        result: Result<(), Reject>,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let name = command_name(hdr.command);
        let (flags, error) = match result {
            Ok(()) => {
                crate::dev_debug!(self.log, "{name} (id {}) ok", hdr.msg_id);
                (FLAG_TYPE_REPLY, 0)
            }
            Err(r) => {
                crate::dev_log!(
                    self.log,
                    Warn,
                    "{name} (id {}, command {}) refused with errno {}: {}",
                    hdr.msg_id,
                    hdr.command,
                    r.errno,
                    r.why
                );
                out.truncate(HEADER_SIZE);
                (FLAG_TYPE_REPLY | FLAG_ERROR, r.errno.unsigned_abs())
            }
        };
        let header = Header {
            msg_id: hdr.msg_id,
            command: hdr.command,
            msg_size: u32::try_from(out.len()).unwrap_or(u32::MAX),
            flags,
            error,
        };
        out[..HEADER_SIZE].copy_from_slice(&header.encode());
        let fd = conn.reply_fd.take();
        if hdr.no_reply() {
            return Ok(());
        }
        match fd {
            Some(fd) if error == 0 => conn.stream.send_with_fd(out, fd),
            _ => conn.stream.send_all(out),
        }
    }

    /// Hands a command to its handler.
    fn dispatch<T: Transport>(
        &mut self,
        conn: &mut Conn<T>,
        command: u16,
        p: &[u8],
        fds: Vec<OwnedFd>,
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let takes_fds = matches!(command, CMD_DMA_MAP | CMD_DEVICE_SET_IRQS);
        if !takes_fds && !fds.is_empty() {
            return reject(
                libc::EINVAL,
                format!("{} descriptors on a command that takes none", fds.len()),
            );
        }
        match command {
            CMD_VERSION => self.version(conn, p, out),
            CMD_DMA_MAP => self.dma_map(p, fds),
            CMD_DMA_UNMAP => self.dma_unmap(p, out),
            CMD_DEVICE_GET_INFO => self.device_info(p, out),
            CMD_DEVICE_GET_REGION_INFO => self.region_info(conn, p, out),
            CMD_DEVICE_GET_IRQ_INFO => self.irq_info(p, out),
            CMD_DEVICE_SET_IRQS => self.set_irqs(p, fds),
            CMD_REGION_READ => self.region_read(conn, p, out),
            CMD_REGION_WRITE => self.region_write(conn, p, out),
            CMD_DEVICE_RESET => {
                self.device.reset();
                Ok(())
            }
            CMD_DEVICE_GET_REGION_IO_FDS | CMD_DMA_READ | CMD_DMA_WRITE | 14..=18 => {
                reject(libc::ENOTSUP, "command not supported by this server")
            }
            _ => reject(libc::ENOSYS, "unknown command"),
        }
    }

    fn dma_map(&mut self, p: &[u8], mut fds: Vec<OwnedFd>) -> Result<(), Reject> {
        let m = DmaMap::decode(p)?;
        if fds.len() > 1 {
            return reject(libc::EINVAL, "DMA_MAP takes at most one descriptor");
        }
        crate::dev_debug!(
            self.log,
            "DMA_MAP {:#x}+{:#x} offset {:#x} flags {:#x} fd {}",
            m.iova,
            m.size,
            m.offset,
            m.flags,
            !fds.is_empty()
        );
        self.dma
            .map(m.iova, m.size, m.offset, m.flags, fds.pop())
            .map_err(|e| Reject {
                errno: e.errno(),
                why: e.to_string(),
            })?;
        self.device.dma_mapped();
        Ok(())
    }

    fn dma_unmap(&mut self, p: &[u8], out: &mut Vec<u8>) -> Result<(), Reject> {
        let u = DmaUnmap::decode(p)?;
        let (flags, iova, size) = (u.flags, u.iova, u.size);
        crate::dev_debug!(self.log, "DMA_UNMAP {iova:#x}+{size:#x} flags {flags:#x}");
        // Only what uses this window stops (everything for unmap-all). A
        // request the table refuses (no such window, bad flags) stops
        // nothing.
        let all = flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 && iova == 0 && size == 0;
        let r = match (all, self.dma.find(iova, size)) {
            (false, None) => self.dma.unmap(iova, size, flags),
            (all, range) => {
                self.device.quiesce(if all { None } else { range });
                let r = self.dma.unmap(iova, size, flags);
                self.device.resume();
                r
            }
        };
        r.map_err(|e| Reject {
            errno: e.errno(),
            why: e.to_string(),
        })?;
        out.extend_from_slice(&p[..DMA_UNMAP_SIZE]);
        Ok(())
    }

    fn device_info(&mut self, p: &[u8], out: &mut Vec<u8>) -> Result<(), Reject> {
        let q = InfoQuery::decode(p, DEVICE_INFO_SIZE)?;
        argsz_at_least(q.argsz, DEVICE_INFO_SIZE)?;
        out.put_u32(DEVICE_INFO_SIZE_U32);
        out.put_u32(VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
        out.put_u32(self.device.num_regions());
        out.put_u32(self.device.num_irqs());
        Ok(())
    }

    fn region_info<T: Transport>(
        &mut self,
        conn: &mut Conn<T>,
        p: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let q = InfoQuery::decode(p, REGION_INFO_SIZE)?;
        argsz_at_least(q.argsz, REGION_INFO_SIZE)?;
        let index = q.index;
        if index >= self.device.num_regions() {
            return reject(libc::EINVAL, format!("no region {index}"));
        }
        let info = self.device.region_info(index);
        let Some(m) = info.mmap else {
            out.put_u32(REGION_INFO_SIZE_U32);
            out.put_u32(info.flags);
            out.put_u32(index);
            out.put_u32(0); // cap_offset: no capabilities
            out.put_u64(info.size);
            out.put_u64(0); // mmap offset: nothing is mappable
            return Ok(());
        };
        // A sparse-mmap capability right after the info; the whole of it
        // only when the client's argsz leaves room (else it learns the size
        // it needs and asks again), and the file with every reply.
        let areas = u32::try_from(m.areas.len()).unwrap_or(0);
        let cap_len = SPARSE_CAP_HEADER + 16 * areas;
        let full = REGION_INFO_SIZE_U32 + cap_len;
        let room = q.argsz >= full;
        out.put_u32(full);
        // CAPS only with the chain itself: QEMU refuses a reply that says
        // CAPS with no capability offset.
        let caps = if room { VFIO_REGION_INFO_FLAG_CAPS } else { 0 };
        out.put_u32(info.flags | VFIO_REGION_INFO_FLAG_MMAP | caps);
        out.put_u32(index);
        out.put_u32(if room { REGION_INFO_SIZE_U32 } else { 0 });
        out.put_u64(info.size);
        out.put_u64(m.offset);
        if room {
            out.put_u16(VFIO_REGION_INFO_CAP_SPARSE_MMAP_U16);
            out.put_u16(1); // version
            out.put_u32(0); // next: the last capability
            out.put_u32(areas);
            out.put_u32(0);
            for (off, size) in m.areas.iter().take(areas as usize) {
                out.put_u64(*off);
                out.put_u64(*size);
            }
        }
        conn.reply_fd = Some(m.fd);
        Ok(())
    }

    fn irq_info(&mut self, p: &[u8], out: &mut Vec<u8>) -> Result<(), Reject> {
        let q = InfoQuery::decode(p, IRQ_INFO_SIZE)?;
        argsz_at_least(q.argsz, IRQ_INFO_SIZE)?;
        let index = q.index;
        if index >= self.device.num_irqs() {
            return reject(libc::EINVAL, format!("no IRQ index {index}"));
        }
        let info = self.device.irq_info(index);
        out.put_u32(IRQ_INFO_SIZE_U32);
        out.put_u32(info.flags);
        out.put_u32(index);
        out.put_u32(info.count);
        Ok(())
    }

    fn set_irqs(&mut self, p: &[u8], fds: Vec<OwnedFd>) -> Result<(), Reject> {
        let set = self.parse_irq_set(p, fds)?;
        crate::dev_debug!(self.log, "SET_IRQS {set:?}");
        self.device.set_irqs(set).map_err(|errno| Reject {
            errno,
            why: "refused by the device".into(),
        })
    }

    fn region_read<T: Transport>(
        &mut self,
        conn: &Conn<T>,
        p: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let a = decode_access(p)?;
        if p.len() != REGION_ACCESS_SIZE {
            return reject(
                libc::EINVAL,
                format!(
                    "payload of {} bytes, expected {REGION_ACCESS_SIZE}",
                    p.len()
                ),
            );
        }
        self.check_access(conn, &a)?;
        let count = a.count as usize;
        a.encode_into(out);
        let data = out.len();
        out.resize(data + count, 0);
        if count > 0 {
            self.device
                .region_read(a.region, a.offset, &mut out[data..])
                .map_err(|errno| Reject {
                    errno,
                    why: format!("read of region {} refused", a.region),
                })?;
        }
        Ok(())
    }

    fn region_write<T: Transport>(
        &mut self,
        conn: &Conn<T>,
        p: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let a = decode_access(p)?;
        let data = &p[REGION_ACCESS_SIZE..];
        if data.len() != a.count as usize {
            return reject(
                libc::EINVAL,
                format!("count {} but {} data bytes", a.count, data.len()),
            );
        }
        self.check_access(conn, &a)?;
        if a.count > 0 {
            self.device
                .region_write(a.region, a.offset, data)
                .map_err(|errno| Reject {
                    errno,
                    why: format!("write to region {} refused", a.region),
                })?;
        }
        a.encode_into(out);
        Ok(())
    }

    fn version<T: Transport>(
        &mut self,
        conn: &mut Conn<T>,
        p: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        if conn.negotiated {
            return reject(libc::EINVAL, "VERSION sent twice");
        }
        if p.len() < 4 {
            return Err(Short {
                have: p.len(),
                need: 4,
            }
            .into());
        }
        let major = u16::from_le_bytes([p[0], p[1]]);
        if major != 0 {
            return reject(
                libc::EINVAL,
                format!("client proposes major version {major}; we speak 0"),
            );
        }
        // The capabilities: JSON text, NUL-terminated when present.
        let text = &p[4..];
        let text = text.strip_suffix(&[0]).unwrap_or(text);
        let caps = if text.is_empty() {
            serde_json::Value::Null
        } else {
            let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| Reject {
                errno: libc::EINVAL,
                why: format!("capabilities JSON: {e}"),
            })?;
            v.get("capabilities")
                .cloned()
                .unwrap_or(serde_json::Value::Null)
        };
        let num = |key: &str, default: u64| -> Result<u64, Reject> {
            match caps.get(key) {
                None => Ok(default),
                Some(v) => v.as_u64().ok_or(Reject {
                    errno: libc::EINVAL,
                    why: format!("capability {key} is not a number"),
                }),
            }
        };
        let cfg = &self.config;
        let max_msg_fds = num("max_msg_fds", 1)?.min(u64::from(cfg.max_msg_fds));
        let max_xfer = num("max_data_xfer_size", 1 << 20)?.min(u64::from(cfg.max_data_xfer_size));
        let max_dma_maps = num("max_dma_maps", 65535)?.min(u64::from(cfg.max_dma_maps));
        let pgsizes = num("pgsizes", DMA_PAGE_SIZE)? & DMA_PAGE_SIZE;
        if pgsizes == 0 {
            return reject(
                libc::EINVAL,
                format!("client page sizes do not include {DMA_PAGE_SIZE}"),
            );
        }
        // All of these are at most our own u32 limits now.
        conn.max_xfer = u32::try_from(max_xfer).unwrap_or(cfg.max_data_xfer_size);
        self.dma
            .set_max_windows(usize::try_from(max_dma_maps).unwrap_or(cfg.max_dma_maps as usize));
        conn.negotiated = true;
        let json = serde_json::json!({"capabilities": {
            "max_msg_fds": max_msg_fds,
            "max_data_xfer_size": max_xfer,
            "pgsizes": pgsizes,
            "max_dma_maps": max_dma_maps,
        }})
        .to_string();
        crate::dev_log!(self.log, Info, "version 0.0 negotiated: {json}");
        out.put_u16(0);
        out.put_u16(0);
        out.extend_from_slice(json.as_bytes());
        out.push(0);
        Ok(())
    }

    fn check_access<T: Transport>(&self, conn: &Conn<T>, a: &RegionAccess) -> Result<(), Reject> {
        if a.count > conn.max_xfer {
            return reject(
                libc::EINVAL,
                format!("count {} > max_data_xfer_size {}", a.count, conn.max_xfer),
            );
        }
        if a.region >= self.device.num_regions() {
            return reject(libc::EINVAL, format!("no region {}", a.region));
        }
        let size = self.device.region_info(a.region).size;
        match a.offset.checked_add(u64::from(a.count)) {
            Some(end) if size > 0 && end <= size => Ok(()),
            _ => reject(
                libc::EINVAL,
                format!(
                    "access {:#x}+{} outside region {} of size {size:#x}",
                    a.offset, a.count, a.region
                ),
            ),
        }
    }

    fn parse_irq_set(&self, p: &[u8], fds: Vec<OwnedFd>) -> Result<IrqSet, Reject> {
        let (h, extra) = IrqSetHeader::decode(p)?;
        let (flags, index, start, count) = (h.flags, h.index, h.start, h.count);
        if flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0 {
            return reject(libc::EINVAL, format!("unknown flags {flags:#x}"));
        }
        let action = match flags & VFIO_IRQ_SET_ACTION_TYPE_MASK {
            VFIO_IRQ_SET_ACTION_MASK => IrqAction::Mask,
            VFIO_IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            VFIO_IRQ_SET_ACTION_TRIGGER => IrqAction::Trigger,
            a => {
                return reject(
                    libc::EINVAL,
                    format!("action bits {a:#x}: need exactly one"),
                )
            }
        };
        let data_kind = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        if index >= self.device.num_irqs() {
            return reject(libc::EINVAL, format!("no IRQ index {index}"));
        }
        let avail = self.device.irq_info(index).count;
        let in_range = start.checked_add(count).is_some_and(|end| end <= avail);
        let teardown = count == 0
            && start == 0
            && action == IrqAction::Trigger
            && data_kind == VFIO_IRQ_SET_DATA_NONE;
        if !teardown && (count == 0 || !in_range) {
            return reject(
                libc::EINVAL,
                format!("sub-indices {start}+{count} outside index {index} (count {avail})"),
            );
        }
        let data = match data_kind {
            VFIO_IRQ_SET_DATA_NONE => {
                if !fds.is_empty() || !extra.is_empty() {
                    return reject(libc::EINVAL, "DATA_NONE with data or descriptors");
                }
                IrqData::None
            }
            VFIO_IRQ_SET_DATA_BOOL => {
                if !fds.is_empty() || extra.len() != count as usize {
                    return reject(
                        libc::EINVAL,
                        format!("DATA_BOOL needs {count} bytes, got {}", extra.len()),
                    );
                }
                IrqData::Bool(extra.iter().map(|&b| b != 0).collect())
            }
            VFIO_IRQ_SET_DATA_EVENTFD => {
                if !extra.is_empty() || !(fds.is_empty() || fds.len() == count as usize) {
                    return reject(
                        libc::EINVAL,
                        format!(
                            "DATA_EVENTFD with {} descriptors for {count} sub-indices",
                            fds.len()
                        ),
                    );
                }
                IrqData::Eventfds(fds)
            }
            d => return reject(libc::EINVAL, format!("data bits {d:#x}: need exactly one")),
        };
        Ok(IrqSet {
            index,
            action,
            start,
            count,
            data,
        })
    }
}

impl From<Short> for Reject {
    fn from(e: Short) -> Reject {
        Reject {
            errno: libc::EINVAL,
            why: e.to_string(),
        }
    }
}

fn decode_access(p: &[u8]) -> Result<RegionAccess, Reject> {
    RegionAccess::decode(p).ok_or(Reject {
        errno: libc::EINVAL,
        why: format!("payload of {} bytes, need {REGION_ACCESS_SIZE}", p.len()),
    })
}

/// `argsz` is the reply budget; it must at least hold the fixed reply.
fn argsz_at_least(argsz: u32, n: usize) -> Result<(), Reject> {
    if (argsz as usize) < n {
        return reject(libc::EINVAL, format!("argsz {argsz} < {n}"));
    }
    Ok(())
}
