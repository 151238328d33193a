//! What happens to the devices, for an operator who subscribes
//! (`events_subscribe` on the management socket) instead of polling: a
//! client attached or left, a driver reset or started its device, a queue
//! broke, an I/O error (limited per device), a resize, a device added or
//! removed. Any layer publishes through its device's log
//! ([`crate::util::DeviceLog::event`]); publishing costs one atomic load
//! while nobody listens. Each subscriber has a bounded queue: one that
//! does not read loses events (and is told how many), never slows a device.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use serde_json::{json, Value};

/// Events a subscriber may have waiting before newer ones are dropped.
const QUEUE: usize = 1024;
/// The part of a subscriber's queue kept for the management plane's own
/// events (added, removed, resized): guests flooding it with theirs cannot
/// crowd those out.
const RESERVED: usize = 256;

/// Something that happened to a device.
#[derive(Debug, Clone)]
pub enum Event {
    ClientAttached {
        pid: i32,
        uid: u32,
        gid: u32,
    },
    ClientDetached {
        pid: i32,
    },
    /// The driver started the device (virtio DRIVER_OK).
    DriverOk,
    /// The driver reset the device.
    DriverReset,
    QueueBroken {
        queue: u16,
        why: String,
    },
    /// The backend failed a request (`op`: read, write, ...).
    IoError {
        op: String,
        error: String,
    },
    Resized {
        size: u64,
    },
    DeviceAdded,
    DeviceRemoved,
}

impl Event {
    /// Caused by a guest or a client, as often as it likes (limited per
    /// device, see `DeviceLog::event`).
    pub fn from_guest(&self) -> bool {
        !matches!(
            self,
            Event::DeviceAdded | Event::DeviceRemoved | Event::Resized { .. }
        )
    }

    fn to_json(&self, device: &str) -> Value {
        let (kind, mut v) = match self {
            Event::ClientAttached { pid, uid, gid } => (
                "client_attached",
                json!({ "pid": pid, "uid": uid, "gid": gid }),
            ),
            Event::ClientDetached { pid } => ("client_detached", json!({ "pid": pid })),
            Event::DriverOk => ("driver_ok", json!({})),
            Event::DriverReset => ("driver_reset", json!({})),
            Event::QueueBroken { queue, why } => {
                ("queue_broken", json!({ "queue": queue, "reason": why }))
            }
            Event::IoError { op, error } => ("io_error", json!({ "op": op, "error": error })),
            Event::Resized { size } => ("resized", json!({ "size": size })),
            Event::DeviceAdded => ("device_added", json!({})),
            Event::DeviceRemoved => ("device_removed", json!({})),
        };
        v["event"] = json!(kind);
        v["device"] = json!(device);
        v["time"] = json!(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()));
        v
    }
}

struct Subscriber {
    tx: Sender<Value>,
    /// Events dropped because the subscriber's queue was full.
    lost: AtomicU64,
}

static SUBSCRIBERS: Mutex<Vec<Arc<Subscriber>>> = Mutex::new(Vec::new());
static LISTENING: AtomicUsize = AtomicUsize::new(0);

/// Whether anybody listens: an event that costs something to describe
/// (an error's text) is only made then.
pub fn listening() -> bool {
    LISTENING.load(Ordering::Relaxed) > 0
}

/// Tells every subscriber that `e` happened to `device`.
pub fn publish(device: &str, e: &Event) {
    publish_after(device, e, 0);
}

/// [`publish`], saying that `suppressed` events of the device were left
/// out before it (its rate limit).
pub fn publish_after(device: &str, e: &Event, suppressed: u64) {
    if !listening() {
        return;
    }
    let mut v = e.to_json(device);
    if suppressed > 0 {
        v["suppressed_before"] = json!(suppressed);
    }
    let room = if e.from_guest() {
        QUEUE - RESERVED
    } else {
        QUEUE
    };
    for s in SUBSCRIBERS.lock().iter() {
        if s.tx.len() >= room {
            s.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match s.tx.try_send(v.clone()) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                s.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One subscription: events arrive on `rx` until it is dropped.
pub struct Subscription {
    me: Arc<Subscriber>,
    pub rx: Receiver<Value>,
}

impl Subscription {
    /// Events lost since the last call (the subscriber did not keep up).
    pub fn take_lost(&self) -> u64 {
        self.me.lost.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = SUBSCRIBERS.lock();
        subs.retain(|s| !Arc::ptr_eq(s, &self.me));
        LISTENING.store(subs.len(), Ordering::Relaxed);
    }
}

/// Starts receiving every event from now on.
pub fn subscribe() -> Subscription {
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let me = Arc::new(Subscriber {
        tx,
        lost: AtomicU64::new(0),
    });
    let mut subs = SUBSCRIBERS.lock();
    subs.push(me.clone());
    LISTENING.store(subs.len(), Ordering::Relaxed);
    Subscription { me, rx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_events_and_a_slow_one_loses_them_counted() {
        let a = subscribe();
        let b = subscribe();
        publish("d0", &Event::Resized { size: 4096 });
        let v = a.rx.try_recv().unwrap();
        assert_eq!(v["event"], "resized");
        assert_eq!(v["device"], "d0");
        assert_eq!(v["size"], 4096);
        assert!(b.rx.try_recv().is_ok());
        // b reads nothing more: past its queue, events are counted lost.
        for _ in 0..QUEUE + 5 {
            publish("d0", &Event::DriverOk);
        }
        assert!(b.take_lost() >= 5);
        // Guests' events leave room for the management plane's.
        publish("d1", &Event::DeviceRemoved);
        assert_eq!(b.take_lost(), 0, "a management event was crowded out");
        drop(b);
        // Other tests of this process may subscribe too: only ours count.
        assert!(a.rx.len() <= QUEUE);
    }
}
