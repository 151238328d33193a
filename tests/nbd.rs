//! Issue 20: NBD exports as disks, against Debian's nbdkit and qemu-nbd
//! (started by `support::nbd`). What the guest writes is compared with the
//! export's file as the server wrote it (or as `qemu-img convert` reads a
//! qcow2 image), independently of our code; what the server was asked, and
//! in what order, is read from nbdkit's own log filter.
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::driver::*;
use support::nbd::{free_port, have, Listen, NbdServer};
use support::*;

const MB: u64 = 1 << 20;

/// A target serving `disk` with `args`.
fn serve(disk: &str, args: &[&str]) -> ServerProcess {
    let mut a = vec!["--disk", disk];
    a.extend_from_slice(args);
    ServerProcess::start(&a)
}

/// A folder with an image of `size` bytes, and nbdkit's file plugin
/// serving it on a socket there: `filters` before the plugin, `params`
/// (the plugin's and the filters') after.
struct FileExport {
    dir: TempDir,
    img: PathBuf,
    sock: PathBuf,
    nbd: NbdServer,
}

fn nbdkit_file(tag: &str, size: u64, filters: &[&str], params: &[&str]) -> Option<FileExport> {
    if !have("nbdkit") {
        return None;
    }
    let dir = TempDir::new(tag);
    let img = dir.image("export.img", size);
    let sock = dir.path("nbd.sock");
    let nbd = nbdkit_on(&dir, &sock, &img, filters, params);
    Some(FileExport {
        dir,
        img,
        sock,
        nbd,
    })
}

fn nbdkit_on(
    dir: &TempDir,
    sock: &std::path::Path,
    img: &std::path::Path,
    filters: &[&str],
    params: &[&str],
) -> NbdServer {
    let file = format!("file={}", img.display());
    let mut args: Vec<&str> = filters.to_vec();
    args.extend(["file", file.as_str()]);
    args.extend_from_slice(params);
    NbdServer::nbdkit(dir, Listen::Unix(sock.to_path_buf()), &args)
}

/// What the target says when it refuses `args` (it must exit within
/// 20 s).
fn refused(args: &[&str]) -> String {
    let (exited, status, err) = run_bin(args, Duration::from_secs(20));
    assert!(exited, "{args:?} accepted: the server is running");
    assert!(!status.success(), "{args:?} accepted");
    err
}

#[test]
fn an_nbd_unix_disk_reads_back_what_it_wrote_and_the_file_holds_the_same() {
    let Some(x) = nbdkit_file("nbd-bytes", 32 * MB, &[], &[]) else {
        return;
    };
    let srv = serve(&x.nbd.uri(""), &["--queues", "2"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.capacity(), 32 * MB / 512);
    let mut expect = vec![0u8; (32 * MB) as usize];
    // Small and large, one buffer or many, on both queues; 3 MiB is more
    // than one NBD request of nbdkit's may carry... not so: it is cut
    // where the export's maximum says.
    let writes: [(u64, usize, Layout); 7] = [
        (0, 4096, Layout::default()),
        (7, 512, Layout::default()),
        (8191, 8192, Layout::default().chunks(1536)),
        (4 * 2048 - 4, 1 << 20, Layout::default().chunks(200_000)),
        (30_000, 65536, Layout::default().indirect()),
        (65_535, 512, Layout::default()),
        (40_000, 3 << 20, Layout::default().chunks(1 << 20)),
    ];
    round_trip(&mut d, &writes, &mut expect);
    // Discard and write-zeroes read back as zeros, in the file too.
    assert_ne!(d.features & F_DISCARD, 0);
    assert_ne!(d.features & F_WRITE_ZEROES, 0);
    assert_eq!(d.simple(0, T_DISCARD, 0, dwz_segment(0, 8, 0), 0).0, S_OK);
    assert_eq!(
        d.simple(1, T_WRITE_ZEROES, 0, dwz_segment(8191, 16, 0), 0)
            .0,
        S_OK
    );
    expect[..4096].fill(0);
    expect[8191 * 512..8207 * 512].fill(0);
    assert_eq!(d.read(0, 0, 4096), (S_OK, vec![0u8; 4096]));
    assert_eq!(d.read(0, 50_000, 4096), (S_OK, vec![0u8; 4096]));
    assert!(
        std::fs::read(&x.img).unwrap() == expect,
        "the export's file holds other bytes"
    );
    // Past the end: IOERR, and the target lives.
    assert_eq!(d.read(0, 32 * MB / 512, 512).0, S_IOERR);
    let mut srv = srv;
    srv.assert_healthy();
}

/// nbd:// over TCP, to an export that allows several connections: one
/// per reactor, each queue on its own, the same bytes on all.
#[test]
fn an_nbd_tcp_disk_with_multi_conn_gets_a_connection_per_reactor() {
    if !have("nbdkit") {
        return;
    }
    let dir = TempDir::new("nbd-tcp");
    let log = dir.path("nbdkit-log.txt");
    let logp = format!("logfile={}", log.display());
    let nbd = NbdServer::nbdkit(
        &dir,
        Listen::Tcp(free_port()),
        &["--filter=log", "memory", "size=64M", &logp],
    );
    let uri = nbd.uri("");
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let srv = serve(&uri, &["--queues", "2", "--pollers", "2"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    for q in 0..2 {
        for i in 0..8u64 {
            let s = q as u64 * 10_000 + i * 8;
            assert_eq!(d.write(q, s, &pattern(s, 4096)), S_OK);
        }
    }
    for q in 0..2 {
        for i in 0..8u64 {
            let s = q as u64 * 10_000 + i * 8;
            // Read on the other queue: the other connection.
            assert_eq!(d.read(1 - q, s, 4096), (S_OK, pattern(s, 4096)));
        }
    }
    assert!(
        srv.log_text().contains("2 connection(s)"),
        "{}",
        srv.log_text()
    );
    let l = std::fs::read_to_string(&log).unwrap();
    for c in 1..=2 {
        assert!(
            l.contains(&format!("connection={c} Write")),
            "no write on connection {c}: {l}"
        );
    }
    let mut srv = srv;
    srv.assert_healthy();
}

/// A qcow2 image is refused as a file (it would be served as its raw
/// bytes) with the way to serve it; through qemu-nbd it is a disk, and
/// what the guest wrote is what qemu-img reads out of the image.
#[test]
fn a_qcow2_image_is_served_through_qemu_nbd_and_refused_as_a_file() {
    if !have("qemu-nbd") || !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("nbd-qcow2");
    let img = dir.path("vm.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let sock = dir.path("t.sock");
    let sock_s = sock.to_str().unwrap();
    let err = refused(&["--socket", sock_s, "--disk", img.to_str().unwrap()]);
    assert!(
        err.contains("qcow2") && err.contains("qemu-nbd") && err.contains("format=raw"),
        "{err}"
    );
    assert!(!sock.exists());
    // A raw disk whose first bytes look like a qcow2 header (a guest
    // wrote them): refused as well, and served with format=raw.
    let looks = dir.image("looks.img", MB);
    let mut head = b"QFI\xfb".to_vec();
    head.resize(4096, 0);
    std::fs::write(&looks, [head, vec![0u8; (MB - 4096) as usize]].concat()).unwrap();
    let looks_s = looks.to_str().unwrap();
    let err = refused(&["--socket", sock_s, "--disk", looks_s]);
    assert!(err.contains("qcow2"), "{err}");
    {
        let mut raw = ServerProcess::start(&["--disk", looks_s, "--format", "raw"]);
        let mut d = Driver::new(&raw.socket, DriverOptions::default());
        let (st, got) = d.read(0, 0, 512);
        assert_eq!((st, &got[..4]), (S_OK, &b"QFI\xfb"[..]));
        drop(d);
        raw.assert_healthy();
    }
    let nbd = NbdServer::qemu_nbd(&dir, dir.path("qnbd.sock"), &img, "qcow2");
    let srv = serve(&nbd.uri(""), &[]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.capacity(), 16 * MB / 512);
    let mut expect = vec![0u8; (16 * MB) as usize];
    for (i, (sector, len)) in [(0u64, 65536usize), (2047, 4096), (20_000, 1 << 20)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(100 + i as u64, len);
        assert_eq!(d.write(0, sector, &data), S_OK);
        let at = (sector * 512) as usize;
        expect[at..at + len].copy_from_slice(&data);
    }
    assert_eq!(
        d.simple(0, T_WRITE_ZEROES, 0, dwz_segment(2047, 8, 1), 0).0,
        S_OK
    );
    expect[2047 * 512..2055 * 512].fill(0);
    assert_eq!(d.simple(0, T_FLUSH, 0, vec![], 0).0, S_OK);
    // Read back through qemu-nbd, whose structured replies send what the
    // image never allocated as holes: the guest's poisoned buffers must
    // read zeros there.
    for (sector, len) in [(0u64, 2 << 20), (19_000, 2 << 20), (30_000, 4096)] {
        let at = (sector * 512) as usize;
        let r = Request::read(sector, len).laid(Layout::default().chunks(12_288));
        let (st, got, _) = d.run(0, &r);
        assert_eq!(st, S_OK);
        assert!(got == expect[at..at + len], "read at {sector} differs");
    }
    drop(d);
    drop(srv);
    drop(nbd);
    let out = dir.path("out.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        std::fs::read(&out).unwrap() == expect,
        "qemu-img reads other bytes"
    );
}

/// nbdkit's error filter fails requests while a file exists: the guest
/// gets IOERR, the target lives and serves again once the file is gone.
#[test]
fn errors_the_server_reports_are_ioerr_and_the_disk_goes_on() {
    let Some(x) = nbdkit_file("nbd-eio", 8 * MB, &["--filter=error"], &[]) else {
        return;
    };
    drop(x.nbd);
    let trigger = x.dir.path("fail-now");
    let tp = format!("error-file={}", trigger.display());
    let nbd = nbdkit_on(
        &x.dir,
        &x.sock,
        &x.img,
        &["--filter=error"],
        &["error=EIO", "error-rate=100%", &tp],
    );
    let srv = serve(&nbd.uri(""), &[]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.write(0, 0, &pattern(1, 4096)), S_OK);
    std::fs::write(&trigger, b"").unwrap();
    assert_eq!(d.read(0, 0, 4096).0, S_IOERR);
    assert_eq!(d.write(0, 8, &pattern(2, 4096)), S_IOERR);
    // (nbdkit's error filter does not fail flushes.)
    let st = d.simple(0, T_DISCARD, 0, dwz_segment(64, 8, 0), 0).0;
    assert_eq!(st, S_IOERR);
    std::fs::remove_file(&trigger).unwrap();
    assert_eq!(d.read(0, 0, 4096), (S_OK, pattern(1, 4096)));
    assert_eq!(d.write(0, 8, &pattern(2, 4096)), S_OK);
    let mut srv = srv;
    srv.assert_healthy();
    assert!(srv.log_text().contains("error"), "no log line");
}

/// A read and a write held by the server (its delay filter) when it is
/// SIGKILLed: after a restart they are sent again and complete with the
/// right bytes; the file holds the write.
#[test]
fn requests_in_flight_when_the_server_is_killed_complete_after_its_restart() {
    let Some(x) = nbdkit_file(
        "nbd-kill",
        8 * MB,
        &["--filter=delay"],
        &["rdelay=3", "wdelay=3"],
    ) else {
        return;
    };
    let mut old = x.nbd;
    let data = pattern(7, 65536);
    std::fs::write(&x.img, {
        let mut v = vec![0u8; (8 * MB) as usize];
        v[MB as usize..MB as usize + 65536].copy_from_slice(&data);
        v
    })
    .unwrap();
    let srv = serve(&old.uri(""), &[]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    let r = d.submit(0, &Request::read(2048, 65536));
    let w = d.submit(0, &Request::write(4096, &pattern(8, 8192)));
    d.kick(0);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        d.try_used(0).is_empty(),
        "the delay filter did not hold them"
    );
    old.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let _new = nbdkit_on(&x.dir, &x.sock, &x.img, &[], &[]);
    let t = Instant::now();
    let used = d.wait_used(0, 2, Duration::from_secs(20));
    eprintln!("completed {:?} after the restart", t.elapsed());
    assert_eq!(used.len(), 2);
    assert_eq!(d.result(&r), (S_OK, data));
    assert_eq!(d.result(&w).0, S_OK);
    assert!(image_bytes(&x.img, 4096 * 512, 8192) == pattern(8, 8192));
    let mut srv = srv;
    srv.assert_healthy();
    assert!(
        srv.log_text().contains("connected again"),
        "{}",
        srv.log_text()
    );
}

/// A graceful shutdown (SIGTERM) is a disconnect like any other: what
/// was asked meanwhile completes once the server is back.
#[test]
fn a_server_shut_down_gracefully_is_waited_for_too() {
    let Some(x) = nbdkit_file("nbd-term", 8 * MB, &["--filter=delay"], &["rdelay=1"]) else {
        return;
    };
    let mut old = x.nbd;
    let srv = serve(&old.uri(""), &[]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.write(0, 0, &pattern(3, 4096)), S_OK);
    let r = d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    std::thread::sleep(Duration::from_millis(300));
    old.terminate();
    let w = d.submit(0, &Request::write(8, &pattern(4, 4096)));
    d.kick(0);
    std::thread::sleep(Duration::from_millis(1000));
    let _new = nbdkit_on(&x.dir, &x.sock, &x.img, &[], &[]);
    d.wait_used(0, 2, Duration::from_secs(20));
    assert_eq!(d.result(&r), (S_OK, pattern(3, 4096)));
    assert_eq!(d.result(&w).0, S_OK);
    assert_eq!(d.read(0, 8, 4096), (S_OK, pattern(4, 4096)));
    let mut srv = srv;
    srv.assert_healthy();
}

/// Past `reconnect-delay`, requests fail (IOERR) instead of waiting, and
/// the disk serves again once the server is back.
#[test]
fn past_the_reconnect_delay_requests_fail_and_the_disk_comes_back() {
    let Some(x) = nbdkit_file("nbd-delay", 8 * MB, &[], &[]) else {
        return;
    };
    let mut nbd = x.nbd;
    let srv = serve(&nbd.uri(""), &["--reconnect-delay", "2"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.write(0, 0, &pattern(5, 4096)), S_OK);
    nbd.kill();
    let t = Instant::now();
    let s = d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    d.wait_used(0, 1, Duration::from_secs(20));
    assert_eq!(d.result(&s).0, S_IOERR);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "failed after {waited:?}"
    );
    // Later requests fail at once while the server is away.
    let t = Instant::now();
    assert_eq!(d.read(0, 0, 4096).0, S_IOERR);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    nbd.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, got) = d.read(0, 0, 4096);
        if st == S_OK {
            assert_eq!(got, pattern(5, 4096));
            break;
        }
        assert!(Instant::now() < deadline, "the disk did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut srv = srv;
    srv.assert_healthy();
}

/// What the export cannot do is not offered, and what it requires is
/// asked of the operator.
#[test]
fn the_exports_limits_shape_the_device() {
    if !have("nbdkit") {
        return;
    }
    let dir = TempDir::new("nbd-caps");
    // No write-zeroes.
    let s1 = dir.path("nozero.sock");
    let nz = NbdServer::nbdkit(
        &dir,
        Listen::Unix(s1),
        &["--filter=nozero", "memory", "size=8M"],
    );
    let srv = serve(&nz.uri(""), &[]);
    let d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.features & F_WRITE_ZEROES, 0, "WRITE_ZEROES offered");
    assert_ne!(d.features & F_DISCARD, 0);
    drop(d);
    drop(srv);
    // A minimum block of 4096: 512-byte blocks are refused with the fix.
    let s2 = dir.path("bs.sock");
    let bs = NbdServer::nbdkit(
        &dir,
        Listen::Unix(s2),
        &[
            "--filter=blocksize-policy",
            "memory",
            "size=8M",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
        ],
    );
    let t = dir.path("t.sock");
    let err = refused(&["--socket", t.to_str().unwrap(), "--disk", &bs.uri("")]);
    assert!(err.contains("logical-block-size=4096"), "{err}");
    let srv = serve(&bs.uri(""), &["--logical-block-size", "4096"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.write(0, 8, &pattern(1, 8192)), S_OK);
    assert_eq!(d.read(0, 8, 8192), (S_OK, pattern(1, 8192)));
    drop(d);
    drop(srv);
    // A read-only export needs readonly=on, and is read-only then.
    let s3 = dir.path("ro.sock");
    let ro = NbdServer::nbdkit(&dir, Listen::Unix(s3), &["-r", "memory", "size=8M"]);
    let err = refused(&["--socket", t.to_str().unwrap(), "--disk", &ro.uri("")]);
    assert!(
        err.contains("read-only") && err.contains("readonly=on"),
        "{err}"
    );
    let srv = serve(&ro.uri(""), &["--readonly"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_ne!(d.features & F_RO, 0);
    assert_eq!(d.read(0, 0, 4096), (S_OK, vec![0u8; 4096]));
    // Nothing listens: refused with the reason, at once.
    drop(d);
    drop(srv);
    let gone = format!("nbd+unix:///?socket={}", dir.path("nobody.sock").display());
    let err = refused(&["--socket", t.to_str().unwrap(), "--disk", &gone]);
    assert!(err.contains("connecting to"), "{err}");
}

/// Flush honesty, under load (32 writes in flight all along): every write
/// acknowledged to the guest before it sent a FLUSH has returned at the
/// server (nbdkit's log) before the server's flush starts, and the guest's
/// FLUSH completes only after the server's flush returned (a write sent
/// after the guest saw it complete reaches the server after that).
#[test]
fn a_flush_covers_every_write_acknowledged_before_it_and_returns_after_the_servers() {
    let Some(x) = nbdkit_file("nbd-flush", 16 * MB, &["--filter=log"], &[]) else {
        return;
    };
    drop(x.nbd);
    let log = x.dir.path("nbdkit-log.txt");
    let lp = format!("logfile={}", log.display());
    let _nbd = nbdkit_on(&x.dir, &x.sock, &x.img, &["--filter=log"], &[&lp]);
    let srv = serve(
        &format!("nbd+unix:///?socket={}", x.sock.display()),
        &["--queues", "2"],
    );
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    d.set_writeback(true);
    const WRITES: u64 = 1500;
    let mut next = 0u64;
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let mut acked: Vec<u64> = Vec::new();
    // Per flush: the writes acked when it was sent, and the first write
    // sent after it completed.
    let mut flushes: Vec<(Vec<u64>, Option<u64>)> = Vec::new();
    let mut flush_head: Option<u16> = None;
    let mut waiting_marker: Option<usize> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < WRITES as usize || flush_head.is_some() {
        assert!(Instant::now() < deadline, "stuck at {} writes", acked.len());
        while in_flight.len() < 32 && next < WRITES {
            let s = d.submit(0, &Request::write(next * 8, &pattern(next, 4096)));
            in_flight.insert(s.head, next);
            if let Some(k) = waiting_marker.take() {
                flushes[k].1 = Some(next);
            }
            next += 1;
        }
        d.kick(0);
        for (head, _) in d.try_used(0) {
            acked.push(
                in_flight
                    .remove(&head)
                    .expect("a used entry for no request"),
            );
        }
        if flush_head.is_none() && acked.len() >= 100 * (flushes.len() + 1) {
            let s = d.submit(
                1,
                &Request {
                    kind: T_FLUSH,
                    sector: 0,
                    out: vec![],
                    in_len: 0,
                    layout: Layout::default(),
                },
            );
            d.kick(1);
            flush_head = Some(s.head);
            flushes.push((acked.clone(), None));
        }
        if let Some(h) = flush_head {
            if let Some(&(head, _)) = d.try_used(1).first() {
                assert_eq!(head, h);
                flush_head = None;
                waiting_marker = Some(flushes.len() - 1);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(flushes.len() >= 10, "only {} flushes", flushes.len());
    std::thread::sleep(Duration::from_millis(300));
    let l = std::fs::read_to_string(&log).unwrap();
    // Where each write returned, where each write was asked, where each
    // flush started and returned (line numbers).
    let field = |line: &str, key: &str| -> Option<String> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key).map(str::to_string))
    };
    let mut id_offset: HashMap<String, u64> = HashMap::new();
    let mut write_asked: HashMap<u64, usize> = HashMap::new();
    let mut write_returned: HashMap<u64, usize> = HashMap::new();
    let mut flush_start = Vec::new();
    let mut flush_return = Vec::new();
    for (n, line) in l.lines().enumerate() {
        if line.contains(" Write id=") {
            let id = field(line, "id=").unwrap();
            let off = field(line, "offset=0x").unwrap();
            let off = u64::from_str_radix(&off, 16).unwrap();
            id_offset.insert(id, off);
            write_asked.entry(off).or_insert(n);
        } else if line.contains("...Write id=") && line.contains("return=0") {
            let id = field(line, "id=").unwrap();
            write_returned.insert(id_offset[&id], n);
        } else if line.contains(" Flush id=") {
            flush_start.push(n);
        } else if line.contains("...Flush id=") && line.contains("return=0") {
            flush_return.push(n);
        }
    }
    assert_eq!(
        flush_start.len(),
        flushes.len(),
        "one server flush per guest flush"
    );
    for (k, (before, marker)) in flushes.iter().enumerate() {
        for w in before {
            let at = write_returned[&(w * 4096)];
            assert!(
                at < flush_start[k],
                "write {w}, acked before flush {k}, returned at the server after it started"
            );
        }
        if let Some(m) = marker {
            assert!(
                flush_return[k] < write_asked[&(m * 4096)],
                "flush {k} completed in the guest before the server's flush returned"
            );
        }
    }
    let file = std::fs::read(&x.img).unwrap();
    for w in 0..WRITES {
        let at = (w * 4096) as usize;
        assert!(
            file[at..at + 4096] == pattern(w, 4096),
            "write {w} is not in the file"
        );
    }
    let mut srv = srv;
    srv.assert_healthy();
}

/// device_add takes NBD disks and reconnect-delay; a disk whose server
/// died with reads held in it is removed within its delay, and the other
/// disk and the management plane are not held meanwhile.
#[test]
fn an_nbd_disk_added_live_is_removed_while_its_server_is_gone() {
    let Some(x) = nbdkit_file("nbd-rpc", 8 * MB, &["--filter=delay"], &["rdelay=5"]) else {
        return;
    };
    let mut nbd = x.nbd;
    let t = RpcTarget::start(&["--poll-mode", "interrupt"]);
    let (sn, sm) = (t.dir.path("n.sock"), t.dir.path("m.sock"));
    let added = t.ok(
        "device_add",
        serde_json::json!({"name": "n", "socket": sn, "disk": nbd.uri(""),
                           "reconnect-delay": "2"}),
    );
    assert_eq!(added["size"], 8 * MB);
    t.ok(
        "device_add",
        serde_json::json!({"name": "m", "socket": sm, "disk": "ram:8M"}),
    );
    let mut dn = Driver::new(&sn, DriverOptions::default());
    let mut dm = Driver::new(&sm, DriverOptions::default());
    for i in 0..8 {
        dn.submit(0, &Request::read(i * 8, 4096));
    }
    dn.kick(0);
    std::thread::sleep(Duration::from_millis(300));
    nbd.kill();
    let started = Instant::now();
    let (r, took) = std::thread::scope(|sc| {
        let remover = sc.spawn(|| {
            let r = t.call(
                "device_remove",
                serde_json::json!({"name": "n", "force": true}),
            );
            (r, started.elapsed())
        });
        // Meanwhile the memory disk answers at once, and so does the
        // plane.
        for i in 0..20u64 {
            let t0 = Instant::now();
            assert_eq!(dm.write(0, i * 8, &pattern(i, 4096)), S_OK);
            assert!(
                t0.elapsed() < Duration::from_millis(500),
                "{:?}",
                t0.elapsed()
            );
        }
        t.ok("device_stats", serde_json::json!({"name": "m"}));
        remover.join().unwrap()
    });
    assert!(r.is_ok(), "{r:?}");
    assert!(took < Duration::from_secs(8), "device_remove took {took:?}");
    drop(dn);
    assert!(t
        .call("device_stats", serde_json::json!({"name": "n"}))
        .is_err());
}

/// A server that takes the connection and never speaks: device_add ends
/// with the reason within the handshake's time limit, and the management
/// plane answers meanwhile.
#[test]
fn a_server_that_never_speaks_fails_device_add_in_time() {
    let dir = TempDir::new("nbd-mute");
    let sock = dir.path("mute.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let held = std::thread::spawn(move || {
        let mut kept = Vec::new();
        for c in l.incoming().take(1) {
            kept.push(c);
        }
        std::thread::sleep(Duration::from_secs(15));
        drop(kept);
    });
    let t = RpcTarget::start(&["--poll-mode", "interrupt"]);
    let started = Instant::now();
    let (r, listed) = std::thread::scope(|sc| {
        let add = sc.spawn(|| {
            t.call(
                "device_add",
                serde_json::json!({"name": "m", "socket": t.dir.path("m.sock"),
                                   "disk": format!("nbd+unix:///?socket={}", sock.display())}),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let listed = t.call("device_list", serde_json::json!({}));
        (add.join().unwrap(), listed)
    });
    let took = started.elapsed();
    assert!(listed.is_ok(), "{listed:?}");
    let e = r.expect_err("added");
    assert!(e.1.contains("in time"), "{e:?}");
    assert!(took < Duration::from_secs(14), "{took:?}");
    drop(held);
}

/// Another user's server behind a socket in a folder every user can
/// write to is not talked to, even when the socket file is root's (a
/// socket swapped in between the path's check and the connection): the
/// listening process's user is checked too. Needs root.
#[test]
fn another_users_server_in_a_shared_folder_is_refused() {
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root (a listener of another user)");
        return;
    }
    if !have("python3") {
        return;
    }
    let shared = TempDir::new("nbd-shared");
    std::fs::set_permissions(
        &shared.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    let sock = shared.path("nbd.sock");
    // Bound (the file is root's) by root, listening as nobody.
    let script = format!(
        "import os, socket, time\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.bind({:?})\n\
         os.setgid(65534); os.setuid(65534)\n\
         s.listen(4)\n\
         while True:\n    c, _ = s.accept(); time.sleep(30)\n",
        sock.to_str().unwrap()
    );
    let mut py = Command::new("python3")
        .args(["-c", &script])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "the listener did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = shared.path("t.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let err = refused(&["--socket", t.to_str().unwrap(), "--disk", &uri]);
    let _ = py.kill();
    let _ = py.wait();
    assert!(err.contains("belongs to user 65534"), "{err}");
}

/// A multi-conn export whose server takes one connection only: the disk
/// is refused, and the connection already made is closed (the server's
/// one slot is free again), not left running.
#[test]
fn a_disk_whose_second_connection_fails_leaves_nothing_behind() {
    if !have("nbdkit") {
        return;
    }
    let dir = TempDir::new("nbd-limit");
    let nbd = NbdServer::nbdkit(
        &dir,
        Listen::Unix(dir.path("l.sock")),
        &["--filter=limit", "memory", "size=8M", "limit=1"],
    );
    let t = RpcTarget::start(&["--poll-mode", "interrupt", "--pollers", "2"]);
    let pid = t.child.id();
    let r = t.call(
        "device_add",
        serde_json::json!({"name": "a", "socket": t.dir.path("a.sock"), "disk": nbd.uri("")}),
    );
    assert!(r.is_err(), "{r:?}");
    let conn_threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "nbd-conn")
            .count()
    };
    wait_until("the first connection's thread to end", || {
        conn_threads() == 0
    });
    // The server's slot is free: a client of its own gets in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = Command::new("qemu-img")
            .args(["info", "--image-opts"])
            .arg(format!(
                "driver=nbd,server.type=unix,server.path={}",
                dir.path("l.sock").display()
            ))
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nbdkit's one slot is still taken"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
