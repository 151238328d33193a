//! The legacy virtio-pci register block (Linux `include/uapi/linux/virtio_pci.h`).
//! virtio-bindings carries no legacy PCI offsets, so they are spelled here.
//!
//! Accesses are decoded as (offset, width) first; a register accessed with
//! a width it does not have reads as zeros and ignores writes, an
//! out-of-range queue select reads a queue of size 0, and vector registers
//! read back what they accepted or `NO_VECTOR`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use log::{debug, info};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED};

// The status register is 8 bits wide; the bindings spell its bits as u32
// (both fit in 8 bits, checked at compile time).
#[allow(clippy::cast_possible_truncation)]
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;
const _: () = assert!(VIRTIO_CONFIG_S_DRIVER_OK < 256 && VIRTIO_CONFIG_S_FAILED < 256);

use super::{ConfigNotifier, QueueConfig, VirtioDevice, VirtioInterrupt, NO_VECTOR};
use crate::pci::{Interrupts, IoBar};
use crate::vfio_user::DmaRange;

pub const HOST_FEATURES: u64 = 0;
pub const GUEST_FEATURES: u64 = 4;
pub const QUEUE_PFN: u64 = 8;
pub const QUEUE_NUM: u64 = 12;
pub const QUEUE_SEL: u64 = 14;
pub const QUEUE_NOTIFY: u64 = 16;
pub const STATUS: u64 = 18;
pub const ISR: u64 = 19;
pub const CONFIG_VECTOR: u64 = 20;
pub const QUEUE_VECTOR: u64 = 22;
/// Device config starts here without MSI-X...
pub const CONFIG_OFFSET_NO_MSIX: u64 = 20;
/// ...and here with MSI-X enabled.
pub const CONFIG_OFFSET_MSIX: u64 = 24;
const CONFIG_OFFSET_MSIX_USIZE: usize = 24;
/// Legacy queue addresses are page frame numbers of this size.
pub const QUEUE_PFN_SHIFT: u32 = 12;
/// The used ring is aligned to this in the legacy layout.
pub const QUEUE_ALIGN: u64 = 4096;

#[derive(Clone, Copy, Default)]
struct QueueRegs {
    pfn: u32,
    vector: u16,
}

/// The legacy register block in front of a [`VirtioDevice`].
pub struct LegacyTransport<D: VirtioDevice> {
    dev: D,
    irqs: Arc<Interrupts>,
    isr: Arc<AtomicU8>,
    guest_features: u32,
    queue_sel: u16,
    queues: Vec<QueueRegs>,
    status: u8,
    config_vector: u16,
    active: bool,
    config_notifier: Arc<ConfigNotifier>,
}

/// Byte offsets of the legacy split ring for `size` entries at `base`.
pub fn legacy_ring_layout(base: u64, size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    let desc = base;
    let avail = desc + 16 * n;
    // flags, idx, ring[n], used_event
    let avail_end = avail + 4 + 2 * n + 2;
    let used = avail_end.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN;
    (desc, avail, used)
}

impl<D: VirtioDevice> LegacyTransport<D> {
    pub fn new(dev: D, irqs: Arc<Interrupts>) -> LegacyTransport<D> {
        let n = usize::from(dev.num_queues());
        let isr = Arc::new(AtomicU8::new(0));
        let config_notifier = Arc::new(ConfigNotifier::new(VirtioInterrupt::new(
            isr.clone(),
            irqs.clone(),
        )));
        LegacyTransport {
            dev,
            irqs,
            isr,
            config_notifier,
            guest_features: 0,
            queue_sel: 0,
            queues: vec![
                QueueRegs {
                    pfn: 0,
                    vector: NO_VECTOR
                };
                n
            ],
            status: 0,
            config_vector: NO_VECTOR,
            active: false,
        }
    }

    /// Raises this device's configuration-change interrupt from anywhere.
    pub fn config_notifier(&self) -> Arc<ConfigNotifier> {
        self.config_notifier.clone()
    }

    fn config_offset(&self) -> u64 {
        if self.irqs.msix_enabled() {
            CONFIG_OFFSET_MSIX
        } else {
            CONFIG_OFFSET_NO_MSIX
        }
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_sel))
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.irqs.msix_vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn reset_registers(&mut self) {
        if self.active || self.status != 0 {
            self.dev.reset();
        }
        self.active = false;
        self.guest_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs {
                pfn: 0,
                vector: NO_VECTOR,
            };
        }
        self.status = 0;
        self.config_vector = NO_VECTOR;
        self.config_notifier.set_vector(NO_VECTOR);
        self.config_notifier.set_live(false);
        self.isr.store(0, Ordering::SeqCst);
        self.irqs.set_intx_level(false);
    }

    fn activate(&mut self) {
        let size = self.dev.queue_size();
        let queues = self
            .queues
            .iter()
            .map(|q| {
                (q.pfn != 0).then(|| {
                    let base = u64::from(q.pfn) << QUEUE_PFN_SHIFT;
                    let (desc, avail, used) = legacy_ring_layout(base, size);
                    QueueConfig {
                        size,
                        desc,
                        avail,
                        used,
                        vector: q.vector,
                    }
                })
            })
            .collect();
        debug!(
            "driver ready: queues at pfn {:?}",
            self.queues.iter().map(|q| q.pfn).collect::<Vec<_>>()
        );
        let irq = VirtioInterrupt::new(self.isr.clone(), self.irqs.clone());
        self.dev.activate(self.guest_features, queues, irq);
        self.active = true;
        self.config_notifier.set_live(true);
    }

    fn read_reg(&mut self, offset: u64, width: usize) -> Option<u32> {
        let msix = self.irqs.msix_enabled();
        let v = match (offset, width) {
            (HOST_FEATURES, 4) => self.dev.features(),
            (GUEST_FEATURES, 4) => self.guest_features,
            (QUEUE_PFN, 4) => self.selected().map_or(0, |q| q.pfn),
            (QUEUE_NUM, 2) => {
                if usize::from(self.queue_sel) < self.queues.len() {
                    u32::from(self.dev.queue_size())
                } else {
                    0
                }
            }
            (QUEUE_SEL, 2) => u32::from(self.queue_sel),
            (QUEUE_NOTIFY, 2) => 0,
            (STATUS, 1) => u32::from(self.status),
            (ISR, 1) => {
                // Reading the ISR acknowledges it and lowers INTx.
                let v = self.isr.swap(0, Ordering::SeqCst);
                self.irqs.set_intx_level(false);
                u32::from(v)
            }
            (CONFIG_VECTOR, 2) if msix => u32::from(self.config_vector),
            (QUEUE_VECTOR, 2) if msix => u32::from(self.selected().map_or(NO_VECTOR, |q| q.vector)),
            _ => return None,
        };
        Some(v)
    }

    fn write_reg(&mut self, offset: u64, width: usize, v: u32) -> bool {
        let msix = self.irqs.msix_enabled();
        // Truncations below take the register's own width, already checked.
        let v16 = (v & 0xffff) as u16;
        match (offset, width) {
            (GUEST_FEATURES, 4) => {
                if self.active {
                    crate::warn_limited!("guest features written after DRIVER_OK; ignored");
                } else {
                    let offered = self.dev.features();
                    if v & !offered != 0 {
                        crate::warn_limited!(
                            "driver acknowledged features {:#x} that were not offered; dropped",
                            v & !offered
                        );
                    }
                    self.guest_features = v & offered;
                    self.dev.features_written(self.guest_features);
                }
            }
            (QUEUE_PFN, 4) => {
                let sel = self.queue_sel;
                if v == 0 {
                    if let Some(q) = self.selected() {
                        q.pfn = 0;
                    }
                    if self.active {
                        // Legacy drivers clear a queue only while tearing
                        // down; treat it as the reset it precedes.
                        info!("queue {sel} address cleared while running: resetting the device");
                        self.reset_registers();
                    }
                } else if self.active {
                    crate::warn_limited!("queue {sel} address written after DRIVER_OK; ignored");
                } else if let Some(q) = self.selected() {
                    q.pfn = v;
                } else {
                    debug!("queue address for queue {sel}, which does not exist; ignored");
                }
            }
            (QUEUE_SEL, 2) => self.queue_sel = v16,
            (QUEUE_NOTIFY, 2) => {
                if self.active && usize::from(v16) < self.queues.len() {
                    self.dev.notify(v16);
                } else {
                    debug!("notify of queue {v16} ignored (active {})", self.active);
                }
            }
            (STATUS, 1) => {
                let s = (v & 0xff) as u8;
                if s == 0 {
                    info!("driver reset the device");
                    self.reset_registers();
                } else {
                    let was_ok = self.status & DRIVER_OK != 0;
                    self.status = s;
                    if s & FAILED != 0 {
                        crate::warn_limited!("driver marked the device FAILED");
                    }
                    if !was_ok && s & DRIVER_OK != 0 && !self.active {
                        self.activate();
                    }
                }
            }
            (CONFIG_VECTOR, 2) if msix => {
                self.config_vector = self.valid_vector(v16);
                self.config_notifier.set_vector(self.config_vector);
            }
            (QUEUE_VECTOR, 2) if msix => {
                let vec = self.valid_vector(v16);
                if let Some(q) = self.selected() {
                    q.vector = vec;
                }
            }
            _ => return false,
        }
        true
    }
}

impl<D: VirtioDevice> IoBar for LegacyTransport<D> {
    fn size(&self) -> u32 {
        let need = CONFIG_OFFSET_MSIX_USIZE + self.dev.config_len();
        u32::try_from(need.next_power_of_two()).unwrap_or(u32::MAX)
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_offset();
        data.fill(0);
        if offset >= cfg {
            let off = usize::try_from(offset - cfg).unwrap_or(usize::MAX);
            let len = self.dev.config_len();
            if off < len {
                let n = data.len().min(len - off);
                self.dev.read_config(off, &mut data[..n]);
            }
            return;
        }
        match self.read_reg(offset, data.len()) {
            Some(v) => {
                let n = data.len();
                data.copy_from_slice(&v.to_le_bytes()[..n]);
            }
            None => debug!(
                "BAR0 read of {} bytes at {offset:#x}: no such register",
                data.len()
            ),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let cfg = self.config_offset();
        if offset >= cfg {
            let off = usize::try_from(offset - cfg).unwrap_or(usize::MAX);
            let len = self.dev.config_len();
            if off < len {
                let n = data.len().min(len - off);
                self.dev.write_config(off, &data[..n]);
            }
            return;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        if data.len() > 4 || !self.write_reg(offset, data.len(), u32::from_le_bytes(b)) {
            debug!(
                "BAR0 write of {} bytes at {offset:#x}: no such register; ignored",
                data.len()
            );
        }
    }

    fn reset(&mut self) {
        self.reset_registers();
    }

    fn disconnect(&mut self) {
        self.dev.abandon();
        self.reset_registers();
    }

    fn quiesce(&mut self, range: Option<DmaRange>) {
        self.dev.quiesce(range);
    }

    fn resume(&mut self) {
        self.dev.resume();
    }

    fn memory_added(&mut self) {
        self.dev.memory_added();
    }

    fn bus_master_changed(&mut self, enabled: bool) {
        if !enabled && self.active {
            // Without bus mastering the function may not touch memory.
            info!("bus mastering disabled while running: device reset");
            self.reset_registers();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Activations = Arc<Mutex<Vec<(u32, Vec<Option<QueueConfig>>)>>>;

    /// A device that records what the transport tells it.
    #[derive(Default)]
    struct Fake {
        config: Vec<u8>,
        activated: Activations,
        resets: Arc<Mutex<usize>>,
        notified: Arc<Mutex<Vec<u16>>>,
    }

    impl VirtioDevice for Fake {
        fn features(&self) -> u32 {
            0b1011
        }
        fn num_queues(&self) -> u16 {
            2
        }
        fn queue_size(&self) -> u16 {
            128
        }
        fn config_len(&self) -> usize {
            self.config.len()
        }
        fn read_config(&self, offset: usize, data: &mut [u8]) {
            data.copy_from_slice(&self.config[offset..offset + data.len()]);
        }
        fn write_config(&mut self, _offset: usize, _data: &[u8]) {}
        fn activate(
            &mut self,
            features: u32,
            queues: Vec<Option<QueueConfig>>,
            _irq: VirtioInterrupt,
        ) {
            self.activated.lock().unwrap().push((features, queues));
        }
        fn notify(&mut self, index: u16) {
            self.notified.lock().unwrap().push(index);
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
        fn quiesce(&mut self, _range: Option<DmaRange>) {}
        fn abandon(&mut self) {}
        fn resume(&mut self) {}
        fn memory_added(&mut self) {}
        fn features_written(&mut self, _features: u32) {}
    }

    fn transport() -> (LegacyTransport<Fake>, Arc<Interrupts>, Fake) {
        let irqs = Arc::new(Interrupts::new(3));
        let fake = Fake {
            config: (0u8..60).collect(),
            ..Default::default()
        };
        let probe = Fake {
            config: vec![],
            activated: fake.activated.clone(),
            resets: fake.resets.clone(),
            notified: fake.notified.clone(),
        };
        (LegacyTransport::new(fake, irqs.clone()), irqs, probe)
    }

    fn r(t: &mut LegacyTransport<Fake>, off: u64, n: usize) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b[..n]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn features_queues_and_activation() {
        let (mut t, _irqs, probe) = transport();
        assert_eq!(t.size(), 128, "24 + 60 bytes rounded up to a power of two");
        assert_eq!(r(&mut t, HOST_FEATURES, 4), 0b1011);
        // Features that were not offered are dropped.
        t.write(GUEST_FEATURES, &0xffu32.to_le_bytes());
        assert_eq!(r(&mut t, GUEST_FEATURES, 4), 0b1011);
        // An out-of-range queue select is harmless.
        t.write(QUEUE_SEL, &7u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_NUM, 2), 0);
        t.write(QUEUE_PFN, &5u32.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_PFN, 4), 0);
        t.write(QUEUE_SEL, &1u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_NUM, 2), 128);
        t.write(QUEUE_PFN, &0x10u32.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_PFN, 4), 0x10);
        // A register accessed with the wrong width reads zeros.
        assert_eq!(r(&mut t, QUEUE_PFN, 2), 0);
        t.write(STATUS, &[1]);
        t.write(STATUS, &[3]);
        assert!(probe.activated.lock().unwrap().is_empty());
        t.write(STATUS, &[7]);
        let act = probe.activated.lock().unwrap();
        assert_eq!(act.len(), 1);
        assert_eq!(act[0].0, 0b1011);
        assert_eq!(act[0].1[0], None);
        let q = act[0].1[1].unwrap();
        assert_eq!(
            (q.size, q.desc, q.avail),
            (128, 0x10000, 0x10000 + 16 * 128)
        );
        assert_eq!(q.used % QUEUE_ALIGN, 0);
        assert!(q.used >= q.avail + 4 + 2 * 128 + 2);
        drop(act);
        t.write(QUEUE_NOTIFY, &1u16.to_le_bytes());
        t.write(QUEUE_NOTIFY, &9u16.to_le_bytes());
        assert_eq!(*probe.notified.lock().unwrap(), vec![1]);
        // Writing 0 to the status resets everything.
        t.write(STATUS, &[0]);
        assert_eq!(*probe.resets.lock().unwrap(), 1);
        assert_eq!(r(&mut t, STATUS, 1), 0);
        assert_eq!(r(&mut t, GUEST_FEATURES, 4), 0);
        t.write(QUEUE_SEL, &1u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_PFN, 4), 0, "PFN reads 0 after reset");
    }

    #[test]
    fn msix_moves_the_device_config_and_vectors_read_back() {
        let (mut t, irqs, _probe) = transport();
        // Without MSI-X the device config starts at 20 and there are no
        // vector registers.
        assert_eq!(r(&mut t, 20, 4), u32::from_le_bytes([0, 1, 2, 3]));
        irqs.set_msix_control(true, false);
        assert_eq!(r(&mut t, 24, 4), u32::from_le_bytes([0, 1, 2, 3]));
        assert_eq!(r(&mut t, CONFIG_VECTOR, 2), u32::from(NO_VECTOR));
        t.write(CONFIG_VECTOR, &2u16.to_le_bytes());
        assert_eq!(r(&mut t, CONFIG_VECTOR, 2), 2);
        // A vector beyond the table reads back NO_VECTOR.
        t.write(QUEUE_SEL, &0u16.to_le_bytes());
        t.write(QUEUE_VECTOR, &3u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_VECTOR, 2), u32::from(NO_VECTOR));
        t.write(QUEUE_VECTOR, &1u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_VECTOR, 2), 1);
        // Reads past the device config return zeros.
        assert_eq!(r(&mut t, 24 + 60, 4), 0);
        assert_eq!(r(&mut t, 24 + 58, 4), u32::from_le_bytes([58, 59, 0, 0]));
    }

    #[test]
    fn isr_read_clears_and_lowers_intx() {
        let (mut t, irqs, _probe) = transport();
        let irq = VirtioInterrupt::new(t.isr.clone(), irqs);
        irq.signal_queue(NO_VECTOR);
        assert_eq!(r(&mut t, ISR, 1), 1);
        assert_eq!(r(&mut t, ISR, 1), 0);
        irq.signal_config(NO_VECTOR);
        assert_eq!(r(&mut t, ISR, 1), 2);
    }
}
