//! NBD servers for the NBD tests: Debian's nbdkit and qemu-nbd, started as
//! child processes on a socket in a private folder (or on a loopback TCP
//! port), and killed by PID when dropped, even when the test fails.
//!
//! Where nbdkit or qemu-nbd is missing the tests say so and do nothing,
//! unless `VUB_REQUIRE_NBD` is set (`scripts/test.sh` sets it once it has
//! installed them): then a missing server fails them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vub_testkit::TempDir;

/// Whether `prog` runs; panics when it does not and NBD is required.
pub fn have(prog: &str) -> bool {
    let ok = Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("VUB_REQUIRE_NBD").is_some() {
            panic!("{prog} is not installed (apt-get install nbdkit qemu-utils)");
        }
        eprintln!("SKIPPED: {prog} is not installed");
    }
    ok
}

/// Where a server listens.
pub enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

/// A running NBD server.
pub struct NbdServer {
    child: Option<Child>,
    /// How to start it again (same socket or port).
    cmd: Vec<String>,
    pub listen: Listen,
    pub log: PathBuf,
}

/// A free loopback TCP port (bound and released: the server takes it
/// right after).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl NbdServer {
    /// `nbdkit -f ARGS` listening on `listen`; its stderr in `log`.
    pub fn nbdkit(dir: &TempDir, listen: Listen, args: &[&str]) -> NbdServer {
        let mut cmd: Vec<String> = vec!["nbdkit".into(), "-f".into(), "--exit-with-parent".into()];
        match &listen {
            Listen::Unix(p) => cmd.extend(["-U".into(), p.to_string_lossy().into_owned()]),
            Listen::Tcp(port) => cmd.extend([
                "-i".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ]),
        }
        cmd.extend(args.iter().map(|s| s.to_string()));
        Self::start(dir, listen, cmd)
    }

    /// `qemu-nbd` serving `image` in `format` on a socket.
    pub fn qemu_nbd(dir: &TempDir, socket: PathBuf, image: &Path, format: &str) -> NbdServer {
        let cmd = vec![
            "qemu-nbd".into(),
            "--persistent".into(),
            "--shared=8".into(),
            "--cache=none".into(),
            "--aio=threads".into(),
            "-f".into(),
            format.into(),
            format!("--socket={}", socket.display()),
            image.to_string_lossy().into_owned(),
        ];
        Self::start(dir, Listen::Unix(socket), cmd)
    }

    fn start(dir: &TempDir, listen: Listen, cmd: Vec<String>) -> NbdServer {
        let mut s = NbdServer {
            child: None,
            cmd,
            listen,
            log: dir.path("nbd-server.log"),
        };
        s.restart();
        s
    }

    /// The disk URI of the export (`export` is its name).
    pub fn uri(&self, export: &str) -> String {
        match &self.listen {
            Listen::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
        }
    }

    /// Starts the server (again) and waits until it takes connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server runs already");
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.cmd[0]));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.listening() {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "{} exited with {st}: {}",
                    self.cmd[0],
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{} did not start", self.cmd[0]);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn listening(&self) -> bool {
        match &self.listen {
            Listen::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }

    /// SIGKILL: the server goes away without a word.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for it to exit: a graceful shutdown.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's PID, not yet reaped.
            unsafe { libc::kill(c.id().cast_signed(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}
