//! Issue 19: Ceph RBD images as disks, against a real one-node cluster
//! (`scripts/ceph-cluster.sh`, started once for this binary). What the
//! guest reads and writes is compared with what librbd reads of the image
//! (`rbd export`), independently of our code.
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::ceph::{cluster, own_cluster, Ceph};
use support::driver::*;
use support::*;

const MB: u64 = 1 << 20;

/// The tests share the cluster, and one of them stops its OSD: one at a
/// time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A target serving `disk` with `args`.
fn serve(disk: &str, args: &[&str]) -> ServerProcess {
    let mut a = vec!["--disk", disk];
    a.extend_from_slice(args);
    ServerProcess::start(&a)
}

#[test]
fn an_rbd_disk_reads_back_what_it_wrote_and_librbd_reads_the_same() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    let disk = ceph.image("bytes", 64 * MB);
    let srv = serve(&disk, &["--queues", "2"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.capacity(), 64 * MB / 512);
    let mut expect = vec![0u8; (64 * MB) as usize];
    // Small and large, aligned and not to RBD's 4 MiB objects, one buffer
    // or many, on both queues.
    let writes: [(u64, usize, Layout); 6] = [
        (0, 4096, Layout::default()),
        (7, 512, Layout::default()),
        (8191, 8192, Layout::default().chunks(1536)),
        (4 * 2048 - 4, 1 << 20, Layout::default().chunks(200_000)),
        (100_000, 65536, Layout::default().indirect()),
        (131_071, 512, Layout::default()),
    ];
    round_trip(&mut d, &writes, &mut expect);
    // A read of what was never written is zeros, not our poison.
    assert_eq!(d.read(0, 50_000, 4096), (S_OK, vec![0u8; 4096]));
    assert!(ceph.export("bytes") == expect, "librbd reads other bytes");
    // Past the end: IOERR, and the target lives.
    assert_eq!(d.read(0, 64 * MB / 512, 512).0, S_IOERR);
    let mut srv = srv;
    srv.assert_healthy();
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    let disk = ceph.image("zeros", 16 * MB);
    let srv = serve(&disk, &[]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    let all = pattern(9, (16 * MB) as usize);
    for chunk in 0..16u64 {
        let at = (chunk * MB) as usize;
        let r = Request::write(chunk * 2048, &all[at..at + MB as usize]);
        assert_eq!(d.run(0, &r).0, S_OK);
    }
    let mut expect = all.clone();
    let mut zero = |sector: u64, n: u32| {
        let at = (sector * 512) as usize;
        expect[at..at + n as usize * 512].fill(0);
    };
    // Partial pieces of a 64 KiB unit, a span across an object boundary,
    // and write-zeroes with and without unmap.
    let discards = [(3u64, 1u32), (130, 60), (8190, 300)];
    for (s, n) in discards {
        let st = d.simple(0, T_DISCARD, 0, dwz_segment(s, n, 0), 0).0;
        assert_eq!(st, S_OK, "discard of {n} at {s}");
        zero(s, n);
    }
    // Two ranges in one request (the thread pool's path).
    let mut two = dwz_segment(20_000, 9, 0);
    two.extend(dwz_segment(20_100, 17, 0));
    assert_eq!(d.simple(0, T_DISCARD, 0, two, 0).0, S_OK);
    zero(20_000, 9);
    zero(20_100, 17);
    for (s, n, unmap) in [(1000u64, 7u32, 0u32), (12_000, 4096, 1)] {
        let st = d
            .simple(0, T_WRITE_ZEROES, 0, dwz_segment(s, n, unmap), 0)
            .0;
        assert_eq!(st, S_OK, "write-zeroes of {n} at {s}");
        zero(s, n);
    }
    for (s, n) in [
        (0u64, 16u32),
        (128, 64),
        (8188, 310),
        (1000, 8),
        (12_000, 4096),
    ] {
        let r = Request::read(s, n as usize * 512).laid(Layout::default().chunks(65536));
        let (st, got, _) = d.run(0, &r);
        assert_eq!(st, S_OK);
        let at = (s * 512) as usize;
        assert!(got == expect[at..at + n as usize * 512], "sectors {s}+{n}");
    }
    assert!(ceph.export("zeros") == expect, "librbd reads other bytes");
    let mut srv = srv;
    srv.assert_healthy();
}

#[test]
fn a_second_target_is_refused_and_a_dead_ones_lock_is_taken_over() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    let disk = ceph.image("lock", 8 * MB);
    let mut first = serve(&disk, &[]);
    let mut d = Driver::new(&first.socket, DriverOptions::default());
    assert_eq!(d.write(0, 0, &pattern(5, 4096)), S_OK);

    // A second target: refused at start, with the reason.
    let dir = TempDir::new("rbd2");
    let sock = dir.path("s.sock");
    let log = dir.path("second.log");
    let mut second = std::process::Command::new(bin())
        .args(["--socket", sock.to_str().unwrap(), "--disk", &disk])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // It must leave by itself; one that serves is killed and fails the test.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "a second target serves: {err}"
    );
    assert!(err.contains("in use"), "{err}");
    // The first one still serves.
    assert_eq!(d.read(0, 0, 4096), (S_OK, pattern(5, 4096)));

    // SIGKILLed: the next target takes the image over (Ceph blocklists the
    // dead client once its watch times out).
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(d);
    let t = Instant::now();
    let next = serve(&disk, &[]);
    eprintln!("takeover after SIGKILL: {:?}", t.elapsed());
    let mut d = Driver::new(&next.socket, DriverOptions::default());
    assert_eq!(d.read(0, 0, 4096), (S_OK, pattern(5, 4096)));
    assert_eq!(d.write(0, 8, &pattern(6, 4096)), S_OK);
}

#[test]
fn a_resize_over_rpc_and_one_outside_the_target_reach_the_guest() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    let disk = ceph.image("grow", 8 * MB);
    let t = RpcTarget::start(&["--poll-mode", "interrupt"]);
    let sock = t.dir.path("g.sock");
    let added = t.ok(
        "device_add",
        json!({"name": "g", "socket": sock, "disk": disk}),
    );
    assert_eq!(added["size"], 8 * MB);
    let mut d = Driver::new(&sock, DriverOptions::default());
    while d.vectors[0].read().is_ok() {}
    let r = t.ok("device_resize", json!({"name": "g", "size": "16M"}));
    assert_eq!(r["size"], 16 * MB);
    assert_eq!(ceph.size("grow"), 16 * MB);
    assert_eq!(d.capacity(), 16 * MB / 512);
    wait_until("the configuration interrupt", || {
        d.vectors[0].read().is_ok()
    });
    assert_eq!(
        d.write(0, 30_000, &pattern(3, 4096)),
        S_OK,
        "past the old end"
    );

    // `rbd resize` by another client: the watch sees it, the guest is told.
    ceph.rbd(&["resize", "rbd/grow", "--size", "24M"]).unwrap();
    wait_until("the outside resize to reach the device", || {
        d.capacity() == 24 * MB / 512
    });
    wait_until("its configuration interrupt", || {
        d.vectors[0].read().is_ok()
    });
    assert_eq!(d.read(0, 30_000, 4096), (S_OK, pattern(3, 4096)));
    let list = t.ok("device_list", json!({}));
    assert_eq!(list[0]["size"], 24 * MB, "{list}");
}

#[test]
fn an_osd_that_stops_answering_fails_requests_and_io_resumes_after() {
    let _one = one_at_a_time();
    let Some(own) = own_cluster("s0") else { return };
    let ceph: &Ceph = &own;
    // A short op timeout, so that the test need not wait the default's.
    let _ = ceph.image("stall", 8 * MB);
    let disk = ceph.disk("stall", ":rados_osd_op_timeout=3");
    let srv = serve(&disk, &["--poll-mode", "interrupt"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.write(0, 0, &pattern(1, 4096)), S_OK);
    let osd = Stopped::new(ceph);
    let t = Instant::now();
    let (st, _, _) = d.run(0, &Request::write(8, &pattern(2, 4096)));
    let took = t.elapsed();
    eprintln!("a write while the OSD is stopped: status {st} after {took:?}");
    assert_eq!(st, S_IOERR);
    assert!(
        took >= Duration::from_secs(2),
        "answered before the timeout"
    );
    // Reset with the OSD still stopped: a request in flight holds it no
    // longer than the op timeout.
    let s = d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    let t = Instant::now();
    d.reset();
    eprintln!(
        "reset with a read in flight on a stopped OSD: {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(8));
    let _ = s;
    drop(osd);
    drop(d);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.read(0, 0, 4096), (S_OK, pattern(1, 4096)));
    assert_eq!(d.write(0, 8, &pattern(3, 4096)), S_OK);
    assert_eq!(d.read(0, 8, 4096), (S_OK, pattern(3, 4096)));
    let mut srv = srv;
    srv.assert_healthy();
}

/// The cluster's OSD, stopped (SIGSTOP) until dropped (SIGCONT), even when
/// the test fails.
struct Stopped(i32);

impl Stopped {
    fn new(ceph: &Ceph) -> Stopped {
        let pid = ceph.osd_pid();
        // SAFETY: a signal to the cluster's own OSD.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn with_on_error_stop_a_stalled_osd_stops_the_queue_until_the_guest_resets() {
    let _one = one_at_a_time();
    let Some(own) = own_cluster("s1") else { return };
    let ceph: &Ceph = &own;
    let _ = ceph.image("halt", 8 * MB);
    let disk = ceph.disk("halt", ":rados_osd_op_timeout=2");
    let srv = serve(&disk, &["--on-error", "stop", "--poll-mode", "interrupt"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.write(0, 0, &pattern(1, 4096)), S_OK);
    let osd = Stopped::new(ceph);
    let answered = d.used_idx(0);
    let s = d.submit(0, &Request::write(8, &pattern(2, 4096)));
    d.kick(0);
    // No answer: the queue stops (DEVICE_NEEDS_RESET) once the op times out.
    wait_long("the queue to stop", Duration::from_secs(10), || {
        srv.log_text().contains("--on-error stop")
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(0), answered, "the failed write was answered");
    let _ = s;
    drop(osd);
    d.reset();
    drop(d);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.read(0, 0, 4096), (S_OK, pattern(1, 4096)));
    assert_eq!(d.write(0, 8, &pattern(3, 4096)), S_OK);
    let mut srv = srv;
    srv.assert_healthy();
}

/// Waits until `f` holds, or panics after `limit`.
fn wait_long(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn remove_and_shutdown_finish_while_the_osd_does_not_answer() {
    let _one = one_at_a_time();
    let Some(own) = own_cluster("s2") else { return };
    let ceph: &Ceph = &own;
    let _ = ceph.image("gone1", 8 * MB);
    let _ = ceph.image("gone2", 8 * MB);
    let t = RpcTarget::start(&["--poll-mode", "interrupt"]);
    let (s1, s2) = (t.dir.path("g1.sock"), t.dir.path("g2.sock"));
    for (name, sock) in [("gone1", &s1), ("gone2", &s2)] {
        let disk = ceph.disk(name, ":rados_osd_op_timeout=3");
        t.ok(
            "device_add",
            json!({"name": name, "socket": sock, "disk": disk}),
        );
    }
    let mut d1 = Driver::new(&s1, DriverOptions::default());
    let mut d2 = Driver::new(&s2, DriverOptions::default());
    let osd = Stopped::new(ceph);
    d1.submit(0, &Request::write(0, &pattern(1, 4096)));
    d1.kick(0);
    d2.submit(0, &Request::read(0, 4096));
    d2.kick(0);
    std::thread::sleep(Duration::from_millis(200));
    // Remove answers within its bound; the device goes once its request
    // has timed out.
    let t0 = Instant::now();
    let r = t.ok("device_remove", json!({"name": "gone1", "force": true}));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    if r["stopped"] == false {
        wait_long("gone1 to stop", Duration::from_secs(10), || {
            t.log_text().contains("gone1: stopped")
        });
    }
    // Shutdown with a read in flight on the stopped OSD.
    let t0 = Instant::now();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(i32::try_from(t.child.id()).unwrap(), libc::SIGTERM) };
    let mut t = t;
    wait_long("the target to exit", Duration::from_secs(15), || {
        t.child.try_wait().unwrap().is_some()
    });
    eprintln!(
        "shutdown with a request on a stopped OSD: {:?}",
        t0.elapsed()
    );
    drop(osd);
    assert!(!t.log_text().contains("panicked"), "{}", t.log_text());
    drop(d1);
    drop(d2);
}

#[test]
fn rbd_and_file_disks_share_a_target_and_a_read_only_one_shares_the_image() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    let a = ceph.image("mix-a", 8 * MB);
    let b = ceph.image("mix-b", 8 * MB);
    let dir = TempDir::new("mix");
    let img = dir.image("f.img", 8 * MB);
    let (sb, sf, sr) = (dir.path("b.sock"), dir.path("f.sock"), dir.path("r.sock"));
    let dev = |s: &std::path::Path, disk: &str, extra: &str| {
        format!("socket={},disk={disk}{extra}", s.display())
    };
    let args = [
        "--pollers".to_string(),
        "1".into(),
        "--device".into(),
        dev(&sb, &b, ""),
        "--device".into(),
        dev(&sf, img.to_str().unwrap(), ""),
        "--device".into(),
        dev(&sr, &a, ",readonly=on"),
    ];
    let mut argv: Vec<&str> = vec!["--disk", &a];
    argv.extend(args.iter().map(String::as_str));
    let srv = ServerProcess::start_in(dir, &argv);
    let mut da = Driver::new(&srv.socket, DriverOptions::default());
    let mut db = Driver::new(&sb, DriverOptions::default());
    let mut df = Driver::new(&sf, DriverOptions::default());
    for (i, d) in [&mut da, &mut db, &mut df].into_iter().enumerate() {
        assert_eq!(d.write(0, 0, &pattern(i as u64 + 10, 8192)), S_OK);
    }
    for (i, d) in [&mut da, &mut db, &mut df].into_iter().enumerate() {
        assert_eq!(d.read(0, 0, 8192), (S_OK, pattern(i as u64 + 10, 8192)));
    }
    assert!(ceph.export("mix-b")[..8192] == pattern(11, 8192)[..]);
    // The read-only disk on image A: it reads what A's writer wrote, and
    // refuses writes.
    let mut dr = Driver::new(&sr, DriverOptions::default());
    assert_eq!(dr.read(0, 0, 8192), (S_OK, pattern(10, 8192)));
    assert_eq!(dr.write(0, 0, &pattern(1, 512)), S_IOERR);
    let mut srv = srv;
    srv.assert_healthy();
}

#[test]
fn write_through_writes_are_durable_whatever_turned_librbds_cache_on() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    // The cache turned on by the user's option (spelled as Ceph also takes
    // it), and by the image's own configuration in the cluster.
    let _ = ceph.image("wt-opt", 8 * MB);
    let _ = ceph.image("wt-img", 8 * MB);
    // (librbd's cache is write-through until it sees a flush, unless told
    // otherwise; a write-through guest never sends one.)
    for (k, v) in [
        ("rbd_cache", "true"),
        ("rbd_cache_writethrough_until_flush", "false"),
    ] {
        ceph.rbd(&["config", "image", "set", "rbd/wt-img", k, v])
            .unwrap();
    }
    let opt = ":rbd_cache=1:rbd_cache_writethrough_until_flush=false";
    for (name, extra) in [("wt-opt", opt), ("wt-img", "")] {
        let mut srv = serve(&ceph.disk(name, extra), &[]);
        // No FLUSH negotiated: every write must be durable when answered.
        let mut d = Driver::new(&srv.socket, DriverOptions::refusing(F_FLUSH));
        let data = pattern(4, 65536);
        assert_eq!(d.write(0, 64, &data), S_OK);
        srv.child.kill().unwrap();
        srv.child.wait().unwrap();
        let img = ceph.export(name);
        assert!(
            img[32768..32768 + 65536] == data[..],
            "{name}: the write was lost"
        );
        assert!(srv.log_text().contains("librbd caches writes"), "{name}");
    }
}

#[test]
fn a_read_only_disk_follows_a_resize_elsewhere_and_an_odd_size_is_served_in_whole_blocks() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    let a = ceph.image("odd", 8 * MB);
    let srv = serve(&a, &["--readonly"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    ceph.rbd(&["resize", "rbd/odd", "--size", "12M"]).unwrap();
    wait_until("the read-only disk to grow", || {
        d.capacity() == 12 * MB / 512
    });
    // An outside shrink to a size that is not whole sectors: the guest gets
    // the whole ones, and nothing past the image's end is asked of it.
    ceph.rbd(&[
        "resize",
        "rbd/odd",
        "--size",
        &format!("{}B", 6 * MB + 100),
        "--allow-shrink",
    ])
    .unwrap();
    wait_until("the shrink to reach the guest", || {
        d.capacity() == 6 * MB / 512
    });
    assert_eq!(d.read(0, 6 * MB / 512, 512).0, S_IOERR);
    let mut srv = srv;
    srv.assert_healthy();
    assert!(srv.log_text().contains("not whole 512-byte blocks"));
}

#[test]
fn a_stalled_cluster_fails_requests_within_the_default_op_timeout() {
    let _one = one_at_a_time();
    let Some(own) = own_cluster("s3") else { return };
    let ceph: &Ceph = &own;
    // The target's own timeouts (10 s), none in the disk's name.
    let disk = ceph.image("deftime", 8 * MB);
    let srv = serve(&disk, &["--poll-mode", "interrupt"]);
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.write(0, 0, &pattern(1, 4096)), S_OK);
    let osd = Stopped::new(ceph);
    let s = d.submit(0, &Request::write(8, &pattern(2, 4096)));
    d.kick(0);
    let t = Instant::now();
    let used = d.wait_used(0, 1, Duration::from_secs(20));
    eprintln!("a write on a stopped OSD answered after {:?}", t.elapsed());
    assert_eq!(used[0].0, s.head);
    assert_eq!(d.result(&s).0, S_IOERR);
    drop(osd);
    assert_eq!(d.write(0, 8, &pattern(3, 4096)), S_OK);
}

#[test]
fn closing_an_image_on_a_stalled_cluster_holds_no_other_disk_nor_the_management_plane() {
    let _one = one_at_a_time();
    let Some(own) = own_cluster("s4") else { return };
    let ceph: &Ceph = &own;
    let disk = ceph.disk("closing", ":rados_osd_op_timeout=3");
    let _ = ceph.image("closing", 8 * MB);
    let t = RpcTarget::start(&["--poll-mode", "interrupt", "--pollers", "1"]);
    let (sr, sm) = (t.dir.path("r.sock"), t.dir.path("m.sock"));
    t.ok(
        "device_add",
        json!({"name": "r", "socket": sr, "disk": disk}),
    );
    t.ok(
        "device_add",
        json!({"name": "m", "socket": sm, "disk": "ram:8M"}),
    );
    let mut dr = Driver::new(&sr, DriverOptions::default());
    let mut dm = Driver::new(&sm, DriverOptions::default());
    let osd = Stopped::new(ceph);
    dr.submit(0, &Request::write(0, &pattern(1, 4096)));
    dr.kick(0);
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    t.ok("device_remove", json!({"name": "r", "force": true}));
    let remove = t0.elapsed();
    // The memory disk on the same reactor, while the image's close waits
    // for the stopped OSD (its lock release, its watch).
    let mut worst = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(12) {
        let t1 = Instant::now();
        assert_eq!(dm.read(0, 0, 4096).0, S_OK);
        worst = worst.max(t1.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = t.ok("device_list", json!({}));
    eprintln!("remove answered in {remove:?}; the other disk's slowest read {worst:?}");
    assert!(remove < Duration::from_secs(3), "{remove:?}");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    assert_eq!(list.as_array().unwrap().len(), 1);
    drop(osd);
    drop(dr);
}

#[test]
fn the_disk_name_cannot_make_the_target_write_files_hang_on_a_fifo_or_show_a_secret() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    let _ = ceph.image("names", 8 * MB);
    let t = RpcTarget::start(&[]);
    let add = |name: &str, extra: &str| {
        let sock = t.dir.path(&format!("{name}.sock"));
        let disk = ceph.disk("names", extra);
        t.call(
            "device_add",
            json!({"name": name, "socket": sock, "disk": disk}),
        )
    };
    let planted = t.dir.path("planted.asok");
    let e = add("a", &format!(":admin_socket={}", planted.display())).unwrap_err();
    assert!(e.1.contains("may not be set"), "{e:?}");
    assert!(!planted.exists());
    let e = add("b", &format!(":log-file={}", t.dir.path("x.log").display())).unwrap_err();
    assert!(e.1.contains("may not be set"), "{e:?}");
    // A FIFO as the configuration file: refused at once, not read forever.
    let fifo = t.dir.path("conf.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a path string of ours.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sock = t.dir.path("c.sock");
    let t0 = Instant::now();
    let e = t
        .call(
            "device_add",
            json!({"name": "c", "socket": sock, "disk": format!("rbd:rbd/names:conf={}", fifo.display())}),
        )
        .unwrap_err();
    assert!(e.1.contains("not a regular file"), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // A key given in the name is used, and shown nowhere.
    let keyring = std::fs::read_to_string(ceph.dir.join("keyring")).unwrap();
    let secret = keyring
        .lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .unwrap()
        .to_string();
    add("d", &format!(":key={secret}")).unwrap();
    let shown = format!("{}{}", t.ok("device_list", json!({})), t.log_text());
    assert!(shown.contains("key=(hidden)"), "{shown}");
    assert!(!shown.contains(&secret), "{shown}");
}

/// Issue 21: a live upgrade closes nothing of an RBD disk the guest sees:
/// the old binary lets go of the image's exclusive lock just before the
/// exec, and the new one opens the image again and takes it.
#[test]
fn an_rbd_disk_opens_again_in_the_new_binary_after_a_live_upgrade() {
    let _one = one_at_a_time();
    let Some(ceph) = cluster() else { return };
    let disk = ceph.image("upgrade", 64 * MB);
    let dir = TempDir::new("rbd-upg");
    let dev = format!("socket={},disk={disk}", dir.path("d.sock").display());
    let t = RpcTarget::start(&["--device", &dev]);
    let mut d = Driver::new(&dir.path("d.sock"), DriverOptions::default());
    let mut expect = vec![0u8; (64 * MB) as usize];
    for i in 0..3u64 {
        let data = pattern(i, 65536);
        assert_eq!(d.write(0, i * 1000, &data), S_OK);
        expect[(i * 1000 * 512) as usize..][..65536].copy_from_slice(&data);
        let r = t.ok("target_upgrade", serde_json::json!({}));
        assert_eq!(r["devices"], 1, "{r}");
        assert_eq!(d.read(0, i * 1000, 65536), (S_OK, data));
    }
    assert_eq!(d.write(0, 5000, &pattern(9, 4096)), S_OK);
    expect[5000 * 512..][..4096].copy_from_slice(&pattern(9, 4096));
    drop(d);
    assert!(ceph.export("upgrade") == expect, "librbd reads other bytes");
    assert!(!t.log_text().contains("panicked"));
}
