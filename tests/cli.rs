//! The command line: socket permissions, stale sockets, errors, help.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

use support::*;

#[test]
fn socket_is_owner_only() {
    let srv = ServerProcess::start(&["--disk", "null:1M"]);
    let md = std::fs::metadata(&srv.socket).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(
        md.permissions().mode() & 0o077,
        0,
        "no access for group or others"
    );
}

#[test]
fn stale_socket_is_refused_then_replaced_with_force() {
    let dir = TempDir::new("stale");
    let sock = dir.path("s.sock");
    // A stale socket: bound, then its owner went away without removing it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let out = Command::new(bin())
        .args(["--socket", sock.to_str().unwrap(), "--disk", "null:1M"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stale socket") && err.contains("--force"),
        "{err}"
    );
    let mut srv = ServerProcess::start_in(dir, &["--disk", "null:1M", "--force"]);
    fresh_client_works(&srv.socket);
    srv.assert_alive();
}

#[test]
fn a_socket_in_use_is_never_replaced() {
    let srv = ServerProcess::start(&["--disk", "null:1M"]);
    let out = Command::new(bin())
        .args([
            "--socket",
            srv.socket.to_str().unwrap(),
            "--disk",
            "null:1M",
            "--force",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    fresh_client_works(&srv.socket);
}

#[test]
fn sigterm_removes_the_socket() {
    let mut srv = ServerProcess::start(&["--disk", "null:1M"]);
    let pid = i32::try_from(srv.pid()).unwrap();
    // SAFETY: sending a signal to our own child, by its PID.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(r, 0);
    let st = srv.child.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(!srv.socket.exists());
}

#[test]
fn errors_are_printed_with_their_causes() {
    let dir = TempDir::new("err");
    let out = Command::new(bin())
        .args([
            "--socket",
            dir.path("s.sock").to_str().unwrap(),
            "--disk",
            dir.path("missing.img").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("opening disk") && err.contains("give --size"),
        "{err}"
    );
    assert!(!dir.path("s.sock").exists(), "no socket left behind");
}

#[test]
fn size_creates_a_new_image() {
    let dir = TempDir::new("create");
    let img = dir.path("new.img");
    let srv = ServerProcess::start_in(dir, &["--disk", img.to_str().unwrap(), "--size", "8M"]);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 << 20);
    let mut c = vfio_user::Client::new(&srv.socket).unwrap();
    let mut cap = [0u8; 8];
    c.region_read(0, 20, &mut cap).unwrap();
    assert_eq!(u64::from_le_bytes(cap), (8 << 20) / 512);
}

#[test]
fn help_explains_every_option() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--socket",
        "--disk",
        "--size",
        "--force",
        "--readonly",
        "--queues",
        "--queue-size",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
}

/// Regression (issue 8, bug 5): `--cpus 5000` used to be accepted, and the
/// poller then panicked in CPU_SET when the guest set DRIVER_OK, aborting
/// the server. It is refused at start, before the image or the socket is
/// created.
#[test]
fn cpus_that_do_not_exist_are_refused_before_anything_is_created() {
    let dir = TempDir::new("cpus");
    let sock = dir.path("s.sock");
    let img = dir.path("d.img");
    for cpus in ["5000", "0,4096", "1023"] {
        // The old server accepted these and ran: never wait forever.
        let out = exits_within(
            Command::new(bin())
                .args(["--socket", sock.to_str().unwrap()])
                .args(["--disk", img.to_str().unwrap(), "--size", "1M"])
                .args(["--cpus", cpus]),
        );
        assert!(!out.status.success(), "--cpus {cpus} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--cpus") && err.contains("usable"), "{err}");
        assert!(
            !img.exists(),
            "image created before the options were checked"
        );
        assert!(
            !sock.exists(),
            "socket created before the options were checked"
        );
    }
    // A CPU that exists is fine.
    let mut srv = ServerProcess::start_in(dir, &["--disk", "null:1M", "--cpus", "0"]);
    fresh_client_works(&srv.socket);
    srv.assert_alive();
}

/// Image locks as QEMU takes them: a second server that would write an
/// image another one writes is refused, with the image's name; read-only
/// users share; force-share is for read-only disks only.
#[test]
fn a_second_server_on_a_locked_image_is_refused() {
    let dir = TempDir::new("lock");
    let img = dir.image("d.img", 1 << 20);
    let first = ServerProcess::start(&["--disk", img.to_str().unwrap()]);
    let sock = dir.path("second.sock");
    // A server that takes the image anyway runs: never wait forever.
    let run = |extra: &[&str]| {
        exits_within(
            Command::new(bin())
                .args([
                    "--socket",
                    sock.to_str().unwrap(),
                    "--disk",
                    img.to_str().unwrap(),
                ])
                .args(extra),
        )
    };
    for extra in [&[][..], &["--readonly"][..]] {
        let out = run(extra);
        assert!(!out.status.success(), "{extra:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("locked") && err.contains("d.img"), "{err}");
        assert!(!sock.exists());
    }
    let out = run(&["--force-share"]);
    assert!(!out.status.success(), "force-share without readonly");
    drop(first);
    // Readers share.
    let r1 = ServerProcess::start(&["--disk", img.to_str().unwrap(), "--readonly"]);
    let mut r2 = ServerProcess::start(&["--disk", img.to_str().unwrap(), "--readonly"]);
    r2.assert_alive();
    let out = run(&[]);
    assert!(!out.status.success(), "a writer beside readers");
    drop(r1);
}

/// Runs `cmd` to its end, which must come within 10 s: a server that
/// accepted what it should refuse is killed and the test fails.
fn exits_within(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} accepted: the server is running");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn refused(args: &[&str]) -> String {
    let out = exits_within(Command::new(bin()).args(args));
    assert!(!out.status.success(), "{args:?} accepted");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim().lines().count(), 1, "one plain line: {err}");
    err
}

/// The operator's first hour: bad options are refused with one line that
/// says why, before any file or socket is created, and nothing half made
/// is left behind.
#[test]
fn bad_options_are_refused_before_anything_is_created() {
    let dir = TempDir::new("first-hour");
    let sock = dir.path("s.sock");
    let img = dir.path("new.img");
    let s = sock.to_str().unwrap();
    let i = img.to_str().unwrap();
    for (size, why) in [("0", "positive multiple"), ("1000", "positive multiple")] {
        let e = refused(&["--socket", s, "--disk", i, "--size", size]);
        assert!(e.contains(why), "{e}");
        assert!(!img.exists() && !sock.exists());
    }
    let e = refused(&[
        "--socket",
        s,
        "--disk",
        i,
        "--size",
        "6K",
        "--logical-block-size",
        "4096",
    ]);
    assert!(e.contains("logical block size 4096"), "{e}");
    assert!(!img.exists());
    let long = format!("{}/{}", dir.0.display(), "s".repeat(120));
    let e = refused(&["--socket", &long, "--disk", i, "--size", "1M"]);
    assert!(e.contains("107"), "{e}");
    assert!(!img.exists());
    let e = refused(&[
        "--socket",
        "/nonexistent-folder/s.sock",
        "--disk",
        i,
        "--size",
        "1M",
    ]);
    assert!(e.contains("folder"), "{e}");
    assert!(!img.exists());
    let e = refused(&[
        "--socket",
        s,
        "--disk",
        "/nonexistent-folder/d.img",
        "--size",
        "1M",
    ]);
    assert!(e.contains("folder"), "{e}");
    // A folder as a disk: no size of 2^63.
    let e = refused(&[
        "--socket",
        s,
        "--disk",
        dir.0.to_str().unwrap(),
        "--readonly",
    ]);
    assert!(e.contains("not an image file or a block device"), "{e}");
    // A start that fails after the image was created removes it: the
    // socket path is taken by a regular file.
    std::fs::write(&sock, b"not a socket").unwrap();
    let e = refused(&["--socket", s, "--disk", i, "--size", "1M"]);
    assert!(e.contains("not a socket"), "{e}");
    assert!(
        !img.exists(),
        "the image created for the failed start is left"
    );
    std::fs::remove_file(&sock).unwrap();
    // A missing image without --size says how to create one.
    let e = refused(&["--socket", s, "--disk", i]);
    assert!(e.contains("--size"), "{e}");
}

/// --size on an image that exists is not used, and the log says so.
#[test]
fn size_given_for_an_existing_image_is_reported() {
    let dir = TempDir::new("size-existing");
    let img = dir.image("d.img", 2 << 20);
    let mut srv = ServerProcess::start_in(dir, &["--disk", img.to_str().unwrap(), "--size", "8M"]);
    assert!(srv.log_text().contains("is not used"), "{}", srv.log_text());
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 << 20);
    srv.assert_alive();
}

/// The README's first command, as written there (its arguments, run in a
/// fresh folder as `cargo run --release --` would in the checkout): it
/// creates the 1 GiB image owner-only and serves it on the socket beside
/// it.
#[test]
fn the_readmes_first_command_serves_a_default_disk() {
    let readme = include_str!("../README.md");
    let line = readme
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cargo run --release -- "))
        .expect("the README's first command");
    let args: Vec<&str> = line["cargo run --release -- ".len()..]
        .split_whitespace()
        .collect();
    let dir = TempDir::new("readme");
    let mut child = std::process::Command::new(bin())
        .args(&args)
        .current_dir(&dir.0)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = dir.path("vblk.sock");
    // The file appears at bind, before the socket listens.
    wait_until("the README's socket", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let mut d = support::driver::Driver::new(&sock, Default::default());
    assert_eq!(d.capacity(), (1 << 30) / 512);
    let data = support::driver::pattern(1, 4096);
    assert_eq!(d.write(0, 8, &data), support::driver::S_OK);
    assert_eq!(d.read(0, 8, 4096), (support::driver::S_OK, data));
    drop(d);
    let meta = std::fs::metadata(dir.path("vblk.img")).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(meta.len(), 1 << 30);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

/// The CPUs in a `Cpus_allowed_list` line of /proc/…/status (`0-2,5`).
fn allowed_cpus(status: &str) -> Vec<usize> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    let mut v = Vec::new();
    for part in line.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        v.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap());
    }
    v
}

/// A busy reactor the scheduler moves around takes turns with the guest on
/// a core, which made QD1 latency bimodal: without --cpus, a busy target
/// pins its reactor to the last CPU it may use and says so. Its I/O
/// threads, started from that pinned reactor, used to inherit its one CPU
/// and fight the spinning reactor for it; they now keep off it.
#[test]
fn a_busy_target_pins_its_reactor_and_keeps_its_io_threads_off_that_cpu() {
    let mine = allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap());
    if mine.len() < 2 {
        eprintln!("one CPU: nothing to place");
        return;
    }
    let last = *mine.last().unwrap();
    let busy = ["--poll-mode", "busy", "--io-engine", "threads"];
    let (srv, _img) = support::direct_server("pin", 16 << 20, &busy);
    let mut d = support::driver::Driver::new(&srv.socket, Default::default());
    let data = support::driver::pattern(3, 4096);
    for s in 0..16 {
        assert_eq!(d.write(0, s * 8, &data), support::driver::S_OK);
    }
    assert!(
        srv.log_text()
            .contains(&format!("reactor(s) pinned to CPU {last}")),
        "{}",
        srv.log_text()
    );
    let (mut reactors, mut workers) = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{}/task", srv.pid())).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue;
        };
        let cpus = allowed_cpus(&status);
        if comm.starts_with("reactor-") {
            reactors += 1;
            assert_eq!(cpus, vec![last], "{comm}");
        } else if comm.starts_with("blk-io") {
            workers += 1;
            assert!(
                !cpus.contains(&last) && !cpus.is_empty(),
                "{comm}: {cpus:?}"
            );
        }
    }
    assert_eq!(reactors, 1);
    assert!(workers > 0, "no I/O thread ran");
}

/// Completion scripts and the manual page come from the same definition
/// as --help: every option is in them, and bash takes its script.
#[test]
fn completions_and_the_manual_page_are_generated_from_the_options() {
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    for opt in [
        "--reconnect-delay",
        "--rpc-socket",
        "--format",
        "completions",
    ] {
        assert!(
            bash.contains(opt),
            "{opt} missing from the bash completions"
        );
    }
    let dir = TempDir::new("completions");
    let script = dir.path("c.bash");
    std::fs::write(&script, &bash).unwrap();
    let st = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(st.success(), "bash refuses its completion script");
    for shell in ["zsh", "fish"] {
        assert!(
            run(&["completions", shell]).contains("reconnect-delay"),
            "{shell}"
        );
    }
    let man = run(&["man"]);
    assert!(
        man.contains(".TH vfio-user-blk 1"),
        "{}",
        &man[..200.min(man.len())]
    );
    assert!(
        man.contains("reconnect\\-delay"),
        "an option missing from the manual page"
    );
    let e = Command::new(bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!e.status.success());
}
