use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// When a replicated write may complete (docs/protocol.md, "Completion").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicationProtocol {
    /// Complete once handed to the transport.
    A,
    /// Complete once the peer has received it.
    B,
    /// Complete once the peer has written it.
    C,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown replication protocol {0:?} (use A, B or C)")]
pub struct UnknownProtocol(pub String);

impl FromStr for ReplicationProtocol {
    type Err = UnknownProtocol;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "A" | "a" => Ok(ReplicationProtocol::A),
            "B" | "b" => Ok(ReplicationProtocol::B),
            "C" | "c" => Ok(ReplicationProtocol::C),
            other => Err(UnknownProtocol(other.to_owned())),
        }
    }
}

impl fmt::Display for ReplicationProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let letter = match self {
            ReplicationProtocol::A => "A",
            ReplicationProtocol::B => "B",
            ReplicationProtocol::C => "C",
        };
        f.write_str(letter)
    }
}
