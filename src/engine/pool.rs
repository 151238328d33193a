//! The thread pool engine (QEMU's `aio=threads`): backend operations that
//! cannot run on a reactor (no io_uring, a misaligned O_DIRECT buffer, a
//! multi-range discard, a short transfer to redo) run here and complete back
//! to the reactor that owns the request. Workers are started as demand
//! grows, up to a maximum, and leave after a while idle, so that queue depth
//! reaches the disk without a fixed cap.

use std::sync::atomic::{AtomicUsize, Ordering};
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
    idle: AtomicUsize,
    max: usize,
}

pub struct Pool {
    tx: Sender<Job>,
    shared: Arc<Shared>,
}

impl Pool {
    pub fn new(max: usize) -> Pool {
        let (tx, rx) = unbounded();
        Pool {
            tx,
            shared: Arc::new(Shared {
                rx,
                workers: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                max: max.max(1),
            }),
        }
    }

    /// Workers running now.
    pub fn workers(&self) -> usize {
        self.shared.workers.load(Ordering::Relaxed)
    }

    pub(crate) fn submit(&self, job: Job) {
        let s = &self.shared;
        // Grow while nobody is idle to take the job.
        if s.idle.load(Ordering::Acquire) == 0 {
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
    loop {
        s.idle.fetch_add(1, Ordering::AcqRel);
        let r = s.rx.recv_timeout(IDLE_EXIT);
        s.idle.fetch_sub(1, Ordering::AcqRel);
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
                s.workers.fetch_sub(1, Ordering::AcqRel);
                if s.rx.is_empty() {
                    debug!("idle I/O thread leaves");
                    return;
                }
                // A job was sent while we decided to leave, and its sender
                // saw the pool full: stay for it if there is room.
                if s.workers.fetch_add(1, Ordering::AcqRel) < s.max {
                    continue;
                }
                s.workers.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            Err(RecvTimeoutError::Disconnected) => {
                s.workers.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }
}
