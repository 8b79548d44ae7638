//! Two primaries in process: two resources (alpha, node 0 and the resolver; beta, node 1), each
//! started through its ResourceSupervisor with in-memory stores, joined by a [`Bridge`] that
//! stands in for the QUIC links and lets the test hold and release each direction.
//!
//! The regression test is the seed patch's deadlock (DRBD's "fix potential deadlock during
//! restart of conflicting writes"): a write postponed by the resolver's RetryWrite must be
//! issued again, and issuing it waits while I/O is suspended. Whatever does that waiting must
//! not be needed to end it: `resume-io` and `status` go through the resource's supervisor, so
//! the supervisor must keep answering while the postponed write is parked.
//!
//! Timing is controlled, never guessed: the bridge holds replication traffic until the test
//! releases it, and state is awaited by polling status with a deadline (sleeps appear only as
//! the interval of such polls).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use qrbd_actors::buffer::BufferPool;
use qrbd_actors::core::replication::PeerId;
use qrbd_actors::core::resource::Timing;
use qrbd_actors::core::{DiskState, ReplicationProtocol, Role};
use qrbd_actors::device::{
    AttachLink, DeviceActor, FromPeerBatch, IoDone, LinkEvent, PeerOutbound, SubmitIo, ToPeer,
};
use qrbd_actors::meta::{DeviceMeta, StoredBitmaps};
use qrbd_actors::retry::{GetRetryStats, RetryActor, RetryStats};
use qrbd_actors::status::ResourceStatus;
use qrbd_actors::supervisor::{
    GetStatus, PeerSetup, Promote, ResourceSetup, ResourceSupervisor, SetSuspended,
};
use qrbd_actors::testing::{buf_from, reply_channel, IoOutcome, MemMetaStore, MemStore};

#[path = "common/io.rs"]
mod io;
use io::{pattern, write_op};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BLOCK: u64 = 4096;
const SIZE: u64 = 4 * MIB;
/// Both nodes' metadata: fresh, UpToDate and of the same generation, so that they connect
/// without a sync (as if `new-current-uuid --clear-bitmap` had declared the disks identical).
const GENERATION: u64 = 0xC0FF_EE00_0000_0001;
/// How long anything that must happen may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long the supervisor may take to answer `status` or to carry out `resume-io`.
const RESPONSIVE: Duration = Duration::from_secs(2);
/// Interval of the status polls.
const POLL: Duration = Duration::from_millis(1);

const ALPHA: usize = 0;
const BETA: usize = 1;
const NAMES: [&str; 2] = ["alpha", "beta"];
/// Node ids: alpha has the lower one, so it resolves the pair's conflicts.
const IDS: [PeerId; 2] = [0, 1];

fn pool() -> BufferPool {
    BufferPool::new(16 * MIB as usize)
}

// ---------------------------------------------------------------------------------------------
// The bridge: both nodes' links, in process
// ---------------------------------------------------------------------------------------------

/// One direction of the bridge (from one side to the other).
#[derive(Default)]
struct Direction {
    /// While held, everything for the other side waits in `queue`, in order.
    held: bool,
    queue: Vec<LinkEvent>,
    /// Replicated writes (`Data`) delivered to the other side so far.
    data_delivered: u64,
}

struct BridgeState {
    devices: [Addr<DeviceActor>; 2],
    /// The connection number of the current transport (0: none yet).
    conn: u64,
    /// `directions[s]` carries what side `s` sends to the other side.
    directions: [Direction; 2],
    /// Connections a core asked to close (reason), for the test to check.
    closes: Vec<String>,
    /// Received payloads are copied into this pool's aligned buffers, as a link's receive pool.
    pool: BufferPool,
}

/// Connects two DeviceActors the way two `PeerActor`s and a QUIC connection do: a `Dial` from
/// either side brings the transport up on both sides; every message and replicated write one
/// side sends reaches the other as the [`LinkEvent`] its link would report, in order. Each
/// direction can be held (its traffic queued) and released by the test.
#[derive(Clone)]
struct Bridge(Arc<Mutex<BridgeState>>);

impl Bridge {
    fn new(devices: [Addr<DeviceActor>; 2]) -> Self {
        Bridge(Arc::new(Mutex::new(BridgeState {
            devices,
            conn: 0,
            directions: Default::default(),
            closes: Vec::new(),
            pool: pool(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, BridgeState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches `side`'s link to its device.
    fn attach(&self, side: usize) {
        let device = self.lock().devices[side].clone();
        let link = LinkEnd {
            side,
            bridge: self.clone(),
        }
        .start();
        device.do_send(AttachLink {
            peer: IDS[1 - side],
            link: link.recipient(),
        });
    }

    /// From now on, what `from` sends waits in the bridge.
    fn hold(&self, from: usize) {
        self.lock().directions[from].held = true;
    }

    /// Delivers what `from` sent while held, in order, and lets its traffic through again.
    fn release(&self, from: usize) {
        let mut state = self.lock();
        state.directions[from].held = false;
        let events = std::mem::take(&mut state.directions[from].queue);
        Self::deliver(&mut state, from, events);
    }

    /// Replicated writes from `from` waiting in the bridge.
    fn queued_data(&self, from: usize) -> usize {
        self.lock().directions[from]
            .queue
            .iter()
            .filter(|event| matches!(event, LinkEvent::Data { .. }))
            .count()
    }

    fn data_delivered(&self, from: usize) -> u64 {
        self.lock().directions[from].data_delivered
    }

    fn closes(&self) -> Vec<String> {
        self.lock().closes.clone()
    }

    fn deliver(state: &mut BridgeState, from: usize, events: Vec<LinkEvent>) {
        if events.is_empty() {
            return;
        }
        let data = events
            .iter()
            .filter(|event| matches!(event, LinkEvent::Data { .. }))
            .count() as u64;
        state.directions[from].data_delivered += data;
        state.devices[1 - from].do_send(FromPeerBatch {
            peer: IDS[from],
            events,
        });
    }

    /// Both sides hear of a connection change at once, each from its own link.
    fn both_sides(state: &BridgeState, event: impl Fn() -> LinkEvent) {
        for side in [ALPHA, BETA] {
            state.devices[side].do_send(FromPeerBatch {
                peer: IDS[1 - side],
                events: vec![event()],
            });
        }
    }

    /// What `from`'s device handed its link at one wake-up.
    fn outbound(&self, from: usize, batch: Vec<PeerOutbound>) {
        let mut state = self.lock();
        let mut events = Vec::new();
        for outbound in batch {
            let conn = state.conn;
            match outbound {
                PeerOutbound::Dial => {
                    // Connection-level: not subject to holding (nothing is held while the pair
                    // connects). Anything queued for an older connection goes first.
                    Self::deliver(&mut state, from, std::mem::take(&mut events));
                    state.conn += 1;
                    let conn = state.conn;
                    Self::both_sides(&state, || LinkEvent::TransportUp { conn });
                }
                PeerOutbound::Close { conn, reason } => {
                    Self::deliver(&mut state, from, std::mem::take(&mut events));
                    state
                        .closes
                        .push(format!("{} closed: {reason}", NAMES[from]));
                    if conn == state.conn {
                        let reason = reason.clone();
                        Self::both_sides(&state, || LinkEvent::TransportDown {
                            conn,
                            reason: reason.clone(),
                        });
                    }
                }
                PeerOutbound::Message(message) => events.push(LinkEvent::Message {
                    conn,
                    message,
                    budget: None,
                }),
                PeerOutbound::Data {
                    seq,
                    epoch,
                    request,
                    offset,
                    seen,
                    data,
                } => events.push(LinkEvent::Data {
                    conn,
                    seq,
                    epoch,
                    request,
                    offset,
                    seen,
                    data: buf_from(&state.pool, &data),
                    budget: None,
                }),
                PeerOutbound::ResyncData { conn, offset, data } => {
                    events.push(LinkEvent::ResyncData {
                        conn,
                        offset,
                        data: buf_from(&state.pool, data.as_ref()),
                        budget: None,
                    })
                }
            }
        }
        if state.directions[from].held {
            state.directions[from].queue.extend(events);
        } else {
            Self::deliver(&mut state, from, events);
        }
    }
}

/// One side's link actor: hands what its device sends to the bridge.
struct LinkEnd {
    side: usize,
    bridge: Bridge,
}

impl Actor for LinkEnd {
    type Context = Context<Self>;
}

impl Handler<ToPeer> for LinkEnd {
    type Result = ();
    fn handle(&mut self, ToPeer(batch): ToPeer, _: &mut Context<Self>) {
        self.bridge.outbound(self.side, batch);
    }
}

// ---------------------------------------------------------------------------------------------
// The nodes
// ---------------------------------------------------------------------------------------------

struct Node {
    name: &'static str,
    supervisor: Addr<ResourceSupervisor>,
    device: Addr<DeviceActor>,
    store: Arc<MemStore>,
}

impl Node {
    /// Brings the resource up as `qrbd up` does: through its supervisor, Secondary, with two
    /// primaries allowed and protocol C.
    fn start(side: usize) -> Node {
        let store = MemStore::new(SIZE);
        let node_id = IDS[side];
        let handle = ResourceSupervisor::start(ResourceSetup {
            name: "r0".into(),
            node_id,
            node_name: NAMES[side].into(),
            protocol: ReplicationProtocol::C,
            store: store.clone(),
            meta_store: Box::new(MemMetaStore::new(None)),
            meta: DeviceMeta::new("r0", node_id, SIZE, GENERATION),
            bitmaps: StoredBitmaps::default(),
            peers: vec![PeerSetup {
                id: IDS[1 - side],
                name: NAMES[1 - side].into(),
            }],
            events: None,
            disk_flushes: true,
            timing: Timing::default(),
            seed: u64::from(node_id) + 1,
            sync: Default::default(),
            allow_two_primaries: true,
        });
        Node {
            name: NAMES[side],
            supervisor: handle.supervisor,
            device: handle.device,
            store,
        }
    }

    /// `qrbd status`: must be answered within [`RESPONSIVE`].
    async fn status(&self) -> ResourceStatus {
        self.status_while("").await
    }

    /// [`Self::status`], saying what the test was waiting for if it is not answered.
    async fn status_while(&self, waiting_for: &str) -> ResourceStatus {
        tokio::time::timeout(RESPONSIVE, self.supervisor.send(GetStatus))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: the supervisor did not answer status within {RESPONSIVE:?}{}{waiting_for}",
                    self.name,
                    if waiting_for.is_empty() {
                        ""
                    } else {
                        ", waiting for "
                    },
                )
            })
            .expect("the supervisor is alive")
    }

    /// Polls status until `condition` holds, or panics after `within`.
    async fn status_until(
        &self,
        what: &str,
        within: Duration,
        condition: impl Fn(&ResourceStatus) -> bool,
    ) -> ResourceStatus {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status_while(what).await;
            if condition(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out after {within:?} waiting for {what}: {status:#?}",
                self.name
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `qrbd suspend-io` / `qrbd resume-io`: the supervisor takes the command within
    /// [`RESPONSIVE`], and the device carries it out within [`RESPONSIVE`] too.
    async fn set_suspended(&self, suspend: bool) {
        let command = if suspend { "suspend-io" } else { "resume-io" };
        tokio::time::timeout(RESPONSIVE, self.supervisor.send(SetSuspended(suspend)))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: the supervisor did not take {command} within {RESPONSIVE:?}",
                    self.name
                )
            })
            .expect("the supervisor is alive");
        self.status_until(command, RESPONSIVE, |s| s.suspended == suspend)
            .await;
    }

    async fn promote(&self) {
        tokio::time::timeout(DEADLINE, self.supervisor.send(Promote { force: false }))
            .await
            .unwrap_or_else(|_| panic!("{}: promote did not finish", self.name))
            .expect("the supervisor is alive")
            .unwrap_or_else(|error| panic!("{}: promote refused: {error}", self.name));
    }

    /// The application's write (as the FUSE front end hands it over, with `do_send`).
    fn submit_write(&self, pool: &BufferPool, offset: u64, bytes: &[u8]) -> Replies {
        let (sender, receiver) = mpsc::unbounded_channel();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        self.device.do_send(SubmitIo {
            op: write_op(pool, offset, bytes),
            reply: Box::new(move |outcome| {
                counted.fetch_add(1, Ordering::SeqCst);
                // Fails only if the test dropped the receiver.
                let _ = sender.send(outcome);
            }),
            issued: Instant::now(),
        });
        Replies { receiver, calls }
    }

    /// Local writes that reached this node's store, as (offset, len), in finishing order.
    fn store_writes(&self) -> Vec<(u64, u64)> {
        self.store
            .log()
            .into_iter()
            .filter(|op| op.kind == qrbd_actors::testing::StoreOpKind::Write)
            .map(|op| {
                assert!(op.ok, "{}: a write failed at the store", self.name);
                (op.offset, op.len)
            })
            .collect()
    }
}

/// Every reply a request's reply path gave (it must give exactly one).
struct Replies {
    receiver: mpsc::UnboundedReceiver<IoOutcome>,
    calls: Arc<AtomicUsize>,
}

impl Replies {
    fn assert_pending(&mut self, what: &str) {
        match self.receiver.try_recv() {
            Err(mpsc::error::TryRecvError::Empty) => {}
            Ok(outcome) => panic!("{what}: replied early with {outcome:?}"),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                panic!("{what}: the reply was dropped without an answer")
            }
        }
    }

    /// The one reply, which must be a successful write of `len` bytes; no second one follows.
    async fn expect_written_once(mut self, what: &str, len: u32) {
        let outcome = tokio::time::timeout(DEADLINE, self.receiver.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: no reply within {DEADLINE:?}"))
            .unwrap_or_else(|| panic!("{what}: the reply was dropped without an answer"));
        match outcome {
            Ok(IoDone::Written(n)) => assert_eq!(n, len, "{what}: bytes written"),
            other => panic!("{what}: expected Written({len}), got {other:?}"),
        }
        // The reply path was used up by that answer: nothing else can follow.
        match self.receiver.try_recv() {
            Err(mpsc::error::TryRecvError::Disconnected) => {}
            Ok(second) => panic!("{what}: a second reply {second:?}"),
            Err(mpsc::error::TryRecvError::Empty) => {
                panic!("{what}: the reply path is still alive after the answer")
            }
        }
        assert_eq!(self.calls.load(Ordering::SeqCst), 1, "{what}: replies");
    }
}

async fn expect_written(receiver: oneshot::Receiver<IoOutcome>, what: &str, len: u32) {
    match tokio::time::timeout(DEADLINE, receiver).await {
        Ok(Ok(Ok(IoDone::Written(n)))) => assert_eq!(n, len, "{what}: bytes written"),
        Ok(Ok(other)) => panic!("{what}: expected Written({len}), got {other:?}"),
        Ok(Err(_)) => panic!("{what}: the reply was dropped without an answer"),
        Err(_) => panic!("{what}: no reply within {DEADLINE:?}"),
    }
}

async fn retry_stats() -> RetryStats {
    tokio::time::timeout(RESPONSIVE, RetryActor::from_registry().send(GetRetryStats))
        .await
        .expect("the retry actor answers")
        .expect("the retry actor is alive")
}

async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Both nodes up, connected (no sync: same generation, both UpToDate) and Primary.
async fn connected_primaries() -> (Node, Node, Bridge) {
    let alpha = Node::start(ALPHA);
    let beta = Node::start(BETA);
    let bridge = Bridge::new([alpha.device.clone(), beta.device.clone()]);
    bridge.attach(ALPHA);
    bridge.attach(BETA);
    for node in [&alpha, &beta] {
        let status = node
            .status_until("connected to the peer", DEADLINE, |s| {
                s.peers.len() == 1
                    && s.peers[0].connection == "Connected"
                    && s.peers[0].disk == Some(DiskState::UpToDate)
            })
            .await;
        assert_eq!(status.disk, DiskState::UpToDate, "{}", node.name);
        assert_eq!(
            status.peers[0].replication, "Established",
            "{}: no sync between identical generations",
            node.name
        );
        assert!(status.allow_two_primaries);
    }
    // `qrbd primary` on both.
    alpha.promote().await;
    beta.promote().await;
    for node in [&alpha, &beta] {
        node.status_until("both Primary", DEADLINE, |s| {
            s.role == Role::Primary && s.peers[0].role == Some(Role::Primary)
        })
        .await;
    }
    (alpha, beta, bridge)
}

// ---------------------------------------------------------------------------------------------
// The seed's deadlock
// ---------------------------------------------------------------------------------------------

/// Alpha writes blocks 0..2 and beta blocks 1..3 concurrently (each receives the other's write
/// while its own is unanswered). Beta's write overlaps alpha's without lying inside it, so
/// alpha, the resolver, answers RetryWrite and beta postpones it. Beta is suspended when the
/// answer arrives, so the postponed write is parked in beta's core; it is then handed back and
/// re-submitted into a device suspended again, where it is held. All along beta's supervisor
/// answers `status` and carries out `resume-io` within [`RESPONSIVE`]: re-issuing a postponed
/// write never blocks it (docs/protocol.md, "Postponed requests"). After `resume-io` the write
/// lands on both nodes after alpha's, and replies exactly once.
#[actix_rt::test]
async fn postponed_write_while_suspended_does_not_block_the_supervisor() {
    let (alpha, beta, bridge) = connected_primaries().await;
    let pool = pool();
    let a_data = pattern(0xA, 2 * BLOCK as usize);
    let b_data = pattern(0xB, 2 * BLOCK as usize);

    // Both directions held: neither write reaches the other node before both are issued.
    bridge.hold(ALPHA);
    bridge.hold(BETA);
    let a_reply = {
        let (reply, receiver) = reply_channel();
        alpha.device.do_send(SubmitIo {
            op: write_op(&pool, 0, &a_data),
            reply,
            issued: Instant::now(),
        });
        receiver
    };
    let mut b_replies = beta.submit_write(&pool, BLOCK, &b_data);
    for node in [&alpha, &beta] {
        node.store
            .wait_for("the local write done", DEADLINE, |c| c.writes == 1)
            .await;
    }
    eventually("both writes waiting in the bridge", || {
        bridge.queued_data(ALPHA) == 1 && bridge.queued_data(BETA) == 1
    })
    .await;

    // `suspend-io` on beta before either write reaches the other node.
    beta.set_suspended(true).await;

    // Each node receives the other's write while its own is unanswered.
    bridge.release(ALPHA);
    bridge.release(BETA);

    // Alpha answers beta's write RetryWrite and never writes it; beta applies alpha's write
    // and acknowledges it, so alpha's write completes (while beta is suspended).
    expect_written(a_reply, "alpha's write", 2 * BLOCK as u32).await;
    let a_status = alpha.status().await;
    assert_eq!(
        (
            a_status.concurrent_writes,
            a_status.retry_writes_asked,
            a_status.superseded_writes
        ),
        (1, 1, 0),
        "alpha resolved one conflict with RetryWrite"
    );
    assert_eq!(alpha.store_writes(), vec![(0, 2 * BLOCK)]);
    assert_eq!(
        beta.store_writes(),
        vec![(BLOCK, 2 * BLOCK), (0, 2 * BLOCK)],
        "beta wrote its own write, then alpha's over it"
    );

    // Alpha's write completed only once beta acknowledged it, in the same step of beta's core
    // that let the postponed write go: it is parked in beta's core now, its hand-back held
    // back by the suspension.
    let parked = beta.status().await;
    assert!(parked.suspended);
    assert_eq!(parked.superseded_by_peer, 0);
    assert_eq!(
        (parked.retries, parked.resubmitted_writes),
        (0, 0),
        "not handed back while suspended"
    );
    assert_eq!((parked.app_in_flight, parked.app_held), (1, 0));
    assert_eq!(retry_stats().await, RetryStats::default());
    for _ in 0..10 {
        let status = beta.status().await;
        assert_eq!(
            (status.retries, status.app_in_flight),
            (0, 1),
            "still parked"
        );
    }
    b_replies.assert_pending("beta's postponed write");

    // `resume-io` and `suspend-io` at once: the write is handed back, and its re-submission
    // meets a suspended device, which holds it. Whatever re-submits it must not wait there.
    beta.supervisor.do_send(SetSuspended(false));
    beta.supervisor.do_send(SetSuspended(true));
    let held = beta
        .status_until("the re-submission held", DEADLINE, |s| {
            s.resubmitted_writes == 1 && s.app_held == 1
        })
        .await;
    assert!(held.suspended);
    assert_eq!(held.retries, 1, "handed back once");
    assert_eq!(
        held.app_in_flight, 0,
        "the count was released when postponed, and is not taken again while held"
    );
    assert_eq!(
        retry_stats().await,
        RetryStats {
            postponed: 1,
            resubmitted: 1,
            failed: 0,
            queued: 0
        },
        "the retry actor handed it over and holds nothing"
    );
    assert_eq!(beta.store.counters().writes, 2, "held before the store");
    for _ in 0..10 {
        let status = beta.status().await;
        assert_eq!(
            (status.app_held, status.app_in_flight),
            (1, 0),
            "still held"
        );
    }
    b_replies.assert_pending("beta's held re-submission");
    assert_eq!(bridge.data_delivered(BETA), 1, "not sent again yet");

    // `resume-io` goes through.
    beta.set_suspended(false).await;

    // The write is issued again: it lands after alpha's on both nodes and replies once.
    b_replies
        .expect_written_once("beta's write", 2 * BLOCK as u32)
        .await;
    let mut expected = a_data[..BLOCK as usize].to_vec();
    expected.extend_from_slice(&b_data);
    for node in [&alpha, &beta] {
        node.status_until("no application I/O left", DEADLINE, |s| {
            s.app_in_flight == 0 && s.app_held == 0 && s.peers[0].unacked == 0
        })
        .await;
        assert_eq!(
            node.store.read_range(0, 3 * BLOCK),
            expected,
            "{}: block 0 holds alpha's write, blocks 1..3 beta's",
            node.name
        );
    }
    assert_eq!(
        alpha.store.contents(),
        beta.store.contents(),
        "the nodes differ"
    );
    assert_eq!(
        alpha.store_writes(),
        vec![(0, 2 * BLOCK), (BLOCK, 2 * BLOCK)],
        "alpha wrote beta's write once, the re-issued one"
    );
    assert_eq!(
        beta.store_writes(),
        vec![(BLOCK, 2 * BLOCK), (0, 2 * BLOCK), (BLOCK, 2 * BLOCK)],
        "beta wrote its write again after alpha's"
    );
    assert_eq!(bridge.data_delivered(BETA), 2);
    assert_eq!(bridge.data_delivered(ALPHA), 1);

    let b_end = beta.status().await;
    assert!(!b_end.suspended);
    assert_eq!(
        (b_end.retries, b_end.resubmitted_writes),
        (1, 1),
        "postponed once, re-submitted once"
    );
    assert_eq!(
        (b_end.writes, b_end.written_bytes, b_end.failed_requests),
        (1, 2 * BLOCK, 0),
        "one application write, completed once"
    );
    let a_end = alpha.status().await;
    assert_eq!((a_end.writes, a_end.failed_requests), (1, 0));
    assert_eq!((a_end.retries, a_end.resubmitted_writes), (0, 0));
    assert_eq!(retry_stats().await.resubmitted, 1);
    for node in [&alpha, &beta] {
        let status = node.status().await;
        assert_eq!(status.role, Role::Primary, "{}", node.name);
        assert_eq!(status.peers[0].connection, "Connected", "{}", node.name);
        assert_eq!(status.peers[0].out_of_sync_bytes, 0, "{}", node.name);
    }
    assert_eq!(
        bridge.closes(),
        Vec::<String>::new(),
        "no connection closed"
    );
}
