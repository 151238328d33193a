//! The device processes the benchmark drives: our server and QEMU's
//! qemu-storage-daemon, each serving one or more disks on their own unix
//! sockets. Every process is killed by PID when its `Server` is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process, killed by PID when dropped.
pub struct Proc {
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl Drop for Proc {
    /// Stops the server as an operator would (SIGTERM), so that it lets go
    /// of what it holds (an RBD image's exclusive lock, which the next
    /// server would otherwise wait for Ceph to break); SIGKILL after 5 s.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: a signal to our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The last non-empty line of the process's standard error, for a
    /// short reason when it refused to start.
    fn last_log_line(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    }
}

/// Device process(es) and the sockets of their disks, in order.
pub struct Server {
    pub procs: Vec<Proc>,
    pub socks: Vec<PathBuf>,
    /// Something the reader should know about how it runs (a fallback).
    pub note: Option<String>,
    /// The image files it has open (and locked).
    pub holds: Vec<PathBuf>,
}

impl Server {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.child.id()).collect()
    }

    /// Fails if a process of this server has exited (a crash during a run),
    /// keeping its log as `bench/<name>.log` and naming it.
    pub fn check_alive(&self, name: &str) -> Result<()> {
        for p in &self.procs {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", p.child.id())).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("X");
            if state == "Z" || state == "X" || stat.is_empty() {
                let kept = PathBuf::from(format!("bench/{name}-died.log"));
                let _ = std::fs::copy(&p.log, &kept);
                bail!(
                    "{} died during the run (its log: {}): {}",
                    p.what,
                    kept.display(),
                    p.last_log_line()
                );
            }
        }
        Ok(())
    }
}

fn wait_sockets(p: &mut Proc, socks: &[PathBuf]) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if socks.iter().all(|s| s.exists()) {
            std::thread::sleep(Duration::from_millis(50));
            return Ok(());
        }
        if let Some(st) = p.child.try_wait()? {
            let why = p.last_log_line();
            if why.is_empty() {
                bail!("{} exited with {st}", p.what);
            }
            bail!("{} exited with {st}: {why}", p.what);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} did not create its sockets in 20 s", p.what)
}

/// One disk of our server.
pub struct OursDisk {
    /// `--device`'s disk=: a file, `null:SIZE`, ...
    pub spec: String,
    pub direct: bool,
}

/// A value for QEMU-style `key=value,...` lists: a comma is doubled.
fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// Our server (`bin`, or the one next to the benchmark's binary) serving
/// `disks`, each with `queues` queues of `queue_size`, in one process;
/// `args` are its process-wide options (engine, reactors, poll mode...).
pub fn start_ours(
    bin: Option<&Path>,
    dir: &Path,
    disks: &[OursDisk],
    queues: usize,
    queue_size: u16,
    args: &[String],
) -> Result<Server> {
    let next_to_us = std::env::current_exe()?.with_file_name("vfio-user-blk");
    let bin = bin.unwrap_or(&next_to_us);
    if !bin.exists() {
        bail!(
            "{} not found (next to the benchmark: build both with cargo build --release \
             --workspace)",
            bin.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new(bin);
    let mut socks = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let sock = dir.join(format!("ours{i}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut spec = format!(
            "socket={},disk={},queues={queues},queue-size={queue_size}",
            escape(sock.to_str().context("socket path")?),
            escape(&d.spec)
        );
        if d.direct {
            spec.push_str(",direct=on");
        }
        cmd.args(["--device", &spec]);
        socks.push(sock);
    }
    cmd.args(args);
    if let Some(p) = crate::place::get() {
        if !args
            .iter()
            .any(|a| a == "--cpus" || a.starts_with("--cpus="))
        {
            cmd.args(["--cpus", &crate::place::list(&p.server)]);
        }
    }
    crate::place::server_command(&mut cmd)?;
    let log = dir.join("server.log");
    let child = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut p = Proc {
        child,
        what: "vfio-user-blk",
        log,
    };
    wait_sockets(&mut p, &socks)?;
    let note = std::fs::read_to_string(&p.log)
        .unwrap_or_default()
        .contains("io_uring is not available")
        .then(|| "io_uring is not available: the server fell back to its thread pool".into());
    Ok(Server {
        procs: vec![p],
        socks,
        note,
        holds: Vec::new(),
    })
}

/// Whether `p` is a block device.
fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// One disk of qemu-storage-daemon.
pub enum QsdDisk {
    File {
        path: PathBuf,
        direct: bool,
    },
    Null {
        size: u64,
    },
    /// An RBD image or an NBD export, named as our `--disk` names it
    /// (`rbd:POOL/IMAGE:conf=PATH`, `nbd+unix:///EXPORT?socket=PATH`,
    /// `nbd://HOST:PORT/EXPORT`).
    Remote(String),
}

/// QEMU's nbd driver options for an NBD URI.
fn qsd_nbd(uri: &str) -> Result<String> {
    if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
        let (export, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = query
            .strip_prefix("socket=")
            .context("nbd+unix:///EXPORT?socket=PATH")?;
        return Ok(format!(
            "driver=nbd,server.type=unix,server.path={},export={}",
            escape(path),
            escape(export)
        ));
    }
    let rest = uri.strip_prefix("nbd://").context("an NBD URI")?;
    let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
    Ok(format!(
        "driver=nbd,server.type=inet,server.host={},server.port={port},export={}",
        escape(host),
        escape(export)
    ))
}

/// QEMU's rbd driver options for an `rbd:POOL/IMAGE[:conf=PATH]` name.
fn qsd_rbd(spec: &str) -> Result<String> {
    let rest = spec.strip_prefix("rbd:").context("an rbd: name")?;
    let mut parts = rest.split(':');
    let (pool, image) = parts
        .next()
        .and_then(|p| p.split_once('/'))
        .context("rbd:POOL/IMAGE")?;
    let mut o = format!("driver=rbd,pool={},image={}", escape(pool), escape(image));
    for kv in parts {
        match kv.split_once('=') {
            Some(("conf", v)) => o.push_str(&format!(",conf={}", escape(v))),
            Some(("id", v)) => o.push_str(&format!(",user={}", escape(v))),
            _ => bail!("qemu-storage-daemon: option {kv} of {spec} is not passed on"),
        }
    }
    Ok(o)
}

/// qemu-storage-daemon exporting `disks` as vhost-user-blk, all on one
/// iothread (`poll-max-ns=poll`), files opened with `aio` (threads,
/// io_uring or native).
pub fn start_qsd(
    dir: &Path,
    disks: &[QsdDisk],
    aio: &str,
    poll: u64,
    queues: usize,
) -> Result<Server> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.args(["--object", &format!("iothread,id=iot0,poll-max-ns={poll}")]);
    let mut socks = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let sock = dir.join(format!("qsd{i}.sock"));
        let _ = std::fs::remove_file(&sock);
        let file = match d {
            QsdDisk::File { path, direct } => format!(
                "driver={},node-name=file{i},filename={},cache.direct={},aio={aio}",
                // QEMU's driver for block devices (the memory disk of the
                // direct-* workloads); `file` takes regular files only.
                if is_block_device(path) {
                    "host_device"
                } else {
                    "file"
                },
                escape(path.to_str().context("image path")?),
                if *direct { "on" } else { "off" }
            ),
            QsdDisk::Null { size } => {
                format!("driver=null-co,node-name=file{i},size={size},read-zeroes=on")
            }
            // cache=none, as ours: librbd's cache off.
            QsdDisk::Remote(spec) if spec.starts_with("rbd:") => {
                format!("{},node-name=file{i},cache.direct=on", qsd_rbd(spec)?)
            }
            QsdDisk::Remote(uri) => format!("{},node-name=file{i}", qsd_nbd(uri)?),
        };
        cmd.args(["--blockdev", &file])
            .args(["--blockdev", &format!("driver=raw,node-name=disk{i},file=file{i}")])
            .args([
                "--export",
                &format!(
                    "type=vhost-user-blk,id=exp{i},node-name=disk{i},addr.type=unix,addr.path={},writable=on,iothread=iot0,num-queues={queues}",
                    escape(sock.to_str().context("socket path")?)
                ),
            ]);
        socks.push(sock);
    }
    crate::place::server_command(&mut cmd)?;
    let log = dir.join("server.log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting qemu-storage-daemon (Debian package qemu-utils)")?;
    let mut p = Proc {
        child,
        what: "qemu-storage-daemon",
        log,
    };
    wait_sockets(&mut p, &socks)?;
    Ok(Server {
        procs: vec![p],
        socks,
        note: None,
        holds: Vec::new(),
    })
}
