//! Test support for the benchmark's tests: a temporary directory, and the
//! server binary where the benchmark looks for it.

use std::path::Path;
use std::process::Command;

pub use vub_testkit::TempDir;

/// Makes sure the server binary is where the benchmark looks for it: next
/// to the benchmark's own binary, in the same target directory and profile.
/// `cargo test` at the workspace root has built it already (the server's
/// own tests need it), and then this is a no-op build; when only this
/// package is tested, this builds it.
pub fn build_server_next_to_bench() {
    let bench = Path::new(env!("CARGO_BIN_EXE_vfio-user-blk-bench"));
    let profile_dir = bench.parent().expect("the benchmark's directory");
    let target_dir = profile_dir.parent().expect("the target directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "vfio-user-blk", "--bin", "vfio-user-blk"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => panic!("no profile directory in {}", bench.display()),
    }
    let out = cmd.output().expect("running cargo build");
    assert!(
        out.status.success(),
        "building the server failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = profile_dir.join("vfio-user-blk");
    assert!(server.exists(), "{} was not built", server.display());
}
