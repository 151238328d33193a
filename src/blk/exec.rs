//! What a virtio-blk request asks of the backend, decided before any I/O,
//! and the execution of that I/O.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_blk::*;
use vm_memory::GuestMemoryMmap;

use super::request::*;
use crate::backend::io::{Backend, GuestIov};

/// What to do when the backend fails a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ErrorPolicy {
    /// Answer IOERR and go on (QEMU's werror=report).
    Report,
    /// Stop the queue until the driver resets the device (QEMU's werror=stop).
    Stop,
}

/// Everything a poller needs to serve virtio-blk requests.
pub struct BlkContext {
    pub backend: Arc<dyn Backend>,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size in bytes.
    pub block: u64,
    pub readonly: bool,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Negotiated DISCARD / WRITE_ZEROES.
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_dwz_segs: u32,
    /// Writes complete only once durable (write-through cache).
    pub write_through: Arc<AtomicBool>,
    pub on_error: ErrorPolicy,
}

/// A backend operation.
#[derive(Debug)]
pub enum Op {
    Read(u64),
    Write { offset: u64, sync: bool },
    Flush,
    Discard(Vec<(u64, u64)>),
    WriteZeroes(Vec<(u64, u64)>, bool),
}

/// A request after validation.
pub enum Prepared {
    /// Answered without backend I/O: the status and the used length.
    Done { status: u8, used: u32 },
    /// Needs the backend; `used` is the used length on success.
    Io {
        op: Op,
        iov: Vec<GuestIov>,
        used: u32,
    },
}

fn used_len(bytes: u64) -> u32 {
    u32::try_from(bytes + 1).unwrap_or(u32::MAX)
}

impl BlkContext {
    /// Validates a walked chain and says what it needs. Never touches the
    /// backend; every check on guest input happens here.
    pub fn prepare(&self, mem: &GuestMemoryMmap, c: &Chain) -> Result<Prepared, RequestError> {
        if c.readable_after_writable {
            return Err(RequestError::ReadableAfterWritable);
        }
        let h = read_header(mem, c)?;
        let out_len = total_len(&c.readable) - HEADER_SIZE as u64;
        let in_len = total_len(&c.writable);
        match h.kind {
            VIRTIO_BLK_T_IN => {
                let offset = check_range(h.sector, in_len, self.capacity, self.block)?;
                let mut iov = Vec::with_capacity(c.writable.len());
                iovecs(mem, &c.writable, 0, &mut iov)?;
                Ok(Prepared::Io {
                    op: Op::Read(offset),
                    iov,
                    used: used_len(in_len),
                })
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return Err(RequestError::ReadOnly);
                }
                let offset = check_range(h.sector, out_len, self.capacity, self.block)?;
                let mut iov = Vec::with_capacity(c.readable.len());
                iovecs(mem, &c.readable, HEADER_SIZE as u64, &mut iov)?;
                Ok(Prepared::Io {
                    op: Op::Write {
                        offset,
                        sync: self.write_through.load(Ordering::Relaxed),
                    },
                    iov,
                    used: 1,
                })
            }
            VIRTIO_BLK_T_FLUSH => Ok(Prepared::Io {
                op: Op::Flush,
                iov: Vec::new(),
                used: 1,
            }),
            VIRTIO_BLK_T_GET_ID => {
                let n = scatter(mem, &c.writable, &self.serial)?;
                Ok(Prepared::Done {
                    status: status_u8(VIRTIO_BLK_S_OK),
                    used: used_len(n as u64),
                })
            }
            VIRTIO_BLK_T_DISCARD if self.discard => {
                let ranges = self.dwz_ranges(mem, c, self.max_discard_sectors, false)?;
                Ok(Prepared::Io {
                    op: Op::Discard(ranges.0),
                    iov: Vec::new(),
                    used: 1,
                })
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.write_zeroes => {
                let (ranges, unmap) =
                    self.dwz_ranges(mem, c, self.max_write_zeroes_sectors, true)?;
                Ok(Prepared::Io {
                    op: Op::WriteZeroes(ranges, unmap),
                    iov: Vec::new(),
                    used: 1,
                })
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    fn dwz_ranges(
        &self,
        mem: &GuestMemoryMmap,
        c: &Chain,
        max_sectors: u32,
        write_zeroes: bool,
    ) -> Result<(Vec<(u64, u64)>, bool), RequestError> {
        let segs = read_dwz_segments(mem, c, self.max_dwz_segs)?;
        if self.readonly {
            return Err(RequestError::ReadOnly);
        }
        let allowed_flags = if write_zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        let mut unmap = true;
        let mut out = Vec::with_capacity(segs.len());
        for s in segs {
            if s.flags & !allowed_flags != 0 {
                return Err(RequestError::BadSegments(format!("flags {:#x}", s.flags)));
            }
            if s.num_sectors > max_sectors {
                return Err(RequestError::BadSegments(format!(
                    "{} sectors > limit {max_sectors}",
                    s.num_sectors
                )));
            }
            unmap &= s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let bytes = u64::from(s.num_sectors) << SECTOR_SHIFT;
            let offset = check_range(s.sector, bytes, self.capacity, self.block)?;
            out.push((offset, bytes));
        }
        Ok((out, unmap))
    }

    /// Runs a backend operation.
    pub fn execute(&self, op: &Op, iov: &[GuestIov]) -> io::Result<()> {
        let be = &self.backend;
        match op {
            Op::Read(offset) => be.read_at(iov, *offset),
            Op::Write { offset, sync } => {
                be.write_at(iov, *offset)?;
                if *sync {
                    be.flush()?;
                }
                Ok(())
            }
            Op::Flush => be.flush(),
            Op::Discard(ranges) => ranges.iter().try_for_each(|&(o, l)| be.discard(o, l)),
            Op::WriteZeroes(ranges, unmap) => ranges
                .iter()
                .try_for_each(|&(o, l)| be.write_zeroes(o, l, *unmap)),
        }
    }

    /// The status for a finished backend operation, with the error logged.
    pub fn status_of(&self, op: &Op, r: &io::Result<()>) -> u8 {
        match r {
            Ok(()) => status_u8(VIRTIO_BLK_S_OK),
            Err(e) => {
                warn!("backend error on {op:?}: {e}");
                status_u8(VIRTIO_BLK_S_IOERR)
            }
        }
    }
}
