//! The target: the set of devices one process serves, on one engine, and
//! what an operator does with them while they run: add, remove, list,
//! resize, read statistics (JSON-RPC, `rpc`; Prometheus text, `metrics`).
//! Knows devices and their options, nothing of rings.

pub mod config;
mod conns;
pub mod metrics;
pub mod rpc;
mod rpc_hold;
pub mod upgrade;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use log::{info, warn};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::blk::exec::{ERROR_KINDS, REQUEST_KINDS};
use crate::blk::{feature_names, BlkShared};
use crate::device::{bind_socket, build_device, device_on, DeviceSpec, Settings};
use crate::engine::{Engine, EngineConfig, Histogram, QosLimits, QueueStats};
use crate::vfio_user::Control;
use config::ConfigFile;

struct Entry {
    spec: DeviceSpec,
    shared: Arc<BlkShared>,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
    /// The socket file we bound (device, inode): only it is removed later.
    socket_id: Option<(u64, u64)>,
    /// Written by `config_save` (not given on the command line).
    saved: bool,
}

/// How long a removal waits for the device to stop before it answers
/// (the device then finishes stopping in the background).
pub const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long an add or remove waits for the one before it.
const ADMIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long shutdown waits for one disk's flush.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits up to `limit` for a thread to finish.
fn wait_finished<T>(t: &JoinHandle<T>, limit: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    while !t.is_finished() {
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

/// Runs `f` on a thread of its own and waits up to `limit` for it: false
/// when it has not returned by then (it goes on, unwaited for).
fn bounded(what: &str, limit: std::time::Duration, f: impl FnOnce() + Send + 'static) -> bool {
    match std::thread::Builder::new().name(what.into()).spawn(f) {
        Ok(t) => wait_finished(&t, limit),
        Err(_) => false,
    }
}

/// How long a graceful shutdown waits for clients to let go.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a disconnected device has to stop before shutdown goes on
/// without it.
const SHUTDOWN_LET_GO: std::time::Duration = std::time::Duration::from_secs(2);
/// Most devices one target serves.
const MAX_DEVICES: usize = 1024;

fn file_id(p: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn say_listening(name: &str, spec: &DeviceSpec, shared: &BlkShared) {
    info!(
        "{name}: listening on {} (disk {}, {} bytes, {} queue(s) of {}{})",
        spec.socket.display(),
        spec.disk,
        shared.capacity_bytes(),
        spec.queues,
        spec.queue_size,
        if spec.readonly { ", read-only" } else { "" }
    );
}

/// Removes the socket at `p` only if it is still the one we bound.
pub fn remove_own_socket(p: &std::path::Path, id: Option<(u64, u64)>) {
    // A socket the service manager passed is its own: it stays.
    if id.is_some_and(crate::activation::was_passed) {
        return;
    }
    if id.is_some() && file_id(p) == id {
        let _ = std::fs::remove_file(p);
    }
}

/// Every device of the process.
pub struct Target {
    engine: Arc<Engine>,
    settings: Settings,
    devices: Mutex<BTreeMap<String, Entry>>,
    /// Serialises add and remove (building a device opens files and binds
    /// a socket; two adds of one socket must not race).
    admin: Mutex<()>,
    /// Held from the check of the memory disks' total to the add or
    /// resize that it allowed (two resizes at once each passed the check
    /// against the other's old size).
    memory: Mutex<()>,
    /// Shutting down: nothing is added any more.
    closing: std::sync::atomic::AtomicBool,
    /// `--config`: where `config_save` writes the devices.
    config: Option<ConfigFile>,
    /// One save at a time (two would race on the file's rename).
    saving: Mutex<()>,
}

impl Target {
    /// Starts the engine and every device of `specs` (checked by the
    /// caller, as `Options::start_target` does), each with whether
    /// `config_save` keeps it (those of the `--config` file; not those of
    /// the command line). A failure removes what was already started.
    pub fn start(
        engine: EngineConfig,
        settings: Settings,
        specs: Vec<(DeviceSpec, bool)>,
        config: Option<ConfigFile>,
    ) -> Result<Arc<Target>> {
        let t = Target::empty(engine, settings, config)?;
        for (spec, saved) in specs {
            if let Err(e) = t.add_on(spec, None, saved) {
                t.shutdown();
                return Err(e);
            }
        }
        info!(
            "target ready: {} disk(s), {}",
            t.devices.lock().len(),
            t.engine.describe()
        );
        Ok(t)
    }

    /// The engine, and no device yet.
    fn empty(
        engine: EngineConfig,
        settings: Settings,
        config: Option<ConfigFile>,
    ) -> Result<Arc<Target>> {
        let engine = Engine::start(engine).context("starting the reactors")?;
        Ok(Arc::new(Target {
            engine,
            settings,
            devices: Mutex::new(BTreeMap::new()),
            admin: Mutex::new(()),
            memory: Mutex::new(()),
            closing: std::sync::atomic::AtomicBool::new(false),
            config,
            saving: Mutex::new(()),
        }))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Adds a device: opens its disk, binds its socket, serves it (and
    /// `config_save` keeps it).
    pub fn add(&self, spec: DeviceSpec) -> Result<Value> {
        self.add_on(spec, None, true)
    }

    /// Adds a device on a disk the caller opened (embedding, tests): the
    /// spec's disk is only its description.
    pub fn add_disk(&self, spec: DeviceSpec, disk: crate::backend::Disk) -> Result<Value> {
        self.add_on(spec, Some(disk), false)
    }

    fn add_on(
        &self,
        mut spec: DeviceSpec,
        disk: Option<crate::backend::Disk>,
        saved: bool,
    ) -> Result<Value> {
        let _admin = self.admin_lock()?;
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("the target is shutting down");
        }
        let name = self.name_new_device(&spec)?;
        spec.name = Some(name.clone());
        spec.validate_against_machine()?;
        // Held until the device is in the table (its size counts then).
        let _memory = self.memory_for(&spec)?;
        // Only what did not exist at all (not even as a dangling link) is
        // ours to remove if the add fails.
        let created = match &spec.disk {
            crate::backend::DiskSpec::File(p) if p.symlink_metadata().is_err() => Some(p.clone()),
            _ => None,
        };
        let remove_created = || {
            if let Some(p) = &created {
                let _ = std::fs::remove_file(p);
            }
        };
        let built = match disk {
            Some(d) => device_on(&spec, &name, &self.settings, &self.engine, d),
            None => build_device(&spec, &name, &self.settings, &self.engine),
        };
        let (mut server, shared) = built.inspect_err(|_| remove_created())?;
        let listener = match bind_socket(&spec.socket, self.settings.force) {
            Ok(l) => l,
            Err(e) => {
                drop(server);
                remove_created();
                return Err(e);
            }
        };
        let socket_id = file_id(&spec.socket);
        let undo_bind = || {
            remove_own_socket(&spec.socket, socket_id);
            remove_created();
        };
        spec.socket_access
            .apply(&spec.socket)
            .inspect_err(|_| undo_bind())?;
        let control = Arc::new(Control::default());
        // Before the device's thread starts: the process's descriptors are
        // all there once the socket is announced.
        control
            .watch_listener(&listener)
            .inspect_err(|_| undo_bind())?;
        let ctl = control.clone();
        let label = name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vfio-user-{name}"))
            .spawn(move || {
                if let Err(e) = server.run_controlled(listener, &ctl) {
                    warn!("{label}: the server stopped: {e}");
                }
            })
            .context("starting the device's thread")
            .inspect_err(|_| undo_bind())?;
        Ok(self.enlist(
            name,
            Entry {
                spec,
                shared,
                control,
                thread: Some(thread),
                socket_id,
                saved,
            },
        ))
    }

    /// For a new memory disk: the memory lock, once the disk fits.
    fn memory_for(&self, spec: &DeviceSpec) -> Result<Option<parking_lot::MutexGuard<'_, ()>>> {
        let crate::backend::DiskSpec::Ram(size) = spec.disk else {
            return Ok(None);
        };
        let held = self.memory.lock();
        self.check_memory_disks(None, size)?;
        Ok(Some(held))
    }

    /// A device that serves now: said in the log and to subscribers, and
    /// in the table.
    fn enlist(&self, name: String, entry: Entry) -> Value {
        say_listening(&name, &entry.spec, &entry.shared);
        crate::events::publish(&name, &crate::events::Event::DeviceAdded);
        let info = describe(&name, &entry);
        self.devices.lock().insert(name, entry);
        info
    }

    /// The lock that serialises adds and removes, waited for at most
    /// ADMIN_WAIT: an add that opens a disk on a file system that stopped
    /// answering holds it, and the next caller is told so instead of
    /// waiting with it.
    fn admin_lock(&self) -> Result<parking_lot::MutexGuard<'_, ()>> {
        self.admin.try_lock_for(ADMIN_WAIT).with_context(|| {
            format!(
                "another device_add or device_remove has not finished in {ADMIN_WAIT:?} \
                 (a disk or socket that does not answer?)"
            )
        })
    }

    /// Removes a device. With a client attached, only with `force`: the
    /// client is disconnected first (the device withdraws its queues, as
    /// for any disconnect). Returns whether the device has stopped; one
    /// whose disk still holds a request (a stuck backend) finishes stopping
    /// in the background, and the log says when: nothing here waits on a
    /// device longer than [`REMOVE_WAIT`].
    pub fn remove(&self, name: &str, force: bool) -> Result<bool> {
        let mut entry = {
            let _admin = self.admin_lock()?;
            let mut devs = self.devices.lock();
            let Some(e) = devs.get(name) else {
                bail!("no device named '{name}'");
            };
            if let Some(client) = e.control.client() {
                if !force {
                    bail!(
                        "device '{name}' has a client attached (pid {}); give force=true to disconnect it",
                        client.map_or(-1, |c| c.pid)
                    );
                }
            }
            devs.remove(name).unwrap_or_else(|| unreachable!())
        };
        entry.control.stop();
        entry.control.disconnect_client();
        // Nobody can connect any more: the name and the socket are free.
        remove_own_socket(&entry.spec.socket, entry.socket_id);
        crate::events::publish(name, &crate::events::Event::DeviceRemoved);
        let Some(t) = entry.thread.take() else {
            return Ok(true);
        };
        if wait_finished(&t, REMOVE_WAIT) {
            let _ = t.join();
            info!("{name}: removed");
            return Ok(true);
        }
        warn!(
            "{name}: removed, but its disk still holds a request: the device stops in the \
             background once the disk answers (its image stays locked until then)"
        );
        let label = name.to_string();
        let reaper = std::thread::Builder::new()
            .name(format!("remove-{name}"))
            .spawn(move || {
                let _ = t.join();
                info!("{label}: stopped, after its disk let go of its last request");
            });
        if let Err(e) = reaper {
            warn!("{name}: cannot watch the device stop: {e}");
        }
        Ok(false)
    }

    /// Every device, with its options, size, client and state.
    pub fn list(&self) -> Value {
        let devs = self.devices.lock();
        Value::Array(devs.iter().map(|(n, e)| describe(n, e)).collect())
    }

    /// Resizes a device's disk (see `BlkShared::resize`).
    pub fn resize(&self, name: &str, size: Option<u64>, shrink: bool) -> Result<Value> {
        let (shared, in_memory) = {
            let devs = self.devices.lock();
            let Some(e) = devs.get(name) else {
                bail!("no device named '{name}'");
            };
            let ram = matches!(e.spec.disk, crate::backend::DiskSpec::Ram(_));
            (e.shared.clone(), ram)
        };
        let _memory = match (in_memory, size) {
            (true, Some(s)) => {
                let held = self.memory.lock();
                self.check_memory_disks(Some(name), s)?;
                Some(held)
            }
            _ => None,
        };
        let new = shared
            .resize(size, shrink)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        if let Some(e) = self.devices.lock().get_mut(name) {
            config::resized(&mut e.spec, new);
        }
        Ok(json!({ "name": name, "size": new }))
    }

    /// Changes some limits of device `name` (by key: `iops`, `bps`,
    /// `read-bps`, `write-bps`; the others stay), from now on: its queues
    /// see them at their next request.
    pub fn set_qos(&self, name: &str, changes: &[(&str, u64)]) -> Result<Value> {
        // One change at a time, from the limits in force (two callers
        // changing different keys both get theirs).
        let limits = {
            let mut devs = self.devices.lock();
            let Some(e) = devs.get_mut(name) else {
                bail!("no device named '{name}'");
            };
            let mut l = e.spec.qos;
            for (k, v) in changes {
                if !l.set_named(k, *v) {
                    bail!("no limit called '{k}'");
                }
            }
            e.shared.qos.set(l);
            e.spec.qos = l;
            l
        };
        info!("{name}: limits now {}", describe_qos(limits));
        Ok(json!({ "name": name, "qos": qos_json(limits) }))
    }

    /// Writes the devices that are not the command line's to the
    /// `--config` file.
    pub fn config_save(&self) -> Result<Value> {
        let Some(c) = &self.config else {
            bail!("the target was started without --config FILE: there is nowhere to save");
        };
        let _one = self.saving.lock();
        let specs: Vec<DeviceSpec> = {
            let devs = self.devices.lock();
            // Shutdown sets the flag, then takes the devices out of the
            // table (under this lock): what is left there then is not the
            // set to keep.
            if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                bail!("the target is shutting down; the file keeps the devices it has");
            }
            devs.values()
                .filter(|e| e.saved)
                .map(|e| e.spec.clone())
                .collect()
        };
        config::save(&c.path, &specs.iter().collect::<Vec<_>>())?;
        info!("saved {} device(s) to {}", specs.len(), c.path.display());
        Ok(json!({ "path": c.path, "devices": specs.len() }))
    }

    /// A device was added, removed or changed: with `--config` (and
    /// autosave on), the file follows. The error when it could not.
    pub fn autosave(&self) -> Option<String> {
        if !self.config.as_ref().is_some_and(|c| c.autosave) {
            return None;
        }
        let e = self.config_save().err()?;
        warn!("saving the configuration: {e:#}");
        Some(format!("{e:#}"))
    }

    /// The name a new device gets (its own, or the first free `diskN`):
    /// refused when it or the device's socket is taken, or the target is
    /// full.
    fn name_new_device(&self, spec: &DeviceSpec) -> Result<String> {
        let devs = self.devices.lock();
        if devs.len() >= MAX_DEVICES {
            bail!("this target serves {MAX_DEVICES} devices already");
        }
        let name = spec.name.clone().unwrap_or_else(|| {
            (0..)
                .map(|i| format!("disk{i}"))
                .find(|n| !devs.contains_key(n))
                .unwrap_or_default()
        });
        if devs.contains_key(&name) {
            bail!("a device named '{name}' exists already");
        }
        if let Some((n, _)) = devs.iter().find(|(_, e)| e.spec.socket == spec.socket) {
            bail!(
                "socket {} is used by device '{n}' already",
                spec.socket.display()
            );
        }
        Ok(name)
    }

    /// Refuses a memory disk of `size` bytes (a new one, or `name` at a new
    /// size) when the memory disks of the target would then take more than
    /// the machine's memory.
    fn check_memory_disks(&self, name: Option<&str>, size: u64) -> Result<()> {
        let others: u64 = self
            .devices
            .lock()
            .iter()
            .filter(|(n, e)| {
                Some(n.as_str()) != name && matches!(e.spec.disk, crate::backend::DiskSpec::Ram(_))
            })
            .map(|(_, e)| e.shared.capacity_bytes())
            .sum();
        let mem = crate::util::memory_bytes();
        if others.saturating_add(size) > mem {
            bail!(
                "the memory disks of this target would take {} bytes, more than this \
                 machine's memory ({mem} bytes)",
                others.saturating_add(size)
            );
        }
        Ok(())
    }

    /// Statistics of one device, or of all, and of the reactors.
    pub fn stats(&self, name: Option<&str>) -> Result<Value> {
        let devs = self.devices.lock();
        if let Some(n) = name {
            if !devs.contains_key(n) {
                bail!("no device named '{n}'");
            }
        }
        let devices: Vec<Value> = devs
            .iter()
            .filter(|(n, _)| name.is_none_or(|w| w == n.as_str()))
            .map(|(n, e)| device_stats(n, &e.shared))
            .collect();
        let reactors: Vec<Value> = self
            .engine
            .reactor_stats()
            .iter()
            .zip(self.engine.reactor_loads())
            .enumerate()
            .map(|(i, (r, load))| {
                json!({ "reactor": i, "queues": load, "busy_fraction": r.busy_fraction() })
            })
            .collect();
        Ok(
            json!({ "devices": devices, "reactors": reactors, "io_threads": self.engine.io_threads() }),
        )
    }

    /// Every device's socket path.
    /// Every device's socket path, with the identity of the socket we bound
    /// there (for `remove_own_socket`).
    pub fn sockets(&self) -> Vec<(std::path::PathBuf, Option<(u64, u64)>)> {
        self.devices
            .lock()
            .values()
            .map(|e| (e.spec.socket.clone(), e.socket_id))
            .collect()
    }

    /// For the metrics endpoint: every device's name, shared state, and
    /// whether a client is attached.
    pub fn snapshot(&self) -> Vec<(String, Arc<BlkShared>, bool)> {
        self.devices
            .lock()
            .iter()
            .map(|(n, e)| (n.clone(), e.shared.clone(), e.control.client().is_some()))
            .collect()
    }

    /// Graceful end: clients are disconnected after their requests drain,
    /// disks are flushed, sockets removed.
    pub fn shutdown(&self) {
        // No add or remove from here on (they wait for this lock, then see
        // the flag). An add stuck on a disk or socket that does not answer
        // does not hold the shutdown: past ADMIN_WAIT it goes on without
        // the lock (that add then finds the target closing).
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _admin = self.admin.try_lock_for(ADMIN_WAIT);
        let entries: Vec<(String, Entry)> = std::mem::take(&mut *self.devices.lock())
            .into_iter()
            .collect();
        // Every device drains at once; one whose client does not let go
        // in time (a stuck or stopped QEMU) is disconnected outright.
        for (_, e) in &entries {
            e.control.stop();
            e.control.drain_and_disconnect();
        }
        let deadline = std::time::Instant::now() + SHUTDOWN_DRAIN;
        for (n, e) in &entries {
            while !e.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                if std::time::Instant::now() > deadline {
                    warn!("{n}: the client did not let go in {SHUTDOWN_DRAIN:?}; disconnecting it");
                    e.control.disconnect_client();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        for (n, mut e) in entries {
            // A device whose disk holds a request forever cannot stop; it
            // is left behind (it ends with the process) so that the others
            // are still flushed and their sockets removed.
            let mut stuck = false;
            if let Some(t) = e.thread.take() {
                if wait_finished(&t, SHUTDOWN_LET_GO) {
                    let _ = t.join();
                } else {
                    warn!("{n}: its disk still holds a request; not waiting for it");
                    stuck = true;
                }
            }
            // A flush can hang on a disk that stopped answering: bounded.
            let shared = e.shared.clone();
            let label = n.clone();
            let flushed = !stuck
                && bounded("flush", FLUSH_WAIT, move || {
                    if let Err(err) = shared.flush() {
                        warn!("{label}: flush at shutdown failed: {err}");
                    }
                });
            if !flushed {
                warn!("{n}: not flushed at shutdown (its disk does not answer)");
            }
            remove_own_socket(&e.spec.socket, e.socket_id);
            let counts = totals(&e.shared);
            info!(
                "{n}: stopped after {} request(s), {} byte(s) read, {} written, {} error(s)",
                counts.0, counts.1, counts.2, counts.3
            );
        }
    }
}

/// Requests, bytes read, bytes written, errors of a device.
pub fn totals(s: &BlkShared) -> (u64, u64, u64, u64) {
    let mut t = (0, 0, 0, 0);
    for q in &s.stats {
        t.0 += q.requests.iter().map(QueueStats::get).sum::<u64>();
        t.1 += QueueStats::get(&q.bytes_read);
        t.2 += QueueStats::get(&q.bytes_written);
        t.3 += q.errors.iter().map(QueueStats::get).sum::<u64>();
    }
    t
}

fn describe(name: &str, e: &Entry) -> Value {
    let s = &e.spec;
    let client = e.control.client().map(|c| match c {
        Some(c) => json!({ "pid": c.pid, "uid": c.uid, "gid": c.gid }),
        None => json!({}),
    });
    let queues: Vec<Value> = e
        .shared
        .stats
        .iter()
        .enumerate()
        .map(|(i, q)| {
            json!({
                "index": i,
                "state": if e.shared.running() { "running" } else { "stopped" },
                "in_flight": QueueStats::get(&q.in_flight),
            })
        })
        .collect();
    json!({
        "name": name,
        "socket": s.socket,
        "disk": s.disk.to_string(),
        "size": e.shared.capacity_bytes(),
        "readonly": s.readonly,
        "queues": s.queues,
        "queue_size": s.queue_size,
        "serial": s.serial,
        "logical_block_size": s.logical_block_size,
        "direct": s.direct,
        "discard": s.discard,
        "write_zeroes": s.write_zeroes,
        "packed": s.packed,
        "qos": qos_json(s.qos),
        "client": client,
        "features": feature_names(e.shared.features()),
        "queue_state": queues,
    })
}

/// The limits as `device_list` shows them (0: none).
fn qos_json(l: QosLimits) -> Value {
    Value::Object(
        l.named()
            .iter()
            .map(|(k, v)| (k.replace('-', "_"), json!(v)))
            .collect(),
    )
}

fn describe_qos(l: QosLimits) -> String {
    if !l.limited() {
        return "none".into();
    }
    l.named()
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn device_stats(name: &str, s: &BlkShared) -> Value {
    let queue = |q: &QueueStats| {
        let requests: serde_json::Map<String, Value> = REQUEST_KINDS
            .iter()
            .zip(&q.requests)
            .map(|(k, c)| ((*k).to_string(), json!(QueueStats::get(c))))
            .collect();
        let errors: serde_json::Map<String, Value> = ERROR_KINDS
            .iter()
            .zip(&q.errors)
            .map(|(k, c)| ((*k).to_string(), json!(QueueStats::get(c))))
            .collect();
        let by_kind = |c: &[std::sync::atomic::AtomicU64]| -> serde_json::Map<String, Value> {
            REQUEST_KINDS
                .iter()
                .zip(c)
                .map(|(k, c)| ((*k).to_string(), json!(QueueStats::get(c))))
                .collect()
        };
        let mut counts = vec![0; Histogram::counts_len()];
        q.all_latency(&mut counts);
        let us = |p| Histogram::quantile_of(&counts, p).map(|d| d.as_secs_f64() * 1e6);
        json!({
            "requests": requests,
            "errors": errors,
            "failed": by_kind(&q.failed),
            "time_ns": by_kind(&q.time_ns),
            "bytes_read": QueueStats::get(&q.bytes_read),
            "bytes_written": QueueStats::get(&q.bytes_written),
            "in_flight": QueueStats::get(&q.in_flight),
            "latency_us": { "p50": us(0.5), "p99": us(0.99), "p99.9": us(0.999) },
        })
    };
    let (requests, read, written, errors) = totals(s);
    json!({
        "name": name,
        "requests": requests,
        "bytes_read": read,
        "bytes_written": written,
        "errors": errors,
        "queues": s.stats.iter().map(|q| queue(q)).collect::<Vec<_>>(),
    })
}
