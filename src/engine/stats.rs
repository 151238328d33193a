//! Statistics the engine keeps while it serves: per queue, counters that
//! the device fills in its own terms (request kinds, error statuses, bytes),
//! the requests in flight and a latency histogram; per reactor, the share
//! of time spent doing work. All lock-free: reactors update them on the hot
//! path, the management plane reads them at any time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Sub-buckets per power of two: latencies are kept to within 1/8 (12.5%).
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Powers of two of nanoseconds covered (up to ~9 minutes).
const POWERS: usize = 40;

/// A log-linear histogram of durations (nanoseconds), recorded with one
/// relaxed atomic add. Its buckets are allocated at the first record, so
/// that request kinds a queue never sees cost nothing.
#[derive(Default)]
pub struct Histogram {
    buckets: OnceLock<Box<[AtomicU64]>>,
}

impl Histogram {
    fn bucket(ns: u64) -> usize {
        if ns < SUB as u64 {
            return usize::try_from(ns).unwrap_or(0);
        }
        let power = 63 - ns.leading_zeros();
        let sub = (ns >> (power - SUB_BITS)) & (SUB as u64 - 1);
        let b = usize::try_from(power - SUB_BITS + 1).unwrap_or(0) * SUB
            + usize::try_from(sub).unwrap_or(0);
        b.min(POWERS * SUB - 1)
    }

    /// The smallest duration that falls in bucket `b`.
    fn lower(b: usize) -> u64 {
        if b < SUB {
            return b as u64;
        }
        let power = u32::try_from(b / SUB).unwrap_or(0) + SUB_BITS - 1;
        let sub = (b % SUB) as u64;
        (1u64 << power) | (sub << (power - SUB_BITS))
    }

    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let buckets = self
            .buckets
            .get_or_init(|| (0..POWERS * SUB).map(|_| AtomicU64::new(0)).collect());
        buckets[Self::bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` records to bucket `b` (a restored histogram).
    fn add_bucket(&self, b: usize, n: u64) {
        let buckets = self
            .buckets
            .get_or_init(|| (0..POWERS * SUB).map(|_| AtomicU64::new(0)).collect());
        if let Some(c) = buckets.get(b) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets
            .get()
            .map_or(0, |b| b.iter().map(|b| b.load(Ordering::Relaxed)).sum())
    }

    /// Adds this histogram's bucket counts into `into` (sized by
    /// [`Histogram::counts_len`]): several histograms merge this way.
    pub fn add_counts(&self, into: &mut [u64]) {
        for (sum, b) in into
            .iter_mut()
            .zip(self.buckets.get().into_iter().flatten())
        {
            *sum += b.load(Ordering::Relaxed);
        }
    }

    /// How many bucket counts `add_counts` fills.
    pub const fn counts_len() -> usize {
        POWERS * SUB
    }

    /// The upper edge of bucket `b`, in nanoseconds: every duration it
    /// counts is below it (u64::MAX for the last, open-ended one).
    pub fn upper_ns(b: usize) -> u64 {
        if b + 1 < POWERS * SUB {
            Self::lower(b + 1)
        } else {
            u64::MAX
        }
    }

    /// The duration below which a fraction `q` (0..=1) of the records lie,
    /// to within a bucket; None when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut counts = vec![0; Self::counts_len()];
        self.add_counts(&mut counts);
        Self::quantile_of(&counts, q)
    }

    /// [`Histogram::quantile`] of merged bucket counts.
    pub fn quantile_of(counts: &[u64], q: f64) -> Option<Duration> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The middle of the bucket.
                let lo = Self::lower(b);
                let hi = if b + 1 < counts.len() {
                    Self::lower(b + 1)
                } else {
                    lo
                };
                return Some(Duration::from_nanos(lo + (hi - lo) / 2));
            }
        }
        None
    }
}

/// Request kinds a queue counts apart.
pub const KINDS: usize = 8;

/// Counters of one queue. The device decides what the slots of `requests`
/// and `errors` mean (virtio-blk: request types and status bytes); the
/// slots of `failed`, `latency` and `time_ns` are those of `requests`.
#[derive(Default)]
pub struct QueueStats {
    pub requests: [AtomicU64; KINDS],
    pub errors: [AtomicU64; 4],
    /// Requests of each kind that failed (any error outcome).
    pub failed: [AtomicU64; KINDS],
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub in_flight: AtomicU64,
    /// Time from the ring to the used entry, by kind.
    pub latency: [Histogram; KINDS],
    /// The same time summed, in nanoseconds, by kind.
    pub time_ns: [AtomicU64; KINDS],
}

impl QueueStats {
    /// A request of kind `kind` took `d`.
    pub fn record(&self, kind: usize, d: Duration) {
        let kind = kind.min(KINDS - 1);
        self.latency[kind].record(d);
        Self::add(
            &self.time_ns[kind],
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// Bucket counts of every kind's latency, merged (see
    /// [`Histogram::quantile_of`]).
    pub fn all_latency(&self, into: &mut [u64]) {
        for h in &self.latency {
            h.add_counts(into);
        }
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// A queue's counters as a live upgrade carries them: each array in the
/// order of [`QueueStats`]'s, latency as (bucket, count) pairs per kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedStats {
    pub requests: Vec<u64>,
    pub errors: Vec<u64>,
    pub failed: Vec<u64>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub time_ns: Vec<u64>,
    pub latency: Vec<Vec<(usize, u64)>>,
}

impl QueueStats {
    /// The counters now (requests in flight are not counters: none are,
    /// at an upgrade).
    pub fn save(&self) -> SavedStats {
        let all = |c: &[AtomicU64]| c.iter().map(Self::get).collect();
        SavedStats {
            requests: all(&self.requests),
            errors: all(&self.errors),
            failed: all(&self.failed),
            bytes_read: Self::get(&self.bytes_read),
            bytes_written: Self::get(&self.bytes_written),
            time_ns: all(&self.time_ns),
            latency: self
                .latency
                .iter()
                .map(|h| {
                    let mut c = vec![0; Histogram::counts_len()];
                    h.add_counts(&mut c);
                    c.into_iter().enumerate().filter(|(_, n)| *n > 0).collect()
                })
                .collect(),
        }
    }

    /// Adds saved counters to these (a fresh queue's: the totals go on
    /// from where the old binary left them).
    pub fn restore(&self, s: &SavedStats) -> Result<(), String> {
        let sized = [
            (s.requests.len(), KINDS),
            (s.errors.len(), self.errors.len()),
            (s.failed.len(), KINDS),
            (s.time_ns.len(), KINDS),
            (s.latency.len(), KINDS),
        ];
        if sized.iter().any(|(a, b)| a != b)
            || s.latency
                .iter()
                .flatten()
                .any(|(b, _)| *b >= Histogram::counts_len())
        {
            return Err("queue statistics of another shape".into());
        }
        let put = |c: &[AtomicU64], v: &[u64]| {
            for (c, v) in c.iter().zip(v) {
                Self::add(c, *v);
            }
        };
        put(&self.requests, &s.requests);
        put(&self.errors, &s.errors);
        put(&self.failed, &s.failed);
        put(&self.time_ns, &s.time_ns);
        Self::add(&self.bytes_read, s.bytes_read);
        Self::add(&self.bytes_written, s.bytes_written);
        for (h, counts) in self.latency.iter().zip(&s.latency) {
            for &(b, n) in counts {
                h.add_bucket(b, n);
            }
        }
        Ok(())
    }
}

/// Time a reactor spent in passes that found work, and in all, in clock
/// ticks (time-stamp counter cycles on x86_64): only their ratio is used.
#[derive(Default)]
pub struct ReactorStats {
    pub busy_ns: AtomicU64,
    pub total_ns: AtomicU64,
}

impl ReactorStats {
    /// Busy time over all time since the start, 0..=1.
    pub fn busy_fraction(&self) -> f64 {
        let total = self.total_ns.load(Ordering::Relaxed);
        if total == 0 {
            return 0.0;
        }
        self.busy_ns.load(Ordering::Relaxed) as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_within_a_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5).unwrap().as_micros() as f64;
        assert!((p50 - 500.0).abs() / 500.0 < 0.13, "{p50}");
        let p99 = h.quantile(0.99).unwrap().as_micros() as f64;
        assert!((p99 - 990.0).abs() / 990.0 < 0.13, "{p99}");
        // Tiny and huge values land in the first and last buckets.
        h.record(Duration::from_nanos(3));
        h.record(Duration::from_secs(100_000));
        assert_eq!(h.count(), 1002);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 20, 1 << 30, 1 << 38]) {
            let b = Histogram::bucket(ns);
            assert!(b >= last || ns < 100_000, "{ns}");
            assert!(Histogram::lower(b) <= ns, "{ns} bucket {b}");
            last = b;
        }
    }
}
