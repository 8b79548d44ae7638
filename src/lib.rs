//! qrbd: a replicated virtual disk in userspace. This package holds the adapters (FUSE front
//! end, backing store, sled metadata, admin socket, configuration) and the program; the actor
//! system and the replication core live in the `qrbd-actors` crate.

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod fuse_fs;
pub mod gendocs;
pub mod meta_store;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod resources;
pub mod status_text;
pub mod store;
pub mod testbed;
pub mod transport;
pub mod watch;
