//! The benchmark driver runs end to end against our server and direct I/O
//! (qemu-storage-daemon is not needed here) and writes sane JSON and SVG.

mod support;

use std::process::Command;

use support::TempDir;

#[test]
fn bench_quick_run_writes_json_and_svg() {
    support::build_server_next_to_bench();
    let dir = TempDir::new("bench");
    let json = dir.path("r.json");
    let svg = dir.path("p.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_vfio-user-blk-bench"))
        .args([
            "--quick",
            "--seconds",
            "0.3",
            "--size",
            "16M",
            "--targets",
            "ours,direct",
        ])
        .args(["--image", dir.path("b.img").to_str().unwrap()])
        .args([
            "--json",
            json.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("4k-randread-qd32") && table.contains("ours/qsd"),
        "{table}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let ours = &r["targets"]["ours"];
        assert!(ours["iops"].as_f64().unwrap() > 100.0, "{r}");
        assert!(ours["p50_us"].as_f64().unwrap() > 0.0);
        assert!(ours["p99_us"].as_f64().unwrap() >= ours["p50_us"].as_f64().unwrap());
        assert!(r["targets"]["direct"]["iops"].as_f64().unwrap() > 100.0);
        assert!(r["ratio_ours_direct_iops"].as_f64().unwrap() > 0.0);
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("queue depth"));
}
