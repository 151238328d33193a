//! The soak client's journal: an append-only file of fixed-size binary
//! records, each written with one write(2) on a file opened with O_APPEND,
//! so that a SIGKILL leaves whole records only. The orchestrator replays it
//! into the image model.
//!
//! A record is 64 bytes, a divisor of the page size, so that none spans
//! two pages: the kernel copies a write page by page and stops between two
//! pages when a fatal signal is pending, so a SIGKILL can cut a write that
//! crosses a page boundary (48-byte records were cut so, 32 bytes in, in
//! one soak of 300 cycles).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const RECORD: usize = 64;
// A record never spans two pages.
const _: () = assert!(4096 % RECORD == 0);
const MAGIC: u32 = u32::from_le_bytes(*b"SKJ1");

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// The process started and is connecting (aux: 0 legacy, 1 modern;
    /// count: queues).
    Attach = 1,
    /// DRIVER_OK is set: I/O begins (gen: the negotiated features).
    Ready = 2,
    /// Write `gen` of sectors [sector, sector + count) is about to be made
    /// available to the device.
    Submit = 3,
    /// Write `gen` completed with status OK.
    Ack = 4,
    /// Write `gen` completed with status `aux`.
    Error = 5,
    /// Flush `gen` (a flush number) is about to be made available.
    FlushSubmit = 6,
    /// Flush `gen` completed with status OK.
    FlushAck = 7,
    /// Flush `gen` completed with status `aux`.
    FlushError = 8,
    /// A read of [sector, sector + count) checked out.
    ReadOk = 9,
    /// A read found sector `sector` holding something it must not: `gen`
    /// is what was expected (0: zeros or an earlier client's pattern),
    /// `extra` the generation found (0: none), `aux` a `BadRead` code.
    ReadBad = 10,
    /// A read completed with status `aux` (sector, count).
    ReadError = 11,
    /// Graceful end: everything in flight has completed.
    Exit = 12,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        [
            Attach,
            Ready,
            Submit,
            Ack,
            Error,
            FlushSubmit,
            FlushAck,
            FlushError,
            ReadOk,
            ReadBad,
            ReadError,
            Exit,
        ]
        .into_iter()
        .find(|k| *k as u16 == v)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub aux: u16,
    pub gen: u64,
    pub sector: u64,
    pub extra: u64,
    pub count: u32,
    /// CLOCK_MONOTONIC in nanoseconds (comparable between processes).
    pub t_ns: u64,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl Record {
    pub fn new(kind: Kind, gen: u64) -> Record {
        Record {
            kind,
            aux: 0,
            gen,
            sector: 0,
            extra: 0,
            count: 0,
            t_ns: 0,
        }
    }

    pub fn encode(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[6..8].copy_from_slice(&self.aux.to_le_bytes());
        b[8..16].copy_from_slice(&self.gen.to_le_bytes());
        b[16..24].copy_from_slice(&self.sector.to_le_bytes());
        b[24..32].copy_from_slice(&self.extra.to_le_bytes());
        b[32..36].copy_from_slice(&self.count.to_le_bytes());
        b[40..48].copy_from_slice(&self.t_ns.to_le_bytes());
        // 48..64: reserved, zero.
        b
    }

    pub fn decode(b: &[u8]) -> Result<Record> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        if b.len() != RECORD || u32_at(0) != MAGIC {
            bail!("not a journal record");
        }
        let kind = Kind::from_u16(u16_at(4))
            .with_context(|| format!("unknown record kind {}", u16_at(4)))?;
        Ok(Record {
            kind,
            aux: u16_at(6),
            gen: u64_at(8),
            sector: u64_at(16),
            extra: u64_at(24),
            count: u32_at(32),
            t_ns: u64_at(40),
        })
    }
}

/// The client's end: one write(2) per record.
pub struct Writer {
    file: File,
}

impl Writer {
    pub fn create(path: &Path) -> Result<Writer> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the journal {}", path.display()))?;
        Ok(Writer { file })
    }

    pub fn put(&mut self, mut r: Record) -> Result<()> {
        r.t_ns = now_ns();
        let b = r.encode();
        // One write(2): a record is never split between two calls.
        let n = self.file.write(&b).context("writing the journal")?;
        if n != RECORD {
            bail!("the journal took {n} of {RECORD} bytes");
        }
        Ok(())
    }
}

/// The orchestrator's end: reads whole records from where it stopped.
pub struct Reader {
    file: File,
    offset: u64,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader> {
        let file =
            File::open(path).with_context(|| format!("opening the journal {}", path.display()))?;
        Ok(Reader { file, offset: 0 })
    }

    /// The records appended since the last call. A partial record at the
    /// end is left for the next call while the writer may still be
    /// writing; with `complete` (the writer is gone) it is an error.
    pub fn read_new(&mut self, complete: bool) -> Result<Vec<Record>> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        self.file.read_to_end(&mut buf)?;
        let whole = buf.len() / RECORD * RECORD;
        if complete && whole != buf.len() {
            bail!(
                "the journal ends with a partial record ({} bytes at offset {})",
                buf.len() - whole,
                self.offset + whole as u64
            );
        }
        let mut v = Vec::with_capacity(whole / RECORD);
        for (i, c) in buf[..whole].chunks_exact(RECORD).enumerate() {
            v.push(Record::decode(c).with_context(|| {
                format!(
                    "journal record at offset {}",
                    self.offset + (i * RECORD) as u64
                )
            })?);
        }
        self.offset += whole as u64;
        Ok(v)
    }
}

/// Reads a whole journal (the writer is gone); a missing file is empty.
pub fn read_all(path: &Path) -> Result<Vec<Record>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    Reader::open(path)?.read_new(true)
}

/// Reads a journal whose writer may still be writing (a partial record at
/// the end is left out); a missing file is empty.
pub fn read_all_lenient(path: &Path) -> Result<Vec<Record>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    Reader::open(path)?.read_new(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_partial_tails_are_caught() {
        let dir = vub_testkit::TempDir::new("soak-journal");
        let p = dir.path("j.bin");
        let mut w = Writer::create(&p).unwrap();
        let mut r = Record::new(Kind::Submit, 0x3_0000_0001);
        r.sector = 77;
        r.count = 9;
        w.put(r).unwrap();
        w.put(Record::new(Kind::Ack, 0x3_0000_0001)).unwrap();
        let mut rd = Reader::open(&p).unwrap();
        let v = rd.read_new(false).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].kind, v[0].sector, v[0].count), (Kind::Submit, 77, 9));
        assert_eq!((v[1].kind, v[1].gen), (Kind::Ack, 0x3_0000_0001));
        assert!(v[1].t_ns >= v[0].t_ns && v[0].t_ns > 0);
        // A half record: left for later while the writer lives, an error
        // once it is gone.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(&[1, 2, 3])
            .unwrap();
        assert!(rd.read_new(false).unwrap().is_empty());
        assert!(rd.read_new(true).is_err());
    }
}
