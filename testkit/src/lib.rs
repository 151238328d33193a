//! Test and benchmark code shared by the workspace: the guest driver's side
//! of the split and packed rings (`driver_ring`) and private temporary
//! folders (`TempDir`). Not part of the server: it panics on misuse, as
//! test code may.

pub mod driver_ring;
mod tempdir;

pub use tempdir::TempDir;
