//! The I/O backends: positioned vectored reads and writes straight into
//! guest memory, flush, discard (hole punching) and write-zeroes.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub use crate::memory::GuestIov;
use crate::memory::{advance_iovecs, as_iovecs};

/// Where a backend that completes requests on its own threads (librbd's)
/// reports them: the engine's side, one per request slot, made once.
pub trait AioSink: Send + Sync {
    /// The request `tag` is done: `res` is bytes moved, or -errno.
    fn done(&self, tag: u64, res: i64);
}

/// A request slot's way back to its reactor. A backend holds a reference
/// (an `Arc` count, not an allocation) while the request is in flight.
pub struct AioTag {
    pub sink: std::sync::Arc<dyn AioSink>,
    pub tag: u64,
}

impl AioTag {
    pub fn complete(&self, res: i64) {
        self.sink.done(self.tag, res);
    }
}

/// What a backend can do. Every method transfers all bytes or fails: a short
/// transfer is an error.
pub trait Backend: Send + Sync {
    fn read_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()>;
    fn write_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates a range; later reads return zeros.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range; `unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// True when requests are cheap enough to run on the poller thread
    /// itself (memory-backed disks) rather than on the I/O pool.
    fn inline(&self) -> bool;
    /// Whether a write-zeroes here is CPU work (zeros copied in memory or
    /// written out), rather than a request the disk does in place and that
    /// may wait on it.
    fn zeroes_are_written(&self) -> bool {
        self.inline()
    }
    /// Tries a read or write without blocking (data already in the page
    /// cache): `Some` with the result when it completed, `None` when it
    /// would block and must go to the I/O pool instead.
    fn try_nowait(&self, _iov: &[GuestIov], _offset: u64, _write: bool) -> Option<io::Result<()>> {
        None
    }
    /// The descriptor an io_uring can submit reads, writes, fsync and
    /// fallocate on, with the alignment O_DIRECT needs (None: buffered).
    /// None when the backend is not a file.
    fn uring_target(&self) -> Option<UringTarget> {
        None
    }
    /// Starts `io` on the backend's own threads; its completion comes
    /// through `tag`, from another thread. None: not done this way (the
    /// pool runs it with the methods above); `Some(Err)`: refused at once,
    /// no completion follows.
    fn submit_async(
        &self,
        _io: &super::request::IoRequest,
        _tag: &std::sync::Arc<AioTag>,
    ) -> Option<io::Result<()>> {
        None
    }
    /// Whether `submit_async` takes requests (the engine then keeps a tag
    /// per request slot).
    fn is_async(&self) -> bool {
        false
    }
    /// Whether a reactor with requests of this backend in flight drives
    /// them itself ([`drive`](Self::drive)), as SPDK's pollers do, rather
    /// than leave them to the backend's threads.
    fn driven(&self) -> bool {
        false
    }
    /// Sends what was submitted and takes what completed, on the calling
    /// reactor's thread, without ever blocking; true if anything moved.
    /// Completions go through their tags as from the backend's threads.
    fn drive(&self) -> bool {
        false
    }
    /// The reactor that drove this backend goes to sleep: the backend's
    /// own threads take its requests over.
    fn undriven(&self) {}
    /// Whether the disk takes discards (an NBD export may not): a device
    /// does not offer DISCARD on one that does not.
    fn can_discard(&self) -> bool {
        true
    }
    /// Whether the disk takes write-zeroes requests.
    fn can_write_zeroes(&self) -> bool {
        true
    }
    /// The smallest block the disk takes requests in (an NBD export's
    /// minimum block size): the device's logical block may not be smaller.
    fn min_block(&self) -> u32 {
        1
    }
    /// Has `f` called, from a thread of the backend's, with the new size
    /// whenever the disk's size changes outside the target (an image
    /// resized by another client). Backends that cannot tell ignore it.
    fn watch_size(&self, _f: Box<dyn Fn(u64) + Send + Sync>) {}
    /// The open file a live upgrade hands to the next binary (which then
    /// holds the same open file, its lock and its contents); None: the
    /// next binary opens the disk again.
    fn handover_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// A live upgrade replaces the process image next, with nothing in
    /// flight: let go of what the next binary must take itself (an
    /// exclusive lock on a network image).
    fn hand_off(&self) -> io::Result<()> {
        Ok(())
    }
    /// The upgrade did not happen after `hand_off`: take it back.
    fn take_back(&self) -> io::Result<()> {
        Ok(())
    }
    /// Sets the disk's size to `size` bytes, or (None) reads it again (a
    /// block device resized underneath); returns the size now.
    fn resize(&self, _size: Option<u64>) -> io::Result<u64> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this disk cannot be resized",
        ))
    }
}

/// What an io_uring needs to serve a backend.
#[derive(Clone, Copy, Debug)]
pub struct UringTarget {
    pub fd: std::os::fd::RawFd,
    /// O_DIRECT: buffers, lengths and offsets must be aligned to this.
    pub direct_align: Option<usize>,
    /// Whether flush has anything to do.
    pub durable: bool,
}

/// Reads zeros, drops writes.
pub struct NullBackend;

impl Backend for NullBackend {
    fn read_at(&self, iov: &[GuestIov], _offset: u64) -> io::Result<()> {
        for v in iov {
            v.zero();
        }
        Ok(())
    }
    fn write_at(&self, _iov: &[GuestIov], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Ok(())
    }
    fn inline(&self) -> bool {
        true
    }
    fn resize(&self, size: Option<u64>) -> io::Result<u64> {
        size.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "give a size"))
    }
}

/// A raw image file, block device, or memfd (the `ram:` disk).
pub struct FileBackend {
    file: File,
    /// O_DIRECT: buffers and offsets must be aligned to `align`.
    direct: bool,
    align: usize,
    /// Whether flush has anything to do (not for memory-backed files).
    durable: bool,
    inline: bool,
    /// The file system was found unable to zero a range in place: zeros
    /// are written.
    zeroes_written: std::sync::atomic::AtomicBool,
}

const IOV_MAX: usize = 1024;

/// O_DIRECT transfers with misaligned guest buffers go through a per-thread
/// bounce buffer of this size, chunk by chunk: memory use does not depend on
/// the size of the request.
pub const BOUNCE_CHUNK: usize = 256 << 10;
/// Alignment of the bounce buffer (enough for any logical block size).
const BOUNCE_ALIGN: usize = 4096;

thread_local! {
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn off_t(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl FileBackend {
    pub fn new(file: File, direct: bool, align: usize, durable: bool, inline: bool) -> FileBackend {
        FileBackend {
            file,
            direct,
            align,
            durable,
            inline,
            zeroes_written: Default::default(),
        }
    }

    fn rw(&self, iov: &[GuestIov], offset: u64, write: bool) -> io::Result<()> {
        // The request's own list; a copy is made only after a short
        // transfer, to move past what was done.
        let mut iovs = std::borrow::Cow::Borrowed(as_iovecs(iov));
        let mut left: usize = iov.iter().map(GuestIov::len).sum();
        let mut pos = offset;
        while left > 0 && !iovs.is_empty() {
            let cnt = iovs.len().min(IOV_MAX);
            let cnt_c = libc::c_int::try_from(cnt).unwrap_or(libc::c_int::MAX);
            // SAFETY: every iovec points at guest memory kept mapped by the
            // caller for the duration of the call, with its exact length.
            let r = unsafe {
                if write {
                    libc::pwritev(self.file.as_raw_fd(), iovs.as_ptr(), cnt_c, off_t(pos)?)
                } else {
                    libc::preadv(self.file.as_raw_fd(), iovs.as_ptr(), cnt_c, off_t(pos)?)
                }
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = r.unsigned_abs();
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "short {} at offset {pos}",
                        if write { "write" } else { "read" }
                    ),
                ));
            }
            pos += n as u64;
            left = left.saturating_sub(n);
            if left > 0 {
                advance_iovecs(iovs.to_mut(), n);
            }
        }
        Ok(())
    }

    fn aligned(&self, iov: &[GuestIov], offset: u64) -> bool {
        let a = self.align;
        offset.is_multiple_of(a as u64)
            && iov
                .iter()
                .all(|v| v.addr().is_multiple_of(a) && v.len().is_multiple_of(a))
    }

    /// O_DIRECT with a guest buffer that is not aligned: go through this
    /// thread's aligned bounce buffer, BOUNCE_CHUNK bytes at a time. The
    /// request's length and offset are multiples of the block size (checked
    /// when it was parsed), and so is every chunk.
    fn bounce(&self, iov: &[GuestIov], offset: u64, write: bool) -> io::Result<()> {
        BOUNCE.with(|cell| {
            let mut store = cell.borrow_mut();
            if store.is_empty() {
                store.resize(BOUNCE_CHUNK + BOUNCE_ALIGN, 0);
            }
            let skew = store.as_ptr().align_offset(BOUNCE_ALIGN);
            let buf = &mut store[skew..skew + BOUNCE_CHUNK];
            let total: usize = iov.iter().map(|v| v.len()).sum();
            let mut cur = IovCursor::default();
            let mut done = 0usize;
            while done < total {
                let n = (total - done).min(BOUNCE_CHUNK);
                let pos = offset + done as u64;
                if write {
                    cur.copy(iov, &mut buf[..n], true);
                    self.file.write_all_at(&buf[..n], pos)?;
                } else {
                    self.file.read_exact_at(&mut buf[..n], pos)?;
                    cur.copy(iov, &mut buf[..n], false);
                }
                done += n;
            }
            Ok(())
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own descriptor; no memory is passed.
        let r =
            unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off_t(offset)?, off_t(len)?) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A position in a list of guest buffers, for copying through the bounce
/// buffer chunk by chunk.
#[derive(Default)]
struct IovCursor {
    index: usize,
    offset: usize,
}

impl IovCursor {
    /// Fills `buf` from the guest buffers (`from_guest`) or empties it into
    /// them, moving the cursor on.
    fn copy(&mut self, iov: &[GuestIov], buf: &mut [u8], from_guest: bool) {
        let mut at = 0;
        while at < buf.len() && self.index < iov.len() {
            let v = &iov[self.index];
            let n = if from_guest {
                v.read_at(self.offset, &mut buf[at..])
            } else {
                v.write_at(self.offset, &buf[at..])
            };
            at += n;
            self.offset += n;
            if self.offset >= v.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
    }
}

impl Backend for FileBackend {
    fn handover_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.file.as_fd())
    }

    fn try_nowait(&self, iov: &[GuestIov], offset: u64, write: bool) -> Option<io::Result<()>> {
        if self.direct || iov.is_empty() || iov.len() > IOV_MAX {
            return None;
        }
        let iovs = as_iovecs(iov);
        let total: usize = iov.iter().map(|v| v.len()).sum();
        let cnt = libc::c_int::try_from(iovs.len()).ok()?;
        let off = off_t(offset).ok()?;
        // SAFETY: every iovec points at guest memory kept mapped by the
        // caller for the duration of the call, with its exact length.
        let r = unsafe {
            if write {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    iovs.as_ptr(),
                    cnt,
                    off,
                    libc::RWF_NOWAIT,
                )
            } else {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    iovs.as_ptr(),
                    cnt,
                    off,
                    libc::RWF_NOWAIT,
                )
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Would block, or RWF_NOWAIT not supported here: use the pool.
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::EINTR) => None,
                _ => Some(Err(e)),
            };
        }
        // A short transfer is redone whole by the pool (reads and writes of
        // the same bytes are idempotent).
        (r.unsigned_abs() == total).then_some(Ok(()))
    }

    fn read_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        if self.direct && !self.aligned(iov, offset) {
            return self.bounce(iov, offset, false);
        }
        self.rw(iov, offset, false)
    }

    fn write_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        if self.direct && !self.aligned(iov, offset) {
            return self.bounce(iov, offset, true);
        }
        self.rw(iov, offset, true)
    }

    fn flush(&self) -> io::Result<()> {
        if self.durable {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let first = if unmap {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        } else {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match first {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // The file system cannot do it in place: write zeros, a
                // bounded chunk at a time.
                self.zeroes_written
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let chunk = 1usize << 20;
                let zeros = vec![0u8; usize::try_from(len).unwrap_or(chunk).min(chunk)];
                let mut pos = offset;
                let end = offset + len;
                while pos < end {
                    let n = usize::try_from(end - pos).unwrap_or(chunk).min(zeros.len());
                    self.file.write_all_at(&zeros[..n], pos)?;
                    pos += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn inline(&self) -> bool {
        self.inline
    }

    fn zeroes_are_written(&self) -> bool {
        self.inline
            || self
                .zeroes_written
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn resize(&self, size: Option<u64>) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        let block_device = {
            use std::os::unix::fs::FileTypeExt;
            meta.file_type().is_block_device()
        };
        match (size, block_device) {
            (Some(_), true) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a block device's size is its own: resize the device, then give no size",
                ))
            }
            (Some(s), false) => self.file.set_len(s)?,
            (None, _) => {}
        }
        // Seeking to the end gives the size of block devices too.
        let mut f = &self.file;
        io::Seek::seek(&mut f, io::SeekFrom::End(0))
    }

    fn uring_target(&self) -> Option<UringTarget> {
        Some(UringTarget {
            fd: self.file.as_raw_fd(),
            direct_align: self.direct.then_some(self.align),
            durable: self.durable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn iov(b: &mut [u8]) -> GuestIov {
        // SAFETY: every test keeps the buffer alive and unused while the
        // iovec is in use.
        unsafe { GuestIov::new(b.as_mut_ptr(), b.len()) }
    }

    /// From the second hostile review: every write-zeroes counted as CPU
    /// work, so one stuck in the fallocate of a disk that stopped answering
    /// held a CPU place of the pool for good. Only where zeros are really
    /// written (a memory disk, or a file system found unable to zero in
    /// place: memfd here) is it CPU work.
    #[test]
    fn write_zeroes_is_cpu_work_only_where_zeros_are_written() {
        let f = crate::util::memfd("zeroes").unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[0xab; 8192], 0).unwrap();
        let be = FileBackend::new(f.try_clone().unwrap(), false, 512, false, false);
        assert!(!be.zeroes_are_written(), "assumed before it was tried");
        be.write_zeroes(0, 8192, false).unwrap();
        let mut back = vec![1u8; 8192];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // shmem cannot zero a range in place: zeros were written.
        assert!(be.zeroes_are_written());
        let mem = FileBackend::new(f, false, 512, false, true);
        assert!(mem.zeroes_are_written());
    }

    /// A misaligned O_DIRECT transfer larger than the bounce buffer goes
    /// through it chunk by chunk, byte for byte, in both directions.
    #[test]
    fn bounce_in_chunks() {
        let f = crate::util::memfd("bounce").unwrap();
        f.set_len(4 << 20).unwrap();
        // `direct` with a file that is not O_DIRECT: the bounce path, checked
        // without needing a file system that supports O_DIRECT.
        let be = FileBackend::new(f.try_clone().unwrap(), true, 512, false, false);
        let total = 2 * BOUNCE_CHUNK + 3 * 512;
        let data: Vec<u8> = (0..total)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect();
        let mut store = vec![0u8; total + 1];
        store[1..].copy_from_slice(&data);
        let (a, rest) = store[1..].split_at_mut(1000);
        let (b, c) = rest.split_at_mut(BOUNCE_CHUNK + 17);
        be.write_at(&[iov(a), iov(b), iov(c)], 8192).unwrap();
        let mut back = vec![0u8; total];
        f.read_exact_at(&mut back, 8192).unwrap();
        assert!(back == data, "written through the bounce buffer");
        let mut out = vec![0u8; total + 3];
        let (x, rest) = out[3..].split_at_mut(BOUNCE_CHUNK - 5);
        let (y, z) = rest.split_at_mut(511);
        be.read_at(&[iov(x), iov(y), iov(z)], 8192).unwrap();
        assert!(out[3..] == data[..], "read through the bounce buffer");
    }

    #[test]
    fn vectored_round_trip_and_zeroing() {
        let f = crate::util::memfd("be").unwrap();
        f.set_len(1 << 20).unwrap();
        let be = FileBackend::new(f.try_clone().unwrap(), false, 512, false, true);
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 1024];
        be.write_at(&[iov(&mut a), iov(&mut b)], 4096).unwrap();
        let mut back = vec![0u8; 1536];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert!(back[..512].iter().all(|&x| x == 1) && back[512..].iter().all(|&x| x == 2));
        let mut r1 = vec![0u8; 1000];
        let mut r2 = vec![0u8; 536];
        be.read_at(&[iov(&mut r1), iov(&mut r2)], 4096).unwrap();
        assert_eq!([r1, r2].concat(), back);
        be.write_zeroes(4096, 1024, false).unwrap();
        be.discard(5120, 512).unwrap();
        f.read_exact_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&x| x == 0));
        // Reading past the end is a short transfer: an error.
        let mut big = vec![0u8; 8192];
        assert!(be.read_at(&[iov(&mut big)], (1 << 20) - 4096).is_err());
    }

    #[test]
    fn cached_reads_and_writes_complete_without_blocking() {
        let path = std::env::temp_dir().join(format!("vub-nowait-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all_at(&[3u8; 8192], 0).unwrap();
        let be = FileBackend::new(f, false, 512, true, false);
        // Freshly written data is in the page cache: a read cannot block.
        let mut a = vec![0u8; 4096];
        assert!(matches!(
            be.try_nowait(&[iov(&mut a)], 4096, false),
            Some(Ok(()))
        ));
        assert_eq!(a, vec![3u8; 4096]);
        // Past the end: a short read, which goes to the pool (and fails there).
        let mut b = vec![0u8; 4096];
        assert!(be.try_nowait(&[iov(&mut b)], 8192, false).is_none());
        assert!(be.read_at(&[iov(&mut b)], 8192).is_err());
        // O_DIRECT never takes the shortcut.
        let d = FileBackend::new(crate::util::memfd("d").unwrap(), true, 512, true, false);
        assert!(d.try_nowait(&[iov(&mut a)], 0, false).is_none());
    }
}
