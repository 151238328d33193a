//! Ceph RBD images as disks, through librbd's C API (loaded at run time,
//! see `ffi`). Reads, writes, flush, discard and write-zeroes are started
//! with librbd's asynchronous calls straight on the guest's buffers; their
//! completions arrive on librbd's threads and go to the reactor that owns
//! the request through its tag (no thread of ours waits). The pool's
//! synchronous path (several discard ranges, a redo) waits for the same
//! calls.
//!
//! One cluster connection (`rados_t`) per configuration file, user and
//! options serves every disk of the target that names them. The image's
//! exclusive lock is taken at open in exclusive mode: a second target on
//! the same image is refused, and a target that died holding it is taken
//! over (Ceph blocklists the dead client). A cluster that stops answering
//! makes requests fail after the op timeouts set here (librados waits
//! forever by default), per the device's error policy.

mod ffi;

use std::ffi::{c_int, c_void, CString};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use super::io::{AioTag, Backend, GuestIov};
use super::request::{IoKind, IoRequest};
use super::OpenError;
use crate::memory::as_iovecs;

/// How long librados waits for an OSD or a monitor before the request
/// fails with ETIMEDOUT, unless the disk's options say otherwise.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(10);

/// An `rbd:` disk: QEMU's filename form,
/// `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE]...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub snap: Option<String>,
    /// Ceph's configuration file (default: librados's search, which starts
    /// with $CEPH_CONF and /etc/ceph/ceph.conf).
    pub conf: Option<PathBuf>,
    /// The Ceph user, without `client.` (default: admin).
    pub id: Option<String>,
    /// librados / librbd options, set after the file is read.
    pub options: Vec<(String, String)>,
}

impl std::str::FromStr for RbdSpec {
    type Err = String;

    /// Parses what follows `rbd:`.
    fn from_str(s: &str) -> Result<RbdSpec, String> {
        let form = "rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE]";
        let mut parts = s.split(':');
        let path = parts.next().unwrap_or_default();
        let (path, snap) = match path.split_once('@') {
            Some((p, snap)) if !snap.is_empty() => (p, Some(snap.to_string())),
            Some(_) => return Err(format!("rbd:{s}: empty snapshot name ({form})")),
            None => (path, None),
        };
        let names: Vec<&str> = path.split('/').collect();
        let (pool, namespace, image) = match names[..] {
            [pool, image] => (pool, None, image),
            [pool, ns, image] if !ns.is_empty() => (pool, Some(ns.to_string()), image),
            _ => return Err(format!("rbd:{s}: give the pool and the image ({form})")),
        };
        if pool.is_empty() || image.is_empty() {
            return Err(format!("rbd:{s}: give the pool and the image ({form})"));
        }
        let mut spec = RbdSpec {
            pool: pool.to_string(),
            namespace,
            image: image.to_string(),
            snap,
            conf: None,
            id: None,
            options: Vec::new(),
        };
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .ok_or_else(|| format!("rbd:{s}: '{opt}' is not KEY=VALUE ({form})"))?;
            match k {
                "conf" => spec.conf = Some(PathBuf::from(v)),
                "id" => spec.id = Some(v.strip_prefix("client.").unwrap_or(v).to_string()),
                _ => spec.options.push((k.to_string(), v.to_string())),
            }
        }
        // Every string goes to C: none may hold a NUL.
        if s.contains('\0') {
            return Err("rbd: a NUL byte in the disk name".into());
        }
        Ok(spec)
    }
}

impl std::fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.write_spec(f, false)
    }
}

impl RbdSpec {
    /// The spec as it is given, secrets included (for the owner-only
    /// `--config` file, which must open the image again).
    pub fn full_text(&self) -> String {
        let mut s = String::new();
        let _ = self.write_spec(&mut s, true);
        s
    }

    /// The spec's text; a `key=` only with `reveal` (a secret is not
    /// repeated in logs and listings).
    fn write_spec(&self, f: &mut impl std::fmt::Write, reveal: bool) -> std::fmt::Result {
        write!(f, "rbd:{}/", self.pool)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}", self.image)?;
        if let Some(snap) = &self.snap {
            write!(f, "@{snap}")?;
        }
        if let Some(c) = &self.conf {
            write!(f, ":conf={}", c.display())?;
        }
        if let Some(id) = &self.id {
            write!(f, ":id={id}")?;
        }
        for (k, v) in &self.options {
            if option_name(k) == "key" && !reveal {
                write!(f, ":{k}=(hidden)")?;
            } else {
                write!(f, ":{k}={v}")?;
            }
        }
        Ok(())
    }
}

fn cstr(s: &str) -> Result<CString, OpenError> {
    CString::new(s).map_err(|_| OpenError::Rbd(format!("'{s}' holds a NUL byte")))
}

fn errno_text(r: c_int) -> String {
    let text = io::Error::from_raw_os_error(-r).to_string();
    if -r == libc::ESHUTDOWN {
        // Ceph's EBLOCKLISTED.
        return format!(
            "{text}: this client was blocklisted by the cluster (a lock it held was broken or \
             taken over); every disk of the target on the same connection is fenced"
        );
    }
    text
}

/// Ceph reads `-`, ` ` and `_` in option names alike.
fn option_name(k: &str) -> String {
    k.trim()
        .chars()
        .map(|c| {
            if c == '-' || c == ' ' {
                '_'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// Options the disk's name may not set: they name files or sockets the
/// target would create or write (set them in the configuration file).
const REFUSED_OPTIONS: [&str; 9] = [
    "admin_socket",
    "log_file",
    "log_to_file",
    "run_dir",
    "crash_dir",
    "plugin_dir",
    "erasure_code_dir",
    "mon_cluster_log_file",
    "pid_file",
];
/// Options naming files librados reads: each must be a regular file
/// (a FIFO would block the opening thread forever).
const READ_PATH_OPTIONS: [&str; 2] = ["keyring", "keyfile"];
/// Options whose guard the target sets; turning it off is said in the log.
const GUARD_OPTIONS: [(&str, &str, &str); 4] = [
    ("rados_osd_op_timeout", "0", "a request to an OSD that stops answering waits forever, and with it reset, unmap, remove and shutdown"),
    ("rados_mon_op_timeout", "0", "a monitor that stops answering holds the target forever"),
    ("client_mount_timeout", "0", "a cluster that does not answer holds the disk's opening forever"),
    ("rbd_skip_partial_discard", "true", "a discard or write-zeroes of part of an object may read back old data"),
];

/// The disk name's options as librados gets them: refused ones refused,
/// files it reads opened (into `held`) and named by descriptor, a guard
/// turned off said in the log.
fn user_options<'a>(
    options: &'a [(String, String)],
    held: &mut Vec<std::fs::File>,
) -> Result<Vec<(&'a str, String)>, OpenError> {
    let mut user = Vec::new();
    for (k, v) in options {
        let name = option_name(k);
        if REFUSED_OPTIONS.contains(&name.as_str()) {
            return Err(OpenError::Rbd(format!(
                "option {k} may not be set in the disk's name (it names a file the target \
                 would write); set it in the Ceph configuration file"
            )));
        }
        let v = if READ_PATH_OPTIONS.contains(&name.as_str()) {
            let (f, named) = regular_file(k, v)?;
            held.push(f);
            named
        } else {
            v.clone()
        };
        for (g, off, why) in GUARD_OPTIONS {
            if name == g && v.eq_ignore_ascii_case(off) {
                log::warn!("Ceph option {k}={v}: {why}");
            }
        }
        user.push((k.as_str(), v));
    }
    Ok(user)
}

/// Opens `path` for librados without blocking and checks it is a regular
/// file: the open file (kept by the caller until librados has read it)
/// and the path that names it, whatever is put at `path` meanwhile.
fn regular_file(what: &str, path: &str) -> Result<(std::fs::File, String), OpenError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| OpenError::Rbd(format!("{what} {path}: {e}")))?;
    let meta = f
        .metadata()
        .map_err(|e| OpenError::Rbd(format!("{what} {path}: {e}")))?;
    if !meta.is_file() {
        return Err(OpenError::Rbd(format!(
            "{what} {path} is not a regular file"
        )));
    }
    let named = format!("/proc/self/fd/{}", f.as_raw_fd());
    Ok((f, named))
}

/// What identifies a cluster connection: disks that agree on all of it
/// share one.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClusterKey {
    conf: Option<PathBuf>,
    id: String,
    options: Vec<(String, String)>,
}

/// A connected `rados_t`, shut down when the last disk on it is gone.
struct Cluster {
    lib: &'static ffi::Lib,
    rados: ffi::Rados,
    key: ClusterKey,
}

// SAFETY: a rados_t may be used from any thread (librados locks inside);
// it is shut down once, in Drop, when no image uses it any more.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: connected (or created) by us; no image or ioctx of it is
        // left (each holds an Arc of this).
        unsafe { (self.lib.rados_shutdown)(self.rados) };
    }
}

/// Options every connection gets before the user's: no librbd cache (the
/// device's cache mode is none), discards that leave zeros, and timeouts,
/// so that a cluster that stops answering fails requests instead of
/// hanging them.
fn default_options() -> Vec<(&'static str, String)> {
    let t = DEFAULT_OP_TIMEOUT.as_secs().to_string();
    vec![
        ("rbd_cache", "false".into()),
        ("rbd_skip_partial_discard", "false".into()),
        ("rados_osd_op_timeout", t.clone()),
        ("rados_mon_op_timeout", t.clone()),
        ("client_mount_timeout", t),
    ]
}

impl Cluster {
    /// The target's connection for `key`: the one already open, or a new
    /// one.
    fn get(lib: &'static ffi::Lib, key: ClusterKey) -> Result<Arc<Cluster>, OpenError> {
        static CLUSTERS: Mutex<Vec<Weak<Cluster>>> = Mutex::new(Vec::new());
        let mut all = CLUSTERS.lock();
        all.retain(|w| w.strong_count() > 0);
        if let Some(c) = all.iter().filter_map(Weak::upgrade).find(|c| c.key == key) {
            return Ok(c);
        }
        let c = Arc::new(Cluster::connect(lib, key)?);
        all.push(Arc::downgrade(&c));
        Ok(c)
    }

    fn connect(lib: &'static ffi::Lib, key: ClusterKey) -> Result<Cluster, OpenError> {
        let name = cstr(&format!("client.{}", key.id))?;
        let cluster_name = cstr("ceph")?;
        let mut rados: ffi::Rados = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; strings live across the call.
        let r = unsafe { (lib.rados_create2)(&mut rados, cluster_name.as_ptr(), name.as_ptr(), 0) };
        if r < 0 {
            return Err(OpenError::Rbd(format!(
                "cannot create a cluster handle for client.{}: {}",
                key.id,
                errno_text(r)
            )));
        }
        // From here, Drop shuts the handle down on every way out.
        let c = Cluster { lib, rados, key };
        // Files librados reads, held open until it has (see regular_file).
        let mut held = Vec::new();
        let conf = match &c.key.conf {
            Some(p) => {
                let (f, named) = regular_file("the Ceph configuration", &p.to_string_lossy())?;
                held.push(f);
                Some(cstr(&named)?)
            }
            None => None,
        };
        let conf_ptr = conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: a handle of ours; the path (or NULL: the default search)
        // lives across the call.
        let r = unsafe { (lib.rados_conf_read_file)(c.rados, conf_ptr) };
        if r < 0 {
            return Err(OpenError::Rbd(format!(
                "cannot read the Ceph configuration {}: {}",
                c.key.conf.as_ref().map_or(
                    "(default search: $CEPH_CONF, /etc/ceph/ceph.conf)".into(),
                    |p| p.display().to_string()
                ),
                errno_text(r)
            )));
        }
        let defaults = default_options();
        let user = user_options(&c.key.options, &mut held)?;
        for (k, v) in defaults.into_iter().chain(user) {
            let (ck, cv) = (cstr(k)?, cstr(&v)?);
            // SAFETY: as above.
            let r = unsafe { (lib.rados_conf_set)(c.rados, ck.as_ptr(), cv.as_ptr()) };
            if r == -libc::ENOENT {
                return Err(OpenError::Rbd(format!("{k}: no such Ceph option")));
            }
            if r < 0 {
                return Err(OpenError::Rbd(format!(
                    "Ceph option {k}={v}: {}",
                    errno_text(r)
                )));
            }
        }
        c.connect_unpinned()?;
        drop(held);
        Ok(c)
    }

    /// Connects from a thread on the I/O threads' CPUs (those of the
    /// process, before the engine set them): librados's threads inherit
    /// the mask of the thread that connects, and must keep off busy
    /// reactors' CPUs as the pool's workers do.
    fn connect_unpinned(&self) -> Result<(), OpenError> {
        let rados = self.rados as usize;
        let lib = self.lib;
        let r = std::thread::Builder::new()
            .name("rbd-connect".into())
            .spawn(move || {
                match crate::util::helper_cpus() {
                    Some(cpus) => crate::util::pin_to(cpus),
                    None => process_cpus_for_this_thread(),
                }
                // SAFETY: the handle outlives this thread (joined below).
                unsafe { (lib.rados_connect)(rados as ffi::Rados) }
            })
            .map_err(|e| OpenError::Rbd(format!("cannot start a thread: {e}")))?
            .join()
            .map_err(|_| OpenError::Rbd("the connecting thread panicked".into()))?;
        if r < 0 {
            return Err(OpenError::Rbd(format!(
                "cannot connect to the Ceph cluster as client.{}: {} (are the monitors \
                 in the configuration reachable, and the keyring readable?)",
                self.key.id,
                errno_text(r)
            )));
        }
        Ok(())
    }
}

/// Gives the calling thread the CPU set of the process's main thread.
fn process_cpus_for_this_thread() {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: getpid names the main thread; the pointer and size describe
    // `set`.
    let r = unsafe { libc::sched_getaffinity(libc::getpid(), size, &mut set) };
    if r == 0 {
        // SAFETY: 0 is this thread; `set` is a valid mask.
        unsafe { libc::sched_setaffinity(0, size, &set) };
    }
}

/// An open image, closed (its lock released) when the last user is gone.
struct Image {
    lib: &'static ffi::Lib,
    image: ffi::Image,
    ioctx: ffi::IoCtx,
    _cluster: Arc<Cluster>,
    /// This client holds the image's exclusive lock.
    locked: bool,
}

// SAFETY: librbd image handles are used from any thread (librbd locks
// inside); closed once, in Drop, after every request on it completed (the
// engine holds the backend until then).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// Closes (which releases the exclusive lock, talking to the cluster)
/// and the end of a size watch run on threads of their own: a cluster that
/// stops answering holds them up to its op timeouts, several times over,
/// and must hold no reactor, management connection or other disk.
static CLOSING: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

fn close_later(what: &'static str, f: impl FnOnce() + Send + 'static) {
    let mut f = Some(f);
    let spawned = std::thread::Builder::new().name(what.into()).spawn({
        let f = f.take();
        move || {
            if let Some(f) = f {
                f();
            }
        }
    });
    match spawned {
        Ok(t) => {
            let mut all = CLOSING.lock();
            all.retain(|t| !t.is_finished());
            all.push(t);
        }
        Err(e) => {
            log::warn!("cannot start a thread to close an RBD image ({e}): closing here");
            if let Some(f) = f {
                f();
            }
        }
    }
}

/// Waits up to `limit` for the images being closed (graceful shutdown: a
/// closed image's lock is free for the next target at once, where one left
/// held is taken over only once Ceph gives up on us).
pub fn wait_closed(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = {
            let mut all = CLOSING.lock();
            all.retain(|t| !t.is_finished());
            all.len()
        };
        if left == 0 {
            return;
        }
        if std::time::Instant::now() >= deadline {
            log::warn!("{left} RBD image(s) still closing after {limit:?}: not waited for");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let (lib, image, ioctx) = (self.lib, self.image as usize, self.ioctx as usize);
        let cluster = self._cluster.clone();
        close_later("rbd-close", move || {
            // SAFETY: handles of ours, released once, image before its
            // ioctx, and both before the cluster (held until here). Closing
            // releases the exclusive lock.
            unsafe {
                (lib.rbd_close)(image as ffi::Image);
                (lib.rados_ioctx_destroy)(ioctx as ffi::IoCtx);
            }
            drop(cluster);
        });
    }
}

impl Image {
    /// The value of option `name` as this image has it (its own and its
    /// pool's settings in the cluster override the client's).
    fn option(&self, name: &str) -> Option<String> {
        let mut max: c_int = 256;
        for _ in 0..3 {
            let n = usize::try_from(max).ok()?;
            let mut opts: Vec<ffi::ConfigOption> = (0..n)
                .map(|_| ffi::ConfigOption {
                    name: std::ptr::null_mut(),
                    value: std::ptr::null_mut(),
                    source: 0,
                })
                .collect();
            // SAFETY: an open image; `opts` has room for `max` entries.
            let r = unsafe {
                (self.lib.rbd_config_image_list)(self.image, opts.as_mut_ptr(), &mut max)
            };
            if r == -libc::ERANGE {
                continue;
            }
            if r < 0 {
                return None;
            }
            let found = opts[..usize::try_from(max).ok()?.min(n)]
                .iter()
                .find_map(|o| {
                    // SAFETY: librbd filled name and value with C strings,
                    // valid until the cleanup below.
                    let (k, v) = unsafe {
                        (
                            std::ffi::CStr::from_ptr(o.name),
                            std::ffi::CStr::from_ptr(o.value),
                        )
                    };
                    (k.to_bytes() == name.as_bytes()).then(|| v.to_string_lossy().into_owned())
                });
            // SAFETY: what librbd filled, released once.
            unsafe { (self.lib.rbd_config_image_list_cleanup)(opts.as_mut_ptr(), max) };
            return found;
        }
        None
    }

    /// Whether librbd caches writes for this image: false only when it
    /// says so in a way Ceph reads as false (unknown counts as caching).
    fn write_back(&self) -> bool {
        let v = self.option("rbd_cache");
        !matches!(
            v.as_deref().map(str::to_ascii_lowercase).as_deref(),
            Some("false" | "0" | "no" | "off")
        )
    }

    fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image; out-pointer to a local.
        let r = unsafe { (self.lib.rbd_get_size)(self.image, &mut size) };
        if r < 0 {
            return Err(io::Error::from_raw_os_error(-r));
        }
        Ok(size)
    }

    /// Starts one operation with completion `c`; a negative errno when
    /// librbd refused it at once.
    fn start(&self, io: Op<'_>, c: ffi::Completion) -> c_int {
        let l = self.lib;
        let img = self.image;
        // SAFETY: an open image and a completion of ours. The iovecs point
        // into guest memory that the request's buffers hold mapped until
        // the completion has run (the engine keeps the request in its slot,
        // or the pool thread waits for it).
        unsafe {
            match io {
                Op::Read(iov, off) | Op::Write(iov, off) => {
                    let v = as_iovecs(iov);
                    let Ok(n) = c_int::try_from(v.len()) else {
                        return -libc::EINVAL;
                    };
                    if matches!(io, Op::Read(..)) {
                        (l.rbd_aio_readv)(img, v.as_ptr(), n, off, c)
                    } else {
                        (l.rbd_aio_writev)(img, v.as_ptr(), n, off, c)
                    }
                }
                Op::Flush => (l.rbd_aio_flush)(img, c),
                Op::Discard(off, len) => (l.rbd_aio_discard)(img, off, len, c),
                Op::WriteZeroes(off, len) => match usize::try_from(len) {
                    Ok(len) => (l.rbd_aio_write_zeroes)(img, off, len, c, 0, 0),
                    Err(_) => -libc::EINVAL,
                },
            }
        }
    }

    /// Runs one operation and waits for it (the pool's path).
    fn run(&self, op: Op<'_>) -> io::Result<isize> {
        let mut c: ffi::Completion = std::ptr::null_mut();
        // SAFETY: no callback; out-pointer to a local.
        let r = unsafe { (self.lib.rbd_aio_create_completion)(std::ptr::null_mut(), None, &mut c) };
        if r < 0 {
            return Err(io::Error::from_raw_os_error(-r));
        }
        let r = self.start(op, c);
        let res = if r < 0 {
            isize::try_from(r).unwrap_or(-5)
        } else {
            // SAFETY: a completion of ours, started above.
            unsafe {
                (self.lib.rbd_aio_wait_for_complete)(c);
                (self.lib.rbd_aio_get_return_value)(c)
            }
        };
        // SAFETY: released once, after it completed (or never started).
        unsafe { (self.lib.rbd_aio_release)(c) };
        if res < 0 {
            let e = i32::try_from(-res).unwrap_or(libc::EIO);
            return Err(io::Error::from_raw_os_error(e));
        }
        Ok(res)
    }
}

#[derive(Clone, Copy)]
enum Op<'a> {
    Read(&'a [GuestIov], u64),
    Write(&'a [GuestIov], u64),
    Flush,
    Discard(u64, u64),
    WriteZeroes(u64, u64),
}

/// librbd's completion callback: hands the result to the request's tag.
unsafe extern "C" fn aio_done(c: ffi::Completion, arg: *mut c_void) {
    let Ok(lib) = ffi::lib() else { return };
    // SAFETY: `c` is the completion this callback was created with; it is
    // released here, once, after its value is read.
    let res = unsafe {
        let r = (lib.rbd_aio_get_return_value)(c);
        (lib.rbd_aio_release)(c);
        r
    };
    // SAFETY: `arg` is the reference `submit_async` turned into a raw
    // pointer for this completion; it is turned back once.
    let tag = unsafe { Arc::from_raw(arg.cast_const().cast::<AioTag>()) };
    tag.complete(i64::try_from(res).unwrap_or(-i64::from(libc::EIO)));
}

/// What a size watch hands from librbd's thread to ours.
struct WatchCtx {
    tx: crossbeam_channel::Sender<()>,
}

/// librbd's header-update callback: the image changed (size, features,
/// snapshots); our watcher thread looks.
unsafe extern "C" fn header_updated(arg: *mut c_void) {
    // SAFETY: `arg` is the WatchCtx kept boxed by the backend until after
    // rbd_update_unwatch returned (no callback runs after that).
    let ctx = unsafe { &*arg.cast_const().cast::<WatchCtx>() };
    let _ = ctx.tx.try_send(());
}

/// The device's function for a new size, once it has given one.
type SizeWatcher = Arc<Mutex<Option<Box<dyn Fn(u64) + Send + Sync>>>>;

/// The size watch: librbd's callback wakes a thread of ours that reads the
/// size and calls the device's function when it changed.
struct Watch {
    handle: u64,
    ctx: Box<WatchCtx>,
    notify: SizeWatcher,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct RbdBackend {
    image: Arc<Image>,
    name: String,
    /// librbd caches this image's writes (`rbd_cache`, however it was
    /// set): a write-through write needs its flush.
    write_back: bool,
    watch: Mutex<Option<Watch>>,
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        let Some(mut w) = self.watch.lock().take() else {
            return;
        };
        // The image stays open (this reference) until the watch is gone.
        let image = self.image.clone();
        close_later("rbd-unwatch", move || {
            // SAFETY: a watch of this open image; after this returns no
            // callback runs, so the context may go.
            unsafe { (image.lib.rbd_update_unwatch)(image.image, w.handle) };
            let (tx, _) = crossbeam_channel::bounded(1);
            drop(std::mem::replace(&mut w.ctx.tx, tx));
            // The watch thread ends at the closed channel (it may be the
            // thread that dropped the backend: it is not this one).
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
            drop(image);
        });
    }
}

/// Opens the image `spec` names (read-only, or writable with its exclusive
/// lock taken): its size and its backend.
pub fn open(spec: &RbdSpec, readonly: bool) -> Result<(u64, Arc<dyn Backend>), OpenError> {
    let lib = ffi::lib().map_err(OpenError::Rbd)?;
    if spec.snap.is_some() && !readonly {
        return Err(OpenError::Rbd(
            "a snapshot is read-only; add readonly=on (--readonly)".into(),
        ));
    }
    let key = ClusterKey {
        conf: spec.conf.clone(),
        id: spec.id.clone().unwrap_or_else(|| "admin".into()),
        options: spec.options.clone(),
    };
    let cluster = Cluster::get(lib, key)?;
    let image = open_image(lib, cluster, spec, readonly).map_err(OpenError::Rbd)?;
    let size = image
        .size()
        .map_err(|e| OpenError::Rbd(format!("cannot read the image's size: {e}")))?;
    // However it was set (our option, the user's, the image's or its
    // pool's in the cluster): with librbd's cache on, a write-through
    // write needs a flush before it completes.
    let write_back = image.write_back();
    if write_back {
        log::info!("{spec}: librbd caches writes for this image (rbd_cache)");
    }
    let backend = Arc::new(RbdBackend {
        image: Arc::new(image),
        name: format!("{}/{}", spec.pool, spec.image),
        write_back,
        watch: Mutex::new(None),
    });
    if spec.snap.is_none() {
        backend.start_watch();
    }
    Ok((size, backend))
}

fn open_image(
    lib: &'static ffi::Lib,
    cluster: Arc<Cluster>,
    spec: &RbdSpec,
    readonly: bool,
) -> Result<Image, String> {
    let pool = cstr(&spec.pool).map_err(|e| e.to_string())?;
    let mut ioctx: ffi::IoCtx = std::ptr::null_mut();
    // SAFETY: a connected handle; out-pointer to a local.
    let r = unsafe { (lib.rados_ioctx_create)(cluster.rados, pool.as_ptr(), &mut ioctx) };
    if r < 0 {
        return Err(format!(
            "cannot open pool '{}': {}",
            spec.pool,
            errno_text(r)
        ));
    }
    if let Some(ns) = &spec.namespace {
        let ns = cstr(ns).map_err(|e| e.to_string());
        match ns {
            // SAFETY: our ioctx; the string lives across the call.
            Ok(ns) => unsafe { (lib.rados_ioctx_set_namespace)(ioctx, ns.as_ptr()) },
            Err(e) => {
                // SAFETY: created above, destroyed once.
                unsafe { (lib.rados_ioctx_destroy)(ioctx) };
                return Err(e);
            }
        }
    }
    let opened = open_handle(lib, ioctx, spec, readonly);
    let handle = match opened {
        Ok(h) => h,
        Err(e) => {
            // SAFETY: no image was opened on it: the ioctx goes, once.
            unsafe { (lib.rados_ioctx_destroy)(ioctx) };
            return Err(e);
        }
    };
    // From here, Drop closes the image and the ioctx on every way out.
    let mut image = Image {
        lib,
        image: handle,
        ioctx,
        _cluster: cluster,
        locked: false,
    };
    if !readonly {
        lock_image(&mut image)?;
    }
    Ok(image)
}

/// Opens the image in `ioctx`: its librbd handle.
fn open_handle(
    lib: &'static ffi::Lib,
    ioctx: ffi::IoCtx,
    spec: &RbdSpec,
    readonly: bool,
) -> Result<ffi::Image, String> {
    let name = cstr(&spec.image).map_err(|e| e.to_string())?;
    let snap = spec.snap.as_deref().map(cstr).transpose();
    let snap = snap.map_err(|e| e.to_string())?;
    let snap_ptr = snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // A read-only disk opens the image as a writer would (but never
    // writes nor locks it), so that librbd watches its header and an
    // outside resize reaches the guest; a user whose caps allow only
    // reading gets librbd's read-only handle, which has no watch.
    // A snapshot never changes: read-only handle.
    let mut handle: ffi::Image = std::ptr::null_mut();
    let open = if readonly && snap.is_some() {
        lib.rbd_open_read_only
    } else {
        lib.rbd_open
    };
    // SAFETY: our ioctx; strings and the out-pointer live across the
    // call.
    let mut r = unsafe { open(ioctx, name.as_ptr(), &mut handle, snap_ptr) };
    if readonly && matches!(-r, libc::EPERM | libc::EACCES) {
        log::warn!(
            "{spec}: opened with librbd's read-only handle (the user may not watch the \
             image): a resize elsewhere does not reach the guest"
        );
        // SAFETY: as above.
        r = unsafe { (lib.rbd_open_read_only)(ioctx, name.as_ptr(), &mut handle, snap_ptr) };
    }
    if r < 0 {
        return Err(format!("cannot open the image: {}", errno_text(r)));
    }
    Ok(handle)
}

/// Takes the image's exclusive lock in exclusive mode: no other client
/// may take it from us while we run, and we refuse to start while a live
/// one holds it. A dead holder's lock is broken by librbd (and the dead
/// client blocklisted).
fn lock_image(image: &mut Image) -> Result<(), String> {
    let lib = image.lib;
    let mut features = 0u64;
    // SAFETY: an open image; out-pointer to a local.
    let r = unsafe { (lib.rbd_get_features)(image.image, &mut features) };
    if r < 0 {
        return Err(format!(
            "cannot read the image's features: {}",
            errno_text(r)
        ));
    }
    if features & ffi::FEATURE_EXCLUSIVE_LOCK == 0 {
        log::warn!(
            "the image has no exclusive-lock feature: nothing keeps a second target from \
             writing it at the same time (rbd feature enable POOL/IMAGE exclusive-lock)"
        );
        return Ok(());
    }
    // SAFETY: an open image.
    let r = unsafe { (lib.rbd_lock_acquire)(image.image, ffi::LOCK_MODE_EXCLUSIVE) };
    if r < 0 {
        return Err(match -r {
            libc::EROFS | libc::EBUSY | libc::EAGAIN => format!(
                "the image is in use: another client holds its exclusive lock ({})",
                errno_text(r)
            ),
            _ => format!("cannot take the image's exclusive lock: {}", errno_text(r)),
        });
    }
    image.locked = true;
    Ok(())
}

impl RbdBackend {
    fn start_watch(&self) {
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let ctx = Box::new(WatchCtx { tx });
        let mut handle = 0u64;
        let arg = std::ptr::from_ref::<WatchCtx>(&ctx)
            .cast_mut()
            .cast::<c_void>();
        // SAFETY: an open image; `arg` points at the boxed context, kept
        // until after the unwatch in Drop.
        let r = unsafe {
            (self.image.lib.rbd_update_watch)(self.image.image, &mut handle, header_updated, arg)
        };
        if r < 0 {
            log::warn!(
                "{}: cannot watch the image for resizes: {}",
                self.name,
                errno_text(r)
            );
            return;
        }
        let notify = SizeWatcher::default();
        let (image, n) = (self.image.clone(), notify.clone());
        let thread = std::thread::Builder::new()
            .name("rbd-watch".into())
            .spawn(move || {
                // Every change of the header is looked at: the device
                // compares the size with its own (one it could not follow
                // before is tried again).
                while rx.recv().is_ok() {
                    let Ok(size) = image.size() else { continue };
                    if let Some(f) = n.lock().as_ref() {
                        f(size);
                    }
                }
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!("{}: cannot start the resize watch: {e}", self.name);
                None
            }
        };
        *self.watch.lock() = Some(Watch {
            handle,
            ctx,
            notify,
            thread,
        });
    }
}

impl Backend for RbdBackend {
    fn hand_off(&self) -> io::Result<()> {
        if !self.image.locked {
            return Ok(());
        }
        // SAFETY: an open image with nothing in flight (the upgrade drained it).
        let r = unsafe { (self.image.lib.rbd_lock_release)(self.image.image) };
        if r < 0 {
            return Err(io::Error::from_raw_os_error(-r));
        }
        Ok(())
    }

    fn take_back(&self) -> io::Result<()> {
        if !self.image.locked {
            return Ok(());
        }
        // SAFETY: an open image.
        let r = unsafe {
            (self.image.lib.rbd_lock_acquire)(self.image.image, ffi::LOCK_MODE_EXCLUSIVE)
        };
        if r < 0 {
            return Err(io::Error::from_raw_os_error(-r));
        }
        Ok(())
    }

    fn read_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        let n = self.image.run(Op::Read(iov, offset))?;
        let want: usize = iov.iter().map(GuestIov::len).sum();
        if let Ok(n) = usize::try_from(n) {
            if n < want {
                crate::memory::zero_tail(iov, n);
            }
        }
        Ok(())
    }
    fn write_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        self.image.run(Op::Write(iov, offset)).map(drop)
    }
    fn flush(&self) -> io::Result<()> {
        self.image.run(Op::Flush).map(drop)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image.run(Op::Discard(offset, len)).map(drop)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.image.run(Op::WriteZeroes(offset, len)).map(drop)
    }
    fn inline(&self) -> bool {
        false
    }
    fn zeroes_are_written(&self) -> bool {
        false
    }
    fn is_async(&self) -> bool {
        true
    }

    fn submit_async(&self, io: &IoRequest, tag: &Arc<AioTag>) -> Option<io::Result<()>> {
        let op = match io.kind {
            IoKind::Read if !io.iov.is_empty() => Op::Read(&io.iov, io.offset),
            IoKind::Write if io.sync && self.write_back => return None,
            IoKind::Write if !io.iov.is_empty() => Op::Write(&io.iov, io.offset),
            IoKind::Flush => Op::Flush,
            IoKind::Discard if io.ranges.len() == 1 => Op::Discard(io.ranges[0].0, io.ranges[0].1),
            IoKind::WriteZeroes if io.ranges.len() == 1 => {
                Op::WriteZeroes(io.ranges[0].0, io.ranges[0].1)
            }
            // Several ranges, or none: the pool runs them one by one.
            _ => return None,
        };
        let lib = self.image.lib;
        let arg = Arc::into_raw(tag.clone()).cast_mut().cast::<c_void>();
        let mut c: ffi::Completion = std::ptr::null_mut();
        // SAFETY: `arg` is a counted reference the callback takes back;
        // out-pointer to a local.
        let r = unsafe { (lib.rbd_aio_create_completion)(arg, Some(aio_done), &mut c) };
        let r = if r < 0 { r } else { self.image.start(op, c) };
        if r < 0 {
            // Refused at once: no callback comes. Take the reference back
            // and release what was made.
            // SAFETY: `arg` came from Arc::into_raw above and is used once.
            drop(unsafe { Arc::from_raw(arg.cast_const().cast::<AioTag>()) });
            if !c.is_null() {
                // SAFETY: created above, never started.
                unsafe { (lib.rbd_aio_release)(c) };
            }
            return Some(Err(io::Error::from_raw_os_error(-r)));
        }
        // With librbd's cache off (our default), a completed write is on
        // the OSDs already: write-through needs nothing more.
        Some(Ok(()))
    }

    fn watch_size(&self, f: Box<dyn Fn(u64) + Send + Sync>) {
        if let Some(w) = self.watch.lock().as_ref() {
            *w.notify.lock() = Some(f);
        }
    }

    fn resize(&self, size: Option<u64>) -> io::Result<u64> {
        if let Some(s) = size {
            // SAFETY: an open image.
            let r = unsafe { (self.image.lib.rbd_resize)(self.image.image, s) };
            if r < 0 {
                return Err(io::Error::from_raw_os_error(-r));
            }
        }
        self.image.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qemu_filename_form_is_parsed_and_printed_back() {
        let s: RbdSpec = "rbd/vm1:conf=/etc/ceph/x.conf:id=vm:rbd_cache=true"
            .parse()
            .unwrap();
        assert_eq!(s.pool, "rbd");
        assert_eq!(s.image, "vm1");
        assert_eq!(s.conf, Some(PathBuf::from("/etc/ceph/x.conf")));
        assert_eq!(s.id.as_deref(), Some("vm"));
        assert_eq!(s.options, vec![("rbd_cache".into(), "true".into())]);
        assert_eq!(
            s.to_string(),
            "rbd:rbd/vm1:conf=/etc/ceph/x.conf:id=vm:rbd_cache=true"
        );
        let s: RbdSpec = "p/ns/img@snap1".parse().unwrap();
        assert_eq!(s.namespace.as_deref(), Some("ns"));
        assert_eq!(s.snap.as_deref(), Some("snap1"));
        assert_eq!(s.to_string(), "rbd:p/ns/img@snap1");
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "", "pool", "/img", "pool/", "a/b/c/d", "p/i@", "p/i:conf", "p/i:=x",
        ] {
            assert!(bad.parse::<RbdSpec>().is_err(), "{bad} was accepted");
        }
    }
}
