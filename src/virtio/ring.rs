//! What the device reads of a descriptor chain, whatever the ring layout:
//! the split ring's chains come from virtio-queue, the packed ring's from
//! [`super::packed`]. Request parsing walks either through [`DescSource`].

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::packed::PackedChain;

/// One descriptor: a guest buffer, whether the device writes it, and
/// whether the chain goes on after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
    pub next: bool,
}

/// A chain of descriptors, read one at a time. `next_desc` returns None at
/// the end of the chain and also when it cannot go on (a loop, a table
/// outside memory, a malformed indirect descriptor): the last descriptor
/// returned then still says `next`, which is how the end is told from a
/// failure.
pub trait DescSource {
    /// The split ring's head index or the packed ring's buffer id.
    fn head_index(&self) -> u16;
    fn next_desc(&mut self) -> Option<Desc>;
}

impl<M> DescSource for DescriptorChain<M>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    fn head_index(&self) -> u16 {
        DescriptorChain::head_index(self)
    }

    fn next_desc(&mut self) -> Option<Desc> {
        self.next().map(|d| Desc {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
            next: d.has_next(),
        })
    }
}

/// A chain from either ring.
pub enum RingChain<'m> {
    Split(DescriptorChain<&'m GuestMemoryMmap>),
    Packed(PackedChain<'m>),
}

impl DescSource for RingChain<'_> {
    fn head_index(&self) -> u16 {
        match self {
            RingChain::Split(c) => c.head_index(),
            RingChain::Packed(c) => c.head_index(),
        }
    }

    fn next_desc(&mut self) -> Option<Desc> {
        match self {
            RingChain::Split(c) => c.next_desc(),
            RingChain::Packed(c) => c.next_desc(),
        }
    }
}

/// The device side of a queue, in the layout the driver negotiated.
pub enum DeviceRing {
    Split(virtio_queue::Queue),
    Packed(super::packed::PackedQueue),
}

/// Why a ring cannot be used: the queue stops until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("split ring: {0}")]
    Split(#[from] virtio_queue::Error),
    #[error("packed ring: {0}")]
    Packed(#[from] super::packed::PackedError),
    #[error("split ring: a saved position has requests in flight")]
    Position,
}

/// Why a descriptor chain cannot be used at all: the queue is broken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("head index {0} is out of range")]
    HeadOutOfRange(u16),
    #[error(
        "descriptor chain loops, is longer than the queue, or a descriptor is outside guest memory"
    )]
    Unterminated,
}

/// Where a drained queue stands in its ring: what a live upgrade carries
/// over (everything else of a ring is in guest memory). The wrap counters
/// mean something for the packed layout only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingPos {
    pub next_avail: u16,
    pub next_used: u16,
    pub avail_wrap: bool,
    pub used_wrap: bool,
}

impl DeviceRing {
    /// Sets up a ring from where the driver put it.
    pub fn new(qc: &super::QueueConfig, event_idx: bool) -> Result<DeviceRing, RingError> {
        use virtio_queue::QueueT;
        use vm_memory::GuestAddress;
        if qc.packed {
            let mut q =
                super::packed::PackedQueue::new(qc.size, qc.desc, qc.avail, qc.used, event_idx)?;
            if let Some(p) = qc.start {
                q.set_position((p.next_avail, p.avail_wrap), (p.next_used, p.used_wrap))?;
            }
            return Ok(DeviceRing::Packed(q));
        }
        if let Some(p) = qc.start {
            // Drained: every chain taken has its used entry.
            if p.next_avail != p.next_used {
                return Err(RingError::Position);
            }
        }
        let split = || -> Result<virtio_queue::Queue, virtio_queue::Error> {
            let mut q = virtio_queue::Queue::new(qc.size)?;
            q.try_set_size(qc.size)?;
            q.try_set_desc_table_address(GuestAddress(qc.desc))?;
            q.try_set_avail_ring_address(GuestAddress(qc.avail))?;
            q.try_set_used_ring_address(GuestAddress(qc.used))?;
            q.set_event_idx(event_idx);
            if let Some(p) = qc.start {
                q.set_next_avail(p.next_avail);
                q.set_next_used(p.next_used);
            }
            q.set_ready(true);
            Ok(q)
        };
        split().map(DeviceRing::Split).map_err(RingError::from)
    }

    /// Where the device stands in the ring.
    pub fn position(&self) -> RingPos {
        use virtio_queue::QueueT;
        match self {
            DeviceRing::Split(q) => RingPos {
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                avail_wrap: false,
                used_wrap: false,
            },
            DeviceRing::Packed(q) => {
                let (next_avail, avail_wrap, next_used, used_wrap) = q.position();
                RingPos {
                    next_avail,
                    next_used,
                    avail_wrap,
                    used_wrap,
                }
            }
        }
    }

    pub fn size(&self) -> u16 {
        use virtio_queue::QueueT;
        match self {
            DeviceRing::Split(q) => q.size(),
            DeviceRing::Packed(q) => q.size(),
        }
    }

    /// The guest memory the ring itself uses: (address, length) of its
    /// parts.
    pub fn areas(&self) -> [(u64, u64); 3] {
        use virtio_queue::QueueT;
        match self {
            DeviceRing::Split(q) => {
                let n = u64::from(q.size());
                [
                    (q.desc_table(), 16 * n),
                    (q.avail_ring(), 6 + 2 * n),
                    (q.used_ring(), 6 + 8 * n),
                ]
            }
            DeviceRing::Packed(q) => q.areas(),
        }
    }

    /// The next available chain, if any.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<RingChain<'m>>, RingError> {
        use virtio_queue::QueueOwnedT;
        match self {
            DeviceRing::Split(q) => match q.iter(mem) {
                Ok(mut it) => Ok(it.next().map(RingChain::Split)),
                Err(e) => Err(e.into()),
            },
            DeviceRing::Packed(q) => Ok(q.pop(mem)?.map(RingChain::Packed)),
        }
    }

    /// Gives the chain just popped back to the ring.
    pub fn undo_pop(&mut self) {
        use virtio_queue::QueueT;
        match self {
            DeviceRing::Split(q) => {
                let next = q.next_avail().wrapping_sub(1);
                q.set_next_avail(next);
            }
            DeviceRing::Packed(q) => q.undo_pop(),
        }
    }

    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), RingError> {
        use virtio_queue::QueueT;
        match self {
            DeviceRing::Split(q) => Ok(q.add_used(mem, head, len)?),
            DeviceRing::Packed(q) => Ok(q.add_used(mem, head, len)?),
        }
    }

    /// Whether the driver wants an interrupt now. `event_idx` off: a split
    /// ring's driver may say no with VRING_AVAIL_F_NO_INTERRUPT (which
    /// virtio-queue does not look at).
    pub fn needs_notification(
        &mut self,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<bool, RingError> {
        use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
        use virtio_queue::QueueT;
        use vm_memory::{Bytes, GuestAddress};
        match self {
            DeviceRing::Split(q) => {
                if !event_idx {
                    let no_interrupt =
                        mem.read_obj::<u16>(GuestAddress(q.avail_ring()))
                            .is_ok_and(|f| {
                                u32::from(u16::from_le(f)) & VRING_AVAIL_F_NO_INTERRUPT != 0
                            });
                    if no_interrupt {
                        return Ok(false);
                    }
                }
                Ok(q.needs_notification(mem)?)
            }
            DeviceRing::Packed(q) => Ok(q.needs_notification(mem)?),
        }
    }

    /// Asks for doorbells (true: and says whether a chain already waits)
    /// or asks the driver not to send them.
    pub fn set_notification(
        &mut self,
        mem: &GuestMemoryMmap,
        enable: bool,
    ) -> Result<bool, RingError> {
        use virtio_queue::QueueT;
        match self {
            DeviceRing::Split(q) => Ok(if enable {
                q.enable_notification(mem)?
            } else {
                q.disable_notification(mem).map(|()| false)?
            }),
            DeviceRing::Packed(q) => Ok(q.set_notification(mem, enable)?),
        }
    }
}
