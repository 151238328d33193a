//! The virtio_blk_config block, laid out by virtio-bindings' struct.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::virtio_blk_config as Cfg;

use super::BlkOptions;

pub struct BlkConfig {
    bytes: Vec<u8>,
}

impl BlkConfig {
    pub fn new(o: &BlkOptions) -> BlkConfig {
        let mut c = BlkConfig {
            bytes: vec![0; size_of::<Cfg>()],
        };
        c.put(
            offset_of!(Cfg, capacity),
            &(o.capacity_bytes / 512).to_le_bytes(),
        );
        c.put(offset_of!(Cfg, seg_max), &o.seg_max.to_le_bytes());
        c.put(
            offset_of!(Cfg, blk_size),
            &o.logical_block_size.to_le_bytes(),
        );
        c.put(offset_of!(Cfg, num_queues), &o.num_queues.to_le_bytes());
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

    #[test]
    fn capacity_in_sectors() {
        let c = BlkConfig::new(&BlkOptions {
            capacity_bytes: 1 << 30,
            readonly: false,
            num_queues: 1,
            queue_size: 256,
            logical_block_size: 512,
            seg_max: 126,
        });
        assert_eq!(c.capacity_sectors(), 1 << 21);
        let mut b = [0u8; 4];
        c.read(offset_of!(Cfg, blk_size), &mut b);
        assert_eq!(u32::from_le_bytes(b), 512);
    }
}
