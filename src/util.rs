//! Small OS helpers shared by the server, the tests and the tools.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Creates an anonymous memory file (memfd), close-on-exec.
pub fn memfd(name: &str) -> io::Result<File> {
    memfd_with(name, libc::MFD_CLOEXEC)
}

fn memfd_with(name: &str, flags: libc::c_uint) -> io::Result<File> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: name is a valid NUL-terminated string; the call has no other
    // memory effects.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A memfd of `len` bytes whose size can never change again (sealed
/// against shrinking, growing and further seals): a file handed to clients
/// that none of them can cut short under the others.
pub fn sealed_memfd(name: &str, len: u64) -> io::Result<File> {
    let f = memfd_with(name, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)?;
    f.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own; no memory effects.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// The machine's memory, in bytes.
pub fn memory_bytes() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    u64::try_from(pages)
        .unwrap_or(0)
        .saturating_mul(u64::try_from(size).unwrap_or(0))
}

/// Refuses a path whose file another local user controls: in a folder
/// every user may write to (sticky, world-writable: /tmp), an existing
/// entry owned by another user (neither us nor the folder's owner) or a
/// symlink not ours is refused, as the kernel's protected_regular and
/// protected_symlinks rules would have it; a folder anyone can write to
/// without the sticky bit is refused outright (any user can swap the file
/// under us). `what` names the path in the message ("image", "socket").
pub fn check_path_is_ours(path: &std::path::Path, what: &str) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let Ok(dir) = std::fs::metadata(parent) else {
        // No folder: the open or bind says so.
        return Ok(());
    };
    let mode = dir.permissions().mode();
    let world_writable = mode & 0o002 != 0;
    let sticky = mode & 0o1000 != 0;
    let hint = "; use a folder of your own (e.g. one made with mkdir -m 700)";
    if world_writable && !sticky {
        return Err(format!(
            "the {what} {} is in {}, a folder every user can write to: another user could \
             replace it{hint}",
            path.display(),
            parent.display()
        ));
    }
    if !(world_writable && sticky) {
        return Ok(());
    }
    let Ok(entry) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    // SAFETY: geteuid has no memory effects.
    let me = unsafe { libc::geteuid() };
    let trusted = |uid: u32| uid == me || uid == dir.uid();
    if entry.file_type().is_symlink() && !trusted(entry.uid()) {
        return Err(format!(
            "the {what} {} is a symlink that user {} made in {}, a folder every user can \
             write to: refusing to follow it{hint}",
            path.display(),
            entry.uid(),
            parent.display()
        ));
    }
    if !trusted(entry.uid()) {
        return Err(format!(
            "the {what} {} belongs to user {}, another user, in {}, a folder every user can \
             write to: refusing it (that user could read or replace the guest's data){hint}",
            path.display(),
            entry.uid(),
            parent.display()
        ));
    }
    Ok(())
}

/// Parses a size such as `4096`, `64K`, `512M`, `2G`, `1T` (binary units; an
/// optional trailing `B` or `iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 64K, 512M, 2G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Per-call-site limit for log lines that a guest or client can cause at
/// will: at most `RateLimit::BURST` lines a second; the lines dropped are
/// counted and reported with the next one let through. Used by
/// [`warn_limited!`](crate::warn_limited).
pub struct RateLimit {
    window_start_ms: AtomicU64,
    count: AtomicU32,
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    pub const BURST: u32 = 10;

    pub const fn new() -> RateLimit {
        RateLimit {
            window_start_ms: AtomicU64::new(0),
            count: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being the lines dropped
    /// since the last one; `None` when this one is dropped.
    pub fn allow(&self) -> Option<u64> {
        self.allow_burst(Self::BURST)
    }

    /// [`allow`](Self::allow) with `burst` lines a second.
    pub fn allow_burst(&self, burst: u32) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1000);
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= 1000
            && self
                .window_start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::warn!`, limited per call site (see [`RateLimit`]): for anything a
/// guest or a client can repeat.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::util::RateLimit = $crate::util::RateLimit::new();
        if let Some(dropped) = LIMIT.allow() {
            if dropped > 0 {
                log::warn!("{} ({dropped} similar lines suppressed)", format_args!($($arg)+));
            } else {
                log::warn!($($arg)+);
            }
        }
    }};
}

/// The log of one device: every line names the device as the operator
/// named it, and the lines a guest or a client can cause at will share one
/// limit per device (a guest looping through resets floods nobody's log,
/// and cannot mute another device's warnings).
#[derive(Debug)]
pub struct DeviceLog {
    name: String,
    limit: RateLimit,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateLimit")
    }
}

impl DeviceLog {
    /// Lines a second one device may write about what its guest or client
    /// does.
    pub const BURST: u32 = 20;

    pub fn new(name: impl Into<String>) -> std::sync::Arc<DeviceLog> {
        std::sync::Arc::new(DeviceLog {
            name: name.into(),
            limit: RateLimit::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `Some(dropped)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        self.limit.allow_burst(Self::BURST)
    }
}

/// A line about a device that its guest or client caused, at `log` level
/// `$lvl` (Error, Warn, Info): prefixed with the device's name, limited per
/// device (see [`DeviceLog`]).
#[macro_export]
macro_rules! dev_log {
    ($dev:expr, $lvl:ident, $($arg:tt)+) => {{
        let dev: &$crate::util::DeviceLog = &$dev;
        if log::log_enabled!(log::Level::$lvl) {
            if let Some(dropped) = dev.allow() {
                if dropped > 0 {
                    log::log!(
                        log::Level::$lvl,
                        "{}: {} ({dropped} lines of this device suppressed)",
                        dev.name(),
                        format_args!($($arg)+)
                    );
                } else {
                    log::log!(log::Level::$lvl, "{}: {}", dev.name(), format_args!($($arg)+));
                }
            }
        }
    }};
}

/// A debug line about a device, prefixed with its name (not limited: debug
/// output is the operator's choice).
#[macro_export]
macro_rules! dev_debug {
    ($dev:expr, $($arg:tt)+) => {{
        let dev: &$crate::util::DeviceLog = &$dev;
        log::debug!("{}: {}", dev.name(), format_args!($($arg)+));
    }};
}

/// `log::error!`, limited per call site like [`warn_limited!`].
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::util::RateLimit = $crate::util::RateLimit::new();
        if let Some(dropped) = LIMIT.allow() {
            if dropped > 0 {
                log::error!("{} ({dropped} similar lines suppressed)", format_args!($($arg)+));
            } else {
                log::error!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_a_burst_through_then_counts() {
        let rl = RateLimit::new();
        for _ in 0..RateLimit::BURST {
            assert_eq!(rl.allow(), Some(0));
        }
        assert_eq!(rl.allow(), None);
        assert_eq!(rl.allow(), None);
        // A new window reports what was dropped.
        rl.window_start_ms.store(0, Ordering::Relaxed);
        assert_eq!(rl.allow(), Some(2));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
