//! The deterministic core: plain state machines with no I/O, no clock reads, no threads and no
//! OS-seeded hashing. Shells feed them events (with the time as a number) and carry out the
//! effects they return; the rules are written down in `docs/protocol.md`.
//!
//! - [`resource::ResourceCore`]: the protocol of one resource (roles, disk states, data
//!   generations, per-peer links, cluster-wide state changes), built on
//! - [`device::DeviceCore`]: the request pipeline of the volume (admission, conflicts,
//!   completion rules), with
//! - [`replication`]: the per-peer sending and receiving sides (epochs, barriers, acks), and
//! - [`generation`]: data-generation identifiers and the connect-time comparison.

pub mod activity_log;
pub mod device;
pub mod generation;
pub mod messages;
mod protocol;
pub mod replication;
pub mod resource;
pub mod split_brain;
mod states;

pub use device::{
    ByteRange, DeviceCore, DeviceStats, IoFault, IoKind, RequestId, Stage, Tick, VolumeEffect,
    WRITE_LATENCY_BOUNDS_US,
};
pub use protocol::ReplicationProtocol;
pub use states::{ConnectionState, DiskState, Role};

/// The unit of replication, conflict detection and out-of-sync accounting, and the alignment
/// every I/O buffer honours.
pub const BLOCK_SIZE: u64 = 4096;
