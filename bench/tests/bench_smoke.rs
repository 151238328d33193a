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

/// The tests that run direct-* workloads, one at a time: each bench
/// keeps the kernel's loop workers on its server CPUs while it runs.
static MEMORY_DISK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn bench_quick_run_writes_json_and_svg() {
    support::build_server_next_to_bench();
    let _one = MEMORY_DISK.lock().unwrap_or_else(|e| e.into_inner());
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
    // The direct-* workloads run on a memory disk (as root), or are
    // skipped, saying so, where none can be made and the temporary
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

const WQ_MASK: &str = "/sys/devices/virtual/workqueue/cpumask";

/// The loop devices bound to a bench's memory disk.
fn memory_disks() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            backing.contains("vub-bench-direct").then_some(name)
        })
        .collect()
}

/// A bench process, killed and reaped when dropped.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reap {
    fn signal(&self, sig: libc::c_int) {
        let pid = i32::try_from(self.0.id()).unwrap();
        // SAFETY: a signal to our own child, not yet reaped.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Starts a bench on a direct-* workload (run long) that ignores
/// `ignored` signals, and waits until its memory disk exists and the
/// workers' mask has changed: the bench and the mask from before. None
/// where that cannot happen here (not root, one CPU, another bench).
fn bench_with_memory_disk(dir: &TempDir, ignored: &[libc::c_int]) -> Option<(Reap, String)> {
    // SAFETY: geteuid has no memory effects.
    let root = unsafe { libc::geteuid() } == 0;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let before = std::fs::read_to_string(WQ_MASK).ok();
    let Some(before) = before.filter(|_| root && cpus >= 2 && memory_disks().is_empty()) else {
        eprintln!("not root, one CPU or another bench's memory disk: nothing to check");
        return None;
    };
    let args = format!(
        "--only direct-4k-randread --targets direct --seconds 30 --repeat 1 --quiet-wait 0 \
         --size 16M --image {}",
        dir.path("b.img").display()
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfio-user-blk-bench"));
    cmd.args(args.split_whitespace())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let ignored = ignored.to_vec();
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only signal(2), which is
        // async-signal-safe; the ignored dispositions survive the exec.
        unsafe {
            cmd.pre_exec(move || {
                for &sig in &ignored {
                    libc::signal(sig, libc::SIG_IGN);
                }
                Ok(())
            })
        };
    }
    let child = Reap(cmd.spawn().unwrap());
    let t = std::time::Instant::now();
    while t.elapsed().as_secs() < 20 {
        let changed = std::fs::read_to_string(WQ_MASK).is_ok_and(|m| m != before);
        if !memory_disks().is_empty() && changed {
            return Some((child, before));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("no memory disk was made, or the mask is not writable here: nothing to check");
    None
}

/// Waits (5 s at most) until no loop device of a bench is bound.
fn no_memory_disk_left() {
    let t = std::time::Instant::now();
    while !memory_disks().is_empty() {
        assert!(
            t.elapsed().as_secs() < 5,
            "still bound: {:?}",
            memory_disks()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A bench stopped by SIGTERM once its memory disk exists puts the
/// workers' CPU mask back, and its loop device goes with it.
#[test]
fn a_stopped_bench_leaves_no_memory_disk_and_the_workers_mask_as_it_was() {
    let _one = MEMORY_DISK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("bench-stop");
    let Some((mut child, before)) = bench_with_memory_disk(&dir, &[]) else {
        return;
    };
    child.signal(libc::SIGTERM);
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "{status:?}");
    assert_eq!(std::fs::read_to_string(WQ_MASK).unwrap(), before);
    no_memory_disk_left();
}

/// A bench started to ignore SIGHUP (nohup) goes on through one: the
/// handler that puts the mask back is not installed for it.
#[test]
fn a_bench_started_under_nohup_survives_a_hangup() {
    let _one = MEMORY_DISK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("bench-nohup");
    let Some((mut child, before)) = bench_with_memory_disk(&dir, &[libc::SIGHUP]) else {
        return;
    };
    child.signal(libc::SIGHUP);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the bench ended on a SIGHUP it was started to ignore"
    );
    child.signal(libc::SIGTERM);
    child.0.wait().unwrap();
    assert_eq!(std::fs::read_to_string(WQ_MASK).unwrap(), before);
    no_memory_disk_left();
}
