//! Type-0 PCI configuration space with per-byte writable masks.
//!
//! Writes of any width at any offset are applied byte by byte through the
//! mask, so an access that straddles registers behaves as the sum of its
//! bytes, and read-only bytes silently keep their value (as hardware does).
//! BAR registers keep their type bits and the address bits above their size,
//! which is exactly how hardware answers both the all-ones sizing probe and
//! the address-mask-only probe some guests use.

pub const CONFIG_SIZE: usize = 256;

// Standard header offsets.
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG: usize = 0x09;
pub const CACHE_LINE: usize = 0x0c;
pub const LATENCY: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYS_VENDOR: usize = 0x2c;
pub const SUBSYS_ID: usize = 0x2e;
pub const ROM_BAR: usize = 0x30;
pub const CAP_PTR: usize = 0x34;
pub const INT_LINE: usize = 0x3c;
pub const INT_PIN: usize = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAP_LIST: u16 = 1 << 4;

pub const CAP_ID_MSIX: u8 = 0x11;
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Where the vendor-specific capabilities start (after MSI-X's 12 bytes).
const VENDOR_CAPS_START: usize = 0x50;
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// A BAR as the function declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    /// 64-bit prefetchable memory: takes this BAR and the next (upper half).
    Mem64Prefetch,
}

/// A vendor-specific capability: its bytes from the capability ID on
/// (ID and next pointer are filled in when it is placed), which of them the
/// driver may write, and whether it is a window into the BARs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorCap {
    pub bytes: Vec<u8>,
    pub wmask: Vec<u8>,
    pub window: Option<CapWindow>,
}

/// A capability through which config accesses reach a BAR: offsets, inside
/// the capability, of the BAR number (1 byte), the offset and the length
/// (4 bytes each) the driver writes, and the 4 data bytes it reads or
/// writes to make the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapWindow {
    pub bar_at: usize,
    pub offset_at: usize,
    pub length_at: usize,
    pub data_at: usize,
}

/// PCI identity of the function.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub vendor: u16,
    pub device: u16,
    pub subsys_vendor: u16,
    pub subsys_id: u16,
    pub revision: u8,
    /// class, subclass, prog-if
    pub class: [u8; 3],
}

/// Identity and layout of a function's config space.
#[derive(Clone, Debug)]
pub struct ConfigLayout {
    pub id: Identity,
    pub int_pin: u8,
    /// (kind, size) for BAR0..BAR5, None where there is none (and after a
    /// 64-bit BAR); sizes are powers of two.
    pub bars: Vec<Option<(BarKind, u64)>>,
    /// MSI-X: (config offset, table size, table BIR/offset word, PBA BIR/offset word)
    pub msix: Option<MsixCap>,
    /// Listed after MSI-X, in this order.
    pub vendor_caps: Vec<VendorCap>,
}

#[derive(Clone, Copy, Debug)]
pub struct MsixCap {
    pub offset: usize,
    pub vectors: u16,
    pub table: u32,
    pub pba: u32,
}

pub struct ConfigSpace {
    data: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    power_on: [u8; CONFIG_SIZE],
    msix_offset: Option<usize>,
    vendor_offsets: Vec<usize>,
}

/// What a config write changed that the function must act on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigEffects {
    pub msix_control_changed: bool,
    pub command_changed: bool,
}

impl ConfigSpace {
    pub fn new(l: &ConfigLayout) -> ConfigSpace {
        let mut c = ConfigSpace {
            data: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            power_on: [0; CONFIG_SIZE],
            msix_offset: None,
            vendor_offsets: Vec::new(),
        };
        let id = &l.id;
        c.put16(VENDOR_ID, id.vendor);
        c.put16(DEVICE_ID, id.device);
        c.data[REVISION] = id.revision;
        c.data[CLASS_PROG] = id.class[2];
        c.data[CLASS_PROG + 1] = id.class[1];
        c.data[CLASS_PROG + 2] = id.class[0];
        c.data[HEADER_TYPE] = 0;
        c.put16(SUBSYS_VENDOR, id.subsys_vendor);
        c.put16(SUBSYS_ID, id.subsys_id);
        c.data[INT_PIN] = l.int_pin;
        let cmd_mask = COMMAND_IO
            | COMMAND_MEMORY
            | COMMAND_BUS_MASTER
            | COMMAND_PARITY
            | COMMAND_SERR
            | COMMAND_INTX_DISABLE;
        c.mask16(COMMAND, cmd_mask);
        c.wmask[CACHE_LINE] = 0xff;
        c.wmask[LATENCY] = 0xff;
        c.wmask[INT_LINE] = 0xff;
        c.lay_out_bars(&l.bars);
        // The expansion ROM register stays 0: no ROM, and a sizing write
        // reads back 0, which QEMU takes as "no ROM".
        let chain = c.place_capabilities(l);
        if let Some(&first) = chain.first() {
            c.put16(STATUS, STATUS_CAP_LIST);
            c.data[CAP_PTR] = u8::try_from(first).expect("capability inside config space");
        }
        for pair in chain.windows(2) {
            c.data[pair[0] + 1] = u8::try_from(pair[1]).expect("capability inside config space");
        }
        if let Some(&last) = chain.last() {
            c.data[last + 1] = 0;
        }
        c.power_on = c.data;
        c
    }

    /// Each BAR's type bits, and the mask that makes a sizing write read
    /// back its size.
    fn lay_out_bars(&mut self, bars: &[Option<(BarKind, u64)>]) {
        for (i, bar) in bars.iter().enumerate().take(6) {
            let Some((kind, size)) = *bar else { continue };
            assert!(size.is_power_of_two(), "BAR sizes are powers of two");
            let off = BAR0 + 4 * i;
            let (type_bits, min) = match kind {
                BarKind::Io => (0x1u32, 4u64),
                BarKind::Mem32 => (0x0u32, 16u64),
                // Type 0b10 (64-bit) in bits 1-2, prefetchable in bit 3.
                BarKind::Mem64Prefetch => (0xcu32, 16u64),
            };
            let mask = !(size.max(min) - 1);
            self.put32(off, type_bits);
            self.mask32(off, u32::try_from(mask & 0xffff_ffff).unwrap_or(0));
            if kind == BarKind::Mem64Prefetch {
                assert!(
                    i < 5 && bars[i + 1].is_none(),
                    "a 64-bit BAR takes two slots"
                );
                self.mask32(off + 4, u32::try_from(mask >> 32).unwrap_or(0));
            }
        }
    }

    /// Writes MSI-X and the vendor capabilities: their offsets, in the
    /// order the capability list links them.
    fn place_capabilities(&mut self, l: &ConfigLayout) -> Vec<usize> {
        let mut chain: Vec<usize> = Vec::new();
        if let Some(m) = l.msix {
            self.data[m.offset] = CAP_ID_MSIX;
            self.put16(m.offset + 2, m.vectors - 1);
            self.mask16(m.offset + 2, MSIX_ENABLE | MSIX_FUNCTION_MASK);
            self.put32(m.offset + 4, m.table);
            self.put32(m.offset + 8, m.pba);
            self.msix_offset = Some(m.offset);
            chain.push(m.offset);
        }
        let mut at = VENDOR_CAPS_START;
        for v in &l.vendor_caps {
            assert!(v.bytes.len() >= 3 && v.wmask.len() == v.bytes.len());
            assert!(
                at + v.bytes.len() <= CONFIG_SIZE,
                "capabilities fit in config space"
            );
            self.data[at..at + v.bytes.len()].copy_from_slice(&v.bytes);
            self.wmask[at..at + v.bytes.len()].copy_from_slice(&v.wmask);
            self.data[at] = CAP_ID_VENDOR;
            self.wmask[at] = 0;
            self.wmask[at + 1] = 0;
            self.vendor_offsets.push(at);
            chain.push(at);
            at = (at + v.bytes.len()).div_ceil(4) * 4;
        }
        chain
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.data[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(&mut self, off: usize, v: u32) {
        self.data[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn mask16(&mut self, off: usize, m: u16) {
        self.wmask[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }
    fn mask32(&mut self, off: usize, m: u32) {
        self.wmask[off..off + 4].copy_from_slice(&m.to_le_bytes());
    }

    /// Config offsets of the vendor-specific capabilities, in layout order.
    pub fn vendor_cap_offsets(&self) -> &[usize] {
        &self.vendor_offsets
    }

    pub fn byte(&self, off: usize) -> u8 {
        self.data[off]
    }

    /// Sets bytes whatever their mask (the function's own state, e.g. the
    /// data of a window read).
    pub fn set_bytes(&mut self, off: usize, v: &[u8]) {
        self.data[off..off + v.len()].copy_from_slice(v);
    }

    pub fn read16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.data[off], self.data[off + 1]])
    }

    pub fn read32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.data[off],
            self.data[off + 1],
            self.data[off + 2],
            self.data[off + 3],
        ])
    }

    pub fn command(&self) -> u16 {
        self.read16(COMMAND)
    }

    /// (enable, function mask) of the MSI-X control register.
    pub fn msix_control(&self) -> (bool, bool) {
        match self.msix_offset {
            Some(o) => {
                let ctl = self.read16(o + 2);
                (ctl & MSIX_ENABLE != 0, ctl & MSIX_FUNCTION_MASK != 0)
            }
            None => (false, false),
        }
    }

    /// Reads any bytes of config space; the caller has bounds-checked.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.data[offset..offset + out.len()]);
    }

    /// Writes any bytes through the writable masks; the caller has
    /// bounds-checked.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> ConfigEffects {
        let before_cmd = self.command();
        let before_msix = self.msix_control();
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i;
            let m = self.wmask[o];
            self.data[o] = (self.data[o] & !m) | (b & m);
        }
        ConfigEffects {
            msix_control_changed: self.msix_control() != before_msix,
            command_changed: self.command() != before_cmd,
        }
    }

    /// Back to the power-on values.
    pub fn reset(&mut self) {
        self.data = self.power_on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> ConfigLayout {
        ConfigLayout {
            id: crate::device::VIRTIO_BLK_IDENTITY,
            int_pin: 1,
            bars: vec![
                Some((BarKind::Io, 0x80)),
                Some((BarKind::Mem32, 0x1000)),
                None,
                None,
                Some((BarKind::Mem64Prefetch, 0x4000)),
                None,
            ],
            msix: Some(MsixCap {
                offset: 0x40,
                vectors: 2,
                table: 1,
                pba: 0x801,
            }),
            vendor_caps: vec![
                VendorCap {
                    bytes: vec![0, 0, 4, 7],
                    wmask: vec![0, 0, 0, 0xff],
                    window: None,
                },
                VendorCap {
                    bytes: vec![0, 0, 5, 1, 2],
                    wmask: vec![0xff; 5],
                    window: None,
                },
            ],
        }
    }

    #[test]
    fn identity_and_caps() {
        let c = ConfigSpace::new(&layout());
        assert_eq!(c.read32(0), 0x1001_1af4);
        assert_eq!(c.read32(0x08) >> 8, 0x010000);
        assert_eq!(c.read32(0x2c), 0x0002_1af4);
        assert_eq!(c.data[CAP_PTR], 0x40);
        assert_eq!(c.read16(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        assert_eq!(c.read16(0x42), 1);
        assert_eq!(c.data[INT_PIN], 1);
        // MSI-X first, then the vendor capabilities, chained.
        assert_eq!(c.data[0x41], 0x50);
        assert_eq!(c.vendor_cap_offsets(), &[0x50, 0x54]);
        assert_eq!(&c.data[0x50..0x54], &[CAP_ID_VENDOR, 0x54, 4, 7]);
        assert_eq!(&c.data[0x54..0x59], &[CAP_ID_VENDOR, 0, 5, 1, 2]);
    }

    #[test]
    fn vendor_caps_keep_their_masks() {
        let mut c = ConfigSpace::new(&layout());
        // ID, next and length are read-only; the masked bytes move.
        c.write(0x50, &[0xff; 4]);
        assert_eq!(&c.data[0x50..0x54], &[CAP_ID_VENDOR, 0x54, 4, 0xff]);
        c.write(0x54, &[0xee; 5]);
        assert_eq!(&c.data[0x54..0x59], &[CAP_ID_VENDOR, 0, 0xee, 0xee, 0xee]);
        c.reset();
        assert_eq!(c.data[0x53], 7);
    }

    #[test]
    fn bar_probes() {
        let mut c = ConfigSpace::new(&layout());
        c.write(0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read32(0x10), 0xffff_ff81);
        c.write(0x14, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read32(0x14), 0xffff_f000);
        // Address-mask-only probe of a memory BAR.
        c.write(0x14, &0xffff_fff0u32.to_le_bytes());
        assert_eq!(c.read32(0x14), 0xffff_f000);
        c.write(0x14, &0xfebf_1000u32.to_le_bytes());
        assert_eq!(c.read32(0x14), 0xfebf_1000);
        // The 64-bit BAR: type bits 0b1100, both halves sized.
        assert_eq!(c.read32(0x20), 0xc);
        c.write(0x20, &0xffff_ffffu32.to_le_bytes());
        c.write(0x24, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read32(0x20), 0xffff_c00c);
        assert_eq!(c.read32(0x24), 0xffff_ffff);
        c.write(0x24, &0x0000_0080u32.to_le_bytes());
        assert_eq!(c.read32(0x24), 0x80, "placed above 4 GiB");
        // Unused BARs and the ROM BAR read 0 whatever is written.
        for off in [0x18, 0x1c, 0x30] {
            c.write(off, &0xffff_ffffu32.to_le_bytes());
            assert_eq!(c.read32(off), 0, "offset {off:#x}");
        }
    }

    #[test]
    fn straddling_write_and_masks() {
        let mut c = ConfigSpace::new(&layout());
        // 4 bytes at 0x04: command (writable bits only) + status (read-only).
        let fx = c.write(0x04, &0xffff_ffffu32.to_le_bytes());
        assert!(fx.command_changed);
        assert_eq!(c.command(), 0x0547);
        assert_eq!(c.read16(STATUS), STATUS_CAP_LIST);
        // Vendor/device are read-only.
        c.write(0x00, &[0, 0, 0, 0]);
        assert_eq!(c.read32(0), 0x1001_1af4);
        // A write straddling the MSI-X control: only enable/mask bits move.
        let fx = c.write(0x41, &[0xff, 0xff, 0xff]);
        assert!(fx.msix_control_changed);
        assert_eq!(c.read16(0x42), 0xc001);
        assert_eq!(c.msix_control(), (true, true));
        assert_eq!(c.data[0x41], 0x50, "the next pointer is read-only");
        c.reset();
        assert_eq!(c.msix_control(), (false, false));
        assert_eq!(c.command(), 0);
    }
}
