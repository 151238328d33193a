//! The live-upgrade study (`--upgrade-study`): our target replaces its
//! own binary (`target_upgrade`) `UPGRADES` times with the guest idle, then
//! as many times under 4 KiB random reads at QD32. Reported: the pause each
//! upgrade measured (from the devices stopping to their queues running
//! again in the new binary), its distribution, the longest any request
//! of the guest took while the upgrades ran, and the guest's rate before
//! and after them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest::vfio::VfioUserBlk;
use crate::guest::GuestRam;
use crate::run::{run_virtio, Disk, Op, Workload, RING_BASE};
use crate::servers::{start_ours, OursDisk};

/// Upgrades in each phase.
const UPGRADES: u32 = 20;
/// Between two upgrades under load.
const GAP: Duration = Duration::from_millis(500);

/// Runs `UPGRADES` upgrades, `gap` apart: the pause each reported, in ms.
fn upgrades(rpc: &Path, gap: Duration) -> Result<Vec<f64>> {
    let mut pauses = Vec::new();
    for i in 0..UPGRADES {
        std::thread::sleep(gap);
        let v = vfio_user_blk::target::rpc::client(rpc, "target_upgrade", &[])
            .with_context(|| format!("upgrade {}", i + 1))?;
        let p = v["pause_ms"]
            .as_f64()
            .with_context(|| format!("upgrade {}: no pause in {v}", i + 1))?;
        pauses.push(p);
    }
    Ok(pauses)
}

/// min, median, 90th percentile and max.
fn spread(v: &[f64]) -> (f64, f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    // The rank of quantile q/10.
    let at = |tenths: usize| s[((s.len() - 1) * tenths + 5) / 10];
    (s[0], at(5), at(9), s[s.len() - 1])
}

/// Runs the study on `image`; prints the table and returns it as JSON.
pub fn study(
    image: &Path,
    size: u64,
    secs: Duration,
    ours_args: &str,
) -> Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("vub-upgrade-{}", std::process::id()));
    let rpc = dir.join("rpc.sock");
    let mut args: Vec<String> = ours_args.split_whitespace().map(String::from).collect();
    args.extend(["--io-engine".into(), "io-uring".into()]);
    args.extend(["--rpc-socket".into(), rpc.to_string_lossy().into_owned()]);
    let server = start_ours(
        None,
        &dir,
        &[OursDisk {
            spec: image.to_str().context("image path")?.to_string(),
            direct: false,
        }],
        1,
        256,
        &args,
    )?;
    let pid = server.pids()[0];
    let ram = GuestRam::new(256 << 20)?;
    let mut g = VfioUserBlk::connect(&server.socks[0], &ram)?;
    let mut rings = g.setup(&ram, 1, RING_BASE, 0)?;
    let w = Workload {
        name: "4k-randread-qd32".into(),
        op: Op::Read,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 1,
        disk: Disk::Cached,
        devices: 1,
    };
    eprintln!("bench: upgrades: {UPGRADES} with the guest idle");
    let idle = upgrades(&rpc, Duration::from_millis(100))?;
    // The rate before and after: the median of three runs each (one run
    // moves by more than the 10 % the comparison is about).
    let rate = |g: &mut VfioUserBlk, rings: &mut [_]| -> Result<f64> {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(run_virtio(g, &ram, rings, &w, size, secs, &[pid])?.iops());
        }
        v.sort_by(f64::total_cmp);
        Ok(v[1])
    };
    let before = rate(&mut g, &mut rings)?;
    eprintln!("bench: upgrades: {UPGRADES} under QD32 random reads");
    let load_secs = GAP * (UPGRADES + 2) + Duration::from_secs(2);
    let upgrader = {
        let rpc = rpc.clone();
        std::thread::spawn(move || upgrades(&rpc, GAP))
    };
    let started = Instant::now();
    let during = run_virtio(&mut g, &ram, &mut rings, &w, size, load_secs, &[pid])?;
    let loaded = upgrader
        .join()
        .map_err(|_| anyhow::anyhow!("the upgrading thread panicked"))??;
    if started.elapsed() < GAP * UPGRADES {
        bail!("the load ended before the upgrades");
    }
    let after = rate(&mut g, &mut rings)?;
    let _ = g.client.shutdown();
    if server.pids()[0] != pid {
        bail!("the target's process changed");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    report(&idle, &loaded, before, &during, after)
}

fn report(
    idle: &[f64],
    loaded: &[f64],
    before: f64,
    during: &crate::run::RunResult,
    after: f64,
) -> Result<serde_json::Value> {
    println!("Live upgrade: {UPGRADES} upgrades each, pause as the target measured it (ms)");
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>8}",
        "guest", "min", "median", "p90", "max"
    );
    let mut rows = Vec::new();
    for (name, v) in [("idle", idle), ("QD32 reads", loaded)] {
        let (lo, med, p90, hi) = spread(v);
        println!("{name:<12} {lo:>8.1} {med:>8.1} {p90:>8.1} {hi:>8.1}");
        rows.push(serde_json::json!({
            "guest": name, "pauses_ms": v, "min_ms": lo, "median_ms": med,
            "p90_ms": p90, "max_ms": hi,
        }));
    }
    let worst_ms = during.hist.max() as f64 / 1e6;
    let ratio = after / before.max(1.0);
    println!(
        "QD32 4 KiB random reads: {before:.0} IOPS before, {:.0} during (over {} s), \
         {after:.0} after ({ratio:.2}x; before and after: medians of 3 runs); slowest request \
         during the upgrades {worst_ms:.1} ms",
        during.iops(),
        during.secs.round()
    );
    Ok(serde_json::json!({
        "upgrades": rows,
        "iops_before": before,
        "iops_during": during.iops(),
        "iops_after": after,
        "after_over_before": ratio,
        "slowest_request_during_ms": worst_ms,
    }))
}
