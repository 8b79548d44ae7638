//! The ResourceSupervisor: one per resource. It owns the role, the disk state and the metadata,
//! and carries out admin commands. It never waits on I/O admission or on a device's queue:
//! every step that needs another actor runs as a spawned future, so the supervisor's mailbox
//! keeps answering (status, events) while a role change or a drain is under way.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::broadcast;

use crate::core::replication::PeerId;
use crate::core::{ConnectionState, DiskState, ReplicationProtocol, Role};
use crate::device::{
    AddPeer, CloseDevice, DeviceActor, FlushStore, ResumeIo, SetWritable, SharedSnapshot,
    SuspendIo, WaitIdle,
};
use crate::gate::{GateRefused, ImageGate};
use crate::meta::DeviceMeta;
use crate::metadata::{MetaActor, SaveMeta};
use crate::ports::{BlockStore, MetaStore};
use crate::status::{PeerStatus, ResourceStatus};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateChangeError {
    #[error("another state change of this resource is in progress; try again")]
    Busy,
    #[error(transparent)]
    HeldOpen(#[from] GateRefused),
    #[error("local disk is {0}, not UpToDate; use --force to promote anyway")]
    DiskNotUpToDate(DiskState),
    #[error("metadata update failed: {0}")]
    Meta(String),
    #[error("device failed: {0}")]
    Device(String),
    #[error("the resource is going down")]
    GoingDown,
    #[error("peer {0} is Primary; two primaries are not allowed (demote it first)")]
    PeerIsPrimary(String),
    #[error("no peer is connected, so a peer may hold newer data; use --force to promote anyway")]
    NoPeerConnected,
}

/// Everything needed to bring a resource up.
pub struct ResourceSetup {
    pub name: String,
    pub protocol: ReplicationProtocol,
    pub store: Arc<dyn BlockStore>,
    pub meta_store: Box<dyn MetaStore>,
    pub meta: DeviceMeta,
    pub peers: Vec<PeerSetup>,
    /// Where state changes are announced, one `drbdsetup events2`-like line each.
    pub events: Option<broadcast::Sender<String>>,
    /// Flush at every epoch boundary when applying a peer's writes (DRBD's `disk-flushes`).
    pub disk_flushes: bool,
}

/// A configured peer of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSetup {
    pub id: PeerId,
    pub name: String,
}

/// What the supervisor tells a peer's link.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum PeerLinkCommand {
    /// Our role, disk state or generation changed: tell the peer.
    LocalState {
        role: Role,
        disk: DiskState,
        current_uuid: u64,
        /// Bytes we count as out of sync for this peer.
        peer_missing_bytes: u64,
    },
    /// Drop the connection and stay StandAlone (`qrbd disconnect`, `down`).
    Disconnect,
    /// Leave StandAlone and (re)connect (`qrbd connect`).
    Connect,
}

/// What a peer's link reports to the supervisor.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum PeerReport {
    /// The link of `peer` exists; commands go to it.
    Link {
        peer: PeerId,
        link: Recipient<PeerLinkCommand>,
    },
    Connection {
        peer: PeerId,
        state: ConnectionState,
    },
    /// The peer told us its state.
    State {
        peer: PeerId,
        role: Role,
        disk: DiskState,
        current_uuid: u64,
        /// Bytes the peer counts as out of sync for this node.
        missing_bytes: u64,
    },
}

struct PeerView {
    name: String,
    connection: ConnectionState,
    role: Option<Role>,
    disk: Option<DiskState>,
    link: Option<Recipient<PeerLinkCommand>>,
}

/// The handles the rest of the node keeps for a running resource.
#[derive(Clone)]
pub struct ResourceHandle {
    pub name: String,
    pub size_bytes: u64,
    pub supervisor: Addr<ResourceSupervisor>,
    pub device: Addr<DeviceActor>,
    pub gate: Arc<ImageGate>,
}

pub struct ResourceSupervisor {
    name: String,
    protocol: ReplicationProtocol,
    role: Role,
    disk: DiskState,
    meta: DeviceMeta,
    suspended: bool,
    going_down: bool,
    /// A role change or shutdown is under way; others are refused until it ends.
    changing: bool,
    device: Addr<DeviceActor>,
    device_snapshot: SharedSnapshot,
    meta_actor: Addr<MetaActor>,
    gate: Arc<ImageGate>,
    peers: BTreeMap<PeerId, PeerView>,
    events: Option<broadcast::Sender<String>>,
}

impl ResourceSupervisor {
    /// Starts the resource's actors (the device in the current arbiter, metadata on its own
    /// thread). The resource comes up Secondary, as DRBD's do.
    pub fn start(setup: ResourceSetup) -> ResourceHandle {
        let size_bytes = setup.store.size();
        let device_actor =
            DeviceActor::new(&setup.name, setup.store, false).with_disk_flushes(setup.disk_flushes);
        let device_snapshot = device_actor.snapshot_handle();
        let device = device_actor.start();
        for peer in &setup.peers {
            device.do_send(AddPeer {
                peer: peer.id,
                protocol: setup.protocol,
            });
        }
        let meta_actor = MetaActor::start_on_thread(setup.meta_store);
        let gate = Arc::new(ImageGate::new(false));
        let disk = if setup.meta.flags.consistent && setup.meta.flags.up_to_date {
            DiskState::UpToDate
        } else if setup.meta.flags.consistent {
            // Consistent but known to lack the peer's newer writes.
            DiskState::Outdated
        } else {
            DiskState::Inconsistent
        };
        if !setup.meta.flags.clean_shutdown {
            tracing::warn!(resource = %setup.name, "the previous run did not shut down cleanly");
        }
        let supervisor = ResourceSupervisor {
            name: setup.name.clone(),
            protocol: setup.protocol,
            role: Role::Secondary,
            disk,
            meta: setup.meta,
            suspended: false,
            going_down: false,
            changing: false,
            device: device.clone(),
            device_snapshot,
            meta_actor,
            gate: gate.clone(),
            peers: setup
                .peers
                .iter()
                .map(|peer| {
                    (
                        peer.id,
                        PeerView {
                            name: peer.name.clone(),
                            connection: ConnectionState::StandAlone,
                            role: None,
                            disk: None,
                            link: None,
                        },
                    )
                })
                .collect(),
            events: setup.events,
        }
        .start();
        ResourceHandle {
            name: setup.name,
            size_bytes,
            supervisor,
            device,
            gate,
        }
    }

    fn check_can_change(&self) -> Result<(), StateChangeError> {
        if self.going_down {
            return Err(StateChangeError::GoingDown);
        }
        if self.changing {
            return Err(StateChangeError::Busy);
        }
        Ok(())
    }

    fn status(&self) -> ResourceStatus {
        let device = self
            .device_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let open = self.gate.open_counts();
        let stats = device.stats;
        ResourceStatus {
            name: self.name.clone(),
            role: self.role,
            disk: self.disk,
            size_bytes: self.meta.size_bytes,
            protocol: self.protocol,
            suspended: self.suspended,
            app_in_flight: device.app_in_flight,
            app_held: device.held,
            open_writers: open.writers,
            open_readers: open.readers,
            reads: stats.reads,
            writes: stats.writes,
            flushes: stats.flushes,
            discards: stats.discards,
            read_bytes: stats.read_bytes,
            written_bytes: stats.written_bytes,
            discarded_bytes: stats.discarded_bytes,
            failed_requests: stats.failed,
            write_latency_avg_us: (stats.write_latency_total / 1000)
                .checked_div(stats.writes)
                .unwrap_or(0),
            write_latency_total_us: stats.write_latency_total / 1000,
            write_latency_buckets: stats.write_latency_buckets.to_vec(),
            write_latency_bounds_us: crate::core::WRITE_LATENCY_BOUNDS_US.to_vec(),
            conflicts: stats.conflicts,
            retries: stats.postponed,
            current_uuid: format!("{:016X}", self.meta.current_uuid),
            peers: self
                .peers
                .iter()
                .map(|(id, view)| {
                    let counters = device
                        .peers
                        .iter()
                        .find(|p| p.peer == *id)
                        .copied()
                        .unwrap_or_default();
                    PeerStatus {
                        name: view.name.clone(),
                        node_id: *id,
                        connection: view.connection.to_string(),
                        role: view.role,
                        disk: view.disk,
                        replication: if view.connection == ConnectionState::Connected {
                            "Established".into()
                        } else {
                            "Off".into()
                        },
                        sent_bytes: counters.sent_bytes,
                        received_bytes: counters.received_bytes,
                        pending: counters.pending,
                        unacked: counters.unacked,
                        out_of_sync_bytes: counters.out_of_sync_bytes,
                    }
                })
                .collect(),
        }
    }

    fn emit(&self, line: String) {
        if let Some(events) = &self.events {
            // No subscriber is not an error.
            let _ = events.send(line);
        }
    }

    fn local_state_for(&self, peer: PeerId) -> PeerLinkCommand {
        let peer_missing_bytes = self
            .device_snapshot
            .lock()
            .map(|snapshot| {
                snapshot
                    .peers
                    .iter()
                    .find(|p| p.peer == peer)
                    .map_or(0, |p| p.out_of_sync_bytes)
            })
            .unwrap_or(0);
        PeerLinkCommand::LocalState {
            role: self.role,
            disk: self.disk,
            current_uuid: self.meta.current_uuid,
            peer_missing_bytes,
        }
    }

    fn announce_local_state(&self) {
        for (peer, view) in &self.peers {
            if let Some(link) = &view.link {
                link.do_send(self.local_state_for(*peer));
            }
        }
        self.emit(format!(
            "change resource name:{} role:{} disk:{}",
            self.name, self.role, self.disk
        ));
    }

    fn tell_links(&self, command: PeerLinkCommand) {
        for view in self.peers.values() {
            if let Some(link) = &view.link {
                link.do_send(command.clone());
            }
        }
    }

    /// Lines describing the current state, for a new `events` subscriber.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "exists resource name:{} role:{} disk:{} suspended:{}",
            self.name,
            self.role,
            self.disk,
            if self.suspended { "user" } else { "no" }
        )];
        for (id, view) in &self.peers {
            lines.push(format!(
                "exists connection name:{} peer-node-id:{id} conn-name:{} connection:{} role:{}",
                self.name,
                view.name,
                view.connection,
                view.role
                    .map_or_else(|| "Unknown".to_owned(), |r| r.to_string())
            ));
        }
        lines
    }
}

impl Actor for ResourceSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Mark the metadata as in use, so that a crash is recognised at the next start.
        let mut meta = self.meta.clone();
        meta.flags.clean_shutdown = false;
        let meta_actor = self.meta_actor.clone();
        let name = self.name.clone();
        ctx.spawn(
            async move { save_meta(&meta_actor, meta).await }
                .into_actor(self)
                .map(move |result, actor, _| match result {
                    Ok(meta) => actor.meta = meta,
                    Err(error) => {
                        tracing::error!(resource = %name, %error, "cannot mark metadata in use")
                    }
                }),
        );
    }
}

async fn save_meta(
    meta_actor: &Addr<MetaActor>,
    meta: DeviceMeta,
) -> Result<DeviceMeta, StateChangeError> {
    meta_actor
        .send(SaveMeta(meta.clone()))
        .await
        .map_err(|error| StateChangeError::Meta(error.to_string()))?
        .map_err(|error| StateChangeError::Meta(error.to_string()))?;
    Ok(meta)
}

async fn send_to_device<M>(
    device: &Addr<DeviceActor>,
    msg: M,
) -> Result<M::Result, StateChangeError>
where
    M: Message + Send + 'static,
    M::Result: Send,
    DeviceActor: Handler<M>,
{
    device
        .send(msg)
        .await
        .map_err(|error| StateChangeError::Device(error.to_string()))
}

type StateChangeResult = Result<(), StateChangeError>;

/// Become Primary.
#[derive(Message)]
#[rtype(result = "Result<(), StateChangeError>")]
pub struct Promote {
    pub force: bool,
}

impl Handler<Promote> for ResourceSupervisor {
    type Result = ResponseActFuture<Self, StateChangeResult>;

    fn handle(&mut self, msg: Promote, _: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.check_can_change() {
            return Box::pin(fut::ready(Err(error)));
        }
        if self.role == Role::Primary {
            return Box::pin(fut::ready(Ok(())));
        }
        if let Some(view) = self.peers.values().find(|view| {
            view.connection == ConnectionState::Connected && view.role == Some(Role::Primary)
        }) {
            return Box::pin(fut::ready(Err(StateChangeError::PeerIsPrimary(
                view.name.clone(),
            ))));
        }
        if self.disk != DiskState::UpToDate && !msg.force {
            return Box::pin(fut::ready(Err(StateChangeError::DiskNotUpToDate(
                self.disk,
            ))));
        }
        let any_connected = self
            .peers
            .values()
            .any(|view| view.connection == ConnectionState::Connected);
        if !self.peers.is_empty() && !any_connected && !msg.force {
            return Box::pin(fut::ready(Err(StateChangeError::NoPeerConnected)));
        }

        self.changing = true;
        let mut meta = self.meta.clone();
        meta.flags.was_primary = true;
        if msg.force {
            meta.flags.consistent = true;
            meta.flags.up_to_date = true;
        }
        let (meta_actor, device) = (self.meta_actor.clone(), self.device.clone());
        let steps = async move {
            let meta = save_meta(&meta_actor, meta).await?;
            send_to_device(&device, SetWritable(true)).await?;
            Ok::<_, StateChangeError>(meta)
        };
        Box::pin(steps.into_actor(self).map(|result, actor, _| {
            actor.changing = false;
            let meta = result?;
            actor.meta = meta;
            actor.disk = DiskState::UpToDate;
            actor.role = Role::Primary;
            actor.gate.set_primary();
            tracing::info!(resource = %actor.name, "role changed to Primary");
            actor.announce_local_state();
            Ok(())
        }))
    }
}

/// Become Secondary: refused while the image is open for writing; waits for in-flight I/O.
#[derive(Message)]
#[rtype(result = "Result<(), StateChangeError>")]
pub struct Demote;

impl Handler<Demote> for ResourceSupervisor {
    type Result = ResponseActFuture<Self, StateChangeResult>;

    fn handle(&mut self, _: Demote, _: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.check_can_change() {
            return Box::pin(fut::ready(Err(error)));
        }
        if self.role == Role::Secondary {
            return Box::pin(fut::ready(Ok(())));
        }
        if let Err(refused) = self.gate.try_set_secondary() {
            return Box::pin(fut::ready(Err(refused.into())));
        }
        self.changing = true;
        // From here no writer can open the image; the role is Secondary whatever follows.
        self.role = Role::Secondary;
        let mut meta = self.meta.clone();
        meta.flags.was_primary = false;
        let (meta_actor, device) = (self.meta_actor.clone(), self.device.clone());
        let steps = async move {
            send_to_device(&device, SetWritable(false)).await?;
            send_to_device(&device, WaitIdle).await?;
            send_to_device(&device, FlushStore)
                .await?
                .map_err(|fault| StateChangeError::Device(fault.to_string()))?;
            save_meta(&meta_actor, meta).await
        };
        Box::pin(steps.into_actor(self).map(|result, actor, _| {
            actor.changing = false;
            actor.announce_local_state();
            actor.meta = result?;
            tracing::info!(resource = %actor.name, "role changed to Secondary");
            Ok(())
        }))
    }
}

/// Suspend (true) or resume (false) application I/O.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetSuspended(pub bool);

impl Handler<SetSuspended> for ResourceSupervisor {
    type Result = ();
    fn handle(&mut self, SetSuspended(suspend): SetSuspended, _: &mut Context<Self>) {
        self.suspended = suspend;
        self.emit(format!(
            "change resource name:{} suspended:{}",
            self.name,
            if suspend { "user" } else { "no" }
        ));
        // do_send: a control message must not wait behind a full queue of I/O.
        if suspend {
            self.device.do_send(SuspendIo);
        } else {
            self.device.do_send(ResumeIo);
        }
    }
}

#[derive(Message)]
#[rtype(result = "ResourceStatus")]
pub struct GetStatus;

impl Handler<GetStatus> for ResourceSupervisor {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.status())
    }
}

/// Take the resource down: refuse new opens and I/O, finish in-flight requests, flush, record
/// a clean shutdown, stop the resource's actors. Unless `even_if_open`, refused while the image
/// is open (as `drbdadm down` is while the device is in use).
#[derive(Message)]
#[rtype(result = "Result<(), StateChangeError>")]
pub struct Shutdown {
    pub even_if_open: bool,
}

impl Handler<Shutdown> for ResourceSupervisor {
    type Result = ResponseActFuture<Self, StateChangeResult>;

    fn handle(&mut self, msg: Shutdown, _: &mut Context<Self>) -> Self::Result {
        if self.going_down {
            return Box::pin(fut::ready(Err(StateChangeError::GoingDown)));
        }
        if self.changing && !msg.even_if_open {
            return Box::pin(fut::ready(Err(StateChangeError::Busy)));
        }
        if msg.even_if_open {
            self.gate.close_anyway();
        } else if let Err(refused) = self.gate.try_close() {
            return Box::pin(fut::ready(Err(refused.into())));
        }
        self.going_down = true;
        self.changing = true;
        self.tell_links(PeerLinkCommand::Disconnect);
        // Held requests are admitted and finished rather than failed: nothing is lost.
        self.device.do_send(ResumeIo);
        self.device.do_send(CloseDevice);
        self.suspended = false;
        let mut meta = self.meta.clone();
        meta.flags.clean_shutdown = true;
        meta.flags.was_primary = false;
        let (meta_actor, device) = (self.meta_actor.clone(), self.device.clone());
        let steps = async move {
            send_to_device(&device, WaitIdle).await?;
            send_to_device(&device, FlushStore)
                .await?
                .map_err(|fault| StateChangeError::Device(fault.to_string()))?;
            save_meta(&meta_actor, meta).await
        };
        Box::pin(steps.into_actor(self).map(|result, actor, ctx| {
            actor.changing = false;
            match result {
                Ok(meta) => {
                    actor.meta = meta;
                    tracing::info!(resource = %actor.name, "resource is down");
                }
                Err(error) => {
                    tracing::error!(resource = %actor.name, %error, "unclean shutdown");
                    return Err(error);
                }
            }
            ctx.stop();
            Ok(())
        }))
    }
}

impl Drop for ResourceSupervisor {
    fn drop(&mut self) {
        // The device and metadata actors live only for this resource.
        self.device.do_send(StopDevice);
        self.meta_actor.do_send(crate::metadata::StopMeta);
    }
}

/// Stops a device actor once its resource is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopDevice;

impl Handler<StopDevice> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: StopDevice, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl ResourceSupervisor {
    /// The peer wrote blocks this node lacks: the local data is no longer up to date, and
    /// stays Outdated (persistently) until a resync or `primary --force`.
    fn become_outdated(&mut self, peer: PeerId, missing_bytes: u64, ctx: &mut Context<Self>) {
        let peer_name = self
            .peers
            .get(&peer)
            .map_or_else(|| peer.to_string(), |view| view.name.clone());
        tracing::warn!(
            resource = %self.name,
            peer = %peer_name,
            missing_bytes,
            "the peer wrote data this node lacks; the local disk is Outdated until resynced"
        );
        self.disk = DiskState::Outdated;
        self.emit(format!("change device name:{} disk:Outdated", self.name));
        let mut meta = self.meta.clone();
        meta.flags.up_to_date = false;
        let meta_actor = self.meta_actor.clone();
        ctx.spawn(
            async move { save_meta(&meta_actor, meta).await }
                .into_actor(self)
                .map(|result, actor, _| match result {
                    Ok(meta) => actor.meta = meta,
                    Err(error) => {
                        tracing::error!(resource = %actor.name, %error, "cannot record the Outdated disk state")
                    }
                }),
        );
        self.announce_local_state();
    }
}

impl Handler<PeerReport> for ResourceSupervisor {
    type Result = ();
    fn handle(&mut self, report: PeerReport, ctx: &mut Context<Self>) {
        match report {
            PeerReport::Link { peer, link } => {
                if let Some(view) = self.peers.get_mut(&peer) {
                    view.link = Some(link);
                }
            }
            PeerReport::Connection { peer, state } => {
                let Some(view) = self.peers.get_mut(&peer) else {
                    return;
                };
                if view.connection == state {
                    return;
                }
                view.connection = state;
                if state != ConnectionState::Connected {
                    view.role = None;
                    view.disk = None;
                }
                let line = format!(
                    "change connection name:{} peer-node-id:{peer} conn-name:{} connection:{state}",
                    self.name, view.name
                );
                tracing::info!(resource = %self.name, peer = %view.name, connection = %state, "connection state");
                let link = view.link.clone();
                self.emit(line);
                if state == ConnectionState::Connected {
                    if let Some(link) = link {
                        link.do_send(self.local_state_for(peer));
                    }
                }
            }
            PeerReport::State {
                peer,
                role,
                disk,
                current_uuid,
                missing_bytes,
            } => {
                if missing_bytes > 0
                    && self.disk == DiskState::UpToDate
                    && self.role == Role::Secondary
                {
                    self.become_outdated(peer, missing_bytes, ctx);
                }
                let Some(view) = self.peers.get_mut(&peer) else {
                    return;
                };
                let changed = view.role != Some(role) || view.disk != Some(disk);
                view.role = Some(role);
                view.disk = Some(disk);
                if changed {
                    let line = format!(
                        "change peer-device name:{} peer-node-id:{peer} conn-name:{} peer-role:{role} peer-disk:{disk} peer-generation:{current_uuid:016X}",
                        self.name, view.name
                    );
                    self.emit(line);
                }
            }
        }
    }
}

/// `qrbd connect` (true) / `qrbd disconnect` (false).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetConnected(pub bool);

impl Handler<SetConnected> for ResourceSupervisor {
    type Result = ();
    fn handle(&mut self, SetConnected(connect): SetConnected, _: &mut Context<Self>) {
        self.tell_links(if connect {
            PeerLinkCommand::Connect
        } else {
            PeerLinkCommand::Disconnect
        });
    }
}

/// The current state as `exists` lines, for a new `events` subscriber.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct DescribeState;

impl Handler<DescribeState> for ResourceSupervisor {
    type Result = MessageResult<DescribeState>;
    fn handle(&mut self, _: DescribeState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.describe())
    }
}
