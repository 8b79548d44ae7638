//! The deterministic core: plain state machines with no I/O, no clock reads and no threads.
//! Actors feed them events (with the time as a number) and carry out the effects they return.

pub mod device;
pub mod messages;
mod protocol;
pub mod replication;
mod states;

pub use device::{
    ByteRange, DeviceCore, DeviceStats, Effect, IoFault, IoKind, RequestId, Stage, Tick,
    WRITE_LATENCY_BOUNDS_US,
};
pub use protocol::ReplicationProtocol;
pub use states::{ConnectionState, DiskState, Role};
