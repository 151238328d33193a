//! The device factory: a disk's description ([`DeviceSpec`]), and the
//! assembly of one disk into the layers that serve it (backend, virtio-blk
//! device, virtio-pci transport, PCI function, vfio-user server) on a
//! shared engine. The command line (`cli`) and the management plane
//! (`target`) both build their devices here.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use log::info;
use vm_memory::GuestMemoryMmap;

use crate::backend::{self, DiskSpec, OpenOptionsDisk};
use crate::blk::exec::ErrorPolicy;
use crate::blk::{BlkDevice, BlkOptions, BlkShared};
use crate::engine::{Engine, QosLimits};
use crate::memory::GuestMemoryHandle;
use crate::pci::{self, Identity, Interrupts, PciFunction};
use crate::util::parse_size;
use crate::vfio_user::{Server, ServerConfig};
use crate::virtio::transport::{NotifyMode, PciTransport};

/// What every device of a process shares: set once, for all of them.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// What a backend error does (`--on-error`).
    pub on_error: ErrorPolicy,
    /// How the modern interface takes doorbells (`--notify`).
    pub notify: NotifyMode,
    /// Replace a stale socket left by an earlier run (`--force`).
    pub force: bool,
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
    /// `format=raw`: serve an image file's bytes even when they start
    /// with an image format's header.
    pub format_raw: bool,
    /// NBD disks: seconds requests wait for a server that went away.
    pub reconnect_delay: Option<u64>,
    /// Who may connect to the device's socket, besides its owner.
    pub socket_access: SocketAccess,
    /// Limits on operations and bytes per second (0: none).
    pub qos: QosLimits,
}

/// The device socket's permissions, owner and group, set right after it
/// is bound (it is owner-only until then): for a QEMU that runs as another
/// user (libvirt's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: Option<u32>,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

/// `socket-mode=`: octal permission bits, e.g. 0660.
pub fn parse_socket_mode(v: &str) -> Result<u32, String> {
    u32::from_str_radix(v.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("socket-mode={v}: expected octal permission bits, e.g. 0660"))
}

impl SocketAccess {
    /// Applies to the socket at `path` (just bound: ours).
    pub fn apply(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if self.owner.is_some() || self.group.is_some() {
            std::os::unix::fs::chown(path, self.owner, self.group).with_context(|| {
                format!(
                    "giving {} to user {:?}, group {:?}",
                    path.display(),
                    self.owner,
                    self.group
                )
            })?;
        }
        if let Some(m) = self.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))
                .with_context(|| format!("setting the mode of {} to {m:o}", path.display()))?;
        }
        Ok(())
    }
}

/// `format=`: only raw is served; any other format goes through qemu-nbd.
pub fn parse_format(v: &str) -> Result<bool, String> {
    match v {
        "raw" => Ok(true),
        f => Err(format!(
            "format={f}: only raw images are served; serve a {f} image through qemu-nbd \
             (qemu-nbd -f {f} --socket=PATH IMAGE) with disk=nbd+unix:///?socket=PATH"
        )),
    }
}

/// A QoS limit: `iops=` a count per second, the byte rates with the
/// suffixes of sizes (`bps=100M`); 0 is no limit.
pub fn parse_rate(key: &str, v: &str) -> Result<u64, String> {
    let r = if key == "iops" {
        v.parse::<u64>()
            .map_err(|_| format!("{key}={v}: expected a count per second"))?
    } else {
        parse_size(v).map_err(|e| format!("{key}={v}: {e}"))?
    };
    // (Beyond this a limit means nothing; it also keeps the buckets'
    // arithmetic exact.)
    if r > 1 << 50 {
        return Err(format!("{key}={v}: at most 2^50"));
    }
    Ok(r)
}

/// `reconnect-delay=SECONDS`: 0 to 3600.
pub fn parse_reconnect_delay(v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .ok()
        .filter(|&s| s <= 3600)
        .ok_or_else(|| format!("reconnect-delay={v}: expected seconds, 0 to 3600"))
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
            format_raw: false,
            reconnect_delay: None,
            socket_access: SocketAccess::default(),
            qos: QosLimits::default(),
        };
        for item in items.iter().filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("'{item}' is not key=value"))?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "disk" => disk = Some(v.parse::<DiskSpec>()?),
                _ => d.set_key(k, v)?,
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

impl DeviceSpec {
    /// Sets one `key=value` of `--device` (all but socket and disk).
    fn set_key(&mut self, k: &str, v: &str) -> Result<(), String> {
        match k {
            "name" => self.name = Some(parse_name(v)?),
            "size" => self.size = Some(parse_size(v)?),
            "readonly" => self.readonly = on_off(k, v)?,
            "queues" => self.queues = parse_queues(v)?,
            "queue-size" => self.queue_size = parse_queue_size(v)?,
            "serial" => self.serial = parse_serial(v)?,
            "logical-block-size" => self.logical_block_size = parse_block_size(v)?,
            "direct" => self.direct = on_off(k, v)?,
            "discard" => self.discard = on_off(k, v)?,
            "write-zeroes" => self.write_zeroes = on_off(k, v)?,
            "packed" => self.packed = on_off(k, v)?,
            "force-share" => self.force_share = on_off(k, v)?,
            "format" => self.format_raw = parse_format(v)?,
            "reconnect-delay" => self.reconnect_delay = Some(parse_reconnect_delay(v)?),
            "socket-mode" => self.socket_access.mode = Some(parse_socket_mode(v)?),
            "socket-owner" => self.socket_access.owner = Some(crate::util::user_id(v)?),
            "socket-group" => self.socket_access.group = Some(crate::util::group_id(v)?),
            "iops" | "bps" | "read-bps" | "write-bps" => {
                self.qos.set_named(k, parse_rate(k, v)?);
            }
            _ => {
                return Err(format!(
                    "unknown key '{k}' (keys: name, socket, disk, size, readonly, queues, \
                     queue-size, serial, logical-block-size, direct, discard, write-zeroes, \
                     packed, force-share, format, reconnect-delay, socket-mode, \
                     socket-owner, socket-group, iops, bps, read-bps, write-bps)"
                ))
            }
        }
        Ok(())
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
        if self.reconnect_delay.is_some() && !matches!(self.disk, DiskSpec::Nbd(_)) {
            bail!(
                "reconnect-delay is for NBD disks (socket {})",
                self.socket.display()
            );
        }
        if self.force_share && !self.readonly {
            bail!(
                "force-share is for read-only disks (socket {}): add readonly=on",
                self.socket.display()
            );
        }
        let block = u64::from(self.logical_block_size);
        let size = match &self.disk {
            DiskSpec::File(_) | DiskSpec::Rbd(_) | DiskSpec::Nbd(_) => self.size,
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

pub(crate) fn parse_queues(s: &str) -> Result<u16, String> {
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

pub(crate) fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("serial '{s}' is longer than 20 bytes"));
    }
    Ok(s.to_string())
}

pub(crate) fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (512 | 1024 | 2048 | 4096)) => Ok(n),
        _ => Err(format!(
            "logical block size '{s}' must be 512, 1024, 2048 or 4096"
        )),
    }
}

pub(crate) fn parse_queue_size(s: &str) -> Result<u16, String> {
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
    if let Some(l) = crate::activation::take(path) {
        info!("{}: the socket the service manager passed", path.display());
        return Ok(l);
    }
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

/// Opens one disk and builds its PCI function and server on `engine`.
pub fn build_device(
    spec: &DeviceSpec,
    name: &str,
    settings: &Settings,
    engine: &Arc<Engine>,
) -> Result<(Server<BlkFunction>, Arc<BlkShared>)> {
    let disk = backend::open(
        &spec.disk,
        OpenOptionsDisk {
            readonly: spec.readonly,
            create_size: spec.size,
            direct: spec.direct.then_some(spec.logical_block_size as usize),
            force_share: spec.force_share,
            format_raw: spec.format_raw,
            reconnect_delay: spec.reconnect_delay.map(std::time::Duration::from_secs),
        },
    )
    .with_context(|| format!("opening disk {}", spec.disk))?;
    device_on(spec, name, settings, engine, disk)
}

/// What the disk itself requires of the device (its smallest block), and
/// what it cannot do (not offered: said in the log).
fn check_backend(spec: &DeviceSpec, name: &str, disk: &backend::Disk) -> Result<()> {
    let min = disk.backend.min_block();
    if min > spec.logical_block_size {
        bail!(
            "the disk takes requests in blocks of {min} bytes: give logical-block-size={min} \
             (--logical-block-size {min}) or more"
        );
    }
    for (asked, can, what, key) in [
        (
            spec.discard,
            disk.backend.can_discard(),
            "DISCARD",
            "discard",
        ),
        (
            spec.write_zeroes,
            disk.backend.can_write_zeroes(),
            "WRITE_ZEROES",
            "write-zeroes",
        ),
    ] {
        if asked && !can {
            log::info!("{name}: the disk does not take {key} requests: {what} is not offered");
        }
    }
    Ok(())
}

/// Builds one device on an opened disk; `name` is how the log and the
/// management plane call it.
pub fn device_on(
    spec: &DeviceSpec,
    name: &str,
    settings: &Settings,
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
    check_backend(spec, name, &disk)?;
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
    let watched = disk.backend.clone();
    let blk = BlkDevice::new(
        log.clone(),
        BlkOptions {
            capacity_bytes: disk.size,
            readonly: spec.readonly,
            num_queues: spec.queues,
            queue_size: spec.queue_size,
            logical_block_size: spec.logical_block_size,
            serial: spec.serial.clone(),
            discard: spec.discard && disk.backend.can_discard(),
            write_zeroes: spec.write_zeroes && disk.backend.can_write_zeroes(),
            packed: spec.packed,
            on_error: settings.on_error,
            in_memory: matches!(spec.disk, DiskSpec::Ram(_)),
        },
        disk.backend,
        memory.clone(),
        engine.clone(),
    );
    let shared = blk.shared();
    shared.qos.set(spec.qos);
    let weak = Arc::downgrade(&shared);
    watched.watch_size(Box::new(move |size| {
        if let Some(s) = weak.upgrade() {
            s.resized_outside(size);
        }
    }));
    let transport = PciTransport::new(blk, irqs.clone(), settings.notify)
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
    fn format_and_reconnect_delay_are_device_keys() {
        let d: DeviceSpec = "socket=/tmp/a.sock,disk=nbd+unix:///x?socket=/tmp/n.sock,\
                             reconnect-delay=3"
            .parse()
            .unwrap();
        assert_eq!(d.reconnect_delay, Some(3));
        assert!(matches!(d.disk, DiskSpec::Nbd(_)));
        let d: DeviceSpec = "socket=/tmp/a.sock,disk=/tmp/i.img,format=raw"
            .parse()
            .unwrap();
        assert!(d.format_raw);
        let e = "socket=/tmp/a.sock,disk=/tmp/i.img,format=qcow2"
            .parse::<DeviceSpec>()
            .unwrap_err();
        assert!(e.contains("qemu-nbd"), "{e}");
        assert!("socket=/a,disk=/i,reconnect-delay=x"
            .parse::<DeviceSpec>()
            .is_err());
        assert!("socket=/a,disk=/i,reconnect-delay=4000"
            .parse::<DeviceSpec>()
            .is_err());
        // On a disk that is not NBD it means nothing: refused.
        let d: DeviceSpec = "socket=/tmp/a.sock,disk=ram:1M,reconnect-delay=3"
            .parse()
            .unwrap();
        assert!(d.validate_against_machine().is_err());
    }
}
