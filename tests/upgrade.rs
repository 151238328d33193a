//! Issue 21: live upgrade. The target replaces its own binary
//! (`target_upgrade`, SIGUSR2) while clients of rust-vmm's vfio-user
//! `Client` do byte-verified I/O on a split and a packed device; every
//! upgrade that cannot go through leaves the target serving.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::driver::*;
use support::*;

/// One JSON-RPC call on a fresh connection.
use support::rpc_call as call;

/// A target with a file disk (driven through the legacy interface, split
/// rings) and a memory disk (modern interface, packed rings).
struct Two {
    t: RpcTarget,
    dir: TempDir,
    img: PathBuf,
}

fn two(extra: &[&str]) -> Two {
    two_env(extra, &[])
}

/// [`two`] with the test hooks `env` set for the target.
fn two_env(extra: &[&str], env: &[(&str, &Path)]) -> Two {
    let dir = TempDir::new("upg");
    let img = dir.path("a.img");
    let a = format!(
        "socket={},disk={},size=64M",
        dir.path("a.sock").display(),
        img.display()
    );
    let b = format!(
        "socket={},disk=ram:64M,packed=on,queues=2",
        dir.path("b.sock").display()
    );
    let mut args = vec!["--device", &a, "--device", &b];
    args.extend_from_slice(extra);
    let t = RpcTarget::start_env(&args, env);
    Two { t, dir, img }
}

impl Two {
    fn drivers(&self) -> (Driver, Driver) {
        let a = Driver::new(&self.dir.path("a.sock"), DriverOptions::default());
        let b = Driver::new(
            &self.dir.path("b.sock"),
            DriverOptions {
                modern: true,
                ..Default::default()
            },
        );
        assert!(!b.packed.is_empty(), "packed rings negotiated");
        (a, b)
    }

    fn pid(&self) -> u32 {
        self.t.child.id()
    }
}

/// One write and its read-back, then `depth` writes at once and their
/// read-backs at once, every byte compared; `round` varies the data.
fn verified_round(d: &mut Driver, q: usize, round: u64, depth: usize) {
    d.reset_alloc();
    let base = (round % 64) * 256 + q as u64 * 60_000;
    let one = pattern(round, 4096);
    assert_eq!(d.write(q, base, &one), S_OK, "round {round}");
    assert_eq!(d.read(q, base, 4096), (S_OK, one), "round {round}");
    d.reset_alloc();
    let data: Vec<Vec<u8>> = (0..depth)
        .map(|i| pattern(round * 1000 + i as u64, 4096))
        .collect();
    let writes: Vec<Submitted> = data
        .iter()
        .enumerate()
        .map(|(i, b)| d.submit(q, &Request::write(base + 8 + 8 * i as u64, b)))
        .collect();
    d.kick(q);
    d.wait_used(q, depth, Duration::from_secs(30));
    for w in &writes {
        assert_eq!(d.result(w).0, S_OK, "round {round}");
    }
    let reads: Vec<Submitted> = (0..depth)
        .map(|i| d.submit(q, &Request::read(base + 8 + 8 * i as u64, 4096)))
        .collect();
    d.kick(q);
    d.wait_used(q, depth, Duration::from_secs(30));
    for (r, want) in reads.iter().zip(&data) {
        assert_eq!(d.result(r), (S_OK, want.clone()), "round {round}");
    }
}

#[test]
fn a_hundred_upgrades_under_verified_io_lose_nothing() {
    let two = two(&[]);
    let pid = two.pid();
    let (mut a, mut b) = two.drivers();
    verified_round(&mut a, 0, 0, 32);
    verified_round(&mut b, 1, 0, 32);
    let rpc = two.t.rpc.clone();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let upgrader = std::thread::spawn(move || {
        let mut pauses = Vec::new();
        let mut fds = Vec::new();
        for i in 0..100 {
            let r = call(&rpc, "target_upgrade", json!({}))
                .unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
            assert_eq!(r["devices"], 2, "{r}");
            pauses.push(r["pause_ms"].as_f64().unwrap());
            let n = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .count();
            fds.push((n, proc_status(pid, "VmRSS:").unwrap_or(0)));
        }
        flag.store(true, Ordering::SeqCst);
        (pauses, fds)
    });
    let mut round = 1;
    while !done.load(Ordering::SeqCst) {
        for q in 0..2 {
            verified_round(&mut b, q, round, if round % 2 == 0 { 32 } else { 1 });
        }
        verified_round(&mut a, 0, round, if round % 2 == 0 { 1 } else { 32 });
        round += 1;
    }
    let (pauses, fds) = upgrader.join().unwrap();
    // Every round completed with the right bytes, across all 100, and the
    // image holds what the last writes left.
    verified_round(&mut a, 0, round, 32);
    verified_round(&mut b, 0, round, 32);
    assert!(round > 10, "I/O ran throughout ({round} rounds)");
    let base = (round % 64) * 256;
    assert_eq!(
        image_bytes(&two.img, base * 512, 4096),
        pattern(round, 4096)
    );
    // The same process all along, with as many descriptors after the last
    // upgrade as after the tenth, and no growth of memory.
    assert_eq!(two.t.child.id(), pid);
    // (Management connections come and go, the one that asked for the
    // upgrade too: the fewest open in a stretch of upgrades is what stays,
    // give or take those: under load, 27 to 35 in one stretch. A
    // descriptor lost per upgrade would be 80 more, one per ten 8 more.)
    let least = |r: std::ops::Range<usize>| fds[r].iter().map(|f| f.0).min().unwrap();
    let most_rss = |r: std::ops::Range<usize>| fds[r].iter().map(|f| f.1).max().unwrap();
    assert!(least(85..100) <= least(5..20) + 7, "descriptors: {fds:?}");
    let (rss_early, rss_late) = (most_rss(5..20), most_rss(85..100));
    assert!(
        rss_late < rss_early + (8 << 10),
        "RSS grew from {rss_early} to {rss_late} kB"
    );
    let worst = pauses.iter().cloned().fold(0.0, f64::max);
    eprintln!("100 upgrades, {round} I/O rounds; longest pause {worst:.1} ms");
    let log = two.t.log_text();
    assert_eq!(log.matches("upgrade from version").count(), 100, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The target's state after a failed upgrade: same process, still
/// serving the drivers already attached.
fn still_serving(two: &Two, a: &mut Driver, b: &mut Driver, round: u64) {
    assert!(
        call(&two.t.rpc, "target_version", json!({})).is_ok(),
        "{}",
        two.t.log_text()
    );
    verified_round(a, 0, round, 8);
    verified_round(b, 0, round, 8);
}

#[test]
fn upgrades_that_cannot_go_through_leave_the_target_serving() {
    let hooks = TempDir::new("hooks");
    let version_hook = hooks.path("version");
    let fail_hook = hooks.path("fail");
    let two = two_env(
        &[],
        &[
            ("VFIO_USER_BLK_TEST_STATE_VERSION", &version_hook),
            ("VFIO_USER_BLK_TEST_RESTORE_FAIL", &fail_hook),
        ],
    );
    let pid = two.pid();
    let (mut a, mut b) = two.drivers();
    still_serving(&two, &mut a, &mut b, 1);
    let up = |binary: Option<&Path>| {
        let p = binary.map_or(json!({}), |b| json!({ "binary": b }));
        call(&two.t.rpc, "target_upgrade", p).unwrap_err()
    };
    // A file that is not executable, and one that does not exist.
    let text = two.dir.path("not-a-binary");
    std::fs::write(&text, "hello").unwrap();
    assert!(up(Some(&text)).contains("not an executable"));
    let e = up(Some(&two.dir.path("missing")));
    assert!(e.contains("missing"), "{e}");
    still_serving(&two, &mut a, &mut b, 2);
    // A program that is not ours.
    let e = up(Some(Path::new("/bin/false")));
    assert!(e.contains("not a vfio-user-blk that takes upgrades"), "{e}");
    // A script that is executable but cannot take over.
    let script = two.dir.path("fake.sh");
    std::fs::write(&script, "#!/bin/sh\necho vfio-user-blk\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!up(Some(&script)).is_empty());
    still_serving(&two, &mut a, &mut b, 3);
    // State of a version the new binary does not read.
    std::fs::write(&version_hook, "99").unwrap();
    let e = up(None);
    assert!(e.contains("reads upgrade state up to version 1"), "{e}");
    still_serving(&two, &mut a, &mut b, 4);
    // A new binary that finds the state unusable: the old one takes it
    // back, in the same process, and says why.
    std::fs::write(&fail_hook, "").unwrap();
    let e = up(None);
    assert!(e.contains("a test asked this restore to fail"), "{e}");
    assert!(e.contains("serves on with the binary it had"), "{e}");
    still_serving(&two, &mut a, &mut b, 5);
    assert_eq!(two.t.child.id(), pid);
    // And after all that, an upgrade goes through.
    let r = call(&two.t.rpc, "target_upgrade", json!({})).unwrap();
    assert_eq!(r["devices"], 2);
    still_serving(&two, &mut a, &mut b, 6);
    assert!(!two.t.log_text().contains("panicked"));
}

/// Kills a process by PID on drop (a target that a rescue left running
/// under a new PID).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: a signal to the process this test caused to exist.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_new_binary_that_crashes_while_it_takes_over_is_rescued() {
    let hooks = TempDir::new("hooks");
    let crash = hooks.path("crash");
    let mut two = two_env(&[], &[("VFIO_USER_BLK_TEST_RESTORE_CRASH", &crash)]);
    let pid = two.pid();
    let (mut a, mut b) = two.drivers();
    verified_round(&mut a, 0, 1, 8);
    std::fs::write(&crash, "").unwrap();
    let e = call(&two.t.rpc, "target_upgrade", json!({})).unwrap_err();
    assert!(e.contains("ended before it took over"), "{e}");
    // The process that crashed is gone; the old binary serves on in the
    // watchdog's process.
    let status = two.t.child.wait().unwrap();
    assert!(!status.success());
    let v = call(&two.t.rpc, "target_version", json!({})).unwrap();
    let rescued = v["pid"].as_i64().unwrap() as i32;
    let _kill = KillOnDrop(rescued);
    assert_ne!(rescued.cast_unsigned(), pid);
    still_serving(&two, &mut a, &mut b, 2);
    // It upgrades again like any target.
    let r = call(&two.t.rpc, "target_upgrade", json!({})).unwrap();
    assert_eq!(r["devices"], 2);
    still_serving(&two, &mut a, &mut b, 3);
}

#[test]
fn sigusr2_upgrades_and_statistics_survive() {
    let two = two(&[]);
    let (mut a, mut b) = two.drivers();
    for r in 0..5 {
        verified_round(&mut a, 0, r, 4);
    }
    let before = call(&two.t.rpc, "device_stats", json!({"name": "disk0"})).unwrap();
    let reqs = before["devices"][0]["requests"].as_u64().unwrap();
    assert!(reqs >= 50, "{before}");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(two.pid().cast_signed(), libc::SIGUSR2) };
    wait_until("the upgrade by SIGUSR2", || {
        two.t.log_text().contains("upgrade from version")
    });
    let after = call(&two.t.rpc, "device_stats", json!({"name": "disk0"})).unwrap();
    assert_eq!(after["devices"][0]["requests"].as_u64().unwrap(), reqs);
    assert_eq!(
        after["devices"][0]["bytes_written"],
        before["devices"][0]["bytes_written"]
    );
    let log = two.t.log_text();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        verified_round(&mut a, 0, 9, 4);
        verified_round(&mut b, 1, 9, 4);
    }));
    if r.is_err() {
        panic!("{log}\n---\n{}", two.t.log_text());
    }
    let list = call(&two.t.rpc, "device_list", json!({})).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(list[0]["client"].is_object(), "{list}");
}

/// A target with one device on `disk` (and a driver on it).
fn one(disk: &str) -> (RpcTarget, TempDir, Driver) {
    let dir = TempDir::new("upg1");
    let dev = format!("socket={},disk={disk}", dir.path("d.sock").display());
    let t = RpcTarget::start(&["--device", &dev]);
    let d = Driver::new(&dir.path("d.sock"), DriverOptions::default());
    (t, dir, d)
}

#[test]
fn an_nbd_disk_connects_again_in_the_new_binary() {
    use support::nbd::{have, Listen, NbdServer};
    if !have("nbdkit") {
        return;
    }
    let x = TempDir::new("upg-nbd");
    let img = x.image("export.img", 64 << 20);
    let sock = x.path("nbd.sock");
    let file = format!("file={}", img.display());
    // One connection at a time, as qemu-nbd's default: the old binary's
    // must be gone before the new one's is taken.
    let nbd = NbdServer::nbdkit(
        &x,
        Listen::Unix(sock),
        &["--filter=noparallel", "file", &file],
    );
    let (t, _dir, mut d) = one(&nbd.uri(""));
    for i in 0..5 {
        verified_round(&mut d, 0, i, 16);
        let r = call(&t.rpc, "target_upgrade", json!({})).unwrap();
        assert_eq!(r["devices"], 1);
    }
    verified_round(&mut d, 0, 9, 16);
    assert_eq!(image_bytes(&img, 9 * 256 * 512, 4096), pattern(9, 4096));
}

#[test]
fn a_disk_that_does_not_drain_stops_the_upgrade_and_the_target_serves_on() {
    use support::nbd::{have, Listen, NbdServer};
    if !have("nbdkit") {
        return;
    }
    let x = TempDir::new("upg-stuck");
    let img = x.image("export.img", 64 << 20);
    let sock = x.path("nbd.sock");
    let file = format!("file={}", img.display());
    // Every read takes 8 s: longer than an upgrade waits for the drain.
    let nbd = NbdServer::nbdkit(
        &x,
        Listen::Unix(sock),
        &["--filter=delay", "file", &file, "rdelay=8"],
    );
    let (t, _dir, mut d) = one(&nbd.uri(""));
    let data = pattern(5, 4096);
    assert_eq!(d.write(0, 64, &data), S_OK);
    let stuck = d.submit(0, &Request::read(64, 4096));
    d.kick(0);
    let started = std::time::Instant::now();
    let e = call(&t.rpc, "target_upgrade", json!({})).unwrap_err();
    assert!(e.contains("still in the backend"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered before the read"
    );
    // The read completes, right, in the same process; writes go on.
    d.wait_used(0, 1, Duration::from_secs(30));
    assert_eq!(d.result(&stuck), (S_OK, data));
    assert_eq!(d.write(0, 128, &pattern(6, 4096)), S_OK);
    assert_eq!(image_bytes(&img, 128 * 512, 4096), pattern(6, 4096));
    assert!(call(&t.rpc, "target_version", json!({})).is_ok());
}

/// A request on a connection kept open, and its answer.
fn ask(
    w: &mut std::os::unix::net::UnixStream,
    r: &mut std::io::BufReader<std::os::unix::net::UnixStream>,
    id: u64,
    method: &str,
) -> Value {
    use std::io::{BufRead, Write};
    writeln!(
        w,
        "{}",
        json!({"jsonrpc": "2.0", "id": id, "method": method})
    )
    .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Adds a device named `late` to the target (its event is what the
/// subscribers below wait for).
fn add_late_device(two: &Two) {
    let sock = two.dir.path("c.sock");
    call(
        &two.t.rpc,
        "device_add",
        json!({"name": "late", "socket": sock, "disk": "null:1M"}),
    )
    .unwrap();
}

#[test]
fn management_connections_and_event_subscriptions_go_on_across_an_upgrade() {
    use std::io::BufRead;
    let two = two(&[]);
    let open = || {
        let s = std::os::unix::net::UnixStream::connect(&two.t.rpc).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = std::io::BufReader::new(s.try_clone().unwrap());
        (s, r)
    };
    let (mut w, mut r) = open();
    assert_eq!(ask(&mut w, &mut r, 1, "target_version")["id"], 1);
    let (mut ew, mut er) = open();
    assert_eq!(
        ask(&mut ew, &mut er, 2, "events_subscribe")["result"]["subscribed"],
        true
    );
    for _ in 0..3 {
        call(&two.t.rpc, "target_upgrade", json!({})).unwrap();
    }
    // The same connection is answered by the new binary.
    let v = ask(&mut w, &mut r, 3, "device_list");
    assert_eq!(v["result"].as_array().unwrap().len(), 2, "{v}");
    // And the subscriber hears of what happens after the upgrades.
    add_late_device(&two);
    let mut line = String::new();
    loop {
        line.clear();
        er.read_line(&mut line).unwrap();
        let e: Value = serde_json::from_str(&line).unwrap();
        if e["params"]["device"] == "late" {
            break;
        }
    }
}

/// A subscriber handed over by an upgrade heard nothing until its thread in
/// the new binary subscribed again: a device added at once after the
/// upgrade's answer was lost to it (seen under load, 1 run in 30). Its
/// events now start before the answer goes out.
#[test]
fn an_event_right_after_an_upgrade_reaches_a_subscriber_whose_thread_starts_late() {
    use std::io::BufRead;
    let hook = TempDir::new("late-sub");
    let late = hook.path("late");
    std::fs::write(&late, "").unwrap();
    let two = two_env(&[], &[("VFIO_USER_BLK_TEST_LATE_SUBSCRIBER", &late)]);
    let s = std::os::unix::net::UnixStream::connect(&two.t.rpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut er = std::io::BufReader::new(s.try_clone().unwrap());
    let mut ew = s;
    assert_eq!(
        ask(&mut ew, &mut er, 1, "events_subscribe")["result"]["subscribed"],
        true
    );
    call(&two.t.rpc, "target_upgrade", json!({})).unwrap();
    add_late_device(&two);
    assert!(!late.exists(), "the hook was not taken");
    let mut line = String::new();
    loop {
        line.clear();
        er.read_line(&mut line)
            .unwrap_or_else(|e| panic!("no event of the device added: {e}"));
        let e: Value = serde_json::from_str(&line).unwrap();
        if e["params"]["device"] == "late" {
            break;
        }
    }
}

#[test]
fn an_upgrade_stopped_by_one_stuck_disk_lets_every_other_device_go_on() {
    use support::nbd::{have, Listen, NbdServer};
    if !have("nbdkit") {
        return;
    }
    let x = TempDir::new("upg-stuck2");
    let img = x.image("export.img", 64 << 20);
    let file = format!("file={}", img.display());
    let nbd = NbdServer::nbdkit(
        &x,
        Listen::Unix(x.path("nbd.sock")),
        &["--filter=delay", "file", &file, "rdelay=8"],
    );
    // disk0 (stuck) is asked first, disk1 (in memory) is stopped already
    // when disk0's answer ends the upgrade.
    let a = format!("socket={},disk={}", x.path("a.sock").display(), nbd.uri(""));
    let b = format!("socket={},disk=ram:16M", x.path("b.sock").display());
    let t = RpcTarget::start(&["--device", &a, "--device", &b]);
    let mut da = Driver::new(&x.path("a.sock"), DriverOptions::default());
    let mut db = Driver::new(&x.path("b.sock"), DriverOptions::default());
    verified_round(&mut db, 0, 1, 4);
    let stuck = da.submit(0, &Request::read(64, 4096));
    da.kick(0);
    let e = call(&t.rpc, "target_upgrade", json!({})).unwrap_err();
    assert!(
        e.contains("disk0") && e.contains("still in the backend"),
        "{e}"
    );
    // disk1 was thawed: it serves at once, long before disk0's read ends
    // (a wedged device would never answer: the round runs on a thread).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        verified_round(&mut db, 0, 2, 4);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(3)).is_ok(),
        "disk1 does not serve after the upgrade gave up"
    );
    da.wait_used(0, 1, Duration::from_secs(30));
    assert_eq!(da.result(&stuck).0, S_OK);
}

#[test]
fn clients_that_come_and_go_during_upgrades_neither_stop_them_nor_get_lost() {
    let two = two(&[]);
    let sock = two.dir.path("b.sock");
    let rpc = two.t.rpc.clone();
    let upgrader = std::thread::spawn(move || {
        for i in 0..20 {
            call(&rpc, "target_upgrade", json!({})).unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
        }
    });
    // Clients connect, negotiate and leave all the while: whether one is
    // waiting to be accepted, being served or just gone when a device
    // stops, the upgrade goes through and the next client is served.
    let mut n = 0;
    while !upgrader.is_finished() {
        let mut c = vfio_user::Client::new(&sock).expect("a client connects");
        let mut id = [0u8; 4];
        c.region_read(7, 0, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x1001_1af4);
        if n % 2 == 0 {
            c.shutdown().unwrap();
        }
        n += 1;
    }
    upgrader.join().unwrap();
    assert!(n > 20, "{n} clients");
    fresh_client_works(&sock);
    let (mut a, mut b) = two.drivers();
    verified_round(&mut a, 0, 1, 8);
    verified_round(&mut b, 0, 1, 8);
}

#[test]
fn every_poll_mode_and_notify_mmap_go_on_across_upgrades() {
    for extra in [
        &["--poll-mode", "busy"][..],
        &["--poll-mode", "interrupt"][..],
        &["--notify", "mmap", "--poll-mode", "adaptive"][..],
        &["--pollers", "2", "--io-engine", "threads"][..],
    ] {
        let two = two(extra);
        let (mut a, mut b) = two.drivers();
        for i in 0..3 {
            verified_round(&mut a, 0, i, 8);
            verified_round(&mut b, 1, i, 8);
            let r = call(&two.t.rpc, "target_upgrade", json!({}))
                .unwrap_or_else(|e| panic!("{extra:?}: {e}"));
            assert_eq!(r["devices"], 2, "{extra:?}");
        }
        verified_round(&mut a, 0, 7, 32);
        verified_round(&mut b, 0, 7, 32);
    }
}

#[test]
fn interrupts_reach_the_driver_after_every_upgrade_msix_and_intx() {
    // The legacy interface with MSI-X (queue 0 on vector 1), and a second
    // client of another device with MSI-X left off: INTx (level, masked
    // by the client until it unmasks) and the ISR.
    let two = two(&[]);
    let mut a = Driver::new(&two.dir.path("a.sock"), DriverOptions::default());
    let mut b = Driver::new(
        &two.dir.path("b.sock"),
        DriverOptions {
            msix: false,
            ..Default::default()
        },
    );
    assert!(a.msix && !b.msix);
    for i in 0..4u64 {
        let (st, _, fired) = a.run_signalled(0, &Request::write(8 * i, &pattern(i, 512)));
        assert_eq!((st, fired), (S_OK, vec![1]), "MSI-X after {i} upgrade(s)");
        let (st, _, fired) = b.run_signalled(0, &Request::write(8 * i, &pattern(i, 512)));
        assert_eq!((st, fired), (S_OK, vec![INTX]), "INTx after {i} upgrade(s)");
        // The ISR says "queue" and reading it lowers the line.
        let mut isr = [0u8];
        b.c.region_read(0, 19, &mut isr).unwrap();
        assert_eq!(isr[0] & 1, 1, "ISR after {i} upgrade(s)");
        // INTx masks itself when it fires: the client unmasks it, as
        // QEMU does once the guest has taken it; every other time only
        // after the upgrade (the line's mask goes across it).
        use vfio_bindings::bindings::vfio::{
            VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_INTX_IRQ_INDEX,
        };
        let unmask = |b: &mut Driver| {
            b.c.set_irqs(
                VFIO_PCI_INTX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                0,
                1,
                &[],
            )
            .unwrap();
        };
        if i % 2 == 0 {
            unmask(&mut b);
        }
        call(&two.t.rpc, "target_upgrade", json!({})).unwrap();
        if i % 2 == 1 {
            // Still masked after the upgrade: a completion raises the
            // line and nothing fires until the client unmasks.
            assert!(
                !b.queues[0].enable_interrupts(&b.mem),
                "completions waiting"
            );
            let before = b.used_idx(0);
            let s = b.submit(0, &Request::write(8 * i + 4, &pattern(i + 100, 512)));
            b.kick(0);
            // Watch the used index without taking the entry: `wait_used`
            // would ask for the interrupt after it, and a device that
            // decides after that (under load) rightly sends none
            // (EVENT_IDX), so nothing would fire at the unmask.
            let t = Instant::now();
            while b.used_idx(0) == before && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(b.try_used(0).len(), 1, "the write completed");
            assert_eq!(b.result(&s).0, S_OK);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                b.fired(),
                Vec::<usize>::new(),
                "INTx unmasked by upgrade {i}"
            );
            unmask(&mut b);
            let t = Instant::now();
            let mut fired = b.fired();
            while fired.is_empty() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
                fired = b.fired();
            }
            assert_eq!(fired, vec![INTX], "the unmask after upgrade {i}");
            b.c.region_read(0, 19, &mut isr).unwrap();
            assert_eq!(isr[0] & 1, 1, "ISR after the unmask {i}");
            // It masked itself as it fired: taken, it is unmasked again.
            unmask(&mut b);
        }
    }
    verified_round(&mut a, 0, 9, 32);
    verified_round(&mut b, 0, 9, 32);
}
