//! A synthetic guest: the driver side of virtio-blk, for the benchmark. The
//! split ring is the test kit's `driver_ring` (the integration tests'
//! driver uses it too); the transports are our device over vfio-user (the
//! legacy virtio-pci register block, through rust-vmm's `vfio_user::Client`)
//! and a vhost-user-blk backend (through rust-vmm's `vhost` frontend), so
//! both are driven by the same ring code, from the same memfd guest memory.

pub mod vfio;
pub mod vhost;

use std::fs::File;
use std::os::fd::RawFd;

use anyhow::{Context, Result};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Guest RAM: a memfd mapped at guest address 0.
pub struct GuestRam {
    pub file: File,
    pub mem: GuestMemoryMmap,
    pub size: u64,
}

impl GuestRam {
    pub fn new(size: u64) -> Result<GuestRam> {
        let file = vfio_user_blk::util::memfd("guest-ram").context("memfd")?;
        file.set_len(size).context("sizing guest RAM")?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            usize::try_from(size).context("guest RAM size")?,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .context("mapping guest RAM")?;
        Ok(GuestRam { file, mem, size })
    }

    /// Host address of guest address `gpa` (for vhost-user, which speaks in
    /// the frontend's virtual addresses).
    pub fn host_addr(&self, gpa: u64) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .unwrap_or(0)
    }
}

/// A device the synthetic guest drives: ring doorbells and interrupts.
pub trait Transport {
    /// Rings queue `q`'s doorbell.
    fn kick(&mut self, q: usize) -> Result<()>;
    /// The eventfd that signals queue `q`'s interrupt.
    fn irq_fd(&self, q: usize) -> RawFd;
    /// Negotiated feature bits (low 32 are the device's).
    fn features(&self) -> u64;
}
