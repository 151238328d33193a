//! The DMA map table: the guest-memory windows the client gave us with
//! DMA_MAP, exposed to the rest of the process as vm-memory guest memory.
//!
//! Windows with a descriptor are mapped shared; windows without one (ROM, or
//! guest RAM that is not shareable) are recorded so that their unmap matches,
//! but are not part of the guest memory, so any DMA into them fails cleanly as
//! an unmapped address.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use std::os::fd::AsRawFd;

use super::budget::{BudgetError, Share, Token};
use crate::memory::{self, GuardedWindow};
use crate::util::DeviceLog;
use log::debug;
use vfio_bindings::bindings::vfio::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::memory::GuestMemoryHandle;

/// Page size we support for windows (the `pgsizes` we advertise).
pub const DMA_PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DmaError {
    #[error("window of size 0")]
    EmptyWindow,
    #[error("window {iova:#x}+{size:#x} (file offset {offset:#x}) wraps or is not {DMA_PAGE_SIZE}-aligned")]
    BadWindow { iova: u64, size: u64, offset: u64 },
    #[error("unknown DMA_MAP flags {0:#x}")]
    BadMapFlags(u32),
    #[error("window {iova:#x}+{size:#x} overlaps an existing window")]
    Overlap { iova: u64, size: u64 },
    #[error("too many DMA windows (limit {0})")]
    TooMany(usize),
    #[error("mmap of window {iova:#x}+{size:#x} failed: {reason}")]
    Mmap {
        iova: u64,
        size: u64,
        reason: String,
    },
    #[error("no window is exactly {iova:#x}+{size:#x}")]
    NoSuchWindow { iova: u64, size: u64 },
    #[error("unsupported DMA_UNMAP flags {0:#x}")]
    BadUnmapFlags(u32),
    #[error("unmap-all must give address 0 and size 0")]
    BadUnmapAll,
    #[error("window {iova:#x}+{size:#x} at file offset {offset:#x} reaches past the end of its file ({file_size:#x} bytes)")]
    PastEndOfFile {
        iova: u64,
        size: u64,
        offset: u64,
        file_size: u64,
    },
    #[error("window {iova:#x}+{size:#x}: the descriptor is not a regular file or memfd")]
    NotAFile { iova: u64, size: u64 },
    #[error("window {iova:#x}+{size:#x} refused: {why}")]
    Budget {
        iova: u64,
        size: u64,
        why: BudgetError,
    },
    #[error("window {iova:#x}+{size:#x} refused: no SIGBUS guard slot is free")]
    Unguarded { iova: u64, size: u64 },
}

impl DmaError {
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Overlap { .. } => libc::EEXIST,
            DmaError::TooMany(_) | DmaError::Budget { .. } | DmaError::Unguarded { .. } => {
                libc::ENOSPC
            }
            DmaError::NoSuchWindow { .. } => libc::ENOENT,
            DmaError::BadUnmapFlags(_) => libc::ENOTSUP,
            _ => libc::EINVAL,
        }
    }
}

struct Window {
    iova: u64,
    size: u64,
    /// Present when the window is reachable through guest memory.
    region: Option<Arc<GuestRegionMmap>>,
    /// Keeps a SIGBUS inside the mapping survivable (see `memory`).
    _guard: Option<GuardedWindow>,
    /// The window's place in the process's budget (after the mapping and
    /// the guard: given back once both are gone).
    _token: Option<Token>,
}

/// Windows taken away while a snapshot of guest memory (a request in
/// flight) still used them, from every device of the process: they stay
/// mapped, guarded and counted in their device's budget until the last
/// snapshot lets go, even when their device is removed meanwhile (its
/// guard slot could otherwise be given to another window while the old
/// mapping is still read).
static RETIRED: parking_lot::Mutex<Vec<Window>> = parking_lot::Mutex::new(Vec::new());

/// Whether a thread sweeps [`RETIRED`] (while it holds anything).
static SWEEPER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How often the sweeper looks at the retired windows.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Keeps `w` until no snapshot uses its mapping (see [`RETIRED`]); a
/// thread gives it back within [`SWEEP_EVERY`] of the last snapshot
/// letting go, whether or not any device maps or unmaps meanwhile (a
/// removed device's window would otherwise keep its guest's memory mapped
/// until some other client did).
fn retire(w: Window) {
    use std::sync::atomic::Ordering;
    if w.region.as_ref().is_none_or(|r| Arc::strong_count(r) <= 1) {
        return;
    }
    let mut r = RETIRED.lock();
    r.push(w);
    // Under the lock: the sweeper leaves only under it, having seen the
    // list empty, so a window pushed after that finds the flag down.
    if !SWEEPER.swap(true, Ordering::AcqRel) {
        let spawned = std::thread::Builder::new()
            .name("dma-sweeper".into())
            .spawn(|| loop {
                std::thread::sleep(SWEEP_EVERY);
                sweep_retired();
                let r = RETIRED.lock();
                if r.is_empty() {
                    SWEEPER.store(false, Ordering::Release);
                    return;
                }
            });
        if let Err(e) = spawned {
            // The next map, unmap or idle server loop sweeps instead.
            SWEEPER.store(false, Ordering::Release);
            log::warn!("cannot start the thread that gives back unmapped windows: {e}");
        }
    }
}

/// Gives back the retired windows no snapshot uses any more.
pub fn sweep_retired() {
    // Dropped outside the lock: an unmap is a system call.
    let gone: Vec<Window> = {
        let mut r = RETIRED.lock();
        if r.is_empty() {
            return;
        }
        let (keep, gone): (Vec<Window>, Vec<Window>) = std::mem::take(&mut *r)
            .into_iter()
            .partition(|w| w.region.as_ref().is_some_and(|r| Arc::strong_count(r) > 1));
        *r = keep;
        gone
    };
    drop(gone);
}

/// The per-connection table of DMA windows.
pub struct DmaTable {
    windows: Vec<Window>,
    max_windows: usize,
    memory: GuestMemoryHandle,
    share: Arc<Share>,
    log: Arc<DeviceLog>,
}

impl DmaTable {
    pub fn new(
        memory: GuestMemoryHandle,
        max_windows: usize,
        share: Arc<Share>,
        log: Arc<DeviceLog>,
    ) -> DmaTable {
        DmaTable {
            windows: Vec::new(),
            max_windows,
            memory,
            share,
            log,
        }
    }

    /// Gives back the retired windows no snapshot uses any more (of every
    /// device: see [`sweep_retired`]).
    pub fn sweep(&mut self) {
        sweep_retired();
    }

    pub fn memory(&self) -> GuestMemoryHandle {
        self.memory.clone()
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    pub fn set_max_windows(&mut self, max: usize) {
        self.max_windows = max;
    }

    /// Adds a window. Adding never invalidates what readers already hold, so
    /// it needs no quiesce.
    pub fn map(
        &mut self,
        iova: u64,
        size: u64,
        offset: u64,
        flags: u32,
        fd: Option<OwnedFd>,
    ) -> Result<(), DmaError> {
        self.check_new_window(iova, size, offset, flags)?;
        self.sweep();
        // Windows unmapped but still used by a request in flight count too:
        // a client cannot pile them up by unmapping and mapping again.
        if self.windows.len() >= self.max_windows || self.share.used() >= self.max_windows {
            return Err(DmaError::TooMany(self.max_windows));
        }

        let writable = flags & VFIO_DMA_MAP_FLAG_WRITE != 0;
        let mut guard = None;
        let mut token = None;
        let region = match fd {
            Some(fd) if writable => {
                // Its descriptor and guard slot come out of the process's
                // budget, within this device's share.
                let t = self
                    .share
                    .take()
                    .map_err(|why| DmaError::Budget { iova, size, why })?;
                let (region, g) = map_window(iova, size, offset, fd)?;
                guard = Some(g);
                token = Some(t);
                Some(Arc::new(region))
            }
            fd => {
                self.say_unreachable(iova, size, writable, fd.is_some());
                None
            }
        };
        let pos = self.windows.partition_point(|w| w.iova < iova);
        self.windows.insert(
            pos,
            Window {
                iova,
                size,
                region,
                _guard: guard,
                _token: token,
            },
        );
        self.publish();
        Ok(())
    }

    /// What a new window must be: not empty, page-aligned, not wrapping,
    /// with known flags, overlapping no other.
    fn check_new_window(
        &self,
        iova: u64,
        size: u64,
        offset: u64,
        flags: u32,
    ) -> Result<(), DmaError> {
        if size == 0 {
            return Err(DmaError::EmptyWindow);
        }
        let aligned = |v: u64| v.is_multiple_of(DMA_PAGE_SIZE);
        if iova.checked_add(size).is_none()
            || offset.checked_add(size).is_none()
            || !aligned(iova)
            || !aligned(size)
            || !aligned(offset)
            || i64::try_from(offset).is_err()
        {
            return Err(DmaError::BadWindow { iova, size, offset });
        }
        if flags & !(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) != 0 {
            return Err(DmaError::BadMapFlags(flags));
        }
        let end = iova + size;
        if self
            .windows
            .iter()
            .any(|w| iova < w.iova + w.size && w.iova < end)
        {
            return Err(DmaError::Overlap { iova, size });
        }
        Ok(())
    }

    /// A window the device does not map: read-only (ROM), or without a
    /// file to map.
    fn say_unreachable(&self, iova: u64, size: u64, writable: bool, has_fd: bool) {
        if has_fd {
            // A read-only window (ROM). Virtio buffers never live there,
            // and a read-only mapping would fault on a device write, so it
            // is not made reachable. Firmware (ROM) windows come and go
            // while SeaBIOS runs.
            crate::dev_debug!(
                self.log,
                "DMA window {iova:#x}+{size:#x} is read-only; not used for device DMA"
            );
        } else if writable {
            crate::dev_log!(
                self.log,
                Warn,
                "DMA window {iova:#x}+{size:#x} came without a file descriptor: \
                 the device cannot reach it. Start QEMU with \
                 -object memory-backend-memfd,share=on for guest RAM"
            );
        } else {
            crate::dev_debug!(
                self.log,
                "DMA window {iova:#x}+{size:#x} has no file descriptor (ROM)"
            );
        }
    }

    /// The window `iova + size` exactly, if there is one, with where it is
    /// mapped here.
    pub fn find(&self, iova: u64, size: u64) -> Option<crate::memory::DmaRange> {
        self.windows
            .iter()
            .find(|w| w.iova == iova && w.size == size)
            .map(|w| crate::memory::DmaRange {
                iova,
                size,
                host: w.region.as_ref().map_or(0, |r| r.as_ptr() as usize),
                host_len: if w.region.is_some() {
                    usize::try_from(w.size).unwrap_or(0)
                } else {
                    0
                },
            })
    }

    /// Removes one window, or all of them. The caller must have quiesced
    /// every user of guest memory first.
    pub fn unmap(&mut self, iova: u64, size: u64, flags: u32) -> Result<(), DmaError> {
        if flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0
            || flags & !(VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0
        {
            return Err(DmaError::BadUnmapFlags(flags));
        }
        if flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            if iova != 0 || size != 0 {
                return Err(DmaError::BadUnmapAll);
            }
            self.clear();
            return Ok(());
        }
        let pos = self
            .windows
            .iter()
            .position(|w| w.iova == iova && w.size == size)
            .ok_or(DmaError::NoSuchWindow { iova, size })?;
        let w = self.windows.remove(pos);
        self.publish();
        retire(w);
        self.sweep();
        Ok(())
    }

    /// The client is gone: every window's mapping becomes a private
    /// (copy-on-write) mapping of the same file, so that backend I/O still
    /// in flight cannot write into the client's memory, while writes to
    /// disk still in flight read the client's bytes, never zeros. (Reads
    /// with O_DIRECT already in the disk write into the pages they pinned
    /// at submission, which no remapping can redirect.)
    pub fn revoke_all(&self) {
        for w in &self.windows {
            let Some(r) = &w.region else { continue };
            let Some(fo) = r.file_offset() else { continue };
            let len = usize::try_from(w.size).unwrap_or(0);
            if let Err(e) = memory::revoke(r.as_ptr() as usize, len, fo.file(), fo.start()) {
                crate::dev_log!(
                    self.log,
                    Warn,
                    "DMA window {:#x}+{:#x}: cannot make it private ({e}); left shared",
                    w.iova,
                    w.size
                );
            }
        }
    }

    /// Every window, for a live upgrade: its descriptor (the file it maps)
    /// listed in `out`; a window the device does not reach has none.
    pub fn save(&self, out: &mut crate::handover::Outgoing) -> Vec<super::park::SavedWindow> {
        use std::os::fd::AsFd;
        self.windows
            .iter()
            .map(|w| {
                let fo = w.region.as_ref().and_then(|r| r.file_offset());
                super::park::SavedWindow {
                    iova: w.iova,
                    size: w.size,
                    offset: fo.map_or(0, FileOffset::start),
                    fd: fo.map_or(-1, |f| out.add(f.file().as_fd())),
                }
            })
            .collect()
    }

    /// Drops every window (disconnect).
    pub fn clear(&mut self) {
        let gone = std::mem::take(&mut self.windows);
        self.publish();
        for w in gone {
            retire(w);
        }
        self.sweep();
    }

    fn publish(&self) {
        let regions: Vec<_> = self
            .windows
            .iter()
            .filter_map(|w| w.region.clone())
            .collect();
        // Windows never overlap and are kept sorted, so the only way this
        // fails is an empty list, which is the empty memory.
        let mem = GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default();
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
    }
}

impl Drop for DmaTable {
    /// The device goes (removed): its windows still used by a request in
    /// flight stay mapped and guarded until it lets go.
    fn drop(&mut self) {
        for w in std::mem::take(&mut self.windows) {
            retire(w);
        }
        sweep_retired();
    }
}

/// Checks the descriptor behind a window before it is mapped: a regular
/// file (memfd, tmpfs, hugetlbfs) long enough for the window. Mapping past
/// a file's end succeeds but every access there raises SIGBUS. Where the
/// file takes seals (a memfd made with MFD_ALLOW_SEALING and not yet sealed
/// shut), it is sealed against shrinking, so that it cannot be cut short
/// later either; QEMU seals its memfd RAM so itself.
fn check_file(file: &File, iova: u64, size: u64, offset: u64) -> Result<(), DmaError> {
    let meta = file.metadata().map_err(|e| DmaError::Mmap {
        iova,
        size,
        reason: format!("fstat: {e}"),
    })?;
    if !meta.file_type().is_file() {
        return Err(DmaError::NotAFile { iova, size });
    }
    let file_size = meta.len();
    // offset + size does not wrap: checked by the caller.
    if offset + size > file_size {
        return Err(DmaError::PastEndOfFile {
            iova,
            size,
            offset,
            file_size,
        });
    }
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL) == 0 {
        // SAFETY: as above.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        if r == 0 {
            debug!("DMA window {iova:#x}+{size:#x}: memfd sealed against shrinking");
        }
    }
    Ok(())
}

/// The page size of a file's mappings: a huge page on hugetlbfs.
fn mapping_page(f: Option<&FileOffset>) -> usize {
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let Some(f) = f else { return 4096 };
    // SAFETY: statfs is plain data; zeroed is valid and fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on a descriptor we own, with a pointer to `st`.
    let r = unsafe { libc::fstatfs(f.file().as_raw_fd(), &mut st) };
    if r == 0 && st.f_type == HUGETLBFS_MAGIC {
        usize::try_from(st.f_bsize).unwrap_or(4096)
    } else {
        4096
    }
}

fn map_window(
    iova: u64,
    size: u64,
    offset: u64,
    fd: OwnedFd,
) -> Result<(GuestRegionMmap, GuardedWindow), DmaError> {
    let fail = |reason: String| DmaError::Mmap { iova, size, reason };
    let len = usize::try_from(size).map_err(|_| fail("size does not fit in memory".into()))?;
    let file = File::from(fd);
    check_file(&file, iova, size, offset)?;
    // MAP_SHARED so that we see the guest's writes and the guest sees ours.
    let mapping = MmapRegion::build(
        Some(FileOffset::new(file, offset)),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(|e| fail(e.to_string()))?;
    // Never mapped unguarded: a file cut short under it would kill the
    // process. (The budget keeps within the guard's slots; this holds even
    // if a snapshot keeps retired windows a while longer.)
    let guard = memory::guard_window(
        mapping.as_ptr() as usize,
        len,
        mapping_page(mapping.file_offset()),
    )
    .ok_or(DmaError::Unguarded { iova, size })?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(iova))
        .ok_or_else(|| fail("address wraps".into()))?;
    Ok((region, guard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddressSpace};

    fn memfd(size: u64) -> OwnedFd {
        let f = crate::util::memfd("dma-test").unwrap();
        f.set_len(size).unwrap();
        OwnedFd::from(f)
    }

    const RW: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

    /// An empty guest memory and a table of 16 windows over it.
    fn table() -> (GuestMemoryHandle, DmaTable) {
        let mem = GuestMemoryHandle::new(GuestMemoryMmap::default());
        let t = DmaTable::new(
            mem.clone(),
            16,
            Share::register().unwrap(),
            DeviceLog::new("test"),
        );
        (mem, t)
    }

    /// Whether a mapping of a memfd named `name` is in this process.
    fn mapped(name: &str) -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .contains(&format!("memfd:{name}"))
    }

    /// From the second hostile review: a window unmapped while a request
    /// used it was given back only at some later map or unmap of any
    /// device, so a removed device's guest memory could stay mapped for
    /// good on an otherwise quiet target. It goes within moments of the
    /// last request letting go.
    #[test]
    fn a_retired_window_goes_once_its_last_user_lets_go_without_other_dma() {
        let (mem, mut t) = table();
        let name = "dma-sweep-test";
        let f = crate::util::memfd(name).unwrap();
        f.set_len(0x4000).unwrap();
        t.map(0x10000, 0x4000, 0, RW, Some(OwnedFd::from(f)))
            .unwrap();
        let in_flight = mem.memory();
        t.unmap(0x10000, 0x4000, 0).unwrap();
        assert!(mapped(name), "given back while a request used it");
        drop(in_flight);
        let t0 = std::time::Instant::now();
        while mapped(name) {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(3),
                "still mapped {:?} after its last user let go",
                t0.elapsed()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn map_read_unmap() {
        let (mem, mut t) = table();
        t.map(0x10000, 0x2000, 0x1000, RW, Some(memfd(0x4000)))
            .unwrap();
        mem.memory()
            .write_obj(0xabu8, GuestAddress(0x11fff))
            .unwrap();
        assert_eq!(
            mem.memory().read_obj::<u8>(GuestAddress(0x11fff)).unwrap(),
            0xab
        );
        assert!(mem.memory().read_obj::<u8>(GuestAddress(0x12000)).is_err());
        assert_eq!(
            t.unmap(0x10000, 0x1000, 0),
            Err(DmaError::NoSuchWindow {
                iova: 0x10000,
                size: 0x1000
            })
        );
        t.unmap(0x10000, 0x2000, 0).unwrap();
        assert!(mem.memory().read_obj::<u8>(GuestAddress(0x11fff)).is_err());
    }

    #[test]
    fn rejects_bad_windows() {
        let mem = GuestMemoryHandle::new(GuestMemoryMmap::default());
        let mut t = DmaTable::new(mem, 2, Share::register().unwrap(), DeviceLog::new("test"));
        assert_eq!(t.map(0, 0, 0, RW, None), Err(DmaError::EmptyWindow));
        assert!(matches!(
            t.map(u64::MAX - 0xfff, 0x2000, 0, RW, None),
            Err(DmaError::BadWindow { .. })
        ));
        assert!(matches!(
            t.map(0x800, 0x1000, 0, RW, None),
            Err(DmaError::BadWindow { .. })
        ));
        assert_eq!(
            t.map(0, 0x1000, 0, 0x80, None),
            Err(DmaError::BadMapFlags(0x80))
        );
        t.map(0, 0x2000, 0, RW, None).unwrap();
        assert_eq!(
            t.map(0x1000, 0x1000, 0, RW, None).unwrap_err().errno(),
            libc::EEXIST
        );
        t.map(0x2000, 0x1000, 0, RW, None).unwrap();
        assert_eq!(
            t.map(0x3000, 0x1000, 0, RW, None).unwrap_err().errno(),
            libc::ENOSPC
        );
        assert_eq!(
            t.unmap(0x1000, 0, VFIO_DMA_UNMAP_FLAG_ALL),
            Err(DmaError::BadUnmapAll)
        );
        assert_eq!(t.unmap(0, 0, 1).unwrap_err().errno(), libc::ENOTSUP);
        t.unmap(0, 0, VFIO_DMA_UNMAP_FLAG_ALL).unwrap();
        assert!(t.is_empty());
    }

    /// Regression (issue 8, bug 1): a window larger than its file used to be
    /// accepted, and the first access past the file's end killed the server
    /// with SIGBUS. It is refused with EINVAL before anything is mapped.
    #[test]
    fn window_past_the_end_of_its_file_is_refused() {
        let mem = GuestMemoryHandle::new(GuestMemoryMmap::default());
        let mut t = DmaTable::new(mem, 4, Share::register().unwrap(), DeviceLog::new("test"));
        let e = t.map(0, 16 << 20, 0, RW, Some(memfd(4096))).unwrap_err();
        assert!(matches!(e, DmaError::PastEndOfFile { .. }), "{e}");
        assert_eq!(e.errno(), libc::EINVAL);
        // The offset counts too.
        let e = t
            .map(0, 0x2000, 0x1000, RW, Some(memfd(0x2000)))
            .unwrap_err();
        assert!(matches!(e, DmaError::PastEndOfFile { .. }));
        // Not a file at all.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = t.map(0, 0x1000, 0, RW, Some(OwnedFd::from(a))).unwrap_err();
        assert!(matches!(e, DmaError::NotAFile { .. }));
        assert!(t.is_empty());
        t.map(0, 0x2000, 0, RW, Some(memfd(0x2000))).unwrap();
    }

    /// A memfd that takes seals is sealed against shrinking when mapped.
    #[test]
    fn sealable_memfd_is_sealed_against_shrinking() {
        let name = std::ffi::CString::new("sealable").unwrap();
        // SAFETY: a valid name; the new descriptor is owned right below.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: memfd_create returned it and nothing else owns it.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(0x2000).unwrap();
        let mem = GuestMemoryHandle::new(GuestMemoryMmap::default());
        let mut t = DmaTable::new(mem, 4, Share::register().unwrap(), DeviceLog::new("test"));
        t.map(
            0,
            0x2000,
            0,
            RW,
            Some(OwnedFd::from(f.try_clone().unwrap())),
        )
        .unwrap();
        assert!(f.set_len(0x1000).is_err(), "shrinking is sealed");
        f.set_len(0x3000).unwrap();
    }

    #[test]
    fn fdless_window_is_unreachable() {
        let mem = GuestMemoryHandle::new(GuestMemoryMmap::default());
        let mut t = DmaTable::new(
            mem.clone(),
            4,
            Share::register().unwrap(),
            DeviceLog::new("test"),
        );
        t.map(0, 0x1000, 0, RW, None).unwrap();
        assert!(mem.memory().read_obj::<u8>(GuestAddress(0)).is_err());
        // A read-only window with a descriptor is not reachable either.
        t.map(
            0x1000,
            0x1000,
            0,
            VFIO_DMA_MAP_FLAG_READ,
            Some(memfd(0x1000)),
        )
        .unwrap();
        assert!(mem.memory().read_obj::<u8>(GuestAddress(0x1000)).is_err());
        assert_eq!(t.len(), 2);
    }
}
