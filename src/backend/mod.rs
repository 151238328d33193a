//! Disk backends: where the blocks live. Knows blocks and bytes, nothing of
//! virtio.

pub mod io;
pub mod lock;
pub mod request;
pub mod uring;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
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
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<DiskSpec, String> {
        if let Some(size) = s.strip_prefix("ram:") {
            Ok(DiskSpec::Ram(parse_size(size)?))
        } else if let Some(size) = s.strip_prefix("null:") {
            Ok(DiskSpec::Null(parse_size(size)?))
        } else if s.is_empty() {
            Err("empty disk name".into())
        } else {
            Ok(DiskSpec::File(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSpec::File(p) => write!(f, "{}", p.display()),
            DiskSpec::Ram(s) => write!(f, "ram:{s}"),
            DiskSpec::Null(s) => write!(f, "null:{s}"),
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
}

/// Opens (or, with `create_size`, creates) a disk.
pub fn open(spec: &DiskSpec, o: OpenOptionsDisk) -> Result<Disk, OpenError> {
    let readonly = o.readonly;
    let create_size = o.create_size;
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
        DiskSpec::File(path) => {
            if !path.exists() {
                let Some(size) = create_size else {
                    return Err(OpenError::Missing { path: path.clone() });
                };
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|source| OpenError::Open {
                        path: path.clone(),
                        source,
                    })?;
                f.set_len(size).map_err(|source| OpenError::Size {
                    path: path.clone(),
                    source,
                })?;
            }
            let mut f = OpenOptions::new()
                .read(true)
                .write(!readonly)
                .custom_flags(if o.direct.is_some() {
                    libc::O_DIRECT
                } else {
                    0
                })
                .open(path)
                .map_err(|source| OpenError::Open {
                    path: path.clone(),
                    source,
                })?;
            if !o.force_share {
                lock::lock_image(&f, readonly).map_err(|why| OpenError::Locked {
                    path: path.clone(),
                    why,
                })?;
            }
            // Seeking to the end gives the size of block devices too.
            let size = f.seek(SeekFrom::End(0)).map_err(|source| OpenError::Size {
                path: path.clone(),
                source,
            })?;
            let align = o.direct.unwrap_or(512);
            (
                size,
                Arc::new(io::FileBackend::new(
                    f,
                    o.direct.is_some(),
                    align,
                    true,
                    false,
                )),
            )
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
    fn open_and_create() {
        let dir = std::env::temp_dir().join(format!("vub-backend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.img");
        let _ = std::fs::remove_file(&p);
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
