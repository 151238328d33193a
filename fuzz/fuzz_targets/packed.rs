//! The packed ring's device side alone: a fuzzed guest memory holding a
//! packed ring, its descriptors, indirect tables and event structures,
//! popped and walked as the poller does, with used elements written back in
//! a fuzzed order. Invariants checked beyond "no panic": a buffer id is
//! below the queue size and never popped twice while in flight, a walk
//! never keeps more than seg_max + 2 segments, every iovec of a request
//! lies inside guest memory, used elements are accepted exactly for the
//! ids in flight, and the ring never hands out more chains than it has
//! descriptors in flight for.
#![no_main]

#[path = "blk_ctx.rs"]
mod blk_ctx;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vfio_user_blk::backend::request::IoRequest;
use vfio_user_blk::blk::exec::Plan;
use vfio_user_blk::blk::request::{walk, ChainLimits};
use vfio_user_blk::virtio::packed::PackedQueue;
use vfio_user_blk::virtio::ring::DescSource;
use vm_memory::{GuestAddress, GuestMemoryBackend};

const MEM: usize = 0x10000;

#[derive(Arbitrary, Debug)]
struct Input {
    size: u16,
    desc: u16,
    driver: u16,
    device: u16,
    event_idx: bool,
    max_descs: u8,
    /// Per step: pop (true) or complete the oldest in flight (false).
    steps: Vec<bool>,
    memory: Vec<u8>,
}

fuzz_target!(|inp: Input| {
    let mem = blk_ctx::guest_memory(&inp.memory, MEM);
    let size = inp.size % 300;
    let Ok(mut q) = PackedQueue::new(
        size,
        u64::from(inp.desc & !15),
        u64::from(inp.driver & !3),
        u64::from(inp.device & !3),
        inp.event_idx,
    ) else {
        return;
    };
    let limits = ChainLimits {
        max_descs: usize::from(inp.max_descs).max(3),
        size_max: 1 << 20,
    };
    let ctx = blk_ctx::blk_context(limits, size, 1 << 20, 512, false);
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let mut in_flight: std::collections::VecDeque<u16> = Default::default();
    for (i, pop) in inp.steps.iter().take(4 * usize::from(size) + 4).enumerate() {
        if !pop {
            if let Some(id) = in_flight.pop_front() {
                q.add_used(&mem, id, u32::try_from(i).unwrap_or(0))
                    .expect("a used element for an id in flight is accepted");
                let _ = q.needs_notification(&mem);
            }
            continue;
        }
        let chain = match q.pop(&mem) {
            Ok(Some(c)) => c,
            Ok(None) | Err(_) => break,
        };
        let id = chain.head_index();
        assert!(id < size, "buffer id past the ring");
        if in_flight.contains(&id) {
            // The engine refuses a reused id (the queue breaks).
            break;
        }
        assert!(
            in_flight.len() < usize::from(size),
            "more chains than the ring holds"
        );
        in_flight.push_back(id);
        let Ok(c) = walk(chain, size, limits) else {
            continue;
        };
        assert!(c.readable.len() + c.writable.len() <= limits.max_descs);
        let mut io = IoRequest::default();
        if let Ok(Plan::Io { .. }) = ctx.plan(&mem, &c, &mut io) {
            for v in io.iov.iter() {
                assert!(
                    v.addr() >= host && v.addr() + v.len() <= host + MEM,
                    "iovec outside guest memory"
                );
            }
        }
    }
    // Nothing else may be completed: every id not in flight is refused.
    for id in 0..size {
        if !in_flight.contains(&id) {
            assert!(q.add_used(&mem, id, 0).is_err());
        }
    }
    let _ = q.set_notification(&mem, true);
});
