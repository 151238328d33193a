//! Command-line options and the wiring of the layers into one device.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use log::info;
use vm_memory::GuestMemoryMmap;

use crate::backend::{self, DiskSpec, OpenOptionsDisk};
use crate::blk::exec::ErrorPolicy;
use crate::blk::{BlkDevice, BlkOptions};
use crate::engine::{EngineConfig, PollMode};
use crate::pci::{self, Identity, Interrupts, PciFunction};
use crate::util::parse_size;
use crate::vfio_user::{GuestMemoryHandle, Server, ServerConfig};
use crate::virtio::legacy::LegacyTransport;

/// Serve a virtio-blk disk as a PCI device over vfio-user.
///
/// QEMU 10.1+ attaches it with
/// `-device '{"driver":"vfio-user-pci","socket":{"path":"SOCKET","type":"unix"}}'`
/// and needs guest RAM that can be shared
/// (`-object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem`).
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about)]
pub struct Options {
    /// Path of the unix socket to listen on (created with owner-only permissions).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// The disk: an image file or block device, `ram:SIZE` (in memory,
    /// zero-filled) or `null:SIZE` (reads zeros, discards writes). SIZE takes
    /// K, M, G, T suffixes (binary).
    #[arg(long, value_name = "FILE|ram:SIZE|null:SIZE")]
    pub disk: DiskSpec,

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
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,

    /// Entries per queue (a power of two, at most 1024).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number reported to the guest (GET_ID; at most 20 bytes).
    #[arg(long, default_value = "vfio-user-blk", value_parser = parse_serial)]
    pub serial: String,

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

    /// Poller threads that watch the queues (queues are spread over them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub pollers: u16,

    /// CPUs to pin the pollers to, e.g. `2,3` (round-robin over pollers).
    #[arg(long, value_delimiter = ',', value_name = "CPU,...")]
    pub cpus: Vec<usize>,

    /// How pollers wait: `busy` spins and tells the guest not to ring
    /// doorbells (fastest, burns a core each); `adaptive` spins while there
    /// is work, then sleeps until a doorbell; `interrupt` always waits for
    /// doorbells.
    #[arg(long, value_enum, default_value_t = PollMode::Adaptive)]
    pub poll_mode: PollMode,

    /// Threads that run file I/O (memory disks run on the pollers).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,

    /// On a backend error: `report` answers IOERR; `stop` stops the queue
    /// until the guest resets the device (like QEMU's werror=stop).
    #[arg(long, value_enum, default_value_t = ErrorPolicy::Report)]
    pub on_error: ErrorPolicy,
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
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => bail!("{} is in use by a running server", path.display()),
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

pub type BlkFunction = PciFunction<LegacyTransport<BlkDevice>>;

impl Options {
    /// Checks what the parser cannot, against this machine, before anything
    /// is created: a bad option must not leave an image or a socket behind,
    /// nor be found only when the guest starts the device.
    pub fn validate(&self) -> Result<()> {
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

/// `0-3,6` style.
fn cpu_list(cpus: &[usize]) -> String {
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

/// Builds the device and its server from the options.
pub fn build(opts: &Options) -> Result<Server<BlkFunction>> {
    build_with(opts, false)
}

/// As [`build`]; with `inline`, the queues are served on the protocol
/// thread whenever the driver rings a doorbell (no poller threads):
/// deterministic, for fuzzing.
pub fn build_with(opts: &Options, inline: bool) -> Result<Server<BlkFunction>> {
    opts.validate()?;
    let disk = backend::open(
        &opts.disk,
        OpenOptionsDisk {
            readonly: opts.readonly,
            create_size: opts.size,
            direct: opts.direct.then_some(opts.logical_block_size as usize),
        },
    )
    .with_context(|| format!("opening disk {:?}", opts.disk))?;
    if disk.size % u64::from(opts.logical_block_size) != 0 {
        bail!(
            "disk size {} is not a multiple of the logical block size {}",
            disk.size,
            opts.logical_block_size
        );
    }
    info!(
        "disk {:?}: {} bytes{}",
        disk.spec,
        disk.size,
        if disk.readonly { ", read-only" } else { "" }
    );
    let memory = GuestMemoryHandle::new(GuestMemoryMmap::default());
    // One vector per queue plus one for configuration changes.
    let vectors = (opts.queues + 1).min(pci::MAX_MSIX_VECTORS);
    let irqs = Arc::new(Interrupts::new(vectors));
    let blk = BlkDevice::new(
        BlkOptions {
            capacity_bytes: disk.size,
            readonly: opts.readonly,
            num_queues: opts.queues,
            queue_size: opts.queue_size,
            logical_block_size: opts.logical_block_size,
            serial: opts.serial.clone(),
            discard: !opts.no_discard,
            write_zeroes: !opts.no_write_zeroes,
            on_error: opts.on_error,
        },
        disk.backend,
        memory.clone(),
        EngineConfig {
            pollers: usize::from(opts.pollers),
            cpus: opts.cpus.clone(),
            mode: opts.poll_mode,
            inline,
        },
        usize::from(opts.io_threads),
    );
    let transport = LegacyTransport::new(blk, irqs.clone());
    let function = PciFunction::new(VIRTIO_BLK_IDENTITY, transport, irqs);
    Ok(Server::new(function, memory, ServerConfig::default()))
}
