//! The vfio-user protocol: wire format, framed socket with descriptor
//! passing, the server loop and the DMA map table.
//!
//! This layer knows the protocol and nothing of PCI semantics beyond region
//! and IRQ indices, and nothing of virtio. The device behind it implements
//! [`Device`]; the server validates every request (sizes, indices, ranges,
//! descriptor counts) before the device sees it.

pub mod budget;
pub mod dma;
pub mod park;
pub mod server;
pub mod socket;
pub mod wire;

use std::os::fd::OwnedFd;

pub use dma::DmaTable;
pub use server::{Control, PeerCred, Server, ServerConfig};
pub use socket::{MemTransport, Transport};

/// A UNIX errno sent back in an error reply. Never zero.
pub type Errno = i32;

/// What DEVICE_GET_REGION_INFO reports for one index. A size of 0 means the
/// region is absent (and is still answered successfully).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_*`
    pub flags: u32,
    /// Parts of the region the client may map from a file the device
    /// owns: sent with `FLAG_MMAP` and a sparse-mmap capability.
    pub mmap: Option<RegionMmap>,
}

/// A mappable region: the file (borrowed from the device, which keeps it
/// open for its whole life), where the region starts in it, and the
/// (offset, size) areas of the region that may be mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionMmap {
    pub fd: std::os::fd::RawFd,
    pub offset: u64,
    pub areas: Vec<(u64, u64)>,
}

/// What DEVICE_GET_IRQ_INFO reports for one index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*`
    pub flags: u32,
    pub count: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    Mask,
    Unmask,
    Trigger,
}

#[derive(Debug)]
pub enum IrqData {
    /// Act on every sub-index of the range.
    None,
    /// Act on the sub-indices whose flag is set.
    Bool(Vec<bool>),
    /// One descriptor per sub-index, or none at all (de-assign the range).
    Eventfds(Vec<OwnedFd>),
}

/// A validated DEVICE_SET_IRQS request: `index` exists, `start + count` is
/// within the index's count, and the data matches `count`. `count` is 0 only
/// for the "tear down the whole index" form (NONE | TRIGGER, start 0).
#[derive(Debug)]
pub struct IrqSet {
    pub index: u32,
    pub action: IrqAction,
    pub start: u32,
    pub count: u32,
    pub data: IrqData,
}

/// The device the server exposes. Calls come from the protocol thread only,
/// in message order.
pub trait Device: Send {
    fn num_regions(&self) -> u32;
    fn num_irqs(&self) -> u32;
    /// Called only with `index < num_regions()`.
    fn region_info(&self, index: u32) -> RegionInfo;
    /// Called only with `index < num_irqs()`.
    fn irq_info(&self, index: u32) -> IrqInfo;
    /// Called with a non-empty range inside the region.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno>;
    /// Called with a non-empty range inside the region.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;
    fn set_irqs(&mut self, set: IrqSet) -> Result<(), Errno>;
    /// DEVICE_RESET: back to power-on state. DMA windows and IRQ
    /// registrations stay.
    fn reset(&mut self);
    /// The DMA table is about to lose `range` (None: every window): stop
    /// every use of that memory and wait for in-flight work on it.
    fn quiesce(&mut self, range: Option<crate::memory::DmaRange>);
    /// Guest memory may be used again.
    fn resume(&mut self);
    /// A DMA window was added: whatever waits for guest memory to appear
    /// must look again (a driver that kicked while its ring was unmapped
    /// will not kick a second time).
    fn dma_mapped(&mut self);
    /// The client went away: reset without waiting for in-flight work
    /// (which must write nothing more), and drop every descriptor it gave.
    fn disconnect(&mut self);
    /// A live upgrade: stop all work within `limit` (else go on, and say
    /// why), so that [`save`](Self::save) describes a device at rest.
    fn freeze(&mut self, limit: std::time::Duration) -> Result<(), String>;
    /// The upgrade did not happen: work goes on.
    fn thaw(&mut self);
    /// The device's state for a new binary; its descriptors are listed in
    /// `out` and named in the state by number.
    fn save(&self, out: &mut crate::handover::Outgoing) -> serde_json::Value;
    /// Takes a saved state, checked as strictly as the messages that made
    /// it; nothing runs until [`start_restored`](Self::start_restored).
    fn restore(
        &mut self,
        state: &serde_json::Value,
        fds: &mut crate::handover::FdBag,
    ) -> Result<(), String>;
    /// The upgrade is committed: work resumes where it stopped.
    fn start_restored(&mut self);
}
