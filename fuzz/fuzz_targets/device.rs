//! The whole device: a fuzzed guest memory (rings, descriptors, buffers)
//! given to the server with DMA_MAP, a legacy driver's set-up with fuzzed
//! features and ring address, then fuzzed BAR0, BAR1 and config-space
//! writes and doorbells, all through the server loop over an in-memory
//! transport. The engine runs inline (on the protocol thread) against a
//! `ram:` disk, so each doorbell is served before the next message.
//!
//! Invariants beyond "no panic": every used entry names a head below the
//! queue size that the driver made available, no head completes more often
//! than it was made available, and the device never completes more
//! requests than were available. (Checked when no reset intervened and the
//! device's own writes left the available ring as the driver wrote it.)
#![no_main]

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use arbitrary::Arbitrary;
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use vfio_user_blk::cli::{build_with, Options};
use vfio_user_blk::vfio_user::MemTransport;

const RAM: u64 = 0x10000;
const QSIZE: u64 = 16;

#[derive(Arbitrary, Debug)]
enum Op {
    Bar0 { offset: u8, width: u8, value: u32 },
    Config { offset: u8, data: Vec<u8> },
    Bar1 { offset: u16, data: Vec<u8> },
    Notify(u8),
    DeviceReset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    msix: bool,
    features: u32,
    pfn: u8,
    ops: Vec<Op>,
    memory: Vec<u8>,
}

fn msg(t: &mut MemTransport, id: &mut u16, cmd: u16, body: &[u8], fds: Vec<OwnedFd>) {
    *id = id.wrapping_add(1);
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&cmd.to_le_bytes());
    m.extend_from_slice(&(16 + body.len() as u32).to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(body);
    t.push(&m, fds);
}

fn region_write(t: &mut MemTransport, id: &mut u16, region: u32, offset: u64, data: &[u8]) {
    let mut p = Vec::new();
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&region.to_le_bytes());
    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
    p.extend_from_slice(data);
    msg(t, id, 10, &p, Vec::new());
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fuzz_target!(|inp: Input| {
    let opts = Options::parse_from([
        "fuzz",
        "--socket",
        "/nonexistent",
        "--disk",
        "ram:1M",
        "--queue-size",
        "16",
    ]);
    let mut server = build_with(&opts, true).expect("device");
    let ram = vfio_user_blk::util::memfd("fuzz-ram").unwrap();
    ram.set_len(RAM).unwrap();
    let n = inp.memory.len().min(RAM as usize);
    ram.write_all_at(&inp.memory[..n], 0).unwrap();

    let mut t = MemTransport::new();
    let mut id = 0u16;
    let mut v = vec![0, 0, 0, 0];
    v.extend_from_slice(br#"{"capabilities":{"max_msg_fds":8}}"#);
    v.push(0);
    msg(&mut t, &mut id, 1, &v, Vec::new());
    let mut map = Vec::new();
    map.extend_from_slice(&32u32.to_le_bytes());
    map.extend_from_slice(&3u32.to_le_bytes());
    map.extend_from_slice(&0u64.to_le_bytes());
    map.extend_from_slice(&0u64.to_le_bytes());
    map.extend_from_slice(&RAM.to_le_bytes());
    msg(
        &mut t,
        &mut id,
        2,
        &map,
        vec![OwnedFd::from(ram.try_clone().unwrap())],
    );
    // SAFETY: eventfd has no memory effects; the descriptor is owned below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd >= 0 {
        // SAFETY: a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let mut s = Vec::new();
        s.extend_from_slice(&20u32.to_le_bytes());
        s.extend_from_slice(&(4u32 | 32).to_le_bytes()); // DATA_EVENTFD | ACTION_TRIGGER
        s.extend_from_slice(&2u32.to_le_bytes()); // MSI-X
        s.extend_from_slice(&0u32.to_le_bytes());
        s.extend_from_slice(&1u32.to_le_bytes());
        msg(&mut t, &mut id, 8, &s, vec![efd]);
    }
    // The legacy probe: bus master, MSI-X, status, features, queue 0, DRIVER_OK.
    region_write(&mut t, &mut id, 7, 4, &5u16.to_le_bytes());
    if inp.msix {
        region_write(&mut t, &mut id, 7, 0x42, &0x8000u16.to_le_bytes());
    }
    region_write(&mut t, &mut id, 0, 18, &[1]);
    region_write(&mut t, &mut id, 0, 18, &[3]);
    region_write(&mut t, &mut id, 0, 4, &inp.features.to_le_bytes());
    region_write(&mut t, &mut id, 0, 14, &0u16.to_le_bytes());
    let pfn = u32::from(inp.pfn % 14) + 1;
    region_write(&mut t, &mut id, 0, 8, &pfn.to_le_bytes());
    region_write(&mut t, &mut id, 0, 18, &[7]);

    let mut reset = false;
    for op in inp.ops.iter().take(32) {
        match op {
            Op::Bar0 {
                offset,
                width,
                value,
            } => {
                let w = [1usize, 2, 4][usize::from(*width) % 3];
                let off = u64::from(*offset % 64);
                reset |= off <= 18 && off + w as u64 > 8;
                region_write(&mut t, &mut id, 0, off, &value.to_le_bytes()[..w]);
            }
            Op::Config { offset, data } => {
                let off = u64::from(*offset);
                let d = &data[..data.len().min(8)];
                reset |= off < 6 && off + d.len() as u64 > 4;
                region_write(&mut t, &mut id, 7, off, d);
            }
            Op::Bar1 { offset, data } => {
                let d = &data[..data.len().min(16)];
                region_write(&mut t, &mut id, 1, u64::from(*offset % 0x1000), d);
            }
            Op::Notify(q) => region_write(&mut t, &mut id, 0, 16, &u16::from(*q % 2).to_le_bytes()),
            Op::DeviceReset => {
                reset = true;
                msg(&mut t, &mut id, 13, &[], Vec::new());
            }
        }
    }
    region_write(&mut t, &mut id, 0, 16, &0u16.to_le_bytes());

    let base = u64::from(pfn) << 12;
    let avail = base + 16 * QSIZE;
    let avail_len = 4 + 2 * QSIZE as usize + 2;
    let mut before = vec![0u8; avail_len];
    ram.read_exact_at(&mut before, avail).unwrap();
    let _ = server.serve_on(t);
    let mut after = vec![0u8; avail_len];
    ram.read_exact_at(&mut after, avail).unwrap();
    if reset || before != after {
        return;
    }
    let used = (avail + avail_len as u64).div_ceil(4096) * 4096;
    let mut u = vec![0u8; 4 + 8 * QSIZE as usize];
    ram.read_exact_at(&mut u, used).unwrap();
    let avail_idx = u16_at(&after, 2);
    let used_idx = u16_at(&u, 2);
    if avail_idx >= 0x8000 {
        return;
    }
    // What the device was offered: the first avail_idx ring entries.
    let mut offered: HashMap<u16, usize> = HashMap::new();
    for j in 0..usize::from(avail_idx) {
        *offered
            .entry(u16_at(&after, 4 + 2 * (j % QSIZE as usize)))
            .or_default() += 1;
    }
    // The used ring wraps at QSIZE: only the last QSIZE entries are there.
    let completed = usize::from(used_idx);
    let visible = completed.min(QSIZE as usize);
    let entry_ids: Vec<u16> = (completed - visible..completed)
        .map(|j| u16_at(&u, 4 + 8 * (j % QSIZE as usize)))
        .collect();
    // A guest may point a device-writable buffer at the used ring itself;
    // then the ring says nothing about what the device did.
    let used_end = used + 6 + 8 * QSIZE;
    if writable_overlap(&ram, base, used, used_end) {
        return;
    }
    assert!(
        used_idx <= avail_idx,
        "{used_idx} completions for {avail_idx} available requests"
    );
    let mut seen: HashMap<u16, usize> = HashMap::new();
    for h in entry_ids {
        assert!(u64::from(h) < QSIZE, "used entry names head {h}");
        let c = seen.entry(h).or_default();
        *c += 1;
        assert!(
            *c <= offered.get(&h).copied().unwrap_or(0),
            "head {h} completed more often than it was made available"
        );
    }
});

/// Whether any device-writable descriptor (direct, or in an indirect table)
/// of the queue's table overlaps guest range `start .. end`.
fn writable_overlap(ram: &std::fs::File, table: u64, start: u64, end: u64) -> bool {
    let desc = |at: u64| -> Option<(u64, u32, u16)> {
        let mut d = [0u8; 16];
        ram.read_exact_at(&mut d, at).ok()?;
        Some((
            u64::from_le_bytes(d[0..8].try_into().unwrap()),
            u32::from_le_bytes(d[8..12].try_into().unwrap()),
            u16::from_le_bytes([d[12], d[13]]),
        ))
    };
    let hits = |(addr, len, flags): (u64, u32, u16)| {
        flags & 2 != 0 && addr < end && start < addr.saturating_add(u64::from(len))
    };
    for i in 0..QSIZE {
        let Some(d) = desc(table + 16 * i) else {
            continue;
        };
        if d.2 & 4 != 0 {
            for k in 0..u64::from(d.1 / 16).min(4096) {
                if let Some(e) = desc(d.0.wrapping_add(16 * k)) {
                    if hits(e) {
                        return true;
                    }
                }
            }
        } else if hits(d) {
            return true;
        }
    }
    false
}
