//! Our device as a Linux guest sees it: the legacy virtio-pci register
//! block in BAR0, MSI-X vectors wired to eventfds, through rust-vmm's
//! `vfio_user::Client`. The probe follows Linux's virtio_pci_legacy.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vfio_user_blk::driver_ring::SplitRing;
use vfio_user_blk::virtio::legacy::{self, legacy_ring_layout};

use super::{GuestRam, Transport};

pub struct VfioUserBlk {
    pub client: Client,
    /// vector 0: config; vector q+1: queue q
    pub vectors: Vec<EventFd>,
    pub features: u32,
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
        cfg(&mut client, 0x04, 0x0005)?; // I/O space + bus master
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
        })
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
        self.features = u32::from_le_bytes(f) & !refuse;
        self.write(legacy::GUEST_FEATURES, &self.features.to_le_bytes())?;
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

impl Transport for VfioUserBlk {
    fn kick(&mut self, q: usize) -> Result<()> {
        let q = u16::try_from(q).context("queue index")?;
        self.write(legacy::QUEUE_NOTIFY, &q.to_le_bytes())
    }

    fn irq_fd(&self, q: usize) -> RawFd {
        self.vectors[q + 1].as_raw_fd()
    }

    fn features(&self) -> u64 {
        u64::from(self.features)
    }
}
