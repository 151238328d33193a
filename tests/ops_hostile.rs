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
    threads_named(pid, prefix)
        .into_iter()
        .map(|t| (t.name, t.ticks))
        .collect()
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

/// Starts the target again with `args` (and a management socket at
/// `rpc`): it must come up and stay up.
fn comes_back(rpc: &Path, args: &[&str]) {
    let mut a = vec!["--rpc-socket", s(rpc)];
    a.extend_from_slice(args);
    let (exited, status, err) = run_bin(&a, Duration::from_secs(5));
    assert!(!exited, "the target did not come back ({status}): {err}");
}

fn saved_names(cfg: &Path) -> Vec<String> {
    saved(cfg)
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
        used_within_on(&mut d, 0, 1, 0.5).0,
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
    let got = used_within_on(&mut d, 0, 2, 3.0).0;
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
        used_within_on(&mut d, 0, 1, 0.5).0,
        1,
        "the 1 MiB read goes in (debt)"
    );
    d.submit(0, &Request::read(0, 4096));
    d.kick(0);
    assert_eq!(used_within_on(&mut d, 0, 1, 0.5).0, 0, "and the next waits");
    t.ok(
        "device_set_qos",
        json!({"name": "q", "iops": 0, "bps": "1G"}),
    );
    d.submit(0, &Request::read(0, 4096));
    d.force_kick(0);
    let got = used_within_on(&mut d, 0, 2, 3.0).0;
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
        t.sigterm();
        let _ = t.child.wait();
    }
    let rpc = keep.path("r2.sock");
    comes_back(&rpc, &args);
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
    t.sigterm();
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
        t.sigterm();
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

// ---- from the second hostile review (of the fixes above) -------------

/// Completions on queue `q` within `secs` (polling, no kick).
fn used_within_on(d: &mut Driver, q: usize, n: usize, secs: f64) -> (usize, Duration) {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut got = 0;
    while got < n && Instant::now() < end {
        got += d.try_used(q).len();
        std::thread::sleep(Duration::from_micros(200));
    }
    (got, t0.elapsed())
}

fn saved(cfg: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_slice(&std::fs::read(cfg).unwrap()).unwrap();
    v["devices"].as_array().unwrap().clone()
}

/// Every event line until `quiet` passes with none.
fn drain_events(r: &mut BufReader<UnixStream>, quiet: Duration) -> Vec<Value> {
    r.get_ref().set_read_timeout(Some(quiet)).unwrap();
    let mut v = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(n) if n > 0 => {
                v.push(serde_json::from_str::<Value>(&line).unwrap()["params"].clone())
            }
            _ => return v,
        }
    }
}

// ------------------------------------------------------ the config file

/// SIGTERM while device_set_qos autosaves run: config_save checks
/// `closing` before it waits for the save lock and reads the table, so a
/// save queued behind another, or one that passed the check just before
/// the signal, writes the table shutdown has just emptied.
#[test]
fn sigterm_during_autosaves_empties_the_file() {
    let mut emptied = 0;
    let rounds = 10;
    for round in 0..rounds {
        let keep = on_disk("cfgrace");
        let cfg = keep.path("vub.json");
        let mut t = RpcTarget::start(&["--config", s(&cfg)]);
        for n in ["a", "b", "c"] {
            t.ok(
                "device_add",
                json!({"name": n, "socket": keep.path(&format!("{n}.sock")), "disk": "null:1M"}),
            );
        }
        assert_eq!(saved_names(&cfg), ["a", "b", "c"]);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            for k in 0..6u64 {
                let rpc = t.rpc.clone();
                let stop = &stop;
                sc.spawn(move || {
                    let mut i = 1;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let Ok(mut c) = UnixStream::connect(&rpc) else {
                            return;
                        };
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let req = json!({"jsonrpc": "2.0", "id": 1, "method": "device_set_qos",
                                         "params": {"name": "a", "iops": 1000 + k * 100 + i}});
                        i += 1;
                        if writeln!(c, "{req}").is_err() {
                            return;
                        }
                        let mut l = String::new();
                        if BufReader::new(&c).read_line(&mut l).unwrap_or(0) == 0 {
                            return;
                        }
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(150 + 20 * round));
            t.sigterm();
            t.wait_exit();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let names = saved_names(&cfg);
        if names != ["a", "b", "c"] {
            eprintln!("round {round}: the file now holds {names:?}");
            if round == 0 {
                let log = t.log_text();
                let l: Vec<&str> = log
                    .lines()
                    .filter(|l| {
                        l.contains("saved")
                            || l.contains("signal")
                            || l.contains("stopped after")
                            || l.contains("shut")
                    })
                    .collect();
                eprintln!("{}", l[l.len().saturating_sub(8)..].join("\n"));
            }
            emptied += 1;
        }
    }
    assert_eq!(
        emptied, 0,
        "{emptied} of {rounds} shutdowns left a file without the devices"
    );
}

/// The clash filter compares socket paths as written: the same socket
/// spelled another way in the file (re-added over RPC as `dir/x/../vm.sock`
/// or through a symlinked folder such as /var/run -> /run) is not caught,
/// the file's device is served first and takes the socket, and the command
/// line's device then cannot bind: the target does not start (the first
/// review's finding, by another path).
#[test]
fn the_same_socket_spelled_differently_still_blocks_the_start() {
    let keep = TempDir::new("cfgspell");
    let cfg = keep.path("vub.json");
    std::fs::create_dir(keep.path("x")).unwrap();
    let sock = keep.path("vm.sock");
    let other = keep.path("x").join("..").join("vm.sock");
    let cli = format!("socket={},disk=ram:1M,name=vm", s(&sock));
    let args = ["--config", s(&cfg), "--device", &cli];
    {
        let mut t = RpcTarget::start(&args);
        t.ok("device_remove", json!({"name": "vm"}));
        t.ok(
            "device_add",
            json!({"name": "vm2", "socket": other, "disk": "ram:1M", "queues": 2}),
        );
        t.sigterm();
        t.wait_exit();
    }
    eprintln!("saved: {:?}", saved(&cfg));
    let rpc = keep.path("r2.sock");
    comes_back(&rpc, &args);
}

/// A --config file that is a symlink in a private folder (an /etc entry
/// pointing at persistent storage) is read through the link, but the
/// first save renames a regular file over the link: the real file is
/// never written again, and the link is gone.
#[test]
fn a_symlinked_config_file_is_replaced_not_written() {
    let keep = TempDir::new("cfglink");
    std::fs::create_dir(keep.path("persist")).unwrap();
    std::fs::create_dir(keep.path("etc")).unwrap();
    let real = keep.path("persist").join("vub.json");
    std::fs::write(&real, "{\"devices\": []}\n").unwrap();
    let link = keep.path("etc").join("vub.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut t = RpcTarget::start(&["--config", s(&link)]);
    let r = t.ok(
        "device_add",
        json!({"name": "a", "socket": keep.path("a.sock"), "disk": "null:1M"}),
    );
    assert!(r.get("config_saved").is_none(), "{r}");
    t.sigterm();
    t.wait_exit();
    let is_link = link.symlink_metadata().unwrap().file_type().is_symlink();
    let real_text = std::fs::read_to_string(&real).unwrap();
    eprintln!(
        "after a save: {} is a symlink: {is_link}; {} holds {real_text:?}",
        link.display(),
        real.display()
    );
    assert!(
        is_link && real_text.contains("\"a\""),
        "the save went beside the real file"
    );
}

/// A --config file name of 240 bytes (NAME_MAX is 255) is read, but the
/// temporary name of every save (".NAME.<16 hex>.tmp", 22 bytes more) is
/// too long: nothing can ever be saved.
#[test]
fn a_long_config_file_name_can_never_be_saved() {
    let keep = TempDir::new("cfglong");
    let cfg = keep.path(&format!("{}.json", "v".repeat(235)));
    std::fs::write(&cfg, "{\"devices\": []}\n").unwrap();
    let t = RpcTarget::start(&["--config", s(&cfg)]);
    let r = t.ok(
        "device_add",
        json!({"name": "a", "socket": keep.path("a.sock"), "disk": "null:1M"}),
    );
    eprintln!("{}", r.get("config_error").cloned().unwrap_or_default());
    assert!(
        r.get("config_saved").is_none(),
        "a file that was read cannot be saved: {r}"
    );
}

/// A resized null disk is saved at its old size (config::resized knows
/// memory disks only), unlike a memory disk.
#[test]
fn resized_disks_are_saved_at_their_new_size() {
    let keep = TempDir::new("cfgresize");
    let cfg = keep.path("vub.json");
    let mut t = RpcTarget::start(&["--config", s(&cfg)]);
    for (n, d) in [("r", "ram:1M"), ("z", "null:1M")] {
        t.ok(
            "device_add",
            json!({"name": n, "socket": keep.path(&format!("{n}.sock")), "disk": d}),
        );
        let r = t.call("device_resize", json!({"name": n, "size": "4M"}));
        eprintln!("resize {n}: {r:?}");
    }
    t.sigterm();
    t.wait_exit();
    let saved = saved(&cfg);
    eprintln!("{saved:?}");
    for d in &saved {
        assert!(
            d["disk"].as_str().unwrap().ends_with(":4194304"),
            "{} saved as {}",
            d["name"],
            d["disk"]
        );
    }
}

/// A batch [events_subscribe, device_add]: the subscription is taken
/// after the whole batch, so the subscriber never hears of the device
/// its own batch added.
#[test]
fn a_batch_that_subscribes_then_adds_misses_its_own_device_added() {
    let t = RpcTarget::start(&[]);
    let mut s = UnixStream::connect(&t.rpc).unwrap();
    writeln!(
        s,
        "{}",
        json!([
            {"jsonrpc": "2.0", "id": 1, "method": "events_subscribe"},
            {"jsonrpc": "2.0", "id": 2, "method": "device_add",
             "params": {"name": "b", "socket": t.dir.path("b.sock"), "disk": "null:1M"}}])
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("subscribed"), "{line}");
    let got = drain_events(&mut r, Duration::from_millis(1000));
    eprintln!("events after the batch: {got:?}");
    assert!(
        got.iter().any(|e| e["event"] == "device_added"),
        "subscribed first in the batch, but its device_added never came"
    );
}

/// A guest that resets its device 25 times (a reboot loop, or on purpose)
/// spends the device's 20 events a second; its client then disconnects,
/// and a new client attaches: the management plane hears of neither,
/// and no later event says so (`suppressed_before` waits for an event
/// that may never come).
#[test]
fn a_reset_loop_hides_the_clients_detach_and_the_next_attach() {
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "vm", "socket": t.dir.path("vm.sock"), "disk": "null:1M"}),
    );
    let mut ev = subscribe_raw(&t.rpc).1;
    let mut d = Driver::new(&t.dir.path("vm.sock"), DriverOptions::default());
    for _ in 0..25 {
        d.reset();
        d.init(0);
    }
    drop(d);
    // Another VMM process takes over at once (a migration's destination,
    // or the same VM restarted).
    let d2 = Driver::new(&t.dir.path("vm.sock"), DriverOptions::default());
    let got = drain_events(&mut ev, Duration::from_millis(3000));
    let kinds: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    let detached = kinds.iter().filter(|k| **k == "client_detached").count();
    let attached = kinds.iter().filter(|k| **k == "client_attached").count();
    eprintln!(
        "{} events: detached {detached}, attached {attached}; last: {:?}",
        kinds.len(),
        &kinds[kinds.len().saturating_sub(4)..]
    );
    let l = t.ok("device_list", json!({"name": "vm"}));
    eprintln!("device_list says client {}", l[0]["client"]);
    drop(d2);
    assert_eq!(detached, 1, "the client's detach was not told");
    assert_eq!(attached, 2, "the second client's attach was not told");
}

// ---------------------------------------------------------------- limits

/// README: "A new limit, or none, applies at once, also to a queue already
/// waiting" (and the reactor looks again every 50 ms). Here no doorbell
/// follows the change: the guest already rang for every request in the
/// ring. Modes: interrupt, adaptive, busy; EVENT_IDX on and off.
#[test]
fn a_lifted_limit_releases_a_full_ring_without_a_doorbell() {
    for mode in ["interrupt", "adaptive", "busy"] {
        for refuse in [0, F_EVENT_IDX] {
            let t = RpcTarget::start(&["--pollers", "1", "--poll-mode", mode]);
            t.ok(
                "device_add",
                json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1G",
                       "bps": "1"}),
            );
            let mut d = Driver::new(&t.dir.path("q.sock"), DriverOptions::refusing(refuse));
            assert_eq!(d.read(0, 0, 4096).0, S_OK);
            let qs = usize::from(d.queues[0].size);
            for _ in 0..qs {
                d.submit(
                    0,
                    &Request::read(0, 4096).laid(Layout::default().indirect()),
                );
            }
            d.force_kick(0);
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(d.try_used(0).len(), 0);
            let t0 = Instant::now();
            t.ok("device_set_qos", json!({"name": "q", "bps": 0}));
            let (got, took) = used_within_on(&mut d, 0, qs, 3.0);
            let answered = t0.elapsed();
            eprintln!(
                "{mode} event_idx={}: {got}/{qs} released in {took:?} (set_qos+wait {answered:?})",
                refuse == 0
            );
            assert_eq!(got, qs, "{mode}: the lifted limit did not release the ring");
            assert!(took < Duration::from_millis(200), "{mode}: {took:?}");
        }
    }
}

/// QD1 and QD2 under iops=10 with doorbells as Linux rings them (EVENT_IDX
/// suppression honoured), interrupt and adaptive: no request may stall.
#[test]
fn low_qd_under_a_limit_never_stalls() {
    for mode in ["interrupt", "adaptive"] {
        let t = RpcTarget::start(&["--pollers", "1", "--poll-mode", mode]);
        t.ok(
            "device_add",
            json!({"name": "q", "socket": t.dir.path("q.sock"), "disk": "null:1G", "iops": "20"}),
        );
        let mut d = Driver::new(&t.dir.path("q.sock"), DriverOptions::default());
        let t0 = Instant::now();
        let mut worst = Duration::ZERO;
        for i in 0..24 {
            let a = Instant::now();
            if i % 2 == 0 {
                d.submit(0, &Request::read(0, 4096));
                d.submit(0, &Request::read(0, 4096));
                d.kick(0);
                d.wait_used(0, 2, Duration::from_secs(5));
            } else {
                assert_eq!(d.read(0, 0, 4096).0, S_OK);
            }
            worst = worst.max(a.elapsed());
        }
        eprintln!(
            "{mode}: 36 requests in {:?}, worst round {worst:?}",
            t0.elapsed()
        );
        assert!(worst < Duration::from_millis(400));
    }
}

/// Many clients at once subscribe and reset the connection at once (no
/// read, SO_LINGER 0), some inside a batch, while events flow: no
/// subscriber place may leak (8 subscribe afterwards).
#[test]
fn parallel_subscribe_and_reset_leaks_no_place() {
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "r", "socket": t.dir.path("r.sock"), "disk": "ram:1M"}),
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let stop = &stop;
        let tt = &t;
        sc.spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let size = if i % 2 == 0 { "2M" } else { "1M" };
                let _ = tt.call(
                    "device_resize",
                    json!({"name": "r", "size": size, "shrink": true}),
                );
                i += 1;
            }
        });
        let hs: Vec<_> =
            (0..8)
                .map(|k| {
                    let rpc = t.rpc.clone();
                    sc.spawn(move || {
                    for i in 0..60 {
                        let Ok(mut c) = UnixStream::connect(&rpc) else { continue };
                        if (i + k) % 3 == 0 {
                            let _ = writeln!(
                                c,
                                "{}",
                                json!([{"jsonrpc": "2.0", "id": 1, "method": "events_subscribe"},
                                       {"jsonrpc": "2.0", "id": 2, "method": "events_subscribe"}])
                            );
                        } else {
                            // (A connection refused while every place is
                            // taken may be closed before this is written.)
                            let _ = writeln!(
                                c,
                                "{}",
                                json!({"jsonrpc": "2.0", "id": 1, "method": "events_subscribe"})
                            );
                        }
                        if i % 2 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        let l = libc::linger { l_onoff: 1, l_linger: 0 };
                        // SAFETY: a valid linger struct for our own socket.
                        unsafe {
                            libc::setsockopt(
                                std::os::fd::AsRawFd::as_raw_fd(&c),
                                libc::SOL_SOCKET,
                                libc::SO_LINGER,
                                std::ptr::addr_of!(l).cast(),
                                std::mem::size_of::<libc::linger>() as u32,
                            );
                        }
                        drop(c);
                    }
                })
                })
                .collect();
        // Every client is joined, and the resize loop stopped, before a
        // client's panic is passed on: the scope never waits for ever.
        let joined: Vec<_> = hs.into_iter().map(|h| h.join()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for j in joined {
            j.unwrap();
        }
    });
    wait_until("8 subscriber places", || {
        let subs: Vec<_> = (0..8)
            .map(|_| {
                let mut s = UnixStream::connect(&t.rpc).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                send_request(&mut s, 1, "events_subscribe");
                let mut l = String::new();
                let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut l);
                (s, l)
            })
            .collect();
        subs.iter().all(|(_, l)| l.contains("subscribed\":true"))
    });
}

/// A subscribed client that keeps sending requests and never reads, while
/// events flow: the target must not wedge (others are answered), the
/// connection ends, and its subscriber place comes back (8 subscribe).
#[test]
fn a_subscriber_that_never_reads_while_requesting_is_let_go() {
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "r", "socket": t.dir.path("r.sock"), "disk": "ram:1M"}),
    );
    let mut hog = UnixStream::connect(&t.rpc).unwrap();
    send_request(&mut hog, 1, "events_subscribe");
    let w = hog.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = w;
        w.set_write_timeout(Some(Duration::from_secs(40))).unwrap();
        let mut n = 0u64;
        let t0 = Instant::now();
        // device_list answers are large: the socket fills quickly.
        while t0.elapsed() < Duration::from_secs(40) {
            let req = json!({"jsonrpc": "2.0", "id": n, "method": "device_list"});
            if writeln!(w, "{req}").is_err() {
                break;
            }
            n += 1;
        }
        (n, t0.elapsed())
    });
    // Events while it does not read, and others' requests answered.
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let a = Instant::now();
        let size = if i % 2 == 0 { "2M" } else { "1M" };
        t.ok(
            "device_resize",
            json!({"name": "r", "size": size, "shrink": true}),
        );
        slowest = slowest.max(a.elapsed());
    }
    eprintln!(
        "100 resizes beside it in {:?}, slowest {slowest:?}",
        t0.elapsed()
    );
    let (n, took) = writer.join().unwrap();
    eprintln!("the hog wrote {n} requests; its writes stopped after {took:?}");
    assert!(slowest < Duration::from_secs(1));
    assert!(took < Duration::from_secs(30), "the hog was never let go");
    drop(hog);
    wait_until("8 subscriber places", || {
        let subs: Vec<_> = (0..8)
            .map(|_| {
                let mut s = UnixStream::connect(&t.rpc).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                send_request(&mut s, 1, "events_subscribe");
                let mut l = String::new();
                BufReader::new(s.try_clone().unwrap())
                    .read_line(&mut l)
                    .unwrap();
                (s, l)
            })
            .collect();
        subs.iter().all(|(_, l)| l.contains("subscribed\":true"))
    });
}

/// A file's device with the name of a command-line device on another
/// socket (a different device) was left out and then deleted from the file
/// by the next unrelated save. Neither is dropped now: the start stops and
/// says to rename one.
#[test]
fn a_name_only_clash_stops_the_start_and_keeps_the_file() {
    let keep = TempDir::new("cfgclash");
    let cfg = keep.path("vub.json");
    let img = keep.path("important.img");
    {
        let mut t = RpcTarget::start(&["--config", s(&cfg)]);
        t.ok(
            "device_add",
            json!({"name": "vm", "socket": keep.path("vm.sock"), "disk": img, "size": "1M"}),
        );
        t.sigterm();
        t.wait_exit();
    }
    assert_eq!(saved_names(&cfg), ["vm"]);
    let cli = format!(
        "socket={},disk=ram:1M,name=vm",
        s(&keep.path("scratch.sock"))
    );
    let rpc = keep.path("r.sock");
    let (exited, status, err) = run_bin(
        &[
            "--rpc-socket",
            s(&rpc),
            "--config",
            s(&cfg),
            "--device",
            &cli,
        ],
        Duration::from_secs(5),
    );
    assert!(exited && !status.success(), "{err}");
    assert!(err.contains("rename"), "{err}");
    assert_eq!(saved_names(&cfg), ["vm"]);
}
