//! The deterministic core: plain state machines with no I/O, no clock reads and no threads.
//! Actors feed them events (with the time as a number) and carry out the effects they return.

mod protocol;

pub use protocol::ReplicationProtocol;
