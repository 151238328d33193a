//! Turning a descriptor chain into a virtio-blk request.
//!
//! The whole chain is walked and validated before any I/O: the header may be
//! split over several descriptors, data may be in any number of them, and
//! the status byte is the last device-writable byte. Errors come in two
//! kinds: a broken chain (the ring itself is unusable: the queue stops) and
//! a bad request (answered with a status byte, the queue goes on).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::GuestBuffers;
use crate::virtio::ring::{Desc, DescSource};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 512;
/// Size of `virtio_blk_outhdr`.
pub const HEADER_SIZE: usize = 16;
/// Size of one discard / write-zeroes segment.
pub const DWZ_SEG_SIZE: usize = 16;

/// A status byte value. Bindings spell them as u32; they all fit in 8 bits.
pub fn status_u8(s: u32) -> u8 {
    u8::try_from(s).unwrap_or(u8::MAX)
}

/// A range of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
}

pub use crate::virtio::ring::ChainError;

/// The request is answered with a status, the queue goes on.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("header of {0} bytes, need {HEADER_SIZE}")]
    ShortHeader(usize),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("buffer {addr:#x}+{len} is outside guest memory (is guest RAM shared? QEMU needs memory-backend-memfd,share=on)")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("request of {0} bytes is not a multiple of the block size")]
    Unaligned(u64),
    #[error("sectors {sector}+{count} past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("bad discard/write-zeroes payload: {0}")]
    BadSegments(String),
    #[error("chain of {count} descriptors; seg_max allows {max}")]
    TooManySegments { count: usize, max: usize },
    #[error("indirect chain longer than the queue ({0} descriptors); not read further")]
    IndirectTooLong(u16),
    #[error("descriptor of {len} bytes; size_max is {max}")]
    SegmentTooLong { len: u32, max: u32 },
}

impl RequestError {
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::BadSegments(_) => {
                status_u8(VIRTIO_BLK_S_UNSUPP)
            }
            _ => status_u8(VIRTIO_BLK_S_IOERR),
        }
    }
}

/// What a chain may hold; larger chains are answered, not served.
#[derive(Clone, Copy, Debug)]
pub struct ChainLimits {
    /// Descriptors in one chain, header and status included (seg_max + 2).
    pub max_descs: usize,
    /// Bytes in one descriptor (size_max).
    pub size_max: u32,
}

/// A validated chain: its parts, before interpretation. Holds at most
/// `max_descs` segments, whatever the chain claims.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
    /// The device-writable status byte, if the chain has one.
    pub status: Option<u64>,
    pub readable_after_writable: bool,
    /// Why the chain is answered without being served: too many
    /// descriptors, or one larger than size_max.
    pub refused: Option<RequestError>,
}

/// Walks a chain, reading at most `queue_size` descriptors (an indirect table
/// may claim up to 65535) and keeping at most `limits.max_descs` of them:
/// what it allocates never depends on what the guest claims.
/// Descriptor addresses are not checked here (only the descriptor table is
/// read); buffers are checked when used.
pub fn walk<C: DescSource>(
    chain: C,
    queue_size: u16,
    limits: ChainLimits,
) -> Result<Chain, ChainError> {
    let mut c = Chain::default();
    walk_into(chain, queue_size, limits, &mut c)?;
    Ok(c)
}

/// [`walk`] into a chain that is reused from request to request: once its
/// vectors have grown to `limits.max_descs`, walking allocates nothing.
pub fn walk_into<C: DescSource>(
    mut chain: C,
    queue_size: u16,
    limits: ChainLimits,
    c: &mut Chain,
) -> Result<(), ChainError> {
    let head = chain.head_index();
    if head >= queue_size {
        return Err(ChainError::HeadOutOfRange(head));
    }
    c.restart(head);
    let mut last: Option<Desc> = None;
    // The last writable descriptor is kept even when the chain is too long
    // to keep, so that the refusal can still be answered in its status byte.
    let mut last_writable: Option<Seg> = None;
    let mut count = 0usize;
    while let Some(d) = chain.next_desc() {
        count += 1;
        if count > usize::from(queue_size) {
            // Direct chains stop at the queue size by themselves: only an
            // indirect table (up to 65535 entries) gets here. It is not read
            // further, so its status byte is unknown: the request is
            // returned with nothing written, and the queue goes on.
            c.drop_segments();
            c.refused = Some(RequestError::IndirectTooLong(queue_size));
            return Ok(());
        }
        if d.write && d.len > 0 {
            last_writable = Some(Seg {
                addr: d.addr,
                len: d.len,
            });
        }
        c.keep(&d, count, limits);
        last = Some(d);
    }
    // The iterator stops early, with the last descriptor still pointing on,
    // on a loop, a too-long chain, or an unreadable descriptor or table.
    match last {
        Some(d) if !d.next => {}
        _ => return Err(ChainError::Unterminated),
    }
    if count > limits.max_descs {
        c.refused = Some(RequestError::TooManySegments {
            count,
            max: limits.max_descs,
        });
        c.drop_segments();
        // Only the status byte is used.
        c.status = last_writable.and_then(|s| s.addr.checked_add(u64::from(s.len) - 1));
        return Ok(());
    }
    c.split_status();
    Ok(())
}

impl Chain {
    /// Empties the chain for the one at `head`, keeping its vectors.
    fn restart(&mut self, head: u16) {
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        self.status = None;
        self.readable_after_writable = false;
        self.refused = None;
    }

    /// Forgets the segments of a chain that is refused whole.
    fn drop_segments(&mut self) {
        self.readable.clear();
        self.writable.clear();
        self.readable_after_writable = false;
    }

    /// Takes descriptor `d`, the `count`th of the chain: its segment while
    /// the chain is within `limits`, and the first refusal it earns.
    fn keep(&mut self, d: &Desc, count: usize, limits: ChainLimits) {
        if d.len > limits.size_max && self.refused.is_none() {
            self.refused = Some(RequestError::SegmentTooLong {
                len: d.len,
                max: limits.size_max,
            });
        }
        if d.len == 0 || count > limits.max_descs {
            return;
        }
        let seg = Seg {
            addr: d.addr,
            len: d.len,
        };
        if d.write {
            self.writable.push(seg);
        } else {
            if !self.writable.is_empty() {
                self.readable_after_writable = true;
            }
            self.readable.push(seg);
        }
    }

    /// Splits off the status byte: the last writable byte. A buffer that
    /// wraps past the end of the address space has none.
    fn split_status(&mut self) {
        let Some(seg) = self.writable.last_mut() else {
            return;
        };
        if let Some(status) = seg.addr.checked_add(u64::from(seg.len) - 1) {
            self.status = Some(status);
            seg.len -= 1;
            if seg.len == 0 {
                self.writable.pop();
            }
        }
    }
}

/// Total length of segments.
pub fn total_len(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Copies `buf.len()` bytes starting `skip` bytes into the segments.
pub fn gather(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = usize::try_from(len - skip)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        let outside = |addr| RequestError::OutsideMemory {
            addr,
            len: n as u64,
        };
        let addr = s.addr.checked_add(skip).ok_or(outside(s.addr))?;
        mem.read_slice(&mut buf[done..done + n], GuestAddress(addr))
            .map_err(|_| outside(addr))?;
        done += n;
        skip = 0;
    }
    Ok(())
}

/// Copies `data` into the segments, from their start; returns bytes written.
pub fn scatter(mem: &GuestMemoryMmap, segs: &[Seg], data: &[u8]) -> Result<usize, RequestError> {
    let mut done = 0;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = usize::try_from(s.len)
            .unwrap_or(usize::MAX)
            .min(data.len() - done);
        mem.write_slice(&data[done..done + n], GuestAddress(s.addr))
            .map_err(|_| RequestError::OutsideMemory {
                addr: s.addr,
                len: n as u64,
            })?;
        done += n;
    }
    Ok(done)
}

/// Host iovecs for the segments, skipping the first `skip` bytes. A segment
/// may span two DMA windows and becomes two iovecs then.
pub fn iovecs(
    mem: &Arc<GuestMemoryMmap>,
    segs: &[Seg],
    mut skip: u64,
    out: &mut GuestBuffers,
) -> Result<(), RequestError> {
    for s in segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = len - skip;
        let outside = RequestError::OutsideMemory {
            addr: s.addr,
            len: n,
        };
        // Both ends must be real addresses: nothing wraps past 2^64.
        let addr = s
            .addr
            .checked_add(skip)
            .filter(|a| a.checked_add(n).is_some())
            .ok_or(outside.clone())?;
        skip = 0;
        let count = usize::try_from(n).map_err(|_| outside.clone())?;
        // This fails on the first byte that is not mapped, so it is also
        // the range check.
        out.push(mem, addr, count).map_err(|_| outside.clone())?;
    }
    Ok(())
}

/// Writes the status byte.
pub fn write_status(mem: &GuestMemoryMmap, addr: u64, status: u8) -> bool {
    mem.store(status, GuestAddress(addr), Ordering::Release)
        .is_ok()
}

/// The parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub sector: u64,
}

pub fn read_header(mem: &GuestMemoryMmap, c: &Chain) -> Result<Header, RequestError> {
    let have = total_len(&c.readable);
    if have < HEADER_SIZE as u64 {
        return Err(RequestError::ShortHeader(
            usize::try_from(have).unwrap_or(0),
        ));
    }
    let mut h = [0u8; HEADER_SIZE];
    gather(mem, &c.readable, 0, &mut h)?;
    Ok(Header {
        kind: le32(&h, 0),
        sector: le64(&h, 8),
    })
}

/// The little-endian u32 at `at` in `b` (which holds it).
fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// The little-endian u64 at `at` in `b` (which holds it).
fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Checks `sector + bytes` against the capacity, in sectors, before any byte
/// offset is computed; returns the byte offset.
pub fn check_range(
    sector: u64,
    bytes: u64,
    capacity: u64,
    block: u64,
) -> Result<u64, RequestError> {
    let sectors_per_block = (block / SECTOR_SIZE).max(1);
    if !bytes.is_multiple_of(block) || !sector.is_multiple_of(sectors_per_block) {
        return Err(RequestError::Unaligned(bytes));
    }
    let count = bytes >> SECTOR_SHIFT;
    if sector > capacity || count > capacity - sector {
        return Err(RequestError::OutOfRange {
            sector,
            count,
            capacity,
        });
    }
    Ok(sector << SECTOR_SHIFT)
}

/// One discard / write-zeroes segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DwzSeg {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Calls `f` with each discard / write-zeroes segment that follows the
/// header, after checking how many there are.
pub fn for_each_dwz_segment(
    mem: &GuestMemoryMmap,
    c: &Chain,
    max_segs: u32,
    mut f: impl FnMut(DwzSeg) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    let len = total_len(&c.readable) - HEADER_SIZE as u64;
    if len == 0 || !len.is_multiple_of(DWZ_SEG_SIZE as u64) {
        return Err(RequestError::BadSegments(format!(
            "{len} bytes of segments"
        )));
    }
    let n = len / DWZ_SEG_SIZE as u64;
    if n > u64::from(max_segs) {
        return Err(RequestError::BadSegments(format!(
            "{n} segments > {max_segs}"
        )));
    }
    for i in 0..n {
        let mut b = [0u8; DWZ_SEG_SIZE];
        gather(
            mem,
            &c.readable,
            HEADER_SIZE as u64 + i * DWZ_SEG_SIZE as u64,
            &mut b,
        )?;
        f(DwzSeg {
            sector: le64(&b, 0),
            num_sectors: le32(&b, 8),
            flags: le32(&b, 12),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_in_sectors() {
        assert_eq!(check_range(0, 4096, 8, 512), Ok(0));
        assert_eq!(check_range(7, 512, 8, 512), Ok(7 * 512));
        assert!(matches!(
            check_range(7, 1024, 8, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(9, 0, 8, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        // sector << 9 would wrap: refused before any offset is computed.
        assert!(matches!(
            check_range(u64::MAX, 512, 8, 512),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(0, 100, 8, 512),
            Err(RequestError::Unaligned(100))
        ));
        // 4 KiB logical blocks: the start must be aligned too.
        assert!(matches!(
            check_range(1, 4096, 64, 4096),
            Err(RequestError::Unaligned(_))
        ));
        assert_eq!(check_range(8, 4096, 64, 4096), Ok(4096));
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            u16::try_from(flags).unwrap(),
            next,
        ))
    }

    fn walk_first(descs: &[RawDescriptor]) -> Result<Chain, ChainError> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = q.iter(&mem).unwrap().next().unwrap();
        walk(
            chain,
            16,
            ChainLimits {
                max_descs: 6,
                size_max: 4096,
            },
        )
    }

    #[test]
    fn header_data_status_in_any_split() {
        let c = walk_first(&[
            desc(0x1000, 10, VRING_DESC_F_NEXT, 1),
            desc(0x2000, 6, VRING_DESC_F_NEXT, 2),
            desc(0x3000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 3),
            desc(0x4000, 1, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        assert_eq!(total_len(&c.readable), 16);
        assert_eq!(
            c.writable,
            vec![Seg {
                addr: 0x3000,
                len: 512
            }]
        );
        assert_eq!(c.status, Some(0x4000));
        // Status byte sharing the data descriptor.
        let c = walk_first(&[
            desc(0x1000, 16, VRING_DESC_F_NEXT, 1),
            desc(0x3000, 513, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        assert_eq!(
            c.writable,
            vec![Seg {
                addr: 0x3000,
                len: 512
            }]
        );
        assert_eq!(c.status, Some(0x3000 + 512));
        // No writable byte: no status.
        let c = walk_first(&[desc(0x1000, 16, 0, 0)]).unwrap();
        assert_eq!(c.status, None);
    }

    /// Regression (issue 8, bug 4): chains over seg_max + 2 descriptors and
    /// descriptors over size_max are refused with their status byte, and
    /// nothing of them is kept.
    #[test]
    fn seg_max_and_size_max_are_enforced() {
        let mut d: Vec<RawDescriptor> = (0..7)
            .map(|i| {
                desc(
                    0x1000 + i * 0x100,
                    16,
                    VRING_DESC_F_NEXT,
                    u16::try_from(i + 1).unwrap(),
                )
            })
            .collect();
        d.push(desc(0x9000, 1, VRING_DESC_F_WRITE, 0));
        let c = walk_first(&d).unwrap();
        assert!(matches!(
            c.refused,
            Some(RequestError::TooManySegments { count: 8, max: 6 })
        ));
        assert!(c.readable.is_empty() && c.writable.is_empty());
        assert_eq!(c.status, Some(0x9000));
        let c = walk_first(&[
            desc(0x1000, 16, VRING_DESC_F_NEXT, 1),
            desc(0x3000, 8192, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
            desc(0x9000, 1, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        assert!(matches!(
            c.refused,
            Some(RequestError::SegmentTooLong { len: 8192, .. })
        ));
        assert_eq!(c.status, Some(0x9000));
    }

    #[test]
    fn readable_after_writable_is_flagged() {
        let c = walk_first(&[
            desc(0x1000, 16, VRING_DESC_F_NEXT, 1),
            desc(0x3000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
            desc(0x2000, 8, VRING_DESC_F_NEXT, 3),
            desc(0x4000, 1, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        assert!(c.readable_after_writable);
    }
}
