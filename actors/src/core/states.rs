use std::fmt;

use serde::{Deserialize, Serialize};

/// The role of a node for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

/// The state of a node's local data (docs/protocol.md, "States").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DiskState {
    Diskless,
    Attaching,
    Inconsistent,
    Outdated,
    DUnknown,
    Consistent,
    UpToDate,
}

macro_rules! display_as_debug {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    )*};
}

display_as_debug!(Role, DiskState);

/// The state of a connection to one peer (docs/protocol.md, "States").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConnectionState {
    StandAlone,
    Connecting,
    Connected,
    Disconnecting,
    Timeout,
    NetworkFailure,
    ProtocolError,
}

display_as_debug!(ConnectionState);
