//! The virtio_blk_config block, laid out by virtio-bindings' struct.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::virtio_blk_config as Cfg;

use super::{BlkOptions, MAX_DWZ_SECTORS, MAX_DWZ_SEGS, SIZE_MAX};

pub struct BlkConfig {
    bytes: Vec<u8>,
}

impl BlkConfig {
    pub fn new(o: &BlkOptions) -> BlkConfig {
        let mut c = BlkConfig {
            bytes: vec![0; size_of::<Cfg>()],
        };
        let sectors = o.capacity_bytes / 512;
        c.put(offset_of!(Cfg, capacity), &sectors.to_le_bytes());
        c.put(offset_of!(Cfg, size_max), &SIZE_MAX.to_le_bytes());
        // Linux needs room for the header and status descriptors too.
        let seg_max = u32::from(o.queue_size).saturating_sub(2).max(1);
        c.put(offset_of!(Cfg, seg_max), &seg_max.to_le_bytes());
        // A nominal geometry (16 heads, 63 sectors); only used by old tools.
        let cyl = u16::try_from(sectors / (16 * 63)).unwrap_or(u16::MAX);
        let g = offset_of!(Cfg, geometry);
        c.put(g, &cyl.to_le_bytes());
        c.bytes[g + 2] = 16;
        c.bytes[g + 3] = 63;
        c.put(
            offset_of!(Cfg, blk_size),
            &o.logical_block_size.to_le_bytes(),
        );
        // Topology: one logical block per physical block, no offset, minimum
        // I/O one logical block.
        c.put(offset_of!(Cfg, min_io_size), &1u16.to_le_bytes());
        c.bytes[offset_of!(Cfg, wce)] = 1;
        c.put(offset_of!(Cfg, num_queues), &o.num_queues.to_le_bytes());
        let align = (o.logical_block_size / 512).max(1);
        c.put(
            offset_of!(Cfg, max_discard_sectors),
            &MAX_DWZ_SECTORS.to_le_bytes(),
        );
        c.put(
            offset_of!(Cfg, max_discard_seg),
            &MAX_DWZ_SEGS.to_le_bytes(),
        );
        c.put(
            offset_of!(Cfg, discard_sector_alignment),
            &align.to_le_bytes(),
        );
        c.put(
            offset_of!(Cfg, max_write_zeroes_sectors),
            &MAX_DWZ_SECTORS.to_le_bytes(),
        );
        c.put(
            offset_of!(Cfg, max_write_zeroes_seg),
            &MAX_DWZ_SEGS.to_le_bytes(),
        );
        c.bytes[offset_of!(Cfg, write_zeroes_may_unmap)] = 1;
        c
    }

    fn put(&mut self, off: usize, v: &[u8]) {
        self.bytes[off..off + v.len()].copy_from_slice(v);
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn capacity_sectors(&self) -> u64 {
        let o = offset_of!(Cfg, capacity);
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[o..o + 8]);
        u64::from_le_bytes(b)
    }

    /// The writeback byte (CONFIG_WCE).
    pub fn writeback(&self) -> bool {
        self.bytes[offset_of!(Cfg, wce)] != 0
    }

    /// Reads config bytes; the caller keeps `offset + data.len()` in range.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        data.copy_from_slice(&self.bytes[offset..offset + data.len()]);
    }

    /// Only the writeback byte is writable by the driver (with CONFIG_WCE).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let wce = offset_of!(Cfg, wce);
        for (i, &b) in data.iter().enumerate() {
            if offset + i == wce {
                self.bytes[wce] = u8::from(b != 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::exec::ErrorPolicy;

    #[test]
    fn config_fields() {
        let mut c = BlkConfig::new(&BlkOptions {
            capacity_bytes: 1 << 30,
            readonly: false,
            num_queues: 2,
            queue_size: 256,
            logical_block_size: 4096,
            serial: String::new(),
            discard: true,
            write_zeroes: true,
            on_error: ErrorPolicy::Report,
        });
        assert_eq!(c.capacity_sectors(), 1 << 21);
        let r32 = |c: &BlkConfig, o: usize| {
            let mut b = [0u8; 4];
            c.read(o, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(r32(&c, offset_of!(Cfg, blk_size)), 4096);
        assert_eq!(r32(&c, offset_of!(Cfg, seg_max)), 254);
        assert_eq!(r32(&c, offset_of!(Cfg, discard_sector_alignment)), 8);
        assert!(c.writeback());
        // Only the wce byte takes writes.
        c.write(0, &[0xff; 16]);
        assert_eq!(c.capacity_sectors(), 1 << 21);
        c.write(offset_of!(Cfg, wce), &[0]);
        assert!(!c.writeback());
    }
}
