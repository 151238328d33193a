//! `--guest-report DIR`: the report of scripts/guest-bench.sh. DIR holds,
//! per configuration and run, the guest's console (`NAME-REP.log`, with
//! each fio job's JSON between markers) and the host CPU the script
//! measured (`NAME-REP.cpu`: name, run, accelerator, QEMU ticks, server
//! ticks, ticks per second, start and end times). Medians over runs;
//! ours / the best QEMU configuration per job; a table, JSON and an SVG.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::chart;
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

/// config -> job -> runs
type Jobs = BTreeMap<String, BTreeMap<String, Vec<Fig>>>;
/// config -> (qemu cores, server cores) per run
type Cpu = BTreeMap<String, Vec<(f64, f64)>>;

/// The runs of DIR: their jobs' figures, their CPU and the accelerator.
fn collect(dir: &Path) -> Result<(Jobs, Cpu, String)> {
    let mut jobs: Jobs = BTreeMap::new();
    let mut cpu: Cpu = BTreeMap::new();
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
    Ok((jobs, cpu, accel))
}

pub fn run(dir: &Path, json_path: Option<&Path>, svg: Option<&Path>) -> Result<()> {
    let (jobs, cpu, accel) = collect(dir)?;
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
    let cpu_rows = cpu_table(&cpu);
    let v = json!({"machine": crate::machine(), "accelerator": accel, "runs": runs,
        "jobs": rows, "cpu": cpu_rows});
    if let Some(p) = json_path {
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    if let Some(p) = svg {
        std::fs::write(p, plot(&v)?)?;
    }
    Ok(())
}

/// Prints the host CPU of each configuration (medians) and gives its rows
/// of the JSON.
fn cpu_table(cpu: &Cpu) -> Vec<Value> {
    println!("\nhost CPU while the jobs ran (cores = CPU seconds / wall seconds, medians):");
    println!(
        "{:<30} {:>12} {:>12}",
        "configuration", "QEMU cores", "server cores"
    );
    let mut cpu_rows = Vec::new();
    for (c, v) in cpu {
        let q = median(v.iter().map(|x| x.0).collect());
        let s = median(v.iter().map(|x| x.1).collect());
        println!("{c:<30} {q:>12.2} {s:>12.2}");
        cpu_rows.push(json!({"configuration": c, "qemu_cores": q, "server_cores": s}));
    }
    cpu_rows
}

/// The SVG of a guest report's JSON (as `run` writes it): IOPS per job
/// (a group of bars) and configuration (a bar), titled with the machine
/// and the accelerator.
pub fn plot(v: &Value) -> Result<String> {
    let rows = v["jobs"]
        .as_array()
        .context("no \"jobs\" in the guest report")?;
    let names = |key: &str| -> Vec<String> {
        let mut n: Vec<String> = (rows.iter())
            .filter_map(|r| r[key].as_str().map(str::to_string))
            .collect();
        n.sort();
        n.dedup();
        n
    };
    let (jobs, configs) = (names("job"), names("configuration"));
    let value = |i: usize, k: usize| {
        let row = rows
            .iter()
            .find(|r| r["job"] == jobs[i] && r["configuration"] == configs[k]);
        row.and_then(|r| r["iops"].as_f64())
    };
    let accel = match v["accelerator"].as_str().unwrap_or("") {
        "" => "accelerator unknown".to_string(),
        "tcg" => "accelerator TCG (only the ratios mean anything)".to_string(),
        a => format!("accelerator {}", a.to_uppercase()),
    };
    let runs = v["runs"].as_u64().unwrap_or(0);
    chart::bars(&chart::Bars {
        title: "Guest fio IOPS per job and configuration".into(),
        subtitle: format!(
            "{}; {accel}; medians of {runs} run(s)",
            chart::machine_of(v)
        ),
        groups: &jobs,
        series: &configs,
        value: &value,
        y_desc: "IOPS",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::read;

    /// A guest report of three jobs and two configurations.
    fn report() -> Value {
        let mut rows = Vec::new();
        for (j, job) in [
            "randread-qd1/libaio",
            "randread-qd32/libaio",
            "randwrite-qd32/libaio",
        ]
        .iter()
        .enumerate()
        {
            for (k, c) in ["ours-busy-direct", "qemu-modern-iothread-native"]
                .iter()
                .enumerate()
            {
                let iops = 5000.0 + 12000.0 * j as f64 + 1500.0 * k as f64;
                rows.push(json!({"job": job, "configuration": c, "iops": iops}));
            }
        }
        json!({"machine": "Test CPU 9000, 4 cores, 8 GiB, Linux 6.1", "accelerator": "kvm",
            "runs": 3, "jobs": rows})
    }

    #[test]
    fn every_group_is_labelled_under_its_bars_and_the_legend_is_beside_the_plot() {
        let svg = plot(&report()).unwrap();
        let texts = read::texts(&svg);
        let areas = read::plot_areas(&svg);
        assert_eq!(areas.len(), 1, "one plot: {areas:?}");
        let (x0, y0, x1, y1) = areas[0];
        let palette: Vec<String> = (chart::PALETTE.iter())
            .map(|c| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2))
            .collect();
        let (mut bars, mut others): (Vec<_>, Vec<_>) = read::rects(&svg)
            .into_iter()
            .filter(|r| !(r.0 == 0.0 && r.1 == 0.0)) // the background
            .partition(|r| palette.contains(&r.4) && (r.1 + r.3 - y1).abs() <= 2.0);
        // The bars stand on the x axis, three groups of two.
        assert_eq!(bars.len(), 6, "{bars:?}");
        bars.sort_by(|a, b| a.0.total_cmp(&b.0));
        let labels = [
            "randread-qd1/libaio",
            "randread-qd32/libaio",
            "randwrite-qd32/libaio",
        ];
        for (group, label) in bars.chunks(2).zip(labels) {
            let (from, to) = (group[0].0, group[1].0 + group[1].2);
            // The label's lines under the axis, within the group's span.
            let mut under: Vec<&(f64, f64, String)> = (texts.iter())
                .filter(|t| t.1 > y1 && from <= t.0 && t.0 <= to)
                .collect();
            under.sort_by(|a, b| a.1.total_cmp(&b.1));
            let under: Vec<&str> = under.iter().map(|t| t.2.as_str()).collect();
            assert_eq!(under.join("/"), label, "under the bars at {from}..{to}");
        }
        // The legend: a swatch per configuration, none of it on the plot.
        let swatches = others.iter().filter(|r| palette.contains(&r.4)).count();
        assert_eq!(swatches, 2, "{others:?}");
        others.retain(|r| r.0 < x1 && r.0 + r.2 > x0 && r.1 < y1 && r.1 + r.3 > y0);
        assert!(
            others.is_empty(),
            "on the plot ({x0},{y0})-({x1},{y1}): {others:?}"
        );
        for name in ["ours-busy-direct", "qemu-modern-iothread-native"] {
            let t = texts.iter().find(|t| t.2 == name).expect(name);
            assert!(t.0 > x1, "legend entry {name} at x {} left of {x1}", t.0);
        }
        // The title names the machine and the accelerator; no number on
        // the axis has a trailing .0.
        assert!(texts.iter().any(|t| t.2.contains("Test CPU 9000, 4 cores")
            && t.2.contains("KVM")
            && !t.2.contains("GiB")));
        assert!(texts.iter().all(|t| !t.2.ends_with(".0")), "{texts:?}");
        assert!(texts.iter().any(|t| t.2 == "30k"), "{texts:?}");
    }
}
