//! vfio-user-blk-bench: our device side by side with QEMU's
//! qemu-storage-daemon (vhost-user-blk) and with the disk itself, measured
//! in one run with the same request stream. See `run` for how, `guest` for
//! the synthetic guest that drives the devices, and `servers` for the
//! device processes.

mod chart;
mod guest;
mod guest_report;
mod notify;
mod place;
mod ramdisk;
mod report;
mod run;
mod servers;
mod soak;
mod upgrade;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use guest::vfio::VfioUserBlk;
use guest::vhost::VhostUserBlk;
use guest::GuestRam;
use report::{Meta, Results, Row, Summary, MULTI_SETUPS, TARGETS};
use run::{run_direct, run_direct_uring, Disk, Op, RunResult, Workload, RING_BASE};
use servers::{start_ours, start_qsd, OursDisk, QsdDisk, Server};
use vub_testkit::driver_ring::SplitRing;

/// Benchmark vfio-user-blk against qemu-storage-daemon and direct I/O.
/// An option given twice takes its last value (so that scripts/bench.sh's
/// defaults can be overridden).
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_override_self = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// The soak test (`soak`, see scripts/soak.sh) and its client
    /// (`soak-client`) instead of the benchmark.
    #[command(subcommand)]
    command: Option<soak::SoakCommand>,
    /// Image file to use (created and filled if missing). The direct-*
    /// workloads use IMAGE-direct.img beside it (on a disk, not tmpfs), the
    /// multi-device one IMAGE-m0..3.img of SIZE/4 each.
    #[arg(long, default_value = "bench/bench.img")]
    image: PathBuf,
    /// Image size.
    #[arg(long, default_value = "1G", value_parser = vfio_user_blk::util::parse_size)]
    size: u64,
    /// Seconds per run (more than 0).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Runs per workload and target (interleaved); the median, min and
    /// max of each cell are reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// CPUs for the device side: every server process with all its
    /// threads (ours also gets `--cpus` with them), and the I/O threads of
    /// the direct references. Default: the last usable CPU.
    #[arg(long, value_name = "CPU,...")]
    server_cpus: Option<String>,
    /// CPUs for the synthetic guest. Default: the usable CPUs that are not
    /// the server's (all of them on a one-CPU machine).
    #[arg(long, value_name = "CPU,...")]
    driver_cpus: Option<String>,
    /// Pin nothing: every thread floats over every CPU (how figures were
    /// taken before the benchmark placed its targets).
    #[arg(long, conflicts_with_all = ["server_cpus", "driver_cpus"])]
    no_pin: bool,
    /// Compare the medians with those of an earlier run's --json file and
    /// list the cells that moved by more than 10 %.
    #[arg(long, value_name = "JSON")]
    compare: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the IOPS/p99 plot here (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// A short set: 4 KiB random read at QD 1 and 32, the two direct-*
    /// workloads and the multi-device one.
    #[arg(long)]
    quick: bool,
    /// Run only the workloads whose name contains one of these words.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Targets to run: ours, ours-threads, ours-adaptive (direct-*
    /// workloads only), qsd-threads, qsd-uring,
    /// qsd-native (direct-* workloads only), direct, direct-uring (direct-*
    /// workloads only); `qsd` is all three qsd-*, `all` is everything.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    targets: Vec<String>,
    /// Options for our server as `ours` (io_uring engine; the benchmark adds
    /// `--io-engine io-uring`), also used by the multi-device set-ups.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value = "--poll-mode busy --pollers 1"
    )]
    ours_args: String,
    /// Options for our server as `ours-threads` (the benchmark adds
    /// `--io-engine threads`); 64 threads as qemu's aio=threads pool.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value = "--poll-mode busy --pollers 1 --io-threads 64"
    )]
    ours_threads_args: String,
    /// Options for our server as `ours-adaptive` (io_uring engine), run on
    /// the direct-* workloads to show the CPU a request costs when the
    /// reactor sleeps while the disk works.
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value = "--poll-mode adaptive --pollers 1"
    )]
    ours_adaptive_args: String,
    /// How long the synthetic guest, waiting for a completion, watches its
    /// rings before it sleeps on the interrupt (as KVM's halt polling
    /// keeps a halted vCPU running, 200 µs by default); 0: sleep at once.
    #[arg(long, default_value_t = 200)]
    guest_poll_us: u64,
    /// Longest wait, in seconds, for a quiet machine before each run (0:
    /// do not check).
    #[arg(long, default_value_t = 20.0)]
    quiet_wait: f64,
    /// qemu-storage-daemon iothread polling (poll-max-ns; 0 turns it off).
    #[arg(long, default_value_t = 32768)]
    qsd_poll_max_ns: u64,
    /// The interface the synthetic guest drives our device through:
    /// `legacy` (BAR0, doorbells waited for) or `modern` (BAR4, doorbells
    /// posted as QEMU posts memory writes).
    #[arg(long, default_value = "legacy", value_parser = ["legacy", "modern"])]
    ours_interface: String,
    /// Run only the doorbell study: QD1 latency in adaptive mode with the
    /// legacy interface, the modern one (posted doorbells) and the modern
    /// one with `--notify mmap`.
    #[arg(long)]
    notify_study: bool,
    /// Run only the live-upgrade study: 20 upgrades of our target with the
    /// guest idle and 20 under QD32 random reads; the pause distribution,
    /// the slowest request and the rate before and after.
    #[arg(long, conflicts_with = "notify_study")]
    upgrade_study: bool,
    /// Only measure the round trip of a cache line between the guest's
    /// and the server's CPUs N times, every 0.5 s, and print each and a
    /// summary: how often, and for how long, the two vCPUs are apart.
    #[arg(long, value_name = "N", conflicts_with_all = ["notify_study", "upgrade_study"])]
    trip_probe: Option<usize>,
    /// Only report scripts/guest-bench.sh's runs in this folder (with
    /// --json and --svg).
    #[arg(long, value_name = "DIR")]
    guest_report: Option<PathBuf>,
    /// Only draw --svg from an earlier --json file (the benchmark's, as
    /// bench/results.json, or --guest-report's, as bench/guest.json),
    /// running nothing.
    #[arg(
        long,
        value_name = "JSON",
        requires = "svg",
        conflicts_with = "guest_report"
    )]
    render_from: Option<PathBuf>,

    /// An earlier build of the server, run as the target `ours-base` with
    /// ours' options, interleaved with ours on every single-disk workload:
    /// a change checked in one run (the report ends with ours/ours-base).
    #[arg(long, value_name = "PATH")]
    baseline_bin: Option<PathBuf>,

    /// Serve an RBD image (`rbd:POOL/IMAGE:conf=PATH`, as our `--disk`)
    /// instead of the image file on the single-disk workloads: ours opens
    /// it through librbd, qemu-storage-daemon through its rbd driver
    /// (`qsd-threads`; Debian's qemu-block-extra). One server at a time
    /// holds the image (ours takes its exclusive lock).
    #[arg(long, value_name = "SPEC", conflicts_with = "nbd")]
    rbd: Option<String>,

    /// Serve an NBD export (`nbd+unix:///EXPORT?socket=PATH` or
    /// `nbd://HOST:PORT/EXPORT`, as our `--disk`) on the single-disk
    /// workloads: ours through its NBD client, qemu-storage-daemon through
    /// its nbd driver (`qsd-threads`).
    #[arg(long, value_name = "URI")]
    nbd: Option<String>,

    /// Where the direct-* workloads' O_DIRECT image lives: `memory`, a
    /// loop device over a memory file, with the kernel's loop workers
    /// kept on the server CPUs while it exists (needs root; a virtual
    /// machine's disk moves its pace by the minute, more than the targets
    /// differ), or `disk`, a file next to --image. `memory` falls back to
    /// `disk`, saying why, where a loop device cannot be made.
    #[arg(long, default_value = "memory", value_parser = ["memory", "disk"])]
    direct_medium: String,
}

impl Args {
    /// The network disk (`--rbd` or `--nbd`), if one is given.
    fn remote(&self) -> Option<&String> {
        self.rbd.as_ref().or(self.nbd.as_ref())
    }
}

const QUEUES: usize = 4;
const QUEUE_SIZE: u16 = 256;
/// Disks of the multi-device workload.
const MULTI: usize = 4;

/// `--targets` as target names: aliases expanded, unknown names refused.
fn resolve_targets(names: &[String]) -> Result<Vec<&'static str>> {
    let mut v: Vec<&'static str> = Vec::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let add: Vec<&'static str> = match n {
            // ours-base only with --baseline-bin, which selects it.
            "all" => TARGETS.into_iter().filter(|t| *t != "ours-base").collect(),
            "qsd" => vec!["qsd-threads", "qsd-uring", "qsd-native"],
            _ => match TARGETS.iter().find(|t| **t == n) {
                Some(t) => vec![*t],
                None => bail!(
                    "unknown target '{n}' (targets: {}, or qsd, all)",
                    TARGETS.join(", ")
                ),
            },
        };
        for t in add {
            if !v.contains(&t) {
                v.push(t);
            }
        }
    }
    if v.is_empty() {
        bail!("--targets is empty");
    }
    v.sort_by_key(|t| TARGETS.iter().position(|x| x == t));
    Ok(v)
}

/// Whether target `t` runs workload `w` (single-device workloads only).
fn applies(t: &str, w: &Workload, selected: &[&str]) -> bool {
    if w.devices > 1 {
        return false;
    }
    match (t, w.disk) {
        // On an RBD image or NBD export: ours in busy and adaptive mode,
        // against qsd's rbd or nbd driver (which have no aio= to choose).
        ("ours" | "ours-base" | "ours-adaptive" | "qsd-threads", Disk::Remote) => true,
        (_, Disk::Remote) => false,
        ("qsd-native" | "direct-uring" | "ours-adaptive", d) => d == Disk::Direct,
        ("direct", d) => d != Disk::Null,
        // A null disk does no file I/O: the engine does not matter, so each
        // device runs once.
        ("ours-threads", Disk::Null) => !selected.contains(&"ours"),
        ("qsd-uring", Disk::Null) => !selected.contains(&"qsd-threads"),
        _ => true,
    }
}

/// The multi-device set-ups that the selected targets ask for.
fn multi_setups(selected: &[&str]) -> Vec<&'static str> {
    MULTI_SETUPS
        .into_iter()
        .filter(|s| match *s {
            "ours-1proc" | "ours-4proc" => selected.contains(&"ours"),
            "qsd-threads-1iot" => selected.contains(&"qsd-threads"),
            _ => selected.contains(&"qsd-uring"),
        })
        .collect()
}

/// What workload `w` runs on, given the selected targets.
fn targets_of(w: &Workload, selected: &[&str]) -> Vec<&'static str> {
    if w.devices > 1 {
        multi_setups(selected)
    } else {
        TARGETS
            .into_iter()
            .filter(|t| selected.contains(t) && applies(t, w, selected))
            .collect()
    }
}

fn workloads(quick: bool) -> Vec<Workload> {
    let w = |name: &str, op, random, bs, qd, queues, disk| Workload {
        name: name.to_string(),
        op,
        random,
        bs,
        qd,
        queues,
        disk,
        devices: 1,
    };
    let direct = [
        w(
            "direct-4k-randread-qd32",
            Op::Read,
            true,
            4096,
            32,
            1,
            Disk::Direct,
        ),
        w(
            "direct-4k-randwrite-qd32",
            Op::Write,
            true,
            4096,
            32,
            1,
            Disk::Direct,
        ),
    ];
    // Many disks on one core: at QD32 on each, and at QD1, where a disk's
    // process waiting for its turn on the core shows in every request.
    let multi = [32, 1].map(|qd| Workload {
        devices: MULTI,
        ..w(
            &format!("multi{MULTI}-4k-randread-qd{qd}"),
            Op::Read,
            true,
            4096,
            qd,
            1,
            Disk::Cached,
        )
    });
    let c = Disk::Cached;
    let mut v = Vec::new();
    if quick {
        v.push(w("4k-randread-qd1", Op::Read, true, 4096, 1, 1, c));
        v.push(w("4k-randread-qd32", Op::Read, true, 4096, 32, 1, c));
        v.extend(direct);
        v.extend(multi);
        return v;
    }
    for qd in [1, 8, 32, 128] {
        let name = format!("4k-randread-qd{qd}");
        v.push(w(&name, Op::Read, true, 4096, qd, 1, c));
    }
    for qd in [1, 8, 32, 128] {
        let name = format!("4k-randwrite-qd{qd}");
        v.push(w(&name, Op::Write, true, 4096, qd, 1, c));
    }
    v.push(w("128k-seqread-qd8", Op::Read, false, 128 << 10, 8, 1, c));
    v.push(w("128k-seqwrite-qd8", Op::Write, false, 128 << 10, 8, 1, c));
    v.push(w("4k-mix70-qd32", Op::Mix(70), true, 4096, 32, 1, c));
    v.push(w("4k-randread-qd32-4q", Op::Read, true, 4096, 32, 4, c));
    v.push(w("4k-randwrite-qd32-4q", Op::Write, true, 4096, 32, 4, c));
    v.extend(direct);
    v.push(w(
        "null-4k-randread-qd128",
        Op::Read,
        true,
        4096,
        128,
        1,
        Disk::Null,
    ));
    v.extend(multi);
    v
}

/// What the images hold, 1 MiB of it: neither zeros nor one byte repeated.
fn image_pattern() -> Vec<u8> {
    (0..(1usize << 20))
        .map(|i| (i * 31 + 7).to_le_bytes()[0])
        .collect()
}

/// Writes `size` bytes of `fill` repeated to `w`.
fn write_repeated(w: &mut impl Write, size: u64, fill: &[u8]) -> Result<()> {
    if fill.is_empty() && size > 0 {
        bail!("nothing to fill {size} bytes with");
    }
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(fill.len() as u64))?;
        w.write_all(&fill[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Writes the image (not sparse, not zeros) unless it has the right size.
/// `warm` reads it into the page cache; otherwise its pages are dropped
/// from the cache (for O_DIRECT users, which should find the disk).
fn prepare_image(path: &Path, size: u64, warm: bool) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let ok = std::fs::metadata(path)
        .map(|m| m.len() == size)
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "bench: writing a {} MiB image at {}",
            size >> 20,
            path.display()
        );
        let mut f = std::fs::File::create(path)?;
        write_repeated(&mut f, size, &image_pattern())?;
        f.sync_all()?;
    }
    let mut f = std::fs::File::open(path)?;
    if warm {
        // Warm the page cache so that every target reads from memory.
        std::io::copy(&mut f, &mut std::io::sink())?;
    } else {
        use std::os::fd::AsRawFd;
        // SAFETY: an advisory call on a file descriptor we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        // Read it once with O_DIRECT: the storage under a virtual machine
        // caches what was read, and random reads of a cold image got
        // faster run after run (7k to 29k IOPS over one workload here);
        // warmed, every run finds it the same.
        if let Ok(d) = run::open_image(path, Disk::Direct) {
            use std::os::unix::fs::FileExt;
            let mut buf = run::AlignedBuf::new(1 << 20, 0)?;
            let mut off = 0u64;
            while off < size {
                match d.read_at(buf.as_mut_slice(), off) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => off += n as u64,
                }
            }
        }
    }
    Ok(())
}

/// Page-cached images held in memory for the whole run: each file
/// mapped shared and locked, which reads every page into the page
/// cache and keeps it there until the hold is dropped.
///
/// This VM lets go of page cache that was read a while ago, with most of
/// its memory free: four 256 MiB images read at the start were on the
/// disk again by their turn (22k IOPS instead of 370k in every target of
/// one run, and a run later 12k in one round of another). Reading them
/// again right before their workload narrowed the window; a locked
/// mapping closes it.
struct Resident {
    maps: Vec<(*mut libc::c_void, usize)>,
}

impl Resident {
    /// Holds `paths` in the page cache. Where locking is refused (no
    /// CAP_IPC_LOCK and a small RLIMIT_MEMLOCK), the files are read once
    /// instead and `locked` says so.
    fn hold(paths: &[&Path]) -> Result<(Resident, bool)> {
        use std::os::fd::AsRawFd;
        let mut held = Resident { maps: Vec::new() };
        let mut locked = true;
        for p in paths {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let len = usize::try_from(f.metadata()?.len())?;
            if len == 0 {
                continue;
            }
            // SAFETY: a new read-only shared mapping of a file we opened;
            // nothing reads through it, it only pins the pages, and Drop
            // unmaps it.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                bail!(
                    "mapping {}: {}",
                    p.display(),
                    std::io::Error::last_os_error()
                );
            }
            held.maps.push((addr, len));
            // SAFETY: locks the mapping made above, which is `len` long.
            if locked && unsafe { libc::mlock(addr, len) } != 0 {
                locked = false;
            }
            if !locked {
                std::io::copy(&mut f.try_clone()?, &mut std::io::sink())?;
            }
        }
        Ok((held, locked))
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        for &(addr, len) in &self.maps {
            // SAFETY: a mapping made by `hold`, unmapped once (which also
            // unlocks it).
            unsafe { libc::munmap(addr, len) };
        }
    }
}

/// The disk's pace: how long 32 random 4 KiB O_DIRECT reads of `path`
/// (`size` bytes) take one after another. None if it cannot be read.
fn disk_pace(path: &Path, size: u64) -> Option<Duration> {
    use std::os::unix::fs::FileExt;
    let f = run::open_image(path, Disk::Direct).ok()?;
    let mut buf = run::AlignedBuf::new(4096, 0).ok()?;
    let blocks = (size / 4096).max(1);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let t = std::time::Instant::now();
    for _ in 0..32 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        f.read_at(buf.as_mut_slice(), (x >> 11) % blocks * 4096)
            .ok()?;
    }
    Some(t.elapsed())
}

/// Waits (at most `limit`) until the disk answers within twice its quiet
/// pace: the time waited.
fn wait_for_quiet_disk(path: &Path, size: u64, quiet: Duration, limit: Duration) -> Duration {
    let t = std::time::Instant::now();
    while disk_pace(path, size).is_none_or(|d| d > quiet * 2) && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(250));
    }
    t.elapsed()
}

/// The mount that holds `path`: (source, file system type, mount point),
/// as `df` and `mount` would tell.
fn mount_of(path: &Path) -> Option<(String, String, String)> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0].to_string(), f[2].to_string(), f[1].to_string()))
        })
        .filter(|(_, _, mp)| path.starts_with(mp))
        .max_by_key(|(_, _, mp)| mp.len())
}

/// Makes the direct-* workloads' image ready: a loop device over memory
/// (`--direct-medium memory`, `images.direct` then names it), or the file
/// next to --image on a real disk. The note for the header and the memory
/// disk to hold for the run; Err: why the workloads cannot run.
fn direct_medium(
    args: &Args,
    images: &mut Images,
) -> std::result::Result<(String, Option<ramdisk::RamDisk>), String> {
    if args.direct_medium == "memory" {
        let cpus = place::get().map(|p| p.server.clone()).unwrap_or_default();
        match ramdisk::RamDisk::create(images.size, &image_pattern(), &cpus) {
            Ok(rd) => {
                let workers = if rd.workers_placed() {
                    let softirq = match rd.softirq_threads_raised() {
                        0 => "(their softirq threads left as they were)".to_string(),
                        n => format!(
                            "and their softirq thread{} (ksoftirqd, which completes the disk's \
                             requests) at real-time priority, as a real disk's interrupts are \
                             handled before any thread",
                            if n == 1 { "" } else { "s" }
                        ),
                    };
                    format!(
                        "its kernel workers kept on CPU {} {softirq}",
                        place::list(&cpus)
                    )
                } else {
                    "its kernel workers wherever the machine's workqueue mask puts them \
                     (not changed: no placement, or it cannot be written, or another bench \
                     has it)"
                        .into()
                };
                let note = format!(
                    "direct-* image {}: a loop device over a {} MiB memory file, {workers}, so \
                     that O_DIRECT reaches a block device that keeps one pace",
                    rd.path.display(),
                    images.size >> 20
                );
                images.direct = rd.path.clone();
                return Ok((note, Some(rd)));
            }
            Err(e) => {
                eprintln!("bench: the direct-* image goes on the disk: no memory disk: {e:#}")
            }
        }
    }
    let folder = images.direct.parent().unwrap_or(Path::new("."));
    let folder = if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    };
    let mount = mount_of(folder);
    if let Some((_, fs, _)) = &mount {
        if ["tmpfs", "ramfs"].contains(&fs.as_str()) {
            return Err(format!(
                "{} is on {fs}: O_DIRECT there reaches no disk",
                folder.display()
            ));
        }
    }
    prepare_image(&images.direct, images.size, false)
        .and_then(|()| run::open_image(&images.direct, Disk::Direct).map(drop))
        .map_err(|e| format!("O_DIRECT on {}: {e:#}", images.direct.display()))?;
    let note = mount
        .map(|(src, fs, mp)| {
            format!(
                "direct-* image {} on {src} ({fs}, mounted at {mp})",
                images.direct.display()
            )
        })
        .unwrap_or_default();
    Ok((note, None))
}

fn sibling(image: &Path, suffix: &str) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bench".into());
    image.with_file_name(format!("{stem}{suffix}.img"))
}

/// A line of /proc/meminfo (`MemTotal`, `MemAvailable`), in KiB.
fn meminfo_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    // Online CPUs, not this thread's (the benchmark pins itself).
    // SAFETY: sysconf has no memory effects.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(0);
    let mem = meminfo_kib("MemTotal").map_or(0, |kb| kb >> 20);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {}", kernel.trim())
}

/// A synthetic guest's connection to one device.
struct Guest {
    ram: GuestRam,
    dev: Dev,
    rings: Vec<SplitRing>,
}

enum Dev {
    Vfio(VfioUserBlk),
    Vhost(VhostUserBlk),
}

impl Guest {
    /// Connects to our device (`vhost` false) or to a vhost-user-blk export
    /// and sets up `queues` queues.
    fn connect(sock: &Path, vhost: bool, queues: usize, modern: bool) -> Result<Guest> {
        let ram = GuestRam::new(64 << 20)?;
        let (dev, rings) = if vhost {
            let (d, r) = VhostUserBlk::connect(sock, &ram, queues, QUEUE_SIZE, RING_BASE, 0)?;
            (Dev::Vhost(d), r)
        } else {
            let mut d = VfioUserBlk::connect(sock, &ram)?;
            let r = if modern {
                d.setup_modern(sock, &ram, queues, RING_BASE, 0)?
            } else {
                d.setup(&ram, queues, RING_BASE, 0)?
            };
            (Dev::Vfio(d), r)
        };
        Ok(Guest { ram, dev, rings })
    }

    fn close(self) {
        if let Dev::Vfio(d) = self.dev {
            let _ = d.client.shutdown();
        }
    }
}

/// One guest thread drives every disk of `s`, as one vCPU of a guest with
/// several disks does (a thread per disk on the one guest CPU measured how
/// that CPU switched between them: the p50 of one reactor serving four
/// disks at QD1 moved from 14 to 24 µs between runs). The server CPU is
/// that of all its processes over the run.
fn run_guests(
    s: &Server,
    vhost: bool,
    modern: bool,
    w: &Workload,
    size: u64,
    secs: Duration,
) -> Result<RunResult> {
    let mut guests = Vec::new();
    for sock in &s.socks {
        match Guest::connect(sock, vhost, w.queues, modern) {
            Ok(g) => guests.push(g),
            Err(e) => {
                guests.into_iter().for_each(Guest::close);
                return Err(e.context(format!("guest on {}", sock.display())));
            }
        }
    }
    let mut devs: Vec<run::GuestDev<'_>> = guests
        .iter_mut()
        .map(|g| run::GuestDev {
            t: match &mut g.dev {
                Dev::Vfio(d) => d,
                Dev::Vhost(d) => d,
            },
            ram: &g.ram,
            rings: &mut g.rings,
        })
        .collect();
    let r = run::run_virtio_many(&mut devs, w, size, secs, &s.pids());
    drop(devs);
    guests.into_iter().for_each(Guest::close);
    r
}

/// Where each kind of disk lives.
struct Images {
    cached: PathBuf,
    direct: PathBuf,
    multi: Vec<PathBuf>,
    size: u64,
    multi_size: u64,
}

impl Images {
    fn path(&self, d: Disk) -> &Path {
        if d == Disk::Direct {
            &self.direct
        } else {
            &self.cached
        }
    }
}

/// The device processes, started when a target first needs them and kept
/// until the end or until another server needs their image. A target that the host refuses (io_uring or native AIO in
/// qemu-storage-daemon) is remembered as not run, with the reason.
struct Servers<'a> {
    args: &'a Args,
    images: &'a Images,
    dir: PathBuf,
    map: BTreeMap<String, std::result::Result<Server, String>>,
}

fn split_args(s: &str, engine: &str) -> Vec<String> {
    s.split_whitespace()
        .map(str::to_string)
        .chain(["--io-engine".to_string(), engine.to_string()])
        .collect()
}

impl Servers<'_> {
    fn get(
        &mut self,
        t: &'static str,
        w: &Workload,
    ) -> Result<std::result::Result<&Server, String>> {
        let key = if w.devices > 1 {
            t.to_string()
        } else {
            format!("{t}-{:?}", w.disk).to_lowercase()
        };
        if !self.map.contains_key(&key) {
            // Servers lock their images as QEMU does (a writer shares with
            // nobody): whatever holds one of this server's images is
            // stopped first. Interleaved runs thus each get a fresh server.
            let holds = self.images_of(w);
            self.map.retain(|_, s| match s {
                Ok(s) => !s.holds.iter().any(|p| holds.contains(p)),
                Err(_) => true,
            });
            let r = self.start(t, w, &self.dir.join(&key)).map(|mut s| {
                s.holds = holds;
                s
            });
            let may_refuse = t.contains("uring") || t.contains("native");
            let r = match r {
                Ok(s) => {
                    if let Some(n) = &s.note {
                        eprintln!("\nbench: {t}: {n}");
                    }
                    Ok(s)
                }
                Err(e) if may_refuse && t.starts_with("qsd") => {
                    let why = format!("{e:#}");
                    eprintln!("\nbench: {t} is not run: {why}");
                    Err(why)
                }
                Err(e) => return Err(e.context(format!("starting the server of {t}"))),
            };
            self.map.insert(key.clone(), r);
        }
        Ok(self.map[&key].as_ref().map_err(Clone::clone))
    }

    /// Stops every server.
    fn stop_all(&mut self) {
        self.map.clear();
    }

    /// The image files that the server of workload `w` opens.
    fn images_of(&self, w: &Workload) -> Vec<PathBuf> {
        if let (Some(r), Disk::Remote) = (self.args.remote(), w.disk) {
            return vec![PathBuf::from(r)];
        }
        if w.devices > 1 {
            self.images.multi.clone()
        } else if w.disk == Disk::Null {
            Vec::new()
        } else {
            vec![self.images.path(w.disk).to_path_buf()]
        }
    }

    fn start(&self, t: &str, w: &Workload, dir: &Path) -> Result<Server> {
        let a = self.args;
        let im = self.images;
        let ours_disk = |d: Disk| -> Result<OursDisk> {
            Ok(match d {
                Disk::Remote => OursDisk {
                    spec: a
                        .remote()
                        .cloned()
                        .context("a remote workload without --rbd/--nbd")?,
                    direct: false,
                },
                Disk::Null => OursDisk {
                    spec: format!("null:{}", im.size),
                    direct: false,
                },
                _ => OursDisk {
                    spec: im.path(d).to_str().context("image path")?.to_string(),
                    direct: d == Disk::Direct,
                },
            })
        };
        let qsd_aio = |t: &str| {
            if t.starts_with("qsd-uring") {
                "io_uring"
            } else if t.starts_with("qsd-native") {
                "native"
            } else {
                "threads"
            }
        };
        let multi_files = |p: &PathBuf| QsdDisk::File {
            path: p.clone(),
            direct: false,
        };
        let multi_ours = |p: &PathBuf| -> Result<OursDisk> {
            Ok(OursDisk {
                spec: p.to_str().context("image path")?.to_string(),
                direct: false,
            })
        };
        // One disk of ours, from the server binary `bin` (None: the one
        // next to the benchmark), with these options and I/O engine.
        let single = |bin: Option<&Path>, opts: &str, engine: &str| -> Result<Server> {
            let disks = [ours_disk(w.disk)?];
            let args = split_args(opts, engine);
            start_ours(bin, dir, &disks, QUEUES, QUEUE_SIZE, &args)
        };
        match t {
            "ours" => single(None, &a.ours_args, "io-uring"),
            "ours-base" => {
                let bin = a.baseline_bin.as_deref();
                single(
                    Some(bin.context("ours-base needs --baseline-bin")?),
                    &a.ours_args,
                    "io-uring",
                )
            }
            "ours-threads" => single(None, &a.ours_threads_args, "threads"),
            "ours-adaptive" => single(None, &a.ours_adaptive_args, "io-uring"),
            "qsd-threads" | "qsd-uring" | "qsd-native" => {
                let d = match w.disk {
                    Disk::Null => QsdDisk::Null { size: im.size },
                    Disk::Remote => QsdDisk::Remote(a.remote().cloned().context("no --rbd/--nbd")?),
                    d => QsdDisk::File {
                        path: im.path(d).to_path_buf(),
                        direct: d == Disk::Direct,
                    },
                };
                start_qsd(dir, &[d], qsd_aio(t), a.qsd_poll_max_ns, QUEUES)
            }
            "ours-1proc" => start_ours(
                None,
                dir,
                &im.multi
                    .iter()
                    .map(multi_ours)
                    .collect::<Result<Vec<_>>>()?,
                1,
                QUEUE_SIZE,
                &split_args(&a.ours_args, "io-uring"),
            ),
            "ours-4proc" => {
                let mut all = Server {
                    procs: Vec::new(),
                    socks: Vec::new(),
                    note: None,
                    holds: Vec::new(),
                };
                for (i, p) in im.multi.iter().enumerate() {
                    let s = start_ours(
                        None,
                        &dir.join(i.to_string()),
                        &[multi_ours(p)?],
                        1,
                        QUEUE_SIZE,
                        &split_args(&a.ours_args, "io-uring"),
                    )?;
                    all.procs.extend(s.procs);
                    all.socks.extend(s.socks);
                    all.note = all.note.or(s.note);
                }
                Ok(all)
            }
            "qsd-threads-1iot" | "qsd-uring-1iot" => start_qsd(
                dir,
                &im.multi.iter().map(multi_files).collect::<Vec<_>>(),
                qsd_aio(t),
                a.qsd_poll_max_ns,
                1,
            ),
            _ => bail!("no server for target {t}"),
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(cmd) = args.command {
        return soak::main(cmd);
    }
    match real_main(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "bench: {}",
                e.chain()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(": ")
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(args: &Args) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be more than 0 (got {})", args.seconds);
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if !(args.quiet_wait.is_finite() && args.quiet_wait >= 0.0) {
        bail!("--quiet-wait must be 0 or more seconds");
    }
    for (name, v) in [
        ("--ours-args", &args.ours_args),
        ("--ours-threads-args", &args.ours_threads_args),
        ("--ours-adaptive-args", &args.ours_adaptive_args),
    ] {
        if v.split_whitespace().any(|a| a.starts_with("--io-engine")) {
            bail!("{name}: leave --io-engine out; the target sets it (ours: io-uring, ours-threads: threads)");
        }
    }
    if let Some(dir) = &args.guest_report {
        return guest_report::run(dir, args.json.as_deref(), args.svg.as_deref());
    }
    if let (Some(from), Some(svg)) = (&args.render_from, &args.svg) {
        return render(from, svg);
    }
    let placement = if args.no_pin {
        None
    } else {
        Some(place::choose(
            args.server_cpus.as_deref(),
            args.driver_cpus.as_deref(),
        )?)
    };
    place::set(placement).context("placing the benchmark")?;
    run::set_guest_poll(Duration::from_micros(args.guest_poll_us));
    if args.notify_study {
        prepare_image(&args.image, args.size, true)?;
        let v = notify::study(
            &canonical(&args.image),
            args.size,
            Duration::from_secs_f64(args.seconds),
            args.repeat,
        )?;
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
        }
        return Ok(());
    }
    if let Some(n) = args.trip_probe {
        print!("{}", place::trip_probe(n, Duration::from_millis(500)));
        return Ok(());
    }
    if args.upgrade_study {
        prepare_image(&args.image, args.size, true)?;
        let v = upgrade::study(
            &canonical(&args.image),
            args.size,
            Duration::from_secs_f64(args.seconds),
            &args.ours_args,
        )?;
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
        }
        return Ok(());
    }
    let mut selected = resolve_targets(&args.targets)?;
    match &args.baseline_bin {
        Some(bin) => {
            if !bin.is_file() {
                bail!("--baseline-bin {}: no such file", bin.display());
            }
            if !selected.contains(&"ours") {
                bail!("--baseline-bin compares with ours: select ours too");
            }
            if !selected.contains(&"ours-base") {
                selected.push("ours-base");
                selected.sort_by_key(|t| TARGETS.iter().position(|x| x == t));
            }
        }
        None if selected.contains(&"ours-base") => {
            bail!("the target ours-base needs --baseline-bin PATH (an earlier build)")
        }
        None => {}
    }
    let secs = Duration::from_secs_f64(args.seconds);
    let mut skipped: BTreeMap<String, String> = BTreeMap::new();
    let mut list: Vec<Workload> = workloads(args.quick)
        .into_iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|o| w.name.contains(o.as_str())))
        .collect();
    if args.remote().is_some() {
        // The network disk's rows: random 4 KiB at QD 1 and 32, and
        // sequential 128 KiB.
        const RBD_ROWS: [&str; 6] = [
            "4k-randread-qd1",
            "4k-randread-qd32",
            "4k-randwrite-qd1",
            "4k-randwrite-qd32",
            "128k-seqread-qd8",
            "128k-seqwrite-qd8",
        ];
        list.retain(|w| RBD_ROWS.contains(&w.name.as_str()));
        for w in &mut list {
            w.disk = Disk::Remote;
        }
    }
    if list.is_empty() {
        bail!("no workload matches --only {:?}", args.only);
    }
    list.retain(|w| {
        let keep = !targets_of(w, &selected).is_empty();
        if !keep {
            skipped.insert(w.name.clone(), "no selected target runs it".into());
        }
        keep
    });

    if let Some(d) = args.image.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    let mut images = Images {
        cached: args.image.clone(),
        direct: sibling(&args.image, "-direct"),
        multi: (0..MULTI)
            .map(|i| sibling(&args.image, &format!("-m{i}")))
            .collect(),
        size: args.size,
        multi_size: ((args.size / MULTI as u64) & !((1 << 20) - 1)).max(1 << 20),
    };
    let (disk_note, ramdisk) = if list.iter().any(|w| w.disk == Disk::Direct) {
        match direct_medium(args, &mut images) {
            Ok(found) => found,
            Err(why) => {
                eprintln!("bench: skipping the direct-* workloads: {why}");
                list.retain(|w| {
                    if w.disk == Disk::Direct {
                        skipped.insert(w.name.clone(), why.clone());
                    }
                    w.disk != Disk::Direct
                });
                (String::new(), None)
            }
        }
    } else {
        (String::new(), None)
    };
    if list.is_empty() {
        bail!("no workload left to run");
    }
    if args.remote().is_none()
        && list
            .iter()
            .any(|w| w.disk == Disk::Cached && w.devices == 1)
    {
        prepare_image(&images.cached, images.size, true)?;
    }
    if list.iter().any(|w| w.devices > 1) {
        for p in &images.multi {
            prepare_image(p, images.multi_size, true)?;
        }
    }
    let images = Images {
        cached: canonical(&images.cached),
        direct: canonical(&images.direct),
        multi: images.multi.iter().map(|p| canonical(p)).collect(),
        ..images
    };
    let uring = run::uring_available().map_err(|e| format!("{e:#}"));

    let dir = std::env::temp_dir().join(format!("vub-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let mut servers = Servers {
        args,
        images: &images,
        dir,
        map: BTreeMap::new(),
    };

    let total: usize = list
        .iter()
        .map(|w| args.repeat * targets_of(w, &selected).len())
        .sum();
    let mut done = 0;
    let mut results: Results = BTreeMap::new();
    // The machine's pace when quiet: a few measurements to start with,
    // and every one taken before and after a run.
    let quiet_limit = Duration::from_secs_f64(args.quiet_wait);
    let mut quiet = if quiet_limit.is_zero() {
        place::Pace::default()
    } else {
        place::quiet_pace()
    };
    let (mut noisy_waits, mut noisy_wait) = (0usize, Duration::ZERO);
    // The disk's quiet pace, for the direct-* workloads.
    let disk_quiet = (!quiet_limit.is_zero()
        && ramdisk.is_none()
        && list.iter().any(|w| w.disk == Disk::Direct))
    .then(|| {
        (0..5)
            .filter_map(|_| disk_pace(&images.direct, images.size))
            .min()
    })
    .flatten();
    let (mut stolen_redo, mut noisy_redo, mut noisy_kept) = (0usize, 0usize, 0usize);
    // Every page-cached image stays in memory for the whole run.
    let mut resident: Vec<&Path> = Vec::new();
    if list
        .iter()
        .any(|w| w.disk == Disk::Cached && w.devices == 1)
    {
        resident.push(images.cached.as_path());
    }
    if list.iter().any(|w| w.devices > 1) {
        resident.extend(images.multi.iter().map(|p| p.as_path()));
    }
    let (_resident, locked) = Resident::hold(&resident)?;
    if !locked {
        eprintln!(
            "bench: cannot lock the page-cached images in memory (mlock refused): \
             they were read once, and can drop out of the cache"
        );
    }
    type Cell = (
        BTreeMap<&'static str, Vec<RunResult>>,
        BTreeMap<&'static str, String>,
    );
    let mut cells: Vec<Cell> = list.iter().map(|_| Cell::default()).collect();
    // Interleaved twice over: each round runs every workload once on
    // every target, so that drift on a noisy machine (its speed moves for
    // minutes at a time) hits all targets alike, and each cell's median
    // draws on the whole length of the benchmark, not on one minute of it.
    for _ in 0..args.repeat {
        for (w, (runs, not_run)) in list.iter().zip(cells.iter_mut()) {
            let targets = targets_of(w, &selected);
            let size = if w.devices > 1 {
                images.multi_size
            } else {
                images.size
            };
            'targets: for &t in &targets {
                done += 1;
                if not_run.contains_key(t) {
                    continue;
                }
                eprint!("\r\x1b[2K[{done}/{total}] {} {t} ...", w.name);
                let _ = std::io::stderr().flush();
                // A run from which the hypervisor took more than 5 % of a
                // CPU (steal, over its timed window) is run again, twice
                // at most: the host's, not the target's, figure. Every try
                // waits for a quiet machine first.
                let mut tries = 0;
                let r = loop {
                    // A run starts on a quiet machine: when a neighbour
                    // takes the CPUs (a copy in the cores' caches more than
                    // 25 % slower than at the start), wait for it to pass,
                    // up to 20 s.
                    let mut waited = place::wait_for_quiet(&mut quiet, 1.25, quiet_limit);
                    // A run on the disk starts once the disk answers within
                    // twice its quiet pace (the storage under this VM has
                    // minutes when it answers 100 times slower), up to
                    // three times as long.
                    if w.disk == Disk::Direct {
                        if let Some(q) = disk_quiet {
                            let limit = quiet_limit * 3;
                            waited += wait_for_quiet_disk(&images.direct, images.size, q, limit);
                        }
                    }
                    if waited > Duration::from_millis(300) {
                        noisy_waits += 1;
                        noisy_wait += waited;
                    }
                    let r = match t {
                        "direct" => run_direct(images.path(w.disk), w, size, secs),
                        "direct-uring" => match &uring {
                            Ok(()) => run_direct_uring(images.path(w.disk), w, size, secs),
                            Err(why) => {
                                not_run.insert(t, why.clone());
                                continue 'targets;
                            }
                        },
                        _ => match servers.get(t, w)? {
                            Ok(s) => {
                                let vhost = t.starts_with("qsd");
                                let modern = args.ours_interface == "modern";
                                let r = run_guests(s, vhost, modern, w, size, secs);
                                s.check_alive(t)?;
                                r
                            }
                            Err(why) => {
                                not_run.insert(t, why);
                                continue 'targets;
                            }
                        },
                    }
                    .with_context(|| format!("{} on {t}", w.name))?;
                    if r.stolen / r.secs.max(1e-3) > 0.05 && tries < 2 {
                        tries += 1;
                        stolen_redo += 1;
                        continue;
                    }
                    // Likewise a run at whose end the machine was not
                    // quiet: the vCPUs moved apart (or a neighbour came)
                    // during it, for seconds as a rule.
                    if !quiet_limit.is_zero() && !quiet.quiet_now(1.25) {
                        if tries < 2 {
                            tries += 1;
                            noisy_redo += 1;
                            continue;
                        }
                        noisy_kept += 1;
                    }
                    break r;
                };
                runs.entry(t).or_default().push(r);
            }
            // No server of this workload stays up (idle, or polling) while
            // the next one runs.
            servers.stop_all();
        }
    }
    for (i, (w, (runs, not_run))) in list.iter().zip(cells).enumerate() {
        let per: BTreeMap<&'static str, Summary> = runs
            .iter()
            .map(|(t, v)| (*t, report::summarize(v)))
            .collect();
        results.insert(
            i,
            Row {
                w: w.clone(),
                targets: targets_of(w, &selected),
                per,
                not_run,
            },
        );
    }
    eprintln!("\r\x1b[2Kdone: {total} runs");
    let quiet_text = if quiet_limit.is_zero() {
        "no run waits for a quiet machine (--quiet-wait 0)".to_string()
    } else {
        format!(
            "a run starts once the CPUs copy memory within 25 % of their quiet pace \
             ({:.1} ms; quiet: the first quartile of every measurement) and a cache line \
             crosses from the guest's CPU to the server's and back within 25 % of its quiet \
             round trip ({:.0} ns){}: {noisy_waits} run(s) waited for that, {:.1} s in all, \
             and is run again (twice at most) when the machine was not quiet right after it: \
             {noisy_redo} run(s) were, and {noisy_kept} kept after two tries were not quiet \
             either",
            quiet.copy().as_secs_f64() * 1e3,
            quiet.trip().as_secs_f64() * 1e9,
            disk_quiet.map_or(String::new(), |d| format!(
                ", and a direct-* run once 32 random O_DIRECT reads of the disk take at most \
                 twice their quiet time ({:.1} ms)",
                d.as_secs_f64() * 1e3
            )),
            noisy_wait.as_secs_f64(),
        )
    };
    let meta = Meta {
        machine: machine(),
        repeat: args.repeat,
        seconds: args.seconds,
        targets: selected.clone(),
        ours_args: args.ours_args.clone(),
        ours_threads_args: args.ours_threads_args.clone(),
        ours_adaptive_args: args.ours_adaptive_args.clone(),
        interface: args.ours_interface.clone(),
        disk: disk_note,
        multi_size: images.multi_size,
        skipped,
        placement: match place::get() {
            Some(p) => format!(
                "servers (every thread) and the direct references' I/O on CPU {}, the synthetic guest on CPU {}",
                place::list(&p.server),
                place::list(&p.driver)
            ),
            None => "nothing pinned (--no-pin)".into(),
        } + &format!(
            "; the guest watches its rings {} µs before it sleeps on an interrupt; \
             {quiet_text}; a run is run again, twice at most, when the hypervisor took more \
             than 5 % of a CPU from it (steal time): {stolen_redo} run(s) were; \
             the page-cached images are {}; each of the {} rounds runs every workload \
             on every target once",
            args.guest_poll_us,
            if locked {
                "locked in memory (mlock) for the whole run"
            } else {
                "read once (mlock refused)"
            },
            args.repeat
        ),
    };
    print!("{}", report::header(&meta));
    print!("{}", report::table(&results));
    if selected.contains(&"ours-base") {
        print!("{}", report::against_base(&results));
    }
    print!("{}", report::multi_table(&results, &meta));
    let json = report::to_json(&results, &meta);
    if let Some(prev) = &args.compare {
        let text =
            std::fs::read_to_string(prev).with_context(|| format!("reading {}", prev.display()))?;
        let prev: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", prev.display()))?;
        print!("{}", report::compare(&prev, &json));
    }
    if let Some(p) = &args.json {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, serde_json::to_string_pretty(&json)?)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.svg {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, report::plot(&json)?)?;
        eprintln!("wrote {}", p.display());
    }
    drop(servers);
    Ok(())
}

/// `--render-from JSON --svg SVG`: the chart of an earlier run's JSON, a
/// guest report's (it has "jobs") or the benchmark's.
fn render(from: &Path, svg: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", from.display()))?;
    let chart = if v.get("jobs").is_some() {
        guest_report::plot(&v)?
    } else {
        report::plot(&v)?
    };
    std::fs::write(svg, chart).with_context(|| format!("writing {}", svg.display()))?;
    eprintln!("wrote {}", svg.display());
    Ok(())
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn targets_resolve_aliases_and_refuse_unknown_names() {
        let all: Vec<&str> = TARGETS.into_iter().filter(|t| *t != "ours-base").collect();
        assert_eq!(resolve_targets(&names(&["all"])).unwrap(), all);
        assert_eq!(
            resolve_targets(&names(&["direct", "qsd", "ours"])).unwrap(),
            vec!["ours", "qsd-threads", "qsd-uring", "qsd-native", "direct"]
        );
        assert_eq!(
            resolve_targets(&names(&["ours", "ours"])).unwrap(),
            vec!["ours"]
        );
        assert!(resolve_targets(&names(&["ours", "qsdd"])).is_err());
        assert!(resolve_targets(&names(&[""])).is_err());
    }

    #[test]
    fn each_workload_gets_the_targets_that_make_sense() {
        let all = resolve_targets(&names(&["all"])).unwrap();
        let find = |name: &str| {
            workloads(false)
                .into_iter()
                .find(|w| w.name == name)
                .unwrap()
        };
        assert_eq!(
            targets_of(&find("4k-randread-qd32"), &all),
            vec!["ours", "ours-threads", "qsd-threads", "qsd-uring", "direct"]
        );
        assert_eq!(targets_of(&find("direct-4k-randwrite-qd32"), &all), all);
        assert_eq!(
            targets_of(&find("null-4k-randread-qd128"), &all),
            vec!["ours", "qsd-threads"]
        );
        assert_eq!(
            targets_of(&find("null-4k-randread-qd128"), &["qsd-uring"]),
            vec!["qsd-uring"]
        );
        assert_eq!(
            targets_of(&find("multi4-4k-randread-qd32"), &all),
            MULTI_SETUPS.to_vec()
        );
        assert_eq!(
            targets_of(
                &find("multi4-4k-randread-qd32"),
                &["ours-threads", "direct"]
            ),
            Vec::<&str>::new()
        );
        // The baseline build runs wherever ours does, single disks only.
        let with_base = ["ours", "ours-base", "qsd-uring"];
        assert_eq!(
            targets_of(&find("4k-randread-qd32"), &with_base),
            vec!["ours", "ours-base", "qsd-uring"]
        );
        assert_eq!(
            targets_of(&find("multi4-4k-randread-qd32"), &with_base),
            vec!["ours-1proc", "ours-4proc", "qsd-uring-1iot"]
        );
        // --quick covers every new workload kind.
        let quick = workloads(true);
        assert!(quick.iter().any(|w| w.disk == Disk::Direct));
        assert!(quick.iter().any(|w| w.devices == MULTI));
    }
}
