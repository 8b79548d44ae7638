//! The ResourceSupervisor: one per resource, and a thin shell. It takes the administrator's
//! commands, checks what only this node's open file handles can tell (the [`ImageGate`]), and
//! hands each command to the resource's core through the device's mailbox with `do_send`, so
//! it never waits on I/O admission or on a full queue: status and events keep answering while
//! a role change, a drain or suspended I/O is under way. It keeps no protocol state: status
//! reads the snapshot the device publishes after every step of the core.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{broadcast, oneshot};

use crate::core::replication::PeerId;
use crate::core::resource::{
    describe_lines, Command, CommandError, CoreConfig, PeerConfig, SyncConfig, SyncStatus, Timing,
};
use crate::core::{ConnectionState, ReplicationProtocol, Tick};
use crate::device::{DeviceActor, DeviceSetup, RunCommand, SharedSnapshot, StopDevice};
use crate::gate::{GateRefused, ImageGate};
use crate::meta::{DeviceMeta, StoredBitmaps};
use crate::metadata::{MetaActor, StopMeta};
use crate::ports::{BlockStore, MetaStore};
use crate::status::{PeerStatus, PeerSyncStatus, ResourceStatus, STALL_AFTER_SECONDS};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateChangeError {
    #[error(transparent)]
    HeldOpen(#[from] GateRefused),
    #[error(transparent)]
    Refused(#[from] CommandError),
    #[error("the resource's device actor is gone")]
    DeviceGone,
}

/// Everything needed to bring a resource up.
pub struct ResourceSetup {
    pub name: String,
    pub node_id: u8,
    pub node_name: String,
    pub protocol: ReplicationProtocol,
    pub store: Arc<dyn BlockStore>,
    pub meta_store: Box<dyn MetaStore>,
    pub meta: DeviceMeta,
    /// The out-of-sync bitmaps and activity log as stored, read at `up` with `meta`.
    pub bitmaps: StoredBitmaps,
    pub peers: Vec<PeerSetup>,
    /// Where state changes are announced, one `drbdsetup events2`-like line each.
    pub events: Option<broadcast::Sender<String>>,
    /// Flush at every epoch boundary when applying a peer's writes (DRBD's `disk-flushes`).
    pub disk_flushes: bool,
    pub timing: Timing,
    /// Seeds the core's generator of generation identifiers.
    pub seed: u64,
    /// The activity log and resync settings.
    pub sync: SyncConfig,
    /// Both nodes may be Primary at once (protocol C; every peer must configure it too).
    pub allow_two_primaries: bool,
}

/// A configured peer of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSetup {
    pub id: PeerId,
    pub name: String,
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
    size_bytes: u64,
    protocol: ReplicationProtocol,
    allow_two_primaries: bool,
    device: Addr<DeviceActor>,
    device_snapshot: SharedSnapshot,
    meta_actor: Addr<MetaActor>,
    gate: Arc<ImageGate>,
}

impl ResourceSupervisor {
    /// Starts the resource's actors (the device in the current arbiter, metadata on its own
    /// thread). The resource comes up Secondary, as DRBD's do.
    pub fn start(setup: ResourceSetup) -> ResourceHandle {
        let size_bytes = setup.store.size();
        let meta_actor = MetaActor::start_on_thread(setup.meta_store);
        let config = CoreConfig {
            resource: setup.name.clone(),
            node_id: setup.node_id,
            node_name: setup.node_name.clone(),
            size_bytes,
            protocol: setup.protocol,
            disk_flushes: setup.disk_flushes,
            peers: setup
                .peers
                .iter()
                .map(|peer| PeerConfig {
                    id: peer.id,
                    name: peer.name.clone(),
                })
                .collect(),
            timing: setup.timing,
            seed: setup.seed,
            sync: setup.sync,
            allow_two_primaries: setup.allow_two_primaries,
        };
        let device_actor = DeviceActor::with_setup(
            setup.store,
            DeviceSetup {
                config,
                meta: setup.meta,
                bitmaps: setup.bitmaps,
                meta_actor: Some(meta_actor.clone()),
                events: setup.events,
            },
        );
        let device_snapshot = device_actor.snapshot_handle();
        let device = device_actor.start();
        let gate = Arc::new(ImageGate::new(false));
        let supervisor = ResourceSupervisor {
            name: setup.name.clone(),
            size_bytes,
            protocol: setup.protocol,
            allow_two_primaries: setup.allow_two_primaries,
            device: device.clone(),
            device_snapshot,
            meta_actor,
            gate: gate.clone(),
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

    /// Hands a command to the core; the future resolves with its outcome. `do_send` skips the
    /// mailbox bound: a command must not wait behind a full queue of I/O.
    fn run(
        &self,
        command: Command,
    ) -> impl std::future::Future<Output = Result<String, StateChangeError>> {
        let (reply, outcome) = oneshot::channel();
        self.device.do_send(RunCommand { command, reply });
        async move {
            match outcome.await {
                Ok(result) => result.map_err(StateChangeError::from),
                Err(_) => Err(StateChangeError::DeviceGone),
            }
        }
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
            role: device.role,
            disk: device.disk,
            size_bytes: self.size_bytes,
            protocol: self.protocol,
            suspended: device.suspended,
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
            allow_two_primaries: self.allow_two_primaries,
            concurrent_writes: stats.concurrent_writes,
            superseded_writes: stats.superseded,
            retry_writes_asked: stats.retries_asked,
            superseded_by_peer: stats.superseded_by_peer,
            resubmitted_writes: stats.resubmitted,
            current_uuid: format!("{:016X}", device.current_uuid),
            bitmap_uuids: device
                .bitmap_uuids
                .iter()
                .map(|(peer, uuid)| (peer.to_string(), format!("{uuid:016X}")))
                .collect(),
            history_uuids: device
                .history_uuids
                .iter()
                .map(|uuid| format!("{uuid:016X}"))
                .collect(),
            al_hits: device.activity_log.hits,
            al_misses: device.activity_log.misses,
            al_transactions: device.activity_log.transactions,
            peers: device
                .peers
                .iter()
                .map(|link| PeerStatus {
                    name: link.name.clone(),
                    node_id: link.peer,
                    connection: link.connection.to_string(),
                    role: link.role,
                    disk: link.disk,
                    replication: match (&link.sync, link.connection) {
                        (Some(sync), ConnectionState::Connected) => sync.role.to_string(),
                        (None, ConnectionState::Connected) => "Established".into(),
                        _ => "Off".into(),
                    },
                    sent_bytes: link.sent_bytes,
                    received_bytes: link.received_bytes,
                    pending: link.pending,
                    unacked: link.unacked,
                    out_of_sync_bytes: link.out_of_sync_bytes,
                    last_error: link.last_error.clone(),
                    sync: link.sync.as_ref().map(|sync| sync_status(sync, device.now)),
                    resynced_bytes: link.resynced_bytes,
                    resync_same_bytes: link.resync_same_bytes,
                    verify: link.verify.clone(),
                })
                .collect(),
        }
    }
}

/// A resync as status shows it: rate and ETA from the core's ticks (nanoseconds).
fn sync_status(sync: &SyncStatus, now: Tick) -> PeerSyncStatus {
    const SECOND: u64 = 1_000_000_000;
    let elapsed = now.saturating_sub(sync.started);
    let rate = (u128::from(sync.moved_bytes) * u128::from(SECOND))
        .checked_div(u128::from(elapsed))
        .unwrap_or(0) as u64;
    let remaining = sync.total_bytes.saturating_sub(sync.done_bytes);
    let idle = now.saturating_sub(sync.last_progress) / SECOND;
    let stalled = sync.stalled.clone().or_else(|| {
        (sync.running && remaining > 0 && idle >= STALL_AFTER_SECONDS)
            .then(|| format!("no progress for {idle} s"))
    });
    PeerSyncStatus {
        role: sync.role.to_string(),
        total_bytes: sync.total_bytes,
        done_bytes: sync.done_bytes,
        moved_bytes: sync.moved_bytes,
        rate_bytes_per_sec: rate,
        eta_seconds: remaining.checked_div(rate),
        elapsed_seconds: elapsed / SECOND,
        stalled,
        in_flight_bytes: sync.in_flight_bytes,
        planned_rate_bytes_per_sec: sync.planned_rate,
        yielding: sync.yielding,
    }
}

impl Actor for ResourceSupervisor {
    type Context = Context<Self>;
}

impl Drop for ResourceSupervisor {
    fn drop(&mut self) {
        // The device and metadata actors live only for this resource.
        self.device.do_send(StopDevice);
        self.meta_actor.do_send(StopMeta);
    }
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
        let outcome = self.run(Command::Promote { force: msg.force });
        Box::pin(outcome.into_actor(self).map(|result, actor, _| {
            result?;
            // A demotion handled after this promotion may already be under way: the image
            // opens for writing only while the core is Primary and not changing.
            let primary_now = {
                let snapshot = actor
                    .device_snapshot
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                snapshot.role == crate::core::Role::Primary && !snapshot.changing
            };
            if primary_now {
                actor.gate.set_primary();
            }
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
        let primary = self
            .device_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .role
            == crate::core::Role::Primary;
        if primary {
            if let Err(refused) = self.gate.try_set_secondary() {
                return Box::pin(fut::ready(Err(refused.into())));
            }
        }
        let outcome = self.run(Command::Demote);
        Box::pin(
            outcome
                .into_actor(self)
                .map(|result, _, _| result.map(|_| ())),
        )
    }
}

/// A command that needs nothing but the core (`invalidate`, `invalidate-remote`, `verify`):
/// handed over like the others, answered with the core's outcome.
#[derive(Message)]
#[rtype(result = "Result<(), StateChangeError>")]
pub struct RunCore(pub Command);

impl Handler<RunCore> for ResourceSupervisor {
    type Result = ResponseActFuture<Self, StateChangeResult>;

    fn handle(&mut self, RunCore(command): RunCore, _: &mut Context<Self>) -> Self::Result {
        let outcome = self.run(command);
        Box::pin(
            outcome
                .into_actor(self)
                .map(|result, _, _| result.map(|_| ())),
        )
    }
}

/// Suspend (true) or resume (false) application I/O.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetSuspended(pub bool);

impl Handler<SetSuspended> for ResourceSupervisor {
    type Result = ();
    fn handle(&mut self, SetSuspended(suspend): SetSuspended, ctx: &mut Context<Self>) {
        let outcome = self.run(if suspend {
            Command::SuspendIo
        } else {
            Command::ResumeIo
        });
        ctx.spawn(async move { drop(outcome.await) }.into_actor(self));
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
        if msg.even_if_open {
            self.gate.close_anyway();
        } else if let Err(refused) = self.gate.try_close() {
            return Box::pin(fut::ready(Err(refused.into())));
        }
        let outcome = self.run(Command::Shutdown);
        Box::pin(outcome.into_actor(self).map(|result, actor, ctx| {
            match &result {
                Ok(_) => ctx.stop(),
                Err(error) => {
                    tracing::error!(resource = %actor.name, %error, "unclean shutdown")
                }
            }
            result.map(|_| ())
        }))
    }
}

/// `qrbd connect` (true) / `qrbd disconnect` (false).
#[derive(Message)]
#[rtype(result = "()")]
pub enum SetConnected {
    /// `connect`; with `discard_my_data`, this node is the victim of a split brain.
    Connect {
        discard_my_data: bool,
    },
    Disconnect,
}

impl Handler<SetConnected> for ResourceSupervisor {
    type Result = ();
    fn handle(&mut self, wanted: SetConnected, ctx: &mut Context<Self>) {
        let outcome = self.run(match wanted {
            SetConnected::Connect { discard_my_data } => Command::Connect { discard_my_data },
            SetConnected::Disconnect => Command::Disconnect,
        });
        ctx.spawn(async move { drop(outcome.await) }.into_actor(self));
    }
}

/// The current state as `exists` lines, for a new `events` subscriber.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct DescribeState;

impl Handler<DescribeState> for ResourceSupervisor {
    type Result = MessageResult<DescribeState>;
    fn handle(&mut self, _: DescribeState, _: &mut Context<Self>) -> Self::Result {
        let snapshot = self
            .device_snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        MessageResult(describe_lines(
            &self.name,
            snapshot.role,
            snapshot.disk,
            snapshot.suspended,
            &snapshot.peers,
        ))
    }
}
