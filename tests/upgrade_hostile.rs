//! Hostile review of the live upgrade (issue 21): clients, management
//! clients, signals and disks that misbehave around `target_upgrade`.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::driver::*;
use support::*;

/// One JSON-RPC call on a fresh connection.
use support::rpc_call as call;

fn round(d: &mut Driver, r: u64) {
    let data = pattern(r, 4096);
    assert_eq!(d.write(0, 8 * r, &data), S_OK, "round {r}");
    assert_eq!(d.read(0, 8 * r, 4096), (S_OK, data), "round {r}");
}

fn file_dev(dir: &TempDir, name: &str) -> (String, PathBuf) {
    let img = dir.path(&format!("{name}.img"));
    (
        format!(
            "name={name},socket={},disk={},size=16M",
            dir.path(&format!("{name}.sock")).display(),
            img.display()
        ),
        dir.path(&format!("{name}.sock")),
    )
}

/// Finding 1: an NBD export that does not answer at the moment of the
/// upgrade (the new binary opens every network disk again) must not take
/// the whole target, and the other tenants' local disks, down with it.
#[test]
fn an_nbd_server_down_at_upgrade_time_does_not_kill_the_target() {
    use support::nbd::{have, Listen, NbdServer};
    if !have("nbdkit") {
        return;
    }
    let x = TempDir::new("uh-nbd");
    let img = x.image("export.img", 16 << 20);
    let file = format!("file={}", img.display());
    let mut nbd = NbdServer::nbdkit(&x, Listen::Unix(x.path("nbd.sock")), &["file", &file]);
    let (local, local_sock) = file_dev(&x, "local");
    let remote = format!(
        "name=remote,socket={},disk={}",
        x.path("remote.sock").display(),
        nbd.uri("")
    );
    let mut t = RpcTarget::start(&["--device", &local, "--device", &remote]);
    let pid = t.child.id();
    let mut d = Driver::new(&local_sock, DriverOptions::default());
    round(&mut d, 1);
    // The NBD server goes away (a restart, a network blip).
    nbd.kill();
    let r = call(&t.rpc, "target_upgrade", json!({}));
    eprintln!("upgrade with the NBD server down: {r:?}");
    std::thread::sleep(Duration::from_secs(1));
    let alive = t.child.try_wait().unwrap().is_none();
    let log = t.log_text();
    assert!(alive, "the target died (pid {pid}):\n{log}");
    // The local tenant still has its disk.
    round(&mut d, 2);
}

/// Finding 2: a management client that pipelines a request after
/// `target_upgrade` (both in one write) gets an answer to each.
#[test]
fn a_request_pipelined_after_target_upgrade_is_answered() {
    let x = TempDir::new("uh-pipe");
    let (a, _) = file_dev(&x, "a");
    let t = RpcTarget::start(&["--device", &a]);
    let mut s = UnixStream::connect(&t.rpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let up = json!({"jsonrpc": "2.0", "id": 1, "method": "target_upgrade"});
    let ver = json!({"jsonrpc": "2.0", "id": 2, "method": "target_version"});
    s.write_all(format!("{up}\n{ver}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(&s);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(n) if n > 0 => {
                let v: Value = serde_json::from_str(&line).unwrap();
                ids.push(v["id"].clone());
            }
            other => panic!("answers so far {ids:?}; then {other:?}"),
        }
    }
    ids.sort_by_key(|v| v.as_i64());
    assert_eq!(ids, vec![json!(1), json!(2)]);
}

/// Finding 3: one tenant's client that stops in the middle of a message
/// must not veto every upgrade of the target (nor hold its device thread
/// forever).
#[test]
fn a_client_stalled_mid_message_does_not_veto_upgrades() {
    let x = TempDir::new("uh-stall");
    let (a, a_sock) = file_dev(&x, "a");
    let (b, b_sock) = file_dev(&x, "b");
    let t = RpcTarget::start(&["--device", &a, "--device", &b]);
    let mut good = Driver::new(&b_sock, DriverOptions::default());
    round(&mut good, 1);
    // Half a header, then nothing.
    let mut hostile = Raw::negotiated(&a_sock);
    hostile.send(&header(7, 2, 16, 0)[..6]);
    std::thread::sleep(Duration::from_millis(200));
    let mut last = Err(String::new());
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        last = call(&t.rpc, "target_upgrade", json!({}));
        if last.is_ok() {
            break;
        }
    }
    assert!(
        last.is_ok(),
        "every upgrade for 30 s refused: {last:?}\n{}",
        t.log_text()
    );
    round(&mut good, 2);
}

/// Finding 4: SIGTERM while an upgrade waits for a slow disk to drain
/// stops the target; it is not lost in the exec (the target serving on
/// forever), nor answered by a rescue under a new PID.
#[test]
fn sigterm_during_an_upgrade_stops_the_target() {
    use support::nbd::{have, Listen, NbdServer};
    if !have("nbdkit") {
        return;
    }
    let x = TempDir::new("uh-term");
    let img = x.image("export.img", 16 << 20);
    let file = format!("file={}", img.display());
    // Reads take 2 s: the upgrade waits for one, within its drain limit.
    let nbd = NbdServer::nbdkit(
        &x,
        Listen::Unix(x.path("nbd.sock")),
        &["--filter=delay", "file", &file, "rdelay=2"],
    );
    let dev = format!(
        "name=remote,socket={},disk={}",
        x.path("d.sock").display(),
        nbd.uri("")
    );
    let mut t = RpcTarget::start(&["--device", &dev]);
    let pid = t.child.id();
    let mut d = Driver::new(&x.path("d.sock"), DriverOptions::default());
    let slow = d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    std::thread::sleep(Duration::from_millis(200));
    let rpc = t.rpc.clone();
    let up = std::thread::spawn(move || call(&rpc, "target_upgrade", json!({})));
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid.cast_signed(), libc::SIGTERM) };
    let _ = up.join();
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            panic!(
                "SIGTERM during the upgrade was lost: the target still runs\n{}",
                t.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = slow;
}

/// Finding 5: an upgrade that waits for one tenant's slow disk to drain
/// holds every other device stopped meanwhile; QEMU waits 5 s for any
/// reply and then gives the device up. A healthy tenant's message must be
/// answered well within that, whether the upgrade goes through or not.
#[test]
fn a_slow_disk_does_not_hold_other_tenants_past_qemus_reply_wait() {
    use support::nbd::{have, Listen, NbdServer};
    if !have("nbdkit") {
        return;
    }
    let x = TempDir::new("uh-slow");
    let img = x.image("export.img", 16 << 20);
    let file = format!("file={}", img.display());
    // Every read takes 8 s: longer than an upgrade waits for the drain.
    let nbd = NbdServer::nbdkit(
        &x,
        Listen::Unix(x.path("nbd.sock")),
        &["--filter=delay", "file", &file, "rdelay=8"],
    );
    let slow = format!(
        "name=slow,socket={},disk={}",
        x.path("slow.sock").display(),
        nbd.uri("")
    );
    let (healthy, healthy_sock) = file_dev(&x, "healthy");
    let t = RpcTarget::start(&["--device", &slow, "--device", &healthy]);
    let mut d = Driver::new(&x.path("slow.sock"), DriverOptions::default());
    let _stuck = d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    let mut other = Raw::negotiated(&healthy_sock);
    other
        .s
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let rpc = t.rpc.clone();
    let up = std::thread::spawn(move || call(&rpc, "target_upgrade", json!({})));
    std::thread::sleep(Duration::from_millis(300));
    // The healthy tenant's QEMU reads its config space.
    let started = Instant::now();
    let r = other.call(9, &region_read_payload(7, 0, 4));
    let took = started.elapsed();
    assert_eq!(r.error, 0);
    let e = up.join().unwrap();
    eprintln!("upgrade: {e:?}; the healthy tenant waited {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "a healthy tenant's message waited {took:?} for another's disk (QEMU gives up at 5 s)"
    );
}

/// Finding 6: an upgrade that gives up on one device (here a disk that
/// does not drain, named first) must let every other device go on: one
/// that had stopped and whose answer was not read yet stayed stopped
/// forever (its guest's I/O and its client's messages never answered).
#[test]
fn a_failed_upgrade_leaves_no_device_stopped() {
    use support::nbd::{have, Listen, NbdServer};
    if !have("nbdkit") {
        return;
    }
    let x = TempDir::new("uh-wedge");
    let img = x.image("export.img", 16 << 20);
    let file = format!("file={}", img.display());
    let nbd = NbdServer::nbdkit(
        &x,
        Listen::Unix(x.path("nbd.sock")),
        &["--filter=delay", "file", &file, "rdelay=8"],
    );
    // "a" (the slow one) is asked first, "b" after.
    let slow = format!(
        "name=a,socket={},disk={}",
        x.path("a.sock").display(),
        nbd.uri("")
    );
    let (healthy, healthy_sock) = file_dev(&x, "b");
    let t = RpcTarget::start(&["--device", &slow, "--device", &healthy]);
    let mut s = Driver::new(&x.path("a.sock"), DriverOptions::default());
    let mut b = Driver::new(&healthy_sock, DriverOptions::default());
    round(&mut b, 1);
    let _stuck = s.submit(0, &Request::read(0, 4096));
    s.kick(0);
    std::thread::sleep(Duration::from_millis(200));
    let e = call(&t.rpc, "target_upgrade", json!({})).unwrap_err();
    assert!(e.contains("still in the backend"), "{e}");
    // b serves on: a write and its read-back, answered in time (on a
    // thread: a stopped device never answers the doorbell's message, and
    // rust-vmm's client waits for it forever).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let data = pattern(2, 4096);
        let ok = b.write(0, 16, &data) == S_OK && b.read(0, 16, 4096) == (S_OK, data);
        let _ = tx.send(ok);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(ok) => assert!(ok, "b answered wrong"),
        Err(_) => panic!(
            "b stayed stopped after the failed upgrade: its doorbell was never answered\n{}",
            t.log_text()
        ),
    }
}
