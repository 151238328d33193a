//! A one-node Ceph cluster for the RBD tests, started by the project's own
//! script (`scripts/ceph-cluster.sh`) once per test binary and stopped when
//! the binary exits (by its daemons' PIDs, in the script).
//!
//! Where Ceph is not installed the tests say so and do nothing, unless
//! `VUB_REQUIRE_CEPH` is set (`scripts/test.sh` sets it once it has
//! installed Ceph): then a missing cluster fails them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Ceph {
    pub dir: PathBuf,
    pub conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh")
}

static STARTED: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some(dir) = STARTED.get() {
        let _ = Command::new(script()).arg("stop").arg(dir).status();
    }
}

fn start() -> Result<Ceph, String> {
    // Short: the admin sockets inside must fit a unix socket path (the
    // script takes at most 60 bytes). Made 0700 by the script.
    let dir = std::env::temp_dir().join(format!("vub-ceph-{}", std::process::id()));
    let _ = STARTED.set(dir.clone());
    // SAFETY: registers a plain function with no arguments, run once at
    // exit.
    unsafe { libc::atexit(stop_at_exit) };
    start_in(dir)
}

fn start_in(dir: PathBuf) -> Result<Ceph, String> {
    if Command::new("ceph-mon").arg("--version").output().is_err() {
        return Err("ceph-mon is not installed (scripts/ceph-cluster.sh install)".into());
    }
    let out = Command::new(script())
        .arg("start")
        .arg(&dir)
        .output()
        .map_err(|e| format!("running {}: {e}", script().display()))?;
    if !out.status.success() {
        return Err(format!(
            "the cluster did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Ceph {
        conf: dir.join("ceph.conf"),
        dir,
    })
}

/// None where Ceph is not installed and not required (the test then does
/// nothing, and says so).
fn required<T>(r: Result<T, &String>) -> Option<T> {
    match r {
        Ok(c) => Some(c),
        Err(e) if std::env::var_os("VUB_REQUIRE_CEPH").is_some() => panic!("{e}"),
        Err(e) => {
            eprintln!("SKIPPED: no Ceph cluster: {e}");
            None
        }
    }
}

/// The cluster, started at the first call.
pub fn cluster() -> Option<&'static Ceph> {
    static CLUSTER: OnceLock<Result<Ceph, String>> = OnceLock::new();
    required(CLUSTER.get_or_init(start).as_ref())
}

/// A cluster of the caller's own, stopped when dropped: for the tests that
/// stop its OSD (a one-OSD cluster stopped for some seconds may be left
/// with placement groups that wait for a read lease forever, and would
/// hold every test after it).
pub struct OwnCluster(Ceph);

impl std::ops::Deref for OwnCluster {
    type Target = Ceph;
    fn deref(&self) -> &Ceph {
        &self.0
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.0.dir).status();
    }
}

pub fn own_cluster(tag: &str) -> Option<OwnCluster> {
    let dir = std::env::temp_dir().join(format!("vub-ceph-{}-{tag}", std::process::id()));
    let r = start_in(dir).map(OwnCluster);
    match r {
        Ok(c) => Some(c),
        Err(e) => required(Err(&e)),
    }
}

impl Ceph {
    /// Runs `rbd ARGS` against the cluster: its standard output.
    pub fn rbd(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .map_err(|e| format!("rbd: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "rbd {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    }

    /// A new image `rbd/NAME` of `size` bytes (any old one of that name
    /// removed first): its disk spec for the target.
    pub fn image(&self, name: &str, size: u64) -> String {
        let _ = self.rbd(&["rm", "--no-progress", &format!("rbd/{name}")]);
        self.rbd(&[
            "create",
            &format!("rbd/{name}"),
            "--size",
            &format!("{}K", size >> 10),
        ])
        .unwrap();
        self.disk(name, "")
    }

    /// The disk spec of `rbd/NAME` on this cluster, with `extra` options
    /// (`:key=value...`).
    pub fn disk(&self, name: &str, extra: &str) -> String {
        format!("rbd:rbd/{name}:conf={}{extra}", self.conf.display())
    }

    /// The image's bytes, as librbd reads them (`rbd export`).
    pub fn export(&self, name: &str) -> Vec<u8> {
        let to = self.dir.join(format!("{name}.export"));
        let _ = std::fs::remove_file(&to);
        self.rbd(&[
            "export",
            "--no-progress",
            &format!("rbd/{name}"),
            to.to_str().unwrap(),
        ])
        .unwrap();
        let b = std::fs::read(&to).unwrap();
        let _ = std::fs::remove_file(&to);
        b
    }

    /// The image's size in bytes, as the cluster has it.
    pub fn size(&self, name: &str) -> u64 {
        let out = self
            .rbd(&["info", "--format", "json", &format!("rbd/{name}")])
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        v["size"].as_u64().unwrap()
    }

    /// The OSD's PID (to stop and continue it).
    pub fn osd_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.join("osd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}
