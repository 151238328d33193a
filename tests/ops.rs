//! Issue 22, what an operator of qemu-storage-daemon or SPDK expects:
//! devices kept across a restart (`--config`, `config_save`), limits per
//! device (`device_set_qos`, the `iops=`/`bps=` keys), and events pushed to
//! a subscribed management connection.
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::driver::*;
use support::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn device<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no device {name} in {list}"))
}

#[test]
fn devices_added_over_rpc_come_back_after_a_restart_with_config() {
    let keep = TempDir::new("cfg");
    let cfg = keep.path("vub.json");
    let img = keep.path("a.img");
    let (sa, sb, sc) = (
        keep.path("a.sock"),
        keep.path("b.sock"),
        keep.path("c.sock"),
    );
    let cli = format!("socket={},disk=null:1M,name=cli", s(&sc));
    let args = ["--config", s(&cfg), "--device", &cli];
    {
        let mut t = RpcTarget::start(&args);
        // A file that does not exist yet: no devices from it.
        assert_eq!(t.ok("device_list", json!({})).as_array().unwrap().len(), 1);
        t.ok(
            "device_add",
            json!({"name": "a", "socket": sa, "disk": img, "size": "4M", "queues": 2,
                   "serial": "keep-a", "iops": 1000, "write-bps": "8M"}),
        );
        t.ok(
            "device_add",
            json!({"name": "b", "socket": sb, "disk": "ram:8M", "packed": true,
                   "readonly": true}),
        );
        t.ok("device_resize", json!({"name": "a", "size": "8M"}));
        let mut d = Driver::new(&sa, DriverOptions::default());
        assert_eq!(d.write(1, 100, &pattern(5, 4096)), S_OK);
        drop(d);
        let r = t.ok("config_save", json!({}));
        assert_eq!(r["devices"], 2, "the command line's device is not saved");
        let mode = std::fs::metadata(&cfg).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        t.sigterm();
        t.wait_exit();
    }
    let t = RpcTarget::start(&args);
    let list = t.ok("device_list", json!({}));
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let a = device(&list, "a");
    assert_eq!(a["queues"], 2);
    assert_eq!(a["serial"], "keep-a");
    assert_eq!(a["size"], 8 << 20);
    assert_eq!(a["qos"]["iops"], 1000);
    assert_eq!(a["qos"]["write_bps"], 8 << 20);
    let b = device(&list, "b");
    assert_eq!(b["packed"], true);
    assert_eq!(b["readonly"], true);
    assert_eq!(b["size"], 8 << 20);
    let mut d = Driver::new(&sa, DriverOptions::default());
    assert_eq!(d.read(0, 100, 4096), (S_OK, pattern(5, 4096)));
    drop(d);
    assert!(!t.log_text().contains("panicked"));
}

#[test]
fn autosave_follows_every_change_and_save_needs_a_file() {
    let keep = TempDir::new("cfg");
    let cfg = keep.path("auto.json");
    // (Autosave is the default.)
    let t = RpcTarget::start(&["--config", s(&cfg)]);
    let saved = || -> Vec<String> {
        let v: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                format!(
                    "{}:{}",
                    d["name"].as_str().unwrap(),
                    d["disk"].as_str().unwrap()
                )
            })
            .collect()
    };
    t.ok(
        "device_add",
        json!({"name": "x", "socket": keep.path("x.sock"), "disk": "ram:1M"}),
    );
    assert_eq!(saved(), ["x:ram:1048576"]);
    t.ok("device_resize", json!({"name": "x", "size": "2M"}));
    assert_eq!(saved(), ["x:ram:2097152"]);
    t.ok("device_set_qos", json!({"name": "x", "iops": 77}));
    let v: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    assert_eq!(v["devices"][0]["iops"], "77");
    t.ok("device_remove", json!({"name": "x"}));
    assert!(saved().is_empty());

    let other = RpcTarget::start(&[]);
    let e = other.call("config_save", json!({})).unwrap_err();
    assert!(e.1.contains("--config"), "{e:?}");

    // Off: only config_save writes.
    let quiet = keep.path("quiet.json");
    let t = RpcTarget::start(&["--config", s(&quiet), "--config-autosave", "off"]);
    t.ok(
        "device_add",
        json!({"name": "y", "socket": keep.path("y.sock"), "disk": "ram:1M"}),
    );
    assert!(!quiet.exists(), "saved without config_save");
    t.ok("config_save", json!({}));
    assert!(quiet.exists());
}

#[test]
fn a_bad_config_file_stops_the_start_with_its_reason() {
    let keep = TempDir::new("cfg");
    let cfg = keep.path("bad.json");
    let rpc = keep.path("r.sock");
    for (text, want) in [
        (
            "{\"devices\": [{\"socket\": \"/nonexistent/x.sock\"}]}",
            "device 0",
        ),
        ("{\"devices\": [], \"extra\": 1}", "unknown key"),
        ("not json", "not JSON"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let (_, status, err) = run_bin(
            &["--rpc-socket", s(&rpc), "--config", s(&cfg)],
            Duration::from_secs(5),
        );
        assert!(!status.success(), "{text}");
        assert!(err.contains(want), "{text}: {err}");
    }
}

/// 4 KiB reads at queue depth `qd` on queue 0 for `secs`: the requests
/// completed.
fn reads_at_depth(d: &mut Driver, qd: usize, secs: f64) -> u64 {
    for _ in 0..qd {
        d.submit(0, &Request::read(0, 4096));
    }
    d.kick(0);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut done = 0;
    while Instant::now() < end {
        let used = d.try_used(0);
        if used.is_empty() {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        done += used.len() as u64;
        for _ in 0..used.len() {
            d.submit(0, &Request::read(0, 4096));
        }
        d.kick(0);
    }
    d.wait_used(0, qd, Duration::from_secs(10));
    done
}

/// A device held to iops=500 does 500 a second under a QD32 load, within
/// 10%, while an unlimited neighbour on the same reactor runs at its own
/// speed; the limit changes and goes away while the device runs.
#[test]
fn a_limited_device_keeps_its_rate_and_its_neighbour_is_not_slowed() {
    let t = RpcTarget::start(&["--pollers", "1"]);
    t.ok(
        "device_add",
        json!({"name": "lim", "socket": t.dir.path("lim.sock"), "disk": "null:1G",
               "iops": "500"}),
    );
    t.ok(
        "device_add",
        json!({"name": "free", "socket": t.dir.path("free.sock"), "disk": "null:1G"}),
    );
    assert_eq!(
        t.ok("device_list", json!({"name": "lim"}))[0]["qos"]["iops"],
        500
    );
    let mut lim = Driver::new(&t.dir.path("lim.sock"), DriverOptions::default());
    let mut free = Driver::new(&t.dir.path("free.sock"), DriverOptions::default());
    let alone = reads_at_depth(&mut free, 32, 1.0) as f64;
    let secs = 3.0;
    let (limited, during) = std::thread::scope(|sc| {
        let h = sc.spawn(|| reads_at_depth(&mut lim, 32, secs));
        let during = reads_at_depth(&mut free, 32, secs) as f64 / secs;
        (h.join().unwrap() as f64 / secs, during)
    });
    eprintln!("limited to 500/s: {limited:.0}/s; its neighbour {during:.0}/s (alone {alone:.0}/s)");
    assert!(
        (450.0..=550.0).contains(&limited),
        "{limited}/s under iops=500"
    );
    assert!(
        during >= 0.5 * alone && during > 10.0 * limited,
        "the neighbour did {during}/s beside the limited device, {alone}/s alone"
    );
    // Lowered while it runs, then lifted.
    t.ok("device_set_qos", json!({"name": "lim", "iops": 200}));
    let low = reads_at_depth(&mut lim, 8, 2.0) as f64 / 2.0;
    assert!((170.0..=240.0).contains(&low), "{low}/s under iops=200");
    t.ok("device_set_qos", json!({"name": "lim", "iops": 0}));
    let lifted = reads_at_depth(&mut lim, 8, 1.0) as f64;
    assert!(lifted > 2000.0, "{lifted}/s with no limit");
    let stats = t.ok("device_list", json!({"name": "lim"}));
    assert_eq!(stats[0]["qos"]["iops"], 0);
    assert!(!t.log_text().contains("panicked"));
}

/// Byte limits: write-bps holds writes, and reads are not held by it.
#[test]
fn a_byte_limit_holds_its_direction_only() {
    let t = RpcTarget::start(&[]);
    t.ok(
        "device_add",
        json!({"name": "w", "socket": t.dir.path("w.sock"), "disk": "ram:16M",
               "write-bps": "1M"}),
    );
    let mut d = Driver::new(&t.dir.path("w.sock"), DriverOptions::default());
    // 64 KiB writes at 1 MiB/s: 16 a second (and the first one free).
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        assert_eq!(d.write(0, 0, &vec![7u8; 64 << 10]), S_OK);
        n += 1;
    }
    assert!(
        (30..=38).contains(&n),
        "{n} writes of 64 KiB in 2 s under write-bps=1M"
    );
    let start = Instant::now();
    for _ in 0..200 {
        assert_eq!(d.read(0, 0, 64 << 10).0, S_OK);
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "reads held by a write limit: {:?} for 200",
        start.elapsed()
    );
    let e = t
        .call("device_set_qos", json!({"name": "w", "iops": "lots"}))
        .unwrap_err();
    assert_eq!(e.0, -32602, "{e:?}");
    let e = t
        .call("device_set_qos", json!({"name": "nope", "iops": 1}))
        .unwrap_err();
    assert!(e.1.contains("nope"), "{e:?}");
}

fn subscribe(rpc: &Path) -> BufReader<UnixStream> {
    let mut s = UnixStream::connect(rpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send_request(&mut s, 1, "events_subscribe");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["result"]["subscribed"], true, "{line}");
    r
}

/// The next event of `kind` (others are skipped).
fn next_event(r: &mut BufReader<UnixStream>, kind: &str) -> Value {
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).unwrap_or(0);
        assert!(n > 0, "the connection ended before a {kind} event");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["method"], "event", "{line}");
        assert!(v.get("id").is_none(), "a notification has no id: {line}");
        if v["params"]["event"] == kind {
            return v["params"].clone();
        }
    }
}

#[test]
fn a_subscribed_connection_hears_of_attach_reset_resize_and_removal() {
    let t = RpcTarget::start(&[]);
    let mut ev = subscribe(&t.rpc);
    t.ok(
        "device_add",
        json!({"name": "e", "socket": t.dir.path("e.sock"), "disk": "ram:4M"}),
    );
    assert_eq!(next_event(&mut ev, "device_added")["device"], "e");
    let mut d = Driver::new(&t.dir.path("e.sock"), DriverOptions::default());
    let a = next_event(&mut ev, "client_attached");
    assert_eq!(a["device"], "e");
    assert_eq!(a["pid"], std::process::id());
    next_event(&mut ev, "driver_ok");
    d.reset();
    next_event(&mut ev, "driver_reset");
    t.ok("device_resize", json!({"name": "e", "size": "8M"}));
    assert_eq!(next_event(&mut ev, "resized")["size"], 8 << 20);
    drop(d);
    assert_eq!(
        next_event(&mut ev, "client_detached")["pid"],
        std::process::id()
    );
    t.ok("device_remove", json!({"name": "e"}));
    next_event(&mut ev, "device_removed");
    // The subscription does not keep the others from the socket: requests
    // on it are still answered.
    let mut s = ev.into_inner();
    send_request(&mut s, 9, "target_version");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["id"], 9, "{line}");
}

/// `vfio-user-blk rpc ... events_subscribe` prints each event as it comes.
#[test]
fn the_rpc_client_follows_events() {
    let t = RpcTarget::start(&[]);
    let mut child = std::process::Command::new(bin())
        .args(["rpc", "--rpc-socket", s(&t.rpc), "events_subscribe"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines() {
            if tx.send(l.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    // The client subscribes some time after it starts: devices are added
    // until one is heard of.
    let mut heard = None;
    for i in 0..50 {
        t.ok(
            "device_add",
            json!({"name": format!("f{i}"), "socket": t.dir.path(&format!("f{i}.sock")),
                   "disk": "null:1M"}),
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            heard = Some(line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = heard.expect("no event printed");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "device_added", "{line}");
    assert!(v["device"].as_str().unwrap().starts_with('f'), "{line}");
}

/// Subscribers keep their places, so they are bounded: the ninth is
/// refused, and requests still find room.
#[test]
fn at_most_eight_connections_subscribe() {
    let t = RpcTarget::start(&[]);
    let subs: Vec<_> = (0..8).map(|_| subscribe(&t.rpc)).collect();
    let mut s = UnixStream::connect(&t.rpc).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send_request(&mut s, 1, "events_subscribe");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("subscribed already"),
        "{line}"
    );
    assert_eq!(t.ok("target_version", json!({}))["name"], "vfio-user-blk");
    // One leaves: its place is free again.
    drop(subs);
    wait_until("a subscriber's place", || {
        let mut s = UnixStream::connect(&t.rpc).unwrap();
        send_request(&mut s, 1, "events_subscribe");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        line.contains("\"subscribed\":true")
    });
}
