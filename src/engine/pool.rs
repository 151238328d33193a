//! The thread pool engine (QEMU's `aio=threads`): backend operations that
//! cannot run on a reactor (no io_uring, a misaligned O_DIRECT buffer, a
//! multi-range discard, a short transfer to redo, write-zeroes that must
//! write zeros) run here and complete back to the reactor that owns the
//! request. Workers are started as demand grows, up to a maximum, and leave
//! after a while idle, so that queue depth reaches the disk without a fixed
//! cap. Jobs reach the workers through one channel, in order.
//!
//! The pool is shared by every device of the process, so what enters the
//! channel is rationed per device (a *tenant*): a device may have at most
//! half of the workers the other devices leave in the pool at once (its
//! others wait in its own queue, in order), so a device that floods the
//! pool, or whose disk stops answering and holds every job it has there,
//! leaves half to the others, and two such devices a quarter. Work that is all CPU (memory
//! disks, zeros written for a write-zeroes) runs on at most half the cores
//! at once, so that the reactors keep theirs. A job runs one step at a time
//! ([`IoRequest::step`]: at most a few MiB) and goes back to the end of the
//! channel between steps, behind whatever other devices sent meanwhile;
//! before each step it looks at its queue's cancel flag: a job of a queue
//! that was withdrawn (reset, disconnect) stops there, and one that had not
//! started never starts.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use log::{debug, error};
use parking_lot::Mutex;

use super::reactor::{Msg, ReactorTx};
use crate::backend::io::{Backend, GuestIov};
use crate::backend::request::{IoRequest, Progress};

/// How long an idle worker waits for work before it leaves.
const IDLE_EXIT: Duration = Duration::from_secs(10);

/// A backend operation on its way to a worker, and back.
pub(crate) struct Job {
    /// Its buffers hold the guest memory they point into mapped.
    pub io: IoRequest,
    pub backend: Arc<dyn Backend>,
    pub queue: u64,
    pub slot: u16,
    pub reply: ReactorTx,
    /// The device the job is for: the unit of sharing.
    pub tenant: u64,
    /// Set when the job's queue is withdrawn: the job takes no further
    /// step and completes with ECANCELED.
    pub cancel: Arc<AtomicBool>,
    /// Its work is the CPU's (a memory disk, zeros to write).
    pub cpu_bound: bool,
    pub progress: Progress,
}

/// A finished job, for the reactor that owns the request.
pub(crate) struct Done {
    pub queue: u64,
    pub slot: u16,
    pub io: IoRequest,
    pub result: std::io::Result<()>,
}

#[derive(Default)]
struct Tenant {
    /// Jobs of this tenant in the channel or running.
    in_pool: usize,
    /// Its jobs that wait for a place, in order.
    waiting: VecDeque<Job>,
    /// Listed in `Gate::blocked`.
    listed: bool,
}

/// What may enter the channel: places per tenant and for CPU work.
struct Gate {
    tenants: HashMap<u64, Tenant>,
    /// Workers the pool may have.
    workers: usize,
    /// Jobs of every tenant in the pool.
    in_pool: usize,
    /// CPU-bound jobs in the pool, and how many may be.
    cpu_in_pool: usize,
    cpu_max: usize,
    /// Tenants whose next job waits for a place that another tenant's job
    /// leaving can give (a worker or a CPU place), in order.
    blocked: VecDeque<u64>,
}

/// Idle tenants kept in the table (their queues' memory is reused).
const IDLE_TENANTS_KEPT: usize = 64;

impl Gate {
    /// Places a tenant holding `mine` may hold: half of the workers that
    /// the other tenants leave (rounded up). Alone, a tenant gets half the
    /// pool; k tenants whose disks hang hold at most 1 - 1/2^k of it, so
    /// another device always finds a worker unless many hang at once.
    fn cap(&self, mine: usize) -> usize {
        let others = self.in_pool - mine;
        self.workers.saturating_sub(others).div_ceil(2)
    }

    fn fits(&self, in_pool: usize, cpu: bool) -> bool {
        in_pool < self.cap(in_pool) && (!cpu || self.cpu_in_pool < self.cpu_max)
    }

    /// Takes a place for `job`, or queues it: the job to send now, if any.
    fn admit(&mut self, job: Job) -> Option<Job> {
        let (id, cpu) = (job.tenant, job.cpu_bound);
        let t = self.tenants.entry(id).or_default();
        let (in_pool, queued) = (t.in_pool, !t.waiting.is_empty());
        if !queued && self.fits(in_pool, cpu) {
            self.take(id, cpu);
            return Some(job);
        }
        if let Some(t) = self.tenants.get_mut(&id) {
            t.waiting.push_back(job);
        }
        self.list_blocked(id);
        None
    }

    fn take(&mut self, id: u64, cpu: bool) {
        if let Some(t) = self.tenants.get_mut(&id) {
            t.in_pool += 1;
        }
        self.in_pool += 1;
        if cpu {
            self.cpu_in_pool += 1;
        }
    }

    /// Lists tenant `id` as blocked by the others when its own jobs
    /// leaving will not let its next one in: it has none in the pool, or
    /// its next job waits for a CPU place only.
    fn list_blocked(&mut self, id: u64) {
        let Some(t) = self.tenants.get(&id) else {
            return;
        };
        let Some(head) = t.waiting.front() else {
            return;
        };
        let cpu_only = head.cpu_bound && t.in_pool < self.cap(t.in_pool);
        if (t.in_pool == 0 || cpu_only) && !t.listed {
            if let Some(t) = self.tenants.get_mut(&id) {
                t.listed = true;
            }
            self.blocked.push_back(id);
        }
    }

    /// The next waiting job of tenant `id`, if it fits now.
    fn next_of(&mut self, id: u64) -> Option<Job> {
        let t = self.tenants.get(&id)?;
        let cpu = t.waiting.front()?.cpu_bound;
        if !self.fits(t.in_pool, cpu) {
            self.list_blocked(id);
            return None;
        }
        let job = self.tenants.get_mut(&id)?.waiting.pop_front()?;
        self.take(id, cpu);
        Some(job)
    }

    /// A job of tenant `id` left the pool: the jobs its places let in (at
    /// most two: the tenant's next, and the next of a tenant that was
    /// blocked by the others).
    fn release(&mut self, id: u64, cpu: bool) -> [Option<Job>; 2] {
        if let Some(t) = self.tenants.get_mut(&id) {
            t.in_pool -= 1;
        }
        self.in_pool -= 1;
        if cpu {
            self.cpu_in_pool -= 1;
        }
        // A tenant the others kept out goes first: had the releasing
        // tenant taken its place back each time, a busy one (not only a
        // hung one) could keep another out for as long as it had a
        // backlog. Each listed tenant is looked at once; one that still
        // does not fit is listed again, at the end.
        let mut first = None;
        for _ in 0..self.blocked.len() {
            if first.is_some() {
                break;
            }
            let Some(other) = self.blocked.pop_front() else {
                break;
            };
            if let Some(t) = self.tenants.get_mut(&other) {
                t.listed = false;
            }
            first = self.next_of(other);
        }
        // Then the releasing tenant's own next (listed if it does not fit
        // and has nothing left in the pool to wake it).
        let second = self.next_of(id);
        if self.tenants.len() > IDLE_TENANTS_KEPT {
            let idle = self
                .tenants
                .get(&id)
                .is_some_and(|t| t.in_pool == 0 && t.waiting.is_empty() && !t.listed);
            if idle {
                self.tenants.remove(&id);
            }
        }
        [first, second]
    }
}

struct Shared {
    tx: Sender<Job>,
    rx: Receiver<Job>,
    workers: AtomicUsize,
    /// Workers waiting for a job, minus jobs sent and not yet taken: below
    /// zero, jobs wait for a worker. A worker leaves only by taking back a
    /// unit above zero, so no job is ever left with nobody to take it.
    idle: AtomicIsize,
    max: usize,
    idle_exit: Duration,
    gate: Mutex<Gate>,
    /// Where workers run (unset: wherever the thread that starts them may,
    /// which would be a pinned reactor's one CPU).
    cpus: std::sync::OnceLock<Vec<usize>>,
}

pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    pub fn new(max: usize) -> Pool {
        Pool::with_idle_exit(max, IDLE_EXIT)
    }

    fn with_idle_exit(max: usize, idle_exit: Duration) -> Pool {
        let (tx, rx) = unbounded();
        let max = max.max(1);
        let cpus = thread::available_parallelism().map_or(1, usize::from);
        Pool {
            shared: Arc::new(Shared {
                tx,
                rx,
                workers: AtomicUsize::new(0),
                idle: AtomicIsize::new(0),
                max,
                idle_exit,
                gate: Mutex::new(Gate {
                    tenants: HashMap::new(),
                    workers: max,
                    in_pool: 0,
                    cpu_in_pool: 0,
                    cpu_max: (cpus / 2).max(1),
                    blocked: VecDeque::new(),
                }),
                cpus: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Confines the workers started from now on to `cpus` (once; later
    /// calls are ignored).
    pub fn set_cpus(&self, cpus: Vec<usize>) {
        let _ = self.shared.cpus.set(cpus);
    }

    /// Workers running now.
    pub fn workers(&self) -> usize {
        self.shared.workers.load(Ordering::Relaxed)
    }

    pub(crate) fn submit(&self, job: Job) {
        let admitted = self.shared.gate.lock().admit(job);
        if let Some(job) = admitted {
            enqueue(&self.shared, job, true);
        }
    }
}

/// Sends a job to the channel; with `grow`, starts a worker when none was
/// free to take it.
fn enqueue(s: &Arc<Shared>, job: Job, grow: bool) {
    if s.idle.fetch_sub(1, Ordering::AcqRel) <= 0 && grow {
        let n = s.workers.load(Ordering::Acquire);
        if n < s.max
            && s.workers
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let shared = s.clone();
            let spawned = thread::Builder::new()
                .name(format!("blk-io-{n}"))
                .spawn(move || worker(&shared));
            if let Err(e) = spawned {
                s.workers.fetch_sub(1, Ordering::AcqRel);
                error!("cannot start an I/O thread: {e}");
            }
        }
    }
    // The pool holds a receiver: the channel cannot be closed.
    let _ = s.tx.send(job);
}

/// Runs one step of `job`: None while there is more to do.
fn step(job: &mut Job, scratch: &mut Vec<GuestIov>) -> Option<std::io::Result<()>> {
    if job.cancel.load(Ordering::Acquire) {
        return Some(Err(std::io::Error::from_raw_os_error(libc::ECANCELED)));
    }
    match job.io.step(&*job.backend, &mut job.progress, scratch) {
        Ok(true) => Some(Ok(())),
        Ok(false) => None,
        Err(e) => Some(Err(e)),
    }
}

fn worker(s: &Arc<Shared>) {
    if let Some(cpus) = s.cpus.get() {
        super::pin_to(cpus);
    }
    let mut scratch = Vec::new();
    let mut waiting = false;
    loop {
        if !waiting {
            s.idle.fetch_add(1, Ordering::AcqRel);
            waiting = true;
        }
        let r = s.rx.recv_timeout(s.idle_exit);
        if r.is_ok() {
            // The sender counted the job: this worker's unit is spent.
            waiting = false;
        }
        match r {
            Ok(mut job) => {
                let r = step(&mut job, &mut scratch);
                scratch.clear();
                let Some(result) = r else {
                    // To the end of the channel: what others sent meanwhile
                    // goes first. This worker stands for it (no new one).
                    s.idle.fetch_add(1, Ordering::AcqRel);
                    waiting = true;
                    enqueue(s, job, false);
                    continue;
                };
                let Job {
                    io,
                    queue,
                    slot,
                    reply,
                    tenant,
                    cpu_bound,
                    ..
                } = job;
                reply.send(Msg::PoolDone(Done {
                    queue,
                    slot,
                    io,
                    result,
                }));
                let admitted = s.gate.lock().release(tenant, cpu_bound);
                for j in admitted.into_iter().flatten() {
                    enqueue(s, j, true);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                // Leave only by taking back a unit above zero; otherwise a
                // job is on its way and one of us must be there for it.
                let left = s
                    .idle
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |i| {
                        (i > 0).then_some(i - 1)
                    })
                    .is_ok();
                if left {
                    s.workers.fetch_sub(1, Ordering::AcqRel);
                    debug!("idle I/O thread leaves");
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                s.workers.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::io::NullBackend;
    use crate::backend::request::IoKind;
    use crate::engine::reactor::Waker;
    use crossbeam_channel::{unbounded, Receiver};
    use std::time::Instant;

    fn reply() -> (ReactorTx, Receiver<Msg>) {
        let (tx, rx) = unbounded();
        (
            ReactorTx {
                tx,
                waker: Arc::new(Waker::new().unwrap()),
            },
            rx,
        )
    }

    fn job(tenant: u64, slot: u16, io: IoRequest, be: Arc<dyn Backend>, r: &ReactorTx) -> Job {
        Job {
            io,
            backend: be,
            queue: tenant,
            slot,
            reply: r.clone(),
            tenant,
            cancel: Arc::default(),
            cpu_bound: false,
            progress: Progress::default(),
        }
    }

    /// Workers leave after a millisecond idle while jobs keep arriving a
    /// millisecond apart: the race between a worker leaving and a job being
    /// counted for it. Every job must be taken, promptly.
    #[test]
    fn no_job_is_stranded_by_a_worker_leaving() {
        let pool = Pool::with_idle_exit(2, Duration::from_millis(1));
        let (r, rx) = reply();
        for i in 0..300u16 {
            pool.submit(job(1, i, IoRequest::default(), Arc::new(NullBackend), &r));
            match rx.recv_timeout(Duration::from_secs(2)) {
                Ok(Msg::PoolDone(d)) => assert_eq!(d.slot, i),
                Ok(_) => panic!("unexpected message"),
                Err(_) => panic!("job {i} was never taken ({} workers)", pool.workers()),
            }
            thread::sleep(Duration::from_micros(u64::from(i % 7) * 300));
        }
    }

    /// A backend that does nothing but what its two closures say for
    /// flushes and write-zeroes.
    struct Fake<F, Z> {
        flush: F,
        zeroes: Z,
        inline: bool,
    }

    impl<F, Z> Backend for Fake<F, Z>
    where
        F: Fn() + Send + Sync,
        Z: Fn(u64, u64) + Send + Sync,
    {
        fn read_at(&self, _: &[GuestIov], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_at(&self, _: &[GuestIov], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            (self.flush)();
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> std::io::Result<()> {
            (self.zeroes)(offset, len);
            Ok(())
        }
        fn inline(&self) -> bool {
            self.inline
        }
    }

    /// A backend whose write-zeroes take 1 ms per MiB, and the offsets
    /// they were asked for.
    fn slow() -> (Arc<dyn Backend>, Arc<Mutex<Vec<u64>>>) {
        let offsets = Arc::new(Mutex::new(Vec::new()));
        let seen = offsets.clone();
        let be = Fake {
            flush: || {},
            zeroes: move |offset, len| {
                seen.lock().push(offset);
                thread::sleep(Duration::from_millis(len >> 20));
            },
            inline: false,
        };
        (Arc::new(be), offsets)
    }

    type Switch = Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>;

    /// A disk that stopped answering: every flush blocks until `release`.
    fn hung() -> (Arc<dyn Backend>, Switch) {
        let open: Switch = Arc::default();
        let gate = open.clone();
        let be = Fake {
            flush: move || {
                let mut o = gate.0.lock().unwrap();
                while !*o {
                    o = gate.1.wait(o).unwrap();
                }
            },
            zeroes: |_, _| {},
            inline: false,
        };
        (Arc::new(be), open)
    }

    fn release(open: &Switch) {
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
    }

    fn flush() -> IoRequest {
        let mut io = IoRequest::default();
        io.reset(IoKind::Flush);
        io
    }

    fn zeroes(offset: u64, len: u64) -> IoRequest {
        let mut io = IoRequest::default();
        io.reset(IoKind::WriteZeroes);
        io.ranges.push((offset, len));
        io
    }

    /// Tenant 1 fills every worker with long write-zeroes (1 GiB, about a
    /// second each); tenant 2's one job then runs within a step or two of
    /// one of them, not after the flood.
    #[test]
    fn one_tenants_flood_does_not_hold_another_tenants_job() {
        let pool = Pool::with_idle_exit(4, Duration::from_secs(10));
        let (r, rx) = reply();
        let (be, _) = slow();
        for i in 0..16 {
            pool.submit(job(1, i, zeroes(0, 1 << 30), be.clone(), &r));
        }
        thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        pool.submit(job(2, 100, zeroes(0, 1 << 20), be.clone(), &r));
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Msg::PoolDone(d)) if d.slot == 100 => break,
                Ok(_) => {}
                Err(_) => panic!("tenant 2's job never ran"),
            }
        }
        let waited = t.elapsed();
        assert!(
            waited < Duration::from_millis(200),
            "tenant 2 waited {waited:?} behind tenant 1's flood"
        );
    }

    /// A job whose queue was withdrawn never starts, and one that is
    /// running stops at its next step: both complete with ECANCELED.
    #[test]
    fn a_cancelled_job_stops_between_steps_and_a_queued_one_never_starts() {
        let pool = Pool::with_idle_exit(1, Duration::from_secs(10));
        let (r, rx) = reply();
        let (be, offsets) = slow();
        let running = job(1, 1, zeroes(0, 1 << 30), be.clone(), &r);
        let cancel = running.cancel.clone();
        pool.submit(running);
        let queued = job(1, 2, zeroes(1 << 40, 1 << 20), be.clone(), &r);
        queued.cancel.store(true, Ordering::Release);
        pool.submit(queued);
        thread::sleep(Duration::from_millis(40));
        let t = Instant::now();
        cancel.store(true, Ordering::Release);
        for _ in 0..2 {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Msg::PoolDone(d)) => {
                    assert_eq!(
                        d.result.unwrap_err().raw_os_error(),
                        Some(libc::ECANCELED),
                        "slot {}",
                        d.slot
                    );
                }
                _ => panic!("a cancelled job did not complete"),
            }
        }
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        let seen = offsets.lock();
        assert!(!seen.is_empty() && seen.len() < 64, "{} steps", seen.len());
        assert!(
            seen.iter().all(|&o| o < 1 << 40),
            "the job cancelled before it started ran"
        );
    }

    /// Issue 16 review: a device whose disk stopped answering used to hold
    /// every worker of the pool (each of its jobs blocks one), so another
    /// device's job never ran. A device holds at most half of them.
    #[test]
    fn a_tenant_whose_disk_hangs_holds_at_most_half_the_workers() {
        let pool = Pool::with_idle_exit(8, Duration::from_secs(10));
        let (r, rx) = reply();
        let (hung, open) = hung();
        for i in 0..32 {
            pool.submit(job(1, i, flush(), hung.clone(), &r));
        }
        thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        pool.submit(job(2, 100, zeroes(0, 1 << 20), slow().0, &r));
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Msg::PoolDone(d)) => assert_eq!(d.slot, 100),
            _ => panic!("tenant 2's job waited behind tenant 1's hung disk"),
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(pool.workers() <= 8);
        release(&open);
        for _ in 0..32 {
            assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
        }
    }

    /// From the second hostile review: two devices whose disks hung held
    /// half the workers each, and a third device's job never ran. Each
    /// takes half of what the others leave: two hold three quarters.
    #[test]
    fn two_tenants_whose_disks_hang_leave_workers_to_a_third() {
        let pool = Pool::with_idle_exit(8, Duration::from_secs(10));
        let (r, rx) = reply();
        let (hung, open) = hung();
        for tenant in [1u64, 2] {
            for i in 0..32 {
                pool.submit(job(tenant, i, flush(), hung.clone(), &r));
            }
        }
        thread::sleep(Duration::from_millis(50));
        pool.submit(job(3, 100, zeroes(0, 1 << 20), slow().0, &r));
        let third = rx.recv_timeout(Duration::from_secs(5));
        let held = pool.workers();
        release(&open);
        match third {
            Ok(Msg::PoolDone(d)) => assert_eq!(d.slot, 100),
            _ => panic!("tenant 3's job waited behind two hung disks ({held} workers)"),
        }
        for _ in 0..64 {
            assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
        }
    }

    /// A tenant with nothing in the pool, kept out only by the others'
    /// jobs, gets in as soon as one of theirs leaves.
    #[test]
    fn a_tenant_kept_out_by_the_others_gets_in_when_they_leave() {
        let pool = Pool::with_idle_exit(2, Duration::from_secs(10));
        let (r, rx) = reply();
        let (hung_a, open_a) = hung();
        let (hung_b, open_b) = hung();
        pool.submit(job(1, 1, flush(), hung_a, &r));
        pool.submit(job(2, 2, flush(), hung_b, &r));
        thread::sleep(Duration::from_millis(50));
        // Both workers are held: tenant 3 waits for a place.
        pool.submit(job(3, 3, zeroes(0, 1 << 20), slow().0, &r));
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        release(&open_a);
        let mut seen = Vec::new();
        for _ in 0..2 {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Msg::PoolDone(d)) => seen.push(d.slot),
                _ => panic!("tenant 3 was not let in when a place came free: {seen:?}"),
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, vec![1, 3]);
        release(&open_b);
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
    }

    /// From the third review: the releasing tenant took its own place back
    /// before a tenant the others kept out was looked at, so two busy
    /// tenants (no hung disk) with a backlog kept a third out of a pool of
    /// two until their backlogs were done.
    #[test]
    fn a_tenant_kept_out_gets_the_next_free_place_before_a_busy_tenants_backlog() {
        let pool = Pool::with_idle_exit(2, Duration::from_secs(10));
        let (r, rx) = reply();
        let (be, _) = slow();
        for tenant in [1u64, 2] {
            for i in 0..20 {
                pool.submit(job(tenant, i, zeroes(0, 20 << 20), be.clone(), &r));
            }
        }
        thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        pool.submit(job(3, 100, zeroes(0, 1 << 20), be.clone(), &r));
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Msg::PoolDone(d)) if d.slot == 100 => break,
                Ok(_) => {}
                Err(_) => panic!("tenant 3's job never ran"),
            }
        }
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "tenant 3 waited {:?} behind two busy tenants' backlogs",
            t.elapsed()
        );
    }

    /// Work that is all CPU (here: zeros written) runs on at most half the
    /// cores at once, however many workers and jobs there are.
    #[test]
    fn cpu_bound_work_runs_on_at_most_half_the_cores() {
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (n, m) = (now.clone(), most.clone());
        let be: Arc<dyn Backend> = Arc::new(Fake {
            flush: || {},
            zeroes: move |_, _| {
                let k = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(k, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(2));
                n.fetch_sub(1, Ordering::SeqCst);
            },
            inline: true,
        });
        let pool = Pool::with_idle_exit(16, Duration::from_secs(10));
        let (r, rx) = reply();
        for tenant in 1..=4u64 {
            for i in 0..8u16 {
                let mut j = job(tenant, i, zeroes(0, 64 << 20), be.clone(), &r);
                j.cpu_bound = true;
                pool.submit(j);
            }
        }
        for _ in 0..32 {
            assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        }
        let cpus = thread::available_parallelism().map_or(1, usize::from);
        let most = most.load(Ordering::SeqCst);
        assert!(most <= (cpus / 2).max(1), "{most} CPU-bound steps at once");
    }
}
