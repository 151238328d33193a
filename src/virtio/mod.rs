//! Virtio over the legacy (transitional) PCI transport: the register block
//! in BAR0, feature negotiation (32 bits), the ISR, MSI-X vector registers
//! and the legacy ring layout.
//!
//! This layer knows virtio and the PCI interrupts it raises; what the device
//! does with its queues belongs to a [`VirtioDevice`] (e.g. virtio-blk), and
//! nothing here touches files.

pub mod legacy;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::pci::Interrupts;

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
}

/// How a device raises its interrupts: MSI-X vector when the driver enabled
/// MSI-X and assigned one, otherwise the ISR bit and INTx.
#[derive(Clone)]
pub struct VirtioInterrupt {
    isr: Arc<AtomicU8>,
    irqs: Arc<Interrupts>,
}

/// ISR bit 0: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the configuration changed.
pub const ISR_CONFIG: u8 = 2;

impl VirtioInterrupt {
    pub fn new(isr: Arc<AtomicU8>, irqs: Arc<Interrupts>) -> VirtioInterrupt {
        VirtioInterrupt { isr, irqs }
    }

    /// Signals a queue whose driver-assigned vector is `vector`.
    pub fn signal_queue(&self, vector: u16) {
        self.signal(vector, ISR_QUEUE);
    }

    pub fn signal_config(&self, vector: u16) {
        self.signal(vector, ISR_CONFIG);
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
/// (a resize): ISR bit 1 and the config vector, or INTx. The transport keeps
/// the vector and whether a driver is running up to date.
pub struct ConfigNotifier {
    irq: VirtioInterrupt,
    vector: std::sync::atomic::AtomicU16,
    live: std::sync::atomic::AtomicBool,
}

impl ConfigNotifier {
    pub fn new(irq: VirtioInterrupt) -> ConfigNotifier {
        ConfigNotifier {
            irq,
            vector: std::sync::atomic::AtomicU16::new(NO_VECTOR),
            live: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn set_vector(&self, v: u16) {
        self.vector.store(v, Ordering::SeqCst);
    }

    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
    }

    /// Tells a running driver that the configuration changed; without one
    /// there is nobody to tell (a driver reads the configuration when it
    /// starts).
    pub fn notify(&self) {
        if self.live.load(Ordering::SeqCst) {
            self.irq.signal_config(self.vector.load(Ordering::SeqCst));
        }
    }
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Feature bits offered (legacy: the low 32 only).
    fn features(&self) -> u32;
    fn num_queues(&self) -> u16;
    /// The (fixed, legacy) size of every queue.
    fn queue_size(&self) -> u16;
    /// Length of the device config block.
    fn config_len(&self) -> usize;
    fn read_config(&self, offset: usize, data: &mut [u8]);
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// The driver set DRIVER_OK: start serving the queues that have an
    /// address. `features` is what the driver acknowledged.
    fn activate(&mut self, features: u32, queues: Vec<Option<QueueConfig>>, irq: VirtioInterrupt);
    /// The driver rang queue `index`'s doorbell.
    fn notify(&mut self, index: u16);
    /// Stop serving, wait for in-flight requests, forget the queues.
    fn reset(&mut self);
    /// The client is gone: stop serving at once; requests still in flight
    /// finish on their own and write nothing. A reset follows.
    fn abandon(&mut self);
    /// Pause guest-memory access to `range` (None: all of it) and wait for
    /// in-flight requests that use it.
    fn quiesce(&mut self, range: Option<crate::vfio_user::DmaRange>);
    fn resume(&mut self);
    /// Guest memory grew: queues waiting for their rings look again.
    fn memory_added(&mut self);
    /// The driver wrote its feature bits (before DRIVER_OK): what the
    /// device config shows may depend on them.
    fn features_written(&mut self, features: u32);
}
