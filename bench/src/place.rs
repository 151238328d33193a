//! Where the benchmark's threads run. Every target is placed the same way:
//! the device side (each server process with all its threads, and the
//! I/O threads of the `direct` references, which have no separate driver)
//! on the server CPUs, the synthetic guest on the driver CPUs. Without it a
//! cell measured where the scheduler happened to put a busy poller, the
//! guest's thread and qemu-storage-daemon's iothread, and two runs an hour
//! apart disagreed by more than the targets did.
//!
//! A child inherits its parent's mask, so a server is not simply started
//! from the pinned benchmark: the mask is set in the child between fork and
//! exec, before the server reads which CPUs it may use.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Result};

/// The server and driver CPU sets, once chosen (none: nothing is pinned).
static PLACEMENT: OnceLock<Option<Placement>> = OnceLock::new();

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub server: Vec<usize>,
    pub driver: Vec<usize>,
}

/// Largest CPU number a `cpu_set_t` holds.
const CPU_SET_BITS: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();

fn cpu_set(cpus: &[usize]) -> Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= CPU_SET_BITS {
            bail!("CPU {c} is beyond the CPU set");
        }
        // SAFETY: CPU_SET writes one bit inside `set` (c < CPU_SET_BITS).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    Ok(set)
}

/// The CPUs this thread may run on.
pub fn usable() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads one bit of `set`, for indices below its size.
    Ok((0..CPU_SET_BITS)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Confines the calling thread (and the threads it starts later) to `cpus`.
pub fn pin_thread(cpus: &[usize]) -> Result<()> {
    let set = cpu_set(cpus)?;
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        bail!(
            "pinning to CPUs {}: {}",
            list(cpus),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `0-3,6` style (the server's own notation).
pub fn list(cpus: &[usize]) -> String {
    vfio_user_blk::cli::cpu_list(cpus)
}

/// `0-3,6` style, parsed.
pub fn parse_list(s: &str) -> Result<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
        if a > b || b >= CPU_SET_BITS {
            bail!("bad CPU range {part}");
        }
        v.extend(a..=b);
    }
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        bail!("an empty CPU list");
    }
    Ok(v)
}

/// The placement the benchmark uses: `server`/`driver` as given, by
/// default the last usable CPU for the server and the others for the
/// driver (on one CPU, both share it).
pub fn choose(server: Option<&str>, driver: Option<&str>) -> Result<Placement> {
    let cpus = usable()?;
    let Some(&last) = cpus.last() else {
        bail!("no usable CPU");
    };
    let server = match server {
        Some(s) => parse_list(s)?,
        None => vec![last],
    };
    let driver = match driver {
        Some(s) => parse_list(s)?,
        None => {
            let rest: Vec<usize> = cpus
                .iter()
                .copied()
                .filter(|c| !server.contains(c))
                .collect();
            if rest.is_empty() {
                cpus.clone()
            } else {
                rest
            }
        }
    };
    for c in server.iter().chain(&driver) {
        if !cpus.contains(c) {
            bail!(
                "CPU {c} is not one this benchmark may use ({})",
                list(&cpus)
            );
        }
    }
    Ok(Placement { server, driver })
}

/// Records the placement (None: nothing pinned) and confines this thread,
/// the synthetic guest's, to the driver CPUs. Call once, before any
/// thread is started.
pub fn set(p: Option<Placement>) -> Result<()> {
    if let Some(p) = &p {
        pin_thread(&p.driver)?;
    }
    if PLACEMENT.set(p).is_err() {
        bail!("the placement is already chosen");
    }
    Ok(())
}

/// The placement in force, if any.
pub fn get() -> Option<&'static Placement> {
    PLACEMENT.get().and_then(Option::as_ref)
}

/// Makes `cmd`'s process start on the server CPUs, whatever the
/// benchmark's own mask, and die with the benchmark (a benchmark killed
/// by a signal left its servers running, holding the images' locks).
pub fn server_command(cmd: &mut Command) -> Result<()> {
    let set = get().map(|p| cpu_set(&p.server)).transpose()?;
    // SAFETY: the closure runs in the child between fork and exec; it makes
    // two system calls on values built before the fork, and allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(set) = &set {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Runs `f` on the server CPUs (a `direct` reference's I/O thread), then
/// puts the calling thread back on the driver CPUs.
pub fn on_server_cpus<T>(f: impl FnOnce() -> T) -> Result<T> {
    let Some(p) = get() else { return Ok(f()) };
    pin_thread(&p.server)?;
    let r = f();
    pin_thread(&p.driver)?;
    Ok(r)
}

/// A fixed amount of memory copying on every placed CPU at once (each
/// thread pinned to one): the wall time of the slowest. A machine whose
/// CPUs are taken by a neighbour (another VM on the host) takes longer.
pub fn calibrate() -> std::time::Duration {
    let cpus: Vec<usize> = match get() {
        Some(p) => {
            let mut v: Vec<usize> = p.server.iter().chain(&p.driver).copied().collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        None => usable().unwrap_or_default().into_iter().take(2).collect(),
    };
    let times: Vec<std::time::Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = cpus
            .iter()
            .map(|&c| {
                s.spawn(move || {
                    let _ = pin_thread(&[c]);
                    // In the core's own cache: what is timed is the CPU
                    // time the host gives this one (memory-bound copies
                    // varied too much to tell a neighbour from noise).
                    let src = vec![0x5au8; 128 << 10];
                    let mut dst = vec![1u8; 128 << 10];
                    let t = std::time::Instant::now();
                    for i in 0..2000u16 {
                        dst.copy_from_slice(&src);
                        dst[usize::from(i)] ^= i.to_le_bytes()[0];
                        std::hint::black_box(&mut dst);
                    }
                    t.elapsed()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    times.into_iter().max().unwrap_or_default()
}

/// The round trip of a cache line between the first driver CPU and the
/// first server CPU: what a request and its completion cross. On a host
/// whose cores sit in several cache complexes (AMD EPYC), this machine's
/// two vCPUs are sometimes in one and sometimes not, and every
/// request-response target slowed by a third to a half while they were
/// apart.
pub fn round_trip() -> std::time::Duration {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    const TRIPS: u64 = 20_000;
    let Some(p) = get() else {
        return Duration::ZERO;
    };
    let (a, b) = (p.driver[0], p.server[0]);
    let line = AtomicU64::new(0);
    let give_up = Instant::now() + Duration::from_millis(200);
    let spin_until = |v: u64| {
        let mut n = 0u32;
        while line.load(Ordering::Acquire) != v {
            std::hint::spin_loop();
            n = n.wrapping_add(1);
            if n.is_multiple_of(4096) && Instant::now() > give_up {
                return false;
            }
        }
        true
    };
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            let _ = pin_thread(&[b]);
            for i in 0..TRIPS {
                if !spin_until(2 * i + 1) {
                    return;
                }
                line.store(2 * i + 2, Ordering::Release);
            }
        });
        let _ = pin_thread(&[a]);
        let t = Instant::now();
        let mut done = 0;
        for i in 0..TRIPS {
            line.store(2 * i + 1, Ordering::Release);
            if !spin_until(2 * i + 2) {
                break;
            }
            done += 1;
        }
        let took = t.elapsed();
        let _ = other.join();
        if let Some(p) = get() {
            let _ = pin_thread(&p.driver);
        }
        if done == TRIPS {
            took / u32::try_from(TRIPS).unwrap_or(u32::MAX)
        } else {
            Duration::from_secs(1)
        }
    })
}

/// The machine's pace: [`calibrate`] and [`round_trip`], as measured so
/// far; its quiet pace is the first quartile of each.
///
/// This VM's vCPUs are moved apart for seconds at a time (a round trip
/// mostly of 380-730 ns instead of 180, a quarter of the time here, see
/// `--trip-probe`) and now and then closer (113 ns at least). Seven measurements at the start, all taken
/// in a slow spell, once made 529 ns the quiet round trip of a whole run;
/// the best one seen, a rare fast one, made every run wait. The first
/// quartile of every measurement is the usual fast pace either way.
#[derive(Clone, Debug, Default)]
pub struct Pace {
    copies: Vec<std::time::Duration>,
    trips: Vec<std::time::Duration>,
}

fn first_quartile(v: &[std::time::Duration]) -> std::time::Duration {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 4)
        .copied()
        .unwrap_or(std::time::Duration::MAX)
}

impl Pace {
    /// The quiet pace of the copy on every CPU.
    pub fn copy(&self) -> std::time::Duration {
        first_quartile(&self.copies)
    }

    /// The quiet round trip of a cache line between the guest's and the
    /// server's CPUs.
    pub fn trip(&self) -> std::time::Duration {
        first_quartile(&self.trips)
    }

    /// Measures the machine once: whether the CPUs copy within `slack` of
    /// the quiet pace and a cache line crosses between the driver and
    /// the server CPUs within `slack` of its quiet round trip.
    pub fn quiet_now(&mut self, slack: f64) -> bool {
        self.record(calibrate(), round_trip(), slack)
    }

    /// Adds one measurement: whether it is within `slack` of the quiet
    /// pace (with it).
    fn record(&mut self, copy: std::time::Duration, trip: std::time::Duration, slack: f64) -> bool {
        self.copies.push(copy);
        self.trips.push(trip);
        let ok = |d: std::time::Duration, q: std::time::Duration| {
            d.as_secs_f64() <= q.as_secs_f64() * slack
        };
        ok(copy, self.copy()) && ok(trip, self.trip())
    }
}

/// The machine's pace when quiet: a few measurements to start with,
/// spread over 2 s (a slow spell lasts seconds).
pub fn quiet_pace() -> Pace {
    let mut p = Pace::default();
    for _ in 0..8 {
        p.quiet_now(1.0);
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    p
}

/// [`round_trip`] `n` times, `every` apart: each, then a summary of the
/// spells in which it was more than 1.5 times its first quartile.
pub fn trip_probe(n: usize, every: std::time::Duration) -> String {
    let t0 = std::time::Instant::now();
    let mut out = String::new();
    let mut trips = Vec::with_capacity(n);
    for _ in 0..n {
        let d = round_trip();
        trips.push(d);
        out += &format!(
            "{:7.1} s {:6.0} ns\n",
            t0.elapsed().as_secs_f64(),
            d.as_secs_f64() * 1e9
        );
        std::thread::sleep(every);
    }
    out + &trip_summary(&trips, every)
}

/// The quartiles of `trips`, and the spells (runs of samples taken
/// `every` apart) more than 1.5 times the first quartile.
fn trip_summary(trips: &[std::time::Duration], every: std::time::Duration) -> String {
    let mut s = trips.to_vec();
    s.sort_unstable();
    let Some(&q1) = s.get(s.len() / 4) else {
        return "no measurement\n".into();
    };
    let ns = |d: std::time::Duration| d.as_secs_f64() * 1e9;
    let slow: Vec<bool> = trips.iter().map(|&d| ns(d) > ns(q1) * 1.5).collect();
    let mut spells: Vec<usize> = Vec::new();
    let mut run = 0;
    for &x in slow.iter().chain([&false]) {
        if x {
            run += 1;
        } else if run > 0 {
            spells.push(run);
            run = 0;
        }
    }
    format!(
        "round trip: min {:.0}, first quartile {:.0}, median {:.0}, third quartile {:.0}, \
         max {:.0} ns; more than 1.5x the first quartile in {} of {} samples, in {} spell(s) \
         of {}-{} samples ({:.1} s apart)\n",
        ns(s[0]),
        ns(q1),
        ns(s[s.len() / 2]),
        ns(s[s.len() * 3 / 4]),
        ns(s[s.len() - 1]),
        slow.iter().filter(|&&x| x).count(),
        trips.len(),
        spells.len(),
        spells.iter().min().unwrap_or(&0),
        spells.iter().max().unwrap_or(&0),
        every.as_secs_f64(),
    )
}

/// Waits (at most `limit`) until [`Pace::quiet_now`]: the time waited.
pub fn wait_for_quiet(
    quiet: &mut Pace,
    slack: f64,
    limit: std::time::Duration,
) -> std::time::Duration {
    let t = std::time::Instant::now();
    if limit.is_zero() {
        return std::time::Duration::ZERO;
    }
    while !quiet.quiet_now(slack) && t.elapsed() < limit {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    t.elapsed()
}

/// CPU time the hypervisor gave to someone else while this machine's
/// CPUs wanted to run ("steal" in /proc/stat), in seconds, all CPUs.
pub fn stolen() -> f64 {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let cpu = s.lines().next()?.to_string();
            cpu.split_whitespace().nth(8)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quiet_pace_is_the_usual_fast_one_whatever_came_first() {
        let us = std::time::Duration::from_micros;
        let ns = std::time::Duration::from_nanos;
        let mut p = Pace::default();
        // A start taken in a slow spell (529 ns) does not stay the
        // reference: the usual pace that follows becomes it.
        for _ in 0..8 {
            p.record(us(2300), ns(529), 1.0);
        }
        for _ in 0..30 {
            p.record(us(2300), ns(180), 1.25);
        }
        assert_eq!(p.trip(), ns(180));
        assert!(!p.record(us(2300), ns(450), 1.25), "a slow spell passed");
        // A rare fast moment does not become the reference either.
        p.record(us(2300), ns(110), 1.25);
        assert_eq!(p.trip(), ns(180));
        assert!(
            p.record(us(2300), ns(190), 1.25),
            "the usual pace was refused"
        );
        // Nothing measured: no reference to hold a run to.
        assert_eq!(Pace::default().trip(), std::time::Duration::MAX);
    }

    #[test]
    fn the_trip_summary_counts_slow_spells() {
        let ns = std::time::Duration::from_nanos;
        let v: Vec<_> = [180, 185, 500, 520, 180, 190, 600, 175]
            .into_iter()
            .map(ns)
            .collect();
        let s = trip_summary(&v, std::time::Duration::from_millis(500));
        assert!(s.contains("first quartile 180,"), "{s}");
        assert!(
            s.contains("in 3 of 8 samples, in 2 spell(s) of 1-2 samples"),
            "{s}"
        );
        assert_eq!(
            trip_summary(&[], std::time::Duration::ZERO),
            "no measurement\n"
        );
    }

    #[test]
    fn cpu_lists_parse_and_print_alike() {
        assert_eq!(parse_list("0-2,5, 3").unwrap(), vec![0, 1, 2, 3, 5]);
        assert_eq!(list(&[0, 1, 2, 3, 5]), "0-3,5");
        assert!(parse_list("").is_err());
        assert!(parse_list("3-1").is_err());
        assert!(parse_list("x").is_err());
        assert!(parse_list("100000").is_err());
    }

    #[test]
    fn stolen_time_reads_and_does_not_go_back() {
        let a = stolen();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = stolen();
        assert!(a >= 0.0 && b >= a, "{a} then {b}");
    }

    #[test]
    fn by_default_the_server_gets_the_last_cpu_and_the_driver_the_rest() {
        let cpus = usable().unwrap();
        let p = choose(None, None).unwrap();
        assert_eq!(p.server, vec![*cpus.last().unwrap()]);
        if cpus.len() > 1 {
            assert_eq!(p.driver, cpus[..cpus.len() - 1].to_vec());
        } else {
            assert_eq!(p.driver, cpus);
        }
        assert!(choose(Some("100000"), None).is_err());
    }

    /// A child started from a thread confined to one CPU still gets the
    /// server CPUs (it would inherit the parent's mask otherwise).
    #[test]
    fn a_server_started_from_the_pinned_driver_runs_on_the_server_cpus() {
        let cpus = usable().unwrap();
        if cpus.len() < 2 {
            return;
        }
        let p = Placement {
            server: vec![cpus[1]],
            driver: vec![cpus[0]],
        };
        let _ = PLACEMENT.set(Some(p.clone()));
        let p = get().unwrap().clone();
        let out = std::thread::spawn(move || {
            pin_thread(&p.driver).unwrap();
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
            server_command(&mut cmd).unwrap();
            cmd.output().unwrap()
        })
        .join()
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.trim().ends_with(&list(&get().unwrap().server)),
            "{text}"
        );
    }
}
