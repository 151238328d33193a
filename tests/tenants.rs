//! Issue 16, tenants: what one device's guest or client does must not show
//! in another device's service, nor take what the process shares (the
//! thread pool, descriptors, guard slots, the log). Each test holds the raw
//! input of a finding of the hostile review and fails on the code before
//! its fix.
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use support::driver::*;
use support::*;

const MB: u64 = 1 << 20;

/// The tests that measure one device's service while another floods run
/// one at a time, so that they do not measure each other.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `n` writes of 4 KiB at queue depth 1, each from a guest buffer that is
/// not block-aligned (O_DIRECT bounces it, on the thread pool): latencies.
fn misaligned_writes(d: &mut Driver, n: usize) -> Vec<Duration> {
    let data = pattern(3, 4096);
    (0..n)
        .map(|i| {
            // The header takes 16 bytes: the data right after it is
            // 16-byte aligned, never 512-byte aligned.
            let t = Instant::now();
            assert_eq!(d.write(0, (i as u64 % 512) * 8, &data), S_OK);
            t.elapsed()
        })
        .collect()
}

/// Finding 3: device A floods the shared thread pool with write-zeroes on
/// a `ram:` disk (a memfd has no FALLOC_FL_ZERO_RANGE, so zeros are
/// written, a GiB a request); device B's misaligned O_DIRECT writes, which
/// also run on the pool, used to queue behind the whole flood (p50 from
/// 0.68 ms to 338 ms). Target: B's p50 under the flood at most 3x alone.
/// Device B of the fairness tests: a 64 MiB image in `dir` served with
/// O_DIRECT (its misaligned writes go through the pool): its socket and
/// its `--device` spec.
fn device_b(dir: &TempDir) -> (std::path::PathBuf, String) {
    let img = dir.image("b.img", 64 * MB);
    let sock = dir.path("b.sock");
    let dev = format!("socket={},disk={},direct=on", sock.display(), img.display());
    (sock, dev)
}

#[test]
fn one_devices_write_zeroes_flood_does_not_hold_anothers_pool_work() {
    let _one = one_at_a_time();
    let dir = support::on_disk("fair");
    let (b_sock, dev) = device_b(&dir);
    let srv = ServerProcess::start_in(
        dir,
        &["--disk", "ram:1G", "--pollers", "1", "--device", &dev],
    );
    let mut a = Driver::new(&srv.socket, DriverOptions::default());
    let mut b = Driver::new(&b_sock, DriverOptions::default());
    misaligned_writes(&mut b, 20);
    let alone = p50(misaligned_writes(&mut b, 200));
    let flood: u16 = 128;
    for _ in 0..flood {
        a.submit(
            0,
            &Request {
                kind: T_WRITE_ZEROES,
                sector: 0,
                out: dwz_segment(0, (1 << 30) / 512, 0),
                in_len: 0,
                layout: Layout {
                    indirect: true,
                    ..Default::default()
                },
            },
        );
    }
    a.force_kick(0);
    thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let during = p50(misaligned_writes(&mut b, 200));
    let busy = a.used_idx(0) < flood;
    eprintln!(
        "device B, 4 KiB misaligned O_DIRECT writes: p50 {alone:?} alone, {during:?} under \
         device A's write-zeroes flood ({:?} for 200; the flood still running: {busy})",
        t.elapsed()
    );
    assert!(busy, "the flood ended before the measurement did");
    // A's reset ends the flood between two steps.
    let t = Instant::now();
    a.reset();
    let reset = t.elapsed();
    eprintln!("device A's reset during its flood: {reset:?}");
    assert!(
        reset < Duration::from_secs(2),
        "a reset waited {reset:?} for a flood it had cancelled"
    );
    // The target (3x) is measured in release builds (see the README); here
    // a guard that the code before fails by far (338 ms, or B's writes not
    // answered at all), with room for a loaded machine and a debug build.
    // On two cores the flood's zero-writing pool threads take CPU from B's
    // (a CI run saw 3.8 ms, 12x): that is sharing, not queueing, so the
    // floor is 30 ms, ten times under the queueing the guard exists for.
    assert!(
        during <= (10 * alone).max(Duration::from_millis(30)),
        "B's p50 went from {alone:?} alone to {during:?} under A's flood"
    );
    let mut srv = srv;
    srv.assert_healthy();
}

/// DMA_MAP of one 4 KiB window of `fd` at `iova`, over a raw connection:
/// the errno of the reply (0: mapped).
fn dma_map(r: &mut Raw, iova: u64, fd: std::os::fd::RawFd) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&32u32.to_le_bytes());
    p.extend_from_slice(&3u32.to_le_bytes()); // read | write
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&iova.to_le_bytes());
    p.extend_from_slice(&4096u64.to_le_bytes());
    r.call_fds(2, &p, &[fd]).errno()
}

/// Finding 4: the limit of 4,096 windows held per connection, not per
/// process, while every window holds a descriptor and one of the process's
/// 16,384 SIGBUS guard slots. Four clients mapping 4,096 windows each took
/// every slot; the fifth device's window was then mapped unguarded, and
/// its memfd cut short under a live queue killed the whole process. Now
/// each device is held to its share of a process-wide budget (refused with
/// ENOSPC beyond it), no window is ever mapped unguarded, and the
/// management socket and accept keep working.
#[test]
fn four_greedy_clients_cannot_disarm_a_fifth_devices_sigbus_guard() {
    let _one = one_at_a_time();
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("budget");
    let rpc = dir.path("rpc.sock");
    let mut args: Vec<String> = vec![
        "--disk".into(),
        "null:16M".into(),
        "--rpc-socket".into(),
        rpc.to_str().unwrap().into(),
    ];
    let mut socks = Vec::new();
    for i in 0..4 {
        let s = dir.path(&format!("g{i}.sock"));
        args.push("--device".into());
        args.push(format!(
            "socket={},disk=null:16M,name=greedy{i}",
            s.display()
        ));
        socks.push(s);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut srv = ServerProcess::start_in(dir, &a);
    let page = vfio_user_blk::util::memfd("page").unwrap();
    page.set_len(4096).unwrap();
    let mut greedy = Vec::new();
    let mut mapped = Vec::new();
    for s in &socks {
        let mut r = Raw::negotiated(s);
        let mut n = 0u64;
        let refused = loop {
            if n == 4096 {
                break 0;
            }
            match dma_map(&mut r, n * 4096, page.as_raw_fd()) {
                0 => n += 1,
                e => break e,
            }
        };
        eprintln!("a greedy client mapped {n} windows, then errno {refused}");
        assert!(
            refused == 0 || refused == libc::ENOSPC as u32,
            "refused with errno {refused}"
        );
        mapped.push(n);
        greedy.push(r);
    }
    srv.assert_alive();
    // The fifth device: its guest RAM is a memfd that cannot be sealed,
    // cut short under a live queue.
    let mut d = Driver::new(&srv.socket, DriverOptions::default());
    assert_eq!(d.write(0, 0, &[7u8; 4096]), S_OK);
    d.submit(0, &Request::write(8, &vec![1u8; 4096]));
    // (This process must not touch the memory once it is cut.)
    d.ram.set_len(0).unwrap();
    d.force_kick(0);
    thread::sleep(Duration::from_millis(300));
    srv.assert_alive();
    assert!(
        srv.log_text().contains("vanished"),
        "the guard did not see the truncation"
    );
    // The management socket and accept still work.
    let mut m = std::os::unix::net::UnixStream::connect(&rpc).unwrap();
    use std::io::{BufRead, Write};
    writeln!(m, r#"{{"jsonrpc":"2.0","id":1,"method":"device_list"}}"#).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&m).read_line(&mut line).unwrap();
    assert!(line.contains("greedy3"), "{line}");
    drop(greedy);
    drop(d);
    fresh_client_works(&socks[0]);
    srv.assert_healthy();
}

/// Runs `f` on a thread and waits up to `limit` for its answer.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// Adds to `target` a device named `stuck` at `sock` whose reads stick
/// in the backend until released: the returned gate.
fn add_stuck_disk(
    target: &vfio_user_blk::target::Target,
    sock: &std::path::Path,
) -> std::sync::Arc<support::gate::Gate> {
    let be = support::gate::Gate::new(support::gate::Stuck::Reads, 64);
    add_gated_disk(target, sock, "stuck", be.clone());
    be
}

/// Adds to `target` a device named `name` at `sock` on the backend `be`
/// (of support::gate::SIZE bytes).
fn add_gated_disk(
    target: &vfio_user_blk::target::Target,
    sock: &std::path::Path,
    name: &str,
    be: std::sync::Arc<dyn vfio_user_blk::backend::io::Backend>,
) {
    let spec: vfio_user_blk::device::DeviceSpec =
        format!("socket={},disk=null:8M,name={name}", sock.display())
            .parse()
            .unwrap();
    target
        .add_disk(
            spec,
            vfio_user_blk::backend::Disk {
                spec: vfio_user_blk::backend::DiskSpec::Null(support::gate::SIZE),
                size: support::gate::SIZE,
                readonly: false,
                backend: be,
            },
        )
        .unwrap();
}

/// Finding 5: `device_remove` held the admin lock while it joined a device
/// thread waiting without limit in a drain (a reset behind a stuck disk),
/// so every later add, remove and shutdown blocked; a resize waited
/// without limit for the queues to drain, and 16 of them took every
/// management connection. Now nothing in the control plane waits on a
/// device without a bound.
#[test]
fn a_stuck_disk_never_hangs_the_control_plane() {
    let dir = TempDir::new("ctl");
    let target = target_in(&dir, &["--poll-mode", "interrupt"]);
    let sock = dir.path("stuck.sock");
    let be = add_stuck_disk(&target, &sock);
    let mut d = Driver::new(&sock, DriverOptions::default());
    support::gate::stuck_read(&mut d, 64);
    be.wait_entered();

    // A resize waits for the stuck read only so long, and says why.
    let t = target.clone();
    let r = within(Duration::from_secs(15), move || {
        t.resize("stuck", Some(16 * MB), false)
    })
    .expect("device_resize did not answer");
    let e = r.expect_err("resized with a request stuck in the backend");
    eprintln!("resize behind a stuck read: {e:#}");
    assert!(format!("{e:#}").contains("still in the backend"), "{e:#}");
    // Many at once (each its own management connection) all answer.
    let many: Vec<_> = (0..16)
        .map(|_| {
            let t = target.clone();
            thread::spawn(move || t.resize("stuck", Some(16 * MB), false).is_err())
        })
        .collect();
    let t0 = Instant::now();
    for h in many {
        assert!(h.join().unwrap());
    }
    eprintln!("16 resizes at once behind a stuck read: {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());

    // The driver resets: its protocol thread now waits for the stuck read
    // (the removal below then disconnects it: no answer comes).
    let resetter = thread::spawn(move || {
        use vfio_bindings::bindings::vfio::VFIO_PCI_BAR0_REGION_INDEX;
        let _ = d.c.region_write(VFIO_PCI_BAR0_REGION_INDEX, 18, &[0]);
        d
    });
    thread::sleep(Duration::from_millis(200));
    let t = target.clone();
    let removed = within(Duration::from_secs(10), move || t.remove("stuck", true))
        .expect("device_remove did not answer");
    assert!(!removed.unwrap(), "a stuck device cannot have stopped yet");
    // The admin lock is free: another device comes and goes.
    let other: vfio_user_blk::device::DeviceSpec = format!(
        "socket={},disk=ram:4M,name=other",
        dir.path("o.sock").display()
    )
    .parse()
    .unwrap();
    let t = target.clone();
    within(Duration::from_secs(10), move || t.add(other).map(|_| ()))
        .expect("device_add did not answer")
        .unwrap();
    fresh_client_works(&dir.path("o.sock"));
    let t = target.clone();
    assert!(
        within(Duration::from_secs(10), move || t.remove("other", true))
            .expect("device_remove did not answer")
            .unwrap()
    );
    let t = target.clone();
    within(Duration::from_secs(20), move || t.shutdown()).expect("shutdown did not return");
    be.release();
    let _ = resetter.join();
}

/// A target with two devices named `a` and `b` (ram: disks), logging at
/// the default level (info), as an operator runs it: (child, dir, log).
fn two_named_devices() -> (std::process::Child, TempDir, std::path::PathBuf) {
    let dir = TempDir::new("names");
    let log = dir.path("target.log");
    let mut args: Vec<String> = Vec::new();
    for n in ["a", "b"] {
        args.push("--device".into());
        args.push(format!(
            "socket={},disk=ram:1M,name={n}",
            dir.path(&format!("{n}.sock")).display()
        ));
    }
    let child = std::process::Command::new(bin())
        .args(&args)
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("both devices", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("listening on")
            .count()
            == 2
    });
    (child, dir, log)
}

/// Finding 9: a guest looping through reset, re-initialisation and MSI-X
/// toggles wrote 6 INFO lines a cycle (6.8 MB of log in 1.6 s), and the
/// limit on what a guest can repeat was per call site, so one guest could
/// also mute another's warnings. Every line a guest or client causes is now
/// limited per device, and names its device.
#[test]
fn a_guest_looping_through_resets_does_not_flood_the_log_or_mute_another_device() {
    let _one = one_at_a_time();
    use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX as CONFIG;
    let (mut child, dir, log) = two_named_devices();
    let mut a = Driver::new(&dir.path("a.sock"), DriverOptions::default());
    let before = std::fs::metadata(&log).unwrap().len();
    let t = Instant::now();
    let mut cycles = 0;
    while t.elapsed() < Duration::from_secs(2) {
        a.reset();
        a.c.region_write(CONFIG, 0x42, &0u16.to_le_bytes()).unwrap();
        a.init(0);
        // A request past the end of the disk: a warning a guest can repeat.
        assert_eq!(a.read(0, 1 << 20, 512).0, S_IOERR);
        cycles += 1;
    }
    // Device b's first bad request is still reported.
    let mut b = Driver::new(&dir.path("b.sock"), DriverOptions::default());
    assert_eq!(b.read(0, 1 << 20, 512).0, S_IOERR);
    thread::sleep(Duration::from_millis(100));
    let text = std::fs::read_to_string(&log).unwrap();
    let grown = std::fs::metadata(&log).unwrap().len() - before;
    let _ = child.kill();
    let _ = child.wait();
    let a_lines = text.lines().filter(|l| l.contains(" a: ")).count();
    eprintln!("{cycles} cycles of reset and re-initialisation: {grown} bytes, {a_lines} lines of device a");
    assert!(cycles > 100, "only {cycles} cycles");
    assert!(
        a_lines < 100 && grown < 32 << 10,
        "{a_lines} lines, {grown} bytes of log for {cycles} cycles"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(" b: ") && l.contains("past the end")),
        "device b's warning was muted by device a's flood:\n{}",
        &text[text.len().saturating_sub(2000)..]
    );
}

/// Finding 10: log lines about a device (client connected, driver reset,
/// request past the end, resize, a second client refused) did not say
/// which device; two devices named a and b were logged as disk0/disk1.
/// Every line about a device now names it by its configured name.
#[test]
fn log_lines_name_their_device() {
    let (mut child, dir, log) = two_named_devices();
    let mut b = Driver::new(&dir.path("b.sock"), DriverOptions::default());
    assert_eq!(b.read(0, 1 << 20, 512).0, S_IOERR);
    b.reset();
    // A second client of b is refused.
    let second = std::os::unix::net::UnixStream::connect(dir.path("b.sock")).unwrap();
    thread::sleep(Duration::from_millis(2500));
    drop(second);
    drop(b);
    thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    for what in [
        "client connected",
        "driver ready",
        "past the end",
        "driver reset the device",
        "second client",
        "client disconnected",
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line says {what:?}:\n{text}"));
        assert!(line.contains(" b: "), "{line}");
    }
    assert!(!text.contains("disk0") && !text.contains("disk1"), "{text}");
}

/// DMA_UNMAP of the 4 KiB window at `iova`: the errno of the reply.
fn dma_unmap(r: &mut Raw, iova: u64) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&24u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&iova.to_le_bytes());
    p.extend_from_slice(&4096u64.to_le_bytes());
    r.call(3, &p).errno()
}

/// From the hostile review of finding 4's fix: a device removed while its
/// pool jobs still ran took its windows' SIGBUS guards with it; once every
/// slot had been used once (another client mapped and unmapped a window
/// 16,400 times), a new window took the slot of a mapping still in use,
/// and the removed client cutting its memfd killed the process. Windows
/// still in use stay guarded until their last request lets go, whatever
/// happens to their device.
#[test]
fn a_removed_devices_windows_stay_guarded_while_its_requests_run() {
    let _one = one_at_a_time();
    use std::os::fd::AsRawFd;
    let dir = support::on_disk("guard");
    let img = dir.image("v.img", 1 << 30);
    let vsock = dir.path("v.sock");
    let rpc = dir.path("rpc.sock");
    let dev = format!(
        "socket={},disk={},direct=on,name=vic",
        vsock.display(),
        img.display()
    );
    let rpcs = rpc.to_str().unwrap().to_string();
    let mut srv = ServerProcess::start_in(
        dir,
        &[
            "--disk",
            "null:16M",
            "--rpc-socket",
            &rpcs,
            "--device",
            &dev,
        ],
    );
    let mut v = Driver::new(&vsock, DriverOptions::default());
    let mut x = Raw::negotiated(&srv.socket);
    let page = vfio_user_blk::util::memfd("page").unwrap();
    page.set_len(4096).unwrap();
    for _ in 0..16_400 {
        assert_eq!(dma_map(&mut x, 1 << 40, page.as_raw_fd()), 0);
        assert_eq!(dma_unmap(&mut x, 1 << 40), 0);
    }
    // 8 MiB writes from buffers that are not block-aligned: bounced, on
    // the pool, for a while.
    for i in 0..192u64 {
        let h = v.header_buf(T_OUT, (i % 64) * 16384);
        let mut bufs = vec![(h, 16u32, false)];
        for k in 0..8u64 {
            bufs.push((0x100010 + k * 0x20_0000, 1 << 20, false));
        }
        bufs.push((0x3f0_0000 + i, 1, true));
        v.place(0, &bufs, true);
    }
    v.force_kick(0);
    thread::sleep(Duration::from_millis(150));
    let mut m = std::os::unix::net::UnixStream::connect(&rpc).unwrap();
    {
        use std::io::{BufRead, Write};
        writeln!(
            m,
            r#"{{"jsonrpc":"2.0","id":1,"method":"device_remove","params":{{"name":"vic","force":true}}}}"#
        )
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&m).read_line(&mut line).unwrap();
        assert!(line.contains("\"removed\":true"), "{line}");
    }
    // A new window anywhere takes a slot given back since.
    assert_eq!(dma_map(&mut x, 1 << 41, page.as_raw_fd()), 0);
    // (This process must not touch the memory once it is cut.)
    v.ram.set_len(0).unwrap();
    thread::sleep(Duration::from_millis(1500));
    srv.assert_alive();
    drop(x);
    std::mem::forget(v);
    srv.assert_healthy();
}

/// From the hostile review of finding 4's fix: a queue broken after one
/// look at its ring kept that snapshot of guest memory, and with it every
/// window the client had mapped: mapping 4,095 windows, breaking a queue
/// and unmapping them, four times, left the process holding 15,000
/// descriptors, and no other device could be added. A broken queue keeps
/// no snapshot, and unmapped windows a request still uses count against
/// the connection's limit.
#[test]
fn unmapped_windows_cannot_be_piled_up_through_broken_queues() {
    use std::os::fd::AsRawFd;
    let t = RpcTarget::start(&[]);
    let sock = t.dir.path("d.sock");
    t.ok(
        "device_add",
        json!({"name": "d", "socket": sock, "disk": "null:16M", "queues": 4}),
    );
    let mut d = Driver::new(&sock, DriverOptions::default());
    let page = vfio_user_blk::util::memfd("page").unwrap();
    page.set_len(4096).unwrap();
    for round in 0..4usize {
        let mut mapped = Vec::new();
        for i in 0..4095u64 {
            let iova = (1u64 << 40) + ((round as u64) << 32) + i * 4096;
            if d.c.dma_map(0, iova, 4096, page.as_raw_fd()).is_err() {
                break;
            }
            mapped.push(iova);
        }
        // The queue takes one look at its ring, then breaks.
        let idx = d.avail_idx(round);
        d.set_avail_idx(round, idx.wrapping_add(1000));
        d.force_kick(round);
        thread::sleep(Duration::from_millis(50));
        for iova in &mapped {
            d.c.dma_unmap(*iova, 4096).unwrap();
        }
        let fds = std::fs::read_dir(format!("/proc/{}/fd", t.child.id()))
            .unwrap()
            .count();
        assert!(
            fds < 200,
            "round {round}: the server holds {fds} descriptors"
        );
    }
    t.ok(
        "device_add",
        json!({"name": "late", "socket": t.dir.path("late.sock"), "disk": "ram:1M"}),
    );
}

/// From the hostile review: the io_uring of a reactor had one limit (its
/// completion queue) for every device on it, so a device keeping 16 queues
/// full of 8 MiB O_DIRECT reads took the whole ring: another device's 4 KiB
/// read waited 4.5 to 5.5 s for a place, and the first device's own reset
/// 12 s for all of it. A device now takes at most half the ring and 32 MiB
/// of it.
#[test]
fn one_devices_large_reads_leave_room_in_the_io_uring_for_another() {
    let _one = one_at_a_time();
    use std::io::Write;
    let dir = support::on_disk("ringshare");
    let a_img = dir.path("a.img");
    {
        let mut f = std::fs::File::create(&a_img).unwrap();
        let chunk = pattern(5, 1 << 20);
        for _ in 0..256 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let (b_sock, dev) = device_b(&dir);
    let a_path = a_img.to_str().unwrap().to_string();
    let srv = ServerProcess::start_in(
        dir,
        &[
            "--disk",
            &a_path,
            "--direct",
            "--queues",
            "16",
            "--pollers",
            "1",
            "--device",
            &dev,
        ],
    );
    let mut b = Driver::new(&b_sock, DriverOptions::default());
    let reads = |b: &mut Driver, n: u64| -> Vec<Duration> {
        (0..n)
            .map(|i| {
                let t = Instant::now();
                assert_eq!(b.read(0, (i % 256) * 8, 4096).0, S_OK);
                t.elapsed()
            })
            .collect()
    };
    reads(&mut b, 10);
    let alone = p50(reads(&mut b, 50));
    let mut a = Driver::new(
        &srv.socket,
        DriverOptions {
            ram_size: 64 * MB,
            ..Default::default()
        },
    );
    // One aligned 1 MiB buffer behind all of A's descriptors: 8 MiB reads.
    let buf = 32 * MB;
    for q in 0..16usize {
        for i in 0..64usize {
            let h = a.header_buf(T_IN, (i as u64 % 16) * (8 * MB / 512));
            let mut bufs = vec![(h, 16u32, false)];
            for _ in 0..8 {
                bufs.push((buf, 1 << 20, true));
            }
            bufs.push((48 * MB + (q * 64 + i) as u64, 1, true));
            a.place(q, &bufs, true);
        }
    }
    for q in 0..16 {
        a.force_kick(q);
    }
    thread::sleep(Duration::from_millis(300));
    let under = reads(&mut b, 10);
    let done: usize = (0..16).map(|q| usize::from(a.used_idx(q))).sum();
    let t = Instant::now();
    a.reset();
    let reset = t.elapsed();
    eprintln!(
        "device B's 4 KiB O_DIRECT reads: p50 {alone:?} alone, {:?} (max {:?}) while A's 1,024 \
         8 MiB reads ran ({done} done then); A's reset {reset:?}",
        p50(under.clone()),
        under.iter().max().unwrap()
    );
    assert!(done < 1024, "A's flood ended before B's reads");
    assert!(
        *under.iter().max().unwrap() < Duration::from_secs(1),
        "B waited behind A's flood: {under:?}"
    );
    assert!(reset < Duration::from_secs(3), "A's reset took {reset:?}");
    let mut srv = srv;
    srv.assert_healthy();
}

/// A busy reactor on a CPU it shares with the I/O threads sleeps while
/// only their work is pending, to give them the CPU. In busy mode guests
/// ring no doorbells, so another device's guest on that reactor would then
/// wait for the first device's disk to answer: the reactor asks for
/// doorbells before it sleeps. (Without that, the second device's write
/// waited for the stuck read.)
#[test]
fn a_busy_reactor_sharing_its_cpu_does_not_make_a_device_wait_for_anothers_disk() {
    let _one = one_at_a_time();
    let _cpu = confine_to_one_cpu();
    let dir = TempDir::new("share");
    let target = target_in(&dir, BUSY_THREADS);
    let stuck = dir.path("stuck.sock");
    let be = add_stuck_disk(&target, &stuck);
    let other = dir.path("other.sock");
    target
        .add(
            format!("socket={},disk=ram:1M,name=other", other.display())
                .parse()
                .unwrap(),
        )
        .unwrap();
    let mut d = Driver::new(&stuck, DriverOptions::default());
    support::gate::stuck_read(&mut d, 64);
    be.wait_entered();
    // Give the reactor time to go to sleep behind the stuck read.
    thread::sleep(Duration::from_millis(50));
    // It sleeps there, not spinning on the CPU the I/O needs (seen failing
    // when it spins for as long as the read is stuck).
    let running = reactor_running_share(Duration::from_millis(200));
    let served = within(Duration::from_secs(5), move || {
        let mut b = Driver::new(&other, DriverOptions::default());
        let data = support::driver::pattern(9, 4096);
        (0..20).all(|i| {
            // Each write after a pause, with the reactor asleep again, so
            // that only a doorbell can wake it (seen failing when it sleeps
            // without asking for doorbells; without the pause, a reactor
            // that spins a while after its last work, as 63fff76's did,
            // served the writes without one and hid that).
            thread::sleep(Duration::from_millis(2));
            b.write(0, i * 8, &data) == S_OK
        })
    });
    be.release();
    assert_eq!(
        served,
        Some(true),
        "the other device's writes waited for the stuck disk"
    );
    assert!(
        running < 0.5,
        "the busy reactor was running or runnable in {:.0} % of the samples while only a stuck read was in flight",
        running * 100.0
    );
}

/// A busy reactor on a CPU it shares with its I/O threads, with several
/// requests in their hands and their completions coming every few tens of
/// microseconds, sleeps between them: it does not spin on the CPU the
/// requests need. Seen failing when a reactor spins for a while after its
/// last work whatever is in flight, as 63fff76's did (each completion
/// renewed the spin, and O_DIRECT runs at QD32 collapsed to 2.3k IOPS now
/// and then): it slept about 0.12 times a completion, and 2 times without
/// that spin.
#[test]
fn a_busy_reactor_sharing_its_cpu_sleeps_while_several_requests_are_out() {
    let _one = one_at_a_time();
    let _cpu = confine_to_one_cpu();
    // A disk whose reads take 1 ms each (a network disk).
    let be = support::gate::Gate::slow_reads(Duration::from_millis(1));
    let before = Reactors::now();
    let (_dir, sock) = support::gate::serve_on(be, BUSY_THREADS);
    let mut d = Driver::new(&sock, DriverOptions::default());
    // This server's reactor only (another test's would count otherwise).
    let ours = before.started_since();
    // Its time on a CPU and the times it went to sleep, summed.
    let reactor = move || ours.run_and_sleeps();
    // Eight reads out at all times until the sampler has measured 300 ms,
    // after 100 ms to settle.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (stop2, done2) = (stop.clone(), done.clone());
    let sampler = thread::spawn(move || {
        use std::sync::atomic::Ordering::SeqCst;
        thread::sleep(Duration::from_millis(100));
        let (t0, (r0, s0), d0) = (Instant::now(), reactor(), done2.load(SeqCst));
        thread::sleep(Duration::from_millis(300));
        let ((r1, s1), d1) = (reactor(), done2.load(SeqCst));
        stop2.store(true, SeqCst);
        let share = (r1 - r0) as f64 / t0.elapsed().as_nanos() as f64;
        (share, s1 - s0, d1 - d0)
    });
    let mut out = 0usize;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        while out < 8 {
            let sector = ((done.load(std::sync::atomic::Ordering::SeqCst) + out) % 1000) as u64 * 8;
            d.submit(0, &Request::read(sector, 4096));
            out += 1;
        }
        d.kick(0);
        let n = d.wait_used(0, 1, Duration::from_secs(5)).len();
        out -= n;
        done.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }
    d.wait_used(0, out, Duration::from_secs(5));
    let (share, sleeps, reads) = sampler.join().unwrap();
    assert!(
        reads > 100,
        "only {reads} reads while the reactor was measured"
    );
    // Sleeping at once, it sleeps about once a completion (fewer when
    // completions come together); spinning, hardly ever. Counted, not
    // timed: the same on a slow machine or a busy one.
    assert!(
        sleeps * 4 > reads as u64,
        "the busy reactor slept {sleeps} times for {reads} completions (on the CPU {:.0} % of the time) while eight reads were with the I/O threads",
        share * 100.0
    );
}

/// A busy reactor on a CPU it shares with its I/O threads, with one
/// request stuck in their hands, keeps sleeping while the guest rings
/// doorbells with nothing new on the ring: a wake with no work does not
/// start the one-request spin again (before the fix, every doorbell did,
/// and a guest ringing every 100 µs kept the reactor on the CPU).
#[test]
fn empty_doorbells_do_not_keep_a_busy_reactor_on_a_shared_cpu() {
    let _one = one_at_a_time();
    let _cpu = confine_to_one_cpu();
    let before = Reactors::now();
    let (gate, _dir, mut d) = support::gate::stuck_reads(BUSY_THREADS);
    let ours = before.started_since();
    let sleeps = || ours.run_and_sleeps().1;
    support::gate::stuck_read(&mut d, 64);
    gate.wait_entered();
    thread::sleep(Duration::from_millis(50));
    let s0 = sleeps();
    let mut rings = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(300) {
        d.force_kick(0);
        rings += 1;
        thread::sleep(Duration::from_micros(100));
    }
    let slept = sleeps() - s0;
    gate.release();
    d.wait_used(0, 1, Duration::from_secs(5));
    assert!(rings > 100, "only {rings} doorbells rung");
    // Sleeping after each, it sleeps about once a doorbell; spun up by
    // each, it hardly sleeps at all.
    assert!(
        slept * 4 > rings,
        "the busy reactor slept {slept} times for {rings} empty doorbells with one request stuck"
    );
}

/// One device's stuck request does not cost another device's lone request
/// on the same busy reactor its short spin: the reactor counted every
/// request out, so the stuck one made the other "two out", and it slept
/// at once after each of the other's requests (a 4 KiB buffered write at
/// QD1 took 34 µs instead of 21 for as long as the first was stuck).
#[test]
fn another_devices_stuck_request_leaves_a_lone_request_its_spin() {
    lone_request_beside_a_stuck_one(false);
}

/// The same while the stuck request's own guest keeps its queue moving
/// with other reads, one every 700 µs or so: staleness was judged by a
/// queue's last taken or finished request, so those kept the stuck one
/// counted (and the reactor slept after each of the other's reads). It is
/// judged by each request's age now.
#[test]
fn a_stuck_request_stays_stale_while_its_queue_keeps_moving() {
    lone_request_beside_a_stuck_one(true);
}

/// Device "stuck" has a read stuck (and, with `stream`, a thread reading
/// elsewhere on the same queue meanwhile); device "other" on the same busy
/// reactor reads at QD1, each read waited for without sleeping: the reactor
/// must spin for them rather than sleep after each.
fn lone_request_beside_a_stuck_one(stream: bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _one = one_at_a_time();
    let _cpu = confine_to_one_cpu();
    let before = Reactors::now();
    let dir = TempDir::new("lone");
    let target = target_in(&dir, BUSY_THREADS);
    let stuck = dir.path("stuck.sock");
    let be = add_stuck_disk(&target, &stuck);
    let other = dir.path("other.sock");
    add_gated_disk(
        &target,
        &other,
        "other",
        support::gate::Gate::slow_reads(Duration::ZERO),
    );
    let ours = before.started_since();
    let sleeps = || ours.run_and_sleeps().1;
    let mut d = Driver::new(&stuck, DriverOptions::default());
    support::gate::stuck_read(&mut d, 64);
    be.wait_entered();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // The stuck device's guest reads past its stuck read (sectors 128 on,
    // away from the gate's), each done at once, often enough that its
    // queue always moved within the last millisecond.
    let streamer = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut done = 0u64;
            while stream && !stop.load(Ordering::Relaxed) {
                let r = d.submit(0, &Request::read(128 + (done % 64) * 8, 4096));
                d.kick(0);
                let t = Instant::now();
                while d.try_used(0).is_empty() {
                    assert!(
                        t.elapsed() < Duration::from_secs(5),
                        "stream read {done} lost"
                    );
                    thread::yield_now();
                }
                assert_eq!(d.result(&r).0, S_OK);
                done += 1;
                thread::sleep(Duration::from_micros(700));
            }
            (d, done)
        })
    };
    // The stream ends however this test does.
    struct Stop(std::sync::Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Stop(stop);
    thread::sleep(Duration::from_millis(50));
    let mut b = Driver::new(&other, DriverOptions::default());
    for i in 0..20 {
        assert_eq!(b.read(0, i * 8, 4096).0, S_OK);
    }
    // Rounds of 300 reads, each waited for without sleeping (the guest
    // yields the one CPU), so that the next comes within the reactor's
    // spin; up to three, for tests of this file that load the CPU at the
    // same time.
    let n = 300u64;
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let s0 = sleeps();
        for i in 0..n {
            let r = b.submit(0, &Request::read((i % 100) * 8, 4096));
            b.kick(0);
            let t = Instant::now();
            while b.try_used(0).is_empty() {
                assert!(t.elapsed() < Duration::from_secs(5), "read {i} lost");
                thread::yield_now();
            }
            assert_eq!(b.result(&r).0, S_OK);
        }
        rounds.push(sleeps() - s0);
        // Sleeping at once, it sleeps once a read or more in every round
        // (294 to 304 times for 300 without the fix). Spinning while its
        // read is out, it catches the completion and the next read
        // without sleeping, but for a spin that runs out and a lock it
        // waits for (14 to 105 times in most rounds, up to 241 in a few).
        // Counted, not timed.
        if rounds[rounds.len() - 1] * 10 < n * 9 {
            break;
        }
    }
    drop(stop);
    let (mut d, streamed) = streamer.join().unwrap();
    be.release();
    d.wait_used(0, 1, Duration::from_secs(5));
    eprintln!("sleeps per round of {n}: {rounds:?}; stream reads: {streamed}");
    assert!(!stream || streamed > 5, "the stream made {streamed} reads");
    assert!(
        rounds.iter().any(|&slept| slept * 10 < n * 9),
        "the busy reactor slept {rounds:?} times in rounds of {n} reads of one device while another's read was stuck"
    );
}

/// A disk whose io_uring reads come from a pipe: they wait until the test
/// writes into it (a disk that stops answering).
struct PipeDisk {
    read_end: std::os::fd::OwnedFd,
}

impl vfio_user_blk::backend::io::Backend for PipeDisk {
    fn read_at(&self, _: &[vfio_user_blk::backend::io::GuestIov], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EIO))
    }
    fn write_at(&self, _: &[vfio_user_blk::backend::io::GuestIov], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EIO))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn inline(&self) -> bool {
        false
    }
    fn uring_target(&self) -> Option<vfio_user_blk::backend::io::UringTarget> {
        use std::os::fd::AsRawFd;
        Some(vfio_user_blk::backend::io::UringTarget {
            fd: self.read_end.as_raw_fd(),
            direct_align: None,
            durable: false,
        })
    }
}

/// A busy reactor that sleeps to give its shared CPU to the I/O asks for
/// no doorbell on a queue whose io_uring requests are moving (their
/// completions wake it, and it takes what came meanwhile). When they stop
/// moving it must ask again: a request the guest adds then, ringing no
/// doorbell as it was told, would wait for a completion that never comes.
/// (Without the reactor's deadline it waited forever.)
#[test]
fn a_request_behind_io_uring_requests_that_stopped_is_still_taken() {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    if let Err(e) = vfio_user_blk::backend::uring::available() {
        eprintln!("skipped: io_uring is not available on this machine ({e})");
        return;
    }
    let _one = one_at_a_time();
    let _cpu = confine_to_one_cpu();
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just made these descriptors and nothing else owns them.
    let (read_end, write_end) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let dir = TempDir::new("lazy");
    let target = target_in(
        &dir,
        &[
            "--poll-mode",
            "busy",
            "--pollers",
            "1",
            "--io-engine",
            "io-uring",
        ],
    );
    let sock = dir.path("p.sock");
    add_gated_disk(
        &target,
        &sock,
        "pipe",
        std::sync::Arc::new(PipeDisk { read_end }),
    );
    let mut d = Driver::new(&sock, DriverOptions::default());
    let reads: Vec<_> = (0..2)
        .map(|_| d.submit(0, &Request::read(0, 4096)))
        .collect();
    d.kick(0);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(0), 0, "the pipe's reads did not wait");
    // A write: the disk drops it (EIO) at once; what matters is that it is
    // taken, rung for only if the device asks.
    let w = d.submit(0, &Request::write(8, &[1u8; 512]));
    d.kick(0);
    let t = Instant::now();
    while d.used_idx(0) == 0 && t.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
    }
    let taken = d.used_idx(0) > 0;
    // The reads get their bytes, so that everything ends.
    (&write_end).write_all(&[0u8; 8192]).unwrap();
    let used = d.wait_used(0, 3, Duration::from_secs(5));
    assert!(
        taken,
        "a request added while the disk's requests stood still was not taken in 5 s"
    );
    assert_eq!(used[0].0, w.head, "the write was not the first completed");
    for r in &reads {
        assert_eq!(d.result(r).0, S_OK);
    }
}

/// Reactor threads of this process, by thread id.
struct Reactors(Vec<u32>);

impl Reactors {
    fn now() -> Reactors {
        Reactors(
            threads_named(std::process::id(), "reactor-")
                .iter()
                .map(|t| t.tid)
                .collect(),
        )
    }

    /// Those started since `self` was taken (a target's of this test; not
    /// another test's, which would count otherwise); at least one. A
    /// thread just spawned names itself when it first runs: on a loaded
    /// machine that may take a moment (a CI run found none at once).
    fn started_since(&self) -> Reactors {
        let new = || -> Vec<u32> {
            Reactors::now()
                .0
                .into_iter()
                .filter(|t| !self.0.contains(t))
                .collect()
        };
        wait_until("a reactor thread of this test's target", || {
            !new().is_empty()
        });
        Reactors(new())
    }

    /// Their time on a CPU (ns) and the times they went to sleep, summed.
    fn run_and_sleeps(&self) -> (u64, u64) {
        threads_named(std::process::id(), "reactor-")
            .iter()
            .filter(|t| self.0.contains(&t.tid))
            .fold((0, 0), |(r, s), t| {
                (r + t.run_ns.unwrap_or(0), s + t.sleeps)
            })
    }
}

/// A busy reactor with the thread-pool engine.
const BUSY_THREADS: &[&str] = &[
    "--poll-mode",
    "busy",
    "--pollers",
    "1",
    "--io-engine",
    "threads",
];

/// This thread, and every thread of a target started from it, on one CPU:
/// the reactor and the I/O threads share it. The thread gets its CPUs back
/// when the guard goes (the test harness runs later tests on it).
fn confine_to_one_cpu() -> impl Drop {
    struct Restore(libc::cpu_set_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: pid 0 is this thread; the pointer and size describe
            // the set saved before it was confined.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
        }
    }
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the kernel writes at most `size` bytes
    // into `old`.
    assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut old) }, 0);
    let cpu = vfio_user_blk::engine::usable_cpus().unwrap()[0];
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set` (a CPU the process has).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    assert_eq!(unsafe { libc::sched_setaffinity(0, size, &set) }, 0);
    Restore(old)
}

/// The share of samples, taken every millisecond for `span`, in which a
/// reactor thread of this process was running or runnable.
fn reactor_running_share(span: Duration) -> f64 {
    let start = Instant::now();
    let (mut samples, mut running) = (0u32, 0u32);
    while start.elapsed() < span {
        let any = threads_named(std::process::id(), "reactor-")
            .iter()
            .any(|t| t.state == 'R');
        samples += 1;
        running += u32::from(any);
        thread::sleep(Duration::from_millis(1));
    }
    f64::from(running) / f64::from(samples.max(1))
}

/// A target in this process, its management socket in `dir` (unused: the
/// test calls the target directly), started with `args`.
fn target_in(dir: &TempDir, args: &[&str]) -> std::sync::Arc<vfio_user_blk::target::Target> {
    let rpc = dir.path("unused-rpc.sock");
    let mut argv = vec!["x", "--rpc-socket", rpc.to_str().unwrap()];
    argv.extend_from_slice(args);
    <vfio_user_blk::cli::Options as clap::Parser>::parse_from(argv)
        .start_target()
        .unwrap()
}
