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

use crate::backend::{self, DiskSpec};
use crate::blk::{BlkDevice, BlkOptions};
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

/// Builds the device and its server from the options.
pub fn build(opts: &Options) -> Result<Server<BlkFunction>> {
    let disk = backend::open(&opts.disk, opts.readonly, opts.size)
        .with_context(|| format!("opening disk {:?}", opts.disk))?;
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
    let blk = BlkDevice::new(BlkOptions {
        capacity_bytes: disk.size,
        readonly: opts.readonly,
        num_queues: opts.queues,
        queue_size: opts.queue_size,
        logical_block_size: 512,
        seg_max: u32::from(opts.queue_size).saturating_sub(2).max(1),
    });
    let transport = LegacyTransport::new(blk, irqs.clone());
    let function = PciFunction::new(VIRTIO_BLK_IDENTITY, transport, irqs);
    Ok(Server::new(function, memory, ServerConfig::default()))
}
