//! Command-line options and the wiring of the layers into one device.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use log::info;
use vm_memory::GuestMemoryMmap;

use crate::backend::{self, DiskSpec, OpenOptionsDisk};
use crate::blk::exec::ErrorPolicy;
use crate::blk::{BlkDevice, BlkOptions, BlkShared};
use crate::engine::{Engine, EngineConfig, IoEngine, PollMode};
use crate::pci::{self, Identity, Interrupts, PciFunction};
use crate::util::parse_size;
use crate::vfio_user::{GuestMemoryHandle, Server, ServerConfig};
use crate::virtio::transport::{NotifyMode, PciTransport};

/// Serve virtio-blk disks as PCI devices over vfio-user.
///
/// One process serves any number of disks, each on its own socket, with a
/// fixed set of reactor threads polling the queues of all of them. QEMU 10.1+
/// attaches each with
/// `-device '{"driver":"vfio-user-pci","socket":{"path":"SOCKET","type":"unix"}}'`
/// and needs guest RAM that can be shared
/// (`-object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem`).
///
/// One disk: `--socket PATH --disk SPEC` with the per-disk options below.
/// More: `--device socket=PATH,disk=SPEC[,size=SIZE,readonly=on,queues=N,
/// queue-size=N,serial=S,logical-block-size=N,direct=on,discard=off,
/// write-zeroes=off,packed=on]`, repeatable (a comma inside a value is
/// written `,,`).
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true)]
pub struct Options {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Management socket (JSON-RPC 2.0, one object per line; owner-only):
    /// add, remove, list, resize devices and read statistics while the
    /// target runs. With it, the target may start with no disk at all.
    #[arg(long, value_name = "PATH")]
    pub rpc_socket: Option<PathBuf>,

    /// Serve statistics as Prometheus text on http://ADDR:PORT/metrics
    /// (loopback unless you say otherwise, e.g. 127.0.0.1:9135).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,

    /// Log level: error, warn, info, debug or trace (RUST_LOG, when set,
    /// takes precedence and allows per-module filters).
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
    /// Path of the unix socket to listen on (created with owner-only
    /// permissions), for the one-disk form.
    #[arg(long, value_name = "PATH", requires = "disk")]
    pub socket: Option<PathBuf>,

    /// The disk of the one-disk form: an image file or block device,
    /// `ram:SIZE` (in memory, zero-filled) or `null:SIZE` (reads zeros,
    /// discards writes). SIZE takes K, M, G, T suffixes (binary).
    #[arg(long, value_name = "FILE|ram:SIZE|null:SIZE", requires = "socket")]
    pub disk: Option<DiskSpec>,

    /// A disk on its own socket, QEMU-style `key=value,...` (see above);
    /// repeatable.
    #[arg(long = "device", value_name = "socket=PATH,disk=SPEC,...")]
    pub devices: Vec<DeviceSpec>,

    /// Create the image file with this size if it does not exist.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Replace a stale socket file left by an earlier run.
    #[arg(long)]
    pub force: bool,

    /// Present the disk read-only (VIRTIO_BLK_F_RO) and refuse writes.
    #[arg(long)]
    pub readonly: bool,

    /// Number of request queues (virtio-blk multiqueue).
    #[arg(long, default_value_t = 1, value_parser = parse_queues)]
    pub queues: u16,

    /// Entries per queue (a power of two, at most 1024).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number reported to the guest (GET_ID; at most 20 bytes).
    /// (default: `vub-` and a hash of the socket path, so that two disks
    /// never share a /dev/disk/by-id name)
    #[arg(long, value_parser = parse_serial)]
    pub serial: Option<String>,

    /// Logical block size in bytes reported to the guest (512 or 4096);
    /// requests must be aligned to it.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// Open the image with O_DIRECT (bypass the host page cache). Guest
    /// buffers that are not aligned go through a bounce buffer.
    #[arg(long)]
    pub direct: bool,

    /// Do not offer DISCARD.
    #[arg(long)]
    pub no_discard: bool,

    /// Do not offer WRITE_ZEROES.
    #[arg(long)]
    pub no_write_zeroes: bool,

    /// Offer the packed ring layout (VIRTIO_F_RING_PACKED) on the modern
    /// interface; a driver that accepts it gets packed queues.
    #[arg(long)]
    pub packed: bool,

    /// Take no lock on the image and ignore others' (read-only disks only,
    /// as QEMU's force-share=on). Without it, a read-write image is locked
    /// exclusively and a read-only one shared, with QEMU's own locks.
    #[arg(long, requires = "readonly")]
    pub force_share: bool,

    /// Reactor (poller) threads shared by every disk's queues; queues go to
    /// the least-loaded reactor when the guest starts the device.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub pollers: u16,

    /// CPUs to pin the reactors to, e.g. `2,3` (round-robin over reactors).
    #[arg(long, value_delimiter = ',', value_name = "CPU,...")]
    pub cpus: Vec<usize>,

    /// How reactors wait: `busy` spins and tells the guest not to ring
    /// doorbells (fastest, burns a core each); `adaptive` spins while there
    /// is work, then sleeps until a doorbell; `interrupt` always waits for
    /// doorbells. A reactor with no queue sleeps in every mode.
    #[arg(long, value_enum, default_value_t = PollMode::Adaptive)]
    pub poll_mode: PollMode,

    /// How doorbells on the modern (virtio 1.x) interface arrive:
    /// `message`, writes to the notify area that QEMU posts without waiting
    /// (the guest's vCPU exits but does not wait for us); or `mmap`, a
    /// shared page QEMU maps into the guest (no exit at all) while this
    /// device's queues are polled whatever `--poll-mode` says. With `mmap`
    /// QEMU stops posting the device's other register writes. The legacy
    /// interface always takes doorbells as messages.
    #[arg(long, value_enum, default_value_t = NotifyMode::Message)]
    pub notify: NotifyMode,

    /// Where file I/O runs: `io-uring` (an io_uring per reactor; falls back
    /// to threads when io_uring is unavailable) or `threads` (a pool that
    /// grows with demand), as QEMU's aio=io_uring|threads.
    #[arg(long, value_enum, default_value_t = IoEngine::IoUring)]
    pub io_engine: IoEngine,

    /// Most threads the I/O pool grows to.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub io_threads: u16,

    /// On a backend error: `report` answers IOERR; `stop` stops the queue
    /// until the guest resets the device (like QEMU's werror=stop).
    #[arg(long, value_enum, default_value_t = ErrorPolicy::Report)]
    pub on_error: ErrorPolicy,
}

/// Subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Send one request to a running target's management socket and print
    /// the result (exit 1 with the error message on an error), e.g.
    /// `vfio-user-blk rpc --rpc-socket /run/vub.sock device_resize name=disk0 size=2G`.
    Rpc {
        #[arg(long, value_name = "PATH")]
        rpc_socket: PathBuf,
        /// device_add, device_remove, device_list, device_resize, device_stats
        method: String,
        /// Parameters as key=value (numbers and true/false are typed).
        params: Vec<String>,
    },
}

fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let s = if s.starts_with(':') {
        format!("127.0.0.1{s}")
    } else if !s.contains(':') {
        format!("127.0.0.1:{s}")
    } else {
        s.to_string()
    };
    s.to_socket_addrs()
        .map_err(|e| format!("'{s}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{s}' names no address"))
}

/// One disk and its options, from `--device` or the one-disk flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its name for the management plane and the log (default `diskN`).
    pub name: Option<String>,
    pub socket: PathBuf,
    pub disk: DiskSpec,
    pub size: Option<u64>,
    pub readonly: bool,
    pub queues: u16,
    pub queue_size: u16,
    pub serial: String,
    pub logical_block_size: u32,
    pub direct: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    /// Offer the packed ring layout.
    pub packed: bool,
    /// Take no image lock (read-only only), as QEMU's force-share=on.
    pub force_share: bool,
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<DeviceSpec, String> {
        // Split on single commas; ",," is a literal comma (as in QEMU).
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        let (mut socket, mut disk) = (None, None);
        let mut d = DeviceSpec {
            name: None,
            socket: PathBuf::new(),
            disk: DiskSpec::Null(0),
            size: None,
            readonly: false,
            queues: 1,
            queue_size: 256,
            serial: String::new(),
            logical_block_size: 512,
            direct: false,
            discard: true,
            write_zeroes: true,
            packed: false,
            force_share: false,
        };
        for item in items.iter().filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("'{item}' is not key=value"))?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "name" => d.name = Some(parse_name(v)?),
                "disk" => disk = Some(v.parse::<DiskSpec>()?),
                "size" => d.size = Some(parse_size(v)?),
                "readonly" => d.readonly = on_off(k, v)?,
                "queues" => d.queues = parse_queues(v)?,
                "queue-size" => d.queue_size = parse_queue_size(v)?,
                "serial" => d.serial = parse_serial(v)?,
                "logical-block-size" => d.logical_block_size = parse_block_size(v)?,
                "direct" => d.direct = on_off(k, v)?,
                "discard" => d.discard = on_off(k, v)?,
                "write-zeroes" => d.write_zeroes = on_off(k, v)?,
                "packed" => d.packed = on_off(k, v)?,
                "force-share" => d.force_share = on_off(k, v)?,
                _ => {
                    return Err(format!(
                        "unknown key '{k}' (keys: name, socket, disk, size, readonly, queues, \
                         queue-size, serial, logical-block-size, direct, discard, write-zeroes, \
                         packed, force-share)"
                    ))
                }
            }
        }
        d.socket = socket.ok_or("socket=PATH is missing")?;
        if d.serial.is_empty() {
            d.serial = default_serial(&d.socket);
        }
        d.disk = disk.ok_or("disk=SPEC is missing")?;
        Ok(d)
    }
}

fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "device name '{s}': 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(s.to_string())
}

impl DeviceSpec {
    /// What can be checked before anything is created: the socket path
    /// fits a unix socket address and its folder exists; force-share is
    /// for read-only disks.
    pub fn validate_against_machine(&self) -> Result<()> {
        let len = self.socket.as_os_str().len();
        if len == 0 || len > 107 {
            bail!(
                "socket path {} is {len} bytes; a unix socket path has 1 to 107",
                self.socket.display()
            );
        }
        if let Some(dir) = self.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                bail!(
                    "the folder of socket {} does not exist",
                    self.socket.display()
                );
            }
        }
        if self.force_share && !self.readonly {
            bail!(
                "force-share is for read-only disks (socket {}): add readonly=on",
                self.socket.display()
            );
        }
        let block = u64::from(self.logical_block_size);
        let size = match &self.disk {
            DiskSpec::File(_) => self.size,
            DiskSpec::Ram(s) | DiskSpec::Null(s) => Some(*s),
        };
        if let Some(s) = size {
            if s == 0 || !s.is_multiple_of(block) {
                bail!(
                    "disk size {s} must be a positive multiple of the logical block size {block}"
                );
            }
        }
        if let DiskSpec::Ram(s) = &self.disk {
            let mem = crate::util::memory_bytes();
            if *s > mem {
                bail!(
                    "a disk in memory of {s} bytes is larger than this machine's memory \
                     ({mem} bytes)"
                );
            }
        }
        if let DiskSpec::File(p) = &self.disk {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !p.exists() && !dir.is_dir() {
                    bail!("the folder of {} does not exist", p.display());
                }
            }
        }
        Ok(())
    }
}

fn parse_queues(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!("queues '{s}' must be from 1 to 64")),
    }
}

/// A serial unique to the socket path (FNV-1a of it, 16 hex digits), in
/// the 20 bytes GET_ID has.
pub fn default_serial(socket: &Path) -> String {
    let path = std::fs::canonicalize(socket.parent().unwrap_or(Path::new(".")))
        .map(|d| d.join(socket.file_name().unwrap_or_default()))
        .unwrap_or_else(|_| socket.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("vub-{h:016x}")
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("serial '{s}' is longer than 20 bytes"));
    }
    Ok(s.to_string())
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (512 | 1024 | 2048 | 4096)) => Ok(n),
        _ => Err(format!(
            "logical block size '{s}' must be 512, 1024, 2048 or 4096"
        )),
    }
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !n.is_power_of_two() || n > 1024 {
        return Err(format!(
            "queue size {n} must be a power of two from 1 to 1024"
        ));
    }
    Ok(n)
}

/// Binds the listening socket: owner-only permissions, and a clear answer
/// when the path is taken.
pub fn bind_socket(path: &Path, force: bool) -> Result<UnixListener> {
    crate::util::check_path_is_ours(path, "socket").map_err(anyhow::Error::msg)?;
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match crate::util::probe_socket(path) {
            Ok(()) => bail!("{} is in use by a running server", path.display()),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                if !force {
                    bail!(
                        "{} is a stale socket from an earlier run; remove it or pass --force",
                        path.display()
                    );
                }
                info!("replacing stale socket {}", path.display());
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale socket {}", path.display()))?;
            }
            Err(e) => bail!("{} exists and cannot be probed: {e}", path.display()),
        },
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o077) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    listener.with_context(|| format!("binding {}", path.display()))
}

/// The PCI identity of a transitional virtio block device.
pub const VIRTIO_BLK_IDENTITY: Identity = Identity {
    vendor: 0x1af4,
    device: 0x1001,
    subsys_vendor: 0x1af4,
    subsys_id: 2,
    // Legacy drivers insist on ABI revision 0.
    revision: 0,
    // Mass storage, SCSI subclass, as QEMU's virtio-blk-pci reports.
    class: [0x01, 0x00, 0x00],
};

pub type BlkFunction = PciFunction<PciTransport<BlkDevice>>;

impl Options {
    /// Checks what the parser cannot, against this machine, before anything
    /// is created: a bad option must not leave an image or a socket behind,
    /// nor be found only when the guest starts the device.
    pub fn validate(&self) -> Result<()> {
        let devices = self.device_specs();
        if devices.is_empty() && self.rpc_socket.is_none() {
            bail!(
                "no disk to serve: give --socket PATH --disk SPEC, --device socket=PATH,disk=SPEC, \
                 or --rpc-socket PATH to add disks later"
            );
        }
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].iter().any(|e| e.socket == d.socket) {
                bail!("socket {} is given to two disks", d.socket.display());
            }
            if devices[..i]
                .iter()
                .any(|e| e.name.is_some() && e.name == d.name)
            {
                bail!("two disks are named {:?}", d.name);
            }
            d.validate_against_machine()?;
        }
        if !self.cpus.is_empty() {
            let usable =
                crate::engine::usable_cpus().context("reading the CPUs this process may run on")?;
            for &cpu in &self.cpus {
                if !usable.contains(&cpu) {
                    bail!(
                        "--cpus: CPU {cpu} is not online or not allowed for this process \
                         (usable: {})",
                        cpu_list(&usable)
                    );
                }
            }
        }
        Ok(())
    }
}

impl Options {
    /// Every disk to serve: the one-disk form first, then each `--device`.
    pub fn device_specs(&self) -> Vec<DeviceSpec> {
        let mut v = Vec::new();
        if let (Some(socket), Some(disk)) = (&self.socket, &self.disk) {
            v.push(DeviceSpec {
                name: None,
                socket: socket.clone(),
                disk: disk.clone(),
                size: self.size,
                readonly: self.readonly,
                queues: self.queues,
                queue_size: self.queue_size,
                serial: self
                    .serial
                    .clone()
                    .unwrap_or_else(|| default_serial(socket)),
                logical_block_size: self.logical_block_size,
                direct: self.direct,
                discard: !self.no_discard,
                write_zeroes: !self.no_write_zeroes,
                packed: self.packed,
                force_share: self.force_share,
            });
        }
        v.extend(self.devices.iter().cloned());
        v
    }

    /// The engine these options ask for.
    pub fn engine_config(&self, inline: bool) -> EngineConfig {
        EngineConfig {
            reactors: usize::from(self.pollers),
            cpus: self.cpus.clone(),
            mode: self.poll_mode,
            io_engine: self.io_engine,
            max_io_threads: usize::from(self.io_threads),
            inline,
        }
    }
}

/// `0-3,6` style.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Every disk of a process, sharing one engine.
pub struct Target {
    pub engine: Arc<Engine>,
    pub devices: Vec<(DeviceSpec, Server<BlkFunction>)>,
}

/// Builds the engine and every device, after validating all options and
/// before binding any socket.
pub fn build_target(opts: &Options, inline: bool) -> Result<Target> {
    opts.validate()?;
    let engine = Engine::start(opts.engine_config(inline)).context("starting the reactors")?;
    let mut devices = Vec::new();
    for (i, spec) in opts.device_specs().into_iter().enumerate() {
        let name = spec.name.clone().unwrap_or_else(|| format!("disk{i}"));
        let (server, _) = build_device(&spec, &name, opts, &engine)?;
        devices.push((spec, server));
    }
    Ok(Target { engine, devices })
}

/// Builds the first device and its server from the options (the one-disk
/// form; tests and tools).
pub fn build(opts: &Options) -> Result<Server<BlkFunction>> {
    build_with(opts, false)
}

/// As [`build`]; with `inline`, the queues are served on the protocol
/// thread whenever the driver rings a doorbell (no reactor threads):
/// deterministic, for fuzzing.
pub fn build_with(opts: &Options, inline: bool) -> Result<Server<BlkFunction>> {
    let t = build_target(opts, inline)?;
    t.devices
        .into_iter()
        .next()
        .map(|(_, s)| s)
        .context("no device")
}

/// Opens one disk and builds its PCI function and server on `engine`.
pub fn build_device(
    spec: &DeviceSpec,
    name: &str,
    opts: &Options,
    engine: &Arc<Engine>,
) -> Result<(Server<BlkFunction>, Arc<BlkShared>)> {
    let disk = backend::open(
        &spec.disk,
        OpenOptionsDisk {
            readonly: spec.readonly,
            create_size: spec.size,
            direct: spec.direct.then_some(spec.logical_block_size as usize),
            force_share: spec.force_share,
        },
    )
    .with_context(|| format!("opening disk {}", spec.disk))?;
    device_on(spec, name, opts, engine, disk)
}

/// The first device of `opts` on a backend of the caller's (tests, and
/// anyone embedding the device): `size` bytes, served by `backend`.
pub fn build_on_backend(
    opts: &Options,
    backend: Arc<dyn crate::backend::io::Backend>,
    size: u64,
) -> Result<Server<BlkFunction>> {
    opts.validate()?;
    let spec = opts.device_specs().remove(0);
    let engine = Engine::start(opts.engine_config(false)).context("starting the reactors")?;
    let disk = backend::Disk {
        spec: spec.disk.clone(),
        size,
        readonly: spec.readonly,
        backend,
    };
    let name = spec.name.clone().unwrap_or_else(|| "disk0".into());
    device_on(&spec, &name, opts, &engine, disk).map(|(s, _)| s)
}

/// Builds one device on an opened disk; `name` is how the log and the
/// management plane call it.
pub fn device_on(
    spec: &DeviceSpec,
    name: &str,
    opts: &Options,
    engine: &Arc<Engine>,
    disk: backend::Disk,
) -> Result<(Server<BlkFunction>, Arc<BlkShared>)> {
    let log = crate::util::DeviceLog::new(name);
    if !disk.size.is_multiple_of(u64::from(spec.logical_block_size)) {
        bail!(
            "disk size {} is not a multiple of the logical block size {}",
            disk.size,
            spec.logical_block_size
        );
    }
    log::debug!(
        "{name}: disk {:?}, {} bytes{}, {} queue(s) of {}",
        disk.spec,
        disk.size,
        if disk.readonly { ", read-only" } else { "" },
        spec.queues,
        spec.queue_size
    );
    let memory = GuestMemoryHandle::new(GuestMemoryMmap::default());
    // One vector per queue plus one for configuration changes.
    let vectors = (spec.queues + 1).min(pci::MAX_MSIX_VECTORS);
    let irqs = Arc::new(Interrupts::new(vectors, log.clone()));
    let blk = BlkDevice::new(
        log.clone(),
        BlkOptions {
            capacity_bytes: disk.size,
            readonly: spec.readonly,
            num_queues: spec.queues,
            queue_size: spec.queue_size,
            logical_block_size: spec.logical_block_size,
            serial: spec.serial.clone(),
            discard: spec.discard,
            write_zeroes: spec.write_zeroes,
            packed: spec.packed,
            on_error: opts.on_error,
            in_memory: matches!(spec.disk, DiskSpec::Ram(_)),
        },
        disk.backend,
        memory.clone(),
        engine.clone(),
    );
    let shared = blk.shared();
    let transport = PciTransport::new(blk, irqs.clone(), opts.notify)
        .context("creating the shared notify page")?;
    shared.set_config_notifier(transport.config_notifier());
    let function = PciFunction::new(VIRTIO_BLK_IDENTITY, transport, irqs);
    let share = crate::vfio_user::budget::Share::register()
        .context("taking the device's share of guest-memory windows")?;
    Ok((
        Server::new(function, memory, ServerConfig::default(), share, log),
        shared,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_like_qemu() {
        let d: DeviceSpec = "socket=/tmp/a,,b.sock,disk=ram:1M,queues=2,readonly=on,name=x"
            .parse()
            .unwrap();
        assert_eq!(d.socket, PathBuf::from("/tmp/a,b.sock"));
        assert_eq!(d.disk, DiskSpec::Ram(1 << 20));
        assert_eq!((d.queues, d.readonly), (2, true));
        assert_eq!(d.name.as_deref(), Some("x"));
        assert!("disk=ram:1M".parse::<DeviceSpec>().is_err());
        assert!("socket=/s,disk=ram:1M,colour=red"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("colour"));
        assert!("socket=/s,disk=ram:1M,queues=0"
            .parse::<DeviceSpec>()
            .is_err());
        assert!("socket=/s,disk=ram:1M,readonly=maybe"
            .parse::<DeviceSpec>()
            .is_err());
    }

    /// Two disks never share a default serial (and a /dev/disk/by-id name).
    #[test]
    fn default_serials_are_unique_per_socket() {
        let a: DeviceSpec = "socket=/tmp/a.sock,disk=ram:1M".parse().unwrap();
        let b: DeviceSpec = "socket=/tmp/b.sock,disk=ram:1M".parse().unwrap();
        assert_ne!(a.serial, b.serial);
        assert!(a.serial.len() <= 20 && a.serial.starts_with("vub-"));
        let again: DeviceSpec = "socket=/tmp/a.sock,disk=null:1M".parse().unwrap();
        assert_eq!(a.serial, again.serial, "stable for a socket path");
    }
}
