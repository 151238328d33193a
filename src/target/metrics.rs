//! `--metrics ADDR:PORT`: the same statistics as `device_stats`, as
//! Prometheus text exposition (encoded by the prometheus-client crate),
//! served over plain HTTP to whoever scrapes it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use log::{info, warn};
use parking_lot::Mutex;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::conns::{accept_each, Place, Places};
use super::Target;
use crate::blk::exec::{ERROR_KINDS, REQUEST_KINDS};
use crate::blk::BlkShared;
use crate::engine::{Histogram, QueueStats, KINDS};

/// The upper bounds (seconds) of the exported latency buckets, before
/// +Inf: from 5 µs (a memory disk) to 10 s (a network disk that stalls).
const LE: [f64; 19] = [
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
    0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram as it stands at the scrape, taken from the engine's
/// finer one (prometheus-client's own `Histogram` is recorded into, one
/// observation at a time; ours is already counted).
#[derive(Debug, Default)]
struct Counted(Mutex<HistogramNow>);

/// Sum (seconds), count, and the count of each bucket by upper bound.
type HistogramNow = (f64, u64, Vec<(f64, u64)>);

impl TypedMetric for Counted {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = &*self.0.lock();
        encoder.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl Counted {
    /// From the engine's bucket counts and the total time (ns): each fine
    /// bucket is counted under the first bound its upper edge does not
    /// pass, so that every bucket holds only durations at or below its
    /// `le`.
    fn set(&self, fine: &[u64], total_ns: u64) {
        let mut per_le = vec![0u64; LE.len() + 1];
        for (b, &c) in fine.iter().enumerate().filter(|(_, &c)| c > 0) {
            let upper = Histogram::upper_ns(b) as f64 / 1e9;
            let i = LE.iter().position(|&le| upper <= le).unwrap_or(LE.len());
            per_le[i] += c;
        }
        let buckets = LE
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(per_le)
            .collect();
        *self.0.lock() = (total_ns as f64 / 1e9, fine.iter().sum(), buckets);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    device: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    device: String,
    queue: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabels {
    device: String,
    queue: String,
    quantile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    device: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    device: String,
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReactorLabels {
    reactor: String,
}

/// The metric families of one scrape.
#[derive(Default)]
struct Families {
    requests: Family<KindLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    read: Family<QueueLabels, Counter>,
    written: Family<QueueLabels, Counter>,
    in_flight: Family<QueueLabels, Gauge>,
    latency: Family<QuantileLabels, Gauge<f64, AtomicU64>>,
    duration: Family<OpLabels, Counted>,
    failed: Family<OpLabels, Counter>,
    size: Family<DeviceLabels, Gauge>,
    attached: Family<DeviceLabels, Gauge>,
    qos_limit: Family<LimitLabels, Gauge>,
    qos_waits: Family<DeviceLabels, Counter>,
    busy: Family<ReactorLabels, Gauge<f64, AtomicU64>>,
}

impl Families {
    fn register(&self, reg: &mut Registry) {
        macro_rules! register {
            ($($field:ident $name:literal $help:literal)*) => {
                $(reg.register($name, $help, self.$field.clone());)*
            };
        }
        register! {
            requests "requests" "Requests completed, by kind"
            errors "errors" "Requests that failed, by outcome"
            read "read_bytes" "Bytes read by the guest"
            written "written_bytes" "Bytes written by the guest"
            in_flight "in_flight" "Requests in flight"
            latency "latency_seconds" "Request latency, from the ring to the used entry (per queue; not aggregatable: see request_duration_seconds)"
            duration "request_duration_seconds" "Request latency by operation, from the ring to the used entry, all queues of the device"
            failed "failed_requests" "Requests that failed, by operation"
            size "disk_size_bytes" "Size of the disk"
            attached "client_attached" "Whether a client (a VMM) is connected to the device"
            qos_limit "qos_limit" "The device's limit per second (iops, bps, read-bps, write-bps; 0: none)"
            qos_waits "qos_waits" "Times a queue found the device over its limit and waited"
            busy "reactor_busy_ratio" "Share of the reactor's time spent in passes that found work"
        }
    }

    /// One queue's counters, gauges and latency quantiles.
    fn queue(&self, device: &str, qi: usize, q: &QueueStats) {
        let ql = QueueLabels {
            device: device.to_string(),
            queue: qi.to_string(),
        };
        let kl = |kind: &str| KindLabels {
            device: device.to_string(),
            queue: qi.to_string(),
            kind: kind.to_string(),
        };
        for (k, c) in REQUEST_KINDS.iter().zip(&q.requests) {
            self.requests
                .get_or_create(&kl(k))
                .inc_by(QueueStats::get(c));
        }
        for (k, c) in ERROR_KINDS.iter().zip(&q.errors) {
            self.errors.get_or_create(&kl(k)).inc_by(QueueStats::get(c));
        }
        self.read
            .get_or_create(&ql)
            .inc_by(QueueStats::get(&q.bytes_read));
        self.written
            .get_or_create(&ql)
            .inc_by(QueueStats::get(&q.bytes_written));
        self.in_flight
            .get_or_create(&ql)
            .set(i64::try_from(QueueStats::get(&q.in_flight)).unwrap_or(i64::MAX));
        let mut counts = vec![0; Histogram::counts_len()];
        q.all_latency(&mut counts);
        for (label, p) in [("0.5", 0.5), ("0.99", 0.99), ("0.999", 0.999)] {
            if let Some(d) = Histogram::quantile_of(&counts, p) {
                self.latency
                    .get_or_create(&QuantileLabels {
                        device: device.to_string(),
                        queue: qi.to_string(),
                        quantile: label.to_string(),
                    })
                    .set(d.as_secs_f64());
            }
        }
    }

    /// The device's latency histogram and failures per operation, over
    /// all its queues (operations it never saw are left out).
    fn operations(&self, device: &str, s: &BlkShared) {
        for (kind, op) in REQUEST_KINDS.iter().enumerate().take(KINDS) {
            let mut counts = vec![0; Histogram::counts_len()];
            let mut total_ns = 0;
            let mut failed = 0;
            for q in &s.stats {
                q.latency[kind].add_counts(&mut counts);
                total_ns += QueueStats::get(&q.time_ns[kind]);
                failed += QueueStats::get(&q.failed[kind]);
            }
            if counts.iter().all(|&c| c == 0) {
                continue;
            }
            let l = OpLabels {
                device: device.to_string(),
                op: (*op).to_string(),
            };
            self.duration.get_or_create(&l).set(&counts, total_ns);
            self.failed.get_or_create(&l).inc_by(failed);
        }
    }
}

/// The exposition text for every device and reactor now.
pub fn render(t: &Target) -> String {
    let mut reg = Registry::with_prefix("vfio_user_blk");
    let f = Families::default();
    f.register(&mut reg);
    reg.register(
        "build",
        "The target's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    for (name, s, attached) in t.snapshot() {
        let d = DeviceLabels {
            device: name.clone(),
        };
        f.size
            .get_or_create(&d)
            .set(i64::try_from(s.capacity_bytes()).unwrap_or(i64::MAX));
        f.attached.get_or_create(&d).set(i64::from(attached));
        for (k, v) in s.qos.limits().named() {
            f.qos_limit
                .get_or_create(&LimitLabels {
                    device: name.clone(),
                    limit: k.to_string(),
                })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        f.qos_waits.get_or_create(&d).inc_by(s.qos.waits());
        for (qi, q) in s.stats.iter().enumerate() {
            f.queue(&name, qi, q);
        }
        f.operations(&name, &s);
    }
    for (i, r) in t.engine().reactor_stats().iter().enumerate() {
        f.busy
            .get_or_create(&ReactorLabels {
                reactor: i.to_string(),
            })
            .set(r.busy_fraction());
    }
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

/// Scrape connections open at once (past it, the one that has waited
/// longest for its request is closed for the newcomer); each gets this long
/// to send its request.
const MAX_CONNECTIONS: usize = 16;
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

fn answer(t: &Target, mut s: TcpStream, place: &Place) {
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    // The request line and headers: up to 8 KiB, until a blank line, within
    // REQUEST_DEADLINE in all (a client trickling bytes gets no longer).
    let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
    let mut buf = [0u8; 8192];
    let mut n = 0;
    while n < buf.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..n].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    // Being answered: not closed to make room for another.
    place.busy(true);
    let head = String::from_utf8_lossy(&buf[..n]);
    // (A query string, as Prometheus' `params:` add, asks for the same.)
    let target = head.split_whitespace().nth(1).unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    // HEAD: the same answer without its body (a probe that a scrape
    // would work).
    let head_only = head.starts_with("HEAD ");
    let (status, body, ctype) =
        if (head.starts_with("GET ") || head_only) && (path == "/metrics" || path == "/") {
            (
                "200 OK",
                render(t),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            ("404 Not Found", "GET /metrics\n".to_string(), "text/plain")
        };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { body.as_str() }
    );
}

/// Serves the metrics on `addr` on its own thread.
pub fn serve(target: Arc<Target>, addr: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("binding metrics on {addr}"))?;
    if !addr.ip().is_loopback() {
        warn!("metrics on {addr}: reachable from outside this machine");
    }
    serve_listener(target, l)
}

/// Serves metrics on a bound port (after a live upgrade: the old
/// binary's).
pub fn serve_listener(target: Arc<Target>, l: TcpListener) -> Result<()> {
    super::upgrade::keep_metrics(&l);
    info!("metrics on http://{}/metrics", l.local_addr()?);
    let places = Places::new(MAX_CONNECTIONS);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            // Each scrape on its own thread: a slow one holds only itself,
            // and only until a newcomer needs its place.
            accept_each(
                "metrics",
                l.incoming(),
                &places,
                "the one waiting longest for its request",
                drop,
                move |s, place| answer(&target, s, &place),
            );
        })?;
    Ok(())
}
