//! The benchmark's output: tables with ratios, JSON, and an SVG plot.
//! Ratios are of figures measured in the same run; a ratio whose target
//! did not run is `-` in the tables and `null` in the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::chart;
use crate::run::{Disk, Op, RunResult, Workload};

/// Every target name, in table order.
pub const TARGETS: [&str; 9] = [
    "ours",
    "ours-base",
    "ours-threads",
    "ours-adaptive",
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

/// A spread over this fraction of the median marks a cell.
pub const SPREAD_MARK: f64 = 0.10;

/// Median of each metric over repeats, with the least and most of IOPS and
/// p50.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub iops: f64,
    pub iops_min: f64,
    pub iops_max: f64,
    pub p50_min: f64,
    pub p50_max: f64,
    /// IOPS and p50 of each run, in the order they ran.
    pub each: Vec<(f64, f64)>,
    pub mbps: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// The slowest request of a run, in µs (the median over the runs).
    pub max_us: f64,
    pub cpu_per_mreq: f64,
    pub device_cpu_per_mreq: f64,
    /// CPU seconds of the device process(es) per wall second.
    pub cores: f64,
    /// Doorbells the guest rang per request.
    pub kicks_per_io: f64,
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

/// (max - min) / median: how far apart the runs of a cell were.
pub fn spread(min: f64, median: f64, max: f64) -> f64 {
    if median > 0.0 {
        (max - min) / median
    } else {
        0.0
    }
}

impl Summary {
    pub fn iops_spread(&self) -> f64 {
        spread(self.iops_min, self.iops, self.iops_max)
    }
    pub fn p50_spread(&self) -> f64 {
        spread(self.p50_min, self.p50, self.p50_max)
    }
    /// Whether the runs of this cell disagree by more than SPREAD_MARK.
    pub fn unsteady(&self) -> bool {
        self.iops_spread() > SPREAD_MARK || self.p50_spread() > SPREAD_MARK
    }
}

pub fn summarize(runs: &[RunResult]) -> Summary {
    let m = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
    let least = |f: &dyn Fn(&RunResult) -> f64| runs.iter().map(f).fold(f64::INFINITY, f64::min);
    let most = |f: &dyn Fn(&RunResult) -> f64| runs.iter().map(f).fold(0.0, f64::max);
    let p50 = |r: &RunResult| r.pct_us(0.5);
    Summary {
        iops: m(&|r| r.iops()),
        iops_min: least(&|r| r.iops()),
        iops_max: most(&|r| r.iops()),
        p50_min: least(&p50),
        p50_max: most(&p50),
        each: runs.iter().map(|r| (r.iops(), p50(r))).collect(),
        mbps: m(&|r| r.mbps()),
        p50: m(&|r| r.pct_us(0.5)),
        p99: m(&|r| r.pct_us(0.99)),
        p999: m(&|r| r.pct_us(0.999)),
        max_us: m(&|r| r.hist.max() as f64 / 1000.0),
        cpu_per_mreq: m(&|r| r.cpu_per_mreq()),
        device_cpu_per_mreq: m(&|r| r.device_cpu_per_mreq()),
        cores: m(&|r| {
            if r.secs > 0.0 {
                r.device_cpu / r.secs
            } else {
                0.0
            }
        }),
        kicks_per_io: m(&|r| r.kicks as f64 / r.ios.max(1) as f64),
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
    pub ours_adaptive_args: String,
    /// The interface the synthetic guest drives ours through.
    pub interface: String,
    /// Where the direct-* image is (device, file system), or empty.
    pub disk: String,
    pub multi_size: u64,
    /// Workloads left out, with the reason.
    pub skipped: BTreeMap<String, String>,
    /// Where the targets and the guest ran.
    pub placement: String,
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

/// 123456 as `123.5k`.
fn kilo(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// A spread in percent, marked when over SPREAD_MARK.
fn fmt_spread(sp: f64) -> String {
    let mark = if sp > SPREAD_MARK { "!" } else { "" };
    format!("{:.1}%{mark}", sp * 100.0)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into())
}

pub fn header(m: &Meta) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}", m.machine);
    let _ = writeln!(
        out,
        "{} s per run, {} run(s) per cell, interleaved: IOPS and p50 are medians with [min-max] \
         and spread = (max-min)/median, marked ! over {:.0} %; CPU s/M = CPU seconds of the \
         device side (the server's processes; a direct reference's own I/O) per million \
         requests, the synthetic guest's left out",
        m.seconds,
        m.repeat,
        SPREAD_MARK * 100.0
    );
    let _ = writeln!(out, "placement: {}", m.placement);
    let _ = writeln!(
        out,
        "ours: {} --io-engine io-uring; ours-threads: {} --io-engine threads; ours-adaptive (direct-* only): {} --io-engine io-uring; guest on the {} interface",
        m.ours_args, m.ours_threads_args, m.ours_adaptive_args, m.interface
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
        "{:<26} {:<14} {:>8} {:>15} {:>6}  {:>7} {:>13} {:>6}  {:>8} {:>8} {:>7}   {:>8} {:>8} {:>7}",
        "workload",
        "target",
        "IOPS",
        "[min-max]",
        "spread",
        "p50 us",
        "[min-max]",
        "spread",
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
                let _ = writeln!(out, "{name:<26} {t:<14} not run: {why}");
                first = false;
                continue;
            }
            let Some(s) = row.per.get(t) else { continue };
            first = false;
            let ratios = if t.starts_with("ours") {
                format!(
                    "{:>8} {:>8} {:>7}",
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
                "{name:<26} {label:<14} {:>8} {:>15} {:>6}  {:>7.1} {:>13} {:>6}  {:>8.1} {:>8.1} {:>7.2}   {}",
                kilo(s.iops),
                format!("[{}-{}]", kilo(s.iops_min), kilo(s.iops_max)),
                fmt_spread(s.iops_spread()),
                s.p50,
                format!("[{:.1}-{:.1}]", s.p50_min, s.p50_max),
                fmt_spread(s.p50_spread()),
                s.p99,
                s.p999,
                s.device_cpu_per_mreq,
                ratios
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
            "\n{}: {} disks ({} image files of {} MiB, page-cached), {} KiB random {}, QD{} on each, all at once from one guest thread (one vCPU polling its disks)",
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
            "{:<18} {:>10} {:>17} {:>6} {:>9} {:>9} {:>9} {:>9} {:>12} {:>10} {:>9} {:>8}",
            "setup",
            "IOPS",
            "[min-max]",
            "spread",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "max us",
            "server cores",
            "IOPS/core",
            "CPU s/M",
            "kicks/IO"
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
                "{t:<18} {:>10.0} {:>17} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>12.2} {:>10.0} {:>9.2} {:>8.3}",
                s.iops,
                format!("[{}-{}]", kilo(s.iops_min), kilo(s.iops_max)),
                fmt_spread(s.iops_spread()),
                s.p50,
                s.p99,
                s.p999,
                s.max_us,
                s.cores,
                per_core,
                s.device_cpu_per_mreq,
                s.kicks_per_io
            );
        }
        let get = |t: &str| row.per.get(t);
        let _ = writeln!(
            out,
            "(a)/(b) = ours-1proc/ours-4proc: IOPS {}, p99 {}, server cores {}",
            fmt_ratio(ratio(
                get("ours-1proc").map(|s| s.iops),
                get("ours-4proc").map(|s| s.iops)
            )),
            fmt_ratio(ratio(
                get("ours-1proc").map(|s| s.p99),
                get("ours-4proc").map(|s| s.p99)
            )),
            fmt_ratio(ratio(
                get("ours-1proc").map(|s| s.cores),
                get("ours-4proc").map(|s| s.cores)
            ))
        );
        if let Some((bt, b)) = row.best_qsd() {
            let _ = writeln!(
                out,
                "(a)/(c) = ours-1proc/{bt}: IOPS {}, p99 {}, server cores {}",
                fmt_ratio(ratio(get("ours-1proc").map(|s| s.iops), Some(b.iops))),
                fmt_ratio(ratio(get("ours-1proc").map(|s| s.p99), Some(b.p99))),
                fmt_ratio(ratio(get("ours-1proc").map(|s| s.cores), Some(b.cores)))
            );
        }
        let _ = writeln!(
            out,
            "server cores = CPU seconds of the server process(es) / wall seconds; \
             kicks/IO = doorbells the guest rang per request (ours' legacy doorbell waits for \
             the server's reply; a vhost-user kick does not); \
             (a) one process, {} --device, {}; (b) {} processes, one disk each, the same options; \
             (c) one qemu-storage-daemon, {} exports on one iothread",
            w.devices, m.ours_args, w.devices, w.devices
        );
    }
    out
}

/// The medians of this run against those of an earlier one (both as
/// `to_json` writes them): every cell both ran, the largest changes, and
/// the cells whose IOPS or p50 median moved by more than SPREAD_MARK.
pub fn compare(prev: &Value, now: &Value) -> String {
    let cells = |v: &Value| -> BTreeMap<(String, String), (f64, f64)> {
        let mut m = BTreeMap::new();
        for r in v["results"].as_array().into_iter().flatten() {
            let w = r["workload"].as_str().unwrap_or("").to_string();
            for (t, s) in r["targets"].as_object().into_iter().flatten() {
                if let (Some(i), Some(p)) = (s["iops"].as_f64(), s["p50_us"].as_f64()) {
                    m.insert((w.clone(), t.clone()), (i, p));
                }
            }
        }
        m
    };
    let (a, b) = (cells(prev), cells(now));
    let change = |x: f64, y: f64| if x > 0.0 { y / x - 1.0 } else { 0.0 };
    let mut out = String::new();
    let mut moved = Vec::new();
    let mut most = (0.0f64, 0.0f64);
    let mut n = 0;
    for (k, &(i0, p0)) in &a {
        let Some(&(i1, p1)) = b.get(k) else { continue };
        n += 1;
        let (di, dp) = (change(i0, i1), change(p0, p1));
        most = (most.0.max(di.abs()), most.1.max(dp.abs()));
        if di.abs() > SPREAD_MARK || dp.abs() > SPREAD_MARK {
            moved.push(format!(
                "  {} {}: IOPS {} -> {} ({:+.1} %), p50 {:.1} -> {:.1} us ({:+.1} %)",
                k.0,
                k.1,
                kilo(i0),
                kilo(i1),
                di * 100.0,
                p0,
                p1,
                dp * 100.0
            ));
        }
    }
    let _ = writeln!(
        out,
        "\ncompared with the earlier run: {n} cells in both; largest change of a median: IOPS {:.1} %, p50 {:.1} %; {} cell(s) moved by more than {:.0} %",
        most.0 * 100.0,
        most.1 * 100.0,
        moved.len(),
        SPREAD_MARK * 100.0
    );
    for l in moved {
        let _ = writeln!(out, "{l}");
    }
    out
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "iops": s.iops, "mb_per_s": s.mbps,
        "iops_min": s.iops_min, "iops_max": s.iops_max, "iops_spread": s.iops_spread(),
        "p50_min_us": s.p50_min, "p50_max_us": s.p50_max, "p50_spread": s.p50_spread(),
        "unsteady": s.unsteady(),
        "runs_iops": s.each.iter().map(|e| e.0).collect::<Vec<_>>(),
        "runs_p50_us": s.each.iter().map(|e| e.1).collect::<Vec<_>>(),
        "p50_us": s.p50, "p99_us": s.p99, "p999_us": s.p999,
        "cpu_s_per_million": s.cpu_per_mreq,
        "device_cpu_s_per_million": s.device_cpu_per_mreq,
        "server_cores": s.cores,
        "kicks_per_io": s.kicks_per_io,
        "max_us": s.max_us,
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
                    "ratio_1proc_4proc_p99",
                    ratio(g("ours-1proc", |s| s.p99), g("ours-4proc", |s| s.p99)),
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
                    "ratio_1proc_qsd_p99",
                    ratio(g("ours-1proc", |s| s.p99), best.map(|b| b.1.p99)),
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
        "ours_adaptive_args": m.ours_adaptive_args,
        "placement": m.placement,
        "direct_disk": if m.disk.is_empty() { Value::Null } else { Value::from(m.disk.as_str()) },
        "skipped": m.skipped,
        "results": rows,
    })
}

/// bench/iops.svg from the benchmark's JSON (as `to_json` writes it): IOPS
/// and p99 latency against queue depth for 4 KiB random reads on one
/// queue of a page-cached image, titled with the machine.
pub fn plot(v: &Value) -> Result<String> {
    let rows = v["results"]
        .as_array()
        .context("no \"results\" in the JSON")?;
    let rows: Vec<&Value> = (rows.iter())
        .filter(|r| {
            r["block_size"] == 4096
                && r["random"] == true
                && r["op"] == "Read"
                && r["queues"] == 1
                && r["devices"] == 1
                && r["disk"] == "cached"
        })
        .collect();
    let panel = |caption: &str, key: &str, y_desc: &str| {
        let series = TARGETS.iter().enumerate().map(|(k, t)| {
            let mut pts: Vec<(f64, f64)> = (rows.iter())
                .filter_map(|r| Some((r["queue_depth"].as_f64()?, r["targets"][t][key].as_f64()?)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (t.to_string(), chart::color(k), pts)
        });
        chart::Panel {
            caption: caption.into(),
            y_desc: y_desc.into(),
            series: series.filter(|s| !s.2.is_empty()).collect(),
        }
    };
    chart::lines(
        "4 KiB random reads, 1 queue, page-cached image",
        &chart::machine_of(v),
        "queue depth",
        &[
            panel("IOPS", "iops", "IOPS"),
            panel("p99 latency", "p99_us", "p99 latency (µs)"),
        ],
    )
}

/// ours against `--baseline-bin` (ours-base), workload by workload: the
/// ratio of the median IOPS and of the median p50, with both spreads.
pub fn against_base(results: &Results) -> String {
    let mut out = String::from(
        "\nours against the baseline binary (ours-base), the same options, interleaved:\n\
         workload                   IOPS ours/base   p50 ours/base   spread ours   spread base\n",
    );
    for row in results.values() {
        let (Some(o), Some(b)) = (row.per.get("ours"), row.per.get("ours-base")) else {
            continue;
        };
        let spread = |s: &Summary| 100.0 * (s.iops_max - s.iops_min) / s.iops.max(1e-9);
        out.push_str(&format!(
            "{:<26} {:>16.3} {:>15.3} {:>12.1}% {:>12.1}%\n",
            row.w.name,
            o.iops / b.iops.max(1e-9),
            o.p50 / b.p50.max(1e-9),
            spread(o),
            spread(b)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::read;

    #[test]
    fn the_iops_chart_has_its_legend_beside_both_plots_and_the_machine_on_top() {
        let rows: Vec<Value> = [1, 8, 32]
            .iter()
            .map(|qd| {
                let s = |iops: f64| json!({"iops": iops * *qd as f64, "p99_us": 12.5 * *qd as f64});
                json!({"workload": format!("4k-randread-qd{qd}"), "op": "Read", "random": true,
                    "block_size": 4096, "queue_depth": qd, "queues": 1, "devices": 1,
                    "disk": "cached", "targets": {"ours": s(40_000.0), "qsd-uring": s(25_000.0)}})
            })
            .collect();
        let v = json!({"machine": "Test CPU 9000, 4 cores, 8 GiB, Linux 6.1", "results": rows});
        let svg = plot(&v).unwrap();
        let texts = read::texts(&svg);
        let areas = read::plot_areas(&svg);
        assert_eq!(areas.len(), 2, "two plots: {areas:?}");
        let right = areas.iter().map(|a| a.2).fold(0.0, f64::max);
        for name in ["ours", "qsd-uring"] {
            let t = texts.iter().find(|t| t.2 == name).expect(name);
            assert!(
                t.0 > right,
                "legend entry {name} at x {} left of {right}",
                t.0
            );
        }
        for (x0, _, x1, y1) in &areas {
            for qd in ["1", "8", "32"] {
                assert!(
                    (texts.iter()).any(|t| t.2 == qd && t.1 > *y1 && *x0 <= t.0 && t.0 <= *x1),
                    "no queue depth {qd} under the plot at {x0}..{x1}: {texts:?}"
                );
            }
        }
        assert!(texts.iter().any(|t| t.2 == "Test CPU 9000, 4 cores"));
        assert!(texts.iter().all(|t| !t.2.ends_with(".0")), "{texts:?}");
    }
}
