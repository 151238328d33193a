//! The I/O backends: positioned vectored reads and writes straight into
//! guest memory, flush, discard (hole punching) and write-zeroes.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// One buffer in guest memory, as an iovec. The pointer stays valid for as
/// long as the guest-memory snapshot that produced it is held (the job that
/// carries it holds that snapshot). Laid out exactly as `struct iovec`, so a
/// request's list goes to preadv/pwritev as it is, without a copy.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuestIov {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: a GuestIov is an address into a shared mapping that the job
// carrying it keeps alive; moving it to another thread moves no ownership.
unsafe impl Send for GuestIov {}

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
    /// Tries a read or write without blocking (data already in the page
    /// cache): `Some` with the result when it completed, `None` when it
    /// would block and must go to the I/O pool instead.
    fn try_nowait(&self, _iov: &[GuestIov], _offset: u64, _write: bool) -> Option<io::Result<()>> {
        None
    }
}

/// Reads zeros, drops writes.
pub struct NullBackend;

impl Backend for NullBackend {
    fn read_at(&self, iov: &[GuestIov], _offset: u64) -> io::Result<()> {
        for v in iov {
            // SAFETY: v points at v.len writable bytes of guest memory kept
            // mapped by the caller's snapshot.
            unsafe { std::ptr::write_bytes(v.ptr, 0, v.len) };
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
}

const IOV_MAX: usize = 1024;

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<GuestIov>() == size_of::<libc::iovec>());
    assert!(align_of::<GuestIov>() == align_of::<libc::iovec>());
    assert!(offset_of!(GuestIov, ptr) == offset_of!(libc::iovec, iov_base));
    assert!(offset_of!(GuestIov, len) == offset_of!(libc::iovec, iov_len));
};

/// The same list, as the kernel's iovecs.
fn as_iovecs(iov: &[GuestIov]) -> &[libc::iovec] {
    // SAFETY: GuestIov is repr(C) with the fields, sizes, offsets and
    // alignment of libc::iovec (checked at compile time above), so the
    // slice may be viewed as iovecs for its whole length.
    unsafe { std::slice::from_raw_parts(iov.as_ptr().cast::<libc::iovec>(), iov.len()) }
}

/// Drops `n` transferred bytes from the front of `iovs`.
fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for v in iovs.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            drop += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
    }
    iovs.drain(..drop);
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
        }
    }

    fn rw(&self, iov: &[GuestIov], offset: u64, write: bool) -> io::Result<()> {
        // The request's own list; a copy is made only after a short
        // transfer, to move past what was done.
        let mut iovs = std::borrow::Cow::Borrowed(as_iovecs(iov));
        let mut pos = offset;
        while !iovs.is_empty() {
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
            advance(iovs.to_mut(), n);
        }
        Ok(())
    }

    fn aligned(&self, iov: &[GuestIov], offset: u64) -> bool {
        let a = self.align;
        offset.is_multiple_of(a as u64)
            && iov
                .iter()
                .all(|v| (v.ptr as usize).is_multiple_of(a) && v.len % a == 0)
    }

    /// O_DIRECT with a guest buffer that is not aligned: go through an
    /// aligned bounce buffer.
    fn bounce(&self, iov: &[GuestIov], offset: u64, write: bool) -> io::Result<()> {
        let total: usize = iov.iter().map(|v| v.len).sum();
        let layout = Layout::from_size_align(total.max(self.align), self.align.max(4096))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let buf = BounceBuf::new(layout)?;
        let one = [GuestIov {
            ptr: buf.ptr,
            len: total,
        }];
        if write {
            let mut at = 0;
            for v in iov {
                // SAFETY: source is guest memory (v.len bytes, kept mapped);
                // destination is inside our allocation of `total` bytes.
                unsafe { std::ptr::copy_nonoverlapping(v.ptr, buf.ptr.add(at), v.len) };
                at += v.len;
            }
            self.rw(&one, offset, true)
        } else {
            self.rw(&one, offset, false)?;
            let mut at = 0;
            for v in iov {
                // SAFETY: as above, in the other direction.
                unsafe { std::ptr::copy_nonoverlapping(buf.ptr.add(at), v.ptr, v.len) };
                at += v.len;
            }
            Ok(())
        }
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

struct BounceBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl BounceBuf {
    fn new(layout: Layout) -> io::Result<BounceBuf> {
        // SAFETY: layout has a non-zero size (at least the alignment).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(BounceBuf { ptr, layout })
    }
}

impl Drop for BounceBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

impl Backend for FileBackend {
    fn try_nowait(&self, iov: &[GuestIov], offset: u64, write: bool) -> Option<io::Result<()>> {
        if self.direct || iov.is_empty() || iov.len() > IOV_MAX {
            return None;
        }
        let iovs = as_iovecs(iov);
        let total: usize = iov.iter().map(|v| v.len).sum();
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
                // The file system cannot do it in place: write zeros.
                let chunk = 1 << 20;
                let layout = Layout::from_size_align(chunk, 4096)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                let zeros = BounceBuf::new(layout)?;
                let mut pos = offset;
                let end = offset + len;
                while pos < end {
                    let n = usize::try_from((end - pos).min(chunk as u64)).unwrap_or(chunk);
                    self.rw(
                        &[GuestIov {
                            ptr: zeros.ptr,
                            len: n,
                        }],
                        pos,
                        true,
                    )?;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn iov(b: &mut [u8]) -> GuestIov {
        GuestIov {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        }
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

    #[test]
    fn advance_splits_iovecs() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        let mut v = as_iovecs(&[iov(&mut a), iov(&mut b)]).to_vec();
        advance(&mut v, 13);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 7);
    }
}
