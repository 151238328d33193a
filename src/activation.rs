//! Sockets handed over by a service manager (systemd's socket activation:
//! `LISTEN_PID`, `LISTEN_FDS`, descriptors from 3 on). Each listening unix
//! socket passed is used, instead of binding a new one, by the device (or
//! the management socket) whose path it is bound to.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// Passed listeners not yet taken, with the path each is bound to.
static PASSED: Mutex<Vec<(PathBuf, UnixListener)>> = Mutex::new(Vec::new());
/// What `adopt` has to say, said once the log is set up.
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The (device, inode) of every socket file that was passed: the service
/// manager's, never removed by us.
static FILES: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// The first descriptor a service manager passes.
const LISTEN_FDS_START: i32 = 3;

/// Takes the sockets passed to this process, once, at start (before any
/// other descriptor is opened): those that are listening unix stream
/// sockets bound to a path are kept for [`take`]; others are closed, with
/// a log line. The variables are removed, so that no child sees them.
pub fn adopt() {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    // (Called first thing in main: no other thread reads the environment.)
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if !ours || !(1..=1024).contains(&n) {
        return;
    }
    let mut kept = PASSED.lock();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + n {
        // SAFETY: fcntl on a descriptor number; no memory is passed (an
        // invalid one answers EBADF).
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            continue;
        }
        // SAFETY: the service manager passed this descriptor to us and
        // nothing else in the process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: as above; sets close-on-exec on our own descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        match listening_path(&owned) {
            Some(path) => {
                if let Ok(m) = std::fs::metadata(&path) {
                    use std::os::unix::fs::MetadataExt;
                    FILES.lock().push((m.dev(), m.ino()));
                }
                kept.push((path, UnixListener::from(owned)));
            }
            None => NOTES.lock().push(format!(
                "descriptor {fd} passed by the service manager is not a listening unix \
                 socket with a path: closed"
            )),
        }
    }
}

/// The path a listening unix stream socket is bound to.
fn listening_path(fd: &OwnedFd) -> Option<PathBuf> {
    let mut listening: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).ok()?;
    // SAFETY: an int option; the pointer and length describe `listening`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &mut len,
        )
    };
    if r < 0 || listening == 0 {
        return None;
    }
    let l = UnixListener::from(fd.try_clone().ok()?);
    let path = l.local_addr().ok()?.as_pathname()?.to_path_buf();
    Some(path)
}

/// The passed listener bound to `path` (the same file), if there is one.
pub fn take(path: &Path) -> Option<UnixListener> {
    let want = std::fs::canonicalize(path).ok()?;
    let mut kept = PASSED.lock();
    let i = kept
        .iter()
        .position(|(p, _)| std::fs::canonicalize(p).ok().as_ref() == Some(&want))?;
    Some(kept.swap_remove(i).1)
}

/// Whether the socket file `id` (device, inode) was passed by the service
/// manager (it stays when we stop: its socket unit holds it).
pub fn was_passed(id: (u64, u64)) -> bool {
    FILES.lock().contains(&id)
}

/// Every socket file the service manager passed (a live upgrade hands the
/// list to the next binary).
pub fn passed_files() -> Vec<(u64, u64)> {
    FILES.lock().clone()
}

/// Takes over a list of [`passed_files`].
pub fn mark_passed(ids: &[(u64, u64)]) {
    FILES.lock().extend_from_slice(ids);
}

/// Logs what `adopt` found (it runs before the log is set up).
pub fn say_adopted() {
    for n in NOTES.lock().drain(..) {
        log::warn!("{n}");
    }
    for (p, _) in PASSED.lock().iter() {
        log::info!("the service manager passed the socket {}", p.display());
    }
}
