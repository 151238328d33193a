//! A virtio device for the transport's unit tests: it records what the
//! transport tells it.

use std::sync::{Arc, Mutex};

use super::transport::{NotifyMode, PciTransport};
use super::{DriverReady, QueueConfig, VirtioDevice};
use crate::memory::MemoryChange;
use crate::pci::Interrupts;

pub type Activations = Arc<Mutex<Vec<(u64, Vec<Option<QueueConfig>>)>>>;

/// Offered: bits 0, 1, 3 and VERSION_1 (32).
pub const FEATURES: u64 = 0b1011 | (1 << 32);

#[derive(Default)]
pub struct Fake {
    pub config: Vec<u8>,
    pub activated: Activations,
    pub resets: Arc<Mutex<usize>>,
    pub notified: Arc<Mutex<Vec<u16>>>,
    pub written: Arc<Mutex<Vec<u64>>>,
}

impl VirtioDevice for Fake {
    fn features(&self) -> u64 {
        FEATURES
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn queue_size(&self) -> u16 {
        128
    }
    fn config_len(&self) -> usize {
        self.config.len()
    }
    fn read_config(&self, offset: usize, data: &mut [u8]) {
        data.copy_from_slice(&self.config[offset..offset + data.len()]);
    }
    fn write_config(&mut self, _offset: usize, _data: &[u8]) {}
    fn activate(&mut self, ready: DriverReady) {
        self.activated
            .lock()
            .unwrap()
            .push((ready.features, ready.queues));
    }
    fn notify(&mut self, index: u16) {
        self.notified.lock().unwrap().push(index);
    }
    fn reset(&mut self) {
        *self.resets.lock().unwrap() += 1;
    }
    fn memory_changed(&mut self, _change: MemoryChange) {}
    fn abandon(&mut self) {}
    fn features_written(&mut self, features: u64) {
        self.written.lock().unwrap().push(features);
    }
    fn freeze(
        &mut self,
        _limit: std::time::Duration,
    ) -> Result<Vec<Option<super::ring::RingPos>>, String> {
        Ok(vec![Some(TEST_POS), None])
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        state
            .is_null()
            .then_some(())
            .ok_or_else(|| "unexpected device state".to_string())
    }
}

/// Where the fake's first queue stands when frozen.
pub const TEST_POS: super::ring::RingPos = super::ring::RingPos {
    next_avail: 7,
    next_used: 7,
    avail_wrap: false,
    used_wrap: false,
};

pub type Transport = PciTransport<Fake>;

/// A transport over a fake device with 60 bytes of config (0, 1, 2...),
/// 3 MSI-X vectors, and a probe that sees what the device was told.
pub fn transport() -> (Transport, Arc<Interrupts>, Fake) {
    let irqs = Arc::new(Interrupts::new(3, crate::util::DeviceLog::new("test")));
    let fake = Fake {
        config: (0u8..60).collect(),
        ..Default::default()
    };
    let probe = Fake {
        config: vec![],
        activated: fake.activated.clone(),
        resets: fake.resets.clone(),
        notified: fake.notified.clone(),
        written: fake.written.clone(),
    };
    let t = PciTransport::new(fake, irqs.clone(), NotifyMode::Message).unwrap();
    (t, irqs, probe)
}
