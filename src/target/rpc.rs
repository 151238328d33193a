//! The management socket: JSON-RPC 2.0, one JSON object (or a batch of
//! them) per line each way,
//! over a unix socket created owner-only. One table of methods, each with
//! typed parameters that refuse unknown keys; errors name what was wrong.
//! Nothing a management client sends can stop the target: lines are capped,
//! connections are bounded, a client that goes away mid-request is fine.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use log::{debug, info};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::conns::{accept_each, Place, Places};
use super::Target;
use crate::device::{bind_socket, parse_rate, DeviceSpec};
use crate::util::parse_size;

/// The longest request line taken.
const MAX_LINE: usize = 1 << 20;
/// Management connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request must arrive whole this long after its first byte.
const LINE_DEADLINE: Duration = Duration::from_secs(10);
/// An answer its client does not take in this time closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
/// The method ran and failed (a device that does not exist, a socket in
/// use, ...).
const FAILED: i64 = -32000;

struct RpcError {
    code: i64,
    message: String,
}

fn err(code: i64, message: impl Into<String>) -> RpcError {
    RpcError {
        code,
        message: message.into(),
    }
}

/// A size: a number of bytes, or a string with a suffix ("128M").
#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self) -> Result<u64, RpcError> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => parse_size(t).map_err(|e| err(INVALID_PARAMS, format!("size: {e}"))),
        }
    }
}

/// A boolean: true/false, or "on"/"off", "yes"/"no", 1/0 as on the
/// command line (as JSON values or as text).
#[derive(Deserialize)]
#[serde(untagged)]
enum Flag {
    Bool(bool),
    Number(serde_json::Number),
    Text(String),
}

impl Flag {
    fn get(&self, key: &str) -> Result<bool, RpcError> {
        let text = match self {
            Flag::Bool(b) => return Ok(*b),
            Flag::Number(n) => n.to_string(),
            Flag::Text(t) => t.clone(),
        };
        match text.as_str() {
            "on" | "true" | "yes" | "1" => Ok(true),
            "off" | "false" | "no" | "0" => Ok(false),
            _ => Err(err(
                INVALID_PARAMS,
                format!("{key}: '{text}' is not on/off"),
            )),
        }
    }
}

/// A value the parameter's own parser reads as text (a name, a serial, a
/// path, a count): JSON text, or a JSON number taken as the digits it
/// shows. The type is the parameter's, never guessed from how the value
/// looks: `serial=12345` is a serial, `name=1` a name.
#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    Number(serde_json::Number),
    Text(String),
}

impl Text {
    /// The text; a number only as the digits of a whole number (1e+20 is
    /// no serial).
    fn get(self, key: &str) -> Result<String, RpcError> {
        match self {
            Text::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            Text::Number(n) => Err(err(
                INVALID_PARAMS,
                format!("{key}: {n} is not a whole number; give it as text"),
            )),
            Text::Text(t) => Ok(t),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AddParams {
    name: Option<Text>,
    socket: Text,
    disk: Text,
    size: Option<Size>,
    readonly: Option<Flag>,
    queues: Option<Text>,
    #[serde(alias = "queue_size")]
    queue_size: Option<Text>,
    serial: Option<Text>,
    #[serde(alias = "logical_block_size")]
    logical_block_size: Option<Text>,
    direct: Option<Flag>,
    discard: Option<Flag>,
    #[serde(alias = "write_zeroes")]
    write_zeroes: Option<Flag>,
    packed: Option<Flag>,
    #[serde(alias = "force_share")]
    force_share: Option<Flag>,
    format: Option<Text>,
    #[serde(alias = "reconnect_delay")]
    reconnect_delay: Option<Text>,
    #[serde(alias = "socket_mode")]
    socket_mode: Option<Text>,
    #[serde(alias = "socket_owner")]
    socket_owner: Option<Text>,
    #[serde(alias = "socket_group")]
    socket_group: Option<Text>,
    iops: Option<Text>,
    bps: Option<Size>,
    #[serde(alias = "read_bps")]
    read_bps: Option<Size>,
    #[serde(alias = "write_bps")]
    write_bps: Option<Size>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct QosParams {
    name: Text,
    iops: Option<Text>,
    bps: Option<Size>,
    #[serde(alias = "read_bps")]
    read_bps: Option<Size>,
    #[serde(alias = "write_bps")]
    write_bps: Option<Size>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveParams {
    name: Text,
    force: Option<Flag>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeParams {
    name: Text,
    size: Option<Size>,
    shrink: Option<Flag>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsParams {
    name: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    name: Option<Text>,
}

/// Every method, as `rpc_get_methods` lists them.
const METHODS: [&str; 11] = [
    "device_add",
    "device_remove",
    "device_list",
    "device_resize",
    "device_stats",
    "device_set_qos",
    "config_save",
    "events_subscribe",
    "rpc_get_methods",
    "target_version",
    "target_upgrade",
];

/// Most requests in one batch.
const MAX_BATCH: usize = 64;
/// Most connections subscribed to events at once (each keeps its place:
/// the others stay for requests).
const MAX_SUBSCRIBED: usize = MAX_CONNECTIONS / 2;
static SUBSCRIBED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What a request may ask of its connection.
#[derive(Default)]
struct ConnCx {
    /// The connection holds one of the MAX_SUBSCRIBED places: events go
    /// out on it.
    subscribed: bool,
    /// Events from the moment of `events_subscribe` (in a batch, those of
    /// the requests after it too), sent once its answer is out.
    sub: Option<crate::events::Subscription>,
    /// The connection's socket (an upgrade answers on it from the new
    /// binary), the id of the request being answered, and whether it is
    /// part of a batch.
    conn: Option<std::os::fd::RawFd>,
    id: Option<Value>,
    in_batch: bool,
    /// The connection's place in the upgrade's hold.
    hold: u64,
    /// Bytes of later requests were read already (they would end with
    /// this process image if an upgrade answered from the next one).
    more_input: bool,
    /// Where answers and events go out (held while the process image is
    /// replaced: no event is half written before the next binary's
    /// answer).
    out: Option<Arc<parking_lot::Mutex<UnixStream>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeParams {
    binary: Option<Text>,
}

/// `target_upgrade`: returns only when the upgrade did not happen (the
/// new binary answers otherwise, on the same connection).
fn upgrade(t: &Target, cx: &ConnCx, p: UpgradeParams) -> Result<Value, RpcError> {
    if cx.in_batch {
        return Err(err(
            INVALID_REQUEST,
            "target_upgrade cannot be part of a batch (the new binary answers it alone)",
        ));
    }
    if cx.more_input {
        return Err(err(
            INVALID_REQUEST,
            "target_upgrade must be the last request sent before its answer (later \
             requests on this connection were read already and would be lost)",
        ));
    }
    let binary = p.binary.map(|b| b.get("binary")).transpose()?;
    let reply = match (cx.conn, &cx.id) {
        (Some(fd), Some(id)) => Some(super::upgrade::Reply {
            // SAFETY: the connection's socket, open while it is served.
            stream: unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            id: id.clone(),
            hold: cx.hold,
            subscribed: cx.subscribed,
        }),
        _ => None,
    };
    let _quiet = cx.out.as_ref().map(|o| o.lock());
    t.upgrade(binary.map(std::path::PathBuf::from), reply)
        .map_err(|e| err(FAILED, format!("{e:#}")))
}

/// `events_subscribe`: takes a subscriber's place for the connection.
fn subscribe(cx: &mut ConnCx) -> Result<Value, RpcError> {
    subscribe_with(cx, None)
}

/// [`subscribe`], with the place and the subscription taken already when
/// `early` (a connection subscribed before a live upgrade).
fn subscribe_with(cx: &mut ConnCx, early: Option<EarlySub>) -> Result<Value, RpcError> {
    if !cx.subscribed {
        let sub = early
            .or_else(|| EarlySub::take(true))
            .and_then(EarlySub::into_sub);
        let Some(sub) = sub else {
            return Err(err(
                FAILED,
                format!("{MAX_SUBSCRIBED} connections are subscribed already"),
            ));
        };
        cx.subscribed = true;
        cx.sub = Some(sub);
    }
    Ok(json!({ "subscribed": true }))
}

/// A subscriber's place and its events. Taken early in the binary a live
/// upgrade started, for a connection subscribed in the one before, before
/// that binary starts the devices again and answers the upgrade: no event
/// from then on is lost to it, and no newcomer takes its place meanwhile.
/// Dropped unused, it gives the place back.
pub struct EarlySub(Option<crate::events::Subscription>);

impl EarlySub {
    /// None when `subscribed` is false or every place is taken.
    pub fn take(subscribed: bool) -> Option<EarlySub> {
        use std::sync::atomic::Ordering;
        if !subscribed {
            return None;
        }
        if SUBSCRIBED.fetch_add(1, Ordering::SeqCst) >= MAX_SUBSCRIBED {
            SUBSCRIBED.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(EarlySub(Some(crate::events::subscribe())))
    }

    /// The subscription; its place is the connection's from now on.
    fn into_sub(mut self) -> Option<crate::events::Subscription> {
        self.0.take()
    }
}

impl Drop for EarlySub {
    fn drop(&mut self) {
        if self.0.is_some() {
            SUBSCRIBED.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn params<T: DeserializeOwned>(p: Value) -> Result<T, RpcError> {
    let p = if p.is_null() { json!({}) } else { p };
    if !p.is_object() {
        return Err(err(INVALID_PARAMS, "params must be an object"));
    }
    serde_json::from_value(p).map_err(|e| err(INVALID_PARAMS, e.to_string()))
}

/// The QoS parameters given, as `--device` keys and text values.
fn qos_keys(
    iops: Option<Text>,
    bps: Option<Size>,
    read: Option<Size>,
    write: Option<Size>,
) -> Result<Vec<(&'static str, String)>, RpcError> {
    let mut v = Vec::new();
    if let Some(i) = iops {
        v.push(("iops", i.get("iops")?));
    }
    for (k, b) in [("bps", bps), ("read-bps", read), ("write-bps", write)] {
        if let Some(b) = b {
            v.push((k, b.bytes()?.to_string()));
        }
    }
    Ok(v)
}

fn add_spec(p: AddParams) -> Result<DeviceSpec, RpcError> {
    let bad = |e: String| err(INVALID_PARAMS, e);
    // The same parser as --device, so that both take the same values.
    let mut s = format!(
        "socket={},disk={}",
        p.socket.get("socket")?.replace(',', ",,"),
        p.disk.get("disk")?.replace(',', ",,")
    );
    let mut put = |k: &str, v: String| {
        s.push(',');
        s.push_str(k);
        s.push('=');
        s.push_str(&v.replace(',', ",,"));
    };
    if let Some(n) = p.name {
        put("name", n.get("name")?);
    }
    if let Some(v) = p.size {
        put("size", v.bytes()?.to_string());
    }
    if let Some(v) = p.queues {
        put("queues", v.get("queues")?);
    }
    if let Some(v) = p.queue_size {
        put("queue-size", v.get("queue-size")?);
    }
    if let Some(v) = p.serial {
        put("serial", v.get("serial")?);
    }
    if let Some(v) = p.logical_block_size {
        put("logical-block-size", v.get("logical-block-size")?);
    }
    if let Some(v) = p.format {
        put("format", v.get("format")?);
    }
    if let Some(v) = p.reconnect_delay {
        put("reconnect-delay", v.get("reconnect-delay")?);
    }
    for (k, v) in qos_keys(p.iops, p.bps, p.read_bps, p.write_bps)? {
        put(k, v);
    }
    for (k, v) in [
        ("socket-mode", p.socket_mode),
        ("socket-owner", p.socket_owner),
        ("socket-group", p.socket_group),
    ] {
        if let Some(v) = v {
            put(k, v.get(k)?);
        }
    }
    for (k, f) in [
        ("readonly", p.readonly),
        ("direct", p.direct),
        ("discard", p.discard),
        ("write-zeroes", p.write_zeroes),
        ("packed", p.packed),
        ("force-share", p.force_share),
    ] {
        if let Some(f) = f {
            put(k, if f.get(k)? { "on" } else { "off" }.into());
        }
    }
    s.parse::<DeviceSpec>().map_err(bad)
}

/// A device described as `device_add`'s parameters (a `--config` file's
/// entry), read as `device_add` reads them.
pub fn spec_from_json(v: Value) -> Result<DeviceSpec, String> {
    params(v).and_then(add_spec).map_err(|e| e.message)
}

/// `device_set_qos`: the device and the limits given (the others stay).
type QosChanges = (String, Vec<(&'static str, u64)>);

fn qos_changes(p: QosParams) -> Result<QosChanges, RpcError> {
    let name = p.name.get("name")?;
    let mut changes = Vec::new();
    for (k, v) in qos_keys(p.iops, p.bps, p.read_bps, p.write_bps)? {
        changes.push((k, parse_rate(k, &v).map_err(|e| err(INVALID_PARAMS, e))?));
    }
    if changes.is_empty() {
        return Err(err(
            INVALID_PARAMS,
            "give at least one of iops, bps, read-bps, write-bps",
        ));
    }
    Ok((name, changes))
}

/// A change went through: with `--config`, the file follows, and the
/// answer says when it could not.
fn saved(t: &Target, mut v: Value) -> Value {
    if let (Some(e), Some(o)) = (t.autosave(), v.as_object_mut()) {
        o.insert("config_saved".into(), json!(false));
        o.insert("config_error".into(), json!(e));
    }
    v
}

/// The methods about the target itself (they take no parameters).
fn target_call(t: &Target, cx: &mut ConnCx, method: &str) -> Result<Value, RpcError> {
    match method {
        "rpc_get_methods" => Ok(json!(METHODS)),
        "target_version" => Ok(json!({
            "name": env!("CARGO_PKG_NAME"),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
        })),
        "config_save" => t.config_save().map_err(|e| err(FAILED, format!("{e:#}"))),
        _ => subscribe(cx),
    }
}

fn call(t: &Target, cx: &mut ConnCx, method: &str, p: Value) -> Result<Value, RpcError> {
    let failed = |e: anyhow::Error| {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        err(FAILED, chain.join(": "))
    };
    match method {
        "device_add" => {
            let spec = add_spec(params(p)?)?;
            t.add(spec).map(|v| saved(t, v)).map_err(failed)
        }
        "device_remove" => {
            let p: RemoveParams = params(p)?;
            let force = p
                .force
                .map(|f| f.get("force"))
                .transpose()?
                .unwrap_or(false);
            let name = p.name.get("name")?;
            let stopped = t.remove(&name, force).map_err(failed)?;
            Ok(saved(
                t,
                json!({ "name": name, "removed": true, "stopped": stopped }),
            ))
        }
        "device_list" => {
            let p: ListParams = params(p)?;
            let all = t.list();
            let Some(name) = p.name.map(|n| n.get("name")).transpose()? else {
                return Ok(all);
            };
            let one: Vec<Value> = all
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["name"] == json!(name))
                .cloned()
                .collect();
            if one.is_empty() {
                return Err(err(FAILED, format!("no device named '{name}'")));
            }
            Ok(Value::Array(one))
        }
        "rpc_get_methods" | "target_version" | "config_save" | "events_subscribe" => {
            let _: NoParams = params(p)?;
            target_call(t, cx, method)
        }
        "device_resize" => {
            let p: ResizeParams = params(p)?;
            let size = p.size.map(|s| s.bytes()).transpose()?;
            let shrink = p
                .shrink
                .map(|f| f.get("shrink"))
                .transpose()?
                .unwrap_or(false);
            t.resize(&p.name.get("name")?, size, shrink)
                .map(|v| saved(t, v))
                .map_err(failed)
        }
        "device_set_qos" => {
            let (name, changes) = qos_changes(params(p)?)?;
            t.set_qos(&name, &changes)
                .map(|v| saved(t, v))
                .map_err(failed)
        }
        "target_upgrade" => upgrade(t, cx, params(p)?),
        "device_stats" => {
            let p: StatsParams = params(p)?;
            let name = p.name.map(|n| n.get("name")).transpose()?;
            t.stats(name.as_deref()).map_err(failed)
        }
        other => Err(err(
            METHOD_NOT_FOUND,
            format!("no method '{other}' (methods: {})", METHODS.join(", ")),
        )),
    }
}

/// Answers one request line: a request, or a batch of them (a JSON array,
/// answered with an array of the answers, in order, notifications left
/// out); None when nothing is to be answered.
fn answer(t: &Target, cx: &mut ConnCx, line: &[u8]) -> Option<Value> {
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_reply(
                Value::Null,
                PARSE_ERROR,
                format!("not JSON: {e}"),
            ))
        }
    };
    let Value::Array(batch) = v else {
        return answer_one(t, cx, v);
    };
    if batch.is_empty() {
        return Some(error_reply(Value::Null, INVALID_REQUEST, "an empty batch"));
    }
    if batch.len() > MAX_BATCH {
        return Some(error_reply(
            Value::Null,
            INVALID_REQUEST,
            format!("a batch of {} requests; at most {MAX_BATCH}", batch.len()),
        ));
    }
    cx.in_batch = true;
    let answers: Vec<Value> = batch
        .into_iter()
        .filter_map(|r| answer_one(t, cx, r))
        .collect();
    cx.in_batch = false;
    (!answers.is_empty()).then_some(Value::Array(answers))
}

fn error_reply(id: Value, code: i64, message: impl Into<String>) -> Value {
    json!({ "jsonrpc": "2.0", "id": id,
            "error": { "code": code, "message": message.into() } })
}

/// Answers one request; None for a notification (no id), which gets no
/// answer.
fn answer_one(t: &Target, cx: &mut ConnCx, v: Value) -> Option<Value> {
    let reply = |id: Value, r: Result<Value, RpcError>| {
        Some(match r {
            Ok(v) => json!({ "jsonrpc": "2.0", "id": id, "result": v }),
            Err(e) => json!({ "jsonrpc": "2.0", "id": id,
                              "error": { "code": e.code, "message": e.message } }),
        })
    };
    let Some(obj) = v.as_object() else {
        return reply(
            Value::Null,
            Err(err(INVALID_REQUEST, "a request is a JSON object")),
        );
    };
    let id = obj.get("id").cloned();
    let id_ok = id
        .as_ref()
        .is_none_or(|i| i.is_null() || i.is_string() || i.is_number());
    if obj.get("jsonrpc") != Some(&json!("2.0")) || !id_ok {
        return reply(
            id.filter(|_| id_ok).unwrap_or(Value::Null),
            Err(err(
                INVALID_REQUEST,
                "need \"jsonrpc\": \"2.0\" and a string or number id",
            )),
        );
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return reply(
            id.unwrap_or(Value::Null),
            Err(err(INVALID_REQUEST, "\"method\" must be a string")),
        );
    };
    let p = obj.get("params").cloned().unwrap_or(Value::Null);
    debug!("rpc: {method} {p}");
    cx.id.clone_from(&id);
    let r = call(t, cx, method, p);
    match id {
        Some(id) => reply(id, r),
        None => None,
    }
}

/// Reads the next request line into `line` (without its newline): false
/// when the connection is over (closed, idle for IDLE_TIMEOUT, a line that
/// took longer than LINE_DEADLINE to arrive, or one longer than MAX_LINE,
/// which is answered first).
/// (`out` is where answers go, a line at a time among the events.)
/// Between requests the wait is `reg`'s (a live upgrade stops the
/// connection there, its answers' lock held so that no event is half
/// written).
fn next_line(
    s: &mut UnixStream,
    out: &parking_lot::Mutex<UnixStream>,
    buf: &mut Vec<u8>,
    line: &mut Vec<u8>,
    reg: &super::rpc_hold::Registered,
    idle: bool,
) -> bool {
    let mut started: Option<std::time::Instant> = None;
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            line.clear();
            line.extend_from_slice(&buf[..pos]);
            buf.drain(..=pos);
            return true;
        }
        if buf.len() > MAX_LINE {
            let e = json!({ "jsonrpc": "2.0", "id": null, "error": {
                "code": INVALID_REQUEST, "message": format!("request longer than {MAX_LINE} bytes") } });
            let _ = writeln!(out.lock(), "{e}");
            crate::warn_limited!("rpc: request line over {MAX_LINE} bytes; connection closed");
            return false;
        }
        // Idle between requests for a while; once a request has begun, it
        // must arrive whole in LINE_DEADLINE, however it trickles.
        // (A subscribed connection may stay quiet: its events are why it
        // is there.)
        // (None: no limit.)
        let timeout = match (buf.is_empty(), started) {
            (true, _) if !idle => None,
            (true, _) => Some(IDLE_TIMEOUT),
            (false, Some(t)) => Some(LINE_DEADLINE.saturating_sub(t.elapsed())),
            (false, None) => Some(LINE_DEADLINE),
        };
        if buf.is_empty() {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&*s);
            if !reg.wait(fd, timeout, !idle, out) {
                return false;
            }
        }
        if timeout.is_some_and(|t| t.is_zero()) || s.set_read_timeout(timeout).is_err() {
            if !buf.is_empty() {
                crate::warn_limited!(
                    "rpc: a request took over {LINE_DEADLINE:?} to arrive; connection closed"
                );
            }
            return false;
        }
        match s.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                if buf.is_empty() {
                    started = Some(std::time::Instant::now());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                if !buf.is_empty() {
                    crate::warn_limited!(
                        "rpc: a request took over {LINE_DEADLINE:?} to arrive; connection closed"
                    );
                }
                return false;
            }
        }
    }
}

/// A management connection: its socket, and (handed over by a live
/// upgrade) whether it was subscribed to events.
pub struct RpcConn {
    pub stream: UnixStream,
    pub subscribed: bool,
    /// A subscribed connection's place and events since it was handed
    /// over (taken before the devices started again: an event right after
    /// reaches it, though its thread has not started yet).
    pub early: Option<EarlySub>,
    /// Its place in the upgrade's hold, taken by the accept thread (None:
    /// taken when it is served).
    pub hold: Option<super::rpc_hold::Registered>,
}

impl std::os::fd::AsRawFd for RpcConn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

fn serve_conn(t: &Target, conn: RpcConn, place: &Place) {
    let RpcConn {
        mut stream,
        subscribed,
        early,
        hold,
    } = conn;
    let mut buf = Vec::new();
    let mut line = Vec::new();
    let reg = hold.unwrap_or_else(super::rpc_hold::register);
    // Answers and events go out through one lock, a line at a time.
    let Ok(out) = stream.try_clone() else { return };
    let out = Arc::new(parking_lot::Mutex::new(out));
    let mut cx = ConnCx {
        conn: Some(std::os::fd::AsRawFd::as_raw_fd(&stream)),
        hold: reg.id(),
        out: Some(out.clone()),
        ..ConnCx::default()
    };
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut events: Option<std::thread::JoinHandle<()>> = None;
    if subscribed {
        // (A test's hook: this thread starts late.)
        if super::upgrade::test_hook("VFIO_USER_BLK_TEST_LATE_SUBSCRIBER").is_some() {
            std::thread::sleep(Duration::from_millis(500));
        }
        // Subscribed in the binary before a live upgrade: again here.
        if subscribe_with(&mut cx, early).is_err() {
            return;
        }
        place.busy(true);
    }
    if let Some(s) = cx.sub.take() {
        events = send_events(s, out.clone(), done.clone());
    }
    while next_line(&mut stream, &out, &mut buf, &mut line, &reg, !cx.subscribed) {
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        // Being answered: not closed to make room for another.
        place.busy(true);
        cx.more_input = !buf.iter().all(u8::is_ascii_whitespace);
        let a = answer(t, &mut cx, trimmed);
        // Events start after the answer that subscribed.
        let answered = a.is_none_or(|v| writeln!(out.lock(), "{v}").is_ok());
        if let Some(s) = cx.sub.take() {
            events = send_events(s, out.clone(), done.clone());
            if events.is_none() {
                break;
            }
        }
        // A subscribed connection keeps its place.
        place.busy(cx.subscribed);
        if !answered {
            break;
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    if cx.subscribed {
        SUBSCRIBED.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some(h) = events {
        let _ = h.join();
    }
}

/// Sends every event to a subscribed connection, as JSON-RPC notifications
/// (`event`, and `events_lost` with a count when the connection did not
/// keep up), until `done` or the connection fails (which closes it).
fn send_events(
    sub: crate::events::Subscription,
    out: Arc<parking_lot::Mutex<UnixStream>>,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rpc-events".into())
        .spawn(move || {
            let send = |v: Value| writeln!(out.lock(), "{v}").is_ok();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let lost = sub.take_lost();
                if lost > 0
                    && !send(json!({ "jsonrpc": "2.0", "method": "events_lost",
                                      "params": { "count": lost } }))
                {
                    break;
                }
                match sub.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(v) => {
                        if !send(json!({ "jsonrpc": "2.0", "method": "event", "params": v })) {
                            break;
                        }
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
            }
            // A subscriber that does not read its events is let go: its
            // reader sees the end.
            let _ = out.lock().shutdown(std::net::Shutdown::Both);
        })
        .ok()
}

/// Serves the management socket at `path` (owner-only) on its own threads.
pub fn serve(target: Arc<Target>, path: &Path, force: bool) -> Result<()> {
    let listener = bind_socket(path, force)?;
    serve_listener(target, listener, path, None, Vec::new())
}

/// Serves a bound management socket; `first` (after a live upgrade: the
/// connection that asked for it, with its answer) is answered and served
/// before any other.
pub fn serve_listener(
    target: Arc<Target>,
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    first: Option<(UnixStream, Value, bool, Option<EarlySub>)>,
    handed: Vec<RpcConn>,
) -> Result<()> {
    super::upgrade::keep_rpc(&listener, path);
    let places = Places::new(MAX_CONNECTIONS);
    info!("management socket on {}", path.display());
    let handed = handed.into_iter().map(Ok);
    let first = first.map(|(s, answer, subscribed, early)| {
        super::upgrade::answer(&s, &answer);
        Ok(RpcConn {
            stream: s,
            subscribed,
            early,
            hold: None,
        })
    });
    std::thread::Builder::new()
        .name("rpc-accept".into())
        .spawn(move || {
            let refuse = |c: RpcConn| {
                let mut s = c.stream;
                crate::warn_limited!(
                    "rpc: {MAX_CONNECTIONS} connections are all being answered; refused"
                );
                let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
                let e = json!({ "jsonrpc": "2.0", "id": null, "error": {
                    "code": FAILED, "message": format!("more than {MAX_CONNECTIONS} management connections") } });
                let _ = writeln!(s, "{e}");
            };
            // The accept thread stops between accepts for an upgrade, and
            // registers each connection before it accepts the next: an
            // upgrade hands every accepted connection over.
            let me = super::rpc_hold::register();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            let incoming = std::iter::from_fn(|| {
                me.wait_accept(fd);
                Some(listener.accept().map(|(stream, _)| RpcConn {
                    stream,
                    subscribed: false,
                    early: None,
                    hold: Some(super::rpc_hold::register()),
                }))
            });
            accept_each(
                "rpc",
                first.into_iter().chain(handed).chain(incoming),
                &places,
                "the one idle longest",
                refuse,
                move |s: RpcConn, place| {
                    // A connection that does not read its answers gives
                    // its place back.
                    let _ = s.stream.set_write_timeout(Some(WRITE_TIMEOUT));
                    serve_conn(&target, s, &place);
                },
            );
        })
        .context("starting the management socket's thread")?;
    Ok(())
}

/// `vfio-user-blk rpc`: sends one request and prints the result. Values
/// are sent as text, and the target reads each as its parameter's type
/// (a size such as 128M, a count, on/off, a serial of digits), as on a
/// command line.
pub fn client(socket: &Path, method: &str, args: &[String]) -> Result<Value> {
    let mut p = serde_json::Map::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            bail!("'{a}' is not key=value");
        };
        p.insert(k.to_string(), json!(v));
    }
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let req = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": p });
    writeln!(s, "{req}")?;
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("the answer is not JSON")?;
    if let Some(e) = v.get("error") {
        bail!(
            "{}",
            e.get("message").and_then(Value::as_str).unwrap_or("error")
        );
    }
    if method == "events_subscribe" {
        follow_events(r)?;
    }
    Ok(v.get("result").cloned().unwrap_or(Value::Null))
}

/// `rpc events_subscribe`: prints each event as one line of JSON as it
/// comes, until the target closes the connection (or the user stops it).
fn follow_events(mut r: BufReader<&UnixStream>) -> Result<()> {
    r.get_ref().set_read_timeout(None)?;
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let v: Value = serde_json::from_str(&line).context("an event is not JSON")?;
        let shown = match v["method"].as_str() {
            Some("event") => v["params"].clone(),
            _ => v,
        };
        writeln!(out, "{shown}")?;
        out.flush()?;
    }
}
