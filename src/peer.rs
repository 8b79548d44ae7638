//! The PeerActor: one per (resource, peer), and a thin shell around a QUIC connection. It dials
//! when the resource's core asks, reads and writes the streams, and reports every message and
//! every connection change to the device actor, where the core decides what they mean: the
//! handshake, liveness (pings and request timeouts), backoff and refusals all live in the core
//! (docs/protocol.md). One control stream (handshake, acks, pings, state-change replies: small
//! and never stuck behind bulk data) and one ordered data stream per direction (writes,
//! barriers, and the role announcements that must not overtake them).
//!
//! The node with the lower id dials; the other accepts (see [`accept_loop`]). One connection
//! per resource and peer; each gets a new number (`conn`), so the core can ignore the late
//! reports of an old one.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use qrbd_actors::core::messages::PeerMessage;
use qrbd_actors::core::replication::PeerId;
use qrbd_actors::core::ReplicationProtocol;
use qrbd_actors::device::{DeviceActor, FromPeer, LinkEvent, PeerOutbound, ToPeer};
use tokio::sync::mpsc;

use crate::config::QrbdConfig;
use crate::transport::{self, read_message, write_data, write_message};

/// Bytes received from a peer and not yet written locally, at most (in KiB permits).
pub const RECEIVE_BUDGET_KIB: usize = 64 << 10;
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
            let connect = {
                let (endpoint, peer_name) = (endpoint.clone(), peer_name.clone());
                async move { transport::connect(&endpoint, address, &peer_name).await }
            };
            let connection = transport::on_transport(connect)
                .await
                .map_err(|error| format!("{error:#}"))?
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
        let lost = {
            let device = device.clone();
            move |reason: String| {
                device.do_send(FromPeer {
                    peer,
                    event: LinkEvent::TransportDown { conn, reason },
                })
            }
        };
        let writers = vec![
            tokio::spawn(control_writer(msg.control_send, control_rx, lost.clone())),
            tokio::spawn(data_writer(
                DataWriterContext {
                    connection: connection.clone(),
                    device: device.clone(),
                    peer,
                    report_sent: self.setup.protocol == ReplicationProtocol::A,
                },
                data_rx,
                lost.clone(),
            )),
        ];
        let reader = StreamReader {
            device: device.clone(),
            connection: connection.clone(),
            peer,
            conn,
        };
        let readers = vec![
            tokio::spawn(control_reader(
                msg.control_recv,
                reader.clone(),
                lost.clone(),
            )),
            tokio::spawn(data_reader(connection.clone(), reader, lost)),
        ];
        self.live = Some(Live {
            conn,
            connection: msg.connection,
            control_tx,
            data_tx,
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
    fn handle(&mut self, ToPeer(outbound): ToPeer, ctx: &mut Context<Self>) {
        match outbound {
            PeerOutbound::Dial => self.dial(ctx),
            PeerOutbound::Close { conn, reason } => {
                if self.live.as_ref().is_some_and(|live| live.conn == conn) {
                    tracing::debug!(resource = %self.setup.resource, peer = %self.setup.peer_name, %reason, "closing the connection");
                    self.close_live(CLOSE_PROTOCOL, &reason);
                }
            }
            PeerOutbound::Message(message) if !message.on_data_stream() => {
                if let Some(live) = &self.live {
                    // A closed channel means the connection is going; the core hears of it.
                    let _ = live.control_tx.send(message);
                }
            }
            data => {
                if let Some(live) = &self.live {
                    let _ = live.data_tx.send(data);
                }
            }
        }
    }
}

async fn control_writer(
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<PeerMessage>,
    lost: impl Fn(String),
) {
    while let Some(message) = rx.recv().await {
        if let Err(error) = write_message(&mut send, &message).await {
            return lost(format!("control stream: {error}"));
        }
    }
    // The link is closing: let the peer read what was sent (a refusal) before the close.
    let _ = send.finish();
    let _ = send.stopped().await;
}

struct DataWriterContext {
    connection: quinn::Connection,
    device: Addr<DeviceActor>,
    peer: PeerId,
    /// Protocol A completes a write once the transport took it.
    report_sent: bool,
}

async fn data_writer(
    context: DataWriterContext,
    mut rx: mpsc::UnboundedReceiver<PeerOutbound>,
    lost: impl Fn(String),
) {
    let DataWriterContext {
        connection,
        device,
        peer,
        report_sent,
    } = context;
    let mut send = match connection.open_uni().await {
        Ok(send) => send,
        Err(error) => return lost(format!("data stream: {error}")),
    };
    while let Some(outbound) = rx.recv().await {
        let (result, sent) = match outbound {
            PeerOutbound::Data {
                seq,
                epoch,
                request,
                offset,
                data,
            } => (
                write_data(&mut send, seq, epoch, request, offset, &data).await,
                Some(request),
            ),
            PeerOutbound::Message(message) => {
                let request = match &message {
                    PeerMessage::Discard { request, .. } => Some(*request),
                    _ => None,
                };
                (write_message(&mut send, &message).await, request)
            }
            PeerOutbound::Dial | PeerOutbound::Close { .. } => (Ok(()), None),
        };
        if let Err(error) = result {
            return lost(format!("data stream: {error}"));
        }
        if let (Some(request), true) = (sent, report_sent) {
            device.do_send(FromPeer {
                peer,
                event: LinkEvent::Sent { request },
            });
        }
    }
    let _ = send.finish();
}

#[derive(Clone)]
struct StreamReader {
    device: Addr<DeviceActor>,
    connection: quinn::Connection,
    peer: PeerId,
    conn: u64,
}

impl StreamReader {
    fn deliver(&self, message: PeerMessage, budget: Option<tokio::sync::OwnedSemaphorePermit>) {
        self.device.do_send(FromPeer {
            peer: self.peer,
            event: LinkEvent::Message {
                conn: self.conn,
                message,
                budget,
            },
        });
    }
}

async fn control_reader(mut recv: quinn::RecvStream, reader: StreamReader, lost: impl Fn(String)) {
    loop {
        match next_message(&mut recv, &reader.connection, "control").await {
            Ok(message) if message.on_data_stream() => {
                return lost(format!(
                    "protocol error: {} on the control stream",
                    message.name()
                ))
            }
            Ok(message) => reader.deliver(message, None),
            Err(reason) => return lost(reason),
        }
    }
}

async fn data_reader(connection: quinn::Connection, reader: StreamReader, lost: impl Fn(String)) {
    let budget = Arc::new(tokio::sync::Semaphore::new(RECEIVE_BUDGET_KIB));
    let mut recv = match connection.accept_uni().await {
        Ok(recv) => recv,
        Err(error) => return lost(format!("data stream: {error}")),
    };
    loop {
        let message = match next_message(&mut recv, &reader.connection, "data").await {
            Ok(message) if message.on_data_stream() => message,
            Ok(other) => {
                return lost(format!(
                    "protocol error: {} on the data stream",
                    other.name()
                ))
            }
            Err(reason) => return lost(reason),
        };
        let kib = match &message {
            PeerMessage::Data { data, .. } => data.len().div_ceil(1024).max(1),
            _ => 1,
        };
        let permits = u32::try_from(kib.min(RECEIVE_BUDGET_KIB)).unwrap_or(u32::MAX);
        // Waits while the local disk is behind; the stream stops being read meanwhile.
        let Ok(permit) = budget.clone().acquire_many_owned(permits).await else {
            return;
        };
        reader.deliver(message, Some(permit));
    }
}

/// The next message of a stream; its end or a bad frame is the end of the connection.
///
/// A peer that closes finishes its streams first and closes the connection a moment later
/// (after its last words, e.g. a refusal, went out on the other stream), so a finished stream
/// waits for that close: the other stream's messages reach the core before the loss does, and
/// the loss carries the peer's reason.
async fn next_message(
    recv: &mut quinn::RecvStream,
    connection: &quinn::Connection,
    stream: &str,
) -> Result<PeerMessage, String> {
    match read_message(recv).await {
        Ok(Some(message)) => Ok(message),
        Ok(None) => {
            let closed = connection.closed().await;
            Err(format!("peer closed the {stream} stream ({closed})"))
        }
        Err(error) => Err(format!("{stream} stream: {error}")),
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
    let connection = transport::on_transport(async move { incoming.await })
        .await
        .map_err(|error| format!("{error:#}"))?
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
