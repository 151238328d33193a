//! One poller thread: owns some queues, pops and validates requests, hands
//! backend work to the pool (or runs it inline for memory disks), and
//! completes requests: status byte, used entry, one interrupt per batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::info;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};

use super::{Event, Job, PollMode};
use crate::backend::io::GuestIov;
use crate::blk::exec::{BlkContext, ErrorPolicy, Op, Prepared};
use crate::blk::request::{walk, write_status};
use crate::vfio_user::GuestMemoryHandle;
use crate::virtio::VirtioInterrupt;

/// In adaptive mode, how long to keep spinning after the last work.
const ADAPTIVE_SPIN: Duration = Duration::from_micros(200);
/// Merged reads/writes stay below this many bytes...
const MERGE_MAX_BYTES: usize = 1 << 20;
/// ...and this many iovecs.
const MERGE_MAX_IOVS: usize = 1024;

#[derive(Clone, Copy)]
struct Pending {
    status: Option<u64>,
    used: u32,
}

pub(crate) struct QueueCtx {
    pub index: usize,
    queue: Queue,
    vector: u16,
    pending: Vec<Option<Pending>>,
    in_flight: usize,
    /// Why the queue stopped, if it did. It stays stopped until reset.
    broken: Option<String>,
    /// Used entries were added since the last interrupt decision.
    added: bool,
    /// The ring is not (or no longer) inside guest memory: the queue waits
    /// for it. QEMU unmaps and remaps windows while firmware runs.
    waiting_for_memory: bool,
    /// EVENT_IDX was negotiated; without it the driver's
    /// VRING_AVAIL_F_NO_INTERRUPT flag says whether it wants interrupts.
    event_idx: bool,
}

impl QueueCtx {
    pub fn new(index: usize, queue: Queue, vector: u16, event_idx: bool) -> QueueCtx {
        let size = usize::from(queue.size());
        QueueCtx {
            index,
            queue,
            vector,
            pending: vec![None; size],
            in_flight: 0,
            broken: None,
            added: false,
            waiting_for_memory: false,
            event_idx,
        }
    }

    fn break_queue(&mut self, why: String) {
        if self.broken.is_none() {
            crate::error_limited!(
                "queue {} is broken and stops until the driver resets the device: {why}",
                self.index
            );
            self.broken = Some(why);
        }
    }
}

/// Requests popped in one pass, waiting to be merged and submitted.
struct Staged {
    op: Op,
    iov: Vec<GuestIov>,
    bytes: usize,
    heads: Vec<u16>,
}

pub(crate) struct Poller {
    queues: Vec<QueueCtx>,
    ctx: Arc<BlkContext>,
    memory: GuestMemoryHandle,
    irq: VirtioInterrupt,
    mode: PollMode,
    rx: Receiver<Event>,
    me: Sender<Event>,
    pool: Sender<Job>,
    paused: bool,
    pause_acks: Vec<Sender<()>>,
    stopping: bool,
}

impl Poller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        queues: Vec<QueueCtx>,
        ctx: Arc<BlkContext>,
        memory: GuestMemoryHandle,
        irq: VirtioInterrupt,
        mode: PollMode,
        rx: Receiver<Event>,
        me: Sender<Event>,
        pool: Sender<Job>,
    ) -> Poller {
        Poller {
            queues,
            ctx,
            memory,
            irq,
            mode,
            rx,
            me,
            pool,
            paused: false,
            pause_acks: Vec::new(),
            stopping: false,
        }
    }

    fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.in_flight).sum()
    }

    pub fn run(mut self) {
        {
            let mem = self.memory.memory();
            self.set_notifications(&mem, self.mode == PollMode::Interrupt);
        }
        let mut last_work = Instant::now();
        loop {
            // Events that are already there: completions, doorbells, control.
            while let Ok(ev) = self.rx.try_recv() {
                self.handle(ev);
            }
            if self.queues.iter().any(|q| q.added) {
                let mem = self.memory.memory();
                self.signal(&mem);
            }
            let faults = crate::memory::take_faults();
            if faults > 0 {
                crate::error_limited!(
                    "{faults} guest page(s) vanished under the device: the client cut its \
                     guest-memory file short; those pages now read as zeros"
                );
            }
            if self.stopping && self.in_flight() == 0 {
                return;
            }
            if self.paused || self.stopping {
                self.ack_pause_if_idle();
                if let Ok(ev) = self.rx.recv() {
                    self.handle(ev);
                }
                continue;
            }
            // One snapshot per pass: what requests read through and what
            // jobs keep mapped are the same.
            let mem = self.memory.memory().into_inner();
            let work = self.poll_queues(&mem);
            self.signal(&mem);
            if work {
                last_work = Instant::now();
                continue;
            }
            match self.mode {
                PollMode::Busy => std::hint::spin_loop(),
                PollMode::Adaptive if last_work.elapsed() < ADAPTIVE_SPIN => std::hint::spin_loop(),
                PollMode::Adaptive | PollMode::Interrupt => {
                    // Ask for doorbells, then look once more: a request
                    // that arrived before notifications were on would
                    // otherwise wait for the next one.
                    if self.set_notifications(&mem, true) {
                        if self.mode == PollMode::Adaptive {
                            self.set_notifications(&mem, false);
                        }
                        continue;
                    }
                    drop(mem);
                    if let Ok(ev) = self.rx.recv() {
                        self.handle(ev);
                    }
                    if self.mode == PollMode::Adaptive {
                        let mem = self.memory.memory();
                        self.set_notifications(&mem, false);
                    }
                    last_work = Instant::now();
                }
            }
        }
    }

    /// Serves the queues on the calling thread until nothing is available
    /// and nothing is in flight (the engine's inline mode).
    pub fn run_until_idle(&mut self) {
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.handle(ev);
            }
            let mem = self.memory.memory().into_inner();
            self.set_notifications(&mem, true);
            let work = self.poll_queues(&mem);
            self.signal(&mem);
            if work {
                continue;
            }
            if self.in_flight() == 0 {
                return;
            }
            drop(mem);
            // Completions of the I/O pool come back on the channel.
            if let Ok(ev) = self.rx.recv() {
                self.handle(ev);
            }
        }
    }

    /// Turns doorbells on or off on every live queue; with `enable`, says
    /// whether requests are already waiting.
    fn set_notifications(&mut self, mem: &GuestMemoryMmap, enable: bool) -> bool {
        let mut waiting = false;
        for q in self.queues.iter_mut().filter(|q| q.broken.is_none()) {
            if !ring_mapped(&q.queue, mem) {
                // Nothing to tell a ring that is not mapped; see poll_queues.
                continue;
            }
            let r = if enable {
                q.queue.enable_notification(mem)
            } else {
                q.queue.disable_notification(mem).map(|()| false)
            };
            match r {
                Ok(w) => waiting |= w,
                Err(e) => q.break_queue(format!("cannot update notification state: {e}")),
            }
        }
        waiting
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Kick => {}
            Event::Done {
                queue,
                heads,
                status,
                failed,
            } => {
                let mem = self.memory.memory();
                let stop = failed && self.ctx.on_error == ErrorPolicy::Stop;
                let q = &mut self.queues[queue];
                for head in heads {
                    if stop {
                        // werror=stop: the request is not answered; the
                        // queue waits for a reset.
                        q.pending[usize::from(head)] = None;
                        q.in_flight -= 1;
                        q.break_queue("backend error with --on-error stop".into());
                    } else {
                        complete(q, &mem, head, Some(status));
                    }
                }
                // The interrupt decision waits until the events at hand are
                // all handled: one interrupt for the batch.
            }
            Event::Pause(ack) => {
                self.paused = true;
                self.pause_acks.push(ack);
            }
            Event::Resume => self.paused = false,
            Event::Stop => self.stopping = true,
        }
        // A pause is acknowledged by the run loop, after the interrupt
        // decision for what completed here: an acknowledgement before it
        // would let the caller change memory while an interrupt for it is
        // still to be raised.
    }

    fn ack_pause_if_idle(&mut self) {
        if self.in_flight() == 0 {
            for a in self.pause_acks.drain(..) {
                let _ = a.send(());
            }
        }
    }

    /// Pops, validates and submits what the queues hold. True if any
    /// request was popped.
    fn poll_queues(&mut self, mem: &Arc<GuestMemoryMmap>) -> bool {
        let mut work = false;
        for qi in 0..self.queues.len() {
            let mut staged: Vec<Staged> = Vec::new();
            {
                let q = &mut self.queues[qi];
                if q.broken.is_some() {
                    continue;
                }
                // The whole ring must be in guest memory before anything is
                // read from it. A ring outside it is not a broken queue:
                // during firmware, QEMU unmaps and remaps windows and the
                // ring comes back.
                if !ring_mapped(&q.queue, mem) {
                    if !q.waiting_for_memory {
                        crate::warn_limited!(
                            "queue {}: ring is not inside guest memory; waiting until it is mapped",
                            q.index
                        );
                        q.waiting_for_memory = true;
                    }
                    continue;
                }
                if q.waiting_for_memory {
                    info!("queue {}: ring is inside guest memory again", q.index);
                    q.waiting_for_memory = false;
                }
                let size = q.queue.size();
                let chains: Vec<_> = match q.queue.iter(&**mem) {
                    Ok(it) => it.take(usize::from(size)).collect(),
                    Err(e) => {
                        q.break_queue(format!("available ring: {e}"));
                        continue;
                    }
                };
                if chains.is_empty() {
                    continue;
                }
                work = true;
                for chain in chains {
                    let c = match walk(chain, size, self.ctx.limits) {
                        Ok(c) => c,
                        Err(e) => {
                            q.break_queue(e.to_string());
                            break;
                        }
                    };
                    let slot = usize::from(c.head);
                    if q.pending[slot].is_some() {
                        q.break_queue(format!("head {} reused while in flight", c.head));
                        break;
                    }
                    q.in_flight += 1;
                    match self.ctx.prepare(mem, &c) {
                        Ok(Prepared::Done { status, used }) => {
                            q.pending[slot] = Some(Pending {
                                status: c.status,
                                used,
                            });
                            complete(q, mem, c.head, Some(status));
                        }
                        Ok(Prepared::Io { op, iov, used }) => {
                            q.pending[slot] = Some(Pending {
                                status: c.status,
                                used,
                            });
                            if c.status.is_none() {
                                crate::warn_limited!(
                                    "queue {}: request {} has no status byte; not executed",
                                    q.index,
                                    c.head
                                );
                                complete(q, mem, c.head, None);
                                continue;
                            }
                            stage(&mut staged, op, iov, c.head);
                        }
                        Err(e) => {
                            crate::warn_limited!("queue {}: request {}: {e}", q.index, c.head);
                            q.pending[slot] = Some(Pending {
                                status: c.status,
                                used: 1,
                            });
                            let st = c.status.map(|_| e.status());
                            complete(q, mem, c.head, st);
                        }
                    }
                }
            }
            if staged.is_empty() {
                continue;
            }
            for s in staged {
                self.submit(qi, s, mem);
            }
        }
        work
    }

    fn submit(&mut self, qi: usize, s: Staged, mem: &Arc<GuestMemoryMmap>) {
        let now = if self.ctx.backend.inline() {
            Some(self.ctx.execute(&s.op, &s.iov))
        } else {
            // Data in the page cache is copied right here; only what would
            // block pays for the trip to the I/O pool.
            self.ctx.try_nowait(&s.op, &s.iov)
        };
        if let Some(r) = now {
            let status = self.ctx.status_of(&s.op, &r);
            let failed = r.is_err();
            if failed && self.ctx.on_error == ErrorPolicy::Stop {
                let _ = self.me.send(Event::Done {
                    queue: qi,
                    heads: s.heads,
                    status,
                    failed,
                });
                return;
            }
            let q = &mut self.queues[qi];
            for h in s.heads {
                complete(q, mem, h, Some(status));
            }
            return;
        }
        let job = Job {
            ctx: self.ctx.clone(),
            op: s.op,
            iov: s.iov,
            _mem: mem.clone(),
            queue: qi,
            heads: s.heads,
            reply: self.me.clone(),
        };
        if let Err(e) = self.pool.send(job) {
            // The pool is gone (shutting down): fail the requests.
            let job = e.into_inner();
            let q = &mut self.queues[qi];
            for h in job.heads {
                complete(
                    q,
                    mem,
                    h,
                    Some(crate::blk::request::status_u8(
                        virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR,
                    )),
                );
            }
        }
    }

    /// One interrupt per queue per batch, if the driver wants it.
    fn signal(&mut self, mem: &GuestMemoryMmap) {
        for q in self.queues.iter_mut().filter(|q| q.added) {
            q.added = false;
            if q.broken.is_some() {
                continue;
            }
            // virtio-queue does not look at the driver's NO_INTERRUPT flag
            // (it only applies without EVENT_IDX): we do.
            if !q.event_idx && driver_suppresses_interrupts(&q.queue, mem) {
                continue;
            }
            match q.queue.needs_notification(mem) {
                Ok(true) => self.irq.signal_queue(q.vector),
                Ok(false) => {}
                Err(e) => q.break_queue(format!("reading the used-event index: {e}")),
            }
        }
    }
}

/// Adds a request to the staged list, merging it into the previous one when
/// both are reads (or both writes of the same kind) that are contiguous on
/// disk and the merged request stays within bounds.
fn stage(staged: &mut Vec<Staged>, op: Op, iov: Vec<GuestIov>, head: u16) {
    let bytes: usize = iov.iter().map(|v| v.len()).sum();
    if let Some(last) = staged.last_mut() {
        let end = last.op_offset().map(|o| o + last.bytes as u64);
        let contiguous = match (&last.op, &op) {
            (Op::Read(_), Op::Read(o)) => end == Some(*o),
            (Op::Write { sync: a, .. }, Op::Write { offset: o, sync: b }) => {
                a == b && end == Some(*o)
            }
            _ => false,
        };
        if contiguous
            && last.bytes + bytes <= MERGE_MAX_BYTES
            && last.iov.len() + iov.len() <= MERGE_MAX_IOVS
        {
            last.iov.extend_from_slice(&iov);
            last.bytes += bytes;
            last.heads.push(head);
            return;
        }
    }
    staged.push(Staged {
        op,
        iov,
        bytes,
        heads: vec![head],
    });
}

impl Staged {
    fn op_offset(&self) -> Option<u64> {
        match self.op {
            Op::Read(o) | Op::Write { offset: o, .. } => Some(o),
            _ => None,
        }
    }
}

/// Finishes one request: status byte, used entry. `status` None means the
/// chain has no status byte to write.
fn complete(q: &mut QueueCtx, mem: &GuestMemoryMmap, head: u16, status: Option<u8>) {
    let Some(p) = q.pending[usize::from(head)].take() else {
        return;
    };
    q.in_flight -= 1;
    if q.broken.is_some() {
        return;
    }
    let mut used = p.used;
    match (p.status, status) {
        (Some(addr), Some(st)) => {
            if !write_status(mem, addr, st) {
                crate::warn_limited!(
                    "queue {}: status byte of request {head} is outside guest memory",
                    q.index
                );
                used = 0;
            }
        }
        _ => used = 0,
    }
    if let Err(e) = q.queue.add_used(mem, head, used) {
        q.break_queue(format!("used ring: {e}"));
        return;
    }
    q.added = true;
}

/// The driver set VRING_AVAIL_F_NO_INTERRUPT in the available ring's flags.
fn driver_suppresses_interrupts(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    mem.read_obj::<u16>(GuestAddress(q.avail_ring()))
        .is_ok_and(|f| u32::from(u16::from_le(f)) & VRING_AVAIL_F_NO_INTERRUPT != 0)
}

/// Whether the whole split ring (descriptor table, available ring with
/// used_event, used ring with avail_event) lies in guest memory. Unlike
/// `Queue::is_valid` it does not log: it runs on every pass while a queue
/// waits for its memory.
fn ring_mapped(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let n = u64::from(q.size());
    let ok = |addr: u64, len: u64| {
        usize::try_from(len)
            .is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(addr), len))
    };
    ok(q.desc_table(), 16 * n) && ok(q.avail_ring(), 6 + 2 * n) && ok(q.used_ring(), 6 + 8 * n)
}
