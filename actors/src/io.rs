//! An application request as the front end hands it over to a device, and its reply path.

use std::sync::Arc;

use crate::buffer::PooledBuf;
use crate::core::{ByteRange, IoFault, IoKind};

/// An application request as the front end hands it over.
pub enum IoOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        offset: u64,
        buf: PooledBuf,
    },
    /// Shared: the local write and every peer's send read the same bytes.
    Write {
        offset: u64,
        data: SharedBuf,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl IoOp {
    pub fn kind_and_range(&self) -> (IoKind, ByteRange) {
        match self {
            IoOp::Read { offset, buf } => (IoKind::Read, ByteRange::new(*offset, buf.len() as u64)),
            IoOp::Write { offset, data } => {
                (IoKind::Write, ByteRange::new(*offset, data.len() as u64))
            }
            IoOp::Discard { offset, len } => (IoKind::Discard, ByteRange::new(*offset, *len)),
            IoOp::Flush => (IoKind::Flush, ByteRange::new(0, 0)),
        }
    }
}

impl std::fmt::Debug for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, range) = self.kind_and_range();
        write!(f, "{kind:?}@{}+{}", range.offset, range.len)
    }
}

/// Write data, shared between the local store and the peers' senders.
pub type SharedBuf = Arc<PooledBuf>;

/// What a completed request gives back.
#[derive(Debug)]
pub enum IoDone {
    Read(PooledBuf),
    Written(u32),
    Discarded,
    Flushed,
}

/// The reply path of one request: called exactly once, from the actor's thread.
pub type IoReply = Box<dyn FnOnce(Result<IoDone, IoFault>) + Send>;
