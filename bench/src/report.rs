//! The benchmark's output: a table with ratios, JSON, and an SVG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use serde_json::json;

use crate::run::{Op, RunResult, Workload};

pub const TARGETS: [&str; 3] = ["ours", "qsd", "direct"];

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
    pub runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
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
        runs: runs.len(),
    }
}

/// Results by workload name, then target.
pub type Results = BTreeMap<usize, (Workload, BTreeMap<&'static str, Summary>)>;

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}   {:>8} {:>8} {:>9}",
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
    for (w, per) in results.values() {
        let ours = per.get("ours").cloned().unwrap_or_default();
        let qsd = per.get("qsd").cloned().unwrap_or_default();
        let direct = per.get("direct").cloned().unwrap_or_default();
        for (i, t) in TARGETS.iter().enumerate() {
            let Some(s) = per.get(t) else { continue };
            let ratios = if i == 0 {
                format!(
                    "{:>8} {:>8} {:>9}",
                    ratio(ours.iops, qsd.iops),
                    ratio(ours.iops, direct.iops),
                    ratio(ours.p50, qsd.p50)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:<28} {:<6} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.2}   {}",
                if i == 0 || !per.contains_key("ours") {
                    w.name.as_str()
                } else {
                    ""
                },
                t,
                s.iops,
                s.mbps,
                s.p50,
                s.p99,
                s.p999,
                s.cpu_per_mreq,
                ratios
            );
        }
    }
    out
}

pub fn to_json(results: &Results, machine: &str, repeat: usize, secs: f64) -> serde_json::Value {
    let rows: Vec<_> = results
        .values()
        .map(|(w, per)| {
            let targets: serde_json::Map<String, serde_json::Value> = per
                .iter()
                .map(|(t, s)| {
                    (
                        t.to_string(),
                        json!({
                            "iops": s.iops, "mb_per_s": s.mbps,
                            "p50_us": s.p50, "p99_us": s.p99, "p999_us": s.p999,
                            "cpu_s_per_million": s.cpu_per_mreq,
                            "device_cpu_s_per_million": s.device_cpu_per_mreq,
                            "runs": s.runs,
                        }),
                    )
                })
                .collect();
            let get = |t: &str| per.get(t).map(|s| s.iops).unwrap_or(0.0);
            let lat = |t: &str| per.get(t).map(|s| s.p50).unwrap_or(0.0);
            json!({
                "workload": w.name,
                "op": format!("{:?}", w.op),
                "random": w.random,
                "block_size": w.bs,
                "queue_depth": w.qd,
                "queues": w.queues,
                "null_disk": w.null,
                "targets": targets,
                "ratio_ours_qsd_iops": if get("qsd") > 0.0 { get("ours") / get("qsd") } else { 0.0 },
                "ratio_ours_direct_iops": if get("direct") > 0.0 { get("ours") / get("direct") } else { 0.0 },
                "ratio_ours_qsd_p50": if lat("qsd") > 0.0 { lat("ours") / lat("qsd") } else { 0.0 },
            })
        })
        .collect();
    json!({ "machine": machine, "repeat": repeat, "seconds_per_run": secs, "results": rows })
}

/// IOPS and p99 against queue depth for 4 KiB random reads on one queue.
pub fn plot(results: &Results, path: &Path) -> Result<()> {
    let pts = |t: &str, f: &dyn Fn(&Summary) -> f64| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = results
            .values()
            .filter(|(w, _)| {
                w.bs == 4096 && w.random && w.op == Op::Read && w.queues == 1 && !w.null
            })
            .filter_map(|(w, per)| per.get(t).map(|s| (w.qd as f64, f(s))))
            .collect();
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        v
    };
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let colors = [
        RGBColor(200, 40, 40),
        RGBColor(40, 90, 200),
        RGBColor(60, 150, 60),
    ];
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
        let series: Vec<(&str, Vec<(f64, f64)>)> =
            TARGETS.iter().map(|t| (*t, pts(t, f))).collect();
        let ymax = series
            .iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.1))
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
        for ((name, v), c) in series.into_iter().zip(colors) {
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
