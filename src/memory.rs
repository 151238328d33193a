//! The one module that owns raw pointers into guest memory.
//!
//! Everything else reaches guest memory through vm-memory (`Bytes`,
//! `get_slices`), or through a [`GuestIov`]: a host address range inside a
//! guest window, which only this module can make (from a guest-memory
//! snapshot) and only this module dereferences (volatile copies, zeroing,
//! and the iovec view handed to preadv/pwritev).
//!
//! It also owns what happens when the file behind a guest window is cut
//! short under us. DMA_MAP refuses windows that reach past their file's end
//! (see `vfio_user::dma`), and seals memfds against shrinking where it can;
//! a file that is still truncated later (a memfd created without sealing, a
//! tmpfs or hugetlbfs file) would make every access past its new end raise
//! SIGBUS. [`install_sigbus_guard`] catches those faults inside registered
//! windows, puts a private zero page where the file page was, and counts
//! the event: accesses then read zeros and writes go nowhere, which only
//! the client that cut its own memory can observe. A SIGBUS anywhere else
//! keeps its default action and ends the process.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use vm_memory::{
    GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};

/// The guest memory the device sees. Cheap to clone; readers take a snapshot
/// with `memory()` and keep using it even while the DMA table changes it.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap>;

/// A DMA window about to be unmapped: its guest range, and where it is
/// mapped in this process (empty when it never was: no descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRange {
    pub iova: u64,
    pub size: u64,
    pub host: usize,
    pub host_len: usize,
}

/// What happens to guest memory, as the layers below the protocol are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryChange {
    /// Stop using `range` (None: all guest memory) and wait for the work
    /// in flight on it: it is about to be unmapped (or the client asked
    /// for a pause).
    Quiesce(Option<DmaRange>),
    /// What the last `Quiesce` stopped goes on.
    Resume,
    /// A DMA window was added: what waited for memory looks again.
    Added,
}

/// One buffer in guest memory, laid out exactly as `struct iovec`, so a
/// request's list goes to preadv/pwritev as it is.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuestIov {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a GuestIov is an address range in a shared mapping whose lifetime
// its creator guarantees (see `GuestIov::new`); moving it to another thread
// moves no ownership and the memory is accessed only with volatile copies
// or by the kernel.
unsafe impl Send for GuestIov {}

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<GuestIov>() == size_of::<libc::iovec>());
    assert!(align_of::<GuestIov>() == align_of::<libc::iovec>());
    assert!(offset_of!(GuestIov, ptr) == offset_of!(libc::iovec, iov_base));
    assert!(offset_of!(GuestIov, len) == offset_of!(libc::iovec, iov_len));
};

impl GuestIov {
    /// # Safety
    ///
    /// `ptr .. ptr + len` must be memory that may be read and written at
    /// any time (a shared mapping of guest RAM, or a buffer the caller
    /// owns), and it must stay mapped for as long as this value or any copy
    /// of it is used: whoever makes one keeps the mapping alive past the
    /// last I/O on it (a [`GuestBuffers`] holds the guest-memory snapshot
    /// its buffers came from).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> GuestIov {
        GuestIov { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address, for alignment checks only.
    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    fn volatile(&self) -> VolatileSlice<'_> {
        // SAFETY: by the contract of `new`, ptr..ptr+len is mapped and
        // accessible for as long as `self` is used; the slice lives no
        // longer than this borrow of `self`.
        unsafe { VolatileSlice::new(self.ptr, self.len) }
    }

    /// Copies `src` into the buffer from `offset` (volatile writes: the
    /// guest may be looking). Returns the bytes copied.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> usize {
        match self.volatile().offset(offset) {
            Ok(v) => {
                let n = v.len().min(src.len());
                v.copy_from(&src[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// Copies from the buffer at `offset` into `dst` (volatile reads: the
    /// guest may change the bytes under us). Returns the bytes copied.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        match self.volatile().offset(offset) {
            Ok(v) => v.copy_to(dst),
            Err(_) => 0,
        }
    }

    /// Zero-fills the buffer.
    pub fn zero(&self) {
        self.zero_from(0);
    }

    /// Zero-fills the buffer from `offset` to its end.
    pub fn zero_from(&self, offset: usize) {
        const Z: [u8; 4096] = [0; 4096];
        let mut at = offset;
        while at < self.len {
            let n = self.write_at(at, &Z[..(self.len - at).min(Z.len())]);
            if n == 0 {
                break;
            }
            at += n;
        }
    }
}

/// Zero-fills the list from byte `from` of it to its end (the part a
/// short read left untouched).
pub fn zero_tail(iov: &[GuestIov], from: usize) {
    let mut skip = from;
    for v in iov {
        if skip >= v.len {
            skip -= v.len;
            continue;
        }
        v.zero_from(skip);
        skip = 0;
    }
}

/// The same list, as the kernel's iovecs.
pub fn as_iovecs(iov: &[GuestIov]) -> &[libc::iovec] {
    // SAFETY: GuestIov is repr(C) with the fields, sizes, offsets and
    // alignment of libc::iovec (checked at compile time above), so the
    // slice may be viewed as iovecs for its whole length.
    unsafe { std::slice::from_raw_parts(iov.as_ptr().cast::<libc::iovec>(), iov.len()) }
}

/// Drops `n` transferred bytes from the front of a list of iovecs that
/// `as_iovecs` produced (after a short transfer).
pub fn advance_iovecs(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for v in iovs.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            drop += 1;
        } else {
            // wrapping_add never dereferences; n < iov_len keeps the new
            // base inside the same buffer.
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
    }
    iovs.drain(..drop);
}

/// A guest range that is not (wholly) in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmapped;

/// A request's buffers in guest memory, and the snapshot of guest memory
/// they were found in. The list holds that snapshot, so its windows stay
/// mapped for as long as a buffer of the list may be used, wherever the
/// request travels (the io_uring, a pool thread): no buffer outlives what
/// it points into. Reused from request to request without allocating.
#[derive(Debug, Default)]
pub struct GuestBuffers {
    mem: Option<Arc<GuestMemoryMmap>>,
    iov: Vec<GuestIov>,
}

impl GuestBuffers {
    pub fn with_capacity(n: usize) -> GuestBuffers {
        GuestBuffers {
            mem: None,
            iov: Vec::with_capacity(n),
        }
    }

    /// A new request from `mem`: no buffers yet, and `mem` held.
    pub fn begin(&mut self, mem: &Arc<GuestMemoryMmap>) {
        self.iov.clear();
        self.mem = Some(mem.clone());
    }

    /// The request is over: the list empties and hands its snapshot back.
    pub fn end(&mut self) -> Option<Arc<GuestMemoryMmap>> {
        self.iov.clear();
        self.mem.take()
    }

    /// Forgets the buffers, keeping the snapshot.
    pub fn clear(&mut self) {
        self.iov.clear();
    }

    /// The snapshot the buffers lie in.
    pub fn memory(&self) -> Option<&Arc<GuestMemoryMmap>> {
        self.mem.as_ref()
    }

    /// Appends the host buffers of guest range `addr .. addr + len` (which
    /// may span several windows) in `mem`. Fails on the first byte that is
    /// not mapped, and when the list already holds another snapshot (one
    /// request's buffers come from one).
    pub fn push(
        &mut self,
        mem: &Arc<GuestMemoryMmap>,
        addr: u64,
        len: usize,
    ) -> Result<(), Unmapped> {
        match &self.mem {
            Some(m) if !Arc::ptr_eq(m, mem) => return Err(Unmapped),
            Some(_) => {}
            None => self.mem = Some(mem.clone()),
        }
        for slice in GuestMemoryBackend::get_slices(&**mem, GuestAddress(addr), len) {
            let slice = slice.map_err(|_| Unmapped)?;
            // SAFETY: the slice is inside a region of `mem`, a shared
            // mapping of guest RAM, and this list holds `mem` until `end`
            // or its own drop, after the last use of its buffers.
            self.iov
                .push(unsafe { GuestIov::new(slice.ptr_guard_mut().as_ptr(), slice.len()) });
        }
        Ok(())
    }

    /// Appends a buffer the caller owns (tests and internal requests).
    ///
    /// # Safety
    ///
    /// As [`GuestIov::new`]: the caller keeps the buffer alive and
    /// unmoved past the last use of the list.
    pub unsafe fn push_own(&mut self, buf: &mut [u8]) {
        // SAFETY: the caller's promise.
        self.iov
            .push(unsafe { GuestIov::new(buf.as_mut_ptr(), buf.len()) });
    }
}

impl std::ops::Deref for GuestBuffers {
    type Target = [GuestIov];
    fn deref(&self) -> &[GuestIov] {
        &self.iov
    }
}

/// Appends the part `from .. from + len` of the buffers `iov` (a request's
/// list) to `out`, as buffers of their own: one step of a request that is
/// run a piece at a time. Stops at the end of `iov`.
pub fn sub_iovecs(iov: &[GuestIov], from: usize, len: usize, out: &mut Vec<GuestIov>) {
    let mut skip = from;
    let mut left = len;
    for v in iov {
        if left == 0 {
            break;
        }
        if skip >= v.len {
            skip -= v.len;
            continue;
        }
        let n = (v.len - skip).min(left);
        // wrapping_add never dereferences; skip < v.len keeps the new base
        // inside the same buffer, and `n` bytes from it stay inside it, so
        // the piece lies in memory the original buffer's contract covers.
        out.push(GuestIov {
            ptr: v.ptr.wrapping_add(skip),
            len: n,
        });
        skip = 0;
        left -= n;
    }
}

/// Takes a guest window of ours (`host .. host + len`, page aligned) away
/// from the client without pulling it from under I/O still in flight:
/// the range becomes a private (copy-on-write) mapping of the same file at
/// the same offset. A write to disk still in flight reads the client's
/// bytes, as it would have; a read from disk that lands late writes into
/// private copies, never into the client's memory. (Private zero pages
/// instead would have put zeros on disk for writes queued at a disconnect.)
/// The range stays mapped, so the window's own unmap later covers exactly
/// what it mapped. Without a file, or when the private mapping fails (a
/// hugetlbfs file without huge pages to spare), the window is left shared:
/// the client's bytes stay the ones written, at the cost of a late read
/// landing in its memory.
pub fn revoke(host: usize, len: usize, file: &std::fs::File, offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller passes a window mapping of ours that nothing else
    // in this process owns, mapped from `file` at `offset` for `len` bytes;
    // MAP_FIXED replaces it in place, atomically, with a private mapping of
    // the same bytes, size and protection, so every pointer into it stays
    // valid.
    let r = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            off,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

// ---- SIGBUS guard -----------------------------------------------------------

/// Windows the SIGBUS guard can cover at once, in the whole process (the
/// budget of windows in `vfio_user::budget` never asks for more).
pub const GUARD_SLOTS: usize = 16384;
const SLOTS: usize = GUARD_SLOTS;
const FREE: u8 = 0;
const LIVE: u8 = 1;
const RETIRED: u8 = 2;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    /// The mapping's page size: what the kernel can replace at once (a huge
    /// page for hugetlbfs).
    page: AtomicUsize,
    state: AtomicU8,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    page: AtomicUsize::new(4096),
    state: AtomicU8::new(FREE),
};
static WINDOWS: [Slot; SLOTS] = [EMPTY; SLOTS];
static FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// A host range registered with the SIGBUS guard; retired on drop. A retired
/// range stays covered until its slot is needed again, because a snapshot
/// of guest memory may still use the mapping for a while.
#[derive(Debug)]
pub struct GuardedWindow {
    slot: usize,
}

impl Drop for GuardedWindow {
    fn drop(&mut self) {
        WINDOWS[self.slot].state.store(RETIRED, Ordering::Release);
    }
}

/// Registers the mapping `start .. start + len` (aligned to `page`, the
/// mapping's page size) so that a SIGBUS inside it is survived. `None`
/// when every slot holds a live window.
pub fn guard_window(start: usize, len: usize, page: usize) -> Option<GuardedWindow> {
    install_sigbus_guard();
    let take = |from: u8| {
        (0..SLOTS).find(|&i| {
            WINDOWS[i]
                .state
                .compare_exchange(from, LIVE, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    };
    let slot = take(FREE).or_else(|| take(RETIRED))?;
    // The handler reads the bounds only of LIVE/RETIRED slots; a fault that
    // races with this store sees either range, both of them real mappings
    // of ours (or none, and then the default action).
    WINDOWS[slot]
        .page
        .store(page.max(PAGE.load(Ordering::Relaxed)), Ordering::Release);
    WINDOWS[slot].start.store(start, Ordering::Release);
    WINDOWS[slot]
        .end
        .store(start.saturating_add(len), Ordering::Release);
    Some(GuardedWindow { slot })
}

/// How many guest pages were replaced since the last call (each one a
/// SIGBUS from a guest-memory file cut short under us).
pub fn take_faults() -> u64 {
    if FAULTS.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    FAULTS.swap(0, Ordering::Relaxed)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096)
}

static PAGE: AtomicUsize = AtomicUsize::new(4096);

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work here: atomics, mmap, sigaction, raise.
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code <= 0 {
        // Sent by a process (kill, raise), not a fault: it keeps its
        // default meaning.
        // SAFETY: sigaction with a zeroed (SIG_DFL) action, then raise.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            libc::raise(sig);
        }
        return;
    }
    let page = WINDOWS
        .iter()
        .find(|s| {
            s.state.load(Ordering::Acquire) != FREE
                && s.start.load(Ordering::Acquire) <= addr
                && addr < s.end.load(Ordering::Acquire)
        })
        .map(|s| s.page.load(Ordering::Acquire));
    if let Some(page) = page {
        // A huge-page mapping can only be replaced a whole huge page at a
        // time (the replacement itself is ordinary memory).
        let base = addr & !(page - 1);
        // SAFETY: `base .. base + page` is a whole page of the mapping of one
        // of our guest windows (windows are aligned to their page size),
        // which we mapped and which nothing else in this process owns;
        // replacing it with private anonymous memory keeps the range mapped
        // (so the window's own munmap later still covers what it mapped).
        let r = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not ours, or it could not be repaired: the default action, on the
    // retried access.
    // SAFETY: sigaction with a zeroed (SIG_DFL) action for this signal.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
    }
}

/// Installs the SIGBUS handler (once per process).
pub fn install_sigbus_guard() {
    INSTALL.call_once(|| {
        PAGE.store(page_size(), Ordering::Relaxed);
        // SAFETY: a zeroed sigaction is valid; we set a handler with the
        // SA_SIGINFO signature and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigbus;
            sa.sa_sigaction = handler as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "cannot install the SIGBUS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_hold_the_memory_they_point_into() {
        let two = [(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0x1000)];
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&two).unwrap());
        let mut b = GuestBuffers::default();
        // Across two regions: two buffers.
        assert_eq!(b.push(&mem, 0x1800, 0x1000), Ok(()));
        assert_eq!(
            b.iter().map(GuestIov::len).collect::<Vec<_>>(),
            [0x800, 0x800]
        );
        // The list keeps the snapshot mapped after its owner lets go.
        let weak = Arc::downgrade(&mem);
        drop(mem);
        assert!(weak.upgrade().is_some());
        // One request's buffers come from one snapshot.
        let other = Arc::new(GuestMemoryMmap::<()>::from_ranges(&two).unwrap());
        assert_eq!(b.push(&other, 0, 16), Err(Unmapped));
        // Past the end of guest memory.
        let mut c = GuestBuffers::default();
        assert_eq!(c.push(&other, 0x2f00, 0x200), Err(Unmapped));
        // The request ends: the snapshot goes back, and with it the mapping.
        assert!(b.end().is_some());
        assert!(b.is_empty() && b.memory().is_none());
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn a_tail_is_zeroed_across_buffers_from_its_first_byte() {
        let mut a = [7u8; 10];
        let mut b = [7u8; 10];
        // SAFETY: both arrays outlive the iovecs.
        let iov = unsafe {
            [
                GuestIov::new(a.as_mut_ptr(), 10),
                GuestIov::new(b.as_mut_ptr(), 10),
            ]
        };
        zero_tail(&iov, 13);
        assert_eq!(a, [7u8; 10]);
        assert_eq!(b, [7, 7, 7, 0, 0, 0, 0, 0, 0, 0]);
        zero_tail(&iov, 4);
        assert_eq!(a, [7, 7, 7, 7, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b, [0u8; 10]);
    }

    #[test]
    fn volatile_copies_stay_inside_the_buffer() {
        let mut buf = vec![7u8; 100];
        // SAFETY: `buf` outlives `v` and is only used through it below.
        let v = unsafe { GuestIov::new(buf.as_mut_ptr(), 10) };
        assert_eq!(v.write_at(8, &[1, 2, 3, 4]), 2);
        let mut out = [0u8; 4];
        assert_eq!(v.read_at(6, &mut out), 4);
        assert_eq!(out, [7, 7, 1, 2]);
        assert_eq!(v.write_at(11, &[9]), 0);
        v.zero();
        assert!(buf[..10].iter().all(|&b| b == 0));
        assert!(buf[10..].iter().all(|&b| b == 7));
    }

    #[test]
    fn advance_splits_iovecs() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        // SAFETY: both arrays outlive the iovecs, which are never used for I/O.
        let l = unsafe {
            [
                GuestIov::new(a.as_mut_ptr(), 10),
                GuestIov::new(b.as_mut_ptr(), 10),
            ]
        };
        let mut v = as_iovecs(&l).to_vec();
        advance_iovecs(&mut v, 13);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 7);
    }

    /// A memfd mapping that is truncated under us: accesses past the new end
    /// would raise SIGBUS and kill the process; with the guard they read zeros.
    #[test]
    fn a_truncated_window_reads_zeros_instead_of_killing_us() {
        use std::os::fd::AsRawFd;
        let f = crate::util::memfd("guard").unwrap();
        f.set_len(2 * 4096).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let g = guard_window(p as usize, 2 * 4096, 4096).unwrap();
        // SAFETY: inside the mapping above, which stays until munmap below.
        let v = unsafe { GuestIov::new(p.cast(), 2 * 4096) };
        v.write_at(4096, &[5; 8]);
        f.set_len(4096).unwrap();
        let before = take_faults();
        let mut b = [1u8; 8];
        assert_eq!(v.read_at(4096, &mut b), 8);
        assert_eq!(b, [0; 8]);
        assert!(take_faults() + before >= 1);
        drop(g);
        // SAFETY: unmapping what we mapped; `v` is not used after this.
        unsafe { libc::munmap(p, 2 * 4096) };
    }
}
