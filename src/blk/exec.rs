//! What a virtio-blk request asks of the backend, decided before any I/O,
//! and its answer: the device's [`RequestHandler`] for the engine.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use vm_memory::GuestMemoryMmap;

use super::request::*;
use crate::backend::io::Backend;
use crate::backend::request::{IoKind, IoRequest};
use crate::engine::{Finish, Prepared, QueueStats, RequestHandler};
use crate::events::Event;

/// What to do when the backend fails a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ErrorPolicy {
    /// Answer IOERR and go on (QEMU's werror=report).
    Report,
    /// Stop the queue until the driver resets the device (QEMU's werror=stop).
    Stop,
}

/// Everything a reactor needs to serve virtio-blk requests of one device
/// activation.
pub struct BlkContext {
    pub backend: Arc<dyn Backend>,
    /// Capacity in 512-byte sectors (changes with a resize).
    pub capacity: Arc<AtomicU64>,
    /// Logical block size in bytes.
    pub block: u64,
    pub readonly: bool,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Negotiated DISCARD / WRITE_ZEROES.
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// Segments of one discard, and of one write-zeroes request.
    pub max_discard_segs: u32,
    pub max_write_zeroes_segs: u32,
    /// Writes complete only once durable (write-through cache).
    pub write_through: Arc<AtomicBool>,
    pub on_error: ErrorPolicy,
    /// SEG_MAX and SIZE_MAX, as advertised.
    pub limits: ChainLimits,
    /// Entries of each queue (chains are never read past it).
    pub queue_size: u16,
    /// The device's log (its name, its limit on guest-caused lines).
    pub log: Arc<crate::util::DeviceLog>,
}

/// What a validated request needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Answered without backend I/O: the status and the used length.
    Done { status: u8, used: u32 },
    /// The backend operation in the `IoRequest`; `used` on success.
    Io { used: u32 },
}

/// The request kinds counted in statistics, by index.
pub const REQUEST_KINDS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "get_id",
    "discard",
    "write_zeroes",
    "other",
];
/// The error outcomes counted in statistics, by index: IOERR, UNSUPP, and
/// requests answered without a status byte (or left unanswered).
pub const ERROR_KINDS: [&str; 3] = ["ioerr", "unsupp", "no_status"];

fn kind_index(vtype: u32) -> usize {
    match vtype {
        VIRTIO_BLK_T_IN => 0,
        VIRTIO_BLK_T_OUT => 1,
        VIRTIO_BLK_T_FLUSH => 2,
        VIRTIO_BLK_T_GET_ID => 3,
        VIRTIO_BLK_T_DISCARD => 4,
        VIRTIO_BLK_T_WRITE_ZEROES => 5,
        _ => 6,
    }
}

/// Per-request state, reused from request to request (one per ring entry).
#[derive(Debug, Default)]
pub struct BlkReq {
    /// The request type from the header (u32::MAX: no header).
    vtype: u32,
    /// Bytes of data the request moves (read or written) on success.
    data_len: u64,
    chain: Chain,
    /// The status byte to answer when no backend I/O ran.
    ready_status: u8,
    /// The used length on success.
    ok_used: u32,
    /// The backend operation, when there was one.
    kind: IoKind,
}

fn used_len(bytes: u64) -> u32 {
    u32::try_from(bytes + 1).unwrap_or(u32::MAX)
}

impl BlkContext {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Validates a walked chain and fills `io` with what it needs. Never
    /// touches the backend; every check on guest input happens here.
    pub fn plan(
        &self,
        mem: &Arc<GuestMemoryMmap>,
        c: &Chain,
        io: &mut IoRequest,
    ) -> Result<Plan, RequestError> {
        if let Some(e) = &c.refused {
            return Err(e.clone());
        }
        let h = read_header(mem, c)?;
        self.plan_header(h, mem, c, io)
    }

    /// [`plan`](Self::plan) once the header is read.
    fn plan_header(
        &self,
        h: Header,
        mem: &Arc<GuestMemoryMmap>,
        c: &Chain,
        io: &mut IoRequest,
    ) -> Result<Plan, RequestError> {
        if c.readable_after_writable {
            return Err(RequestError::ReadableAfterWritable);
        }
        let out_len = total_len(&c.readable) - HEADER_SIZE as u64;
        let in_len = total_len(&c.writable);
        match h.kind {
            VIRTIO_BLK_T_IN => {
                let offset = check_range(h.sector, in_len, self.capacity(), self.block)?;
                io.reset(IoKind::Read);
                io.offset = offset;
                iovecs(mem, &c.writable, 0, &mut io.iov)?;
                Ok(Plan::Io {
                    used: used_len(in_len),
                })
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return Err(RequestError::ReadOnly);
                }
                let offset = check_range(h.sector, out_len, self.capacity(), self.block)?;
                io.reset(IoKind::Write);
                io.offset = offset;
                io.sync = self.write_through.load(Ordering::Relaxed);
                iovecs(mem, &c.readable, HEADER_SIZE as u64, &mut io.iov)?;
                Ok(Plan::Io { used: 1 })
            }
            VIRTIO_BLK_T_FLUSH => {
                io.reset(IoKind::Flush);
                Ok(Plan::Io { used: 1 })
            }
            VIRTIO_BLK_T_GET_ID => {
                // The serial is written when the request finishes (after
                // the engine has checked where it goes).
                let n = total_len(&c.writable).min(self.serial.len() as u64);
                Ok(Plan::Done {
                    status: status_u8(VIRTIO_BLK_S_OK),
                    used: used_len(n),
                })
            }
            VIRTIO_BLK_T_DISCARD if self.discard => {
                io.reset(IoKind::Discard);
                self.dwz_ranges(mem, c, self.max_discard_sectors, io)?;
                Ok(Plan::Io { used: 1 })
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.write_zeroes => {
                io.reset(IoKind::WriteZeroes);
                self.dwz_ranges(mem, c, self.max_write_zeroes_sectors, io)?;
                Ok(Plan::Io { used: 1 })
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    fn dwz_ranges(
        &self,
        mem: &GuestMemoryMmap,
        c: &Chain,
        max_sectors: u32,
        io: &mut IoRequest,
    ) -> Result<(), RequestError> {
        let write_zeroes = io.kind == IoKind::WriteZeroes;
        let allowed_flags = if write_zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        let mut unmap = true;
        let ranges = &mut io.ranges;
        let max_segs = if write_zeroes {
            self.max_write_zeroes_segs
        } else {
            self.max_discard_segs
        };
        for_each_dwz_segment(mem, c, max_segs, |s| {
            if self.readonly {
                return Err(RequestError::ReadOnly);
            }
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
            let offset = check_range(s.sector, bytes, self.capacity(), self.block)?;
            ranges.push((offset, bytes));
            Ok(())
        })?;
        io.unmap = write_zeroes && unmap;
        Ok(())
    }

    /// The status for a finished backend operation, with the error logged.
    /// Discard is advisory (as QEMU treats it): a file system that cannot
    /// punch holes (EOPNOTSUPP) has still done what was asked.
    pub fn status_of(&self, kind: IoKind, r: &io::Result<()>) -> u8 {
        match r {
            Ok(()) => status_u8(VIRTIO_BLK_S_OK),
            Err(e) if kind == IoKind::Discard && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                status_u8(VIRTIO_BLK_S_OK)
            }
            Err(e) => {
                crate::dev_log!(self.log, Warn, "backend error on {kind:?}: {e}");
                // (A failing disk fails every request: its text is only made
                // for a subscriber.)
                if crate::events::listening() {
                    self.log.event(Event::IoError {
                        op: format!("{kind:?}").to_lowercase(),
                        error: e.to_string(),
                    });
                }
                status_u8(VIRTIO_BLK_S_IOERR)
            }
        }
    }
}

impl RequestHandler for BlkContext {
    type Req = BlkReq;

    fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    fn max_segments(&self) -> usize {
        // A segment may span two DMA windows.
        2 * self.limits.max_descs
    }

    fn max_ranges(&self) -> usize {
        self.max_discard_segs.max(self.max_write_zeroes_segs) as usize
    }

    fn kind(&self, req: &BlkReq) -> usize {
        kind_index(req.vtype)
    }

    fn prepare(
        &self,
        mem: &Arc<GuestMemoryMmap>,
        chain: crate::virtio::ring::RingChain<'_>,
        req: &mut BlkReq,
        io: &mut IoRequest,
    ) -> Prepared {
        if let Err(e) = walk_into(chain, self.queue_size, self.limits, &mut req.chain) {
            return Prepared::Broken(e);
        }
        let c = &req.chain;
        let mut vtype = u32::MAX;
        let planned = match &c.refused {
            Some(e) => Err(e.clone()),
            None => read_header(mem, c).and_then(|h| {
                vtype = h.kind;
                self.plan_header(h, mem, c, io)
            }),
        };
        req.vtype = vtype;
        req.data_len = match vtype {
            VIRTIO_BLK_T_IN => total_len(&c.writable),
            VIRTIO_BLK_T_OUT => total_len(&c.readable).saturating_sub(HEADER_SIZE as u64),
            _ => 0,
        };
        match planned {
            Ok(Plan::Done { status, used }) => {
                req.ready_status = status;
                req.ok_used = used;
                Prepared::Ready
            }
            Ok(Plan::Io { used }) => {
                req.ok_used = used;
                req.kind = io.kind;
                if c.status.is_none() {
                    crate::dev_log!(
                        self.log,
                        Warn,
                        "request {} has no status byte; not executed",
                        c.head
                    );
                    req.ready_status = status_u8(VIRTIO_BLK_S_IOERR);
                    return Prepared::Ready;
                }
                Prepared::Io
            }
            Err(e) => {
                crate::dev_log!(self.log, Warn, "request {}: {e}", c.head);
                req.ready_status = e.status();
                req.ok_used = 1;
                Prepared::Ready
            }
        }
    }

    fn finish_writes(&self, req: &BlkReq, lo: u64, hi: u64) -> bool {
        let hit = |a: u64, len: u64| a < hi && lo < a.saturating_add(len);
        req.chain.status.is_some_and(|a| hit(a, 1))
            || (req.vtype == VIRTIO_BLK_T_GET_ID
                && req
                    .chain
                    .writable
                    .iter()
                    .any(|s| hit(s.addr, u64::from(s.len))))
    }

    fn finish(
        &self,
        mem: &GuestMemoryMmap,
        req: &BlkReq,
        result: Option<&io::Result<()>>,
        stats: &QueueStats,
    ) -> Finish {
        let f = self.finish_request(mem, req, result);
        let kind = kind_index(req.vtype);
        QueueStats::add(&stats.requests[kind], 1);
        let failed = || QueueStats::add(&stats.failed[kind], 1);
        match &f {
            (Finish::Used(_), Some(st)) if *st == status_u8(VIRTIO_BLK_S_OK) => {
                let bytes = &match req.vtype {
                    VIRTIO_BLK_T_IN => &stats.bytes_read,
                    VIRTIO_BLK_T_OUT => &stats.bytes_written,
                    _ => return f.0,
                };
                QueueStats::add(bytes, req.data_len);
            }
            (_, Some(st)) if *st == status_u8(VIRTIO_BLK_S_UNSUPP) => {
                QueueStats::add(&stats.errors[1], 1);
                failed();
            }
            (_, Some(_)) => {
                QueueStats::add(&stats.errors[0], 1);
                failed();
            }
            (_, None) => {
                QueueStats::add(&stats.errors[2], 1);
                failed();
            }
        }
        f.0
    }
}

impl BlkContext {
    /// Answers a request: the status written (None: none was) and what to
    /// tell the engine.
    fn finish_request(
        &self,
        mem: &GuestMemoryMmap,
        req: &BlkReq,
        result: Option<&io::Result<()>>,
    ) -> (Finish, Option<u8>) {
        let ok = status_u8(VIRTIO_BLK_S_OK);
        let status = match result {
            None if req.vtype == VIRTIO_BLK_T_GET_ID && req.ready_status == ok => {
                match scatter(mem, &req.chain.writable, &self.serial) {
                    Ok(_) => ok,
                    Err(e) => {
                        crate::dev_log!(self.log, Warn, "request {}: {e}", req.chain.head);
                        status_u8(VIRTIO_BLK_S_IOERR)
                    }
                }
            }
            None => req.ready_status,
            Some(r) => {
                let st = self.status_of(req.kind, r);
                if st != ok && self.on_error == ErrorPolicy::Stop {
                    // werror=stop: the request is not answered; the queue
                    // waits for a reset.
                    return (Finish::Stop, None);
                }
                st
            }
        };
        let Some(addr) = req.chain.status else {
            return (Finish::Used(0), None);
        };
        if !write_status(mem, addr, status) {
            crate::dev_log!(
                self.log,
                Warn,
                "status byte of request {} is outside guest memory",
                req.chain.head
            );
            return (Finish::Used(0), None);
        }
        (
            Finish::Used(if status == ok { req.ok_used } else { 1 }),
            Some(status),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::io::GuestIov;
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
            capacity: Arc::new(AtomicU64::new(2048)),
            block: 512,
            readonly: false,
            serial: [0; 20],
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1 << 22,
            max_write_zeroes_sectors: 1 << 22,
            max_discard_segs: 32,
            max_write_zeroes_segs: 1,
            write_through: Arc::new(AtomicBool::new(write_through)),
            on_error: ErrorPolicy::Report,
            limits: ChainLimits {
                max_descs: 256,
                size_max: 1 << 20,
            },
            queue_size: 256,
            log: crate::util::DeviceLog::new("test"),
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
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let c = write_chain(&mem);
        for (wt, flushes) in [(true, 1), (false, 0)] {
            let be = Arc::new(Counting::default());
            let ctx = ctx(be.clone(), wt);
            let mut io = IoRequest::default();
            assert_eq!(ctx.plan(&mem, &c, &mut io), Ok(Plan::Io { used: 1 }));
            io.execute(&*ctx.backend).unwrap();
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
            ctx.status_of(IoKind::Discard, &e()),
            status_u8(VIRTIO_BLK_S_OK)
        );
        assert_eq!(
            ctx.status_of(IoKind::WriteZeroes, &e()),
            status_u8(VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(
            ctx.status_of(
                IoKind::Discard,
                &Err(io::Error::from_raw_os_error(libc::EIO))
            ),
            status_u8(VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn bad_requests_get_their_status() {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let be = Arc::new(Counting::default());
        let ctx = ctx(be, false);
        // Header shorter than 16 bytes.
        let mut c = write_chain(&mem);
        c.readable = vec![Seg {
            addr: 0x1000,
            len: 12,
        }];
        assert_eq!(
            ctx.plan(&mem, &c, &mut IoRequest::default()).err(),
            Some(RequestError::ShortHeader(12))
        );
        // Data outside guest memory.
        let mut c = write_chain(&mem);
        c.readable[1].addr = 0x20000;
        let e = ctx.plan(&mem, &c, &mut IoRequest::default()).err().unwrap();
        assert!(matches!(e, RequestError::OutsideMemory { .. }));
        assert_eq!(e.status(), status_u8(VIRTIO_BLK_S_IOERR));
        // A data buffer that runs off the end of guest memory.
        let mut c = write_chain(&mem);
        c.readable[1] = Seg {
            addr: 0xfe00,
            len: 1024,
        };
        assert!(matches!(
            ctx.plan(&mem, &c, &mut IoRequest::default()),
            Err(RequestError::OutsideMemory { .. })
        ));
        // Readable after writable.
        let mut c = write_chain(&mem);
        c.readable_after_writable = true;
        assert_eq!(
            ctx.plan(&mem, &c, &mut IoRequest::default()).err(),
            Some(RequestError::ReadableAfterWritable)
        );
    }
}
