//! One backend operation, in a form that is reused from request to request:
//! the kind, the disk offset, and the buffers (guest iovecs) or the ranges,
//! in vectors whose capacity stays with the request slot. Executed
//! synchronously here (thread pool, memory disks) or submitted to an
//! io_uring by the engine.

use std::io;

use super::io::{Backend, GuestIov};

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
    pub iov: Vec<GuestIov>,
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

    /// Runs the operation on the calling thread.
    pub fn execute(&self, be: &dyn Backend) -> io::Result<()> {
        match self.kind {
            IoKind::Read => be.read_at(&self.iov, self.offset),
            IoKind::Write => {
                be.write_at(&self.iov, self.offset)?;
                if self.sync {
                    be.flush()?;
                }
                Ok(())
            }
            IoKind::Flush => be.flush(),
            IoKind::Discard => self.ranges.iter().try_for_each(|&(o, l)| be.discard(o, l)),
            IoKind::WriteZeroes => self
                .ranges
                .iter()
                .try_for_each(|&(o, l)| be.write_zeroes(o, l, self.unmap)),
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
