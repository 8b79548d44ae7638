//! The PeerActor: one per (resource, peer). It owns the QUIC connection to that peer: the
//! handshake, one control stream (state, acknowledgements, pings: small and never stuck behind
//! bulk data) and one ordered data stream per direction (writes, discards, barriers), liveness,
//! and reconnecting with backoff. It is a thin shell: what the messages mean is decided by the
//! device's replication core and by the resource supervisor.
//!
//! The node with the lower id dials; the other accepts (see [`accept_loop`]). One connection
//! per resource and peer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use qrbd_actors::core::messages::{PeerMessage, PROTOCOL_VERSION};
use qrbd_actors::core::replication::PeerId;
use qrbd_actors::core::{ConnectionState, ReplicationProtocol};
use qrbd_actors::device::{
    AttachPeer, DetachPeer, DeviceActor, FromPeer, PeerOutbound, PeerSent, ToPeer,
};
use qrbd_actors::supervisor::{PeerLinkCommand, PeerReport, ResourceSupervisor};
use tokio::sync::mpsc;

use crate::config::QrbdConfig;
use crate::transport::{self, read_message, write_data, write_message};

/// Idle connections ping this often.
pub const PING_INTERVAL: Duration = Duration::from_millis(1000);
/// A connection whose pings go unanswered this long is dropped.
pub const PING_TIMEOUT: Duration = Duration::from_millis(4000);
/// A replicated request (or barrier) unanswered this long drops the connection: DRBD's
/// ko-count (7) times timeout (6 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(42);
/// Bytes received from a peer and not yet written locally, at most (in KiB permits).
pub const RECEIVE_BUDGET_KIB: usize = 64 << 10;
/// The peer must answer the handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// QUIC application close codes.
const CLOSE_NORMAL: u32 = 0;
const CLOSE_PROTOCOL: u32 = 2;

/// Who we are and what we replicate, as told in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    pub node_id: u8,
    pub node_name: String,
    pub resource: String,
    pub size_bytes: u64,
    pub protocol: ReplicationProtocol,
}

impl HelloInfo {
    pub fn message(&self) -> PeerMessage {
        PeerMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: self.node_id,
            node_name: self.node_name.clone(),
            resource: self.resource.clone(),
            size_bytes: self.size_bytes,
            protocol: self.protocol,
        }
    }

    /// Checks the peer's Hello against what we expect of it; the error is for both logs.
    pub fn check_peer(
        &self,
        hello: &PeerMessage,
        peer_id: u8,
        peer_name: &str,
    ) -> Result<(), String> {
        let PeerMessage::Hello {
            protocol_version,
            node_id,
            node_name,
            resource,
            size_bytes,
            protocol,
        } = hello
        else {
            return Err(format!("expected a Hello, got {hello:?}"));
        };
        if *protocol_version != PROTOCOL_VERSION {
            return Err(format!(
                "incompatible qrbd protocol version {protocol_version} (this node speaks {PROTOCOL_VERSION})"
            ));
        }
        if *resource != self.resource {
            return Err(format!(
                "peer offers resource {resource:?}, expected {:?}",
                self.resource
            ));
        }
        if *node_id != peer_id || node_name != peer_name {
            return Err(format!(
                "peer is node {node_name:?} (id {node_id}), expected {peer_name:?} (id {peer_id})"
            ));
        }
        if *size_bytes != self.size_bytes {
            return Err(format!(
                "resource {:?}: peer size is {size_bytes} bytes, ours is {} bytes",
                self.resource, self.size_bytes
            ));
        }
        if *protocol != self.protocol {
            return Err(format!(
                "resource {:?}: peer uses protocol {protocol}, ours is {}",
                self.resource, self.protocol
            ));
        }
        Ok(())
    }
}

/// Everything a PeerActor needs.
pub struct PeerLinkSetup {
    pub local: HelloInfo,
    pub peer_id: PeerId,
    pub peer_name: String,
    pub peer_address: std::net::SocketAddr,
    pub endpoint: quinn::Endpoint,
    pub device: Addr<DeviceActor>,
    pub supervisor: Addr<ResourceSupervisor>,
}

/// A connection that passed the handshake.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Established {
    pub connection: quinn::Connection,
    pub control_send: quinn::SendStream,
    pub control_recv: quinn::RecvStream,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ConnectionLost {
    generation: u64,
    state: ConnectionState,
    reason: String,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Dial;

pub struct PeerActor {
    setup: PeerLinkSetup,
    dials: bool,
    standalone: bool,
    state: ConnectionState,
    generation: u64,
    connection: Option<quinn::Connection>,
    control_tx: Option<mpsc::UnboundedSender<PeerMessage>>,
    data_tx: Option<mpsc::UnboundedSender<PeerOutbound>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    backoff: Duration,
    dialing: bool,
    local_state: Option<PeerMessage>,
}

impl PeerActor {
    pub fn new(setup: PeerLinkSetup) -> Self {
        let dials = setup.local.node_id < setup.peer_id;
        PeerActor {
            setup,
            dials,
            standalone: false,
            state: ConnectionState::StandAlone,
            generation: 0,
            connection: None,
            control_tx: None,
            data_tx: None,
            tasks: Vec::new(),
            backoff: MIN_BACKOFF,
            dialing: false,
            local_state: None,
        }
    }

    fn set_state(&mut self, state: ConnectionState) {
        if self.state != state {
            self.state = state;
            self.setup.supervisor.do_send(PeerReport::Connection {
                peer: self.setup.peer_id,
                state,
            });
        }
    }

    fn schedule_dial(&mut self, ctx: &mut Context<Self>) {
        if !self.dials || self.standalone || self.dialing {
            return;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        ctx.notify_later(Dial, delay);
    }

    fn teardown(&mut self, code: u32, reason: &str) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.control_tx = None;
        self.data_tx = None;
        if let Some(connection) = self.connection.take() {
            connection.close(code.into(), reason.as_bytes());
            self.setup.device.do_send(DetachPeer {
                peer: self.setup.peer_id,
            });
        }
    }

    fn lose(&mut self, state: ConnectionState, reason: &str, ctx: &mut Context<Self>) {
        let code = if state == ConnectionState::ProtocolError {
            CLOSE_PROTOCOL
        } else {
            CLOSE_NORMAL
        };
        self.teardown(code, reason);
        if self.standalone {
            self.set_state(ConnectionState::StandAlone);
            return;
        }
        self.set_state(state);
        self.set_state(ConnectionState::Connecting);
        self.schedule_dial(ctx);
    }
}

impl Actor for PeerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.setup.supervisor.do_send(PeerReport::Link {
            peer: self.setup.peer_id,
            link: ctx.address().recipient(),
        });
        self.set_state(ConnectionState::Connecting);
        if self.dials {
            ctx.notify(Dial);
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.teardown(CLOSE_NORMAL, "shutting down");
    }
}

impl Handler<Dial> for PeerActor {
    type Result = ();
    fn handle(&mut self, _: Dial, ctx: &mut Context<Self>) {
        if self.standalone || self.connection.is_some() || self.dialing {
            return;
        }
        self.dialing = true;
        let endpoint = self.setup.endpoint.clone();
        let address = self.setup.peer_address;
        let peer_name = self.setup.peer_name.clone();
        let peer_id = self.setup.peer_id;
        let local = self.setup.local.clone();
        let dial = async move {
            let dial = {
                let (endpoint, peer_name) = (endpoint.clone(), peer_name.clone());
                async move { transport::connect(&endpoint, address, &peer_name).await }
            };
            let connection = transport::on_transport(dial)
                .await
                .map_err(|error| (ConnectionState::NetworkFailure, format!("{error:#}")))?
                .map_err(|error| (ConnectionState::NetworkFailure, format!("{error:#}")))?;
            let handshake = async {
                let (mut send, mut recv) = connection
                    .open_bi()
                    .await
                    .map_err(|error| (ConnectionState::NetworkFailure, error.to_string()))?;
                write_message(&mut send, &local.message())
                    .await
                    .map_err(|error| (ConnectionState::NetworkFailure, error.to_string()))?;
                let reply = read_message(&mut recv)
                    .await
                    .map_err(|error| (ConnectionState::ProtocolError, error.to_string()))?;
                match reply {
                    Some(PeerMessage::Refused { reason }) => Err((
                        ConnectionState::ProtocolError,
                        format!("peer {peer_name} refused the connection: {reason}"),
                    )),
                    Some(hello) => match local.check_peer(&hello, peer_id, &peer_name) {
                        Ok(()) => Ok((send, recv)),
                        Err(reason) => {
                            let _ = write_message(
                                &mut send,
                                &PeerMessage::Refused {
                                    reason: reason.clone(),
                                },
                            )
                            .await;
                            Err((ConnectionState::ProtocolError, reason))
                        }
                    },
                    None => Err((
                        ConnectionState::NetworkFailure,
                        "peer closed the connection during the handshake".to_owned(),
                    )),
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok((send, recv))) => Ok(Established {
                    connection,
                    control_send: send,
                    control_recv: recv,
                }),
                Ok(Err((state, reason))) => {
                    connection.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
                    Err((state, reason))
                }
                Err(_) => {
                    connection.close(CLOSE_NORMAL.into(), b"handshake timeout");
                    Err((ConnectionState::Timeout, "handshake timed out".to_owned()))
                }
            }
        };
        ctx.spawn(dial.into_actor(self).map(|result, actor, ctx| {
            actor.dialing = false;
            match result {
                Ok(established) => ctx.notify(established),
                Err((state, reason)) => {
                    tracing::warn!(resource = %actor.setup.local.resource, peer = %actor.setup.peer_name, %reason, "connecting failed");
                    actor.lose(state, &reason, ctx);
                }
            }
        }));
    }
}

impl Handler<Established> for PeerActor {
    type Result = ();
    fn handle(&mut self, msg: Established, ctx: &mut Context<Self>) {
        if self.standalone {
            msg.connection.close(CLOSE_NORMAL.into(), b"StandAlone");
            return;
        }
        self.teardown(CLOSE_NORMAL, "replaced by a new connection");
        self.generation += 1;
        self.backoff = MIN_BACKOFF;
        let generation = self.generation;
        let me = ctx.address();
        let peer = self.setup.peer_id;
        let device = self.setup.device.clone();
        let supervisor = self.setup.supervisor.clone();
        let connection = msg.connection.clone();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::unbounded_channel();
        let last_pong = Arc::new(AtomicU64::new(0));
        let outstanding = Arc::new(std::sync::Mutex::new(Outstanding::default()));
        let track_requests = self.setup.local.protocol != ReplicationProtocol::A;
        let started = Instant::now();
        let lost = {
            let me = me.clone();
            move |state: ConnectionState, reason: String| {
                me.do_send(ConnectionLost {
                    generation,
                    state,
                    reason,
                })
            }
        };
        self.tasks.push(tokio::spawn(control_writer(
            msg.control_send,
            control_rx,
            lost.clone(),
        )));
        self.tasks.push(tokio::spawn(data_writer(
            DataWriterContext {
                connection: connection.clone(),
                device: device.clone(),
                peer,
                outstanding: outstanding.clone(),
                track_requests,
            },
            data_rx,
            lost.clone(),
        )));
        self.tasks.push(tokio::spawn(control_reader(
            msg.control_recv,
            ControlReaderContext {
                device: device.clone(),
                supervisor,
                peer,
                control_tx: control_tx.clone(),
                last_pong: last_pong.clone(),
                started,
                outstanding: outstanding.clone(),
            },
            lost.clone(),
        )));
        self.tasks.push(tokio::spawn(data_reader(
            connection.clone(),
            device.clone(),
            peer,
            lost.clone(),
        )));
        self.tasks.push(tokio::spawn(pinger(
            control_tx.clone(),
            last_pong,
            started,
            outstanding,
            lost,
        )));
        self.connection = Some(msg.connection);
        self.control_tx = Some(control_tx);
        self.data_tx = Some(data_tx);
        device.do_send(AttachPeer {
            peer,
            protocol: self.setup.local.protocol,
            link: ctx.address().recipient(),
        });
        tracing::info!(resource = %self.setup.local.resource, peer = %self.setup.peer_name, "connected");
        self.set_state(ConnectionState::Connected);
        if let (Some(tx), Some(state)) = (&self.control_tx, &self.local_state) {
            let _ = tx.send(state.clone());
        }
    }
}

impl Handler<ConnectionLost> for PeerActor {
    type Result = ();
    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Context<Self>) {
        if msg.generation != self.generation || self.connection.is_none() {
            return;
        }
        tracing::warn!(resource = %self.setup.local.resource, peer = %self.setup.peer_name, state = %msg.state, reason = %msg.reason, "connection lost");
        self.lose(msg.state, &msg.reason, ctx);
    }
}

impl Handler<ToPeer> for PeerActor {
    type Result = ();
    fn handle(&mut self, ToPeer(outbound): ToPeer, ctx: &mut Context<Self>) {
        match outbound {
            PeerOutbound::Ack(message) => {
                if let Some(tx) = &self.control_tx {
                    let _ = tx.send(message);
                }
            }
            PeerOutbound::Drop(reason) => {
                tracing::error!(resource = %self.setup.local.resource, peer = %self.setup.peer_name, %reason, "protocol error; dropping the connection");
                self.lose(ConnectionState::ProtocolError, &reason, ctx);
            }
            data => {
                if let Some(tx) = &self.data_tx {
                    let _ = tx.send(data);
                }
            }
        }
    }
}

impl Handler<PeerLinkCommand> for PeerActor {
    type Result = ();
    fn handle(&mut self, command: PeerLinkCommand, ctx: &mut Context<Self>) {
        match command {
            PeerLinkCommand::LocalState {
                role,
                disk,
                current_uuid,
                peer_missing_bytes,
            } => {
                let state = PeerMessage::State {
                    role,
                    disk,
                    current_uuid,
                    receiver_missing_bytes: peer_missing_bytes,
                };
                if let Some(tx) = &self.control_tx {
                    let _ = tx.send(state.clone());
                }
                self.local_state = Some(state);
            }
            PeerLinkCommand::Disconnect => {
                self.standalone = true;
                self.set_state(ConnectionState::Disconnecting);
                self.teardown(CLOSE_NORMAL, "disconnected by the administrator");
                self.set_state(ConnectionState::StandAlone);
            }
            PeerLinkCommand::Connect => {
                if self.standalone {
                    self.standalone = false;
                    self.set_state(ConnectionState::Connecting);
                    self.backoff = MIN_BACKOFF;
                    if self.dials {
                        ctx.notify(Dial);
                    }
                }
            }
        }
    }
}

async fn control_writer(
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<PeerMessage>,
    lost: impl Fn(ConnectionState, String),
) {
    while let Some(message) = rx.recv().await {
        if let Err(error) = write_message(&mut send, &message).await {
            return lost(
                ConnectionState::NetworkFailure,
                format!("control stream: {error}"),
            );
        }
    }
}

/// Replicated requests and barriers the peer has yet to answer, with when they were sent.
#[derive(Default)]
struct Outstanding {
    requests: std::collections::HashMap<u64, Instant>,
    barriers: std::collections::BTreeMap<u64, Instant>,
}

impl Outstanding {
    fn oldest(&self) -> Option<Instant> {
        self.requests
            .values()
            .chain(self.barriers.values())
            .min()
            .copied()
    }

    fn sent(&mut self, outbound: &PeerOutbound, track_requests: bool) {
        match outbound {
            PeerOutbound::Data { request, .. } | PeerOutbound::Discard { request, .. }
                if track_requests =>
            {
                self.requests.insert(*request, Instant::now());
            }
            PeerOutbound::Barrier { epoch, .. } => {
                self.barriers.insert(*epoch, Instant::now());
            }
            _ => {}
        }
    }

    fn answered(&mut self, ack: &PeerMessage) {
        match ack {
            PeerMessage::RecvAck { request }
            | PeerMessage::WriteAck { request }
            | PeerMessage::NegAck { request, .. } => {
                self.requests.remove(request);
            }
            PeerMessage::BarrierAck { epoch, .. } => self.barriers.retain(|e, _| e > epoch),
            _ => {}
        }
    }
}

struct DataWriterContext {
    connection: quinn::Connection,
    device: Addr<DeviceActor>,
    peer: PeerId,
    outstanding: Arc<std::sync::Mutex<Outstanding>>,
    /// Protocols B and C answer every request; A answers only barriers.
    track_requests: bool,
}

async fn data_writer(
    context: DataWriterContext,
    mut rx: mpsc::UnboundedReceiver<PeerOutbound>,
    lost: impl Fn(ConnectionState, String),
) {
    let DataWriterContext {
        connection,
        device,
        peer,
        outstanding,
        track_requests,
    } = context;
    let mut send = match connection.open_uni().await {
        Ok(send) => send,
        Err(error) => {
            return lost(
                ConnectionState::NetworkFailure,
                format!("data stream: {error}"),
            )
        }
    };
    while let Some(outbound) = rx.recv().await {
        if let Ok(mut pending) = outstanding.lock() {
            pending.sent(&outbound, track_requests);
        }
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
            PeerOutbound::Discard {
                seq,
                epoch,
                request,
                offset,
                len,
            } => (
                write_message(
                    &mut send,
                    &PeerMessage::Discard {
                        seq,
                        epoch,
                        request,
                        offset,
                        len,
                    },
                )
                .await,
                Some(request),
            ),
            PeerOutbound::Barrier {
                seq,
                epoch,
                writes,
                flush,
            } => (
                write_message(
                    &mut send,
                    &PeerMessage::Barrier {
                        seq,
                        epoch,
                        writes,
                        flush,
                    },
                )
                .await,
                None,
            ),
            PeerOutbound::Ack(_) | PeerOutbound::Drop(_) => (Ok(()), None),
        };
        if let Err(error) = result {
            return lost(
                ConnectionState::NetworkFailure,
                format!("data stream: {error}"),
            );
        }
        if let Some(request) = sent {
            device.do_send(PeerSent { peer, request });
        }
    }
}

struct ControlReaderContext {
    device: Addr<DeviceActor>,
    supervisor: Addr<ResourceSupervisor>,
    peer: PeerId,
    control_tx: mpsc::UnboundedSender<PeerMessage>,
    last_pong: Arc<AtomicU64>,
    started: Instant,
    outstanding: Arc<std::sync::Mutex<Outstanding>>,
}

async fn control_reader(
    mut recv: quinn::RecvStream,
    context: ControlReaderContext,
    lost: impl Fn(ConnectionState, String),
) {
    loop {
        let message = match next_message(&mut recv, "control").await {
            Ok(message) => message,
            Err((state, reason)) => return lost(state, reason),
        };
        match message {
            PeerMessage::State {
                role,
                disk,
                current_uuid,
                receiver_missing_bytes,
            } => context.supervisor.do_send(PeerReport::State {
                peer: context.peer,
                missing_bytes: receiver_missing_bytes,
                role,
                disk,
                current_uuid,
            }),
            PeerMessage::Ping { nonce } => {
                let _ = context.control_tx.send(PeerMessage::PingAck { nonce });
            }
            PeerMessage::PingAck { .. } => {
                let elapsed =
                    u64::try_from(context.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                context.last_pong.store(elapsed, Ordering::Relaxed);
            }
            ack @ (PeerMessage::RecvAck { .. }
            | PeerMessage::WriteAck { .. }
            | PeerMessage::NegAck { .. }
            | PeerMessage::BarrierAck { .. }) => {
                if let Ok(mut pending) = context.outstanding.lock() {
                    pending.answered(&ack);
                }
                context.device.do_send(FromPeer {
                    peer: context.peer,
                    message: ack,
                    budget: None,
                })
            }
            PeerMessage::Refused { reason } => {
                return lost(
                    ConnectionState::ProtocolError,
                    format!("peer refused: {reason}"),
                )
            }
            other => {
                return lost(
                    ConnectionState::ProtocolError,
                    format!(
                        "unexpected message on the control stream: {}",
                        message_name(&other)
                    ),
                )
            }
        }
    }
}

async fn data_reader(
    connection: quinn::Connection,
    device: Addr<DeviceActor>,
    peer: PeerId,
    lost: impl Fn(ConnectionState, String),
) {
    let budget = Arc::new(tokio::sync::Semaphore::new(RECEIVE_BUDGET_KIB));
    let mut recv = match connection.accept_uni().await {
        Ok(recv) => recv,
        Err(error) => {
            return lost(
                ConnectionState::NetworkFailure,
                format!("data stream: {error}"),
            )
        }
    };
    loop {
        let message = match next_message(&mut recv, "data").await {
            Ok(message) => message,
            Err((state, reason)) => return lost(state, reason),
        };
        match message {
            data @ (PeerMessage::Data { .. }
            | PeerMessage::Discard { .. }
            | PeerMessage::Barrier { .. }) => {
                let kib = match &data {
                    PeerMessage::Data { data, .. } => data.len().div_ceil(1024).max(1),
                    _ => 1,
                };
                let permits = u32::try_from(kib.min(RECEIVE_BUDGET_KIB)).unwrap_or(u32::MAX);
                // Waits while the local disk is behind; the stream stops being read meanwhile.
                let Ok(permit) = budget.clone().acquire_many_owned(permits).await else {
                    return;
                };
                device.do_send(FromPeer {
                    peer,
                    message: data,
                    budget: Some(permit),
                })
            }

            other => {
                return lost(
                    ConnectionState::ProtocolError,
                    format!(
                        "unexpected message on the data stream: {}",
                        message_name(&other)
                    ),
                )
            }
        }
    }
}

async fn pinger(
    control_tx: mpsc::UnboundedSender<PeerMessage>,
    last_pong: Arc<AtomicU64>,
    started: Instant,
    outstanding: Arc<std::sync::Mutex<Outstanding>>,
    lost: impl Fn(ConnectionState, String),
) {
    let mut nonce = 0u64;
    let mut interval = tokio::time::interval(PING_INTERVAL);
    loop {
        interval.tick().await;
        nonce += 1;
        if control_tx.send(PeerMessage::Ping { nonce }).is_err() {
            return;
        }
        let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let pong = last_pong.load(Ordering::Relaxed);
        let timeout = u64::try_from(PING_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(pong) > timeout {
            return lost(
                ConnectionState::Timeout,
                format!("no ping answer within {PING_TIMEOUT:?}"),
            );
        }
        let oldest = outstanding.lock().ok().and_then(|pending| pending.oldest());
        if oldest.is_some_and(|sent| sent.elapsed() > REQUEST_TIMEOUT) {
            return lost(
                ConnectionState::Timeout,
                format!("a replicated request went unanswered for {REQUEST_TIMEOUT:?}"),
            );
        }
    }
}

/// The next message of a stream; its end or a bad frame is the end of the connection.
async fn next_message(
    recv: &mut quinn::RecvStream,
    stream: &str,
) -> Result<PeerMessage, (ConnectionState, String)> {
    match read_message(recv).await {
        Ok(Some(message)) => Ok(message),
        Ok(None) => Err((
            ConnectionState::NetworkFailure,
            format!("peer closed the {stream} stream"),
        )),
        Err(error) => Err((state_of(&error), format!("{stream} stream: {error}"))),
    }
}

fn state_of(error: &transport::WireError) -> ConnectionState {
    match error {
        transport::WireError::Read(_) | transport::WireError::Write(_) => {
            ConnectionState::NetworkFailure
        }
        _ => ConnectionState::ProtocolError,
    }
}

fn message_name(message: &PeerMessage) -> &'static str {
    match message {
        PeerMessage::Hello { .. } => "Hello",
        PeerMessage::Refused { .. } => "Refused",
        PeerMessage::State { .. } => "State",
        PeerMessage::Data { .. } => "Data",
        PeerMessage::Discard { .. } => "Discard",
        PeerMessage::Barrier { .. } => "Barrier",
        PeerMessage::RecvAck { .. } => "RecvAck",
        PeerMessage::WriteAck { .. } => "WriteAck",
        PeerMessage::NegAck { .. } => "NegAck",
        PeerMessage::BarrierAck { .. } => "BarrierAck",
        PeerMessage::Ping { .. } => "Ping",
        PeerMessage::PingAck { .. } => "PingAck",
    }
}

/// Finds the running link for an incoming connection.
#[derive(Message)]
#[rtype(result = "Option<(HelloInfo, Addr<PeerActor>)>")]
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
            format!("expected a Hello, got {}", message_name(&hello)),
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
    let Some((local, link)) = link else {
        return refuse(
            send,
            &connection,
            format!("resource {resource:?} is not up on {}", config.node.name),
        )
        .await;
    };
    if let Err(reason) = local.check_peer(&hello, peer.id, &peer.name) {
        return refuse(send, &connection, reason).await;
    }
    let mut send = send;
    write_message(&mut send, &local.message())
        .await
        .map_err(|error| format!("handshake reply failed: {error}"))?;
    link.do_send(Established {
        connection,
        control_send: send,
        control_recv: recv,
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
        self.standalone = true;
        self.teardown(CLOSE_NORMAL, "resource down");
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
    use super::*;

    fn alpha() -> HelloInfo {
        HelloInfo {
            node_id: 0,
            node_name: "alpha".into(),
            resource: "r0".into(),
            size_bytes: 1 << 30,
            protocol: ReplicationProtocol::C,
        }
    }

    fn beta_hello() -> HelloInfo {
        HelloInfo {
            node_id: 1,
            node_name: "beta".into(),
            ..alpha()
        }
    }

    #[test]
    fn compatible_peer_passes() {
        assert_eq!(
            alpha().check_peer(&beta_hello().message(), 1, "beta"),
            Ok(())
        );
    }

    #[test]
    fn incompatible_peers_get_a_reason() {
        let cases = [
            (
                HelloInfo {
                    size_bytes: 1 << 20,
                    ..beta_hello()
                },
                "size",
            ),
            (
                HelloInfo {
                    protocol: ReplicationProtocol::A,
                    ..beta_hello()
                },
                "protocol",
            ),
            (
                HelloInfo {
                    resource: "r1".into(),
                    ..beta_hello()
                },
                "resource",
            ),
            (
                HelloInfo {
                    node_id: 2,
                    ..beta_hello()
                },
                "expected \"beta\"",
            ),
            (
                HelloInfo {
                    node_name: "mallory".into(),
                    ..beta_hello()
                },
                "mallory",
            ),
        ];
        for (hello, word) in cases {
            let reason = alpha()
                .check_peer(&hello.message(), 1, "beta")
                .err()
                .unwrap_or_default();
            assert!(reason.contains(word), "{reason:?} should mention {word:?}");
        }
        let reason = alpha()
            .check_peer(&PeerMessage::Ping { nonce: 1 }, 1, "beta")
            .err()
            .unwrap_or_default();
        assert!(reason.contains("expected a Hello"), "{reason}");
    }

    #[test]
    fn other_protocol_versions_are_refused() {
        let mut hello = beta_hello().message();
        if let PeerMessage::Hello {
            protocol_version, ..
        } = &mut hello
        {
            *protocol_version += 1;
        }
        let reason = alpha()
            .check_peer(&hello, 1, "beta")
            .err()
            .unwrap_or_default();
        assert!(reason.contains("version"), "{reason}");
    }

    #[test]
    fn outstanding_requests_and_barriers_age_until_answered() {
        let mut outstanding = Outstanding::default();
        assert!(outstanding.oldest().is_none());
        outstanding.sent(
            &PeerOutbound::Barrier {
                seq: 1,
                epoch: 1,
                writes: 0,
                flush: false,
            },
            true,
        );
        outstanding.sent(
            &PeerOutbound::Discard {
                seq: 2,
                epoch: 2,
                request: 9,
                offset: 0,
                len: 1,
            },
            true,
        );
        assert!(outstanding.oldest().is_some());
        outstanding.answered(&PeerMessage::BarrierAck {
            epoch: 1,
            writes: 0,
        });
        outstanding.answered(&PeerMessage::WriteAck { request: 9 });
        assert!(outstanding.oldest().is_none());
    }
}
