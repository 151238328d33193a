//! The benchmark: one request stream, served several ways.
//!
//! - `ours`, `ours-threads`: our server over vfio-user (io_uring and
//!   thread-pool I/O engines), driven by the synthetic guest
//!   (`crate::guest`, on the test kit's `driver_ring`) through
//!   rust-vmm's `vfio_user::Client`;
//! - `qsd-threads`, `qsd-uring`, `qsd-native`: QEMU's qemu-storage-daemon
//!   exporting the same image as vhost-user-blk (`aio=threads`, `io_uring`,
//!   `native`), driven by the same guest code through rust-vmm's `vhost`
//!   frontend;
//! - `direct`: the same image with pread/pwrite from as many threads as
//!   the queue depth: what the disk and page cache can do;
//! - `direct-uring`: the same image through one io_uring at the queue
//!   depth, from one thread, as fio's io_uring engine does (`run_direct_uring`).
//!
//! The guest behaves like Linux in a KVM virtual machine: doorbells only
//! when the device asks (NO_NOTIFY / EVENT_IDX), indirect descriptors, and
//! when nothing has completed, interrupts enabled and a wait for one that
//! first watches the rings for [`guest_poll`] (KVM polls a halted vCPU for
//! 200 µs by default, halt_poll_ns, before it lets the thread sleep), then
//! sleeps on the interrupt eventfd.

use std::alloc::Layout;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use vm_memory::{Bytes, GuestAddress};

use vub_testkit::driver_ring::{Buf, SplitRing};

use crate::guest::{GuestRam, Transport};

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// This percentage reads, the rest writes.
    Mix(u8),
}

/// What the requests reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Disk {
    /// The image file, read through the (warm) host page cache.
    Cached,
    /// A `null:` disk (ours) / `null-co` (qsd): the device alone.
    Null,
    /// A second image file opened with O_DIRECT by every target: the disk.
    Direct,
    /// A disk on the network (`--rbd`, `--nbd`): ours through its RBD or
    /// NBD backend, qemu-storage-daemon through its rbd or nbd driver.
    Remote,
}

#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub op: Op,
    pub random: bool,
    pub bs: usize,
    /// Requests in flight per queue.
    pub qd: usize,
    pub queues: usize,
    pub disk: Disk,
    /// Disks driven at once, all by one guest thread (the multi-device
    /// workload); 1 otherwise.
    pub devices: usize,
}

/// One measured run.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub ios: u64,
    pub bytes: u64,
    pub secs: f64,
    /// Latency in nanoseconds.
    pub hist: Histogram<u64>,
    /// CPU seconds used by the device process(es) and by the driver.
    pub device_cpu: f64,
    pub driver_cpu: f64,
    /// CPU seconds the hypervisor took from this machine (steal) during
    /// the timed window.
    pub stolen: f64,
    /// Doorbells the guest rang in the timed window (0 where no guest).
    pub kicks: u64,
}

/// A zeroed heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    pub fn new(len: usize, fill: u8) -> Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), 4096).context("buffer layout")?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("out of memory for a {len}-byte buffer");
        }
        let mut b = AlignedBuf { ptr, layout };
        b.as_mut_slice().fill(fill);
        Ok(b)
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes, owned by
        // self and borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Opens the image for a reference run: with O_DIRECT on `Disk::Direct`.
pub fn open_image(path: &Path, disk: Disk) -> Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    if disk == Disk::Direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
        .with_context(|| format!("opening {}", path.display()))
}

impl RunResult {
    /// A run of this process against a file (direct-*): its own CPU is
    /// the device's, and there is no driver apart from it.
    fn direct(ios: u64, bs: usize, secs: f64, hist: Histogram<u64>, cpu: f64, stolen: f64) -> Self {
        RunResult {
            ios,
            bytes: ios * bs as u64,
            secs,
            hist,
            device_cpu: cpu,
            driver_cpu: 0.0,
            stolen,
            kicks: 0,
        }
    }

    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.secs
    }
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    pub fn pct_us(&self, p: f64) -> f64 {
        self.hist.value_at_quantile(p) as f64 / 1000.0
    }
    /// CPU seconds per million requests, device and driver together.
    pub fn cpu_per_mreq(&self) -> f64 {
        if self.ios == 0 {
            return 0.0;
        }
        (self.device_cpu + self.driver_cpu) / self.ios as f64 * 1e6
    }
    pub fn device_cpu_per_mreq(&self) -> f64 {
        if self.ios == 0 {
            return 0.0;
        }
        self.device_cpu / self.ios as f64 * 1e6
    }
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// CPU seconds (user + system) a process has used so far.
pub fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 (1-based); here 11 and 12.
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// CPU seconds the calling thread has used.
pub fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A small, fast, reproducible random number generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Picks offsets and operations for one stream.
pub struct Stream {
    rng: Rng,
    w: Workload,
    span: u64,
    next_seq: u64,
}

impl Stream {
    pub fn new(w: &Workload, disk_size: u64, seed: u64) -> Stream {
        let span = (disk_size / w.bs as u64).max(1);
        Stream {
            rng: Rng::new(seed),
            w: w.clone(),
            span,
            // Sequential streams of different queues start apart.
            next_seq: (seed.saturating_sub(1) * (span / 8)) % span,
        }
    }

    /// (is_read, byte offset)
    pub fn next_request(&mut self) -> (bool, u64) {
        let read = match self.w.op {
            Op::Read => true,
            Op::Write => false,
            Op::Mix(p) => self.rng.next_u64() % 100 < u64::from(p),
        };
        let block = if self.w.random {
            self.rng.next_u64() % self.span
        } else {
            let b = self.next_seq;
            self.next_seq = (self.next_seq + 1) % self.span;
            b
        };
        (read, block * self.w.bs as u64)
    }
}

/// How long the synthetic guest watches its rings before it sleeps.
static GUEST_POLL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Sets [`guest_poll`] (once, before any run).
pub fn set_guest_poll(d: Duration) {
    let _ = GUEST_POLL.set(d);
}

/// How long the synthetic guest, waiting for a completion, watches its
/// rings before it sleeps on the interrupt eventfd (default 200 µs), as KVM
/// polls a halted vCPU. One guest thread drives all the disks of a run; it
/// has a CPU to itself unless the placement shares one (`--no-pin`, one
/// CPU, or driver CPUs among the server's).
pub fn guest_poll() -> Duration {
    *GUEST_POLL.get_or_init(|| Duration::from_micros(200))
}

/// Guest memory layout of the virtio runs.
pub const RING_BASE: u64 = 0x10_0000;
const SLOT_BASE: u64 = 0x100_0000;

struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
    table: u64,
    start: Instant,
    read: bool,
}

/// One device as the synthetic guest sees it: its doorbells and
/// interrupts, the guest RAM it was given, and its rings.
pub struct GuestDev<'a> {
    pub t: &'a mut dyn Transport,
    pub ram: &'a GuestRam,
    pub rings: &'a mut [SplitRing],
}

/// Drives a virtio-blk device through `t` for `duration`.
pub fn run_virtio(
    t: &mut dyn Transport,
    ram: &GuestRam,
    rings: &mut [SplitRing],
    w: &Workload,
    disk_size: u64,
    duration: Duration,
    device_pids: &[u32],
) -> Result<RunResult> {
    run_virtio_many(
        &mut [GuestDev { t, ram, rings }],
        w,
        disk_size,
        duration,
        device_pids,
    )
}

/// Drives every queue of every device in `devs` from this one thread for
/// `duration`, as one vCPU of a guest with several disks does: each queue
/// keeps `w.qd` requests in flight, the thread reaps and refills whichever
/// has completions, and it waits for an interrupt of any of them only when
/// none has.
pub fn run_virtio_many(
    devs: &mut [GuestDev<'_>],
    w: &Workload,
    disk_size: u64,
    duration: Duration,
    device_pids: &[u32],
) -> Result<RunResult> {
    let slot_size = (w.bs as u64 + 4096 + 4095) & !4095;
    // Every queue of every device: (device, queue).
    let lanes: Vec<(usize, usize)> = devs
        .iter()
        .enumerate()
        .flat_map(|(d, g)| (0..g.rings.len()).map(move |q| (d, q)))
        .collect();
    for g in devs.iter() {
        let need = SLOT_BASE + slot_size * (w.qd * g.rings.len()) as u64;
        if need > g.ram.size {
            bail!(
                "guest RAM too small for {} slots of {} bytes",
                w.qd * g.rings.len(),
                w.bs
            );
        }
    }
    // Each lane's slots lie in its own device's RAM.
    let mut slots: Vec<Vec<Slot>> = Vec::new();
    for &(_, q) in &lanes {
        let mut v = Vec::new();
        for i in 0..w.qd {
            let base = SLOT_BASE + slot_size * (q * w.qd + i) as u64;
            v.push(Slot {
                hdr: base,
                status: base + 16,
                table: base + 64,
                data: base + 4096,
                start: Instant::now(),
                read: true,
            });
        }
        slots.push(v);
    }
    // Fill write buffers once with something that is not zeros.
    let pattern: Vec<u8> = (0..w.bs).map(|i| (i * 7 + 13).to_le_bytes()[0]).collect();
    for (l, &(d, _)) in lanes.iter().enumerate() {
        for s in &slots[l] {
            devs[d]
                .ram
                .mem
                .write_slice(&pattern, GuestAddress(s.data))?;
        }
    }
    let indirect: Vec<bool> = devs
        .iter()
        .map(|g| {
            g.t.features() & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC) != 0
        })
        .collect();
    let mut head_slot: Vec<Vec<usize>> = lanes
        .iter()
        .map(|&(d, q)| vec![usize::MAX; usize::from(devs[d].rings[q].size)])
        .collect();
    let mut streams: Vec<Stream> = (0..lanes.len())
        .map(|l| Stream::new(w, disk_size, 1 + l as u64))
        .collect();
    let bs = u32::try_from(w.bs).context("block size")?;

    let submit = |mem: &vm_memory::GuestMemoryMmap,
                  indirect: bool,
                  ring: &mut SplitRing,
                  s: &mut Slot,
                  read: bool,
                  offset: u64|
     -> Result<u16> {
        let mut h = [0u8; 16];
        let kind: u32 = if read { 0 } else { 1 };
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        mem.write_slice(&h, GuestAddress(s.hdr))?;
        let bufs = [
            Buf {
                addr: s.hdr,
                len: 16,
                write: false,
            },
            Buf {
                addr: s.data,
                len: bs,
                write: read,
            },
            Buf {
                addr: s.status,
                len: 1,
                write: true,
            },
        ];
        s.read = read;
        s.start = Instant::now();
        let head = ring
            .add(mem, &bufs, indirect.then_some(s.table))
            .context("ring full")?;
        ring.publish(mem, head);
        Ok(head)
    };

    let dev_cpu0: f64 = device_pids.iter().map(|&p| process_cpu(p)).sum();
    let drv_cpu0 = thread_cpu();
    let stolen0 = crate::place::stolen();
    let t0 = Instant::now();
    for (l, &(d, q)) in lanes.iter().enumerate() {
        let g = &mut devs[d];
        let mem = &g.ram.mem;
        for (i, slot) in slots[l].iter_mut().enumerate() {
            let (read, off) = streams[l].next_request();
            let head = submit(mem, indirect[d], &mut g.rings[q], slot, read, off)?;
            head_slot[l][usize::from(head)] = i;
        }
        if g.rings[q].kick_needed(mem) {
            g.t.kick(q)?;
        }
    }
    let mut hist = new_hist();
    let mut ios = 0u64;
    let mut bytes = 0u64;
    let mut errors = 0u64;
    let mut kicks = 0u64;
    let mut pfds: Vec<libc::pollfd> = lanes
        .iter()
        .map(|&(d, q)| libc::pollfd {
            fd: devs[d].t.irq_fd(q),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let deadline = t0 + duration;
    let mut now = Instant::now();
    let mut pass = 0usize;
    while now < deadline {
        let mut got = 0;
        // Start each pass at the next queue, so that no disk's completions
        // always wait behind the guest's work on the others.
        pass = pass.wrapping_add(1);
        for k in 0..lanes.len() {
            let l = (pass + k) % lanes.len();
            let (d, q) = lanes[l];
            let g = &mut devs[d];
            let mem = &g.ram.mem;
            let ring = &mut g.rings[q];
            while let Some((head, _len)) = ring.pop_used(mem) {
                let i = take_head(&mut head_slot[l], head)?;
                let s = &mut slots[l][i];
                let st: u8 = mem.read_obj(GuestAddress(s.status))?;
                if st != 0 {
                    errors += 1;
                }
                now = Instant::now();
                let lat = now.duration_since(s.start).as_nanos();
                let _ = hist.record(u64::try_from(lat).unwrap_or(u64::MAX).max(1));
                ios += 1;
                bytes += w.bs as u64;
                got += 1;
                let (read, off) = streams[l].next_request();
                let nh = submit(mem, indirect[d], ring, s, read, off)?;
                head_slot[l][usize::from(nh)] = i;
            }
            if ring.kick_needed(mem) {
                g.t.kick(q)?;
                kicks += 1;
            }
        }
        if got == 0 {
            // Nothing completed: wait for an interrupt, as a guest does;
            // like a halted vCPU under KVM's halt polling, watch a while
            // before sleeping.
            let mut pending = false;
            for g in devs.iter_mut() {
                for r in g.rings.iter_mut() {
                    pending |= r.enable_interrupts(&g.ram.mem);
                }
            }
            let watch = guest_poll();
            let spin_until = Instant::now() + watch;
            while !pending && Instant::now() < spin_until.min(deadline) {
                std::hint::spin_loop();
                pending = devs
                    .iter()
                    .any(|g| g.rings.iter().any(|r| r.has_used(&g.ram.mem)));
            }
            if !pending {
                // SAFETY: pfds is a valid array of pfds.len() pollfds.
                unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
                for p in &pfds {
                    let mut v = [0u8; 8];
                    // SAFETY: reading 8 bytes from an eventfd into a local.
                    unsafe { libc::read(p.fd, v.as_mut_ptr().cast(), 8) };
                }
            }
        }
        now = Instant::now();
    }
    let secs = t0.elapsed().as_secs_f64();
    let device_cpu = device_pids.iter().map(|&p| process_cpu(p)).sum::<f64>() - dev_cpu0;
    let driver_cpu = thread_cpu() - drv_cpu0;
    let stolen = crate::place::stolen() - stolen0;
    // Let what is in flight finish, so that the next run starts clean: a
    // request left with a server would take its time from the next run.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    let mut outstanding = lanes.len() * w.qd;
    while outstanding > 0 {
        for (l, &(d, q)) in lanes.iter().enumerate() {
            let g = &mut devs[d];
            while let Some((head, _len)) = g.rings[q].pop_used(&g.ram.mem) {
                take_head(&mut head_slot[l], head)?;
                outstanding -= 1;
            }
        }
        if Instant::now() >= drain_deadline {
            bail!("{outstanding} requests still in flight 10 s after the run");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(RunResult {
        ios,
        bytes,
        secs,
        hist,
        device_cpu,
        driver_cpu,
        stolen,
        kicks,
    })
}

/// The slot of a completed head, which is then no longer in flight; an
/// error for a head that was not.
fn take_head(head_slot: &mut [usize], head: u16) -> Result<usize> {
    match head_slot.get_mut(usize::from(head)) {
        Some(i) if *i != usize::MAX => Ok(std::mem::replace(i, usize::MAX)),
        _ => bail!("device completed head {head}, which is not in flight"),
    }
}

/// The same stream with pread/pwrite from `qd * queues` threads (with
/// O_DIRECT on `Disk::Direct`).
pub fn run_direct(
    path: &Path,
    w: &Workload,
    disk_size: u64,
    duration: Duration,
) -> Result<RunResult> {
    let threads = w.qd * w.queues;
    let cpu0 = process_cpu(std::process::id());
    let stolen0 = crate::place::stolen();
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let results: Vec<Result<(u64, Histogram<u64>)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                sc.spawn(move || -> Result<(u64, Histogram<u64>)> {
                    if let Some(p) = crate::place::get() {
                        crate::place::pin_thread(&p.server)?;
                    }
                    let f = open_image(path, w.disk)?;
                    let mut buf = AlignedBuf::new(w.bs, 0x5a)?;
                    let buf = buf.as_mut_slice();
                    let mut hist = new_hist();
                    let mut stream = Stream::new(w, disk_size, 1 + i as u64);
                    let mut n = 0;
                    while Instant::now() < deadline {
                        let (read, off) = stream.next_request();
                        let s = Instant::now();
                        if read {
                            f.read_exact_at(buf, off)?;
                        } else {
                            f.write_all_at(buf, off)?;
                        }
                        let lat = s.elapsed().as_nanos();
                        let _ = hist.record(u64::try_from(lat).unwrap_or(u64::MAX).max(1));
                        n += 1;
                    }
                    Ok((n, hist))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("direct I/O thread"))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu = process_cpu(std::process::id()) - cpu0;
    let stolen = crate::place::stolen() - stolen0;
    let mut hist = new_hist();
    let mut ios = 0;
    for r in results {
        let (n, h) = r?;
        ios += n;
        hist.add(h).context("merging histograms")?;
    }
    Ok(RunResult::direct(ios, w.bs, secs, hist, cpu, stolen))
}

/// Whether this process may use io_uring (it may be disabled by sysctl or
/// a seccomp filter).
pub fn uring_available() -> Result<()> {
    io_uring::IoUring::new(8)
        .map(drop)
        .context("io_uring_setup")
}

/// The same stream through one io_uring kept `qd * queues` deep, from this
/// thread, on the image opened with O_DIRECT on `Disk::Direct`: what fio
/// does with `--ioengine=io_uring --iodepth=QD --direct=1` (no registered
/// buffers or files, no polling). CPU is this thread's. It runs on the
/// server CPUs.
pub fn run_direct_uring(
    path: &Path,
    w: &Workload,
    disk_size: u64,
    duration: Duration,
) -> Result<RunResult> {
    crate::place::on_server_cpus(|| direct_uring(path, w, disk_size, duration))?
}

fn direct_uring(path: &Path, w: &Workload, size: u64, secs: Duration) -> Result<RunResult> {
    use io_uring::{opcode, types, IoUring};

    let depth = w.qd * w.queues;
    let entries = u32::try_from(depth.next_power_of_two().max(8)).context("queue depth")?;
    let mut ring = IoUring::new(entries).context("io_uring_setup")?;
    let f = open_image(path, w.disk)?;
    let fd = types::Fd(f.as_raw_fd());
    let len = u32::try_from(w.bs).context("block size")?;
    let mut bufs = (0..depth)
        .map(|_| AlignedBuf::new(w.bs, 0x5a))
        .collect::<Result<Vec<_>>>()?;
    let mut start = vec![Instant::now(); depth];
    let mut stream = Stream::new(w, size, 1);
    let mut hist = new_hist();
    let mut ios = 0u64;
    let mut inflight = 0usize;
    let mut failure: Option<String> = None;
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(depth);

    let cpu0 = thread_cpu();
    let stolen0 = crate::place::stolen();
    let t0 = Instant::now();
    let deadline = t0 + secs;
    let mut submit = |ring: &mut IoUring, i: usize, start: &mut [Instant]| -> Result<()> {
        let (read, off) = stream.next_request();
        let ptr = bufs[i].as_mut_ptr();
        let e = if read {
            opcode::Read::new(fd, ptr, len).offset(off).build()
        } else {
            opcode::Write::new(fd, ptr, len).offset(off).build()
        }
        .user_data(i as u64);
        start[i] = Instant::now();
        // SAFETY: the buffer lives in `bufs` until every request has
        // completed (the drain below), and the file in `f` as long.
        unsafe { ring.submission().push(&e) }
            .map_err(|_| anyhow::anyhow!("submission queue full"))?;
        Ok(())
    };
    let mut result = (|| -> Result<()> {
        for i in 0..depth {
            submit(&mut ring, i, &mut start)?;
            inflight += 1;
        }
        while inflight > 0 && Instant::now() < deadline {
            ring.submit_and_wait(1).context("io_uring_enter")?;
            done.clear();
            done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            let now = Instant::now();
            for &(i, res) in &done {
                inflight -= 1;
                let i = usize::try_from(i).context("user data")?;
                if usize::try_from(res).ok() != Some(w.bs) {
                    failure.get_or_insert_with(|| {
                        format!(
                            "request returned {res} ({})",
                            std::io::Error::from_raw_os_error(-res)
                        )
                    });
                    continue;
                }
                let lat = now.duration_since(start[i]).as_nanos();
                let _ = hist.record(u64::try_from(lat).unwrap_or(u64::MAX).max(1));
                ios += 1;
                if now < deadline {
                    submit(&mut ring, i, &mut start)?;
                    inflight += 1;
                }
            }
        }
        Ok(())
    })();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu() - cpu0;
    let stolen = crate::place::stolen() - stolen0;
    // Whatever is still in flight must finish before its buffer is freed.
    while inflight > 0 {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // The buffers can no longer be proven idle: leak them rather
            // than let the kernel write into freed memory.
            std::mem::forget(bufs);
            return Err(e).context("io_uring_enter while draining");
        }
        inflight -= ring.completion().count();
    }
    drop(bufs);
    if let Some(f) = failure {
        result = result.and(Err(anyhow::anyhow!(f)));
    }
    result?;
    Ok(RunResult::direct(ios, w.bs, secs, hist, cpu, stolen))
}
