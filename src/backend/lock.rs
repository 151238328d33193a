//! Image locks, the way QEMU takes them, so that our server, another of
//! ours and QEMU itself (or qemu-storage-daemon, qemu-img) refuse to write
//! one image at the same time.
//!
//! QEMU's raw driver (file-posix) keeps open-file-description (OFD) read
//! locks on single bytes: byte 100 + p while it holds permission p, byte
//! 200 + p while it does not let others have p. Before it relies on the
//! locks it checks that nobody else holds the opposite byte. Permissions:
//! consistent read (bit 0), write (bit 1), resize (bit 3). A read-write
//! device holds read, write and resize and shares neither write nor
//! resize; a read-only one holds read and shares no write. Two read-only
//! users therefore coexist; any writer conflicts with everyone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

fn lock_byte(f: &File, byte: i64, kind: libc::c_int, cmd: libc::c_int) -> io::Result<libc::flock> {
    // SAFETY: flock is plain data; zeroed is a valid value, filled in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = i16::try_from(kind).unwrap_or(0);
    fl.l_whence = i16::try_from(libc::SEEK_SET).unwrap_or(0);
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl with a lock command and a pointer to our flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl)
}

/// Whether someone other than `f`'s open file description holds `byte`.
fn held_by_others(f: &File, byte: i64) -> io::Result<bool> {
    let fl = lock_byte(f, byte, libc::F_WRLCK, libc::F_OFD_GETLK)?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Takes the locks for a read-only or read-write user of `f` and checks
/// that nobody else conflicts. The locks live as long as the file is open.
/// The error names what conflicts.
pub fn lock_image(f: &File, readonly: bool) -> Result<(), String> {
    let r = take_and_check(f, readonly);
    if r.is_err() {
        // Leave nothing behind: a refused user must not block the others.
        for byte in (PERM_BASE..PERM_BASE + 8).chain(SHARED_BASE..SHARED_BASE + 8) {
            let _ = lock_byte(f, byte, libc::F_UNLCK, libc::F_OFD_SETLK);
        }
    }
    r
}

fn take_and_check(f: &File, readonly: bool) -> Result<(), String> {
    let (hold, unshare): (&[i64], &[i64]) = if readonly {
        (&[READ], &[WRITE])
    } else {
        (&[READ, WRITE, RESIZE], &[WRITE, RESIZE])
    };
    let set = |byte| lock_byte(f, byte, libc::F_RDLCK, libc::F_OFD_SETLK);
    for &p in hold {
        set(PERM_BASE + p).map_err(|e| format!("cannot lock (byte {}): {e}", PERM_BASE + p))?;
    }
    for &p in unshare {
        set(SHARED_BASE + p).map_err(|e| format!("cannot lock (byte {}): {e}", SHARED_BASE + p))?;
    }
    let name = |p| match p {
        READ => "consistent read",
        WRITE => "write",
        _ => "resize",
    };
    // What we want, nobody may refuse to share; what we refuse to share,
    // nobody may hold.
    for &p in hold {
        if held_by_others(f, SHARED_BASE + p).map_err(|e| e.to_string())? {
            return Err(format!(
                "another process uses the image and does not share \"{}\" (is it open read-write elsewhere?)",
                name(p)
            ));
        }
    }
    for &p in unshare {
        if held_by_others(f, PERM_BASE + p).map_err(|e| e.to_string())? {
            return Err(format!(
                "another process holds \"{}\" on the image",
                name(p)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &std::path::Path, rw: bool) -> File {
        File::options().read(true).write(rw).open(p).unwrap()
    }

    #[test]
    fn readers_share_writers_do_not() {
        let dir = std::env::temp_dir().join(format!("vub-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("i.img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        // Two readers.
        let r1 = open(&p, false);
        lock_image(&r1, true).unwrap();
        let r2 = open(&p, false);
        lock_image(&r2, true).unwrap();
        // A writer while readers are there.
        let w = open(&p, true);
        assert!(lock_image(&w, false).is_err());
        drop(w);
        drop((r1, r2));
        // A writer alone, then a second writer and a reader.
        let w1 = open(&p, true);
        lock_image(&w1, false).unwrap();
        let w2 = open(&p, true);
        let e = lock_image(&w2, false).unwrap_err();
        assert!(e.contains("write"), "{e}");
        let r = open(&p, false);
        assert!(lock_image(&r, true).is_err());
        drop(w1);
        // The writer is gone: its locks with it.
        let r = open(&p, false);
        lock_image(&r, true).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
