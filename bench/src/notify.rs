//! The doorbell study (`--notify-study`): one guest, one request at a time,
//! our device in adaptive mode, three ways for the doorbell to travel:
//! - `legacy`: BAR0, an I/O-port write QEMU sends and waits for;
//! - `modern`: BAR4's notify area, a memory write QEMU posts;
//! - `modern-mmap`: `--notify mmap`, a store into the shared notify page
//!   (the device's queues are polled).
//!
//! With no pause between requests the reactor is still spinning when the
//! next one comes and asks for no doorbell; with a pause longer than its
//! spin (200 µs) every request needs one, which is what a slow or mostly
//! idle guest sees. Reported per set-up: request latency (p50, p99), the
//! guest's time inside the doorbell write (the vCPU's stall), doorbells per
//! request and the server's CPU per request; medians of `--repeat`
//! interleaved runs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::vfio::{Interface, VfioUserBlk};
use crate::guest::{GuestRam, Transport};
use crate::report::median;
use crate::run::{new_hist, process_cpu, RING_BASE};
use crate::servers::{start_ours, OursDisk};
use vub_testkit::driver_ring::Buf;

/// One set-up of the study.
struct Setup {
    name: &'static str,
    iface: Interface,
    extra: &'static [&'static str],
}

const SETUPS: [Setup; 3] = [
    Setup {
        name: "legacy",
        iface: Interface::Legacy,
        extra: &[],
    },
    Setup {
        name: "modern",
        iface: Interface::Modern,
        extra: &[],
    },
    Setup {
        name: "modern-mmap",
        iface: Interface::Modern,
        extra: &["--notify", "mmap"],
    },
];

/// Pauses between requests, in µs.
const GAPS: [u64; 2] = [0, 1000];

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    ios: u64,
    p50_us: f64,
    p99_us: f64,
    kick_p50_us: f64,
    kicks_per_io: f64,
    server_cpu_us_per_io: f64,
}

const HDR: u64 = 0x200_0000;
const STATUS: u64 = HDR + 16;
const DATA: u64 = HDR + 4096;

/// QD1 4 KiB random reads for `secs`, `gap` between requests.
fn run_one(
    g: &mut VfioUserBlk,
    ram: &GuestRam,
    ring: &mut vub_testkit::driver_ring::SplitRing,
    disk_size: u64,
    gap: Duration,
    secs: Duration,
    pid: u32,
) -> Result<Figures> {
    let mem = &ram.mem;
    let mut lat = new_hist();
    let mut kick = new_hist();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let blocks = (disk_size / 4096).max(1);
    let cpu0 = process_cpu(pid);
    let kicks0 = g.kicks;
    let deadline = Instant::now() + secs;
    let mut ios = 0u64;
    while Instant::now() < deadline {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sector = (x % blocks) * 8;
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR))?;
        mem.write_obj(0xffu8, GuestAddress(STATUS))?;
        let bufs = [
            Buf {
                addr: HDR,
                len: 16,
                write: false,
            },
            Buf {
                addr: DATA,
                len: 4096,
                write: true,
            },
            Buf {
                addr: STATUS,
                len: 1,
                write: true,
            },
        ];
        let head = ring.add(mem, &bufs, None).context("ring full")?;
        ring.publish(mem, head);
        let t0 = Instant::now();
        if ring.kick_needed(mem) {
            let k = Instant::now();
            g.kick(0)?;
            let _ = kick.record(
                u64::try_from(k.elapsed().as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        }
        let fd = g.irq_fd(0);
        let wait_deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ring.pop_used(mem).is_some() {
                break;
            }
            if Instant::now() > wait_deadline {
                bail!("a request did not complete in 10 s");
            }
            if !ring.enable_interrupts(mem) {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
                let mut v = [0u8; 8];
                // SAFETY: reading 8 bytes from an eventfd into a local.
                unsafe { libc::read(fd, v.as_mut_ptr().cast(), 8) };
            }
        }
        let _ = lat.record(
            u64::try_from(t0.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        let st: u8 = mem.read_obj(GuestAddress(STATUS))?;
        if st != 0 {
            bail!("read at sector {sector} failed with status {st}");
        }
        ios += 1;
    }
    let cpu = process_cpu(pid) - cpu0;
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(Figures {
        ios,
        p50_us: us(lat.value_at_quantile(0.5)),
        p99_us: us(lat.value_at_quantile(0.99)),
        kick_p50_us: if kick.is_empty() {
            0.0
        } else {
            us(kick.value_at_quantile(0.5))
        },
        kicks_per_io: (g.kicks - kicks0) as f64 / ios.max(1) as f64,
        server_cpu_us_per_io: cpu * 1e6 / ios.max(1) as f64,
    })
}

/// Runs the study on the (cached) image; prints the table and returns it
/// as JSON.
pub fn study(image: &Path, size: u64, secs: Duration, repeat: usize) -> Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("vub-notify-{}", std::process::id()));
    let mut all: Vec<(u64, &'static str, Vec<Figures>)> = Vec::new();
    for gap in GAPS {
        for s in &SETUPS {
            all.push((gap, s.name, Vec::new()));
        }
    }
    for rep in 0..repeat {
        for gap in GAPS {
            for s in &SETUPS {
                eprint!(
                    "\rbench: doorbells: run {}/{repeat}, gap {gap} µs, {}            ",
                    rep + 1,
                    s.name
                );
                let mut args: Vec<String> = ["--poll-mode", "adaptive", "--pollers", "1"]
                    .iter()
                    .map(|a| a.to_string())
                    .collect();
                args.extend(s.extra.iter().map(|a| a.to_string()));
                let server = start_ours(
                    None,
                    &dir.join(s.name),
                    &[OursDisk {
                        spec: image.to_str().context("image path")?.to_string(),
                        direct: false,
                    }],
                    1,
                    256,
                    &args,
                )?;
                let ram = GuestRam::new(64 << 20)?;
                let mut g = VfioUserBlk::connect(&server.socks[0], &ram)?;
                let mut rings = match s.iface {
                    Interface::Legacy => g.setup(&ram, 1, RING_BASE, 0)?,
                    Interface::Modern => g.setup_modern(&server.socks[0], &ram, 1, RING_BASE, 0)?,
                };
                let pid = server.pids()[0];
                let f = run_one(
                    &mut g,
                    &ram,
                    &mut rings[0],
                    size,
                    Duration::from_micros(gap),
                    secs,
                    pid,
                )
                .with_context(|| format!("{} with a {gap} µs gap", s.name))?;
                let _ = g.client.shutdown();
                drop(server);
                if let Some(e) = all.iter_mut().find(|e| e.0 == gap && e.1 == s.name) {
                    e.2.push(f);
                }
            }
        }
    }
    eprintln!();
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = Vec::new();
    println!(
        "Doorbells: 4 KiB random reads at QD1, page cache, adaptive polling, medians of {repeat} runs of {:.1} s",
        secs.as_secs_f64()
    );
    println!(
        "{:>7} {:<12} {:>9} {:>9} {:>9} {:>11} {:>10} {:>11} {:>9}",
        "gap µs",
        "set-up",
        "IOPS",
        "p50 µs",
        "p99 µs",
        "doorbell µs",
        "bells/req",
        "srv µs/req",
        "p50/leg"
    );
    for gap in GAPS {
        let legacy_p50 = all
            .iter()
            .find(|e| e.0 == gap && e.1 == "legacy")
            .map(|e| median(e.2.iter().map(|f| f.p50_us).collect()))
            .unwrap_or(0.0);
        for (g, name, runs) in all.iter().filter(|e| e.0 == gap) {
            let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
            let iops = m(|f| f.ios as f64) / secs.as_secs_f64();
            let p50 = m(|f| f.p50_us);
            let ratio = if legacy_p50 > 0.0 {
                p50 / legacy_p50
            } else {
                0.0
            };
            println!(
                "{g:>7} {name:<12} {iops:>9.0} {p50:>9.1} {:>9.1} {:>11.1} {:>10.2} {:>11.1} {ratio:>8.2}x",
                m(|f| f.p99_us),
                m(|f| f.kick_p50_us),
                m(|f| f.kicks_per_io),
                m(|f| f.server_cpu_us_per_io),
            );
            rows.push(serde_json::json!({
                "gap_us": g, "setup": name, "iops": iops, "p50_us": p50,
                "p99_us": m(|f| f.p99_us), "doorbell_p50_us": m(|f| f.kick_p50_us),
                "doorbells_per_request": m(|f| f.kicks_per_io),
                "server_cpu_us_per_request": m(|f| f.server_cpu_us_per_io),
                "p50_vs_legacy": ratio,
            }));
        }
    }
    Ok(serde_json::json!({ "doorbells": rows }))
}
