//! One NBD connection's transmission phase, on a thread of its own: a
//! non-blocking socket and an eventfd in one poll(2), requests written as
//! they come (several in one sendmsg), replies matched to requests by
//! cookie and read straight into the guest's buffers.
//!
//! Submitters hand a [`Sub`] over under a short lock and ring the eventfd
//! only when the thread sleeps. Requests live in a slab whose slots and
//! buffer lists are reused: nothing is allocated per request once the slab
//! has grown to the disk's queue depth.
//!
//! A connection that breaks (the server killed, restarted, gone from the
//! network, shutting down, or answering nonsense) is made again; requests
//! it held are sent again, in the order they first went, on the new one.
//! A request that has waited longer than the reconnect delay since its
//! connection first broke fails (EIO), and so does every new one until the
//! server is back: the device's error policy takes it from there. Closing
//! the broken socket first means no late reply can write into memory given
//! back meanwhile.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vmm_sys_util::eventfd::EventFd;

use super::proto::{self, Export};
use crate::backend::io::{AioTag, GuestIov};
use crate::memory::{as_iovecs, sub_iovecs};

/// A request for the connection: an NBD command on the given buffers.
pub struct Sub {
    pub cmd: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
    /// Reads and writes: the guest's buffers (kept mapped by the request's
    /// owner until `tag` completes).
    pub iov: Vec<GuestIov>,
    pub tag: Arc<AioTag>,
}

/// How to make the connection again, and what it must find.
pub trait Dial: Send + Sync {
    /// A new connected, handshaken socket, by `deadline`.
    fn dial(&self, deadline: Instant) -> Result<(OwnedFd, Export), String>;
    /// What it connects to, for the log.
    fn name(&self) -> &str;
}

/// A connection: what submitters, reactors and the connection's thread
/// share.
pub struct Shared {
    q: Mutex<Queue>,
    wake: EventFd,
    sleeping: AtomicBool,
    /// The connection itself: the thread holds it while it works (never
    /// while it sleeps); a reactor that drives it takes it only if free.
    state: Mutex<Conn>,
    /// A reactor reads the replies (it drove the connection lately): the
    /// thread leaves the socket's input alone.
    driven: AtomicBool,
    /// When a reactor last drove it (µs since the first connection).
    last_drive: AtomicU64,
}

/// A driving reactor passes far more often than this: silence this long
/// means it has stopped without a word, and the thread takes over.
const DRIVE_STALE_US: u64 = 500;

fn now_us() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

struct Queue {
    subs: VecDeque<Sub>,
    /// Buffer lists given back by completed requests, for the next ones.
    spare: Vec<Vec<GuestIov>>,
    stop: bool,
}

impl Shared {
    /// Hands `sub` to the connection, its buffers a copy of `iov` in a list
    /// given back by an earlier request (one lock, no allocation once the
    /// lists are there). From a reactor (`driver`), it goes out when the
    /// reactor drives the connection at the end of its pass; from anywhere
    /// else, the thread sends it.
    pub fn submit(&self, mut sub: Sub, iov: &[GuestIov], driver: bool) {
        {
            let mut q = self.q.lock();
            let mut list = q.spare.pop().unwrap_or_default();
            list.extend_from_slice(iov);
            sub.iov = list;
            q.subs.push_back(sub);
        }
        if !driver && self.sleeping.load(Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
    }

    /// On a reactor: sends what was submitted and reads what came back,
    /// without blocking (nothing, if the thread holds the connection or it
    /// is down). True if anything moved.
    pub fn drive(&self) -> bool {
        let Some(mut c) = self.state.try_lock() else {
            return false;
        };
        if c.sock.is_none() {
            return false;
        }
        self.last_drive.store(now_us(), Ordering::Relaxed);
        self.driven.store(true, Ordering::Relaxed);
        let before = c.moved;
        c.take_submissions(&self.q);
        if let Err(why) = c.pump() {
            c.lose(&why);
            drop(c);
            // The thread connects again.
            let _ = self.wake.write(1);
            return true;
        }
        c.moved != before
    }

    /// The driving reactor goes to sleep: the thread reads the replies.
    pub fn undriven(&self) {
        if self.driven.swap(false, Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
    }

    /// Whether a reactor drives the connection now (and has lately).
    fn reactor_drives(&self) -> bool {
        if !self.driven.load(Ordering::SeqCst) {
            return false;
        }
        let last = self.last_drive.load(Ordering::Relaxed);
        if now_us().saturating_sub(last) > DRIVE_STALE_US {
            self.driven.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Ends the connection once nothing is left in it (the disk is gone:
    /// nothing is).
    pub fn stop(&self) {
        self.q.lock().stop = true;
        let _ = self.wake.write(1);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    /// Waiting to be written (whole or in part).
    Queued,
    /// Written: waiting for its reply.
    Sent,
}

struct Entry {
    state: State,
    /// Bumped at each use of the slot, part of the cookie: a reply for a
    /// request that is not there is told apart.
    generation: u32,
    /// Order of submission: requests are sent again in it.
    seq: u64,
    sub: Option<Sub>,
    hdr: [u8; proto::REQUEST_LEN],
    /// Bytes of a read's buffers a structured reply has covered.
    covered: u64,
    /// An error chunk's errno, reported when the reply is done.
    error: Option<i32>,
    /// When the connection it was on first broke.
    lost_at: Option<Instant>,
    /// Since when it has waited on the current connection (queued on it,
    /// or sent again on it).
    since: Instant,
    /// The byte ranges of a read that reply chunks have filled (no two
    /// may overlap; the capacity stays with the slot).
    chunks: Vec<(u64, u64)>,
}

/// Where the reader is in the byte stream.
enum Rx {
    /// A reply or chunk header (`hdr_got` bytes of it so far).
    Header,
    /// A structured chunk's own fields (`small`), before or instead of
    /// data.
    Fields {
        slot: u32,
        kind: u16,
        flags: u16,
        want: usize,
        /// Chunk bytes after the fields (OFFSET_DATA's data).
        rest: usize,
    },
    /// Read data, into the request's buffers at `at`.
    Data {
        slot: u32,
        at: usize,
        left: usize,
        done: bool,
    },
}

/// Why the connection is being dropped.
type Lost = String;

/// Largest structured chunk (other than data) accepted: an error with its
/// message, a hole.
const MAX_FIELDS: usize = 8 + 4096 + 16;
/// Bytes read ahead of the reply being parsed.
const READ_AHEAD: usize = 64 << 10;
/// Read data at least this long, with nothing read ahead, goes straight
/// from the socket into the guest's buffers.
const DIRECT_READ: usize = 16 << 10;
/// iovecs in one sendmsg / readv.
const IOV_BATCH: usize = 1024;
/// A connection that breaks within this of being made is made again only
/// after a pause, growing each time.
const SHORT_LIVED: Duration = Duration::from_secs(1);
/// A server that answers nothing for this long while requests wait for it
/// is taken as gone: the connection is made again (and the requests sent
/// again, within the reconnect delay).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// Longest wait between attempts to connect again.
const RECONNECT_MAX_PAUSE: Duration = Duration::from_secs(1);

/// iovecs built and used within one call (the pointers they hold are
/// never kept), so the list may move between threads with the connection.
struct IovList(Vec<libc::iovec>);

// SAFETY: the list holds no pointer between calls that use it (it is
// cleared and refilled each time), so moving it to another thread moves
// nothing that points anywhere.
unsafe impl Send for IovList {}

/// How long requests wait: for a server that went away (`delay`, the
/// disk's reconnect delay), and for one that stays but says nothing
/// (`silence`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub delay: Duration,
    pub silence: Duration,
}

pub struct Conn {
    dial: Arc<dyn Dial>,
    delay: Duration,
    silence: Duration,
    export: Export,
    sock: Option<OwnedFd>,
    slab: Vec<Entry>,
    free: Vec<u32>,
    /// Slots to write, in order; the first has `sent` bytes written.
    send_q: VecDeque<u32>,
    sent: usize,
    next_seq: u64,
    in_flight: usize,
    rx: Rx,
    hdr: [u8; proto::CHUNK_HEADER_LEN],
    hdr_got: usize,
    small: Vec<u8>,
    small_got: usize,
    /// The stream read ahead (replies' headers, small payloads): many
    /// replies come in one recv. `rpos..rend` is not yet taken.
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    /// The last read's data was large (went straight to the guest).
    large_data: bool,
    /// When the connection broke (None: it is up).
    down_since: Option<Instant>,
    /// Requests fail at once: the server has been away longer than the
    /// delay.
    expired: bool,
    next_try: Instant,
    pause: Duration,
    iovs: IovList,
    scratch: Vec<GuestIov>,
    given_back: Vec<Vec<GuestIov>>,
    /// Bumped when a request is written or completed.
    moved: u64,
    /// When the connection was made.
    connected_at: Instant,
}

/// The connection's thread: sends what the pool's threads submit, reads
/// replies while no reactor does, connects again when the connection
/// breaks, and fails what waited too long.
fn run(shared: &Shared) {
    loop {
        let mut c = shared.state.lock();
        let stop = c.take_submissions(&shared.q);
        if stop && c.in_flight == 0 {
            c.say_goodbye();
            return;
        }
        let (fd, read, until) = if c.sock.is_some() {
            let driven = shared.reactor_drives();
            let r = if driven { c.send() } else { c.pump() };
            if let Err(why) = r {
                c.lose(&why);
                continue;
            }
            let now = Instant::now();
            if c.silent(now) {
                let why = format!(
                    "a request has waited {:?} for the server, which answers it not",
                    c.silence
                );
                c.lose(&why);
                continue;
            }
            // While a reactor drives, look again now and then in case it
            // stopped without a word; while requests wait, each second
            // for a server gone silent.
            let until = if driven {
                Some(now + Duration::from_millis(1))
            } else {
                (c.in_flight > 0).then(|| now + Duration::from_secs(1))
            };
            (c.fd(), !driven, until)
        } else {
            match c.while_down() {
                None => continue,
                Some(t) => (-1, false, Some(t)),
            }
        };
        let write = !c.send_q.is_empty() && fd >= 0;
        drop(c);
        sleep(shared, fd, read, write, until);
    }
}

/// Sleeps until a submission, the socket (`read`: readable, `write`:
/// writable), or `until`.
fn sleep(shared: &Shared, fd: i32, read: bool, write: bool, until: Option<Instant>) {
    shared.sleeping.store(true, Ordering::SeqCst);
    let nothing_new = shared.q.lock().subs.is_empty();
    if nothing_new {
        let events = if read { libc::POLLIN } else { 0 } | if write { libc::POLLOUT } else { 0 };
        let mut fds = [
            libc::pollfd {
                fd: shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if events == 0 { -1 } else { fd },
                events,
                revents: 0,
            },
        ];
        let timeout = until.map_or(-1, |t| {
            let ms = t.saturating_duration_since(Instant::now()).as_millis() + 1;
            i32::try_from(ms).unwrap_or(i32::MAX)
        });
        // SAFETY: two pollfds of ours, for the length given.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
    }
    shared.sleeping.store(false, Ordering::SeqCst);
    let _ = shared.wake.read();
}

impl Conn {
    /// The thread's side of a connection already made (`sock`, `export`).
    pub fn start(
        dial: Arc<dyn Dial>,
        sock: OwnedFd,
        export: Export,
        limits: Limits,
    ) -> io::Result<Arc<Shared>> {
        set_nonblocking(&sock)?;
        let conn = Conn {
            dial,
            delay: limits.delay,
            silence: limits.silence,
            export,
            sock: Some(sock),
            slab: Vec::new(),
            free: Vec::new(),
            send_q: VecDeque::new(),
            sent: 0,
            next_seq: 0,
            in_flight: 0,
            rx: Rx::Header,
            hdr: [0; proto::CHUNK_HEADER_LEN],
            hdr_got: 0,
            small: vec![0; MAX_FIELDS],
            small_got: 0,
            rbuf: vec![0; READ_AHEAD],
            rpos: 0,
            rend: 0,
            large_data: false,
            down_since: None,
            expired: false,
            next_try: Instant::now(),
            pause: Duration::from_millis(50),
            iovs: IovList(Vec::with_capacity(IOV_BATCH)),
            scratch: Vec::new(),
            given_back: Vec::new(),
            moved: 0,
            connected_at: Instant::now(),
        };
        let shared = Arc::new(Shared {
            q: Mutex::new(Queue {
                subs: VecDeque::new(),
                spare: Vec::new(),
                stop: false,
            }),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            sleeping: AtomicBool::new(false),
            state: Mutex::new(conn),
            driven: AtomicBool::new(false),
            last_drive: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                if let Some(cpus) = crate::util::helper_cpus() {
                    crate::util::pin_to(cpus);
                }
                run(&s);
            })?;
        Ok(shared)
    }

    /// Moves what submitters handed over into the slab and the send queue
    /// (or fails it, while the server is away past the delay); gives back
    /// buffer lists. True once the connection is to end.
    fn take_submissions(&mut self, q: &Mutex<Queue>) -> bool {
        let mut q = q.lock();
        q.spare.append(&mut self.given_back);
        let stop = q.stop;
        while let Some(sub) = q.subs.pop_front() {
            if self.expired {
                sub.tag.complete(-i64::from(libc::EIO));
                let mut iov = sub.iov;
                iov.clear();
                q.spare.push(iov);
                continue;
            }
            let slot = self.free.pop().unwrap_or_else(|| {
                self.slab.push(Entry {
                    state: State::Free,
                    generation: 0,
                    seq: 0,
                    sub: None,
                    hdr: [0; proto::REQUEST_LEN],
                    covered: 0,
                    error: None,
                    lost_at: None,
                    since: Instant::now(),
                    chunks: Vec::new(),
                });
                u32::try_from(self.slab.len() - 1).unwrap_or(u32::MAX)
            });
            let e = &mut self.slab[slot as usize];
            e.generation = e.generation.wrapping_add(1);
            e.seq = self.next_seq;
            self.next_seq += 1;
            e.state = State::Queued;
            // Asked while the server is away: it waits as long as those
            // that were in flight when it went.
            e.lost_at = self.down_since;
            e.since = Instant::now();
            e.sub = Some(sub);
            self.in_flight += 1;
            self.send_q.push_back(slot);
            self.stamp(slot);
        }
        stop
    }

    fn cookie(&self, slot: u32) -> u64 {
        (u64::from(self.slab[slot as usize].generation) << 32) | u64::from(slot)
    }

    /// Writes and reads as much as the socket takes and gives now.
    fn pump(&mut self) -> Result<(), Lost> {
        self.send()?;
        self.receive()
    }

    /// Whether a request has waited on this connection past the limit:
    /// one the server forgot while it answers others, or one it does not
    /// even read (a write stuck in the socket), counts as much as a server
    /// gone silent.
    fn silent(&self, now: Instant) -> bool {
        self.slab
            .iter()
            .any(|e| e.state != State::Free && now.duration_since(e.since) >= self.silence)
    }

    /// The socket, while the connection is up.
    fn fd(&self) -> i32 {
        self.sock.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Writes the queued requests (headers and write payloads, many in one
    /// call) until the queue is empty or the socket full.
    fn send(&mut self) -> Result<(), Lost> {
        while !self.send_q.is_empty() {
            self.iovs.0.clear();
            let mut skip = self.sent;
            for &slot in &self.send_q {
                if self.iovs.0.len() + 2 > IOV_BATCH {
                    break;
                }
                let e = &self.slab[slot as usize];
                let Some(sub) = &e.sub else { continue };
                let payload = if sub.cmd == proto::CMD_WRITE {
                    sub.len as usize
                } else {
                    0
                };
                let hdr_left = proto::REQUEST_LEN.saturating_sub(skip);
                if hdr_left > 0 {
                    self.iovs.0.push(libc::iovec {
                        iov_base: e.hdr[proto::REQUEST_LEN - hdr_left..]
                            .as_ptr()
                            .cast_mut()
                            .cast(),
                        iov_len: hdr_left,
                    });
                }
                let from = skip.saturating_sub(proto::REQUEST_LEN);
                skip = 0;
                if payload > from {
                    self.scratch.clear();
                    sub_iovecs(&sub.iov, from, payload - from, &mut self.scratch);
                    let room = IOV_BATCH - self.iovs.0.len();
                    let n = self.scratch.len().min(room);
                    self.iovs
                        .0
                        .extend_from_slice(&as_iovecs(&self.scratch)[..n]);
                    if n < self.scratch.len() {
                        break;
                    }
                }
            }
            let n = match self.sendmsg()? {
                Some(n) => n,
                None => return Ok(()),
            };
            self.advance_sent(n);
        }
        Ok(())
    }

    /// One sendmsg of `iovs`: bytes written, or None when the socket is
    /// full.
    fn sendmsg(&mut self) -> Result<Option<usize>, Lost> {
        let fd = self.sock.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        // SAFETY: msghdr is plain data; zeroed is an empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = self.iovs.0.as_mut_ptr();
        msg.msg_iovlen = self.iovs.0.len();
        loop {
            // SAFETY: every iovec points at a request header in the slab
            // (not touched until this returns) or at guest memory its
            // request keeps mapped until it completes; the kernel only
            // reads them.
            let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if r >= 0 {
                return Ok(Some(r.unsigned_abs()));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(format!("sending: {e}")),
            }
        }
    }

    /// Marks `n` more bytes written: requests wholly written wait for
    /// their replies.
    fn advance_sent(&mut self, mut n: usize) {
        while let Some(&slot) = self.send_q.front() {
            let e = &mut self.slab[slot as usize];
            let total = proto::REQUEST_LEN
                + e.sub.as_ref().map_or(0, |s| {
                    if s.cmd == proto::CMD_WRITE {
                        s.len as usize
                    } else {
                        0
                    }
                });
            let left = total - self.sent;
            if n < left {
                self.sent += n;
                return;
            }
            n -= left;
            self.sent = 0;
            e.state = State::Sent;
            self.moved += 1;
            self.send_q.pop_front();
        }
    }

    /// Reads replies until the socket has no more.
    fn receive(&mut self) -> Result<(), Lost> {
        loop {
            let progressed = match self.rx {
                Rx::Header => self.read_header()?,
                Rx::Fields { .. } => self.read_fields()?,
                Rx::Data { .. } => self.read_data()?,
            };
            if !progressed {
                return Ok(());
            }
        }
    }

    /// recv into `buf`: bytes read, or None when nothing is there.
    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, Lost> {
        // SAFETY: `buf` is ours, for its length.
        let r = unsafe {
            libc::recv(
                self.fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        received(r)
    }

    /// Reads more of the stream into the read-ahead buffer: false when the
    /// socket has nothing now.
    fn fill(&mut self) -> Result<bool, Lost> {
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
        } else if self.rend == self.rbuf.len() {
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        // After a large read's data, read only as far as the next reply's
        // header and fields: its data most likely goes straight into the
        // guest's buffers rather than through this one.
        let end = if self.large_data && matches!(self.rx, Rx::Header) {
            (self.rend + proto::CHUNK_HEADER_LEN + 8).min(self.rbuf.len())
        } else {
            self.rbuf.len()
        };
        let mut buf = std::mem::take(&mut self.rbuf);
        let r = self.recv(&mut buf[self.rend..end]);
        self.rbuf = buf;
        match r? {
            Some(n) => {
                self.rend += n;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Takes up to `dst.len()` bytes read ahead into `dst`: how many.
    fn staged(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.rend - self.rpos);
        dst[..n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
        self.rpos += n;
        n
    }

    fn read_header(&mut self) -> Result<bool, Lost> {
        let want = if self.hdr_got >= 4
            && u32::from_be_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
                == proto::STRUCTURED_REPLY_MAGIC
        {
            proto::CHUNK_HEADER_LEN
        } else {
            proto::SIMPLE_REPLY_LEN
        };
        let mut buf = self.hdr;
        let n = self.staged(&mut buf[self.hdr_got..want]);
        self.hdr = buf;
        if n == 0 {
            return self.fill();
        }
        self.hdr_got += n;
        if self.hdr_got < want {
            return Ok(true);
        }
        let h = self.hdr;
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if magic == proto::STRUCTURED_REPLY_MAGIC && want < proto::CHUNK_HEADER_LEN {
            // Four more bytes to come.
            return Ok(true);
        }
        self.hdr_got = 0;
        match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8]));
                self.simple_reply(error, cookie)?;
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                let flags = u16::from_be_bytes([h[4], h[5]]);
                let kind = u16::from_be_bytes([h[6], h[7]]);
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8]));
                let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
                self.chunk(flags, kind, cookie, len)?;
            }
            m => return Err(format!("a reply with the wrong magic {m:#x}")),
        }
        Ok(true)
    }

    /// The slot a reply's cookie names, if that request waits for one.
    fn slot_of(&self, cookie: u64) -> Result<u32, Lost> {
        let slot = u32::try_from(cookie & 0xffff_ffff).unwrap_or(u32::MAX);
        let ok = self
            .slab
            .get(slot as usize)
            .is_some_and(|e| e.state == State::Sent && u64::from(e.generation) == cookie >> 32);
        if !ok {
            return Err(format!(
                "a reply for cookie {cookie:#x}, which no request waits for"
            ));
        }
        Ok(slot)
    }

    fn simple_reply(&mut self, error: u32, cookie: u64) -> Result<(), Lost> {
        let slot = self.slot_of(cookie)?;
        let (cmd, len) = match &self.slab[slot as usize].sub {
            Some(s) => (s.cmd, s.len),
            None => return Err("a reply for an empty slot".into()),
        };
        if error == proto::NBD_ESHUTDOWN {
            return Err("the server is shutting down".into());
        }
        if error != 0 {
            self.complete(slot, -i64::from(proto::errno(error)));
        } else if cmd == proto::CMD_READ {
            self.large_data = len as usize >= DIRECT_READ;
            self.rx = Rx::Data {
                slot,
                at: 0,
                left: len as usize,
                done: true,
            };
            self.slab[slot as usize].covered = u64::from(len);
        } else {
            self.complete(slot, i64::from(len));
        }
        Ok(())
    }

    fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, len: usize) -> Result<(), Lost> {
        let slot = self.slot_of(cookie)?;
        let is_read = self.slab[slot as usize]
            .sub
            .as_ref()
            .is_some_and(|s| s.cmd == proto::CMD_READ);
        let (want, rest) = match kind {
            proto::REPLY_TYPE_NONE if len == 0 && flags & proto::REPLY_FLAG_DONE != 0 => (0, 0),
            proto::REPLY_TYPE_OFFSET_DATA if is_read && len >= 8 => (8, len - 8),
            proto::REPLY_TYPE_OFFSET_HOLE if is_read && len == 12 => (12, 0),
            k if k & proto::REPLY_TYPE_ERROR_BIT != 0 && (6..=MAX_FIELDS).contains(&len) => {
                (len, 0)
            }
            _ => {
                return Err(format!(
                    "a reply chunk of type {kind} and {len} bytes that does not fit its request"
                ))
            }
        };
        self.small_got = 0;
        self.rx = Rx::Fields {
            slot,
            kind,
            flags,
            want,
            rest,
        };
        Ok(())
    }

    fn read_fields(&mut self) -> Result<bool, Lost> {
        let Rx::Fields {
            slot,
            kind,
            flags,
            want,
            rest,
        } = self.rx
        else {
            return Ok(false);
        };
        if self.small_got < want {
            let mut small = std::mem::take(&mut self.small);
            let n = self.staged(&mut small[self.small_got..want]);
            self.small = small;
            if n == 0 {
                return self.fill();
            }
            self.small_got += n;
            if self.small_got < want {
                return Ok(true);
            }
        }
        let f = &self.small[..want];
        let done = flags & proto::REPLY_FLAG_DONE != 0;
        let (req_off, req_len) = match &self.slab[slot as usize].sub {
            Some(s) => (s.offset, u64::from(s.len)),
            None => return Err("a chunk for an empty slot".into()),
        };
        self.rx = Rx::Header;
        match kind {
            proto::REPLY_TYPE_NONE => {}
            proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE => {
                let off = u64::from_be_bytes(f[0..8].try_into().unwrap_or([0; 8]));
                let n = if kind == proto::REPLY_TYPE_OFFSET_HOLE {
                    u64::from(u32::from_be_bytes(f[8..12].try_into().unwrap_or([0; 4])))
                } else {
                    rest as u64
                };
                let at = off
                    .checked_sub(req_off)
                    .filter(|at| at.checked_add(n).is_some_and(|end| end <= req_len) && n > 0);
                let Some(at) = at else {
                    return Err(format!(
                        "a reply chunk for bytes {off}+{n}, outside its request \
                         {req_off}+{req_len}"
                    ));
                };
                let e = &mut self.slab[slot as usize];
                if e.chunks.iter().any(|&(a, b)| at < b && a < at + n) {
                    return Err(format!(
                        "reply chunks that overlap, for bytes {off}+{n} of request \
                         {req_off}+{req_len}"
                    ));
                }
                e.chunks.push((at, at + n));
                e.covered += n;
                let (Ok(at), Ok(n)) = (usize::try_from(at), usize::try_from(n)) else {
                    return Err("a reply chunk too large for this machine".into());
                };
                if kind == proto::REPLY_TYPE_OFFSET_HOLE {
                    self.zero(slot, at, n);
                } else {
                    self.large_data = n >= DIRECT_READ;
                    self.rx = Rx::Data {
                        slot,
                        at,
                        left: n,
                        done,
                    };
                    return Ok(true);
                }
            }
            _ => self.error_chunk(slot, kind, want)?,
        }
        if done {
            self.chunks_done(slot);
        }
        Ok(true)
    }

    /// An error chunk (its fields in `small`): the request fails with it
    /// when its reply is done.
    fn error_chunk(&mut self, slot: u32, kind: u16, want: usize) -> Result<(), Lost> {
        let f = &self.small[..want];
        let error = u32::from_be_bytes(f[0..4].try_into().unwrap_or([0; 4]));
        if error == proto::NBD_ESHUTDOWN {
            return Err("the server is shutting down".into());
        }
        let msg_len = usize::from(u16::from_be_bytes([f[4], f[5]]));
        let extra = if kind == proto::REPLY_TYPE_ERROR_OFFSET {
            8
        } else {
            0
        };
        if error == 0 || 6 + msg_len + extra != want {
            return Err("a malformed error chunk".into());
        }
        let msg = String::from_utf8_lossy(&f[6..6 + msg_len]);
        crate::warn_limited!(
            "NBD {}: the server reports error {error} ({})",
            self.dial.name(),
            msg.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        );
        let e = &mut self.slab[slot as usize];
        e.error.get_or_insert(proto::errno(error));
        Ok(())
    }

    /// A structured reply's last chunk: the request is done.
    fn chunks_done(&mut self, slot: u32) {
        let e = &self.slab[slot as usize];
        let (cmd, len) = e.sub.as_ref().map_or((0, 0), |s| (s.cmd, s.len));
        let res = match e.error {
            Some(errno) => -i64::from(errno),
            None if cmd == proto::CMD_READ && e.covered != u64::from(len) => {
                crate::warn_limited!(
                    "NBD {}: a read's reply covered {} of its {len} bytes",
                    self.dial.name(),
                    e.covered
                );
                -i64::from(libc::EIO)
            }
            None => i64::from(len),
        };
        self.complete(slot, res);
    }

    fn zero(&mut self, slot: u32, at: usize, n: usize) {
        if let Some(s) = &self.slab[slot as usize].sub {
            self.scratch.clear();
            sub_iovecs(&s.iov, at, n, &mut self.scratch);
            for v in &self.scratch {
                v.zero();
            }
        }
    }

    fn read_data(&mut self) -> Result<bool, Lost> {
        let Rx::Data {
            slot,
            at,
            left,
            done,
        } = self.rx
        else {
            return Ok(false);
        };
        if left > 0 {
            let Some(s) = &self.slab[slot as usize].sub else {
                return Err("data for an empty slot".into());
            };
            self.scratch.clear();
            sub_iovecs(&s.iov, at, left, &mut self.scratch);
            let ahead = self.rend - self.rpos;
            let n = if ahead > 0 {
                // What was read ahead is copied in.
                let n = ahead.min(left);
                let mut src = &self.rbuf[self.rpos..self.rpos + n];
                for v in &self.scratch {
                    if src.is_empty() {
                        break;
                    }
                    let k = v.write_at(0, &src[..v.len().min(src.len())]);
                    src = &src[k..];
                }
                self.rpos += n;
                n
            } else if left >= DIRECT_READ {
                match self.read_direct()? {
                    Some(n) => n,
                    None => return Ok(false),
                }
            } else {
                return self.fill();
            };
            self.rx = Rx::Data {
                slot,
                at: at + n,
                left: left - n,
                done,
            };
            if n < left {
                return Ok(true);
            }
        }
        self.rx = Rx::Header;
        if done {
            self.chunks_done(slot);
        }
        Ok(true)
    }

    /// One readv from the socket straight into the buffers in `scratch`:
    /// bytes read, or None when the socket has nothing now.
    fn read_direct(&mut self) -> Result<Option<usize>, Lost> {
        let v = as_iovecs(&self.scratch);
        let cnt = i32::try_from(v.len().min(IOV_BATCH)).unwrap_or(1);
        // SAFETY: the iovecs are the request's own buffers (guest memory
        // its owner keeps mapped until the request completes, or a buffer
        // of the waiting caller), cut to the part this reply fills, which
        // lies inside them (checked against the request when the chunk
        // arrived).
        let r = unsafe { libc::readv(self.fd(), v.as_ptr(), cnt) };
        received(r)
    }

    /// Ends the request in `slot` with `res` and frees the slot.
    fn complete(&mut self, slot: u32, res: i64) {
        self.moved += 1;
        let e = &mut self.slab[slot as usize];
        e.state = State::Free;
        e.covered = 0;
        e.chunks.clear();
        e.error = None;
        if let Some(sub) = e.sub.take() {
            sub.tag.complete(res);
            let mut iov = sub.iov;
            iov.clear();
            self.given_back.push(iov);
        }
        self.free.push(slot);
        self.in_flight -= 1;
    }

    /// The connection broke: close it; what it held is sent again on the
    /// next one, or fails if it has waited too long.
    fn lose(&mut self, why: &str) {
        self.sock = None;
        self.rx = Rx::Header;
        self.hdr_got = 0;
        self.rpos = 0;
        self.rend = 0;
        self.sent = 0;
        let now = Instant::now();
        if self.down_since.is_none() {
            crate::warn_limited!(
                "NBD {}: {why}; {} request(s) wait, connecting again for up to {:?}",
                self.dial.name(),
                self.in_flight,
                self.delay
            );
        }
        self.down_since.get_or_insert(now);
        // A connection that broke soon after it was made (a server that
        // answers nonsense, or shuts down at once, each time) is made
        // again later and later: no storm of connections.
        if now.duration_since(self.connected_at) < SHORT_LIVED {
            self.next_try = now + self.pause;
            self.pause = (self.pause * 2).min(RECONNECT_MAX_PAUSE);
        } else {
            self.pause = Duration::from_millis(50);
            self.next_try = now;
        }
        for e in &mut self.slab {
            if e.state != State::Free {
                e.lost_at.get_or_insert(now);
                e.state = State::Queued;
                e.covered = 0;
                e.chunks.clear();
                e.error = None;
            }
        }
        // Everything still held, in the order it first went.
        let mut order: Vec<u32> = (0..self.slab.len())
            .filter(|&i| self.slab[i].state == State::Queued)
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        order.sort_by_key(|&i| self.slab[i as usize].seq);
        self.send_q = order.into();
        self.fail_expired(now);
    }

    /// Fails what has waited longer than the delay since its connection
    /// broke.
    fn fail_expired(&mut self, now: Instant) {
        let delay = self.delay;
        let old: Vec<u32> = self
            .send_q
            .iter()
            .copied()
            .filter(|&s| {
                self.slab[s as usize]
                    .lost_at
                    .is_some_and(|t| now.duration_since(t) >= delay)
            })
            .collect();
        if old.is_empty() {
            return;
        }
        self.send_q.retain(|s| !old.contains(s));
        for s in old {
            self.complete(s, -i64::from(libc::EIO));
        }
    }

    /// While the connection is down: tries to make it again and fails
    /// what waited too long; None once it is up, else when to look again.
    fn while_down(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let since = self.down_since.unwrap_or(now);
        self.fail_expired(now);
        if !self.expired && now.duration_since(since) >= self.delay {
            self.expired = true;
            log::warn!(
                "NBD {}: still away after {:?}: requests fail until it is back",
                self.dial.name(),
                self.delay
            );
            // Whatever is queued fails now (take_submissions fails new
            // ones).
            self.fail_expired(now + self.delay);
        }
        if now >= self.next_try {
            // Not past the delay (the requests that wait fail then), and
            // at least a second.
            let limit = proto::HANDSHAKE_TIMEOUT
                .min((since + self.delay).saturating_duration_since(now))
                .max(Duration::from_secs(1));
            match self.dial.dial(now + limit) {
                Ok((sock, export)) => {
                    if let Err(why) = self.accept(sock, export) {
                        crate::warn_limited!("NBD {}: {why}", self.dial.name());
                    } else {
                        return None;
                    }
                }
                Err(why) => log::debug!("NBD {}: connecting: {why}", self.dial.name()),
            }
            self.next_try = Instant::now() + self.pause;
            self.pause = (self.pause * 2).min(RECONNECT_MAX_PAUSE);
        }
        Some(if self.expired {
            self.next_try
        } else {
            self.next_try.min(since + self.delay)
        })
    }

    /// Takes a new connection if the export is still the one we serve.
    fn accept(&mut self, sock: OwnedFd, export: Export) -> Result<(), String> {
        let needed = self.export.flags
            & (proto::TF_SEND_FLUSH
                | proto::TF_SEND_FUA
                | proto::TF_SEND_TRIM
                | proto::TF_SEND_WRITE_ZEROES
                | proto::TF_CAN_MULTI_CONN);
        if export.size != self.export.size
            || export.flags & needed != needed
            || (export.has(proto::TF_READ_ONLY) && !self.export.has(proto::TF_READ_ONLY))
            || export.min_block > self.export.min_block
            || export.max_payload < self.export.max_payload
            || export.structured != self.export.structured
        {
            return Err(format!(
                "the export came back changed ({export:?}, was {:?}): not used",
                self.export
            ));
        }
        set_nonblocking(&sock).map_err(|e| e.to_string())?;
        let waited = self.down_since.map(|t| t.elapsed()).unwrap_or_default();
        crate::warn_limited!(
            "NBD {}: connected again after {waited:.1?}; sending {} request(s) again",
            self.dial.name(),
            self.send_q.len()
        );
        self.connected_at = Instant::now();
        for e in &mut self.slab {
            e.since = self.connected_at;
        }
        self.sock = Some(sock);
        self.down_since = None;
        self.expired = false;
        Ok(())
    }

    /// The disk is gone: a polite NBD_CMD_DISC, then the socket closes.
    fn say_goodbye(&mut self) {
        if let Some(sock) = &self.sock {
            let b = proto::request(0, proto::CMD_DISC, 0, 0, 0);
            // SAFETY: our buffer, for its length; best effort, no wait.
            unsafe {
                libc::send(
                    sock.as_raw_fd(),
                    b.as_ptr().cast(),
                    b.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
        }
        self.sock = None;
    }
}

impl Conn {
    /// Writes the request header of a slot just queued (a resend sends
    /// the same one: same cookie).
    fn stamp(&mut self, slot: u32) {
        let cookie = self.cookie(slot);
        let e = &mut self.slab[slot as usize];
        if let Some(s) = &e.sub {
            e.hdr = proto::request(s.flags, s.cmd, cookie, s.offset, s.len);
        }
    }
}

/// What a non-blocking recv or readv returned: bytes read, None when
/// nothing is there now (or the call was interrupted: the next look
/// finds it), or why the connection is lost.
fn received(r: isize) -> Result<Option<usize>, Lost> {
    if r > 0 {
        return Ok(Some(r.unsigned_abs()));
    }
    if r == 0 {
        return Err("the server closed the connection".into());
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => Ok(None),
        _ => Err(format!("receiving: {e}")),
    }
}

fn set_nonblocking(sock: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on our own descriptor; no memory is passed.
    let fl = unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The connection against a scripted server on a socketpair: replies
    //! as a server may send them (holes, chunks out of order, errors) and
    //! as a hostile one would (chunks outside the request, unknown
    //! cookies), and a server that does not come back.
    use super::*;
    use crate::backend::io::AioSink;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    struct Sink(Mutex<mpsc::Sender<i64>>);
    impl AioSink for Sink {
        fn done(&self, _tag: u64, res: i64) {
            let _ = self.0.lock().send(res);
        }
    }

    /// Each reconnection takes the next socket the test hands over.
    struct FakeDial(Mutex<mpsc::Receiver<OwnedFd>>, Export);
    impl Dial for FakeDial {
        fn dial(&self, _deadline: Instant) -> Result<(OwnedFd, Export), String> {
            match self.0.lock().try_recv() {
                Ok(fd) => Ok((fd, self.1)),
                Err(_) => Err("no server".into()),
            }
        }
        fn name(&self) -> &str {
            "test"
        }
    }

    const EXPORT: Export = Export {
        size: 1 << 20,
        flags: proto::TF_HAS_FLAGS | proto::TF_SEND_FLUSH,
        min_block: 1,
        preferred_block: 4096,
        max_payload: 1 << 20,
        structured: true,
    };

    struct Rig {
        shared: Arc<Shared>,
        server: UnixStream,
        more: mpsc::Sender<OwnedFd>,
        done: mpsc::Receiver<i64>,
        tag: Arc<AioTag>,
    }

    fn rig(delay: Duration) -> Rig {
        rig_with(Limits {
            delay,
            silence: Duration::from_secs(30),
        })
    }

    fn rig_with(limits: Limits) -> Rig {
        let (a, b) = UnixStream::pair().unwrap();
        let (more, next) = mpsc::channel();
        let dial = Arc::new(FakeDial(Mutex::new(next), EXPORT));
        let shared = Conn::start(dial, a.into(), EXPORT, limits).unwrap();
        let (tx, done) = mpsc::channel();
        let tag = Arc::new(AioTag {
            sink: Arc::new(Sink(Mutex::new(tx))),
            tag: 0,
        });
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Rig {
            shared,
            server: b,
            more,
            done,
            tag,
        }
    }

    /// A read of `buf[..len]` (the rest of `buf` is a guard) at `offset`.
    fn read(r: &Rig, buf: &mut [u8], len: usize, offset: u64) {
        // SAFETY: the buffer outlives the request: every test waits for
        // its completion (or drops the connection first).
        let iov = unsafe { GuestIov::new(buf.as_mut_ptr(), len) };
        r.shared.submit(
            Sub {
                cmd: proto::CMD_READ,
                flags: 0,
                offset,
                len: u32::try_from(len).unwrap(),
                iov: Vec::new(),
                tag: r.tag.clone(),
            },
            &[iov],
            false,
        );
    }

    /// The next request's cookie, offset and length.
    fn request(s: &mut UnixStream) -> (u64, u64, u32) {
        let mut h = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut h).unwrap();
        let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
        (
            be64(&h[8..16]),
            be64(&h[16..24]),
            u32::from_be_bytes(h[24..28].try_into().unwrap()),
        )
    }

    fn chunk(s: &mut UnixStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        b.extend_from_slice(payload);
        s.write_all(&b).unwrap();
    }

    /// Takes the next request, a read, and answers it whole with `byte`.
    fn answer(s: &mut UnixStream, byte: u8) {
        let (cookie, off, len) = request(s);
        let fill = vec![byte; len as usize];
        chunk(s, proto::REPLY_FLAG_DONE, 1, cookie, &data(off, &fill));
    }

    fn data(offset: u64, bytes: &[u8]) -> Vec<u8> {
        [offset.to_be_bytes().as_slice(), bytes].concat()
    }

    fn wait(r: &Rig) -> i64 {
        r.done.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn holes_and_data_in_any_order_fill_the_buffer_and_nothing_past_it() {
        let mut r = rig(Duration::from_secs(5));
        let mut buf = vec![0xa5u8; 8192 + 64];
        read(&r, &mut buf, 8192, 4096);
        let (cookie, off, len) = request(&mut r.server);
        assert_eq!((off, len), (4096, 8192));
        // The second half first, byte by byte on the wire; then the hole.
        let c = {
            let mut b = Vec::new();
            b.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&proto::REPLY_TYPE_OFFSET_DATA.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&(8u32 + 4096).to_be_bytes());
            b.extend_from_slice(&data(8192, &[1u8; 4096]));
            b
        };
        for byte in &c[..64] {
            r.server.write_all(&[*byte]).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        r.server.write_all(&c[64..]).unwrap();
        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        chunk(
            &mut r.server,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_HOLE,
            cookie,
            &hole,
        );
        assert_eq!(wait(&r), 8192);
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 1));
        assert!(
            buf[8192..].iter().all(|&b| b == 0xa5),
            "written past the buffer"
        );
    }

    #[test]
    fn an_error_chunk_fails_the_request_and_a_short_reply_is_an_error() {
        let mut r = rig(Duration::from_secs(5));
        let mut buf = vec![0u8; 4096];
        read(&r, &mut buf, 4096, 0);
        let (cookie, ..) = request(&mut r.server);
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&3u16.to_be_bytes());
        e.extend_from_slice(b"bad");
        chunk(
            &mut r.server,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR_BIT + 1,
            cookie,
            &e,
        );
        assert_eq!(wait(&r), -i64::from(libc::EIO));
        // Done after covering half: not a success.
        read(&r, &mut buf, 4096, 0);
        let (cookie, ..) = request(&mut r.server);
        chunk(
            &mut r.server,
            0,
            proto::REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data(0, &[2u8; 2048]),
        );
        chunk(
            &mut r.server,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_NONE,
            cookie,
            &[],
        );
        assert_eq!(wait(&r), -i64::from(libc::EIO));
    }

    /// A chunk outside its request, or a reply for no request: the
    /// connection is dropped (nothing is written) and the request goes
    /// again on the next one.
    #[test]
    fn a_hostile_reply_drops_the_connection_and_the_request_is_sent_again() {
        for hostile in 0..3 {
            let mut r = rig(Duration::from_secs(5));
            let mut buf = vec![0xa5u8; 4096 + 4096];
            read(&r, &mut buf, 4096, 65536);
            let (cookie, ..) = request(&mut r.server);
            match hostile {
                // Data for bytes before the request (into memory before
                // the buffer, if it were believed).
                0 => chunk(&mut r.server, 0, 1, cookie, &data(0, &[9u8; 4096])),
                // Data running past its end.
                1 => chunk(
                    &mut r.server,
                    0,
                    1,
                    cookie,
                    &data(65536 + 2048, &[9u8; 4096]),
                ),
                // A cookie nobody sent.
                _ => chunk(
                    &mut r.server,
                    0,
                    1,
                    cookie ^ (7 << 32),
                    &data(65536, &[9u8; 4096]),
                ),
            }
            // The connection is dropped: the server sees it closed.
            let mut one = [0u8; 1];
            assert_eq!(r.server.read(&mut one).unwrap(), 0, "case {hostile}");
            assert!(
                buf.iter().all(|&b| b == 0xa5),
                "case {hostile}: memory written"
            );
            let (a, mut b) = UnixStream::pair().unwrap();
            b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            r.more.send(a.into()).unwrap();
            let (cookie, off, len) = request(&mut b);
            assert_eq!((off, len), (65536, 4096));
            chunk(
                &mut b,
                proto::REPLY_FLAG_DONE,
                1,
                cookie,
                &data(65536, &[3u8; 4096]),
            );
            assert_eq!(wait(&r), 4096);
            assert!(buf[..4096].iter().all(|&b| b == 3));
            assert!(buf[4096..].iter().all(|&b| b == 0xa5));
        }
    }

    /// A reactor drives the connection: its submission goes out and its
    /// reply comes in on the driving thread; when it stops driving, the
    /// thread takes over.
    #[test]
    fn a_reactor_drives_the_connection_and_the_thread_takes_over_after() {
        let mut r = rig(Duration::from_secs(5));
        let mut buf = vec![0u8; 4096];
        let iov = unsafe_iov(&mut buf);
        r.shared.submit(
            Sub {
                cmd: proto::CMD_READ,
                flags: 0,
                offset: 0,
                len: 4096,
                iov: Vec::new(),
                tag: r.tag.clone(),
            },
            &[iov],
            true,
        );
        // Sent when the reactor drives.
        r.shared.drive();
        answer(&mut r.server, 4);
        let t = Instant::now();
        loop {
            r.shared.drive();
            if let Ok(res) = r.done.try_recv() {
                assert_eq!(res, 4096);
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "no completion");
        }
        assert!(buf.iter().all(|&b| b == 4));
        // The reactor sleeps: the thread reads the next reply.
        r.shared.undriven();
        read(&r, &mut buf, 4096, 0);
        answer(&mut r.server, 5);
        assert_eq!(wait(&r), 4096);
        assert!(buf.iter().all(|&b| b == 5));
    }

    /// A server that takes the request and says nothing: the connection
    /// is dropped after the silence limit, and the request fails once the
    /// reconnect delay has passed too.
    #[test]
    fn a_server_that_stays_silent_is_dropped_and_its_requests_fail() {
        let mut r = rig_with(Limits {
            delay: Duration::from_millis(500),
            silence: Duration::from_millis(300),
        });
        let mut buf = vec![0u8; 4096];
        read(&r, &mut buf, 4096, 0);
        let t = Instant::now();
        request(&mut r.server);
        let mut one = [0u8; 1];
        assert_eq!(r.server.read(&mut one).unwrap(), 0, "not dropped");
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(wait(&r), -i64::from(libc::EIO));
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    }

    /// A server that forgets one request while it answers the others:
    /// that request is not left waiting forever (the connection is made
    /// again and it fails after the delay, or is answered).
    #[test]
    fn a_request_the_server_forgets_does_not_wait_forever() {
        let mut r = rig_with(Limits {
            delay: Duration::from_millis(500),
            silence: Duration::from_millis(300),
        });
        let mut forgotten = vec![0u8; 4096];
        read(&r, &mut forgotten, 4096, 0);
        request(&mut r.server);
        let t = Instant::now();
        let mut other = vec![0u8; 4096];
        let res = loop {
            assert!(t.elapsed() < Duration::from_secs(3), "still waiting");
            read(&r, &mut other, 4096, 8192);
            let mut h = [0u8; proto::REQUEST_LEN];
            if r.server.read_exact(&mut h).is_err() {
                // Dropped: the forgotten request fails after the delay.
                break r.done.recv_timeout(Duration::from_secs(5)).unwrap();
            }
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            let mut reply = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
            reply.extend_from_slice(&proto::REPLY_FLAG_DONE.to_be_bytes());
            reply.extend_from_slice(&1u16.to_be_bytes());
            reply.extend_from_slice(&cookie.to_be_bytes());
            reply.extend_from_slice(&(8u32 + 4096).to_be_bytes());
            reply.extend_from_slice(&data(8192, &[1u8; 4096]));
            if r.server.write_all(&reply).is_err() {
                // Dropped while we answered.
                break r.done.recv_timeout(Duration::from_secs(5)).unwrap();
            }
            let res = wait(&r);
            if res != 4096 {
                break res;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(res, -i64::from(libc::EIO));
    }

    /// A server that stops reading: a write larger than the socket holds
    /// never leaves the queue; it is not left there forever.
    #[test]
    fn a_write_the_server_does_not_read_does_not_wait_forever() {
        let r = rig_with(Limits {
            delay: Duration::from_millis(500),
            silence: Duration::from_millis(300),
        });
        let mut buf = vec![7u8; 4 << 20];
        let iov = unsafe_iov(&mut buf);
        r.shared.submit(
            Sub {
                cmd: proto::CMD_WRITE,
                flags: 0,
                offset: 0,
                len: 4 << 20,
                iov: Vec::new(),
                tag: r.tag.clone(),
            },
            &[iov],
            false,
        );
        assert_eq!(
            r.done.recv_timeout(Duration::from_secs(5)).unwrap(),
            -i64::from(libc::EIO)
        );
    }

    /// Two chunks that fill the same bytes (a read that would report
    /// success with part of its buffer never filled): the connection is
    /// dropped and the read goes again.
    #[test]
    fn overlapping_chunks_drop_the_connection() {
        let mut r = rig(Duration::from_secs(5));
        let mut buf = vec![0xa5u8; 4096];
        read(&r, &mut buf, 4096, 0);
        let (cookie, ..) = request(&mut r.server);
        chunk(&mut r.server, 0, 1, cookie, &data(0, &[1u8; 2048]));
        chunk(
            &mut r.server,
            proto::REPLY_FLAG_DONE,
            1,
            cookie,
            &data(0, &[1u8; 2048]),
        );
        let mut one = [0u8; 1];
        assert_eq!(r.server.read(&mut one).unwrap(), 0, "not dropped");
        assert!(r.done.try_recv().is_err(), "completed");
        let (a, mut b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r.more.send(a.into()).unwrap();
        answer(&mut b, 6);
        assert_eq!(wait(&r), 4096);
        assert!(buf.iter().all(|&b| b == 6));
    }

    /// A server that answers nonsense on every new connection: it is
    /// connected to again later and later, not thousands of times a
    /// second.
    #[test]
    fn a_server_that_breaks_every_connection_is_not_stormed() {
        struct Storm(std::sync::atomic::AtomicUsize);
        fn garbage_server(mut s: UnixStream) {
            std::thread::spawn(move || {
                let mut h = [0u8; proto::REQUEST_LEN];
                if s.read_exact(&mut h).is_ok() {
                    let _ = s.write_all(&[0xde; 16]);
                }
            });
        }
        impl Dial for Storm {
            fn dial(&self, _deadline: Instant) -> Result<(OwnedFd, Export), String> {
                self.0.fetch_add(1, Ordering::SeqCst);
                let (a, b) = UnixStream::pair().map_err(|e| e.to_string())?;
                garbage_server(b);
                Ok((a.into(), EXPORT))
            }
            fn name(&self) -> &str {
                "storm"
            }
        }
        let storm = Arc::new(Storm(std::sync::atomic::AtomicUsize::new(0)));
        let (a, b) = UnixStream::pair().unwrap();
        garbage_server(b);
        let limits = Limits {
            delay: Duration::from_secs(2),
            silence: Duration::from_secs(30),
        };
        let shared = Conn::start(storm.clone(), a.into(), EXPORT, limits).unwrap();
        let (tx, done) = mpsc::channel();
        let tag = Arc::new(AioTag {
            sink: Arc::new(Sink(Mutex::new(tx))),
            tag: 0,
        });
        let mut buf = vec![0u8; 4096];
        shared.submit(
            Sub {
                cmd: proto::CMD_READ,
                flags: 0,
                offset: 0,
                len: 4096,
                iov: Vec::new(),
                tag,
            },
            &[unsafe_iov(&mut buf)],
            false,
        );
        assert_eq!(
            done.recv_timeout(Duration::from_secs(10)).unwrap(),
            -i64::from(libc::EIO)
        );
        let dials = storm.0.load(Ordering::SeqCst);
        assert!((1..=12).contains(&dials), "{dials} connections in 2 s");
        shared.stop();
    }

    fn unsafe_iov(buf: &mut [u8]) -> GuestIov {
        // SAFETY: the caller waits for the request before the buffer goes.
        unsafe { GuestIov::new(buf.as_mut_ptr(), buf.len()) }
    }

    #[test]
    fn a_server_that_does_not_come_back_fails_requests_after_the_delay() {
        let r = rig(Duration::from_millis(500));
        let mut buf = vec![0u8; 4096];
        read(&r, &mut buf, 4096, 0);
        let t = Instant::now();
        r.server.shutdown(std::net::Shutdown::Both).unwrap();
        assert_eq!(
            r.done.recv_timeout(Duration::from_secs(10)).unwrap(),
            -i64::from(libc::EIO)
        );
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        // And at once afterwards.
        let t = Instant::now();
        read(&r, &mut buf, 4096, 0);
        assert_eq!(
            r.done.recv_timeout(Duration::from_secs(10)).unwrap(),
            -i64::from(libc::EIO)
        );
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    }
}
