//! The virtio-blk context the chain-level targets plan requests with: a
//! null backend, small discard/write-zeroes limits, the fuzzed rest.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use vfio_user_blk::backend::io::NullBackend;
use vfio_user_blk::blk::exec::{BlkContext, ErrorPolicy};
use vfio_user_blk::blk::request::ChainLimits;

pub fn blk_context(
    limits: ChainLimits,
    queue_size: u16,
    capacity_sectors: u64,
    block: u64,
    readonly: bool,
) -> BlkContext {
    BlkContext {
        backend: Arc::new(NullBackend),
        capacity: Arc::new(AtomicU64::new(capacity_sectors)),
        block,
        readonly,
        serial: *b"fuzz-serial-00000000",
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 64,
        max_write_zeroes_sectors: 64,
        max_discard_segs: 4,
        max_write_zeroes_segs: 1,
        write_through: Arc::new(AtomicBool::new(false)),
        on_error: ErrorPolicy::Report,
        limits,
        queue_size,
        log: vfio_user_blk::util::DeviceLog::new("fuzz"),
    }
}
