//! One queue of one device on a reactor: its split ring, a request slot per
//! ring entry (allocated once, reused: no allocation per request), what is
//! in flight, and the request lifecycle: popped -> prepared by the device's
//! [`RequestHandler`] -> submitted (inline, page cache, io_uring or thread
//! pool) -> finished by the handler (status) -> used entry -> one interrupt
//! decision per pass.
//!
//! Only the reactor that owns the queue touches it. A queue belongs to one
//! activation of its device: once withdrawn (reset, disconnect), late
//! completions write nothing, and the reactor acknowledges the withdrawal
//! only when nothing is in flight, so no request outlives the memory it
//! points into.
//!
//! # A 4 KiB read, from the ring to the used entry (eight files)
//!
//! 1. `engine/reactor.rs` `pass` calls [`QueueState::poll`] here, which
//!    checks the ring lies in guest memory and outside an unmap's fence,
//!    and `take`s a chain from `virtio/ring.rs` (`virtio/packed.rs` for
//!    the packed layout).
//! 2. `take` begins the slot's `GuestBuffers` (`memory.rs`) with the guest
//!    memory snapshot and hands the chain to the device's handler,
//!    `blk/exec.rs` `prepare`, which walks it and reads the header
//!    (`blk/request.rs`) and fills the slot's `IoRequest`
//!    (`backend/request.rs`) with the buffers.
//! 3. `submit` here runs it on the reactor (memory disk, page cache), or
//!    pushes it to the reactor's io_uring (`backend/uring.rs`), or sends
//!    it to the pool (`engine/pool.rs`, which runs it on `backend/io.rs`).
//! 4. The completion comes back here (`uring_done`, `pool_done`), and the
//!    completion policy (`completion`) decides: done, or redone by a pool
//!    thread.
//! 5. `finish` here: the handler writes the status (`blk/exec.rs`), and
//!    this file adds the used entry (`virtio/ring.rs`), the one place that
//!    does. The pass ends with one interrupt decision per queue (`signal`).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::DeviceLog;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};

use super::pool::{Done, Job};
use super::reactor::{Cx, Fence, QueueRunner};
use super::{Finish, Mutations, Prepared, Qos, QueueFault, QueueStats, RequestHandler};
use crate::backend::io::{AioTag, Backend, UringTarget};
use crate::backend::request::{IoKind, IoRequest};
use crate::backend::uring::Uring;
use crate::memory::{GuestBuffers, GuestMemoryHandle};
use crate::virtio::ring::{ChainError, DescSource, DeviceRing};
use crate::virtio::VirtioInterrupt;

/// Requests one queue takes from its ring in one pass, and bytes of work it
/// does on the reactor itself in one pass: a guest with a full ring of huge
/// requests cannot hold the reactor, and the other queues and devices on
/// it, for more than a moment.
const PASS_REQUESTS: u16 = 64;
const PASS_SYNC_BYTES: usize = 8 << 20;
/// The largest request run on the reactor (memory disks, page cache);
/// larger ones, and discard and write-zeroes on memory disks, go to the
/// thread pool.
const INLINE_MAX: usize = 1 << 20;
/// A request out (in another thread's hands) for this long waits on a slow
/// or stuck disk: it is no reason to stop a reactor's spin for another
/// request (see [`QueueRunner::recent_out`]).
const RECENT_OUT: Duration = Duration::from_millis(1);
/// The most entries of a queue's log that one `recent_out` looks at.
const RECENT_WALK: usize = 64;

/// Where a request's backend work is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    Free,
    /// Popped and being prepared or completed on the reactor.
    Reactor,
    Uring,
    Pool,
    /// With the backend's own threads (librbd), reported back through
    /// the slot's tag.
    Aio,
}

struct Slot<R> {
    at: At,
    req: R,
    /// The backend work, with the guest memory the request was popped
    /// from (its buffers hold that snapshot, and so its windows, mapped).
    io: IoRequest,
    /// While the request is at the pool (its iovecs travel with it): the
    /// host span they cover, for unmap decisions.
    span: (usize, usize),
    /// When it was taken from the ring.
    start: Instant,
    /// Counted in the activation's [`Mutations`]: it changes the disk and
    /// left the reactor (io_uring or pool).
    mutates: bool,
    /// At the pool as CPU work (counted in the queue's `cpu_out`).
    cpu_job: bool,
    /// Takes of this slot so far: tells its entries in the queue's `left`
    /// log apart (a clock may give two takes the same instant).
    takes: u32,
    /// Logged in `left` since it was taken.
    logged: bool,
}

pub(crate) struct QueueState<H: RequestHandler> {
    id: u64,
    /// The device's log.
    log: Arc<DeviceLog>,
    queue: DeviceRing,
    /// The queue's index in its device (its interrupt vector is looked up
    /// by it at each interrupt).
    index: u16,
    irq: VirtioInterrupt,
    handler: Arc<H>,
    memory: GuestMemoryHandle,
    backend: Arc<dyn Backend>,
    inline: bool,
    uring_target: Option<UringTarget>,
    slots: Vec<Slot<H::Req>>,
    in_flight: usize,
    /// When a request of it last went into the reactor's io_uring or came
    /// out of it (requests taken or finished otherwise leave it alone: a
    /// stuck io_uring request must not look as if it moved).
    uring_moved: Instant,
    /// Requests in the reactor's io_uring.
    in_uring: usize,
    /// Requests at the pool as CPU work.
    cpu_out: usize,
    /// The requests that left the reactor (for the io_uring, the pool or
    /// the backend's threads), in that order: when each was taken, its
    /// slot and which take of the slot it was. An entry whose request has
    /// finished since stays until pruned (see `leaves`).
    left: VecDeque<(Instant, u16, u32)>,
    broken: Option<QueueFault>,
    added: bool,
    waiting_for_memory: bool,
    event_idx: bool,
    /// Doorbells land in shared memory: never asked for, always polled.
    polled: bool,
    /// Pauses of the whole queue in force (reset of a neighbour's memory,
    /// a resize): each is lifted by its own resume.
    holds: u32,
    /// An unmap in progress, and whether it concerns this queue.
    fence: Option<Fence>,
    fence_hit: bool,
    withdrawn: bool,
    /// The guest-memory snapshot the whole ring was last found in: while the
    /// table has not changed, the ring need not be checked again. (Held,
    /// not remembered by address, so that a new snapshot can never look
    /// like it.)
    ring_checked: Option<Arc<GuestMemoryMmap>>,
    stats: Arc<QueueStats>,
    /// The device's limits; while it is over one, the queue is not polled
    /// before `qos_until`.
    qos: Arc<Qos>,
    /// Until when, under which limits (`Qos::generation`).
    qos_until: Option<(Instant, u64)>,
    /// The device, for the pool's fairness.
    tenant: u64,
    /// Set at withdrawal: the pool takes no further step of our jobs.
    cancel: Arc<AtomicBool>,
    /// The activation's requests that change the disk, in flight.
    mutations: Arc<Mutations>,
    /// The last poll stopped because the io_uring was full: requests wait
    /// in the ring, for completions to make room, not for a doorbell.
    throttled: bool,
    /// The backend completes requests on its own threads.
    is_async: bool,
    /// ... and this reactor may drive them (`Backend::drive`).
    is_driven: bool,
    /// Requests in the backend's hands (At::Aio).
    aio_in_flight: usize,
    /// Per slot, its way back to this reactor from the backend's threads
    /// (made at the first request, on the reactor that owns the queue).
    tags: Vec<Arc<AioTag>>,
}

/// What a queue needs besides its ring: who it is, what it serves, where
/// it reports.
pub(crate) struct QueueParams<H: RequestHandler> {
    pub id: u64,
    pub log: Arc<DeviceLog>,
    pub index: u16,
    pub irq: VirtioInterrupt,
    pub handler: Arc<H>,
    pub memory: GuestMemoryHandle,
    pub event_idx: bool,
    pub polled: bool,
    pub use_uring: bool,
    pub stats: Arc<QueueStats>,
    pub qos: Arc<Qos>,
    pub tenant: u64,
    pub mutations: Arc<Mutations>,
}

impl<H: RequestHandler> QueueState<H> {
    pub fn new(queue: DeviceRing, p: QueueParams<H>) -> QueueState<H> {
        let handler = p.handler;
        let backend = handler.backend().clone();
        let backend_is_async = backend.is_async();
        let backend_is_driven = backend.driven();
        let size = usize::from(queue.size());
        let slots = (0..size)
            .map(|_| Slot {
                at: At::Free,
                req: H::Req::default(),
                io: IoRequest {
                    iov: GuestBuffers::with_capacity(handler.max_segments()),
                    ranges: Vec::with_capacity(handler.max_ranges()),
                    ..IoRequest::default()
                },
                span: (0, 0),
                start: Instant::now(),
                mutates: false,
                cpu_job: false,
                takes: 0,
                logged: false,
            })
            .collect();
        QueueState {
            id: p.id,
            log: p.log,
            queue,
            index: p.index,
            irq: p.irq,
            inline: backend.inline(),
            uring_target: if p.use_uring {
                backend.uring_target()
            } else {
                None
            },
            backend,
            handler,
            memory: p.memory,
            slots,
            in_flight: 0,
            uring_moved: Instant::now(),
            in_uring: 0,
            cpu_out: 0,
            left: VecDeque::new(),
            broken: None,
            added: false,
            waiting_for_memory: false,
            event_idx: p.event_idx,
            polled: p.polled,
            holds: 0,
            fence: None,
            fence_hit: false,
            withdrawn: false,
            ring_checked: None,
            stats: p.stats,
            qos: p.qos,
            qos_until: None,
            tenant: p.tenant,
            cancel: Arc::default(),
            mutations: p.mutations,
            throttled: false,
            is_async: backend_is_async,
            is_driven: backend_is_async && backend_is_driven,
            aio_in_flight: 0,
            tags: Vec::new(),
        }
    }

    /// Until when the device's limit holds this queue: None once that time
    /// has come or the limits changed since.
    fn qos_waiting(&self) -> Option<Instant> {
        let (t, g) = self.qos_until?;
        (g == self.qos.generation() && Instant::now() < t).then_some(t)
    }

    fn break_queue(&mut self, why: QueueFault) {
        if self.broken.is_none() {
            self.log.event(crate::events::Event::QueueBroken {
                queue: self.index,
                why: why.to_string(),
            });
            crate::dev_log!(
                self.log,
                Error,
                "queue {} is broken and stops until the driver resets the device: {why}",
                self.index
            );
            self.broken = Some(why);
            // A broken queue looks at its ring no more: it keeps no
            // snapshot of guest memory (which would keep every window the
            // client unmaps since mapped, and counted).
            self.ring_checked = None;
            self.irq.device_needs_reset();
        }
    }

    /// Takes no request: held, or hit by an unmap's fence.
    fn paused(&self) -> bool {
        self.holds > 0 || self.fence_hit
    }

    /// Whether the whole ring lies in guest memory. Unlike
    /// `Queue::is_valid` it does not log: it runs on every pass while a
    /// queue waits for its memory.
    fn ring_mapped(&self, mem: &GuestMemoryMmap) -> bool {
        self.queue.areas().iter().all(|&(addr, len)| {
            usize::try_from(len)
                .is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(addr), len))
        })
    }

    fn ring_in(&self, f: &Fence) -> bool {
        self.queue
            .areas()
            .iter()
            .any(|&(addr, len)| f.covers_guest(addr, len))
    }

    /// Whether the request in `s` uses memory in the fence: its buffers, or
    /// what it writes when it finishes.
    fn touches(&self, s: &Slot<H::Req>, f: &Fence) -> bool {
        let buffers = if s.at == At::Pool {
            f.covers_host(s.span.0, s.span.1 - s.span.0)
        } else {
            s.io.iov.iter().any(|v| f.covers_host(v.addr(), v.len()))
        };
        buffers || self.handler.finish_writes(&s.req, f.guest.0, f.guest.1)
    }

    /// Finishes the request in `slot`: the handler writes its status, we
    /// add the used entry. `result` None: answered without backend I/O.
    /// When it finished (None: it was not in flight).
    fn finish(&mut self, slot: u16, result: Option<io::Result<()>>) -> Option<Instant> {
        let s = &mut self.slots[usize::from(slot)];
        if s.at == At::Free {
            return None;
        }
        s.at = At::Free;
        if std::mem::take(&mut s.mutates) {
            self.mutations.done();
        }
        self.in_flight -= 1;
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        self.stats.record(
            self.handler.kind(&s.req),
            now.saturating_duration_since(s.start),
        );
        let Some(mem) = s.io.iov.end() else {
            return Some(now);
        };
        if self.withdrawn || self.broken.is_some() {
            // The activation is over (or the ring is unusable): nothing is
            // written for it any more.
            return Some(now);
        }
        match self
            .handler
            .finish(&mem, &s.req, result.as_ref(), &self.stats)
        {
            Finish::Used(len) => {
                if let Err(e) = self.queue.add_used(&mem, slot, len) {
                    self.break_queue(QueueFault::Used(e));
                    return Some(now);
                }
                self.added = true;
            }
            Finish::Stop => self.break_queue(QueueFault::StoppedOnError),
        }
        Some(now)
    }

    /// The request just popped points into memory that is being taken
    /// away: it goes back to the ring, the queue waits for the map to
    /// change, and it is looked at again after resume.
    fn put_back(&mut self, head: u16) {
        let s = &mut self.slots[usize::from(head)];
        s.at = At::Free;
        s.io.iov.end();
        self.in_flight -= 1;
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.queue.undo_pop();
        self.fence_hit = true;
    }

    /// Marks the request in `slot` as leaving the reactor: a request that
    /// changes the disk is counted until it finishes.
    fn leaves(&mut self, slot: u16) {
        // Long enough for RECENT_WALK entries on a small ring too.
        let cap = self.slots.len().max(RECENT_WALK + 1);
        let s = &mut self.slots[usize::from(slot)];
        if !std::mem::replace(&mut s.logged, true) {
            // Nothing taken RECENT_OUT before this one counts again, and
            // the log keeps a ring's worth at most: a queue where more than
            // that left within RECENT_OUT is moving (see `recent_out`).
            let start = s.start;
            while self.left.front().is_some_and(|&(t, _, _)| {
                start.saturating_duration_since(t) >= RECENT_OUT || self.left.len() >= cap
            }) {
                self.left.pop_front();
            }
            self.left.push_back((start, slot, s.takes));
        }
        if !s.mutates
            && matches!(
                s.io.kind,
                IoKind::Write | IoKind::Discard | IoKind::WriteZeroes
            )
        {
            s.mutates = true;
            self.mutations.add();
        }
    }

    fn send_to_pool(&mut self, slot: u16, cx: &mut Cx) {
        self.leaves(slot);
        let s = &mut self.slots[usize::from(slot)];
        if s.io.iov.memory().is_none() {
            return;
        }
        s.at = At::Pool;
        s.span = s.io.iov.iter().fold((usize::MAX, 0), |(lo, hi), v| {
            (lo.min(v.addr()), hi.max(v.addr() + v.len()))
        });
        if s.span.0 > s.span.1 {
            s.span = (0, 0);
        }
        // Memory disks' work is all copying, and so is a write-zeroes where
        // the file system was found unable to zero in place: CPU work. A
        // fallocate that the disk does in place is not: it may wait on a
        // disk that stopped answering, and must not hold a CPU place then.
        let cpu_bound =
            self.inline || (s.io.kind == IoKind::WriteZeroes && self.backend.zeroes_are_written());
        s.cpu_job = cpu_bound;
        self.cpu_out += usize::from(cpu_bound);
        cx.pool.submit(Job {
            io: std::mem::take(&mut s.io),
            backend: self.backend.clone(),
            queue: self.id,
            slot,
            reply: cx.me.clone(),
            tenant: self.tenant,
            cancel: self.cancel.clone(),
            cpu_bound,
            progress: Default::default(),
        });
    }

    /// Submits the request in `slot`; returns the bytes it moved on the
    /// reactor itself (memory disk, page cache).
    fn submit(&mut self, slot: u16, cx: &mut Cx) -> usize {
        let s = &mut self.slots[usize::from(slot)];
        let len = s.io.len();
        let small = len <= INLINE_MAX;
        if self.inline && small && matches!(s.io.kind, IoKind::Read | IoKind::Write | IoKind::Flush)
        {
            let r = s.io.execute(&*self.backend);
            self.finish(slot, Some(r));
            return len;
        }
        if small {
            if let Some(r) = s.io.try_nowait(&*self.backend) {
                self.finish(slot, Some(r));
                return len;
            }
        }
        if self.is_async {
            if self.tags.is_empty() {
                let sink: Arc<dyn crate::backend::io::AioSink> = Arc::new(cx.me.clone());
                self.tags = (0..self.slots.len())
                    .map(|i| {
                        Arc::new(AioTag {
                            sink: sink.clone(),
                            tag: (self.id << 16) | i as u64,
                        })
                    })
                    .collect();
            }
            let s = &mut self.slots[usize::from(slot)];
            match self
                .backend
                .submit_async(&s.io, &self.tags[usize::from(slot)])
            {
                Some(Ok(())) => {
                    s.at = At::Aio;
                    self.aio_in_flight += 1;
                    self.leaves(slot);
                    return 0;
                }
                Some(Err(e)) => {
                    self.finish(slot, Some(Err(e)));
                    return 0;
                }
                None => {}
            }
        }
        let s = &mut self.slots[usize::from(slot)];
        if let (Some(t), Some(u)) = (self.uring_target, cx.uring.as_deref_mut()) {
            if Uring::accepts(&t, &s.io) && u.has_room() {
                let user_data = (self.id << 16) | u64::from(slot);
                // SAFETY: the request stays in its slot, untouched, until
                // its completion is reaped (`at` is Uring until then), and
                // its buffers hold the guest-memory snapshot they point
                // into.
                if unsafe { u.push(&t, &s.io, user_data) } {
                    u.charge(self.tenant, len);
                    s.at = At::Uring;
                    self.in_uring += 1;
                    self.uring_moved = s.start;
                    self.leaves(slot);
                    return 0;
                }
            }
        }
        self.send_to_pool(slot, cx);
        0
    }
}

/// What an io_uring completion means for its request.
#[derive(Debug)]
enum Completion {
    /// The request is done: finish it with this result.
    Done(io::Result<()>),
    /// Not done: a thread of the pool does it the long way.
    ToPool,
}

/// The completion policy, in one place: `res` is the completion's result
/// for a request of `kind` and `len` bytes, on a queue `withdrawn` or not.
/// - Success is a transfer of every byte (reads and writes), or 0.
/// - EAGAIN, EINTR (and EOPNOTSUPP for a write-zeroes, which a thread does
///   by writing zeros) are not done: a thread redoes them.
/// - A short transfer is redone whole by a thread, which reports a real
///   end of file as an error.
/// - Nothing new starts for a withdrawn queue: what would be redone is
///   cancelled instead (ECANCELED).
/// - Any other error is the request's.
fn completion(res: i32, kind: IoKind, len: usize, withdrawn: bool) -> Completion {
    let redo = || {
        if withdrawn {
            Completion::Done(Err(io::Error::from_raw_os_error(libc::ECANCELED)))
        } else {
            Completion::ToPool
        }
    };
    if res < 0 {
        return match (-res, kind) {
            (libc::EOPNOTSUPP, IoKind::WriteZeroes) | (libc::EAGAIN | libc::EINTR, _) => redo(),
            (errno, _) => Completion::Done(Err(io::Error::from_raw_os_error(errno))),
        };
    }
    let moves_data = matches!(kind, IoKind::Read | IoKind::Write);
    if moves_data && usize::try_from(res).ok() != Some(len) {
        return redo();
    }
    Completion::Done(Ok(()))
}

/// The completion policy for a backend's own completions (librbd): `res`
/// is bytes moved, or -errno. A read that moved fewer bytes than asked
/// (librbd's reads past an object's data) leaves the rest to be zeroed:
/// the second value is where zeros start.
fn aio_completion(res: i64, kind: IoKind, len: usize) -> (io::Result<()>, Option<usize>) {
    if res < 0 {
        let errno = i32::try_from(-res).unwrap_or(libc::EIO);
        return (Err(io::Error::from_raw_os_error(errno)), None);
    }
    let moved = usize::try_from(res).unwrap_or(usize::MAX);
    let tail = (kind == IoKind::Read && moved < len).then_some(moved);
    (Ok(()), tail)
}

/// What one look at the available ring gave.
enum Taken {
    /// No chain (or the ring broke before one was popped).
    Nothing,
    /// A chain was popped, and the pass ends: the queue broke, or the
    /// request waits for an unmap.
    Stop,
    /// A request was answered or submitted (`sync_bytes` of it run on
    /// this reactor).
    Request { sync_bytes: usize },
}

impl<H: RequestHandler> QueueState<H> {
    /// Whether the ring may be read now: the whole of it in guest memory
    /// (a ring outside it is not a broken queue: during firmware, QEMU
    /// unmaps and remaps windows and the ring comes back), and outside
    /// the window an unmap is taking away.
    fn ring_usable(&mut self, mem: &Arc<GuestMemoryMmap>) -> bool {
        let checked = self
            .ring_checked
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, mem));
        if !checked && !self.ring_mapped(mem) {
            self.ring_checked = None;
            if !self.waiting_for_memory {
                // QEMU remaps RAM windows while the firmware runs: routine.
                crate::dev_debug!(
                    self.log,
                    "queue {}: ring is not inside guest memory; waiting until it is mapped",
                    self.index
                );
                self.waiting_for_memory = true;
            }
            return false;
        }
        if !checked {
            self.ring_checked = Some(mem.clone());
        }
        if self.waiting_for_memory {
            crate::dev_debug!(
                self.log,
                "queue {}: ring is inside guest memory again",
                self.index
            );
            self.waiting_for_memory = false;
        }
        if let Some(f) = self.fence {
            if self.ring_in(&f) {
                self.fence_hit = true;
                return false;
            }
        }
        true
    }

    /// Pops one chain and has the device plan it: answered at once,
    /// submitted, or put back for an unmap.
    fn take(&mut self, mem: &Arc<GuestMemoryMmap>, cx: &mut Cx) -> Taken {
        let chain = match self.queue.pop(mem) {
            Ok(Some(c)) => c,
            Ok(None) => return Taken::Nothing,
            Err(e) => {
                self.break_queue(QueueFault::Available(e));
                return Taken::Nothing;
            }
        };
        let head = chain.head_index();
        let Some(s) = self.slots.get_mut(usize::from(head)) else {
            self.break_queue(ChainError::HeadOutOfRange(head).into());
            return Taken::Stop;
        };
        if s.at != At::Free {
            self.break_queue(QueueFault::HeadInFlight(head));
            return Taken::Stop;
        }
        s.at = At::Reactor;
        s.io.iov.begin(mem);
        s.start = Instant::now();
        s.takes = s.takes.wrapping_add(1);
        s.logged = false;
        self.in_flight += 1;
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let prepared = self.handler.prepare(mem, chain, &mut s.req, &mut s.io);
        if let Prepared::Broken(why) = prepared {
            s.at = At::Free;
            s.io.iov.end();
            self.in_flight -= 1;
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.break_queue(why.into());
            return Taken::Stop;
        }
        let s = &self.slots[usize::from(head)];
        if self.fence.is_some_and(|f| self.touches(s, &f)) {
            self.put_back(head);
            return Taken::Stop;
        }
        // Charged once it goes on (one put back for an unmap is charged
        // when it is taken again).
        if self.qos.on() {
            let io = &s.io;
            // Write-zeroes counts as the bytes it writes (a limit on
            // writes that it escaped would limit nothing).
            let bytes = match (&prepared, io.kind) {
                (Prepared::Io, IoKind::Read | IoKind::Write) => io.len() as u64,
                (Prepared::Io, IoKind::WriteZeroes) => {
                    io.ranges.iter().fold(0u64, |a, r| a.saturating_add(r.1))
                }
                _ => 0,
            };
            self.qos.charge(
                io.kind == IoKind::Read,
                matches!(io.kind, IoKind::Write | IoKind::WriteZeroes),
                bytes,
            );
        }
        match prepared {
            Prepared::Io => Taken::Request {
                sync_bytes: self.submit(head, cx),
            },
            _ => {
                self.finish(head, None);
                Taken::Request { sync_bytes: 0 }
            }
        }
    }
}

impl<H: RequestHandler> QueueRunner for QueueState<H> {
    fn id(&self) -> u64 {
        self.id
    }

    fn poll(&mut self, cx: &mut Cx) -> bool {
        if self.broken.is_some() || self.paused() || self.withdrawn {
            return false;
        }
        let mem = self.memory.memory().into_inner();
        if !self.ring_usable(&mem) {
            return false;
        }
        let size = self.queue.size();
        let mut work = false;
        let mut sync_bytes = 0;
        self.throttled = false;
        if self.qos_waiting().is_some() {
            return false;
        }
        self.qos_until = None;
        for _ in 0..size.min(PASS_REQUESTS) {
            if sync_bytes > PASS_SYNC_BYTES {
                break;
            }
            // Over the device's limit: the rest waits in the ring.
            if self.qos.on() {
                let g = self.qos.generation();
                self.qos_until = self.qos.admit(Instant::now()).map(|t| (t, g));
                if self.qos_until.is_some() {
                    break;
                }
            }
            // Nothing is taken that the io_uring could not hold: its
            // completion queue must never overflow, and a device takes no
            // more than its share of it (other devices' requests find
            // room). What waits stays in the ring until completions make
            // room; they are reaped on this reactor, which they wake.
            if self.uring_target.is_some()
                && cx
                    .uring
                    .as_deref_mut()
                    .is_some_and(|u| !u.has_room_for(self.tenant))
            {
                self.throttled = true;
                break;
            }
            match self.take(&mem, cx) {
                Taken::Nothing => break,
                Taken::Stop => {
                    work = true;
                    break;
                }
                Taken::Request { sync_bytes: b } => {
                    work = true;
                    sync_bytes += b;
                }
            }
        }
        work
    }

    fn uring_done(&mut self, slot: u16, res: i32, cx: &mut Cx) {
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        if s.at != At::Uring {
            return;
        }
        s.at = At::Reactor;
        self.in_uring -= 1;
        if let Some(u) = cx.uring.as_deref_mut() {
            u.release(self.tenant, s.io.len());
        }
        match completion(res, s.io.kind, s.io.len(), self.withdrawn) {
            Completion::Done(result) => {
                if let Some(t) = self.finish(slot, Some(result)) {
                    self.uring_moved = t;
                }
            }
            Completion::ToPool => {
                self.uring_moved = Instant::now();
                self.send_to_pool(slot, cx);
            }
        }
    }

    fn pool_done(&mut self, d: Done, _cx: &mut Cx) {
        let Some(s) = self.slots.get_mut(usize::from(d.slot)) else {
            return;
        };
        if s.at != At::Pool {
            return;
        }
        s.io = d.io;
        s.at = At::Reactor;
        if std::mem::take(&mut s.cpu_job) {
            self.cpu_out -= 1;
        }
        self.finish(d.slot, Some(d.result));
    }

    fn aio_done(&mut self, slot: u16, res: i64, _cx: &mut Cx) {
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        if s.at != At::Aio {
            return;
        }
        s.at = At::Reactor;
        self.aio_in_flight -= 1;
        let (result, tail) = aio_completion(res, s.io.kind, s.io.len());
        // (A withdrawn queue's requests write nothing more.)
        if let (Some(from), false) = (tail, self.withdrawn) {
            crate::memory::zero_tail(&s.io.iov, from);
        }
        self.finish(slot, Some(result));
    }

    fn signal(&mut self) {
        if !self.added {
            return;
        }
        self.added = false;
        if self.broken.is_some() || self.withdrawn {
            return;
        }
        let mem = self.memory.memory();
        match self.queue.needs_notification(&mem, self.event_idx) {
            Ok(true) => self.irq.signal_queue_at(self.index),
            Ok(false) => {}
            Err(e) => self.break_queue(QueueFault::UsedEvent(e)),
        }
    }

    fn set_notifications(&mut self, enable: bool) -> bool {
        if self.broken.is_some() || self.withdrawn {
            return false;
        }
        // A paused queue writes nothing into guest memory (an unmap may be
        // taking it away); it looks again when it resumes.
        if self.paused() {
            return false;
        }
        // A polled queue's doorbells would reach nobody: the driver need
        // not write them (it costs a guest nothing, but saves the store).
        let enable = enable && !self.polled;
        let mem = self.memory.memory();
        if !self.ring_mapped(&mem) {
            return false;
        }
        let r = self.queue.set_notification(&mem, enable);
        match r {
            // A paused queue takes nothing: what waits is not work; a
            // throttled one waits for io_uring completions, which wake the
            // reactor anyway.
            // One over its limit waits for its tokens: the reactor wakes
            // for them (see `qos_until`).
            Ok(w) => w && !self.paused() && !self.throttled && self.qos_waiting().is_none(),
            Err(e) => {
                self.break_queue(QueueFault::Notification(e));
                false
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn uring_moved(&self) -> Instant {
        self.uring_moved
    }

    fn in_uring(&self) -> bool {
        self.in_uring > 0
    }

    fn recent_out(&self, now: Instant) -> usize {
        let mut n = self.cpu_out;
        // The newest entries first, and RECENT_WALK of them at most: a
        // queue with that many requests gone out within RECENT_OUT and
        // fewer than two of them still out is moving fast, and counts as
        // two (the reactor sleeps at once, as it did for any queue that
        // moved). So a guest flooding its queue with quick requests makes
        // each look cost RECENT_WALK steps, not one per request.
        for (i, &(t, slot, takes)) in self.left.iter().rev().enumerate() {
            if n > 1 || now.saturating_duration_since(t) >= RECENT_OUT {
                break;
            }
            if i == RECENT_WALK {
                return n.max(2);
            }
            let s = &self.slots[usize::from(slot)];
            let out = match s.at {
                At::Free | At::Reactor => false,
                At::Aio => !self.is_driven,
                At::Uring | At::Pool => !s.cpu_job,
            };
            // The same slot taken again since has an entry of its own.
            n += usize::from(out && s.takes == takes);
        }
        n
    }

    fn pause(&mut self, fence: Option<Fence>) {
        match fence {
            None => self.holds += 1,
            Some(f) => {
                // Affected now: the ring, or a request in flight, lies in
                // the range. Otherwise the queue goes on, and stops only if
                // it pops a request that points into the range.
                let busy = self
                    .slots
                    .iter()
                    .any(|s| s.at != At::Free && self.touches(s, &f));
                self.fence_hit = busy || self.ring_in(&f);
                self.fence = Some(f);
            }
        }
    }

    fn resume(&mut self, fence: bool) {
        if fence {
            self.fence = None;
            self.fence_hit = false;
        } else {
            self.holds = self.holds.saturating_sub(1);
        }
    }

    fn withdraw(&mut self) {
        self.withdrawn = true;
        // Jobs of ours waiting for a pool thread never start; running ones
        // stop at their next step.
        self.cancel.store(true, Ordering::Release);
        self.ring_checked = None;
    }

    fn quiet(&self) -> bool {
        // A withdrawn queue writes nothing more, whatever is in flight.
        self.withdrawn || !self.paused() || self.in_flight == 0
    }

    fn live(&self) -> bool {
        self.broken.is_none() && !self.paused() && !self.withdrawn
    }

    fn position(&self) -> Option<crate::virtio::ring::RingPos> {
        self.broken.is_none().then(|| self.queue.position())
    }

    fn drive(&mut self) -> bool {
        self.is_driven && self.aio_in_flight > 0 && self.backend.drive()
    }

    fn driven(&self) -> usize {
        if self.is_driven {
            self.aio_in_flight
        } else {
            0
        }
    }

    fn undrive(&mut self) {
        if self.is_driven {
            self.backend.undriven();
        }
    }

    fn polled(&self) -> bool {
        self.polled && self.live()
    }

    fn qos_until(&self) -> Option<Instant> {
        self.qos_waiting().filter(|_| self.live())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(c: Completion) -> Option<i32> {
        match c {
            Completion::Done(Err(e)) => e.raw_os_error(),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn a_whole_transfer_is_done_and_a_short_one_goes_to_a_thread() {
        assert!(matches!(
            completion(4096, IoKind::Read, 4096, false),
            Completion::Done(Ok(()))
        ));
        assert!(matches!(
            completion(512, IoKind::Write, 4096, false),
            Completion::ToPool
        ));
        // A flush or discard moves no data: 0 is success.
        assert!(matches!(
            completion(0, IoKind::Flush, 0, false),
            Completion::Done(Ok(()))
        ));
    }

    #[test]
    fn eagain_and_eintr_are_redone_and_other_errors_are_the_requests() {
        for e in [libc::EAGAIN, libc::EINTR] {
            assert!(matches!(
                completion(-e, IoKind::Read, 4096, false),
                Completion::ToPool
            ));
        }
        assert!(matches!(
            completion(-libc::EOPNOTSUPP, IoKind::WriteZeroes, 4096, false),
            Completion::ToPool
        ));
        assert_eq!(
            errno(completion(-libc::EOPNOTSUPP, IoKind::Write, 4096, false)),
            Some(libc::EOPNOTSUPP)
        );
        assert_eq!(
            errno(completion(-libc::EIO, IoKind::Read, 4096, false)),
            Some(libc::EIO)
        );
    }

    #[test]
    fn a_backends_own_completion_is_its_bytes_or_its_errno_and_a_short_read_is_zero_filled() {
        assert!(matches!(
            aio_completion(4096, IoKind::Read, 4096),
            (Ok(()), None)
        ));
        // librbd answers writes, flushes and discards with 0.
        assert!(matches!(
            aio_completion(0, IoKind::Write, 4096),
            (Ok(()), None)
        ));
        assert!(matches!(
            aio_completion(0, IoKind::Flush, 0),
            (Ok(()), None)
        ));
        // A read cut short (at the image's end): the rest becomes zeros.
        assert!(matches!(
            aio_completion(513, IoKind::Read, 4096),
            (Ok(()), Some(513))
        ));
        let (r, tail) = aio_completion(-i64::from(libc::ETIMEDOUT), IoKind::Read, 4096);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ETIMEDOUT));
        assert_eq!(tail, None);
    }

    #[test]
    fn nothing_new_starts_for_a_withdrawn_queue() {
        assert_eq!(
            errno(completion(-libc::EAGAIN, IoKind::Read, 4096, true)),
            Some(libc::ECANCELED)
        );
        assert_eq!(
            errno(completion(100, IoKind::Write, 4096, true)),
            Some(libc::ECANCELED)
        );
        assert!(matches!(
            completion(4096, IoKind::Write, 4096, true),
            Completion::Done(Ok(()))
        ));
    }
}
