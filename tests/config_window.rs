//! Hostile config-space writes over the PCI-config access capability
//! (straddling its fields, the whole of config space): read-only bytes stay.

mod support;

use support::driver::*;
use vfio_bindings::bindings::vfio::*;
use vfio_user_blk::virtio::modern;

const MB: u64 = 1 << 20;

fn window_cap(cfg: &[u8; 256]) -> usize {
    let mut ptr = usize::from(cfg[0x34]);
    while ptr != 0 {
        if cfg[ptr] == 0x09 && cfg[ptr + 3] == modern::CAP_PCI_CFG {
            return ptr;
        }
        ptr = usize::from(cfg[ptr + 1]);
    }
    panic!("no window capability");
}

#[test]
fn straddling_and_whole_space_config_writes_keep_read_only_bytes() {
    let (mut srv, _img) = image_server("review-window", 4 * MB, &[]);
    let mut c = vfio_user::Client::new(&srv.socket).unwrap();
    let mut before = [0u8; 256];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut before)
        .unwrap();
    let cap = window_cap(&before);
    // One write covering bar..data: bar 4, offset DEVICE_STATUS, length 1,
    // data 0x01: the access uses the new fields.
    let mut w = vec![4u8, 0xee, 0xee, 0xee];
    w.extend_from_slice(&u32::try_from(modern::DEVICE_STATUS).unwrap().to_le_bytes());
    w.extend_from_slice(&1u32.to_le_bytes());
    w.extend_from_slice(&[1, 0, 0, 0]);
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, cap as u64 + 4, &w)
        .unwrap();
    let mut st = [0u8];
    c.region_read(VFIO_PCI_BAR4_REGION_INDEX, modern::DEVICE_STATUS, &mut st)
        .unwrap();
    assert_eq!(st[0], 1);
    // All ones over all of config space, then every width at every offset
    // around the capability.
    c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0, &[0xff; 256])
        .unwrap();
    for off in cap - 4..cap + 24 {
        for width in [1usize, 2, 3, 4, 8] {
            if off + width <= 256 {
                c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off as u64, &vec![0xff; width])
                    .unwrap();
                let mut r = vec![0u8; width];
                c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, off as u64, &mut r)
                    .unwrap();
            }
        }
    }
    let mut after = [0u8; 256];
    c.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut after)
        .unwrap();
    // Read-only parts of the window capability and of the other caps.
    for i in [cap, cap + 1, cap + 2, cap + 3, cap + 5, cap + 6, cap + 7] {
        assert_eq!(after[i], before[i], "config byte {i:#x}");
    }
    // (MSI-X control's enable and mask bits at 0x43 are writable.)
    assert_eq!(
        &after[0x44..cap],
        &before[0x44..cap],
        "caps before the window"
    );
    assert_eq!(&after[..4], &before[..4]);
    drop(c);
    srv.assert_healthy();
}
