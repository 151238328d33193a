//! `vfio-user-blk-bench soak-client`: the synthetic guest the soak kills.
//!
//! It attaches to one device (rust-vmm's vfio-user client, through the
//! benchmark's guest code: DMA_MAP of a memfd, MSI-X eventfds, the legacy or
//! the modern interface, 1 to 4 queues), then submits random verified
//! writes (each sector carries the pattern of `pattern`), flushes and reads
//! until it is killed, its time is up, or (`--until-stdin-closes`) its
//! standard input closes. Every write is journalled before the device can
//! see it and again when it completes; requests in flight never overlap.
//! Reads are checked against what this client saw acknowledged.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress};

use vfio_user_blk::util::parse_size;
use vub_testkit::driver_ring::{Buf, SplitRing};

use super::journal::{Kind, Record, Writer};
use super::pattern::{self, fill_range, Content, SECTOR};
use crate::guest::vfio::VfioUserBlk;
use crate::guest::{GuestRam, Transport};
use crate::run::Rng;

/// `soak-client` options (the orchestrator sets them all).
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// The device's vfio-user socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The journal to append to.
    #[arg(long)]
    pub journal: PathBuf,
    /// Seed of the sector patterns (the whole soak's).
    #[arg(long)]
    pub seed: u64,
    /// The high 32 bits of every generation this client writes.
    #[arg(long)]
    pub cycle: u32,
    /// Seed of this client's random choices.
    #[arg(long, default_value_t = 1)]
    pub rng: u64,
    /// The disk's size.
    #[arg(long, value_parser = parse_size)]
    pub disk_size: u64,
    /// `legacy` (BAR0) or `modern` (BAR4).
    #[arg(long, default_value = "legacy", value_parser = ["legacy", "modern"])]
    pub interface: String,
    /// Queues to set up (the device must have as many).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=4))]
    pub queues: u16,
    /// Feature bits to refuse (a mask of the device's offer).
    #[arg(long, default_value_t = 0)]
    pub refuse: u64,
    /// Most requests in flight, over all queues.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub depth: u16,
    /// Guest RAM (a memfd mapped with DMA_MAP).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub ram: u64,
    /// Stop (gracefully) after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub max_seconds: f64,
    /// Stop gracefully when standard input closes: stop submitting, let
    /// everything in flight complete, journal the end, disconnect.
    #[arg(long)]
    pub until_stdin_closes: bool,
}

/// Guest memory layout: rings (64 KiB per queue), then one slot per
/// request in flight.
const RING_BASE: u64 = 0x10_0000;
const SLOT_BASE: u64 = 0x20_0000;
const SLOT_SIZE: u64 = 0x2_0000;
/// Largest request, in sectors (64 KiB).
const MAX_SECTORS: u64 = 128;
/// Writes and reads land here 30% of the time, so that generations pile
/// up on the same sectors across kills.
const HOT_SECTORS: u64 = 2048;

const T_IN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
const T_OUT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
const F_FLUSH: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
/// What a sector known from this lifetime holds when its last write
/// failed (not checked).
const UNKNOWN: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { gen: u64, sector: u64, count: u32 },
    Read { sector: u64, count: u32 },
    Flush { id: u64 },
}

impl Op {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { sector, count, .. } | Op::Read { sector, count } => {
                Some((sector, sector + u64::from(count)))
            }
            Op::Flush { .. } => None,
        }
    }
}

struct Slot {
    hdr: u64,
    status: u64,
    table: u64,
    data: u64,
    busy: Option<Op>,
}

/// Why a read failed its check (the ReadBad record's aux).
pub fn bad_read_text(aux: u16) -> &'static str {
    match aux {
        1 => "zeros where this client's write was acknowledged",
        2 => "another generation than this client's acknowledged write",
        3 => "a pattern newer than this client (or its own, never acknowledged there)",
        _ => "a torn, misplaced or garbage sector",
    }
}

struct Client {
    a: ClientArgs,
    ram: GuestRam,
    dev: VfioUserBlk,
    rings: Vec<SplitRing>,
    journal: Writer,
    rng: Rng,
    slots: Vec<Slot>,
    /// Per queue: head -> slot.
    head_slot: Vec<Vec<usize>>,
    /// Per sector: the generation acknowledged in this lifetime (0: none).
    known: Vec<u64>,
    sectors: u64,
    gen_base: u64,
    next_write: u64,
    next_flush: u64,
    in_flight: usize,
    cap: usize,
    completions: u64,
    flush_ok: bool,
    scratch: Vec<u8>,
}

/// Runs the client; returns the process's exit code.
pub fn main(a: ClientArgs) -> i32 {
    // Die with the orchestrator: a stray client must never outlive it.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes an integer signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    match run(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("soak-client: {e:#}");
            2
        }
    }
}

fn run(a: ClientArgs) -> Result<i32> {
    let mut journal = Writer::create(&a.journal)?;
    let modern = a.interface == "modern";
    let mut r = Record::new(Kind::Attach, 0);
    r.aux = u16::from(modern);
    r.count = u32::from(a.queues);
    journal.put(r)?;
    let ram = GuestRam::new(a.ram)?;
    let depth = usize::from(a.depth);
    if SLOT_BASE + SLOT_SIZE * depth as u64 > a.ram {
        bail!("guest RAM is too small for {depth} slots");
    }
    let mut dev = VfioUserBlk::connect(&a.socket, &ram)?;
    let queues = usize::from(a.queues);
    let rings = if modern {
        dev.setup_modern(&a.socket, &ram, queues, RING_BASE, a.refuse)?
    } else {
        dev.setup(
            &ram,
            queues,
            RING_BASE,
            u32::try_from(a.refuse & 0xffff_ffff)?,
        )?
    };
    journal.put(Record::new(Kind::Ready, dev.features()))?;
    let sectors = a.disk_size / SECTOR as u64;
    if sectors < MAX_SECTORS {
        bail!("the disk is smaller than {MAX_SECTORS} sectors");
    }
    let slots = (0..depth as u64)
        .map(|i| {
            let base = SLOT_BASE + SLOT_SIZE * i;
            Slot {
                hdr: base,
                status: base + 16,
                table: base + 64,
                data: base + 0x1000,
                busy: None,
            }
        })
        .collect();
    let head_slot = rings
        .iter()
        .map(|r| vec![usize::MAX; usize::from(r.size)])
        .collect();
    let flush_ok = dev.features() & F_FLUSH != 0;
    let mut c = Client {
        rng: Rng::new(a.rng),
        gen_base: u64::from(a.cycle) << 32,
        a,
        ram,
        dev,
        rings,
        journal,
        slots,
        head_slot,
        known: vec![0; usize::try_from(sectors)?],
        sectors,
        next_write: 0,
        next_flush: 0,
        in_flight: 0,
        cap: depth,
        completions: 0,
        flush_ok,
        scratch: vec![0; usize::try_from(MAX_SECTORS)? * SECTOR],
    };
    c.serve()
}

/// Whether standard input has reached its end (without blocking).
fn stdin_closed() -> bool {
    let mut p = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n <= 0 {
        return false;
    }
    let mut b = [0u8; 64];
    // SAFETY: reads at most 64 bytes into a local buffer.
    let r = unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) };
    r <= 0
}

impl Client {
    fn rand(&mut self, n: u64) -> u64 {
        self.rng.next_u64() % n.max(1)
    }

    /// A random range of 1 to 128 sectors (small ones half the time), in
    /// the hot area 30% of the time.
    fn pick_range(&mut self) -> (u64, u32) {
        let n = if self.rand(2) == 0 {
            1 + self.rand(8)
        } else {
            1 + self.rand(MAX_SECTORS)
        };
        let zone = if self.rand(10) < 3 {
            HOT_SECTORS.min(self.sectors)
        } else {
            self.sectors
        };
        let start = self.rand(zone - n + 1);
        (start, u32::try_from(n).unwrap_or(1))
    }

    fn overlaps(&self, s: u64, e: u64) -> bool {
        self.slots
            .iter()
            .filter_map(|sl| sl.busy.and_then(|op| op.range()))
            .any(|(a, b)| s < b && a < e)
    }

    /// Chooses the next request: None when no range free of requests in
    /// flight was found.
    fn pick_op(&mut self) -> Option<Op> {
        let r = self.rand(100);
        if self.flush_ok && r < 5 {
            self.next_flush += 1;
            return Some(Op::Flush {
                id: self.gen_base | self.next_flush,
            });
        }
        for _ in 0..8 {
            let (sector, count) = self.pick_range();
            if self.overlaps(sector, sector + u64::from(count)) {
                continue;
            }
            if r < 20 {
                return Some(Op::Read { sector, count });
            }
            self.next_write += 1;
            if self.next_write > 0xffff_ffff {
                return None;
            }
            return Some(Op::Write {
                gen: self.gen_base | self.next_write,
                sector,
                count,
            });
        }
        None
    }

    /// Builds `op`'s chain in slot `i`, journals it and makes it available
    /// on a random queue.
    fn submit(&mut self, i: usize, op: Op) -> Result<()> {
        let q = usize::try_from(self.rand(self.rings.len() as u64))?;
        let (kind, sector, count) = match op {
            Op::Write { sector, count, .. } => (T_OUT, sector, count),
            Op::Read { sector, count } => (T_IN, sector, count),
            Op::Flush { .. } => (T_FLUSH, 0, 0),
        };
        // One to three data segments, cut at sector boundaries.
        let mut cuts = vec![0u32, count];
        for _ in 0..self.rand(3) {
            if count > 1 {
                cuts.push(1 + u32::try_from(self.rand(u64::from(count - 1)))?);
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let indirect = self.dev.features()
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
            != 0
            && self.rand(2) == 0;
        let (hdr, status, table, data) = {
            let sl = &self.slots[i];
            (sl.hdr, sl.status, sl.table, sl.data)
        };
        let mem = &self.ram.mem;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr))?;
        mem.write_obj(0xffu8, GuestAddress(status))?;
        let mut bufs = vec![Buf {
            addr: hdr,
            len: 16,
            write: false,
        }];
        if count > 0 {
            let bytes = usize::try_from(count)? * SECTOR;
            if let Op::Write { gen, .. } = op {
                fill_range(&mut self.scratch[..bytes], self.a.seed, sector, gen);
            } else {
                // Whatever the device does not write must not pass.
                self.scratch[..bytes].fill(0xa5);
            }
            mem.write_slice(&self.scratch[..bytes], GuestAddress(data))?;
            for w in cuts.windows(2) {
                bufs.push(Buf {
                    addr: data + u64::from(w[0]) * SECTOR as u64,
                    len: (w[1] - w[0]) * 512,
                    write: kind == T_IN,
                });
            }
        }
        bufs.push(Buf {
            addr: status,
            len: 1,
            write: true,
        });
        match op {
            Op::Write { gen, sector, count } => {
                let mut r = Record::new(Kind::Submit, gen);
                r.sector = sector;
                r.count = count;
                self.journal.put(r)?;
            }
            Op::Flush { id } => self.journal.put(Record::new(Kind::FlushSubmit, id))?,
            Op::Read { .. } => {}
        }
        let head = self.rings[q]
            .add(mem, &bufs, indirect.then_some(table))
            .context("ring full")?;
        self.rings[q].publish(mem, head);
        self.head_slot[q][usize::from(head)] = i;
        self.slots[i].busy = Some(op);
        self.in_flight += 1;
        Ok(())
    }

    /// Checks what a read brought back against this lifetime's knowledge.
    /// Returns the bad sector, what was expected and found, and why.
    fn check_read(&self, sector: u64, count: u32) -> Option<(u64, u64, u64, u16)> {
        for k in 0..u64::from(count) {
            let s = sector + k;
            let at = usize::try_from(k).ok()? * SECTOR;
            let b = &self.scratch[at..at + SECTOR];
            let found = pattern::decode(b, self.a.seed, s);
            let fgen = match found {
                Content::Gen(g) => g,
                _ => 0,
            };
            let want = self.known[usize::try_from(s).ok()?];
            let bad = match (want, found) {
                (UNKNOWN, _) => None,
                // Not written in this lifetime: zeros or an earlier
                // client's pattern.
                (0, Content::Zero) => None,
                (0, Content::Gen(g)) if g < self.gen_base => None,
                (0, Content::Gen(_)) => Some(3),
                (w, Content::Gen(g)) if g == w => None,
                (_, Content::Zero) => Some(1),
                (_, Content::Gen(_)) => Some(2),
                _ => Some(4),
            };
            if let Some(why) = bad {
                return Some((s, want, fgen, why));
            }
        }
        None
    }

    /// Takes one completion of queue `q`. Returns an exit code when a read
    /// failed its check.
    fn complete(&mut self, q: usize, head: u16) -> Result<Option<i32>> {
        let i = self.head_slot[q][usize::from(head)];
        self.head_slot[q][usize::from(head)] = usize::MAX;
        let Some(op) = self.slots.get_mut(i).and_then(|s| s.busy.take()) else {
            bail!("the device completed head {head} of queue {q}, which is not in flight");
        };
        self.in_flight -= 1;
        self.completions += 1;
        let mem = &self.ram.mem;
        let st: u8 = mem.read_obj(GuestAddress(self.slots[i].status))?;
        match op {
            Op::Write { gen, sector, count } => {
                let range = usize::try_from(sector)?..usize::try_from(sector + u64::from(count))?;
                if st == 0 {
                    self.known[range].fill(gen);
                    self.journal.put(Record::new(Kind::Ack, gen))?;
                } else {
                    self.known[range].fill(UNKNOWN);
                    let mut r = Record::new(Kind::Error, gen);
                    r.aux = u16::from(st);
                    self.journal.put(r)?;
                }
            }
            Op::Flush { id } => {
                let mut r = Record::new(
                    if st == 0 {
                        Kind::FlushAck
                    } else {
                        Kind::FlushError
                    },
                    id,
                );
                r.aux = u16::from(st);
                self.journal.put(r)?;
            }
            Op::Read { sector, count } => {
                let mut r = Record::new(Kind::ReadOk, 0);
                r.sector = sector;
                r.count = count;
                if st != 0 {
                    r.kind = Kind::ReadError;
                    r.aux = u16::from(st);
                    self.journal.put(r)?;
                    return Ok(None);
                }
                let bytes = usize::try_from(count)? * SECTOR;
                mem.read_slice(&mut self.scratch[..bytes], GuestAddress(self.slots[i].data))?;
                if let Some((s, want, fgen, why)) = self.check_read(sector, count) {
                    let mut r = Record::new(Kind::ReadBad, want);
                    r.sector = s;
                    r.extra = fgen;
                    r.aux = why;
                    self.journal.put(r)?;
                    let at = usize::try_from(s - sector)? * SECTOR;
                    let found = pattern::decode(&self.scratch[at..at + SECTOR], self.a.seed, s);
                    eprintln!(
                        "soak-client: read of sectors {sector}..{}: sector {s} holds {found}, \
                         expected {} ({})",
                        sector + u64::from(count),
                        if want == 0 {
                            "zeros or an earlier client's pattern".to_string()
                        } else {
                            pattern::show_gen(want)
                        },
                        bad_read_text(why)
                    );
                    return Ok(Some(3));
                }
                self.journal.put(r)?;
            }
        }
        if self.completions.is_multiple_of(128) {
            self.cap = 1 + usize::try_from(self.rand(self.slots.len() as u64))?;
        }
        Ok(None)
    }

    fn serve(&mut self) -> Result<i32> {
        let deadline = Instant::now() + Duration::from_secs_f64(self.a.max_seconds.max(0.0));
        let mut stopping = false;
        let mut last_stdin_check = Instant::now();
        let nq = self.rings.len();
        let mut pfds: Vec<libc::pollfd> = (0..nq)
            .map(|q| libc::pollfd {
                fd: self.dev.irq_fd(q),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut drain_deadline = None;
        loop {
            let now = Instant::now();
            if !stopping {
                if now >= deadline {
                    stopping = true;
                }
                if self.a.until_stdin_closes
                    && now.duration_since(last_stdin_check) > Duration::from_millis(5)
                {
                    last_stdin_check = now;
                    stopping = stdin_closed();
                }
                if stopping {
                    drain_deadline = Some(now + Duration::from_secs(10));
                }
            }
            if stopping && self.in_flight == 0 {
                break;
            }
            if drain_deadline.is_some_and(|d| now > d) {
                bail!(
                    "{} requests still in flight 10 s after the end",
                    self.in_flight
                );
            }
            // Submit up to the current cap, then ring the doorbells the
            // device asks for.
            while !stopping && self.in_flight < self.cap {
                let Some(i) = self.slots.iter().position(|s| s.busy.is_none()) else {
                    break;
                };
                let Some(op) = self.pick_op() else {
                    break;
                };
                self.submit(i, op)?;
            }
            for q in 0..nq {
                if self.rings[q].kick_needed(&self.ram.mem) {
                    self.dev.kick(q)?;
                }
            }
            let mut got = 0;
            for q in 0..nq {
                while let Some((head, _len)) = self.rings[q].pop_used(&self.ram.mem) {
                    got += 1;
                    if let Some(code) = self.complete(q, head)? {
                        return Ok(code);
                    }
                }
            }
            if got == 0 && self.in_flight > 0 {
                let mut pending = false;
                for r in self.rings.iter_mut() {
                    pending |= r.enable_interrupts(&self.ram.mem);
                }
                if !pending {
                    // SAFETY: pfds is a valid array of nq pollfds.
                    unsafe { libc::poll(pfds.as_mut_ptr(), nq as libc::nfds_t, 5) };
                    for p in &pfds {
                        let mut v = [0u8; 8];
                        // SAFETY: reads 8 bytes from an eventfd into a local.
                        unsafe { libc::read(p.fd, v.as_mut_ptr().cast(), 8) };
                    }
                }
            }
        }
        self.journal.put(Record::new(Kind::Exit, 0))?;
        let _ = self.dev.client.shutdown();
        Ok(0)
    }
}
