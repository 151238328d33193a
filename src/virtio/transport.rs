//! One virtio-pci function's state, reached through two interfaces: the
//! legacy register block in BAR0 ([`super::legacy`]) and the virtio 1.x
//! capabilities in a 64-bit memory BAR ([`super::modern`]).
//!
//! The device follows the interface the driver uses. After a reset the
//! first register write through one interface (other than a reset) claims
//! the device for it; until the next reset, writes through the other
//! interface are ignored with a log line, and reads through it show the
//! shared state (status, features, queues). A reset through either
//! interface is always honoured. A legacy driver therefore gets the legacy
//! layout (PFN rings, 32 feature bits, no FEATURES_OK), and a modern one
//! the 1.x semantics (three ring addresses, 64 feature bits, FEATURES_OK,
//! writable queue sizes, the config generation and NEEDS_RESET).

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED};

use super::legacy::{self, legacy_ring_layout, QUEUE_PFN_SHIFT};
use super::modern;
use super::{
    ConfigNotifier, ConfigState, DriverReady, QueueConfig, VirtioDevice, VirtioInterrupt, NO_VECTOR,
};
use crate::memory::MemoryChange;
use crate::pci::{BarLogic, Interrupts, MemBar, VendorCap};

// The status register is 8 bits wide; the bindings spell its bits as u32.
#[allow(clippy::cast_possible_truncation)]
pub(super) const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
#[allow(clippy::cast_possible_truncation)]
pub(super) const FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;
const _: () = assert!(VIRTIO_CONFIG_S_DRIVER_OK < 256 && VIRTIO_CONFIG_S_FAILED < 256);

/// The interface a driver uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    Legacy,
    Modern,
}

/// How doorbells on the modern interface reach the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyMode {
    /// Writes to the notify area arrive as messages (posted by QEMU while
    /// no region of the device is mapped).
    #[default]
    Message,
    /// The notify page is shared memory the client maps: the guest's
    /// doorbells cost it nothing and the device's queues are polled.
    Mmap,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueRegs {
    /// Legacy: ring base as a page frame number (0: no ring).
    pub pfn: u32,
    pub vector: u16,
    /// Modern: the size the driver chose, the three ring addresses and
    /// whether it enabled the queue.
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub enable: bool,
}

impl QueueRegs {
    fn power_on(max: u16) -> QueueRegs {
        QueueRegs {
            pfn: 0,
            vector: NO_VECTOR,
            size: max,
            desc: 0,
            avail: 0,
            used: 0,
            enable: false,
        }
    }
}

/// The transitional virtio-pci function in front of a [`VirtioDevice`].
pub struct PciTransport<D: VirtioDevice> {
    pub(super) dev: D,
    pub(super) irqs: Arc<Interrupts>,
    pub(super) isr: Arc<AtomicU8>,
    pub(super) config: Arc<ConfigState>,
    pub(super) status: u8,
    /// What the driver acknowledged (legacy: written; modern: written
    /// words, checked at FEATURES_OK).
    pub(super) driver_features: u64,
    pub(super) device_feature_select: u32,
    pub(super) driver_feature_select: u32,
    pub(super) queue_sel: u16,
    pub(super) queues: Vec<QueueRegs>,
    /// The queues' vectors as running queues read them at each interrupt.
    pub(super) live_vectors: Arc<[AtomicU16]>,
    pub(super) config_vector: u16,
    pub(super) active: bool,
    pub(super) interface: Option<Interface>,
    pub(super) notify: NotifyMode,
    /// `--notify mmap`: the file behind the modern BAR that the client
    /// maps; only the notify page of it is offered.
    notify_file: Option<File>,
    /// Doorbells that came as messages through the modern notify area,
    /// since the process started (with `--notify mmap` none should: the
    /// client maps the page).
    pub(super) doorbell_messages: u64,
    config_notifier: Arc<ConfigNotifier>,
    /// Frozen for a live upgrade: where each queue stood.
    pub(super) frozen: Option<Vec<Option<super::ring::RingPos>>>,
    /// Restored from a live upgrade, running: the queues start from these
    /// positions once the upgrade commits.
    pub(super) restarting: Option<Vec<Option<super::ring::RingPos>>>,
}

impl<D: VirtioDevice> PciTransport<D> {
    pub fn new(dev: D, irqs: Arc<Interrupts>, notify: NotifyMode) -> std::io::Result<Self> {
        let n = usize::from(dev.num_queues());
        let max = dev.queue_size();
        let isr = Arc::new(AtomicU8::new(0));
        let config = Arc::new(ConfigState::default());
        let config_notifier = Arc::new(ConfigNotifier::new(VirtioInterrupt::new(
            isr.clone(),
            irqs.clone(),
            config.clone(),
        )));
        let notify_file = match notify {
            NotifyMode::Message => None,
            // Sealed: a client cannot shrink the page under the next one
            // (whose guest would fault on its doorbell).
            NotifyMode::Mmap => Some(crate::util::sealed_memfd(
                "virtio-notify",
                modern::BAR_SIZE,
            )?),
        };
        Ok(PciTransport {
            dev,
            irqs,
            isr,
            config,
            config_notifier,
            status: 0,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_sel: 0,
            queues: vec![QueueRegs::power_on(max); n],
            live_vectors: (0..n).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_vector: NO_VECTOR,
            active: false,
            interface: None,
            notify,
            notify_file,
            doorbell_messages: 0,
            frozen: None,
            restarting: None,
        })
    }

    /// Raises this device's configuration-change interrupt from anywhere.
    pub fn config_notifier(&self) -> Arc<ConfigNotifier> {
        self.config_notifier.clone()
    }

    /// The interface the driver claimed since the last reset.
    pub fn interface(&self) -> Option<Interface> {
        self.interface
    }

    /// A register write through `via`: true when the device follows it.
    pub(super) fn claim(&mut self, via: Interface) -> bool {
        match self.interface {
            None => {
                crate::dev_debug!(self.irqs.log(), "driver uses the {via:?} interface");
                self.interface = Some(via);
                true
            }
            Some(i) if i == via => true,
            Some(i) => {
                crate::dev_log!(
                    self.irqs.log(),
                    Warn,
                    "driver wrote through the {via:?} interface while using the {i:?} one; ignored"
                );
                false
            }
        }
    }

    pub(super) fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_sel))
    }

    pub(super) fn valid_vector(&self, v: u16) -> u16 {
        if v < self.irqs.msix_vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// A queue's vector, at any time: a running queue signals the new one
    /// from its next interrupt on (virtio 1.x lets a driver remap a queue;
    /// QEMU honours it too). A vector that does not exist reads back as
    /// NO_VECTOR, the spec's answer to a mapping that failed.
    pub(super) fn set_queue_vector(&mut self, v: u16) {
        let vec = self.valid_vector(v);
        let sel = usize::from(self.queue_sel);
        if let Some(q) = self.selected() {
            q.vector = vec;
        }
        if let Some(live) = self.live_vectors.get(sel) {
            live.store(vec, Ordering::Relaxed);
        }
    }

    pub(super) fn set_config_vector(&mut self, v: u16) {
        self.config_vector = self.valid_vector(v);
        self.config.set_vector(self.config_vector);
    }

    pub(super) fn reset_registers(&mut self) {
        if self.active || self.status != 0 {
            self.dev.reset();
        }
        self.active = false;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_sel = 0;
        let max = self.dev.queue_size();
        for q in &mut self.queues {
            *q = QueueRegs::power_on(max);
        }
        for v in self.live_vectors.iter() {
            v.store(NO_VECTOR, Ordering::Relaxed);
        }
        self.status = 0;
        self.interface = None;
        self.config_vector = NO_VECTOR;
        self.config.reset();
        self.isr.store(0, Ordering::SeqCst);
        self.irqs.set_intx_level(false);
    }

    /// Reads the ISR: acknowledges it and lowers INTx.
    pub(super) fn read_isr(&mut self) -> u8 {
        let v = self.isr.swap(0, Ordering::SeqCst);
        self.irqs.set_intx_level(false);
        v
    }

    /// The driver rang queue `q`'s doorbell.
    pub(super) fn doorbell(&mut self, q: u16) {
        if self.active && usize::from(q) < self.queues.len() {
            self.dev.notify(q);
        } else {
            crate::dev_debug!(
                self.irqs.log(),
                "notify of queue {q} ignored (active {})",
                self.active
            );
        }
    }

    /// A status write other than 0 (which resets): DRIVER_OK starts the
    /// device.
    pub(super) fn write_status(&mut self, s: u8) {
        let was_ok = self.status & DRIVER_OK != 0;
        self.status = s;
        if s & FAILED != 0 {
            crate::dev_log!(self.irqs.log(), Warn, "driver marked the device FAILED");
        }
        if !was_ok && s & DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        self.activate_from(None);
    }

    /// Starts the queues: from the start of their rings, or (a live
    /// upgrade) from saved positions, where only queues that have one run.
    pub(super) fn activate_from(&mut self, starts: Option<Vec<Option<super::ring::RingPos>>>) {
        let max = self.dev.queue_size();
        let modern = self.interface == Some(Interface::Modern);
        // The packed layout exists only on the modern interface.
        let packed = modern
            && self.driver_features & (1 << virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED)
                != 0;
        let queues: Vec<Option<QueueConfig>> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let start = starts.as_ref().map(|s| s.get(i).copied().flatten());
                if start == Some(None) {
                    // Not running when the old binary saved it (or broken).
                    return None;
                }
                let start = start.flatten();
                if modern {
                    q.enable.then_some(QueueConfig {
                        size: q.size,
                        desc: q.desc,
                        avail: q.avail,
                        used: q.used,
                        vector: q.vector,
                        packed,
                        start,
                    })
                } else {
                    (q.pfn != 0).then(|| {
                        let base = u64::from(q.pfn) << QUEUE_PFN_SHIFT;
                        let (desc, avail, used) = legacy_ring_layout(base, max);
                        QueueConfig {
                            size: max,
                            desc,
                            avail,
                            used,
                            vector: q.vector,
                            packed: false,
                            start,
                        }
                    })
                }
            })
            .collect();
        crate::dev_debug!(
            self.irqs.log(),
            "driver ready ({:?} interface): queues {queues:?}",
            self.interface
        );
        let irq = VirtioInterrupt::new(self.isr.clone(), self.irqs.clone(), self.config.clone())
            .with_queue_vectors(self.live_vectors.clone());
        // Live first: a queue that breaks while the device starts (a busy
        // reactor may take its first request at once) must still raise the
        // configuration interrupt.
        self.config.set_live(true);
        self.dev.activate(DriverReady {
            features: self.driver_features,
            queues,
            irq,
            polled: self.notify == NotifyMode::Mmap && modern,
        });
        self.active = true;
    }

    /// Device config read at `off` (bytes past its end read zeros).
    pub(super) fn read_device_config(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        let off = usize::try_from(off).unwrap_or(usize::MAX);
        let len = self.dev.config_len();
        if off < len {
            let n = data.len().min(len - off);
            self.config
                .read(|| self.dev.read_config(off, &mut data[..n]));
        }
    }

    pub(super) fn write_device_config(&mut self, off: u64, data: &[u8]) {
        let off = usize::try_from(off).unwrap_or(usize::MAX);
        let len = self.dev.config_len();
        if off < len {
            let n = data.len().min(len - off);
            self.dev.write_config(off, &data[..n]);
        }
    }
}

impl<D: VirtioDevice> BarLogic for PciTransport<D> {
    fn io_bar_size(&self) -> u32 {
        legacy::bar_size(self.dev.config_len())
    }

    fn io_read(&mut self, offset: u64, data: &mut [u8]) {
        self.legacy_read(offset, data);
    }

    fn io_write(&mut self, offset: u64, data: &[u8]) {
        self.legacy_write(offset, data);
    }

    fn mem_bar(&self) -> Option<MemBar<'_>> {
        Some(MemBar {
            size: modern::BAR_SIZE,
            mmap: self.notify_file.as_ref().map(|f| {
                (
                    f.as_fd(),
                    vec![(modern::NOTIFY_OFFSET, modern::NOTIFY_AREA)],
                )
            }),
        })
    }

    fn mem_read(&mut self, offset: u64, data: &mut [u8]) {
        self.modern_read(offset, data);
    }

    fn mem_write(&mut self, offset: u64, data: &[u8]) {
        self.modern_write(offset, data);
    }

    fn capabilities(&self) -> Vec<VendorCap> {
        modern::capabilities(self.dev.num_queues(), self.dev.config_len())
    }

    fn reset(&mut self) {
        self.reset_registers();
    }

    fn disconnect(&mut self) {
        self.dev.abandon();
        self.reset_registers();
        crate::dev_log!(
            self.irqs.log(),
            Info,
            "{} doorbell message(s) through the modern notify area since start (notify {:?})",
            self.doorbell_messages,
            self.notify
        );
    }

    fn memory_changed(&mut self, change: MemoryChange) {
        self.dev.memory_changed(change);
    }

    fn freeze(&mut self, limit: std::time::Duration) -> Result<(), String> {
        self.freeze_queues(limit)
    }

    fn thaw(&mut self) {
        self.thaw_queues();
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(self.save_state()).unwrap_or_default()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: super::SavedTransport =
            serde_json::from_value(state.clone()).map_err(|e| format!("transport: {e}"))?;
        self.restore_state(s)
    }

    fn start_restored(&mut self) {
        PciTransport::start_restored(self);
    }

    fn bus_master_changed(&mut self, enabled: bool) {
        if !enabled && self.active {
            // Without bus mastering the function may not touch memory.
            crate::dev_log!(
                self.irqs.log(),
                Info,
                "bus mastering disabled while running: device reset"
            );
            self.reset_registers();
        }
    }
}
