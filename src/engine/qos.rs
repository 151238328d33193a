//! Per-device limits on operations and bytes per second, as QEMU's
//! throttle groups and SPDK's `bdev_set_qos_limit` have: token buckets that
//! the device's queues share. A queue whose device is over a limit is
//! simply not polled until the buckets have refilled: its requests wait in
//! the guest's ring, and its reactor goes on with every other queue (it
//! never sleeps for a limit; an idle one wakes when the tokens are there).
//!
//! A request is let in while every limited bucket holds something, then
//! charged in full, so a bucket can go below zero (a 1 MiB write under
//! `bps=100k` is let in, then the device waits ten seconds): over time the
//! device does its limit, in bursts of at most [`BURST`] of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A device over its limit waits until its buckets hold this much of a
/// second's allowance (or are full), so that its reactor wakes for a few
/// requests at a time, not for each one.
const BATCH: f64 = 0.001;

/// How much of a second's allowance the buckets hold when full: small,
/// so that a device does its limit over any second, not only on average
/// (a reactor that wakes late still finds 20 ms of tokens waiting).
const BURST: f64 = 0.02;

/// A device's limits; 0 is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosLimits {
    /// Requests per second (every kind).
    pub iops: u64,
    /// Bytes read and written per second.
    pub bps: u64,
    pub read_bps: u64,
    pub write_bps: u64,
}

impl QosLimits {
    /// The limits by their key names, as the command line and the
    /// management plane spell them.
    pub fn named(&self) -> [(&'static str, u64); 4] {
        [
            ("iops", self.iops),
            ("bps", self.bps),
            ("read-bps", self.read_bps),
            ("write-bps", self.write_bps),
        ]
    }

    /// Sets the limit called `key`; false when no limit has that name.
    pub fn set_named(&mut self, key: &str, v: u64) -> bool {
        let slot = match key {
            "iops" => &mut self.iops,
            "bps" => &mut self.bps,
            "read-bps" | "read_bps" => &mut self.read_bps,
            "write-bps" | "write_bps" => &mut self.write_bps,
            _ => return false,
        };
        *slot = v;
        true
    }

    pub fn limited(&self) -> bool {
        *self != QosLimits::default()
    }

    fn rates(&self) -> [u64; 4] {
        [self.iops, self.bps, self.read_bps, self.write_bps]
    }
}

struct Buckets {
    limits: QosLimits,
    /// Tokens in each bucket (iops, bps, read, write); may be below zero.
    level: [f64; 4],
    last: Instant,
}

impl Buckets {
    fn cap(rate: u64) -> f64 {
        (rate as f64 * BURST).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        for (level, rate) in self.level.iter_mut().zip(self.limits.rates()) {
            if rate > 0 {
                *level = (*level + rate as f64 * dt).min(Self::cap(rate));
            }
        }
    }
}

/// One device's buckets.
pub struct Qos {
    on: AtomicBool,
    /// Moves on at every `set`: a queue's wait under the old limits ends.
    generation: AtomicU64,
    buckets: Mutex<Buckets>,
    /// Times a queue found the device over a limit and waited.
    waits: AtomicU64,
}

impl Default for Qos {
    fn default() -> Self {
        Qos {
            on: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            buckets: Mutex::new(Buckets {
                limits: QosLimits::default(),
                level: [0.0; 4],
                last: Instant::now(),
            }),
            waits: AtomicU64::new(0),
        }
    }
}

impl Qos {
    /// New limits, from now on. A bucket that was not limited starts full.
    pub fn set(&self, limits: QosLimits) {
        let mut b = self.buckets.lock();
        b.refill(Instant::now());
        let old = b.limits.rates();
        for ((level, rate), was) in b.level.iter_mut().zip(limits.rates()).zip(old) {
            *level = if was == 0 {
                Buckets::cap(rate)
            } else {
                level.min(Buckets::cap(rate))
            };
        }
        b.limits = limits;
        self.on.store(limits.limited(), Ordering::Release);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Which limits are in force (see `set`).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn limits(&self) -> QosLimits {
        self.buckets.lock().limits
    }

    /// Times a queue of the device waited for tokens.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Whether any limit is set (one relaxed load: the hot path's check).
    pub(crate) fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// None: a request may go in. Some(t): the device is over a limit
    /// until `t`.
    pub(crate) fn admit(&self, now: Instant) -> Option<Instant> {
        let mut b = self.buckets.lock();
        b.refill(now);
        // Until every short bucket holds a batch (see BATCH).
        let wait = b
            .level
            .iter()
            .zip(b.limits.rates())
            .filter(|&(&level, rate)| rate > 0 && level <= 0.0)
            .map(|(&level, rate)| {
                let batch = (rate as f64 * BATCH).min(Buckets::cap(rate));
                (batch - level) / rate as f64
            })
            .fold(None, |w: Option<f64>, s| Some(w.map_or(s, |w| w.max(s))))?;
        self.waits.fetch_add(1, Ordering::Relaxed);
        // A microsecond past the time the level reaches zero: then it is
        // above it.
        Some(now + Duration::from_secs_f64(wait.min(3600.0)) + Duration::from_micros(1))
    }

    /// A request went in: one operation, and `bytes` read or written
    /// (written: zeroed too).
    pub(crate) fn charge(&self, read: bool, write: bool, bytes: u64) {
        let mut b = self.buckets.lock();
        let bytes = bytes as f64;
        b.level[0] -= 1.0;
        if read || write {
            b.level[1] -= bytes;
        }
        if read {
            b.level[2] -= bytes;
        }
        if write {
            b.level[3] -= bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests let in over `secs` of simulated time, each `bytes` long,
    /// asking whenever the buckets allow.
    fn let_in(q: &Qos, secs: f64, read: bool, bytes: u64) -> u64 {
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut now = start;
        let mut n = 0;
        while now < end {
            match q.admit(now) {
                None => {
                    q.charge(read, !read, bytes);
                    n += 1;
                }
                Some(t) => now = t,
            }
        }
        n
    }

    #[test]
    fn an_iops_limit_holds_over_time_with_one_burst() {
        let q = Qos::default();
        q.set(QosLimits {
            iops: 500,
            ..Default::default()
        });
        let n = let_in(&q, 10.0, true, 4096);
        // 5000 in 10 s, plus the bucket's 10 at the start.
        assert!((5000..=5012).contains(&n), "{n}");
    }

    #[test]
    fn byte_limits_apply_to_their_direction() {
        let q = Qos::default();
        q.set(QosLimits {
            write_bps: 1 << 20,
            ..Default::default()
        });
        // Writes of 64 KiB: 16 a second.
        let w = let_in(&q, 10.0, false, 64 << 10);
        assert!((160..=162).contains(&w), "{w}");
        // Reads are not limited: the loop only ends through the limit, so
        // count a bounded number.
        let q = Qos::default();
        q.set(QosLimits {
            write_bps: 1 << 20,
            ..Default::default()
        });
        for _ in 0..10_000 {
            assert_eq!(q.admit(Instant::now()), None);
            q.charge(true, false, 1 << 20);
        }
    }

    #[test]
    fn a_request_larger_than_the_allowance_goes_in_and_is_paid_for() {
        let q = Qos::default();
        q.set(QosLimits {
            bps: 100_000,
            ..Default::default()
        });
        let now = Instant::now();
        assert_eq!(q.admit(now), None);
        q.charge(false, true, 1 << 20);
        let t = q.admit(now).expect("over the limit");
        let wait = t.duration_since(now).as_secs_f64();
        // (1 MiB - the 2 kB burst + a 100-byte batch) at 100 kB/s.
        assert!((10.4..10.5).contains(&wait), "{wait}");
    }

    #[test]
    fn a_device_over_its_limit_waits_for_a_batch_not_one_request() {
        let q = Qos::default();
        q.set(QosLimits {
            iops: 5000,
            ..Default::default()
        });
        let now = Instant::now();
        while q.admit(now).is_none() {
            q.charge(true, false, 4096);
        }
        let wait = q.admit(now).unwrap().duration_since(now);
        // 5 requests' worth (1 ms), not one (200 µs).
        assert!(wait >= Duration::from_micros(900), "{wait:?}");
        let g = q.generation();
        q.set(QosLimits::default());
        assert_ne!(q.generation(), g, "a new limit ends the old wait");
    }

    #[test]
    fn no_limit_lets_everything_in_and_is_off() {
        let q = Qos::default();
        assert!(!q.on());
        q.set(QosLimits {
            iops: 10,
            ..Default::default()
        });
        assert!(q.on());
        q.set(QosLimits::default());
        assert!(!q.on());
        assert_eq!(q.admit(Instant::now()), None);
    }
}
