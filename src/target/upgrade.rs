//! Live upgrade of the whole target (`target_upgrade`, SIGUSR2): every
//! device stops at a message boundary with nothing in flight, the target
//! is described (devices and their options, each device's protocol, PCI,
//! virtio and queue state, statistics) with the descriptors it needs
//! (listening sockets, clients, guest memory, interrupts, open images, the
//! management and metrics sockets), and the process executes the new
//! binary in place (`relaunch`), which checks the description as strictly
//! as client input, takes everything up, and goes on. Whatever fails
//! before the exec leaves the old binary serving at once; after it, the
//! old binary comes back (see `relaunch`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use log::{error, info, warn};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Entry, Target};
use crate::device::{device_on, DeviceSpec};
use crate::handover::{FdBag, Outgoing};
use crate::relaunch::{self, Incoming, STATE_VERSION};
use crate::vfio_user::park::{Park, Parked, Resumed};
use crate::vfio_user::Control;

/// How long every device has to have nothing in flight. Every other
/// device stays stopped meanwhile, and QEMU gives a device up when a
/// reply takes 5 s: the whole stop (this, the slack below, the exec and
/// the restore) must stay well inside that.
pub const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// How much longer than `DRAIN_WAIT` a device's thread may take to answer.
const PARK_SLACK: Duration = Duration::from_millis(500);
/// How long the accept threads have to stop.
const ACCEPT_WAIT: Duration = Duration::from_secs(1);
/// How long management connections busy with a request have to finish it.
const CONN_WAIT: Duration = Duration::from_secs(2);
const FORMAT: &str = "vfio-user-blk-upgrade";

/// One upgrade at a time.
static ONE: Mutex<()> = Mutex::new(());
/// The management socket and the metrics port, for the next binary.
static RPC: Mutex<Option<(UnixListener, PathBuf)>> = Mutex::new(None);
static METRICS: Mutex<Option<std::net::TcpListener>> = Mutex::new(None);

/// Keeps the management socket for an upgrade (a duplicate).
pub fn keep_rpc(l: &UnixListener, path: &std::path::Path) {
    if let Ok(d) = l.try_clone() {
        *RPC.lock() = Some((d, path.to_path_buf()));
    }
}

/// Keeps the metrics port for an upgrade (a duplicate).
pub fn keep_metrics(l: &std::net::TcpListener) {
    if let Ok(d) = l.try_clone() {
        *METRICS.lock() = Some(d);
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    format: String,
    version: u32,
    binary_version: String,
    /// The binary an upgrade runs by default (the first one's path).
    exe: PathBuf,
    /// The old binary, open: what a rollback executes.
    rollback_fd: i64,
    /// CLOCK_MONOTONIC when the devices began to stop.
    paused_ns: u64,
    devices: Vec<SavedDevice>,
    rpc: Option<(i64, PathBuf)>,
    metrics: Option<i64>,
    /// The management connection that asked, and its request id.
    reply: Option<(i64, Value)>,
    /// Whether the connection that asked is subscribed to events.
    #[serde(default)]
    reply_subscribed: bool,
    /// The other management connections, stopped between requests, and
    /// whether each is subscribed to events.
    management: Vec<(i64, bool)>,
    /// Socket files the service manager passed (never removed by us).
    passed: Vec<(u64, u64)>,
    fds: Vec<i64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedDevice {
    name: String,
    spec: Value,
    saved: bool,
    socket_id: Option<(u64, u64)>,
    listener_fd: i64,
    /// A connection accepted while the device stopped, not yet served.
    pending_fd: i64,
    /// The open image (or memory disk): -1 for a disk opened again.
    disk_fd: i64,
    server: Value,
}

/// The management connection an upgrade answers on, and its request id.
pub struct Reply<'a> {
    pub stream: std::os::fd::BorrowedFd<'a>,
    pub id: Value,
    /// The connection's place in the management connections' hold.
    pub hold: u64,
    /// It is subscribed to events (and is again in the next binary).
    pub subscribed: bool,
}

fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A device of the table, as an upgrade asks it to stop.
struct Listed {
    name: String,
    spec: DeviceSpec,
    saved: bool,
    socket_id: Option<(u64, u64)>,
    control: Arc<Control>,
    shared: Arc<crate::blk::BlkShared>,
}

/// What a stopped device hands over, and what keeps it stopped.
struct Stopped {
    name: String,
    entry_spec: DeviceSpec,
    saved: bool,
    socket_id: Option<(u64, u64)>,
    parked: Parked,
    /// Duplicates that must stay open until the exec.
    listener: Option<UnixListener>,
    pending: Option<UnixStream>,
    disk: Option<OwnedFd>,
    shared: Arc<crate::blk::BlkShared>,
}

impl Target {
    /// Replaces the running binary with `binary` (default: the one the
    /// target was first started from, as it is on disk now). Returns only
    /// when the upgrade did not happen, with why; the target then serves
    /// on as before.
    pub fn upgrade(&self, binary: Option<PathBuf>, reply: Option<Reply<'_>>) -> Result<Value> {
        let _one = ONE
            .try_lock()
            .ok_or_else(|| anyhow!("an upgrade is under way already"))?;
        let path = binary.unwrap_or_else(relaunch::default_binary);
        let launch = relaunch::prepare(&path).map_err(|e| anyhow!(e))?;
        info!(
            "upgrade to {} (version {}): stopping the devices",
            path.display(),
            launch.version
        );
        let conns = super::rpc_hold::pause(reply.as_ref().map(|r| r.hold), CONN_WAIT);
        let r = self.upgrade_held(&path, &launch, &conns, reply);
        super::rpc_hold::resume();
        r
    }

    /// [`upgrade`](Self::upgrade) with the management connections `conns`
    /// stopped.
    fn upgrade_held(
        &self,
        path: &std::path::Path,
        launch: &relaunch::Launch,
        conns: &[(RawFd, bool)],
        reply: Option<Reply<'_>>,
    ) -> Result<Value> {
        let _admin = self.admin_lock()?;
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(anyhow!("the target is shutting down"));
        }
        let controls: Vec<Arc<Control>> = self
            .devices
            .lock()
            .values()
            .map(|e| e.control.clone())
            .collect();
        let resume_accept = || controls.iter().for_each(|c| c.resume_accept());
        if !controls.iter().all(|c| c.pause_accept(ACCEPT_WAIT)) {
            resume_accept();
            return Err(anyhow!(
                "a device's accept thread did not stop in {ACCEPT_WAIT:?}"
            ));
        }
        let paused_ns = monotonic_ns();
        let stopped = match self.stop_devices() {
            Ok(s) => s,
            Err(e) => {
                resume_accept();
                return Err(e);
            }
        };
        let why = self.hand_over(launch, &stopped, paused_ns, conns, reply);
        // Still here: the exec did not happen. Everything goes on.
        drop(stopped);
        resume_accept();
        warn!("upgrade to {} failed: {why}; serving on", path.display());
        Err(anyhow!(
            "{why}; the target serves on with the binary it had"
        ))
    }

    /// Stops every device (in parallel): each answers with its state once
    /// nothing of it is in flight, or says why it cannot.
    fn stop_devices(&self) -> Result<Vec<Stopped>> {
        // (Not under the table's lock while they drain: a scrape of the
        // metrics need not wait for a disk.)
        let entries: Vec<Listed> = self
            .devices
            .lock()
            .iter()
            .map(|(n, e)| Listed {
                name: n.clone(),
                spec: e.spec.clone(),
                saved: e.saved,
                socket_id: e.socket_id,
                control: e.control.clone(),
                shared: e.shared.clone(),
            })
            .collect();
        let mut waiting = Vec::new();
        for e in entries {
            let (tx, rx) = crossbeam_channel::bounded(1);
            e.control.park(Park {
                limit: DRAIN_WAIT,
                reply: tx,
            });
            waiting.push((e, rx));
        }
        let mut stopped = Vec::new();
        let until = std::time::Instant::now() + DRAIN_WAIT + PARK_SLACK;
        for (e, rx) in waiting {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let parked = match rx.recv_timeout(left) {
                Ok(Ok(p)) => p,
                Ok(Err(why)) => return Err(anyhow!("{}: {why}", e.name)),
                Err(_) => return Err(anyhow!("{}: its thread did not stop in time", e.name)),
            };
            let pending = if parked.state["client"].is_null() {
                e.control.take_pending()
            } else {
                // Served one at a time: the newcomer would be refused.
                drop(e.control.take_pending());
                None
            };
            let disk = e
                .shared
                .handover_fd()
                .and_then(|fd| fd.try_clone_to_owned().ok());
            stopped.push(Stopped {
                listener: e.control.listener(),
                name: e.name,
                entry_spec: e.spec,
                saved: e.saved,
                socket_id: e.socket_id,
                parked,
                pending,
                disk,
                shared: e.shared,
            });
        }
        Ok(stopped)
    }

    /// Describes the stopped target and executes the new binary; returns
    /// why it could not.
    fn hand_over(
        &self,
        launch: &relaunch::Launch,
        stopped: &[Stopped],
        paused_ns: u64,
        conns: &[(RawFd, bool)],
        reply: Option<Reply<'_>>,
    ) -> String {
        let mut out = Outgoing::default();
        let devices = match describe(stopped, &mut out) {
            Ok(d) => d,
            Err(e) => return e,
        };
        let rpc = RPC.lock();
        let metrics = METRICS.lock();
        let rollback = match relaunch::open_self() {
            Ok(f) => f,
            Err(e) => return e,
        };
        let state = State {
            format: FORMAT.into(),
            version: relaunch::written_version(),
            binary_version: env!("CARGO_PKG_VERSION").into(),
            exe: relaunch::default_binary(),
            rollback_fd: out.add(rollback.as_fd()),
            paused_ns,
            devices,
            rpc: rpc.as_ref().map(|(l, p)| (out.add(l.as_fd()), p.clone())),
            metrics: metrics.as_ref().map(|l| out.add(l.as_fd())),
            reply_subscribed: reply.as_ref().is_some_and(|r| r.subscribed),
            reply: reply.map(|r| (out.add(r.stream), r.id)),
            management: conns
                .iter()
                .map(|&(fd, sub)| {
                    // SAFETY: the connection's thread is parked with its
                    // socket open until the exec or the call-off.
                    (
                        out.add(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }),
                        sub,
                    )
                })
                .collect(),
            passed: crate::activation::passed_files(),
            fds: Vec::new(),
        };
        let state = State {
            fds: out.list(),
            ..state
        };
        let bytes = match serde_json::to_vec(&state) {
            Ok(b) => b,
            Err(e) => return e.to_string(),
        };
        if let Err(e) = out.inherit(true) {
            let _ = out.inherit(false);
            return format!("handing descriptors over: {e}");
        }
        info!(
            "upgrade: {} device(s) stopped, {} descriptors; executing {}",
            stopped.len(),
            state.fds.len(),
            launch.path.display()
        );
        let why = self.exec_now(launch, &bytes, &state.fds, stopped, rollback.as_raw_fd());
        let _ = out.inherit(false);
        why
    }

    /// The network disks let go of their locks and the new binary runs;
    /// returns (the disks taken back) only if it could not, with why.
    fn exec_now(
        &self,
        launch: &relaunch::Launch,
        bytes: &[u8],
        fds: &[i64],
        stopped: &[Stopped],
        rollback: RawFd,
    ) -> String {
        let take_back = |n: usize| {
            for s in &stopped[..n] {
                if let Err(e) = s.shared.hand_off(false) {
                    error!(
                        "{}: taking the disk back after a failed upgrade: {e}",
                        s.name
                    );
                }
            }
        };
        for (i, s) in stopped.iter().enumerate() {
            if let Err(e) = s.shared.hand_off(true) {
                take_back(i);
                return format!("{}: letting go of the disk's lock: {e}", s.name);
            }
        }
        // A stop asked for meanwhile wins: it would be lost with this image
        // (or, held across the exec, it stops the new binary at once).
        let mask = relaunch::hold_signals();
        if relaunch::stop_asked() || self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            relaunch::restore_signals(&mask);
            take_back(stopped.len());
            return "the target is stopping (a signal came during the upgrade)".into();
        }
        let why = relaunch::exec(launch, bytes, fds, rollback);
        relaunch::restore_signals(&mask);
        take_back(stopped.len());
        why
    }
}

/// Each stopped device as the state carries it; its descriptors listed
/// in `out`.
fn describe(stopped: &[Stopped], out: &mut Outgoing) -> Result<Vec<SavedDevice>, String> {
    let mut devices = Vec::new();
    for s in stopped {
        let Some(l) = &s.listener else {
            return Err(format!("{}: its listening socket is gone", s.name));
        };
        devices.push(SavedDevice {
            name: s.name.clone(),
            spec: super::config::spec_to_json(&s.entry_spec),
            saved: s.saved,
            socket_id: s.socket_id,
            listener_fd: out.add(l.as_fd()),
            pending_fd: s.pending.as_ref().map_or(-1, |p| out.add(p.as_fd())),
            disk_fd: s.disk.as_ref().map_or(-1, |d| out.add(d.as_fd())),
            server: s.parked.state.clone(),
        });
        // (The device's thread keeps these open while it is parked.)
        out.merge(&s.parked.fds);
    }
    Ok(devices)
}

/// A device restored, not yet running.
struct Ready {
    name: String,
    spec: DeviceSpec,
    saved: bool,
    socket_id: Option<(u64, u64)>,
    server: crate::vfio_user::Server<crate::device::BlkFunction>,
    shared: Arc<crate::blk::BlkShared>,
    listener: UnixListener,
    client: Option<Resumed>,
}

/// What the management plane gets back from a restore.
pub struct TakenOver {
    pub target: Arc<Target>,
    pub rpc: Option<(UnixListener, PathBuf)>,
    pub metrics: Option<std::net::TcpListener>,
    /// The management connection to answer first, with its answer,
    /// whether it is subscribed to events and (if so) its place and events
    /// taken before the devices started.
    pub reply: Option<(UnixStream, Value, bool, Option<super::rpc::EarlySub>)>,
    /// The other management connections, to serve on.
    pub management: Vec<super::rpc::RpcConn>,
}

/// A test hook: when the variable names a file that exists, the file is
/// removed and its contents returned (one-shot failures for the tests).
pub fn test_hook(var: &str) -> Option<String> {
    let p = std::env::var_os(var)?;
    let s = std::fs::read_to_string(&p).ok()?;
    std::fs::remove_file(&p).ok()?;
    Some(s)
}

/// A binary started by an upgrade takes the state up. On failure the old
/// binary is executed again (a rollback) and this returns only if even
/// that is impossible.
pub fn take_over(
    engine: crate::engine::EngineConfig,
    settings: crate::device::Settings,
    config: Option<super::config::ConfigFile>,
    incoming: Incoming,
) -> Result<TakenOver> {
    let rolling_back = incoming.rollback.clone();
    let state: State = match parse_state(&incoming.state) {
        Ok(s) => s,
        Err(e) => return Err(give_back(&incoming, -1, &e)),
    };
    if let Some(p) = state.exe.to_str().filter(|p| !p.is_empty()) {
        relaunch::set_default_binary(PathBuf::from(p));
    }
    let restored = restore(engine, settings, config, &state, rolling_back.is_some());
    let (target, ready, mut bag) = match restored {
        Ok(r) => r,
        Err(e) => return Err(give_back(&incoming, state.rollback_fd, &e)),
    };
    // Committed: from here on this binary serves.
    relaunch::dismiss_watchdog(incoming.watchdog);
    crate::activation::mark_passed(&state.passed);
    let rpc = take_listener(&mut bag, state.rpc.as_ref().map(|r| r.0)).map(|l| {
        (
            l,
            state.rpc.as_ref().map(|r| r.1.clone()).unwrap_or_default(),
        )
    });
    let metrics = state
        .metrics
        .and_then(|fd| bag.take(fd).ok())
        .map(std::net::TcpListener::from);
    let reply_stream = state
        .reply
        .as_ref()
        .and_then(|(fd, _)| bag.take(*fd).ok())
        .map(UnixStream::from);
    let management = state
        .management
        .iter()
        .filter_map(|&(fd, subscribed)| {
            let stream = UnixStream::from(bag.take(fd).ok()?);
            // A unix socket (one whose client left is seen as it is read).
            stream.local_addr().ok()?;
            Some(super::rpc::RpcConn {
                stream,
                subscribed,
                early: super::rpc::EarlySub::take(subscribed),
                hold: None,
            })
        })
        .collect();
    // The connection that asked hears of the devices' events from their
    // start too, as every subscriber handed over does.
    let reply_early = super::rpc::EarlySub::take(state.reply_subscribed);
    bag.close_originals();
    // SAFETY: the state's memfd, handed to us and read; nothing owns it.
    unsafe { libc::close(incoming.state_fd) };
    for r in ready {
        start_device(&target, r);
    }
    // Every device stopped at `paused_ns` and is running again now.
    let pause = Duration::from_nanos(monotonic_ns().saturating_sub(state.paused_ns));
    let answer = upgrade_answer(&state, rolling_back.as_deref(), pause, &target);
    let subscribed = state.reply_subscribed;
    let reply = reply_stream
        .zip(state.reply.map(|(_, id)| {
            let mut a = answer.clone();
            a["jsonrpc"] = json!("2.0");
            a["id"] = id;
            a
        }))
        .map(|(s, a)| (s, a, subscribed, reply_early));
    Ok(TakenOver {
        target,
        rpc,
        metrics,
        reply,
        management,
    })
}

/// What the management connection that asked for the upgrade is told.
fn upgrade_answer(state: &State, rolling_back: Option<&str>, pause: Duration, t: &Target) -> Value {
    let Some(why) = rolling_back else {
        info!(
            "upgrade from version {} done: {} device(s), longest pause {:.1} ms",
            state.binary_version,
            t.devices.lock().len(),
            pause.as_secs_f64() * 1e3
        );
        crate::util::sd_notify(&format!("MAINPID={}", std::process::id()));
        return json!({ "result": {
            "old_version": state.binary_version,
            "new_version": env!("CARGO_PKG_VERSION"),
            "devices": t.devices.lock().len(),
            "pause_ms": pause.as_secs_f64() * 1e3,
        }});
    };
    error!("upgrade failed: {why}; serving on the old binary again");
    json!({ "error": { "code": -32000, "message": format!(
        "upgrade failed: {why}; the target serves on with the binary it had (version {})",
        env!("CARGO_PKG_VERSION")) } })
}

fn take_listener(bag: &mut FdBag, fd: Option<i64>) -> Option<UnixListener> {
    fd.and_then(|fd| bag.take(fd).ok()).map(UnixListener::from)
}

fn parse_state(bytes: &[u8]) -> Result<State, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("the state: {e}"))?;
    if v["format"] != json!(FORMAT) {
        return Err("the state is not a vfio-user-blk upgrade state".into());
    }
    let version = v["version"].as_u64().unwrap_or(u64::MAX);
    if version != u64::from(STATE_VERSION) {
        return Err(format!(
            "the state is version {version}; this binary reads version {STATE_VERSION}"
        ));
    }
    serde_json::from_value(v).map_err(|e| format!("the state: {e}"))
}

/// Executes the old binary again, with why; returns only if that failed.
fn give_back(incoming: &Incoming, rollback_fd: i64, why: &str) -> anyhow::Error {
    error!("cannot take the upgrade: {why}");
    // RBD images this binary opened let go of their locks first (the old
    // binary takes them again).
    crate::backend::rbd::wait_closed(Duration::from_secs(5));
    if incoming.rollback.is_some() {
        return anyhow!("taking the state back after a failed upgrade: {why}");
    }
    let Ok(fd) = RawFd::try_from(rollback_fd) else {
        return anyhow!("{why}; and the state names no binary to go back to");
    };
    let e = relaunch::roll_back(incoming, fd, why);
    anyhow!("{why}; going back to the old binary failed too: {e}")
}

type Restored = (Arc<Target>, Vec<Ready>, FdBag);

/// Builds the target and its devices from the state; nothing runs yet.
fn restore(
    engine: crate::engine::EngineConfig,
    settings: crate::device::Settings,
    config: Option<super::config::ConfigFile>,
    state: &State,
    rolling_back: bool,
) -> Result<Restored, String> {
    let mut bag = FdBag::new(&state.fds)?;
    if !rolling_back && test_hook("VFIO_USER_BLK_TEST_RESTORE_FAIL").is_some() {
        return Err("a test asked this restore to fail".into());
    }
    let target = Target::empty(engine, settings, config).map_err(|e| format!("{e:#}"))?;
    let mut ready = Vec::new();
    for d in &state.devices {
        match restore_device(&target, d, &mut bag) {
            Ok(r) => ready.push(r),
            // Taking our own state back (a rollback, or the watchdog's
            // rescue) is the last resort: a device that cannot be had
            // again (a network disk whose server does not answer now) is
            // dropped, its client disconnected, and every other device
            // serves on; failing here would end the process and every
            // guest's disk with it.
            Err(e) if rolling_back => error!(
                "{}: cannot take it back after the failed upgrade: {e}; the device is \
                 dropped and its client disconnected (device_add brings it back)",
                d.name
            ),
            Err(e) => return Err(format!("{}: {e}", d.name)),
        }
    }
    if !rolling_back && test_hook("VFIO_USER_BLK_TEST_RESTORE_CRASH").is_some() {
        error!("a test asked this restore to crash");
        std::process::abort();
    }
    Ok((target, ready, bag))
}

fn restore_device(target: &Target, d: &SavedDevice, bag: &mut FdBag) -> Result<Ready, String> {
    let spec = super::rpc::spec_from_json(d.spec.clone())?;
    if spec.name.as_deref() != Some(d.name.as_str()) {
        return Err("the device's name and its options differ".into());
    }
    spec.validate_against_machine()
        .map_err(|e| format!("{e:#}"))?;
    let opts = crate::backend::OpenOptionsDisk {
        readonly: spec.readonly,
        create_size: None,
        direct: spec.direct.then_some(spec.logical_block_size as usize),
        force_share: spec.force_share,
        format_raw: spec.format_raw,
        reconnect_delay: spec.reconnect_delay.map(Duration::from_secs),
    };
    let disk = match bag.take_opt(d.disk_fd)? {
        Some(fd) => crate::backend::open_handed(&spec.disk, fd, opts),
        None => crate::backend::open(&spec.disk, opts),
    }
    .map_err(|e| e.to_string())?;
    let (mut server, shared) = device_on(&spec, &d.name, &target.settings, &target.engine, disk)
        .map_err(|e| format!("{e:#}"))?;
    let client = server.restore(&d.server, bag)?;
    let listener = UnixListener::from(bag.take(d.listener_fd)?);
    let bound = listener.local_addr().ok();
    let same = bound
        .as_ref()
        .and_then(|a| a.as_pathname())
        .is_some_and(|p| crate::cli::same_socket(p, &spec.socket));
    if !same {
        return Err(format!(
            "the listening socket handed over is not bound to {}",
            spec.socket.display()
        ));
    }
    let pending = bag.take_opt(d.pending_fd)?.map(|fd| Resumed {
        stream: UnixStream::from(fd),
        negotiated: false,
        max_xfer: crate::vfio_user::ServerConfig::default().max_data_xfer_size,
    });
    if client.is_some() && pending.is_some() {
        return Err("both a client and a waiting connection".into());
    }
    Ok(Ready {
        name: d.name.clone(),
        spec,
        saved: d.saved,
        socket_id: d.socket_id,
        server,
        shared,
        listener,
        client: client.or(pending),
    })
}

/// Runs a restored device.
fn start_device(target: &Target, r: Ready) {
    let Ready {
        name,
        spec,
        saved,
        socket_id,
        mut server,
        shared,
        listener,
        client,
    } = r;
    server.start_restored();
    let control = Arc::new(Control::default());
    let ctl = control.clone();
    let label = name.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("vfio-user-{name}"))
        .spawn(move || {
            if let Err(e) = server.run_restored(listener, &ctl, client) {
                warn!("{label}: the server stopped: {e}");
            }
        });
    let thread = match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            error!("{name}: cannot start the device's thread: {e}");
            None
        }
    };
    target.devices.lock().insert(
        name,
        Entry {
            spec,
            shared,
            control,
            thread,
            socket_id,
            saved,
        },
    );
}

/// Writes the answer of the upgrade to the management connection that
/// asked for it.
pub fn answer(stream: &UnixStream, answer: &Value) {
    use std::io::Write;
    let _ = writeln!(&*stream, "{answer}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_of_another_version_or_shape_is_refused() {
        let ok = json!({
            "format": FORMAT, "version": STATE_VERSION, "binary_version": "0",
            "exe": "/x", "rollback_fd": 3, "paused_ns": 0, "devices": [],
            "rpc": null, "metrics": null, "reply": null, "management": [], "passed": [],
            "fds": [],
        });
        assert!(parse_state(ok.to_string().as_bytes()).is_ok());
        let mut future = ok.clone();
        future["version"] = json!(STATE_VERSION + 1);
        let e = parse_state(future.to_string().as_bytes()).err().unwrap();
        assert!(e.contains("reads version"), "{e}");
        let mut other = ok.clone();
        other["format"] = json!("something else");
        assert!(parse_state(other.to_string().as_bytes()).is_err());
        let mut extra = ok.clone();
        extra["surprise"] = json!(1);
        assert!(parse_state(extra.to_string().as_bytes()).is_err());
        assert!(parse_state(b"not json").is_err());
    }
}
