//! The thread pool engine (QEMU's `aio=threads`): backend operations that
//! cannot run on a reactor (no io_uring, a misaligned O_DIRECT buffer, a
//! multi-range discard, a short transfer to redo) run here and complete back
//! to the reactor that owns the request. Workers are started as demand
//! grows, up to a maximum, and leave after a while idle, so that queue depth
//! reaches the disk without a fixed cap.

use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use log::{debug, error};
use vm_memory::GuestMemoryMmap;

use super::reactor::{Msg, ReactorTx};
use crate::backend::io::Backend;
use crate::backend::request::IoRequest;

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
}

/// A finished job, for the reactor that owns the request.
pub(crate) struct Done {
    pub queue: u64,
    pub slot: u16,
    pub io: IoRequest,
    pub result: std::io::Result<()>,
}

struct Shared {
    rx: Receiver<Job>,
    workers: AtomicUsize,
    /// Workers waiting for a job, minus jobs sent and not yet taken: below
    /// zero, jobs wait for a worker. A worker leaves only by taking back a
    /// unit above zero, so no job is ever left with nobody to take it.
    idle: AtomicIsize,
    max: usize,
    idle_exit: Duration,
}

pub struct Pool {
    tx: Sender<Job>,
    shared: Arc<Shared>,
}

impl Pool {
    pub fn new(max: usize) -> Pool {
        Pool::with_idle_exit(max, IDLE_EXIT)
    }

    fn with_idle_exit(max: usize, idle_exit: Duration) -> Pool {
        let (tx, rx) = unbounded();
        Pool {
            tx,
            shared: Arc::new(Shared {
                rx,
                workers: AtomicUsize::new(0),
                idle: AtomicIsize::new(0),
                max: max.max(1),
                idle_exit,
            }),
        }
    }

    /// Workers running now.
    pub fn workers(&self) -> usize {
        self.shared.workers.load(Ordering::Relaxed)
    }

    pub(crate) fn submit(&self, job: Job) {
        let s = &self.shared;
        // Count the job against the waiting workers; grow when none was
        // free to take it.
        if s.idle.fetch_sub(1, Ordering::AcqRel) <= 0 {
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
        if let Err(e) = self.tx.send(job) {
            // Unreachable: the pool holds a receiver.
            let job = e.into_inner();
            job.reply.send(Msg::PoolDone(Done {
                queue: job.queue,
                slot: job.slot,
                io: job.io,
                result: Err(std::io::Error::from_raw_os_error(libc::EIO)),
            }));
        }
    }
}

fn worker(s: &Shared) {
    let mut waiting = false;
    loop {
        if !waiting {
            s.idle.fetch_add(1, Ordering::AcqRel);
            waiting = true;
        }
        let r = s.rx.recv_timeout(s.idle_exit);
        if r.is_ok() {
            // The submitter counted the job: this worker's unit is spent.
            waiting = false;
        }
        match r {
            Ok(job) => {
                let result = job.io.execute(&*job.backend);
                drop(job.mem);
                job.reply.send(Msg::PoolDone(Done {
                    queue: job.queue,
                    slot: job.slot,
                    io: job.io,
                    result,
                }));
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
    use crate::engine::reactor::Waker;
    use vm_memory::GuestAddress;

    /// Workers leave after a millisecond idle while jobs keep arriving a
    /// millisecond apart: the race between a worker leaving and a job being
    /// counted for it. Every job must be taken, promptly.
    #[test]
    fn no_job_is_stranded_by_a_worker_leaving() {
        let pool = Pool::with_idle_exit(2, Duration::from_millis(1));
        let (tx, rx) = unbounded();
        let reply = ReactorTx {
            tx,
            waker: Arc::new(Waker::new().unwrap()),
        };
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
        for i in 0..300u16 {
            pool.submit(Job {
                io: IoRequest::default(),
                backend: Arc::new(NullBackend),
                mem: mem.clone(),
                queue: 1,
                slot: i,
                reply: reply.clone(),
            });
            match rx.recv_timeout(Duration::from_secs(2)) {
                Ok(Msg::PoolDone(d)) => assert_eq!(d.slot, i),
                Ok(_) => panic!("unexpected message"),
                Err(_) => panic!("job {i} was never taken ({} workers)", pool.workers()),
            }
            thread::sleep(Duration::from_micros(u64::from(i % 7) * 300));
        }
    }
}
