//! `--guest-report DIR`: the report of scripts/guest-bench.sh. DIR holds,
//! per configuration and run, the guest's console (`NAME-REP.log`, with
//! each fio job's JSON between markers) and the host CPU the script
//! measured (`NAME-REP.cpu`: name, run, accelerator, QEMU ticks, server
//! ticks, ticks per second, start and end times). Medians over runs;
//! ours / the best QEMU configuration per job; a table, JSON and an SVG.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::{json, Value};

use crate::report::median;

/// One job of one run: (IOPS, p50 µs, p99 µs).
type Fig = (f64, f64, f64);

fn percentile(side: &Value, p: &str) -> f64 {
    side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0
}

/// A fio JSON result: total IOPS, and the latency percentiles of the
/// direction that moved (reads for a mix).
fn figures(v: &Value) -> Option<Fig> {
    let job = v["jobs"].get(0)?;
    let (r, w) = (&job["read"], &job["write"]);
    let iops = r["iops"].as_f64().unwrap_or(0.0) + w["iops"].as_f64().unwrap_or(0.0);
    let side = if r["iops"].as_f64().unwrap_or(0.0) > 0.0 {
        r
    } else {
        w
    };
    Some((
        iops,
        percentile(side, "50.000000"),
        percentile(side, "99.000000"),
    ))
}

/// The jobs of one console log: "job/engine" -> figures.
fn parse_log(text: &str) -> BTreeMap<String, Fig> {
    let mut out = BTreeMap::new();
    let mut cur: Option<(String, String)> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("VUB-JSON-BEGIN ") {
            cur = Some((rest.replace(' ', "/"), String::new()));
        } else if line.starts_with("VUB-JSON-END") {
            if let Some((k, body)) = cur.take() {
                if let Some(f) = serde_json::from_str::<Value>(&body)
                    .ok()
                    .as_ref()
                    .and_then(figures)
                {
                    out.insert(k, f);
                }
            }
        } else if let Some((_, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

pub fn run(dir: &Path, json_path: Option<&Path>, svg: Option<&Path>) -> Result<()> {
    // config -> job -> runs; config -> (qemu cores, server cores) per run
    let mut jobs: BTreeMap<String, BTreeMap<String, Vec<Fig>>> = BTreeMap::new();
    let mut cpu: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut accel = String::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) != Some("cpu") {
            continue;
        }
        let line = std::fs::read_to_string(&p)?;
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (name, rep) = (f[0].to_string(), f[1]);
        accel = f[2].to_string();
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        let (hz, wall) = (num(5).max(1.0), (num(7) - num(6)).max(1e-9));
        cpu.entry(name.clone())
            .or_default()
            .push((num(3) / hz / wall, num(4) / hz / wall));
        let log = std::fs::read_to_string(dir.join(format!("{name}-{rep}.log")))?;
        for (job, fig) in parse_log(&log) {
            jobs.entry(name.clone())
                .or_default()
                .entry(job)
                .or_default()
                .push(fig);
        }
    }
    if jobs.is_empty() {
        bail!("no finished run in {}", dir.display());
    }
    let all_jobs: Vec<String> = {
        let mut v: Vec<String> = jobs.values().flat_map(|m| m.keys().cloned()).collect();
        v.sort();
        v.dedup();
        v
    };
    let med = |c: &str, j: &str| -> Option<Fig> {
        let runs = jobs.get(c)?.get(j)?;
        Some((
            median(runs.iter().map(|f| f.0).collect()),
            median(runs.iter().map(|f| f.1).collect()),
            median(runs.iter().map(|f| f.2).collect()),
        ))
    };
    let configs: Vec<String> = jobs.keys().cloned().collect();
    let runs = jobs
        .values()
        .flat_map(|m| m.values().map(Vec::len))
        .max()
        .unwrap_or(0);
    println!(
        "Guest benchmark: the same guest and fio jobs on the same raw image, accelerator {accel}{}; medians of {runs} run(s)",
        if accel == "tcg" {
            " (TCG: only the ratios mean anything)"
        } else {
            ""
        }
    );
    println!(
        "{:<22} {:<30} {:>9} {:>9} {:>9} {:>12}",
        "job/engine", "configuration", "IOPS", "p50 us", "p99 us", "ours/bestQ"
    );
    let mut rows = Vec::new();
    for j in &all_jobs {
        let best = configs
            .iter()
            .filter(|c| c.starts_with("qemu"))
            .filter_map(|c| med(c, j).map(|f| (c.clone(), f)))
            .max_by(|a, b| a.1 .0.total_cmp(&b.1 .0));
        for c in &configs {
            let Some(f) = med(c, j) else { continue };
            let ratio = match (&best, c.starts_with("ours")) {
                (Some((_, b)), true) if b.0 > 0.0 => Some(f.0 / b.0),
                _ => None,
            };
            let mark = if best.as_ref().is_some_and(|b| &b.0 == c) {
                "*"
            } else {
                ""
            };
            println!(
                "{j:<22} {:<30} {:>9.0} {:>9.1} {:>9.1} {:>12}",
                format!("{c}{mark}"),
                f.0,
                f.1,
                f.2,
                ratio.map_or(String::new(), |r| format!("{r:.2}x"))
            );
            rows.push(json!({"job": j, "configuration": c, "iops": f.0, "p50_us": f.1,
                "p99_us": f.2, "ours_vs_best_qemu": ratio, "best_qemu": best.as_ref().map(|b| b.0.clone())}));
        }
    }
    println!(
        "* the best QEMU configuration of the job (by IOPS), which ours/bestQ compares against"
    );
    println!("\nhost CPU while the jobs ran (cores = CPU seconds / wall seconds, medians):");
    println!(
        "{:<30} {:>12} {:>12}",
        "configuration", "QEMU cores", "server cores"
    );
    let mut cpu_rows = Vec::new();
    for (c, v) in &cpu {
        let q = median(v.iter().map(|x| x.0).collect());
        let s = median(v.iter().map(|x| x.1).collect());
        println!("{c:<30} {q:>12.2} {s:>12.2}");
        cpu_rows.push(json!({"configuration": c, "qemu_cores": q, "server_cores": s}));
    }
    if let Some(p) = json_path {
        let v = json!({"accelerator": accel, "runs": runs, "jobs": rows, "cpu": cpu_rows});
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    if let Some(p) = svg {
        plot(&all_jobs, &configs, &med, p)?;
    }
    Ok(())
}

fn plot(
    jobs: &[String],
    configs: &[String],
    med: &dyn Fn(&str, &str) -> Option<Fig>,
    path: &Path,
) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = jobs
        .iter()
        .flat_map(|j| configs.iter().filter_map(|c| med(c, j).map(|f| f.0)))
        .fold(1.0, f64::max)
        * 1.15;
    let n = configs.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Guest fio IOPS per job and configuration",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..jobs.len() as f64, 0f64..ymax)?;
    let labels: Vec<String> = jobs.to_vec();
    chart
        .configure_mesh()
        .x_labels(jobs.len().max(1))
        .x_label_formatter(&|x| {
            // Bars of job i stand between i and i + 1.
            labels
                .iter()
                .enumerate()
                .find(|(i, _)| (*i as f64) <= *x && *x < (*i + 1) as f64)
                .map(|(_, l)| l.clone())
                .unwrap_or_default()
        })
        .y_desc("IOPS")
        .draw()?;
    let palette = crate::report::PALETTE;
    for (k, c) in configs.iter().enumerate() {
        let color = palette[k % palette.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| {
                let v = med(c, j)?.0;
                let x0 = i as f64 + 0.1 + 0.8 * k as f64 / n;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + 0.8 / n, v)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(c.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}
