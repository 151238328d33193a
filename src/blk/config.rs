//! The virtio_blk_config block, laid out by virtio-bindings' struct.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config as Cfg, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH,
};

use super::{BlkOptions, MAX_DISCARD_SEGS, MAX_DWZ_SECTORS, MAX_WRITE_ZEROES_SEGS, SIZE_MAX};

/// SEG_MAX: data segments per request. Linux adds the header and status
/// descriptors to it, and a chain may not be longer than the queue.
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size).saturating_sub(2).max(1)
}

pub struct BlkConfig {
    bytes: Vec<u8>,
    /// Capacity in sectors, shared with whoever resizes the disk.
    capacity: Arc<AtomicU64>,
    /// The driver's features: `wce` reads 0 without FLUSH (no cache the
    /// driver could flush) and is writable only with CONFIG_WCE.
    features: u32,
}

impl BlkConfig {
    pub fn new(o: &BlkOptions) -> BlkConfig {
        let sectors = o.capacity_bytes / 512;
        let mut c = BlkConfig {
            bytes: vec![0; size_of::<Cfg>()],
            capacity: Arc::new(AtomicU64::new(sectors)),
            features: 0,
        };
        c.put(offset_of!(Cfg, size_max), &SIZE_MAX.to_le_bytes());
        c.put(
            offset_of!(Cfg, seg_max),
            &seg_max(o.queue_size).to_le_bytes(),
        );
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
        for (off, v) in [
            (offset_of!(Cfg, max_discard_sectors), MAX_DWZ_SECTORS),
            (offset_of!(Cfg, max_discard_seg), MAX_DISCARD_SEGS),
            (offset_of!(Cfg, discard_sector_alignment), align),
            (offset_of!(Cfg, max_write_zeroes_sectors), MAX_DWZ_SECTORS),
            (offset_of!(Cfg, max_write_zeroes_seg), MAX_WRITE_ZEROES_SEGS),
        ] {
            c.put(off, &v.to_le_bytes());
        }
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
        self.capacity.load(Ordering::Relaxed)
    }

    /// The capacity cell, for the request path and for resizing.
    pub fn capacity_cell(&self) -> Arc<AtomicU64> {
        self.capacity.clone()
    }

    /// Shares `cell` as the capacity (a reset keeps the disk's size).
    pub fn with_capacity_cell(mut self, cell: Arc<AtomicU64>) -> BlkConfig {
        self.capacity = cell;
        self
    }

    /// The driver's feature bits, as written so far.
    pub fn set_features(&mut self, features: u32) {
        self.features = features;
    }

    fn has(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    /// The writeback byte as the driver sees it: 0 unless FLUSH was
    /// negotiated (without FLUSH the device is write-through).
    pub fn writeback(&self) -> bool {
        self.has(VIRTIO_BLK_F_FLUSH) && self.bytes[offset_of!(Cfg, wce)] != 0
    }

    /// The writeback byte as stored (what the driver last wrote).
    pub fn wce_byte(&self) -> u8 {
        self.bytes[offset_of!(Cfg, wce)]
    }

    /// Puts back a stored writeback byte (0 or 1).
    pub fn set_wce_byte(&mut self, b: u8) -> Result<(), String> {
        if b > 1 {
            return Err(format!("writeback byte {b} is neither 0 nor 1"));
        }
        self.bytes[offset_of!(Cfg, wce)] = b;
        Ok(())
    }

    /// Reads config bytes; the caller keeps `offset + data.len()` in range.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        data.copy_from_slice(&self.bytes[offset..offset + data.len()]);
        let cap = offset_of!(Cfg, capacity);
        let bytes = self.capacity_sectors().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(k) = (offset + i).checked_sub(cap).filter(|&k| k < 8) {
                *b = bytes[k];
            }
        }
        let wce = offset_of!(Cfg, wce);
        if (offset..offset + data.len()).contains(&wce) {
            data[wce - offset] = u8::from(self.writeback());
        }
    }

    /// Only the writeback byte is writable by the driver, and only once it
    /// negotiated CONFIG_WCE.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if !self.has(VIRTIO_BLK_F_CONFIG_WCE) {
            return;
        }
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
            packed: false,
            on_error: ErrorPolicy::Report,
            in_memory: false,
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
        let wce = offset_of!(Cfg, wce);
        let read_wce = |c: &BlkConfig| {
            let mut b = [9u8; 3];
            c.read(wce - 1, &mut b);
            b[1]
        };
        // Regression (issue 8, item 7): without FLUSH there is no cache the
        // driver could manage: wce reads 0, and without CONFIG_WCE it
        // cannot be written.
        assert_eq!(read_wce(&c), 0);
        assert!(!c.writeback());
        c.set_features(1 << VIRTIO_BLK_F_FLUSH);
        assert_eq!(read_wce(&c), 1);
        c.write(wce, &[0]);
        assert!(c.writeback(), "not writable without CONFIG_WCE");
        c.set_features((1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_CONFIG_WCE));
        // Only the wce byte takes writes.
        c.write(0, &[0xff; 16]);
        assert_eq!(c.capacity_sectors(), 1 << 21);
        c.write(wce, &[0]);
        assert!(!c.writeback());
        assert_eq!(read_wce(&c), 0);
    }
}
