//! The soak test: `vfio-user-blk-bench soak` drives a running server
//! (started by scripts/soak.sh) through cycles of "spawn a client
//! (`soak-client`), let it write, SIGKILL it at a random point, wait until
//! the server has torn it down, verify the whole image against the model of
//! what every client's journal says, sample the server's descriptors,
//! threads and RSS". With a second device, a long-lived client writes to it
//! all along, must progress in every cycle, and its image is verified at
//! the end.

pub mod client;
pub mod journal;
pub mod model;
pub mod pattern;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use journal::{Kind, Reader, Record};
use model::Model;
use pattern::show_gen;

use crate::run::Rng;

/// `soak` options (scripts/soak.sh sets them).
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// The server's PID (its descriptors, threads and RSS are sampled).
    #[arg(long)]
    pub server_pid: u32,
    /// The server's management socket.
    #[arg(long)]
    pub rpc_socket: PathBuf,
    /// A device as NAME,SOCKET,IMAGE: once, or twice for a second device
    /// whose client runs all along.
    #[arg(long = "device", value_name = "NAME,SOCKET,IMAGE", required = true)]
    pub devices: Vec<String>,
    /// Kill-and-reattach cycles.
    #[arg(long, default_value_t = 100)]
    pub cycles: u64,
    /// Seed of the patterns and of every random choice (default: from the
    /// clock; printed, so that a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The server's --io-threads: its thread count may grow by that much.
    #[arg(long, default_value_t = 64)]
    pub io_threads: u64,
    /// The longest a client lives before its SIGKILL, in ms.
    #[arg(long, default_value_t = 250)]
    pub max_delay_ms: u64,
    /// Percentage of cycles whose kill comes within `--early-ms` of the
    /// start (aimed at the attach: connect, DMA_MAP, initialisation).
    #[arg(long, default_value_t = 30)]
    pub early_percent: u64,
    /// The window of the early kills, in ms (an attach takes about 2 ms
    /// here, after 1 to 2 ms of process start-up).
    #[arg(long, default_value_t = 3)]
    pub early_ms: u64,
    /// Where journals and client logs go (a private folder).
    #[arg(long)]
    pub workdir: PathBuf,
    /// Verify the image every K cycles only (and after the last): the
    /// next client then attaches right after the teardown, which gives a
    /// late write of the killed one more chances to land on its writes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub verify_every: u64,
    /// The longest the long-lived client may go without an acknowledged
    /// write (ms), and how long the end of a cycle in which it has none
    /// yet waits for one.
    #[arg(long, default_value_t = 500)]
    pub stall_ms: u64,
    /// Go on after a cycle that loses data (each bad sector is then taken
    /// as found) and count such cycles; the soak still fails at the end.
    #[arg(long)]
    pub keep_going: bool,
    /// Most the floor of the server's RSS may rise between the cycles
    /// after the reference one (the 50th, or half-way in shorter runs) and
    /// the last cycles, in MiB (the lowest sample of each window).
    #[arg(long, default_value_t = 4)]
    pub rss_slack_mib: u64,
    /// Upgrade the server in place (`target_upgrade`) in every K-th cycle,
    /// half-way through the client's life (0: never): every acknowledged
    /// write must still be on the disk, the long-lived client must go on,
    /// and the server must keep its PID.
    #[arg(long, default_value_t = 0)]
    pub upgrade_every: u64,
}

/// `soak` and `soak-client`, beside the benchmark's own options.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum SoakCommand {
    /// The soak's orchestrator (see scripts/soak.sh, which starts the
    /// server and runs this).
    Soak(SoakArgs),
    /// The client the soak kills (spawned by `soak`).
    SoakClient(client::ClientArgs),
    /// Checks an image against journals (replayed in the order given):
    /// every acknowledged write there, nothing else.
    SoakVerify(VerifyArgs),
}

/// `soak-verify` options.
#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// The soak's seed (of the sector patterns).
    #[arg(long)]
    pub seed: u64,
    /// The image (its size is the disk's).
    #[arg(long)]
    pub image: PathBuf,
    /// Journals of the clients that wrote to it, oldest first.
    #[arg(long = "journal", required = true)]
    pub journals: Vec<PathBuf>,
}

fn verify_main(a: &VerifyArgs) -> Result<bool> {
    let disk = std::fs::metadata(&a.image)
        .with_context(|| format!("{}", a.image.display()))?
        .len();
    let mut model = Model::new(a.seed, disk);
    for j in &a.journals {
        for r in journal::read_all(j)? {
            model
                .apply(&r)
                .with_context(|| format!("{}", j.display()))?;
        }
    }
    let mut image = vec![0u8; usize::try_from(model.sectors)? * pattern::SECTOR];
    read_image(&a.image, &mut image)?;
    let bad = model.verify(&image);
    let s = &model.stats;
    if bad.is_empty() {
        println!(
            "soak-verify: PASS: {} sectors, {} writes acknowledged of {} submitted",
            model.sectors, s.acked, s.submitted
        );
        return Ok(true);
    }
    println!(
        "soak-verify: FAIL: {} sector(s) hold what they must not:\n{}",
        bad.len(),
        model.report(&bad, 20)
    );
    Ok(false)
}

pub fn main(cmd: SoakCommand) -> std::process::ExitCode {
    match cmd {
        SoakCommand::SoakClient(a) => {
            std::process::ExitCode::from(u8::try_from(client::main(a)).unwrap_or(2))
        }
        SoakCommand::SoakVerify(a) => match verify_main(&a) {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => std::process::ExitCode::FAILURE,
            Err(e) => {
                eprintln!("soak-verify: {e:#}");
                std::process::ExitCode::from(2)
            }
        },
        SoakCommand::Soak(a) => match run(&a) {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => std::process::ExitCode::FAILURE,
            Err(e) => {
                eprintln!("soak: FAIL: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

struct Device {
    name: String,
    socket: PathBuf,
    image: PathBuf,
}

fn parse_device(s: &str) -> Result<Device> {
    let v: Vec<&str> = s.splitn(3, ',').collect();
    if v.len() != 3 || v.iter().any(|x| x.is_empty()) {
        bail!("--device {s}: give NAME,SOCKET,IMAGE");
    }
    Ok(Device {
        name: v[0].into(),
        socket: v[1].into(),
        image: v[2].into(),
    })
}

/// The management socket, one JSON object per line each way, kept open.
struct Rpc {
    path: PathBuf,
    conn: Option<(UnixStream, BufReader<UnixStream>)>,
    id: u64,
}

impl Rpc {
    fn call_once(&mut self, method: &str) -> Result<Value> {
        if self.conn.is_none() {
            let s = UnixStream::connect(&self.path)
                .with_context(|| format!("connecting to {}", self.path.display()))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let r = BufReader::new(s.try_clone()?);
            self.conn = Some((s, r));
        }
        let (s, r) = self.conn.as_mut().context("no connection")?;
        self.id += 1;
        writeln!(
            s,
            "{}",
            json!({"jsonrpc": "2.0", "id": self.id, "method": method})
        )?;
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("the management socket closed");
        }
        let v: Value = serde_json::from_str(&line).context("the answer is not JSON")?;
        if let Some(e) = v.get("error") {
            bail!("{method}: {e}");
        }
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    }

    fn call(&mut self, method: &str) -> Result<Value> {
        match self.call_once(method) {
            Ok(v) => Ok(v),
            Err(_) => {
                // The server closes idle connections: once more, anew.
                self.conn = None;
                self.call_once(method)
            }
        }
    }

    fn device(&mut self, name: &str) -> Result<Value> {
        let list = self.call("device_list")?;
        list.as_array()
            .and_then(|a| a.iter().find(|d| d["name"] == name))
            .cloned()
            .with_context(|| format!("device_list has no device '{name}': {list}"))
    }

    /// Waits until device `name` has no client; returns how long it took.
    fn wait_detached(&mut self, name: &str, limit: Duration) -> Result<Duration> {
        let t = Instant::now();
        loop {
            if self.device(name)?["client"].is_null() {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                bail!("the server did not tear {name}'s client down in {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The server's open descriptors (their link targets, sorted).
fn fds_of(pid: u32) -> Result<Vec<String>> {
    let dir = format!("/proc/{pid}/fd");
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let e = e?;
        let l = std::fs::read_link(e.path())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        v.push(l);
    }
    v.sort();
    Ok(v)
}

/// The threads of a process: (its own, io_uring's kernel workers
/// `iou-wrk-*`, its reactors `reactor-*`).
fn threads_of(pid: u32) -> Result<(u64, u64, u64)> {
    let dir = format!("/proc/{pid}/task");
    let (mut own, mut uring, mut reactors) = (0, 0, 0);
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // A thread that leaves while we look has no comm any more.
        let Ok(comm) = std::fs::read_to_string(e?.path().join("comm")) else {
            continue;
        };
        if comm.starts_with("iou-wrk-") {
            uring += 1;
        } else {
            own += 1;
            reactors += u64::from(comm.starts_with("reactor-"));
        }
    }
    Ok((own, uring, reactors))
}

/// (cycle, VmRSS KiB, RssAnon KiB) after a cycle's teardown.
type RssSample = (u64, u64, u64);

/// The lowest RSS sample of two windows of cycles: from the reference
/// cycle (the 50th, or half-way in shorter runs) on, and at the end, each
/// up to 20 cycles and at most a third of what follows the reference. A
/// leak raises the floor by what it holds; noise raises single samples
/// only (seen: 11.5 to 16.8 MiB from one cycle to the next across live
/// upgrades, with no trend). None without samples.
fn rss_floors(samples: &[RssSample]) -> Option<(RssSample, RssSample)> {
    let n = samples.len();
    if n == 0 {
        return None;
    }
    let r = n.div_ceil(2).clamp(1, 50) - 1;
    let k = ((n - r) / 3).clamp(1, 20);
    let floor = |w: &[RssSample]| w.iter().copied().min_by_key(|s| s.1);
    // r + k <= n: k is at most a third of n - r, or 1 where n - r is 1.
    Some((floor(&samples[r..r + k])?, floor(&samples[n - k..])?))
}

/// (threads, VmRSS KiB, RssAnon KiB) of a process.
fn status_of(pid: u32) -> Result<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("the server (pid {pid}) is gone"))?;
    let field = |k: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let state = s
        .lines()
        .find(|l| l.starts_with("State:"))
        .unwrap_or_default();
    if state.contains("zombie") || state.contains("dead") {
        bail!("the server (pid {pid}) has exited");
    }
    Ok((field("Threads:"), field("VmRSS:"), field("RssAnon:")))
}

/// The entries of `now` beyond those of `base` (multisets).
fn extra(base: &[String], now: &[String]) -> Vec<String> {
    let mut count: BTreeMap<&str, i64> = BTreeMap::new();
    for b in base {
        *count.entry(b).or_default() += 1;
    }
    let mut v = Vec::new();
    for n in now {
        let c = count.entry(n).or_default();
        if *c > 0 {
            *c -= 1;
        } else {
            v.push(n.clone());
        }
    }
    v
}

fn read_image(path: &Path, buf: &mut [u8]) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.read_exact_at(buf, 0)
        .with_context(|| format!("reading {}", path.display()))
}

/// The long-lived client of the second device.
struct Neighbour {
    dev: Device,
    child: Child,
    stdin: Option<ChildStdin>,
    journal: PathBuf,
    reader: Reader,
    log: PathBuf,
    model: Model,
    last_ack_ns: u64,
    max_gap_ns: u64,
    /// The cycle whose window the longest gap ended in.
    max_gap_cycle: u64,
    window_acks_min: u64,
    window_acks_min_cycle: u64,
    interface: &'static str,
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Neighbour {
    /// Replays what its journal gained; returns the acknowledgements, or
    /// what went wrong.
    fn poll(&mut self, complete: bool, cycle: u64) -> Result<std::result::Result<u64, String>> {
        let recs = self.reader.read_new(complete)?;
        let mut acks = 0;
        for r in &recs {
            self.model.apply(r)?;
            match r.kind {
                Kind::Ack => {
                    acks += 1;
                    let gap = r.t_ns.saturating_sub(self.last_ack_ns);
                    if self.last_ack_ns > 0 && gap > self.max_gap_ns {
                        self.max_gap_ns = gap;
                        self.max_gap_cycle = cycle;
                    }
                    self.last_ack_ns = r.t_ns;
                }
                Kind::Error | Kind::FlushError | Kind::ReadError | Kind::ReadBad => {
                    return Ok(Err(describe_bad_record(r)));
                }
                _ => {}
            }
        }
        if let Some(st) = self.child.try_wait()? {
            if !complete {
                return Ok(Err(format!(
                    "the long-lived client exited ({st}): {}",
                    tail(&self.log)
                )));
            }
        }
        Ok(Ok(acks))
    }
}

fn describe_bad_record(r: &Record) -> String {
    match r.kind {
        Kind::Error => format!("{} completed with status {}", show_gen(r.gen), r.aux),
        Kind::FlushError => format!("a flush completed with status {}", r.aux),
        Kind::ReadError => format!(
            "a read of sectors {}..{} completed with status {}",
            r.sector,
            r.sector + u64::from(r.count),
            r.aux
        ),
        Kind::ReadBad => format!(
            "a read found sector {} holding {} where it expected {} ({})",
            r.sector,
            if r.extra == 0 {
                "no valid generation".to_string()
            } else {
                show_gen(r.extra)
            },
            if r.gen == 0 {
                "zeros or an earlier client's pattern".to_string()
            } else {
                show_gen(r.gen)
            },
            client::bad_read_text(r.aux)
        ),
        _ => format!("{r:?}"),
    }
}

/// The last lines of a log, for a failure message.
fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    let t = v[v.len().saturating_sub(10)..].join("\n    ");
    if t.is_empty() {
        "(its log is empty)".into()
    } else {
        t
    }
}

/// The client command line for one device.
struct Spawn<'a> {
    exe: &'a Path,
    socket: &'a Path,
    journal: &'a Path,
    log: &'a Path,
    seed: u64,
    cycle: u32,
    rng: u64,
    disk: u64,
    modern: bool,
    queues: u64,
    refuse: u64,
    long_lived: bool,
}

fn spawn(s: &Spawn) -> Result<Child> {
    let mut c = Command::new(s.exe);
    c.arg("soak-client")
        .arg("--socket")
        .arg(s.socket)
        .arg("--journal")
        .arg(s.journal)
        .args(["--seed", &s.seed.to_string()])
        .args(["--cycle", &s.cycle.to_string()])
        .args(["--rng", &s.rng.to_string()])
        .args(["--disk-size", &s.disk.to_string()])
        .args(["--interface", if s.modern { "modern" } else { "legacy" }])
        .args(["--queues", &s.queues.to_string()])
        .args(["--refuse", &s.refuse.to_string()])
        .stdout(Stdio::null())
        .stderr(File::create(s.log)?);
    if s.long_lived {
        c.arg("--until-stdin-closes")
            .args(["--max-seconds", "86400"])
            .stdin(Stdio::piped());
    } else {
        c.stdin(Stdio::null());
    }
    c.spawn().context("spawning soak-client")
}

#[derive(Default)]
struct Totals {
    kills_startup: u64,
    kills_attach: u64,
    kills_io: u64,
    teardown_max: Duration,
    teardown_max_cycle: u64,
    fds_min: usize,
    fds_max: usize,
    threads_min: u64,
    threads_max: u64,
    uring_max: u64,
    /// How long each completed attach took (journal Attach to Ready).
    attach_ns: Vec<u64>,
    rss: Vec<RssSample>,
    /// Live upgrades of the server (`--upgrade-every`).
    upgrades: u64,
}

/// Cycles that lost data (with `--keep-going`).
#[derive(Default)]
struct Loss {
    cycles: u64,
    sectors: u64,
    read_bad_cycles: u64,
    /// Cycles where a torn-down client's write landed after the teardown.
    late_cycles: u64,
    first: Option<String>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn run(a: &SoakArgs) -> Result<bool> {
    let devs = a
        .devices
        .iter()
        .map(|d| parse_device(d))
        .collect::<Result<Vec<_>>>()?;
    if devs.len() > 2 {
        bail!("--device: one or two devices");
    }
    let seed = a
        .seed
        .unwrap_or_else(|| journal::now_ns() ^ u64::from(std::process::id()));
    let exe = std::env::current_exe()?;
    let mut rpc = Rpc {
        path: a.rpc_socket.clone(),
        conn: None,
        id: 0,
    };
    let pid = a.server_pid;
    let info = rpc.device(&devs[0].name)?;
    let disk = info["size"].as_u64().context("device_list: no size")?;
    let dev_queues = info["queues"].as_u64().unwrap_or(1).clamp(1, 4);
    if disk < 1 << 20 {
        bail!("the disk is {disk} bytes: give it at least 1 MiB");
    }
    println!(
        "soak: seed {seed}, {} cycles, {} device(s), disk {} MiB, up to {dev_queues} queues, server pid {pid}",
        a.cycles,
        devs.len(),
        disk >> 20
    );
    let mut rng = Rng::new(seed);
    let mut model = Model::new(seed, disk);
    let mut image = vec![0u8; usize::try_from(disk)?];
    let journal_path = a.workdir.join(format!("{}-journal.bin", devs[0].name));
    let log_path = a.workdir.join(format!("{}-client.log", devs[0].name));

    // The neighbour: the second device's client, all along. Its sectors
    // have their own patterns: one of the first device's found there
    // (or the other way round) is no valid sector.
    let neighbour_seed = pattern::mix(seed ^ 0xd1d1);
    let mut neighbour = match devs.get(1) {
        Some(d) => {
            let info = rpc.device(&d.name)?;
            let size = info["size"].as_u64().context("device_list: no size")?;
            let journal = a.workdir.join(format!("{}-journal.bin", d.name));
            let log = a.workdir.join(format!("{}-client.log", d.name));
            let _ = std::fs::remove_file(&journal);
            let modern = rng.next_u64() % 2 == 1;
            let mut child = spawn(&Spawn {
                exe: &exe,
                socket: &d.socket,
                journal: &journal,
                log: &log,
                seed: neighbour_seed,
                cycle: u32::MAX,
                rng: pattern::mix(seed ^ 0xd1),
                disk: size,
                modern,
                queues: info["queues"].as_u64().unwrap_or(1).clamp(1, 4),
                refuse: 0,
                long_lived: true,
            })?;
            let stdin = child.stdin.take();
            let interface = if modern { "modern" } else { "legacy" };
            // Wait for its first acknowledged write.
            let t = Instant::now();
            while !journal::read_all_lenient(&journal)?
                .iter()
                .any(|r| r.kind == Kind::Ack)
            {
                if let Some(st) = child.try_wait()? {
                    bail!("the long-lived client exited ({st}): {}", tail(&log));
                }
                if t.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "the long-lived client wrote nothing in 10 s: {}",
                        tail(&log)
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Some(Neighbour {
                dev: Device {
                    name: d.name.clone(),
                    socket: d.socket.clone(),
                    image: d.image.clone(),
                },
                child,
                stdin,
                reader: Reader::open(&journal)?,
                journal,
                log,
                model: Model::new(neighbour_seed, size),
                last_ack_ns: 0,
                max_gap_ns: 0,
                max_gap_cycle: 0,
                window_acks_min: u64::MAX,
                window_acks_min_cycle: 0,
                interface,
            })
        }
        None => None,
    };
    if let Some(n) = neighbour.as_mut() {
        if let Err(why) = n.poll(false, 0)? {
            bail!("{}: {why}", n.dev.name);
        }
    }

    rpc.wait_detached(&devs[0].name, Duration::from_secs(30))?;
    let base_fds = fds_of(pid)?;
    status_of(pid)?;
    let (base_threads, _, reactors) = threads_of(pid)?;
    let thread_limit = base_threads + a.io_threads;
    // io_uring's workers for buffered file I/O: the kernel keeps at most
    // 4 per online CPU for each submitting thread (a reactor).
    let cpus = u64::try_from(std::thread::available_parallelism().map_or(1, |n| n.get()))?;
    let uring_limit = 4 * cpus * reactors.max(1);
    println!(
        "soak: baseline: {} fds, {base_threads} threads (limit {thread_limit}; io_uring workers: limit {uring_limit})",
        base_fds.len()
    );
    let mut t = Totals {
        fds_min: usize::MAX,
        threads_min: u64::MAX,
        ..Totals::default()
    };
    let start = Instant::now();
    let mut failure: Option<String> = None;
    let mut loss = Loss::default();
    let stall_ns = a.stall_ms.saturating_mul(1_000_000);
    let mut window_start = Instant::now();
    let mut last_verified = 0u64;
    let mut cycles_done = 0;

    for cycle in 1..=a.cycles {
        let cyc = u32::try_from(cycle).context("too many cycles")?;
        let modern = rng.next_u64() % 2 == 1;
        let queues = 1 + rng.next_u64() % dev_queues;
        // Refuse EVENT_IDX and/or INDIRECT_DESC now and then.
        let refuse = [
            virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
            virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
        ]
        .iter()
        .filter(|_| rng.next_u64().is_multiple_of(4))
        .fold(0u64, |m, b| m | 1 << b);
        let delay = if rng.next_u64() % 100 < a.early_percent {
            Duration::from_micros(rng.next_u64() % (a.early_ms * 1000).max(1))
        } else {
            let lo = a.early_ms.min(a.max_delay_ms) * 1000;
            let span = (a.max_delay_ms * 1000).saturating_sub(lo).max(1);
            Duration::from_micros(lo + rng.next_u64() % span)
        };
        let _ = std::fs::remove_file(&journal_path);
        let mut child = spawn(&Spawn {
            exe: &exe,
            socket: &devs[0].socket,
            journal: &journal_path,
            log: &log_path,
            seed,
            cycle: cyc,
            rng: pattern::mix(seed ^ cycle),
            disk,
            modern,
            queues,
            refuse,
            long_lived: false,
        })?;
        if a.upgrade_every > 0 && cycle.is_multiple_of(a.upgrade_every) {
            std::thread::sleep(delay / 2);
            let r = rpc.call("target_upgrade");
            if let Err(e) = r
                .as_ref()
                .map(|v| v["pause_ms"].as_f64().context("no pause_ms"))
            {
                failure.get_or_insert(format!("cycle {cycle}: upgrade: {e:#}"));
            }
            t.upgrades += 1;
            std::thread::sleep(delay / 2);
        } else {
            std::thread::sleep(delay);
        }
        let exited = child.try_wait()?;
        let _ = child.kill();
        let st = child.wait()?;
        // Its journal still goes into the model, whatever happened.
        let exit_failure = (exited.is_some() || st.signal() != Some(libc::SIGKILL)).then(|| {
            format!(
                "cycle {cycle}: the client exited by itself ({st}) before its kill: {}",
                tail(&log_path)
            )
        });
        let teardown = rpc.wait_detached(&devs[0].name, Duration::from_secs(30));
        let teardown = match teardown {
            Ok(d) => d,
            Err(e) => {
                failure.get_or_insert(format!("cycle {cycle}: {e:#}"));
                break;
            }
        };
        if teardown > t.teardown_max {
            t.teardown_max = teardown;
            t.teardown_max_cycle = cycle;
        }
        let recs = journal::read_all(&journal_path)?;
        let at = |k: Kind| recs.iter().find(|r| r.kind == k).map(|r| r.t_ns);
        if let (Some(a0), Some(a1)) = (at(Kind::Attach), at(Kind::Ready)) {
            t.attach_ns.push(a1.saturating_sub(a0));
        }
        if !recs.iter().any(|r| r.kind == Kind::Attach) {
            t.kills_startup += 1;
        } else if !recs.iter().any(|r| r.kind == Kind::Ready) {
            t.kills_attach += 1;
        } else {
            t.kills_io += 1;
        }
        let mut read_bad = false;
        for r in &recs {
            model.apply(r).with_context(|| format!("cycle {cycle}"))?;
            if matches!(
                r.kind,
                Kind::Error | Kind::FlushError | Kind::ReadError | Kind::ReadBad
            ) {
                let msg = format!(
                    "cycle {cycle}: the client reports: {}",
                    describe_bad_record(r)
                );
                if r.kind == Kind::ReadBad && a.keep_going {
                    println!("soak: {msg}");
                    read_bad = true;
                    loss.read_bad_cycles += 1;
                    loss.first.get_or_insert(msg);
                } else {
                    failure.get_or_insert(msg);
                }
            }
        }
        // A client that stopped on a bad read (exit 3) is counted above.
        if let Some(f) = exit_failure.filter(|_| !read_bad) {
            failure.get_or_insert(f);
        }
        let verify_now = cycle % a.verify_every == 0 || cycle == a.cycles;
        if verify_now {
            read_image(&devs[0].image, &mut image)?;
        }
        let bad = if verify_now {
            model.verify(&image)
        } else {
            Vec::new()
        };
        if !bad.is_empty() {
            // Sectors that passed the last verification and changed since
            // with no write of this cycle's client submitted to them: a
            // write of an earlier, torn-down client landed after that.
            let late = bad
                .iter()
                .filter(|b| {
                    last_verified > 0
                        && !b.maybe.is_empty()
                        && b.maybe.iter().all(|g| g >> 32 <= last_verified)
                })
                .count();
            let late = if late > 0 {
                format!(
                    "  {late} of them passed the verification after cycle {last_verified} (its client torn down, as device_list said) and have changed since, though no later write was submitted to them: a torn-down client's write landed late\n"
                )
            } else {
                String::new()
            };
            let msg = format!(
                "cycle {cycle} ({}, {queues} queue(s), killed after {:.1} ms): {} sector(s) of {} hold what they must not:\n{late}{}",
                if modern { "modern" } else { "legacy" },
                delay.as_secs_f64() * 1e3,
                bad.len(),
                devs[0].name,
                model.report(&bad, if a.keep_going { 4 } else { 20 })
            );
            if a.keep_going {
                print!("soak: {msg}");
                loss.cycles += 1;
                loss.late_cycles += u64::from(!late.is_empty());
                loss.sectors += bad.len() as u64;
                loss.first.get_or_insert(msg);
                model.accept(&bad);
            } else {
                failure = Some(msg);
            }
        }
        if verify_now {
            last_verified = cycle;
        }
        model.compact();
        // Resources once the client is gone: descriptors back to the
        // baseline (a connection the server accepts late may hold one for
        // a moment), threads within the pool's bound.
        let mut fds = fds_of(pid)?;
        let settle = Instant::now();
        while fds.len() > base_fds.len() && settle.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
            rpc.wait_detached(&devs[0].name, Duration::from_secs(30))?;
            fds = fds_of(pid)?;
        }
        let (_, rss, anon) = status_of(pid)?;
        // Threads too may take a moment to go: the connection thread of
        // a management request just answered (wait_detached's), the
        // client's own as its socket closes.
        let (mut threads, mut uring, _) = threads_of(pid)?;
        let settle = Instant::now();
        while threads > thread_limit && settle.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
            (threads, uring, _) = threads_of(pid)?;
        }
        t.fds_min = t.fds_min.min(fds.len());
        t.fds_max = t.fds_max.max(fds.len());
        t.threads_min = t.threads_min.min(threads);
        t.threads_max = t.threads_max.max(threads);
        t.uring_max = t.uring_max.max(uring);
        t.rss.push((cycle, rss, anon));
        if fds.len() > base_fds.len() {
            failure.get_or_insert(format!(
                "cycle {cycle}: the server holds {} descriptors after the teardown, {} at the start; the extra ones: {:?}",
                fds.len(),
                base_fds.len(),
                extra(&base_fds, &fds)
            ));
        }
        if threads > thread_limit {
            failure.get_or_insert(format!(
                "cycle {cycle}: the server has {threads} threads, more than the baseline {base_threads} + --io-threads {}",
                a.io_threads
            ));
        }
        if uring > uring_limit {
            failure.get_or_insert(format!(
                "cycle {cycle}: the server has {uring} io_uring workers, more than 4 per CPU per reactor ({uring_limit})"
            ));
        }
        if let Some(n) = neighbour.as_mut() {
            let window = window_start.elapsed();
            let mut polled = n.poll(false, cycle)?;
            // None yet (a short cycle on a busy machine): the window
            // stretches until an acknowledgement, or until a stall.
            while matches!(polled, Ok(0))
                && journal::now_ns().saturating_sub(n.last_ack_ns) < stall_ns
            {
                std::thread::sleep(Duration::from_millis(1));
                polled = n.poll(false, cycle)?;
            }
            n.model.compact();
            match polled {
                Ok(acks) => {
                    if acks < n.window_acks_min {
                        n.window_acks_min = acks;
                        n.window_acks_min_cycle = cycle;
                    }
                    if acks == 0 {
                        failure.get_or_insert(format!(
                            "cycle {cycle}: the long-lived client on {} acknowledged no write during the cycle ({:.1} ms) nor in the {} ms after: stalled (by its neighbour's kill?) for {:.1} ms",
                            n.dev.name,
                            window.as_secs_f64() * 1e3,
                            a.stall_ms,
                            journal::now_ns().saturating_sub(n.last_ack_ns) as f64 / 1e6
                        ));
                    } else if n.max_gap_cycle == cycle && n.max_gap_ns > stall_ns {
                        failure.get_or_insert(format!(
                            "cycle {cycle}: the long-lived client on {} went {:.1} ms without an acknowledged write (limit {} ms; this cycle's teardown took {:.1} ms)",
                            n.dev.name,
                            n.max_gap_ns as f64 / 1e6,
                            a.stall_ms,
                            teardown.as_secs_f64() * 1e3
                        ));
                    }
                }
                Err(why) => {
                    failure.get_or_insert(format!("cycle {cycle}: {}: {why}", n.dev.name));
                }
            }
        }
        window_start = Instant::now();
        cycles_done = cycle;
        let every = (a.cycles / 10).clamp(1, 50);
        if cycle % every == 0 || failure.is_some() {
            let s = &model.stats;
            println!(
                "soak: cycle {cycle}/{}: {:.1} s, writes {} submitted / {} acknowledged, kill after {:.1} ms, teardown {:.1} ms, fds {}, threads {threads} + {uring} io_uring workers, RSS {:.1} MiB",
                a.cycles,
                start.elapsed().as_secs_f64(),
                s.submitted,
                s.acked,
                delay.as_secs_f64() * 1e3,
                teardown.as_secs_f64() * 1e3,
                fds.len(),
                mib(rss)
            );
        }
        if failure.is_some() {
            break;
        }
    }

    // The neighbour stops gracefully, then its image is checked.
    let mut neighbour_line = String::new();
    if let Some(mut n) = neighbour.take() {
        drop(n.stdin.take());
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = n.child.try_wait()? {
                break Some(st);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match st {
            Some(st) if st.success() => {}
            Some(st) => {
                failure.get_or_insert(format!(
                    "the long-lived client on {} ended with {st}: {}",
                    n.dev.name,
                    tail(&n.log)
                ));
            }
            None => {
                failure.get_or_insert(format!(
                    "the long-lived client on {} did not stop in 30 s",
                    n.dev.name
                ));
            }
        }
        match n.poll(true, cycles_done) {
            Ok(Ok(_)) => {}
            Ok(Err(why)) => {
                failure.get_or_insert(format!("{}: {why}", n.dev.name));
            }
            Err(e) => {
                failure.get_or_insert(format!("{}: {e:#}", n.dev.name));
            }
        }
        let ended = journal::read_all(&n.journal)
            .map(|v| v.iter().any(|r| r.kind == Kind::Exit))
            .unwrap_or(false);
        if !ended && failure.is_none() {
            failure = Some(format!(
                "the long-lived client on {} did not journal its end",
                n.dev.name
            ));
        }
        rpc.wait_detached(&n.dev.name, Duration::from_secs(30))?;
        let mut img = vec![0u8; usize::try_from(n.model.sectors)? * pattern::SECTOR];
        read_image(&n.dev.image, &mut img)?;
        let bad = n.model.verify(&img);
        let verdict = if bad.is_empty() {
            "every sector as the model allows".to_string()
        } else {
            format!("{} sector(s) bad", bad.len())
        };
        if !bad.is_empty() {
            failure.get_or_insert(format!(
                "the end: {} sector(s) of {} (the long-lived client's) hold what they must not:\n{}",
                bad.len(),
                n.dev.name,
                n.model.report(&bad, 20)
            ));
        }
        let s = &n.model.stats;
        neighbour_line = format!(
            "  {} (long-lived client, {}): writes {} submitted / {} acknowledged ({:.1} MiB), {} flushes, {} reads verified; fewest writes acknowledged in a cycle: {} (cycle {}); longest gap between acknowledgements {:.1} ms (cycle {}); its image at the end: {verdict}\n",
            n.dev.name,
            n.interface,
            s.submitted,
            s.acked,
            s.bytes_acked as f64 / (1 << 20) as f64,
            s.flushes_acked,
            s.reads_ok,
            if n.window_acks_min == u64::MAX { 0 } else { n.window_acks_min },
            n.window_acks_min_cycle,
            n.max_gap_ns as f64 / 1e6,
            n.max_gap_cycle
        );
    }

    if loss.cycles + loss.read_bad_cycles > 0 {
        failure.get_or_insert(format!(
            "data lost in {} of {cycles_done} cycles ({} sectors found bad in the image; in {} of these cycles a torn-down client's write landed after its teardown and the image's verification; a client's read found bad data in {} cycles); the first:\n{}",
            loss.cycles,
            loss.sectors,
            loss.late_cycles,
            loss.read_bad_cycles,
            loss.first.as_deref().unwrap_or("")
        ));
    }
    if failure.is_none() {
        if let Some((early, late)) = rss_floors(&t.rss) {
            let grown = late.1.saturating_sub(early.1);
            if grown > a.rss_slack_mib * 1024 {
                failure = Some(format!(
                    "the server's RSS floor grew by {:.1} MiB, from {:.1} MiB (cycle {}) to {:.1} MiB (cycle {}) (limit {} MiB)",
                    mib(grown),
                    mib(early.1),
                    early.0,
                    mib(late.1),
                    late.0,
                    a.rss_slack_mib
                ));
            }
        }
    }

    let wall = start.elapsed().as_secs_f64();
    let s = &model.stats;
    let mut out = String::new();
    out.push_str(&format!(
        "soak summary (seed {seed}):\n  cycles {cycles_done} of {} in {wall:.1} s ({:.0} ms per cycle; 1,000 cycles would take {:.1} min)\n",
        a.cycles,
        wall * 1e3 / cycles_done.max(1) as f64,
        wall / cycles_done.max(1) as f64 * 1000.0 / 60.0
    ));
    out.push_str(&format!(
        "  {}: writes {} submitted / {} acknowledged ({:.1} MiB acknowledged), {} errors, flushes {} / {}, {} reads verified ({:.1} MiB)\n",
        devs[0].name,
        s.submitted,
        s.acked,
        s.bytes_acked as f64 / (1 << 20) as f64,
        s.errors,
        s.flushes_submitted,
        s.flushes_acked,
        s.reads_ok,
        s.read_bytes as f64 / (1 << 20) as f64
    ));
    t.attach_ns.sort_unstable();
    let attach_ms = |q: usize| {
        t.attach_ns
            .get(q * t.attach_ns.len().saturating_sub(1) / 100)
            .map_or(0.0, |v| *v as f64 / 1e6)
    };
    out.push_str(&format!(
        "  kills: {} during start-up, {} during attach/initialisation, {} during I/O (an attach took {:.1} ms median, {:.1} ms at most); slowest teardown {:.1} ms (cycle {})\n",
        t.kills_startup,
        t.kills_attach,
        t.kills_io,
        attach_ms(50),
        attach_ms(100),
        t.teardown_max.as_secs_f64() * 1e3,
        t.teardown_max_cycle
    ));
    out.push_str(&neighbour_line);
    if t.upgrades > 0 {
        out.push_str(&format!(
            "  live upgrades of the server during a client's I/O: {}\n",
            t.upgrades
        ));
    }
    if cycles_done > 0 {
        out.push_str(&format!(
            "  server fds: baseline {}, min {} max {} after teardown; threads: baseline {base_threads}, min {} max {} (limit {thread_limit}), and up to {} io_uring workers (limit {uring_limit})\n",
            base_fds.len(),
            t.fds_min,
            t.fds_max,
            t.threads_min,
            t.threads_max,
            t.uring_max
        ));
        if let Some(((ec, er, ea), (lc, lr, la))) = rss_floors(&t.rss) {
            let hi = t.rss.iter().map(|s| s.1).max().unwrap_or(0);
            out.push_str(&format!(
                "  server RSS floor: {:.1} MiB at cycle {ec} (anon {:.1}), {:.1} MiB at cycle {lc} (anon {:.1}); highest {:.1} MiB\n",
                mib(er),
                mib(ea),
                mib(lr),
                mib(la),
                mib(hi)
            ));
        }
    }
    match &failure {
        None => out.push_str("soak: PASS\n"),
        Some(f) => out.push_str(&format!(
            "soak: FAIL: {f}\n  (the same choices again: --seed {seed})\n"
        )),
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
    Ok(failure.is_none())
}

#[cfg(test)]
mod tests {
    use super::rss_floors;

    const MIB: u64 = 1024;

    /// The upgrade soak's samples of a failed CI run (every third cycle
    /// shown, the ones between filled with the shown value): no trend,
    /// 4.0 MiB between cycle 15 and cycle 30. The floors stay level.
    #[test]
    fn noise_without_a_trend_keeps_the_floor() {
        // In tenths of a MiB.
        let shown = [168, 150, 154, 144, 128, 154, 141, 115, 131, 168];
        let samples: Vec<_> = (1..=30u64)
            .map(|c| {
                let v = shown[usize::try_from((c - 1) / 3).unwrap()];
                let kib = v * MIB / 10;
                (c, kib, kib / 2)
            })
            .collect();
        let (early, late) = rss_floors(&samples).unwrap();
        assert!(late.1 <= early.1 + MIB, "{early:?} {late:?}");
    }

    /// A leak of 512 KiB a cycle under 5 MiB of noise raises the floor by
    /// more than the soak's default slack over 40 cycles.
    #[test]
    fn a_leak_raises_the_floor() {
        let noise = [0u64, 5, 2, 4, 1, 3];
        let samples: Vec<_> = (1..=40u64)
            .map(|c| {
                let kib = 12 * MIB + c * MIB / 2 + noise[usize::try_from(c % 6).unwrap()] * MIB;
                (c, kib, kib / 2)
            })
            .collect();
        let (early, late) = rss_floors(&samples).unwrap();
        assert!(late.1 - early.1 > 4 * MIB, "{early:?} {late:?}");
        assert!((20..27).contains(&early.0), "{early:?}");
        assert!(late.0 > 33, "{late:?}");
    }

    #[test]
    fn short_runs() {
        assert!(rss_floors(&[]).is_none());
        let one = [(1, 10 * MIB, MIB)];
        assert_eq!(rss_floors(&one), Some((one[0], one[0])));
        let two = [(1, 10 * MIB, MIB), (2, 11 * MIB, MIB)];
        assert_eq!(rss_floors(&two), Some((two[0], two[1])));
    }

    /// Every length has two windows inside the samples, the late one after
    /// the early one from two samples on.
    #[test]
    fn windows_fit_every_length() {
        let samples: Vec<_> = (1..=1000u64).map(|c| (c, c, c)).collect();
        for n in 1..=samples.len() {
            let (early, late) = rss_floors(&samples[..n]).unwrap();
            assert!(late.0 <= n as u64, "{n}");
            assert!(n < 2 || early.0 < late.0, "{n}: {early:?} {late:?}");
        }
    }
}
