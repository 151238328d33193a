//! Virtio over PCI, as a transitional function: the legacy register block
//! in BAR0 and the virtio 1.x capabilities in a memory BAR (BAR4), sharing
//! one device state ([`transport`]). Feature negotiation, the ISR, MSI-X
//! vector registers, and the ring layouts the driver chose.
//!
//! This layer knows virtio and the PCI interrupts it raises; what the device
//! does with its queues belongs to a [`VirtioDevice`] (e.g. virtio-blk), and
//! nothing here touches files.

pub mod legacy;
pub mod modern;
pub mod packed;
pub mod ring;
mod saved;
pub use saved::SavedTransport;
#[cfg(test)]
mod test_device;
pub mod transport;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use crate::pci::Interrupts;

/// The low 32 bits: the feature bits the legacy interface has (where a
/// device's own bits live), or a 4-byte register's value.
pub fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

/// The low 16 bits: a 2-byte register's value.
pub fn low16(v: u64) -> u16 {
    u16::try_from(v & 0xffff).unwrap_or(0)
}

/// What a device is given when its driver sets DRIVER_OK.
pub struct DriverReady {
    /// What the driver acknowledged.
    pub features: u64,
    /// Each queue, None where the driver gave it no address.
    pub queues: Vec<Option<QueueConfig>>,
    pub irq: VirtioInterrupt,
    /// No doorbell will come (they land in shared memory): the queues
    /// must be polled.
    pub polled: bool,
}

/// `VIRTIO_MSI_NO_VECTOR`: no vector assigned.
pub const NO_VECTOR: u16 = 0xffff;

/// Where a driver put one queue, and which vector it signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub vector: u16,
    /// The packed layout (desc: the ring; avail and used: the driver's and
    /// the device's event suppression structures).
    pub packed: bool,
    /// Where the device takes up in the ring (a live upgrade); None: at
    /// the start, as after a reset.
    pub start: Option<ring::RingPos>,
}

/// The configuration-change side of a device, shared by the transport, the
/// queues (a broken queue asks for a reset) and the management plane (a
/// resize): the config vector, whether a driver is running, the config
/// generation and NEEDS_RESET.
#[derive(Debug)]
pub struct ConfigState {
    vector: AtomicU16,
    live: AtomicBool,
    generation: AtomicU32,
    needs_reset: AtomicBool,
    /// Held over a change of the device config and the generation step
    /// that follows it, and by every read of the device config: no read
    /// sees the new value before the generation has moved.
    change: parking_lot::Mutex<()>,
}

impl Default for ConfigState {
    fn default() -> Self {
        ConfigState {
            vector: AtomicU16::new(NO_VECTOR),
            live: AtomicBool::new(false),
            generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            change: parking_lot::Mutex::new(()),
        }
    }
}

impl ConfigState {
    pub fn set_vector(&self, v: u16) {
        self.vector.store(v, Ordering::SeqCst);
    }

    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
    }

    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Runs a read of the device config, never in the middle of a change.
    pub fn read<T>(&self, f: impl FnOnce() -> T) -> T {
        let _g = self.change.lock();
        f()
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Puts back a saved generation and NEEDS_RESET (a live upgrade).
    pub fn restore(&self, generation: u32, needs_reset: bool) {
        self.generation.store(generation, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Back to power-on (the generation keeps counting: a driver that read
    /// half a config before a reset must still see it change).
    pub fn reset(&self) {
        self.set_vector(NO_VECTOR);
        self.set_live(false);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// How a device raises its interrupts: MSI-X vector when the driver enabled
/// MSI-X and assigned one, otherwise the ISR bit and INTx.
#[derive(Clone)]
pub struct VirtioInterrupt {
    isr: Arc<AtomicU8>,
    irqs: Arc<Interrupts>,
    config: Arc<ConfigState>,
    /// Each queue's vector as the driver set it last: a driver may move a
    /// running queue to another vector, and the next interrupt follows.
    queue_vectors: Arc<[AtomicU16]>,
}

/// ISR bit 0: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the configuration changed.
pub const ISR_CONFIG: u8 = 2;

impl VirtioInterrupt {
    pub fn new(
        isr: Arc<AtomicU8>,
        irqs: Arc<Interrupts>,
        config: Arc<ConfigState>,
    ) -> VirtioInterrupt {
        VirtioInterrupt {
            isr,
            irqs,
            config,
            queue_vectors: Arc::new([]),
        }
    }

    /// The same, signalling queue `i` on `vectors[i]` (see
    /// [`signal_queue_at`](Self::signal_queue_at)).
    pub fn with_queue_vectors(mut self, vectors: Arc<[AtomicU16]>) -> VirtioInterrupt {
        self.queue_vectors = vectors;
        self
    }

    /// Signals a queue whose driver-assigned vector is `vector`.
    pub fn signal_queue(&self, vector: u16) {
        self.signal(vector, ISR_QUEUE);
    }

    /// Signals queue `index` on the vector its driver gave it last.
    pub fn signal_queue_at(&self, index: u16) {
        let v = self
            .queue_vectors
            .get(usize::from(index))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Relaxed));
        self.signal(v, ISR_QUEUE);
    }

    pub fn signal_config(&self, vector: u16) {
        self.signal(vector, ISR_CONFIG);
    }

    /// A queue broke: the device needs a reset (DEVICE_NEEDS_RESET in the
    /// status on the modern interface), and a running driver is told with
    /// the configuration-change interrupt, as virtio 1.x prescribes.
    pub fn device_needs_reset(&self) {
        if !self.config.needs_reset.swap(true, Ordering::SeqCst)
            && self.config.live.load(Ordering::SeqCst)
        {
            self.signal_config(self.config.vector.load(Ordering::SeqCst));
        }
    }

    fn signal(&self, vector: u16, isr_bit: u8) {
        // With MSI-X on, NO_VECTOR means the driver wants no interrupt (the
        // vector does not exist and is dropped).
        if !self.irqs.signal_msix(vector) {
            self.isr.fetch_or(isr_bit, Ordering::SeqCst);
            self.irqs.set_intx_level(true);
        }
    }
}

/// Raises the configuration-change interrupt of a device from any thread
/// (a resize): the config generation moves, then ISR bit 1 and the config
/// vector, or INTx. The transport keeps the vector and whether a driver is
/// running up to date.
pub struct ConfigNotifier {
    irq: VirtioInterrupt,
}

impl ConfigNotifier {
    pub fn new(irq: VirtioInterrupt) -> ConfigNotifier {
        ConfigNotifier { irq }
    }

    /// Changes the device config (`f`) and moves the generation, as one
    /// step for every reader of the config: a driver that reads a field in
    /// two halves across the change sees the generation differ.
    pub fn change(&self, f: impl FnOnce()) {
        let c = &self.irq.config;
        let _g = c.change.lock();
        f();
        c.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Tells a running driver that the configuration changed; without one
    /// there is nobody to tell (a driver reads the configuration when it
    /// starts). The generation moves either way.
    pub fn notify(&self) {
        let c = &self.irq.config;
        c.generation.fetch_add(1, Ordering::SeqCst);
        if c.live.load(Ordering::SeqCst) {
            self.irq.signal_config(c.vector.load(Ordering::SeqCst));
        }
    }
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Feature bits offered, device and ring bits with VERSION_1 (the
    /// legacy interface shows the low 32 only).
    fn features(&self) -> u64;
    fn num_queues(&self) -> u16;
    /// The largest (and the legacy interface's fixed) size of every queue.
    fn queue_size(&self) -> u16;
    /// Length of the device config block.
    fn config_len(&self) -> usize;
    fn read_config(&self, offset: usize, data: &mut [u8]);
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// The driver set DRIVER_OK: start serving the queues that have an
    /// address.
    fn activate(&mut self, ready: DriverReady);
    /// The driver rang queue `index`'s doorbell.
    fn notify(&mut self, index: u16);
    /// Stop serving, wait for in-flight requests, forget the queues.
    fn reset(&mut self);
    /// The client is gone: stop serving at once; requests still in flight
    /// finish on their own and write nothing. A reset follows.
    fn abandon(&mut self);
    /// Guest memory changes: a quiesce pauses access to the range (or all
    /// guest memory) and waits for in-flight requests that use it.
    fn memory_changed(&mut self, change: crate::memory::MemoryChange);
    /// The driver wrote its feature bits (before DRIVER_OK): what the
    /// device config shows may depend on them.
    fn features_written(&mut self, features: u64);
    /// A live upgrade: the queues stop and drain within `limit`; where each
    /// running queue stands in its ring (None: not running or broken).
    fn freeze(
        &mut self,
        _limit: std::time::Duration,
    ) -> Result<Vec<Option<ring::RingPos>>, String> {
        Err("this device cannot be handed to another binary".into())
    }
    /// The upgrade did not happen: the queues go on.
    fn thaw(&mut self) {}
    /// What of the device a new binary needs, besides what the driver
    /// wrote to the transport (its writable config, its statistics).
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Takes [`save`](Self::save)'s output, checked as driver input is.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Err("this device cannot take a saved state".into())
    }
}
