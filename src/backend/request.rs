//! One backend operation, in a form that is reused from request to request:
//! the kind, the disk offset, and the buffers (guest iovecs) or the ranges,
//! in vectors whose capacity stays with the request slot. Executed
//! synchronously here (thread pool, memory disks) or submitted to an
//! io_uring by the engine.

use std::io;

use super::io::{Backend, GuestIov};
use crate::memory::{sub_iovecs, GuestBuffers};

/// Most bytes of a read or write one step moves (see [`IoRequest::step`]).
pub const STEP_RW: usize = 2 << 20;
/// Most bytes of one discard or write-zeroes range one step covers.
pub const STEP_RANGE: u64 = 16 << 20;

/// How far a request run step by step has got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Ranges done (discard, write-zeroes).
    range: usize,
    /// Bytes done: of the transfer, or of the current range.
    done: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoKind {
    #[default]
    Read,
    Write,
    /// Make completed writes durable.
    Flush,
    /// Deallocate `ranges`; advisory.
    Discard,
    /// Zero `ranges`; with `unmap` they may be deallocated.
    WriteZeroes,
}

/// A backend operation. `iov` is used by reads and writes, `ranges`
/// (offset, length in bytes) by discard and write-zeroes.
#[derive(Debug, Default)]
pub struct IoRequest {
    pub kind: IoKind,
    pub offset: u64,
    /// Writes: durable before they complete (write-through cache).
    pub sync: bool,
    pub unmap: bool,
    /// The buffers, with the guest memory they lie in (held mapped).
    pub iov: GuestBuffers,
    pub ranges: Vec<(u64, u64)>,
}

impl IoRequest {
    /// Empties the request, keeping the vectors' capacity.
    pub fn reset(&mut self, kind: IoKind) {
        self.kind = kind;
        self.offset = 0;
        self.sync = false;
        self.unmap = false;
        self.iov.clear();
        self.ranges.clear();
    }

    /// Bytes the buffers hold.
    pub fn len(&self) -> usize {
        self.iov.iter().map(GuestIov::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs the operation on the calling thread, whole.
    pub fn execute(&self, be: &dyn Backend) -> io::Result<()> {
        let mut p = Progress::default();
        let mut scratch = Vec::new();
        while !self.step(be, &mut p, &mut scratch)? {}
        Ok(())
    }

    /// Runs the next piece of the operation from `p` (at most [`STEP_RW`]
    /// bytes of a read or write, [`STEP_RANGE`] bytes of one discard or
    /// write-zeroes range); true once it is all done. A long request run
    /// this way gives its thread back between pieces, and stops between
    /// them when its queue is withdrawn. `scratch` holds the iovecs of a
    /// piece of a long transfer (reused; short ones need none).
    pub fn step(
        &self,
        be: &dyn Backend,
        p: &mut Progress,
        scratch: &mut Vec<GuestIov>,
    ) -> io::Result<bool> {
        match self.kind {
            IoKind::Read | IoKind::Write => {
                let write = self.kind == IoKind::Write;
                let total = self.len();
                if p.done < total {
                    let (iov, at): (&[GuestIov], u64) = if p.done == 0 && total <= STEP_RW {
                        (&self.iov, self.offset)
                    } else {
                        scratch.clear();
                        sub_iovecs(&self.iov, p.done, STEP_RW, scratch);
                        (scratch, self.offset + p.done as u64)
                    };
                    let n: usize = iov.iter().map(GuestIov::len).sum();
                    if write {
                        be.write_at(iov, at)?;
                    } else {
                        be.read_at(iov, at)?;
                    }
                    p.done += n;
                    if p.done < total {
                        return Ok(false);
                    }
                }
                if write && self.sync {
                    be.flush()?;
                }
                Ok(true)
            }
            IoKind::Flush => be.flush().map(|()| true),
            IoKind::Discard | IoKind::WriteZeroes => {
                let Some(&(offset, len)) = self.ranges.get(p.range) else {
                    return Ok(true);
                };
                let at = p.done as u64;
                let n = len.saturating_sub(at).min(STEP_RANGE);
                if n > 0 {
                    if self.kind == IoKind::Discard {
                        be.discard(offset + at, n)?;
                    } else {
                        be.write_zeroes(offset + at, n, self.unmap)?;
                    }
                }
                p.done += usize::try_from(n).unwrap_or(usize::MAX);
                if p.done as u64 >= len {
                    p.range += 1;
                    p.done = 0;
                }
                Ok(p.range >= self.ranges.len())
            }
        }
    }

    /// Runs a read or a buffered write at once if it cannot block (page
    /// cache); `None` means it must wait for a thread or the io_uring.
    pub fn try_nowait(&self, be: &dyn Backend) -> Option<io::Result<()>> {
        match self.kind {
            IoKind::Read => be.try_nowait(&self.iov, self.offset, false),
            IoKind::Write if !self.sync => be.try_nowait(&self.iov, self.offset, true),
            _ => None,
        }
    }
}
