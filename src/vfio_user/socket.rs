//! The transport under the server loop: a byte stream that carries
//! descriptors with a message's first byte. [`Transport`] is the seam; the
//! unix socket (SCM_RIGHTS) is the real one, [`MemTransport`] a stream held
//! in memory, so that a fuzzer or a test drives the whole message handling
//! without a socket.
//!
//! On the socket, the header is received with `recvmsg` and a control
//! buffer, the payload with plain reads. Received descriptors become
//! `OwnedFd`s at once, so whatever path drops them closes them.

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::wire::HEADER_SIZE;

/// The most descriptors we accept on one message. QEMU never sends more
/// than the `max_msg_fds` we advertise (8); room for more lets us see, and
/// close, what a misbehaving client sends instead of losing track of it.
pub const MAX_RECV_FDS: usize = 16;

/// What reading a header produced.
pub struct RecvHeader {
    pub bytes: [u8; HEADER_SIZE],
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors because they did not fit.
    pub fds_truncated: bool,
}

/// Reads one header and the descriptors that came with it. `Ok(None)` is a
/// clean end of stream before the first byte of a header.
pub fn recv_header(stream: &UnixStream) -> io::Result<Option<RecvHeader>> {
    let mut bytes = [0u8; HEADER_SIZE];
    // Space for MAX_RECV_FDS descriptors in one SCM_RIGHTS message, in u64s so
    // that the buffer is aligned for cmsghdr.
    const CMSG_WORDS: usize = (size_of::<libc::cmsghdr>() + MAX_RECV_FDS * 4).div_ceil(8) + 1;
    let mut cmsg = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: HEADER_SIZE,
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; CMSG_WORDS]>();

    let n = loop {
        // SAFETY: msg points at `iov` (HEADER_SIZE writable bytes of `bytes`)
        // and at `cmsg` (msg_controllen writable bytes), all alive for the call.
        let r = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r.unsigned_abs();
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };

    let mut fds = Vec::new();
    // SAFETY: msg was filled in by a successful recvmsg; the CMSG_* macros
    // walk only within msg_control/msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: c is a valid cmsghdr inside the control buffer (see above).
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure computation.
            let data_len = hdr.cmsg_len - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = data_len / size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS cmsg is `count` file descriptors.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: i < count, inside this cmsg's data; read_unaligned
                // because the data need not be aligned for RawFd.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed this descriptor for us and
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    let fds_truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;

    if n == 0 {
        return Ok(None);
    }
    if n < HEADER_SIZE {
        // The rest of the header may come in later segments; fds only ride
        // on the first byte, so a plain read finishes it.
        let mut rest = stream;
        rest.read_exact(&mut bytes[n..])?;
    }
    Ok(Some(RecvHeader {
        bytes,
        fds,
        fds_truncated,
    }))
}

/// A byte stream with descriptor passing, as the server loop sees it.
pub trait Transport {
    /// Reads one header and the descriptors that came with it. `Ok(None)` is
    /// a clean end of stream before the first byte of a header.
    fn recv_header(&mut self) -> io::Result<Option<RecvHeader>>;
    /// Reads exactly `buf.len()` bytes of payload.
    fn recv_exact(&mut self, buf: &mut [u8]) -> io::Result<()>;
    /// Sends one whole message.
    fn send_all(&mut self, msg: &[u8]) -> io::Result<()>;
    /// Sends one whole message with a descriptor riding on its first byte.
    fn send_with_fd(&mut self, msg: &[u8], fd: RawFd) -> io::Result<()>;
    /// The socket behind it, if there is one (a live upgrade waits on it
    /// between messages, and hands it over).
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

impl Transport for UnixStream {
    fn fd(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.as_raw_fd())
    }
    fn recv_header(&mut self) -> io::Result<Option<RecvHeader>> {
        recv_header(self)
    }
    fn recv_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        recv_exact(self, buf)
    }
    fn send_all(&mut self, msg: &[u8]) -> io::Result<()> {
        send_all(self, msg)
    }
    fn send_with_fd(&mut self, msg: &[u8], fd: RawFd) -> io::Result<()> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let sent = ScmSocket::send_with_fd(self, msg, fd).map_err(io::Error::from)?;
        // The descriptor went with the first bytes; the rest as a stream.
        send_all(self, &msg[sent..])
    }
}

/// A client's whole side of a conversation, held in memory: the bytes it
/// sends, with descriptors attached at message starts, and what the server
/// answered. Descriptors past `MAX_RECV_FDS` on one message are dropped and
/// flagged, as the kernel does with a short control buffer.
#[derive(Default)]
pub struct MemTransport {
    input: Vec<u8>,
    pos: usize,
    /// (byte offset in `input`, descriptors), in offset order.
    fds: std::collections::VecDeque<(usize, Vec<OwnedFd>)>,
    pub output: Vec<u8>,
}

impl MemTransport {
    pub fn new() -> MemTransport {
        MemTransport::default()
    }

    /// Appends bytes the client sends, with descriptors riding on the first.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        if !fds.is_empty() && !bytes.is_empty() {
            self.fds.push_back((self.input.len(), fds));
        }
        self.input.extend_from_slice(bytes);
    }
}

impl Transport for MemTransport {
    fn recv_header(&mut self) -> io::Result<Option<RecvHeader>> {
        if self.pos >= self.input.len() {
            return Ok(None);
        }
        let mut fds = Vec::new();
        // Descriptors attached anywhere in the bytes this read takes arrive
        // with it, as with recvmsg on a socket.
        let end = (self.pos + HEADER_SIZE).min(self.input.len());
        while self.fds.front().is_some_and(|(at, _)| *at < end) {
            if let Some((_, f)) = self.fds.pop_front() {
                fds.extend(f);
            }
        }
        let fds_truncated = fds.len() > MAX_RECV_FDS;
        fds.truncate(MAX_RECV_FDS);
        if end - self.pos < HEADER_SIZE {
            self.pos = self.input.len();
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut bytes = [0u8; HEADER_SIZE];
        bytes.copy_from_slice(&self.input[self.pos..end]);
        self.pos = end;
        Ok(Some(RecvHeader {
            bytes,
            fds,
            fds_truncated,
        }))
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let end = self.pos.saturating_add(buf.len());
        if end > self.input.len() {
            self.pos = self.input.len();
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Descriptors that arrive with payload bytes are closed, as the
        // kernel's plain reads on a socket would drop them.
        while self.fds.front().is_some_and(|(at, _)| *at < end) {
            self.fds.pop_front();
        }
        buf.copy_from_slice(&self.input[self.pos..end]);
        self.pos = end;
        Ok(())
    }

    fn send_all(&mut self, msg: &[u8]) -> io::Result<()> {
        self.output.extend_from_slice(msg);
        Ok(())
    }
    fn send_with_fd(&mut self, msg: &[u8], _fd: RawFd) -> io::Result<()> {
        self.send_all(msg)
    }
}

/// Reads exactly `buf.len()` bytes of payload.
pub fn recv_exact(stream: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    let mut s = stream;
    s.read_exact(buf)
}

/// Reads and throws away `len` bytes, in bounded chunks.
pub fn discard(stream: &UnixStream, mut len: usize) -> io::Result<()> {
    let mut scratch = [0u8; 4096];
    while len > 0 {
        let n = len.min(scratch.len());
        recv_exact(stream, &mut scratch[..n])?;
        len -= n;
    }
    Ok(())
}

/// Sends one whole message (header and payload in one buffer, so that the
/// header always leaves in the first write).
pub fn send_all(stream: &UnixStream, msg: &[u8]) -> io::Result<()> {
    let mut s = stream;
    s.write_all(msg)
}
