//! The driver side of a split virtqueue in guest memory, as a Linux guest
//! keeps it: descriptors from a free list, the available ring, doorbells only
//! when the device asks for them (VRING_USED_F_NO_NOTIFY, or EVENT_IDX's
//! avail_event), and used_event to say when it wants the next interrupt.
//!
//! The packed ring's driver side is here too ([`PackedRing`]).
//!
//! The integration tests' driver and the benchmark's synthetic guest use
//! them; the server itself never does (its side of the split ring is
//! `virtio-queue`, of the packed ring `virtio::packed`).

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub struct SplitRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    event_idx: bool,
    free: Vec<u16>,
    /// Descriptors each in-flight head holds.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
}

fn store16(mem: &GuestMemoryMmap, addr: u64, v: u16) {
    mem.store(v, GuestAddress(addr), Ordering::Release)
        .expect("ring inside guest memory");
}

/// A 16-byte descriptor of either layout at `at`: address, length, then
/// two 16-bit fields (split: flags, next; packed: id, flags).
fn write_desc16(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, a: u16, b: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&a.to_le_bytes());
    d[14..16].copy_from_slice(&b.to_le_bytes());
    mem.write_slice(&d, GuestAddress(at))
        .expect("descriptor inside guest memory");
}

fn load16(mem: &GuestMemoryMmap, addr: u64) -> u16 {
    mem.load(GuestAddress(addr), Ordering::Acquire)
        .expect("ring inside guest memory")
}

impl SplitRing {
    /// A ring at the given addresses; its memory is zeroed.
    pub fn new(
        mem: &GuestMemoryMmap,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        event_idx: bool,
    ) -> SplitRing {
        let n = u64::from(size);
        let zero = |addr: u64, len: u64| {
            let z = vec![0u8; usize::try_from(len).expect("ring size")];
            mem.write_slice(&z, GuestAddress(addr))
                .expect("ring inside guest memory");
        };
        zero(desc, 16 * n);
        zero(avail, 6 + 2 * n);
        zero(used, 6 + 8 * n);
        SplitRing {
            size,
            desc,
            avail,
            used,
            event_idx,
            free: (0..size).rev().collect(),
            chains: vec![Vec::with_capacity(4); usize::from(size)],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
        }
    }

    /// Whether the ring uses EVENT_IDX.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Writes one descriptor in a table.
    pub fn write_desc(
        mem: &GuestMemoryMmap,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        write_desc16(mem, table + 16 * u64::from(i), addr, len, flags, next);
    }

    /// Places a chain in the descriptor table (or in `indirect`, a table of
    /// `bufs.len()` entries the caller owns) and returns its head, or None
    /// when there are not enough free descriptors.
    pub fn add(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[Buf],
        indirect: Option<u64>,
    ) -> Option<u16> {
        let need = if indirect.is_some() { 1 } else { bufs.len() };
        if self.free.len() < need || bufs.is_empty() {
            return None;
        }
        let head = self.free[self.free.len() - 1];
        let mut ids = std::mem::take(&mut self.chains[usize::from(head)]);
        ids.clear();
        for _ in 0..need {
            ids.push(self.free.pop().expect("checked above"));
        }
        let flags = |k: usize, b: &Buf| {
            (if b.write { DESC_F_WRITE } else { 0 })
                | (if k + 1 < bufs.len() { DESC_F_NEXT } else { 0 })
        };
        match indirect {
            Some(table) => {
                for (k, b) in bufs.iter().enumerate() {
                    let next = u16::try_from(k + 1).unwrap_or(0);
                    Self::write_desc(
                        mem,
                        table,
                        u16::try_from(k).unwrap_or(0),
                        b.addr,
                        b.len,
                        flags(k, b),
                        next,
                    );
                }
                let len = u32::try_from(16 * bufs.len()).unwrap_or(u32::MAX);
                Self::write_desc(mem, self.desc, ids[0], table, len, DESC_F_INDIRECT, 0);
            }
            None => {
                for (k, b) in bufs.iter().enumerate() {
                    let next = ids.get(k + 1).copied().unwrap_or(0);
                    Self::write_desc(mem, self.desc, ids[k], b.addr, b.len, flags(k, b), next);
                }
            }
        }
        self.chains[usize::from(head)] = ids;
        Some(head)
    }

    /// Makes a head available to the device (without a doorbell).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        store16(mem, slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        store16(mem, self.avail + 2, self.avail_idx);
    }

    /// Whether the device wants a doorbell for what was published since the
    /// last one (Linux's virtqueue_kick_prepare).
    pub fn kick_needed(&mut self, mem: &GuestMemoryMmap) -> bool {
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        if old == new {
            return false;
        }
        if self.event_idx {
            let ev = load16(mem, self.used + 4 + 8 * u64::from(self.size));
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            load16(mem, self.used) & USED_F_NO_NOTIFY == 0
        }
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        load16(mem, self.used + 2)
    }

    /// Whether the device has used an entry not taken yet.
    pub fn has_used(&self, mem: &GuestMemoryMmap) -> bool {
        self.last_used != self.used_idx(mem)
    }

    /// Takes the next used entry (head, length), freeing its descriptors.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        if self.last_used == self.used_idx(mem) {
            return None;
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(e))
            .expect("used ring inside guest memory");
        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id).ok().filter(|h| *h < self.size)?;
        let ids = std::mem::take(&mut self.chains[usize::from(head)]);
        self.free.extend(ids.iter().rev());
        self.chains[usize::from(head)] = ids;
        Some((head, len))
    }

    /// Asks for an interrupt at the next completion (EVENT_IDX's used_event;
    /// without EVENT_IDX interrupts are always on). Returns true if
    /// completions are already waiting (Linux's virtqueue_enable_cb).
    pub fn enable_interrupts(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.event_idx {
            store16(
                mem,
                self.avail + 4 + 2 * u64::from(self.size),
                self.last_used,
            );
        }
        fence(Ordering::SeqCst);
        self.used_idx(mem) != self.last_used
    }
}

/// The driver side of a packed virtqueue, as Linux's virtio_ring keeps
/// it: buffer ids from a free list, descriptors written in ring order with
/// the head's flags last (that is what makes a chain available), doorbells
/// unless the device's event structure disables them, and the driver's
/// event structure asking for an interrupt at the next used position
/// (EVENT_IDX) or for every one.
pub struct PackedRing {
    pub size: u16,
    pub desc: u64,
    /// Driver event suppression (ours) and device event suppression.
    pub driver: u64,
    pub device: u64,
    event_idx: bool,
    free_ids: Vec<u16>,
    /// Ring descriptors each id's chain took.
    taken: Vec<u16>,
    free_slots: u16,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// The head position and flags of each added, unpublished id.
    pending: Vec<(u16, u16)>,
    /// Made available since the last doorbell.
    unkicked: bool,
}

const P_NEXT: u16 = 1;
const P_WRITE: u16 = 2;
const P_INDIRECT: u16 = 4;
const P_AVAIL: u16 = 1 << 7;
const P_USED: u16 = 1 << 15;
const P_EVENT_DISABLE: u16 = 1;
const P_EVENT_DESC: u16 = 2;

impl PackedRing {
    /// A ring at the given addresses (descriptors 16-aligned, event
    /// structures 4-aligned); its memory is zeroed.
    pub fn new(
        mem: &GuestMemoryMmap,
        size: u16,
        desc: u64,
        driver: u64,
        device: u64,
        event_idx: bool,
    ) -> PackedRing {
        let z = vec![0u8; 16 * usize::from(size)];
        mem.write_slice(&z, GuestAddress(desc))
            .expect("ring inside guest memory");
        mem.write_slice(&[0u8; 4], GuestAddress(driver))
            .expect("ring inside guest memory");
        mem.write_slice(&[0u8; 4], GuestAddress(device))
            .expect("ring inside guest memory");
        PackedRing {
            size,
            desc,
            driver,
            device,
            event_idx,
            free_ids: (0..size).rev().collect(),
            taken: vec![0; usize::from(size)],
            free_slots: size,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            pending: vec![(0, 0); usize::from(size)],
            unkicked: false,
        }
    }

    fn wrap_bits(wrap: bool) -> u16 {
        if wrap {
            P_AVAIL
        } else {
            P_USED
        }
    }

    /// Writes one 16-byte packed descriptor (flags included) at `at`.
    pub fn write_raw(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, id: u16, flags: u16) {
        write_desc16(mem, at, addr, len, id, flags);
    }

    /// Places a chain (or one indirect descriptor for a table at
    /// `indirect` that the caller owns) and returns its buffer id, or None
    /// without room. The head's flags are written by `publish`.
    pub fn add(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[Buf],
        indirect: Option<u64>,
    ) -> Option<u16> {
        let need = if indirect.is_some() { 1 } else { bufs.len() };
        let need16 = u16::try_from(need).ok()?;
        if bufs.is_empty() || self.free_slots < need16 {
            return None;
        }
        let id = self.free_ids.pop()?;
        let head = self.next_avail;
        let mut head_flags = 0;
        let write = |b: &Buf| if b.write { P_WRITE } else { 0 };
        match indirect {
            Some(table) => {
                for (k, b) in bufs.iter().enumerate() {
                    Self::write_raw(mem, table + 16 * k as u64, b.addr, b.len, 0, write(b));
                }
                let len = u32::try_from(16 * bufs.len()).unwrap_or(u32::MAX);
                head_flags = P_INDIRECT | Self::wrap_bits(self.avail_wrap);
                Self::write_raw(mem, self.desc + 16 * u64::from(head), table, len, id, 0);
                self.step_avail();
            }
            None => {
                for (k, b) in bufs.iter().enumerate() {
                    let flags = write(b)
                        | if k + 1 < bufs.len() { P_NEXT } else { 0 }
                        | Self::wrap_bits(self.avail_wrap);
                    let at = self.desc + 16 * u64::from(self.next_avail);
                    if k == 0 {
                        head_flags = flags;
                        Self::write_raw(mem, at, b.addr, b.len, id, 0);
                    } else {
                        Self::write_raw(mem, at, b.addr, b.len, id, flags);
                    }
                    self.step_avail();
                }
            }
        }
        self.free_slots -= need16;
        self.taken[usize::from(id)] = need16;
        self.pending[usize::from(id)] = (head, head_flags);
        Some(id)
    }

    fn step_avail(&mut self) {
        self.next_avail += 1;
        if self.next_avail == self.size {
            self.next_avail = 0;
            self.avail_wrap = !self.avail_wrap;
        }
    }

    /// Makes buffer `id` available: its head's flags, after everything else.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, id: u16) {
        let (head, flags) = self.pending[usize::from(id)];
        fence(Ordering::Release);
        store16(mem, self.desc + 16 * u64::from(head) + 14, flags);
        self.unkicked = true;
    }

    /// Whether the device wants a doorbell (its event structure does not
    /// disable them) for what was made available since the last one.
    pub fn kick_needed(&mut self, mem: &GuestMemoryMmap) -> bool {
        fence(Ordering::SeqCst);
        if !std::mem::take(&mut self.unkicked) {
            return false;
        }
        load16(mem, self.device + 2) & 3 != P_EVENT_DISABLE
    }

    /// Takes the next used element (id, length), freeing its descriptors.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let at = self.desc + 16 * u64::from(self.next_used);
        let flags = load16(mem, at + 14);
        let avail = flags & P_AVAIL != 0;
        let used = flags & P_USED != 0;
        if avail != self.used_wrap || used != self.used_wrap {
            return None;
        }
        fence(Ordering::Acquire);
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(at))
            .expect("ring inside guest memory");
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let id = u16::from_le_bytes([b[12], b[13]]);
        let n = *self.taken.get(usize::from(id))?;
        if n == 0 {
            return None;
        }
        self.taken[usize::from(id)] = 0;
        self.free_slots += n;
        self.free_ids.push(id);
        let p = u32::from(self.next_used) + u32::from(n);
        if p >= u32::from(self.size) {
            self.next_used = u16::try_from(p - u32::from(self.size)).unwrap_or(0);
            self.used_wrap = !self.used_wrap;
        } else {
            self.next_used = u16::try_from(p).unwrap_or(0);
        }
        Some((id, len))
    }

    /// Asks for an interrupt at the next used element (EVENT_IDX: at this
    /// position and wrap; otherwise for every one). Returns true if used
    /// elements already wait.
    pub fn enable_interrupts(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.event_idx {
            let off = self.next_used | if self.used_wrap { 1 << 15 } else { 0 };
            store16(mem, self.driver, off);
            store16(mem, self.driver + 2, P_EVENT_DESC);
        } else {
            store16(mem, self.driver + 2, 0);
        }
        fence(Ordering::SeqCst);
        let flags = load16(mem, self.desc + 16 * u64::from(self.next_used) + 14);
        (flags & P_AVAIL != 0) == self.used_wrap && (flags & P_USED != 0) == self.used_wrap
    }

    /// Tells the device not to interrupt.
    pub fn disable_interrupts(&mut self, mem: &GuestMemoryMmap) {
        store16(mem, self.driver + 2, P_EVENT_DISABLE);
    }

    pub fn free_descriptors(&self) -> usize {
        usize::from(self.free_slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_come_back_to_the_free_list() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut r = SplitRing::new(&mem, 4, 0x1000, 0x2000, 0x3000, false);
        let bufs = [
            Buf {
                addr: 0x8000,
                len: 16,
                write: false,
            },
            Buf {
                addr: 0x9000,
                len: 1,
                write: true,
            },
        ];
        let h = r.add(&mem, &bufs, None).unwrap();
        assert_eq!(r.free_descriptors(), 2);
        r.publish(&mem, h);
        assert!(r.kick_needed(&mem));
        assert!(!r.kick_needed(&mem), "nothing new since the last doorbell");
        // Device side: one used entry.
        mem.write_obj(u32::from(h), GuestAddress(0x3004)).unwrap();
        mem.write_obj(1u32, GuestAddress(0x3008)).unwrap();
        store16(&mem, 0x3002, 1);
        assert_eq!(r.pop_used(&mem), Some((h, 1)));
        assert_eq!(r.pop_used(&mem), None);
        assert_eq!(r.free_descriptors(), 4);
        // NO_NOTIFY from the device suppresses the doorbell.
        store16(&mem, 0x3000, USED_F_NO_NOTIFY);
        let h = r.add(&mem, &bufs, Some(0xa000)).unwrap();
        assert_eq!(r.free_descriptors(), 3);
        r.publish(&mem, h);
        assert!(!r.kick_needed(&mem));
    }
}
