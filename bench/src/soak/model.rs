//! What an image may hold, sector by sector, given the journals of every
//! client that wrote to it: the generation of the last acknowledged write
//! (or none: the sector reads as zeros), plus the generations submitted
//! after it and never acknowledged (in flight when a client died: they may
//! or may not have landed). An acknowledged write resets that set. A sector
//! is correct when it decodes as one of these generations byte for byte,
//! or as zeros when nothing was acknowledged.

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::journal::{Kind, Record};
use super::pattern::{self, show_gen, Content, SECTOR};

/// One write the journals told about.
#[derive(Clone, Copy, Debug)]
pub struct Write {
    pub sector: u64,
    pub count: u32,
    pub acked: bool,
}

pub struct Model {
    pub seed: u64,
    pub sectors: u64,
    /// Per sector: the last acknowledged generation, 0 for none.
    last: Vec<u64>,
    /// Per sector: generations submitted after `last`, not acknowledged.
    maybe: Vec<Vec<u64>>,
    /// Per sector: holds something unknown (taken as found after a
    /// failure, `accept`) until the next acknowledged write.
    tainted: Vec<bool>,
    pub writes: HashMap<u64, Write>,
    pub stats: Stats,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub submitted: u64,
    pub acked: u64,
    pub errors: u64,
    pub bytes_acked: u64,
    pub flushes_submitted: u64,
    pub flushes_acked: u64,
    pub flush_errors: u64,
    pub reads_ok: u64,
    pub read_bytes: u64,
    pub read_bad: u64,
    pub read_errors: u64,
}

/// A sector that holds what it must not.
#[derive(Clone, Debug)]
pub struct Bad {
    pub sector: u64,
    pub found: Content,
    /// The last acknowledged generation (0: none, zeros allowed).
    pub last: u64,
    pub maybe: Vec<u64>,
}

impl Model {
    pub fn new(seed: u64, disk_bytes: u64) -> Model {
        let sectors = disk_bytes / SECTOR as u64;
        let n = usize::try_from(sectors).expect("sector count");
        Model {
            seed,
            sectors,
            last: vec![0; n],
            maybe: vec![Vec::new(); n],
            tainted: vec![false; n],
            writes: HashMap::new(),
            stats: Stats::default(),
        }
    }

    fn range(&self, gen: u64) -> Result<std::ops::Range<usize>> {
        let Some(w) = self.writes.get(&gen) else {
            bail!(
                "the journal completes {} that it never submitted",
                show_gen(gen)
            );
        };
        let s = usize::try_from(w.sector)?;
        Ok(s..s + usize::try_from(w.count)?)
    }

    /// Replays one journal record.
    pub fn apply(&mut self, r: &Record) -> Result<()> {
        match r.kind {
            Kind::Submit => {
                if r.count == 0 || r.sector + u64::from(r.count) > self.sectors {
                    bail!(
                        "{} covers sectors {}..{}, outside the disk's {}",
                        show_gen(r.gen),
                        r.sector,
                        r.sector + u64::from(r.count),
                        self.sectors
                    );
                }
                if self.writes.contains_key(&r.gen) {
                    bail!("{} is submitted twice", show_gen(r.gen));
                }
                self.writes.insert(
                    r.gen,
                    Write {
                        sector: r.sector,
                        count: r.count,
                        acked: false,
                    },
                );
                let range = self.range(r.gen)?;
                for m in &mut self.maybe[range] {
                    m.push(r.gen);
                }
                self.stats.submitted += 1;
            }
            Kind::Ack => {
                let range = self.range(r.gen)?;
                let n = range.len() as u64;
                for s in range {
                    self.last[s] = r.gen;
                    self.maybe[s].clear();
                    self.tainted[s] = false;
                }
                if let Some(w) = self.writes.get_mut(&r.gen) {
                    w.acked = true;
                }
                self.stats.acked += 1;
                self.stats.bytes_acked += n * SECTOR as u64;
            }
            // A failed write may have landed in part: its generation stays
            // possible until the next acknowledged write.
            Kind::Error => {
                self.range(r.gen)?;
                self.stats.errors += 1;
            }
            Kind::FlushSubmit => self.stats.flushes_submitted += 1,
            Kind::FlushAck => self.stats.flushes_acked += 1,
            Kind::FlushError => self.stats.flush_errors += 1,
            Kind::ReadOk => {
                self.stats.reads_ok += 1;
                self.stats.read_bytes += u64::from(r.count) * SECTOR as u64;
            }
            Kind::ReadBad => self.stats.read_bad += 1,
            Kind::ReadError => self.stats.read_errors += 1,
            Kind::Attach | Kind::Ready | Kind::Exit => {}
        }
        Ok(())
    }

    /// Whether `found` is allowed at `sector`.
    fn allowed(&self, s: usize, found: Content) -> bool {
        match found {
            Content::Zero => self.last[s] == 0,
            Content::Gen(g) => g != 0 && (g == self.last[s] || self.maybe[s].contains(&g)),
            _ => false,
        }
    }

    /// Checks a whole image (`image.len()` is the disk's size); returns the
    /// sectors that hold what they must not, in order.
    pub fn verify(&self, image: &[u8]) -> Vec<Bad> {
        let mut bad = Vec::new();
        for (s, b) in image.chunks_exact(SECTOR).enumerate() {
            if s >= self.last.len() {
                break;
            }
            // Fast path: zeros where zeros are allowed.
            if self.tainted[s] || (self.last[s] == 0 && b.iter().all(|&x| x == 0)) {
                continue;
            }
            let found = pattern::decode(b, self.seed, s as u64);
            if !self.allowed(s, found) {
                bad.push(Bad {
                    sector: s as u64,
                    found,
                    last: self.last[s],
                    maybe: self.maybe[s].clone(),
                });
            }
        }
        bad
    }

    /// Forgets the writes no sector refers to any more (they are kept for
    /// reports only), so that a long soak's model stays small.
    pub fn compact(&mut self) {
        let mut live: std::collections::HashSet<u64> = self.last.iter().copied().collect();
        live.extend(self.maybe.iter().flatten().copied());
        self.writes.retain(|g, _| live.contains(g));
    }

    /// Takes bad sectors as they are found, so that a soak can go on after
    /// a failure: a generation or zeros become the sector's state, anything
    /// else is not checked until the next acknowledged write there.
    pub fn accept(&mut self, bad: &[Bad]) {
        for b in bad {
            let Ok(s) = usize::try_from(b.sector) else {
                continue;
            };
            self.maybe[s].clear();
            match b.found {
                Content::Zero => self.last[s] = 0,
                Content::Gen(g) => self.last[s] = g,
                _ => self.tainted[s] = true,
            }
        }
    }

    /// What may be at `sector`, for a report.
    pub fn describe_allowed(&self, last: u64, maybe: &[u64]) -> String {
        let mut v = Vec::new();
        if last == 0 {
            v.push("zeros (no write acknowledged)".to_string());
        } else {
            v.push(format!("{} (last acknowledged)", show_gen(last)));
        }
        for g in maybe {
            v.push(format!("{} (submitted, never acknowledged)", show_gen(*g)));
        }
        v.join(" or ")
    }

    /// The bad sectors as runs of neighbours that hold the same kind of
    /// thing and allow the same: at most `max` runs, each with the writes
    /// concerned.
    pub fn report(&self, bad: &[Bad], max: usize) -> String {
        let same = |a: &Bad, b: &Bad| {
            b.sector == a.sector + 1
                && a.last == b.last
                && a.maybe == b.maybe
                && match (a.found, b.found) {
                    (Content::Zero, Content::Zero) | (Content::Garbage, Content::Garbage) => true,
                    (Content::Gen(x), Content::Gen(y))
                    | (Content::Torn { gen: x }, Content::Torn { gen: y }) => x == y,
                    _ => false,
                }
        };
        let mut runs: Vec<(&Bad, u64)> = Vec::new();
        for (i, b) in bad.iter().enumerate() {
            match runs.last_mut() {
                Some((_, n)) if i > 0 && same(&bad[i - 1], b) => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        let mut out = String::new();
        for (b, n) in runs.iter().take(max) {
            let what = if *n == 1 {
                format!("sector {} (byte {:#x})", b.sector, b.sector * SECTOR as u64)
            } else {
                format!(
                    "sectors {}..{} ({n} sectors from byte {:#x})",
                    b.sector,
                    b.sector + n,
                    b.sector * SECTOR as u64
                )
            };
            out.push_str(&format!(
                "  {what}: holds {}; allowed: {}\n",
                b.found,
                self.describe_allowed(b.last, &b.maybe)
            ));
            let gen = match b.found {
                Content::Gen(g) | Content::Torn { gen: g } | Content::Misplaced { gen: g, .. } => {
                    Some(g)
                }
                _ => None,
            };
            if let Some(w) = gen.and_then(|g| self.writes.get(&g).map(|w| (g, w))) {
                out.push_str(&format!(
                    "    found {} was a write of sectors {}..{}, {}\n",
                    show_gen(w.0),
                    w.1.sector,
                    w.1.sector + u64::from(w.1.count),
                    if w.1.acked {
                        "acknowledged"
                    } else {
                        "never acknowledged"
                    }
                ));
            }
            if let Some(w) = self.writes.get(&b.last) {
                out.push_str(&format!(
                    "    last acknowledged {} was a write of sectors {}..{}\n",
                    show_gen(b.last),
                    w.sector,
                    w.sector + u64::from(w.count)
                ));
            }
            for g in &b.maybe {
                if let Some(w) = self.writes.get(g) {
                    out.push_str(&format!(
                        "    in flight at a kill: {} was a write of sectors {}..{}\n",
                        show_gen(*g),
                        w.sector,
                        w.sector + u64::from(w.count)
                    ));
                }
            }
        }
        if runs.len() > max {
            let left: u64 = runs[max..].iter().map(|(_, n)| n).sum();
            out.push_str(&format!(
                "  ... and {left} more sectors in {} runs\n",
                runs.len() - max
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::pattern::fill_range;

    const SEED: u64 = 42;

    fn rec(kind: Kind, gen: u64, sector: u64, count: u32) -> Record {
        let mut r = Record::new(kind, gen);
        r.sector = sector;
        r.count = count;
        r
    }

    fn write(img: &mut [u8], sector: u64, count: usize, gen: u64) {
        let at = usize::try_from(sector).unwrap() * SECTOR;
        fill_range(&mut img[at..at + count * SECTOR], SEED, sector, gen);
    }

    /// A 64-sector disk where cycle 1 wrote sectors 0..8 (acknowledged),
    /// then cycle 2 submitted 4..12 and died before its acknowledgement.
    fn setup() -> (Model, Vec<u8>) {
        let mut m = Model::new(SEED, 64 * SECTOR as u64);
        let mut img = vec![0u8; 64 * SECTOR];
        let g1 = 1 << 32 | 1;
        let g2 = 2 << 32 | 1;
        m.apply(&rec(Kind::Submit, g1, 0, 8)).unwrap();
        write(&mut img, 0, 8, g1);
        m.apply(&rec(Kind::Ack, g1, 0, 0)).unwrap();
        m.apply(&rec(Kind::Submit, g2, 4, 8)).unwrap();
        (m, img)
    }

    #[test]
    fn an_acknowledged_image_passes_and_in_flight_generations_may_land() {
        let (m, mut img) = setup();
        assert!(m.verify(&img).is_empty());
        // The in-flight write landed on some sectors only: still fine.
        write(&mut img, 5, 2, 2 << 32 | 1);
        write(&mut img, 10, 1, 2 << 32 | 1);
        assert!(
            m.verify(&img).is_empty(),
            "{}",
            m.report(&m.verify(&img), 9)
        );
        // Both writes are still referred to.
        let mut m = m;
        m.compact();
        assert_eq!(m.writes.len(), 2);
        let g3 = 3 << 32 | 1;
        m.apply(&rec(Kind::Submit, g3, 0, 12)).unwrap();
        m.apply(&rec(Kind::Ack, g3, 0, 0)).unwrap();
        m.compact();
        assert_eq!(m.writes.keys().copied().collect::<Vec<_>>(), vec![g3]);
    }

    #[test]
    fn zeros_after_an_acknowledged_write_fail() {
        let (m, mut img) = setup();
        img[3 * SECTOR..4 * SECTOR].fill(0);
        let bad = m.verify(&img);
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].sector, bad[0].found), (3, Content::Zero));
        assert_eq!(bad[0].last, 1 << 32 | 1);
        // Zeros where an in-flight write might have gone are no excuse
        // either when a write was acknowledged there.
        img[5 * SECTOR..6 * SECTOR].fill(0);
        assert_eq!(m.verify(&img).len(), 2);
        let text = m.report(&m.verify(&img), 9);
        assert!(
            text.contains("sector 3") && text.contains("holds zeros"),
            "{text}"
        );
    }

    #[test]
    fn torn_older_foreign_and_garbage_sectors_fail() {
        let (mut m, mut img) = setup();
        // A newer acknowledged write makes the older generation wrong.
        let g3 = 3 << 32 | 1;
        m.apply(&rec(Kind::Submit, g3, 0, 2)).unwrap();
        write(&mut img, 0, 2, g3);
        m.apply(&rec(Kind::Ack, g3, 0, 0)).unwrap();
        assert!(m.verify(&img).is_empty());
        write(&mut img, 1, 1, 1 << 32 | 1); // an older one lands late
        img[2 * SECTOR + 100] ^= 0xff; // torn
        write(&mut img, 20, 1, 2 << 32 | 1); // never submitted there
        img[30 * SECTOR + 7] = 1; // garbage where nothing was written
        let bad = m.verify(&img);
        let found: Vec<(u64, Content)> = bad.iter().map(|b| (b.sector, b.found)).collect();
        assert_eq!(
            found,
            vec![
                (1, Content::Gen(1 << 32 | 1)),
                (2, Content::Torn { gen: 1 << 32 | 1 }),
                (20, Content::Gen(2 << 32 | 1)),
                (30, Content::Garbage),
            ]
        );
        // An acknowledged write clears what was in flight before it.
        let g4 = 4 << 32 | 1;
        m.apply(&rec(Kind::Submit, g4, 4, 1)).unwrap();
        m.apply(&rec(Kind::Ack, g4, 0, 0)).unwrap();
        write(&mut img, 4, 1, g4);
        assert!(!m.verify(&img).iter().any(|b| b.sector == 4));
        write(&mut img, 4, 1, 2 << 32 | 1);
        assert!(m.verify(&img).iter().any(|b| b.sector == 4));
    }

    #[test]
    fn accepted_failures_are_not_reported_again() {
        let (mut m, mut img) = setup();
        img[3 * SECTOR..4 * SECTOR].fill(0);
        img[6 * SECTOR + 9] ^= 1;
        let bad = m.verify(&img);
        assert_eq!(bad.len(), 2);
        m.accept(&bad);
        assert!(m.verify(&img).is_empty());
        // Zeros are now the state of sector 3: another generation is not.
        write(&mut img, 3, 1, 1 << 32 | 1);
        assert_eq!(m.verify(&img).len(), 1);
        img[3 * SECTOR..4 * SECTOR].fill(0);
        // The torn sector 6 is checked again after the next acknowledged
        // write there.
        let g = 7 << 32 | 1;
        m.apply(&rec(Kind::Submit, g, 6, 1)).unwrap();
        m.apply(&rec(Kind::Ack, g, 0, 0)).unwrap();
        assert_eq!(m.verify(&img).len(), 1);
        write(&mut img, 6, 1, g);
        assert!(m.verify(&img).is_empty());
    }

    #[test]
    fn journals_that_contradict_themselves_are_refused() {
        let (mut m, _) = setup();
        assert!(m.apply(&rec(Kind::Ack, 9 << 32, 0, 0)).is_err());
        assert!(m.apply(&rec(Kind::Submit, 1 << 32 | 1, 0, 1)).is_err());
        assert!(m.apply(&rec(Kind::Submit, 5 << 32, 60, 8)).is_err());
    }
}
