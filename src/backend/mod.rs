//! Disk backends: where the blocks live. Knows blocks and bytes, nothing of
//! virtio.

pub mod io;
pub mod lock;
pub mod nbd;
pub mod rbd;
pub mod request;
pub mod uring;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::util::parse_size;

/// What `--disk` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSpec {
    /// A raw image file or block device.
    File(PathBuf),
    /// A disk held in our memory, zero-filled, lost on exit.
    Ram(u64),
    /// Reads return zeros, writes are dropped: a disk that costs nothing,
    /// for measuring the device itself.
    Null(u64),
    /// An image on a Ceph cluster.
    Rbd(rbd::RbdSpec),
    /// An export of an NBD server.
    Nbd(nbd::NbdSpec),
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<DiskSpec, String> {
        if let Some(size) = s.strip_prefix("ram:") {
            Ok(DiskSpec::Ram(parse_size(size)?))
        } else if let Some(size) = s.strip_prefix("null:") {
            Ok(DiskSpec::Null(parse_size(size)?))
        } else if let Some(rest) = s.strip_prefix("rbd:") {
            Ok(DiskSpec::Rbd(rest.parse()?))
        } else if s.starts_with("nbd://") || s.starts_with("nbd+") || s.starts_with("nbds") {
            Ok(DiskSpec::Nbd(s.parse()?))
        } else if s.is_empty() {
            Err("empty disk name".into())
        } else {
            Ok(DiskSpec::File(PathBuf::from(s)))
        }
    }
}

impl DiskSpec {
    /// The spec as given, with the secrets `Display` hides (an RBD key):
    /// for the owner-only `--config` file.
    pub fn full_text(&self) -> String {
        match self {
            DiskSpec::Rbd(r) => r.full_text(),
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSpec::File(p) => write!(f, "{}", p.display()),
            DiskSpec::Ram(s) => write!(f, "ram:{s}"),
            DiskSpec::Null(s) => write!(f, "null:{s}"),
            DiskSpec::Rbd(r) => write!(f, "{r}"),
            DiskSpec::Nbd(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find the size of {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not exist; give --size to create it")]
    Missing { path: PathBuf },
    #[error("disk size {0} is not a multiple of 512 bytes")]
    Unaligned(u64),
    #[error("disk size is 0")]
    Empty,
    #[error("{path} is locked: {why} (a read-only device may take it with force-share)")]
    Locked { path: PathBuf, why: String },
    #[error("{0} is not an image file or a block device")]
    NotADisk(PathBuf),
    #[error("{0} is on a read-only file system; use --readonly (readonly=on) to serve it")]
    ReadOnlyMount(PathBuf),
    #[error(
        "{0} is not writable by this user; use --readonly (readonly=on) to serve it read-only"
    )]
    NoWriteAccess(PathBuf),
    #[error("the file system of {0} does not support O_DIRECT; drop --direct (direct=on)")]
    NoDirect(PathBuf),
    #[error("size {0} cannot create an image: it must be a positive multiple of 512 bytes")]
    BadCreateSize(u64),
    #[error("{0}")]
    NotOurs(String),
    #[error("{0}")]
    Rbd(String),
    #[error("{0}")]
    Nbd(String),
    #[error(
        "{path} holds a {format} image, which this target does not read: serve it through \
         qemu-nbd (qemu-nbd -f {format} --socket=PATH {path}, then --disk \
         nbd+unix:///?socket=PATH), or give format=raw (--format raw) to serve its bytes as \
         they are"
    )]
    NotRaw { path: PathBuf, format: &'static str },
}

/// An opened disk.
pub struct Disk {
    pub spec: DiskSpec,
    pub size: u64,
    pub readonly: bool,
    pub backend: Arc<dyn io::Backend>,
}

/// How to open a disk.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptionsDisk {
    pub readonly: bool,
    /// Create a missing image file with this size.
    pub create_size: Option<u64>,
    /// O_DIRECT, with this alignment (the logical block size).
    pub direct: Option<usize>,
    /// Take no image lock and check none (QEMU's force-share; read-only
    /// devices only).
    pub force_share: bool,
    /// Serve an image file as raw bytes even if it starts as an image
    /// format's header would (`format=raw`).
    pub format_raw: bool,
    /// How long an NBD disk's requests wait for a server that went away.
    pub reconnect_delay: Option<std::time::Duration>,
}

/// Opens an image file or block device; with `create_size`, creates a
/// missing image, and removes it again if anything after that fails.
fn open_file(path: &Path, o: &OpenOptionsDisk) -> Result<(u64, Arc<dyn io::Backend>), OpenError> {
    let open_err = |source: std::io::Error| OpenError::Open {
        path: path.to_path_buf(),
        source,
    };
    let trust = crate::util::check_path_is_ours(path, "image").map_err(OpenError::NotOurs)?;
    let mut created = false;
    match (std::fs::metadata(path), o.create_size) {
        (Ok(m), _) if m.is_dir() => return Err(OpenError::NotADisk(path.to_path_buf())),
        (Ok(m), Some(want)) if m.is_file() && m.len() != want => {
            log::warn!(
                "{} exists ({} bytes): the size {want} given to create it is not used",
                path.display(),
                m.len()
            );
        }
        (Ok(_), _) => {}
        (Err(_), None) => {
            return Err(OpenError::Missing {
                path: path.to_path_buf(),
            })
        }
        (Err(_), Some(size)) => {
            if size == 0 || !size.is_multiple_of(512) {
                return Err(OpenError::BadCreateSize(size));
            }
            // Owner-only, whatever the umask: the image holds a guest's data.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(open_err)?;
            created = true;
            if let Err(source) = f.set_len(size) {
                let _ = std::fs::remove_file(path);
                return Err(OpenError::Size {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    let r = open_existing(path, o, &trust);
    if r.is_err() && created {
        // Leave nothing half made behind.
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Opens the image with O_NONBLOCK (a file swapped in for a FIFO since
/// the check must not block us), then clears it.
fn open_nonblocking(
    path: &Path,
    o: &OpenOptionsDisk,
    trust: &crate::util::PathTrust,
) -> Result<std::fs::File, OpenError> {
    let f = OpenOptions::new()
        .read(true)
        .write(!o.readonly)
        .custom_flags(
            libc::O_NONBLOCK
                | if o.direct.is_some() {
                    libc::O_DIRECT
                } else {
                    0
                }
                // In a shared folder a symlink put there since the check
                // is not followed (ELOOP).
                | if trust.nofollow() { libc::O_NOFOLLOW } else { 0 },
        )
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EROFS) => OpenError::ReadOnlyMount(path.to_path_buf()),
            Some(libc::EINVAL) if o.direct.is_some() => OpenError::NoDirect(path.to_path_buf()),
            Some(libc::EACCES) if !o.readonly => OpenError::NoWriteAccess(path.to_path_buf()),
            _ => OpenError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on our own descriptor; no memory is passed.
        let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        if fl >= 0 {
            // SAFETY: as above.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) };
        }
    }
    Ok(f)
}

/// The image format whose header the file starts with, if any: such a
/// file served raw would show the guest the format's metadata, and a
/// guest that writes one could make a later reader take its disk for an
/// image (with a backing file of the guest's choosing).
fn image_format(f: &std::fs::File) -> Option<&'static str> {
    use std::os::unix::fs::FileExt;
    // O_DIRECT needs an aligned buffer and length.
    let mut buf = AlignedBlock([0; 4096]);
    let mut n = 0;
    while n < buf.0.len() {
        match f.read_at(&mut buf.0[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let b = &buf.0[..n];
    const MAGICS: [(&[u8], &str); 12] = [
        (b"QFI\xfb", "qcow2"),
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"LUKS\xba\xbe", "luks"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"Bochs Virtual HD Image", "bochs"),
        (b"#!/bin/sh\n#V2.0 Format", "cloop"),
    ];
    if let Some((_, f)) = MAGICS.iter().find(|(m, _)| b.starts_with(m)) {
        return Some(f);
    }
    // VDI: its signature at byte 64.
    if b.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        return Some("vdi");
    }
    vmdk_text_descriptor(b).then_some("vmdk")
}

/// A VMDK text descriptor as QEMU's probe takes one: comment and empty
/// lines, then `version=N` (its extents may name any host file).
fn vmdk_text_descriptor(b: &[u8]) -> bool {
    for line in b.split(|&c| c == b'\n') {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        return line.starts_with(b"version=");
    }
    false
}

#[repr(align(4096))]
struct AlignedBlock([u8; 4096]);

fn open_existing(
    path: &Path,
    o: &OpenOptionsDisk,
    trust: &crate::util::PathTrust,
) -> Result<(u64, Arc<dyn io::Backend>), OpenError> {
    let readonly = o.readonly;
    // Only image files and block devices: checked before opening, since
    // opening a FIFO or some devices blocks; O_NONBLOCK keeps a file swapped
    // in meanwhile from blocking too (and is cleared right after).
    {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
            Ok(_) => return Err(OpenError::NotADisk(path.to_path_buf())),
            Err(_) => {}
        }
    }
    let mut f = open_nonblocking(path, o, trust)?;
    let meta = f.metadata().map_err(|source| OpenError::Size {
        path: path.to_path_buf(),
        source,
    })?;
    // What was opened, not what the path showed before: a file swapped in
    // since the check is refused the same way.
    trust
        .check_opened(&meta, path, "image")
        .map_err(OpenError::NotOurs)?;
    let ft = meta.file_type();
    {
        use std::os::unix::fs::FileTypeExt;
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(OpenError::NotADisk(path.to_path_buf()));
        }
    }
    if !o.force_share {
        lock::lock_image(&f, readonly).map_err(|why| OpenError::Locked {
            path: path.to_path_buf(),
            why,
        })?;
    }
    if !o.format_raw {
        if let Some(format) = image_format(&f) {
            return Err(OpenError::NotRaw {
                path: path.to_path_buf(),
                format,
            });
        }
    }
    // Seeking to the end gives the size of block devices too.
    let size = f.seek(SeekFrom::End(0)).map_err(|source| OpenError::Size {
        path: path.to_path_buf(),
        source,
    })?;
    let align = o.direct.unwrap_or(512);
    Ok((
        size,
        Arc::new(io::FileBackend::new(
            f,
            o.direct.is_some(),
            align,
            true,
            false,
        )),
    ))
}

/// A disk a live upgrade handed over: the old binary's open image file
/// (or memory disk's file), with its lock. Checked for what `open` would
/// have made of the spec: the kind of file, the access mode and O_DIRECT.
pub fn open_handed(
    spec: &DiskSpec,
    fd: std::os::fd::OwnedFd,
    o: OpenOptionsDisk,
) -> Result<Disk, OpenError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let path: PathBuf = match spec {
        DiskSpec::File(p) => p.clone(),
        DiskSpec::Ram(_) => "ram:".into(),
        _ => {
            return Err(OpenError::NotOurs(format!(
                "{spec}: no open file is handed over for it"
            )))
        }
    };
    let bad = |why: String| {
        OpenError::NotOurs(format!("the handed-over file of {}: {why}", path.display()))
    };
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(bad("cannot read its flags".into()));
    }
    let ram = matches!(spec, DiskSpec::Ram(_));
    // (A memory disk's file is always open for writing.)
    let want_acc = if o.readonly && !ram {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    if fl & libc::O_ACCMODE != want_acc || (fl & libc::O_DIRECT != 0) != o.direct.is_some() {
        return Err(bad(format!(
            "opened with flags {fl:#o}, not as the device asks"
        )));
    }
    let mut f = std::fs::File::from(fd);
    let meta = f.metadata().map_err(|source| OpenError::Size {
        path: path.clone(),
        source,
    })?;
    let kind_ok = if ram {
        meta.is_file()
    } else {
        meta.is_file() || meta.file_type().is_block_device()
    };
    if !kind_ok {
        return Err(OpenError::NotADisk(path));
    }
    let size = f.seek(SeekFrom::End(0)).map_err(|source| OpenError::Size {
        path: path.clone(),
        source,
    })?;
    let backend: Arc<dyn io::Backend> = if ram {
        Arc::new(io::FileBackend::new(f, false, 512, false, true))
    } else {
        Arc::new(io::FileBackend::new(
            f,
            o.direct.is_some(),
            o.direct.unwrap_or(512),
            true,
            false,
        ))
    };
    if size == 0 || size % 512 != 0 {
        return Err(OpenError::Unaligned(size));
    }
    Ok(Disk {
        spec: spec.clone(),
        size,
        readonly: o.readonly,
        backend,
    })
}

/// Opens (or, with `create_size`, creates) a disk.
pub fn open(spec: &DiskSpec, o: OpenOptionsDisk) -> Result<Disk, OpenError> {
    let readonly = o.readonly;
    let (size, backend): (u64, Arc<dyn io::Backend>) = match spec {
        DiskSpec::Null(size) => (*size, Arc::new(io::NullBackend)),
        DiskSpec::Ram(size) => {
            let f = crate::util::memfd("vfio-user-blk-ram").map_err(|source| OpenError::Open {
                path: "ram:".into(),
                source,
            })?;
            f.set_len(*size).map_err(|source| OpenError::Size {
                path: "ram:".into(),
                source,
            })?;
            (
                *size,
                Arc::new(io::FileBackend::new(f, false, 512, false, true)),
            )
        }
        DiskSpec::File(path) => open_file(path, &o)?,
        DiskSpec::Nbd(n) => {
            if o.create_size.is_some() {
                return Err(OpenError::Nbd(format!(
                    "{n}: size= does not create NBD exports; the server's export has its size"
                )));
            }
            nbd::open(
                n,
                readonly,
                o.reconnect_delay.unwrap_or(nbd::DEFAULT_RECONNECT_DELAY),
            )?
        }
        DiskSpec::Rbd(r) => {
            if o.create_size.is_some() {
                return Err(OpenError::Rbd(format!(
                    "{r}: size= does not create RBD images; create it with rbd create"
                )));
            }
            rbd::open(r, readonly)?
        }
    };
    if size == 0 {
        return Err(OpenError::Empty);
    }
    if size % 512 != 0 {
        return Err(OpenError::Unaligned(size));
    }
    Ok(Disk {
        spec: spec.clone(),
        size,
        readonly,
        backend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!("ram:1G".parse(), Ok(DiskSpec::Ram(1 << 30)));
        assert_eq!("null:4096".parse(), Ok(DiskSpec::Null(4096)));
        assert_eq!("a.img".parse(), Ok(DiskSpec::File("a.img".into())));
        assert!("ram:lots".parse::<DiskSpec>().is_err());
    }

    #[test]
    fn image_headers_are_recognised_and_plain_data_is_not() {
        let dir = vub_testkit::TempDir::new("formats");
        let p = dir.path("x.img");
        let vdi = {
            let mut v = vec![b'<'; 64];
            v.extend_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
            v
        };
        let cases: [(&[u8], Option<&str>); 8] = [
            (b"QFI\xfb\0\0\0\x03", Some("qcow2")),
            (
                b"# a comment\n\nversion=1\nCID=1\nRW 2048 FLAT \"/etc/x\" 0\n",
                Some("vmdk"),
            ),
            (b"COWD\0\0\0\x01", Some("vmdk")),
            (&vdi, Some("vdi")),
            (b"LUKS\xba\xbe\0\x01", Some("luks")),
            (b"\0\0\0\0", None),
            (b"hello world\nversion=1\n", None),
            (b"\xeb\x63\x90", None),
        ];
        for (head, want) in cases {
            let mut data = head.to_vec();
            data.resize(8192, 0);
            std::fs::write(&p, &data).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            assert_eq!(image_format(&f), want, "{head:?}");
        }
    }

    #[test]
    fn open_and_create() {
        let dir = vub_testkit::TempDir::new("backend");
        let p = dir.path("d.img");
        let spec = DiskSpec::File(p.clone());
        let plain = OpenOptionsDisk::default();
        assert!(matches!(open(&spec, plain), Err(OpenError::Missing { .. })));
        let create = OpenOptionsDisk {
            create_size: Some(1 << 20),
            ..plain
        };
        let d = open(&spec, create).unwrap();
        assert_eq!(d.size, 1 << 20);
        // The image is locked while `d` holds it.
        assert!(matches!(open(&spec, plain), Err(OpenError::Locked { .. })));
        drop(d);
        std::fs::write(&p, [0u8; 1000]).unwrap();
        assert!(matches!(
            open(&spec, plain),
            Err(OpenError::Unaligned(1000))
        ));
        assert!(matches!(
            open(&DiskSpec::Ram(0), plain),
            Err(OpenError::Empty)
        ));
    }
}
