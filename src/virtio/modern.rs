//! The virtio 1.x PCI interface of [`PciTransport`]: the vendor-specific
//! capabilities in config space (common, notify, ISR, device, and the
//! PCI-config access window) and the structures they point to in a 64-bit
//! prefetchable memory BAR (BAR4, laid out as QEMU lays out its own
//! virtio-pci devices: one 4 KiB page per structure).
//!
//! virtio-bindings carries no virtio-pci structure offsets (Linux's
//! `include/uapi/linux/virtio_pci.h` and the virtio 1.x spec, 4.1.4), so
//! they are spelled here. Accesses are decoded as (offset, width): a field
//! accessed with a width it does not have reads zeros and ignores writes;
//! the 64-bit ring addresses take two 32-bit halves or one 64-bit access.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
};

use super::transport::{Interface, PciTransport, DRIVER_OK};
use super::{low16, low32, VirtioDevice, NO_VECTOR};
use crate::pci::{CapWindow, VendorCap};

#[allow(clippy::cast_possible_truncation)]
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const _: () = assert!(VIRTIO_CONFIG_S_FEATURES_OK < 256 && VIRTIO_CONFIG_S_NEEDS_RESET < 256);

/// The BAR the structures live in, and its size.
pub const BAR_INDEX: u8 = 4;
pub const BAR_SIZE: u64 = 0x4000;
pub const COMMON_OFFSET: u64 = 0;
/// `struct virtio_pci_common_cfg`, up to `queue_device`.
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const ISR_LEN: u64 = 4;
pub const DEVICE_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// The page that holds the doorbells (what `--notify mmap` shares).
pub const NOTIFY_AREA: u64 = 0x1000;
/// Bytes between two queues' doorbells (`notify_off_multiplier`).
pub const NOTIFY_MULTIPLIER: u32 = 4;

/// `cfg_type` of the capabilities.
pub const CAP_COMMON_CFG: u8 = 1;
pub const CAP_NOTIFY_CFG: u8 = 2;
pub const CAP_ISR_CFG: u8 = 3;
pub const CAP_DEVICE_CFG: u8 = 4;
pub const CAP_PCI_CFG: u8 = 5;

// Fields of the common configuration structure.
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0c;
pub const MSIX_CONFIG: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const CONFIG_GENERATION: u64 = 0x15;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const QUEUE_ENABLE: u64 = 0x1c;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;

/// A writable common-configuration field: offset, width, what a write does.
type CommonWrite<T> = (u64, usize, fn(&mut T, u64));

/// One `struct virtio_pci_cap` (16 bytes), with `extra` bytes after it.
fn cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[2] = u8::try_from(16 + extra.len()).unwrap_or(u8::MAX);
    c[3] = cfg_type;
    c[4] = BAR_INDEX;
    c[8..12].copy_from_slice(&u32::try_from(offset).unwrap_or(0).to_le_bytes());
    c[12..16].copy_from_slice(&u32::try_from(length).unwrap_or(0).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

/// Length of the notify structure for `num_queues` queues.
pub fn notify_len(num_queues: u16) -> u64 {
    u64::from(num_queues.max(1)) * u64::from(NOTIFY_MULTIPLIER)
}

/// The capabilities, in the order Linux and QEMU list them.
pub fn capabilities(num_queues: u16, config_len: usize) -> Vec<VendorCap> {
    let plain = |bytes: Vec<u8>| VendorCap {
        wmask: vec![0; bytes.len()],
        bytes,
        window: None,
    };
    let mut caps = vec![
        plain(cap(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN, &[])),
        plain(cap(
            CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            notify_len(num_queues),
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        )),
        plain(cap(CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, &[])),
    ];
    if config_len > 0 {
        caps.push(plain(cap(
            CAP_DEVICE_CFG,
            DEVICE_OFFSET,
            config_len as u64,
            &[],
        )));
    }
    // The PCI-config access window: the driver writes bar, offset and
    // length, then reads or writes pci_cfg_data (SeaBIOS uses it for a BAR
    // it placed above 4 GiB).
    let bytes = cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
    let mut wmask = vec![0u8; bytes.len()];
    wmask[4] = 0xff;
    wmask[8..20].fill(0xff);
    caps.push(VendorCap {
        bytes,
        wmask,
        window: Some(CapWindow {
            bar_at: 4,
            offset_at: 8,
            length_at: 12,
            data_at: 16,
        }),
    });
    caps
}

fn word(v: u64, sel: u32) -> u32 {
    match sel {
        0 => low32(v),
        1 => low32(v >> 32),
        _ => 0,
    }
}

/// The ring addresses of a queue, by the offset of their low half.
#[derive(Clone, Copy)]
enum Ring {
    Desc,
    Driver,
    Device,
}

fn ring_field(offset: u64) -> Option<(Ring, bool)> {
    let base = offset & !7;
    let high = offset & 4 != 0;
    let r = match base {
        QUEUE_DESC => Ring::Desc,
        QUEUE_DRIVER => Ring::Driver,
        QUEUE_DEVICE => Ring::Device,
        _ => return None,
    };
    Some((r, high))
}

impl<D: VirtioDevice> PciTransport<D> {
    /// RING_PACKED offered, accepted, and the acceptance checked
    /// (FEATURES_OK stuck): only then may queue sizes be any number.
    fn packed_negotiated(&self) -> bool {
        let bit = 1 << VIRTIO_F_RING_PACKED;
        self.status & FEATURES_OK != 0
            && self.driver_features & bit != 0
            && self.dev.features() & bit != 0
    }

    fn common_read(&mut self, offset: u64, width: usize) -> Option<u64> {
        let q = self.queues.get(usize::from(self.queue_sel)).copied();
        let v = match (offset, width) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => u64::from(word(self.dev.features(), self.device_feature_select)),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => {
                u64::from(word(self.driver_features, self.driver_feature_select))
            }
            (MSIX_CONFIG, 2) => u64::from(self.config_vector),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => {
                let nr = if self.config.needs_reset() {
                    NEEDS_RESET
                } else {
                    0
                };
                u64::from(self.status | nr)
            }
            (CONFIG_GENERATION, 1) => u64::from(self.config.generation() & 0xff),
            (QUEUE_SELECT, 2) => u64::from(self.queue_sel),
            (QUEUE_SIZE, 2) => q.map_or(0, |q| u64::from(q.size)),
            (QUEUE_MSIX_VECTOR, 2) => u64::from(q.map_or(NO_VECTOR, |q| q.vector)),
            (QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.enable)),
            (QUEUE_NOTIFY_OFF, 2) => u64::from(self.queue_sel),
            (o, w) if (w == 4 || (w == 8 && o.is_multiple_of(8))) && ring_field(o).is_some() => {
                let (ring, high) = ring_field(o)?;
                let a = q.map_or(0, |q| match ring {
                    Ring::Desc => q.desc,
                    Ring::Driver => q.avail,
                    Ring::Device => q.used,
                });
                match (w, high) {
                    (8, _) => a,
                    (_, false) => a & 0xffff_ffff,
                    (_, true) => a >> 32,
                }
            }
            _ => return None,
        };
        Some(v)
    }

    /// Whether the selected queue's set-up may still change.
    fn queue_settable(&self, what: &str) -> bool {
        let sel = self.queue_sel;
        let why = match self.queues.get(usize::from(sel)) {
            None => {
                crate::dev_debug!(
                    self.irqs.log(),
                    "{what} of queue {sel}, which does not exist; ignored"
                );
                return false;
            }
            Some(_) if self.active => "after DRIVER_OK",
            Some(q) if q.enable => "while it is enabled",
            Some(_) => return true,
        };
        crate::dev_log!(
            self.irqs.log(),
            Warn,
            "{what} of queue {sel} {why}; ignored"
        );
        false
    }

    fn write_modern_status(&mut self, v: u8) {
        if v == 0 {
            crate::dev_log!(self.irqs.log(), Info, "driver reset the device");
            self.reset_registers();
            return;
        }
        let mut s = v;
        if s & FEATURES_OK != 0 && self.status & FEATURES_OK == 0 {
            let offered = self.dev.features();
            let acked = self.driver_features;
            if acked & !offered != 0 {
                crate::dev_log!(
                    self.irqs.log(),
                    Warn,
                    "driver accepted features {:#x} that were not offered: FEATURES_OK refused",
                    acked & !offered
                );
                s &= !FEATURES_OK;
            } else if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
                crate::dev_log!(
                    self.irqs.log(),
                    Warn,
                    "driver did not accept VERSION_1 on the modern interface: FEATURES_OK refused"
                );
                s &= !FEATURES_OK;
            } else {
                self.dev.features_written(acked);
            }
        }
        if s & DRIVER_OK != 0 && s & FEATURES_OK == 0 && self.status & DRIVER_OK == 0 {
            crate::dev_log!(
                self.irqs.log(),
                Warn,
                "driver set DRIVER_OK without FEATURES_OK; not started"
            );
            s &= !DRIVER_OK;
        }
        self.write_status(s);
    }

    /// The common configuration's writable fields, each with its width
    /// and what a write of it does (the ring addresses are looked up by
    /// `ring_field`: 4 bytes at either half, or 8 at once).
    const COMMON_WRITES: [CommonWrite<Self>; 9] = [
        (DEVICE_FEATURE_SELECT, 4, |t, v| {
            t.device_feature_select = low32(v)
        }),
        (DRIVER_FEATURE_SELECT, 4, |t, v| {
            t.driver_feature_select = low32(v)
        }),
        (DRIVER_FEATURE, 4, |t, v| t.write_driver_features(low32(v))),
        (MSIX_CONFIG, 2, |t, v| t.set_config_vector(low16(v))),
        (DEVICE_STATUS, 1, |t, v| {
            t.write_modern_status(low16(v).to_le_bytes()[0])
        }),
        (QUEUE_SELECT, 2, |t, v| t.queue_sel = low16(v)),
        (QUEUE_SIZE, 2, |t, v| t.write_queue_size(low16(v))),
        (QUEUE_MSIX_VECTOR, 2, |t, v| t.set_queue_vector(low16(v))),
        (QUEUE_ENABLE, 2, |t, v| t.write_queue_enable(low16(v))),
    ];

    fn common_write(&mut self, offset: u64, width: usize, v: u64) -> bool {
        let field = Self::COMMON_WRITES
            .iter()
            .find(|(o, w, _)| (*o, *w) == (offset, width))
            .map(|f| f.2);
        let ring = if width == 4 || (width == 8 && offset.is_multiple_of(8)) {
            ring_field(offset)
        } else {
            None
        };
        if field.is_none() && ring.is_none() {
            return false;
        }
        // A reset is taken from either interface.
        if (offset, width) == (DEVICE_STATUS, 1) && v & 0xff == 0 {
            self.write_modern_status(0);
            return true;
        }
        if !self.claim(Interface::Modern) {
            return true;
        }
        match (field, ring) {
            (Some(write), _) => write(self, v),
            (None, Some((ring, high))) => self.write_ring_address(ring, high, width, v),
            (None, None) => {}
        }
        true
    }

    fn write_driver_features(&mut self, v32: u32) {
        if self.status & FEATURES_OK != 0 || self.active {
            crate::dev_log!(
                self.irqs.log(),
                Warn,
                "driver features written after FEATURES_OK; ignored"
            );
            return;
        }
        match self.driver_feature_select {
            0 => {
                self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32);
            }
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32);
            }
            s => crate::dev_debug!(
                self.irqs.log(),
                "driver features word {s} written; there is none"
            ),
        }
    }

    fn write_queue_size(&mut self, v16: u16) {
        if !self.queue_settable("size") {
            return;
        }
        let max = self.dev.queue_size();
        let shape_ok = v16.is_power_of_two() || self.packed_negotiated();
        if v16 == 0 || v16 > max || !shape_ok {
            crate::dev_log!(
                self.irqs.log(),
                Warn,
                "queue {} size {v16} refused (a power of two up to {max})",
                self.queue_sel
            );
        } else if let Some(q) = self.selected() {
            q.size = v16;
        }
    }

    fn write_queue_enable(&mut self, v16: u16) {
        if v16 != 1 {
            crate::dev_log!(
                self.irqs.log(),
                Warn,
                "queue_enable written with {v16} (only 1 enables a queue); ignored"
            );
            return;
        }
        if self.queue_settable("enable") {
            if let Some(q) = self.selected() {
                q.enable = true;
            }
        }
    }

    /// A ring address, whole (`width` 8) or one half (`high`: the upper).
    fn write_ring_address(&mut self, ring: Ring, high: bool, width: usize, v: u64) {
        if !self.queue_settable("ring address") {
            return;
        }
        let Some(q) = self.selected() else { return };
        let a = match ring {
            Ring::Desc => &mut q.desc,
            Ring::Driver => &mut q.avail,
            Ring::Device => &mut q.used,
        };
        let v32 = u64::from(low32(v));
        *a = match (width, high) {
            (8, _) => v,
            (_, false) => (*a & !0xffff_ffff) | v32,
            (_, true) => (*a & 0xffff_ffff) | (v32 << 32),
        };
    }

    /// A read of the modern BAR.
    pub(super) fn modern_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let n = data.len();
        if offset < COMMON_OFFSET + COMMON_LEN {
            match self.common_read(offset - COMMON_OFFSET, n) {
                Some(v) => data.copy_from_slice(&v.to_le_bytes()[..n.min(8)]),
                None => crate::dev_debug!(
                    self.irqs.log(),
                    "common config read of {n} bytes at {offset:#x}: no such field"
                ),
            }
        } else if (ISR_OFFSET..ISR_OFFSET + ISR_LEN).contains(&offset) {
            if offset == ISR_OFFSET {
                data[0] = self.read_isr();
            }
        } else if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&offset) {
            self.read_device_config(offset - DEVICE_OFFSET, data);
        }
    }

    /// A write to the modern BAR (posted by QEMU: nobody waits for it).
    pub(super) fn modern_write(&mut self, offset: u64, data: &[u8]) {
        let n = data.len();
        let mut b = [0u8; 8];
        b[..n.min(8)].copy_from_slice(&data[..n.min(8)]);
        let v = u64::from_le_bytes(b);
        if offset < COMMON_OFFSET + COMMON_LEN {
            if n > 8 || !self.common_write(offset - COMMON_OFFSET, n, v) {
                crate::dev_debug!(
                    self.irqs.log(),
                    "common config write of {n} bytes at {offset:#x}: no such field; ignored"
                );
            }
        } else if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&offset) {
            if self.claim(Interface::Modern) {
                self.write_device_config(offset - DEVICE_OFFSET, data);
            }
        } else if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_AREA).contains(&offset) {
            let rel = offset - NOTIFY_OFFSET;
            if rel.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) && n >= 2 {
                let q = u16::try_from(rel / u64::from(NOTIFY_MULTIPLIER)).unwrap_or(u16::MAX);
                if self.interface == Some(Interface::Modern) {
                    self.doorbell_messages += 1;
                    self.doorbell(q);
                } else {
                    crate::dev_debug!(
                        self.irqs.log(),
                        "modern doorbell of queue {q} while the driver uses {:?}; ignored",
                        self.interface
                    );
                }
            }
        } else {
            crate::dev_debug!(
                self.irqs.log(),
                "modern BAR write of {n} bytes at {offset:#x}: nothing there; ignored"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::legacy;
    use super::super::test_device::{transport, Transport, FEATURES};
    use super::*;
    use crate::pci::BarLogic;
    use crate::virtio::VirtioInterrupt;

    fn r(t: &mut Transport, off: u64, n: usize) -> u64 {
        let mut b = [0u8; 8];
        t.mem_read(off, &mut b[..n]);
        u64::from_le_bytes(b)
    }

    fn w(t: &mut Transport, off: u64, n: usize, v: u64) {
        t.mem_write(off, &v.to_le_bytes()[..n]);
    }

    fn status(t: &mut Transport) -> u8 {
        u8::try_from(r(t, DEVICE_STATUS, 1)).unwrap()
    }

    /// ACKNOWLEDGE | DRIVER, then the features, then FEATURES_OK; returns
    /// the status read back.
    fn negotiate(t: &mut Transport, features: u64) -> u8 {
        w(t, DEVICE_STATUS, 1, 0);
        w(t, DEVICE_STATUS, 1, 3);
        w(t, DRIVER_FEATURE_SELECT, 4, 0);
        w(t, DRIVER_FEATURE, 4, features & 0xffff_ffff);
        w(t, DRIVER_FEATURE_SELECT, 4, 1);
        w(t, DRIVER_FEATURE, 4, features >> 32);
        w(t, DEVICE_STATUS, 1, 3 | u64::from(FEATURES_OK));
        status(t)
    }

    #[test]
    fn capabilities_describe_the_bar() {
        let caps = capabilities(2, 60);
        let types: Vec<u8> = caps.iter().map(|c| c.bytes[3]).collect();
        assert_eq!(types, [1, 2, 3, 4, 5]);
        let notify = &caps[1].bytes;
        assert_eq!(notify[2], 20, "cap_len with the multiplier");
        assert_eq!(u32::from_le_bytes(notify[16..20].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(notify[12..16].try_into().unwrap()), 8);
        let device = &caps[3].bytes;
        assert_eq!(
            u32::from_le_bytes(device[8..12].try_into().unwrap()),
            0x2000
        );
        assert_eq!(u32::from_le_bytes(device[12..16].try_into().unwrap()), 60);
        assert!(caps[4].window.is_some() && caps[4].wmask[16..20] == [0xff; 4]);
        assert!(caps[..4].iter().all(|c| c.wmask.iter().all(|&m| m == 0)));
    }

    #[test]
    fn features_are_64_bits_and_features_ok_checks_them() {
        let (mut t, _irqs, probe) = transport();
        w(&mut t, DEVICE_FEATURE_SELECT, 4, 0);
        assert_eq!(r(&mut t, DEVICE_FEATURE, 4), FEATURES & 0xffff_ffff);
        w(&mut t, DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(r(&mut t, DEVICE_FEATURE, 4), 1, "VERSION_1");
        w(&mut t, DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(r(&mut t, DEVICE_FEATURE, 4), 0);
        // A feature that was not offered: FEATURES_OK does not stick.
        assert_eq!(negotiate(&mut t, FEATURES | 1 << 2) & FEATURES_OK, 0);
        // Without VERSION_1: refused as well.
        assert_eq!(negotiate(&mut t, 0b11) & FEATURES_OK, 0);
        assert!(probe.written.lock().unwrap().is_empty());
        // DRIVER_OK without FEATURES_OK starts nothing.
        w(&mut t, DEVICE_STATUS, 1, 7);
        assert_eq!(status(&mut t) & DRIVER_OK, 0);
        assert!(probe.activated.lock().unwrap().is_empty());
        // A subset with VERSION_1 is accepted, and read back as written.
        let want = (1 << 32) | 0b1;
        assert_eq!(negotiate(&mut t, want) & FEATURES_OK, FEATURES_OK);
        assert_eq!(*probe.written.lock().unwrap(), vec![want]);
        w(&mut t, DRIVER_FEATURE_SELECT, 4, 1);
        assert_eq!(r(&mut t, DRIVER_FEATURE, 4), 1);
        // Features are frozen after FEATURES_OK.
        w(&mut t, DRIVER_FEATURE_SELECT, 4, 0);
        w(&mut t, DRIVER_FEATURE, 4, 0b1011);
        assert_eq!(r(&mut t, DRIVER_FEATURE, 4), 1);
    }

    #[test]
    fn queues_take_three_addresses_a_size_and_enable() {
        let (mut t, _irqs, probe) = transport();
        assert_eq!(negotiate(&mut t, FEATURES) & FEATURES_OK, FEATURES_OK);
        assert_eq!(r(&mut t, NUM_QUEUES, 2), 2);
        w(&mut t, QUEUE_SELECT, 2, 1);
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 128, "the maximum until written");
        assert_eq!(r(&mut t, QUEUE_NOTIFY_OFF, 2), 1);
        // Not a power of two, zero, or above the maximum: refused.
        for bad in [100, 0, 256] {
            w(&mut t, QUEUE_SIZE, 2, bad);
            assert_eq!(r(&mut t, QUEUE_SIZE, 2), 128, "size {bad}");
        }
        w(&mut t, QUEUE_SIZE, 2, 64);
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 64);
        // Two halves, or one 64-bit access.
        w(&mut t, QUEUE_DESC, 4, 0x1234_5000);
        w(&mut t, QUEUE_DESC + 4, 4, 0x1);
        w(&mut t, QUEUE_DRIVER, 8, 0x2_0000_1000);
        w(&mut t, QUEUE_DEVICE, 4, 0x3000);
        assert_eq!(r(&mut t, QUEUE_DESC, 8), 0x1_1234_5000);
        assert_eq!(r(&mut t, QUEUE_DRIVER + 4, 4), 2);
        w(&mut t, QUEUE_MSIX_VECTOR, 2, 2);
        // MSI-X is off: the vector does not exist... with 3 vectors it does.
        assert_eq!(r(&mut t, QUEUE_MSIX_VECTOR, 2), 2);
        w(&mut t, QUEUE_ENABLE, 2, 1);
        assert_eq!(r(&mut t, QUEUE_ENABLE, 2), 1);
        // An enabled queue keeps its set-up.
        w(&mut t, QUEUE_SIZE, 2, 32);
        w(&mut t, QUEUE_DEVICE, 4, 0x9000);
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 64);
        assert_eq!(r(&mut t, QUEUE_DEVICE, 4), 0x3000);
        // Queue 0 stays disabled; an out-of-range select reads size 0.
        w(&mut t, QUEUE_SELECT, 2, 9);
        assert_eq!(r(&mut t, QUEUE_SIZE, 2), 0);
        w(&mut t, DEVICE_STATUS, 1, 0xf);
        let act = probe.activated.lock().unwrap();
        assert_eq!(act.len(), 1);
        assert_eq!(act[0].0, FEATURES);
        assert_eq!(act[0].1[0], None);
        let q = act[0].1[1].unwrap();
        assert_eq!(
            (q.size, q.desc, q.avail, q.used, q.vector),
            (64, 0x1_1234_5000, 0x2_0000_1000, 0x3000, 2)
        );
        drop(act);
        // Doorbells by address: queue 1's is at 4.
        w(&mut t, NOTIFY_OFFSET + 4, 2, 1);
        w(&mut t, NOTIFY_OFFSET + 2, 2, 1);
        w(&mut t, NOTIFY_OFFSET + 4 * 7, 2, 7);
        assert_eq!(*probe.notified.lock().unwrap(), vec![1]);
        // Reset: everything back to power-on.
        w(&mut t, DEVICE_STATUS, 1, 0);
        assert_eq!(*probe.resets.lock().unwrap(), 1);
        assert_eq!(status(&mut t), 0);
        w(&mut t, QUEUE_SELECT, 2, 1);
        assert_eq!(
            (r(&mut t, QUEUE_SIZE, 2), r(&mut t, QUEUE_ENABLE, 2)),
            (128, 0)
        );
        assert_eq!(r(&mut t, QUEUE_DESC, 8), 0);
    }

    #[test]
    fn generation_needs_reset_isr_and_device_config() {
        let (mut t, _irqs, _probe) = transport();
        assert_eq!(
            r(&mut t, DEVICE_OFFSET + 4, 4),
            u64::from_le_bytes([4, 5, 6, 7, 0, 0, 0, 0])
        );
        assert_eq!(
            r(&mut t, DEVICE_OFFSET + 58, 4),
            u64::from(u16::from_le_bytes([58, 59]))
        );
        let g = r(&mut t, CONFIG_GENERATION, 1);
        t.config_notifier().notify();
        assert_eq!(r(&mut t, CONFIG_GENERATION, 1), (g + 1) & 0xff);
        let irq = VirtioInterrupt::new(t.isr.clone(), t.irqs.clone(), t.config.clone());
        negotiate(&mut t, FEATURES);
        w(&mut t, DEVICE_STATUS, 1, 0xf);
        irq.device_needs_reset();
        assert_eq!(status(&mut t) & NEEDS_RESET, NEEDS_RESET);
        assert_eq!(r(&mut t, ISR_OFFSET, 1), 2, "config change raised");
        assert_eq!(r(&mut t, ISR_OFFSET, 1), 0, "read clears");
        w(&mut t, DEVICE_STATUS, 1, 0);
        assert_eq!(status(&mut t), 0, "a reset clears NEEDS_RESET");
    }

    #[test]
    fn the_first_interface_written_wins_until_reset() {
        let (mut t, _irqs, probe) = transport();
        // A modern driver: legacy writes are ignored, legacy reads show it.
        negotiate(&mut t, FEATURES);
        t.io_write(legacy::GUEST_FEATURES, &0u32.to_le_bytes());
        t.io_write(legacy::STATUS, &[7]);
        assert!(probe.activated.lock().unwrap().is_empty());
        let mut s = [0u8];
        t.io_read(legacy::STATUS, &mut s);
        assert_eq!(s[0], 3 | FEATURES_OK);
        // A reset through the legacy interface is honoured, and then the
        // legacy driver owns the device: modern writes are ignored.
        t.io_write(legacy::STATUS, &[0]);
        t.io_write(legacy::STATUS, &[1]);
        assert_eq!(negotiate_no_reset(&mut t), 1);
        t.io_write(legacy::GUEST_FEATURES, &0b11u32.to_le_bytes());
        t.io_write(legacy::QUEUE_PFN, &0x10u32.to_le_bytes());
        w(&mut t, NOTIFY_OFFSET, 2, 0);
        t.io_write(legacy::STATUS, &[7]);
        let act = probe.activated.lock().unwrap();
        assert_eq!(act.len(), 1);
        assert_eq!(act[0].0, 0b11, "legacy features, no VERSION_1");
        drop(act);
        w(&mut t, NOTIFY_OFFSET, 2, 0);
        assert!(
            probe.notified.lock().unwrap().is_empty(),
            "modern doorbell ignored"
        );
        t.io_write(legacy::QUEUE_NOTIFY, &0u16.to_le_bytes());
        assert_eq!(*probe.notified.lock().unwrap(), vec![0]);
    }

    /// Modern status writes without a reset first: what the status reads.
    fn negotiate_no_reset(t: &mut Transport) -> u8 {
        w(t, DEVICE_STATUS, 1, 3);
        status(t)
    }
}
