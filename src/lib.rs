//! vfio-user-blk: a virtio-blk disk served as a PCI function over vfio-user.
//!
//! Layers (see DESIGN.md): `vfio_user` (protocol), `pci` (config space,
//! BARs, MSI-X, interrupt eventfds), `virtio` (legacy transport), `blk`
//! (virtio-blk), `backend` (blocks and bytes), `cli` (wiring).

pub mod backend;
pub mod blk;
pub mod cli;
pub mod engine;
pub mod memory;
pub mod pci;
pub mod target;
pub mod util;
pub mod vfio_user;
pub mod virtio;
