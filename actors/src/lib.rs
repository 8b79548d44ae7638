//! qrbd's actor system and its deterministic replication core.
//!
//! This crate does not depend on the `qrbd` package: the outside world reaches it through the
//! traits in [`ports`].

pub mod buffer;
pub mod meta;
pub mod ports;
pub mod core;
