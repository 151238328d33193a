//! vfio-user-blk: a virtio-blk disk served as a PCI function over vfio-user.
//!
//! Layers, from the socket down (README.md, "Layout", says what each owns
//! and what it knows nothing of):
//! `vfio_user` (the protocol), `pci` (config space, BARs, MSI-X, interrupt
//! eventfds), `virtio` (the legacy and modern transports, the rings),
//! `blk` (virtio-blk requests), `engine` (reactors, queues, the I/O pool),
//! `backend` (blocks and bytes: files, memory, io_uring). `memory` owns the
//! raw guest pointers. `device` assembles one disk from these layers;
//! `target` serves the disks of a process and its management plane; `cli`
//! is the command line.

pub mod activation;
pub mod backend;
pub mod blk;
pub mod cli;
pub mod device;
pub mod engine;
pub mod events;
pub mod handover;
pub mod memory;
pub mod pci;
pub mod relaunch;
pub mod target;
pub mod util;
pub mod vfio_user;
pub mod virtio;
