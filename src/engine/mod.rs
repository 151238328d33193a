//! The polled engine: a fixed set of reactors (poller threads) for the
//! whole process, serving the queues of every device, and the backends'
//! I/O engines (an io_uring per reactor, or the thread pool). Knows
//! threads, virtqueues, guest memory and completions; what a request means
//! belongs to the device, which plugs in through [`RequestHandler`].
//!
//! A device's queues are handed to the least-loaded reactors when its
//! driver sets DRIVER_OK ([`Engine::activate`]) and taken back at reset,
//! unmap or disconnect ([`Active`]), without stopping the reactor or any
//! other device's queues. Only the reactor that owns a queue touches its
//! rings: no lock on the hot path.
//!
//! Nothing has a timeout that lets stale work through: a pause or a
//! withdrawal is acknowledged only when the requests it concerns are no
//! longer in flight. A backend that is stuck therefore holds the caller
//! (the device's protocol thread) until it returns; the log says so every
//! few seconds. QEMU stops waiting for a reply after 5 s and reports the
//! failed access; the device never writes into memory the client took back.

mod device;
mod pool;
pub mod qos;
mod queue;
mod reactor;
pub mod stats;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use log::{debug, info, warn};
use vm_memory::GuestMemoryMmap;

use crate::backend::io::Backend;
use crate::backend::request::IoRequest;
use crate::backend::uring::{self, Uring};
use crate::memory::GuestMemoryHandle;
use crate::util::DeviceLog;
use crate::virtio::ring::{ChainError, RingError};
use crate::virtio::{QueueConfig, VirtioInterrupt};
pub use device::{Change, DeviceQueues, HoldError, Paused, QueueHold, Start, Starting};
use pool::Pool;
pub use qos::{Qos, QosLimits};
pub use reactor::Fence;
use reactor::{Msg, Reactor, ReactorTx, Waker};
pub use stats::{Histogram, QueueStats, ReactorStats, SavedStats, KINDS};

/// How reactors wait for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    /// Spin on the rings; the driver is told not to ring doorbells.
    Busy,
    /// Spin while there is work and a little after, then sleep until a
    /// doorbell or a completion.
    Adaptive,
    /// Sleep until a doorbell.
    Interrupt,
}

/// Where file I/O runs (QEMU's `aio=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    /// A thread pool that grows with demand.
    Threads,
    /// An io_uring per reactor, submitted and reaped in its loop; the
    /// thread pool takes what io_uring cannot do.
    IoUring,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Reactor threads.
    pub reactors: usize,
    /// CPUs to pin reactors to, round-robin; empty = no pinning.
    pub cpus: Vec<usize>,
    pub mode: PollMode,
    pub io_engine: IoEngine,
    /// Most threads of the pool.
    pub max_io_threads: usize,
    /// No reactor threads: each activation's queues are served on the
    /// thread that activates the device or rings a doorbell, until they are
    /// idle. Deterministic, for fuzzing and tests; not on the command line.
    pub inline: bool,
}

/// Entries of each reactor's io_uring.
const URING_ENTRIES: u32 = 256;
/// While waiting for a drain, how often to say so.
const DRAIN_REPORT: Duration = Duration::from_secs(5);

/// What a device does with the requests of its queues.
pub trait RequestHandler: Send + Sync + 'static {
    /// Per-request state, allocated once per ring entry and reused.
    type Req: Default + Send + 'static;
    fn backend(&self) -> &Arc<dyn Backend>;
    /// Most iovecs one request can need (capacity reserved up front).
    fn max_segments(&self) -> usize;
    /// Most ranges one discard/write-zeroes request can carry.
    fn max_ranges(&self) -> usize;
    /// Validates a chain and says what it needs: backend work described in
    /// `io`, an answer without I/O, or a ring that is unusable.
    fn prepare(
        &self,
        mem: &Arc<GuestMemoryMmap>,
        chain: crate::virtio::ring::RingChain<'_>,
        req: &mut Self::Req,
        io: &mut IoRequest,
    ) -> Prepared;
    /// Whether finishing the request writes guest memory in `lo .. hi`,
    /// beyond its I/O buffers (virtio-blk: the status byte, GET_ID's
    /// answer), so that an unmap of that memory waits for it or puts the
    /// request back. Nothing is written into guest memory before `finish`.
    fn finish_writes(&self, req: &Self::Req, lo: u64, hi: u64) -> bool;
    /// The slot of the queue's statistics the request counts in (its
    /// kind, as the device numbers them), for its latency.
    fn kind(&self, req: &Self::Req) -> usize;
    /// Writes the outcome into guest memory (status) and gives the used
    /// length. `result` is the backend's, or None when `prepare` answered.
    /// `stats` is the queue's, for the device to count the request in.
    fn finish(
        &self,
        mem: &GuestMemoryMmap,
        req: &Self::Req,
        result: Option<&io::Result<()>>,
        stats: &QueueStats,
    ) -> Finish;
}

pub enum Prepared {
    /// Submit `io`.
    Io,
    /// Answered without backend I/O: finish at once.
    Ready,
    /// The chain cannot be used: the queue stops until reset.
    Broken(ChainError),
}

pub enum Finish {
    /// Add a used entry of this length.
    Used(u32),
    /// Leave the request unanswered and stop the queue: the device's
    /// policy on a backend error (werror=stop).
    Stop,
}

/// Why a queue stopped until the driver resets the device.
#[derive(Debug, thiserror::Error)]
pub enum QueueFault {
    #[error("available ring: {0}")]
    Available(RingError),
    #[error("used ring: {0}")]
    Used(RingError),
    #[error("reading the used-event index: {0}")]
    UsedEvent(RingError),
    #[error("cannot update notification state: {0}")]
    Notification(RingError),
    #[error("head {0} reused while in flight")]
    HeadInFlight(u16),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("a backend error, and the device stops on one (--on-error stop)")]
    StoppedOnError,
}

struct ReactorHandle {
    tx: ReactorTx,
    load: Arc<AtomicUsize>,
    stats: Arc<ReactorStats>,
}

/// The reactors and the I/O engines of the process. Shared by every device.
pub struct Engine {
    cfg: EngineConfig,
    reactors: Vec<ReactorHandle>,
    pool: Arc<Pool>,
    use_uring: bool,
    next_queue: AtomicU64,
    next_tenant: AtomicU64,
}

/// What a device activation hands the engine.
pub struct Activation<H: RequestHandler> {
    /// The device's log (its name, its limit on guest-caused lines).
    pub log: Arc<DeviceLog>,
    pub handler: Arc<H>,
    pub memory: GuestMemoryHandle,
    pub queues: Vec<Option<QueueConfig>>,
    /// The device's statistics for each queue (kept across activations).
    pub stats: Vec<Arc<QueueStats>>,
    /// The device's limits, shared by its queues.
    pub qos: Arc<Qos>,
    pub event_idx: bool,
    /// No doorbell will come (the driver writes them to shared memory):
    /// the reactor polls these queues and never sleeps while it has one.
    pub polled: bool,
    pub irq: VirtioInterrupt,
    /// The device, for sharing the thread pool fairly (see
    /// [`Engine::new_tenant`]); the same for all its activations.
    pub tenant: u64,
}

/// An activation's requests that change the disk (writes, discards,
/// write-zeroes) and have left the reactor for the io_uring or the thread
/// pool. A queue taken back without waiting (a client that left) may still
/// have some in the backend: the device's next activation waits for them
/// to end, so that none lands after a write of the next client.
#[derive(Default)]
pub struct Mutations {
    n: AtomicUsize,
    lock: parking_lot::Mutex<()>,
    zero: parking_lot::Condvar,
}

impl Mutations {
    fn add(&self) {
        self.n.fetch_add(1, Ordering::AcqRel);
    }

    fn done(&self) {
        if self.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _g = self.lock.lock();
            self.zero.notify_all();
        }
    }

    /// In flight now.
    pub fn count(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    /// True once none is in flight, false if some still are after
    /// `limit`.
    fn wait_within(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut g = self.lock.lock();
        while self.count() > 0 {
            if self.zero.wait_until(&mut g, deadline).timed_out() {
                return self.count() == 0;
            }
        }
        true
    }

    /// Returns once none is in flight, saying so in the log every few
    /// seconds while it waits.
    fn wait(&self, log: &DeviceLog) {
        let mut g = self.lock.lock();
        let mut waited = Duration::ZERO;
        while self.count() > 0 {
            if self.zero.wait_for(&mut g, DRAIN_REPORT).timed_out() && self.count() > 0 {
                waited += DRAIN_REPORT;
                log::warn!(
                    "{}: {} write(s) of the previous client are still in the backend \
                     ({waited:?} so far); the device starts once they have ended",
                    log.name(),
                    self.count()
                );
            }
        }
    }
}

impl Engine {
    /// Starts the reactors (none in inline mode). io_uring is used when
    /// asked for and available; otherwise the thread pool, with a log line
    /// saying why.
    pub fn start(cfg: EngineConfig) -> io::Result<Arc<Engine>> {
        let usable = match usable_cpus() {
            Ok(u) => u,
            // CPUs were asked for, and which this process may use is unknown.
            Err(e) if !cfg.cpus.is_empty() => return Err(e),
            Err(_) => Vec::new(),
        };
        // Checked here too, not only by the command line: a reactor pinned
        // to a CPU it may not use would run nowhere it was asked to.
        if let Some(c) = cfg.cpus.iter().find(|c| !usable.contains(c)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {c} is not online or not allowed for this process"),
            ));
        }
        let pool = Arc::new(Pool::new(cfg.max_io_threads));
        let use_uring = cfg.io_engine == IoEngine::IoUring
            && match uring::available() {
                Ok(()) => true,
                Err(e) => {
                    warn!("io_uring is not available ({e}): file I/O runs on the thread pool");
                    false
                }
            };
        let mut reactors = Vec::new();
        let (reactor_cpus, worker_cpus, chosen) = placement(
            &usable,
            &cfg.cpus,
            cfg.mode,
            if cfg.inline { 0 } else { cfg.reactors.max(1) },
        );
        crate::util::set_reactor_count(if cfg.inline { 1 } else { cfg.reactors.max(1) });
        if !worker_cpus.is_empty() {
            pool.set_cpus(worker_cpus.clone());
            crate::util::set_helper_cpus(worker_cpus.clone());
        }
        if chosen {
            say_pinned(&reactor_cpus, &worker_cpus);
        }
        if !cfg.inline {
            for (i, &cpu) in reactor_cpus.iter().enumerate() {
                let shares_cpu = cpu.is_some_and(|c| worker_cpus.contains(&c));
                reactors.push(spawn_reactor(
                    i, cpu, shares_cpu, use_uring, &pool, cfg.mode,
                )?);
            }
            debug!(
                "{} reactor(s) in {:?} mode, file I/O on {}",
                reactors.len(),
                cfg.mode,
                if use_uring {
                    "io_uring"
                } else {
                    "the thread pool"
                }
            );
        }
        Ok(Arc::new(Engine {
            cfg,
            reactors,
            pool,
            use_uring,
            next_queue: AtomicU64::new(1),
            next_tenant: AtomicU64::new(1),
        }))
    }

    pub fn mode(&self) -> PollMode {
        self.cfg.mode
    }

    /// One line for the log: reactors, mode, where file I/O runs.
    pub fn describe(&self) -> String {
        format!(
            "{} reactor(s) in {:?} mode, file I/O on {}",
            self.reactors.len(),
            self.cfg.mode,
            if self.use_uring {
                "io_uring"
            } else {
                "the thread pool"
            }
        )
    }

    /// Each reactor's time accounting, in reactor order.
    pub fn reactor_stats(&self) -> Vec<Arc<ReactorStats>> {
        self.reactors.iter().map(|r| r.stats.clone()).collect()
    }

    /// Queues assigned to each reactor now.
    pub fn reactor_loads(&self) -> Vec<usize> {
        self.reactors
            .iter()
            .map(|r| r.load.load(Ordering::Relaxed))
            .collect()
    }

    /// Threads the pool runs now.
    pub fn io_threads(&self) -> usize {
        self.pool.workers()
    }

    /// A new identity for a device, under which the thread pool shares its
    /// workers fairly with the other devices.
    pub fn new_tenant(&self) -> u64 {
        self.next_tenant.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands the queues the driver set up to reactors (each to the least
    /// loaded one).
    pub fn activate<H: RequestHandler>(self: &Arc<Self>, a: Activation<H>) -> Active {
        let mutations = Arc::new(Mutations::default());
        let runners = self.queue_runners(&a, &mutations);
        let mut placed = vec![None; a.queues.len()];
        if self.cfg.inline {
            return self.activate_inline(a, runners, placed, mutations);
        }
        for (i, q) in runners {
            let r = (0..self.reactors.len())
                .min_by_key(|&r| self.reactors[r].load.load(Ordering::Relaxed))
                .unwrap_or(0);
            self.reactors[r].load.fetch_add(1, Ordering::Relaxed);
            placed[i] = Some(Placed {
                reactor: r,
                id: q.id(),
            });
            self.reactors[r].tx.send(Msg::Assign(q));
        }
        crate::dev_log!(
            a.log,
            Info,
            "queues on reactors {:?}",
            placed
                .iter()
                .flatten()
                .map(|p| p.reactor)
                .collect::<Vec<_>>()
        );
        Active {
            engine: self.clone(),
            log: a.log,
            placed,
            inline: None,
            done: Default::default(),
            mutations,
        }
    }

    /// The runner of each queue the driver set up; a ring that cannot be
    /// set up is reported to the driver (DEVICE_NEEDS_RESET).
    fn queue_runners<H: RequestHandler>(
        &self,
        a: &Activation<H>,
        mutations: &Arc<Mutations>,
    ) -> Vec<(usize, Box<dyn reactor::QueueRunner>)> {
        let mut runners: Vec<(usize, Box<dyn reactor::QueueRunner>)> = Vec::new();
        for (i, qc) in a.queues.iter().enumerate() {
            let Some(qc) = qc else { continue };
            match crate::virtio::ring::DeviceRing::new(qc, a.event_idx) {
                Ok(q) => {
                    let params = queue::QueueParams {
                        id: self.next_queue.fetch_add(1, Ordering::Relaxed),
                        log: a.log.clone(),
                        index: u16::try_from(i).unwrap_or(u16::MAX),
                        irq: a.irq.clone(),
                        handler: a.handler.clone(),
                        memory: a.memory.clone(),
                        event_idx: a.event_idx,
                        polled: a.polled,
                        use_uring: self.use_uring,
                        stats: a.stats.get(i).cloned().unwrap_or_default(),
                        qos: a.qos.clone(),
                        tenant: a.tenant,
                        mutations: mutations.clone(),
                    };
                    runners.push((i, Box::new(queue::QueueState::new(q, params))));
                }
                Err(e) => {
                    crate::dev_log!(a.log, Error, "queue {i}: cannot set up the ring: {e}");
                    // The driver would wait on it for ever: tell it.
                    a.irq.device_needs_reset();
                }
            }
        }
        runners
    }

    /// Inline mode: the queues run on the caller's thread, on a reactor of
    /// their own that runs whenever the driver rings.
    fn activate_inline<H: RequestHandler>(
        self: &Arc<Self>,
        a: Activation<H>,
        runners: Vec<(usize, Box<dyn reactor::QueueRunner>)>,
        mut placed: Vec<Option<Placed>>,
        mutations: Arc<Mutations>,
    ) -> Active {
        let uring = if self.use_uring {
            Uring::new(URING_ENTRIES, None).ok()
        } else {
            None
        };
        let (mut r, me) = new_reactor(
            a.log.name().to_string(),
            Arc::new(Waker::new().expect("eventfd")),
            uring,
            &self.pool,
            PollMode::Interrupt,
            Arc::new(AtomicUsize::new(0)),
        );
        for (i, q) in runners {
            placed[i] = Some(Placed {
                reactor: 0,
                id: q.id(),
            });
            me.send(Msg::Assign(q));
        }
        r.run_until_idle();
        Active {
            engine: self.clone(),
            log: a.log,
            placed,
            inline: Some(parking_lot::Mutex::new((r, me))),
            done: Default::default(),
            mutations,
        }
    }
}

/// A reactor and the handle that sends it work and wakes it.
fn new_reactor(
    name: String,
    waker: Arc<Waker>,
    uring: Option<Uring>,
    pool: &Arc<Pool>,
    mode: PollMode,
    load: Arc<AtomicUsize>,
) -> (Reactor, ReactorTx) {
    let (tx, rx) = unbounded();
    let me = ReactorTx { tx, waker };
    let r = Reactor::new(name, rx, me.clone(), uring, pool.clone(), mode, load);
    (r, me)
}

/// Starts reactor `i` on a thread of its own, pinned to `cpu` if given.
fn spawn_reactor(
    i: usize,
    cpu: Option<usize>,
    shares_cpu: bool,
    use_uring: bool,
    pool: &Arc<Pool>,
    mode: PollMode,
) -> io::Result<ReactorHandle> {
    let waker = Arc::new(Waker::new()?);
    let uring = if use_uring {
        Some(Uring::new(URING_ENTRIES, Some(waker.raw_fd()))?)
    } else {
        None
    };
    let load = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(ReactorStats::default());
    let (mut r, me) = new_reactor(
        format!("reactor {i}"),
        waker,
        uring,
        pool,
        mode,
        load.clone(),
    );
    r.stats = stats.clone();
    r.shares_cpu = shares_cpu;
    thread::Builder::new()
        .name(format!("reactor-{i}"))
        .spawn(move || {
            if let Some(cpu) = cpu {
                pin_to(&[cpu]);
            }
            r.run();
        })?;
    Ok(ReactorHandle {
        tx: me,
        load,
        stats,
    })
}

/// The log line of the default busy placement.
fn say_pinned(reactor_cpus: &[Option<usize>], worker_cpus: &[usize]) {
    let cpus: Vec<String> = reactor_cpus
        .iter()
        .flatten()
        .map(usize::to_string)
        .collect();
    info!(
        "busy polling: reactor(s) pinned to CPU {} (the last this process may use), \
         I/O threads on {worker_cpus:?}; --cpus chooses others (give each busy target \
         on a machine its own)",
        cpus.join(",")
    );
}

impl Drop for Engine {
    fn drop(&mut self) {
        for r in &self.reactors {
            r.tx.send(Msg::Shutdown);
        }
    }
}

#[derive(Clone, Copy)]
struct Placed {
    reactor: usize,
    id: u64,
}

/// One activation of a device on the engine: its queues, wherever they run.
pub struct Active {
    engine: Arc<Engine>,
    log: Arc<DeviceLog>,
    placed: Vec<Option<Placed>>,
    inline: Option<parking_lot::Mutex<(Reactor, ReactorTx)>>,
    /// The queues were taken back (stop or abandon).
    done: std::sync::atomic::AtomicBool,
    mutations: Arc<Mutations>,
}

impl Active {
    fn send(&self, p: Placed, m: Msg) {
        match &self.inline {
            Some(r) => r.lock().1.send(m),
            None => self.engine.reactors[p.reactor].tx.send(m),
        }
    }

    fn kick(&self, p: Placed) {
        if self.inline.is_none() {
            self.engine.reactors[p.reactor].tx.waker.kick();
        }
    }

    fn run_inline(&self) {
        if let Some(r) = &self.inline {
            r.lock().0.run_until_idle();
        }
    }

    /// The driver rang queue `queue`'s doorbell.
    pub fn notify(&self, queue: u16) {
        if let Some(Some(p)) = self.placed.get(usize::from(queue)) {
            self.kick(*p);
            self.run_inline();
        }
    }

    /// Every queue looks at its ring again (guest memory grew).
    pub fn wake_all(&self) {
        for p in self.placed.iter().flatten() {
            self.kick(*p);
        }
        self.run_inline();
    }

    /// Sends one message per queue and waits, without a time limit, for
    /// every acknowledgement.
    fn each_and_wait(&self, what: &str, mk: impl Fn(u64, Sender<()>) -> Msg) {
        let (ack_tx, ack_rx) = unbounded();
        let mut n = 0;
        for p in self.placed.iter().flatten() {
            self.send(*p, mk(p.id, ack_tx.clone()));
            n += 1;
        }
        self.run_inline();
        wait_acks(&ack_rx, n, &self.log, what);
    }

    /// Stops every queue from taking requests and waits until none is in
    /// flight.
    pub fn pause_all(&self) {
        self.each_and_wait("pause", |queue, ack| Msg::Pause {
            queue,
            fence: None,
            ack,
        });
    }

    /// [`pause_all`](Self::pause_all), for a caller that must not wait on
    /// a stuck disk (the management plane): true once every queue is
    /// paused and drained within `limit`; otherwise the queues are resumed
    /// and the answer is false.
    pub fn pause_all_within(&self, limit: Duration) -> bool {
        let (ack_tx, ack_rx) = unbounded();
        let mut n = 0;
        for p in self.placed.iter().flatten() {
            self.send(
                *p,
                Msg::Pause {
                    queue: p.id,
                    fence: None,
                    ack: ack_tx.clone(),
                },
            );
            n += 1;
        }
        self.run_inline();
        let deadline = std::time::Instant::now() + limit;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match ack_rx.recv_timeout(left) {
                Ok(()) => {}
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    // Every queue took a hold: each gives it back.
                    self.resume();
                    return false;
                }
            }
        }
        true
    }

    /// `fence` is about to be unmapped: queues whose rings or in-flight
    /// requests lie in it stop and drain; the others go on, but take no
    /// request that points into it. Returns once that holds.
    pub fn fence(&self, fence: Fence) {
        self.each_and_wait("unmap", |queue, ack| Msg::Pause {
            queue,
            fence: Some(fence),
            ack,
        });
    }

    /// Where each queue stands in its ring, by queue index (None: not
    /// running, or broken). Meant for queues paused and drained.
    pub fn positions(&self) -> Vec<Option<crate::virtio::ring::RingPos>> {
        let (tx, rx) = unbounded();
        let mut n = 0;
        for p in self.placed.iter().flatten() {
            self.send(
                *p,
                Msg::Position {
                    queue: p.id,
                    reply: tx.clone(),
                },
            );
            n += 1;
        }
        self.run_inline();
        let mut by_id = std::collections::HashMap::new();
        for _ in 0..n {
            match rx.recv_timeout(DRAIN_REPORT) {
                Ok((id, pos)) => {
                    by_id.insert(id, pos);
                }
                Err(_) => break,
            }
        }
        self.placed
            .iter()
            .map(|p| p.and_then(|p| by_id.get(&p.id).copied().flatten()))
            .collect()
    }

    /// Lifts one `pause_all`.
    pub fn resume(&self) {
        self.lift(false);
    }

    /// Lifts the `fence` of an unmap that is done.
    pub fn lift_fence(&self) {
        self.lift(true);
    }

    fn lift(&self, fence: bool) {
        for p in self.placed.iter().flatten() {
            self.send(*p, Msg::Resume { queue: p.id, fence });
        }
        self.run_inline();
    }

    /// Takes the queues back: nothing more is written to their rings, and
    /// this returns once nothing is in flight.
    pub fn stop(&self) {
        self.withdraw(true);
    }

    /// Takes the queues back without waiting for what is in flight: this
    /// returns once no reactor will write anything more for them; requests
    /// still in the backend finish on their own, writing nothing, and the
    /// queues leave their reactors then.
    pub fn abandon(&self) {
        self.withdraw(false);
    }

    /// Takes the queues back once (a reset drains them, a disconnect
    /// does not).
    fn withdraw(&self, drain: bool) {
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let what = if drain { "reset" } else { "disconnect" };
        self.each_and_wait(what, |queue, ack| Msg::Withdraw { queue, ack, drain });
    }
}

impl Active {
    /// Returns once no request of this activation that changes the disk is
    /// in the backend (after [`abandon`](Self::abandon), before the
    /// device's next activation). Without a time limit: a stuck backend
    /// holds the caller, and the log says so every few seconds.
    pub fn wait_mutations(&self) {
        self.run_inline();
        self.mutations.wait(&self.log);
    }

    /// [`wait_mutations`](Self::wait_mutations) for a caller that must not
    /// wait on a stuck disk: false if some are still in the backend after
    /// `limit`.
    pub fn wait_mutations_within(&self, limit: Duration) -> bool {
        self.run_inline();
        self.mutations.wait_within(limit)
    }
}

impl Drop for Active {
    /// An activation dropped without being stopped (a device dropped while
    /// running) leaves its reactors as an abandoned one would.
    fn drop(&mut self) {
        if !self.done.load(Ordering::SeqCst) {
            let (ack, _) = unbounded();
            for p in self.placed.iter().flatten() {
                self.send(
                    *p,
                    Msg::Withdraw {
                        queue: p.id,
                        ack: ack.clone(),
                        drain: false,
                    },
                );
            }
        }
    }
}

fn wait_acks(rx: &Receiver<()>, n: usize, log: &DeviceLog, what: &str) {
    let mut got = 0;
    let mut waited = Duration::ZERO;
    while got < n {
        match rx.recv_timeout(DRAIN_REPORT) {
            Ok(()) => got += 1,
            Err(RecvTimeoutError::Timeout) => {
                waited += DRAIN_REPORT;
                log::warn!(
                    "{}: {what} waits for requests still in the backend ({waited:?} so far); \
                     nothing is answered or unmapped until they return",
                    log.name()
                );
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Largest CPU number a `cpu_set_t` holds.
const CPU_SET_BITS: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();

/// The CPUs this process may run on (online and in its affinity mask).
pub fn usable_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads one bit of `set`, for indices below its size.
    Ok((0..CPU_SET_BITS)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

pub(crate) use crate::util::pin_to;

/// Where the reactors and the thread pool's workers run, from the CPUs the
/// process may use (`usable`): reactor i on `given[i % len]` when --cpus
/// is given; in busy mode without it, on the last usable CPUs (reactor 0
/// on the last), since a spinning reactor the scheduler moves around takes
/// turns with the guest's vCPU on a core and makes latency bimodal. The
/// workers keep off the CPUs of busy reactors while any other is usable.
/// Returns (per-reactor CPU, worker CPUs, whether the reactor CPUs were
/// chosen here).
fn placement(
    usable: &[usize],
    given: &[usize],
    mode: PollMode,
    reactors: usize,
) -> (Vec<Option<usize>>, Vec<usize>, bool) {
    let chosen = given.is_empty() && mode == PollMode::Busy && !usable.is_empty();
    let per: Vec<Option<usize>> = (0..reactors)
        .map(|i| {
            if !given.is_empty() {
                Some(given[i % given.len()])
            } else if chosen {
                Some(usable[usable.len() - 1 - i % usable.len()])
            } else {
                None
            }
        })
        .collect();
    let mut workers: Vec<usize> = usable.to_vec();
    if mode == PollMode::Busy {
        let rest: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|c| !per.contains(&Some(*c)))
            .collect();
        if !rest.is_empty() {
            workers = rest;
        }
    }
    (per, workers, chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_refuses_cpus_this_process_may_not_use() {
        let cfg = EngineConfig {
            reactors: 1,
            cpus: vec![100_000],
            mode: PollMode::Interrupt,
            io_engine: IoEngine::Threads,
            max_io_threads: 1,
            inline: false,
        };
        let e = Engine::start(cfg).err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn busy_reactors_without_cpus_take_the_last_cpus_and_workers_the_others() {
        let (per, workers, chosen) = placement(&[0, 1, 2, 3], &[], PollMode::Busy, 2);
        assert_eq!(per, vec![Some(3), Some(2)]);
        assert_eq!(workers, vec![0, 1]);
        assert!(chosen);
        // On one CPU the workers share it with the reactor.
        let (per, workers, _) = placement(&[5], &[], PollMode::Busy, 1);
        assert_eq!((per, workers), (vec![Some(5)], vec![5]));
    }

    #[test]
    fn given_cpus_are_kept_and_other_modes_pin_nothing_by_default() {
        let (per, workers, chosen) = placement(&[0, 1], &[1], PollMode::Busy, 2);
        assert_eq!(per, vec![Some(1), Some(1)]);
        assert_eq!(workers, vec![0]);
        assert!(!chosen);
        let (per, workers, chosen) = placement(&[0, 1], &[], PollMode::Adaptive, 1);
        assert_eq!(per, vec![None]);
        // Workers are still placed, so that they do not inherit a pinned
        // reactor's one CPU.
        assert_eq!(workers, vec![0, 1]);
        assert!(!chosen);
        let (per, workers, _) = placement(&[0, 1], &[1], PollMode::Adaptive, 1);
        assert_eq!((per, workers), (vec![Some(1)], vec![0, 1]));
    }
}
