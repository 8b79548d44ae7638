//! The actors with in-memory ports: DeviceActor, RetryActor and ResourceSupervisor.
//!
//! Timing is controlled, never guessed: local I/O is held at the [`MemStore`]'s gate and let
//! through on purpose, replies arrive on oneshot channels, and state is awaited by polling the
//! device snapshot or an actor with a deadline. Sleeps appear only as the interval of such polls,
//! and in the few "this must NOT happen" checks, which watch for a bounded window after every
//! event that could cause it has demonstrably happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use qrbd_actors::buffer::BufferPool;
use qrbd_actors::core::resource::{CommandError, Timing};
use qrbd_actors::core::{DiskState, IoFault, ReplicationProtocol, Role};
use qrbd_actors::device::{
    DeviceActor, DeviceSnapshot, IoDone, IoOp, PostponeRequest, ResumeIo, SetWritable,
    SharedSnapshot, SubmitIo, SuspendIo,
};
use qrbd_actors::gate::{GateRefused, OpenRefused};
use qrbd_actors::meta::{DeviceMeta, StoredBitmaps};
use qrbd_actors::retry::{
    next_device_key, GetRetryStats, PostponedIo, Resubmit, RetryActor, RetryPostponed, RetryStats,
};
use qrbd_actors::supervisor::{
    Demote, GetStatus, Promote, ResourceSetup, ResourceSupervisor, SetSuspended, Shutdown,
    StateChangeError,
};
use qrbd_actors::testing::{reply_channel, GateGuard, IoOutcome, MemMetaStore, MemStore};

#[path = "common/io.rs"]
mod io;
use io::{pattern, write_op};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BLOCK: u64 = 4096;
/// How long anything that must happen may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long an actor that must not block may take to answer.
const RESPONSIVE: Duration = Duration::from_secs(2);
/// Interval of the polls in `eventually`.
const POLL: Duration = Duration::from_millis(1);
const EIO: i32 = 5;

fn pool() -> BufferPool {
    BufferPool::new(64 * MIB as usize)
}

fn read_op(pool: &BufferPool, offset: u64, len: u64) -> IoOp {
    IoOp::Read {
        offset,
        buf: pool.acquire(len as usize),
    }
}

/// Submits `op` (with `do_send`, as the FUSE front end does) and returns its reply.
fn submit(device: &Addr<DeviceActor>, op: IoOp) -> oneshot::Receiver<IoOutcome> {
    let (reply, receiver) = reply_channel();
    device.do_send(SubmitIo {
        op,
        reply,
        issued: Instant::now(),
    });
    receiver
}

async fn outcome(receiver: oneshot::Receiver<IoOutcome>) -> IoOutcome {
    match tokio::time::timeout(DEADLINE, receiver).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => panic!("the request's reply was dropped without an answer"),
        Err(_) => panic!("no reply within {DEADLINE:?}"),
    }
}

async fn expect_written(receiver: oneshot::Receiver<IoOutcome>, len: usize) {
    match outcome(receiver).await {
        Ok(IoDone::Written(n)) => assert_eq!(n as usize, len),
        other => panic!("expected Written({len}), got {other:?}"),
    }
}

async fn expect_fault(receiver: oneshot::Receiver<IoOutcome>, fault: IoFault) {
    match outcome(receiver).await {
        Err(got) => assert_eq!(got, fault),
        other => panic!("expected {fault:?}, got {other:?}"),
    }
}

async fn read(device: &Addr<DeviceActor>, pool: &BufferPool, offset: u64, len: u64) -> Vec<u8> {
    match outcome(submit(device, read_op(pool, offset, len))).await {
        Ok(IoDone::Read(buf)) => buf.to_vec(),
        other => panic!("expected Read, got {other:?}"),
    }
}

/// Asserts that a reply has not fired (and was not dropped).
fn assert_pending(receiver: &mut oneshot::Receiver<IoOutcome>, what: &str) {
    match receiver.try_recv() {
        Err(oneshot::error::TryRecvError::Empty) => {}
        Ok(outcome) => panic!("{what}: replied early with {outcome:?}"),
        Err(oneshot::error::TryRecvError::Closed) => panic!("{what}: reply dropped"),
    }
}

fn snapshot(handle: &SharedSnapshot) -> DeviceSnapshot {
    handle.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Polls `probe` until it returns `Some`, or panics after [`DEADLINE`].
async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

async fn snapshot_until(
    handle: &SharedSnapshot,
    what: &str,
    condition: impl Fn(&DeviceSnapshot) -> bool,
) -> DeviceSnapshot {
    eventually(what, || {
        let snap = snapshot(handle);
        condition(&snap).then_some(snap)
    })
    .await
}

/// Round trip through the mailbox of a writable device (`SetWritable(true)` is then a no-op), so
/// that everything sent to it before has been handled.
async fn device_round_trip(device: &Addr<DeviceActor>) {
    tokio::time::timeout(RESPONSIVE, device.send(SetWritable(true)))
        .await
        .expect("the device answers")
        .expect("the device is alive");
}

/// Watches `receiver` for a bounded window in which it must not fire, while the device keeps
/// handling messages (so that anything it would wrongly do has every chance to happen).
async fn stays_pending(
    device: &Addr<DeviceActor>,
    receiver: &mut oneshot::Receiver<IoOutcome>,
    what: &str,
) {
    for _ in 0..25 {
        device_round_trip(device).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_pending(receiver, what);
    }
}

async fn retry_stats() -> RetryStats {
    tokio::time::timeout(RESPONSIVE, RetryActor::from_registry().send(GetRetryStats))
        .await
        .expect("the retry actor must keep answering: it never blocks on a device")
        .expect("the retry actor is alive")
}

async fn retry_stats_until(what: &str, condition: impl Fn(&RetryStats) -> bool) -> RetryStats {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stats = retry_stats().await;
        if condition(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn start_device(store: &Arc<MemStore>, writable: bool) -> (Addr<DeviceActor>, SharedSnapshot) {
    let actor = DeviceActor::new("vol", store.clone(), writable);
    let snap = actor.snapshot_handle();
    (actor.start(), snap)
}

// ---------------------------------------------------------------------------------------------
// 1. DeviceActor basics
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn device_writes_reads_discards_and_flushes() {
    let store = MemStore::new(MIB);
    let (device, snap) = start_device(&store, true);
    let pool = pool();

    // Unaligned on both ends, across three blocks.
    let data = pattern(1, 9000);
    expect_written(submit(&device, write_op(&pool, 1000, &data)), 9000).await;
    assert_eq!(read(&device, &pool, 1000, 9000).await, data);
    assert_eq!(store.read_range(1000, 9000), data);
    assert_eq!(read(&device, &pool, 0, 1000).await, vec![0; 1000]);

    // Discard the middle: it reads back as zeros, the rest is untouched.
    match outcome(submit(
        &device,
        IoOp::Discard {
            offset: 4096,
            len: 4096,
        },
    ))
    .await
    {
        Ok(IoDone::Discarded) => {}
        other => panic!("expected Discarded, got {other:?}"),
    }
    let mut expected = data.clone();
    expected[3096..7192].fill(0);
    assert_eq!(read(&device, &pool, 1000, 9000).await, expected);

    let flushes_before = store.counters().flushes;
    match outcome(submit(&device, IoOp::Flush)).await {
        Ok(IoDone::Flushed) => {}
        other => panic!("expected Flushed, got {other:?}"),
    }
    assert_eq!(store.counters().flushes, flushes_before + 1);

    let snap = snapshot_until(&snap, "all requests completed", |s| s.app_in_flight == 0).await;
    let stats = snap.stats;
    assert_eq!((stats.writes, stats.written_bytes), (1, 9000));
    assert_eq!((stats.discards, stats.discarded_bytes), (1, 4096));
    assert_eq!((stats.flushes, stats.reads), (1, 3));
    assert_eq!(stats.failed, 0);
    assert_eq!(snap.held, 0);
}

#[actix_rt::test]
async fn device_refuses_out_of_range_and_writes_while_not_writable() {
    let store = MemStore::new(64 * KIB);
    let (device, snap) = start_device(&store, false);
    let pool = pool();

    expect_fault(
        submit(&device, read_op(&pool, 64 * KIB - 1, 2)),
        IoFault::BeyondEnd,
    )
    .await;
    // Checked without overflowing.
    expect_fault(
        submit(&device, read_op(&pool, u64::MAX - 1, 4)),
        IoFault::BeyondEnd,
    )
    .await;
    // Not writable: writes and discards are refused, reads and flushes are fine.
    expect_fault(
        submit(&device, write_op(&pool, 0, &[1; 512])),
        IoFault::ReadOnly,
    )
    .await;
    expect_fault(
        submit(
            &device,
            IoOp::Discard {
                offset: 0,
                len: 4096,
            },
        ),
        IoFault::ReadOnly,
    )
    .await;
    assert_eq!(read(&device, &pool, 0, 512).await, vec![0; 512]);
    assert!(outcome(submit(&device, IoOp::Flush)).await.is_ok());
    assert_eq!(store.counters().writes + store.counters().discards, 0);

    device.send(SetWritable(true)).await.expect("device alive");
    expect_written(submit(&device, write_op(&pool, 0, &[1; 512])), 512).await;
    // Writable does not make out-of-range writes acceptable.
    expect_fault(
        submit(&device, write_op(&pool, 64 * KIB - 100, &[2; 200])),
        IoFault::BeyondEnd,
    )
    .await;

    let snap = snapshot_until(&snap, "idle", |s| s.app_in_flight == 0).await;
    assert!(snap.writable);
    assert_eq!(snap.stats.failed, 5, "every refusal is counted as failed");
    assert_eq!(snap.stats.writes, 1);
}

#[actix_rt::test]
async fn device_reports_local_io_errors() {
    let store = MemStore::new(MIB);
    let (device, snap) = start_device(&store, true);
    let pool = pool();

    store.fail_next(1, EIO);
    expect_fault(
        submit(&device, write_op(&pool, 0, &[7; 4096])),
        IoFault::LocalIo(EIO),
    )
    .await;
    assert_eq!(
        store.read_range(0, 4096),
        vec![0; 4096],
        "failed write left no data"
    );
    // The next one works again.
    expect_written(submit(&device, write_op(&pool, 0, &[7; 4096])), 4096).await;
    let snap = snapshot_until(&snap, "idle", |s| s.app_in_flight == 0).await;
    assert_eq!((snap.stats.failed, snap.stats.writes), (1, 1));
}

#[actix_rt::test]
async fn concurrent_overlapping_writes_land_in_submission_order() {
    const WRITES: u64 = 200;
    const REGION: u64 = 128 * KIB;
    let store = MemStore::new(MIB);
    let (device, snap) = start_device(&store, true);
    let pool = pool();

    let mut rng = 0x5EED_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut model = vec![0u8; MIB as usize];
    let mut replies = Vec::new();
    let mut total_bytes = 0;
    // All submitted at once, before any of them can complete: many overlap each other.
    for i in 0..WRITES {
        let (offset, len) = if next() % 2 == 0 {
            (next() % (REGION / BLOCK) * BLOCK, BLOCK * (1 + next() % 2))
        } else {
            (next() % REGION, 1 + next() % 10_000)
        };
        let data = pattern(100 + i, len as usize);
        model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        total_bytes += len;
        replies.push((len, submit(&device, write_op(&pool, offset, &data))));
    }
    for (len, reply) in replies {
        expect_written(reply, len as usize).await;
    }

    let counters = store.counters();
    assert_eq!(counters.writes, WRITES);
    assert_eq!(
        counters.overlap_violations, 0,
        "overlapping writes ran at the store at the same time"
    );
    assert_eq!(
        store.contents(),
        model,
        "the store differs from applying the writes in submission order"
    );
    assert_eq!(
        read(&device, &pool, 0, REGION + 16 * KIB).await,
        model[..(REGION + 16 * KIB) as usize]
    );

    let snap = snapshot_until(&snap, "app_in_flight back to 0", |s| s.app_in_flight == 0).await;
    assert_eq!(snap.stats.writes, WRITES);
    assert_eq!(snap.stats.written_bytes, total_bytes);
    assert_eq!(snap.held, 0);
}

/// A test that fails while it holds the store's gate must fail, not hang: the guard opens the
/// gate as the test unwinds, so the write parked on a blocking-pool thread finishes and the
/// runtime can shut down (it waits for its blocking threads).
#[actix_rt::test]
#[should_panic(expected = "failing with a write parked at the gate")]
async fn a_test_failing_with_the_gate_held_fails_instead_of_hanging() {
    let store = MemStore::new(MIB);
    let (device, _snap) = start_device(&store, true);
    let pool = pool();
    let _gate = store.hold_gate();
    let _reply = submit(&device, write_op(&pool, 0, &[1; 4096]));
    store
        .wait_for("the write parked", DEADLINE, |c| c.parked == 1)
        .await;
    panic!("failing with a write parked at the gate");
}

// ---------------------------------------------------------------------------------------------
// 2. Suspend / resume
// ---------------------------------------------------------------------------------------------

#[actix_rt::test]
async fn suspended_io_is_held_and_released_by_resume() {
    let store = MemStore::new(MIB);
    let (device, snap) = start_device(&store, true);
    let pool = pool();

    // A: in flight at the store while we suspend.
    let gate = store.hold_gate();
    let mut a = submit(&device, write_op(&pool, 0, &[0xA; 4096]));
    store
        .wait_for("A parked at the store", DEADLINE, |c| c.parked == 1)
        .await;
    device.send(SuspendIo).await.expect("device alive");

    // B (write) and C (read) arrive while suspended: held before admission.
    let mut b = submit(&device, write_op(&pool, 8192, &[0xB; 4096]));
    let mut c = submit(&device, read_op(&pool, 65536, 4096));
    let held = snapshot_until(&snap, "B and C held", |s| s.held == 2).await;
    assert!(held.suspended);
    assert_eq!(held.app_in_flight, 1, "only A is admitted");

    // A's local write finishes, but its completion is held back while suspended.
    gate.release();
    store
        .wait_for("A written", DEADLINE, |c| c.finished == 1)
        .await;
    stays_pending(&device, &mut a, "A while suspended").await;
    assert_pending(&mut b, "B while suspended");
    assert_pending(&mut c, "C while suspended");
    assert_eq!(
        store.counters().arrived,
        1,
        "held requests must not reach the store"
    );
    let still = snapshot(&snap);
    assert_eq!((still.held, still.app_in_flight), (2, 1));

    device.send(ResumeIo).await.expect("device alive");
    expect_written(a, 4096).await;
    expect_written(b, 4096).await;
    assert!(matches!(outcome(c).await, Ok(IoDone::Read(_))));
    assert_eq!(store.read_range(0, 4096), vec![0xA; 4096]);
    assert_eq!(store.read_range(8192, 4096), vec![0xB; 4096]);
    let snap = snapshot_until(&snap, "idle after resume", |s| s.app_in_flight == 0).await;
    assert!(!snap.suspended);
    assert_eq!(snap.held, 0);
    assert_eq!((snap.stats.writes, snap.stats.reads), (2, 1));
}

// ---------------------------------------------------------------------------------------------
// 3. Postponed requests and the RetryActor
// ---------------------------------------------------------------------------------------------

/// The core assigns request ids sequentially from 1, per device: the first request submitted
/// to a fresh device is id 1. The tests below rely on that to name the request to postpone.
const FIRST_REQUEST: u64 = 1;

/// A reply that also records how many writes the store had finished when it fired.
fn stamped_reply(
    store: &Arc<MemStore>,
) -> (
    qrbd_actors::device::IoReply,
    oneshot::Receiver<(IoOutcome, u64)>,
) {
    let (sender, receiver) = oneshot::channel();
    let store = store.clone();
    let reply: qrbd_actors::device::IoReply = Box::new(move |outcome| {
        // Fails only if the test dropped the receiver: it no longer wants the outcome.
        let _ = sender.send((outcome, store.counters().writes));
    });
    (reply, receiver)
}

/// Holds the store's gate and submits a write of `data` at offset 0, whose reply is stamped
/// with the store's write count; returns once the write is parked at the store.
async fn park_stamped_write<'a>(
    device: &Addr<DeviceActor>,
    store: &'a Arc<MemStore>,
    pool: &BufferPool,
    data: &[u8],
) -> (GateGuard<'a>, oneshot::Receiver<(IoOutcome, u64)>) {
    let gate = store.hold_gate();
    let (reply, replied) = stamped_reply(store);
    device.do_send(SubmitIo {
        op: write_op(pool, 0, data),
        reply,
        issued: Instant::now(),
    });
    store
        .wait_for("the write parked", DEADLINE, |c| c.parked == 1)
        .await;
    (gate, replied)
}

#[actix_rt::test]
async fn postponed_write_is_reissued_through_the_retry_actor_and_replies_once() {
    let store = MemStore::new(MIB);
    let (device, snap) = start_device(&store, true);
    let pool = pool();
    let data = pattern(7, 4096);

    let (gate, mut replied) = park_stamped_write(&device, &store, &pool, &data).await;
    // A peer answered RetryWrite for it.
    device
        .send(PostponeRequest(FIRST_REQUEST))
        .await
        .expect("device alive");

    // Let the first local write through; the gate stays held for what comes next.
    gate.let_through(1);
    // The request is handed to the retry actor, which re-submits it through the device's
    // mailbox: the same write reaches the store again and parks there.
    store
        .wait_for("the re-issued write parked", DEADLINE, |c| {
            c.finished == 1 && c.parked == 1
        })
        .await;
    assert!(
        replied.try_recv().is_err(),
        "a postponed request must not complete after its first local write"
    );
    let stats = retry_stats_until("the re-submission counted", |s| s.resubmitted == 1).await;
    assert_eq!(
        stats,
        RetryStats {
            postponed: 1,
            resubmitted: 1,
            failed: 0,
            queued: 0
        }
    );
    let mid = snapshot(&snap);
    assert_eq!(
        mid.app_in_flight, 1,
        "the re-submission took the count again"
    );
    assert_eq!(mid.stats.postponed, 1);
    assert_eq!(mid.stats.writes, 0);

    gate.release();
    let (outcome, writes_at_reply) = tokio::time::timeout(DEADLINE, replied)
        .await
        .expect("reply within the deadline")
        .expect("reply not dropped");
    assert!(matches!(outcome, Ok(IoDone::Written(4096))), "{outcome:?}");
    assert_eq!(writes_at_reply, 2, "replied only after the re-issued write");
    assert_eq!(store.read_range(0, 4096), data);

    let end = snapshot_until(&snap, "app_in_flight back to 0", |s| s.app_in_flight == 0).await;
    assert_eq!(end.stats.writes, 1);
    assert_eq!(end.stats.written_bytes, 4096);
    assert_eq!(end.stats.postponed, 1);
    assert_eq!(end.stats.failed, 0);
    let writes: Vec<_> = store
        .log()
        .into_iter()
        .filter(|op| op.kind == qrbd_actors::testing::StoreOpKind::Write)
        .map(|op| (op.offset, op.len, op.ok))
        .collect();
    assert_eq!(writes, vec![(0, 4096, true), (0, 4096, true)]);
    assert_eq!(retry_stats().await.resubmitted, 1);
}

/// A device whose actor takes a re-submission and never finishes with it.
struct StuckDevice;

impl Actor for StuckDevice {
    type Context = Context<Self>;
}

impl Handler<Resubmit> for StuckDevice {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Resubmit, _: &mut Context<Self>) -> Self::Result {
        Box::pin(std::future::pending())
    }
}

/// The retry actor keeps one queue per device: a device that never takes its re-submissions
/// (a full mailbox, a stuck actor) holds up its own queue only, and another device's
/// postponed write is re-issued and completes meanwhile.
#[actix_rt::test]
async fn a_stuck_device_does_not_hold_up_another_devices_retries() {
    let pool = pool();
    let stuck = StuckDevice.start();
    let stuck_key = next_device_key();
    let mut stuck_replies = Vec::new();
    for offset in [0, 4096] {
        let (reply, outcome) = reply_channel();
        stuck_replies.push(outcome);
        RetryActor::from_registry().do_send(RetryPostponed {
            io: PostponedIo {
                id: offset + 1,
                op: write_op(&pool, offset, &pattern(1, 4096)),
                reply,
                issued: Instant::now(),
            },
            device_key: stuck_key,
            device: stuck.clone().recipient(),
        });
    }
    retry_stats_until("the stuck device's queue", |s| {
        s.postponed == 2 && s.queued == 1
    })
    .await;

    let store = MemStore::new(MIB);
    let (device, _snap) = start_device(&store, true);
    let data = pattern(7, 4096);
    let (gate, replied) = park_stamped_write(&device, &store, &pool, &data).await;
    device
        .send(PostponeRequest(FIRST_REQUEST))
        .await
        .expect("device alive");
    gate.release();
    let (outcome, writes_at_reply) = tokio::time::timeout(DEADLINE, replied)
        .await
        .expect("the other device's postponed write completes while one device is stuck")
        .expect("reply not dropped");
    assert!(matches!(outcome, Ok(IoDone::Written(4096))), "{outcome:?}");
    assert_eq!(writes_at_reply, 2, "replied only after the re-issued write");
    let stats = retry_stats().await;
    assert_eq!(stats.postponed, 3);
    assert_eq!(
        stats.resubmitted, 1,
        "only the other device's request went through"
    );
    assert_eq!(
        stats.queued, 1,
        "the stuck device's second request still waits"
    );
    for mut outcome in stuck_replies {
        assert!(
            outcome.try_recv().is_err(),
            "the stuck device answered nothing"
        );
    }
}

/// The seed patch's deadlock: re-issuing a postponed write must wait while the device is
/// suspended, and whatever does the waiting must not be needed to end it. Here the device is
/// suspended when the re-submission arrives: the retry actor hands it over and goes on answering
/// (and serving other devices); the request is held and completes after resume.
#[actix_rt::test]
async fn reissue_into_a_suspended_device_does_not_block_the_retry_actor() {
    let store = MemStore::new(MIB);
    let (device, snap) = start_device(&store, true);
    let pool = pool();
    let data = pattern(9, 4096);

    let (gate, mut replied) = park_stamped_write(&device, &store, &pool, &data).await;
    device.send(SuspendIo).await.expect("device alive");
    device
        .send(PostponeRequest(FIRST_REQUEST))
        .await
        .expect("device alive");
    gate.let_through(1);
    store
        .wait_for("the first local write done", DEADLINE, |c| c.finished == 1)
        .await;

    // While suspended, the finished, postponed request waits like every completion. Resume and
    // suspend again in one go (one mailbox drain, so nothing else runs in between): the request
    // is handed to the retry actor, whose re-submission then meets a suspended device. Repeat
    // until the device has seen the local completion (it arrives asynchronously).
    let deadline = Instant::now() + DEADLINE;
    while retry_stats().await.postponed == 0 {
        assert!(
            Instant::now() < deadline,
            "the request was never handed back"
        );
        device.do_send(ResumeIo);
        device.do_send(SuspendIo);
        device_round_trip(&device).await;
    }
    retry_stats_until("the re-submission delivered", |s| s.resubmitted == 1).await;

    let held = snapshot_until(&snap, "the re-submission held", |s| s.held == 1).await;
    assert!(held.suspended);
    assert_eq!(
        held.app_in_flight, 0,
        "released when postponed, not taken again while held"
    );
    assert_eq!(
        store.counters().arrived,
        1,
        "the re-submission is held before the store"
    );
    assert_pending_stamped(&mut replied);

    // The retry actor is not stuck on the suspended device: it keeps answering, and re-issues
    // another device's postponed request meanwhile.
    for _ in 0..10 {
        retry_stats().await;
    }
    let other_store = MemStore::new(MIB);
    let (other, other_snap) = start_device(&other_store, true);
    let other_gate = other_store.hold_gate();
    let other_reply = submit(&other, write_op(&pool, 0, &[0x55; 4096]));
    other_store
        .wait_for("other write parked", DEADLINE, |c| c.parked == 1)
        .await;
    other
        .send(PostponeRequest(FIRST_REQUEST))
        .await
        .expect("other device alive");
    other_gate.release();
    expect_written(other_reply, 4096).await;
    assert_eq!(other_store.counters().writes, 2);
    snapshot_until(&other_snap, "other device idle", |s| s.app_in_flight == 0).await;
    let stats = retry_stats_until("both re-submissions", |s| s.resubmitted == 2).await;
    assert_eq!((stats.postponed, stats.failed, stats.queued), (2, 0, 0));
    assert_pending_stamped(&mut replied);

    // Resume: the held re-submission is admitted, written again, and completes once.
    device.send(ResumeIo).await.expect("device alive");
    store
        .wait_for("re-issued write parked", DEADLINE, |c| c.parked == 1)
        .await;
    assert_eq!(snapshot(&snap).app_in_flight, 1);
    gate.release();
    let (outcome, writes_at_reply) = tokio::time::timeout(DEADLINE, replied)
        .await
        .expect("reply after resume")
        .expect("reply not dropped");
    assert!(matches!(outcome, Ok(IoDone::Written(4096))), "{outcome:?}");
    assert_eq!(writes_at_reply, 2);
    assert_eq!(store.read_range(0, 4096), data);
    let end = snapshot_until(&snap, "idle", |s| s.app_in_flight == 0 && s.held == 0).await;
    assert_eq!((end.stats.writes, end.stats.postponed), (1, 1));
}

fn assert_pending_stamped(receiver: &mut oneshot::Receiver<(IoOutcome, u64)>) {
    match receiver.try_recv() {
        Err(oneshot::error::TryRecvError::Empty) => {}
        Ok((outcome, _)) => panic!("the postponed request replied early: {outcome:?}"),
        Err(oneshot::error::TryRecvError::Closed) => {
            panic!("the postponed request's reply was dropped")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. ResourceSupervisor
// ---------------------------------------------------------------------------------------------

async fn status(supervisor: &Addr<ResourceSupervisor>) -> qrbd_actors::status::ResourceStatus {
    tokio::time::timeout(RESPONSIVE, supervisor.send(GetStatus))
        .await
        .expect("the supervisor must keep answering status")
        .expect("the supervisor is alive")
}

#[actix_rt::test]
async fn supervisor_role_changes_drain_and_shutdown() {
    const SIZE: u64 = MIB;
    let store = MemStore::new(SIZE);
    let meta_store = MemMetaStore::new(None);
    let handle = ResourceSupervisor::start(ResourceSetup {
        name: "r0".into(),
        node_id: 1,
        node_name: "alpha".into(),
        timing: Timing::default(),
        seed: 7,
        protocol: ReplicationProtocol::C,
        store: store.clone(),
        meta_store: Box::new(meta_store.clone()),
        meta: DeviceMeta::new("r0", 1, SIZE, 0xC0FFEE),
        bitmaps: StoredBitmaps::default(),
        peers: Vec::new(),
        events: None,
        disk_flushes: true,
        sync: Default::default(),
        allow_two_primaries: false,
    });
    let supervisor = handle.supervisor.clone();
    let device = handle.device.clone();
    let gate = handle.gate.clone();
    let pool = pool();

    // Coming up marks the metadata as in use.
    eventually("the in-use mark saved", || {
        (!meta_store.saves().is_empty()).then_some(())
    })
    .await;
    assert!(!meta_store.saves()[0].flags.clean_shutdown);

    // Secondary: no writers, no writes.
    let st = status(&supervisor).await;
    assert_eq!((st.role, st.disk), (Role::Secondary, DiskState::UpToDate));
    assert_eq!(st.size_bytes, SIZE);
    assert_eq!(gate.open(true), Err(OpenRefused::NotPrimary));
    expect_fault(
        submit(&device, write_op(&pool, 0, &[1; 4096])),
        IoFault::ReadOnly,
    )
    .await;

    // Promote: writes allowed.
    supervisor
        .send(Promote { force: false })
        .await
        .expect("supervisor alive")
        .expect("promote");
    assert_eq!(status(&supervisor).await.role, Role::Primary);
    assert_eq!(gate.open(true), Ok(()));
    expect_written(submit(&device, write_op(&pool, 0, &[1; 4096])), 4096).await;
    assert!(meta_store.saves().last().expect("saved").flags.was_primary);

    // Demote is refused while a writer holds the image open.
    let refused = supervisor.send(Demote).await.expect("supervisor alive");
    assert_eq!(
        refused,
        Err(StateChangeError::HeldOpen(
            GateRefused::HeldOpenForWriting { writers: 1 }
        ))
    );
    assert_eq!(status(&supervisor).await.role, Role::Primary);
    gate.release(true);

    // With a write held at the store, Demote starts but cannot finish until it lands...
    let store_gate = store.hold_gate();
    let pending_write = submit(&device, write_op(&pool, 8192, &[2; 8192]));
    store
        .wait_for("write parked", DEADLINE, |c| c.parked == 1)
        .await;
    let demote = {
        let supervisor = supervisor.clone();
        actix_rt::spawn(async move { supervisor.send(Demote).await })
    };
    // ...and meanwhile the supervisor keeps answering: it never waits on I/O. The demotion is
    // under way (another state change is refused), and the role stays Primary until the
    // drained writes are durable.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let answer = tokio::time::timeout(RESPONSIVE, supervisor.send(Promote { force: false }))
            .await
            .expect("the supervisor answers while the demotion drains")
            .expect("supervisor alive");
        if answer == Err(StateChangeError::Refused(CommandError::Busy)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the demotion never started: {answer:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    let mid = status(&supervisor).await;
    assert_eq!(mid.role, Role::Primary);
    assert_eq!(mid.app_in_flight, 1);
    assert_eq!(mid.written_bytes, 4096);
    assert_eq!(gate.open(true), Err(OpenRefused::NotPrimary));
    for _ in 0..5 {
        status(&supervisor).await;
    }
    assert!(
        !demote.is_finished(),
        "Demote finished with I/O still in flight"
    );

    let flushes_before = store.counters().flushes;
    store_gate.release();
    expect_written(pending_write, 8192).await;
    let demoted = tokio::time::timeout(DEADLINE, demote)
        .await
        .expect("Demote finishes once the I/O drained")
        .expect("task not cancelled")
        .expect("supervisor alive");
    assert_eq!(demoted, Ok(()));
    assert!(
        store.counters().flushes > flushes_before,
        "Demote flushed the store"
    );
    let st = status(&supervisor).await;
    assert_eq!(st.role, Role::Secondary);
    assert_eq!(st.app_in_flight, 0);
    assert_eq!(st.written_bytes, 4096 + 8192);
    assert_eq!(st.writes, 2);
    expect_fault(
        submit(&device, write_op(&pool, 0, &[3; 512])),
        IoFault::ReadOnly,
    )
    .await;
    let st = status(&supervisor).await;
    assert_eq!(st.failed_requests, 2, "two writes refused as read-only");
    let saves = meta_store.saves();
    assert_eq!(saves.len(), 3, "{saves:?}");
    assert!(saves[1].flags.was_primary && !saves[2].flags.was_primary);

    // Shutdown is refused while the image is open...
    assert_eq!(gate.open(false), Ok(()));
    assert_eq!(
        supervisor
            .send(Shutdown {
                even_if_open: false
            })
            .await
            .expect("supervisor alive"),
        Err(StateChangeError::HeldOpen(GateRefused::HeldOpen {
            handles: 1
        }))
    );
    gate.release(false);

    // ...and otherwise finishes held requests (rather than failing them), flushes and records a
    // clean shutdown.
    supervisor.do_send(SetSuspended(true));
    // Once the supervisor has handled it, its SuspendIo is in the device's mailbox ahead of
    // anything sent to the device from now on.
    eventually_status(&supervisor, "suspended", |s| s.suspended).await;
    let held_read = submit(&device, read_op(&pool, 8192, 4096));
    eventually_status(&supervisor, "the read held", |s| {
        s.app_held == 1 && s.suspended
    })
    .await;
    let flushes_before = store.counters().flushes;
    let down = tokio::time::timeout(
        DEADLINE,
        supervisor.send(Shutdown {
            even_if_open: false,
        }),
    )
    .await
    .expect("shutdown finishes")
    .expect("supervisor alive");
    assert_eq!(down, Ok(()));
    match outcome(held_read).await {
        Ok(IoDone::Read(buf)) => assert_eq!(&buf[..], &[2; 4096][..]),
        other => panic!("the held read should complete at shutdown, got {other:?}"),
    }
    assert!(
        store.counters().flushes > flushes_before,
        "shutdown flushed the store"
    );
    let last = meta_store.saves().last().cloned().expect("saved");
    assert!(last.flags.clean_shutdown);
    assert!(!last.flags.was_primary);
    assert_eq!(last.current_uuid, 0xC0FFEE);
    assert_eq!(meta_store.stored(), Some(last));
    assert_eq!(gate.open(false), Err(OpenRefused::GoingDown));
    eventually("the resource's actors stopped", || {
        (!supervisor.connected() && !device.connected()).then_some(())
    })
    .await;
}

async fn eventually_status(
    supervisor: &Addr<ResourceSupervisor>,
    what: &str,
    condition: impl Fn(&qrbd_actors::status::ResourceStatus) -> bool,
) -> qrbd_actors::status::ResourceStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let st = status(supervisor).await;
        if condition(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}
