//! Request parsing and chain walking alone: a fuzzed guest memory holding a
//! split ring, its descriptors and their buffers, walked and parsed as the
//! poller does. Invariants checked beyond "no panic": a walked chain never
//! keeps more than seg_max + 2 segments, every host iovec of a request lies
//! inside guest memory and adds up to the request's data length, and a
//! request that needs no I/O reports a used length within its buffers.
#![no_main]

#[path = "blk_ctx.rs"]
mod blk_ctx;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vfio_user_blk::backend::request::IoRequest;
use vfio_user_blk::blk::exec::Plan;
use vfio_user_blk::blk::request::{total_len, walk, ChainLimits};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

const MEM: usize = 0x10000;

#[derive(Arbitrary, Debug)]
struct Input {
    size_log2: u8,
    desc: u16,
    avail: u16,
    used: u16,
    event_idx: bool,
    max_descs: u8,
    size_max: u16,
    block_4k: bool,
    readonly: bool,
    capacity: u16,
    memory: Vec<u8>,
}

fuzz_target!(|inp: Input| {
    let mem = blk_ctx::guest_memory(&inp.memory, MEM);
    let size = 1u16 << (inp.size_log2 % 9);
    let mut q = match Queue::new(size) {
        Ok(q) => q,
        Err(_) => return,
    };
    if q.try_set_desc_table_address(GuestAddress(u64::from(inp.desc & !15)))
        .is_err()
        || q.try_set_avail_ring_address(GuestAddress(u64::from(inp.avail & !1)))
            .is_err()
        || q.try_set_used_ring_address(GuestAddress(u64::from(inp.used & !3)))
            .is_err()
    {
        return;
    }
    q.set_event_idx(inp.event_idx);
    q.set_ready(true);
    let limits = ChainLimits {
        max_descs: usize::from(inp.max_descs).max(3),
        size_max: u32::from(inp.size_max).max(512),
    };
    let ctx = blk_ctx::blk_context(
        limits,
        size,
        u64::from(inp.capacity),
        if inp.block_4k { 4096 } else { 512 },
        inp.readonly,
    );
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let Ok(iter) = q.iter(&*mem) else { return };
    for chain in iter.take(usize::from(size)) {
        let Ok(c) = walk(chain, size, limits) else {
            break;
        };
        assert!(c.head < size);
        assert!(c.readable.len() + c.writable.len() <= limits.max_descs);
        let mut io = IoRequest::default();
        match ctx.plan(&mem, &c, &mut io) {
            Ok(Plan::Io { .. }) => {
                let mut sum = 0usize;
                for v in io.iov.iter() {
                    assert!(
                        v.addr() >= host && v.addr() + v.len() <= host + MEM,
                        "iovec outside guest memory"
                    );
                    sum += v.len();
                }
                let data = total_len(&c.writable) + total_len(&c.readable);
                assert!(sum as u64 <= data, "iovecs longer than the chain's buffers");
            }
            Ok(Plan::Done { used, .. }) => {
                assert!(u64::from(used) <= total_len(&c.writable) + 1);
            }
            Err(_) => {}
        }
    }
});
