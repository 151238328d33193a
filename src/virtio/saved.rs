//! A live upgrade's view of [`PciTransport`]: what the driver wrote to its
//! registers, where each running queue stands in its ring, and the
//! device's own part, saved by the old binary and checked by the new one
//! as strictly as the register writes that made them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};

use super::ring::RingPos;
use super::transport::{Interface, NotifyMode, PciTransport, QueueRegs};
use super::{VirtioDevice, NO_VECTOR};

/// One queue's registers as the driver left them.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedQueue {
    pub pfn: u32,
    pub vector: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub enable: bool,
}

/// The transport of one device, as a live upgrade carries it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavedTransport {
    pub status: u8,
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub queue_sel: u16,
    pub queues: Vec<SavedQueue>,
    pub config_vector: u16,
    pub active: bool,
    /// "legacy", "modern", or none yet.
    pub interface: Option<String>,
    pub isr: u8,
    pub generation: u32,
    pub needs_reset: bool,
    pub doorbell_messages: u64,
    /// "message" or "mmap": the new binary must take doorbells the same way.
    pub notify: String,
    /// Per queue, where it stood in its ring (running queues only).
    pub positions: Vec<Option<RingPos>>,
    pub device: Value,
}

fn notify_name(n: NotifyMode) -> &'static str {
    match n {
        NotifyMode::Message => "message",
        NotifyMode::Mmap => "mmap",
    }
}

// The status register is 8 bits wide.
#[allow(clippy::cast_possible_truncation)]
const STATUS_BITS: u8 = (VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED) as u8;
#[allow(clippy::cast_possible_truncation)]
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;

impl<D: VirtioDevice> PciTransport<D> {
    /// Stops the queues for an upgrade and keeps where they stand.
    /// (Whether or not the driver runs: writes of a client that left may
    /// still be in the backend, and must end before the exec.)
    pub(super) fn freeze_queues(&mut self, limit: Duration) -> Result<(), String> {
        let mut pos = self.dev.freeze(limit)?;
        pos.resize(self.queues.len(), None);
        if !self.active {
            pos.fill(None);
        }
        self.frozen = Some(pos);
        Ok(())
    }

    pub(super) fn thaw_queues(&mut self) {
        if self.frozen.take().is_some() {
            self.dev.thaw();
        }
    }

    pub(super) fn save_state(&self) -> SavedTransport {
        SavedTransport {
            status: self.status,
            driver_features: self.driver_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| SavedQueue {
                    pfn: q.pfn,
                    vector: q.vector,
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    enable: q.enable,
                })
                .collect(),
            config_vector: self.config_vector,
            active: self.active,
            interface: self.interface.map(|i| match i {
                Interface::Legacy => "legacy".to_string(),
                Interface::Modern => "modern".to_string(),
            }),
            isr: self.isr.load(Ordering::SeqCst),
            generation: self.config.generation(),
            needs_reset: self.config.needs_reset(),
            doorbell_messages: self.doorbell_messages,
            notify: notify_name(self.notify).to_string(),
            positions: self.frozen.clone().unwrap_or_default(),
            device: self.dev.save(),
        }
    }

    /// Everything about the saved registers a driver could not have made
    /// this device hold.
    fn check_saved(&self, s: &SavedTransport) -> Result<Option<Interface>, String> {
        let interface = match s.interface.as_deref() {
            None => None,
            Some("legacy") => Some(Interface::Legacy),
            Some("modern") => Some(Interface::Modern),
            Some(o) => return Err(format!("unknown interface '{o}'")),
        };
        if s.notify != notify_name(self.notify) {
            return Err(format!(
                "doorbells came as '{}'; this binary takes them as '{}' (give the same --notify)",
                s.notify,
                notify_name(self.notify)
            ));
        }
        let n = self.queues.len();
        if s.queues.len() != n || s.positions.len() != n {
            return Err(format!(
                "{} queue(s) saved for a device of {n}",
                s.queues.len()
            ));
        }
        if s.status & !STATUS_BITS != 0 {
            return Err(format!("status {:#x} has unknown bits", s.status));
        }
        let offered = match interface {
            Some(Interface::Legacy) => u64::from(super::low32(self.dev.features())),
            _ => self.dev.features(),
        };
        if s.driver_features & !offered != 0 {
            return Err(format!(
                "driver features {:#x} were not offered",
                s.driver_features & !offered
            ));
        }
        let running = s.status & DRIVER_OK != 0;
        if s.active && (!running || interface.is_none()) {
            return Err("running without DRIVER_OK or an interface".into());
        }
        if interface == Some(Interface::Modern)
            && s.status & FEATURES_OK != 0
            && s.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            return Err("FEATURES_OK on the modern interface without VERSION_1".into());
        }
        let valid = |v: u16| v == NO_VECTOR || v < self.irqs.msix_vectors();
        if !valid(s.config_vector) {
            return Err(format!("config vector {} does not exist", s.config_vector));
        }
        let max = self.dev.queue_size();
        for (i, q) in s.queues.iter().enumerate() {
            if !valid(q.vector) || q.size == 0 || q.size > max || !q.size.is_power_of_two() {
                return Err(format!("queue {i}: size {} or vector {}", q.size, q.vector));
            }
            if s.positions[i].is_some() && !s.active {
                return Err(format!("queue {i}: a ring position for a stopped device"));
            }
        }
        Ok(interface)
    }

    /// Puts back a saved transport: nothing runs until
    /// [`start_restored`](Self::start_restored).
    pub(super) fn restore_state(&mut self, s: SavedTransport) -> Result<(), String> {
        let interface = self.check_saved(&s)?;
        self.dev.restore(&s.device)?;
        self.interface = interface;
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.queue_sel = s.queue_sel;
        for ((q, saved), live) in self
            .queues
            .iter_mut()
            .zip(&s.queues)
            .zip(self.live_vectors.iter())
        {
            *q = QueueRegs {
                pfn: saved.pfn,
                vector: saved.vector,
                size: saved.size,
                desc: saved.desc,
                avail: saved.avail,
                used: saved.used,
                enable: saved.enable,
            };
            live.store(saved.vector, Ordering::Relaxed);
        }
        self.config_vector = s.config_vector;
        self.config.set_vector(s.config_vector);
        self.config.restore(s.generation, s.needs_reset);
        self.isr.store(s.isr, Ordering::SeqCst);
        self.doorbell_messages = s.doorbell_messages;
        if self.interface.is_some() {
            self.dev.features_written(self.driver_features);
        }
        self.restarting = s.active.then_some(s.positions);
        Ok(())
    }

    /// The upgrade is committed: queues that ran go on from where they
    /// stood.
    pub(super) fn start_restored(&mut self) {
        if let Some(pos) = self.restarting.take() {
            self.activate_from(Some(pos));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::modern::*;
    use super::super::test_device::{transport, Transport, FEATURES, TEST_POS};
    use super::*;
    use crate::pci::BarLogic;

    fn w(t: &mut Transport, off: u64, width: usize, v: u64) {
        t.mem_write(off, &v.to_le_bytes()[..width]);
    }

    /// A modern driver with queue 0 set up (size 64, vector 1) and
    /// running.
    fn running() -> (Transport, super::super::test_device::Fake) {
        let (mut t, _irqs, probe) = transport();
        w(&mut t, DEVICE_STATUS, 1, 3);
        w(&mut t, DRIVER_FEATURE_SELECT, 4, 0);
        w(&mut t, DRIVER_FEATURE, 4, FEATURES & 0xffff_ffff);
        w(&mut t, DRIVER_FEATURE_SELECT, 4, 1);
        w(&mut t, DRIVER_FEATURE, 4, FEATURES >> 32);
        w(&mut t, DEVICE_STATUS, 1, 3 | u64::from(FEATURES_OK));
        w(&mut t, QUEUE_SELECT, 2, 0);
        w(&mut t, QUEUE_SIZE, 2, 64);
        w(&mut t, QUEUE_MSIX_VECTOR, 2, 1);
        w(&mut t, QUEUE_DESC, 8, 0x10000);
        w(&mut t, QUEUE_DRIVER, 8, 0x20000);
        w(&mut t, QUEUE_DEVICE, 8, 0x30000);
        w(&mut t, QUEUE_ENABLE, 2, 1);
        w(&mut t, DEVICE_STATUS, 1, 7 | u64::from(FEATURES_OK));
        assert_eq!(probe.activated.lock().unwrap().len(), 1);
        (t, probe)
    }

    #[test]
    fn a_running_transport_goes_on_where_it_stood() {
        let (mut t, _) = running();
        t.freeze(Duration::from_secs(1)).unwrap();
        let saved = t.save_state();
        assert_eq!(saved.positions, vec![Some(TEST_POS), None]);
        let (mut u, _irqs, probe) = transport();
        u.restore_state(saved.clone()).unwrap();
        // Nothing runs before the commit; what it holds is what was saved.
        assert!(probe.activated.lock().unwrap().is_empty());
        // (Running again, from those positions, once started.)
        let again = SavedTransport {
            positions: saved.positions.clone(),
            active: true,
            ..u.save_state()
        };
        assert_eq!(again, saved);
        u.start_restored();
        let act = probe.activated.lock().unwrap();
        assert_eq!(act.len(), 1);
        let q = act[0].1[0].expect("queue 0 runs");
        assert_eq!((q.size, q.desc, q.vector), (64, 0x10000, 1));
        assert_eq!(q.start, Some(TEST_POS));
        // Queue 1 never ran: it does not start now.
        assert!(act[0].1[1].is_none());
    }

    #[test]
    fn saved_registers_no_driver_could_have_written_are_refused() {
        let (mut t, _) = running();
        t.freeze(Duration::from_secs(1)).unwrap();
        let good = t.save_state();
        type Spoil = Box<dyn Fn(&mut SavedTransport)>;
        let bad: Vec<(&str, Spoil)> = vec![
            ("queue size", Box::new(|s| s.queues[0].size = 3)),
            ("queue size 0", Box::new(|s| s.queues[0].size = 0)),
            ("queue too large", Box::new(|s| s.queues[0].size = 256)),
            ("vector", Box::new(|s| s.queues[0].vector = 99)),
            ("config vector", Box::new(|s| s.config_vector = 3)),
            ("features", Box::new(|s| s.driver_features |= 1 << 2)),
            ("status bits", Box::new(|s| s.status |= 0x10)),
            (
                "running, no DRIVER_OK",
                Box::new(|s| s.status &= !DRIVER_OK),
            ),
            (
                "interface",
                Box::new(|s| s.interface = Some("pci-x".into())),
            ),
            ("queues", Box::new(|s| s.queues.truncate(1))),
            ("positions", Box::new(|s| s.positions.push(None))),
            ("notify", Box::new(|s| s.notify = "mmap".into())),
            (
                "device",
                Box::new(|s| s.device = serde_json::json!({"x": 1})),
            ),
            (
                "position while stopped",
                Box::new(|s| {
                    s.active = false;
                    s.status = 3;
                }),
            ),
            (
                "no VERSION_1",
                Box::new(|s| s.driver_features &= !(1 << VIRTIO_F_VERSION_1)),
            ),
        ];
        for (what, f) in bad {
            let mut s = good.clone();
            f(&mut s);
            let (mut u, _irqs, probe) = transport();
            assert!(u.restore_state(s).is_err(), "{what} was taken");
            u.start_restored();
            assert!(probe.activated.lock().unwrap().is_empty(), "{what}");
        }
    }
}
