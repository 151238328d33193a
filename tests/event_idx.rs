//! EVENT_IDX on the packed virtqueue, under a hostile review: each test held a problem
//! found by acting as a guest driver, and failed on the code before its
//! fix (interrupts lost with EVENT_IDX when a whole lap of descriptors
//! completed between two interrupt decisions).

mod support;

#[allow(unused_imports)]
use support::driver::*;
#[allow(unused_imports)]
use support::*;
use vfio_user_blk::virtio::packed::PackedQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vub_testkit::driver_ring::{Buf, PackedRing};

const DESC: u64 = 0x1000;
const DRIVER: u64 = 0x3000;
const DEVICE: u64 = 0x3010;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap()
}

fn one_buf() -> Vec<Buf> {
    vec![Buf {
        addr: 0x8000,
        len: 16,
        write: true,
    }]
}

/// EVENT_IDX, one interrupt decision per batch (as the reactor makes it:
/// one `signal()` per pass): when exactly one lap of used elements is
/// written between two decisions, `new == old` and `vring_need_event` can
/// never be true, whatever the driver's event says. The driver asked for
/// an interrupt at the first of those elements and never gets it.
#[test]
fn event_idx_interrupt_lost_after_a_full_lap_between_decisions() {
    let m = mem();
    let size = 4;
    let mut drv = PackedRing::new(&m, size, DESC, DRIVER, DEVICE, true);
    let mut dev = PackedQueue::new(size, DESC, DRIVER, DEVICE, true).unwrap();
    // One request, one interrupt (the first one always goes).
    let id = drv.add(&m, &one_buf(), None).unwrap();
    drv.publish(&m, id);
    dev.pop(&m).unwrap().unwrap();
    dev.add_used(&m, id, 1).unwrap();
    assert!(dev.needs_notification(&m).unwrap());
    assert_eq!(drv.pop_used(&m), Some((id, 1)));
    // The driver sleeps, asking for an interrupt at the next used element.
    assert!(!drv.enable_interrupts(&m));
    // The block layer queues a full ring; the device serves it in one pass.
    let ids: Vec<u16> = (0..size)
        .map(|_| {
            let id = drv.add(&m, &one_buf(), None).unwrap();
            drv.publish(&m, id);
            id
        })
        .collect();
    for _ in 0..size {
        dev.pop(&m).unwrap().unwrap();
    }
    for &id in &ids {
        dev.add_used(&m, id, 1).unwrap();
    }
    assert!(
        dev.needs_notification(&m).unwrap(),
        "the driver's event position was passed: it must get an interrupt"
    );
}

/// The same with the smallest ring: every used element is one lap, so
/// after the first interrupt there is never another one.
#[test]
fn event_idx_size_one_ring_interrupts_only_once() {
    let m = mem();
    let mut drv = PackedRing::new(&m, 1, DESC, DRIVER, DEVICE, true);
    let mut dev = PackedQueue::new(1, DESC, DRIVER, DEVICE, true).unwrap();
    for round in 0..4 {
        assert!(!drv.enable_interrupts(&m));
        let id = drv.add(&m, &one_buf(), None).unwrap();
        drv.publish(&m, id);
        dev.pop(&m).unwrap().unwrap();
        dev.add_used(&m, id, 1).unwrap();
        assert!(
            dev.needs_notification(&m).unwrap(),
            "round {round}: the driver waits at the position just used"
        );
        assert_eq!(drv.pop_used(&m), Some((id, 1)));
    }
}

/// The server end to end: a packed queue of 3 (any size is allowed with
/// RING_PACKED) and EVENT_IDX. Every virtio-blk request (header, data,
/// status) takes 3 descriptors, i.e. a whole lap: the driver, sleeping on
/// its interrupt as Linux does, gets only the first one and then hangs.
#[test]
fn packed_event_idx_queue_of_three_interrupts_after_the_first_request() {
    let (mut srv, _img) = image_server("packed-review-irq", 4 << 20, &["--packed"]);
    let mut d = Driver::new(
        &srv.socket,
        DriverOptions {
            queue_size: Some(3),
            ..DriverOptions::modern()
        },
    );
    assert_ne!(d.features & F_EVENT_IDX, 0, "EVENT_IDX negotiated");
    assert_eq!(d.packed[0].size, 3);
    // Queue 0 signals MSI-X vector 1, once per request: the driver asks
    // for an interrupt at the next used element (Linux's enable_cb) and
    // sleeps until it comes.
    for round in 0..3u8 {
        let write = Request::write(u64::from(round), &[round; 512]);
        let (status, _, fired) = d.run_signalled(0, &write);
        assert_eq!((status, fired), (S_OK, vec![1]), "round {round}");
    }
    srv.assert_alive();
}
