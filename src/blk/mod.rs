//! virtio-blk: the device configuration block, the feature set, request
//! validation and execution. Knows virtio-blk, nothing of sockets.

pub mod config;
pub mod exec;
pub mod request;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::info;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::{
    VIRTIO_F_ANY_LAYOUT, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::backend::io::Backend;
use crate::engine::{DeviceQueues, Engine, HoldError, QueueHold, QueueStats, Start};
use crate::events::Event;
use crate::memory::{GuestMemoryHandle, MemoryChange};
use crate::util::DeviceLog;
use crate::virtio::{low32, ConfigNotifier, DriverReady, VirtioDevice};
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
    /// Offer the packed ring (modern interface only).
    pub packed: bool,
    pub on_error: ErrorPolicy,
    /// The disk lives in the server's memory (`ram:`).
    pub in_memory: bool,
}

/// The largest disk a resize may ask for (64 PiB).
const MAX_DISK_BYTES: u64 = 1 << 56;

/// Largest segment (descriptor) we accept: SIZE_MAX.
pub const SIZE_MAX: u32 = 1 << 20;
/// Discard / write-zeroes limits advertised (and enforced).
pub const MAX_DWZ_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEGS: u32 = 32;
/// One range per write-zeroes request (as QEMU and Linux's own driver): the
/// zeros one request asks for are bounded by MAX_DWZ_SECTORS.
pub const MAX_WRITE_ZEROES_SEGS: u32 = 1;

pub struct BlkDevice {
    /// The device's log (its name, its limit on guest-caused lines).
    log: Arc<DeviceLog>,
    opts: BlkOptions,
    config: BlkConfig,
    backend: Arc<dyn Backend>,
    /// The engine's side: activations, fences, doorbells.
    queues: DeviceQueues,
    acked: u32,
    write_through: Arc<AtomicBool>,
    shared: Arc<BlkShared>,
}

/// What the management plane reads and changes of a running device, from
/// its own thread: statistics, capacity (resize), negotiated features.
pub struct BlkShared {
    /// Per queue, kept across activations and clients.
    pub stats: Vec<Arc<QueueStats>>,
    /// The device's limits (operations and bytes per second).
    pub qos: Arc<crate::engine::Qos>,
    /// Capacity in 512-byte sectors.
    capacity: Arc<AtomicU64>,
    /// Feature bits the driver acknowledged (0 when none is attached).
    features: AtomicU64,
    /// The driver set DRIVER_OK and has not reset since.
    running: AtomicBool,
    backend: Arc<dyn Backend>,
    block: u32,
    readonly: bool,
    /// A `ram:` disk: its size is the server's memory.
    in_memory: bool,
    /// Raises the configuration-change interrupt.
    config_notifier: parking_lot::Mutex<Option<Arc<ConfigNotifier>>>,
    /// Holds the queues still during a resize (one at a time).
    hold: Arc<QueueHold>,
    log: Arc<DeviceLog>,
}

/// Names of the virtio-blk and ring feature bits, for logs and the
/// management plane.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    const NAMES: [(u32, &str); 17] = [
        (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
        (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
        (VIRTIO_BLK_F_RO, "RO"),
        (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (VIRTIO_BLK_F_MQ, "MQ"),
        (VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        (VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (VIRTIO_F_NOTIFY_ON_EMPTY, "NOTIFY_ON_EMPTY"),
        (VIRTIO_F_ANY_LAYOUT, "ANY_LAYOUT"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_F_RING_PACKED, "RING_PACKED"),
    ];
    NAMES
        .iter()
        .filter(|(b, _)| bits & (1u64 << *b) != 0)
        .map(|(_, n)| *n)
        .collect()
}

impl BlkShared {
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed) << request::SECTOR_SHIFT
    }

    pub fn features(&self) -> u64 {
        self.features.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    pub fn set_config_notifier(&self, n: Arc<ConfigNotifier>) {
        *self.config_notifier.lock() = Some(n);
    }

    /// Makes completed writes durable (graceful shutdown).
    /// See `Backend::hand_off` and `Backend::take_back`.
    pub fn hand_off(&self, off: bool) -> std::io::Result<()> {
        if off {
            self.backend.hand_off()
        } else {
            self.backend.take_back()
        }
    }

    /// The open file a live upgrade hands over (see `Backend::handover_fd`).
    pub fn handover_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.backend.handover_fd()
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.backend.flush()
    }

    /// Resizes the disk to `size` bytes (None: re-read a block device's
    /// size). Shrinking needs `allow_shrink`: data past the new end is lost.
    /// The guest is told with the configuration-change interrupt.
    pub fn resize(&self, size: Option<u64>, allow_shrink: bool) -> Result<u64, ResizeError> {
        // One resize at a time, and the size checks below hold against the
        // size this resize starts from (two grows at once must not let the
        // later one shrink without `allow_shrink`).
        // A second resize does not queue behind the first (which may wait
        // up to RESIZE_WAIT for a stuck disk): it is refused at once.
        let one = self
            .hold
            .change(std::time::Duration::from_millis(200))
            .map_err(ResizeError::from)?;
        if let Some(s) = size {
            self.check_new_size(s, allow_shrink)?;
        }
        // No request may be in flight while the size changes: one checked
        // against the old size would write past a new, smaller end, and the
        // size read back must be the one the disk has. Nor may a write of a
        // client that left (the file would grow back). The queues go on
        // when `paused` drops, on every way out of here.
        let paused = one.pause_within(RESIZE_WAIT).map_err(ResizeError::from)?;
        let read = self.backend.resize(size).map_err(ResizeError::Backend)?;
        // A disk resized elsewhere to a size that is not whole blocks: the
        // guest gets the whole blocks (a request past the disk's end must
        // never reach it), and the log says what is left out.
        let new = read - read % u64::from(self.block);
        if new == 0 {
            return Err(ResizeError::Unaligned {
                size: read,
                block: self.block,
            });
        }
        if new != read {
            log::warn!(
                "{}: the disk is {read} bytes, not whole {}-byte blocks: its last {} bytes \
                 are not served",
                self.log.name(),
                self.block,
                read - new
            );
        }
        let changed = self.store_capacity(new);
        drop(paused);
        if let Some(notifier) = changed {
            notifier.notify();
        }
        Ok(new)
    }

    /// The disk's size became `size` outside the target (an RBD image
    /// resized by another client): the guest is told as after a resize of
    /// ours. Called on a thread of the backend's, which may wait.
    pub fn resized_outside(&self, size: u64) {
        for _ in 0..50 {
            if size == self.capacity_bytes() {
                return;
            }
            match self.resize(None, true) {
                Ok(_) => return,
                // Our own resize, under way, is what the backend saw.
                Err(ResizeError::Busy) => std::thread::sleep(std::time::Duration::from_millis(100)),
                Err(e) => {
                    log::warn!(
                        "{}: the disk became {size} bytes outside the target, and the \
                         device could not follow: {e}",
                        self.log.name()
                    );
                    return;
                }
            }
        }
    }

    /// What a resize to `s` bytes must satisfy before anything stops.
    fn check_new_size(&self, s: u64, allow_shrink: bool) -> Result<(), ResizeError> {
        if self.readonly {
            return Err(ResizeError::ReadOnly);
        }
        if s == 0 || !s.is_multiple_of(u64::from(self.block)) {
            return Err(ResizeError::NotBlocks {
                size: s,
                block: self.block,
            });
        }
        let now = self.capacity_bytes();
        if s < now && !allow_shrink {
            return Err(ResizeError::Shrink { size: s, now });
        }
        if s > MAX_DISK_BYTES {
            return Err(ResizeError::TooLarge(s));
        }
        if self.in_memory && s > crate::util::memory_bytes() {
            return Err(ResizeError::MoreThanMemory(crate::util::memory_bytes()));
        }
        Ok(())
    }

    /// Makes `new` bytes the disk's size the driver reads. When it
    /// changed: the notifier to tell the driver with, once the queues go on.
    fn store_capacity(&self, new: u64) -> Option<Arc<ConfigNotifier>> {
        let old = self.capacity_bytes();
        let notifier = self.config_notifier.lock().clone();
        let store = || {
            self.capacity
                .store(new >> request::SECTOR_SHIFT, Ordering::Relaxed);
        };
        match &notifier {
            Some(n) if new != old => n.change(store),
            _ => store(),
        }
        if new == old {
            return None;
        }
        info!(
            "{}: disk resized from {old} to {new} bytes",
            self.log.name()
        );
        self.log.event(Event::Resized { size: new });
        notifier
    }
}

/// Why a disk was not resized.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("another resize of this device is in progress; not resized")]
    Busy,
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("size {size} is not a positive multiple of the logical block size {block}")]
    NotBlocks { size: u64, block: u32 },
    #[error("{size} bytes is smaller than the disk ({now} bytes); give shrink=true to cut it")]
    Shrink { size: u64, now: u64 },
    #[error("size {0} is more than {MAX_DISK_BYTES} bytes")]
    TooLarge(u64),
    #[error("a disk in memory cannot be larger than this machine's memory ({0} bytes)")]
    MoreThanMemory(u64),
    #[error(
        "requests of the device are still in the backend after {RESIZE_WAIT:?} \
         (a disk that stopped answering?); not resized"
    )]
    Stuck,
    #[error(
        "writes of the client that left are still in the backend after {RESIZE_WAIT:?} \
         (a disk that stopped answering?); not resized"
    )]
    DepartedStuck,
    #[error("{0}")]
    Backend(std::io::Error),
    #[error("the disk is now {size} bytes, less than one block of {block}")]
    Unaligned { size: u64, block: u32 },
}

/// How long a resize waits for the device's requests in flight to drain
/// (and for a resize of the same device before it): the management plane
/// never waits on a stuck disk without a bound.
pub const RESIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl From<HoldError> for ResizeError {
    fn from(e: HoldError) -> ResizeError {
        match e {
            HoldError::Busy => ResizeError::Busy,
            HoldError::Stuck => ResizeError::Stuck,
            HoldError::DepartedStuck => ResizeError::DepartedStuck,
        }
    }
}

fn bit(b: u32) -> u32 {
    1 << b
}

impl BlkDevice {
    pub fn new(
        log: Arc<DeviceLog>,
        opts: BlkOptions,
        backend: Arc<dyn Backend>,
        memory: GuestMemoryHandle,
        engine: Arc<Engine>,
    ) -> BlkDevice {
        let config = BlkConfig::new(&opts);
        let queues = DeviceQueues::new(engine, memory, log.clone(), opts.num_queues);
        let shared = Arc::new(BlkShared {
            stats: queues.stats().to_vec(),
            qos: queues.qos().clone(),
            capacity: config.capacity_cell(),
            features: AtomicU64::new(0),
            running: AtomicBool::new(false),
            backend: backend.clone(),
            block: opts.logical_block_size,
            readonly: opts.readonly,
            in_memory: opts.in_memory,
            config_notifier: parking_lot::Mutex::new(None),
            hold: queues.hold(),
            log: log.clone(),
        });
        BlkDevice {
            shared,
            log,
            opts,
            config,
            backend,
            queues,
            acked: 0,
            write_through: Arc::new(AtomicBool::new(true)),
        }
    }

    /// What the management plane sees of this device.
    pub fn shared(&self) -> Arc<BlkShared> {
        self.shared.clone()
    }

    /// Writes must be durable before they complete unless the driver
    /// negotiated FLUSH and (with CONFIG_WCE) left the cache in writeback.
    fn update_write_through(&self) {
        let flush = self.acked & bit(VIRTIO_BLK_F_FLUSH) != 0;
        let wce_ctl = self.acked & bit(VIRTIO_BLK_F_CONFIG_WCE) != 0;
        let wt = !flush || (wce_ctl && !self.config.writeback());
        let was = self.write_through.swap(wt, Ordering::Relaxed);
        if was != wt && self.acked != 0 {
            crate::dev_log!(
                self.log,
                Info,
                "write cache now {}",
                if wt { "write-through" } else { "writeback" }
            );
        }
    }
}

impl VirtioDevice for BlkDevice {
    fn features(&self) -> u64 {
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
        // The modern interface adds VERSION_1 (and the packed ring when
        // asked for); the legacy one never shows bits above 31.
        let mut f = u64::from(f) | (1u64 << VIRTIO_F_VERSION_1);
        if self.opts.packed {
            f |= 1u64 << VIRTIO_F_RING_PACKED;
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

    fn activate(&mut self, ready: DriverReady) {
        let DriverReady {
            features,
            queues,
            irq,
            polled,
        } = ready;
        // A resize under way holds the queues it found; this activation
        // shows itself once it has ended, so that none runs against the
        // old size, and once a departed client's writes have ended.
        let prepared = self.queues.prepare();
        self.acked = low32(features);
        self.shared.features.store(features, Ordering::Relaxed);
        self.shared.running.store(true, Ordering::Relaxed);
        self.config.set_features(self.acked);
        self.update_write_through();
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let s = self.opts.serial.as_bytes();
        let n = s.len().min(serial.len());
        serial[..n].copy_from_slice(&s[..n]);
        let ctx = Arc::new(BlkContext {
            backend: self.backend.clone(),
            capacity: self.shared.capacity.clone(),
            block: u64::from(self.opts.logical_block_size),
            readonly: self.opts.readonly,
            serial,
            discard: self.acked & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: self.acked & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            max_discard_sectors: MAX_DWZ_SECTORS,
            max_write_zeroes_sectors: MAX_DWZ_SECTORS,
            max_discard_segs: MAX_DISCARD_SEGS,
            max_write_zeroes_segs: MAX_WRITE_ZEROES_SEGS,
            write_through: self.write_through.clone(),
            on_error: self.opts.on_error,
            limits: request::ChainLimits {
                max_descs: usize::try_from(config::seg_max(self.opts.queue_size))
                    .unwrap_or(usize::MAX)
                    .saturating_add(2),
                size_max: SIZE_MAX,
            },
            queue_size: self.opts.queue_size,
            log: self.log.clone(),
        });
        crate::dev_log!(
            self.log,
            Info,
            "driver ready, write cache {}, features {}",
            if self.write_through.load(Ordering::Relaxed) {
                "write-through"
            } else {
                "writeback"
            },
            feature_names(features).join(" "),
        );
        self.queues.start(
            prepared,
            Start {
                handler: ctx,
                queues,
                irq,
                event_idx: self.acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
                polled,
            },
        );
        self.log.event(Event::DriverOk);
    }

    fn notify(&mut self, index: u16) {
        self.queues.notify(index);
    }

    fn reset(&mut self) {
        if self.shared.running() || self.acked != 0 {
            self.log.event(Event::DriverReset);
        }
        self.queues.stop();
        self.acked = 0;
        self.shared.features.store(0, Ordering::Relaxed);
        self.shared.running.store(false, Ordering::Relaxed);
        self.config = BlkConfig::new(&self.opts).with_capacity_cell(self.shared.capacity.clone());
        self.update_write_through();
    }

    fn abandon(&mut self) {
        self.queues.abandon();
        self.shared.running.store(false, Ordering::Relaxed);
    }

    fn memory_changed(&mut self, change: MemoryChange) {
        self.queues.memory_changed(change);
    }

    fn features_written(&mut self, features: u64) {
        self.acked = low32(features);
        self.shared.features.store(features, Ordering::Relaxed);
        self.config.set_features(self.acked);
        self.update_write_through();
    }

    fn freeze(
        &mut self,
        limit: std::time::Duration,
    ) -> Result<Vec<Option<crate::virtio::ring::RingPos>>, String> {
        self.queues.freeze(limit).map_err(|e| match e {
            HoldError::Busy => "a resize of the device holds its queues".to_string(),
            HoldError::Stuck => format!(
                "requests are still in the backend after {limit:?} (a disk that stopped answering?)"
            ),
            HoldError::DepartedStuck => {
                format!("writes of a client that left are still in the backend after {limit:?}")
            }
        })
    }

    fn thaw(&mut self) {
        self.queues.thaw();
    }

    fn save(&self) -> serde_json::Value {
        serde_json::json!({
            "wce": self.config.wce_byte(),
            "stats": self.shared.stats.iter().map(|q| q.save()).collect::<Vec<_>>(),
        })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Saved {
            wce: u8,
            stats: Vec<crate::engine::SavedStats>,
        }
        let s: Saved = serde_json::from_value(state.clone()).map_err(|e| e.to_string())?;
        if s.stats.len() != self.shared.stats.len() {
            return Err(format!(
                "statistics of {} queue(s) for a device of {}",
                s.stats.len(),
                self.shared.stats.len()
            ));
        }
        self.config.set_wce_byte(s.wce)?;
        for (q, saved) in self.shared.stats.iter().zip(&s.stats) {
            q.restore(saved)?;
        }
        self.update_write_through();
        Ok(())
    }
}
