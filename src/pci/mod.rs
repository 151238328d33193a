//! The PCI function: config space with its capability list, BAR0 (an I/O
//! BAR), an optional 64-bit memory BAR (BAR4) and the vendor-specific
//! capabilities that describe it, whose contents all belong to the
//! function's logic (e.g. a virtio transport), BAR1 (the MSI-X table and
//! PBA), and the interrupt eventfds.
//!
//! This layer knows PCI and MSI-X; what lives behind the BARs is a
//! [`BarLogic`] supplied by the caller, so nothing here knows about virtio.

pub mod config;
pub mod irq;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR1_REGION_INDEX, VFIO_PCI_BAR4_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

use crate::memory::{DmaRange, MemoryChange};
use crate::vfio_user::{Device, Errno, IrqInfo, IrqSet, RegionInfo, RegionMmap};
use config::{BarKind, ConfigLayout, ConfigSpace, MsixCap, CONFIG_SIZE};
pub use config::{CapWindow, Identity, VendorCap};
pub use irq::Interrupts;

/// The memory BAR's index (BAR4; BAR5 holds its upper half).
pub const MEM_BAR: u8 = 4;
const _: () = assert!(VFIO_PCI_BAR4_REGION_INDEX == MEM_BAR as u32);

/// The memory BAR a function offers: its size (a power of two) and, when
/// the client may map parts of it, the file behind it and those
/// (offset, size) areas.
pub struct MemBar<'a> {
    pub size: u64,
    pub mmap: Option<(BorrowedFd<'a>, Vec<(u64, u64)>)>,
}

/// The logic behind BAR0 and the memory BAR. Accesses are bounds-checked
/// against the BAR's size by the caller, and may have any width and any
/// offset.
pub trait BarLogic: Send {
    /// Size of the I/O BAR in bytes: a power of two.
    fn io_bar_size(&self) -> u32;
    fn io_read(&mut self, offset: u64, data: &mut [u8]);
    fn io_write(&mut self, offset: u64, data: &[u8]);
    /// The memory BAR, if the function has one.
    fn mem_bar(&self) -> Option<MemBar<'_>> {
        None
    }
    fn mem_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mem_write(&mut self, _offset: u64, _data: &[u8]) {}
    /// Vendor-specific capabilities to list after MSI-X.
    fn capabilities(&self) -> Vec<VendorCap> {
        Vec::new()
    }
    /// Function-level reset: stop all activity, back to power-on state.
    fn reset(&mut self);
    /// The client is gone: back to power-on state without waiting for work
    /// in flight, which writes nothing more.
    fn disconnect(&mut self);
    /// Guest memory changes (see [`MemoryChange`]).
    fn memory_changed(&mut self, change: MemoryChange);
    /// The guest changed the bus-master enable bit.
    fn bus_master_changed(&mut self, enabled: bool);
    /// A live upgrade: stop all activity within `limit`, keeping what a
    /// new binary needs to go on (see [`save`](Self::save)).
    fn freeze(&mut self, _limit: std::time::Duration) -> Result<(), String> {
        Err("this function cannot be handed to another binary".into())
    }
    /// The upgrade did not happen: activity goes on.
    fn thaw(&mut self) {}
    /// The BARs' state, for a new binary.
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Takes [`save`](Self::save)'s output, checked as guest input is;
    /// nothing runs until [`start_restored`](Self::start_restored).
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Err("this function cannot take a saved state".into())
    }
    /// The upgrade is committed: activity resumes.
    fn start_restored(&mut self) {}
}

/// BAR1 layout: MSI-X table at 0, PBA at 0x800, 4 KiB in all.
pub const MSIX_BAR_SIZE: u32 = 0x1000;
pub const MSIX_TABLE_OFFSET: u64 = 0;
pub const MSIX_PBA_OFFSET: u64 = 0x800;
const MSIX_ENTRY_SIZE: usize = 16;
/// The MSI-X capability's place in config space.
pub const MSIX_CAP_OFFSET: usize = 0x40;
/// Most vectors that fit the table in front of the PBA.
pub const MAX_MSIX_VECTORS: u16 = 128;

pub struct PciFunction<B: BarLogic> {
    config: ConfigSpace,
    /// What serves the BARs: the I/O BAR0 and the memory BAR4.
    bars: B,
    /// Size of the memory BAR (0: none).
    mem_size: u64,
    /// The config offset of the capability that windows into the BARs.
    window: Option<(usize, CapWindow)>,
    /// Our copy of the MSI-X table. QEMU emulates the table itself and never
    /// sends table accesses; other clients may.
    msix_table: Vec<u8>,
    irqs: Arc<Interrupts>,
}

impl<B: BarLogic> PciFunction<B> {
    /// `irqs` must have been created with the number of MSI-X vectors the
    /// function exposes (1..=MAX_MSIX_VECTORS).
    pub fn new(id: Identity, bars: B, irqs: Arc<Interrupts>) -> PciFunction<B> {
        let vectors = irqs.msix_vectors();
        assert!((1..=MAX_MSIX_VECTORS).contains(&vectors));
        let layout = ConfigLayout {
            id,
            int_pin: 1,
            bars: {
                let mut b = vec![
                    Some((BarKind::Io, u64::from(bars.io_bar_size()))),
                    Some((BarKind::Mem32, u64::from(MSIX_BAR_SIZE))),
                    None,
                    None,
                    None,
                    None,
                ];
                if let Some(m) = bars.mem_bar() {
                    b[usize::from(MEM_BAR)] = Some((BarKind::Mem64Prefetch, m.size));
                }
                b
            },
            vendor_caps: bars.capabilities(),
            msix: Some(MsixCap {
                offset: MSIX_CAP_OFFSET,
                vectors,
                // BIR 1 in the low 3 bits, offsets 8-byte aligned above them.
                table: u32::try_from(MSIX_TABLE_OFFSET).unwrap_or(0) | 1,
                pba: u32::try_from(MSIX_PBA_OFFSET).unwrap_or(0) | 1,
            }),
        };
        let config = ConfigSpace::new(&layout);
        let window = layout
            .vendor_caps
            .iter()
            .zip(config.vendor_cap_offsets())
            .find_map(|(c, &off)| c.window.map(|w| (off, w)));
        let mem_size = bars.mem_bar().map_or(0, |m| m.size);
        let mut f = PciFunction {
            config,
            mem_size,
            window,
            bars,
            msix_table: Vec::new(),
            irqs,
        };
        f.reset_msix_table();
        f
    }

    pub fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irqs
    }

    fn reset_msix_table(&mut self) {
        let n = usize::from(self.irqs.msix_vectors());
        self.msix_table = vec![0; n * MSIX_ENTRY_SIZE];
        // Every vector starts masked (vector control bit 0), as the spec says.
        for e in self.msix_table.chunks_mut(MSIX_ENTRY_SIZE) {
            e[12] = 1;
        }
    }

    fn table_len(&self) -> u64 {
        self.msix_table.len() as u64
    }

    fn bar1_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset + i as u64;
            *b = if o < self.table_len() {
                self.msix_table[usize::try_from(o).unwrap_or(0)]
            } else if o >= MSIX_PBA_OFFSET {
                // The byte of the pending-bit array, in its 64-bit words.
                let byte = o - MSIX_PBA_OFFSET;
                let word = self
                    .irqs
                    .pending_word(usize::try_from(byte / 8).unwrap_or(0));
                word.to_le_bytes()[usize::try_from(byte % 8).unwrap_or(0)]
            } else {
                0
            };
        }
    }

    fn bar1_write(&mut self, offset: u64, data: &[u8]) {
        // The table is plain storage: masking is the client's business (QEMU
        // emulates the table and swaps eventfds when the guest masks a
        // vector), so our copy does not gate delivery. The PBA and the gap
        // are read-only.
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset + i as u64)
                .ok()
                .and_then(|o| self.msix_table.get_mut(o))
            {
                *slot = b;
            }
        }
    }
}

impl<B: BarLogic> PciFunction<B> {
    /// The BAR access the window capability describes, if it is one the
    /// function has: (BAR, offset, length of 1, 2 or 4 bytes).
    fn window_target(&self, cap: usize, w: CapWindow) -> Option<(u8, u64, usize)> {
        let bar = self.config.byte(cap + w.bar_at);
        let offset = u64::from(self.config.read32(cap + w.offset_at));
        let length = usize::try_from(self.config.read32(cap + w.length_at)).ok()?;
        let size = match bar {
            0 => u64::from(self.bars.io_bar_size()),
            MEM_BAR => self.mem_size,
            _ => 0,
        };
        let fits = matches!(length, 1 | 2 | 4)
            && offset
                .checked_add(length as u64)
                .is_some_and(|end| end <= size);
        if fits {
            Some((bar, offset, length))
        } else {
            crate::dev_log!(self.irqs.log(), Warn,
                "config window access of {length} bytes at BAR{bar} offset {offset:#x}: outside the BAR; ignored"
            );
            None
        }
    }

    /// Whether a config access of `len` bytes at `off` touches the window's
    /// data bytes; returns the capability's offset and layout.
    fn window_hit(&self, off: usize, len: usize) -> Option<(usize, CapWindow)> {
        let (cap, w) = self.window?;
        let d = cap + w.data_at;
        (off < d + 4 && off + len > d).then_some((cap, w))
    }

    fn window_read(&mut self, off: usize, len: usize) {
        let Some((cap, w)) = self.window_hit(off, len) else {
            return;
        };
        let mut buf = [0u8; 4];
        if let Some((bar, offset, length)) = self.window_target(cap, w) {
            match bar {
                0 => self.bars.io_read(offset, &mut buf[..length]),
                _ => self.bars.mem_read(offset, &mut buf[..length]),
            }
        }
        self.config.set_bytes(cap + w.data_at, &buf);
    }

    fn window_write(&mut self, off: usize, len: usize) {
        let Some((cap, w)) = self.window_hit(off, len) else {
            return;
        };
        if let Some((bar, offset, length)) = self.window_target(cap, w) {
            let mut buf = [0u8; 4];
            self.config.read(cap + w.data_at, &mut buf);
            match bar {
                0 => self.bars.io_write(offset, &buf[..length]),
                _ => self.bars.mem_write(offset, &buf[..length]),
            }
        }
    }
}

/// A function as a live upgrade carries it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedFunction {
    /// Config space as read; only its writable bits are taken back.
    config: Vec<u8>,
    msix_table: Vec<u8>,
    irqs: irq::SavedIrqs,
    bars: serde_json::Value,
}

impl<B: BarLogic> PciFunction<B> {
    fn restore_function(
        &mut self,
        state: &serde_json::Value,
        fds: &mut crate::handover::FdBag,
    ) -> Result<(), String> {
        let s: SavedFunction =
            serde_json::from_value(state.clone()).map_err(|e| format!("PCI function: {e}"))?;
        if s.config.len() != CONFIG_SIZE || s.msix_table.len() != self.msix_table.len() {
            return Err(format!(
                "config space of {} bytes and an MSI-X table of {} for a function of \
                 {CONFIG_SIZE} and {}",
                s.config.len(),
                s.msix_table.len(),
                self.msix_table.len()
            ));
        }
        self.irqs.restore(&s.irqs, fds)?;
        self.bars.restore(&s.bars)?;
        // Through the writable masks, as the driver's own writes went:
        // identity, capabilities and BAR sizes stay this binary's.
        self.config.write(0, &s.config);
        self.msix_table.copy_from_slice(&s.msix_table);
        let (enabled, masked) = self.config.msix_control();
        self.irqs.set_msix_control(enabled, masked);
        Ok(())
    }
}

impl<B: BarLogic> Device for PciFunction<B> {
    fn freeze(&mut self, limit: std::time::Duration) -> Result<(), String> {
        self.bars.freeze(limit)
    }

    fn thaw(&mut self) {
        self.bars.thaw();
    }

    fn save(&self, out: &mut crate::handover::Outgoing) -> serde_json::Value {
        let mut config = vec![0u8; CONFIG_SIZE];
        self.config.read(0, &mut config);
        serde_json::to_value(SavedFunction {
            config,
            msix_table: self.msix_table.clone(),
            irqs: self.irqs.save(out),
            bars: self.bars.save(),
        })
        .unwrap_or_default()
    }

    fn restore(
        &mut self,
        state: &serde_json::Value,
        fds: &mut crate::handover::FdBag,
    ) -> Result<(), String> {
        self.restore_function(state, fds)
    }

    fn start_restored(&mut self) {
        self.bars.start_restored();
    }

    fn num_regions(&self) -> u32 {
        VFIO_PCI_NUM_REGIONS
    }

    fn num_irqs(&self) -> u32 {
        VFIO_PCI_NUM_IRQS
    }

    fn region_info(&self, index: u32) -> RegionInfo {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let size = match index {
            VFIO_PCI_BAR0_REGION_INDEX => u64::from(self.bars.io_bar_size()),
            VFIO_PCI_BAR1_REGION_INDEX => u64::from(MSIX_BAR_SIZE),
            VFIO_PCI_BAR4_REGION_INDEX => {
                let Some(m) = self.bars.mem_bar() else {
                    return RegionInfo::default();
                };
                return RegionInfo {
                    size: m.size,
                    flags: rw,
                    mmap: m.mmap.map(|(fd, areas)| RegionMmap {
                        fd: fd.as_raw_fd(),
                        offset: 0,
                        areas,
                    }),
                };
            }
            VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE as u64,
            _ => return RegionInfo::default(),
        };
        RegionInfo {
            size,
            flags: rw,
            mmap: None,
        }
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        let count = match index {
            VFIO_PCI_INTX_IRQ_INDEX | VFIO_PCI_ERR_IRQ_INDEX => 1,
            VFIO_PCI_MSIX_IRQ_INDEX => u32::from(self.irqs.msix_vectors()),
            _ => 0,
        };
        let flags = if index == VFIO_PCI_INTX_IRQ_INDEX {
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
        } else {
            VFIO_IRQ_INFO_EVENTFD
        };
        IrqInfo { flags, count }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        match index {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let off = usize::try_from(offset).map_err(|_| libc::EINVAL)?;
                self.window_read(off, data.len());
                self.config.read(off, data);
            }
            VFIO_PCI_BAR0_REGION_INDEX => self.bars.io_read(offset, data),
            VFIO_PCI_BAR4_REGION_INDEX if self.mem_size > 0 => self.bars.mem_read(offset, data),
            VFIO_PCI_BAR1_REGION_INDEX => self.bar1_read(offset, data),
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let off = usize::try_from(offset).map_err(|_| libc::EINVAL)?;
                let before_bm = self.config.command() & config::COMMAND_BUS_MASTER != 0;
                let fx = self.config.write(off, data);
                self.window_write(off, data.len());
                if fx.msix_control_changed {
                    let (enabled, masked) = self.config.msix_control();
                    crate::dev_log!(
                        self.irqs.log(),
                        Info,
                        "MSI-X {} (function mask {masked})",
                        if enabled { "enabled" } else { "disabled" }
                    );
                    self.irqs.set_msix_control(enabled, masked);
                }
                if fx.command_changed {
                    let bm = self.config.command() & config::COMMAND_BUS_MASTER != 0;
                    if bm != before_bm {
                        crate::dev_debug!(
                            self.irqs.log(),
                            "bus mastering {}",
                            if bm { "enabled" } else { "disabled" }
                        );
                        self.bars.bus_master_changed(bm);
                    }
                }
            }
            VFIO_PCI_BAR0_REGION_INDEX => self.bars.io_write(offset, data),
            VFIO_PCI_BAR4_REGION_INDEX if self.mem_size > 0 => self.bars.mem_write(offset, data),
            VFIO_PCI_BAR1_REGION_INDEX => self.bar1_write(offset, data),
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn set_irqs(&mut self, set: IrqSet) -> Result<(), Errno> {
        self.irqs.set_irqs(set)
    }

    fn reset(&mut self) {
        self.bars.reset();
        self.config.reset();
        self.reset_msix_table();
        self.irqs.reset();
    }

    fn quiesce(&mut self, range: Option<DmaRange>) {
        self.bars.memory_changed(MemoryChange::Quiesce(range));
    }

    fn resume(&mut self) {
        self.bars.memory_changed(MemoryChange::Resume);
    }

    fn dma_mapped(&mut self) {
        self.bars.memory_changed(MemoryChange::Added);
    }

    fn disconnect(&mut self) {
        self.bars.disconnect();
        self.config.reset();
        self.reset_msix_table();
        self.irqs.reset();
        self.irqs.drop_descriptors();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const IO_SIZE: u64 = 0x80;
    /// (BAR, offset, length, write) of each access that reached the logic.
    type Log = Arc<Mutex<Vec<(u8, u64, usize, bool)>>>;
    const MEM_SIZE: u64 = 0x4000;

    /// BARs that record every access and insist it lies inside the BAR:
    /// the function promises its logic bounds-checked accesses.
    #[derive(Default)]
    struct Recorder(Log);

    impl Recorder {
        fn access(&self, bar: u8, offset: u64, len: usize, write: bool) {
            let size = if bar == 0 { IO_SIZE } else { MEM_SIZE };
            assert!(
                offset + len as u64 <= size,
                "BAR{bar} access of {len} at {offset:#x}"
            );
            self.0.lock().unwrap().push((bar, offset, len, write));
        }
    }

    impl BarLogic for Recorder {
        fn io_bar_size(&self) -> u32 {
            u32::try_from(IO_SIZE).unwrap()
        }
        fn io_read(&mut self, offset: u64, data: &mut [u8]) {
            self.access(0, offset, data.len(), false);
            data.fill(0xab);
        }
        fn io_write(&mut self, offset: u64, data: &[u8]) {
            self.access(0, offset, data.len(), true);
        }
        fn mem_bar(&self) -> Option<MemBar<'_>> {
            Some(MemBar {
                size: MEM_SIZE,
                mmap: None,
            })
        }
        fn mem_read(&mut self, offset: u64, data: &mut [u8]) {
            self.access(MEM_BAR, offset, data.len(), false);
            data.fill(0xcd);
        }
        fn mem_write(&mut self, offset: u64, data: &[u8]) {
            self.access(MEM_BAR, offset, data.len(), true);
        }
        fn capabilities(&self) -> Vec<VendorCap> {
            // The virtio PCI-config access window, alone.
            let caps = crate::virtio::modern::capabilities(1, 0);
            caps.into_iter().filter(|c| c.window.is_some()).collect()
        }
        fn reset(&mut self) {}
        fn disconnect(&mut self) {}
        fn memory_changed(&mut self, _change: MemoryChange) {}
        fn bus_master_changed(&mut self, _enabled: bool) {}
    }

    fn function() -> (PciFunction<Recorder>, Log, u64) {
        let rec = Recorder::default();
        let log = rec.0.clone();
        let f = PciFunction::new(
            crate::device::VIRTIO_BLK_IDENTITY,
            rec,
            Arc::new(Interrupts::new(2, crate::util::DeviceLog::new("test"))),
        );
        let cap = f.config.vendor_cap_offsets()[0] as u64;
        (f, log, cap)
    }

    fn aim(f: &mut PciFunction<Recorder>, cap: u64, bar: u8, offset: u32, length: u32) {
        let cfg = VFIO_PCI_CONFIG_REGION_INDEX;
        f.region_write(cfg, cap + 4, &[bar]).unwrap();
        f.region_write(cfg, cap + 8, &offset.to_le_bytes()).unwrap();
        f.region_write(cfg, cap + 12, &length.to_le_bytes())
            .unwrap();
    }

    #[test]
    fn the_config_window_reaches_only_inside_the_bars() {
        let (mut f, log, cap) = function();
        let cfg = VFIO_PCI_CONFIG_REGION_INDEX;
        let mut b = [0u8; 4];
        // Inside: the access goes through, with the window's length.
        aim(&mut f, cap, MEM_BAR, 0x3ffc, 4);
        f.region_read(cfg, cap + 16, &mut b).unwrap();
        assert_eq!(b, [0xcd; 4]);
        aim(&mut f, cap, 0, 0x7e, 2);
        f.region_write(cfg, cap + 16, &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            vec![(MEM_BAR, 0x3ffc, 4, false), (0, 0x7e, 2, true)]
        );
        // Past the end, a width that is no access size, a BAR that is not
        // there, an offset that would overflow: nothing reaches the logic
        // and reads give zeros.
        for (bar, off, len) in [
            (MEM_BAR, 0x3ffe, 4),
            (0, 0x7f, 2),
            (MEM_BAR, 0, 3),
            (MEM_BAR, 0, 8),
            (2, 0, 4),
            (MEM_BAR, u32::MAX, 4),
        ] {
            aim(&mut f, cap, bar, off, len);
            f.region_read(cfg, cap + 16, &mut b).unwrap();
            assert_eq!(b, [0; 4], "bar {bar} offset {off:#x} length {len}");
            f.region_write(cfg, cap + 15, &[9, 9, 9, 9, 9]).unwrap();
        }
        assert_eq!(log.lock().unwrap().len(), 2);
    }
}
