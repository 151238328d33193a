//! Issue 22, from the hostile review of limits, the configuration file
//! and events: each test holds the input of a finding and failed on the
//! code before its fix (or, for the last ones, holds what held up: a
//! limited device torn down with its ring full, limits flipped under load,
//! subscriptions that leak nothing).
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::driver::*;
use support::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Waits for `n` completions on queue 0 for at most `secs`: how many came.
fn used_within(d: &mut Driver, n: usize, secs: f64) -> usize {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut got = 0;
    while got < n && Instant::now() < end {
        got += d.try_used(0).len();
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

/// utime+stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn subscribe_raw(rpc: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let mut s = UnixStream::connect(rpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send_request(&mut s, 1, "events_subscribe");
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"subscribed\":true"), "{line}");
    (s, r)
}

/// Resizes a ram disk back and forth from `n` threads until `stop`: a
/// storm of `resized` events.
fn resize_storm<'a>(
    sc: &'a std::thread::Scope<'a, '_>,
    rpc: &'a Path,
    stop: &'a std::sync::atomic::AtomicBool,
    n: usize,
) {
    for _ in 0..n {
        sc.spawn(move || {
            let mut s = UnixStream::connect(rpc).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let size = if i.is_multiple_of(2) { "2M" } else { "1M" };
                i += 1;
                let req = json!({"jsonrpc": "2.0", "id": i, "method": "device_resize",
                                 "params": {"name": "r", "size": size, "shrink": true}});
                if writeln!(s, "{req}").is_err() {
                    return;
                }
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
            }
        });
    }
}

/// utime+stime of each thread of `pid` whose name starts with `prefix`.
fn thread_ticks(pid: u32, prefix: &str) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let p = e.unwrap().path();
        let comm = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if !comm.starts_with(prefix) {
            continue;
        }
        let s = std::fs::read_to_string(p.join("stat")).unwrap();
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        v.push((
            comm,
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap(),
        ));
    }
    v.sort();
    v
}

fn tasks(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn sigterm(t: &RpcTarget) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(i32::try_from(t.child.id()).unwrap(), libc::SIGTERM) };
}

fn saved_names(cfg: &Path) -> Vec<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(cfg).unwrap()).unwrap();
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

/// A tiny byte limit makes a queue wait (up to an hour); lifting or
/// raising the limit with device_set_qos must let the waiting requests
/// in at once ("they apply from its next request").
#[test]
fn lifting_a_limit_releases_a_waiting_queue() {
    let t = RpcTarget::start(&["--pollers", "1", "--poll-mode", "interrupt"]);
    t.ok(
        "device_add",
        json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1G", "bps": "1"}),
    );
    let mut d = Driver::new(&t.dir.path("q.sock"), DriverOptions::default());
    // The first goes in (the bucket holds 1 byte), and puts it 4095 bytes
    // below zero: 4095 s at 1 B/s (capped at 3600 s).
    assert_eq!(d.read(0, 0, 4096).0, S_OK);
    d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    assert_eq!(
        used_within(&mut d, 1, 0.5),
        0,
        "held by the limit, as it should be"
    );
    // The operator lifts the limit.
    t.ok("device_set_qos", json!({"name": "q", "bps": 0}));
    let l = t.ok("device_list", json!({"name": "q"}));
    assert_eq!(l[0]["qos"]["bps"], 0);
    // A doorbell too, as a guest would ring for a new request.
    d.submit(0, &Request::read(0, 4096));
    d.force_kick(0);
    let got = used_within(&mut d, 2, 3.0);
    assert_eq!(
        got, 2,
        "limit lifted, but the queue still waits out the old limit's debt (up to 1 h)"
    );
}

/// The same with the limit raised (not lifted): bps=1 -> 1G.
#[test]
fn raising_a_limit_releases_a_waiting_queue() {
    let t = RpcTarget::start(&["--pollers", "1"]);
    t.ok(
        "device_add",
        json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1G", "iops": "1"}),
    );
    let mut d = Driver::new(&t.dir.path("q.sock"), DriverOptions::default());
    // iops=1: take the token, then queue one more (waits ~1 s)...
    assert_eq!(d.read(0, 0, 4096).0, S_OK);
    t.ok("device_set_qos", json!({"name": "q", "bps": "1"}));
    // a 1 MiB read gets in on the iops token? (it waits for iops first)
    std::thread::sleep(Duration::from_millis(1100));
    d.submit(0, &Request::read(0, 1 << 20));
    d.kick(0);
    assert_eq!(
        used_within(&mut d, 1, 0.5),
        1,
        "the 1 MiB read goes in (debt)"
    );
    d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    assert_eq!(used_within(&mut d, 1, 0.5), 0, "and the next waits");
    t.ok(
        "device_set_qos",
        json!({"name": "q", "iops": 0, "bps": "1G"}),
    );
    d.submit(0, &Request::read(0, 4096));
    d.force_kick(0);
    let got = used_within(&mut d, 2, 3.0);
    assert_eq!(got, 2, "limit raised to 1G/s, queue still held by old debt");
}

/// The answer to an over-long line goes out on the bare stream, not
/// through the lock the event thread writes under: on a subscribed
/// connection it can land in the middle of an event line.
#[test]
fn an_overlong_line_error_interleaves_with_events() {
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "r", "socket": t.dir.path("r.sock"), "disk": "ram:1M"}),
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut bad = Vec::new();
    let mut trials = 0;
    std::thread::scope(|sc| {
        resize_storm(sc, &t.rpc, &stop, 2);
        let big = vec![b'x'; (1 << 20) + 8192];
        let end = Instant::now() + Duration::from_secs(8);
        while Instant::now() < end && bad.is_empty() {
            trials += 1;
            let (s, mut r) = subscribe_raw(&t.rpc);
            let w = s.try_clone().unwrap();
            let big = big.clone();
            let writer = std::thread::spawn(move || {
                let mut w = w;
                let _ = w.write_all(&big);
            });
            let mut all = Vec::new();
            let _ = r.read_to_end(&mut all);
            let _ = writer.join();
            let _ = s.shutdown(std::net::Shutdown::Both);
            for l in String::from_utf8_lossy(&all).lines() {
                if serde_json::from_str::<Value>(l).is_err() {
                    bad.push(l.to_string());
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(
        bad.is_empty(),
        "after {trials} trials, lines that are not JSON: {:?}",
        bad.iter()
            .map(|l| &l[..l.len().min(300)])
            .collect::<Vec<_>>()
    );
}

/// A hostile VMM client that resets its device in a loop floods every
/// subscriber: the operator loses events about other devices (here the
/// `device_added` of a device it adds during the flood).
#[test]
fn a_guest_reset_loop_crowds_out_other_devices_events() {
    use vfio_bindings::bindings::vfio::VFIO_PCI_BAR0_REGION_INDEX as BAR0;
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "evil", "socket": t.dir.path("evil.sock"), "disk": "null:1M"}),
    );
    let mut d = Driver::new(&t.dir.path("evil.sock"), DriverOptions::default());
    let (_s, mut r) = subscribe_raw(&t.rpc);
    // The subscriber reads, but slowly (a line every 1 ms, as a busy
    // management daemon might).
    let pid = t.child.id();
    let c0 = cpu_ticks(pid);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut n = 0u64;
    let (heard, lost, other) = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let mut heard = 0u64;
            let mut lost = 0u64;
            let mut other = 0;
            let end = Instant::now() + Duration::from_secs(4);
            while Instant::now() < end {
                let mut l = String::new();
                if r.read_line(&mut l).unwrap_or(0) == 0 {
                    break;
                }
                let v: Value = serde_json::from_str(&l).unwrap();
                if v["method"] == "events_lost" {
                    lost += v["params"]["count"].as_u64().unwrap();
                } else {
                    heard += 1;
                    if v["params"]["device"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("victim")
                    {
                        other += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (heard, lost, other)
        });
        let tt = &t;
        sc.spawn(move || {
            for k in 0..5 {
                std::thread::sleep(Duration::from_millis(300));
                let n = format!("victim{k}");
                tt.ok("device_add", json!({"name": n, "socket": tt.dir.path(&format!("{n}.sock")), "disk": "null:1M"}));
                tt.ok("device_remove", json!({"name": n}));
            }
        });
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            d.c.region_write(BAR0, 18, &[7]).unwrap();
            d.c.region_write(BAR0, 18, &[0]).unwrap();
            n += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap()
    });
    let c1 = cpu_ticks(pid);
    eprintln!(
        "{n} resets in 2 s; subscriber heard {heard}, told {lost} lost; heard {other} of the 10 device_added/removed events of 5 other devices; target CPU {} ticks",
        c1 - c0
    );
    assert_eq!(
        other, 10,
        "device_added/device_removed of other devices dropped in a guest's flood"
    );
}

/// device_set_qos reads the limits, changes the keys given and writes
/// them back, unlocked: two operators setting different keys at once
/// can undo each other's change, and the answer says it succeeded.
#[test]
fn concurrent_set_qos_of_different_keys_loses_one() {
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1M"}),
    );
    let mut lost = 0;
    for i in 1..=300u64 {
        std::thread::scope(|sc| {
            sc.spawn(|| t.ok("device_set_qos", json!({"name": "q", "iops": i})));
            sc.spawn(|| t.ok("device_set_qos", json!({"name": "q", "bps": i * 1000})));
        });
        let q = &t.ok("device_list", json!({"name": "q"}))[0]["qos"];
        if q["iops"] != i || q["bps"] != i * 1000 {
            lost += 1;
        }
    }
    assert_eq!(
        lost, 0,
        "{lost} of 300 rounds lost one of two concurrent device_set_qos"
    );
}

/// The event thread starts before the answer to events_subscribe is
/// written: under a stream of events the first line can be an event, and
/// `vfio-user-blk rpc ... events_subscribe` then drops it unprinted.
#[test]
fn an_event_can_precede_the_subscribe_answer() {
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "r", "socket": t.dir.path("r.sock"), "disk": "ram:1M"}),
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut first_not_answer = 0;
    let trials = 300;
    std::thread::scope(|sc| {
        resize_storm(sc, &t.rpc, &stop, 2);
        for _ in 0..trials {
            let mut s = UnixStream::connect(&t.rpc).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            send_request(&mut s, 1, "events_subscribe");
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if !line.contains("\"id\":1") {
                first_not_answer += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    eprintln!("{first_not_answer} of {trials} subscriptions got an event before their answer");
    assert_eq!(first_not_answer, 0);
}

/// The command line's device, removed and added again over RPC (say with
/// two queues), is saved; at the next start the command line brings it
/// too: the whole target used to refuse to start. The command line's
/// wins, and the target starts.
#[test]
fn a_command_line_device_re_added_over_rpc_blocks_the_next_start() {
    let keep = TempDir::new("cfgcli");
    let cfg = keep.path("vub.json");
    let sock = keep.path("vm.sock");
    let cli = format!("socket={},disk=ram:1M,name=vm", s(&sock));
    let args = ["--config", s(&cfg), "--device", &cli];
    {
        let mut t = RpcTarget::start(&args);
        t.ok("device_remove", json!({"name": "vm"}));
        t.ok(
            "device_add",
            json!({"name": "vm", "socket": sock, "disk": "ram:1M", "queues": 2}),
        );
        assert_eq!(saved_names(&cfg), ["vm"]);
        sigterm(&t);
        let _ = t.child.wait();
    }
    let rpc = keep.path("r2.sock");
    let mut a = vec!["--rpc-socket", s(&rpc)];
    a.extend_from_slice(&args);
    let (exited, status, err) = run_bin(&a, Duration::from_secs(5));
    eprintln!(
        "restart: exited={exited} {status}: {}",
        err.lines().last().unwrap_or("")
    );
    assert!(!exited, "the target did not come back: {err}");
}

/// A config_save that arrives while the target shuts down (its device
/// table already emptied, a slow disk still draining) used to write an
/// empty file: every device was forgotten at the next start.
#[test]
fn config_save_during_shutdown_empties_the_file() {
    if !support::nbd::have("nbdkit") {
        return;
    }
    let keep = TempDir::new("cfgsd");
    let cfg = keep.path("vub.json");
    let nbd = keep.path("nbd.sock");
    // An NBD export whose reads take 8 s: a request stays in flight.
    let mut nbdkit = std::process::Command::new("nbdkit")
        .args([
            "-f",
            "--exit-with-parent",
            "-U",
            s(&nbd),
            "--filter=delay",
            "memory",
            "1M",
            "rdelay=8",
        ])
        .spawn()
        .unwrap();
    wait_until("nbdkit", || nbd.exists());
    let slow = format!(
        "socket={},disk=nbd+unix:///?socket={},name=slow",
        s(&keep.path("slow.sock")),
        s(&nbd)
    );
    let mut t = RpcTarget::start(&["--config", s(&cfg), "--device", &slow]);
    for n in ["a", "b"] {
        t.ok(
            "device_add",
            json!({"name": n, "socket": keep.path(&format!("{n}.sock")), "disk": "ram:1M"}),
        );
    }
    t.ok("config_save", json!({}));
    assert_eq!(saved_names(&cfg), ["a", "b"]);
    let mut d = Driver::new(&keep.path("slow.sock"), DriverOptions::default());
    d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    std::thread::sleep(Duration::from_millis(200));
    // A management connection opened before the signal (a daemon's).
    let mut c = UnixStream::connect(&t.rpc).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sigterm(&t);
    std::thread::sleep(Duration::from_millis(500));
    send_request(&mut c, 1, "config_save");
    let mut line = String::new();
    let _ = BufReader::new(&c).read_line(&mut line);
    assert!(line.contains("shutting down"), "{line}");
    let t0 = Instant::now();
    while t.child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    assert_eq!(
        saved_names(&cfg),
        ["a", "b"],
        "the saved devices were wiped by a save during shutdown"
    );
}

/// A queue over its limit whose ring then leaves guest memory (the VMM
/// unmaps the window, as QEMU does while firmware remaps RAM) kept a
/// wake-up time that had passed: poll() returned before clearing it, the
/// reactor's sleep() found it in the past, and the reactor spun.
#[test]
fn a_stale_qos_deadline_with_an_unmapped_ring_spins_the_reactor() {
    let t = RpcTarget::start(&["--pollers", "1", "--poll-mode", "interrupt"]);
    t.ok(
        "device_add",
        json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1G", "iops": "10"}),
    );
    let mut d = Driver::new(&t.dir.path("q.sock"), DriverOptions::default());
    for _ in 0..32 {
        d.submit(
            0,
            &Request::read(0, 4096).laid(Layout::default().indirect()),
        );
    }
    d.force_kick(0);
    std::thread::sleep(Duration::from_millis(300));
    let pid = t.child.id();
    let a = thread_ticks(pid, "reactor");
    std::thread::sleep(Duration::from_secs(1));
    let b = thread_ticks(pid, "reactor");
    let before = b[0].1 - a[0].1;
    d.c.dma_unmap(0, 64 << 20).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let a = thread_ticks(pid, "reactor");
    std::thread::sleep(Duration::from_secs(2));
    let b = thread_ticks(pid, "reactor");
    let after = (b[0].1 - a[0].1) / 2;
    eprintln!("reactor CPU %: throttled {before}, ring unmapped {after}");
    assert!(
        after < 20,
        "the reactor spins ({after}% of a core) with nothing it can do"
    );
}

/// A device wedged by its limit (bps=1, a full ring waiting) is torn
/// down promptly: a driver reset, a forced remove, SIGTERM.
#[test]
fn a_throttled_device_with_a_full_ring_tears_down() {
    let t = RpcTarget::start(&["--pollers", "2", "--poll-mode", "adaptive"]);
    t.ok(
        "device_add",
        json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1G", "bps": "1",
               "queues": 2}),
    );
    let mut d = Driver::new(&t.dir.path("q.sock"), DriverOptions::default());
    assert_eq!(d.read(0, 0, 4096).0, S_OK);
    let qs = d.queues[0].size as usize;
    for q in 0..2 {
        for _ in 0..qs {
            d.submit(
                q,
                &Request::read(0, 4096).laid(Layout::default().indirect()),
            );
        }
        d.force_kick(q);
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    d.reset();
    eprintln!("reset with a full throttled ring took {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(2));
    // A new activation works at once... within its limit (still bps=1).
    t.ok("device_set_qos", json!({"name": "q", "bps": 0}));
    drop(d);
    let mut d = Driver::new(&t.dir.path("q.sock"), DriverOptions::default());
    assert_eq!(d.read(0, 0, 4096).0, S_OK);
    t.ok("device_set_qos", json!({"name": "q", "bps": 1}));
    assert_eq!(d.read(0, 0, 4096).0, S_OK);
    for _ in 0..qs {
        d.submit(
            0,
            &Request::read(0, 4096).laid(Layout::default().indirect()),
        );
    }
    d.force_kick(0);
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let r = t.ok("device_remove", json!({"name": "q", "force": true}));
    eprintln!("remove: {r} in {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(!t.log_text().contains("panicked"));
}

/// QD128 on two queues on two reactors while another thread flips the
/// limits every millisecond (values >= 1000 so that no single request
/// builds a long debt); then everything lifted: all must complete.
#[test]
fn toggling_limits_under_load_on_two_reactors() {
    let t = RpcTarget::start(&["--pollers", "2", "--poll-mode", "adaptive"]);
    t.ok(
        "device_add",
        json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1G", "queues": 2}),
    );
    let mut d = Driver::new(
        &t.dir.path("q.sock"),
        DriverOptions {
            ram_size: 256 << 20,
            ..Default::default()
        },
    );
    assert_eq!(d.queues.len(), 2);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let flips = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let vals = [
                json!({"iops": 1000}),
                json!({"iops": 0, "bps": "4M"}),
                json!({"bps": 0, "read-bps": "1G", "iops": 1125899906842624u64}),
                json!({"read-bps": 0, "iops": 0, "bps": 1125899906842624u64}),
                json!({"iops": 0, "bps": 0, "read-bps": 0, "write-bps": 0}),
                json!({"write-bps": "1K", "iops": 5000}),
            ];
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut p = vals[n % vals.len()].clone();
                p["name"] = json!("q");
                t.ok("device_set_qos", p);
                n += 1;
            }
            n
        });
        let end = Instant::now() + Duration::from_secs(3);
        for q in 0..2 {
            for _ in 0..128 {
                d.submit(
                    q,
                    &Request::read(0, 4096).laid(Layout::default().indirect()),
                );
            }
            d.force_kick(q);
        }
        let mut done = 0;
        while Instant::now() < end {
            for q in 0..2 {
                let u = d.try_used(q);
                done += u.len();
                for _ in 0..u.len() {
                    d.submit(
                        q,
                        &Request::read(0, 4096).laid(Layout::default().indirect()),
                    );
                }
                if !u.is_empty() {
                    d.kick(q);
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = h.join().unwrap();
        eprintln!("{n} flips, {done} requests");
        n
    });
    assert!(flips > 10);
    t.ok(
        "device_set_qos",
        json!({"name": "q", "iops": 0, "bps": 0, "read-bps": 0, "write-bps": 0}),
    );
    for q in 0..2 {
        d.force_kick(q);
        d.wait_used(q, 128, Duration::from_secs(5));
    }
    assert!(!t.log_text().contains("panicked"), "{}", t.log_text());
}

/// Subscribe/close cycles (orderly, abrupt, never-reading, with a batch)
/// leave no thread, descriptor or subscriber place behind.
#[test]
fn subscribe_cycles_leak_nothing() {
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "r", "socket": t.dir.path("r.sock"), "disk": "ram:1M"}),
    );
    let pid = t.child.id();
    std::thread::sleep(Duration::from_millis(200));
    let (t0, f0) = (tasks(pid), fds(pid));
    for i in 0..200 {
        let (s, r) = subscribe_raw(&t.rpc);
        match i % 4 {
            0 => drop((s, r)),
            1 => {
                s.shutdown(std::net::Shutdown::Write).unwrap();
                drop(r);
            }
            2 => {
                // A batch that subscribes twice and asks the version.
                let mut s = s;
                writeln!(
                    s,
                    "{}",
                    json!([
                    {"jsonrpc": "2.0", "id": 2, "method": "events_subscribe"},
                    {"jsonrpc": "2.0", "id": 3, "method": "events_subscribe"},
                    {"jsonrpc": "2.0", "id": 4, "method": "target_version"}])
                )
                .unwrap();
                let mut r = r;
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
            }
            _ => {
                // trigger events, never read them
                t.ok("device_resize", json!({"name": "r", "size": "2M"}));
                t.ok(
                    "device_resize",
                    json!({"name": "r", "size": "1M", "shrink": true}),
                );
                drop((s, r));
            }
        }
    }
    // All 8 places free again.
    wait_until("places back", || {
        let subs: Vec<_> = (0..8)
            .map(|_| {
                let mut s = UnixStream::connect(&t.rpc).unwrap();
                send_request(&mut s, 1, "events_subscribe");
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                (s, l)
            })
            .collect();
        subs.iter().all(|(_, l)| l.contains("subscribed\":true"))
    });
    std::thread::sleep(Duration::from_millis(1000));
    let (t1, f1) = (tasks(pid), fds(pid));
    eprintln!("threads {t0} -> {t1}, fds {f0} -> {f1}");
    assert!(
        t1 <= t0 + 2 && f1 <= f0 + 2,
        "threads {t0} -> {t1}, fds {f0} -> {f1}"
    );
}

/// In adaptive mode, each wake for a limit's tokens let one request in and
/// was followed by the adaptive spin: a device at iops=5000 with a full
/// ring kept its reactor at 96-100% of a core (12% since).
#[test]
fn a_limited_device_does_not_keep_its_reactor_spinning() {
    let t = RpcTarget::start(&["--pollers", "1", "--poll-mode", "adaptive"]);
    t.ok(
        "device_add",
        json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1G", "iops": "5000"}),
    );
    let mut d = Driver::new(&t.dir.path("q.sock"), DriverOptions::default());
    for _ in 0..64 {
        d.submit(0, &Request::read(0, 4096));
    }
    d.force_kick(0);
    std::thread::sleep(Duration::from_millis(100));
    let pid = t.child.id();
    let a = cpu_ticks(pid);
    let end = Instant::now() + Duration::from_secs(2);
    let mut done = 0;
    while Instant::now() < end {
        let u = d.try_used(0);
        done += u.len();
        for _ in 0..u.len() {
            d.submit(0, &Request::read(0, 4096));
        }
        if !u.is_empty() {
            d.kick(0);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let cpu = (cpu_ticks(pid) - a) as f64 / 2.0;
    eprintln!("iops=5000, a full ring: {done} done in 2 s, the target at {cpu}% of a core");
    assert!((9000..=11000).contains(&done), "{done} in 2 s at iops=5000");
    assert!(
        cpu < 50.0,
        "the target took {cpu}% of a core for 5000 requests a second"
    );
}

/// WRITE_ZEROES escaped a write limit: 3.4 TB/s zeroed under
/// write-bps=1M. It counts as the bytes it writes.
#[test]
fn write_zeroes_counts_against_a_write_byte_limit() {
    let dir = on_disk("wz");
    let img = dir.image("disk.img", 64 << 20);
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "w", "socket": t.dir.path("w.sock"), "disk": img, "write-bps": "1M"}),
    );
    let mut d = Driver::new(&t.dir.path("w.sock"), DriverOptions::default());
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        // 64 KiB a request: 16 a second at 1 MiB/s.
        let st = d
            .simple(0, T_WRITE_ZEROES, 0, dwz_segment(n % 64 * 128, 128, 0), 0)
            .0;
        assert_eq!(st, S_OK);
        n += 1;
    }
    assert!(
        (28..=38).contains(&n),
        "{n} write-zeroes of 64 KiB in 2 s under write-bps=1M"
    );
}

/// A saved image that vanished (storage not mounted yet at boot) used to
/// come back empty: the saved entry kept the size= it was created with.
/// Now the start stops, naming it, and nothing is created.
#[test]
fn a_vanished_image_stops_the_start_and_is_not_created_again() {
    let keep = TempDir::new("cfgvan");
    let cfg = keep.path("vub.json");
    let img = keep.path("vm.img");
    let sock = keep.path("vm.sock");
    {
        let mut t = RpcTarget::start(&["--config", s(&cfg)]);
        t.ok(
            "device_add",
            json!({"name": "vm", "socket": sock, "disk": img, "size": "4M"}),
        );
        sigterm(&t);
        let _ = t.child.wait();
    }
    std::fs::remove_file(&img).unwrap();
    let rpc = keep.path("r.sock");
    let (exited, status, err) = run_bin(
        &["--rpc-socket", s(&rpc), "--config", s(&cfg)],
        Duration::from_secs(5),
    );
    assert!(exited && !status.success(), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(
        !img.exists(),
        "a blank image was created where the saved disk was"
    );
}

/// A change whose autosave failed was answered as a plain success: the
/// operator was not told it would not survive a restart.
#[test]
fn a_failed_autosave_is_in_the_answer() {
    let keep = TempDir::new("cfgro");
    let dir = keep.path("conf");
    std::fs::create_dir(&dir).unwrap();
    let cfg = dir.join("vub.json");
    let t = RpcTarget::start(&["--config", s(&cfg)]);
    t.ok(
        "device_add",
        json!({"name": "a", "socket": keep.path("a.sock"), "disk": "ram:1M"}),
    );
    assert_eq!(saved_names(&cfg), ["a"]);
    // The folder goes away (a file system unmounted under it).
    std::fs::remove_file(&cfg).unwrap();
    std::fs::remove_dir(&dir).unwrap();
    let r = t.ok(
        "device_add",
        json!({"name": "b", "socket": keep.path("b.sock"), "disk": "ram:1M"}),
    );
    assert_eq!(r["config_saved"], false, "{r}");
    assert!(r["config_error"].as_str().unwrap().contains("conf"), "{r}");
    let q = t.ok("device_set_qos", json!({"name": "a", "iops": 100}));
    assert_eq!(q["config_saved"], false, "{q}");
    // The device was added all the same.
    assert_eq!(t.ok("device_list", json!({})).as_array().unwrap().len(), 2);
}
