//! The wire decoder and the whole message handling, structure-aware: a
//! sequence of messages with valid-looking headers (or deliberately wrong
//! sizes) and fuzzed bodies, some carrying descriptors, through the server
//! loop over an in-memory transport. Invariants beyond "no panic": every
//! reply answers a request that was sent, in order, with a reply type; an
//! error reply carries a non-zero errno and no payload; no request is
//! answered twice and no-reply requests are never answered.
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};

use arbitrary::Arbitrary;
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use vfio_user_blk::cli::{build_with, Options};
use vfio_user_blk::vfio_user::MemTransport;

#[derive(Arbitrary, Debug)]
enum Fd {
    Memfd(u16),
    Eventfd,
    Pipe,
}

#[derive(Arbitrary, Debug)]
struct Msg {
    command: u8,
    flags: u8,
    size_delta: i8,
    fds: Vec<Fd>,
    body: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    version_first: bool,
    msgs: Vec<Msg>,
}

fn make_fd(f: &Fd) -> Option<OwnedFd> {
    match f {
        Fd::Memfd(pages) => {
            let m = vfio_user_blk::util::memfd("fuzz").ok()?;
            m.set_len(u64::from(*pages % 64) * 4096).ok()?;
            Some(m.into())
        }
        Fd::Eventfd => {
            // SAFETY: eventfd has no memory effects.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            // SAFETY: a fresh descriptor that nothing else owns.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        }
        Fd::Pipe => {
            let mut p = [0i32; 2];
            // SAFETY: pipe writes two descriptors into `p`.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return None;
            }
            // SAFETY: we own both ends; the read end is closed at once.
            unsafe {
                drop(OwnedFd::from_raw_fd(p[0]));
                Some(OwnedFd::from_raw_fd(p[1]))
            }
        }
    }
}

const COMMANDS: [u16; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99];

fuzz_target!(|inp: Input| {
    let opts = Options::parse_from(["fuzz", "--socket", "/nonexistent", "--disk", "ram:1M"]);
    let mut server = build_with(&opts, true).expect("device");
    let mut t = MemTransport::new();
    let mut sent: Vec<(u16, bool)> = Vec::new();
    let mut framed = usize::MAX;
    let mut id: u16 = 0;
    if inp.version_first {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(br#"{"capabilities":{"max_msg_fds":8}}"#);
        p.push(0);
        push(&mut t, id, 1, 0, 0, &p, Vec::new());
        sent.push((id, false));
    }
    for m in inp.msgs.iter().take(64) {
        id = id.wrapping_add(1);
        let cmd = COMMANDS[usize::from(m.command) % COMMANDS.len()];
        let fds: Vec<OwnedFd> = m.fds.iter().take(20).filter_map(make_fd).collect();
        let body = &m.body[..m.body.len().min(4096)];
        push(
            &mut t,
            id,
            cmd,
            u32::from(m.flags & 0x3f),
            m.size_delta,
            body,
            fds,
        );
        sent.push((id, m.flags & 0x10 != 0));
        if m.size_delta != 0 && framed == usize::MAX {
            framed = sent.len() - 1;
        }
    }
    let t = server.serve_on(t);
    check_replies(&t.output, &sent, framed.min(sent.len()));
});

fn push(
    t: &mut MemTransport,
    id: u16,
    cmd: u16,
    flags: u32,
    delta: i8,
    body: &[u8],
    fds: Vec<OwnedFd>,
) {
    let size = (16 + body.len() as i64 + i64::from(delta)).max(0) as u32;
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&cmd.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(body);
    t.push(&m, fds);
}

/// `sent`: (id, no_reply) of every request, in order; the first `framed`
/// of them had true sizes.
fn check_replies(out: &[u8], sent: &[(u16, bool)], framed: usize) {
    let mut pos = 0;
    let mut next = 0; // index in `sent` of the earliest request a reply may answer
    while pos < out.len() {
        assert!(out.len() - pos >= 16, "truncated reply header");
        let h = &out[pos..pos + 16];
        let rid = u16::from_le_bytes([h[0], h[1]]);
        let size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let flags = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let err = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        assert!(size >= 16 && pos + size <= out.len(), "reply size {size}");
        assert_eq!(flags & 0xf, 1, "replies have the reply type");
        if flags & 0x20 != 0 {
            assert_ne!(err, 0, "error reply with errno 0");
            assert_eq!(size, 16, "error replies are header-only");
        }
        // The reply answers a later request than the previous reply did.
        // Past a message whose size was a lie, the server frames the stream
        // its own way (as it must): ids are then whatever it read.
        if next < framed {
            let k = sent[next..framed]
                .iter()
                .position(|(id, _)| *id == rid)
                .map(|k| k + next);
            match k {
                Some(k) => {
                    assert!(!sent[k].1, "a no-reply request was answered");
                    next = k + 1;
                }
                None => next = framed,
            }
        }
        pos += size;
    }
}
