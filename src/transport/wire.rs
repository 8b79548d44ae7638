//! Binary framing of [`PeerMessage`]s on QUIC streams.
//!
//! A frame is a `u32` big-endian length of the rest, a `u8` message tag, then the message's
//! fields in declaration order: integers fixed-width big-endian, `bool` and enums as one byte,
//! strings as a `u16` big-endian byte length and UTF-8. A `Data` or `ResyncData` payload takes
//! the rest of the frame, so a sender can write the frame's header ([`encode_data_header`],
//! [`encode_resync_data_header_into`]) and then the payload slice as is.
//!
//! Everything a peer sends is untrusted: the length is checked against [`MAX_FRAME_BODY`]
//! before anything is allocated, and any malformed frame decodes to a [`WireError`], never a
//! panic.

use std::ops::DerefMut;

use bytes::{BufMut, Bytes, BytesMut};
use qrbd_actors::core::messages::{PeerMessage, StreamKind, PROTOCOL_VERSION};
use qrbd_actors::core::{DiskState, ReplicationProtocol, Role};

/// Largest `Data` payload accepted. Writes are at most 1 MiB; the slack keeps the limit from
/// becoming a compatibility problem if that grows a little.
pub const MAX_DATA_PAYLOAD: usize = 2 << 20;
/// Fixed fields of `Data` after the tag: seq, epoch, request, offset, seen.
const DATA_FIELDS_LEN: usize = 5 * 8;
/// Smallest `Data` frame body: tag and fixed fields, empty payload.
const DATA_BODY_MIN: usize = 1 + DATA_FIELDS_LEN;
/// Largest accepted value of the length prefix (tag + fields + payload of the biggest `Data`).
pub const MAX_FRAME_BODY: usize = DATA_BODY_MIN + MAX_DATA_PAYLOAD;
/// Bytes [`encode_data_header`] produces: length prefix, tag and the fixed fields.
pub const DATA_HEADER_LEN: usize = 4 + DATA_BODY_MIN;
/// Largest `ResyncData` payload accepted: the largest request a sync source serves
/// (`MAX_RESYNC_REQUEST` of the core's resync, 1 MiB).
pub const MAX_RESYNC_PAYLOAD: usize = 1 << 20;
/// Fixed fields of `ResyncData` after the tag: offset.
const RESYNC_DATA_FIELDS_LEN: usize = 8;
/// Smallest `ResyncData` frame body: tag and offset, empty payload.
const RESYNC_DATA_BODY_MIN: usize = 1 + RESYNC_DATA_FIELDS_LEN;
/// Bytes [`encode_resync_data_header_into`] produces: length prefix, tag and offset.
pub const RESYNC_DATA_HEADER_LEN: usize = 4 + RESYNC_DATA_BODY_MIN;
/// Runs one `SyncBitmap` part may hold, at most (the core sends parts of 4096 runs).
pub const MAX_SYNC_BITMAP_RUNS: usize = 4096;

// Tag 0 is never used, so a run of zero bytes is not a valid frame.
const TAG_HELLO: u8 = 1;
const TAG_REFUSED: u8 = 2;
const TAG_STATE: u8 = 3;
const TAG_DATA: u8 = 4;
const TAG_DISCARD: u8 = 5;
const TAG_BARRIER: u8 = 6;
// Tags 7 and 8 were the per-request RecvAck and WriteAck of protocol version 2; never reuse them.
const TAG_RECV_ACK: u8 = 17;
const TAG_WRITE_ACK: u8 = 18;
const TAG_NEG_ACK: u8 = 9;
const TAG_BARRIER_ACK: u8 = 10;
const TAG_PING: u8 = 11;
const TAG_PING_ACK: u8 = 12;
const TAG_STATE_PREPARE: u8 = 13;
const TAG_STATE_REPLY: u8 = 14;
const TAG_STATE_COMMIT: u8 = 15;
const TAG_STATE_ABORT: u8 = 16;
// Resync (protocol version 4), on the resync stream.
const TAG_SYNC_BITMAP: u8 = 19;
const TAG_RESYNC_REQUEST: u8 = 20;
const TAG_RESYNC_DATA: u8 = 21;
const TAG_RESYNC_FAILED: u8 = 22;
const TAG_RESYNC_WRITTEN: u8 = 23;
const TAG_RESYNC_DONE: u8 = 24;
const TAG_VERIFY_REQUEST: u8 = 25;
const TAG_VERIFY_REPLY: u8 = 26;
const TAG_RESYNC_CHECKSUMS: u8 = 27;
const TAG_RESYNC_SAME: u8 = 28;
const TAG_SKIP_INITIAL_SYNC: u8 = 29;
const TAG_SUPERSEDED: u8 = 30;
const TAG_RETRY_WRITE: u8 = 31;
/// Digests one `VerifyReply` may carry: one per 4 KiB block of the largest request (1 MiB).
pub const MAX_VERIFY_DIGESTS: usize = 256;
/// Generations a Hello may list in its history, at most.
const MAX_HISTORY: u16 = 64;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the maximum of {MAX_FRAME_BODY} bytes")]
    FrameTooLarge { len: u64 },
    #[error("empty frame (length 0, no message tag)")]
    EmptyFrame,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error(
        "truncated {message} message: field `{field}` needs {needed} bytes but only {available} are left"
    )]
    Truncated {
        message: &'static str,
        field: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("{message} message has {count} unexpected bytes after its last field")]
    TrailingBytes { message: &'static str, count: usize },
    #[error("{message} message: field `{field}` is not valid UTF-8")]
    BadUtf8 {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message} payload of {len} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        message: &'static str,
        len: u64,
        max: usize,
    },
    #[error("{message} message lists {count} {what}; at most {max} are allowed")]
    TooMany {
        message: &'static str,
        what: &'static str,
        count: u64,
        max: usize,
    },
    #[error("{message} message: field `{field}` has invalid value {value}")]
    BadValue {
        message: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("peer speaks replication protocol version {theirs}; this node speaks version {ours}")]
    UnsupportedVersion { theirs: u32, ours: u32 },
    #[error("stream ended inside a frame: got {got} of the {wanted} bytes of the {what}")]
    StreamEnded {
        what: &'static str,
        got: usize,
        wanted: usize,
    },
    #[error("payload buffer of {got} bytes given to a frame parser that wanted {wanted:?}")]
    UnexpectedPayloadBuffer { wanted: Option<usize>, got: usize },
    #[error("reading from the peer failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing to the peer failed: {0}")]
    Write(#[from] quinn::WriteError),
}

// ---------------------------------------------------------------------------------------------
// Enum codes. Spelled out (not `as u8`) so reordering a Rust enum cannot change the wire.
// ---------------------------------------------------------------------------------------------

fn protocol_code(protocol: ReplicationProtocol) -> u8 {
    match protocol {
        ReplicationProtocol::A => 0,
        ReplicationProtocol::B => 1,
        ReplicationProtocol::C => 2,
    }
}

fn protocol_from(code: u8) -> Option<ReplicationProtocol> {
    Some(match code {
        0 => ReplicationProtocol::A,
        1 => ReplicationProtocol::B,
        2 => ReplicationProtocol::C,
        _ => return None,
    })
}

fn role_code(role: Role) -> u8 {
    match role {
        Role::Primary => 0,
        Role::Secondary => 1,
    }
}

fn role_from(code: u8) -> Option<Role> {
    Some(match code {
        0 => Role::Primary,
        1 => Role::Secondary,
        _ => return None,
    })
}

fn disk_code(disk: DiskState) -> u8 {
    match disk {
        DiskState::Diskless => 0,
        DiskState::Attaching => 1,
        DiskState::Inconsistent => 2,
        DiskState::Outdated => 3,
        DiskState::DUnknown => 4,
        DiskState::Consistent => 5,
        DiskState::UpToDate => 6,
    }
}

fn disk_from(code: u8) -> Option<DiskState> {
    Some(match code {
        0 => DiskState::Diskless,
        1 => DiskState::Attaching,
        2 => DiskState::Inconsistent,
        3 => DiskState::Outdated,
        4 => DiskState::DUnknown,
        5 => DiskState::Consistent,
        6 => DiskState::UpToDate,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Where frames are encoded: a `Vec<u8>` for one frame, a `BytesMut` for a batch. The length
/// prefix is patched in place once the body is known, hence the slice access.
pub trait FrameBuf: BufMut + DerefMut<Target = [u8]> {}
impl<T: BufMut + DerefMut<Target = [u8]>> FrameBuf for T {}

fn put_str(out: &mut impl FrameBuf, text: &str) {
    // Strings are names (at most 64 characters) and refusal reasons; cutting an absurdly long
    // reason is better than failing to say why we refuse.
    let mut end = text.len().min(usize::from(u16::MAX));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let len = u16::try_from(end).unwrap_or(u16::MAX);
    out.put_u16(len);
    out.put_slice(&text.as_bytes()[..usize::from(len)]);
}

/// A list: a u16 count, then the items; more than [`MAX_HISTORY`] items are cut (a peer would
/// refuse the message, and no list the core keeps grows that long).
fn put_list<B: FrameBuf, T>(out: &mut B, items: &[T], mut put: impl FnMut(&mut B, &T)) {
    let items = &items[..items.len().min(usize::from(MAX_HISTORY))];
    out.put_u16(items.len() as u16);
    for item in items {
        put(out, item);
    }
}

/// Block digests: a u16 count, then 32 bytes each. The whole count, even beyond the limit: a
/// receiver then refuses the message (senders check first, see `check_limits`).
fn put_digests(out: &mut impl FrameBuf, digests: &[[u8; 32]]) {
    let count = u16::try_from(digests.len()).unwrap_or(u16::MAX);
    out.put_u16(count);
    for digest in &digests[..usize::from(count)] {
        out.put_slice(digest);
    }
}

/// Writes the length prefix of the frame that starts at `start` once the frame is complete.
fn finish_frame(out: &mut impl FrameBuf, start: usize) {
    // Only an oversized Data payload can exceed u32; such a frame is refused by every
    // receiver, and the senders refuse to send it.
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Encodes `msg` as one complete frame, length prefix included.
///
/// A message beyond a limit (a `Data` payload larger than [`MAX_DATA_PAYLOAD`], a `ResyncData`
/// payload larger than [`MAX_RESYNC_PAYLOAD`], a `SyncBitmap` of more than
/// [`MAX_SYNC_BITMAP_RUNS`] runs) yields a frame receivers reject; [`write_message`] and
/// [`FrameBatch::push_message`] check that before sending ([`check_limits`]).
pub fn encode(msg: &PeerMessage) -> Vec<u8> {
    let capacity = match msg {
        PeerMessage::Data { data, .. } => DATA_HEADER_LEN + data.len(),
        PeerMessage::ResyncData { data, .. } => RESYNC_DATA_HEADER_LEN + data.len(),
        PeerMessage::SyncBitmap { runs, .. } => 16 + 16 * runs.len(),
        PeerMessage::VerifyReply { digests, .. } | PeerMessage::ResyncChecksums { digests, .. } => {
            32 + 32 * digests.len()
        }
        _ => 64,
    };
    let mut out = Vec::with_capacity(capacity);
    encode_into(&mut out, msg);
    out
}

/// Appends `msg` as one complete frame, length prefix included, to `out`.
pub fn encode_into(out: &mut impl FrameBuf, msg: &PeerMessage) {
    let start = out.len();
    out.put_u32(0);
    match msg {
        PeerMessage::Hello {
            protocol_version,
            node_id,
            node_name,
            resource,
            size_bytes,
            protocol,
            role,
            disk,
            current_uuid,
            bitmap_uuid,
            history_uuids,
            receiver_missing_bytes,
            discard_my_data,
            primary_before_split,
            resuming_initial_sync,
            allow_two_primaries,
        } => {
            out.put_u8(TAG_HELLO);
            // The version comes first so any later layout can still be recognised as a version
            // mismatch.
            out.put_slice(&protocol_version.to_be_bytes());
            out.put_u8(*node_id);
            put_str(out, node_name);
            put_str(out, resource);
            out.put_slice(&size_bytes.to_be_bytes());
            out.put_u8(protocol_code(*protocol));
            out.put_u8(role_code(*role));
            out.put_u8(disk_code(*disk));
            out.put_slice(&current_uuid.to_be_bytes());
            out.put_slice(&bitmap_uuid.to_be_bytes());
            put_list(out, history_uuids, |out, uuid| {
                out.put_slice(&uuid.to_be_bytes())
            });
            out.put_slice(&receiver_missing_bytes.to_be_bytes());
            out.put_u8(u8::from(*discard_my_data));
            out.put_u8(u8::from(*primary_before_split));
            out.put_u8(u8::from(*resuming_initial_sync));
            out.put_u8(u8::from(*allow_two_primaries));
        }
        PeerMessage::Refused { reason, standalone } => {
            out.put_u8(TAG_REFUSED);
            put_str(out, reason);
            out.put_u8(u8::from(*standalone));
        }
        PeerMessage::StatePrepare {
            transaction,
            node,
            outdate_peers,
        } => {
            out.put_u8(TAG_STATE_PREPARE);
            out.put_slice(&transaction.to_be_bytes());
            out.put_u8(*node);
            out.put_u8(u8::from(*outdate_peers));
        }
        PeerMessage::StateReply {
            transaction,
            refusal,
        } => {
            out.put_u8(TAG_STATE_REPLY);
            out.put_slice(&transaction.to_be_bytes());
            out.put_u8(u8::from(refusal.is_some()));
            if let Some(reason) = refusal {
                put_str(out, reason);
            }
        }
        PeerMessage::StateCommit { transaction } => {
            out.put_u8(TAG_STATE_COMMIT);
            out.put_slice(&transaction.to_be_bytes());
        }
        PeerMessage::StateAbort { transaction } => {
            out.put_u8(TAG_STATE_ABORT);
            out.put_slice(&transaction.to_be_bytes());
        }
        PeerMessage::SkipInitialSync { uuid } => {
            out.put_u8(TAG_SKIP_INITIAL_SYNC);
            out.put_slice(&uuid.to_be_bytes());
        }
        PeerMessage::Superseded { seq } => {
            out.put_u8(TAG_SUPERSEDED);
            out.put_slice(&seq.to_be_bytes());
        }
        PeerMessage::RetryWrite { seq, after } => {
            out.put_u8(TAG_RETRY_WRITE);
            out.put_slice(&seq.to_be_bytes());
            out.put_slice(&after.to_be_bytes());
        }
        PeerMessage::State {
            role,
            disk,
            current_uuid,
            bitmap_uuids,
            history_uuids,
            receiver_missing_bytes,
        } => {
            out.put_u8(TAG_STATE);
            out.put_u8(role_code(*role));
            out.put_u8(disk_code(*disk));
            out.put_slice(&current_uuid.to_be_bytes());
            put_list(out, bitmap_uuids, |out, (node, uuid)| {
                out.put_u8(*node);
                out.put_slice(&uuid.to_be_bytes());
            });
            put_list(out, history_uuids, |out, uuid| {
                out.put_slice(&uuid.to_be_bytes())
            });
            out.put_slice(&receiver_missing_bytes.to_be_bytes());
        }
        PeerMessage::Data {
            seq,
            epoch,
            request,
            offset,
            seen,
            data,
        } => {
            push_data_fields(
                out,
                &DataHeader {
                    seq: *seq,
                    epoch: *epoch,
                    request: *request,
                    offset: *offset,
                    seen: *seen,
                },
            );
            out.put_slice(data);
        }
        PeerMessage::Discard {
            seq,
            epoch,
            request,
            offset,
            len,
            seen,
        } => {
            out.put_u8(TAG_DISCARD);
            for value in [seq, epoch, request, offset, len, seen] {
                out.put_slice(&value.to_be_bytes());
            }
        }
        PeerMessage::Barrier {
            seq,
            epoch,
            writes,
            flush,
        } => {
            out.put_u8(TAG_BARRIER);
            out.put_slice(&seq.to_be_bytes());
            out.put_slice(&epoch.to_be_bytes());
            out.put_slice(&writes.to_be_bytes());
            out.put_u8(u8::from(*flush));
        }
        PeerMessage::RecvAck { up_to } => {
            out.put_u8(TAG_RECV_ACK);
            out.put_u64(*up_to);
        }
        PeerMessage::WriteAck { up_to } => {
            out.put_u8(TAG_WRITE_ACK);
            out.put_u64(*up_to);
        }
        PeerMessage::NegAck { request, errno } => {
            out.put_u8(TAG_NEG_ACK);
            out.put_slice(&request.to_be_bytes());
            out.put_slice(&errno.to_be_bytes());
        }
        PeerMessage::BarrierAck { epoch, writes } => {
            out.put_u8(TAG_BARRIER_ACK);
            out.put_slice(&epoch.to_be_bytes());
            out.put_slice(&writes.to_be_bytes());
        }
        PeerMessage::Ping { nonce } => {
            out.put_u8(TAG_PING);
            out.put_slice(&nonce.to_be_bytes());
        }
        PeerMessage::PingAck { nonce } => {
            out.put_u8(TAG_PING_ACK);
            out.put_slice(&nonce.to_be_bytes());
        }
        PeerMessage::SyncBitmap {
            runs,
            last,
            from_source,
        } => {
            out.put_u8(TAG_SYNC_BITMAP);
            // The whole count, even beyond the limit: a receiver then refuses the part
            // instead of silently missing runs (senders check first, see `check_limits`).
            let count = u32::try_from(runs.len()).unwrap_or(u32::MAX);
            out.put_u32(count);
            for (first, blocks) in &runs[..count as usize] {
                out.put_u64(*first);
                out.put_u64(*blocks);
            }
            out.put_u8(u8::from(*last));
            out.put_u8(u8::from(*from_source));
        }
        PeerMessage::ResyncRequest { offset, len } => {
            out.put_u8(TAG_RESYNC_REQUEST);
            out.put_u64(*offset);
            out.put_u64(*len);
        }
        PeerMessage::ResyncData { offset, data } => {
            push_resync_data_fields(out, *offset);
            out.put_slice(data);
        }
        PeerMessage::ResyncFailed { offset, len, errno } => {
            out.put_u8(TAG_RESYNC_FAILED);
            out.put_u64(*offset);
            out.put_u64(*len);
            out.put_slice(&errno.to_be_bytes());
        }
        PeerMessage::ResyncWritten { offset, len, ok } => {
            out.put_u8(TAG_RESYNC_WRITTEN);
            out.put_u64(*offset);
            out.put_u64(*len);
            out.put_u8(u8::from(*ok));
        }
        PeerMessage::ResyncDone { moved_bytes } => {
            out.put_u8(TAG_RESYNC_DONE);
            out.put_u64(*moved_bytes);
        }
        PeerMessage::ResyncChecksums {
            offset,
            len,
            digests,
        } => {
            out.put_u8(TAG_RESYNC_CHECKSUMS);
            out.put_u64(*offset);
            out.put_u64(*len);
            put_digests(out, digests);
        }
        PeerMessage::ResyncSame { offset, len } => {
            out.put_u8(TAG_RESYNC_SAME);
            out.put_u64(*offset);
            out.put_u64(*len);
        }
        PeerMessage::VerifyRequest { offset, len } => {
            out.put_u8(TAG_VERIFY_REQUEST);
            out.put_u64(*offset);
            out.put_u64(*len);
        }
        PeerMessage::VerifyReply {
            offset,
            len,
            digests,
            errno,
        } => {
            out.put_u8(TAG_VERIFY_REPLY);
            out.put_u64(*offset);
            out.put_u64(*len);
            out.put_slice(&errno.to_be_bytes());
            put_digests(out, digests);
        }
    }
    finish_frame(out, start);
}

/// Refuses a resync message a receiver would refuse for a limit: a payload or a list too
/// large. (A `Data` payload's limit is the frame's, checked once it is encoded.)
pub fn check_limits(msg: &PeerMessage) -> Result<(), WireError> {
    match msg {
        PeerMessage::ResyncData { data, .. } if data.len() > MAX_RESYNC_PAYLOAD => {
            Err(WireError::PayloadTooLarge {
                message: "ResyncData",
                len: data.len() as u64,
                max: MAX_RESYNC_PAYLOAD,
            })
        }
        PeerMessage::VerifyReply { digests, .. } | PeerMessage::ResyncChecksums { digests, .. }
            if digests.len() > MAX_VERIFY_DIGESTS =>
        {
            Err(WireError::TooMany {
                message: msg.name(),
                what: "digests",
                count: digests.len() as u64,
                max: MAX_VERIFY_DIGESTS,
            })
        }
        PeerMessage::SyncBitmap { runs, .. } if runs.len() > MAX_SYNC_BITMAP_RUNS => {
            Err(WireError::TooMany {
                message: "SyncBitmap",
                what: "runs",
                count: runs.len() as u64,
                max: MAX_SYNC_BITMAP_RUNS,
            })
        }
        _ => Ok(()),
    }
}

fn push_resync_data_fields(out: &mut impl FrameBuf, offset: u64) {
    out.put_u8(TAG_RESYNC_DATA);
    out.put_u64(offset);
}

/// Appends the first [`RESYNC_DATA_HEADER_LEN`] bytes of the frame of a `ResyncData` message
/// with a payload of `payload_len` bytes to `out`; the payload itself follows unchanged.
pub fn encode_resync_data_header_into(
    out: &mut impl FrameBuf,
    offset: u64,
    payload_len: usize,
) -> Result<(), WireError> {
    if payload_len > MAX_RESYNC_PAYLOAD {
        return Err(WireError::PayloadTooLarge {
            message: "ResyncData",
            len: payload_len as u64,
            max: MAX_RESYNC_PAYLOAD,
        });
    }
    // At most 1 MiB and 9 bytes: always a u32.
    out.put_u32((RESYNC_DATA_BODY_MIN + payload_len) as u32);
    push_resync_data_fields(out, offset);
    Ok(())
}

fn push_data_fields(out: &mut impl FrameBuf, header: &DataHeader) {
    out.put_u8(TAG_DATA);
    for value in [
        header.seq,
        header.epoch,
        header.request,
        header.offset,
        header.seen,
    ] {
        out.put_u64(value);
    }
}

/// The first [`DATA_HEADER_LEN`] bytes of the frame of a `Data` message with a payload of
/// `payload_len` bytes; the payload itself follows on the stream unchanged.
pub fn encode_data_header(header: &DataHeader, payload_len: usize) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(DATA_HEADER_LEN);
    encode_data_header_into(&mut out, header, payload_len)?;
    Ok(out)
}

/// Appends what [`encode_data_header`] returns to `out`.
pub fn encode_data_header_into(
    out: &mut impl FrameBuf,
    header: &DataHeader,
    payload_len: usize,
) -> Result<(), WireError> {
    let body_len = u32::try_from(DATA_BODY_MIN + payload_len)
        .ok()
        .filter(|_| payload_len <= MAX_DATA_PAYLOAD)
        .ok_or(WireError::FrameTooLarge {
            len: (DATA_BODY_MIN + payload_len) as u64,
        })?;
    out.put_u32(body_len);
    push_data_fields(out, header);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

struct Reader<'a> {
    message: &'static str,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(message: &'static str, rest: &'a [u8]) -> Self {
        Self { message, rest }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated {
                message: self.message,
                field,
                needed: n,
                available: self.rest.len(),
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, WireError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.bad_value(field, other)),
        }
    }

    fn enum_u8<T>(
        &mut self,
        field: &'static str,
        from: fn(u8) -> Option<T>,
    ) -> Result<T, WireError> {
        let code = self.u8(field)?;
        from(code).ok_or_else(|| self.bad_value(field, code))
    }

    /// A list: a u16 count (at most [`MAX_HISTORY`]), then that many items.
    fn list<T>(
        &mut self,
        field: &'static str,
        mut item: impl FnMut(&mut Self) -> Result<T, WireError>,
    ) -> Result<Vec<T>, WireError> {
        let count = self.u16(field)?;
        if count > MAX_HISTORY {
            return Err(WireError::BadValue {
                message: self.message,
                field,
                value: u64::from(count),
            });
        }
        (0..count).map(|_| item(self)).collect()
    }

    /// A `SyncBitmap`'s runs: a u32 count (at most [`MAX_SYNC_BITMAP_RUNS`], checked before
    /// anything is allocated), then (first block, count) pairs.
    fn runs(&mut self) -> Result<Vec<(u64, u64)>, WireError> {
        let count = self.u32("run count")?;
        if count as usize > MAX_SYNC_BITMAP_RUNS {
            return Err(WireError::TooMany {
                message: self.message,
                what: "runs",
                count: count.into(),
                max: MAX_SYNC_BITMAP_RUNS,
            });
        }
        (0..count)
            .map(|_| Ok((self.u64("run start")?, self.u64("run blocks")?)))
            .collect()
    }

    /// A `VerifyReply`'s digests: a u16 count (at most [`MAX_VERIFY_DIGESTS`], checked before
    /// anything is allocated), then 32 bytes each.
    fn digests(&mut self) -> Result<Vec<[u8; 32]>, WireError> {
        let count = self.u16("digest count")?;
        if usize::from(count) > MAX_VERIFY_DIGESTS {
            return Err(WireError::TooMany {
                message: self.message,
                what: "digests",
                count: count.into(),
                max: MAX_VERIFY_DIGESTS,
            });
        }
        (0..count)
            .map(|_| {
                let bytes = self.take("digest", 32)?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(bytes);
                Ok(digest)
            })
            .collect()
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let len = self.u16(field)?;
        let bytes = self.take(field, usize::from(len))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::BadUtf8 {
            message: self.message,
            field,
        })
    }

    fn bad_value(&self, field: &'static str, value: u8) -> WireError {
        WireError::BadValue {
            message: self.message,
            field,
            value: value.into(),
        }
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn finish(self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                message: self.message,
                count: self.rest.len(),
            })
        }
    }
}

fn data_fields(r: &mut Reader<'_>) -> Result<DataHeader, WireError> {
    Ok(DataHeader {
        seq: r.u64("seq")?,
        epoch: r.u64("epoch")?,
        request: r.u64("request")?,
        offset: r.u64("offset")?,
        seen: r.u64("seen")?,
    })
}

fn data_message(fields: DataHeader, data: Vec<u8>) -> PeerMessage {
    PeerMessage::Data {
        seq: fields.seq,
        epoch: fields.epoch,
        request: fields.request,
        offset: fields.offset,
        seen: fields.seen,
        data,
    }
}

fn check_resync_payload(len: usize) -> Result<(), WireError> {
    if len > MAX_RESYNC_PAYLOAD {
        return Err(WireError::PayloadTooLarge {
            message: "ResyncData",
            len: len as u64,
            max: MAX_RESYNC_PAYLOAD,
        });
    }
    Ok(())
}

/// A frame whose payload goes to a buffer of its own (`Data`, `ResyncData`), from its tag and
/// announced body length: the length of its head (prefix, tag and fixed fields) and of its
/// payload. `None` for any other frame, and for one too short for its fixed fields (which
/// decodes to a truncation error). A payload beyond its message's limit is refused here,
/// before anything is allocated for it.
fn payload_frame(tag: u8, body_len: usize) -> Result<Option<(usize, usize)>, WireError> {
    match tag {
        TAG_DATA if body_len >= DATA_BODY_MIN => {
            // MAX_FRAME_BODY, checked with the prefix, is the Data payload's limit.
            Ok(Some((4 + DATA_BODY_MIN, body_len - DATA_BODY_MIN)))
        }
        TAG_RESYNC_DATA if body_len >= RESYNC_DATA_BODY_MIN => {
            let payload = body_len - RESYNC_DATA_BODY_MIN;
            check_resync_payload(payload)?;
            Ok(Some((4 + RESYNC_DATA_BODY_MIN, payload)))
        }
        _ => Ok(None),
    }
}

fn decode_hello(rest: &[u8]) -> Result<PeerMessage, WireError> {
    let mut r = Reader::new("Hello", rest);
    let protocol_version = r.u32("protocol_version")?;
    let mut fields = || -> Result<PeerMessage, WireError> {
        let hello = PeerMessage::Hello {
            protocol_version,
            node_id: r.u8("node_id")?,
            node_name: r.string("node_name")?,
            resource: r.string("resource")?,
            size_bytes: r.u64("size_bytes")?,
            protocol: r.enum_u8("protocol", protocol_from)?,
            role: r.enum_u8("role", role_from)?,
            disk: r.enum_u8("disk", disk_from)?,
            current_uuid: r.u64("current_uuid")?,
            bitmap_uuid: r.u64("bitmap_uuid")?,
            history_uuids: r.list("history length", |r| r.u64("history uuid"))?,
            receiver_missing_bytes: r.u64("receiver_missing_bytes")?,
            discard_my_data: r.bool("discard_my_data")?,
            primary_before_split: r.bool("primary_before_split")?,
            resuming_initial_sync: r.bool("resuming_initial_sync")?,
            allow_two_primaries: r.bool("allow_two_primaries")?,
        };
        Ok(hello)
    };
    let hello = fields();
    match hello {
        // A peer of another version may lay out its Hello differently; saying so is more
        // useful than pointing at whichever field happened not to parse.
        Err(_) if protocol_version != PROTOCOL_VERSION => Err(WireError::UnsupportedVersion {
            theirs: protocol_version,
            ours: PROTOCOL_VERSION,
        }),
        Err(err) => Err(err),
        Ok(hello) => match r.finish() {
            Err(_) if protocol_version != PROTOCOL_VERSION => Err(WireError::UnsupportedVersion {
                theirs: protocol_version,
                ours: PROTOCOL_VERSION,
            }),
            Err(err) => Err(err),
            Ok(()) => Ok(hello),
        },
    }
}

/// Decodes a frame body: everything after the length prefix (tag and fields).
pub fn decode_frame_body(body: &[u8]) -> Result<PeerMessage, WireError> {
    if body.len() > MAX_FRAME_BODY {
        return Err(WireError::FrameTooLarge {
            len: body.len() as u64,
        });
    }
    let (&tag, rest) = body.split_first().ok_or(WireError::EmptyFrame)?;
    let (name, rest) = match tag {
        TAG_HELLO => return decode_hello(rest),
        TAG_DATA => {
            let mut r = Reader::new("Data", rest);
            let fields = data_fields(&mut r)?;
            return Ok(data_message(fields, r.rest().to_vec()));
        }
        TAG_RESYNC_DATA => {
            let mut r = Reader::new("ResyncData", rest);
            let offset = r.u64("offset")?;
            let data = r.rest();
            check_resync_payload(data.len())?;
            return Ok(PeerMessage::ResyncData {
                offset,
                data: data.to_vec(),
            });
        }
        TAG_REFUSED => ("Refused", rest),
        TAG_STATE => ("State", rest),
        TAG_DISCARD => ("Discard", rest),
        TAG_BARRIER => ("Barrier", rest),
        TAG_RECV_ACK => ("RecvAck", rest),
        TAG_WRITE_ACK => ("WriteAck", rest),
        TAG_NEG_ACK => ("NegAck", rest),
        TAG_BARRIER_ACK => ("BarrierAck", rest),
        TAG_PING => ("Ping", rest),
        TAG_PING_ACK => ("PingAck", rest),
        TAG_STATE_PREPARE => ("StatePrepare", rest),
        TAG_STATE_REPLY => ("StateReply", rest),
        TAG_STATE_COMMIT => ("StateCommit", rest),
        TAG_STATE_ABORT => ("StateAbort", rest),
        TAG_SKIP_INITIAL_SYNC => ("SkipInitialSync", rest),
        TAG_SUPERSEDED => ("Superseded", rest),
        TAG_RETRY_WRITE => ("RetryWrite", rest),
        TAG_SYNC_BITMAP => ("SyncBitmap", rest),
        TAG_RESYNC_REQUEST => ("ResyncRequest", rest),
        TAG_RESYNC_FAILED => ("ResyncFailed", rest),
        TAG_RESYNC_WRITTEN => ("ResyncWritten", rest),
        TAG_RESYNC_DONE => ("ResyncDone", rest),
        TAG_VERIFY_REQUEST => ("VerifyRequest", rest),
        TAG_RESYNC_CHECKSUMS => ("ResyncChecksums", rest),
        TAG_RESYNC_SAME => ("ResyncSame", rest),
        TAG_VERIFY_REPLY => ("VerifyReply", rest),
        other => return Err(WireError::UnknownTag(other)),
    };
    let mut r = Reader::new(name, rest);
    let msg = match tag {
        TAG_REFUSED => PeerMessage::Refused {
            reason: r.string("reason")?,
            standalone: r.bool("standalone")?,
        },
        TAG_STATE_PREPARE => PeerMessage::StatePrepare {
            transaction: r.u64("transaction")?,
            node: r.u8("node")?,
            outdate_peers: r.bool("outdate_peers")?,
        },
        TAG_STATE_REPLY => PeerMessage::StateReply {
            transaction: r.u64("transaction")?,
            refusal: if r.bool("refused")? {
                Some(r.string("refusal")?)
            } else {
                None
            },
        },
        TAG_STATE_COMMIT => PeerMessage::StateCommit {
            transaction: r.u64("transaction")?,
        },
        TAG_STATE_ABORT => PeerMessage::StateAbort {
            transaction: r.u64("transaction")?,
        },
        TAG_SKIP_INITIAL_SYNC => PeerMessage::SkipInitialSync {
            uuid: r.u64("uuid")?,
        },
        TAG_SUPERSEDED => PeerMessage::Superseded { seq: r.u64("seq")? },
        TAG_RETRY_WRITE => PeerMessage::RetryWrite {
            seq: r.u64("seq")?,
            after: r.u64("after")?,
        },
        TAG_STATE => PeerMessage::State {
            role: r.enum_u8("role", role_from)?,
            disk: r.enum_u8("disk", disk_from)?,
            current_uuid: r.u64("current_uuid")?,
            bitmap_uuids: r.list("bitmap count", |r| {
                Ok((r.u8("bitmap node")?, r.u64("bitmap uuid")?))
            })?,
            history_uuids: r.list("history length", |r| r.u64("history uuid"))?,
            receiver_missing_bytes: r.u64("receiver_missing_bytes")?,
        },
        TAG_DISCARD => PeerMessage::Discard {
            seq: r.u64("seq")?,
            epoch: r.u64("epoch")?,
            request: r.u64("request")?,
            offset: r.u64("offset")?,
            len: r.u64("len")?,
            seen: r.u64("seen")?,
        },
        TAG_BARRIER => PeerMessage::Barrier {
            seq: r.u64("seq")?,
            epoch: r.u64("epoch")?,
            writes: r.u32("writes")?,
            flush: r.bool("flush")?,
        },
        TAG_RECV_ACK => PeerMessage::RecvAck {
            up_to: r.u64("up_to")?,
        },
        TAG_WRITE_ACK => PeerMessage::WriteAck {
            up_to: r.u64("up_to")?,
        },
        TAG_NEG_ACK => PeerMessage::NegAck {
            request: r.u64("request")?,
            errno: r.i32("errno")?,
        },
        TAG_BARRIER_ACK => PeerMessage::BarrierAck {
            epoch: r.u64("epoch")?,
            writes: r.u32("writes")?,
        },
        TAG_PING => PeerMessage::Ping {
            nonce: r.u64("nonce")?,
        },
        TAG_PING_ACK => PeerMessage::PingAck {
            nonce: r.u64("nonce")?,
        },
        TAG_SYNC_BITMAP => PeerMessage::SyncBitmap {
            runs: r.runs()?,
            last: r.bool("last")?,
            from_source: r.bool("from_source")?,
        },
        TAG_RESYNC_REQUEST => PeerMessage::ResyncRequest {
            offset: r.u64("offset")?,
            len: r.u64("len")?,
        },
        TAG_RESYNC_FAILED => PeerMessage::ResyncFailed {
            offset: r.u64("offset")?,
            len: r.u64("len")?,
            errno: r.i32("errno")?,
        },
        TAG_RESYNC_WRITTEN => PeerMessage::ResyncWritten {
            offset: r.u64("offset")?,
            len: r.u64("len")?,
            ok: r.bool("ok")?,
        },
        TAG_RESYNC_CHECKSUMS => PeerMessage::ResyncChecksums {
            offset: r.u64("offset")?,
            len: r.u64("len")?,
            digests: r.digests()?,
        },
        TAG_RESYNC_SAME => PeerMessage::ResyncSame {
            offset: r.u64("offset")?,
            len: r.u64("len")?,
        },
        TAG_VERIFY_REQUEST => PeerMessage::VerifyRequest {
            offset: r.u64("offset")?,
            len: r.u64("len")?,
        },
        TAG_VERIFY_REPLY => PeerMessage::VerifyReply {
            offset: r.u64("offset")?,
            len: r.u64("len")?,
            errno: r.i32("errno")?,
            digests: r.digests()?,
        },
        TAG_RESYNC_DONE => PeerMessage::ResyncDone {
            moved_bytes: r.u64("moved_bytes")?,
        },
        other => return Err(WireError::UnknownTag(other)),
    };
    r.finish()?;
    Ok(msg)
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

/// Where frames are read from: quinn streams in production, byte slices in tests.
trait ByteSource {
    /// Fills `buf`, returning how many bytes arrived before the stream ended (`buf.len()` if
    /// it did not).
    async fn fill(&mut self, buf: &mut [u8]) -> Result<usize, WireError>;
}

impl ByteSource for quinn::RecvStream {
    async fn fill(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
        match self.read_exact(buf).await {
            Ok(()) => Ok(buf.len()),
            Err(quinn::ReadExactError::FinishedEarly(got)) => Ok(got),
            Err(quinn::ReadExactError::ReadError(err)) => Err(WireError::Read(err)),
        }
    }
}

async fn fill_exact<S: ByteSource>(
    source: &mut S,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), WireError> {
    let got = source.fill(buf).await?;
    if got == buf.len() {
        Ok(())
    } else {
        Err(WireError::StreamEnded {
            what,
            got,
            wanted: buf.len(),
        })
    }
}

/// The body length a frame's 4-byte prefix announces, refused when empty or beyond
/// [`MAX_FRAME_BODY`].
fn frame_body_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix);
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= MAX_FRAME_BODY)
        .ok_or(WireError::FrameTooLarge { len: len.into() })?;
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    Ok(len)
}

async fn read_frame<S: ByteSource>(source: &mut S) -> Result<Option<PeerMessage>, WireError> {
    let mut prefix = [0; 4];
    match source.fill(&mut prefix).await? {
        0 => return Ok(None),
        4 => {}
        got => {
            return Err(WireError::StreamEnded {
                what: "frame length",
                got,
                wanted: 4,
            })
        }
    }
    // Checked before allocating: the length is the peer's word.
    let len = frame_body_len(prefix)?;

    let mut tag = [0; 1];
    fill_exact(source, &mut tag, "message tag").await?;
    // Refuses a ResyncData payload beyond its limit before its buffer is allocated.
    payload_frame(tag[0], len)?;
    if tag[0] == TAG_DATA && len >= DATA_BODY_MIN {
        // The payload is read straight into its own buffer instead of being copied out of a
        // frame buffer: this is the bulk of all replication traffic.
        let mut fixed = [0; DATA_FIELDS_LEN];
        fill_exact(source, &mut fixed, "Data header").await?;
        let fields = data_fields(&mut Reader::new("Data", &fixed))?;
        let mut data = vec![0; len - DATA_BODY_MIN];
        fill_exact(source, &mut data, "Data payload").await?;
        return Ok(Some(data_message(fields, data)));
    }
    let mut body = vec![0; len];
    body[0] = tag[0];
    fill_exact(source, &mut body[1..], "frame body").await?;
    decode_frame_body(&body).map(Some)
}

/// Reads the next message; `None` when the peer finished the stream between frames.
///
/// Not cancel-safe: dropping the future mid-frame loses the stream's framing, so read from a
/// dedicated task or loop rather than inside `select!` with other branches.
pub async fn read_message(
    stream: &mut quinn::RecvStream,
) -> Result<Option<PeerMessage>, WireError> {
    read_frame(stream).await
}

/// Writes `msg` as one frame (a `Data` or `ResyncData` payload is written without an
/// intermediate copy).
pub async fn write_message(
    stream: &mut quinn::SendStream,
    msg: &PeerMessage,
) -> Result<(), WireError> {
    check_limits(msg)?;
    match msg {
        PeerMessage::Data {
            seq,
            epoch,
            request,
            offset,
            seen,
            data,
        } => {
            let header = DataHeader {
                seq: *seq,
                epoch: *epoch,
                request: *request,
                offset: *offset,
                seen: *seen,
            };
            return write_data(stream, &header, data).await;
        }
        PeerMessage::ResyncData { offset, data } => {
            let mut header = Vec::with_capacity(RESYNC_DATA_HEADER_LEN);
            encode_resync_data_header_into(&mut header, *offset, data.len())?;
            stream.write_all(&header).await?;
            stream.write_all(data).await?;
            return Ok(());
        }
        _ => {}
    }
    let frame = encode(msg);
    if frame.len() - 4 > MAX_FRAME_BODY {
        return Err(WireError::FrameTooLarge {
            len: (frame.len() - 4) as u64,
        });
    }
    stream.write_all(&frame).await?;
    Ok(())
}

/// Writes a `Data` message from a borrowed payload.
pub async fn write_data(
    stream: &mut quinn::SendStream,
    header: &DataHeader,
    payload: &[u8],
) -> Result<(), WireError> {
    let header = encode_data_header(header, payload.len())?;
    stream.write_all(&header).await?;
    stream.write_all(payload).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Batches: many frames per stream write, many frames per stream read
// ---------------------------------------------------------------------------------------------

/// Payloads at least this large travel as chunks of their own, without a copy; smaller ones are
/// copied into the batch's buffer. quinn keeps every chunk until the peer acknowledged it and
/// finds a packet's bytes by walking its chunks from the oldest, so a window full of 4 KiB
/// chunks would cost more than copying them does.
pub const ZERO_COPY_MIN: usize = 64 << 10;

/// Frames encoded for one stream write.
pub struct FrameBatch {
    /// Frames (and small payloads) not yet cut into a chunk.
    buf: BytesMut,
    chunks: Vec<Bytes>,
    bytes: usize,
    frames: usize,
}

impl Default for FrameBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBatch {
    pub fn new() -> Self {
        FrameBatch {
            buf: BytesMut::with_capacity(64 << 10),
            chunks: Vec::new(),
            bytes: 0,
            frames: 0,
        }
    }

    /// Bytes in the batch.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Adds `msg` as one frame (a `Data` or `ResyncData` payload is copied: use
    /// [`Self::push_data`] or [`Self::push_resync_data`] to share a large one).
    pub fn push_message(&mut self, msg: &PeerMessage) -> Result<(), WireError> {
        check_limits(msg)?;
        let start = self.buf.len();
        encode_into(&mut self.buf, msg);
        let body = self.buf.len() - start - 4;
        if body > MAX_FRAME_BODY {
            self.buf.truncate(start);
            return Err(WireError::FrameTooLarge { len: body as u64 });
        }
        self.bytes += body + 4;
        self.frames += 1;
        Ok(())
    }

    /// Adds a `Data` frame; a payload of [`ZERO_COPY_MIN`] bytes or more is kept by reference
    /// (and lives until the peer acknowledged it at the QUIC level).
    pub fn push_data<P>(&mut self, header: &DataHeader, payload: P) -> Result<(), WireError>
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        let len = payload.as_ref().len();
        encode_data_header_into(&mut self.buf, header, len)?;
        self.push_payload(DATA_HEADER_LEN, payload);
        Ok(())
    }

    /// Adds a `ResyncData` frame; its payload is shared or copied as [`Self::push_data`] does.
    pub fn push_resync_data<P>(&mut self, offset: u64, payload: P) -> Result<(), WireError>
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        let len = payload.as_ref().len();
        encode_resync_data_header_into(&mut self.buf, offset, len)?;
        self.push_payload(RESYNC_DATA_HEADER_LEN, payload);
        Ok(())
    }

    /// The payload after the header just encoded: a chunk of its own when large, else copied.
    fn push_payload<P>(&mut self, header_len: usize, payload: P)
    where
        P: AsRef<[u8]> + Send + 'static,
    {
        let len = payload.as_ref().len();
        if len >= ZERO_COPY_MIN {
            self.chunks.push(self.buf.split().freeze());
            self.chunks.push(Bytes::from_owner(payload));
        } else {
            self.buf.put_slice(payload.as_ref());
        }
        self.bytes += header_len + len;
        self.frames += 1;
    }

    /// Moves the batch into `out` as chunks for one `write_all_chunks`, leaving it empty. Its
    /// buffer is reused once quinn released the previous batch's bytes.
    pub fn take_chunks(&mut self, out: &mut Vec<Bytes>) {
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        out.append(&mut self.chunks);
        self.bytes = 0;
        self.frames = 0;
    }
}

/// Writes a whole batch with one stream write (one wake-up of the connection's driver).
pub async fn write_batch(
    stream: &mut quinn::SendStream,
    batch: &mut FrameBatch,
    chunks: &mut Vec<Bytes>,
) -> Result<(), WireError> {
    batch.take_chunks(chunks);
    let result = stream.write_all_chunks(chunks).await;
    chunks.clear();
    result.map_err(WireError::from)
}

/// The fixed fields of a `Data` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub seq: u64,
    pub epoch: u64,
    pub request: u64,
    pub offset: u64,
    /// See [`PeerMessage::Data`].
    pub seen: u64,
}

/// The fixed fields of a frame whose payload goes to a buffer of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadHeader {
    Data(DataHeader),
    ResyncData { offset: u64 },
}

impl PayloadHeader {
    /// The message's name, for protocol errors.
    pub fn name(&self) -> &'static str {
        match self {
            PayloadHeader::Data(_) => "Data",
            PayloadHeader::ResyncData { .. } => "ResyncData",
        }
    }

    /// The stream the message must arrive on.
    pub fn stream(&self) -> StreamKind {
        match self {
            PayloadHeader::Data(_) => StreamKind::Data,
            PayloadHeader::ResyncData { .. } => StreamKind::Resync,
        }
    }
}

/// What [`FrameParser::next`] found.
#[derive(Debug)]
pub enum Parsed<B> {
    /// Any message but `Data` and `ResyncData`.
    Message(PeerMessage),
    /// The header of a `Data` or `ResyncData` frame arrived: the parser needs a buffer of
    /// exactly `len` bytes for the payload ([`FrameParser::provide`]) before it takes more
    /// input. `header` says which message it is for, so that a receiver can refuse it before
    /// it spends a buffer on it.
    NeedPayload { header: PayloadHeader, len: usize },
    /// A whole `Data` frame, its payload in the buffer that was provided.
    Data { header: DataHeader, payload: B },
    /// A whole `ResyncData` frame, its payload in the buffer that was provided.
    ResyncData { offset: u64, payload: B },
}

enum ParseState<B> {
    Head,
    AwaitPayload {
        header: PayloadHeader,
        len: usize,
    },
    Payload {
        header: PayloadHeader,
        buf: B,
        filled: usize,
        len: usize,
    },
}

/// Parses frames out of chunks of a stream as they come, whatever their boundaries: a stream
/// is read in large chunks, and every whole frame in them is handled in one go. Small frames
/// are decoded in place (copied only when a chunk boundary splits them); a `Data` payload is
/// copied once, into a buffer of the caller's choosing (aligned, counted against a budget).
///
/// A malformed frame is an error, never a panic; after an error the stream's framing is lost
/// and the parser must not be used again.
pub struct FrameParser<B> {
    /// The start of a frame split across chunks.
    partial: Vec<u8>,
    state: ParseState<B>,
}

impl<B: AsMut<[u8]>> Default for FrameParser<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: AsMut<[u8]>> FrameParser<B> {
    pub fn new() -> Self {
        FrameParser {
            partial: Vec::new(),
            state: ParseState::Head,
        }
    }

    /// The next item from `input` (advanced past what was used); `None` once `input` is used
    /// up without completing one.
    pub fn next(&mut self, input: &mut &[u8]) -> Result<Option<Parsed<B>>, WireError> {
        match std::mem::replace(&mut self.state, ParseState::Head) {
            ParseState::Head => self.head(input),
            ParseState::AwaitPayload { header, len } => {
                self.state = ParseState::AwaitPayload { header, len };
                Ok(Some(Parsed::NeedPayload { header, len }))
            }
            ParseState::Payload {
                header,
                mut buf,
                mut filled,
                len,
            } => {
                // `provide` checked that the buffer is exactly `len` bytes.
                let target = &mut buf.as_mut()[filled..len];
                let n = target.len().min(input.len());
                target[..n].copy_from_slice(&input[..n]);
                *input = &input[n..];
                filled += n;
                if filled < len {
                    self.state = ParseState::Payload {
                        header,
                        buf,
                        filled,
                        len,
                    };
                    return Ok(None);
                }
                Ok(Some(match header {
                    PayloadHeader::Data(header) => Parsed::Data {
                        header,
                        payload: buf,
                    },
                    PayloadHeader::ResyncData { offset } => Parsed::ResyncData {
                        offset,
                        payload: buf,
                    },
                }))
            }
        }
    }

    /// Gives the parser the buffer for the payload it asked for with [`Parsed::NeedPayload`].
    pub fn provide(&mut self, mut buf: B) -> Result<(), WireError> {
        let got = buf.as_mut().len();
        match std::mem::replace(&mut self.state, ParseState::Head) {
            ParseState::AwaitPayload { header, len } if got == len => {
                self.state = ParseState::Payload {
                    header,
                    buf,
                    filled: 0,
                    len,
                };
                Ok(())
            }
            other => {
                let wanted = match &other {
                    ParseState::AwaitPayload { len, .. } => Some(*len),
                    _ => None,
                };
                self.state = other;
                Err(WireError::UnexpectedPayloadBuffer { wanted, got })
            }
        }
    }

    /// The stream ended: an error unless that was between frames.
    pub fn finish(&self) -> Result<(), WireError> {
        let (what, got, wanted) = match &self.state {
            ParseState::Head if self.partial.is_empty() => return Ok(()),
            ParseState::Head if self.partial.len() < 4 => ("frame length", self.partial.len(), 4),
            ParseState::Head => {
                let len = u32::from_be_bytes([
                    self.partial[0],
                    self.partial[1],
                    self.partial[2],
                    self.partial[3],
                ]) as usize;
                ("frame", self.partial.len(), 4 + len)
            }
            ParseState::AwaitPayload { header, len } => (payload_what(header), 0, *len),
            ParseState::Payload {
                header,
                filled,
                len,
                ..
            } => (payload_what(header), *filled, *len),
        };
        Err(WireError::StreamEnded { what, got, wanted })
    }

    fn head(&mut self, input: &mut &[u8]) -> Result<Option<Parsed<B>>, WireError> {
        if !self.gather(input, 4) {
            return Ok(None);
        }
        let view = self.view(input);
        // Checked before anything is buffered: the length is the peer's word.
        let len = frame_body_len([view[0], view[1], view[2], view[3]])?;
        if !self.gather(input, 5) {
            return Ok(None);
        }
        let tag = self.view(input)[4];
        // A payload frame's head is its fixed fields; the payload goes straight to its buffer.
        let payload = payload_frame(tag, len)?;
        let head_len = payload.map_or(4 + len, |(head_len, _)| head_len);
        if !self.gather(input, head_len) {
            return Ok(None);
        }
        let body = &self.view(input)[4..head_len];
        let parsed = match payload {
            Some((_, len)) => {
                let header = if tag == TAG_DATA {
                    PayloadHeader::Data(data_fields(&mut Reader::new("Data", &body[1..]))?)
                } else {
                    PayloadHeader::ResyncData {
                        offset: Reader::new("ResyncData", &body[1..]).u64("offset")?,
                    }
                };
                self.state = ParseState::AwaitPayload { header, len };
                Parsed::NeedPayload { header, len }
            }
            None => Parsed::Message(decode_frame_body(body)?),
        };
        if self.partial.is_empty() {
            *input = &input[head_len..];
        } else {
            self.partial.clear();
        }
        Ok(Some(parsed))
    }

    /// Makes the frame's first `need` bytes readable through [`Self::view`]: in place when
    /// `input` holds them and nothing is buffered, else collected in `partial`. False when
    /// `input` ran out first (all of it is then in `partial`).
    fn gather(&mut self, input: &mut &[u8], need: usize) -> bool {
        if self.partial.is_empty() && input.len() >= need {
            return true;
        }
        let take = need.saturating_sub(self.partial.len()).min(input.len());
        self.partial.extend_from_slice(&input[..take]);
        *input = &input[take..];
        self.partial.len() >= need
    }

    fn view<'s>(&'s self, input: &'s [u8]) -> &'s [u8] {
        if self.partial.is_empty() {
            input
        } else {
            &self.partial
        }
    }
}

fn payload_what(header: &PayloadHeader) -> &'static str {
    match header {
        PayloadHeader::Data(_) => "Data payload",
        PayloadHeader::ResyncData { .. } => "ResyncData payload",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic xorshift64 so failures reproduce without a `rand` seed dance.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// In-memory stream for the reader: hands out its bytes, then reports the end.
    struct Slice<'a>(&'a [u8]);

    impl ByteSource for Slice<'_> {
        async fn fill(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn samples() -> Vec<PeerMessage> {
        vec![
            PeerMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: 31,
                node_name: "alpha".into(),
                resource: "r0-ünïcode".into(),
                size_bytes: 1 << 40,
                protocol: ReplicationProtocol::C,
                role: Role::Secondary,
                disk: DiskState::UpToDate,
                current_uuid: 4,
                bitmap_uuid: 0,
                history_uuids: vec![8, 16],
                receiver_missing_bytes: 0,
                discard_my_data: false,
                primary_before_split: true,
                resuming_initial_sync: false,
                allow_two_primaries: true,
            },
            PeerMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                node_id: 0,
                node_name: String::new(),
                resource: "r".into(),
                size_bytes: 0,
                protocol: ReplicationProtocol::A,
                role: Role::Secondary,
                disk: DiskState::UpToDate,
                current_uuid: 4,
                bitmap_uuid: 0,
                history_uuids: vec![8, 16],
                receiver_missing_bytes: 0,
                discard_my_data: false,
                primary_before_split: true,
                resuming_initial_sync: false,
                allow_two_primaries: true,
            },
            PeerMessage::Refused {
                reason: "size mismatch: 1 GiB here, 2 GiB there".into(),
                standalone: false,
            },
            PeerMessage::Refused {
                reason: "split brain".into(),
                standalone: true,
            },
            PeerMessage::StatePrepare {
                transaction: u64::MAX,
                node: 7,
                outdate_peers: true,
            },
            PeerMessage::StateReply {
                transaction: 3,
                refusal: Some("alpha is becoming Primary".into()),
            },
            PeerMessage::StateReply {
                transaction: 3,
                refusal: None,
            },
            PeerMessage::StateCommit { transaction: 9 },
            PeerMessage::StateAbort { transaction: 10 },
            PeerMessage::SkipInitialSync { uuid: 0x1234_5678 },
            PeerMessage::Superseded { seq: 77 },
            PeerMessage::RetryWrite {
                seq: 78,
                after: u64::MAX,
            },
            PeerMessage::State {
                role: Role::Primary,
                disk: DiskState::UpToDate,
                current_uuid: u64::MAX,
                bitmap_uuids: vec![(2, 99), (31, u64::MAX)],
                history_uuids: vec![1, 2, 3],
                receiver_missing_bytes: 7,
            },
            PeerMessage::State {
                role: Role::Secondary,
                disk: DiskState::Diskless,
                current_uuid: 0,
                bitmap_uuids: Vec::new(),
                history_uuids: Vec::new(),
                receiver_missing_bytes: 0,
            },
            PeerMessage::Data {
                seq: 1,
                epoch: 2,
                request: 3,
                offset: 4096,
                seen: 77,
                data: (0..4096u32).map(|i| (i * 7) as u8).collect(),
            },
            PeerMessage::Data {
                seq: u64::MAX,
                epoch: 0,
                request: 9,
                offset: 0,
                seen: 0,
                data: Vec::new(),
            },
            PeerMessage::Discard {
                seq: 5,
                epoch: 6,
                request: 7,
                offset: 8,
                seen: u64::MAX,
                len: 1 << 20,
            },
            PeerMessage::Barrier {
                seq: 9,
                epoch: 10,
                writes: 11,
                flush: true,
            },
            PeerMessage::Barrier {
                seq: 0,
                epoch: 1,
                writes: 0,
                flush: false,
            },
            PeerMessage::RecvAck { up_to: 12 },
            PeerMessage::WriteAck { up_to: 13 },
            PeerMessage::NegAck {
                request: 14,
                errno: -5,
            },
            PeerMessage::NegAck {
                request: 15,
                errno: i32::MAX,
            },
            PeerMessage::BarrierAck {
                epoch: 16,
                writes: u32::MAX,
            },
            PeerMessage::Ping { nonce: 17 },
            PeerMessage::PingAck { nonce: 18 },
            PeerMessage::SyncBitmap {
                runs: vec![(0, 1), (7, 300), (u64::MAX - 1, 1)],
                last: false,
                from_source: true,
            },
            PeerMessage::SyncBitmap {
                runs: Vec::new(),
                last: true,
                from_source: false,
            },
            PeerMessage::ResyncRequest {
                offset: 1 << 30,
                len: 256 << 10,
            },
            PeerMessage::ResyncData {
                offset: 8192,
                data: (0..8192u32).map(|i| (i * 13) as u8).collect(),
            },
            PeerMessage::ResyncData {
                offset: u64::MAX,
                data: Vec::new(),
            },
            PeerMessage::ResyncFailed {
                offset: 4096,
                len: 4096,
                errno: 5,
            },
            PeerMessage::ResyncWritten {
                offset: 0,
                len: 1 << 20,
                ok: true,
            },
            PeerMessage::ResyncWritten {
                offset: u64::MAX,
                len: 0,
                ok: false,
            },
            PeerMessage::ResyncDone {
                moved_bytes: 1 << 33,
            },
            PeerMessage::VerifyRequest {
                offset: 1 << 20,
                len: 256 << 10,
            },
            PeerMessage::ResyncChecksums {
                offset: 4096,
                len: 8192,
                digests: vec![[1; 32], [2; 32]],
            },
            PeerMessage::ResyncSame {
                offset: 4096,
                len: 8192,
            },
            PeerMessage::VerifyReply {
                offset: 1 << 20,
                len: 8192,
                digests: vec![[7; 32], [9; 32]],
                errno: 0,
            },
            PeerMessage::VerifyReply {
                offset: 0,
                len: 4096,
                digests: Vec::new(),
                errno: 5,
            },
        ]
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<PeerMessage>, WireError> {
        let mut source = Slice(bytes);
        let mut out = Vec::new();
        futures::executor::block_on(async {
            while let Some(msg) = read_frame(&mut source).await? {
                out.push(msg);
            }
            Ok(out)
        })
    }

    /// Runs a stream, delivered as `chunks`, through a [`FrameParser`] with plain vectors as
    /// payload buffers, and gives back the messages (Data rebuilt as the core's message).
    fn parse_chunks(chunks: &[&[u8]]) -> Result<Vec<PeerMessage>, WireError> {
        let mut parser = FrameParser::<Vec<u8>>::new();
        let mut out = Vec::new();
        for chunk in chunks {
            let mut rest = *chunk;
            while let Some(parsed) = parser.next(&mut rest)? {
                match parsed {
                    Parsed::Message(message) => {
                        assert!(!matches!(
                            message,
                            PeerMessage::Data { .. } | PeerMessage::ResyncData { .. }
                        ));
                        out.push(message)
                    }
                    Parsed::NeedPayload { len, .. } => parser.provide(vec![0; len])?,
                    Parsed::Data { header, payload } => out.push(PeerMessage::Data {
                        seq: header.seq,
                        epoch: header.epoch,
                        request: header.request,
                        offset: header.offset,
                        seen: header.seen,
                        data: payload,
                    }),
                    Parsed::ResyncData { offset, payload } => out.push(PeerMessage::ResyncData {
                        offset,
                        data: payload,
                    }),
                }
            }
            assert!(rest.is_empty(), "the parser left input behind");
        }
        parser.finish()?;
        Ok(out)
    }

    /// A batch as a sender writes it: small messages and payloads of every size class,
    /// including one large enough to travel as its own chunk.
    fn batch_messages() -> Vec<PeerMessage> {
        let mut msgs = samples();
        for (seq, len) in [
            (100, 4096),
            (101, 0),
            (102, 12288),
            (103, ZERO_COPY_MIN + 4096),
        ] {
            msgs.push(PeerMessage::Data {
                seq,
                epoch: 3,
                request: seq * 2,
                offset: seq * 4096,
                seen: 0,
                data: (0..len).map(|i| (i * 31 + seq as usize) as u8).collect(),
            });
            msgs.push(PeerMessage::Ping { nonce: seq });
            msgs.push(PeerMessage::ResyncData {
                offset: seq << 20,
                data: (0..len).map(|i| (i * 17 + seq as usize) as u8).collect(),
            });
        }
        msgs
    }

    fn encode_batch(msgs: &[PeerMessage]) -> Vec<Bytes> {
        let mut batch = FrameBatch::new();
        for msg in msgs {
            match msg {
                PeerMessage::Data {
                    seq,
                    epoch,
                    request,
                    offset,
                    seen,
                    data,
                } => batch
                    .push_data(
                        &DataHeader {
                            seq: *seq,
                            epoch: *epoch,
                            request: *request,
                            offset: *offset,
                            seen: *seen,
                        },
                        data.clone(),
                    )
                    .unwrap(),
                PeerMessage::ResyncData { offset, data } => {
                    batch.push_resync_data(*offset, data.clone()).unwrap()
                }
                other => batch.push_message(other).unwrap(),
            }
        }
        assert_eq!(batch.frames(), msgs.len());
        let expected_len: usize = msgs.iter().map(|m| encode(m).len()).sum();
        assert_eq!(batch.len(), expected_len);
        let mut chunks = Vec::new();
        batch.take_chunks(&mut chunks);
        assert!(batch.is_empty());
        chunks
    }

    #[test]
    fn a_batch_is_the_frames_back_to_back() {
        let msgs = batch_messages();
        let chunks = encode_batch(&msgs);
        // The large payload is shared, not copied: the batch is more than one chunk.
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let expected: Vec<u8> = msgs.iter().flat_map(encode).collect();
        assert_eq!(joined, expected);
        // The next batch starts empty and reuses the encoder.
        let again = encode_batch(&msgs[..2]);
        let joined: Vec<u8> = again.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(joined, [encode(&msgs[0]), encode(&msgs[1])].concat());
    }

    #[test]
    fn an_oversized_payload_is_refused_and_leaves_the_batch_intact() {
        let mut batch = FrameBatch::new();
        batch.push_message(&PeerMessage::Ping { nonce: 1 }).unwrap();
        let err = batch
            .push_data(&header(1, 2, 3, 4), vec![0u8; MAX_DATA_PAYLOAD + 1])
            .unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
        let err = batch
            .push_message(&PeerMessage::Data {
                seq: 1,
                epoch: 1,
                request: 1,
                offset: 0,
                seen: 0,
                data: vec![0u8; MAX_DATA_PAYLOAD + 1],
            })
            .unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
        let mut chunks = Vec::new();
        batch.take_chunks(&mut chunks);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(joined, encode(&PeerMessage::Ping { nonce: 1 }));
    }

    #[test]
    fn a_batch_split_anywhere_parses_to_the_same_messages() {
        let msgs = batch_messages();
        let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
        assert_eq!(parse_chunks(&[&stream]).unwrap(), msgs);
        // Two chunks, split at every byte.
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(parse_chunks(&[a, b]).unwrap(), msgs, "split at {cut}");
        }
        // Byte by byte, and in uneven pieces.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse_chunks(&bytes).unwrap(), msgs);
        for size in [3, 41, 1200, 4097] {
            let pieces: Vec<&[u8]> = stream.chunks(size).collect();
            assert_eq!(parse_chunks(&pieces).unwrap(), msgs, "chunks of {size}");
        }
        // As the sender's chunks, the way quinn may hand them over.
        let chunks = encode_batch(&msgs);
        let chunks: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        assert_eq!(parse_chunks(&chunks).unwrap(), msgs);
    }

    #[test]
    fn a_batch_cut_short_is_an_error() {
        let msgs = batch_messages();
        let frames: Vec<Vec<u8>> = msgs.iter().map(encode).collect();
        let stream = frames.concat();
        let mut boundaries = vec![0];
        for frame in &frames {
            boundaries.push(boundaries.last().unwrap() + frame.len());
        }
        for cut in 0..stream.len() {
            let (a, b) = stream[..cut].split_at(cut / 2);
            let result = parse_chunks(&[a, b]);
            match boundaries.iter().position(|&at| at == cut) {
                // Between frames: the messages so far, and a clean end.
                Some(whole) => assert_eq!(result.unwrap(), msgs[..whole], "cut at {cut}"),
                None => assert!(
                    matches!(result, Err(WireError::StreamEnded { .. })),
                    "cut at {cut}: {result:?}"
                ),
            }
        }
    }

    #[test]
    fn bad_frames_in_a_batch_are_errors() {
        let good = encode(&PeerMessage::Ping { nonce: 1 });
        let cases: Vec<(Vec<u8>, &str)> = vec![
            ([good.clone(), vec![0, 0, 0, 0]].concat(), "empty frame"),
            (
                [
                    good.clone(),
                    ((MAX_FRAME_BODY + 1) as u32).to_be_bytes().to_vec(),
                ]
                .concat(),
                "exceeds the maximum",
            ),
            (
                [good.clone(), vec![0, 0, 0, 2, 99, 0]].concat(),
                "unknown message tag 99",
            ),
            (
                // A Data frame too short for its fixed fields.
                [good.clone(), vec![0, 0, 0, 3, TAG_DATA, 0, 0]].concat(),
                "truncated Data message",
            ),
            (
                [
                    good.clone(),
                    vec![0, 0, 0, 10, TAG_PING, 0, 0, 0, 0, 0, 0, 0, 0, 7],
                ]
                .concat(),
                "unexpected bytes",
            ),
        ];
        for (stream, expected) in cases {
            for cut in 0..=stream.len() {
                let (a, b) = stream.split_at(cut);
                let err = parse_chunks(&[a, b]).unwrap_err();
                assert!(err.to_string().contains(expected), "{err}");
            }
        }
        // A buffer of the wrong size, or one nobody asked for, is refused.
        let mut parser = FrameParser::<Vec<u8>>::new();
        assert!(parser.provide(vec![0; 4]).is_err());
        let frame = encode(&PeerMessage::Data {
            seq: 1,
            epoch: 1,
            request: 1,
            offset: 0,
            seen: 0,
            data: vec![9; 8],
        });
        let mut input = &frame[..];
        assert!(matches!(
            parser.next(&mut input).unwrap(),
            Some(Parsed::NeedPayload {
                header: PayloadHeader::Data(DataHeader { seq: 1, .. }),
                len: 8
            })
        ));
        // Asking again without a buffer repeats the request and takes no input.
        assert!(matches!(
            parser.next(&mut input).unwrap(),
            Some(Parsed::NeedPayload { len: 8, .. })
        ));
        assert_eq!(input.len(), 8);
        assert!(matches!(
            parser.provide(vec![0; 7]),
            Err(WireError::UnexpectedPayloadBuffer {
                wanted: Some(8),
                got: 7
            })
        ));
        parser.provide(vec![0; 8]).unwrap();
        match parser.next(&mut input).unwrap() {
            Some(Parsed::Data { payload, .. }) => assert_eq!(payload, vec![9; 8]),
            other => panic!("{other:?}"),
        }
        parser.finish().unwrap();
    }

    #[test]
    fn garbage_batches_never_panic() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let valid: Vec<u8> = batch_messages()[..6].iter().flat_map(encode).collect();
        for _ in 0..3_000 {
            let mut stream = valid.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(stream.len() as u64) as usize;
                stream[at] ^= (rng.below(255) + 1) as u8;
            }
            let cut = rng.below(stream.len() as u64 + 1) as usize;
            let (a, b) = stream.split_at(cut);
            // Decoded or refused: the property is that nothing panics.
            let _ = parse_chunks(&[a, b]);
        }
        for _ in 0..2_000 {
            let len = rng.below(400) as usize;
            let mut bytes = rng.bytes(len);
            if bytes.len() >= 5 && rng.below(2) == 0 {
                let small = rng.below(80) as u32;
                bytes[..4].copy_from_slice(&small.to_be_bytes());
                bytes[4] = rng.below(30) as u8;
            }
            let _ = parse_chunks(&[&bytes]);
        }
    }

    #[test]
    fn every_variant_round_trips() {
        let all_states = [
            DiskState::Diskless,
            DiskState::Attaching,
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::DUnknown,
            DiskState::Consistent,
            DiskState::UpToDate,
        ];
        let mut msgs = samples();
        msgs.extend(all_states.into_iter().map(|disk| PeerMessage::State {
            role: Role::Secondary,
            disk,
            current_uuid: 42,
            bitmap_uuids: vec![(1, 8)],
            history_uuids: vec![6],
            receiver_missing_bytes: u64::MAX,
        }));
        msgs.push(PeerMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: 1,
            node_name: "beta".into(),
            resource: "r1".into(),
            size_bytes: 4096,
            protocol: ReplicationProtocol::B,
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            current_uuid: 4,
            bitmap_uuid: 0,
            history_uuids: vec![8, 16],
            receiver_missing_bytes: 0,
            discard_my_data: false,
            primary_before_split: false,
            resuming_initial_sync: true,
            allow_two_primaries: false,
        });
        let mut stream = Vec::new();
        for msg in &msgs {
            let frame = encode(msg);
            let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            assert_eq!(len, frame.len() - 4, "{msg:?}");
            assert_eq!(&decode_frame_body(&frame[4..]).unwrap(), msg);
            stream.extend_from_slice(&frame);
        }
        // The same through the stream reader, all frames back to back.
        assert_eq!(read_all(&stream).unwrap(), msgs);
    }

    #[test]
    fn data_header_matches_encode() {
        let payload = vec![0xA5; 1000];
        let msg = PeerMessage::Data {
            seq: 1,
            epoch: 2,
            request: 3,
            offset: 4,
            seen: 0,
            data: payload.clone(),
        };
        let mut framed = encode_data_header(&header(1, 2, 3, 4), payload.len()).unwrap();
        assert_eq!(framed.len(), DATA_HEADER_LEN);
        framed.extend_from_slice(&payload);
        assert_eq!(framed, encode(&msg));
        assert!(matches!(
            encode_data_header(&header(1, 2, 3, 4), MAX_DATA_PAYLOAD + 1),
            Err(WireError::FrameTooLarge { .. })
        ));
        encode_data_header(&header(1, 2, 3, 4), MAX_DATA_PAYLOAD).unwrap();
    }

    fn header(seq: u64, epoch: u64, request: u64, offset: u64) -> DataHeader {
        DataHeader {
            seq,
            epoch,
            request,
            offset,
            seen: 0,
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for msg in samples() {
            let frame = encode(&msg);
            let body = &frame[4..];
            for cut in 0..body.len() {
                // Data ends in its payload, so cutting into the payload is a shorter valid
                // message; every cut into the fixed fields must fail.
                if matches!(msg, PeerMessage::Data { .. }) && cut >= DATA_BODY_MIN
                    || matches!(msg, PeerMessage::ResyncData { .. }) && cut >= RESYNC_DATA_BODY_MIN
                {
                    continue;
                }
                let result = decode_frame_body(&body[..cut]);
                assert!(result.is_err(), "{msg:?} cut at {cut} decoded: {result:?}");
            }
            // On a stream every cut (inside the length prefix too) is an error.
            for cut in 1..frame.len() {
                let result = read_all(&frame[..cut]);
                assert!(
                    matches!(result, Err(WireError::StreamEnded { .. })),
                    "{msg:?} stream cut at {cut}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_and_bad_values_are_errors() {
        let mut body = encode(&PeerMessage::Ping { nonce: 1 })[4..].to_vec();
        body.push(0);
        let err = decode_frame_body(&body).unwrap_err();
        assert!(
            matches!(err, WireError::TrailingBytes { count: 1, .. }),
            "{err}"
        );

        let mut body = encode(&PeerMessage::Barrier {
            seq: 1,
            epoch: 1,
            writes: 1,
            flush: true,
        })[4..]
            .to_vec();
        *body.last_mut().unwrap() = 2;
        let err = decode_frame_body(&body).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Barrier message: field `flush` has invalid value 2"
        );

        let mut body = encode(&PeerMessage::State {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            current_uuid: 1,
            bitmap_uuids: Vec::new(),
            history_uuids: Vec::new(),
            receiver_missing_bytes: 0,
        })[4..]
            .to_vec();
        body[2] = 7;
        let err = decode_frame_body(&body).unwrap_err();
        assert!(
            err.to_string().contains("`disk` has invalid value 7"),
            "{err}"
        );

        let mut body = encode(&PeerMessage::Refused {
            standalone: false,
            reason: "ab".into(),
        })[4..]
            .to_vec();
        body[3] = 0xFF;
        let err = decode_frame_body(&body).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::BadUtf8 {
                    field: "reason",
                    ..
                }
            ),
            "{err}"
        );

        for tag in [0, 7, 8, 32, 255] {
            let err = decode_frame_body(&[tag, 0, 0]).unwrap_err();
            assert!(matches!(err, WireError::UnknownTag(t) if t == tag), "{err}");
        }
        assert!(matches!(decode_frame_body(&[]), Err(WireError::EmptyFrame)));
        assert!(matches!(
            read_all(&[0, 0, 0, 0]),
            Err(WireError::EmptyFrame)
        ));
    }

    #[test]
    fn hello_of_another_version_says_so() {
        let mut body = vec![TAG_HELLO];
        body.extend_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        body.extend_from_slice(b"\x07something else entirely");
        let err = decode_frame_body(&body).unwrap_err();
        assert!(
            matches!(err, WireError::UnsupportedVersion { theirs, ours }
                if theirs == PROTOCOL_VERSION + 1 && ours == PROTOCOL_VERSION),
            "{err}"
        );
        // A well-formed Hello of another version still reaches the core, which refuses it.
        let hello = PeerMessage::Hello {
            protocol_version: 99,
            node_id: 1,
            node_name: "b".into(),
            resource: "r".into(),
            size_bytes: 1,
            protocol: ReplicationProtocol::C,
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            current_uuid: 4,
            bitmap_uuid: 0,
            history_uuids: vec![8, 16],
            receiver_missing_bytes: 0,
            discard_my_data: false,
            primary_before_split: false,
            resuming_initial_sync: true,
            allow_two_primaries: false,
        };
        assert_eq!(decode_frame_body(&encode(&hello)[4..]).unwrap(), hello);
    }

    #[test]
    fn oversize_length_is_rejected_before_reading_the_body() {
        for len in [u32::MAX, (MAX_FRAME_BODY + 1) as u32] {
            // Only the prefix is there: had the reader tried to allocate and read the body it
            // would report the stream end instead.
            let err = read_all(&len.to_be_bytes()).unwrap_err();
            assert!(
                matches!(err, WireError::FrameTooLarge { len: l } if l == u64::from(len)),
                "{err}"
            );
        }
        // The largest legal Data frame is accepted.
        let data = PeerMessage::Data {
            seq: 1,
            epoch: 1,
            request: 1,
            offset: 0,
            seen: 0,
            data: vec![7; MAX_DATA_PAYLOAD],
        };
        assert_eq!(read_all(&encode(&data)).unwrap(), vec![data]);
        assert!(matches!(
            decode_frame_body(&vec![TAG_DATA; MAX_FRAME_BODY + 1]),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn overlong_strings_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(40_000); // 80 000 bytes
        let frame = encode(&PeerMessage::Refused {
            reason,
            standalone: false,
        });
        match decode_frame_body(&frame[4..]).unwrap() {
            PeerMessage::Refused { reason, .. } => {
                assert!(reason.len() <= usize::from(u16::MAX));
                assert!(reason.len() > 65_000);
                assert!(reason.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }

    /// The body of a `SyncBitmap` frame announcing `count` runs and holding `present` of them.
    fn sync_bitmap_body(count: u32, present: usize) -> Vec<u8> {
        let mut body = vec![TAG_SYNC_BITMAP];
        body.extend_from_slice(&count.to_be_bytes());
        for run in 0..present as u64 {
            body.extend_from_slice(&(run * 2).to_be_bytes());
            body.extend_from_slice(&1u64.to_be_bytes());
        }
        body.push(1);
        body.push(0);
        body
    }

    #[test]
    fn a_full_bitmap_part_round_trips_and_a_larger_one_is_refused() {
        let full = PeerMessage::SyncBitmap {
            runs: (0..MAX_SYNC_BITMAP_RUNS as u64)
                .map(|i| (i * 3, 2))
                .collect(),
            last: true,
            from_source: true,
        };
        let frame = encode(&full);
        assert_eq!(decode_frame_body(&frame[4..]).unwrap(), full);
        assert_eq!(read_all(&frame).unwrap(), vec![full.clone()]);
        assert_eq!(parse_chunks(&[&frame]).unwrap(), vec![full]);

        // One run more: the receiver refuses it, whatever the reader.
        let over = MAX_SYNC_BITMAP_RUNS + 1;
        let body = sync_bitmap_body(over as u32, over);
        let err = decode_frame_body(&body).unwrap_err();
        assert!(
            matches!(err, WireError::TooMany { count, max: MAX_SYNC_BITMAP_RUNS, .. }
                if count == over as u64),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "SyncBitmap message lists 4097 runs; at most 4096 are allowed"
        );
        let framed = [(body.len() as u32).to_be_bytes().to_vec(), body].concat();
        assert!(matches!(read_all(&framed), Err(WireError::TooMany { .. })));
        assert!(matches!(
            parse_chunks(&[&framed]),
            Err(WireError::TooMany { .. })
        ));
        // An absurd count is refused before anything is allocated for it.
        let err = decode_frame_body(&sync_bitmap_body(u32::MAX, 0)).unwrap_err();
        assert!(matches!(err, WireError::TooMany { .. }), "{err}");
        // A count the frame does not hold is a truncation.
        let err = decode_frame_body(&sync_bitmap_body(3, 2)).unwrap_err();
        assert!(matches!(err, WireError::Truncated { .. }), "{err}");

        // A sender refuses to send it, and the batch stays as it was.
        let too_many = PeerMessage::SyncBitmap {
            runs: vec![(0, 1); over],
            last: false,
            from_source: false,
        };
        assert!(matches!(
            check_limits(&too_many),
            Err(WireError::TooMany { .. })
        ));
        let mut batch = FrameBatch::new();
        batch.push_message(&PeerMessage::Ping { nonce: 1 }).unwrap();
        assert!(matches!(
            batch.push_message(&too_many),
            Err(WireError::TooMany { .. })
        ));
        assert_eq!(batch.frames(), 1);
        assert_eq!(batch.len(), encode(&PeerMessage::Ping { nonce: 1 }).len());
    }

    #[test]
    fn resync_payloads_beyond_a_mebibyte_are_refused() {
        // The largest legal one is accepted by every reader, into a buffer of its own.
        let largest = PeerMessage::ResyncData {
            offset: 1 << 20,
            data: vec![3; MAX_RESYNC_PAYLOAD],
        };
        let frame = encode(&largest);
        assert_eq!(frame.len(), RESYNC_DATA_HEADER_LEN + MAX_RESYNC_PAYLOAD);
        assert_eq!(decode_frame_body(&frame[4..]).unwrap(), largest);
        assert_eq!(read_all(&frame).unwrap(), vec![largest.clone()]);
        let mut parser = FrameParser::<Vec<u8>>::new();
        let mut input = &frame[..];
        match parser.next(&mut input).unwrap() {
            Some(Parsed::NeedPayload {
                header: PayloadHeader::ResyncData { offset },
                len,
            }) => {
                assert_eq!((offset, len), (1 << 20, MAX_RESYNC_PAYLOAD));
            }
            other => panic!("{other:?}"),
        }

        // One byte more: within the frame limit (a Data payload may be that large), but not a
        // resync payload. Refused before a buffer is asked for.
        let over = PeerMessage::ResyncData {
            offset: 0,
            data: vec![3; MAX_RESYNC_PAYLOAD + 1],
        };
        let frame = encode(&over);
        assert!(frame.len() - 4 <= MAX_FRAME_BODY);
        let too_large = |result: Result<_, WireError>| match result {
            Err(WireError::PayloadTooLarge {
                message: "ResyncData",
                len,
                max: MAX_RESYNC_PAYLOAD,
            }) => assert_eq!(len, MAX_RESYNC_PAYLOAD as u64 + 1),
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("an oversized resync payload was accepted"),
        };
        too_large(decode_frame_body(&frame[4..]).map(|_| ()));
        too_large(read_all(&frame).map(|_| ()));
        let mut parser = FrameParser::<Vec<u8>>::new();
        // Only the head is there: the parser decides on the announced length alone.
        let mut input = &frame[..RESYNC_DATA_HEADER_LEN];
        too_large(parser.next(&mut input).map(|_| ()));

        // Senders refuse it too, leaving their batch intact.
        let mut batch = FrameBatch::new();
        too_large(batch.push_resync_data(0, vec![0u8; MAX_RESYNC_PAYLOAD + 1]));
        too_large(batch.push_message(&over));
        assert!(batch.is_empty());
        let mut header = Vec::new();
        too_large(encode_resync_data_header_into(
            &mut header,
            0,
            MAX_RESYNC_PAYLOAD + 1,
        ));
        assert!(header.is_empty());

        // A frame too short for the offset is a truncation, not a payload.
        let err = parse_chunks(&[&[0, 0, 0, 4, TAG_RESYNC_DATA, 0, 0, 0]]).unwrap_err();
        assert!(
            err.to_string().contains("truncated ResyncData message"),
            "{err}"
        );
    }

    #[test]
    fn resync_fields_with_bad_values_are_refused() {
        let mut body = encode(&PeerMessage::ResyncWritten {
            offset: 0,
            len: 4096,
            ok: true,
        })[4..]
            .to_vec();
        *body.last_mut().unwrap() = 2;
        let err = decode_frame_body(&body).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ResyncWritten message: field `ok` has invalid value 2"
        );
        let mut body = encode(&PeerMessage::SyncBitmap {
            runs: vec![(1, 1)],
            last: false,
            from_source: true,
        })[4..]
            .to_vec();
        *body.last_mut().unwrap() = 9;
        let err = decode_frame_body(&body).unwrap_err();
        assert!(
            err.to_string()
                .contains("`from_source` has invalid value 9"),
            "{err}"
        );
        let mut body = encode(&PeerMessage::ResyncRequest { offset: 0, len: 1 })[4..].to_vec();
        body.push(0);
        assert!(matches!(
            decode_frame_body(&body),
            Err(WireError::TrailingBytes { count: 1, .. })
        ));
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut decoded = 0;
        for _ in 0..200_000 {
            let len = rng.below(80) as usize;
            let mut body = rng.bytes(len);
            // Mostly valid tags, so the field decoders get exercised rather than the tag check.
            if let Some(first) = body.first_mut() {
                *first = rng.below(30) as u8;
            }
            if decode_frame_body(&body).is_ok() {
                decoded += 1;
            }
        }
        assert!(
            decoded > 0,
            "garbage never hit a valid layout; the test is too weak"
        );

        // Whole garbage streams through the reader, including garbage length prefixes.
        for _ in 0..2_000 {
            let len = rng.below(300) as usize;
            let mut bytes = rng.bytes(len);
            if bytes.len() >= 4 && rng.below(2) == 0 {
                // A plausible small length so frames actually get parsed.
                let small = rng.below(64) as u32;
                bytes[..4].copy_from_slice(&small.to_be_bytes());
            }
            // Decoded or refused, both are fine: the property is that nothing panics.
            let _ = read_all(&bytes);
        }

        // Mutations of valid frames: flipped bytes in otherwise well-formed messages.
        for msg in samples() {
            let frame = encode(&msg);
            for _ in 0..500 {
                let mut mutated = frame.clone();
                let at = rng.below(mutated.len() as u64) as usize;
                mutated[at] ^= (rng.below(255) + 1) as u8;
                // As above: any outcome but a panic is fine.
                let _ = decode_frame_body(&mutated[4..]);
                let _ = read_all(&mutated);
            }
        }
    }
}
