//! Replacing the running binary in place, for a live upgrade: `execve`
//! keeps the process (its PID, its parent, every descriptor that is not
//! close-on-exec) and replaces everything else. What the process serves
//! survives as descriptors plus a description of them (the state, in a
//! sealed memfd); the new binary takes both up (see `target::upgrade`).
//!
//! Every way the new binary can fail leaves the old one serving:
//! - before anything stops, the new binary is run once in a check mode
//!   (same arguments) and must say which state versions it reads: a path
//!   that is not an executable, a program that is not ours (`/bin/false`),
//!   arguments it no longer takes and an older binary that cannot read
//!   this state are refused here;
//! - a new binary that finds the state unusable executes the old binary
//!   again (kept open as a descriptor, so replacing the file on disk does
//!   not matter) with the same state, in the same process;
//! - a new binary that dies before it has taken over (a crash) leaves a
//!   watchdog process, forked just before the exec and holding copies of
//!   every handed-over descriptor, to execute the old binary with the
//!   state. That process is a new one (the PID changes) but the guests
//!   keep their disks.

use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The state format this binary writes and reads (and every older one it
/// still reads: none yet).
pub const STATE_VERSION: u32 = 1;

const ENV_STATE: &str = "VFIO_USER_BLK_UPGRADE_STATE";
const ENV_ROLLBACK: &str = "VFIO_USER_BLK_UPGRADE_ROLLBACK";
const ENV_RESCUED: &str = "VFIO_USER_BLK_UPGRADE_RESCUED";
const ENV_WATCHDOG: &str = "VFIO_USER_BLK_UPGRADE_WATCHDOG";
const ENV_CHECK: &str = "VFIO_USER_BLK_UPGRADE_CHECK";
const ENV_STOP: &str = "VFIO_USER_BLK_UPGRADE_STOP";
/// What the check mode prints first.
const CHECK_ANSWER: &str = "vfio-user-blk upgrade-check";
/// How long the check mode may take.
const CHECK_WAIT: Duration = Duration::from_secs(10);
/// Largest state read.
const MAX_STATE: u64 = 64 << 20;

/// Signals that stop the target (SIGINT, SIGTERM, SIGHUP) or start an
/// upgrade (SIGUSR2). The thread that executes another binary holds them
/// blocked: the mask and what is pending survive the exec, so one that
/// comes meanwhile is neither lost with the old image nor fatal to the
/// new one before it has its handlers (which would have the watchdog
/// "rescue" a process being stopped). The new binary lets them through
/// once it has taken over ([`release_signals`]).
const HELD: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR2];

/// Stop signals that came, counted by the signal handler itself (before
/// it looks for a relay: see [`register_stop_relay`]).
static STOPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether a stop signal came.
pub fn stop_asked() -> bool {
    STOPS.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// While an exec is prepared and made: an eventfd (inherited) that the
/// stop signals' handler counts into. Only the executing thread holds the
/// signals blocked: one that comes meanwhile is taken by another thread of
/// this image, whose handlers end with it; the count tells the next image.
static STOP_RELAY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Registers the handler that relays a stop signal across an exec under
/// way (call once, with the other handlers).
pub fn register_stop_relay() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the action only loads an atomic and writes 8 bytes to an
        // eventfd, both async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, || {
                // Counted first, then the relay looked for; the exec
                // publishes the relay first, then looks at the count: one
                // of the two sees the other (both sequentially consistent).
                STOPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let fd = STOP_RELAY.load(std::sync::atomic::Ordering::SeqCst);
                if fd >= 0 {
                    let one = 1u64.to_ne_bytes();
                    libc::write(fd, one.as_ptr().cast(), one.len());
                }
            })?;
        }
    }
    Ok(())
}

/// The new image has taken over (signals released): a stop relayed
/// from the image before is asked for again, here.
pub fn replay_stop(incoming_stop: Option<RawFd>) {
    let Some(fd) = incoming_stop else { return };
    let mut b = [0u8; 8];
    // SAFETY: a non-blocking read of at most 8 bytes into a live buffer
    // from the eventfd handed over, then closing it (nothing else owns it).
    let n = unsafe {
        let n = libc::read(fd, b.as_mut_ptr().cast(), b.len());
        libc::close(fd);
        n
    };
    if n == 8 && u64::from_ne_bytes(b) > 0 {
        log::warn!("a stop signal came while the binary was being replaced: stopping");
        // SAFETY: a signal to this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    }
}

fn held_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset fill it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in HELD {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the held signals in this thread; the mask before.
pub fn hold_signals() -> libc::sigset_t {
    let set = held_set();
    // SAFETY: sigset_t is plain data, filled by pthread_sigmask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: pointers to two live sigsets.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    old
}

/// Puts back the mask [`hold_signals`] returned.
pub fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: a pointer to a live sigset.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// Lets the held signals through in this thread (the main one, whose
/// handlers take them), and those that came while held are delivered.
pub fn release_signals() {
    let set = held_set();
    // SAFETY: a pointer to a live sigset.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// The command line and binary the process was first started with.
static ARGS: OnceLock<Vec<OsString>> = OnceLock::new();
static EXE: OnceLock<PathBuf> = OnceLock::new();

/// What a binary started by an upgrade was handed.
pub struct Incoming {
    pub state: Vec<u8>,
    /// The memfd the state came in (closed at commit).
    pub state_fd: RawFd,
    /// Set when this is the old binary taking its own state back: why the
    /// upgrade failed.
    pub rollback: Option<String>,
    /// The watchdog to tell that the new binary took over, and to reap.
    pub watchdog: Option<(RawFd, i32)>,
    /// Stop signals the image before took during the exec (an eventfd).
    pub stop: Option<RawFd>,
}

/// Called first in `main`: remembers how the process was started, and
/// takes what an upgrade handed over (the variables are removed, so that
/// no child sees them).
pub fn at_start() -> Result<Option<Incoming>, String> {
    let _ = ARGS.set(std::env::args_os().collect());
    let take = |k: &str| {
        let v = std::env::var(k).ok();
        std::env::remove_var(k);
        v
    };
    let state = take(ENV_STATE);
    let rollback = take(ENV_ROLLBACK);
    let rescued = take(ENV_RESCUED).is_some();
    let watchdog = take(ENV_WATCHDOG);
    let stop: Option<RawFd> = take(ENV_STOP)
        .and_then(|v| v.parse().ok())
        .filter(|&fd: &RawFd| fd > 2);
    let Some(state) = state else {
        let _ = EXE.set(std::env::current_exe().unwrap_or_default());
        return Ok(None);
    };
    let fd: RawFd = state
        .parse()
        .ok()
        .filter(|&fd| fd > 2)
        .ok_or_else(|| format!("{ENV_STATE}={state} is not a descriptor"))?;
    // SAFETY: fcntl on a descriptor number; an unknown one answers EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("the upgrade state descriptor {fd} is not open"));
    }
    // SAFETY: the previous binary handed this descriptor to us. It is
    // borrowed for the read (the number stays open until commit).
    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let mut buf = Vec::new();
    // From the start: a binary that gave the state back read it before.
    use std::io::Seek;
    (*f).rewind()
        .map_err(|e| format!("reading the upgrade state: {e}"))?;
    (&mut *f)
        .take(MAX_STATE)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading the upgrade state: {e}"))?;
    let watchdog = match (rescued, watchdog) {
        (false, Some(w)) => {
            let (a, b) = w.split_once(':').unwrap_or_default();
            a.parse().ok().zip(b.parse().ok())
        }
        _ => None,
    };
    Ok(Some(Incoming {
        state: buf,
        state_fd: fd,
        rollback,
        watchdog,
        stop,
    }))
}

/// The check mode: a binary asked whether it can take an upgrade answers
/// on standard output and stops (after its arguments were parsed).
pub fn checking() -> bool {
    std::env::var_os(ENV_CHECK).is_some()
}

pub fn check_answer() -> String {
    format!(
        "{CHECK_ANSWER} state-version={STATE_VERSION} version={}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The binary an upgrade runs when none is named: the one the target was
/// first started from, as it is on disk now.
pub fn default_binary() -> PathBuf {
    EXE.get().cloned().unwrap_or_default()
}

/// Remembers the first binary's path across upgrades.
pub fn set_default_binary(p: PathBuf) {
    let _ = EXE.set(p);
}

/// A new binary found fit to take over.
pub struct Launch {
    exe: std::fs::File,
    pub path: PathBuf,
    pub version: String,
}

/// Checks `path` and asks it, in check mode, what it can read.
pub fn prepare(path: &Path) -> Result<Launch, String> {
    use std::os::unix::fs::PermissionsExt;
    // Not a file another user planted or may change: what it runs as is us.
    let trust = crate::util::check_path_is_ours(path, "binary")?;
    let exe = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = exe
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    trust.check_opened(&meta, path, "binary")?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not an executable file", path.display()));
    }
    let args = ARGS.get().cloned().unwrap_or_default();
    // The file we opened, whatever the path names by now.
    let via = format!("/proc/self/fd/{}", exe.as_raw_fd());
    let mut child = std::process::Command::new(&via)
        .args(args.iter().skip(1))
        .env(ENV_CHECK, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{} cannot be run: {e}", path.display()))?;
    let until = Instant::now() + CHECK_WAIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer the upgrade check within {CHECK_WAIT:?}",
                    path.display()
                ));
            }
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = (&mut e).take(4096).read_to_string(&mut err);
    }
    let line = out.lines().next().unwrap_or_default();
    let Some(rest) = line.strip_prefix(CHECK_ANSWER) else {
        return Err(format!(
            "{} is not a vfio-user-blk that takes upgrades ({status}{}{})",
            path.display(),
            if err.trim().is_empty() { "" } else { ": " },
            err.trim()
        ));
    };
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|f| f.strip_prefix(k).map(str::to_string))
    };
    let reads: u32 = field("state-version=")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let version = field("version=").unwrap_or_default();
    let writes = written_version();
    if reads < writes {
        return Err(format!(
            "{} (version {version}) reads upgrade state up to version {reads}; this binary \
             writes version {writes}",
            path.display()
        ));
    }
    Ok(Launch {
        exe,
        path: path.to_path_buf(),
        version,
    })
}

/// The state version written: this binary's, unless a test asks for
/// another (to show that a binary refuses state it does not know).
pub fn written_version() -> u32 {
    crate::target::upgrade::test_hook("VFIO_USER_BLK_TEST_STATE_VERSION")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(STATE_VERSION)
}

fn cstring(b: &[u8]) -> Result<CString, String> {
    CString::new(b).map_err(|_| "an argument holds a NUL byte".to_string())
}

/// argv and envp for an exec, with `extra` variables set.
fn exec_vectors(extra: &[(&str, String)]) -> Result<(Vec<CString>, Vec<CString>), String> {
    let args = ARGS.get().cloned().unwrap_or_default();
    let argv = args
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut envp = Vec::new();
    for (k, v) in std::env::vars_os() {
        if extra.iter().any(|(e, _)| k.as_bytes() == e.as_bytes()) {
            continue;
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(cstring(&kv)?);
    }
    for (k, v) in extra {
        envp.push(cstring(format!("{k}={v}").as_bytes())?);
    }
    Ok((argv, envp))
}

fn pointers(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A memfd (inherited across exec) holding `bytes`, sealed.
fn state_memfd(bytes: &[u8]) -> Result<OwnedFd, String> {
    // SAFETY: a static NUL-terminated name; the result is checked.
    let fd =
        unsafe { libc::memfd_create(c"vfio-user-blk-upgrade".as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(format!("memfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)
        .map_err(|e| format!("writing the state: {e}"))?;
    use std::io::Seek;
    f.rewind().map_err(|e| format!("writing the state: {e}"))?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our memfd; no memory is passed.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    Ok(OwnedFd::from(f))
}

/// The running binary, open (inherited across exec): what a rollback runs.
pub fn open_self() -> Result<OwnedFd, String> {
    let f = std::fs::File::open("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    let fd = OwnedFd::from(f);
    crate::handover::set_cloexec(fd.as_raw_fd(), false).map_err(|e| e.to_string())?;
    Ok(fd)
}

/// Descriptors open in this process now.
fn open_fds() -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Replaces this process's image with `launch`'s binary, handing it
/// `state` and the descriptors `keep` (already inheritable), with the old
/// binary's descriptor `rollback` for a rollback. Returns only if the
/// exec failed (everything is then as before), with why.
pub fn exec(launch: &Launch, state: &[u8], keep: &[i64], rollback: RawFd) -> String {
    match exec_inner(launch, state, keep, rollback) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn exec_inner(
    launch: &Launch,
    state: &[u8],
    keep: &[i64],
    rollback: RawFd,
) -> Result<Never, String> {
    let memfd = state_memfd(state)?;
    let state_fd = memfd.as_raw_fd();
    let relay = StopRelay::new()?;
    // From here a stop is counted for the next image; one before is seen.
    if stop_asked() {
        return Err("the target is stopping (a signal came during the upgrade)".into());
    }
    let stop_fd = relay.fd.as_raw_fd();
    let mut p = [0; 2];
    // SAFETY: pipe2 fills the two-int array.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let (rd, wr) = (p[0], p[1]);
    // SAFETY: the pipe's two new descriptors, ours alone.
    let (rd_fd, wr_fd) = unsafe { (OwnedFd::from_raw_fd(rd), OwnedFd::from_raw_fd(wr)) };
    let rescue = exec_vectors(&[
        (ENV_STATE, state_fd.to_string()),
        (
            ENV_ROLLBACK,
            "the new binary ended before it took over".to_string(),
        ),
        (ENV_RESCUED, "1".into()),
        (ENV_STOP, stop_fd.to_string()),
    ])?;
    let mut wanted = kept(keep, &[state_fd, rollback, rd, stop_fd]);
    let close_in_watchdog: Vec<RawFd> = open_fds()
        .into_iter()
        .filter(|fd| *fd > 2 && !wanted.contains(fd))
        .collect();
    crate::handover::set_cloexec(state_fd, false).map_err(|e| e.to_string())?;
    crate::handover::set_cloexec(stop_fd, false).map_err(|e| e.to_string())?;
    let pid = spawn_watchdog(rd, rollback, &rescue, &close_in_watchdog)?;
    drop(rd_fd);
    let tell_watchdog = |wr: RawFd| {
        // SAFETY: writes one byte from a static buffer, then waits for the
        // child we forked.
        unsafe {
            libc::write(wr, b"C".as_ptr().cast(), 1);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    };
    let go = exec_vectors(&[
        (ENV_STATE, state_fd.to_string()),
        (ENV_WATCHDOG, format!("{wr}:{pid}")),
        (ENV_STOP, stop_fd.to_string()),
    ]);
    let (argv, envp) = match go {
        Ok(v) => v,
        Err(e) => {
            tell_watchdog(wr);
            return Err(e);
        }
    };
    let (argv, envp) = (pointers(&argv), pointers(&envp));
    wanted.push(wr);
    close_the_rest(&wanted);
    if let Err(e) = crate::handover::set_cloexec(wr, false) {
        tell_watchdog(wr);
        return Err(e.to_string());
    }
    // SAFETY: exec of the checked binary with NUL-terminated vectors that
    // live until the call; returns only on failure.
    unsafe { libc::fexecve(launch.exe.as_raw_fd(), argv.as_ptr(), envp.as_ptr()) };
    let e = std::io::Error::last_os_error();
    tell_watchdog(wr);
    drop(wr_fd);
    drop(memfd);
    Err(format!("exec of {}: {e}", launch.path.display()))
}

/// The descriptors handed over (`keep`) and the exec's own (`own`).
fn kept(keep: &[i64], own: &[RawFd]) -> Vec<RawFd> {
    let mut v: Vec<RawFd> = keep
        .iter()
        .filter_map(|&k| RawFd::try_from(k).ok())
        .collect();
    v.extend_from_slice(own);
    v
}

/// Whatever else is open (some crates create descriptors that are not
/// close-on-exec) ends with this image.
fn close_the_rest(wanted: &[RawFd]) {
    for fd in open_fds() {
        if fd > 2 && !wanted.contains(&fd) {
            let _ = crate::handover::set_cloexec(fd, true);
        }
    }
}

/// The eventfd stop signals are counted into while an exec is under way
/// (see [`STOP_RELAY`]); the relay ends when this is dropped (the exec
/// failed).
struct StopRelay {
    fd: OwnedFd,
}

impl StopRelay {
    fn new() -> Result<StopRelay, String> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        STOP_RELAY.store(fd.as_raw_fd(), std::sync::atomic::Ordering::SeqCst);
        Ok(StopRelay { fd })
    }
}

impl Drop for StopRelay {
    fn drop(&mut self) {
        STOP_RELAY.store(-1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Forks the watchdog: it holds copies of the handed-over descriptors
/// (and closes every other), waits on `rd`, and executes the old binary
/// (`rollback`) with `rescue`'s arguments and environment unless it reads
/// the new binary's word that it took over. Its PID.
fn spawn_watchdog(
    rd: RawFd,
    rollback: RawFd,
    rescue: &(Vec<CString>, Vec<CString>),
    close: &[RawFd],
) -> Result<i32, String> {
    let (argv, envp) = (pointers(&rescue.0), pointers(&rescue.1));
    // SAFETY: fork; the child only calls async-signal-safe functions
    // (signal, close, read, fexecve, _exit) on data prepared before.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        return Ok(pid);
    }
    // SAFETY: in the child: default dispositions (the parent's handlers
    // write to descriptors closed here), closing numbers listed before the
    // fork, reading one byte into a stack buffer, exec with vectors built
    // before the fork.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR2] {
            libc::signal(sig, libc::SIG_DFL);
        }
        for fd in close {
            libc::close(*fd);
        }
        let mut b = [0u8; 1];
        let n = loop {
            let n = libc::read(rd, b.as_mut_ptr().cast(), 1);
            if n >= 0 || *libc::__errno_location() != libc::EINTR {
                break n;
            }
        };
        if n == 1 && b[0] == b'C' {
            libc::_exit(0);
        }
        libc::fexecve(rollback, argv.as_ptr(), envp.as_ptr());
        libc::_exit(127)
    }
}

/// The new binary took over: the watchdog goes (and is reaped).
pub fn dismiss_watchdog(w: Option<(RawFd, i32)>) {
    if let Some((fd, pid)) = w {
        // SAFETY: writes one byte to the pipe the old binary handed us,
        // closes it, and reaps the watchdog, our child.
        unsafe {
            libc::write(fd, b"C".as_ptr().cast(), 1);
            libc::close(fd);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The state could not be taken: the old binary (descriptor `rollback`)
/// takes it back in this same process, told why. Returns only if that
/// exec failed.
pub fn roll_back(incoming: &Incoming, rollback: RawFd, why: &str) -> String {
    let mut extra = vec![
        (ENV_STATE, incoming.state_fd.to_string()),
        (ENV_ROLLBACK, why.to_string()),
    ];
    if let Some((fd, pid)) = incoming.watchdog {
        extra.push((ENV_WATCHDOG, format!("{fd}:{pid}")));
    }
    if let Some(fd) = incoming.stop {
        extra.push((ENV_STOP, fd.to_string()));
    }
    let (argv, envp) = match exec_vectors(&extra) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let (a, e) = (pointers(&argv), pointers(&envp));
    // SAFETY: exec with NUL-terminated vectors that live until the call.
    unsafe { libc::fexecve(rollback, a.as_ptr(), e.as_ptr()) };
    format!(
        "exec of the old binary: {}",
        std::io::Error::last_os_error()
    )
}
