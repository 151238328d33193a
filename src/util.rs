//! Small OS helpers shared by the server, the tests and the tools.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Creates an anonymous memory file (memfd), close-on-exec.
/// Waits up to `timeout_ms` (-1: no limit) until `fd` or `wake` (-1:
/// none) is readable: whether each is. Interrupted waits are retried.
pub fn poll_two(fd: i32, wake: i32, timeout_ms: i32) -> io::Result<(bool, bool)> {
    let mut p = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two pollfd structs that outlive the call.
        let r = unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) };
        if r >= 0 {
            return Ok((p[0].revents != 0, p[1].revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

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

/// A user's or group's id (`what`): digits as they are, or the name looked
/// up by `look` (given the name and a buffer for the record's strings).
fn id_of(
    what: &str,
    name: &str,
    look: impl FnOnce(&std::ffi::CStr, &mut [libc::c_char]) -> Option<u32>,
) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("{what} '{name}': a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    look(&c, &mut buf).ok_or_else(|| format!("no {what} named '{name}'"))
}

/// A user's id: digits as they are, or a name looked up (NSS included).
pub fn user_id(name: &str) -> Result<u32, String> {
    id_of("user", name, |c, buf| {
        // SAFETY: passwd is plain data; zeroed is a valid value.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: the name, the record, its buffer (with its length) and
        // the result pointer all outlive the call; the record points into
        // `buf`, read before `buf` goes.
        let r = unsafe {
            libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found)
        };
        (r == 0 && !found.is_null()).then_some(pw.pw_uid)
    })
}

/// A group's id: digits as they are, or a name looked up (NSS included).
pub fn group_id(name: &str) -> Result<u32, String> {
    id_of("group", name, |c, buf| {
        // SAFETY: group is plain data; zeroed is a valid value.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as for getpwnam_r in `user_id`.
        let r = unsafe {
            libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut found)
        };
        (r == 0 && !found.is_null()).then_some(gr.gr_gid)
    })
}

/// Tells the service manager (systemd's readiness protocol, `sd_notify`)
/// `state`, e.g. `READY=1`: one datagram to `$NOTIFY_SOCKET` (a path, or
/// an abstract name after `@`). Nothing without it; a failure is logged.
pub fn sd_notify(state: &str) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(to) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = to.as_bytes();
    let sent = UnixDatagram::unbound().and_then(|s| {
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&to))?,
        };
        s.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        log::warn!(
            "cannot tell the service manager ({}): {e}",
            to.to_string_lossy()
        );
    }
}

/// The machine's memory, in bytes.
/// The CPUs that threads doing I/O for the reactors (the pool's workers, a
/// backend library's own threads) should run on: set once by the engine,
/// off the CPUs of busy reactors while any other is usable.
static HELPER_CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

pub fn set_helper_cpus(cpus: Vec<usize>) {
    let _ = HELPER_CPUS.set(cpus);
}

pub fn helper_cpus() -> Option<&'static [usize]> {
    HELPER_CPUS.get().map(Vec::as_slice)
}

/// The engine's reactor count (set once when it starts; 1 until then).
static REACTORS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

pub fn set_reactor_count(n: usize) {
    REACTORS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// How many reactors share the disks: a backend that can spread a disk
/// over several connections makes one per reactor.
pub fn reactor_count() -> usize {
    REACTORS.load(std::sync::atomic::Ordering::Relaxed)
}

/// CPUs a `cpu_set_t` can name.
const PIN_SET_BITS: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();

/// Confines the calling thread to `cpus`, with a log line if it cannot.
pub fn pin_to(cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= PIN_SET_BITS {
            // Options are validated at start; never index past the set.
            log::warn!("cannot pin a thread to CPU {cpu}: beyond the CPU set");
            return;
        }
        // SAFETY: CPU_SET writes one bit inside `set` (cpu < PIN_SET_BITS).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        log::warn!(
            "cannot pin a thread to CPU(s) {cpus:?}: {}",
            std::io::Error::last_os_error()
        );
    }
}

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

/// What [`check_path_is_ours`] found about the folder of a path, for the
/// checks after the file is opened.
#[derive(Clone, Copy, Debug)]
pub struct PathTrust {
    /// The folder is one every user may write to, with the sticky bit:
    /// its owner's uid.
    shared_folder_owner: Option<u32>,
}

impl PathTrust {
    /// Open the file without following a symlink (a shared folder: one
    /// could be put there between the check and the open).
    pub fn nofollow(&self) -> bool {
        self.shared_folder_owner.is_some()
    }

    /// Checks the file that was opened (its `fstat`), as the path was
    /// checked before: in a shared folder it must be ours or the folder
    /// owner's, whatever was swapped in meanwhile.
    pub fn check_opened(
        &self,
        meta: &std::fs::Metadata,
        path: &std::path::Path,
        what: &str,
    ) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        self.check_owner(meta.uid(), path, what)
    }

    /// Checks the user behind what was reached at the path (a file's
    /// owner, a socket's listening peer), as the path was checked: in a
    /// shared folder it must be us, root or the folder's owner.
    pub fn check_owner(&self, uid: u32, path: &std::path::Path, what: &str) -> Result<(), String> {
        match self.shared_folder_owner {
            Some(owner) if !trusted_uid(uid) && uid != owner => Err(format!(
                "the {what} {} belongs to user {uid}, another user, in a folder every user can \
                 write to: refusing it",
                path.display(),
            )),
            _ => Ok(()),
        }
    }
}

/// Us, or root: the users whose files and folders we may rely on.
fn trusted_uid(uid: u32) -> bool {
    // SAFETY: geteuid has no memory effects.
    uid == unsafe { libc::geteuid() } || uid == 0
}

const MODE_STICKY: u32 = 0o1000;
const MODE_OTHERS_WRITE: u32 = 0o002;
const MODE_GROUP_WRITE: u32 = 0o020;
const PATH_HINT: &str = "; use a folder of your own (e.g. one made with mkdir -m 700)";

/// Refuses a path whose file another local user controls, as the kernel's
/// protected_regular and protected_symlinks rules would, and more:
/// - every folder on the way (after symlinks) must belong to us or to
///   root, and may be writable by other users (everyone, or a group other
///   than root's or ours) only with the sticky bit (like /tmp): another
///   user's folder lets its owner swap the file; the folder must exist;
/// - a symlink in a folder of ours is followed, and what it leads to must
///   pass these rules (one that leads nowhere is refused);
/// - a symlink on the way that sits in such a shared folder must be ours,
///   root's or the folder owner's;
/// - in a shared folder, the file itself must not be a symlink, and must
///   belong to us, root or the folder's owner if it exists.
///
/// `what` names the path in the message ("image", "socket"). The checks
/// after the open are in the [`PathTrust`] it returns.
pub fn check_path_is_ours(path: &std::path::Path, what: &str) -> Result<PathTrust, String> {
    check_path(path, what, true)
}

/// Writable by users other than us and root: by everyone, or by a group
/// that is not root's or ours (its other members).
fn open_to_others(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = m.permissions().mode();
    // SAFETY: getegid has no memory effects.
    let our_group = m.gid() == 0 || m.gid() == unsafe { libc::getegid() };
    mode & MODE_OTHERS_WRITE != 0 || (mode & MODE_GROUP_WRITE != 0 && !our_group)
}

/// A folder other users may write to, with the sticky bit (like /tmp).
fn shared(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    open_to_others(m) && m.permissions().mode() & MODE_STICKY != 0
}

/// [`check_path_is_ours`]; `follow`: whether a final symlink in a folder
/// of ours may be followed (once: its resolved path has none left, unless
/// one was swapped in meanwhile).
fn check_path(path: &std::path::Path, what: &str, follow: bool) -> Result<PathTrust, String> {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("the current folder: {e}"))?
            .join(path)
    };
    check_symlinks_on_the_way(&abs, path, what)?;
    // The folders on the way, as they really are.
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let real_parent = std::fs::canonicalize(parent).map_err(|e| {
        // Refused rather than left to the open: a folder that appears
        // between this check and the open would not have been checked.
        format!(
            "the folder of the {what} {} does not exist or cannot be reached ({e})",
            path.display()
        )
    })?;
    let last = check_folders(&real_parent, path, what)?;
    let entry = abs
        .file_name()
        .and_then(|name| std::fs::symlink_metadata(real_parent.join(name)).ok());
    let Some(folder) = last.filter(shared) else {
        if entry.is_some_and(|e| e.file_type().is_symlink()) {
            if !follow {
                return Err(format!(
                    "the {what} {} changed into a symlink while it was checked",
                    path.display()
                ));
            }
            // A symlink in a folder of ours: what it leads to must pass the
            // same rules (it may be another user's file, or in their
            // folder). The resolved path has no symlink left.
            let target = std::fs::canonicalize(&abs).map_err(|e| {
                format!(
                    "the {what} {} is a symlink that leads nowhere ({e}): refusing it",
                    path.display()
                )
            })?;
            return check_path(&target, what, false)
                .map_err(|e| format!("{e} (reached through the symlink {})", path.display()));
        }
        return Ok(PathTrust {
            shared_folder_owner: None,
        });
    };
    if let Some(entry) = entry {
        check_entry_in_shared_folder(&entry, folder.uid(), &real_parent, path, what)?;
    }
    Ok(PathTrust {
        shared_folder_owner: Some(folder.uid()),
    })
}

/// Symlinks on the way to `abs`, as written: one in a shared folder must
/// not be another user's.
fn check_symlinks_on_the_way(
    abs: &std::path::Path,
    path: &std::path::Path,
    what: &str,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    use std::path::{Component, PathBuf};
    let mut prefix = PathBuf::new();
    let comps: Vec<Component> = abs.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        let dir = prefix.clone();
        prefix.push(c.as_os_str());
        let Ok(m) = std::fs::symlink_metadata(&prefix) else {
            break;
        };
        if m.file_type().is_symlink() {
            let d = std::fs::metadata(&dir).ok();
            let in_shared = d.as_ref().is_some_and(shared);
            let dir_owner = d.as_ref().map_or(0, MetadataExt::uid);
            if in_shared && !trusted_uid(m.uid()) && m.uid() != dir_owner {
                return Err(format!(
                    "{} on the way to the {what} {} is a symlink that user {} made in a \
                     folder every user can write to: refusing to follow it{PATH_HINT}",
                    prefix.display(),
                    path.display(),
                    m.uid()
                ));
            }
        }
    }
    Ok(())
}

/// Every folder of `real_parent` must be ours or root's, and writable by
/// others only with the sticky bit: the last one's metadata.
fn check_folders(
    real_parent: &std::path::Path,
    path: &std::path::Path,
    what: &str,
) -> Result<Option<std::fs::Metadata>, String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut dir = std::path::PathBuf::new();
    let mut last = None;
    for c in real_parent.components() {
        dir.push(c.as_os_str());
        let Ok(m) = std::fs::metadata(&dir) else {
            break;
        };
        let mode = m.permissions().mode();
        if !trusted_uid(m.uid()) {
            return Err(format!(
                "the {what} {} is in {}, a folder of user {} (another user, who could replace \
                 what it holds){PATH_HINT}",
                path.display(),
                dir.display(),
                m.uid()
            ));
        }
        if open_to_others(&m) && mode & MODE_STICKY == 0 {
            return Err(format!(
                "the {what} {} is in {}, a folder other users can write to without the sticky \
                 bit: another user could replace it{PATH_HINT}",
                path.display(),
                dir.display()
            ));
        }
        last = Some(m);
    }
    Ok(last)
}

/// In a shared folder (owned by `folder_owner`), the file must not be a
/// symlink, and must be ours, root's or the folder owner's.
fn check_entry_in_shared_folder(
    entry: &std::fs::Metadata,
    folder_owner: u32,
    real_parent: &std::path::Path,
    path: &std::path::Path,
    what: &str,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if entry.file_type().is_symlink() {
        return Err(format!(
            "the {what} {} is a symlink (made by user {}) in {}, a folder every user can \
             write to: refusing to follow it{PATH_HINT}",
            path.display(),
            entry.uid(),
            real_parent.display()
        ));
    }
    if !trusted_uid(entry.uid()) && entry.uid() != folder_owner {
        return Err(format!(
            "the {what} {} belongs to user {}, another user, in {}, a folder every user can \
             write to: refusing it (that user could read or replace the guest's data){PATH_HINT}",
            path.display(),
            entry.uid(),
            real_parent.display()
        ));
    }
    Ok(())
}

/// Whether something listens on the unix socket at `path`, without ever
/// waiting for it: Ok when a connection was made or the listener's backlog
/// is full (a server that does not accept is still a server),
/// ConnectionRefused for a socket nobody listens on.
pub fn probe_socket(path: &std::path::Path) -> io::Result<()> {
    match connect_unix_nonblocking(path) {
        Ok(_) => Ok(()),
        // A full backlog: a listener that does not accept.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINPROGRESS)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A non-blocking unix stream socket connected to `path`, without ever
/// waiting: EAGAIN when the listener's backlog is full.
pub fn connect_unix_nonblocking(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // SAFETY: socket has no memory effects; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket just returned this descriptor and nothing else owns it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives
    // the call; `fd` is our socket.
    if unsafe { libc::connect(fd, (&raw const addr).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
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
    ($($arg:tt)+) => { $crate::log_limited!(warn, $($arg)+) };
}

/// A log line at `level` (a `log` macro's name), rate-limited per call
/// site: what [`warn_limited!`] and [`error_limited!`] expand to.
#[doc(hidden)]
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::util::RateLimit = $crate::util::RateLimit::new();
        if let Some(dropped) = LIMIT.allow() {
            if dropped > 0 {
                log::$level!("{} ({dropped} similar lines suppressed)", format_args!($($arg)+));
            } else {
                log::$level!($($arg)+);
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
    /// I/O error events (a failing disk can fail every request).
    io_events: RateLimit,
    /// The driver's events (resets, DRIVER_OK, broken queues), which a
    /// guest causes at will.
    guest_events: RateLimit,
    /// Clients attaching and leaving: apart, so that a guest's reset loop
    /// cannot hide who is attached.
    client_events: RateLimit,
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
    /// I/O error events a second one device may send.
    pub const IO_EVENTS: u32 = 10;
    /// Other guest- or client-caused events a second one device may send.
    pub const GUEST_EVENTS: u32 = 20;

    pub fn new(name: impl Into<String>) -> std::sync::Arc<DeviceLog> {
        std::sync::Arc::new(DeviceLog {
            name: name.into(),
            limit: RateLimit::new(),
            io_events: RateLimit::new(),
            guest_events: RateLimit::new(),
            client_events: RateLimit::new(),
        })
    }

    /// Tells the management plane's subscribers (see [`crate::events`]):
    /// I/O errors at most [`Self::IO_EVENTS`] a second, the driver's
    /// events and clients' comings and goings at most [`Self::GUEST_EVENTS`]
    /// each (the next one of the kind that goes out says how many were left
    /// out).
    pub fn event(&self, e: crate::events::Event) {
        use crate::events::Event;
        let suppressed = match &e {
            Event::IoError { .. } => self.io_events.allow_burst(Self::IO_EVENTS),
            Event::ClientAttached { .. } | Event::ClientDetached { .. } => {
                self.client_events.allow_burst(Self::GUEST_EVENTS)
            }
            e if e.from_guest() => self.guest_events.allow_burst(Self::GUEST_EVENTS),
            _ => Some(0),
        };
        if let Some(n) = suppressed {
            crate::events::publish_after(&self.name, &e, n);
        }
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
    ($($arg:tt)+) => { $crate::log_limited!(error, $($arg)+) };
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

    /// The check of a path in a shared folder holds for what is opened,
    /// not only for what the path showed: a file swapped in between (here,
    /// the same file given to another user) is refused, and no symlink is
    /// followed (O_NOFOLLOW). Needs root to give a file away.
    #[test]
    fn a_file_swapped_in_after_the_check_is_refused() {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // SAFETY: geteuid has no memory effects.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("vub-swap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let p = dir.join("d.img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let trust = check_path_is_ours(&p, "image").unwrap();
        assert!(trust.nofollow());
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert!(trust
            .check_opened(&f.metadata().unwrap(), &p, "image")
            .is_err());
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &p).unwrap();
        let e = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
