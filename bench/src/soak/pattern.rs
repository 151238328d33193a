//! The self-describing sector the soak writes: every 512-byte sector
//! carries a header (magic, its own sector number, the 64-bit generation of
//! the write, a checksum) and a body derived from (seed, sector,
//! generation), so that any sector of an image can be decoded on its own
//! and checked byte for byte.
//!
//! Layout (little-endian words):
//!
//! | bytes    | what |
//! |----------|------|
//! | 0..8     | magic `VUBSOAK1` |
//! | 8..16    | sector number |
//! | 16..24   | generation |
//! | 24..32   | checksum of the other 63 words |
//! | 32..512  | body: word i = mix(key(seed, sector, generation) + i) |

pub const SECTOR: usize = 512;
const WORDS: usize = SECTOR / 8;
pub const MAGIC: u64 = u64::from_le_bytes(*b"VUBSOAK1");

/// splitmix64's finaliser: a cheap, good 64-bit mixer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn key(seed: u64, sector: u64, gen: u64) -> u64 {
    mix(seed ^ mix(sector.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ mix(gen)))
}

fn checksum(words: &[u64; WORDS]) -> u64 {
    words
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .fold(0x6a09_e667_f3bc_c908, |h, (i, w)| {
            mix(h ^ w.wrapping_add(i as u64))
        })
}

fn words_of(seed: u64, sector: u64, gen: u64) -> [u64; WORDS] {
    let mut w = [0u64; WORDS];
    w[0] = MAGIC;
    w[1] = sector;
    w[2] = gen;
    let k = key(seed, sector, gen);
    for (i, x) in w.iter_mut().enumerate().skip(4) {
        *x = mix(k.wrapping_add(i as u64));
    }
    w[3] = checksum(&w);
    w
}

/// Fills `out` (one sector) with the pattern of (seed, sector, gen).
pub fn fill(out: &mut [u8], seed: u64, sector: u64, gen: u64) {
    debug_assert_eq!(out.len(), SECTOR);
    let w = words_of(seed, sector, gen);
    for (c, x) in out.chunks_exact_mut(8).zip(w) {
        c.copy_from_slice(&x.to_le_bytes());
    }
}

/// Fills `out` (whole sectors) with the patterns of sectors `first..` for
/// generation `gen`.
pub fn fill_range(out: &mut [u8], seed: u64, first: u64, gen: u64) {
    for (i, s) in out.chunks_exact_mut(SECTOR).enumerate() {
        fill(s, seed, first + i as u64, gen);
    }
}

/// What a sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// All zeros: never written (or written with zeros).
    Zero,
    /// Exactly the pattern of this sector for this generation.
    Gen(u64),
    /// A valid, whole pattern of another sector (a misdirected write).
    Misplaced { sector: u64, gen: u64 },
    /// The header of this sector and generation, but a body or checksum
    /// that is not the pattern's (a torn or partly overwritten sector).
    Torn { gen: u64 },
    /// Anything else.
    Garbage,
}

fn word(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[8 * i..8 * i + 8]);
    u64::from_le_bytes(w)
}

fn matches(b: &[u8], seed: u64, sector: u64, gen: u64) -> bool {
    let w = words_of(seed, sector, gen);
    b.chunks_exact(8)
        .zip(w)
        .all(|(c, x)| c == x.to_le_bytes().as_slice())
}

/// Decodes the sector `b` found at `sector`.
pub fn decode(b: &[u8], seed: u64, sector: u64) -> Content {
    debug_assert_eq!(b.len(), SECTOR);
    if word(b, 0) != MAGIC {
        return if b.iter().all(|&x| x == 0) {
            Content::Zero
        } else {
            Content::Garbage
        };
    }
    let (at, gen) = (word(b, 1), word(b, 2));
    if matches(b, seed, at, gen) {
        if at == sector {
            Content::Gen(gen)
        } else {
            Content::Misplaced { sector: at, gen }
        }
    } else if at == sector {
        Content::Torn { gen }
    } else {
        Content::Garbage
    }
}

/// A generation as a person reads it: `cycle C write W`.
pub fn show_gen(gen: u64) -> String {
    format!(
        "gen {gen:#x} (cycle {}, write {})",
        gen >> 32,
        gen & 0xffff_ffff
    )
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Content::Zero => write!(f, "zeros"),
            Content::Gen(g) => write!(f, "{}", show_gen(g)),
            Content::Misplaced { sector, gen } => {
                write!(f, "sector {sector}'s data of {}", show_gen(gen))
            }
            Content::Torn { gen } => write!(
                f,
                "a torn sector (header of {}, body or checksum not its pattern)",
                show_gen(gen)
            ),
            Content::Garbage => write!(f, "garbage (no pattern, not zeros)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_decode_as_what_was_written() {
        let mut b = vec![0u8; SECTOR];
        assert_eq!(decode(&b, 7, 3), Content::Zero);
        fill(&mut b, 7, 3, 0x5_0000_0002);
        assert_eq!(decode(&b, 7, 3), Content::Gen(0x5_0000_0002));
        assert_eq!(
            decode(&b, 7, 4),
            Content::Misplaced {
                sector: 3,
                gen: 0x5_0000_0002
            }
        );
        // Another seed's pattern is not ours.
        assert_eq!(decode(&b, 8, 3), Content::Torn { gen: 0x5_0000_0002 });
        b[300] ^= 1;
        assert_eq!(decode(&b, 7, 3), Content::Torn { gen: 0x5_0000_0002 });
        b[300] ^= 1;
        b[256..].fill(0);
        assert_eq!(decode(&b, 7, 3), Content::Torn { gen: 0x5_0000_0002 });
        b[0] = 0;
        assert_eq!(decode(&b, 7, 3), Content::Garbage);
        let mut r = vec![0u8; 3 * SECTOR];
        fill_range(&mut r, 1, 10, 9);
        for i in 0..3 {
            assert_eq!(
                decode(&r[i * SECTOR..(i + 1) * SECTOR], 1, 10 + i as u64),
                Content::Gen(9)
            );
        }
    }
}
