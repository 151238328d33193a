//! A small virtio-blk driver for tests, behaving like Linux's
//! virtio_pci_legacy or virtio_pci_modern + virtio_blk, on top of rust-vmm's
//! `vfio_user::Client` with memfd guest RAM. The rings live in the memfd; the driver writes
//! descriptors and the available ring, rings doorbells when the device
//! wants them, and reads the used ring back.
#![allow(dead_code)]
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::*;
use vfio_user::Client;
use vfio_user_blk::virtio::modern;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vub_testkit::driver_ring::{Buf, PackedRing, SplitRing};

use virtio_bindings::virtio_blk::*;
#[allow(unused_imports)]
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD as T_DISCARD, VIRTIO_BLK_T_FLUSH as T_FLUSH,
    VIRTIO_BLK_T_GET_ID as T_GET_ID, VIRTIO_BLK_T_IN as T_IN, VIRTIO_BLK_T_OUT as T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES as T_WRITE_ZEROES,
};

/// A status byte as the driver reads it.
const fn status(s: u32) -> u8 {
    s as u8
}
pub const S_OK: u8 = status(VIRTIO_BLK_S_OK);
pub const S_IOERR: u8 = status(VIRTIO_BLK_S_IOERR);
pub const S_UNSUPP: u8 = status(VIRTIO_BLK_S_UNSUPP);

/// A feature bit as the low 32 feature bits hold it.
const fn feature(bit: u32) -> u32 {
    1 << bit
}
pub const F_RO: u32 = feature(VIRTIO_BLK_F_RO);
pub const F_FLUSH: u32 = feature(VIRTIO_BLK_F_FLUSH);
pub const F_CONFIG_WCE: u32 = feature(VIRTIO_BLK_F_CONFIG_WCE);
pub const F_MQ: u32 = feature(VIRTIO_BLK_F_MQ);
pub const F_DISCARD: u32 = feature(VIRTIO_BLK_F_DISCARD);
pub const F_WRITE_ZEROES: u32 = feature(VIRTIO_BLK_F_WRITE_ZEROES);
pub const F_INDIRECT: u32 = feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);
pub const F_EVENT_IDX: u32 = feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);

#[allow(unused_imports)]
pub use vub_testkit::driver_ring::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

/// Where rings and buffers go in guest RAM.
const RING_BASE: u64 = 0x10000;
const RING_STRIDE: u64 = 0x10000;
/// Buffers start here, or after the rings when there are more than 15
/// queues.
const BUF_BASE: u64 = 0x100000;

/// How one request is laid out in descriptors.
#[derive(Clone, Copy, Debug, Default)]
pub struct Layout {
    /// Split the 16-byte header over two descriptors (10 + 6).
    pub split_header: bool,
    /// Data split into descriptors of at most this many bytes (0 = one).
    pub data_chunk: usize,
    /// Header, data and status in one indirect table.
    pub indirect: bool,
    /// Put the status byte in the same descriptor as read data.
    pub status_with_data: bool,
}

/// Writes a pattern at each (sector, length, layout) of `writes`, on
/// queues 0 and 1 in turn, flushes, then reads each back on the other
/// queue and checks it; `expect` (the whole disk as it should read) is
/// kept up to date.
pub fn round_trip(d: &mut Driver, writes: &[(u64, usize, Layout)], expect: &mut [u8]) {
    for (i, &(sector, len, layout)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        let r = Request::write(sector, &data).laid(layout);
        assert_eq!(d.run(i % 2, &r).0, S_OK, "write {i}");
        let at = (sector * 512) as usize;
        expect[at..at + len].copy_from_slice(&data);
    }
    assert_eq!(d.simple(0, T_FLUSH, 0, vec![], 0).0, S_OK);
    for (i, &(sector, len, _)) in writes.iter().enumerate() {
        let r = Request::read(sector, len).laid(Layout::default().chunks(65536));
        let (st, got, _) = d.run(1 - i % 2, &r);
        assert_eq!(st, S_OK);
        let at = (sector * 512) as usize;
        assert!(got == expect[at..at + len], "read {i} differs");
    }
}

/// Layouts built in one expression: `Layout::default().split().chunks(100)`.
impl Layout {
    pub fn split(mut self) -> Layout {
        self.split_header = true;
        self
    }
    pub fn chunks(mut self, n: usize) -> Layout {
        self.data_chunk = n;
        self
    }
    pub fn indirect(mut self) -> Layout {
        self.indirect = true;
        self
    }
    pub fn status_with_data(mut self) -> Layout {
        self.status_with_data = true;
        self
    }
}

/// One request.
#[derive(Clone, Debug)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Device-readable payload after the header (write data, segments).
    pub out: Vec<u8>,
    /// Device-writable bytes before the status byte (read data, id).
    pub in_len: usize,
    pub layout: Layout,
}

impl Request {
    pub fn read(sector: u64, len: usize) -> Request {
        Request {
            kind: T_IN,
            sector,
            out: vec![],
            in_len: len,
            layout: Layout::default(),
        }
    }

    pub fn write(sector: u64, data: &[u8]) -> Request {
        Request {
            kind: T_OUT,
            sector,
            out: data.to_vec(),
            in_len: 0,
            layout: Layout::default(),
        }
    }

    /// The same request, laid out in descriptors as `layout` says.
    pub fn laid(self, layout: Layout) -> Request {
        Request { layout, ..self }
    }
}

/// The INTx line, where [`Driver::run_signalled`] lists what fired.
pub const INTX: usize = usize::MAX;

/// A submitted request, to be checked after completion.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub queue: usize,
    pub head: u16,
    pub in_addr: u64,
    pub in_len: usize,
    pub status_addr: u64,
}

pub struct Driver {
    pub c: Client,
    /// Driving the modern (virtio 1.x) interface in BAR4.
    pub modern: bool,
    /// The modern interface's features, all 64 bits.
    pub features64: u64,
    /// Packed rings (modern interface, RING_PACKED negotiated): these
    /// instead of `queues`.
    pub packed: Vec<PackedRing>,
    /// `--notify mmap`: the notify page, mapped as QEMU maps it.
    notify_page: Option<vm_memory::MmapRegion>,
    pub ram: File,
    pub mem: GuestMemoryMmap,
    pub ram_size: u64,
    pub queues: Vec<SplitRing>,
    pub features: u32,
    pub msix: bool,
    /// vector i's eventfd (0: config, i+1: queue i)
    pub vectors: Vec<EventFd>,
    pub intx: Option<EventFd>,
    next_buf: u64,
    buf_base: u64,
}

/// `N` bytes of `region` at `off`.
fn read_n<const N: usize>(c: &mut Client, region: u32, off: u64) -> [u8; N] {
    let mut b = [0u8; N];
    c.region_read(region, off, &mut b).unwrap();
    b
}

/// Legacy interface: BAR0.
fn rd16(c: &mut Client, off: u64) -> u16 {
    u16::from_le_bytes(read_n(c, VFIO_PCI_BAR0_REGION_INDEX, off))
}

fn rd32(c: &mut Client, off: u64) -> u32 {
    u32::from_le_bytes(read_n(c, VFIO_PCI_BAR0_REGION_INDEX, off))
}

fn wr(c: &mut Client, off: u64, data: &[u8]) {
    c.region_write(VFIO_PCI_BAR0_REGION_INDEX, off, data)
        .unwrap();
}

/// Modern interface: BAR4.
fn mwr(c: &mut Client, off: u64, data: &[u8]) {
    c.region_write(VFIO_PCI_BAR4_REGION_INDEX, off, data)
        .unwrap();
}

fn mrd16(c: &mut Client, off: u64) -> u16 {
    u16::from_le_bytes(read_n(c, VFIO_PCI_BAR4_REGION_INDEX, off))
}

fn mrd32(c: &mut Client, off: u64) -> u32 {
    u32::from_le_bytes(read_n(c, VFIO_PCI_BAR4_REGION_INDEX, off))
}

pub struct DriverOptions {
    pub ram_size: u64,
    pub msix: bool,
    /// Features to refuse even if offered.
    pub refuse: u32,
    /// Map guest RAM as two DMA windows (halves) instead of one.
    pub split_dma: bool,
    /// Use the modern interface (BAR4) instead of the legacy one.
    pub modern: bool,
    /// Modern: ask for queues of this size.
    pub queue_size: Option<u16>,
}

/// VIRTIO_F_RING_PACKED, as a bit.
pub const F_RING_PACKED: u64 = 1 << 34;

impl DriverOptions {
    /// The modern (virtio 1.x) interface.
    pub fn modern() -> DriverOptions {
        DriverOptions {
            modern: true,
            ..Default::default()
        }
    }

    /// Refusing the (low) feature bits `refuse`.
    pub fn refusing(refuse: u32) -> DriverOptions {
        DriverOptions {
            refuse,
            ..Default::default()
        }
    }

    /// Guest memory in two DMA windows (the lower and the upper half).
    pub fn split_dma() -> DriverOptions {
        DriverOptions {
            split_dma: true,
            ..Default::default()
        }
    }
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            ram_size: 64 << 20,
            msix: true,
            refuse: 0,
            split_dma: false,
            modern: false,
            queue_size: None,
        }
    }
}

impl Driver {
    pub fn new(socket: &Path, o: DriverOptions) -> Driver {
        let c = Client::new(socket).expect("connect");
        let ram = vfio_user_blk::util::memfd("guest-ram").unwrap();
        ram.set_len(o.ram_size).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            usize::try_from(o.ram_size).unwrap(),
            Some(FileOffset::new(ram.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let mut d = Driver {
            c,
            modern: o.modern,
            features64: 0,
            packed: Vec::new(),
            notify_page: None,
            ram,
            mem,
            ram_size: o.ram_size,
            queues: Vec::new(),
            features: 0,
            msix: o.msix,
            vectors: Vec::new(),
            intx: None,
            next_buf: BUF_BASE,
            buf_base: BUF_BASE,
        };
        if o.split_dma {
            let half = o.ram_size / 2;
            d.c.dma_map(0, 0, half, d.ram.as_raw_fd()).unwrap();
            d.c.dma_map(half, half, half, d.ram.as_raw_fd()).unwrap();
        } else {
            d.c.dma_map(0, 0, o.ram_size, d.ram.as_raw_fd()).unwrap();
        }
        if o.modern {
            d.init_modern(u64::from(o.refuse), o.queue_size)
                .expect("the device accepts the features");
        } else {
            d.init(o.refuse);
        }
        d
    }

    fn cfg_write(&mut self, off: u64, data: &[u8]) {
        self.c
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, data)
            .unwrap();
    }

    /// MSI-X on with one eventfd per vector, or an INTx eventfd.
    fn setup_interrupts(&mut self) {
        if self.msix {
            self.cfg_write(0x42, &0x8000u16.to_le_bytes());
            let count = self.c.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap().count;
            self.vectors = (0..count)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            let fds: Vec<i32> = self.vectors.iter().map(|e| e.as_raw_fd()).collect();
            // At most 8 descriptors a message (the server's max_msg_fds),
            // as QEMU splits them.
            for (k, chunk) in fds.chunks(8).enumerate() {
                self.c
                    .set_irqs(
                        VFIO_PCI_MSIX_IRQ_INDEX,
                        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                        (k * 8) as u32,
                        chunk.len() as u32,
                        chunk,
                    )
                    .unwrap();
            }
        } else {
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            self.c
                .set_irqs(
                    VFIO_PCI_INTX_IRQ_INDEX,
                    VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                    0,
                    1,
                    &[e.as_raw_fd()],
                )
                .unwrap();
            self.intx = Some(e);
        }
    }

    /// The Linux legacy probe sequence.
    pub fn init(&mut self, refuse: u32) {
        self.cfg_write(0x04, &0x0005u16.to_le_bytes()); // I/O + bus master
        let nq_max = 64;
        self.setup_interrupts();
        wr(&mut self.c, 18, &[0]);
        wr(&mut self.c, 18, &[1]);
        wr(&mut self.c, 18, &[3]);
        let host = rd32(&mut self.c, 0);
        self.features = host & !refuse;
        wr(&mut self.c, 4, &self.features.to_le_bytes());
        let nq = if self.features & F_MQ != 0 {
            usize::from(self.config_u16(34))
        } else {
            1
        };
        self.queues.clear();
        self.place_buffers_after(nq.min(nq_max));
        for i in 0..nq.min(nq_max) {
            wr(&mut self.c, 14, &(i as u16).to_le_bytes());
            let size = rd16(&mut self.c, 12);
            assert!(size > 0, "queue {i} exists");
            let base = RING_BASE + RING_STRIDE * i as u64;
            let (desc, avail, used) = vfio_user_blk::virtio::legacy::legacy_ring_layout(base, size);
            wr(&mut self.c, 8, &((base >> 12) as u32).to_le_bytes());
            if self.msix {
                wr(&mut self.c, 22, &((i + 1) as u16).to_le_bytes());
                assert_eq!(
                    rd16(&mut self.c, 22),
                    (i + 1) as u16,
                    "queue vector accepted"
                );
            }
            let event_idx = self.features & F_EVENT_IDX != 0;
            self.queues.push(SplitRing::new(
                &self.mem, size, desc, avail, used, event_idx,
            ));
        }
        if self.msix {
            wr(&mut self.c, 20, &0u16.to_le_bytes());
            assert_eq!(rd16(&mut self.c, 20), 0);
        }
        wr(&mut self.c, 18, &[7]);
    }

    /// Where the device config is: (region, offset). Legacy: 24 with
    /// MSI-X, 20 without; modern: the device structure in BAR4.
    fn cfg_base(&self) -> (u32, u64) {
        if self.modern {
            (VFIO_PCI_BAR4_REGION_INDEX, modern::DEVICE_OFFSET)
        } else if self.msix {
            (VFIO_PCI_BAR0_REGION_INDEX, 24)
        } else {
            (VFIO_PCI_BAR0_REGION_INDEX, 20)
        }
    }

    fn cfg_read(&mut self, off: u64, out: &mut [u8]) {
        let (r, b) = self.cfg_base();
        self.c.region_read(r, b + off, out).unwrap();
    }

    pub fn config_u16(&mut self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.cfg_read(off, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn config_u32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.cfg_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn capacity(&mut self) -> u64 {
        let lo = self.config_u32(0);
        let hi = self.config_u32(4);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    pub fn set_writeback(&mut self, on: bool) {
        let (r, b) = self.cfg_base();
        self.c.region_write(r, b + 32, &[u8::from(on)]).unwrap();
    }

    /// The device status register of the interface in use.
    pub fn status(&mut self) -> u8 {
        let mut st = [0xffu8];
        if self.modern {
            self.c
                .region_read(VFIO_PCI_BAR4_REGION_INDEX, modern::DEVICE_STATUS, &mut st)
                .unwrap();
        } else {
            self.c
                .region_read(VFIO_PCI_BAR0_REGION_INDEX, 18, &mut st)
                .unwrap();
        }
        st[0]
    }

    /// Resets the device (status 0), as the driver does on remove.
    pub fn reset(&mut self) {
        if self.modern {
            mwr(&mut self.c, modern::DEVICE_STATUS, &[0]);
        } else {
            wr(&mut self.c, 18, &[0]);
        }
        assert_eq!(self.status(), 0);
    }

    /// The Linux modern probe sequence (virtio_pci_modern + virtio_blk):
    /// features through FEATURES_OK, then each queue's size, three ring
    /// addresses, vector and enable, then DRIVER_OK. Fails when the device
    /// does not keep FEATURES_OK.
    pub fn init_modern(&mut self, refuse: u64, queue_size: Option<u16>) -> Result<(), String> {
        self.cfg_write(0x04, &0x0006u16.to_le_bytes()); // memory + bus master
        self.setup_interrupts();
        mwr(&mut self.c, modern::DEVICE_STATUS, &[0]);
        mwr(&mut self.c, modern::DEVICE_STATUS, &[1]);
        mwr(&mut self.c, modern::DEVICE_STATUS, &[3]);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            mwr(
                &mut self.c,
                modern::DEVICE_FEATURE_SELECT,
                &sel.to_le_bytes(),
            );
            offered |= u64::from(mrd32(&mut self.c, modern::DEVICE_FEATURE)) << (32 * sel);
        }
        let want = offered & !refuse;
        self.negotiate_modern(want)?;
        self.features64 = want;
        self.features = (want & 0xffff_ffff) as u32;
        let nq = if self.features & F_MQ != 0 {
            usize::from(self.config_u16(34))
        } else {
            1
        };
        let num_queues = usize::from(mrd16(&mut self.c, modern::NUM_QUEUES));
        assert!(num_queues >= nq, "num_queues covers the config's");
        self.queues.clear();
        self.packed.clear();
        self.place_buffers_after(nq);
        for i in 0..nq {
            let q = i as u16;
            mwr(&mut self.c, modern::QUEUE_SELECT, &q.to_le_bytes());
            let max = mrd16(&mut self.c, modern::QUEUE_SIZE);
            assert!(max > 0, "queue {i} exists");
            let size = queue_size.unwrap_or(max);
            mwr(&mut self.c, modern::QUEUE_SIZE, &size.to_le_bytes());
            assert_eq!(mrd16(&mut self.c, modern::QUEUE_SIZE), size, "size taken");
            let base = RING_BASE + RING_STRIDE * i as u64;
            let n = u64::from(size);
            let packed = self.features64 & F_RING_PACKED != 0;
            let (desc, avail, used) = if packed {
                // The ring, then the driver's and the device's event
                // structures.
                (base, base + 16 * n, base + 16 * n + 4)
            } else {
                let avail = base + 16 * n;
                (base, avail, (avail + 6 + 2 * n).div_ceil(4) * 4)
            };
            mwr(
                &mut self.c,
                modern::QUEUE_DESC,
                &(desc as u32).to_le_bytes(),
            );
            mwr(
                &mut self.c,
                modern::QUEUE_DESC + 4,
                &((desc >> 32) as u32).to_le_bytes(),
            );
            mwr(&mut self.c, modern::QUEUE_DRIVER, &avail.to_le_bytes());
            mwr(
                &mut self.c,
                modern::QUEUE_DEVICE,
                &(used as u32).to_le_bytes(),
            );
            mwr(&mut self.c, modern::QUEUE_DEVICE + 4, &0u32.to_le_bytes());
            if self.msix {
                mwr(
                    &mut self.c,
                    modern::QUEUE_MSIX_VECTOR,
                    &(q + 1).to_le_bytes(),
                );
                assert_eq!(mrd16(&mut self.c, modern::QUEUE_MSIX_VECTOR), q + 1);
            }
            assert_eq!(mrd16(&mut self.c, modern::QUEUE_NOTIFY_OFF), q);
            mwr(&mut self.c, modern::QUEUE_ENABLE, &1u16.to_le_bytes());
            let event_idx = self.features & F_EVENT_IDX != 0;
            if packed {
                self.packed.push(PackedRing::new(
                    &self.mem, size, desc, avail, used, event_idx,
                ));
            } else {
                self.queues.push(SplitRing::new(
                    &self.mem, size, desc, avail, used, event_idx,
                ));
            }
        }
        if self.msix {
            mwr(&mut self.c, modern::MSIX_CONFIG, &0u16.to_le_bytes());
            assert_eq!(mrd16(&mut self.c, modern::MSIX_CONFIG), 0);
        }
        // The notify page, when the device offers it for mapping.
        if let Some(r) = self.c.region(VFIO_PCI_BAR4_REGION_INDEX) {
            if let (Some(fo), Some(area)) = (&r.file_offset, r.sparse_areas.first()) {
                let f = fo.file().try_clone().unwrap();
                let region = vm_memory::MmapRegion::<()>::from_file(
                    FileOffset::new(f, fo.start() + area.offset),
                    usize::try_from(area.size).unwrap(),
                )
                .expect("map the notify page");
                assert_eq!(area.offset, modern::NOTIFY_OFFSET);
                self.notify_page = Some(region);
            }
        }
        mwr(&mut self.c, modern::DEVICE_STATUS, &[0xf]);
        assert_eq!(self.status() & 0x4, 0x4, "DRIVER_OK taken");
        Ok(())
    }

    /// Writes `want` as the driver's features and sets FEATURES_OK; Err
    /// when the device clears it (it refuses the set).
    pub fn negotiate_modern(&mut self, want: u64) -> Result<(), String> {
        for sel in 0..2u32 {
            mwr(
                &mut self.c,
                modern::DRIVER_FEATURE_SELECT,
                &sel.to_le_bytes(),
            );
            let word = (want >> (32 * sel)) as u32;
            mwr(&mut self.c, modern::DRIVER_FEATURE, &word.to_le_bytes());
        }
        mwr(&mut self.c, modern::DEVICE_STATUS, &[0xb]);
        let st = self.status();
        if st & 0x8 == 0 {
            return Err(format!(
                "FEATURES_OK refused for {want:#x} (status {st:#x})"
            ));
        }
        Ok(())
    }

    /// Allocates guest buffer space (16-byte aligned).
    pub fn alloc(&mut self, len: usize) -> u64 {
        let a = self.next_buf;
        self.next_buf = (self.next_buf + len as u64 + 15) & !15;
        if self.next_buf > self.ram_size {
            assert!(
                self.buf_base + len as u64 <= self.ram_size,
                "no room for {len} bytes"
            );
            self.next_buf = self.buf_base;
            return self.alloc(len);
        }
        a
    }

    pub fn reset_alloc(&mut self) {
        self.next_buf = self.buf_base;
    }

    /// Buffers go after the rings of `queues` queues.
    fn place_buffers_after(&mut self, queues: usize) {
        self.buf_base = (RING_BASE + RING_STRIDE * queues as u64).max(BUF_BASE);
        self.next_buf = self.next_buf.max(self.buf_base);
    }

    /// Writes one descriptor of queue `q`'s table by hand.
    pub fn raw_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        SplitRing::write_desc(&self.mem, self.queues[q].desc, i, addr, len, flags, next);
    }

    /// Writes a request header at a fresh buffer; returns its address.
    pub fn header_buf(&mut self, kind: u32, sector: u64) -> u64 {
        let a = self.alloc(16);
        let mut h = Vec::new();
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(a)).unwrap();
        a
    }

    pub fn avail_idx(&self, q: usize) -> u16 {
        self.queues[q].avail_idx()
    }

    /// Sets where the next buffer is allocated.
    pub fn set_alloc(&mut self, at: u64) {
        self.next_buf = at;
    }

    /// Places a request in the descriptor table and the available ring
    /// (without ringing the doorbell).
    pub fn submit(&mut self, q: usize, r: &Request) -> Submitted {
        let hdr = self.alloc(16);
        let mut h = Vec::new();
        h.extend_from_slice(&r.kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&r.sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let out = self.alloc(r.out.len().max(1));
        self.mem.write_slice(&r.out, GuestAddress(out)).unwrap();
        let inb = self.alloc(r.in_len + 1);
        // Poison read buffers so that unwritten bytes show.
        self.mem
            .write_slice(&vec![0xa5; r.in_len + 1], GuestAddress(inb))
            .unwrap();
        let status_addr = inb + r.in_len as u64;

        // (addr, len, writable)
        let mut bufs: Vec<(u64, u32, bool)> = Vec::new();
        if r.layout.split_header {
            bufs.push((hdr, 10, false));
            bufs.push((hdr + 10, 6, false));
        } else {
            bufs.push((hdr, 16, false));
        }
        let chunk = |len: usize| {
            if r.layout.data_chunk == 0 {
                len.max(1)
            } else {
                r.layout.data_chunk
            }
        };
        let mut o = 0;
        while o < r.out.len() {
            let n = chunk(r.out.len()).min(r.out.len() - o);
            bufs.push((out + o as u64, n as u32, false));
            o += n;
        }
        let mut i = 0;
        while i < r.in_len {
            let n = chunk(r.in_len).min(r.in_len - i);
            let last = i + n == r.in_len;
            if last && r.layout.status_with_data {
                bufs.push((inb + i as u64, n as u32 + 1, true));
            } else {
                bufs.push((inb + i as u64, n as u32, true));
            }
            i += n;
        }
        if !(r.layout.status_with_data && r.in_len > 0) {
            bufs.push((status_addr, 1, true));
        }
        let head = self.place(q, &bufs, r.layout.indirect);
        Submitted {
            queue: q,
            head,
            in_addr: inb,
            in_len: r.in_len,
            status_addr,
        }
    }

    /// Writes a chain of buffers as descriptors and publishes its head.
    pub fn place(&mut self, q: usize, bufs: &[(u64, u32, bool)], indirect: bool) -> u16 {
        let bufs: Vec<Buf> = bufs
            .iter()
            .map(|&(addr, len, write)| Buf { addr, len, write })
            .collect();
        let table = indirect.then(|| self.alloc(16 * bufs.len()));
        if let Some(r) = self.packed.get_mut(q) {
            let id = r.add(&self.mem, &bufs, table).expect("free descriptor");
            r.publish(&self.mem, id);
            return id;
        }
        let head = self.queues[q]
            .add(&self.mem, &bufs, table)
            .expect("free descriptor");
        self.queues[q].publish(&self.mem, head);
        head
    }

    /// Puts a head in the available ring and moves avail.idx.
    pub fn publish(&mut self, q: usize, head: u16) {
        self.queues[q].publish(&self.mem, head);
    }

    /// Overwrites avail.idx directly (to test a driver that lies).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let addr = self.queues[q].avail + 2;
        self.mem
            .store(idx, GuestAddress(addr), Ordering::Release)
            .unwrap();
    }

    /// Rings the doorbell if the device asked for it, as Linux does.
    pub fn kick(&mut self, q: usize) -> bool {
        let want = match self.packed.get_mut(q) {
            Some(r) => r.kick_needed(&self.mem),
            None => self.queues[q].kick_needed(&self.mem),
        };
        if want {
            self.force_kick(q);
        }
        want
    }

    pub fn force_kick(&mut self, q: usize) {
        let q16 = q as u16;
        if !self.modern {
            wr(&mut self.c, 16, &q16.to_le_bytes());
        } else if let Some(page) = &self.notify_page {
            // A store into the shared page, as a guest's doorbell lands
            // with the page mapped: no message at all.
            let off = q * modern::NOTIFY_MULTIPLIER as usize;
            assert!(off + 2 <= page.size());
            // SAFETY: the page is mapped for its whole size and off + 2
            // lies inside it.
            unsafe {
                std::ptr::write_volatile(page.as_ptr().add(off).cast::<u16>(), q16);
            }
        } else {
            let off = modern::NOTIFY_OFFSET + u64::from(modern::NOTIFY_MULTIPLIER) * q as u64;
            mwr(&mut self.c, off, &q16.to_le_bytes());
        }
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used_idx(&self.mem)
    }

    /// The used entries (head, len) queue `q` has now, without waiting.
    pub fn try_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        loop {
            let e = match self.packed.get_mut(q) {
                Some(r) => r.pop_used(&self.mem),
                None => self.queues[q].pop_used(&self.mem),
            };
            match e {
                Some(e) => out.push(e),
                None => return out,
            }
        }
    }

    /// Collects `n` used entries (head, len), or panics after `timeout`.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            while out.len() < n {
                let e = match self.packed.get_mut(q) {
                    Some(r) => r.pop_used(&self.mem),
                    None => self.queues[q].pop_used(&self.mem),
                };
                match e {
                    Some(e) => out.push(e),
                    None => break,
                }
            }
            // used_event: interrupt me after the next completion.
            match self.packed.get_mut(q) {
                Some(r) => {
                    r.enable_interrupts(&self.mem);
                }
                None => {
                    self.queues[q].enable_interrupts(&self.mem);
                }
            }
            if out.len() < n {
                assert!(
                    Instant::now() < deadline,
                    "timed out: {} of {n} completions on queue {q}",
                    out.len()
                );
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        out
    }

    /// Status byte and read data of a completed request.
    pub fn result(&self, s: &Submitted) -> (u8, Vec<u8>) {
        let status: u8 = self.mem.read_obj(GuestAddress(s.status_addr)).unwrap();
        let mut data = vec![0u8; s.in_len];
        self.mem
            .read_slice(&mut data, GuestAddress(s.in_addr))
            .unwrap();
        (status, data)
    }

    /// Submits, kicks, waits, and returns the status, data and used length.
    pub fn run(&mut self, q: usize, r: &Request) -> (u8, Vec<u8>, u32) {
        let s = self.submit(q, r);
        self.kick(q);
        let used = self.wait_used(q, 1, Duration::from_secs(10));
        assert_eq!(used[0].0, s.head);
        let (st, data) = self.result(&s);
        (st, data, used[0].1)
    }

    /// The vectors (and [`INTX`]) whose eventfd fired since the last look.
    pub fn fired(&self) -> Vec<usize> {
        let mut fired: Vec<usize> = (0..self.vectors.len())
            .filter(|&i| self.vectors[i].read().is_ok())
            .collect();
        if self.intx.as_ref().is_some_and(|e| e.read().is_ok()) {
            fired.push(INTX);
        }
        fired
    }

    /// As an interrupt-driven guest does: asks for an interrupt, submits,
    /// kicks, waits up to 10 s for one, and only then looks at the used
    /// ring. Returns the status, the data read and every vector that fired
    /// ([`INTX`] for the INTx line), up to 50 ms after the first.
    ///
    /// `run` polls the used ring and asks for the interrupt after the
    /// entry it just took: when it takes the entry before the device has
    /// decided, the device rightly sends no interrupt for it (EVENT_IDX).
    /// A test of where an interrupt goes must wait for it instead. An
    /// interrupt of a request before (which `run` does not wait for) is
    /// let come first: nothing may fire for 20 ms before this one starts.
    pub fn run_signalled(&mut self, q: usize, r: &Request) -> (u8, Vec<u8>, Vec<usize>) {
        match self.packed.get_mut(q) {
            Some(p) => assert!(!p.enable_interrupts(&self.mem), "completions waiting"),
            None => assert!(
                !self.queues[q].enable_interrupts(&self.mem),
                "completions waiting"
            ),
        }
        let settle = Instant::now() + Duration::from_secs(2);
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(20) {
            assert!(Instant::now() < settle, "interrupts keep coming while idle");
            if !self.fired().is_empty() {
                quiet_since = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let s = self.submit(q, r);
        self.kick(q);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut fired = Vec::new();
        while fired.is_empty() {
            assert!(Instant::now() < deadline, "no interrupt within 10 s");
            std::thread::sleep(Duration::from_millis(1));
            fired = self.fired();
        }
        // One more on another vector would be a wrong one too.
        std::thread::sleep(Duration::from_millis(50));
        fired.extend(self.fired());
        fired.sort_unstable();
        fired.dedup();
        let used = self.wait_used(q, 1, Duration::from_secs(10));
        assert_eq!(used[0].0, s.head);
        let (status, data) = self.result(&s);
        (status, data, fired)
    }

    pub fn read(&mut self, q: usize, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let (st, d, _) = self.run(q, &Request::read(sector, len));
        (st, d)
    }

    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        self.run(q, &Request::write(sector, data)).0
    }

    pub fn simple(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        out: Vec<u8>,
        in_len: usize,
    ) -> (u8, Vec<u8>, u32) {
        self.run(
            q,
            &Request {
                kind,
                sector,
                out,
                in_len,
                layout: Layout::default(),
            },
        )
    }
}

/// One discard / write-zeroes segment.
pub fn dwz_segment(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sector.to_le_bytes());
    v.extend_from_slice(&num.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

impl Driver {
    /// Another view of the driver's guest RAM, for watching it while the
    /// driver itself is blocked in a call on another thread.
    pub fn watch(&self) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            usize::try_from(self.ram_size).unwrap(),
            Some(FileOffset::new(self.ram.try_clone().unwrap(), 0)),
        )])
        .unwrap()
    }
}

/// `n` writes of `len` bytes made available on queue 0 at once, indirect
/// (one ring slot each), and one doorbell.
pub fn flood(d: &mut Driver, n: usize, len: usize) {
    for i in 0..n {
        let write = Request::write((i * len / 512) as u64, &pattern(i as u64, len));
        d.submit(0, &write.laid(Layout::default().indirect()));
    }
    d.force_kick(0);
}

/// A server with 64 large write-through writes in flight. Without FLUSH
/// the cache is write-through: every write is synced on the I/O pool, so
/// requests really are in flight when the test acts.
pub fn flooded(args: &[&str]) -> (super::ServerProcess, Driver) {
    let (srv, _img) = image_server("flood", 256 << 20, args);
    let mut d = Driver::new(
        &srv.socket,
        DriverOptions {
            ram_size: 512 << 20,
            refuse: F_FLUSH,
            ..Default::default()
        },
    );
    flood(&mut d, 64, 2 << 20);
    (srv, d)
}

/// Queue 0's used index does not move for 300 ms: the device writes
/// nothing more into guest memory.
pub fn used_is_stable(d: &Driver) {
    let a = d.used_idx(0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        d.used_idx(0),
        a,
        "the device wrote to guest memory after it was told to stop"
    );
}

/// A virtio-blk request header (`kind`, `sector`) at guest address `at`.
pub fn put_header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut hb = Vec::new();
    hb.extend_from_slice(&kind.to_le_bytes());
    hb.extend_from_slice(&0u32.to_le_bytes());
    hb.extend_from_slice(&sector.to_le_bytes());
    mem.write_slice(&hb, GuestAddress(at)).unwrap();
}

/// [`image_server`] with a driver attached with the default options.
pub fn image_driver(
    size: u64,
    args: &[&str],
) -> (super::ServerProcess, std::path::PathBuf, Driver) {
    let (srv, img) = image_server("img", size, args);
    let d = Driver::new(&srv.socket, DriverOptions::default());
    (srv, img, d)
}

/// A server on a fresh image of `size` bytes, with `args`.
pub fn image_server(
    tag: &str,
    size: u64,
    args: &[&str],
) -> (super::ServerProcess, std::path::PathBuf) {
    let dir = super::TempDir::new(tag);
    let img = dir.path("disk.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let mut a: Vec<String> = vec!["--disk".into(), img.to_str().unwrap().into()];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    (super::ServerProcess::start_in(dir, &a), img)
}

/// A fresh driver on a fresh connection does I/O: the server survived.
pub fn serves_again(srv: &mut super::ServerProcess) {
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    let data = pattern(77, 4096);
    assert_eq!(d.write(0, 0, &data), S_OK);
    assert_eq!(d.read(0, 0, 4096), (S_OK, data));
    drop(d);
    srv.assert_alive();
    assert!(!srv.log_text().contains("panicked"));
}
