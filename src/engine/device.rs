//! The engine's side of one device, the same for every kind of device: its
//! running activation, the activation of a client that left while its
//! writes may still be in the backend, and what holds the queues (an
//! unmap's fence, a pause, a change from the management plane).
//!
//! A device keeps one [`DeviceQueues`], hands it a request handler when
//! its driver sets DRIVER_OK, and forwards the transport's notices
//! (doorbell, reset, disconnect, quiesce, resume). What a request means is
//! the handler's; everything else about queues is here.

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{ArcMutexGuard, Mutex, MutexGuard, RawMutex};

use super::{Activation, Active, Engine, Fence, Qos, QueueStats, RequestHandler};
use crate::memory::{DmaRange, GuestMemoryHandle, MemoryChange};
use crate::util::DeviceLog;
use crate::virtio::ring::RingPos;
use crate::virtio::{QueueConfig, VirtioInterrupt};

/// The queues of one device across its activations.
pub struct DeviceQueues {
    engine: Arc<Engine>,
    memory: GuestMemoryHandle,
    log: Arc<DeviceLog>,
    /// Who this device is to the engine's thread pool.
    tenant: u64,
    /// Per queue, kept across activations and clients.
    stats: Vec<Arc<QueueStats>>,
    /// The device's limits (kept likewise).
    qos: Arc<Qos>,
    /// The queues while the driver has the device running.
    active: Option<Arc<Active>>,
    /// The activation of a client that left without a reset: its writes
    /// may still be in the backend, and the next activation waits for them.
    departed: Option<Arc<Active>>,
    /// What the last quiesce did: fence an unmap (true) or hold all.
    fenced: bool,
    hold: Arc<QueueHold>,
    /// Frozen for a live upgrade: no change from another thread until
    /// thawed (or the process image is replaced).
    frozen: Option<ArcMutexGuard<RawMutex, ()>>,
}

/// How a driver's queues start: the handler of their requests and what
/// the transport knows of them.
pub struct Start<H: RequestHandler> {
    pub handler: Arc<H>,
    pub queues: Vec<Option<QueueConfig>>,
    pub irq: VirtioInterrupt,
    pub event_idx: bool,
    /// No doorbell will come: the reactor polls these queues.
    pub polled: bool,
}

impl DeviceQueues {
    pub fn new(
        engine: Arc<Engine>,
        memory: GuestMemoryHandle,
        log: Arc<DeviceLog>,
        num_queues: u16,
    ) -> DeviceQueues {
        DeviceQueues {
            tenant: engine.new_tenant(),
            engine,
            memory,
            log,
            stats: (0..num_queues).map(|_| Arc::default()).collect(),
            qos: Arc::default(),
            active: None,
            departed: None,
            fenced: false,
            hold: Arc::default(),
            frozen: None,
        }
    }

    /// A live upgrade: every queue stops taking requests and nothing of
    /// the device may be left in the backend within `limit` (else the
    /// queues go on and the answer says why). Returns where each running
    /// queue stands in its ring (None: not running, or broken).
    pub fn freeze(&mut self, limit: Duration) -> Result<Vec<Option<RingPos>>, HoldError> {
        let n = self.stats.len();
        if self.frozen.is_some() {
            return Err(HoldError::Busy);
        }
        // One deadline for every step: the device's thread answers nothing
        // else meanwhile.
        let until = std::time::Instant::now() + limit;
        let left = || until.saturating_duration_since(std::time::Instant::now());
        let one = self
            .hold
            .changing
            .try_lock_arc_for(left())
            .ok_or(HoldError::Busy)?;
        if let Some(a) = &self.active {
            if !a.pause_all_within(left()) {
                return Err(HoldError::Stuck);
            }
        }
        let gone = [&self.active, &self.departed]
            .into_iter()
            .flatten()
            .any(|a| !a.wait_mutations_within(left()));
        if gone {
            if let Some(a) = &self.active {
                a.resume();
            }
            return Err(HoldError::DepartedStuck);
        }
        let mut pos = self
            .active
            .as_ref()
            .map(|a| a.positions())
            .unwrap_or_default();
        pos.resize(n, None);
        self.frozen = Some(one);
        Ok(pos)
    }

    /// The upgrade did not happen: the queues go on.
    pub fn thaw(&mut self) {
        if self.frozen.take().is_some() {
            if let Some(a) = &self.active {
                a.resume();
            }
        }
    }

    /// Each queue's statistics (the same objects for the device's life).
    pub fn stats(&self) -> &[Arc<QueueStats>] {
        &self.stats
    }

    /// The device's limits.
    pub fn qos(&self) -> &Arc<Qos> {
        &self.qos
    }

    /// What another thread may do with these queues.
    pub fn hold(&self) -> Arc<QueueHold> {
        self.hold.clone()
    }

    /// The driver set DRIVER_OK: before the device shows anything of the
    /// new activation, a change held from another thread (a resize) ends,
    /// any running activation ends, and writes of a client that left end.
    /// No change starts until [`start`](Self::start) has run.
    pub fn prepare(&mut self) -> Starting {
        let no_change = self.hold.changing.lock_arc();
        self.stop();
        if let Some(old) = self.departed.take() {
            old.wait_mutations();
        }
        Starting {
            _no_change: no_change,
        }
    }

    /// The new activation's queues go to the reactors.
    pub fn start<H: RequestHandler>(&mut self, prepared: Starting, s: Start<H>) {
        let active = Arc::new(self.engine.activate(Activation {
            log: self.log.clone(),
            handler: s.handler,
            memory: self.memory.clone(),
            queues: s.queues,
            stats: self.stats.clone(),
            qos: self.qos.clone(),
            event_idx: s.event_idx,
            polled: s.polled,
            irq: s.irq,
            tenant: self.tenant,
        }));
        *self.hold.active.lock() = Arc::downgrade(&active);
        self.active = Some(active);
        drop(prepared);
    }

    /// The driver rang queue `index`'s doorbell.
    pub fn notify(&self, index: u16) {
        if let Some(a) = &self.active {
            a.notify(index);
        }
    }

    /// A reset: the queues are taken back once nothing is in flight.
    pub fn stop(&mut self) {
        if let Some(a) = self.active.take() {
            a.stop();
        }
    }

    /// The client left: the queues are taken back at once; their writes
    /// still in the backend are waited for by the next activation (and a
    /// change held from another thread). Says in the log what the device
    /// did for the client.
    pub fn abandon(&mut self) {
        if let Some(a) = self.active.take() {
            a.abandon();
            // (Any earlier departed activation was waited for when this
            // one started.)
            *self.hold.departed.lock() = Arc::downgrade(&a);
            self.departed = Some(a);
        }
        let (mut req, mut rd, mut wr, mut err) = (0, 0, 0, 0);
        for q in &self.stats {
            req += q.requests.iter().map(QueueStats::get).sum::<u64>();
            rd += QueueStats::get(&q.bytes_read);
            wr += QueueStats::get(&q.bytes_written);
            err += q.errors.iter().map(QueueStats::get).sum::<u64>();
        }
        crate::dev_log!(
            self.log,
            Info,
            "client gone; since start {req} request(s), {rd} byte(s) read, {wr} written, \
             {err} error(s)"
        );
    }

    /// Guest memory changes: see [`MemoryChange`].
    pub fn memory_changed(&mut self, change: MemoryChange) {
        match change {
            MemoryChange::Quiesce(range) => self.quiesce(range),
            MemoryChange::Resume => self.resume(),
            MemoryChange::Added => self.memory_added(),
        }
    }

    /// `range` is about to be unmapped (fence the queues that use it), or
    /// the client asked for all to stop (None).
    fn quiesce(&mut self, range: Option<DmaRange>) {
        let Some(a) = &self.active else { return };
        self.fenced = range.is_some();
        match range {
            Some(r) if r.host_len > 0 => a.fence(Fence {
                guest: (r.iova, r.iova.saturating_add(r.size)),
                host: (r.host, r.host.saturating_add(r.host_len)),
            }),
            // A window the device could never reach: nothing uses it.
            Some(_) => {}
            None => a.pause_all(),
        }
    }

    /// Lifts what the last [`quiesce`](Self::quiesce) did.
    fn resume(&mut self) {
        if let Some(a) = &self.active {
            if self.fenced {
                a.lift_fence();
            } else {
                a.resume();
            }
        }
    }

    /// Guest memory grew: every queue looks at its ring again.
    fn memory_added(&self) {
        if let Some(a) = &self.active {
            a.wake_all();
        }
    }
}

/// What the management plane's thread may do with a device's queues:
/// hold them still while the device changes under them (a resize).
#[derive(Default)]
pub struct QueueHold {
    /// The running activation.
    active: Mutex<Weak<Active>>,
    /// The activation of a client that left, while its writes may still be
    /// in the backend.
    departed: Mutex<Weak<Active>>,
    /// One change at a time; a driver's queues do not start during one.
    changing: Arc<Mutex<()>>,
}

/// A device between DRIVER_OK and its queues' start: no change from
/// another thread runs meanwhile (see [`DeviceQueues::prepare`]).
pub struct Starting {
    _no_change: ArcMutexGuard<RawMutex, ()>,
}

/// Why the queues could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldError {
    /// Another change holds them.
    Busy,
    /// Requests of the device were still in the backend at the deadline.
    Stuck,
    /// Writes of a client that left were still in the backend.
    DepartedStuck,
}

/// One change of a device at a time (see [`QueueHold::change`]).
pub struct Change<'a> {
    hold: &'a QueueHold,
    _one: MutexGuard<'a, ()>,
}

/// The queues of an activation, paused for as long as this lives.
pub struct Paused(Option<Arc<Active>>);

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.resume();
        }
    }
}

impl QueueHold {
    /// Begins a change of the device; another one is refused (Busy) if the
    /// one under way does not end within `wait`.
    pub fn change(&self, wait: Duration) -> Result<Change<'_>, HoldError> {
        let one = self.changing.try_lock_for(wait).ok_or(HoldError::Busy)?;
        Ok(Change {
            hold: self,
            _one: one,
        })
    }
}

impl Change<'_> {
    /// Stops the queues and waits until nothing of the device is in the
    /// backend: no request in flight, no write of this client or of one
    /// that left. The queues go on when the answer drops, or at once when
    /// that does not hold within `limit` (each wait has that limit).
    pub fn pause_within(&self, limit: Duration) -> Result<Paused, HoldError> {
        let active = self.hold.active.lock().upgrade();
        if let Some(a) = &active {
            if !a.pause_all_within(limit) {
                return Err(HoldError::Stuck);
            }
        }
        let paused = Paused(active.clone());
        // A withdrawn queue answers a pause at once: the writes of the one
        // paused here, if its client left meanwhile, are waited for too.
        let departed = self.hold.departed.lock().upgrade();
        if [active, departed]
            .into_iter()
            .flatten()
            .any(|a| !a.wait_mutations_within(limit))
        {
            return Err(HoldError::DepartedStuck);
        }
        Ok(paused)
    }
}
