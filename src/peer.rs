//! The PeerActor: one per (resource, peer), and a thin shell around a QUIC connection. It dials
//! when the resource's core asks, reads and writes the streams, and reports every message and
//! every connection change to the device actor, where the core decides what they mean: the
//! handshake, liveness (pings and request timeouts), backoff and refusals all live in the core
//! (docs/protocol.md). One control stream (handshake, acks, pings, state-change replies: small
//! and never stuck behind bulk data), one ordered data stream per direction (writes,
//! barriers, and the role announcements that must not overtake them) and one ordered resync
//! stream per direction (bitmaps, resync requests and their data, so that a resync never
//! queues behind application writes, nor they behind it).
//!
//! Each side opens its data stream first and its resync stream second; QUIC numbers a
//! connection's streams in the order they are opened and hands them to the receiver in that
//! order, so the first unidirectional stream a side accepts is the peer's data stream and the
//! second its resync stream (see [`uni_writer`] and [`uni_reader`]).
//!
//! The node with the lower id dials; the other accepts (see [`accept_loop`]). One connection
//! per resource and peer; each gets a new number (`conn`), so the core can ignore the late
//! reports of an old one.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use futures::future::Shared;
use futures::FutureExt;
use qrbd_actors::buffer::{pooled_capacity, BufferPool, PooledBuf};
use qrbd_actors::core::messages::{PeerMessage, StreamKind};
use qrbd_actors::core::replication::PeerId;
use qrbd_actors::core::ReplicationProtocol;
use qrbd_actors::device::{
    DeviceActor, FromPeer, FromPeerBatch, LinkEvent, PeerOutbound, SharedBuf, ToPeer,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::QrbdConfig;
#[cfg(test)]
use crate::transport::ZERO_COPY_MIN;
use crate::transport::{
    self, read_message, write_batch, write_message, DataHeader, FrameBatch, FrameParser, Parsed,
    WireError,
};

/// Bytes received from a peer (on the data and resync streams together) and not yet written
/// locally, at most (in KiB permits).
pub const RECEIVE_BUDGET_KIB: usize = 64 << 10;
/// A stream write carries at most about this much (everything queued, up to this), and a
/// stream read hands the device at most about this much at once.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Chunks taken from quinn per read call.
const READ_CHUNKS: usize = 32;
/// An accepted connection must say hello within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to deliver what was queued (a refusal's reason).
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// QUIC application close codes.
const CLOSE_NORMAL: u32 = 0;
const CLOSE_PROTOCOL: u32 = 2;

/// Everything a PeerActor needs.
pub struct PeerLinkSetup {
    pub resource: String,
    pub protocol: ReplicationProtocol,
    pub peer_id: PeerId,
    pub peer_name: String,
    pub peer_address: std::net::SocketAddr,
    pub endpoint: quinn::Endpoint,
    pub device: Addr<DeviceActor>,
}

/// A transport connection with its control stream; `first` is the Hello an acceptor already
/// read to route the connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Established {
    pub connection: quinn::Connection,
    pub control_send: quinn::SendStream,
    pub control_recv: quinn::RecvStream,
    pub first: Option<PeerMessage>,
}

struct Live {
    conn: u64,
    connection: quinn::Connection,
    control_tx: mpsc::UnboundedSender<PeerMessage>,
    data_tx: mpsc::UnboundedSender<PeerOutbound>,
    resync_tx: mpsc::UnboundedSender<PeerOutbound>,
    writers: Vec<tokio::task::JoinHandle<()>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

pub struct PeerActor {
    setup: PeerLinkSetup,
    next_conn: u64,
    live: Option<Live>,
    dialing: bool,
    stopped: bool,
}

impl PeerActor {
    pub fn new(setup: PeerLinkSetup) -> Self {
        PeerActor {
            setup,
            next_conn: 1,
            live: None,
            dialing: false,
            stopped: false,
        }
    }

    fn report(&self, event: LinkEvent) {
        self.setup.device.do_send(FromPeer {
            peer: self.setup.peer_id,
            event,
        });
    }

    /// Closes the live connection once its writers delivered what was queued (at most
    /// [`CLOSE_GRACE`]), so that a refusal reaches the peer before the close.
    fn close_live(&mut self, code: u32, reason: &str) {
        let Some(live) = self.live.take() else {
            return;
        };
        for reader in live.readers {
            reader.abort();
        }
        drop(live.control_tx);
        drop(live.data_tx);
        drop(live.resync_tx);
        let reason = reason.as_bytes().to_vec();
        let connection = live.connection;
        let writers = live.writers;
        tokio::spawn(async move {
            let drained = futures::future::join_all(writers);
            // A writer stuck on a dead peer is cut off by the close.
            let _ = tokio::time::timeout(CLOSE_GRACE, drained).await;
            connection.close(code.into(), &reason);
        });
    }

    fn dial(&mut self, ctx: &mut Context<Self>) {
        if self.dialing || self.stopped {
            return;
        }
        self.dialing = true;
        let endpoint = self.setup.endpoint.clone();
        let address = self.setup.peer_address;
        let peer_name = self.setup.peer_name.clone();
        let dial = async move {
            let connection = transport::connect(&endpoint, address, &peer_name)
                .await
                .map_err(|error| format!("{error:#}"))?;
            match connection.open_bi().await {
                Ok((send, recv)) => Ok(Established {
                    connection,
                    control_send: send,
                    control_recv: recv,
                    first: None,
                }),
                Err(error) => {
                    connection.close(CLOSE_NORMAL.into(), b"no control stream");
                    Err(format!("cannot open the control stream: {error}"))
                }
            }
        };
        ctx.spawn(dial.into_actor(self).map(|result, actor, ctx| {
            actor.dialing = false;
            match result {
                Ok(established) => ctx.notify(established),
                Err(reason) => actor.report(LinkEvent::DialFailed { reason }),
            }
        }));
    }
}

impl Actor for PeerActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.close_live(CLOSE_NORMAL, "shutting down");
    }
}

impl Handler<Established> for PeerActor {
    type Result = ();
    fn handle(&mut self, msg: Established, _: &mut Context<Self>) {
        if self.stopped {
            msg.connection.close(CLOSE_NORMAL.into(), b"resource down");
            return;
        }
        // A newer connection replaces the old one; the core hears of both in order.
        if let Some(old) = self.live.as_ref().map(|live| live.conn) {
            self.close_live(CLOSE_NORMAL, "replaced by a new connection");
            self.report(LinkEvent::TransportDown {
                conn: old,
                reason: "replaced by a new connection".into(),
            });
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        let peer = self.setup.peer_id;
        let device = self.setup.device.clone();
        let connection = msg.connection.clone();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::unbounded_channel();
        let (resync_tx, resync_rx) = mpsc::unbounded_channel();
        let lost = {
            let device = device.clone();
            move |reason: String| {
                device.do_send(FromPeer {
                    peer,
                    event: LinkEvent::TransportDown { conn, reason },
                })
            }
        };
        // The data stream is opened (and accepted) before the resync stream, see the module
        // documentation.
        let (data_opened, after_data_opened) = oneshot::channel();
        let writers = vec![
            tokio::spawn(control_writer(msg.control_send, control_rx, lost.clone())),
            tokio::spawn(uni_writer(
                UniWriterContext {
                    kind: StreamKind::Data,
                    connection: connection.clone(),
                    device: device.clone().recipient(),
                    peer,
                    report_sent: self.setup.protocol == ReplicationProtocol::A,
                    after: None,
                    opened: Some(data_opened),
                },
                data_rx,
                lost.clone(),
            )),
            tokio::spawn(uni_writer(
                UniWriterContext {
                    kind: StreamKind::Resync,
                    connection: connection.clone(),
                    device: device.clone().recipient(),
                    peer,
                    report_sent: false,
                    after: Some(after_data_opened),
                    opened: None,
                },
                resync_rx,
                lost.clone(),
            )),
        ];
        let reader = StreamReader {
            device: device.clone().recipient(),
            connection: connection.clone(),
            peer,
            conn,
        };
        let (control_finished, control_finished_rx) = oneshot::channel();
        let control_done = ControlDone(control_finished_rx.shared());
        // One receive budget for both streams that carry payloads.
        let budget = Arc::new(ReceiveBudget::new(RECEIVE_BUDGET_KIB));
        let (data_accepted, after_data_accepted) = oneshot::channel();
        let readers = vec![
            tokio::spawn(control_reader(
                msg.control_recv,
                reader.clone(),
                lost.clone(),
                control_finished,
            )),
            tokio::spawn(uni_reader(
                UniReaderContext {
                    kind: StreamKind::Data,
                    budget: budget.clone(),
                    after: None,
                    accepted: Some(data_accepted),
                    control_done: control_done.clone(),
                },
                reader.clone(),
                lost.clone(),
            )),
            tokio::spawn(uni_reader(
                UniReaderContext {
                    kind: StreamKind::Resync,
                    budget,
                    after: Some(after_data_accepted),
                    accepted: None,
                    control_done,
                },
                reader,
                lost,
            )),
        ];
        self.live = Some(Live {
            conn,
            connection: msg.connection,
            control_tx,
            data_tx,
            resync_tx,
            writers,
            readers,
        });
        self.report(LinkEvent::TransportUp { conn });
        if let Some(hello) = msg.first {
            self.report(LinkEvent::Message {
                conn,
                message: hello,
                budget: None,
            });
        }
    }
}

impl Handler<ToPeer> for PeerActor {
    type Result = ();
    fn handle(&mut self, ToPeer(batch): ToPeer, ctx: &mut Context<Self>) {
        for outbound in batch {
            self.outbound(outbound, ctx);
        }
    }
}

impl PeerActor {
    fn outbound(&mut self, outbound: PeerOutbound, ctx: &mut Context<Self>) {
        match outbound {
            PeerOutbound::Dial => self.dial(ctx),
            PeerOutbound::Close { conn, reason } => {
                if self.live.as_ref().is_some_and(|live| live.conn == conn) {
                    tracing::debug!(resource = %self.setup.resource, peer = %self.setup.peer_name, %reason, "closing the connection");
                    self.close_live(CLOSE_PROTOCOL, &reason);
                }
            }
            // A closed channel means the connection is going; the core hears of it.
            PeerOutbound::Message(message) => {
                let Some(live) = &self.live else {
                    return;
                };
                let queue = match message.stream() {
                    StreamKind::Control => {
                        let _ = live.control_tx.send(message);
                        return;
                    }
                    StreamKind::Data => &live.data_tx,
                    StreamKind::Resync => &live.resync_tx,
                };
                let _ = queue.send(PeerOutbound::Message(message));
            }
            data @ PeerOutbound::Data { .. } => {
                if let Some(live) = &self.live {
                    let _ = live.data_tx.send(data);
                }
            }
            resync @ PeerOutbound::ResyncData { conn, .. } => match &self.live {
                // Blocks read for a connection that is gone must not reach a newer one: they
                // were read under a lock that went with the old connection.
                Some(live) if live.conn == conn => {
                    let _ = live.resync_tx.send(resync);
                }
                _ => {}
            },
        }
    }
}

/// Writes what the link queued, everything queued at each wake-up in one stream write.
async fn control_writer(
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<PeerMessage>,
    lost: impl Fn(String),
) {
    let mut batch = FrameBatch::new();
    let mut chunks = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(message) = next.take() {
            if let Err(error) = batch.push_message(&message) {
                return lost(format!("control stream: {error}"));
            }
            if batch.len() < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if let Err(error) = write_batch(&mut send, &mut batch, &mut chunks).await {
            return lost(format!("control stream: {error}"));
        }
    }
    // The link is closing: let the peer read what was sent (a refusal) before the close.
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// The name of a stream, for logs and the reasons a link was lost.
fn stream_name(kind: StreamKind) -> &'static str {
    match kind {
        StreamKind::Control => "control",
        StreamKind::Data => "data",
        StreamKind::Resync => "resync",
    }
}

struct UniWriterContext {
    /// Data or resync.
    kind: StreamKind,
    connection: quinn::Connection,
    device: Recipient<FromPeerBatch>,
    peer: PeerId,
    /// Protocol A completes a write once the transport took it.
    report_sent: bool,
    /// The stream is opened only once this resolves (the data stream was opened), so the
    /// peer accepts the streams in a known order. A dropped sender (the data writer gave up)
    /// lets the open go on: it then fails as the connection does.
    after: Option<oneshot::Receiver<()>>,
    /// Told once this stream is open.
    opened: Option<oneshot::Sender<()>>,
}

/// A write's bytes, shared with the local store and the other peers; a large payload goes to
/// quinn without a copy.
struct SharedPayload(SharedBuf);

impl AsRef<[u8]> for SharedPayload {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

/// Writes a unidirectional stream (data or resync): everything queued at each wake-up (up to
/// [`MAX_BATCH_BYTES`]) in one stream write, then one report of the protocol-A writes it
/// carried.
async fn uni_writer(
    context: UniWriterContext,
    mut rx: mpsc::UnboundedReceiver<PeerOutbound>,
    lost: impl Fn(String),
) {
    let UniWriterContext {
        kind,
        connection,
        device,
        peer,
        report_sent,
        after,
        opened,
    } = context;
    let stream = stream_name(kind);
    if let Some(after) = after {
        let _ = after.await;
    }
    let mut send = match connection.open_uni().await {
        Ok(send) => send,
        Err(error) => return lost(format!("{stream} stream: {error}")),
    };
    if let Some(opened) = opened {
        let _ = opened.send(());
    }
    let mut batch = FrameBatch::new();
    let mut chunks = Vec::new();
    let mut sent = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(outbound) = next.take() {
            let (result, request) = match outbound {
                PeerOutbound::Data {
                    seq,
                    epoch,
                    request,
                    offset,
                    seen,
                    data,
                } => (
                    batch.push_data(
                        &DataHeader {
                            seq,
                            epoch,
                            request,
                            offset,
                            seen,
                        },
                        SharedPayload(data),
                    ),
                    Some(request),
                ),
                PeerOutbound::ResyncData { offset, data, .. } => {
                    (batch.push_resync_data(offset, data), None)
                }
                PeerOutbound::Message(message) => {
                    let request = match &message {
                        PeerMessage::Discard { request, .. } => Some(*request),
                        _ => None,
                    };
                    (batch.push_message(&message), request)
                }
                PeerOutbound::Dial | PeerOutbound::Close { .. } => (Ok(()), None),
            };
            if let Err(error) = result {
                return lost(format!("{stream} stream: {error}"));
            }
            if let (Some(request), true) = (request, report_sent) {
                sent.push(LinkEvent::Sent { request });
            }
            if batch.len() < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(error) = write_batch(&mut send, &mut batch, &mut chunks).await {
            return lost(format!("{stream} stream: {error}"));
        }
        if !sent.is_empty() {
            device.do_send(FromPeerBatch {
                peer,
                events: std::mem::take(&mut sent),
            });
        }
    }
    let _ = send.finish();
}

#[derive(Clone)]
struct StreamReader {
    device: Recipient<FromPeerBatch>,
    connection: quinn::Connection,
    peer: PeerId,
    conn: u64,
}

impl StreamReader {
    /// Hands what was read so far to the device, as one message.
    fn deliver(&self, events: &mut Vec<LinkEvent>) {
        if events.is_empty() {
            return;
        }
        self.device.do_send(FromPeerBatch {
            peer: self.peer,
            events: std::mem::take(events),
        });
    }
}

/// A received payload's buffer with the share of the receive budget that covers it. The
/// buffer is declared first so that it is back in its pool before the budget is released.
struct ReceiveBuf {
    buf: PooledBuf,
    budget: OwnedSemaphorePermit,
}

impl AsMut<[u8]> for ReceiveBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

/// The bound on bytes received on the data and resync streams and not yet written locally
/// ([`RECEIVE_BUDGET_KIB`] permits of 1 KiB, held until the write is applied), and the pool of
/// aligned buffers the payloads land in. One per connection, shared by both streams.
struct ReceiveBudget {
    permits: Arc<Semaphore>,
    total_kib: usize,
    /// Every buffer is taken under permits for its whole capacity, so the permits are what
    /// bounds it; its own budget is slack, so that taking a buffer never has to wait.
    pool: BufferPool,
}

impl ReceiveBudget {
    fn new(kib: usize) -> Self {
        ReceiveBudget {
            permits: Arc::new(Semaphore::new(kib)),
            total_kib: kib,
            pool: BufferPool::new(2 * (kib << 10)),
        }
    }

    /// Takes `kib` permits. While the budget is spent, the stream is not read (QUIC flow
    /// control then throttles the sender); `hand_over` first gives the device what the reader
    /// holds, as only applying those writes frees the budget.
    async fn take(
        &self,
        kib: usize,
        hand_over: impl FnOnce(),
    ) -> Result<OwnedSemaphorePermit, String> {
        // A payload larger than the whole budget waits until nothing else holds any of it.
        let permits = u32::try_from(kib.clamp(1, self.total_kib)).unwrap_or(u32::MAX);
        if let Ok(permit) = self.permits.clone().try_acquire_many_owned(permits) {
            return Ok(permit);
        }
        hand_over();
        self.permits
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| "the receive budget was closed".to_owned())
    }

    async fn payload_buffer(
        &self,
        len: usize,
        reader: &StreamReader,
        events: &mut Vec<LinkEvent>,
    ) -> Result<ReceiveBuf, String> {
        let budget = self
            .take(pooled_capacity(len) >> 10, || reader.deliver(events))
            .await?;
        let buf = self.pool.try_acquire(len).ok_or_else(|| {
            let usage = self.pool.usage();
            format!(
                "receive buffer pool exhausted ({} of {} bytes in use) for a payload of {len} bytes",
                usage.bytes_in_use, usage.budget_bytes
            )
        })?;
        Ok(ReceiveBuf { buf, budget })
    }
}

/// Parses the frames of one chunk of a stream of `kind` into link events. A message that does
/// not belong on the stream is a protocol error; a payload is refused before a buffer is
/// spent on it.
async fn intake(
    parser: &mut FrameParser<ReceiveBuf>,
    chunk: &[u8],
    kind: StreamKind,
    budget: Option<&ReceiveBudget>,
    reader: &StreamReader,
    events: &mut Vec<LinkEvent>,
) -> Result<(), String> {
    let stream = stream_name(kind);
    let mut rest = chunk;
    while let Some(parsed) = parser
        .next(&mut rest)
        .map_err(|error| format!("{stream} stream: {error}"))?
    {
        match parsed {
            Parsed::NeedPayload { header, len } => {
                let budget = match budget {
                    Some(budget) if header.stream() == kind => budget,
                    _ => {
                        return Err(format!(
                            "protocol error: {} on the {stream} stream",
                            header.name()
                        ))
                    }
                };
                let buf = budget.payload_buffer(len, reader, events).await?;
                parser
                    .provide(buf)
                    .map_err(|error| format!("{stream} stream: {error}"))?;
            }
            Parsed::Data { header, payload } => events.push(LinkEvent::Data {
                conn: reader.conn,
                seq: header.seq,
                epoch: header.epoch,
                request: header.request,
                offset: header.offset,
                seen: header.seen,
                data: payload.buf,
                budget: Some(payload.budget),
            }),
            Parsed::ResyncData { offset, payload } => events.push(LinkEvent::ResyncData {
                conn: reader.conn,
                offset,
                data: payload.buf,
                budget: Some(payload.budget),
            }),
            Parsed::Message(message) => {
                if message.stream() != kind {
                    return Err(format!(
                        "protocol error: {} on the {stream} stream",
                        message.name()
                    ));
                }
                // On a stream with a budget, every message holds a share of it until handled.
                let budget = match budget {
                    Some(budget) => Some(budget.take(1, || reader.deliver(events)).await?),
                    None => None,
                };
                events.push(LinkEvent::Message {
                    conn: reader.conn,
                    message,
                    budget,
                });
            }
        }
    }
    Ok(())
}

/// How reading a stream ended.
enum ReadEnd {
    /// The connection ended (the peer closed it, or it was lost): the reason is the
    /// connection's.
    Closed(String),
    /// This stream failed: a bad frame, a message on the wrong stream, a reset.
    Failed(String),
}

/// Reads a stream in large chunks and hands the device every whole frame that arrived by one
/// wake-up as one batch, until the stream or the connection ends or a frame is bad.
///
/// A peer that closes finishes its streams first and closes the connection a moment later
/// (after its last words, e.g. a refusal, went out on the other stream), so a finished stream
/// waits for that close: the other stream's messages reach the core before the loss does, and
/// the loss carries the peer's reason.
async fn read_stream(
    mut recv: quinn::RecvStream,
    kind: StreamKind,
    budget: Option<Arc<ReceiveBudget>>,
    reader: &StreamReader,
) -> ReadEnd {
    let stream = stream_name(kind);
    let mut parser = FrameParser::new();
    let mut chunks = vec![Bytes::new(); READ_CHUNKS];
    let mut events = Vec::new();
    loop {
        let mut read = 0;
        let mut ended = false;
        let mut wait = true;
        // Everything that is there already, up to a cap, then the batch goes to the device.
        while read < MAX_BATCH_BYTES {
            let result = if wait {
                recv.read_chunks(&mut chunks).await
            } else {
                // Cancel-safe: not ready means nothing was taken.
                match recv.read_chunks(&mut chunks).now_or_never() {
                    Some(result) => result,
                    None => break,
                }
            };
            wait = false;
            let count = match result {
                Ok(Some(count)) => count,
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(error) => {
                    reader.deliver(&mut events);
                    let reason = format!("{stream} stream: {}", WireError::Read(error.clone()));
                    return match error {
                        quinn::ReadError::ConnectionLost(_) => ReadEnd::Closed(reason),
                        _ => ReadEnd::Failed(reason),
                    };
                }
            };
            for chunk in &mut chunks[..count] {
                read += chunk.len();
                let chunk = std::mem::take(chunk);
                let taken = intake(
                    &mut parser,
                    &chunk,
                    kind,
                    budget.as_deref(),
                    reader,
                    &mut events,
                );
                if let Err(reason) = taken.await {
                    reader.deliver(&mut events);
                    return ReadEnd::Failed(reason);
                }
            }
        }
        reader.deliver(&mut events);
        if ended {
            return match parser.finish() {
                Err(error) => ReadEnd::Failed(format!("{stream} stream: {error}")),
                Ok(()) => {
                    let closed = reader.connection.closed().await;
                    ReadEnd::Closed(format!("peer closed the {stream} stream ({closed})"))
                }
            };
        }
    }
}

/// Reads the control stream. `_done` is dropped when it ends, after the loss was reported.
async fn control_reader(
    recv: quinn::RecvStream,
    reader: StreamReader,
    lost: impl Fn(String),
    _done: oneshot::Sender<()>,
) {
    let (ReadEnd::Closed(reason) | ReadEnd::Failed(reason)) =
        read_stream(recv, StreamKind::Control, None, &reader).await;
    lost(reason);
}

/// Resolves once the control reader is done (it reported the loss), or after [`CLOSE_GRACE`].
#[derive(Clone)]
struct ControlDone(Shared<oneshot::Receiver<()>>);

impl ControlDone {
    async fn wait(self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, self.0).await;
    }
}

struct UniReaderContext {
    /// Data or resync.
    kind: StreamKind,
    /// The connection's receive budget, shared by the data and resync readers.
    budget: Arc<ReceiveBudget>,
    /// The stream is accepted only once this resolves (the data stream was accepted), so that
    /// each reader gets the stream it expects. A dropped sender (the data reader ended) lets
    /// the accept go on: it then fails as the connection did.
    after: Option<oneshot::Receiver<()>>,
    /// Told once this stream was accepted.
    accepted: Option<oneshot::Sender<()>>,
    control_done: ControlDone,
}

/// Reads a unidirectional stream (data or resync). When the connection ends, the loss is
/// reported only once the control reader is done, at most [`CLOSE_GRACE`] later: the peer's
/// last words on the control stream (a refusal) may have arrived just before the close, and
/// must reach the core before the loss does, whichever reader the runtime happens to wake
/// first.
async fn uni_reader(context: UniReaderContext, reader: StreamReader, lost: impl Fn(String)) {
    let UniReaderContext {
        kind,
        budget,
        after,
        accepted,
        control_done,
    } = context;
    if let Some(after) = after {
        let _ = after.await;
    }
    let end = match reader.connection.accept_uni().await {
        Ok(recv) => {
            if let Some(accepted) = accepted {
                let _ = accepted.send(());
            }
            read_stream(recv, kind, Some(budget), &reader).await
        }
        Err(error) => ReadEnd::Closed(format!("{} stream: {error}", stream_name(kind))),
    };
    match end {
        ReadEnd::Failed(reason) => lost(reason),
        ReadEnd::Closed(reason) => {
            control_done.wait().await;
            lost(reason)
        }
    }
}

/// Finds the running link for an incoming connection.
#[derive(Message)]
#[rtype(result = "Option<Addr<PeerActor>>")]
pub struct FindPeerLink {
    pub resource: String,
    pub peer_id: PeerId,
}

/// Accepts incoming peer connections: checks the certificate name and the handshake, and hands
/// the connection to the resource's PeerActor (found through `find`).
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    config: Arc<QrbdConfig>,
    find: Recipient<FindPeerLink>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let config = config.clone();
        let find = find.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_one(incoming, &config, &find))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    tracing::warn!(%remote, %reason, "refused an incoming peer connection")
                }
                Err(_) => {
                    tracing::warn!(%remote, "incoming peer connection timed out in the handshake")
                }
            }
        });
    }
}

async fn accept_one(
    incoming: quinn::Incoming,
    config: &QrbdConfig,
    find: &Recipient<FindPeerLink>,
) -> Result<(), String> {
    let connection = incoming
        .await
        .map_err(|error| format!("TLS/QUIC handshake failed: {error}"))?;
    let names =
        transport::peer_certificate_names(&connection).map_err(|error| error.to_string())?;
    let (send, mut recv) = connection
        .accept_bi()
        .await
        .map_err(|error| format!("no control stream: {error}"))?;
    let hello = read_message(&mut recv)
        .await
        .map_err(|error| format!("bad handshake: {error}"))?
        .ok_or_else(|| "peer closed the connection during the handshake".to_owned())?;
    let PeerMessage::Hello {
        node_id,
        ref resource,
        ..
    } = hello
    else {
        return refuse(
            send,
            &connection,
            format!("expected a Hello, got {}", hello.name()),
        )
        .await;
    };
    let Some(peer) = config
        .resources
        .iter()
        .find(|r| r.name == *resource)
        .and_then(|r| r.peers.iter().find(|p| p.id == node_id))
    else {
        return refuse(
            send,
            &connection,
            format!(
                "node {} has no resource {resource:?} with a peer of id {node_id}",
                config.node.name
            ),
        )
        .await;
    };
    if !names.contains(&peer.name) {
        return refuse(
            send,
            &connection,
            format!(
                "peer presented a certificate for {names:?}, expected {:?}",
                peer.name
            ),
        )
        .await;
    }
    let link = find
        .send(FindPeerLink {
            resource: resource.clone(),
            peer_id: node_id,
        })
        .await
        .ok()
        .flatten();
    let Some(link) = link else {
        return refuse(
            send,
            &connection,
            format!("resource {resource:?} is not up on {}", config.node.name),
        )
        .await;
    };
    // The resource's core checks the Hello and answers with its own.
    link.do_send(Established {
        connection,
        control_send: send,
        control_recv: recv,
        first: Some(hello),
    });
    Ok(())
}

/// Stops the link (its resource went down).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopLink;

impl Handler<StopLink> for PeerActor {
    type Result = ();
    fn handle(&mut self, _: StopLink, ctx: &mut Context<Self>) {
        self.stopped = true;
        self.close_live(CLOSE_NORMAL, "resource down");
        ctx.stop();
    }
}

/// Tells the peer why it is refused, then closes the connection.
async fn refuse(
    mut send: quinn::SendStream,
    connection: &quinn::Connection,
    reason: String,
) -> Result<(), String> {
    let _ = write_message(
        &mut send,
        &PeerMessage::Refused {
            reason: reason.clone(),
            standalone: false,
        },
    )
    .await;
    let _ = send.finish();
    // Give the refusal a moment to leave before the close discards it.
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    connection.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
    Err(reason)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::net::SocketAddr;
    use std::path::Path;

    use qrbd_actors::core::messages::PeerMessage;
    use tokio::time::timeout;

    use super::*;
    use crate::config::TlsConfig;
    use crate::transport::{
        encode, generate_certificates, load_identity, make_endpoint, MAX_RESYNC_PAYLOAD,
        RESYNC_DATA_HEADER_LEN,
    };
    use qrbd_actors::device::ResyncPayload;

    const LIMIT: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_spent_budget_hands_over_what_the_reader_holds_before_it_waits() {
        let budget = ReceiveBudget::new(8);
        let handed = Cell::new(0);
        let first = budget.take(8, || handed.set(handed.get() + 1)).await;
        let first = first.expect("the budget is free");
        assert_eq!(
            handed.get(),
            0,
            "nothing to hand over while the budget lasts"
        );
        let mut second = Box::pin(budget.take(4, || handed.set(handed.get() + 1)));
        assert!(
            (&mut second).now_or_never().is_none(),
            "the budget is spent"
        );
        assert_eq!(handed.get(), 1, "the held events went to the device first");
        drop(first);
        drop(second.await.expect("released budget"));
        // More than the whole budget: waits for all of it, not forever.
        assert_eq!(budget.take(1 << 20, || ()).await.unwrap().num_permits(), 8);
    }

    enum Report {
        Batch(Vec<LinkEvent>),
        Lost(String),
    }

    /// Collects what a stream reader hands the device, and the loss, in the order the device
    /// would see them (one mailbox).
    struct Collector(mpsc::UnboundedSender<Report>);

    impl Actor for Collector {
        type Context = Context<Self>;
    }

    impl Handler<FromPeerBatch> for Collector {
        type Result = ();
        fn handle(&mut self, msg: FromPeerBatch, _: &mut Context<Self>) {
            let _ = self.0.send(Report::Batch(msg.events));
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Lost(String);

    impl Handler<Lost> for Collector {
        type Result = ();
        fn handle(&mut self, Lost(reason): Lost, _: &mut Context<Self>) {
            let _ = self.0.send(Report::Lost(reason));
        }
    }

    fn identity(dir: &Path, name: &str) -> crate::transport::TlsIdentity {
        generate_certificates(dir, Some(name)).unwrap();
        load_identity(&TlsConfig {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        })
        .unwrap()
    }

    /// A QUIC connection on loopback: (dialer's side, acceptor's side).
    async fn connected_pair(dir: &Path) -> (quinn::Connection, quinn::Connection) {
        let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let alpha = make_endpoint(localhost, &identity(dir, "alpha")).unwrap();
        let beta = make_endpoint(localhost, &identity(dir, "beta")).unwrap();
        let address = alpha.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let incoming = alpha.accept().await.unwrap();
            transport::accept_checked(incoming, &["beta"])
                .await
                .unwrap()
                .0
        });
        let dialed = transport::connect(&beta, address, "alpha").await.unwrap();
        (dialed, accepted.await.unwrap())
    }

    struct Reading(mpsc::UnboundedReceiver<Report>);

    impl Reading {
        async fn next(&mut self) -> Report {
            self.0.recv().await.expect("the collector stopped")
        }
    }

    /// Runs `read_stream` for a stream of `kind` on the next stream `accept` gives, reporting
    /// to a collector.
    fn read_from<F>(
        connection: &quinn::Connection,
        kind: StreamKind,
        budget: Option<ReceiveBudget>,
        accept: F,
    ) -> Reading
    where
        F: std::future::Future<Output = quinn::RecvStream> + 'static,
    {
        let (reports, reading) = mpsc::unbounded_channel();
        let collector = Collector(reports).start();
        let reader = StreamReader {
            device: collector.clone().recipient(),
            connection: connection.clone(),
            peer: 1,
            conn: 7,
        };
        actix::spawn(async move {
            let recv = accept.await;
            let (ReadEnd::Closed(reason) | ReadEnd::Failed(reason)) =
                read_stream(recv, kind, budget.map(Arc::new), &reader).await;
            collector.do_send(Lost(reason))
        });
        Reading(reading)
    }

    fn payload(seq: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u64 * 7 + seq) as u8).collect()
    }

    #[actix_rt::test]
    async fn batches_arrive_as_aligned_writes_within_the_budget() {
        timeout(LIMIT, async {
            let dir = tempfile::tempdir().unwrap();
            let (dialer, acceptor) = connected_pair(dir.path()).await;
            const BUDGET_KIB: usize = 64;
            let accepting = acceptor.clone();
            let mut reading = read_from(
                &acceptor,
                StreamKind::Data,
                Some(ReceiveBudget::new(BUDGET_KIB)),
                async move { accepting.accept_uni().await.unwrap() },
            );

            // Writes of several sizes (one shared rather than copied, one larger than the
            // whole budget), then a barrier, in two stream writes.
            let sizes = [4096, 4096, 12288, 0, ZERO_COPY_MIN, 4096, 1 << 20, 8192];
            let mut expected = Vec::new();
            let mut send = dialer.open_uni().await.unwrap();
            let mut batch = FrameBatch::new();
            let mut chunks = Vec::new();
            for round in 0..2u64 {
                for (i, len) in sizes.iter().enumerate() {
                    let seq = round * 100 + i as u64 + 1;
                    batch
                        .push_data(
                            &DataHeader {
                                seq,
                                epoch: 1,
                                request: seq + 1000,
                                offset: seq * 4096,
                                seen: seq / 2,
                            },
                            payload(seq, *len),
                        )
                        .unwrap();
                    expected.push((seq, *len));
                }
                write_batch(&mut send, &mut batch, &mut chunks)
                    .await
                    .unwrap();
            }
            let barrier = PeerMessage::Barrier {
                seq: 999,
                epoch: 1,
                writes: 16,
                flush: true,
            };
            batch.push_message(&barrier).unwrap();
            write_batch(&mut send, &mut batch, &mut chunks)
                .await
                .unwrap();
            send.finish().unwrap();

            let mut got = Vec::new();
            while got.len() < expected.len() + 1 {
                let Report::Batch(events) = reading.next().await else {
                    panic!("the link was lost before the last write arrived");
                };
                // Every event of a batch holds its budget at once, so no batch can hold more
                // than the whole budget (the oversized write comes alone).
                let mut held = 0;
                for event in events {
                    match event {
                        LinkEvent::Data {
                            conn,
                            seq,
                            epoch,
                            request,
                            offset,
                            seen,
                            data,
                            budget,
                        } => {
                            assert_eq!(seen, seq / 2, "seen travels with the write");
                            assert_eq!(
                                (conn, epoch, request, offset),
                                (7, 1, seq + 1000, seq * 4096)
                            );
                            assert_eq!(data.as_ptr() as usize % 4096, 0, "payload not aligned");
                            assert!(
                                data[..] == payload(seq, data.len())[..],
                                "seq {seq} altered"
                            );
                            let budget = budget.expect("a write holds budget");
                            assert!(
                                budget.num_permits() * 1024
                                    >= pooled_capacity(data.len()).min(BUDGET_KIB << 10)
                            );
                            held += budget.num_permits();
                            got.push((seq, data.len()));
                        }
                        LinkEvent::Message {
                            conn: 7,
                            message,
                            budget: Some(_),
                        } => {
                            assert_eq!(message, barrier);
                            held += 1;
                            got.push((999, 0));
                        }
                        _ => panic!("unexpected event"),
                    }
                }
                assert!(held <= BUDGET_KIB, "one batch held {held} KiB");
            }
            expected.push((999, 0));
            assert_eq!(got, expected);

            // The stream's end waits for the peer's close, and says so.
            dialer.close(0u32.into(), b"done");
            match reading.next().await {
                Report::Lost(reason) => {
                    assert!(reason.contains("peer closed the data stream"), "{reason}")
                }
                Report::Batch(_) => panic!("a batch after the end of the stream"),
            }
        })
        .await
        .expect("test timed out");
    }

    #[actix_rt::test]
    async fn the_peers_last_words_reach_the_device_before_the_loss() {
        timeout(LIMIT, async {
            let dir = tempfile::tempdir().unwrap();
            let (peer, ours) = connected_pair(dir.path()).await;
            // The peer refuses, finishes its streams, and closes once the refusal is acked.
            let refusal = PeerMessage::Refused {
                reason: "split brain".into(),
                standalone: true,
            };
            let (mut control, _) = peer.open_bi().await.unwrap();
            control.write_all(&encode(&refusal)).await.unwrap();
            control.finish().unwrap();
            for _stream in ["data", "resync"] {
                let mut send = peer.open_uni().await.unwrap();
                send.finish().unwrap();
            }
            let (_, control_recv) = ours.accept_bi().await.unwrap();
            control.stopped().await.unwrap();
            peer.close(2u32.into(), b"split brain");

            let (reports, mut reading) = mpsc::unbounded_channel();
            let collector = Collector(reports).start();
            let reader = StreamReader {
                device: collector.clone().recipient(),
                connection: ours.clone(),
                peer: 1,
                conn: 7,
            };
            let lost = move |reason| collector.do_send(Lost(reason));
            let (done, control_done) = oneshot::channel();
            let control_done = ControlDone(control_done.shared());
            let budget = Arc::new(ReceiveBudget::new(64));
            let (data_accepted, after_data) = oneshot::channel();
            actix::spawn(uni_reader(
                UniReaderContext {
                    kind: StreamKind::Data,
                    budget: budget.clone(),
                    after: None,
                    accepted: Some(data_accepted),
                    control_done: control_done.clone(),
                },
                reader.clone(),
                lost.clone(),
            ));
            actix::spawn(uni_reader(
                UniReaderContext {
                    kind: StreamKind::Resync,
                    budget,
                    after: Some(after_data),
                    accepted: None,
                    control_done,
                },
                reader.clone(),
                lost.clone(),
            ));
            // The control reader runs late: only once the close has arrived.
            ours.closed().await;
            actix::spawn(control_reader(control_recv, reader, lost, done));

            let Some(Report::Batch(events)) = reading.recv().await else {
                panic!("the loss was reported before the refusal reached the device");
            };
            match &events[..] {
                [LinkEvent::Message { message, .. }] => assert_eq!(message, &refusal),
                _ => panic!("expected the refusal alone"),
            }
            for _ in 0..3 {
                match reading.recv().await {
                    Some(Report::Lost(reason)) => {
                        assert!(reason.contains("split brain"), "{reason}")
                    }
                    _ => panic!("expected every reader to report the loss"),
                }
            }
        })
        .await
        .expect("test timed out");
    }

    /// A link's two unidirectional streams end to end: writers on one side, readers on the
    /// other, set up as [`PeerActor`] does. The data stream is opened first but not written
    /// until the resync stream delivered, so the readers must still each get their own
    /// stream; resync payloads land aligned, within the budget the readers share, and the
    /// sender's payload (shared with quinn, not copied) is released once delivered.
    #[actix_rt::test]
    async fn the_resync_stream_is_opened_second_and_carries_payloads_on_its_own() {
        timeout(LIMIT, async {
            let dir = tempfile::tempdir().unwrap();
            let (dialer, acceptor) = connected_pair(dir.path()).await;

            // The sending side.
            let (sent_reports, _sent) = mpsc::unbounded_channel();
            let sent_to = Collector(sent_reports).start().recipient();
            let (data_tx, data_rx) = mpsc::unbounded_channel();
            let (resync_tx, resync_rx) = mpsc::unbounded_channel();
            let (data_opened, after_data_opened) = oneshot::channel();
            let writer = |kind, after, opened| UniWriterContext {
                kind,
                connection: dialer.clone(),
                device: sent_to.clone(),
                peer: 1,
                report_sent: false,
                after,
                opened,
            };
            let no_loss = |reason: String| panic!("a writer lost the link: {reason}");
            actix::spawn(uni_writer(
                writer(StreamKind::Data, None, Some(data_opened)),
                data_rx,
                no_loss,
            ));
            actix::spawn(uni_writer(
                writer(StreamKind::Resync, Some(after_data_opened), None),
                resync_rx,
                no_loss,
            ));

            // The receiving side.
            let (reports, reading) = mpsc::unbounded_channel();
            let mut reading = Reading(reading);
            let collector = Collector(reports).start();
            let reader = StreamReader {
                device: collector.clone().recipient(),
                connection: acceptor.clone(),
                peer: 1,
                conn: 7,
            };
            let lost = move |reason| collector.do_send(Lost(reason));
            let (control, control_done) = oneshot::channel::<()>();
            let control_done = ControlDone(control_done.shared());
            const BUDGET_KIB: usize = 1024;
            let budget = Arc::new(ReceiveBudget::new(BUDGET_KIB));
            let (data_accepted, after_data_accepted) = oneshot::channel();
            for (kind, after, accepted) in [
                (StreamKind::Data, None, Some(data_accepted)),
                (StreamKind::Resync, Some(after_data_accepted), None),
            ] {
                actix::spawn(uni_reader(
                    UniReaderContext {
                        kind,
                        budget: budget.clone(),
                        after,
                        accepted,
                        control_done: control_done.clone(),
                    },
                    reader.clone(),
                    lost.clone(),
                ));
            }

            // Resync traffic first: a request and two payloads, one shared with quinn.
            let pool = BufferPool::new(4 << 20);
            let read_budget = Arc::new(Semaphore::new(1024));
            let request = PeerMessage::ResyncRequest {
                offset: 1 << 20,
                len: 256 << 10,
            };
            resync_tx
                .send(PeerOutbound::Message(request.clone()))
                .unwrap();
            let sizes = [256 << 10, 4096];
            for (i, len) in sizes.into_iter().enumerate() {
                let mut buf = pool.acquire(len);
                buf.copy_from_slice(&payload(i as u64, len));
                let permit = read_budget.clone().acquire_many_owned(256).await.unwrap();
                let data = ResyncPayload::new(buf, permit);
                let offset = (i as u64 + 1) << 20;
                resync_tx
                    .send(PeerOutbound::ResyncData {
                        conn: 7,
                        offset,
                        data,
                    })
                    .unwrap();
            }
            let mut got = Vec::new();
            while got.len() < 1 + sizes.len() {
                let Report::Batch(events) = reading.next().await else {
                    panic!("the link was lost before the resync traffic arrived");
                };
                for event in events {
                    match event {
                        LinkEvent::Message {
                            conn: 7,
                            message,
                            budget: Some(_),
                        } => {
                            assert_eq!(message, request);
                            got.push(0);
                        }
                        LinkEvent::ResyncData {
                            conn: 7,
                            offset,
                            data,
                            budget,
                        } => {
                            let i = (offset >> 20) - 1;
                            assert_eq!(data.as_ptr() as usize % 4096, 0, "payload not aligned");
                            assert!(data[..] == payload(i, sizes[i as usize])[..]);
                            assert!(budget.is_some(), "a payload holds budget");
                            got.push(offset);
                        }
                        _ => panic!("unexpected event"),
                    }
                }
            }
            assert_eq!(got, [0, 1 << 20, 2 << 20]);
            // Delivered and acknowledged: the sender let go of both payloads and their budget.
            drop(read_budget.acquire_many(1024).await.unwrap());
            assert_eq!(pool.usage().bytes_in_use, 0);

            // Then the data stream, which was opened first.
            let mut write = pool.acquire(8192);
            write.copy_from_slice(&payload(9, 8192));
            data_tx
                .send(PeerOutbound::Data {
                    seq: 1,
                    epoch: 1,
                    request: 5,
                    offset: 0,
                    seen: 0,
                    data: Arc::new(write),
                })
                .unwrap();
            let Report::Batch(events) = reading.next().await else {
                panic!("the link was lost before the write arrived");
            };
            match &events[..] {
                [LinkEvent::Data {
                    conn: 7,
                    seq: 1,
                    data,
                    ..
                }] => assert!(data[..] == payload(9, 8192)[..]),
                _ => panic!("expected the write alone"),
            }

            // The end of the connection ends both readers (no control reader here to wait for).
            drop(control);
            dialer.close(0u32.into(), b"done");
            let mut ended = Vec::new();
            for _ in 0..2 {
                match reading.next().await {
                    Report::Lost(reason) => {
                        assert!(reason.contains("connection lost"), "{reason}");
                        ended.push(reason.split(' ').next().unwrap_or_default().to_owned());
                    }
                    Report::Batch(_) => panic!("a batch after the end of the connection"),
                }
            }
            ended.sort();
            assert_eq!(ended, ["data", "resync"]);
        })
        .await
        .expect("test timed out");
    }

    /// Sends `bytes` on a new stream to a reader of `kind`; returns why the link was lost.
    async fn lost_after(bytes: Vec<u8>, kind: StreamKind) -> String {
        let dir = tempfile::tempdir().unwrap();
        let (dialer, acceptor) = connected_pair(dir.path()).await;
        let accepting = acceptor.clone();
        let mut reading = if kind == StreamKind::Control {
            read_from(&acceptor, kind, None, async move {
                accepting.accept_bi().await.unwrap().1
            })
        } else {
            read_from(&acceptor, kind, Some(ReceiveBudget::new(64)), async move {
                accepting.accept_uni().await.unwrap()
            })
        };
        let mut send = if kind == StreamKind::Control {
            dialer.open_bi().await.unwrap().0
        } else {
            dialer.open_uni().await.unwrap()
        };
        send.write_all(&bytes).await.unwrap();
        // What came before the bad frame is handed over first, then the loss.
        let mut before = 0;
        loop {
            match reading.next().await {
                Report::Batch(events) => before += events.len(),
                Report::Lost(reason) => {
                    assert_eq!(before, 1, "{reason}");
                    return reason;
                }
            }
        }
    }

    #[actix_rt::test]
    async fn bad_frames_end_the_link_with_the_reason() {
        timeout(LIMIT, async {
            let ping = encode(&PeerMessage::Ping { nonce: 1 });
            let data = encode(&PeerMessage::Data {
                seq: 1,
                epoch: 1,
                request: 1,
                offset: 0,
                seen: 0,
                data: vec![1; 4096],
            });
            let reason =
                lost_after([ping.clone(), data.clone()].concat(), StreamKind::Control).await;
            assert_eq!(reason, "protocol error: Data on the control stream");

            let barrier = encode(&PeerMessage::Barrier {
                seq: 1,
                epoch: 1,
                writes: 0,
                flush: false,
            });
            let reason =
                lost_after([barrier.clone(), ping.clone()].concat(), StreamKind::Data).await;
            assert_eq!(reason, "protocol error: Ping on the data stream");

            let reason = lost_after(
                [barrier.clone(), vec![0, 0, 0, 2, 99, 0]].concat(),
                StreamKind::Data,
            )
            .await;
            assert_eq!(reason, "data stream: unknown message tag 99");

            // Resync traffic has a stream of its own, and only it.
            let request = encode(&PeerMessage::ResyncRequest {
                offset: 0,
                len: 4096,
            });
            let resync_data = encode(&PeerMessage::ResyncData {
                offset: 0,
                data: vec![2; 4096],
            });
            let reason = lost_after(
                [barrier.clone(), resync_data.clone()].concat(),
                StreamKind::Data,
            )
            .await;
            assert_eq!(reason, "protocol error: ResyncData on the data stream");
            let reason = lost_after(
                [ping.clone(), request.clone()].concat(),
                StreamKind::Control,
            )
            .await;
            assert_eq!(
                reason,
                "protocol error: ResyncRequest on the control stream"
            );
            let reason = lost_after([request.clone(), data].concat(), StreamKind::Resync).await;
            assert_eq!(reason, "protocol error: Data on the resync stream");
            let reason = lost_after([request.clone(), barrier].concat(), StreamKind::Resync).await;
            assert_eq!(reason, "protocol error: Barrier on the resync stream");
            let reason = lost_after([resync_data, ping].concat(), StreamKind::Resync).await;
            assert_eq!(reason, "protocol error: Ping on the resync stream");
            // Refused on the announced length alone, before the payload arrives.
            let oversized = encode(&PeerMessage::ResyncData {
                offset: 0,
                data: vec![2; MAX_RESYNC_PAYLOAD + 1],
            });
            let head = &oversized[..RESYNC_DATA_HEADER_LEN];
            let reason = lost_after([&request[..], head].concat(), StreamKind::Resync).await;
            assert_eq!(
                reason,
                "resync stream: ResyncData payload of 1048577 bytes exceeds the maximum of \
                 1048576 bytes"
            );
        })
        .await
        .expect("test timed out");
    }
}
