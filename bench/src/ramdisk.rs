//! The medium of the direct-* (O_DIRECT) workloads: a block device whose
//! blocks live in memory.
//!
//! On a virtual machine the disk's pace moves by the minute, by more than
//! the targets differ: two quick runs in a row moved the direct-* medians
//! by 30–167 %, every target alike. A loop device over a memory file is a
//! block device that answers at the same pace all the time, so that
//! O_DIRECT still takes every target through the block layer while what
//! differs between them is their own path.
//!
//! The loop driver copies each request in a kernel worker that may run on
//! any CPU; left free, ours' direct-* cells spread by 40–56 %. The workers of
//! unbound workqueues are kept on the server CPUs while the disk exists
//! (the kernel's `workqueue/cpumask`, put back when it is dropped, and by
//! a stop signal), as the medium's work is the device side's.
//!
//! The loop driver completes each request from its worker, a thread, so
//! the block layer leaves the completion to the CPU's softirq thread
//! (ksoftirqd), itself a thread that waits its turn among the server's.
//! Behind a thread pool's 30-odd runnable threads it waited most of a run,
//! and every request with it: runs of the thread-pool targets (ours' and
//! qemu-storage-daemon's) fell to a quarter to a half of their pace now and
//! then, 2–3 runs in 12 (ksoftirqd/1 waited 1.9 s of a 2 s run for its CPU,
//! against 6 ms in a run at full pace). A real disk's completion comes by
//! interrupt and is handled before any thread: the softirq threads of the
//! server CPUs run at real-time priority while the disk exists (put back
//! as the mask is, by the record of a bench killed outright too).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};

// From linux/loop.h.
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` (Linux 5.8): the backing file and the status in
/// one call, so that no loop device is ever bound without AUTOCLEAR.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

const WQ_MASK: &str = "/sys/devices/virtual/workqueue/cpumask";
/// The mask a bench found, kept while it has changed it: a bench killed
/// outright (SIGKILL, the OOM killer) leaves it for the next one, which
/// puts it back.
const WQ_SAVED: &str = "/run/vfio-user-blk-bench.wqmask";
const WQ_SAVED_C: &std::ffi::CStr = c"/run/vfio-user-blk-bench.wqmask";

/// A loop device over a memory file, detached by the kernel once the last
/// descriptor of it is closed (ours is held until drop, or until the
/// process ends however it ends).
pub struct RamDisk {
    pub path: PathBuf,
    _dev: File,
    /// The unbound workqueues' CPU mask before, if it was changed.
    wq_mask: Option<String>,
    /// The softirq threads given real-time priority (put back on drop).
    raised: Vec<i32>,
}

/// The unbound workqueues' mask to write back on SIGINT/SIGTERM/SIGHUP:
/// an open descriptor of the mask file and the old value (at most 63
/// bytes), set before the handler is.
static RESTORE_FD: AtomicI32 = AtomicI32::new(-1);
static mut RESTORE_MASK: [u8; 64] = [0; 64];
static RESTORE_LEN: AtomicUsize = AtomicUsize::new(0);
/// The softirq threads to put back to SCHED_OTHER on a stop signal (0:
/// none), set before the handler is.
static RAISED: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];

extern "C" fn restore_and_die(sig: libc::c_int) {
    let fd = RESTORE_FD.load(Ordering::Acquire);
    let len = RESTORE_LEN.load(Ordering::Acquire);
    if fd >= 0 && len > 0 {
        // SAFETY: write(2) and the signal calls are async-signal-safe, and
        // sched_setscheduler is one system call on plain values (not on
        // POSIX's list, but it takes no lock of ours and the process ends
        // right after); the buffer was filled before the descriptor was
        // published and is not written again.
        unsafe {
            let p = std::ptr::addr_of!(RESTORE_MASK).cast::<libc::c_void>();
            for t in &RAISED {
                let pid = t.load(Ordering::Acquire);
                if pid > 0 {
                    let p = libc::sched_param { sched_priority: 0 };
                    libc::sched_setscheduler(pid, libc::SCHED_OTHER, &p);
                }
            }
            if libc::write(fd, p, len) >= 0 {
                libc::unlink(WQ_SAVED_C.as_ptr());
            }
        }
    }
    // SAFETY: the default action, then the signal again: the process ends
    // as the signal asked.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn hex_mask(cpus: &[usize]) -> Option<String> {
    let mut bits = 0u64;
    for &c in cpus {
        bits |= 1u64.checked_shl(u32::try_from(c).ok()?)?;
    }
    // The kernel reads a mask in 32-bit groups, separated by commas.
    let text = if bits >> 32 == 0 {
        format!("{bits:x}")
    } else {
        format!("{:x},{:08x}", bits >> 32, bits & 0xffff_ffff)
    };
    (bits != 0).then_some(text)
}

impl RamDisk {
    /// A `size`-byte loop device over a memory file that holds `fill`
    /// repeated; the kernel's loop workers kept on `server_cpus`.
    pub fn create(size: u64, fill: &[u8], server_cpus: &[usize]) -> Result<RamDisk> {
        // Its pages count against nobody's limit: it leaves a quarter of
        // the available memory to the rest (the page-cached images, the
        // servers, the machine).
        let available = crate::meminfo_kib("MemAvailable").map_or(0, |k| k << 10);
        if size > available / 4 * 3 {
            bail!(
                "{} MiB would leave too little of the {} MiB of memory available",
                size >> 20,
                available >> 20
            );
        }
        let ctl = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .context("opening /dev/loop-control")?;
        let backing = memory_file(size, fill)?;
        let (dev, path) = attach(&ctl, &backing)?;
        let (wq_mask, raised) = match place_workers(server_cpus) {
            Some((old, raised)) => (Some(old), raised),
            None => (None, Vec::new()),
        };
        Ok(RamDisk {
            path,
            _dev: dev,
            wq_mask,
            raised,
        })
    }

    /// Whether the loop workers were kept on the server CPUs.
    pub fn workers_placed(&self) -> bool {
        self.wq_mask.is_some()
    }

    /// How many softirq threads of the server CPUs run at real-time
    /// priority for the disk.
    pub fn softirq_threads_raised(&self) -> usize {
        self.raised.len()
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        if let Some(old) = &self.wq_mask {
            lower(&self.raised);
            // The record goes only once the mask is back.
            if std::fs::write(WQ_MASK, old).is_ok() {
                let _ = std::fs::remove_file(WQ_SAVED);
            }
            release_restore_fd();
        }
    }
}

/// A memory file of `size` bytes holding `fill` repeated.
fn memory_file(size: u64, fill: &[u8]) -> Result<File> {
    let mut f = vfio_user_blk::util::memfd("vub-bench-direct").context("memfd_create")?;
    crate::write_repeated(&mut f, size, fill).context("filling the memory disk")?;
    Ok(f)
}

fn loop_info() -> LoopInfo64 {
    let mut info = LoopInfo64 {
        device: 0,
        inode: 0,
        rdevice: 0,
        offset: 0,
        sizelimit: 0,
        number: 0,
        encrypt_type: 0,
        encrypt_key_size: 0,
        flags: LO_FLAGS_AUTOCLEAR,
        file_name: [0; 64],
        crypt_name: [0; 64],
        encrypt_key: [0; 32],
        init: [0; 2],
    };
    let name = b"vfio-user-blk-bench direct-*";
    info.file_name[..name.len()].copy_from_slice(name);
    info
}

/// Binds `backing` to loop device `dev`, which detaches itself once its
/// last descriptor is closed: Ok(false) if another process took it first.
fn bind(dev: &File, backing: &File) -> std::io::Result<bool> {
    let cfg = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd()).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        block_size: 0,
        info: loop_info(),
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one loop_config, valid for the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EBUSY) => return Ok(false),
        // Before Linux 5.8: the file, then the status.
        Some(libc::EINVAL | libc::ENOTTY) => {}
        _ => return Err(e),
    }
    // SAFETY: LOOP_SET_FD takes a descriptor number, which is open.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD, backing.as_raw_fd()) } != 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EBUSY) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    let info = loop_info();
    // SAFETY: LOOP_SET_STATUS64 reads one loop_info64, valid for the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64, &info) } != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: unbinds what LOOP_SET_FD bound above; no argument.
        unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) };
        return Err(e);
    }
    Ok(true)
}

/// Binds `backing` to a free loop device (another process may take the
/// one the kernel named first: tried again).
fn attach(ctl: &File, backing: &File) -> Result<(File, PathBuf)> {
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            bail!("no free loop device: {}", std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if bind(&dev, backing).with_context(|| format!("binding {}", path.display()))? {
            return Ok((dev, path));
        }
    }
    bail!("every free loop device was taken before it could be bound")
}

/// A mask the kernel can take back: hex digits in comma-separated groups,
/// with at least one CPU.
fn mask_text(s: &str) -> Option<String> {
    let t = s.trim();
    let ok = t.len() < 64
        && t.split(',')
            .all(|g| !g.is_empty() && g.chars().all(|c| c.is_ascii_hexdigit()))
        && t.chars().any(|c| c.is_ascii_hexdigit() && c != '0');
    ok.then(|| t.to_string())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The record a bench killed outright left: the mask from before it, if
/// the record is root's own regular file (not a link, not a FIFO), from
/// this boot, and the mask is still the one that bench set (nobody
/// changed it since). A record that does not hold is removed. The softirq
/// threads it names are put back to normal priority if it is root's and
/// from this boot, whatever the mask.
fn killed_benchs_mask(current: &str) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(WQ_SAVED)
        .ok()?;
    let meta = f.metadata().ok()?;
    let mut text = String::new();
    let read = meta.is_file()
        && meta.uid() == 0
        && meta.len() < 4096
        && std::io::Read::read_to_string(&mut &f, &mut text).is_ok();
    let fields: Vec<&str> = text.split_whitespace().collect();
    let (old, raised) = match (read, fields.as_slice()) {
        (true, [old, set, boot, rest @ ..]) if *boot == boot_id() && rest.len() <= 1 => (
            (*set == current).then(|| mask_text(old)).flatten(),
            rest.first().copied(),
        ),
        _ => (None, None),
    };
    // Its softirq threads go back to normal priority at once, even where
    // someone changed the mask since (each is checked to be one).
    if let Some(list) = raised {
        lower(
            &list
                .split(',')
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>(),
        );
    }
    if old.is_none() {
        let _ = std::fs::remove_file(WQ_SAVED);
    }
    old
}

/// The softirq thread of `cpu`: a kernel thread named ksoftirqd/CPU.
fn softirq_thread(cpu: usize) -> Option<i32> {
    let want = format!("ksoftirqd/{cpu}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        (kernel_thread_name(pid)? == want).then_some(pid)
    })
}

/// The name of `pid` if it is a kernel thread: its PF_KTHREAD flag is set
/// (a child of pid 2 in a pid namespace of its own may be anything).
fn kernel_thread_name(pid: i32) -> Option<String> {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    // After the name: state, ppid, pgrp, session, tty, tpgid, flags.
    let flags: u64 = stat
        .get(close + 1..)?
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()?;
    (flags & PF_KTHREAD != 0).then(|| stat.get(open + 1..close).map(str::to_string))?
}

/// Puts softirq threads given real-time priority back to SCHED_OTHER (a
/// pid that is no softirq thread, or not at SCHED_FIFO priority 1, is left
/// alone).
fn lower(pids: &[i32]) {
    for &pid in pids {
        let softirq = kernel_thread_name(pid).is_some_and(|n| n.starts_with("ksoftirqd/"));
        let mut p = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_getscheduler and sched_getparam read a policy and
        // write one sched_param, valid for the call.
        let ours = softirq
            && unsafe {
                libc::sched_getscheduler(pid) == libc::SCHED_FIFO
                    && libc::sched_getparam(pid, &mut p) == 0
                    && p.sched_priority == 1
            };
        if ours {
            p.sched_priority = 0;
            // SAFETY: sets a policy from a valid sched_param.
            unsafe { libc::sched_setscheduler(pid, libc::SCHED_OTHER, &p) };
        }
    }
}

/// Keeps the unbound workqueues' workers on `cpus`: the old mask, if it
/// was changed (None when the file cannot be written, e.g. not root, or
/// another bench has changed it).
fn place_workers(cpus: &[usize]) -> Option<(String, Vec<i32>)> {
    let want = hex_mask(cpus)?;
    let f = std::fs::OpenOptions::new().write(true).open(WQ_MASK).ok()?;
    // One bench at a time changes the mask (two would each save the
    // other's and leave it changed): the second leaves its workers free.
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return None;
    }
    // Read under the lock.
    let current = mask_text(&std::fs::read_to_string(WQ_MASK).ok()?)?;
    let old = killed_benchs_mask(&current).unwrap_or(current);
    // The softirq threads at normal priority now (one an administrator
    // raised is not ours to put back).
    let raise: Vec<i32> = cpus
        .iter()
        .filter_map(|&c| softirq_thread(c))
        // SAFETY: sched_getscheduler reads a policy; no memory effects.
        .filter(|&pid| unsafe { libc::sched_getscheduler(pid) } == libc::SCHED_OTHER)
        .take(RAISED.len())
        .collect();
    let list: Vec<String> = raise.iter().map(i32::to_string).collect();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let saved = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(WQ_SAVED);
        if let Ok(mut saved) = saved {
            let _ = writeln!(saved, "{old} {want} {} {}", boot_id(), list.join(","));
        }
    }
    // SAFETY: the buffer is written while no handler is installed or
    // RESTORE_FD is -1 (one memory disk at a time: a second one finds the
    // lock taken and never gets here), by one thread.
    unsafe {
        let buf = &mut *std::ptr::addr_of_mut!(RESTORE_MASK);
        buf[..old.len()].copy_from_slice(old.as_bytes());
    }
    RESTORE_LEN.store(old.len(), Ordering::Release);
    // Held (with its lock) until the disk is dropped or the process ends.
    RESTORE_FD.store(f.into_raw_fd(), Ordering::Release);
    for sig in STOP_SIGNALS {
        // A signal the bench was started to ignore (nohup, a background
        // job) stays ignored.
        // SAFETY: sigaction only reads the current disposition into `cur`.
        let ignored = unsafe {
            let mut cur: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut cur) == 0
                && cur.sa_sigaction == libc::SIG_IGN
        };
        if ignored {
            continue;
        }
        // SAFETY: installs a handler that only makes async-signal-safe calls.
        unsafe {
            libc::signal(
                sig,
                restore_and_die as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    if std::fs::write(WQ_MASK, &want).is_err() {
        // The mask was not changed: the record (which says so) stays for
        // what it may hold of an earlier bench.
        release_restore_fd();
        return None;
    }
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: sets a policy from a valid sched_param.
    let raised: Vec<i32> = raise
        .into_iter()
        .filter(|&pid| unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &p) } == 0)
        .collect();
    // The stop handler puts back only what was raised (a signal between a
    // raise and its slot leaves that thread to the record).
    for (slot, &pid) in RAISED.iter().zip(&raised) {
        slot.store(pid, Ordering::Release);
    }
    Some((old, raised))
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Closes the descriptor the stop handler writes through, with the stop
/// signals blocked on this thread meanwhile (a handler running here
/// cannot see it closed and its number reused).
fn release_restore_fd() {
    // SAFETY: sigset calls on a local set; pthread_sigmask on this thread
    // with valid pointers; close of the descriptor place_workers let go
    // of, taken out of RESTORE_FD first so that it is closed once.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        let fd = RESTORE_FD.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            libc::close(fd);
        }
        for t in &RAISED {
            t.store(0, Ordering::Release);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests that change the workers' mask, one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A bench killed outright left the mask changed and the old one
    /// saved: the next memory disk puts the saved one back when it goes.
    #[test]
    fn a_mask_left_by_a_killed_bench_is_put_back() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: geteuid has no memory effects.
        let root = unsafe { libc::geteuid() } == 0;
        let Ok(before) = std::fs::read_to_string(WQ_MASK) else {
            return;
        };
        let before = before.trim().to_string();
        if !root || !std::path::Path::new("/dev/loop-control").exists() || before == "1" {
            eprintln!("not root, no loop devices or one CPU: nothing to check");
            return;
        }
        std::fs::write(WQ_SAVED, format!("{before} 1 {}\n", boot_id())).unwrap();
        if std::fs::write(WQ_MASK, "1").is_err() {
            let _ = std::fs::remove_file(WQ_SAVED);
            eprintln!("the mask cannot be written here: nothing to check");
            return;
        }
        let softirq = softirq_thread(0);
        let policy = |pid: Option<i32>| {
            // SAFETY: sched_getscheduler reads a policy; no memory effects.
            pid.map(|p| unsafe { libc::sched_getscheduler(p) })
        };
        let normal = policy(softirq) == Some(libc::SCHED_OTHER);
        let rd = RamDisk::create(1 << 20, &[7u8; 4096], &[0]);
        let kept = rd.as_ref().ok().and_then(|rd| rd.wq_mask.clone());
        // Its softirq thread runs at real-time priority while it exists.
        let during = policy(softirq);
        drop(rd);
        let after = std::fs::read_to_string(WQ_MASK).unwrap();
        if after.trim() != before {
            // Whatever failed, the machine gets its mask back.
            let _ = std::fs::write(WQ_MASK, &before);
        }
        assert_eq!(kept.as_deref(), Some(before.as_str()));
        assert_eq!(after.trim(), before);
        assert!(!std::path::Path::new(WQ_SAVED).exists());
        if normal {
            assert_eq!(during, Some(libc::SCHED_FIFO));
            assert_eq!(policy(softirq), Some(libc::SCHED_OTHER));
        }
    }

    /// A record that does not hold is not followed and goes: one from
    /// another boot, one whose bench's mask was changed since, one that
    /// is a link (to a file it must not touch), one the kernel could not
    /// take back.
    #[test]
    fn a_record_that_does_not_hold_is_ignored() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: geteuid has no memory effects.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: /run is not ours to write");
            return;
        }
        let victim = std::env::temp_dir().join(format!("vub-victim-{}", std::process::id()));
        // Whatever fails, neither file stays.
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
                let _ = std::fs::remove_file(WQ_SAVED);
            }
        }
        let _gone = Gone(victim.clone());
        let boot = boot_id();
        for bad in [
            "1 3 not-this-boot".to_string(),
            format!("1 2 {boot}"),
            format!("0 3 {boot}"),
            format!(", 3 {boot}"),
            "1".to_string(),
        ] {
            std::fs::write(WQ_SAVED, &bad).unwrap();
            assert_eq!(killed_benchs_mask("3"), None, "{bad}");
            assert!(!std::path::Path::new(WQ_SAVED).exists(), "{bad}");
        }
        std::fs::write(&victim, format!("1 3 {boot}")).unwrap();
        std::os::unix::fs::symlink(&victim, WQ_SAVED).unwrap();
        assert_eq!(killed_benchs_mask("3"), None);
        let _ = std::fs::remove_file(WQ_SAVED);
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            format!("1 3 {boot}")
        );
        std::fs::remove_file(&victim).unwrap();
        // One that holds.
        std::fs::write(WQ_SAVED, format!("1 3 {boot}\n")).unwrap();
        assert_eq!(killed_benchs_mask("3").as_deref(), Some("1"));
        std::fs::remove_file(WQ_SAVED).unwrap();
    }

    /// A bench killed outright left its softirq threads at real-time
    /// priority, named in its record: the next one puts them back, and
    /// leaves alone a pid of the record that is no softirq thread.
    #[test]
    fn softirq_threads_a_killed_bench_raised_are_put_back() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let policy = |pid: i32| {
            // SAFETY: sched_getscheduler reads a policy; no memory effects.
            unsafe { libc::sched_getscheduler(pid) }
        };
        let fifo = |pid: i32, prio: i32| {
            let p = libc::sched_param {
                sched_priority: prio,
            };
            let how = if prio > 0 {
                libc::SCHED_FIFO
            } else {
                libc::SCHED_OTHER
            };
            // SAFETY: sets a policy from a valid sched_param.
            unsafe { libc::sched_setscheduler(pid, how, &p) == 0 }
        };
        // SAFETY: geteuid has no memory effects.
        let root = unsafe { libc::geteuid() } == 0;
        let Some(ks) = softirq_thread(0) else {
            eprintln!("no ksoftirqd/0: nothing to check");
            return;
        };
        if !root || policy(ks) != libc::SCHED_OTHER || !fifo(ks, 1) {
            eprintln!("not root, or ksoftirqd/0 not ours to change: nothing to check");
            return;
        }
        // Whatever fails, it goes back, and the record goes.
        struct Back(i32);
        impl Drop for Back {
            fn drop(&mut self) {
                let p = libc::sched_param { sched_priority: 0 };
                // SAFETY: sets a policy from a valid sched_param.
                unsafe { libc::sched_setscheduler(self.0, libc::SCHED_OTHER, &p) };
                let _ = std::fs::remove_file(WQ_SAVED);
            }
        }
        let _back = Back(ks);
        // A thread of this test named like a softirq thread, at real-time
        // priority, asleep; it goes back to normal priority itself before
        // it ends (its id is not touched once it may be another's).
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::Builder::new()
            .name("ksoftirqd/0".into())
            .spawn(move || {
                // SAFETY: gettid has no memory effects.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stop_rx.recv();
                let p = libc::sched_param { sched_priority: 0 };
                // SAFETY: sets this thread's policy from a valid sched_param.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &p) };
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        let stop = Stop(Some(stop_tx), Some(sleeper));
        struct Stop(
            Option<std::sync::mpsc::Sender<()>>,
            Option<std::thread::JoinHandle<()>>,
        );
        impl Drop for Stop {
            fn drop(&mut self) {
                drop(self.0.take());
                if let Some(t) = self.1.take() {
                    let _ = t.join();
                }
            }
        }
        assert!(fifo(tid, 1));
        let boot = boot_id();
        std::fs::write(WQ_SAVED, format!("1 3 {boot} {ks},{tid},x\n")).unwrap();
        assert_eq!(killed_benchs_mask("3").as_deref(), Some("1"));
        assert_eq!(policy(ks), libc::SCHED_OTHER);
        // Not a kernel thread: left as it was.
        assert_eq!(policy(tid), libc::SCHED_FIFO);
        // A record whose mask someone changed since is not followed for
        // the mask, but its threads still go back.
        assert!(fifo(ks, 1));
        std::fs::write(WQ_SAVED, format!("1 2 {boot} {ks}\n")).unwrap();
        assert_eq!(killed_benchs_mask("3"), None);
        assert_eq!(policy(ks), libc::SCHED_OTHER);
        // One from another boot names nothing.
        assert!(fifo(ks, 1));
        std::fs::write(WQ_SAVED, format!("1 3 other-boot {ks}\n")).unwrap();
        assert_eq!(killed_benchs_mask("3"), None);
        assert_eq!(policy(ks), libc::SCHED_FIFO);
        // Nor does a priority other than the bench's.
        assert!(fifo(ks, 2));
        std::fs::write(WQ_SAVED, format!("1 3 {boot} {ks}\n")).unwrap();
        assert_eq!(killed_benchs_mask("3").as_deref(), Some("1"));
        assert_eq!(policy(ks), libc::SCHED_FIFO);
        drop(stop);
    }

    #[test]
    fn a_memory_disk_larger_than_memory_allows_is_refused_before_it_is_filled() {
        let available = crate::meminfo_kib("MemAvailable").unwrap() << 10;
        let e = RamDisk::create(available, &[1], &[]).err().unwrap();
        assert!(format!("{e:#}").contains("memory available"), "{e:#}");
    }

    #[test]
    fn masks_the_kernel_cannot_take_back_are_refused() {
        assert_eq!(mask_text(" 3\n").as_deref(), Some("3"));
        assert_eq!(mask_text("2,00000001").as_deref(), Some("2,00000001"));
        for bad in ["", "0", "00,0", ",", "3,", "g", "1 2"] {
            assert_eq!(mask_text(bad), None, "{bad:?}");
        }
    }

    /// While another bench has the mask (its lock on the mask file), a
    /// memory disk leaves the mask alone.
    #[test]
    fn a_second_bench_leaves_the_mask_to_the_first() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: geteuid has no memory effects.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/loop-control").exists() {
            eprintln!("not root or no loop devices: nothing to check");
            return;
        }
        let before = std::fs::read_to_string(WQ_MASK).unwrap();
        let first = std::fs::OpenOptions::new()
            .write(true)
            .open(WQ_MASK)
            .unwrap();
        // SAFETY: flock on a descriptor we own.
        let locked = unsafe { libc::flock(first.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(locked, 0);
        let rd = RamDisk::create(1 << 20, &[7u8; 4096], &[0]).unwrap();
        let during = std::fs::read_to_string(WQ_MASK).unwrap();
        let placed = rd.workers_placed();
        drop(rd);
        if during != before {
            let _ = std::fs::write(WQ_MASK, &before);
        }
        assert!(!placed);
        assert_eq!(during, before);
    }

    /// Where a loop device can be made (root, /dev/loop-control): the
    /// disk reads back what it was filled with through O_DIRECT, the
    /// workers' mask is the server CPUs' while it exists and the old one
    /// after, and the loop device is gone once dropped.
    #[test]
    fn the_memory_disk_serves_its_pattern_and_leaves_nothing_behind() {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if !std::path::Path::new("/dev/loop-control").exists() {
            eprintln!("no /dev/loop-control here: nothing to check");
            return;
        }
        let fill: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 1).to_le_bytes()[0]).collect();
        let before = std::fs::read_to_string(WQ_MASK).unwrap_or_default();
        let rd = match RamDisk::create(1 << 20, &fill, &[0]) {
            Ok(rd) => rd,
            // SAFETY: geteuid has no memory effects.
            Err(e) if unsafe { libc::geteuid() } != 0 => {
                eprintln!("not root ({e:#}): nothing to check");
                return;
            }
            Err(e) => panic!("{e:#}"),
        };
        let name = rd.path.file_name().unwrap().to_str().unwrap().to_string();
        let size = format!("/sys/block/{name}/size");
        assert_eq!(std::fs::read_to_string(&size).unwrap().trim(), "2048");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&rd.path)
            .unwrap();
        let mut buf = crate::run::AlignedBuf::new(4096, 0).unwrap();
        f.read_at(buf.as_mut_slice(), 12288).unwrap();
        assert_eq!(buf.as_mut_slice(), &fill[4096..8192]);
        drop(f);
        if rd.workers_placed() {
            assert_eq!(std::fs::read_to_string(WQ_MASK).unwrap().trim(), "1");
        }
        drop(rd);
        assert_eq!(std::fs::read_to_string(WQ_MASK).unwrap_or_default(), before);
        // Detached by the kernel once its last descriptor closed.
        let t = std::time::Instant::now();
        while std::fs::read_to_string(&size).is_ok_and(|s| s.trim() != "0") {
            assert!(t.elapsed().as_secs() < 5, "{name} is still bound");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn cpu_lists_become_kernel_masks() {
        assert_eq!(hex_mask(&[1]).as_deref(), Some("2"));
        assert_eq!(hex_mask(&[0, 1]).as_deref(), Some("3"));
        assert_eq!(hex_mask(&[4, 9]).as_deref(), Some("210"));
        assert_eq!(hex_mask(&[]), None);
        assert_eq!(hex_mask(&[64]), None);
        assert_eq!(hex_mask(&[1, 33]).as_deref(), Some("2,00000002"));
    }
}
