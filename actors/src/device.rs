//! The DeviceActor: one per volume. It runs the request pipeline of [`DeviceCore`] and carries
//! out its effects: local I/O on a bounded blocking pool, replies to the application, and
//! handing postponed requests to the [`RetryActor`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::{oneshot, Semaphore};

use crate::buffer::PooledBuf;
use crate::core::{ByteRange, DeviceCore, DeviceStats, Effect, IoFault, IoKind, RequestId, Tick};
use crate::ports::BlockStore;
use crate::retry::{PostponedIo, RetryActor, RetryPostponed};

/// How many local I/O operations of one volume run at once on the blocking pool.
pub const LOCAL_IO_SLOTS: usize = 32;

/// An application request as the front end hands it over.
pub enum IoOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        offset: u64,
        buf: PooledBuf,
    },
    Write {
        offset: u64,
        data: PooledBuf,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl IoOp {
    fn kind_and_range(&self) -> (IoKind, ByteRange) {
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

/// Submits an application request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubmitIo {
    pub op: IoOp,
    pub reply: IoReply,
    /// When the application issued it; kept across re-submissions.
    pub issued: Instant,
}

/// What status needs, readable without going through the actor's mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub stats: DeviceStats,
    pub app_in_flight: u64,
    pub held: u64,
    pub suspended: bool,
    pub writable: bool,
}

/// Shared, always-current view of a device for status readers.
pub type SharedSnapshot = Arc<Mutex<DeviceSnapshot>>;

pub struct DeviceActor {
    name: String,
    core: DeviceCore,
    store: Arc<dyn BlockStore>,
    pending: HashMap<RequestId, PendingIo>,
    local_slots: Arc<Semaphore>,
    snapshot: SharedSnapshot,
    idle_waiters: Vec<oneshot::Sender<()>>,
    clock_origin: Instant,
}

struct PendingIo {
    /// None while the op is at the local store.
    op: Option<IoOp>,
    reply: IoReply,
    issued: Instant,
}

impl DeviceActor {
    pub fn new(name: &str, store: Arc<dyn BlockStore>, writable: bool) -> Self {
        let core = DeviceCore::new(store.size(), writable);
        DeviceActor {
            name: name.to_owned(),
            core,
            store,
            pending: HashMap::new(),
            local_slots: Arc::new(Semaphore::new(LOCAL_IO_SLOTS)),
            snapshot: Arc::new(Mutex::new(DeviceSnapshot {
                writable,
                ..DeviceSnapshot::default()
            })),
            idle_waiters: Vec::new(),
            clock_origin: Instant::now(),
        }
    }

    pub fn snapshot_handle(&self) -> SharedSnapshot {
        self.snapshot.clone()
    }

    fn tick(&self, at: Instant) -> Tick {
        u64::try_from(at.saturating_duration_since(self.clock_origin).as_nanos())
            .unwrap_or(u64::MAX)
    }

    fn submit(&mut self, op: IoOp, reply: IoReply, issued: Instant, ctx: &mut Context<Self>) {
        let (kind, range) = op.kind_and_range();
        let (id, effects) = self.core.submit(kind, range, self.tick(issued));
        self.pending.insert(
            id,
            PendingIo {
                op: Some(op),
                reply,
                issued,
            },
        );
        self.apply(effects, ctx);
    }

    fn apply(&mut self, effects: Vec<Effect>, ctx: &mut Context<Self>) {
        for effect in effects {
            match effect {
                Effect::StartLocal(id) => self.start_local(id, ctx),
                Effect::Complete(id, result) => self.complete(id, result),
                Effect::Postponed(id) => self.hand_to_retry(id, ctx),
            }
        }
        self.publish();
    }

    fn start_local(&mut self, id: RequestId, ctx: &mut Context<Self>) {
        let Some(op) = self
            .pending
            .get_mut(&id)
            .and_then(|pending| pending.op.take())
        else {
            tracing::error!(device = %self.name, id, "request to start has no data");
            return;
        };
        let store = self.store.clone();
        let slots = self.local_slots.clone();
        let local_io = async move {
            // The semaphore is never closed, so acquiring only waits.
            let _slot = slots.acquire_owned().await.ok();
            match tokio::task::spawn_blocking(move || run_local(store.as_ref(), op)).await {
                Ok((op, result)) => (Some(op), result),
                Err(join_error) => {
                    tracing::error!(%join_error, "local I/O task failed");
                    (None, Err(IoFault::LocalIo(libc_eio())))
                }
            }
        };
        ctx.spawn(
            local_io
                .into_actor(self)
                .map(move |(op, result), actor, ctx| {
                    if let Some(pending) = actor.pending.get_mut(&id) {
                        pending.op = op;
                    }
                    let now = actor.tick(Instant::now());
                    let effects = actor.core.local_done(id, result, now);
                    actor.apply(effects, ctx);
                }),
        );
    }

    fn complete(&mut self, id: RequestId, result: Result<(), IoFault>) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        let outcome = result.and_then(|()| match pending.op {
            Some(IoOp::Read { buf, .. }) => Ok(IoDone::Read(buf)),
            Some(IoOp::Write { data, .. }) => Ok(IoDone::Written(data.len() as u32)),
            Some(IoOp::Discard { .. }) => Ok(IoDone::Discarded),
            Some(IoOp::Flush) => Ok(IoDone::Flushed),
            None => Err(IoFault::LocalIo(libc_eio())),
        });
        if let Err(fault) = &outcome {
            tracing::debug!(device = %self.name, id, %fault, "request failed");
        }
        (pending.reply)(outcome);
    }

    fn hand_to_retry(&mut self, id: RequestId, ctx: &mut Context<Self>) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        let Some(op) = pending.op else {
            (pending.reply)(Err(IoFault::LocalIo(libc_eio())));
            return;
        };
        RetryActor::from_registry().do_send(RetryPostponed {
            io: PostponedIo {
                op,
                reply: pending.reply,
                issued: pending.issued,
            },
            device: ctx.address().recipient(),
        });
    }

    fn publish(&mut self) {
        let snapshot = DeviceSnapshot {
            stats: self.core.stats(),
            app_in_flight: self.core.app_in_flight(),
            held: self.core.held() as u64,
            suspended: self.core.is_suspended(),
            writable: self.core.is_writable(),
        };
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        if self.core.is_idle() {
            for waiter in self.idle_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

fn libc_eio() -> i32 {
    5
}

fn run_local(store: &dyn BlockStore, mut op: IoOp) -> (IoOp, Result<(), IoFault>) {
    let result = match &mut op {
        IoOp::Read { offset, buf } => store.read_at(*offset, buf),
        IoOp::Write { offset, data } => store.write_at(*offset, data),
        IoOp::Discard { offset, len } => store.discard(*offset, *len),
        IoOp::Flush => store.flush(),
    };
    let result = result.map_err(|error| {
        tracing::error!(%error, op = ?op, "local I/O failed");
        IoFault::LocalIo(error.raw_os_error().unwrap_or(libc_eio()))
    });
    (op, result)
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bounded: senders that use `send` wait for room; the front end bounds its own
        // `do_send`s through the buffer pool.
        ctx.set_mailbox_capacity(1024);
        tracing::debug!(device = %self.name, size = self.core.size(), "device actor started");
    }
}

impl Handler<SubmitIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, msg: SubmitIo, ctx: &mut Context<Self>) {
        self.submit(msg.op, msg.reply, msg.issued, ctx);
    }
}

/// A postponed request coming back from the retry actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resubmit(pub PostponedIo);

impl Handler<Resubmit> for DeviceActor {
    type Result = ();
    fn handle(&mut self, Resubmit(io): Resubmit, ctx: &mut Context<Self>) {
        self.submit(io.op, io.reply, io.issued, ctx);
    }
}

/// Marks a request as postponed (a peer asked for a retry).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PostponeRequest(pub RequestId);

impl Handler<PostponeRequest> for DeviceActor {
    type Result = ();
    fn handle(&mut self, PostponeRequest(id): PostponeRequest, ctx: &mut Context<Self>) {
        let now = self.tick(Instant::now());
        let effects = self.core.postpone(id, now);
        self.apply(effects, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SetWritable(pub bool);

impl Handler<SetWritable> for DeviceActor {
    type Result = ();
    fn handle(&mut self, SetWritable(writable): SetWritable, _: &mut Context<Self>) {
        self.core.set_writable(writable);
        self.publish();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SuspendIo;

impl Handler<SuspendIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: SuspendIo, _: &mut Context<Self>) {
        self.core.suspend();
        tracing::info!(device = %self.name, "I/O suspended");
        self.publish();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct ResumeIo;

impl Handler<ResumeIo> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: ResumeIo, ctx: &mut Context<Self>) {
        let effects = self.core.resume(self.tick(Instant::now()));
        tracing::info!(device = %self.name, "I/O resumed");
        self.apply(effects, ctx);
    }
}

/// Refuse new requests from now on (shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseDevice;

impl Handler<CloseDevice> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: CloseDevice, _: &mut Context<Self>) {
        self.core.close();
        self.publish();
    }
}

/// Resolves once nothing is admitted or held.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WaitIdle;

impl Handler<WaitIdle> for DeviceActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: WaitIdle, _: &mut Context<Self>) -> Self::Result {
        let (done, idle) = oneshot::channel();
        if self.core.is_idle() {
            let _ = done.send(());
        } else {
            self.idle_waiters.push(done);
        }
        Box::pin(async move {
            let _ = idle.await;
        })
    }
}

/// Makes every completed write durable in the local store (shutdown, role changes).
#[derive(Message)]
#[rtype(result = "Result<(), IoFault>")]
pub struct FlushStore;

impl Handler<FlushStore> for DeviceActor {
    type Result = ResponseFuture<Result<(), IoFault>>;
    fn handle(&mut self, _: FlushStore, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || store.flush()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(IoFault::LocalIo(error.raw_os_error().unwrap_or(libc_eio()))),
                Err(_) => Err(IoFault::LocalIo(libc_eio())),
            }
        })
    }
}
