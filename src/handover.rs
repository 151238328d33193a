//! Descriptors that a live upgrade hands from one binary to the next
//! across `execve`: what the old binary lists ([`Outgoing`]) and what the
//! new one adopts ([`FdBag`]). Knows descriptors, nothing of what they are.
//!
//! The new binary never takes a listed descriptor itself: it takes a
//! duplicate, so that until it commits, every original is still there for
//! the old binary should the upgrade be rolled back (see `upgrade`).

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The descriptors the old binary hands over, by number.
#[derive(Default, Debug)]
pub struct Outgoing {
    fds: BTreeSet<RawFd>,
}

impl Outgoing {
    /// Lists `fd` (kept open by its owner until the exec); returns the
    /// number the state refers to it by.
    pub fn add(&mut self, fd: BorrowedFd<'_>) -> i64 {
        let n = fd.as_raw_fd();
        self.fds.insert(n);
        i64::from(n)
    }

    /// Lists everything `other` lists (its owners keep them open too).
    pub fn merge(&mut self, other: &Outgoing) {
        self.fds.extend(other.fds.iter().copied());
    }

    pub fn list(&self) -> Vec<i64> {
        self.fds.iter().map(|&f| i64::from(f)).collect()
    }

    /// Lets every listed descriptor survive the exec (`keep`), or not.
    pub fn inherit(&self, keep: bool) -> std::io::Result<()> {
        for &fd in &self.fds {
            set_cloexec(fd, !keep)?;
        }
        Ok(())
    }
}

/// Sets or clears close-on-exec on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number; no memory is passed.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The descriptors the new binary was handed: only those the state lists
/// may be taken, each once.
#[derive(Debug)]
pub struct FdBag {
    listed: BTreeSet<RawFd>,
    taken: BTreeSet<RawFd>,
}

impl FdBag {
    /// `listed`: the numbers the state says it handed over. Each must be
    /// open here and not one of the standard streams.
    pub fn new(listed: &[i64]) -> Result<FdBag, String> {
        let mut set = BTreeSet::new();
        for &n in listed {
            let fd = RawFd::try_from(n).map_err(|_| format!("descriptor {n} is not a number"))?;
            if fd < 3 {
                return Err(format!("descriptor {fd} is a standard stream"));
            }
            // SAFETY: fcntl on a descriptor number; an unknown one answers EBADF.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(format!("descriptor {fd} is not open"));
            }
            if !set.insert(fd) {
                return Err(format!("descriptor {fd} is listed twice"));
            }
        }
        Ok(FdBag {
            listed: set,
            taken: BTreeSet::new(),
        })
    }

    /// A duplicate of listed descriptor `n` (close-on-exec), which may be
    /// taken once.
    pub fn take(&mut self, n: i64) -> Result<OwnedFd, String> {
        let fd = RawFd::try_from(n).map_err(|_| format!("descriptor {n} is not a number"))?;
        if !self.listed.contains(&fd) {
            return Err(format!("descriptor {fd} was not handed over"));
        }
        if !self.taken.insert(fd) {
            return Err(format!("descriptor {fd} is used twice"));
        }
        // SAFETY: fcntl duplicates a descriptor we were handed; the new
        // number is ours alone.
        let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if d < 0 {
            return Err(format!(
                "duplicating descriptor {fd}: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `d` was just made for us and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(d) })
    }

    /// An optional descriptor: -1 in the state means none.
    pub fn take_opt(&mut self, n: i64) -> Result<Option<OwnedFd>, String> {
        if n < 0 {
            return Ok(None);
        }
        self.take(n).map(Some)
    }

    /// Commits: the originals go (their duplicates serve on).
    pub fn close_originals(&self) {
        for &fd in &self.listed {
            // SAFETY: the state handed these numbers to us and only
            // duplicates of them were taken.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_descriptors_once() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let n = i64::from(f.as_raw_fd());
        assert!(FdBag::new(&[n, n]).is_err());
        assert!(FdBag::new(&[1]).is_err());
        assert!(FdBag::new(&[999_999]).is_err());
        let mut b = FdBag::new(&[n]).unwrap();
        assert!(b.take(n + 1000).is_err());
        let d = b.take(n).unwrap();
        assert_ne!(d.as_raw_fd(), f.as_raw_fd());
        assert!(b.take(n).is_err());
        assert_eq!(b.take_opt(-1).unwrap().map(|_| ()), None);
    }
}
