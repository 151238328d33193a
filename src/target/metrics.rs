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
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::conns::{accept_each, Place, Places};
use super::Target;
use crate::blk::exec::{ERROR_KINDS, REQUEST_KINDS};
use crate::engine::QueueStats;

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
struct DeviceLabels {
    device: String,
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
    size: Family<DeviceLabels, Gauge>,
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
            latency "latency_seconds" "Request latency, from the ring to the used entry"
            size "disk_size_bytes" "Size of the disk"
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
        for (label, p) in [("0.5", 0.5), ("0.99", 0.99), ("0.999", 0.999)] {
            if let Some(d) = q.latency.quantile(p) {
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
}

/// The exposition text for every device and reactor now.
pub fn render(t: &Target) -> String {
    let mut reg = Registry::with_prefix("vfio_user_blk");
    let f = Families::default();
    f.register(&mut reg);
    for (name, s) in t.snapshot() {
        f.size
            .get_or_create(&DeviceLabels {
                device: name.clone(),
            })
            .set(i64::try_from(s.capacity_bytes()).unwrap_or(i64::MAX));
        for (qi, q) in s.stats.iter().enumerate() {
            f.queue(&name, qi, q);
        }
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
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body, ctype) = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
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
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Serves the metrics on `addr` on its own thread.
pub fn serve(target: Arc<Target>, addr: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("binding metrics on {addr}"))?;
    if !addr.ip().is_loopback() {
        warn!("metrics on {addr}: reachable from outside this machine");
    }
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
