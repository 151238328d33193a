//! A reactor: one thread that serves every queue assigned to it, from any
//! number of devices. Each pass it takes its messages (assignments,
//! doorbells, pauses, completions from the thread pool), reaps its
//! io_uring, polls its queues (pop, validate, submit), submits the io_uring
//! batch, makes one interrupt decision per queue, and acknowledges pauses
//! and withdrawals whose queues have nothing in flight. With no queue it
//! sleeps; in busy mode it spins while it has queues; in adaptive and
//! interrupt mode it sleeps on an eventfd that doorbells, the pool and the
//! io_uring all signal.

use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::warn;
use vmm_sys_util::eventfd::EventFd;

use super::pool::{Done, Pool};
use super::PollMode;
use crate::backend::uring::Uring;

/// A clock for the busy share, read on every pass: the time-stamp counter
/// where there is one (a few cycles; only ratios of it are used), the
/// monotonic clock elsewhere.
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc only reads the time-stamp counter; it has no
        // memory effects and exists on every x86_64 processor.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// In adaptive mode, how long to keep spinning after the last work.
const ADAPTIVE_SPIN: Duration = Duration::from_micros(200);
/// The longest a reactor sleeps for a queue held by its device's limit
/// before it looks again (the limit may have been lifted).
const QOS_RECHECK: Duration = Duration::from_millis(50);
/// Idle passes of a spinning reactor between two yields of its core.
const IDLE_PASSES_PER_YIELD: u32 = 64;
/// A busy reactor sleeping for the I/O asks for no doorbell on a queue
/// whose io_uring requests moved within this long, and looks again at most
/// this long after their last movement.
const LAZY_DOORBELLS: Duration = Duration::from_micros(200);

/// Wakes a reactor that sleeps. A doorbell sets `kicked` and wakes: no
/// message per doorbell, so a client ringing doorbells while the reactor is
/// busy costs no memory.
pub(crate) struct Waker {
    fd: EventFd,
    sleeping: AtomicBool,
    kicked: AtomicBool,
}

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        Ok(Waker {
            fd: EventFd::new(0)?,
            sleeping: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
        })
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// Called after a message was sent.
    pub fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let _ = self.fd.write(1);
        }
    }

    /// Waits for a wake-up, or until `t` at the latest: false when the
    /// time came first.
    fn wait_until(&self, t: Instant) -> bool {
        let left = t.saturating_duration_since(Instant::now());
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(left.subsec_nanos()),
        };
        let mut pfd = libc::pollfd {
            fd: self.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives across the call, a valid timespec
        // and no signal mask; the kernel only writes `revents`.
        let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if n > 0 {
            // Readable: this does not block.
            let _ = self.fd.read();
        }
        n != 0
    }

    /// A doorbell: the reactor looks at its rings again.
    pub fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// A sender to one reactor that also wakes it.
#[derive(Clone)]
pub(crate) struct ReactorTx {
    pub tx: Sender<Msg>,
    pub waker: Arc<Waker>,
}

impl ReactorTx {
    pub fn send(&self, m: Msg) {
        // A reactor that is gone has nothing left to tell.
        let _ = self.tx.send(m);
        self.waker.wake();
    }
}

impl crate::backend::io::AioSink for ReactorTx {
    fn done(&self, tag: u64, res: i64) {
        let slot = u16::try_from(tag & 0xffff).unwrap_or(u16::MAX);
        self.send(Msg::AioDone {
            queue: tag >> 16,
            slot,
            res,
        });
    }
}

/// A guest range that is about to be unmapped, and where its window is
/// mapped in this process.
#[derive(Clone, Copy, Debug)]
pub struct Fence {
    pub guest: (u64, u64),
    pub host: (usize, usize),
}

impl Fence {
    pub fn covers_guest(&self, addr: u64, len: u64) -> bool {
        addr < self.guest.1 && self.guest.0 < addr.saturating_add(len)
    }
    pub fn covers_host(&self, addr: usize, len: usize) -> bool {
        addr < self.host.1 && self.host.0 < addr.saturating_add(len)
    }
}

pub(crate) enum Msg {
    Assign(Box<dyn QueueRunner>),
    /// Stop taking requests on a queue (all of them, or those that touch
    /// the fence) and acknowledge once what is affected has drained.
    Pause {
        queue: u64,
        fence: Option<Fence>,
        ack: Sender<()>,
    },
    /// Lifts a pause: the fence of an unmap, or one hold.
    Resume {
        queue: u64,
        fence: bool,
    },
    /// Take the queue away: nothing more is written to its rings; the
    /// acknowledgement comes once nothing is in flight (`drain`), or at the
    /// end of this pass (the queue then leaves once drained).
    Withdraw {
        queue: u64,
        ack: Sender<()>,
        drain: bool,
    },
    /// Where a queue stands in its ring (None: broken, or not here).
    Position {
        queue: u64,
        reply: Sender<(u64, Option<crate::virtio::ring::RingPos>)>,
    },
    PoolDone(Done),
    /// A backend's own completion (librbd's threads) for a request slot.
    AioDone {
        queue: u64,
        slot: u16,
        res: i64,
    },
    /// The engine is gone: leave once no queue is left.
    Shutdown,
}

/// What a queue needs from its reactor while it runs.
pub(crate) struct Cx<'a> {
    pub uring: Option<&'a mut Uring>,
    pub pool: &'a Pool,
    pub me: &'a ReactorTx,
}

/// One queue as a reactor sees it, whatever the device behind it.
pub(crate) trait QueueRunner: Send {
    fn id(&self) -> u64;
    /// Pops, validates and submits what the ring holds; true if any
    /// request was taken.
    fn poll(&mut self, cx: &mut Cx) -> bool;
    /// An io_uring completion for `slot`.
    fn uring_done(&mut self, slot: u16, res: i32, cx: &mut Cx);
    fn pool_done(&mut self, d: Done, cx: &mut Cx);
    /// A completion the backend reported from its own thread for `slot`:
    /// bytes moved, or -errno.
    fn aio_done(&mut self, slot: u16, res: i64, cx: &mut Cx);
    /// One interrupt decision for what completed since the last one.
    fn signal(&mut self);
    /// Turns doorbells on (true: requests already wait) or off.
    fn set_notifications(&mut self, enable: bool) -> bool;
    fn in_flight(&self) -> usize;
    /// When a request of it last went into the reactor's io_uring or came
    /// out of it.
    fn uring_moved(&self) -> Instant;
    /// Requests of it are in the reactor's io_uring (their completions
    /// wake the reactor; a thread pool's would too, but there the lazy
    /// doorbells below cost more than they save).
    fn in_uring(&self) -> bool;
    /// Requests of it in other threads' hands that count against another
    /// queue's lone request: those taken within a millisecond (older ones
    /// wait on a slow or stuck disk), and CPU work at the pool however old
    /// (it needs the CPU a spin would take), at `now`: exact up to 2, at
    /// least 2 beyond.
    fn recent_out(&self, now: Instant) -> usize;
    fn pause(&mut self, fence: Option<Fence>);
    fn resume(&mut self, fence: bool);
    fn withdraw(&mut self);
    /// A pause is honoured: what it affects has nothing in flight.
    fn quiet(&self) -> bool;
    /// Drives the backend's requests in flight from this reactor (see
    /// `Backend::drive`); true if anything moved.
    fn drive(&mut self) -> bool;
    /// Requests in flight that this reactor completes by driving them.
    fn driven(&self) -> usize;
    /// The reactor goes to sleep: the backend's threads take its driven
    /// requests over.
    fn undrive(&mut self);
    /// Takes requests (not paused, withdrawn or broken).
    fn live(&self) -> bool;
    /// Live, and no doorbell will ever say that it has work: it must be
    /// polled whatever the reactor's mode.
    fn polled(&self) -> bool;
    /// Over its device's limit until then: a sleeping reactor wakes for it.
    fn qos_until(&self) -> Option<Instant>;
    /// Where it stands in its ring; None once broken.
    fn position(&self) -> Option<crate::virtio::ring::RingPos>;
}

pub(crate) struct Reactor {
    pub name: String,
    rx: Receiver<Msg>,
    me: ReactorTx,
    queues: Vec<Box<dyn QueueRunner>>,
    uring: Option<Uring>,
    pool: Arc<Pool>,
    mode: PollMode,
    /// Acknowledged after the next pass: pauses, and withdrawals that
    /// do not wait for the queue to drain.
    pass_acks: Vec<(u64, Sender<()>)>,
    withdraw_acks: Vec<(u64, Sender<()>)>,
    /// Queues assigned to this reactor (for placement).
    pub load: Arc<AtomicUsize>,
    completions: Vec<(u64, i32)>,
    pub stats: Arc<super::ReactorStats>,
    /// Pinned to a CPU that the I/O threads (and the kernel's io_uring
    /// workers) must use too: in busy mode, it sleeps rather than spins
    /// while only their work is pending.
    pub shares_cpu: bool,
    /// The last pass moved a driven backend's requests.
    drove: bool,
    /// The last pass took requests that the adaptive spin is for (not
    /// only those a limit let in).
    spin_work: bool,
    shutdown: bool,
    /// Withdrawn queues that leave once nothing is in flight.
    leaving: Vec<u64>,
    /// Which queue the next pass polls first.
    turn: usize,
}

impl Reactor {
    pub fn new(
        name: String,
        rx: Receiver<Msg>,
        me: ReactorTx,
        uring: Option<Uring>,
        pool: Arc<Pool>,
        mode: PollMode,
        load: Arc<AtomicUsize>,
    ) -> Reactor {
        Reactor {
            name,
            rx,
            me,
            queues: Vec::new(),
            uring,
            pool,
            mode,
            pass_acks: Vec::new(),
            withdraw_acks: Vec::new(),
            load,
            completions: Vec::with_capacity(256),
            stats: Arc::default(),
            shares_cpu: false,
            drove: false,
            spin_work: false,
            shutdown: false,
            leaving: Vec::new(),
            turn: 0,
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Assign(mut q) => {
                q.set_notifications(self.mode != PollMode::Busy);
                self.queues.push(q);
            }
            Msg::Shutdown => self.shutdown = true,
            Msg::Pause { queue, fence, ack } => match self.find(queue) {
                Some(i) => {
                    self.queues[i].pause(fence);
                    self.pass_acks.push((queue, ack));
                }
                None => {
                    let _ = ack.send(());
                }
            },
            Msg::Resume { queue, fence } => {
                if let Some(i) = self.find(queue) {
                    self.queues[i].resume(fence);
                }
            }
            Msg::Withdraw { queue, ack, drain } => match self.find(queue) {
                Some(i) => {
                    self.queues[i].withdraw();
                    if drain {
                        self.withdraw_acks.push((queue, ack));
                    } else {
                        // Acknowledged after this pass; gone once drained.
                        self.pass_acks.push((queue, ack));
                        self.leaving.push(queue);
                    }
                }
                None => {
                    let _ = ack.send(());
                }
            },
            Msg::Position { queue, reply } => {
                let pos = self.find(queue).and_then(|i| self.queues[i].position());
                let _ = reply.send((queue, pos));
            }
            Msg::PoolDone(d) => self.on_queue(d.queue, |q, cx| q.pool_done(d, cx)),
            Msg::AioDone { queue, slot, res } => {
                self.on_queue(queue, |q, cx| q.aio_done(slot, res, cx));
            }
        }
    }

    /// Runs `f` on queue `id` (if it is still here) with its context: how
    /// every completion reaches its queue.
    fn on_queue(&mut self, id: u64, f: impl FnOnce(&mut dyn QueueRunner, &mut Cx)) {
        if let Some(i) = self.find(id) {
            let mut cx = Cx {
                uring: self.uring.as_mut(),
                pool: &self.pool,
                me: &self.me,
            };
            f(self.queues[i].as_mut(), &mut cx);
        }
    }

    fn find(&self, id: u64) -> Option<usize> {
        self.queues.iter().position(|q| q.id() == id)
    }

    /// One pass; true if any request was taken from a ring.
    fn pass(&mut self) -> bool {
        // Replies a driven backend has for us become completions first,
        // so that this pass finishes them.
        let mut moved = false;
        for q in self.queues.iter_mut() {
            moved |= q.drive();
        }
        while let Ok(m) = self.rx.try_recv() {
            self.handle(m);
        }
        if let Some(u) = self.uring.as_mut() {
            let done = &mut self.completions;
            u.reap(|ud, res| done.push((ud, res)));
        }
        for k in 0..self.completions.len() {
            let (ud, res) = self.completions[k];
            let (queue, slot) = (ud >> 16, (ud & 0xffff) as u16);
            self.on_queue(queue, |q, cx| q.uring_done(slot, res, cx));
        }
        self.completions.clear();
        let mut work = false;
        let mut spin = false;
        // Each pass starts with the next queue: when the io_uring has room
        // for only some requests, every queue gets its turn at it.
        let n = self.queues.len();
        self.turn = self.turn.wrapping_add(1);
        for k in 0..n {
            let q = &mut self.queues[(self.turn + k) % n];
            let mut cx = Cx {
                uring: self.uring.as_mut(),
                pool: &self.pool,
                me: &self.me,
            };
            let took = q.poll(&mut cx);
            work |= took;
            // Requests let in as a limit's tokens came are not a reason to
            // keep spinning: the next ones come with the next tokens.
            spin |= took && q.qos_until().is_none();
        }
        self.spin_work = spin;
        // What the polls submitted to a driven backend goes out now, in
        // one batch per backend.
        for q in self.queues.iter_mut() {
            moved |= q.drive();
        }
        if let Some(u) = self.uring.as_mut() {
            if let Err(e) = u.submit() {
                crate::error_limited!("{}: io_uring submit failed: {e}", self.name);
            }
        }
        for q in self.queues.iter_mut() {
            q.signal();
        }
        let faults = crate::memory::take_faults();
        if faults > 0 {
            crate::error_limited!(
                "{faults} guest page(s) vanished under the device: the client cut its \
                 guest-memory file short; those pages now read as zeros"
            );
        }
        self.acknowledge();
        self.drove = moved;
        work
    }

    /// Acknowledgements come after the interrupt decision of the pass, so
    /// that whoever waits for one may change memory at once.
    fn acknowledge(&mut self) {
        let queues = &self.queues;
        let quiet = |id: u64| {
            queues
                .iter()
                .find(|q| q.id() == id)
                .is_none_or(|q| q.quiet())
        };
        self.pass_acks.retain(|(id, ack)| {
            if quiet(*id) {
                let _ = ack.send(());
                false
            } else {
                true
            }
        });
        let mut gone = Vec::new();
        let drained = |id: u64| {
            queues
                .iter()
                .find(|q| q.id() == id)
                .is_none_or(|q| q.in_flight() == 0)
        };
        self.leaving.retain(|id| {
            let drained = drained(*id);
            if drained {
                gone.push(*id);
            }
            !drained
        });
        self.withdraw_acks.retain(|(id, ack)| {
            if drained(*id) {
                gone.push(*id);
                let _ = ack.send(());
                false
            } else {
                true
            }
        });
        if !gone.is_empty() {
            self.queues.retain(|q| !gone.contains(&q.id()));
            self.load.fetch_sub(gone.len(), Ordering::Relaxed);
        }
    }

    fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.in_flight()).sum()
    }

    fn driven(&self) -> usize {
        self.queues.iter().map(|q| q.driven()).sum()
    }

    /// Requests in other threads' hands that count against a lone request
    /// (see `QueueRunner::recent_out`).
    fn recent_out(&self) -> usize {
        let now = Instant::now();
        let mut n = 0;
        for q in &self.queues {
            n += q.recent_out(now);
            // Only 1 decides anything.
            if n > 1 {
                break;
            }
        }
        n
    }

    /// Sleeps until a message, a pool completion or an io_uring completion
    /// arrives, or a queue held by its device's limit may go on: false
    /// when it woke for the limit alone.
    fn sleep(&mut self, deadline: Option<Instant>) -> bool {
        let waker = self.me.waker.clone();
        waker.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let cq_ready = self.uring.as_mut().is_some_and(Uring::has_completions);
        let mut woken = true;
        if self.rx.is_empty() && !cq_ready && !waker.kicked.swap(false, Ordering::SeqCst) {
            let until = self.queues.iter().filter_map(|q| q.qos_until()).min();
            match until.into_iter().chain(deadline).min() {
                None => {
                    let _ = waker.fd.read();
                }
                // Looked at again at least every QOS_RECHECK: a limit
                // lifted meanwhile lets the queue go on.
                Some(t) => woken = waker.wait_until(t.min(Instant::now() + QOS_RECHECK)),
            }
        }
        waker.sleeping.store(false, Ordering::SeqCst);
        waker.kicked.store(false, Ordering::SeqCst);
        woken
    }

    /// What an idle pass does next: spin (`busy_wait`), or sleep; and
    /// whether it sleeps to give its CPU to the I/O threads
    /// (`yield_to_io`).
    fn when_idle(&self, last_work: Instant) -> (bool, bool) {
        let live = self.queues.iter().any(|q| q.live());
        // On a CPU it shares with the I/O threads, a busy reactor with
        // requests in their hands gives the CPU to them at once (on an
        // AMD EPYC VM even a 20 µs spin kept a 4 KiB buffered write's
        // thread off the CPU: p50 19.6 µs at QD1, 12.9 µs without it;
        // but see one request alone below): spinning there
        // took the time the requests needed (4 KiB buffered writes ran
        // at 0.44-0.84x qemu-storage-daemon's), and their completion
        // wakes it. It asks for doorbells first, as in adaptive mode,
        // so that a request added meanwhile (on any queue: another
        // device's guest must not wait for this one's disk) wakes it
        // too.
        // (Summed only where it decides something: on a shared CPU, or when
        // no queue is live.)
        // Requests this reactor drives itself need no other thread: a busy
        // reactor keeps spinning for them.
        let driven = self.driven();
        // Requests in other threads' hands (the I/O threads', the kernel's).
        let out = if self.mode == PollMode::Busy && (self.shares_cpu || !live) {
            self.in_flight().saturating_sub(driven)
        } else {
            0
        };
        let in_flight = out > 0;
        // Not with requests the kernel has not taken yet (a submit that
        // failed): no completion would come for them, and the next pass
        // must submit them again.
        let unsubmitted = self.uring.as_ref().is_some_and(|u| u.unsubmitted() > 0);
        let yield_to_io = self.shares_cpu && in_flight && !unsubmitted;
        // Except for one request alone in their hands: then it spins (and
        // yields every few passes) for ADAPTIVE_SPIN after its last work
        // first, as an adaptive reactor does. A 4 KiB buffered write at
        // QD1 took 34 µs (p50) when the reactor slept at once and 21 µs
        // with the spin (0.59x the IOPS, in one interleaved run on an
        // Intel Xeon VM). With more requests out it sleeps at once: with a
        // spin that their completions kept renewing, O_DIRECT runs at QD32
        // collapsed to 2.3k IOPS now and then (why was not found).
        // Requests out for a millisecond or more (a disk that hangs, or
        // answers in milliseconds) do not count: one tenant's stuck request
        // must not cost another's lone request its spin (a 4 KiB buffered
        // write at QD1 took 34 µs instead of 21), even while that tenant
        // keeps its queue moving with other requests.
        let lone = yield_to_io && (out == 1 || self.recent_out() == 1);
        let busy_wait = self.queues.iter().any(|q| q.polled())
            || match self.mode {
                PollMode::Busy => {
                    driven > 0
                        || (!yield_to_io && (live || in_flight))
                        || (lone && last_work.elapsed() < ADAPTIVE_SPIN)
                }
                PollMode::Adaptive => last_work.elapsed() < ADAPTIVE_SPIN,
                PollMode::Interrupt => false,
            };
        (busy_wait, yield_to_io)
    }

    /// The reactor thread.
    pub fn run(mut self) {
        let mut last_work = Instant::now();
        let mut mark = ticks();
        let mut idle_passes: u32 = 0;
        loop {
            let work = self.pass();
            // Time since the last mark counts as busy when the pass found
            // work (sleeps end a mark too, so they never count).
            let now = ticks();
            let spent = now.wrapping_sub(mark);
            mark = now;
            self.stats.total_ns.fetch_add(spent, Ordering::Relaxed);
            if work {
                self.stats.busy_ns.fetch_add(spent, Ordering::Relaxed);
            }
            if self.shutdown && self.queues.is_empty() {
                return;
            }
            if work || self.drove {
                if self.spin_work || self.drove {
                    last_work = Instant::now();
                }
                idle_passes = 0;
                continue;
            }
            let (busy_wait, yield_to_io) = self.when_idle(last_work);
            if busy_wait {
                // A spinning reactor gives its core away for a moment when
                // something else wants it (an I/O thread, the kernel's
                // writeback, the guest on a small machine): a yield costs
                // nothing when nobody else is runnable.
                idle_passes += 1;
                if idle_passes.is_multiple_of(IDLE_PASSES_PER_YIELD) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let mut deadline = None;
            if self.mode != PollMode::Busy || yield_to_io {
                // Ask for doorbells, then look once more: a request that
                // arrived before notifications were on would otherwise
                // wait for the next one.
                // A busy reactor that sleeps for the I/O asks for none on a
                // queue whose requests are moving: their next completion
                // wakes it soon, and it takes what came meanwhile then; a
                // doorbell would cost the guest a round trip on the CPU
                // those requests need. It looks again within LAZY_DOORBELLS
                // of their last movement, so that a request added meanwhile
                // waits no longer than that if none completes.
                let now = Instant::now();
                let mut waiting = false;
                for q in self.queues.iter_mut() {
                    let moving = yield_to_io
                        && q.in_uring()
                        && now.saturating_duration_since(q.uring_moved()) < LAZY_DOORBELLS;
                    if moving {
                        let at = q.uring_moved() + LAZY_DOORBELLS;
                        deadline = Some(deadline.map_or(at, |d: Instant| d.min(at)));
                        waiting |= q.set_notifications(false);
                    } else {
                        waiting |= q.set_notifications(true);
                    }
                }
                if waiting {
                    continue;
                }
            }
            for q in self.queues.iter_mut() {
                q.undrive();
            }
            let woken = self.sleep(deadline);
            let now = ticks();
            self.stats
                .total_ns
                .fetch_add(now.wrapping_sub(mark), Ordering::Relaxed);
            mark = now;
            if self.mode == PollMode::Adaptive || yield_to_io {
                for q in self.queues.iter_mut() {
                    q.set_notifications(false);
                }
            }
            // A doorbell or a completion: more may follow, worth the
            // adaptive spin; a limit's tokens are not. Not for a reactor
            // that slept to give its CPU to the I/O: there only work the
            // next pass finds starts the lone request's spin again, or a
            // guest ringing empty doorbells could keep it spinning on the
            // CPU the request needs.
            if woken && !yield_to_io {
                last_work = Instant::now();
            }
        }
    }

    /// Serves on the calling thread until nothing is available and nothing
    /// is in flight (the engine's inline mode).
    pub fn run_until_idle(&mut self) {
        loop {
            let work = self.pass();
            for q in self.queues.iter_mut() {
                q.set_notifications(true);
            }
            if work {
                continue;
            }
            if self.in_flight() == 0 && self.pass_acks.is_empty() && self.withdraw_acks.is_empty() {
                return;
            }
            match self.uring.as_mut() {
                Some(u) if u.in_flight() > 0 => {
                    if let Err(e) = u.wait() {
                        warn!("{}: io_uring wait failed: {e}", self.name);
                    }
                }
                _ => {
                    if let Ok(m) = self.rx.recv_timeout(Duration::from_millis(100)) {
                        self.handle(m);
                    }
                }
            }
        }
    }
}
