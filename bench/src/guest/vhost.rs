//! A vhost-user-blk backend (QEMU's qemu-storage-daemon) driven through
//! rust-vmm's `vhost` frontend: memory table from the guest-RAM memfd,
//! kick and call eventfds per queue.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use anyhow::{Context, Result};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vfio_user_blk::virtio::legacy::legacy_ring_layout;
use vub_testkit::driver_ring::SplitRing;

use super::{GuestRam, Transport};

pub struct VhostUserBlk {
    /// Held for its connection: dropping it ends the vhost-user session.
    _frontend: Frontend,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    features: u64,
}

impl VhostUserBlk {
    /// Connects and sets up `queues` queues of `size` entries, rings at
    /// `ring_base + i * 64 KiB` (the same layout as the legacy transport).
    pub fn connect(
        socket: &Path,
        ram: &GuestRam,
        queues: usize,
        size: u16,
        ring_base: u64,
        refuse: u64,
    ) -> Result<(VhostUserBlk, Vec<SplitRing>)> {
        let mut fe = Frontend::connect(socket, queues as u64).context("vhost-user connect")?;
        fe.set_owner().context("SET_OWNER")?;
        let offered = fe.get_features().context("GET_FEATURES")?;
        let features = offered & !refuse;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let pf = fe
                .get_protocol_features()
                .context("GET_PROTOCOL_FEATURES")?;
            let want = pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG);
            fe.set_protocol_features(want)
                .context("SET_PROTOCOL_FEATURES")?;
        }
        fe.set_features(features).context("SET_FEATURES")?;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: ram.size,
            userspace_addr: ram.host_addr(0),
            mmap_offset: 0,
            mmap_handle: ram.file.as_raw_fd(),
        }])
        .context("SET_MEM_TABLE")?;
        let event_idx =
            features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut rings = Vec::new();
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for q in 0..queues {
            let base = ring_base + (q as u64) * 0x10000;
            let (desc, avail, used) = legacy_ring_layout(base, size);
            rings.push(SplitRing::new(&ram.mem, size, desc, avail, used, event_idx));
            fe.set_vring_num(q, size).context("SET_VRING_NUM")?;
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: size,
                    queue_size: size,
                    flags: 0,
                    desc_table_addr: ram.host_addr(desc),
                    used_ring_addr: ram.host_addr(used),
                    avail_ring_addr: ram.host_addr(avail),
                    log_addr: None,
                },
            )
            .context("SET_VRING_ADDR")?;
            fe.set_vring_base(q, 0).context("SET_VRING_BASE")?;
            let call = EventFd::new(EFD_NONBLOCK)?;
            let kick = EventFd::new(EFD_NONBLOCK)?;
            fe.set_vring_call(q, &call).context("SET_VRING_CALL")?;
            fe.set_vring_kick(q, &kick).context("SET_VRING_KICK")?;
            calls.push(call);
            kicks.push(kick);
        }
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for q in 0..queues {
                fe.set_vring_enable(q, true).context("SET_VRING_ENABLE")?;
            }
        }
        Ok((
            VhostUserBlk {
                _frontend: fe,
                kicks,
                calls,
                features,
            },
            rings,
        ))
    }
}

impl Transport for VhostUserBlk {
    fn kick(&mut self, q: usize) -> Result<()> {
        self.kicks[q].write(1).context("kick")
    }

    fn irq_fd(&self, q: usize) -> RawFd {
        self.calls[q].as_raw_fd()
    }

    fn features(&self) -> u64 {
        self.features
    }
}
