//! Test support: start the real server (as a process or on a thread), talk
//! to it over raw sockets, and clean up whatever happens.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use vfio_user_blk::cli::{self, Options};
use vfio_user_blk::device::BlkFunction;
use vfio_user_blk::vfio_user::Server;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub use vub_testkit::TempDir;

/// A number field of /proc/PID/status (`VmRSS:`, `Threads:`...).
pub fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A private folder on the disk the tests are built on (not tmpfs: O_DIRECT
/// works there), removed on drop.
pub fn on_disk(tag: &str) -> TempDir {
    TempDir::under(Path::new(env!("CARGO_TARGET_TMPDIR")), tag)
}

/// A server on a new image of `size` bytes on that disk, with `--direct`
/// and `args`.
pub fn direct_server(tag: &str, size: u64, args: &[&str]) -> (ServerProcess, PathBuf) {
    let dir = on_disk(tag);
    let img = dir.image("disk.img", size);
    let mut argv = vec!["--disk", img.to_str().unwrap(), "--direct"];
    argv.extend_from_slice(args);
    (ServerProcess::start_in(dir, &argv), img)
}

/// The server binary running as a child process; killed (by PID) and its
/// socket directory removed on drop, even when the test fails.
pub struct ServerProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
    pub log: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vfio-user-blk")
}

/// The server binary with `socket` (its option and path) and `args`, its
/// log (at `level`) in `log`.
fn spawn_server(socket: [&std::ffi::OsStr; 2], args: &[&str], log: &Path, level: &str) -> Child {
    spawn_server_env(socket, args, log, level, &[])
}

/// [`spawn_server`] with variables set for the server alone.
fn spawn_server_env(
    socket: [&std::ffi::OsStr; 2],
    args: &[&str],
    log: &Path,
    level: &str,
    env: &[(&str, &Path)],
) -> Child {
    Command::new(bin())
        .args(socket)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("starting the server")
}

impl ServerProcess {
    /// Starts `vfio-user-blk --socket <tmp>/s.sock <args>` and waits until
    /// it listens.
    pub fn start(args: &[&str]) -> ServerProcess {
        let dir = TempDir::new("srv");
        Self::start_in(dir, args)
    }

    pub fn start_in(dir: TempDir, args: &[&str]) -> ServerProcess {
        let socket = dir.path("s.sock");
        let log = dir.path("server.log");
        let child = spawn_server(["--socket".as_ref(), socket.as_ref()], args, &log, "debug");
        let mut s = ServerProcess {
            child,
            socket,
            dir,
            log,
        };
        // Every `--device` listens too, each after the one before: a test
        // that connects to the last must not find it not bound yet.
        let devices = 1 + args.iter().filter(|a| a.starts_with("--device")).count();
        s.wait_listening(devices);
        s
    }

    fn wait_listening(&mut self, devices: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // The log line comes after bind+listen; the socket file alone
            // may be a stale one the server is about to replace.
            if self.socket.exists() && self.log_text().matches("listening on").count() >= devices {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("server exited with {st}: {}", self.log_text());
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("server did not start listening: {}", self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, newest first.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log_text();
        log.lines().rev().take(n).collect::<Vec<_>>().join("\n")
    }

    /// Number of descriptors the server process has open.
    pub fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "server died: {}",
            self.log_text()
        );
    }

    /// Alive, and no thread of it ever panicked.
    pub fn assert_healthy(&mut self) {
        self.assert_alive();
        let log = self.log_text();
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// `vfio-user-blk ARGS` until it exits or `within` has passed (then it is
/// killed): whether it exited by itself, its status, and its stderr.
pub fn run_bin(args: &[&str], within: Duration) -> (bool, std::process::ExitStatus, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    let mut exited = false;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        exited,
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `len` bytes of an image file at `off`.
pub fn image_bytes(img: &std::path::Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(img).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("VUB_SHOW_LOGS").is_some() {
            eprintln!("{}", self.log_text());
        }
    }
}

/// Waits until `f` holds, or panics after a few seconds.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

/// The server in this process, on a thread, serving one client; `finish`
/// hands the server back for inspection once the client has gone.
pub struct ThreadServer {
    pub socket: PathBuf,
    irqs: std::sync::Arc<vfio_user_blk::pci::Interrupts>,
    handle: Option<JoinHandle<Server<BlkFunction>>>,
    _dir: TempDir,
}

impl ThreadServer {
    pub fn start(extra: &[&str]) -> ThreadServer {
        let dir = TempDir::new("thr");
        let socket = dir.path("s.sock");
        let mut argv = vec!["vfio-user-blk", "--socket", socket.to_str().unwrap()];
        argv.extend_from_slice(extra);
        let opts = Options::parse_from(argv);
        let mut server = cli::build(&opts).unwrap();
        let irqs = server.device().interrupts().clone();
        let listener = UnixListener::bind(&socket).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            server.serve(stream);
            server
        });
        ThreadServer {
            socket,
            irqs,
            handle: Some(handle),
            _dir: dir,
        }
    }

    pub fn interrupts(&self) -> std::sync::Arc<vfio_user_blk::pci::Interrupts> {
        self.irqs.clone()
    }

    /// Waits for the served client to disconnect and returns the server.
    pub fn finish(mut self) -> Server<BlkFunction> {
        self.handle.take().unwrap().join().unwrap()
    }
}

// ---- raw protocol helpers -------------------------------------------------

pub const REPLY: u32 = 1;
pub const NO_REPLY: u32 = 0x10;
pub const ERROR: u32 = 0x20;

pub fn header(id: u16, cmd: u16, size: u32, flags: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&cmd.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

/// A message: header with the right size, then the payload.
pub fn message(id: u16, cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = header(id, cmd, u32::try_from(16 + payload.len()).unwrap(), flags);
    m.extend_from_slice(payload);
    m
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: u16,
    pub cmd: u16,
    pub flags: u32,
    pub error: u32,
    pub payload: Vec<u8>,
}

impl Reply {
    /// The errno of an error reply; 0 for a success.
    pub fn errno(&self) -> u32 {
        if self.flags & ERROR != 0 {
            self.error
        } else {
            0
        }
    }
}

pub struct Raw {
    pub s: UnixStream,
    next_id: u16,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s, next_id: 100 }
    }

    /// Connects and negotiates the version.
    pub fn negotiated(path: &Path) -> Raw {
        let mut r = Raw::connect(path);
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(br#"{"capabilities":{"max_msg_fds":8}}"#);
        p.push(0);
        let rep = r.call(1, &p);
        assert_eq!(rep.flags & ERROR, 0, "version refused: {rep:?}");
        r
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    pub fn send_fds(&mut self, bytes: &[u8], fds: &[RawFd]) {
        self.s.send_with_fds(&[bytes], fds).unwrap();
    }

    pub fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    pub fn recv(&mut self) -> Reply {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reply header");
        let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size - 16];
        self.s.read_exact(&mut payload).expect("reply payload");
        Reply {
            id: u16::from_le_bytes([h[0], h[1]]),
            cmd: u16::from_le_bytes([h[2], h[3]]),
            flags: u32::from_le_bytes(h[8..12].try_into().unwrap()),
            error: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            payload,
        }
    }

    /// Sends a request and returns its reply, checking id and command.
    pub fn call(&mut self, cmd: u16, payload: &[u8]) -> Reply {
        self.call_fds(cmd, payload, &[])
    }

    pub fn call_fds(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> Reply {
        let id = self.id();
        let m = message(id, cmd, 0, payload);
        if fds.is_empty() {
            self.send(&m);
        } else {
            self.send_fds(&m, fds);
        }
        let r = self.recv();
        assert_eq!((r.id, r.cmd), (id, cmd), "reply does not match request");
        assert_eq!(r.flags & 0xf, REPLY);
        r
    }

    /// True when the server has closed the connection (EOF within 5 s).
    pub fn closed_by_peer(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0))
    }
}

pub fn region_read_payload(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&region.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    p
}

/// A fresh client through rust-vmm's Client must work: the proof that the
/// server survived whatever came before.
pub fn fresh_client_works(socket: &Path) {
    let mut c = vfio_user::Client::new(socket).expect("fresh client connects");
    let mut id = [0u8; 4];
    c.region_read(7, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1001_1af4);
    c.shutdown().unwrap();
}
pub mod ceph;
pub mod driver;
pub mod gate;
pub mod nbd;

/// A target started with a management socket (and `extra`), killed (by
/// PID) on drop.
pub struct RpcTarget {
    pub child: Child,
    pub dir: TempDir,
    pub rpc: PathBuf,
    pub log: PathBuf,
}

impl RpcTarget {
    pub fn start(extra: &[&str]) -> RpcTarget {
        Self::start_env(extra, &[])
    }

    /// [`start`](Self::start) with variables set for the target alone (a
    /// test's hooks: never the test process's own environment, which the
    /// targets of tests running beside it would inherit).
    pub fn start_env(extra: &[&str], env: &[(&str, &Path)]) -> RpcTarget {
        let dir = TempDir::new("rpc");
        let rpc = dir.path("rpc.sock");
        let log = dir.path("target.log");
        let child = spawn_server_env(
            ["--rpc-socket".as_ref(), rpc.as_ref()],
            extra,
            &log,
            "info",
            env,
        );
        let t = RpcTarget {
            child,
            dir,
            rpc,
            log,
        };
        // The file appears at bind, before the socket listens: wait for a
        // connection to be taken (a CI run found it refused right after).
        wait_until("the management socket", || {
            UnixStream::connect(&t.rpc).is_ok()
        });
        t
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(i32::try_from(self.child.id()).unwrap(), libc::SIGTERM) };
    }

    /// Waits (up to 20 s) for the target to exit.
    pub fn wait_exit(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the target did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn call(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let mut s = UnixStream::connect(&self.rpc).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
        // A refusal (too many connections) may close the socket before the
        // request is written: its answer is still there to read.
        let _ = writeln!(s, "{req}");
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| (0, e.to_string()))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| (0, e.to_string()))?;
        if v.get("error").is_none() {
            assert_eq!(v["id"], 7);
        }
        match v.get("error") {
            Some(e) => Err((
                e["code"].as_i64().unwrap(),
                e["message"].as_str().unwrap().to_string(),
            )),
            None => Ok(v["result"].clone()),
        }
    }

    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e:?}\n{}", self.log_text()))
    }
}

/// One JSON-RPC call on a fresh management connection: the result, or
/// the error's message (a connection that ends without an answer is an
/// error too).
pub fn rpc_call(rpc: &Path, method: &str, params: Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(rpc).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = json!({"jsonrpc": "2.0", "id": 9, "method": method, "params": params});
    writeln!(s, "{req}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
    // The request's id, or null on an error about a request whose id
    // could not be read.
    assert!(
        v["id"] == 9 || (v["id"].is_null() && v.get("error").is_some()),
        "{v}"
    );
    match v.get("error") {
        Some(e) => Err(e["message"].as_str().unwrap_or_default().to_string()),
        None => Ok(v["result"].clone()),
    }
}

/// Writes one JSON-RPC request without parameters on a raw management
/// connection (the tests that read what comes back themselves).
pub fn send_request(s: &mut impl Write, id: u64, method: &str) {
    writeln!(
        s,
        "{}",
        json!({"jsonrpc": "2.0", "id": id, "method": method})
    )
    .unwrap();
}

impl Drop for RpcTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One thread of a process, as /proc/PID/task/TID/stat shows it.
pub struct ThreadStat {
    pub name: String,
    /// The scheduler's state: 'R' running or runnable, 'S' asleep, ...
    pub state: char,
    /// CPU time, user and system, in clock ticks.
    pub ticks: u64,
    pub tid: u32,
    /// Time on a CPU, in nanoseconds (the scheduler's own count, which
    /// waiting for a CPU does not add to); None on a kernel without
    /// schedstat.
    pub run_ns: Option<u64>,
    /// Times it went to sleep (a yield or a preemption does not count).
    pub sleeps: u64,
}

/// The threads of `pid` whose name starts with `prefix`, by name (a thread
/// that ends while they are read is left out).
pub fn threads_named(pid: u32, prefix: &str) -> Vec<ThreadStat> {
    let mut v: Vec<ThreadStat> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let name = fs::read_to_string(p.join("comm")).ok()?.trim().to_string();
            if !name.starts_with(prefix) {
                return None;
            }
            let stat = fs::read_to_string(p.join("stat")).ok()?;
            // The fields after the command's closing parenthesis: the
            // state first, utime and stime 12th and 13th.
            let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
            let sched = fs::read_to_string(p.join("schedstat")).unwrap_or_default();
            let status = fs::read_to_string(p.join("status")).ok()?;
            let sleeps = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse()
                .ok()?;
            Some(ThreadStat {
                name,
                state: f.first()?.chars().next()?,
                ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
                tid: p.file_name()?.to_str()?.parse().ok()?,
                run_ns: sched.split_whitespace().next().and_then(|n| n.parse().ok()),
                sleeps,
            })
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}
