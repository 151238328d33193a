//! vfio-user-blk-bench: our device side by side with QEMU's
//! qemu-storage-daemon (vhost-user-blk) and with the disk itself, measured
//! in one run with the same request stream. See `run` for how, and `guest`
//! for the synthetic guest that drives both devices.

mod guest;
mod report;
mod run;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use guest::vfio::VfioUserBlk;
use guest::vhost::VhostUserBlk;
use guest::GuestRam;
use report::{Results, Summary};
use run::{run_direct, run_virtio, Op, RunResult, Workload, RING_BASE};

/// Benchmark vfio-user-blk against qemu-storage-daemon and direct I/O.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Image file to use (created and filled if missing).
    #[arg(long, default_value = "bench/bench.img")]
    image: PathBuf,
    /// Image size.
    #[arg(long, default_value = "1G", value_parser = vfio_user_blk::util::parse_size)]
    size: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Runs per workload and target (interleaved); medians are reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the IOPS/p99 plot here (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// A short set: 4 KiB random read at QD 1 and 32 only.
    #[arg(long)]
    quick: bool,
    /// Run only the workloads whose name contains one of these words.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Targets to run (ours, qsd, direct).
    #[arg(long, value_delimiter = ',', default_value = "ours,qsd,direct")]
    targets: Vec<String>,
    /// Options for our server.
    #[arg(long, default_value = "--poll-mode busy --pollers 1 --io-threads 2")]
    ours_args: String,
    /// qemu-storage-daemon's AIO engine for the file (threads or io_uring).
    #[arg(long, default_value = "threads")]
    qsd_aio: String,
    /// qemu-storage-daemon iothread polling (poll-max-ns; 0 turns it off).
    #[arg(long, default_value_t = 32768)]
    qsd_poll_max_ns: u64,
}

const QUEUES: usize = 4;
const QUEUE_SIZE: u16 = 256;

fn workloads(quick: bool) -> Vec<Workload> {
    let w = |name: &str, op, random, bs, qd, queues, null| Workload {
        name: name.to_string(),
        op,
        random,
        bs,
        qd,
        queues,
        null,
    };
    if quick {
        return vec![
            w("4k-randread-qd1", Op::Read, true, 4096, 1, 1, false),
            w("4k-randread-qd32", Op::Read, true, 4096, 32, 1, false),
        ];
    }
    let mut v = Vec::new();
    for qd in [1, 8, 32, 128] {
        v.push(w(
            &format!("4k-randread-qd{qd}"),
            Op::Read,
            true,
            4096,
            qd,
            1,
            false,
        ));
    }
    for qd in [1, 8, 32, 128] {
        v.push(w(
            &format!("4k-randwrite-qd{qd}"),
            Op::Write,
            true,
            4096,
            qd,
            1,
            false,
        ));
    }
    v.push(w(
        "128k-seqread-qd8",
        Op::Read,
        false,
        128 << 10,
        8,
        1,
        false,
    ));
    v.push(w(
        "128k-seqwrite-qd8",
        Op::Write,
        false,
        128 << 10,
        8,
        1,
        false,
    ));
    v.push(w("4k-mix70-qd32", Op::Mix(70), true, 4096, 32, 1, false));
    v.push(w("4k-randread-qd32-4q", Op::Read, true, 4096, 32, 4, false));
    v.push(w(
        "4k-randwrite-qd32-4q",
        Op::Write,
        true,
        4096,
        32,
        4,
        false,
    ));
    v.push(w(
        "null-4k-randread-qd128",
        Op::Read,
        true,
        4096,
        128,
        1,
        true,
    ));
    v
}

/// A child process, killed by PID when dropped.
struct Proc {
    child: Child,
    what: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_socket(p: &mut Proc, sock: &Path) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if sock.exists() {
            std::thread::sleep(Duration::from_millis(50));
            return Ok(());
        }
        if let Some(st) = p.child.try_wait()? {
            bail!("{} exited with {st}", p.what);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} did not create {}", p.what, sock.display())
}

fn start_ours(dir: &Path, disk: &str, extra: &str) -> Result<(Proc, PathBuf)> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("vfio-user-blk");
    if !bin.exists() {
        bail!(
            "{} not found next to the benchmark: build both (cargo build --release --workspace)",
            bin.display()
        );
    }
    let sock = dir.join(format!("ours-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(&bin)
        .args(["--socket", sock.to_str().context("path")?, "--disk", disk])
        .args([
            "--queues",
            &QUEUES.to_string(),
            "--queue-size",
            &QUEUE_SIZE.to_string(),
        ])
        .args(extra.split_whitespace())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("ours.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut p = Proc {
        child,
        what: "vfio-user-blk",
    };
    wait_socket(&mut p, &sock)?;
    Ok((p, sock))
}

fn start_qsd(
    dir: &Path,
    image: Option<&Path>,
    size: u64,
    aio: &str,
    poll: u64,
) -> Result<(Proc, PathBuf)> {
    let sock = dir.join(format!("qsd-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let blockdev = match image {
        Some(img) => format!(
            "driver=file,node-name=file0,filename={},cache.direct=off,aio={aio}",
            img.display()
        ),
        None => format!("driver=null-co,node-name=file0,size={size},read-zeroes=on"),
    };
    let child = Command::new("qemu-storage-daemon")
        .args(["--blockdev", &blockdev])
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .args(["--object", &format!("iothread,id=iot0,poll-max-ns={poll}")])
        .args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,iothread=iot0,num-queues={QUEUES}",
                sock.display()
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qsd.log"))?)
        .spawn()
        .context("starting qemu-storage-daemon (Debian package qemu-utils)")?;
    let mut p = Proc {
        child,
        what: "qemu-storage-daemon",
    };
    wait_socket(&mut p, &sock)?;
    Ok((p, sock))
}

fn prepare_image(path: &Path, size: u64) -> Result<()> {
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
        let chunk: Vec<u8> = (0..(1usize << 20))
            .map(|i| (i * 31 + 7).to_le_bytes()[0])
            .collect();
        for _ in 0..size >> 20 {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    // Warm the page cache so that every target reads from memory.
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
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
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb >> 20)
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {}", kernel.trim())
}

fn run_ours(sock: &Path, pid: u32, w: &Workload, size: u64, secs: Duration) -> Result<RunResult> {
    let ram = GuestRam::new(64 << 20)?;
    let mut dev = VfioUserBlk::connect(sock, &ram)?;
    let mut rings = dev.setup(&ram, w.queues, RING_BASE, 0)?;
    let r = run_virtio(&mut dev, &ram, &mut rings, w, size, secs, &[pid]);
    let _ = dev.client.shutdown();
    r
}

fn run_qsd(sock: &Path, pid: u32, w: &Workload, size: u64, secs: Duration) -> Result<RunResult> {
    let ram = GuestRam::new(64 << 20)?;
    let (mut dev, mut rings) =
        VhostUserBlk::connect(sock, &ram, w.queues, QUEUE_SIZE, RING_BASE, 0)?;
    run_virtio(&mut dev, &ram, &mut rings, w, size, secs, &[pid])
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
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
    let secs = Duration::from_secs_f64(args.seconds);
    let want = |t: &str| args.targets.iter().any(|x| x == t);
    prepare_image(&args.image, args.size)?;
    let image = args.image.canonicalize()?;
    let dir = std::env::temp_dir().join(format!("vub-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());

    let img = image.to_str().context("image path")?;
    let null = format!("null:{}", args.size);
    for sub in ["f", "n", "qf", "qn"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let none = || (None, PathBuf::new());
    let (ours_file, ours_file_sock) = match want("ours") {
        true => start_ours(&dir.join("f"), img, &args.ours_args).map(|(p, s)| (Some(p), s))?,
        false => none(),
    };
    let (ours_null, ours_null_sock) = match want("ours") {
        true => start_ours(&dir.join("n"), &null, &args.ours_args).map(|(p, s)| (Some(p), s))?,
        false => none(),
    };
    let (qsd_file, qsd_file_sock) = match want("qsd") {
        true => start_qsd(
            &dir.join("qf"),
            Some(&image),
            args.size,
            &args.qsd_aio,
            args.qsd_poll_max_ns,
        )
        .map(|(p, s)| (Some(p), s))?,
        false => none(),
    };
    let (qsd_null, qsd_null_sock) = match want("qsd") {
        true => start_qsd(
            &dir.join("qn"),
            None,
            args.size,
            &args.qsd_aio,
            args.qsd_poll_max_ns,
        )
        .map(|(p, s)| (Some(p), s))?,
        false => none(),
    };

    let list: Vec<Workload> = workloads(args.quick)
        .into_iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|o| w.name.contains(o.as_str())))
        .collect();
    if list.is_empty() {
        bail!("no workload matches --only {:?}", args.only);
    }
    let total: usize = list
        .iter()
        .map(|w| {
            args.repeat
                * report::TARGETS
                    .iter()
                    .filter(|t| want(t) && !(w.null && **t == "direct"))
                    .count()
        })
        .sum();
    let mut done = 0;
    let mut results: Results = BTreeMap::new();
    for (i, w) in list.iter().enumerate() {
        let mut runs: BTreeMap<&'static str, Vec<RunResult>> = BTreeMap::new();
        for _ in 0..args.repeat {
            // Interleaved, so that drift on a noisy machine hits all alike.
            for t in report::TARGETS {
                if !want(t) || (w.null && t == "direct") {
                    continue;
                }
                done += 1;
                eprint!("\r\x1b[2K[{done}/{total}] {} {t} ...", w.name);
                let _ = std::io::stderr().flush();
                let r = match t {
                    "ours" => {
                        let (p, s) = if w.null {
                            (&ours_null, &ours_null_sock)
                        } else {
                            (&ours_file, &ours_file_sock)
                        };
                        let pid = p.as_ref().map(|p| p.child.id()).unwrap_or(0);
                        run_ours(s, pid, w, args.size, secs)
                    }
                    "qsd" => {
                        let (p, s) = if w.null {
                            (&qsd_null, &qsd_null_sock)
                        } else {
                            (&qsd_file, &qsd_file_sock)
                        };
                        let pid = p.as_ref().map(|p| p.child.id()).unwrap_or(0);
                        run_qsd(s, pid, w, args.size, secs)
                    }
                    _ => run_direct(&image, w, args.size, secs),
                }
                .with_context(|| format!("{} on {t}", w.name))?;
                runs.entry(t).or_default().push(r);
            }
        }
        let per: BTreeMap<&'static str, Summary> = runs
            .iter()
            .map(|(t, v)| (*t, report::summarize(v)))
            .collect();
        results.insert(i, (w.clone(), per));
    }
    eprintln!("\r\x1b[2Kdone: {total} runs");
    let m = machine();
    println!("machine: {m}");
    println!("{} s per run, {} run(s) per cell (medians); CPU s/M = CPU seconds per million requests (device + driver)", args.seconds, args.repeat);
    print!("{}", report::table(&results));
    if let Some(p) = &args.json {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(
            p,
            serde_json::to_string_pretty(&report::to_json(
                &results,
                &m,
                args.repeat,
                args.seconds,
            ))?,
        )?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.svg {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        report::plot(&results, p)?;
        eprintln!("wrote {}", p.display());
    }
    drop((ours_file, ours_null, qsd_file, qsd_null));
    Ok(())
}
