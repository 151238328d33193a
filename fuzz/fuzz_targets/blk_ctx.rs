//! What the chain-level targets share: the guest memory they are given,
//! and the virtio-blk context they plan requests with (a null backend,
//! small discard/write-zeroes limits, the fuzzed rest).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use vfio_user_blk::backend::io::NullBackend;
use vfio_user_blk::blk::exec::{BlkContext, ErrorPolicy};
use vfio_user_blk::blk::request::ChainLimits;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `size` bytes of guest memory at address 0, starting with `contents`.
pub fn guest_memory(contents: &[u8], size: usize) -> Arc<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let n = contents.len().min(size);
    mem.write_slice(&contents[..n], GuestAddress(0)).unwrap();
    Arc::new(mem)
}

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
