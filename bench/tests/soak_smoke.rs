//! The soak's pieces end to end against the real server: two clients
//! (legacy, then modern) write, flush and read until their time is up and
//! stop gracefully; `soak-verify` replays their journals and passes the
//! image, then fails it once an acknowledged sector is zeroed by hand,
//! holds another sector's data or has one bit flipped. (The kill-and-reattach loop itself is
//! scripts/soak.sh.)

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::TempDir;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfio-user-blk-bench"))
        .args(args)
        .output()
        .unwrap()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(dir: &TempDir) -> Server {
    let bench = Path::new(env!("CARGO_BIN_EXE_vfio-user-blk-bench"));
    let bin = bench.with_file_name("vfio-user-blk");
    let sock = dir.path("d0.sock");
    let spec = format!(
        "name=d0,socket={},disk={},size=4M,queues=2",
        sock.display(),
        dir.path("d0.img").display()
    );
    let child = Command::new(bin)
        .args(["--device", &spec, "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server(child);
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

fn client(dir: &TempDir, journal: &str, cycle: &str, interface: &str) {
    let sock = dir.path("d0.sock");
    let j = dir.path(journal);
    let args = format!(
        "soak-client --socket {} --journal {} --seed 9 --cycle {cycle} --disk-size 4M \
         --interface {interface} --queues 2 --max-seconds 0.4",
        sock.display(),
        j.display()
    );
    let out = bench(&args.split_whitespace().collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn verify(dir: &TempDir) -> Output {
    bench(&[
        "soak-verify",
        "--seed",
        "9",
        "--image",
        dir.path("d0.img").to_str().unwrap(),
        "--journal",
        dir.path("j1").to_str().unwrap(),
        "--journal",
        dir.path("j2").to_str().unwrap(),
    ])
}

#[test]
fn clients_journal_what_lands_and_the_verifier_catches_a_hand_made_loss() {
    support::build_server_next_to_bench();
    let dir = TempDir::new("soak");
    let _server = start_server(&dir);
    client(&dir, "j1", "1", "legacy");
    // The server needs a moment to let the first client go.
    std::thread::sleep(Duration::from_millis(200));
    client(&dir, "j2", "2", "modern");

    let out = verify(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("PASS"), "{text}");

    // Sectors that hold the second client's writes (acknowledged: it
    // stopped gracefully) and the first client's.
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path("d0.img"))
        .unwrap();
    let mut sector = [0u8; 512];
    // (Built in release, the second client can overwrite every sector
    // the first wrote in its time; then another of its own sectors
    // stands in for the first client's.)
    let (mut newest, mut older, mut other) = (None, None, None);
    for s in 0..(4u64 << 20) / 512 {
        img.read_exact_at(&mut sector, s * 512).unwrap();
        if &sector[0..8] != b"VUBSOAK1" {
            continue;
        }
        let gen = u64::from_le_bytes(sector[16..24].try_into().unwrap());
        if gen >> 32 == 2 && newest.is_none() {
            newest = Some(s);
        } else if gen >> 32 == 2 && other.is_none() {
            other = Some((s, sector));
        }
        if gen >> 32 == 1 && older.is_none() {
            older = Some((s, sector));
        }
    }
    let newest = newest.expect("no sector of the second client");
    let (older, old_sector) = older.or(other).expect("no second written sector");

    // Zeros where an acknowledged write was.
    let mut saved = [0u8; 512];
    img.read_exact_at(&mut saved, newest * 512).unwrap();
    img.write_all_at(&[0u8; 512], newest * 512).unwrap();
    let out = verify(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("sector {newest} ")) && text.contains("holds zeros"),
        "{text}"
    );
    img.write_all_at(&saved, newest * 512).unwrap();
    assert!(verify(&dir).status.success());

    // Another sector's data (from elsewhere, the first client's where
    // one survives): a misdirected write.
    img.write_all_at(&old_sector, newest * 512).unwrap();
    let out = verify(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("sector {older}'s data")), "{text}");

    // A torn sector: the right header, one flipped bit in the body.
    let mut torn = saved;
    torn[200] ^= 0x40;
    img.write_all_at(&torn, newest * 512).unwrap();
    let out = verify(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("torn sector"), "{text}");
    img.write_all_at(&saved, newest * 512).unwrap();
    assert!(verify(&dir).status.success());
}
