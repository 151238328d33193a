//! NBD exports as disks: a client of our own (see `proto` for the
//! handshake, `conn` for the transmission phase). Reads, writes, flush,
//! trim, write-zeroes and FUA become NBD commands, as far as the export
//! says it takes them; what it cannot do is not offered to the guest.
//! Requests go on the connection's thread straight from and into the
//! guest's buffers and come back through their tags, as librbd's do.
//!
//! A server that goes away is connected to again, and what was in flight
//! sent again, for up to the reconnect delay (see `conn`). With an export
//! that says several connections see the same data (multi-conn), there
//! is one connection per reactor.

mod conn;
mod dial;
mod proto;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::io::{AioSink, AioTag, Backend, GuestIov};
use super::request::{IoKind, IoRequest};
use super::OpenError;
use proto::Export;

/// How long requests wait for a server that went away, unless the device
/// says otherwise (`reconnect-delay`).
pub const DEFAULT_RECONNECT_DELAY: Duration = Duration::from_secs(10);
/// NBD's port.
const DEFAULT_PORT: u16 = 10809;
/// Most connections to one multi-conn export.
const MAX_CONNECTIONS: usize = 8;

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// An NBD URI: `nbd://HOST[:PORT]/EXPORT` or
/// `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdSpec {
    pub addr: NbdAddr,
    pub export: String,
}

const FORMS: &str = "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("'{s}': a % not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let out = String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8"))?;
    if out.contains('\0') {
        return Err(format!("'{s}' holds a NUL byte"));
    }
    Ok(out)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

impl std::str::FromStr for NbdSpec {
    type Err = String;

    /// Parses a whole NBD URI.
    fn from_str(uri: &str) -> Result<NbdSpec, String> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| format!("{uri}: not an NBD URI ({FORMS})"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path)?;
        let mut socket = None;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|s| !s.is_empty())
        {
            match kv.split_once('=') {
                Some(("socket", v)) if !v.is_empty() => socket = Some(percent_decode(v)?),
                _ => {
                    return Err(format!(
                        "{uri}: '{kv}' is not a query this client takes (socket=PATH with \
                         nbd+unix)"
                    ))
                }
            }
        }
        let addr = match scheme {
            "nbd" => {
                if socket.is_some() {
                    return Err(format!("{uri}: socket= goes with nbd+unix://"));
                }
                parse_host(uri, authority)?
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(format!("{uri}: nbd+unix:// takes no host ({FORMS})"));
                }
                let p = socket.ok_or_else(|| format!("{uri}: give ?socket=PATH ({FORMS})"))?;
                NbdAddr::Unix(PathBuf::from(p))
            }
            "nbds" | "nbds+unix" => {
                return Err(format!(
                    "{uri}: NBD over TLS is not supported by this client ({FORMS})"
                ))
            }
            _ => return Err(format!("{uri}: not an NBD URI ({FORMS})")),
        };
        Ok(NbdSpec { addr, export })
    }
}

fn parse_host(uri: &str, authority: &str) -> Result<NbdAddr, String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{uri}: an unclosed [ in the host"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{uri}: give the server's host ({FORMS})"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{uri}: '{p}' is not a port"))?,
        None => DEFAULT_PORT,
    };
    Ok(NbdAddr::Tcp {
        host: host.to_string(),
        port,
    })
}

impl std::fmt::Display for NbdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let export = percent_encode(&self.export);
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddr::Unix(p) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                percent_encode(&p.to_string_lossy())
            ),
        }
    }
}

/// The pool's way to wait for one request.
#[derive(Default)]
struct Waiter {
    res: Mutex<Option<i64>>,
    cv: Condvar,
}

impl AioSink for Waiter {
    fn done(&self, _tag: u64, res: i64) {
        *self.res.lock() = Some(res);
        self.cv.notify_all();
    }
}

pub struct NbdBackend {
    conns: Vec<Arc<conn::Shared>>,
    export: Export,
    /// Round robin for the pool's requests.
    next: AtomicUsize,
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        for c in &self.conns {
            c.stop();
        }
    }
}

/// How many connections the disk gets: one, or with multi-conn one per
/// reactor.
fn connections(e: &Export) -> usize {
    if !e.has(proto::TF_CAN_MULTI_CONN) {
        return 1;
    }
    crate::util::reactor_count().clamp(1, MAX_CONNECTIONS)
}

/// Connects to the export `spec` names: its size and its backend.
pub fn open(
    spec: &NbdSpec,
    readonly: bool,
    delay: Duration,
) -> Result<(u64, Arc<dyn Backend>), OpenError> {
    let dialer = Arc::new(dial::Dialer::new(spec));
    let dial: Arc<dyn conn::Dial> = dialer;
    let deadline = || Instant::now() + proto::HANDSHAKE_TIMEOUT;
    let (sock, export) = dial.dial(deadline()).map_err(OpenError::Nbd)?;
    if export.has(proto::TF_READ_ONLY) && !readonly {
        return Err(OpenError::Nbd(
            "the export is read-only; add readonly=on (--readonly) to serve it".into(),
        ));
    }
    if !export.size.is_multiple_of(512) {
        return Err(OpenError::Nbd(format!(
            "the export's size, {} bytes, is not a multiple of 512",
            export.size
        )));
    }
    let limits = conn::Limits {
        delay,
        silence: conn::SILENCE_LIMIT,
    };
    let started = |e: io::Error| OpenError::Nbd(format!("starting its connection: {e}"));
    // Made before the connections, so that its Drop ends those already
    // started if a later one fails.
    let mut backend = NbdBackend {
        conns: Vec::new(),
        export,
        next: AtomicUsize::new(0),
    };
    backend
        .conns
        .push(conn::Conn::start(dial.clone(), sock, export, limits).map_err(started)?);
    for _ in 1..connections(&export) {
        let (sock, e) = dial.dial(deadline()).map_err(OpenError::Nbd)?;
        backend
            .conns
            .push(conn::Conn::start(dial.clone(), sock, e, limits).map_err(started)?);
    }
    log::info!(
        "{spec}: {} bytes, {}{}{}{}{}, block sizes {}/{}/{}, {} connection(s)",
        export.size,
        if export.has(proto::TF_READ_ONLY) {
            "read-only"
        } else {
            "read-write"
        },
        if export.has(proto::TF_SEND_FLUSH) {
            ", flush"
        } else {
            ", no flush"
        },
        if export.has(proto::TF_SEND_FUA) {
            ", FUA"
        } else {
            ""
        },
        if export.has(proto::TF_SEND_TRIM) {
            ", trim"
        } else {
            ""
        },
        if export.has(proto::TF_SEND_WRITE_ZEROES) {
            ", write-zeroes"
        } else {
            ""
        },
        export.min_block,
        export.preferred_block,
        export.max_payload,
        backend.conns.len()
    );
    Ok((export.size, Arc::new(backend)))
}

/// An operation as the connection takes it.
struct Op {
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u64,
}

impl NbdBackend {
    fn has(&self, flag: u16) -> bool {
        self.export.has(flag)
    }

    /// The command for a request, if it goes as one NBD command (None:
    /// the pool runs it piece by piece).
    fn op_for(&self, io: &IoRequest) -> Option<Op> {
        let max = u64::from(self.export.max_payload);
        let (cmd, flags, offset, len) = match io.kind {
            IoKind::Read => (proto::CMD_READ, 0, io.offset, io.len() as u64),
            IoKind::Write if io.sync && !self.has(proto::TF_SEND_FUA) => {
                if self.has(proto::TF_SEND_FLUSH) {
                    return None;
                }
                (proto::CMD_WRITE, 0, io.offset, io.len() as u64)
            }
            IoKind::Write => {
                let fua = if io.sync { proto::CMD_FLAG_FUA } else { 0 };
                (proto::CMD_WRITE, fua, io.offset, io.len() as u64)
            }
            IoKind::Flush if self.has(proto::TF_SEND_FLUSH) => (proto::CMD_FLUSH, 0, 0, 0),
            IoKind::Discard if io.ranges.len() == 1 && self.has(proto::TF_SEND_TRIM) => {
                (proto::CMD_TRIM, 0, io.ranges[0].0, io.ranges[0].1)
            }
            IoKind::WriteZeroes if io.ranges.len() == 1 => {
                let (off, len) = io.ranges[0];
                (
                    proto::CMD_WRITE_ZEROES,
                    self.zero_flags(io.unmap)?,
                    off,
                    len,
                )
            }
            _ => return None,
        };
        let payload = matches!(cmd, proto::CMD_READ | proto::CMD_WRITE);
        if (payload && (len == 0 || len > max)) || len > u64::from(u32::MAX) {
            return None;
        }
        Some(Op {
            cmd,
            flags,
            offset,
            len,
        })
    }

    /// Flags of a write-zeroes, if the export takes them.
    fn zero_flags(&self, unmap: bool) -> Option<u16> {
        if !self.has(proto::TF_SEND_WRITE_ZEROES) {
            return None;
        }
        Some(if unmap { 0 } else { proto::CMD_FLAG_NO_HOLE })
    }

    fn conn_for(&self, key: usize) -> &conn::Shared {
        &self.conns[key % self.conns.len()]
    }

    /// Runs one command and waits for it (the pool's path).
    fn run(&self, op: Op, iov: &[GuestIov]) -> io::Result<()> {
        let len = u32::try_from(op.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let waiter = Arc::new(Waiter::default());
        let tag = Arc::new(AioTag {
            sink: waiter.clone(),
            tag: 0,
        });
        let c = self.conn_for(self.next.fetch_add(1, Ordering::Relaxed));
        let sub = conn::Sub {
            cmd: op.cmd,
            flags: op.flags,
            offset: op.offset,
            len,
            iov: Vec::new(),
            tag,
        };
        c.submit(sub, iov, false);
        let mut res = waiter.res.lock();
        while res.is_none() {
            waiter.cv.wait(&mut res);
        }
        match res.unwrap_or(-i64::from(libc::EIO)) {
            r if r < 0 => Err(io::Error::from_raw_os_error(
                i32::try_from(-r).unwrap_or(libc::EIO),
            )),
            _ => Ok(()),
        }
    }

    /// A read or write, cut to the export's largest payload.
    fn transfer(&self, cmd: u16, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        let total: usize = iov.iter().map(GuestIov::len).sum();
        // Pieces keep to the export's minimum block (and whole sectors).
        let unit = self.export.min_block.max(512) as usize;
        let max = (self.export.max_payload as usize / unit * unit).max(unit);
        let mut piece = Vec::new();
        let mut done = 0;
        while done < total {
            let n = (total - done).min(max);
            piece.clear();
            crate::memory::sub_iovecs(iov, done, n, &mut piece);
            let op = Op {
                cmd,
                flags: 0,
                offset: offset + done as u64,
                len: n as u64,
            };
            self.run(op, &piece)?;
            done += n;
        }
        Ok(())
    }
}

impl Backend for NbdBackend {
    fn read_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        self.transfer(proto::CMD_READ, iov, offset)
    }
    fn write_at(&self, iov: &[GuestIov], offset: u64) -> io::Result<()> {
        self.transfer(proto::CMD_WRITE, iov, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if !self.has(proto::TF_SEND_FLUSH) {
            // The export says it has nothing to flush: its writes are
            // durable when they complete.
            return Ok(());
        }
        let op = Op {
            cmd: proto::CMD_FLUSH,
            flags: 0,
            offset: 0,
            len: 0,
        };
        self.run(op, &[])
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.has(proto::TF_SEND_TRIM) {
            return Ok(());
        }
        let op = Op {
            cmd: proto::CMD_TRIM,
            flags: 0,
            offset,
            len,
        };
        self.run(op, &[])
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let flags = self
            .zero_flags(unmap)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOPNOTSUPP))?;
        let op = Op {
            cmd: proto::CMD_WRITE_ZEROES,
            flags,
            offset,
            len,
        };
        self.run(op, &[])
    }
    fn inline(&self) -> bool {
        false
    }
    fn zeroes_are_written(&self) -> bool {
        false
    }
    fn is_async(&self) -> bool {
        true
    }
    fn driven(&self) -> bool {
        true
    }
    fn drive(&self) -> bool {
        let mut moved = false;
        for c in &self.conns {
            moved |= c.drive();
        }
        moved
    }
    fn undriven(&self) {
        for c in &self.conns {
            c.undriven();
        }
    }
    fn can_discard(&self) -> bool {
        self.has(proto::TF_SEND_TRIM)
    }
    fn can_write_zeroes(&self) -> bool {
        self.has(proto::TF_SEND_WRITE_ZEROES)
    }
    fn min_block(&self) -> u32 {
        self.export.min_block
    }

    fn submit_async(&self, io: &IoRequest, tag: &Arc<AioTag>) -> Option<io::Result<()>> {
        let op = self.op_for(io)?;
        // A queue's requests keep to one connection (its tag names the
        // queue): they reach the server in the order they were taken.
        let c = self.conn_for(usize::try_from(tag.tag >> 16).unwrap_or(0));
        let iov: &[GuestIov] = if matches!(op.cmd, proto::CMD_READ | proto::CMD_WRITE) {
            &io.iov
        } else {
            &[]
        };
        let sub = conn::Sub {
            cmd: op.cmd,
            flags: op.flags,
            offset: op.offset,
            len: u32::try_from(op.len).unwrap_or(0),
            iov: Vec::new(),
            tag: tag.clone(),
        };
        c.submit(sub, iov, true);
        Some(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uri_forms_are_parsed_and_printed_back() {
        let s: NbdSpec = "nbd://127.0.0.1:10810/disk%20one".parse().unwrap();
        assert_eq!(
            s.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(s.export, "disk one");
        assert_eq!(s.to_string(), "nbd://127.0.0.1:10810/disk%20one");
        let s: NbdSpec = "nbd://[::1]/".parse().unwrap();
        assert_eq!(
            s.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(s.export, "");
        let s: NbdSpec = "nbd+unix:///x?socket=/run/n.sock".parse().unwrap();
        assert_eq!(s.addr, NbdAddr::Unix("/run/n.sock".into()));
        assert_eq!(s.export, "x");
        assert_eq!(s.to_string(), "nbd+unix:///x?socket=/run/n.sock");
        let s: NbdSpec = "nbd+unix://?socket=/s".parse().unwrap();
        assert_eq!(s.export, "");
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "nbd://",
            "nbd://:10809/x",
            "nbd://h:0/x",
            "nbd://h:port/x",
            "nbd://[::1/x",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://h/x?socket=/s",
            "nbd://h/x?tls=on",
            "nbds://h/x",
            "nbd://h/%zz",
            "nbd://h/a%00b",
            "http://h/x",
        ] {
            assert!(bad.parse::<NbdSpec>().is_err(), "{bad} was accepted");
        }
    }
}
