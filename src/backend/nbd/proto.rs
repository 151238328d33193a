//! NBD's wire format (doc/proto.md of the NBD project): the fixed-newstyle
//! handshake, ended with NBD_OPT_GO (or NBD_OPT_EXPORT_NAME on a server
//! without it), and the headers of the transmission phase. The handshake
//! runs on a blocking socket with timeouts; the transmission phase is
//! `conn`'s.

use std::io::{self, Read, Write};
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR + 1;
const REP_ERR_POLICY: u32 = REP_ERR + 2;
const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (what the export can do).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

/// The error NBD_ESHUTDOWN: the server is going away.
pub const NBD_ESHUTDOWN: u32 = 108;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

/// The largest payload the protocol lets a client assume when the server
/// states none (proto.md: 32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Most replies to one GO (infos, then the ACK): a server may send infos
/// we did not ask for, not without end.
const MAX_GO_REPLIES: u32 = 64;
/// Longest option reply we read (an error's message, an info).
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// What the handshake learnt of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// Block size constraints: minimum, preferred, maximum payload.
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
    /// The server sends structured replies.
    pub structured: bool,
}

impl Export {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server refused (unknown export, TLS required, policy): trying
    /// again will not help unless the server changes.
    #[error("{0}")]
    Refused(String),
    /// The server does not speak NBD as we do.
    #[error("{0}")]
    Protocol(String),
    /// The server is shutting down: try again later.
    #[error("the server is shutting down")]
    ShuttingDown,
}

fn protocol(s: impl Into<String>) -> HandshakeError {
    HandshakeError::Protocol(s.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(w: &mut impl Write, opt: u32, data: &[u8]) -> Result<(), HandshakeError> {
    let len = u32::try_from(data.len()).map_err(|_| protocol("option too long"))?;
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)?;
    Ok(())
}

/// One option reply: its type and data.
fn option_reply(r: &mut impl Read, opt: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
    if read_u64(r)? != OPT_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    let got = read_u32(r)?;
    if got != opt {
        return Err(protocol(format!(
            "a reply to option {got} where {opt} was asked"
        )));
    }
    let kind = read_u32(r)?;
    let len = read_u32(r)?;
    if len > MAX_OPTION_REPLY {
        return Err(protocol(format!("an option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok((kind, data))
}

/// An error reply as a message, with the server's own words if any.
fn refusal(kind: u32, data: &[u8], export: &str) -> HandshakeError {
    let said = String::from_utf8_lossy(data);
    let said: String = said.chars().filter(|c| !c.is_control()).take(200).collect();
    let said = if said.is_empty() {
        String::new()
    } else {
        format!(" (the server says: {said})")
    };
    match kind {
        REP_ERR_UNKNOWN => HandshakeError::Refused(format!("no export named '{export}'{said}")),
        REP_ERR_TLS_REQD => HandshakeError::Refused(format!(
            "the server requires TLS, which this client does not speak{said}"
        )),
        REP_ERR_POLICY => HandshakeError::Refused(format!("the server refused us{said}")),
        REP_ERR_BLOCK_SIZE_REQD => {
            HandshakeError::Refused(format!("the server requires block size negotiation{said}"))
        }
        REP_ERR_SHUTDOWN => HandshakeError::ShuttingDown,
        k => HandshakeError::Refused(format!("the server answered error {k:#x}{said}")),
    }
}

/// Runs the handshake for `export` on a connected stream (read and write
/// timeouts already set).
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<Export, HandshakeError> {
    if export.len() > 4096 {
        return Err(HandshakeError::Refused(
            "the export name is longer than 4096 bytes".into(),
        ));
    }
    if read_u64(s)? != NBDMAGIC {
        return Err(protocol("this is not an NBD server (no NBDMAGIC)"));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(protocol(
            "the server speaks only the old-style handshake, which this client does not",
        ));
    }
    let hflags = read_u16(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the server does not speak fixed newstyle"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 });
    s.write_all(&cflags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let structured = match option_reply(s, OPT_STRUCTURED_REPLY)? {
        (REP_ACK, _) => true,
        (REP_ERR_SHUTDOWN, _) => return Err(HandshakeError::ShuttingDown),
        (k, _) if k & REP_ERR != 0 => false,
        (k, _) => return Err(protocol(format!("reply {k} to STRUCTURED_REPLY"))),
    };

    let mut go = Vec::new();
    go.extend_from_slice(&u32::try_from(export.len()).unwrap_or(0).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&2u16.to_be_bytes());
    go.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go)?;
    let mut e = Export {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured,
    };
    let mut have_export = false;
    for n in 0.. {
        if n > MAX_GO_REPLIES {
            return Err(protocol("the server answers GO without end"));
        }
        let (kind, data) = option_reply(s, OPT_GO)?;
        match kind {
            REP_INFO => read_info(&data, &mut e, &mut have_export)?,
            REP_ACK => break,
            REP_ERR_UNSUP => return export_name(s, export, no_zeroes, structured),
            k if k & REP_ERR != 0 => return Err(refusal(k, &data, export)),
            k => return Err(protocol(format!("reply {k} to GO"))),
        }
    }
    if !have_export {
        return Err(protocol("the server gave no size for the export"));
    }
    check_block_sizes(&e)?;
    if e.flags & TF_HAS_FLAGS == 0 {
        // Without HAS_FLAGS, the other bits mean nothing.
        e.flags = 0;
    }
    Ok(e)
}

fn read_info(data: &[u8], e: &mut Export, have_export: &mut bool) -> Result<(), HandshakeError> {
    let be16 = |at: usize| {
        data.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let be32 = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    match be16(0) {
        Some(INFO_EXPORT) if data.len() == 12 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[2..10]);
            e.size = u64::from_be_bytes(b);
            e.flags = be16(10).unwrap_or(0);
            *have_export = true;
        }
        Some(INFO_BLOCK_SIZE) if data.len() == 14 => {
            e.min_block = be32(2).unwrap_or(1);
            e.preferred_block = be32(6).unwrap_or(4096);
            e.max_payload = be32(10).unwrap_or(DEFAULT_MAX_PAYLOAD);
        }
        Some(INFO_EXPORT | INFO_BLOCK_SIZE) => {
            return Err(protocol(format!("an info of {} bytes", data.len())))
        }
        // Infos we did not ask for are ignored, as the protocol says.
        _ => {}
    }
    Ok(())
}

/// As the protocol has them: powers of two for the minimum (at most 64
/// KiB) and the preferred size, the preferred at least the minimum, the
/// maximum a multiple of the minimum (or 2^32 - 1), and at least 512
/// bytes (a disk's least block).
fn check_block_sizes(e: &Export) -> Result<(), HandshakeError> {
    let ok = e.min_block.is_power_of_two()
        && e.min_block <= 65536
        && e.preferred_block.is_power_of_two()
        && e.preferred_block >= e.min_block
        && (e.max_payload.is_multiple_of(e.min_block) || e.max_payload == u32::MAX)
        && e.max_payload >= 512;
    if !ok {
        return Err(protocol(format!(
            "impossible block sizes: minimum {}, preferred {}, maximum {}",
            e.min_block, e.preferred_block, e.max_payload
        )));
    }
    Ok(())
}

/// The old way to choose the export, for servers without NBD_OPT_GO.
fn export_name<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> Result<Export, HandshakeError> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = read_u64(s)?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok(Export {
        size,
        flags: if flags & TF_HAS_FLAGS == 0 { 0 } else { flags },
        min_block: 1,
        preferred_block: 4096,
        max_payload: DEFAULT_MAX_PAYLOAD,
        structured,
    })
}

/// A request header.
pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// NBD's errors, as errnos.
pub fn errno(nbd: u32) -> i32 {
    match nbd {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// How long one step of the handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: what it sends, and what the client wrote.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn opt_reply(out: &mut Vec<u8>, opt: u32, kind: u32, data: &[u8]) {
        out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(data);
    }

    fn greeting() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&NBDMAGIC.to_be_bytes());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v
    }

    #[test]
    fn go_gives_size_flags_and_block_sizes() {
        let mut v = greeting();
        opt_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut info = vec![0, 0];
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_FLUSH).to_be_bytes());
        opt_reply(&mut v, OPT_GO, REP_INFO, &info);
        let mut bs = vec![0, 3];
        for x in [512u32, 4096, 1 << 20] {
            bs.extend_from_slice(&x.to_be_bytes());
        }
        opt_reply(&mut v, OPT_GO, REP_INFO, &bs);
        opt_reply(&mut v, OPT_GO, REP_ACK, &[]);
        let mut s = Script {
            input: io::Cursor::new(v),
            output: Vec::new(),
        };
        let e = handshake(&mut s, "disk").unwrap();
        assert_eq!(e.size, 1 << 30);
        assert!(e.has(TF_SEND_FLUSH) && !e.has(TF_SEND_TRIM));
        assert_eq!((e.min_block, e.max_payload), (512, 1 << 20));
        assert!(e.structured);
        // The client's flags, then STRUCTURED_REPLY, then GO naming "disk".
        assert_eq!(&s.output[0..4], &3u32.to_be_bytes());
        assert!(s.output.windows(4).any(|w| w == b"disk"));
    }

    #[test]
    fn an_unknown_export_is_refused_with_the_servers_words() {
        let mut v = greeting();
        opt_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]);
        opt_reply(&mut v, OPT_GO, REP_ERR_UNKNOWN, b"not here\x07");
        let mut s = Script {
            input: io::Cursor::new(v),
            output: Vec::new(),
        };
        match handshake(&mut s, "x") {
            Err(HandshakeError::Refused(m)) => {
                assert!(m.contains("no export named 'x'") && m.contains("not here"));
                assert!(!m.contains('\x07'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_truncated_or_foreign_greeting_is_an_error_not_a_hang() {
        let mut s = Script {
            input: io::Cursor::new(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()),
            output: Vec::new(),
        };
        assert!(matches!(
            handshake(&mut s, ""),
            Err(HandshakeError::Protocol(_))
        ));
        let mut v = greeting();
        v.truncate(10);
        let mut s = Script {
            input: io::Cursor::new(v),
            output: Vec::new(),
        };
        assert!(matches!(handshake(&mut s, ""), Err(HandshakeError::Io(_))));
    }

    #[test]
    fn a_go_answered_without_end_is_refused() {
        let mut v = greeting();
        opt_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        for _ in 0..100 {
            opt_reply(&mut v, OPT_GO, REP_INFO, &[0, 99, 1, 2, 3]);
        }
        let mut s = Script {
            input: io::Cursor::new(v),
            output: Vec::new(),
        };
        match handshake(&mut s, "") {
            Err(HandshakeError::Protocol(m)) => assert!(m.contains("without end"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn impossible_block_sizes_are_refused() {
        let mut v = greeting();
        opt_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut info = vec![0, 0];
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&TF_HAS_FLAGS.to_be_bytes());
        opt_reply(&mut v, OPT_GO, REP_INFO, &info);
        let mut bs = vec![0, 3];
        for x in [4096u32, 4096, 6144] {
            bs.extend_from_slice(&x.to_be_bytes());
        }
        opt_reply(&mut v, OPT_GO, REP_INFO, &bs);
        opt_reply(&mut v, OPT_GO, REP_ACK, &[]);
        let mut s = Script {
            input: io::Cursor::new(v),
            output: Vec::new(),
        };
        assert!(matches!(
            handshake(&mut s, ""),
            Err(HandshakeError::Protocol(_))
        ));
    }
}
