//! Our device as a Linux guest sees it: the legacy virtio-pci register
//! block in BAR0 or the modern (virtio 1.x) structures in BAR4, MSI-X
//! vectors wired to eventfds, through rust-vmm's `vfio_user::Client`. The
//! probes follow Linux's virtio_pci_legacy and virtio_pci_modern.
//!
//! Doorbells go as a guest's would through QEMU: legacy ones are I/O-port
//! writes QEMU sends and waits for (the client's region_write); modern ones
//! are memory writes QEMU posts without waiting, which rust-vmm's client
//! cannot send, so they are written here as REGION_WRITE messages with the
//! no-reply flag on the client's own socket; with the notify page mapped
//! (`--notify mmap`), a store into the page.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context, Result};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR4_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vfio_user_blk::virtio::legacy::{self, legacy_ring_layout};
use vfio_user_blk::virtio::modern;
use vub_testkit::driver_ring::SplitRing;

use super::{GuestRam, Transport};

/// Which interface the synthetic guest drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    Legacy,
    Modern,
}

/// How doorbells leave the guest.
enum Doorbell {
    /// An I/O-port write: sent and waited for.
    Legacy,
    /// A posted memory write on the client's socket.
    Posted(UnixStream),
    /// A store into the mapped notify page.
    Mapped(MmapRegion),
}

pub struct VfioUserBlk {
    pub client: Client,
    /// vector 0: config; vector q+1: queue q
    pub vectors: Vec<EventFd>,
    pub features: u64,
    doorbell: Doorbell,
    /// Doorbells rung (for the notify study).
    pub kicks: u64,
}

/// The client's own connection to `socket`: the descriptor of this process
/// whose peer is that path (rust-vmm's client keeps its stream private).
fn client_socket(socket: &Path) -> Result<UnixStream> {
    let want = socket
        .canonicalize()
        .unwrap_or_else(|_| socket.to_path_buf());
    for e in std::fs::read_dir("/proc/self/fd")? {
        let Ok(fd) = e?.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())?;
        // SAFETY: addr and len describe a writable sockaddr_un.
        let r = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) };
        if r != 0 || i32::from(addr.sun_family) != libc::AF_UNIX {
            continue;
        }
        let path: Vec<u8> = addr
            .sun_path
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c.to_ne_bytes()[0])
            .collect();
        let peer = std::path::PathBuf::from(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&path),
        );
        if peer == want || peer == socket {
            // SAFETY: dup returns a new descriptor we own, or -1.
            let d = unsafe { libc::dup(fd) };
            if d < 0 {
                bail!("dup: {}", std::io::Error::last_os_error());
            }
            // SAFETY: d is a fresh descriptor owned by nothing else.
            return Ok(unsafe { UnixStream::from_raw_fd(d) });
        }
    }
    bail!("the client's socket to {} was not found", socket.display())
}

impl VfioUserBlk {
    /// Connects, maps guest RAM and enables MSI-X, as QEMU and Linux do.
    pub fn connect(socket: &Path, ram: &GuestRam) -> Result<VfioUserBlk> {
        let mut client = Client::new(socket).map_err(|e| anyhow::anyhow!("connecting: {e}"))?;
        client
            .dma_map(0, 0, ram.size, ram.file.as_raw_fd())
            .map_err(|e| anyhow::anyhow!("DMA_MAP: {e}"))?;
        let cfg = |c: &mut Client, off: u64, v: u16| {
            c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, &v.to_le_bytes())
                .map_err(|e| anyhow::anyhow!("config write: {e}"))
        };
        cfg(&mut client, 0x04, 0x0007)?; // I/O and memory space, bus master
        cfg(&mut client, 0x42, 0x8000)?; // MSI-X enable
        let count = client
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_err(|e| anyhow::anyhow!("IRQ info: {e}"))?
            .count;
        let vectors = (0..count)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let fds: Vec<RawFd> = vectors.iter().map(|e| e.as_raw_fd()).collect();
        client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                count,
                &fds,
            )
            .map_err(|e| anyhow::anyhow!("SET_IRQS: {e}"))?;
        Ok(VfioUserBlk {
            client,
            vectors,
            features: 0,
            doorbell: Doorbell::Legacy,
            kicks: 0,
        })
    }

    fn mread(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.client
            .region_read(VFIO_PCI_BAR4_REGION_INDEX, off, buf)
            .map_err(|e| anyhow::anyhow!("BAR4 read: {e}"))
    }

    fn mwrite(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        self.client
            .region_write(VFIO_PCI_BAR4_REGION_INDEX, off, buf)
            .map_err(|e| anyhow::anyhow!("BAR4 write: {e}"))
    }

    /// The modern probe: features (all offered but `refuse`) through
    /// FEATURES_OK, then each queue's three ring addresses, vector and
    /// enable, then DRIVER_OK. Doorbells are then posted writes on the
    /// client's socket (`socket`), or stores into the notify page when the
    /// device offers it for mapping.
    pub fn setup_modern(
        &mut self,
        socket: &Path,
        ram: &GuestRam,
        queues: usize,
        ring_base: u64,
        refuse: u64,
    ) -> Result<Vec<SplitRing>> {
        self.mwrite(modern::DEVICE_STATUS, &[0])?;
        self.mwrite(modern::DEVICE_STATUS, &[1])?;
        self.mwrite(modern::DEVICE_STATUS, &[3])?;
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.mwrite(modern::DEVICE_FEATURE_SELECT, &sel.to_le_bytes())?;
            let mut w = [0u8; 4];
            self.mread(modern::DEVICE_FEATURE, &mut w)?;
            offered |= u64::from(u32::from_le_bytes(w)) << (32 * sel);
        }
        self.features = offered & !refuse;
        for sel in 0..2u32 {
            self.mwrite(modern::DRIVER_FEATURE_SELECT, &sel.to_le_bytes())?;
            let word = u32::try_from((self.features >> (32 * sel)) & 0xffff_ffff)?;
            self.mwrite(modern::DRIVER_FEATURE, &word.to_le_bytes())?;
        }
        self.mwrite(modern::DEVICE_STATUS, &[0xb])?;
        let mut st = [0u8];
        self.mread(modern::DEVICE_STATUS, &mut st)?;
        if st[0] & 0x8 == 0 {
            bail!("the device refused features {:#x}", self.features);
        }
        let event_idx =
            self.features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut rings = Vec::new();
        for q in 0..queues {
            let q16 = u16::try_from(q).context("queue index")?;
            self.mwrite(modern::QUEUE_SELECT, &q16.to_le_bytes())?;
            let mut n = [0u8; 2];
            self.mread(modern::QUEUE_SIZE, &mut n)?;
            let size = u16::from_le_bytes(n);
            if size == 0 {
                bail!("the device has no queue {q}");
            }
            let base = ring_base + (q as u64) * 0x10000;
            let (desc, avail) = (base, base + 16 * u64::from(size));
            let used = (avail + 6 + 2 * u64::from(size)).div_ceil(4) * 4;
            rings.push(SplitRing::new(&ram.mem, size, desc, avail, used, event_idx));
            self.mwrite(modern::QUEUE_DESC, &desc.to_le_bytes())?;
            self.mwrite(modern::QUEUE_DRIVER, &avail.to_le_bytes())?;
            self.mwrite(modern::QUEUE_DEVICE, &used.to_le_bytes())?;
            self.mwrite(modern::QUEUE_MSIX_VECTOR, &(q16 + 1).to_le_bytes())?;
            self.mwrite(modern::QUEUE_ENABLE, &1u16.to_le_bytes())?;
        }
        self.mwrite(modern::MSIX_CONFIG, &0u16.to_le_bytes())?;
        let mapped = self
            .client
            .region(VFIO_PCI_BAR4_REGION_INDEX)
            .and_then(|r| Some((r.file_offset.as_ref()?, *r.sparse_areas.first()?)))
            .map(|(fo, area)| -> Result<MmapRegion> {
                let f = fo.file().try_clone()?;
                MmapRegion::from_file(
                    FileOffset::new(f, fo.start() + area.offset),
                    usize::try_from(area.size)?,
                )
                .context("mapping the notify page")
            })
            .transpose()?;
        self.doorbell = match mapped {
            Some(m) => Doorbell::Mapped(m),
            None => Doorbell::Posted(client_socket(socket)?),
        };
        self.mwrite(modern::DEVICE_STATUS, &[0xf])?;
        Ok(rings)
    }

    fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, off, buf)
            .map_err(|e| anyhow::anyhow!("BAR0 read: {e}"))
    }

    fn write(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        self.client
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, off, buf)
            .map_err(|e| anyhow::anyhow!("BAR0 write: {e}"))
    }

    /// Resets, negotiates (all offered features but `refuse`), sets up
    /// `queues` queues with their rings at `ring_base + i * 64 KiB`, and
    /// sets DRIVER_OK. Returns the rings.
    pub fn setup(
        &mut self,
        ram: &GuestRam,
        queues: usize,
        ring_base: u64,
        refuse: u32,
    ) -> Result<Vec<SplitRing>> {
        self.write(legacy::STATUS, &[0])?;
        self.write(legacy::STATUS, &[1])?;
        self.write(legacy::STATUS, &[3])?;
        let mut f = [0u8; 4];
        self.read(legacy::HOST_FEATURES, &mut f)?;
        let features = u32::from_le_bytes(f) & !refuse;
        self.features = u64::from(features);
        self.write(legacy::GUEST_FEATURES, &features.to_le_bytes())?;
        let event_idx =
            self.features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut rings = Vec::new();
        for q in 0..queues {
            let q16 = u16::try_from(q).context("queue index")?;
            self.write(legacy::QUEUE_SEL, &q16.to_le_bytes())?;
            let mut n = [0u8; 2];
            self.read(legacy::QUEUE_NUM, &mut n)?;
            let size = u16::from_le_bytes(n);
            if size == 0 {
                bail!("the device has no queue {q}");
            }
            let base = ring_base + (q as u64) * 0x10000;
            let (desc, avail, used) = legacy_ring_layout(base, size);
            rings.push(SplitRing::new(&ram.mem, size, desc, avail, used, event_idx));
            let pfn = u32::try_from(base >> legacy::QUEUE_PFN_SHIFT).context("ring address")?;
            self.write(legacy::QUEUE_PFN, &pfn.to_le_bytes())?;
            self.write(legacy::QUEUE_VECTOR, &(q16 + 1).to_le_bytes())?;
        }
        self.write(legacy::CONFIG_VECTOR, &0u16.to_le_bytes())?;
        self.write(legacy::STATUS, &[7])?;
        Ok(rings)
    }
}

/// A REGION_WRITE of `data` at BAR4 `offset` that asks for no reply.
fn posted_write(s: &mut UnixStream, offset: u64, data: &[u8]) -> Result<()> {
    const REGION_WRITE: u16 = 10;
    const NO_REPLY: u32 = 0x10;
    let mut m = Vec::with_capacity(40);
    let size = u32::try_from(32 + data.len())?;
    m.extend_from_slice(&0u16.to_le_bytes()); // id: nobody answers it
    m.extend_from_slice(&REGION_WRITE.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(&NO_REPLY.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&offset.to_le_bytes());
    m.extend_from_slice(&VFIO_PCI_BAR4_REGION_INDEX.to_le_bytes());
    m.extend_from_slice(&u32::try_from(data.len())?.to_le_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).context("posted doorbell")
}

impl Transport for VfioUserBlk {
    fn kick(&mut self, q: usize) -> Result<()> {
        self.kicks += 1;
        let q16 = u16::try_from(q).context("queue index")?;
        let off = u64::from(modern::NOTIFY_MULTIPLIER) * q as u64;
        match &mut self.doorbell {
            Doorbell::Legacy => self.write(legacy::QUEUE_NOTIFY, &q16.to_le_bytes()),
            Doorbell::Posted(s) => posted_write(s, modern::NOTIFY_OFFSET + off, &q16.to_le_bytes()),
            Doorbell::Mapped(page) => {
                let off = usize::try_from(off)?;
                if off + 2 > page.size() {
                    bail!("queue {q} has no doorbell in the notify page");
                }
                // SAFETY: the page is mapped for its whole size and
                // off + 2 lies inside it; a u16 store at a 4-byte multiple
                // is aligned.
                unsafe { std::ptr::write_volatile(page.as_ptr().add(off).cast::<u16>(), q16) };
                Ok(())
            }
        }
    }

    fn irq_fd(&self, q: usize) -> RawFd {
        self.vectors[q + 1].as_raw_fd()
    }

    fn features(&self) -> u64 {
        self.features
    }
}
