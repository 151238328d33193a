//! The benchmark's output: tables with ratios, JSON, and an SVG plot.
//! Ratios are of figures measured in the same run; a ratio whose target
//! did not run is `-` in the tables and `null` in the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use serde_json::{json, Value};

use crate::run::{Disk, Op, RunResult, Workload};

/// Every target name, in table order.
pub const TARGETS: [&str; 7] = [
    "ours",
    "ours-threads",
    "qsd-threads",
    "qsd-uring",
    "qsd-native",
    "direct",
    "direct-uring",
];

/// The set-ups of the multi-device workload, in table order: (a) one
/// server process with all disks, (b) one process per disk, (c) one
/// qemu-storage-daemon with all disks on one iothread, per aio.
pub const MULTI_SETUPS: [&str; 4] = [
    "ours-1proc",
    "ours-4proc",
    "qsd-threads-1iot",
    "qsd-uring-1iot",
];

/// Median of each metric over repeats.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub iops: f64,
    pub mbps: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub cpu_per_mreq: f64,
    pub device_cpu_per_mreq: f64,
    /// CPU seconds of the device process(es) per wall second.
    pub cores: f64,
    pub runs: usize,
}

/// The median (the mean of the middle two for an even count; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn summarize(runs: &[RunResult]) -> Summary {
    let m = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
    Summary {
        iops: m(&|r| r.iops()),
        mbps: m(&|r| r.mbps()),
        p50: m(&|r| r.pct_us(0.5)),
        p99: m(&|r| r.pct_us(0.99)),
        p999: m(&|r| r.pct_us(0.999)),
        cpu_per_mreq: m(&|r| r.cpu_per_mreq()),
        device_cpu_per_mreq: m(&|r| r.device_cpu_per_mreq()),
        cores: m(&|r| {
            if r.secs > 0.0 {
                r.device_cpu / r.secs
            } else {
                0.0
            }
        }),
        runs: runs.len(),
    }
}

/// One workload's results.
pub struct Row {
    pub w: Workload,
    /// The targets (or multi-device set-ups) it was to run, in order.
    pub targets: Vec<&'static str>,
    pub per: BTreeMap<&'static str, Summary>,
    /// Targets that could not run here, with the reason.
    pub not_run: BTreeMap<&'static str, String>,
}

/// Results in workload order.
pub type Results = BTreeMap<usize, Row>;

/// What the run was, for the header and the JSON.
pub struct Meta {
    pub machine: String,
    pub repeat: usize,
    pub seconds: f64,
    pub targets: Vec<&'static str>,
    pub ours_args: String,
    pub ours_threads_args: String,
    /// The interface the synthetic guest drives ours through.
    pub interface: String,
    /// Where the direct-* image is (device, file system), or empty.
    pub disk: String,
    pub multi_size: u64,
    /// Workloads left out, with the reason.
    pub skipped: BTreeMap<String, String>,
}

impl Row {
    /// The fastest qemu-storage-daemon (by IOPS) of this workload.
    pub fn best_qsd(&self) -> Option<(&'static str, &Summary)> {
        self.per
            .iter()
            .filter(|(t, _)| t.starts_with("qsd"))
            .max_by(|a, b| {
                a.1.iops
                    .partial_cmp(&b.1.iops)
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|(t, s)| (*t, s))
    }

    /// The reference of the disk itself: direct-uring on the direct-*
    /// workloads (fio's way), direct (threads) elsewhere.
    pub fn reference(&self) -> Option<(&'static str, &Summary)> {
        let t = if self.w.disk == Disk::Direct {
            "direct-uring"
        } else {
            "direct"
        };
        self.per.get(t).map(|s| (t, s))
    }

    fn iops(&self, t: &str) -> Option<f64> {
        self.per.get(t).map(|s| s.iops)
    }
}

/// a / b, when both ran and b is not 0.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into())
}

pub fn header(m: &Meta) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}", m.machine);
    let _ = writeln!(
        out,
        "{} s per run, {} run(s) per cell (medians); CPU s/M = CPU seconds per million requests (device + driver)",
        m.seconds, m.repeat
    );
    let _ = writeln!(
        out,
        "ours: {} --io-engine io-uring; ours-threads: {} --io-engine threads; guest on the {} interface",
        m.ours_args, m.ours_threads_args, m.interface
    );
    if !m.disk.is_empty() {
        let _ = writeln!(out, "{}", m.disk);
    }
    for (w, why) in &m.skipped {
        let _ = writeln!(out, "skipped {w}: {why}");
    }
    out
}

/// The single-device workloads: every target, ratios on the `ours` and
/// `ours-threads` lines.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<13} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}   {:>8} {:>8} {:>9}",
        "workload",
        "target",
        "IOPS",
        "MB/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "CPU s/M",
        "ours/qsd",
        "ours/dir",
        "p50 o/q"
    );
    for row in results.values().filter(|r| r.w.devices == 1) {
        let best = row.best_qsd();
        let reference = row.reference();
        let mut first = true;
        for &t in &row.targets {
            let name = if first { row.w.name.as_str() } else { "" };
            if let Some(why) = row.not_run.get(t) {
                let _ = writeln!(out, "{name:<28} {t:<13} not run: {why}");
                first = false;
                continue;
            }
            let Some(s) = row.per.get(t) else { continue };
            first = false;
            let ratios = if t.starts_with("ours") {
                format!(
                    "{:>8} {:>8} {:>9}",
                    fmt_ratio(ratio(Some(s.iops), best.map(|b| b.1.iops))),
                    fmt_ratio(ratio(Some(s.iops), reference.map(|r| r.1.iops))),
                    fmt_ratio(ratio(Some(s.p50), best.map(|b| b.1.p50)))
                )
            } else {
                String::new()
            };
            let label = if best.is_some_and(|b| b.0 == t) {
                format!("{t}*")
            } else {
                t.to_string()
            };
            let _ = writeln!(
                out,
                "{name:<28} {label:<13} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.2}   {}",
                s.iops, s.mbps, s.p50, s.p99, s.p999, s.cpu_per_mreq, ratios
            );
        }
    }
    let _ = writeln!(
        out,
        "* the fastest qsd of the workload, which ours/qsd and p50 o/q compare against; \
         ours/dir compares against direct-uring on direct-* workloads, direct elsewhere"
    );
    if results.values().any(|r| r.w.disk == Disk::Null) {
        let _ = writeln!(
            out,
            "null-* workloads do no file I/O, so the I/O engine and aio do not matter: \
             each device runs once (ours, qsd-threads when selected)"
        );
    }
    out
}

/// The multi-device workload: total IOPS and the cores the server
/// process(es) used, per set-up.
pub fn multi_table(results: &Results, m: &Meta) -> String {
    let mut out = String::new();
    for row in results.values().filter(|r| r.w.devices > 1) {
        let w = &row.w;
        let _ = writeln!(
            out,
            "\n{}: {} disks ({} image files of {} MiB, page-cached), {} KiB random {}, QD{} on each, one guest thread per disk, all at once",
            w.name,
            w.devices,
            w.devices,
            m.multi_size >> 20,
            w.bs >> 10,
            if w.op == Op::Read { "read" } else { "write" },
            w.qd
        );
        let _ = writeln!(
            out,
            "{:<18} {:>10} {:>9} {:>9} {:>9} {:>12} {:>10} {:>9}",
            "setup", "IOPS", "MB/s", "p50 us", "p99 us", "server cores", "IOPS/core", "CPU s/M"
        );
        for &t in &row.targets {
            if let Some(why) = row.not_run.get(t) {
                let _ = writeln!(out, "{t:<18} not run: {why}");
                continue;
            }
            let Some(s) = row.per.get(t) else { continue };
            let per_core = if s.cores > 0.0 { s.iops / s.cores } else { 0.0 };
            let _ = writeln!(
                out,
                "{t:<18} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>12.2} {:>10.0} {:>9.2}",
                s.iops, s.mbps, s.p50, s.p99, s.cores, per_core, s.cpu_per_mreq
            );
        }
        let get = |t: &str| row.per.get(t);
        let _ = writeln!(
            out,
            "(a)/(b) = ours-1proc/ours-4proc: IOPS {}, server cores {}",
            fmt_ratio(ratio(
                get("ours-1proc").map(|s| s.iops),
                get("ours-4proc").map(|s| s.iops)
            )),
            fmt_ratio(ratio(
                get("ours-1proc").map(|s| s.cores),
                get("ours-4proc").map(|s| s.cores)
            ))
        );
        if let Some((bt, b)) = row.best_qsd() {
            let _ = writeln!(
                out,
                "(a)/(c) = ours-1proc/{bt}: IOPS {}, server cores {}",
                fmt_ratio(ratio(get("ours-1proc").map(|s| s.iops), Some(b.iops))),
                fmt_ratio(ratio(get("ours-1proc").map(|s| s.cores), Some(b.cores)))
            );
        }
        let _ = writeln!(
            out,
            "server cores = CPU seconds of the server process(es) / wall seconds; \
             (a) one process, {} --device, {}; (b) {} processes, one disk each, the same options; \
             (c) one qemu-storage-daemon, {} exports on one iothread",
            w.devices, m.ours_args, w.devices, w.devices
        );
    }
    out
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "iops": s.iops, "mb_per_s": s.mbps,
        "p50_us": s.p50, "p99_us": s.p99, "p999_us": s.p999,
        "cpu_s_per_million": s.cpu_per_mreq,
        "device_cpu_s_per_million": s.device_cpu_per_mreq,
        "server_cores": s.cores,
        "runs": s.runs,
    })
}

pub fn to_json(results: &Results, m: &Meta) -> Value {
    let rows: Vec<Value> = results
        .values()
        .map(|row| {
            let w = &row.w;
            // Every target the workload was to run: its figures, or null.
            let targets: serde_json::Map<String, Value> = row
                .targets
                .iter()
                .map(|t| {
                    (
                        t.to_string(),
                        row.per.get(t).map(summary_json).unwrap_or(Value::Null),
                    )
                })
                .collect();
            let not_run: serde_json::Map<String, Value> = row
                .not_run
                .iter()
                .map(|(t, why)| (t.to_string(), Value::from(why.as_str())))
                .collect();
            let best = row.best_qsd();
            let mut v = json!({
                "workload": w.name,
                "op": format!("{:?}", w.op),
                "random": w.random,
                "block_size": w.bs,
                "queue_depth": w.qd,
                "queues": w.queues,
                "disk": format!("{:?}", w.disk).to_lowercase(),
                "null_disk": w.disk == Disk::Null,
                "devices": w.devices,
                "targets": targets,
                "not_run": not_run,
                "best_qsd": best.map(|b| b.0),
            });
            let o = v.as_object_mut().expect("an object");
            let b_iops = best.map(|b| b.1.iops);
            let mut put = |k: &str, r: Option<f64>| {
                o.insert(k.into(), r.map(Value::from).unwrap_or(Value::Null));
            };
            if w.devices > 1 {
                let g = |t: &str, f: fn(&Summary) -> f64| row.per.get(t).map(f);
                put(
                    "ratio_1proc_4proc_iops",
                    ratio(g("ours-1proc", |s| s.iops), g("ours-4proc", |s| s.iops)),
                );
                put(
                    "ratio_1proc_4proc_cores",
                    ratio(g("ours-1proc", |s| s.cores), g("ours-4proc", |s| s.cores)),
                );
                put(
                    "ratio_1proc_qsd_iops",
                    ratio(g("ours-1proc", |s| s.iops), b_iops),
                );
                put(
                    "ratio_1proc_qsd_cores",
                    ratio(g("ours-1proc", |s| s.cores), best.map(|b| b.1.cores)),
                );
            } else {
                put("ratio_ours_qsd_iops", ratio(row.iops("ours"), b_iops));
                put(
                    "ratio_ours_threads_qsd_iops",
                    ratio(row.iops("ours-threads"), b_iops),
                );
                put(
                    "ratio_ours_direct_iops",
                    ratio(row.iops("ours"), row.iops("direct")),
                );
                put(
                    "ratio_ours_direct_uring_iops",
                    ratio(row.iops("ours"), row.iops("direct-uring")),
                );
                put(
                    "ratio_ours_qsd_p50",
                    ratio(row.per.get("ours").map(|s| s.p50), best.map(|b| b.1.p50)),
                );
            }
            v
        })
        .collect();
    json!({
        "machine": m.machine,
        "repeat": m.repeat,
        "seconds_per_run": m.seconds,
        "targets": m.targets,
        "ours_args": m.ours_args,
        "interface": m.interface,
        "ours_threads_args": m.ours_threads_args,
        "direct_disk": if m.disk.is_empty() { Value::Null } else { Value::from(m.disk.as_str()) },
        "skipped": m.skipped,
        "results": rows,
    })
}

/// A plotted line: target, points, colour.
type Series = (&'static str, Vec<(f64, f64)>, RGBColor);

/// IOPS and p99 against queue depth for 4 KiB random reads on one queue.
/// Series colours of the charts.
pub const PALETTE: [RGBColor; 12] = [
    RGBColor(200, 40, 40),
    RGBColor(230, 140, 30),
    RGBColor(40, 90, 200),
    RGBColor(120, 60, 180),
    RGBColor(60, 170, 190),
    RGBColor(60, 150, 60),
    RGBColor(120, 120, 120),
    RGBColor(170, 110, 60),
    RGBColor(0, 0, 0),
    RGBColor(220, 90, 160),
    RGBColor(90, 90, 40),
    RGBColor(40, 160, 120),
];

pub fn plot(results: &Results, path: &Path) -> Result<()> {
    let pts = |t: &str, f: &dyn Fn(&Summary) -> f64| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = results
            .values()
            .filter(|r| {
                let w = &r.w;
                w.bs == 4096
                    && w.random
                    && w.op == Op::Read
                    && w.queues == 1
                    && w.devices == 1
                    && w.disk == Disk::Cached
            })
            .filter_map(|r| r.per.get(t).map(|s| (r.w.qd as f64, f(s))))
            .collect();
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        v
    };
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let colors = PALETTE;
    for (area, title, f, unit) in [
        (
            &left,
            "4 KiB random read, 1 queue: IOPS",
            &(|s: &Summary| s.iops) as &dyn Fn(&Summary) -> f64,
            "IOPS",
        ),
        (
            &right,
            "4 KiB random read, 1 queue: p99 latency",
            &(|s: &Summary| s.p99),
            "p99 (us)",
        ),
    ] {
        let series: Vec<Series> = TARGETS
            .iter()
            .zip(colors)
            .map(|(t, c)| (*t, pts(t, f), c))
            .filter(|s| !s.1.is_empty())
            .collect();
        let ymax = series
            .iter()
            .flat_map(|(_, v, _)| v.iter().map(|p| p.1))
            .fold(1.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d((1f64..160f64).log_scale(), 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("queue depth")
            .y_desc(unit)
            .x_labels(6)
            .draw()?;
        for (name, v, c) in series {
            chart
                .draw_series(LineSeries::new(v.clone(), c.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart.draw_series(v.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
