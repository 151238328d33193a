//! The device side of a packed virtqueue (virtio 1.1+, 2.8): one ring of
//! 16-byte descriptors that the driver makes available and the device
//! marks used in place, with wrap counters, plus two event-suppression
//! structures. virtio-queue has no packed ring; this is ours.
//!
//! Validation matches the split ring's: a chain is at most the queue size
//! of ring descriptors, an indirect table is read at most `queue size`
//! entries deep (by the request walk), buffer ids must be below the queue
//! size, and every read of guest memory is checked. A chain that cannot be
//! used ends the walk as a failure, which breaks the queue until reset.

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_F_WRAP_CTR,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ring::{Desc, DescSource};

/// Descriptor flags as the 16-bit field holds them (the bindings spell
/// them as u32 bit values or bit numbers; all fit, checked at compile time).
pub const F_NEXT: u16 = flag16(VRING_DESC_F_NEXT);
pub const F_WRITE: u16 = flag16(VRING_DESC_F_WRITE);
pub const F_INDIRECT: u16 = flag16(VRING_DESC_F_INDIRECT);
pub const F_AVAIL: u16 = 1 << VRING_PACKED_DESC_F_AVAIL;
pub const F_USED: u16 = 1 << VRING_PACKED_DESC_F_USED;
pub const EVENT_ENABLE: u16 = flag16(VRING_PACKED_EVENT_FLAG_ENABLE);
pub const EVENT_DISABLE: u16 = flag16(VRING_PACKED_EVENT_FLAG_DISABLE);
pub const EVENT_DESC: u16 = flag16(VRING_PACKED_EVENT_FLAG_DESC);

/// A binding's u32 value as the 16-bit field holds it (the assertion
/// below checks at compile time that each fits).
#[allow(clippy::cast_possible_truncation)]
const fn flag16(v: u32) -> u16 {
    v as u16
}
pub const EVENT_WRAP: u16 = 1 << VRING_PACKED_EVENT_F_WRAP_CTR;
const _: () = assert!(
    VRING_DESC_F_NEXT < 0x10000
        && VRING_DESC_F_WRITE < 0x10000
        && VRING_DESC_F_INDIRECT < 0x10000
        && VRING_PACKED_DESC_F_AVAIL < 16
        && VRING_PACKED_DESC_F_USED < 16
        && VRING_PACKED_EVENT_FLAG_DESC < 0x10000
        && VRING_PACKED_EVENT_F_WRAP_CTR < 16
);

/// Largest packed queue (2^15: positions and the wrap bit share 16 bits).
pub const MAX_SIZE: u16 = 1 << 15;
/// Bytes of one descriptor, and of an event-suppression structure.
pub const DESC_SIZE: u64 = 16;
pub const EVENT_SIZE: u64 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackedError {
    #[error("queue size {0} is not between 1 and 32768")]
    Size(u16),
    #[error("{what} address {addr:#x} is not aligned to {align}")]
    Align {
        what: &'static str,
        addr: u64,
        align: u64,
    },
    #[error("descriptor ring at {0:#x} is not in guest memory")]
    Unreadable(u64),
    #[error("a chain is longer than the queue ({0} descriptors)")]
    ChainTooLong(u16),
    #[error("buffer id {0} is out of range")]
    IdOutOfRange(u16),
    #[error("used entry for buffer id {0}, which is not in flight")]
    NotInFlight(u16),
    #[error("used ring write at {0:#x} failed")]
    Unwritable(u64),
    #[error("a saved ring position is outside the ring or has requests in flight")]
    Position,
}

/// One ring descriptor as stored: addr, len, id, flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

/// Reads the descriptor at `addr` (flags last is not needed: callers read
/// the flags first and fence).
pub fn read_desc(mem: &GuestMemoryMmap, addr: u64) -> Option<RawDesc> {
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    Some(RawDesc {
        addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
        len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        id: u16_at(12),
        flags: u16_at(14),
    })
}

fn load16(mem: &GuestMemoryMmap, addr: u64) -> Option<u16> {
    mem.load::<u16>(GuestAddress(addr), Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

fn store16(mem: &GuestMemoryMmap, addr: u64, v: u16) -> bool {
    mem.store(v.to_le(), GuestAddress(addr), Ordering::Release)
        .is_ok()
}

/// `vring_need_event`: whether `event` lies in (old, new].
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The device's side of one packed ring.
#[derive(Debug)]
pub struct PackedQueue {
    size: u16,
    desc: u64,
    /// Driver event suppression (written by the driver).
    driver: u64,
    /// Device event suppression (written by us).
    device: u64,
    event_idx: bool,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// Ring descriptors each in-flight buffer id took (0: not in flight).
    slots: Vec<u16>,
    /// Where the last pop started, to give it back.
    last_pop: Option<(u16, bool, u16)>,
    /// `next_used` when the driver was last signalled.
    signalled: Option<u16>,
}

impl PackedQueue {
    pub fn new(
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
        event_idx: bool,
    ) -> Result<PackedQueue, PackedError> {
        if size == 0 || size > MAX_SIZE {
            return Err(PackedError::Size(size));
        }
        for (what, addr, align) in [
            ("descriptor ring", desc, 16),
            ("driver event", driver, 4),
            ("device event", device, 4),
        ] {
            if addr % align != 0 {
                return Err(PackedError::Align { what, addr, align });
            }
        }
        Ok(PackedQueue {
            size,
            desc,
            driver,
            device,
            event_idx,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            slots: vec![0; usize::from(size)],
            last_pop: None,
            signalled: None,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Where the device is in the ring: (next available, its wrap
    /// counter, next used, its wrap counter).
    pub fn position(&self) -> (u16, bool, u16, bool) {
        (
            self.next_avail,
            self.avail_wrap,
            self.next_used,
            self.used_wrap,
        )
    }

    /// Takes up where a drained queue left off (a live upgrade): nothing
    /// is in flight, so the used side has caught up with the available
    /// one. Positions must lie inside the ring.
    pub fn set_position(
        &mut self,
        avail: (u16, bool),
        used: (u16, bool),
    ) -> Result<(), PackedError> {
        if avail.0 >= self.size || used.0 >= self.size || avail != used {
            return Err(PackedError::Position);
        }
        (self.next_avail, self.avail_wrap) = avail;
        (self.next_used, self.used_wrap) = used;
        Ok(())
    }

    /// The guest memory the ring uses: (address, length) of the
    /// descriptors and the two event structures.
    pub fn areas(&self) -> [(u64, u64); 3] {
        [
            (self.desc, DESC_SIZE * u64::from(self.size)),
            (self.driver, EVENT_SIZE),
            (self.device, EVENT_SIZE),
        ]
    }

    fn desc_addr(&self, pos: u16) -> u64 {
        self.desc + DESC_SIZE * u64::from(pos)
    }

    /// Moves a ring position on by `n`, flipping the wrap counter at the end.
    fn advance(&self, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
        let p = u32::from(pos) + u32::from(n);
        let size = u32::from(self.size);
        if p >= size {
            (u16::try_from(p - size).unwrap_or(0), !wrap)
        } else {
            (u16::try_from(p).unwrap_or(0), wrap)
        }
    }

    fn is_avail(&self, flags: u16) -> bool {
        let avail = flags & F_AVAIL != 0;
        let used = flags & F_USED != 0;
        avail == self.avail_wrap && used != self.avail_wrap
    }

    /// Whether the driver has made a descriptor available.
    pub fn has_avail(&self, mem: &GuestMemoryMmap) -> Result<bool, PackedError> {
        let at = self.desc_addr(self.next_avail);
        let flags = load16(mem, at + 14).ok_or(PackedError::Unreadable(at))?;
        Ok(self.is_avail(flags))
    }

    /// Takes the next available chain: scans it for its length and the
    /// buffer id (in its last descriptor), and returns a reader of its
    /// descriptors. None when nothing is available.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<PackedChain<'m>>, PackedError> {
        if !self.has_avail(mem)? {
            return Ok(None);
        }
        // The rest of the chain was written before the head's flags.
        fence(Ordering::Acquire);
        let start = self.next_avail;
        let mut pos = start;
        let mut count: u16 = 0;
        let id = loop {
            let at = self.desc_addr(pos);
            let d = read_desc(mem, at).ok_or(PackedError::Unreadable(at))?;
            count += 1;
            if d.flags & F_NEXT == 0 || d.flags & F_INDIRECT != 0 {
                break d.id;
            }
            if count >= self.size {
                return Err(PackedError::ChainTooLong(self.size));
            }
            pos = if pos + 1 == self.size { 0 } else { pos + 1 };
        };
        let Some(slot) = self.slots.get_mut(usize::from(id)) else {
            return Err(PackedError::IdOutOfRange(id));
        };
        *slot = count;
        self.last_pop = Some((self.next_avail, self.avail_wrap, id));
        (self.next_avail, self.avail_wrap) = self.advance(self.next_avail, self.avail_wrap, count);
        Ok(Some(PackedChain {
            mem,
            desc: self.desc,
            size: self.size,
            start,
            count,
            id,
            i: 0,
            table: None,
        }))
    }

    /// Gives the last popped chain back: it is taken again next time.
    pub fn undo_pop(&mut self) {
        if let Some((pos, wrap, id)) = self.last_pop.take() {
            self.next_avail = pos;
            self.avail_wrap = wrap;
            if let Some(s) = self.slots.get_mut(usize::from(id)) {
                *s = 0;
            }
        }
    }

    /// Marks buffer `id` used with `len` bytes written: the used element
    /// goes in the next used position, flags last.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        id: u16,
        len: u32,
    ) -> Result<(), PackedError> {
        let count = match self.slots.get_mut(usize::from(id)) {
            Some(c) if *c > 0 => std::mem::take(c),
            Some(_) => return Err(PackedError::NotInFlight(id)),
            None => return Err(PackedError::IdOutOfRange(id)),
        };
        self.last_pop = None;
        let at = self.desc_addr(self.next_used);
        let mut b = [0u8; 6];
        b[0..4].copy_from_slice(&len.to_le_bytes());
        b[4..6].copy_from_slice(&id.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at + 8))
            .map_err(|_| PackedError::Unwritable(at))?;
        let flags = if self.used_wrap { F_AVAIL | F_USED } else { 0 };
        if !store16(mem, at + 14, flags) {
            return Err(PackedError::Unwritable(at));
        }
        let wrap = self.used_wrap;
        (self.next_used, self.used_wrap) = self.advance(self.next_used, wrap, count);
        if self.used_wrap != wrap {
            // Positions alone cannot say whether the driver's event was
            // passed across a wrap (a whole lap may complete between two
            // decisions): the next decision notifies, as QEMU does.
            self.signalled = None;
        }
        Ok(())
    }

    /// Whether the driver wants an interrupt for what was used since the
    /// last one (its event suppression structure).
    pub fn needs_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool, PackedError> {
        fence(Ordering::SeqCst);
        let off_wrap = load16(mem, self.driver).ok_or(PackedError::Unreadable(self.driver))?;
        let flags = load16(mem, self.driver + 2).ok_or(PackedError::Unreadable(self.driver))?;
        let new = self.next_used;
        let old = self.signalled.replace(new);
        Ok(match flags & 3 {
            EVENT_DISABLE => false,
            EVENT_DESC if self.event_idx => {
                let Some(old) = old else { return Ok(true) };
                let mut event = off_wrap & !EVENT_WRAP;
                if (off_wrap & EVENT_WRAP != 0) != self.used_wrap {
                    event = event.wrapping_sub(self.size);
                }
                need_event(event, new, old)
            }
            // ENABLE, DESC without EVENT_IDX, and the reserved value.
            _ => true,
        })
    }

    /// Asks for doorbells (true: and tells whether a chain is already
    /// available) or tells the driver not to send them.
    pub fn set_notification(
        &mut self,
        mem: &GuestMemoryMmap,
        enable: bool,
    ) -> Result<bool, PackedError> {
        let flags = if enable { EVENT_ENABLE } else { EVENT_DISABLE };
        if !store16(mem, self.device + 2, flags) {
            return Err(PackedError::Unwritable(self.device));
        }
        if !enable {
            return Ok(false);
        }
        fence(Ordering::SeqCst);
        self.has_avail(mem)
    }
}

/// The descriptors of one popped chain, read from guest memory as they
/// are walked: `count` ring descriptors from `start`, or, when the chain is
/// one indirect descriptor, the entries of its table.
#[derive(Debug)]
pub struct PackedChain<'m> {
    mem: &'m GuestMemoryMmap,
    desc: u64,
    size: u16,
    start: u16,
    count: u16,
    id: u16,
    i: u16,
    /// (table address, entries, next entry) while reading an indirect table.
    table: Option<(u64, u32, u32)>,
}

impl DescSource for PackedChain<'_> {
    fn head_index(&self) -> u16 {
        self.id
    }

    fn next_desc(&mut self) -> Option<Desc> {
        if let Some((addr, n, j)) = self.table {
            if j >= n {
                return None;
            }
            let d = read_desc(self.mem, addr.checked_add(DESC_SIZE * u64::from(j))?)?;
            // A table entry may not point to another table.
            if d.flags & F_INDIRECT != 0 {
                return None;
            }
            self.table = Some((addr, n, j + 1));
            return Some(Desc {
                addr: d.addr,
                len: d.len,
                write: d.flags & F_WRITE != 0,
                next: j + 1 < n,
            });
        }
        if self.i >= self.count {
            return None;
        }
        let pos = (u32::from(self.start) + u32::from(self.i)) % u32::from(self.size);
        let d = read_desc(self.mem, self.desc + DESC_SIZE * u64::from(pos))?;
        self.i += 1;
        if d.flags & F_INDIRECT != 0 {
            // Only a chain of one descriptor may be indirect, and its table
            // holds whole descriptors.
            if self.count != 1 || d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 {
                return None;
            }
            let n = u32::try_from(u64::from(d.len) / DESC_SIZE).ok()?;
            self.table = Some((d.addr, n, 0));
            return self.next_desc();
        }
        Some(Desc {
            addr: d.addr,
            len: d.len,
            write: d.flags & F_WRITE != 0,
            next: self.i < self.count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vub_testkit::driver_ring::{Buf, PackedRing};

    const DESC: u64 = 0x1000;
    const DRIVER: u64 = 0x3000;
    const DEVICE: u64 = 0x3010;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap()
    }

    fn bufs(n: usize) -> Vec<Buf> {
        (0..n)
            .map(|k| Buf {
                addr: 0x8000 + 0x100 * k as u64,
                len: 16 + u32::try_from(k).unwrap(),
                write: k + 1 == n,
            })
            .collect()
    }

    fn collect(c: &mut PackedChain<'_>) -> Vec<Desc> {
        std::iter::from_fn(|| c.next_desc()).collect()
    }

    fn pair(m: &GuestMemoryMmap, size: u16, event_idx: bool) -> (PackedRing, PackedQueue) {
        (
            PackedRing::new(m, size, DESC, DRIVER, DEVICE, event_idx),
            PackedQueue::new(size, DESC, DRIVER, DEVICE, event_idx).unwrap(),
        )
    }

    #[test]
    fn chains_round_trip_and_wrap_many_times() {
        let m = mem();
        let (mut drv, mut dev) = pair(&m, 5, false);
        assert!(dev.pop(&m).unwrap().is_none(), "nothing available");
        // Chains of 1, 2 and 3 descriptors in a ring of 5: the wrap
        // counters flip at every lap, in the middle of chains too.
        for round in 0..40usize {
            let n = 1 + round % 3;
            let b = bufs(n);
            let id = drv.add(&m, &b, None).unwrap();
            assert!(dev.pop(&m).unwrap().is_none(), "not published yet");
            drv.publish(&m, id);
            let mut c = dev.pop(&m).unwrap().expect("available");
            assert_eq!(c.head_index(), id);
            let got = collect(&mut c);
            assert_eq!(got.len(), n, "round {round}");
            for (k, d) in got.iter().enumerate() {
                assert_eq!((d.addr, d.len, d.write), (b[k].addr, b[k].len, b[k].write));
                assert_eq!(d.next, k + 1 < n);
            }
            assert!(dev.pop(&m).unwrap().is_none());
            dev.add_used(&m, id, 7).unwrap();
            assert_eq!(drv.pop_used(&m), Some((id, 7)));
            assert_eq!(drv.pop_used(&m), None);
            assert_eq!(drv.free_descriptors(), 5);
        }
    }

    #[test]
    fn out_of_order_completions() {
        let m = mem();
        let (mut drv, mut dev) = pair(&m, 8, false);
        let ids: Vec<u16> = (0..3)
            .map(|_| {
                let id = drv.add(&m, &bufs(2), None).unwrap();
                drv.publish(&m, id);
                id
            })
            .collect();
        for &id in &ids {
            assert_eq!(dev.pop(&m).unwrap().unwrap().head_index(), id);
        }
        // Completed last first: each used element takes the slots of its
        // own chain.
        for &id in ids.iter().rev() {
            dev.add_used(&m, id, u32::from(id)).unwrap();
        }
        let used: Vec<_> = std::iter::from_fn(|| drv.pop_used(&m)).collect();
        assert_eq!(
            used,
            ids.iter()
                .rev()
                .map(|&i| (i, u32::from(i)))
                .collect::<Vec<_>>()
        );
        assert_eq!(drv.free_descriptors(), 8);
        // The ring goes on from there.
        let id = drv.add(&m, &bufs(3), None).unwrap();
        drv.publish(&m, id);
        assert_eq!(collect(&mut dev.pop(&m).unwrap().unwrap()).len(), 3);
        assert_eq!(dev.add_used(&m, 7, 0), Err(PackedError::NotInFlight(7)));
        assert_eq!(dev.add_used(&m, 8, 0), Err(PackedError::IdOutOfRange(8)));
    }

    #[test]
    fn indirect_tables_are_read_and_checked() {
        let m = mem();
        let (mut drv, mut dev) = pair(&m, 4, false);
        let b = bufs(5);
        let id = drv.add(&m, &b, Some(0x6000)).unwrap();
        drv.publish(&m, id);
        let got = collect(&mut dev.pop(&m).unwrap().unwrap());
        assert_eq!(got.len(), 5);
        assert_eq!(got[4].addr, b[4].addr);
        assert!(got[4].write && !got[4].next && got[3].next);
        dev.add_used(&m, id, 1).unwrap();
        assert_eq!(drv.pop_used(&m), Some((id, 1)));
        // A table whose length is no multiple of 16, a table entry that is
        // itself indirect, and a table outside memory: the walk fails (the
        // last descriptor returned, if any, still points on).
        for (len, nested, table) in [
            (40u32, false, 0x6000u64),
            (32, true, 0x6000),
            (32, false, 0x1_0000_0000),
        ] {
            let id = drv.add(&m, &b[..2], Some(0x6000)).unwrap();
            let at = DESC + 16 * u64::from(dev.next_avail);
            PackedRing::write_raw(&m, at, table, len, id, 0);
            if nested {
                PackedRing::write_raw(&m, 0x6010, 0x7000, 16, 0, F_INDIRECT);
            }
            drv.publish(&m, id);
            let mut c = dev.pop(&m).unwrap().unwrap();
            let got = collect(&mut c);
            assert!(
                got.last().is_none_or(|d| d.next),
                "len {len} nested {nested}"
            );
            dev.add_used(&m, id, 0).unwrap();
            drv.pop_used(&m).unwrap();
        }
    }

    #[test]
    fn hostile_rings_are_errors_not_panics() {
        let m = mem();
        // Every descriptor says NEXT: the chain never ends.
        let mut dev = PackedQueue::new(4, DESC, DRIVER, DEVICE, false).unwrap();
        for i in 0..4u64 {
            PackedRing::write_raw(&m, DESC + 16 * i, 0x8000, 16, 0, F_NEXT | F_AVAIL);
        }
        assert_eq!(dev.pop(&m).unwrap_err(), PackedError::ChainTooLong(4));
        // A buffer id past the ring.
        let mut dev = PackedQueue::new(4, DESC, DRIVER, DEVICE, false).unwrap();
        PackedRing::write_raw(&m, DESC, 0x8000, 16, 9, F_AVAIL);
        assert_eq!(dev.pop(&m).unwrap_err(), PackedError::IdOutOfRange(9));
        // An indirect descriptor in the middle of a chain.
        let mut dev = PackedQueue::new(4, DESC, DRIVER, DEVICE, false).unwrap();
        PackedRing::write_raw(&m, DESC, 0x8000, 16, 0, F_NEXT | F_AVAIL);
        PackedRing::write_raw(&m, DESC + 16, 0x6000, 32, 1, F_INDIRECT | F_AVAIL);
        let got = collect(&mut dev.pop(&m).unwrap().unwrap());
        assert_eq!(got.len(), 1);
        assert!(got[0].next, "the walk ends in the middle: a failure");
        // A ring outside guest memory.
        let mut dev = PackedQueue::new(4, 0x1_0000_0000, DRIVER, DEVICE, false).unwrap();
        assert!(matches!(dev.pop(&m), Err(PackedError::Unreadable(_))));
        // Sizes and alignments.
        assert_eq!(
            PackedQueue::new(0, DESC, DRIVER, DEVICE, false).unwrap_err(),
            PackedError::Size(0)
        );
        assert!(PackedQueue::new(MAX_SIZE + 1, DESC, DRIVER, DEVICE, false).is_err());
        assert!(PackedQueue::new(7, DESC + 8, DRIVER, DEVICE, false).is_err());
        assert!(PackedQueue::new(7, DESC, DRIVER + 2, DEVICE, false).is_err());
        assert!(PackedQueue::new(MAX_SIZE, DESC, DRIVER, DEVICE, false).is_ok());
    }

    #[test]
    fn a_chain_given_back_is_taken_again() {
        let m = mem();
        let (mut drv, mut dev) = pair(&m, 4, false);
        let id = drv.add(&m, &bufs(3), None).unwrap();
        drv.publish(&m, id);
        assert_eq!(dev.pop(&m).unwrap().unwrap().head_index(), id);
        dev.undo_pop();
        assert_eq!(dev.add_used(&m, id, 0), Err(PackedError::NotInFlight(id)));
        let mut c = dev.pop(&m).unwrap().unwrap();
        assert_eq!((c.head_index(), collect(&mut c).len()), (id, 3));
    }

    #[test]
    fn event_suppression_both_ways() {
        let m = mem();
        // Without EVENT_IDX: the driver turns interrupts on and off.
        let (mut drv, mut dev) = pair(&m, 8, false);
        let one = |drv: &mut PackedRing, dev: &mut PackedQueue| {
            let id = drv.add(&m, &bufs(1), None).unwrap();
            drv.publish(&m, id);
            dev.pop(&m).unwrap().unwrap();
            dev.add_used(&m, id, 0).unwrap();
        };
        drv.enable_interrupts(&m);
        one(&mut drv, &mut dev);
        assert!(dev.needs_notification(&m).unwrap());
        drv.disable_interrupts(&m);
        one(&mut drv, &mut dev);
        assert!(!dev.needs_notification(&m).unwrap());
        // The device turns doorbells off and on; turning them on reports
        // what already waits.
        assert!(!dev.set_notification(&m, false).unwrap());
        let id = drv.add(&m, &bufs(1), None).unwrap();
        drv.publish(&m, id);
        assert!(!drv.kick_needed(&m), "doorbells are off");
        assert!(dev.set_notification(&m, true).unwrap(), "a chain waits");

        // With EVENT_IDX: an interrupt when the used index passes the
        // driver's event position, none before.
        let (mut drv, mut dev) = pair(&m, 8, true);
        while drv.pop_used(&m).is_some() {}
        drv.enable_interrupts(&m);
        one(&mut drv, &mut dev);
        assert!(dev.needs_notification(&m).unwrap(), "first: always");
        one(&mut drv, &mut dev);
        assert!(!dev.needs_notification(&m).unwrap(), "event still at 0");
        for _ in 0..2 {
            drv.pop_used(&m).unwrap();
        }
        // The driver asks for the next one (position 2 of this lap), and
        // past the end of the ring (it wraps), every one gets its interrupt.
        for _ in 0..20 {
            assert!(!drv.enable_interrupts(&m));
            one(&mut drv, &mut dev);
            assert!(dev.needs_notification(&m).unwrap());
            drv.pop_used(&m).unwrap();
        }
    }
}
