//! Threads: the pollers that own the queues, and the I/O pool that runs
//! backend operations. Knows threads and queues, nothing of the protocol.
//!
//! Only the poller that owns a queue touches that queue's rings. Backend
//! work goes to the pool over a channel and comes back to the owning poller,
//! which alone writes status bytes and used entries and decides whether to
//! interrupt (once per batch).

mod poller;

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use log::{error, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::backend::io::GuestIov;
use crate::blk::exec::{BlkContext, Op};
use crate::vfio_user::GuestMemoryHandle;
use crate::virtio::{QueueConfig, VirtioInterrupt};

/// How pollers wait for work.
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

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub pollers: usize,
    /// CPUs to pin pollers to, round-robin; empty = no pinning.
    pub cpus: Vec<usize>,
    pub mode: PollMode,
    /// No poller threads: the queues are served on the thread that
    /// activates the device or rings a doorbell, until they are idle.
    /// Deterministic, for fuzzing and tests; not offered on the command line.
    pub inline: bool,
}

/// A backend operation for the pool, with what the poller needs back.
pub(crate) struct Job {
    pub ctx: Arc<BlkContext>,
    pub op: Op,
    pub iov: Vec<GuestIov>,
    /// Keeps the guest memory the iovecs point into mapped.
    pub _mem: Arc<GuestMemoryMmap>,
    pub queue: usize,
    pub heads: Vec<u16>,
    pub reply: Sender<Event>,
}

pub(crate) enum Event {
    /// A doorbell for one of this poller's queues.
    Kick,
    /// A backend operation finished.
    Done {
        queue: usize,
        heads: Vec<u16>,
        status: u8,
        failed: bool,
    },
    /// Stop taking requests; acknowledge once nothing is in flight.
    Pause(Sender<()>),
    Resume,
    /// Finish what is in flight, then exit.
    Stop,
}

/// The I/O worker threads. They live as long as the device.
pub struct IoPool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    pub fn new(n: usize) -> IoPool {
        let (tx, rx) = unbounded::<Job>();
        let threads = (0..n.max(1))
            .map(|i| {
                let rx: Receiver<Job> = rx.clone();
                thread::Builder::new()
                    .name(format!("blk-io-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            let r = job.ctx.execute(&job.op, &job.iov);
                            let status = job.ctx.status_of(&job.op, &r);
                            let _ = job.reply.send(Event::Done {
                                queue: job.queue,
                                heads: job.heads,
                                status,
                                failed: r.is_err(),
                            });
                        }
                    })
                    .expect("spawn I/O thread")
            })
            .collect();
        IoPool {
            tx: Some(tx),
            threads,
        }
    }

    pub(crate) fn sender(&self) -> Sender<Job> {
        self.tx.clone().expect("pool is running")
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct PollerHandle {
    tx: Sender<Event>,
    thread: JoinHandle<()>,
}

/// Pollers serving one activation of the device (DRIVER_OK until reset).
pub struct Engine {
    pollers: Vec<PollerHandle>,
    /// Inline mode: the pollers, run by whoever notifies.
    inline: Option<parking_lot::Mutex<Vec<poller::Poller>>>,
    /// queue index -> poller index
    owner: Vec<Option<usize>>,
}

/// How long quiesce waits for in-flight requests: inside QEMU's 5 s.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(4);

/// What a device activation hands the engine.
pub struct Activation {
    pub ctx: Arc<BlkContext>,
    pub memory: GuestMemoryHandle,
    pub queues: Vec<Option<QueueConfig>>,
    pub event_idx: bool,
    pub irq: VirtioInterrupt,
}

impl Engine {
    /// Starts pollers for the queues the driver set up.
    pub fn start(cfg: &EngineConfig, a: Activation, pool: &IoPool) -> Engine {
        let mut owner = vec![None; a.queues.len()];
        let mut active = Vec::new();
        for (i, qc) in a.queues.into_iter().enumerate() {
            let Some(qc) = qc else { continue };
            match make_queue(&qc, a.event_idx) {
                Ok(q) => active.push(poller::QueueCtx::new(i, q, qc.vector, a.event_idx)),
                Err(e) => error!("queue {i}: cannot set up the ring: {e}"),
            }
        }
        // Queues spread round-robin; never more pollers than queues (and
        // none at all, rather than one spinning on nothing, without queues).
        let n = cfg.pollers.max(1).min(active.len());
        let mut per_poller: Vec<Vec<poller::QueueCtx>> = (0..n).map(|_| Vec::new()).collect();
        for (k, q) in active.into_iter().enumerate() {
            owner[q.index] = Some(k % n);
            per_poller[k % n].push(q);
        }
        let mut pollers = Vec::new();
        if cfg.inline {
            let mut inline = Vec::new();
            for qs in per_poller {
                let (tx, rx) = unbounded();
                let mut p = poller::Poller::new(
                    qs,
                    a.ctx.clone(),
                    a.memory.clone(),
                    a.irq.clone(),
                    PollMode::Interrupt,
                    rx,
                    tx,
                    pool.sender(),
                );
                p.run_until_idle();
                inline.push(p);
            }
            return Engine {
                pollers,
                inline: Some(parking_lot::Mutex::new(inline)),
                owner,
            };
        }
        for (pi, qs) in per_poller.into_iter().enumerate() {
            let (tx, rx) = unbounded();
            let cpu = (!cfg.cpus.is_empty()).then(|| cfg.cpus[pi % cfg.cpus.len()]);
            let p = poller::Poller::new(
                qs,
                a.ctx.clone(),
                a.memory.clone(),
                a.irq.clone(),
                cfg.mode,
                rx,
                tx.clone(),
                pool.sender(),
            );
            let thread = thread::Builder::new()
                .name(format!("blk-poller-{pi}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to_cpu(cpu);
                    }
                    p.run();
                })
                .expect("spawn poller");
            pollers.push(PollerHandle { tx, thread });
        }
        info!("{} poller(s) started in {:?} mode", pollers.len(), cfg.mode);
        Engine {
            pollers,
            inline: None,
            owner,
        }
    }

    pub fn notify(&self, queue: u16) {
        if let Some(inline) = &self.inline {
            if let Some(Some(p)) = self.owner.get(usize::from(queue)) {
                inline.lock()[*p].run_until_idle();
            }
            return;
        }
        if let Some(Some(p)) = self.owner.get(usize::from(queue)) {
            let _ = self.pollers[*p].tx.send(Event::Kick);
        }
    }

    /// Wakes every poller to look at its queues again (guest memory grew).
    pub fn wake_all(&self) {
        if let Some(inline) = &self.inline {
            inline
                .lock()
                .iter_mut()
                .for_each(poller::Poller::run_until_idle);
        }
        for p in &self.pollers {
            let _ = p.tx.send(Event::Kick);
        }
    }

    /// Pauses every poller and waits until nothing is in flight.
    pub fn quiesce(&self) {
        let (ack_tx, ack_rx) = unbounded();
        for p in &self.pollers {
            let _ = p.tx.send(Event::Pause(ack_tx.clone()));
        }
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        for _ in 0..self.pollers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if ack_rx.recv_timeout(left).is_err() {
                warn!("quiesce: requests still in flight after {QUIESCE_TIMEOUT:?}; going on");
                return;
            }
        }
    }

    pub fn resume(&self) {
        for p in &self.pollers {
            let _ = p.tx.send(Event::Resume);
        }
    }

    /// Stops the pollers after their in-flight requests finish, waiting at
    /// most QUIESCE_TIMEOUT so that the reply stays inside QEMU's timeout.
    /// A poller still waiting for a stuck backend is left to finish on its
    /// own; it holds its own reference to the guest memory it uses.
    pub fn stop(self) {
        for p in &self.pollers {
            let _ = p.tx.send(Event::Stop);
        }
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        while Instant::now() < deadline && !self.pollers.iter().all(|p| p.thread.is_finished()) {
            thread::sleep(Duration::from_millis(1));
        }
        for p in self.pollers {
            if !p.thread.is_finished() {
                error!("a poller still has requests in flight after {QUIESCE_TIMEOUT:?}; not waiting longer");
                continue;
            }
            if p.thread.join().is_err() {
                error!("a poller thread panicked");
            }
        }
    }
}

fn make_queue(qc: &QueueConfig, event_idx: bool) -> Result<Queue, virtio_queue::Error> {
    let mut q = Queue::new(qc.size)?;
    q.try_set_size(qc.size)?;
    q.try_set_desc_table_address(GuestAddress(qc.desc))?;
    q.try_set_avail_ring_address(GuestAddress(qc.avail))?;
    q.try_set_used_ring_address(GuestAddress(qc.used))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Ok(q)
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

fn pin_to_cpu(cpu: usize) {
    if cpu >= CPU_SET_BITS {
        // Options are validated at start; never index past the set.
        warn!("cannot pin poller to CPU {cpu}: beyond the CPU set");
        return;
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set` (cpu < CPU_SET_BITS).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        warn!(
            "cannot pin poller to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}
