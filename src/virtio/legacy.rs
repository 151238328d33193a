//! The legacy virtio-pci register block in BAR0 (Linux
//! `include/uapi/linux/virtio_pci.h`), one of the two interfaces of
//! [`PciTransport`]. virtio-bindings carries no legacy PCI offsets, so they
//! are spelled here.
//!
//! Accesses are decoded as (offset, width) first; a register accessed with
//! a width it does not have reads as zeros and ignores writes, an
//! out-of-range queue select reads a queue of size 0, and vector registers
//! read back what they accepted or `NO_VECTOR`. Only the low 32 feature
//! bits exist here (no VERSION_1, no FEATURES_OK).

use super::transport::{Interface, PciTransport};
use super::{low16, low32, VirtioDevice, NO_VECTOR};

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

/// Size of BAR0 for a device config of `config_len` bytes.
pub fn bar_size(config_len: usize) -> u32 {
    let need = CONFIG_OFFSET_MSIX_USIZE + config_len;
    u32::try_from(need.next_power_of_two()).unwrap_or(u32::MAX)
}

impl<D: VirtioDevice> PciTransport<D> {
    fn legacy_config_offset(&self) -> u64 {
        if self.irqs.msix_enabled() {
            CONFIG_OFFSET_MSIX
        } else {
            CONFIG_OFFSET_NO_MSIX
        }
    }

    fn legacy_read_reg(&mut self, offset: u64, width: usize) -> Option<u32> {
        let msix = self.irqs.msix_enabled();
        let v = match (offset, width) {
            (HOST_FEATURES, 4) => low32(self.dev.features()),
            (GUEST_FEATURES, 4) => low32(self.driver_features),
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
            (ISR, 1) => u32::from(self.read_isr()),
            (CONFIG_VECTOR, 2) if msix => u32::from(self.config_vector),
            (QUEUE_VECTOR, 2) if msix => u32::from(self.selected().map_or(NO_VECTOR, |q| q.vector)),
            _ => return None,
        };
        Some(v)
    }

    fn legacy_write_reg(&mut self, offset: u64, width: usize, v: u32) -> bool {
        let msix = self.irqs.msix_enabled();
        let v16 = low16(u64::from(v));
        let known = matches!(
            (offset, width),
            (GUEST_FEATURES, 4) | (QUEUE_PFN, 4) | (QUEUE_SEL, 2) | (QUEUE_NOTIFY, 2) | (STATUS, 1)
        ) || (msix
            && matches!((offset, width), (CONFIG_VECTOR, 2) | (QUEUE_VECTOR, 2)));
        if !known {
            return false;
        }
        if (offset, width) == (STATUS, 1) && v & 0xff == 0 {
            crate::dev_log!(self.irqs.log(), Info, "driver reset the device");
            self.reset_registers();
            return true;
        }
        if !self.claim(Interface::Legacy) {
            return true;
        }
        match (offset, width) {
            (GUEST_FEATURES, 4) => self.write_guest_features(v),
            (QUEUE_PFN, 4) => self.write_queue_pfn(v),
            (QUEUE_SEL, 2) => self.queue_sel = v16,
            (QUEUE_NOTIFY, 2) => self.doorbell(v16),
            (STATUS, 1) => self.write_status(v.to_le_bytes()[0]),
            (CONFIG_VECTOR, 2) => self.set_config_vector(v16),
            (QUEUE_VECTOR, 2) => self.set_queue_vector(v16),
            _ => {}
        }
        true
    }

    fn write_guest_features(&mut self, v: u32) {
        if self.active {
            crate::dev_log!(
                self.irqs.log(),
                Warn,
                "guest features written after DRIVER_OK; ignored"
            );
            return;
        }
        let offered = low32(self.dev.features());
        if v & !offered != 0 {
            crate::dev_log!(
                self.irqs.log(),
                Warn,
                "driver acknowledged features {:#x} that were not offered; dropped",
                v & !offered
            );
        }
        self.driver_features = u64::from(v & offered);
        self.dev.features_written(self.driver_features);
    }

    fn write_queue_pfn(&mut self, v: u32) {
        let sel = self.queue_sel;
        if v == 0 {
            if let Some(q) = self.selected() {
                q.pfn = 0;
            }
            if self.active {
                // Legacy drivers clear a queue only while tearing down;
                // treat it as the reset it precedes.
                crate::dev_log!(
                    self.irqs.log(),
                    Info,
                    "queue {sel} address cleared while running: resetting the device"
                );
                self.reset_registers();
            }
        } else if self.active {
            crate::dev_log!(
                self.irqs.log(),
                Warn,
                "queue {sel} address written after DRIVER_OK; ignored"
            );
        } else if let Some(q) = self.selected() {
            q.pfn = v;
        } else {
            crate::dev_debug!(
                self.irqs.log(),
                "queue address for queue {sel}, which does not exist; ignored"
            );
        }
    }

    /// An access to BAR0.
    pub(super) fn legacy_read(&mut self, offset: u64, data: &mut [u8]) {
        let cfg = self.legacy_config_offset();
        data.fill(0);
        if offset >= cfg {
            self.read_device_config(offset - cfg, data);
            return;
        }
        match self.legacy_read_reg(offset, data.len()) {
            Some(v) => {
                let n = data.len();
                data.copy_from_slice(&v.to_le_bytes()[..n]);
            }
            None => crate::dev_debug!(
                self.irqs.log(),
                "BAR0 read of {} bytes at {offset:#x}: no such register",
                data.len()
            ),
        }
    }

    pub(super) fn legacy_write(&mut self, offset: u64, data: &[u8]) {
        let cfg = self.legacy_config_offset();
        if offset >= cfg {
            if self.claim(Interface::Legacy) {
                self.write_device_config(offset - cfg, data);
            }
            return;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        if data.len() > 4 || !self.legacy_write_reg(offset, data.len(), u32::from_le_bytes(b)) {
            crate::dev_debug!(
                self.irqs.log(),
                "BAR0 write of {} bytes at {offset:#x}: no such register; ignored",
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_device::{transport, Transport};
    use super::*;
    use crate::pci::BarLogic;
    use crate::virtio::VirtioInterrupt;

    fn r(t: &mut Transport, off: u64, n: usize) -> u32 {
        let mut b = [0u8; 4];
        t.io_read(off, &mut b[..n]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn features_queues_and_activation() {
        let (mut t, _irqs, probe) = transport();
        assert_eq!(
            t.io_bar_size(),
            128,
            "24 + 60 bytes rounded up to a power of two"
        );
        // Only the low 32 bits: VERSION_1 (bit 32) does not show here.
        assert_eq!(r(&mut t, HOST_FEATURES, 4), 0b1011);
        // Features that were not offered are dropped.
        t.io_write(GUEST_FEATURES, &0xffu32.to_le_bytes());
        assert_eq!(r(&mut t, GUEST_FEATURES, 4), 0b1011);
        // An out-of-range queue select is harmless.
        t.io_write(QUEUE_SEL, &7u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_NUM, 2), 0);
        t.io_write(QUEUE_PFN, &5u32.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_PFN, 4), 0);
        t.io_write(QUEUE_SEL, &1u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_NUM, 2), 128);
        t.io_write(QUEUE_PFN, &0x10u32.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_PFN, 4), 0x10);
        // A register accessed with the wrong width reads zeros.
        assert_eq!(r(&mut t, QUEUE_PFN, 2), 0);
        t.io_write(STATUS, &[1]);
        t.io_write(STATUS, &[3]);
        assert!(probe.activated.lock().unwrap().is_empty());
        t.io_write(STATUS, &[7]);
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
        t.io_write(QUEUE_NOTIFY, &1u16.to_le_bytes());
        t.io_write(QUEUE_NOTIFY, &9u16.to_le_bytes());
        assert_eq!(*probe.notified.lock().unwrap(), vec![1]);
        // Writing 0 to the status resets everything.
        t.io_write(STATUS, &[0]);
        assert_eq!(*probe.resets.lock().unwrap(), 1);
        assert_eq!(r(&mut t, STATUS, 1), 0);
        assert_eq!(r(&mut t, GUEST_FEATURES, 4), 0);
        t.io_write(QUEUE_SEL, &1u16.to_le_bytes());
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
        t.io_write(CONFIG_VECTOR, &2u16.to_le_bytes());
        assert_eq!(r(&mut t, CONFIG_VECTOR, 2), 2);
        // A vector beyond the table reads back NO_VECTOR.
        t.io_write(QUEUE_SEL, &0u16.to_le_bytes());
        t.io_write(QUEUE_VECTOR, &3u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_VECTOR, 2), u32::from(NO_VECTOR));
        t.io_write(QUEUE_VECTOR, &1u16.to_le_bytes());
        assert_eq!(r(&mut t, QUEUE_VECTOR, 2), 1);
        // Reads past the device config return zeros.
        assert_eq!(r(&mut t, 24 + 60, 4), 0);
        assert_eq!(r(&mut t, 24 + 58, 4), u32::from_le_bytes([58, 59, 0, 0]));
    }

    #[test]
    fn isr_read_clears_and_lowers_intx() {
        let (mut t, irqs, _probe) = transport();
        let irq = VirtioInterrupt::new(t.isr.clone(), irqs, t.config.clone());
        irq.signal_queue(NO_VECTOR);
        assert_eq!(r(&mut t, ISR, 1), 1);
        assert_eq!(r(&mut t, ISR, 1), 0);
        irq.signal_config(NO_VECTOR);
        assert_eq!(r(&mut t, ISR, 1), 2);
    }
}
