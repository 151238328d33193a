//! The benchmark driver runs end to end against our server and direct I/O
//! (qemu-storage-daemon is not needed here) and writes sane JSON and SVG;
//! a qemu-storage-daemon that refuses io_uring is reported as not run.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::TempDir;

/// Runs the benchmark with `args` (split at white space: the paths in
/// them have none), with `path` as PATH if given.
fn bench(args: &str, path: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfio-user-blk-bench"));
    cmd.args(args.split_whitespace());
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    cmd.output().unwrap()
}

/// [`bench`], which must succeed.
fn bench_ok(args: &str, path: Option<&str>) -> Output {
    let out = bench(args, path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn bench_quick_run_writes_json_and_svg() {
    support::build_server_next_to_bench();
    let dir = TempDir::new("bench");
    let json = dir.path("r.json");
    let svg = dir.path("p.svg");
    let img = dir.path("b.img");
    let args = format!(
        "--quick --seconds 0.3 --repeat 2 --quiet-wait 0 --size 16M --targets ours,direct \
         --image {} --json {} --svg {}",
        img.display(),
        json.display(),
        svg.display()
    );
    let out = bench_ok(&args, None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("4k-randread-qd32") && table.contains("ours/qsd"),
        "{table}"
    );
    assert!(
        table.contains("multi4-4k-randread-qd32") && table.contains("(a)/(b)"),
        "{table}"
    );
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = v["results"].as_array().unwrap();
    // The direct-* workloads are skipped (and say so) where the temporary
    // directory is tmpfs.
    let skipped = v["skipped"].as_object().unwrap();
    assert_eq!(rows.len() + skipped.len(), 6, "{v}");
    // Every cell has its runs, and its median between their least and most.
    for r in rows {
        for (t, c) in r["targets"].as_object().unwrap() {
            let runs = c["runs_iops"].as_array().unwrap();
            assert_eq!(runs.len(), 2, "{t}: {c}");
            let (lo, mid, hi) = (
                c["iops_min"].as_f64().unwrap(),
                c["iops"].as_f64().unwrap(),
                c["iops_max"].as_f64().unwrap(),
            );
            assert!(lo <= mid && mid <= hi, "{t}: {c}");
            assert!(c["iops_spread"].as_f64().unwrap() >= 0.0, "{t}: {c}");
        }
    }
    let mut multi = 0;
    for r in rows {
        assert!(r["best_qsd"].is_null(), "{r}");
        if r["devices"] == 4 {
            multi += 1;
            for t in ["ours-1proc", "ours-4proc"] {
                let s = &r["targets"][t];
                assert!(s["iops"].as_f64().unwrap() > 100.0, "{r}");
                assert!(s["server_cores"].as_f64().unwrap() > 0.0, "{r}");
            }
            assert!(r["ratio_1proc_4proc_iops"].as_f64().unwrap() > 0.0);
            assert!(r["ratio_1proc_4proc_cores"].as_f64().unwrap() > 0.0);
            // No qsd ran: its ratios are null, not 0.
            assert!(r["ratio_1proc_qsd_iops"].is_null(), "{r}");
            continue;
        }
        let ours = &r["targets"]["ours"];
        assert!(ours["iops"].as_f64().unwrap() > 100.0, "{r}");
        assert!(ours["p50_us"].as_f64().unwrap() > 0.0);
        assert!(ours["p99_us"].as_f64().unwrap() >= ours["p50_us"].as_f64().unwrap());
        assert!(r["targets"]["direct"]["iops"].as_f64().unwrap() > 100.0);
        assert!(r["ratio_ours_direct_iops"].as_f64().unwrap() > 0.0);
        assert!(r["ratio_ours_qsd_iops"].is_null(), "{r}");
        assert!(r["ratio_ours_direct_uring_iops"].is_null(), "{r}");
    }
    assert_eq!(multi, 2, "{v}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("queue depth"));
}

#[test]
fn a_qsd_that_refuses_io_uring_is_not_run() {
    support::build_server_next_to_bench();
    let dir = TempDir::new("bench-noring");
    // A stand-in for qemu-storage-daemon that refuses, as one built
    // without io_uring does.
    let bin = dir.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("qemu-storage-daemon");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"qemu-storage-daemon: Unable to use io_uring\" >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let json = dir.path("r.json");
    let img = dir.path("b.img");
    let args = format!(
        "--quick --only 4k-randread-qd1 --seconds 0.2 --repeat 1 --quiet-wait 0 --size 8M \
         --targets ours,qsd-uring --image {} --json {}",
        img.display(),
        json.display()
    );
    let out = bench_ok(&args, Some(&path));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("not run"), "{table}");
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let r = &v["results"][0];
    assert!(
        r["targets"]["ours"]["iops"].as_f64().unwrap() > 100.0,
        "{r}"
    );
    assert!(r["targets"]["qsd-uring"].is_null(), "{r}");
    assert!(r["not_run"]["qsd-uring"]
        .as_str()
        .unwrap()
        .contains("io_uring"));
    assert!(r["ratio_ours_qsd_iops"].is_null(), "{r}");
    assert!(r["best_qsd"].is_null(), "{r}");
}

#[test]
fn bad_options_are_errors() {
    for args in [
        "--targets ours,nope",
        "--seconds 0",
        "--seconds=-1",
        "--repeat 0",
    ] {
        let out = bench(args, None);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bench:"), "{args:?}: {err}");
    }
}

/// `--render-from`: the committed JSON files drawn again, with nothing run.
#[test]
fn render_from_draws_the_chart_of_a_saved_json() {
    let dir = TempDir::new("bench-render");
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (json, want) in [
        ("results.json", "queue depth"),
        ("guest.json", "Guest fio IOPS"),
    ] {
        let svg = dir.path("out.svg");
        let from = here.join(json);
        let args = format!("--render-from {} --svg {}", from.display(), svg.display());
        bench_ok(&args, None);
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(s.starts_with("<svg") && s.contains(want), "{json}: {s}");
        assert!(s.contains(" cores"), "{json}: no machine in the title");
        std::fs::remove_file(&svg).unwrap();
    }
    // It needs --svg.
    let out = bench("--render-from results.json", None);
    assert!(!out.status.success());
}
