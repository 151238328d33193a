//! What a virtio-blk request asks of the backend, decided before any I/O,
//! and the execution of that I/O.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    /// SEG_MAX and SIZE_MAX, as advertised.
    pub limits: ChainLimits,
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
        if let Some(e) = &c.refused {
            return Err(e.clone());
        }
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

    /// Runs a read or a buffered write at once if it cannot block (page
    /// cache); `None` means it must go to the I/O pool.
    pub fn try_nowait(&self, op: &Op, iov: &[GuestIov]) -> Option<io::Result<()>> {
        match op {
            Op::Read(offset) => self.backend.try_nowait(iov, *offset, false),
            Op::Write {
                offset,
                sync: false,
            } => self.backend.try_nowait(iov, *offset, true),
            _ => None,
        }
    }

    /// The status for a finished backend operation, with the error logged.
    pub fn status_of(&self, op: &Op, r: &io::Result<()>) -> u8 {
        match r {
            Ok(()) => status_u8(VIRTIO_BLK_S_OK),
            // Discard is advisory (as QEMU treats it): a file system that
            // cannot punch holes has still done what was asked.
            Err(e)
                if matches!(op, Op::Discard(_)) && e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                status_u8(VIRTIO_BLK_S_OK)
            }
            Err(e) => {
                crate::warn_limited!("backend error on {op:?}: {e}");
                status_u8(VIRTIO_BLK_S_IOERR)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct Counting {
        writes: AtomicUsize,
        flushes: AtomicUsize,
    }

    impl Backend for Counting {
        fn read_at(&self, _: &[GuestIov], _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_at(&self, _: &[GuestIov], _: u64) -> io::Result<()> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn inline(&self) -> bool {
            true
        }
    }

    fn ctx(be: Arc<Counting>, write_through: bool) -> BlkContext {
        BlkContext {
            backend: be,
            capacity: 2048,
            block: 512,
            readonly: false,
            serial: [0; 20],
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1 << 22,
            max_write_zeroes_sectors: 1 << 22,
            max_dwz_segs: 32,
            write_through: Arc::new(AtomicBool::new(write_through)),
            on_error: ErrorPolicy::Report,
            limits: ChainLimits {
                max_descs: 256,
                size_max: 1 << 20,
            },
        }
    }

    fn write_chain(mem: &GuestMemoryMmap) -> Chain {
        let mut h = Vec::new();
        h.extend_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&4u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x1000)).unwrap();
        Chain {
            head: 0,
            readable: vec![
                Seg {
                    addr: 0x1000,
                    len: 16,
                },
                Seg {
                    addr: 0x2000,
                    len: 512,
                },
            ],
            writable: vec![],
            status: Some(0x3000),
            readable_after_writable: false,
            refused: None,
        }
    }

    #[test]
    fn write_through_flushes_every_write_and_writeback_does_not() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let c = write_chain(&mem);
        for (wt, flushes) in [(true, 1), (false, 0)] {
            let be = Arc::new(Counting::default());
            let ctx = ctx(be.clone(), wt);
            let Ok(Prepared::Io { op, iov, used }) = ctx.prepare(&mem, &c) else {
                panic!("a write needs I/O");
            };
            assert_eq!(used, 1);
            ctx.execute(&op, &iov).unwrap();
            assert_eq!(be.writes.load(Ordering::SeqCst), 1);
            assert_eq!(
                be.flushes.load(Ordering::SeqCst),
                flushes,
                "write-through {wt}"
            );
        }
    }

    /// Regression (issue 8, item 7): discard is advisory, so a backend that
    /// cannot punch holes (EOPNOTSUPP) still completes it OK, as QEMU does;
    /// write-zeroes is not advisory.
    #[test]
    fn discard_not_supported_by_the_backend_completes_ok() {
        let ctx = ctx(Arc::new(Counting::default()), false);
        let e = || Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        assert_eq!(
            ctx.status_of(&Op::Discard(vec![(0, 512)]), &e()),
            status_u8(VIRTIO_BLK_S_OK)
        );
        assert_eq!(
            ctx.status_of(&Op::WriteZeroes(vec![(0, 512)], false), &e()),
            status_u8(VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(
            ctx.status_of(
                &Op::Discard(vec![(0, 512)]),
                &Err(io::Error::from_raw_os_error(libc::EIO))
            ),
            status_u8(VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn bad_requests_get_their_status() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let be = Arc::new(Counting::default());
        let ctx = ctx(be, false);
        // Header shorter than 16 bytes.
        let mut c = write_chain(&mem);
        c.readable = vec![Seg {
            addr: 0x1000,
            len: 12,
        }];
        assert_eq!(
            ctx.prepare(&mem, &c).err(),
            Some(RequestError::ShortHeader(12))
        );
        // Data outside guest memory.
        let mut c = write_chain(&mem);
        c.readable[1].addr = 0x20000;
        let e = ctx.prepare(&mem, &c).err().unwrap();
        assert!(matches!(e, RequestError::OutsideMemory { .. }));
        assert_eq!(e.status(), status_u8(VIRTIO_BLK_S_IOERR));
        // A data buffer that runs off the end of guest memory.
        let mut c = write_chain(&mem);
        c.readable[1] = Seg {
            addr: 0xfe00,
            len: 1024,
        };
        assert!(matches!(
            ctx.prepare(&mem, &c),
            Err(RequestError::OutsideMemory { .. })
        ));
        // Readable after writable.
        let mut c = write_chain(&mem);
        c.readable_after_writable = true;
        assert_eq!(
            ctx.prepare(&mem, &c).err(),
            Some(RequestError::ReadableAfterWritable)
        );
    }
}
