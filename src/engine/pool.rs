//! The thread pool engine (QEMU's `aio=threads`): backend operations that
//! cannot run on a reactor (no io_uring, a misaligned O_DIRECT buffer, a
//! multi-range discard, a short transfer to redo, write-zeroes that must
//! write zeros) run here and complete back to the reactor that owns the
//! request. Workers are started as demand grows, up to a maximum, and leave
//! after a while idle, so that queue depth reaches the disk without a fixed
//! cap.
//!
//! The pool is shared by every device of the process, so it is shared
//! fairly: each device (a *tenant*) has its own queue of jobs, and workers
//! take jobs from the tenants in turn, preferring a tenant that runs fewer
//! than its share of the workers. A job runs one step at a time
//! ([`IoRequest::step`]: at most a few MiB), then goes to the back of its
//! tenant's queue: a flood of huge requests from one device delays another
//! device's next job by at most one step of one worker, never by the whole
//! flood. Between steps a job looks at its queue's cancel flag: a job of a
//! queue that was withdrawn (reset, disconnect) stops there, and one that
//! had not started never starts.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, error};
use parking_lot::{Condvar, Mutex};
use vm_memory::GuestMemoryMmap;

use super::reactor::{Msg, ReactorTx};
use crate::backend::io::{Backend, GuestIov};
use crate::backend::request::{IoRequest, Progress};

/// How long an idle worker waits for work before it leaves.
const IDLE_EXIT: Duration = Duration::from_secs(10);

/// A backend operation on its way to a worker, and back.
pub(crate) struct Job {
    pub io: IoRequest,
    pub backend: Arc<dyn Backend>,
    /// Keeps the guest memory the iovecs point into mapped.
    pub mem: Arc<GuestMemoryMmap>,
    pub queue: u64,
    pub slot: u16,
    pub reply: ReactorTx,
    /// The device the job is for: the unit of fairness.
    pub tenant: u64,
    /// Set when the job's queue is withdrawn: the job takes no further
    /// step and completes with ECANCELED.
    pub cancel: Arc<AtomicBool>,
    /// The backend is memory (`ram:`, `null:`): its work is the CPU's.
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
    jobs: VecDeque<Job>,
    /// Steps of this tenant running now.
    running: usize,
    /// Its backend is memory: its steps count against the CPU limit.
    cpu_bound: bool,
}

#[derive(Default)]
struct State {
    /// Every tenant with jobs queued or running, and a few idle ones (kept
    /// so that their queues' memory is reused).
    tenants: HashMap<u64, Tenant>,
    /// Tenants with jobs waiting, in the order they are served.
    ready: VecDeque<u64>,
    /// Tenants with jobs queued or running.
    busy: usize,
    queued: usize,
    /// Of those, jobs of memory backends.
    queued_cpu: usize,
    workers: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// Steps of memory backends running, and how many may run at once.
    cpu_running: usize,
    cpu_max: usize,
}

/// Idle tenants kept in the table.
const IDLE_TENANTS_KEPT: usize = 64;

impl State {
    /// The share of the workers a tenant may use while others want some.
    fn share(&self, max: usize) -> usize {
        (max / self.busy.max(1)).max(1)
    }

    /// The next job to run: from the first ready tenant below its share,
    /// or, when every ready tenant is at its share, from the first one
    /// (no worker idles while there is work). Memory backends' work is
    /// all CPU: only `cpu_max` of their steps run at once, however many
    /// threads the pool has, so that they leave cores to the reactors.
    fn pick(&mut self, max: usize) -> Option<Job> {
        if self.ready.is_empty() {
            return None;
        }
        let share = self.share(max);
        let cpu_full = self.cpu_running >= self.cpu_max;
        let may = |t: &Tenant| !(t.cpu_bound && cpu_full);
        let pos = self
            .ready
            .iter()
            .position(|id| {
                self.tenants
                    .get(id)
                    .is_some_and(|t| may(t) && t.running < share)
            })
            .or_else(|| {
                self.ready
                    .iter()
                    .position(|id| self.tenants.get(id).is_some_and(may))
            })?;
        let id = self.ready.remove(pos)?;
        let t = self.tenants.get_mut(&id)?;
        let job = t.jobs.pop_front()?;
        t.running += 1;
        self.queued -= 1;
        if t.cpu_bound {
            self.queued_cpu -= 1;
            self.cpu_running += 1;
        }
        if !t.jobs.is_empty() {
            self.ready.push_back(id);
        }
        Some(job)
    }

    /// Jobs a worker could take now.
    fn takeable(&self) -> usize {
        let cpu = self
            .queued_cpu
            .min(self.cpu_max.saturating_sub(self.cpu_running));
        self.queued - self.queued_cpu + cpu
    }

    fn push(&mut self, job: Job) {
        let t = self.tenants.entry(job.tenant).or_default();
        t.cpu_bound = job.cpu_bound;
        if job.cpu_bound {
            self.queued_cpu += 1;
        }
        if t.jobs.is_empty() {
            if t.running == 0 {
                self.busy += 1;
            }
            self.ready.push_back(job.tenant);
        }
        t.jobs.push_back(job);
        self.queued += 1;
    }

    /// A step of `tenant` ended.
    fn stepped(&mut self, tenant: u64) {
        let Some(t) = self.tenants.get_mut(&tenant) else {
            return;
        };
        t.running -= 1;
        if t.cpu_bound {
            self.cpu_running -= 1;
        }
        if t.running == 0 && t.jobs.is_empty() {
            self.busy -= 1;
            if self.tenants.len() > self.busy + IDLE_TENANTS_KEPT {
                self.tenants.remove(&tenant);
            }
        }
    }
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    max: usize,
    idle_exit: Duration,
}

pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    pub fn new(max: usize) -> Pool {
        Pool::with_idle_exit(max, IDLE_EXIT)
    }

    fn with_idle_exit(max: usize, idle_exit: Duration) -> Pool {
        // Half the machine for memory backends' work (at least one core).
        let cpus = thread::available_parallelism().map_or(1, usize::from);
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    cpu_max: (cpus / 2).max(1),
                    ..State::default()
                }),
                work: Condvar::new(),
                max: max.max(1),
                idle_exit,
            }),
        }
    }

    /// Workers running now.
    pub fn workers(&self) -> usize {
        self.shared.state.lock().workers
    }

    pub(crate) fn submit(&self, job: Job) {
        let s = &self.shared;
        let mut st = s.state.lock();
        st.push(job);
        // Grow when more jobs could run than workers wait.
        let grow = st.takeable() > st.idle && st.workers < s.max;
        if grow {
            st.workers += 1;
        }
        let n = st.workers;
        let wake = st.idle > 0;
        drop(st);
        if wake {
            s.work.notify_one();
        }
        if grow {
            let shared = s.clone();
            let spawned = thread::Builder::new()
                .name(format!("blk-io-{}", n - 1))
                .spawn(move || worker(&shared));
            if let Err(e) = spawned {
                s.state.lock().workers -= 1;
                error!("cannot start an I/O thread: {e}");
            }
        }
    }
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

fn worker(s: &Shared) {
    let mut scratch = Vec::new();
    let mut st = s.state.lock();
    loop {
        if let Some(mut job) = st.pick(s.max) {
            drop(st);
            let r = step(&mut job, &mut scratch);
            scratch.clear();
            st = s.state.lock();
            let tenant = job.tenant;
            match r {
                // To the back of its tenant's queue: the others go first.
                None => {
                    st.push(job);
                    st.stepped(tenant);
                }
                Some(result) => {
                    st.stepped(tenant);
                    drop(st);
                    let Job {
                        io,
                        mem,
                        queue,
                        slot,
                        reply,
                        ..
                    } = job;
                    drop(mem);
                    reply.send(Msg::PoolDone(Done {
                        queue,
                        slot,
                        io,
                        result,
                    }));
                    st = s.state.lock();
                }
            }
            continue;
        }
        st.idle += 1;
        let timed_out = s.work.wait_for(&mut st, s.idle_exit).timed_out();
        st.idle -= 1;
        if timed_out && st.takeable() == 0 {
            st.workers -= 1;
            debug!("idle I/O thread leaves");
            return;
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
    use vm_memory::GuestAddress;

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

    fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap())
    }

    fn job(tenant: u64, slot: u16, io: IoRequest, be: Arc<dyn Backend>, r: &ReactorTx) -> Job {
        Job {
            io,
            backend: be,
            mem: mem(),
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

    /// A backend whose write-zeroes take 1 ms per MiB, and that records
    /// where each one was.
    #[derive(Default)]
    struct Slow {
        offsets: Mutex<Vec<u64>>,
    }

    impl Backend for Slow {
        fn read_at(&self, _: &[GuestIov], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_at(&self, _: &[GuestIov], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> std::io::Result<()> {
            self.offsets.lock().push(offset);
            thread::sleep(Duration::from_millis(len >> 20));
            Ok(())
        }
        fn inline(&self) -> bool {
            false
        }
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
        let be: Arc<dyn Backend> = Arc::new(Slow::default());
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
        let be = Arc::new(Slow::default());
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
        let seen = be.offsets.lock();
        assert!(!seen.is_empty() && seen.len() < 64, "{} steps", seen.len());
        assert!(
            seen.iter().all(|&o| o < 1 << 40),
            "the job cancelled before it started ran"
        );
    }
}
