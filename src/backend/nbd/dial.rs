//! Making a connection to the server, within a deadline: the socket
//! (checked to be the server's, not another user's), then the handshake.
//! Nothing here waits past the deadline, whatever the server does (a full
//! backlog, a greeting sent a byte at a time, replies without end).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::proto::{self, Export};
use super::{NbdAddr, NbdSpec};

/// Connects and shakes hands with the server `spec` names.
pub struct Dialer {
    pub spec: NbdSpec,
    pub name: String,
    /// A TCP server's addresses, resolved at the first connection (a
    /// resolver that hangs holds only that one).
    addrs: Mutex<Option<Vec<SocketAddr>>>,
}

impl Dialer {
    pub fn new(spec: &NbdSpec) -> Dialer {
        Dialer {
            spec: spec.clone(),
            name: spec.to_string(),
            addrs: Mutex::new(None),
        }
    }

    fn connect(&self, deadline: Instant) -> Result<OwnedFd, String> {
        match &self.spec.addr {
            NbdAddr::Unix(path) => connect_unix(path, deadline),
            NbdAddr::Tcp { host, port } => {
                let addrs = self.resolve(host, *port, deadline)?;
                let mut last = format!("{host} has no address");
                for a in addrs {
                    let left = left(deadline).map_err(|e| e.to_string())?;
                    match std::net::TcpStream::connect_timeout(&a, left) {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(|e| e.to_string())?;
                            tcp_keepalive(&s);
                            return Ok(s.into());
                        }
                        Err(e) => last = format!("connecting to {a}: {e}"),
                    }
                }
                Err(last)
            }
        }
    }

    /// The server's addresses: resolved once, on a thread of its own,
    /// waited for until `deadline`.
    fn resolve(&self, host: &str, port: u16, deadline: Instant) -> Result<Vec<SocketAddr>, String> {
        if let Some(a) = self.addrs.lock().clone() {
            return Ok(a);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let h = host.to_string();
        std::thread::Builder::new()
            .name("nbd-resolve".into())
            .spawn(move || {
                let r = (h.as_str(), port)
                    .to_socket_addrs()
                    .map(Iterator::collect::<Vec<_>>);
                let _ = tx.send(r);
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let wait = deadline.saturating_duration_since(Instant::now());
        let addrs = match rx.recv_timeout(wait) {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(format!("resolving {host}: {e}")),
            Err(_) => return Err(format!("resolving {host} took longer than {wait:?}")),
        };
        *self.addrs.lock() = Some(addrs.clone());
        Ok(addrs)
    }
}

impl super::conn::Dial for Dialer {
    fn dial(&self, deadline: Instant) -> Result<(OwnedFd, Export), String> {
        let fd = self.connect(deadline)?;
        let mut s = Timed {
            f: std::fs::File::from(fd),
            deadline,
        };
        let e = proto::handshake(&mut s, &self.spec.export).map_err(|e| match e {
            proto::HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                "the server closed the connection during the handshake".to_string()
            }
            proto::HandshakeError::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
                "the handshake did not end in time".to_string()
            }
            e => e.to_string(),
        })?;
        Ok((s.f.into(), e))
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Time left until `deadline` (an error once it has passed).
fn left(deadline: Instant) -> io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    Ok(d)
}

/// A socket whose every read and write waits at most until `deadline`.
struct Timed {
    f: std::fs::File,
    deadline: Instant,
}

impl Timed {
    fn arm(&self, opt: i32) -> io::Result<()> {
        let d = left(self.deadline)?;
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(d.subsec_micros().max(1)),
        };
        // SAFETY: a timeval option on our socket; the pointer and size
        // describe `tv`.
        let r = unsafe {
            libc::setsockopt(
                self.f.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const tv).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(16),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "timed out")
    } else {
        e
    }
}

impl Read for Timed {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.arm(libc::SO_RCVTIMEO)?;
        self.f.read(b).map_err(timed_out)
    }
}

impl Write for Timed {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.arm(libc::SO_SNDTIMEO)?;
        self.f.write(b).map_err(timed_out)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to the unix socket at `path` by `deadline` (a listener whose
/// backlog is full is tried again until then), after checking the path
/// as image paths are checked, and checks who listens there: in a folder
/// every user can write to, another user may have put a socket in the
/// server's place between the check and the connection.
fn connect_unix(path: &Path, deadline: Instant) -> Result<OwnedFd, String> {
    let trust = crate::util::check_path_is_ours(path, "NBD socket")?;
    let failed = |e: io::Error| format!("connecting to {}: {e}", path.display());
    let fd = loop {
        match try_connect_unix(path) {
            Ok(fd) => break fd,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if Instant::now() >= deadline {
                    return Err(failed(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the server does not take connections (its backlog is full)",
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(failed(e)),
        }
    };
    let uid = peer_uid(&fd).map_err(failed)?;
    trust.check_owner(uid, path, "NBD server listening on")?;
    Ok(fd)
}

/// One non-blocking connect (EAGAIN: the backlog is full); the socket is
/// blocking again once connected.
fn try_connect_unix(path: &Path) -> io::Result<OwnedFd> {
    let fd = crate::util::connect_unix_nonblocking(path)?;
    // SAFETY: fcntl on our own descriptor; no memory is passed.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The user of the process that listens on the other end.
fn peer_uid(fd: &OwnedFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(12);
    // SAFETY: SO_PEERCRED fills a ucred; the pointer and length describe
    // `cred`, which outlives the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// A dead peer (network gone, host down) is noticed within about half a
/// minute, even with nothing to send, rather than never.
fn tcp_keepalive(s: &std::net::TcpStream) {
    let set = |level: i32, opt: i32, v: i32| {
        // SAFETY: an int option on our socket; the pointer and size
        // describe `v`.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                opt,
                (&raw const v).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<i32>()).unwrap_or(4),
            )
        };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 25_000);
}
