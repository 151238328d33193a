//! virtio-blk: the device configuration block, the feature set, request
//! validation and execution. Knows virtio-blk, nothing of sockets.

pub mod config;
pub mod exec;
pub mod request;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::info;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::backend::io::Backend;
use crate::engine::{Activation, Active, Engine, Fence, QueueStats};
use crate::vfio_user::{DmaRange, GuestMemoryHandle};
use crate::virtio::{QueueConfig, VirtioDevice, VirtioInterrupt};
pub use config::BlkConfig;
use exec::{BlkContext, ErrorPolicy};

/// Options of a virtio-blk device.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    pub capacity_bytes: u64,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub serial: String,
    pub discard: bool,
    pub write_zeroes: bool,
    pub on_error: ErrorPolicy,
}

/// Largest segment (descriptor) we accept: SIZE_MAX.
pub const SIZE_MAX: u32 = 1 << 20;
/// Discard / write-zeroes limits advertised (and enforced).
pub const MAX_DWZ_SECTORS: u32 = 1 << 22;
pub const MAX_DWZ_SEGS: u32 = 32;

pub struct BlkDevice {
    /// For the log.
    name: String,
    opts: BlkOptions,
    config: BlkConfig,
    backend: Arc<dyn Backend>,
    memory: GuestMemoryHandle,
    engine: Arc<Engine>,
    /// The queues while the driver has the device running.
    active: Option<Active>,
    /// Per queue, kept across activations and clients.
    stats: Vec<Arc<QueueStats>>,
    acked: u32,
    write_through: Arc<AtomicBool>,
}

fn bit(b: u32) -> u32 {
    1 << b
}

impl BlkDevice {
    pub fn new(
        name: String,
        opts: BlkOptions,
        backend: Arc<dyn Backend>,
        memory: GuestMemoryHandle,
        engine: Arc<Engine>,
    ) -> BlkDevice {
        let config = BlkConfig::new(&opts);
        BlkDevice {
            stats: (0..opts.num_queues).map(|_| Arc::default()).collect(),
            name,
            opts,
            config,
            backend,
            memory,
            engine,
            active: None,
            acked: 0,
            write_through: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Writes must be durable before they complete unless the driver
    /// negotiated FLUSH and (with CONFIG_WCE) left the cache in writeback.
    fn update_write_through(&self) {
        let flush = self.acked & bit(VIRTIO_BLK_F_FLUSH) != 0;
        let wce_ctl = self.acked & bit(VIRTIO_BLK_F_CONFIG_WCE) != 0;
        let wt = !flush || (wce_ctl && !self.config.writeback());
        let was = self.write_through.swap(wt, Ordering::Relaxed);
        if was != wt && self.acked != 0 {
            info!(
                "write cache now {}",
                if wt { "write-through" } else { "writeback" }
            );
        }
    }
}

impl VirtioDevice for BlkDevice {
    fn features(&self) -> u32 {
        let mut f = bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX);
        if self.opts.readonly {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            if self.opts.discard {
                f |= bit(VIRTIO_BLK_F_DISCARD);
            }
            if self.opts.write_zeroes {
                f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
            }
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
        self.update_write_through();
    }

    fn activate(&mut self, features: u32, queues: Vec<Option<QueueConfig>>, irq: VirtioInterrupt) {
        if let Some(a) = self.active.take() {
            a.stop();
        }
        self.acked = features;
        self.config.set_features(features);
        self.update_write_through();
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let s = self.opts.serial.as_bytes();
        let n = s.len().min(serial.len());
        serial[..n].copy_from_slice(&s[..n]);
        let ctx = Arc::new(BlkContext {
            backend: self.backend.clone(),
            capacity: self.opts.capacity_bytes >> request::SECTOR_SHIFT,
            block: u64::from(self.opts.logical_block_size),
            readonly: self.opts.readonly,
            serial,
            discard: features & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: features & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            max_discard_sectors: MAX_DWZ_SECTORS,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS,
            max_dwz_segs: MAX_DWZ_SEGS,
            write_through: self.write_through.clone(),
            on_error: self.opts.on_error,
            limits: request::ChainLimits {
                max_descs: usize::try_from(config::seg_max(self.opts.queue_size))
                    .unwrap_or(usize::MAX)
                    .saturating_add(2),
                size_max: SIZE_MAX,
            },
            queue_size: self.opts.queue_size,
        });
        info!(
            "virtio-blk active: write cache {}, event idx {}, indirect {}",
            if self.write_through.load(Ordering::Relaxed) {
                "write-through"
            } else {
                "writeback"
            },
            features & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
            features & bit(VIRTIO_RING_F_INDIRECT_DESC) != 0,
        );
        self.active = Some(self.engine.activate(Activation {
            name: self.name.clone(),
            handler: ctx,
            memory: self.memory.clone(),
            queues,
            stats: self.stats.clone(),
            event_idx: features & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
            irq,
        }));
    }

    fn notify(&mut self, index: u16) {
        if let Some(a) = &self.active {
            a.notify(index);
        }
    }

    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            a.stop();
        }
        self.acked = 0;
        self.config = BlkConfig::new(&self.opts);
        self.update_write_through();
    }

    fn abandon(&mut self) {
        if let Some(a) = self.active.take() {
            a.abandon();
        }
    }

    fn quiesce(&mut self, range: Option<DmaRange>) {
        let Some(a) = &self.active else { return };
        match range {
            Some(r) if r.host_len > 0 => a.fence(Fence {
                guest: (r.iova, r.iova.saturating_add(r.size)),
                host: (r.host, r.host.saturating_add(r.host_len)),
            }),
            // A window the device could never reach: nothing uses it.
            Some(_) => {}
            None => a.pause_all(),
        }
    }

    fn resume(&mut self) {
        if let Some(a) = &self.active {
            a.resume();
        }
    }

    fn memory_added(&mut self) {
        if let Some(a) = &self.active {
            a.wake_all();
        }
    }

    fn features_written(&mut self, features: u32) {
        self.acked = features;
        self.config.set_features(features);
        self.update_write_through();
    }
}
