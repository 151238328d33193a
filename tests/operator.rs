//! Issue 16, local users and the operator: files and sockets no other user
//! can read or plant, management values typed by their parameter, limits
//! checked where they are given, queue vectors a driver moves. Each test
//! holds the raw input of a finding of the hostile review and fails on the
//! code before its fix.
// Test-only code with small, known values: the cast lints add nothing here.
#![allow(clippy::cast_possible_truncation)]

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::driver::*;
use support::*;

fn euid() -> u32 {
    // SAFETY: geteuid has no memory effects.
    unsafe { libc::geteuid() }
}

/// Finding 6: `--disk new.img --size 1G` under umask 022 made a 0644 file:
/// another local user read a tenant's secret from it. Images are created
/// owner-only.
#[test]
fn created_images_are_private_whatever_the_umask() {
    let dir = TempDir::new("mode");
    let img = dir.path("new.img");
    let sock = dir.path("s.sock");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(bin())
        .args(["--socket", sock.to_str().unwrap()])
        .args(["--disk", img.to_str().unwrap(), "--size", "1M"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the socket", || sock.exists());
    let mode = std::fs::metadata(&img).unwrap().permissions().mode() & 0o777;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode, 0o600, "created image mode {mode:o}");
}

/// `vfio-user-blk ARGS`: its exit status and what it wrote to stderr (a
/// server that did start is stopped after a moment).
fn run(args: &[&str]) -> (std::process::ExitStatus, String) {
    let (_, status, err) = run_bin(args, Duration::from_secs(3));
    (status, err)
}

/// Finding 7: with the README's /tmp paths, another local user could
/// plant the image (or a symlink to a root-only file) before the target
/// started, and read the guest's data from it or have the guest overwrite
/// the link's target. In a folder every user may write to (sticky, like
/// /tmp), an image or socket that another user owns, or a symlink another
/// user made, is refused, as the kernel's protected_regular and
/// protected_symlinks rules would have it. (Runs as root, as CI does: it
/// must give files to another user.)
#[test]
fn images_and_sockets_planted_by_another_user_are_refused() {
    if euid() != 0 {
        eprintln!("SKIPPED: needs root to give a file to another user");
        return;
    }
    let dir = TempDir::new("planted");
    let shared = dir.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let nobody = 65534;
    let chown = |p: &std::path::Path| std::os::unix::fs::lchown(p, Some(nobody), Some(nobody));

    // A planted image.
    let planted = shared.join("vblk.img");
    std::fs::File::create(&planted)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    chown(&planted).unwrap();
    let sock = dir.path("a.sock");
    let (st, err) = run(&[
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        planted.to_str().unwrap(),
    ]);
    assert!(!st.success(), "served a planted image: {err}");
    assert!(err.contains("another user"), "{err}");

    // A planted --config file: it names the disks to open (issue 22).
    let cfg = shared.join("vub.json");
    std::fs::write(
        &cfg,
        format!(
            "{{\"devices\": [{{\"socket\": \"{}\", \"disk\": \"ram:1M\"}}]}}",
            dir.path("c.sock").display()
        ),
    )
    .unwrap();
    chown(&cfg).unwrap();
    let (st, err) = run(&[
        "--rpc-socket",
        dir.path("r.sock").to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(!st.success(), "took a planted configuration: {err}");
    assert!(err.contains("another user"), "{err}");

    // A planted symlink to a root-only file.
    let secret = dir.image("secret.img", 1 << 20);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = shared.join("link.img");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    chown(&link).unwrap();
    let (st, err) = run(&[
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        link.to_str().unwrap(),
    ]);
    assert!(!st.success(), "followed a planted symlink: {err}");
    assert!(err.contains("symlink"), "{err}");

    // A stale socket of another user is not replaced, even with --force.
    let theirs = shared.join("vblk.sock");
    drop(std::os::unix::net::UnixListener::bind(&theirs).unwrap());
    chown(&theirs).unwrap();
    let (st, err) = run(&[
        "--socket",
        theirs.to_str().unwrap(),
        "--disk",
        "ram:1M",
        "--force",
    ]);
    assert!(!st.success(), "replaced another user's socket: {err}");
    assert!(theirs.exists());

    // A folder another user made there, holding a planted image: that
    // user could also swap our socket (from the hostile review of the
    // fix: only the last folder was checked).
    let theirs_dir = shared.join("vm1");
    std::fs::create_dir(&theirs_dir).unwrap();
    chown(&theirs_dir).unwrap();
    let img = theirs_dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (st, err) = run(&[
        "--socket",
        theirs_dir.join("s.sock").to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
    ]);
    assert!(
        !st.success(),
        "served an image in another user's folder: {err}"
    );
    assert!(err.contains("a folder of user 65534"), "{err}");
    // A symlink another user made there, to a folder of ours.
    let ours_dir = dir.path("mine");
    std::fs::create_dir(&ours_dir).unwrap();
    let via = shared.join("via");
    std::os::unix::fs::symlink(&ours_dir, &via).unwrap();
    chown(&via).unwrap();
    let (st, err) = run(&[
        "--socket",
        via.join("s.sock").to_str().unwrap(),
        "--disk",
        "ram:1M",
    ]);
    assert!(!st.success(), "followed another user's symlink: {err}");
    assert!(err.contains("symlink"), "{err}");

    // From the second hostile review: a folder that another group may
    // write to (root:nogroup 2775 here, like Debian's /var/local, root:staff)
    // lets its members swap the image: refused.
    let group_dir = dir.path("group");
    std::fs::create_dir(&group_dir).unwrap();
    std::os::unix::fs::chown(&group_dir, Some(0), Some(nobody)).unwrap();
    std::fs::set_permissions(&group_dir, std::fs::Permissions::from_mode(0o2775)).unwrap();
    let theirs_img = group_dir.join("evil.img");
    std::fs::File::create(&theirs_img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    chown(&theirs_img).unwrap();
    let (st, err) = run(&[
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        theirs_img.to_str().unwrap(),
    ]);
    assert!(
        !st.success(),
        "served an image in a group-writable folder: {err}"
    );
    assert!(err.contains("other users can write to"), "{err}");
    // A symlink of ours, in a folder of ours, to another user's file in
    // the shared folder: what it leads to is checked (it was not).
    let mine = dir.path("links");
    std::fs::create_dir(&mine).unwrap();
    let our_link = mine.join("link.img");
    std::os::unix::fs::symlink(&planted, &our_link).unwrap();
    let (st, err) = run(&[
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        our_link.to_str().unwrap(),
    ]);
    assert!(
        !st.success(),
        "served another user's file through our link: {err}"
    );
    assert!(
        err.contains("another user") && err.contains("through the symlink"),
        "{err}"
    );
    // A symlink that leads nowhere would make the image where it points.
    let dangling = mine.join("nowhere.img");
    std::os::unix::fs::symlink(dir.path("no-such-folder/x.img"), &dangling).unwrap();
    let (st, err) = run(&[
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        dangling.to_str().unwrap(),
        "--size",
        "1M",
    ]);
    assert!(!st.success(), "followed a dangling symlink: {err}");
    assert!(err.contains("leads nowhere"), "{err}");

    // Our own image and socket there are fine.
    let ours = shared.join("ours.img");
    let s = ServerProcess::start(&["--disk", ours.to_str().unwrap(), "--size", "1M"]);
    assert_eq!(std::fs::metadata(&ours).unwrap().uid(), 0);
    drop(s);
}

/// Finding 10: RPC values were typed by how the text looked, so
/// `serial=12345` and `name=1` were refused (numbers, not strings) and
/// `readonly=1` too, though `--device readonly=1` works. Each is now read
/// as its parameter's type, from the `rpc` client and from JSON numbers.
#[test]
fn rpc_values_are_typed_by_their_parameter() {
    let t = RpcTarget::start(&[]);
    let sock = t.dir.path("d1.sock");
    let out = Command::new(bin())
        .args(["rpc", "--rpc-socket", t.rpc.to_str().unwrap(), "device_add"])
        .arg("name=1")
        .arg(format!("socket={}", sock.display()))
        .args(["disk=ram:1M", "serial=12345", "readonly=1", "queues=2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = t.ok("device_list", json!({}));
    let d = &list[0];
    assert_eq!(d["name"], "1");
    assert_eq!(d["serial"], "12345");
    assert_eq!(d["readonly"], true);
    assert_eq!(d["queues"], 2);
    // JSON numbers for text parameters, and 0/1 for flags.
    let r = t.ok(
        "device_add",
        json!({"name": 2, "socket": t.dir.path("d2.sock").to_str().unwrap(),
               "disk": "ram:1M", "serial": 777, "readonly": 0, "queues": "3"}),
    );
    assert_eq!(
        (&r["name"], &r["serial"], &r["readonly"], &r["queues"]),
        (&json!("2"), &json!("777"), &json!(false), &json!(3))
    );
    t.ok("device_remove", json!({"name": 2}));
    // A number that is not a whole number is no text (from the hostile
    // review: 99999999999999999999 became the serial "1e+20").
    let e = t
        .call(
            "device_add",
            json!({"socket": t.dir.path("d3.sock").to_str().unwrap(), "disk": "ram:1M",
                   "serial": 99_999_999_999_999_999_999.0}),
        )
        .unwrap_err();
    assert_eq!(e.0, -32602, "{e:?}");
}

/// Finding 10: `disk=ram:100T` was accepted on a 24 GiB machine (resize
/// refused the same size): a memory disk larger than the machine is
/// refused where it is given.
#[test]
fn a_memory_disk_larger_than_the_machine_is_refused_when_added() {
    let t = RpcTarget::start(&[]);
    let e = t
        .call(
            "device_add",
            json!({"socket": t.dir.path("big.sock").to_str().unwrap(), "disk": "ram:100T"}),
        )
        .unwrap_err();
    assert!(e.1.contains("memory"), "{e:?}");
    let sock = t.dir.path("big2.sock");
    let (st, err) = run(&["--socket", sock.to_str().unwrap(), "--disk", "ram:100T"]);
    assert!(!st.success() && err.contains("memory"), "{err}");
    // Two that each fit, but not together (from the hostile review: the
    // check was per disk).
    let mem = vfio_user_blk::util::memory_bytes();
    let each = format!("ram:{}M", (mem / 10 * 6) >> 20);
    t.ok(
        "device_add",
        json!({"name": "m1", "socket": t.dir.path("m1.sock").to_str().unwrap(), "disk": each}),
    );
    let e = t
        .call(
            "device_add",
            json!({"name": "m2", "socket": t.dir.path("m2.sock").to_str().unwrap(), "disk": each}),
        )
        .unwrap_err();
    assert!(e.1.contains("memory disks of this target"), "{e:?}");
    let e = t
        .call(
            "device_resize",
            json!({"name": "m1", "size": format!("{}M", mem >> 20 << 1)}),
        )
        .unwrap_err();
    assert!(e.1.contains("memory"), "{e:?}");
}

/// From the second hostile review: two resizes of two memory disks at
/// once each passed the check against the other's old size, and together
/// took half as much again as the machine has. The check and the resize
/// are now one step.
#[test]
fn two_memory_disks_resized_at_once_cannot_pass_the_machines_memory() {
    let t = RpcTarget::start(&[]);
    for n in ["r1", "r2"] {
        t.ok(
            "device_add",
            json!({"name": n, "socket": t.dir.path(&format!("{n}.sock")).to_str().unwrap(),
                   "disk": "ram:1M"}),
        );
    }
    let each = (vfio_user_blk::util::memory_bytes() / 4 * 3) & !((1u64 << 20) - 1);
    for attempt in 0..40 {
        let go = std::sync::Barrier::new(2);
        let ok: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = ["r1", "r2"]
                .into_iter()
                .map(|n| {
                    let (t, go) = (&t, &go);
                    s.spawn(move || {
                        use std::io::{BufRead, Write};
                        // Connected first, so that both requests arrive at
                        // once.
                        let mut c = std::os::unix::net::UnixStream::connect(&t.rpc).unwrap();
                        let req = json!({"jsonrpc": "2.0", "id": 1, "method": "device_resize",
                                         "params": {"name": n, "size": each}});
                        go.wait();
                        writeln!(c, "{req}").unwrap();
                        let mut line = String::new();
                        std::io::BufReader::new(c).read_line(&mut line).unwrap();
                        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                        v.get("result").is_some()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            !(ok[0] && ok[1]),
            "attempt {attempt}: both memory disks grew to {each} bytes"
        );
        for (n, grown) in ["r1", "r2"].into_iter().zip(ok) {
            if grown {
                t.ok(
                    "device_resize",
                    json!({"name": n, "size": 1 << 20, "shrink": true}),
                );
            }
        }
    }
}

/// Finding 10: `queue_msix_vector` written after DRIVER_OK was ignored and
/// read back the old vector, neither the new one nor NO_VECTOR (virtio 1.2
/// 4.1.5.1.2.1). A running queue now moves to the new vector: it reads
/// back, and the next completion signals it.
#[test]
fn a_queue_vector_moved_after_driver_ok_is_honoured() {
    use vfio_bindings::bindings::vfio::VFIO_PCI_BAR4_REGION_INDEX as BAR4;
    use vfio_user_blk::virtio::modern;
    let srv = ServerProcess::start(&[
        "--disk",
        "ram:1M",
        "--queues",
        "2",
        "--poll-mode",
        "interrupt",
    ]);
    let mut d = Driver::new(&srv.socket, DriverOptions::modern());
    assert_eq!(d.read(0, 0, 512).0, S_OK);
    d.c.region_write(BAR4, modern::QUEUE_SELECT, &0u16.to_le_bytes())
        .unwrap();
    d.c.region_write(BAR4, modern::QUEUE_MSIX_VECTOR, &2u16.to_le_bytes())
        .unwrap();
    let mut b = [0u8; 2];
    d.c.region_read(BAR4, modern::QUEUE_MSIX_VECTOR, &mut b)
        .unwrap();
    assert_eq!(u16::from_le_bytes(b), 2, "queue_msix_vector read back");
    let (status, _, fired) = d.run_signalled(0, &Request::read(0, 512));
    assert_eq!(status, S_OK);
    assert_eq!(
        fired,
        vec![2],
        "the interrupt went to {fired:?}, not the new vector"
    );
    // A vector that does not exist reads back as NO_VECTOR.
    d.c.region_write(BAR4, modern::QUEUE_MSIX_VECTOR, &9u16.to_le_bytes())
        .unwrap();
    d.c.region_read(BAR4, modern::QUEUE_MSIX_VECTOR, &mut b)
        .unwrap();
    assert_eq!(u16::from_le_bytes(b), 0xffff);
}

/// From the hostile review: `device_add` probed an existing socket with a
/// blocking connect, which never returns when a stuck server's backlog is
/// full, and it held the lock every add and remove (and shutdown) takes.
/// The probe no longer waits, and an add or remove waits for another at
/// most 10 s.
#[test]
fn a_stuck_listener_at_the_socket_path_does_not_hang_device_add() {
    use std::os::fd::AsRawFd;
    let t = RpcTarget::start(&[]);
    let stuck = t.dir.path("stuck.sock");
    let l = std::os::unix::net::UnixListener::bind(&stuck).unwrap();
    // SAFETY: listen on our own socket; a backlog of 0 fills at once.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    // Fill the backlog: connections nobody accepts.
    let mut held = Vec::new();
    for _ in 0..4 {
        // SAFETY: socket has no memory effects; the descriptor is ours.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
        assert!(fd >= 0);
        // SAFETY: just made, owned here.
        let s = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, c) in addr
            .sun_path
            .iter_mut()
            .zip(stuck.to_str().unwrap().bytes())
        {
            *d = libc::c_char::from_ne_bytes([c]);
        }
        // SAFETY: a valid address for the call's duration.
        unsafe {
            libc::connect(
                fd,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        held.push(s);
    }
    let started = std::time::Instant::now();
    let e = t
        .call(
            "device_add",
            json!({"name": "a", "socket": stuck.to_str().unwrap(), "disk": "ram:1M"}),
        )
        .unwrap_err();
    assert!(e.1.contains("in use"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    t.ok(
        "device_add",
        json!({"name": "b", "socket": t.dir.path("b.sock").to_str().unwrap(), "disk": "ram:1M"}),
    );
    drop(held);
    drop(l);
}

/// systemd's readiness protocol: READY=1 once every socket listens (a
/// path and an abstract name), STOPPING=1 at a signal.
#[test]
fn the_service_manager_is_told_when_the_target_is_ready_and_when_it_stops() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let dir = TempDir::new("notify");
    let path = dir.path("notify.sock");
    let abstract_name = format!("vub-notify-{}", std::process::id());
    for (env, listener) in [
        (
            path.to_str().unwrap().to_string(),
            UnixDatagram::bind(&path).unwrap(),
        ),
        (
            format!("@{abstract_name}"),
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap())
                .unwrap(),
        ),
    ] {
        listener
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let sock = dir.path("s.sock");
        let rpc = dir.path("r.sock");
        let mut child = Command::new(bin())
            .args(["--socket", sock.to_str().unwrap(), "--disk", "ram:1M"])
            .args(["--rpc-socket", rpc.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &env)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).expect("no READY=1");
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(msg.contains("READY=1"), "{msg}");
        assert!(msg.contains(&format!("MAINPID={}", child.id())), "{msg}");
        // Ready means listening: both sockets take connections now.
        std::os::unix::net::UnixStream::connect(&sock).unwrap();
        std::os::unix::net::UnixStream::connect(&rpc).unwrap();
        // SAFETY: kill(2) on our own child's PID, not yet reaped.
        unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
        let n = listener.recv(&mut buf).expect("no STOPPING=1");
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(msg.contains("STOPPING=1"), "{msg}");
        assert!(child.wait().unwrap().success());
    }
}

/// The example unit is one systemd takes (systemd-analyze verify), with
/// the binary's path set as the README says to.
#[test]
fn the_example_systemd_unit_verifies() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/vfio-user-blk.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify"));
    let dir = TempDir::new("unit");
    let path = dir.path("vfio-user-blk.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/vfio-user-blk", bin())).unwrap();
    // With its socket unit beside it (socket activation).
    let socket_unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/vfio-user-blk.socket"
    ))
    .unwrap();
    assert!(socket_unit.contains("ListenStream="));
    let socket_path = dir.path("vfio-user-blk.socket");
    std::fs::write(&socket_path, socket_unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .arg(&socket_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("vfio-user-blk.service:"), "{err}");
    assert!(!err.contains("vfio-user-blk.socket:"), "{err}");
}

/// A device socket for a QEMU of another user: its mode and group as
/// asked (`--device` keys, the one-disk flags and device_add), set before
/// it is announced; bad values refused with the reason.
#[test]
fn a_device_socket_gets_the_mode_and_group_asked_for() {
    let dir = TempDir::new("sockmode");
    let s1 = dir.path("a.sock");
    let dev = format!("socket={},disk=ram:1M,socket-mode=0660", s1.display());
    let mut srv = ServerProcess::start(&[
        "--disk",
        "ram:1M",
        "--socket-mode",
        "0640",
        "--device",
        &dev,
    ]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&s1), 0o660);
    assert_eq!(mode(&srv.socket), 0o640);
    srv.assert_healthy();
    drop(srv);
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } == 0 {
        let s2 = dir.path("g.sock");
        let dev = format!(
            "socket={},disk=ram:1M,socket-mode=0660,socket-group=nogroup",
            s2.display()
        );
        let t = RpcTarget::start(&["--device", &dev]);
        let md = std::fs::metadata(&s2).unwrap();
        assert_eq!((md.permissions().mode() & 0o777, md.gid()), (0o660, 65534));
        let s3 = dir.path("r.sock");
        t.ok(
            "device_add",
            json!({"name": "r", "socket": s3, "disk": "ram:1M",
                   "socket-mode": "0620", "socket-group": 65534}),
        );
        let md = std::fs::metadata(&s3).unwrap();
        assert_eq!((md.permissions().mode() & 0o777, md.gid()), (0o620, 65534));
    } else {
        eprintln!("SKIPPED (the group part): needs root");
    }
    for bad in [
        "socket-mode=999",
        "socket-mode=rw",
        "socket-group=no-such-group-here",
    ] {
        let dev = format!("socket={},disk=ram:1M,{bad}", dir.path("x.sock").display());
        let (_, st, err) = run_bin(&["--device", &dev], Duration::from_secs(10));
        assert!(!st.success(), "{bad} accepted");
        assert!(
            err.contains("socket-mode") || err.contains("no group named"),
            "{bad}: {err}"
        );
    }
}

/// Socket activation: a listening socket passed as systemd passes it
/// (descriptor 3, LISTEN_FDS=1, LISTEN_PID) is served as the device's,
/// not bound again, and stays when the target stops.
#[test]
fn a_socket_passed_by_the_service_manager_is_served_and_left_in_place() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("activation");
    let path = dir.path("vm.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();
    let fd = listener.as_raw_fd();
    let dev = format!("socket={},disk=ram:1M", path.display());
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"", bin()])
        .args(["--device", &dev])
        .stderr(std::process::Stdio::piped());
    // SAFETY: dup2 and fcntl are async-signal-safe; they put our listener
    // at descriptor 3 of the child, without close-on-exec (dup2 onto
    // itself would keep it), before exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    // The target answers on the passed socket: a client gets a device.
    let mut d = Driver::new(&path, DriverOptions::default());
    assert_eq!(d.capacity(), 2048);
    assert_eq!(d.write(0, 0, &pattern(1, 4096)), S_OK);
    assert_eq!(d.read(0, 0, 4096), (S_OK, pattern(1, 4096)));
    drop(d);
    // SAFETY: kill(2) on our own child's PID, not yet reaped.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    let out = {
        let st = child.wait().unwrap();
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (st, err)
    };
    assert!(out.0.success(), "{}", out.1);
    assert!(
        out.1.contains("the socket the service manager passed"),
        "{}",
        out.1
    );
    // Not bound again (same file), and not removed at the stop.
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
}
