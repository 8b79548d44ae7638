//! qrbd's actor system and its deterministic replication core.
//!
//! This crate does not depend on the `qrbd` package: the outside world reaches it through the
//! traits in [`ports`].

pub mod buffer;
pub mod core;
pub mod device;
pub mod gate;
pub mod io;
pub mod meta;
pub mod metadata;
pub mod ports;
pub mod retry;
pub mod status;
pub mod supervisor;
pub mod testing;
pub mod uring;
