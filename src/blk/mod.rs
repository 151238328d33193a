//! virtio-blk: the device configuration block, the feature set, and (with
//! the engine) request handling. Knows virtio-blk, nothing of sockets.

pub mod config;

use log::warn;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};

use crate::virtio::{QueueConfig, VirtioDevice, VirtioInterrupt};
pub use config::BlkConfig;

/// Options of a virtio-blk device.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    pub capacity_bytes: u64,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub seg_max: u32,
}

pub struct BlkDevice {
    opts: BlkOptions,
    config: BlkConfig,
}

impl BlkDevice {
    pub fn new(opts: BlkOptions) -> BlkDevice {
        let config = BlkConfig::new(&opts);
        BlkDevice { opts, config }
    }
}

impl VirtioDevice for BlkDevice {
    fn features(&self) -> u32 {
        let mut f = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.opts.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn num_queues(&self) -> u16 {
        self.opts.num_queues
    }

    fn queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn config_len(&self) -> usize {
        self.config.len()
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn activate(
        &mut self,
        _features: u32,
        _queues: Vec<Option<QueueConfig>>,
        _irq: VirtioInterrupt,
    ) {
        warn!("request processing is not implemented in this build: queues are not served");
    }

    fn notify(&mut self, _index: u16) {}

    fn reset(&mut self) {
        self.config = BlkConfig::new(&self.opts);
    }

    fn quiesce(&mut self) {}

    fn resume(&mut self) {}
}
