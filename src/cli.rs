//! Command-line options, and the devices and target they describe (built
//! by `device` and `target`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::backend::{self, DiskSpec};
use crate::blk::exec::ErrorPolicy;
use crate::device::{
    build_device, default_serial, device_on, parse_block_size, parse_queue_size, parse_queues,
    parse_serial, BlkFunction, DeviceSpec, Settings,
};
use crate::engine::{Engine, EngineConfig, IoEngine, PollMode};
use crate::util::parse_size;
use crate::vfio_user::Server;
use crate::virtio::transport::NotifyMode;

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
/// More: `--device socket=PATH,disk=SPEC[,name=NAME,size=SIZE,readonly=on,
/// queues=N,queue-size=N,serial=S,logical-block-size=N,direct=on,
/// discard=off,write-zeroes=off,packed=on,force-share=on,format=raw,
/// reconnect-delay=SECONDS,socket-mode=MODE,socket-group=G,socket-owner=U,
/// iops=N,bps=RATE,read-bps=RATE,write-bps=RATE]`,
/// repeatable (a comma inside a value is written `,,`).
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

    /// The devices to serve, kept across restarts (JSON, the keys of
    /// device_add): they start alongside the command line's, and the
    /// config_save method writes the running set (all but the command
    /// line's) back. A FILE that does not exist yet is no devices.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// With --config: write the file after every device_add,
    /// device_remove, device_resize and device_set_qos (on, the default),
    /// or only when config_save is called (off).
    #[arg(long, value_name = "on|off", default_value = "on", requires = "config", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub config_autosave: bool,

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
    /// `ram:SIZE` (in memory, zero-filled), `null:SIZE` (reads zeros,
    /// discards writes), a Ceph RBD image,
    /// `rbd:POOL/IMAGE[:conf=PATH][:id=USER][:KEY=VALUE...]`, or an NBD
    /// export, `nbd://HOST[:PORT]/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH`. SIZE takes K, M, G, T suffixes
    /// (binary).
    #[arg(
        long,
        value_name = "FILE|ram:SIZE|null:SIZE|rbd:POOL/IMAGE|nbd://HOST/EXPORT",
        requires = "socket"
    )]
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

    /// `raw` to serve an image file's bytes even when they start with a
    /// qcow2, QED, VMDK, VHDX or VPC header (such a file is refused
    /// otherwise; serve those formats through qemu-nbd).
    #[arg(long, value_name = "raw", value_parser = crate::device::parse_format)]
    pub format: Option<bool>,

    /// The device socket's permission bits (octal, e.g. 0660), set once it
    /// is bound (owner-only until then): for a QEMU running as another user.
    #[arg(long, value_name = "MODE", value_parser = crate::device::parse_socket_mode)]
    pub socket_mode: Option<u32>,

    /// The device socket's group (a name or a number).
    #[arg(long, value_name = "GROUP", value_parser = crate::util::group_id)]
    pub socket_group: Option<u32>,

    /// The device socket's owner (a name or a number; needs the right to
    /// give files away, root's).
    #[arg(long, value_name = "USER", value_parser = crate::util::user_id)]
    pub socket_owner: Option<u32>,

    /// Most requests per second (0: no limit); a device over a limit is
    /// not polled until it is under it again.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = |v: &str| crate::device::parse_rate("iops", v))]
    pub iops: u64,

    /// Most bytes per second, read and written together (e.g. 100M).
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = |v: &str| crate::device::parse_rate("bps", v))]
    pub bps: u64,

    /// Most bytes read per second.
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = |v: &str| crate::device::parse_rate("read-bps", v))]
    pub read_bps: u64,

    /// Most bytes written per second.
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = |v: &str| crate::device::parse_rate("write-bps", v))]
    pub write_bps: u64,

    /// NBD disks: seconds requests wait for a server that went away before
    /// they fail (default 10).
    #[arg(long, value_name = "SECONDS", value_parser = crate::device::parse_reconnect_delay)]
    pub reconnect_delay: Option<u64>,

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
        /// The target's management socket (its `--rpc-socket`).
        #[arg(long, value_name = "PATH")]
        rpc_socket: PathBuf,
        /// device_add, device_remove, device_list, device_resize,
        /// device_stats, device_set_qos, config_save, rpc_get_methods,
        /// target_version; events_subscribe prints each event as a line
        /// of JSON until the target stops
        method: String,
        /// Parameters as key=value (numbers and true/false are typed).
        params: Vec<String>,
    },
    /// Print a completion script for a shell, e.g.
    /// `vfio-user-blk completions bash > /etc/bash_completion.d/vfio-user-blk`.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g.
    /// `vfio-user-blk man > /usr/local/share/man/man1/vfio-user-blk.1`.
    Man,
}

/// The completion script for `shell`, or the manual page: what the
/// `completions` and `man` subcommands print.
pub fn generated(cmd: &Command) -> Option<Vec<u8>> {
    use clap::CommandFactory;
    let mut app = Options::command();
    let mut out = Vec::new();
    match cmd {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut app, "vfio-user-blk", &mut out);
        }
        Command::Man => clap_mangen::Man::new(app).render(&mut out).ok()?,
        Command::Rpc { .. } => return None,
    }
    Some(out)
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

impl Options {
    /// Checks what the parser cannot, against this machine, before anything
    /// is created: a bad option must not leave an image or a socket behind,
    /// nor be found only when the guest starts the device.
    pub fn validate(&self) -> Result<()> {
        // (The --config file's devices are checked as they are added, as
        // device_add's are.)
        let devices = self.device_specs();
        if devices.is_empty() && self.rpc_socket.is_none() && self.config.is_none() {
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
                bail!(
                    "two disks are named '{}'",
                    d.name.as_deref().unwrap_or_default()
                );
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
                format_raw: self.format.unwrap_or(false),
                reconnect_delay: self.reconnect_delay,
                socket_access: crate::device::SocketAccess {
                    mode: self.socket_mode,
                    owner: self.socket_owner,
                    group: self.socket_group,
                },
                qos: crate::engine::QosLimits {
                    iops: self.iops,
                    bps: self.bps,
                    read_bps: self.read_bps,
                    write_bps: self.write_bps,
                },
            });
        }
        v.extend(self.devices.iter().cloned());
        v
    }

    /// What every device of the process shares.
    pub fn settings(&self) -> Settings {
        Settings {
            on_error: self.on_error,
            notify: self.notify,
            force: self.force,
        }
    }

    /// `--config` as the target keeps it.
    pub fn config_file(&self) -> Option<crate::target::config::ConfigFile> {
        self.config
            .as_ref()
            .map(|p| crate::target::config::ConfigFile {
                path: p.clone(),
                autosave: self.config_autosave,
            })
    }

    /// Starts the target these options describe: every disk they name,
    /// on one engine, after checking them all.
    pub fn start_target(&self) -> Result<Arc<crate::target::Target>> {
        self.validate()?;
        let mut specs: Vec<(DeviceSpec, bool)> = self.config_specs()?;
        specs.extend(self.device_specs().into_iter().map(|s| (s, false)));
        crate::target::Target::start(
            self.engine_config(false),
            self.settings(),
            specs,
            self.config_file(),
        )
    }

    /// The devices of the `--config` file (none without one), each to be
    /// kept by `config_save`.
    fn config_specs(&self) -> Result<Vec<(DeviceSpec, bool)>> {
        let Some(p) = &self.config else {
            return Ok(Vec::new());
        };
        let specs = crate::target::config::load(p, crate::target::rpc::spec_from_json)?;
        let cli = self.device_specs();
        let mut out = Vec::new();
        for s in specs {
            // A device of the command line that was removed and added again
            // over RPC is in the file too (on the same socket, however the
            // path is spelled): the command line's wins.
            if let Some(c) = cli.iter().find(|c| same_socket(&c.socket, &s.socket)) {
                log::warn!(
                    "{}: the device on {} is the command line's ({}); the file's is not served",
                    p.display(),
                    c.socket.display(),
                    c.disk
                );
                continue;
            }
            // Another device with a command-line device's name: neither
            // is dropped for the other; the operator decides.
            if let Some(n) = s
                .name
                .as_ref()
                .filter(|n| cli.iter().any(|c| c.name.as_ref() == Some(n)))
            {
                bail!(
                    "{}: device '{n}' on {} has the name of a command-line device on another \
                     socket; rename one of them",
                    p.display(),
                    s.socket.display()
                );
            }
            out.push((s, true));
        }
        Ok(out)
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

/// Whether two socket paths name the same file: the same name in the same
/// folder, however the folders are spelled (the socket itself may not
/// exist yet).
pub(crate) fn same_socket(a: &std::path::Path, b: &std::path::Path) -> bool {
    let canon = |p: &std::path::Path| {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        (
            std::fs::canonicalize(dir).ok(),
            p.file_name().map(ToOwned::to_owned),
        )
    };
    a == b || {
        let (ca, cb) = (canon(a), canon(b));
        ca.0.is_some() && ca == cb
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
        let (server, _) = build_device(&spec, &name, &opts.settings(), &engine)?;
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
    device_on(&spec, &name, &opts.settings(), &engine, disk).map(|(s, _)| s)
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
