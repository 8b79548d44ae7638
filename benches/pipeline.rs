//! Micro-benchmarks of the deterministic core, the buffer pool and the replication codec: the
//! per-request CPU cost that the DeviceActor's thread and a peer link pay on top of the actual
//! I/O. See benches/README.md.
//!
//! `cargo bench --bench pipeline` (add `-- <filter>` to run a subset).

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qrbd::transport::{encode, encode_data_header, DataHeader, FrameBatch, FrameParser, Parsed};
use qrbd_actors::buffer::{BufferPool, PooledBuf};
use qrbd_actors::core::generation::JUST_CREATED_UUID;
use qrbd_actors::core::messages::PeerMessage;
use qrbd_actors::core::replication::Outgoing;
use qrbd_actors::core::resource::{
    CoreConfig, Effect as CoreEffect, Input, PeerConfig, ResourceCore, Timing,
};
use qrbd_actors::core::{
    ByteRange, DeviceCore, IoKind, ReplicationProtocol, RequestId, VolumeEffect as Effect,
};
use qrbd_actors::meta::DeviceMeta;

const BLOCK: u64 = 4096;
/// 1 GiB device: 262144 distinct 4 KiB blocks to cycle through.
const DEVICE_SIZE: u64 = 1 << 30;
const IN_FLIGHT: [usize; 3] = [1, 16, 128];

/// Where write number `seq` of a run goes.
type Placement = fn(u64) -> u64;

/// Steady state of a core with `depth` writes in flight: each cycle submits one write and
/// completes the oldest. `offset_of(seq)` says where write number `seq` goes.
struct Pipeline {
    core: DeviceCore,
    in_flight: VecDeque<RequestId>,
    seq: u64,
    tick: u64,
    offset_of: Placement,
}

impl Pipeline {
    fn new(depth: usize, offset_of: Placement) -> Self {
        let mut pipeline = Pipeline {
            core: DeviceCore::new(DEVICE_SIZE, true),
            in_flight: VecDeque::with_capacity(depth + 1),
            seq: 0,
            tick: 0,
            offset_of,
        };
        for _ in 0..depth {
            pipeline.submit();
        }
        pipeline
    }

    fn submit(&mut self) {
        self.tick += 1;
        let offset = (self.offset_of)(self.seq);
        self.seq += 1;
        let (id, effects) =
            self.core
                .submit(IoKind::Write, ByteRange::new(offset, BLOCK), self.tick);
        debug_assert!(!matches!(effects.first(), Some(Effect::Complete(..))));
        black_box(effects);
        self.in_flight.push_back(id);
    }

    /// Completes the oldest request. With overlapping writes it is the one at the store (the
    /// others wait behind it in arrival order), so its completion starts the next one.
    fn complete_oldest(&mut self) {
        self.tick += 1;
        let Some(id) = self.in_flight.pop_front() else {
            return;
        };
        let effects = self.core.local_done(id, Ok(()), self.tick);
        debug_assert!(effects.contains(&Effect::Complete(id, Ok(()))));
        black_box(effects);
    }

    fn cycle(&mut self) {
        self.submit();
        self.complete_oldest();
    }
}

/// Every write to its own block, cycling through the whole device.
fn disjoint(seq: u64) -> u64 {
    seq * BLOCK % DEVICE_SIZE
}

/// Every write to block 0: each waits for all earlier ones.
fn same_block(_seq: u64) -> u64 {
    0
}

/// Sixteen hot blocks: a write waits for the one 16 submissions earlier.
fn sixteen_blocks(seq: u64) -> u64 {
    seq % 16 * BLOCK
}

fn device_core(c: &mut Criterion) {
    let mut group = c.benchmark_group("core_submit_local_done");
    group.throughput(Throughput::Elements(1));
    let cases: [(&str, Placement); 3] = [
        ("disjoint", disjoint),
        ("overlap_same_block", same_block),
        ("overlap_16_blocks", sixteen_blocks),
    ];
    for (name, offset_of) in cases {
        for depth in IN_FLIGHT {
            group.bench_with_input(BenchmarkId::new(name, depth), &depth, |b, &depth| {
                let mut pipeline = Pipeline::new(depth, offset_of);
                b.iter(|| pipeline.cycle());
                assert_eq!(pipeline.core.app_in_flight(), depth as u64);
            });
        }
    }
    group.finish();
}

/// A Primary's resource core with one connected protocol-C peer, in steady state: every cycle
/// submits one 4 KiB write and completes the oldest (local done, then the peer's WriteAck), and
/// answers every barrier with its ack. The per-write CPU the protocol costs a Primary's actor.
struct Replicated {
    core: ResourceCore,
    /// Requests in flight, with the data-stream sequence number each was sent under.
    in_flight: VecDeque<(RequestId, u64)>,
    next: RequestId,
    tick: u64,
    last_sent_seq: u64,
}

impl Replicated {
    fn new(depth: usize) -> Self {
        let config = CoreConfig {
            resource: "r0".into(),
            node_id: 0,
            node_name: "alpha".into(),
            size_bytes: DEVICE_SIZE,
            protocol: ReplicationProtocol::C,
            disk_flushes: true,
            peers: vec![PeerConfig {
                id: 1,
                name: "beta".into(),
            }],
            timing: Timing::default(),
            seed: 1,
            sync: Default::default(),
            allow_two_primaries: false,
        };
        let meta = DeviceMeta::new("r0", 0, DEVICE_SIZE, JUST_CREATED_UUID);
        let mut bench = Replicated {
            core: ResourceCore::new(config, meta, 0),
            in_flight: VecDeque::new(),
            next: 1,
            tick: 1,
            last_sent_seq: 0,
        };
        bench.settle();
        // Connect, handshake with the peer's Hello, promote; all metadata durable at once.
        bench
            .core
            .handle(1, Input::TransportUp { peer: 1, conn: 1 });
        let hello = PeerMessage::Hello {
            protocol_version: qrbd_actors::core::messages::PROTOCOL_VERSION,
            node_id: 1,
            node_name: "beta".into(),
            resource: "r0".into(),
            size_bytes: DEVICE_SIZE,
            protocol: ReplicationProtocol::C,
            role: qrbd_actors::core::Role::Secondary,
            disk: qrbd_actors::core::DiskState::UpToDate,
            current_uuid: JUST_CREATED_UUID,
            bitmap_uuid: 0,
            history_uuids: Vec::new(),
            receiver_missing_bytes: 0,
            discard_my_data: false,
            primary_before_split: false,
            resuming_initial_sync: false,
            allow_two_primaries: false,
        };
        bench.core.handle(
            1,
            Input::PeerMessage {
                peer: 1,
                conn: 1,
                message: hello,
            },
        );
        bench.settle();
        bench.core.handle(
            1,
            Input::Command {
                id: 1,
                command: qrbd_actors::core::resource::Command::Promote { force: false },
            },
        );
        bench.settle();
        for _ in 0..depth {
            bench.submit();
        }
        bench
    }

    /// Carries out what needs no request: metadata, prepares agreed by the peer, barrier acks.
    fn settle(&mut self) {
        while let Some(effect) = self.core.poll_effect() {
            self.answer(effect);
        }
    }

    fn answer(&mut self, effect: CoreEffect) {
        let input = match effect {
            CoreEffect::Persist { version, .. } => Input::Persisted {
                version,
                result: Ok(()),
            },
            CoreEffect::Send {
                message: PeerMessage::StatePrepare { transaction, .. },
                ..
            } => Input::PeerMessage {
                peer: 1,
                conn: 1,
                message: PeerMessage::StateReply {
                    transaction,
                    refusal: None,
                },
            },
            CoreEffect::SendData {
                outgoing: Outgoing::Barrier { epoch, writes, .. },
                ..
            } => Input::PeerMessage {
                peer: 1,
                conn: 1,
                message: PeerMessage::BarrierAck { epoch, writes },
            },
            CoreEffect::SendData {
                outgoing: Outgoing::Data { seq, .. },
                ..
            } => {
                self.last_sent_seq = seq;
                return;
            }
            other => {
                black_box(other);
                return;
            }
        };
        self.core.handle(self.tick, input);
    }

    fn submit(&mut self) {
        self.tick += 1;
        let id = self.next;
        self.next += 1;
        let offset = disjoint(id);
        self.core.handle(
            self.tick,
            Input::Submit {
                id,
                kind: IoKind::Write,
                range: ByteRange::new(offset, BLOCK),
                start: self.tick,
            },
        );
        self.settle();
        self.in_flight.push_back((id, self.last_sent_seq));
    }

    /// Completes the `count` oldest writes locally, then acknowledges them all with one
    /// WriteAck.
    fn complete_oldest_batch(&mut self, count: usize) {
        self.tick += 1;
        let mut up_to = None;
        for _ in 0..count {
            let Some((id, seq)) = self.in_flight.pop_front() else {
                break;
            };
            self.core
                .handle(self.tick, Input::LocalDone { id, result: Ok(()) });
            up_to = Some(seq);
        }
        if let Some(up_to) = up_to {
            self.core.handle(
                self.tick,
                Input::PeerMessage {
                    peer: 1,
                    conn: 1,
                    message: PeerMessage::WriteAck { up_to },
                },
            );
        }
        self.settle();
    }

    fn complete_oldest(&mut self) {
        let Some((id, seq)) = self.in_flight.pop_front() else {
            return;
        };
        self.tick += 1;
        self.core
            .handle(self.tick, Input::LocalDone { id, result: Ok(()) });
        self.core.handle(
            self.tick,
            Input::PeerMessage {
                peer: 1,
                conn: 1,
                message: PeerMessage::WriteAck { up_to: seq },
            },
        );
        self.settle();
    }
}

fn resource_core(c: &mut Criterion) {
    let mut group = c.benchmark_group("resource_core_replicated_write");
    group.throughput(Throughput::Elements(1));
    for depth in IN_FLIGHT {
        group.bench_with_input(
            BenchmarkId::new("protocol_c", depth),
            &depth,
            |b, &depth| {
                let mut bench = Replicated::new(depth);
                assert_eq!(bench.core.role(), qrbd_actors::core::Role::Primary);
                b.iter(|| {
                    bench.submit();
                    bench.complete_oldest();
                });
                assert_eq!(bench.core.device().app_in_flight(), depth as u64);
            },
        );
    }
    // A batch of writes per wake-up, as the peer's acknowledgements arrive batched: the
    // local completions of the batch, then one cumulative WriteAck for all of it.
    for batch in [16usize, 64] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("protocol_c_one_ack_per_batch", batch),
            &batch,
            |b, &batch| {
                let mut bench = Replicated::new(batch);
                b.iter(|| {
                    for _ in 0..batch {
                        bench.submit();
                    }
                    bench.complete_oldest_batch(batch);
                });
                assert_eq!(bench.core.device().app_in_flight(), batch as u64);
            },
        );
    }
    group.finish();
}

fn buffer_pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("buffer_pool_acquire_release");
    group.throughput(Throughput::Elements(1));
    let pool = BufferPool::new(64 << 20);
    for (name, len) in [("4KiB", 4096usize), ("1MiB", 1 << 20)] {
        // Warm the idle list, as a running daemon has it.
        drop(pool.acquire(len));
        group.bench_function(name, |b| b.iter(|| drop(black_box(pool.acquire(len)))));
    }
    // What a write costs in the FUSE thread before it reaches the actor: take a buffer and
    // copy the kernel's data into it.
    let data = vec![0xa5u8; 1 << 20];
    for (name, len) in [("4KiB_with_copy", 4096usize), ("1MiB_with_copy", 1 << 20)] {
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut buf = pool.acquire(len);
                buf.copy_from_slice(&data[..len]);
                black_box(&buf);
            })
        });
    }
    group.finish();
    assert_eq!(pool.usage().bytes_in_use, 0);
}

/// The replication codec per batch: what a link's writer pays to encode one wake-up's worth of
/// 4 KiB writes for one stream write, and what its reader pays to parse them out of the chunks
/// quinn hands over (about one packet each) into aligned, pooled buffers. Per frame.
fn codec(c: &mut Criterion) {
    const PAYLOAD: usize = 4096;
    /// Stream data per QUIC packet on loopback, roughly: the size of the chunks a reader gets.
    const CHUNK: usize = 1200;
    let payload = Bytes::from(vec![0x5au8; PAYLOAD]);
    let mut encode_group = c.benchmark_group("codec_encode_batch");
    for frames in [1u64, 16, 64] {
        encode_group.throughput(Throughput::Elements(frames));
        encode_group.bench_with_input(BenchmarkId::new("data_4KiB", frames), &frames, |b, &n| {
            let mut batch = FrameBatch::new();
            let mut chunks = Vec::new();
            b.iter(|| {
                for seq in 0..n {
                    batch
                        .push_data(&data_header(seq), payload.clone())
                        .expect("a 4 KiB payload fits");
                }
                batch.take_chunks(&mut chunks);
                black_box(&chunks);
                // Dropped here, as quinn drops them once the peer acknowledged them.
                chunks.clear();
            });
        });
    }
    // Before batching: a header of its own per frame, and two stream writes per frame.
    encode_group.throughput(Throughput::Elements(1));
    encode_group.bench_function("data_4KiB_header_per_frame", |b| {
        b.iter(|| black_box(encode_data_header(&data_header(1), PAYLOAD).expect("fits")))
    });
    encode_group.finish();

    let mut decode_group = c.benchmark_group("codec_decode_batch");
    let pool = BufferPool::new(64 << 20);
    for frames in [1u64, 16, 64] {
        let mut stream = Vec::new();
        for seq in 0..frames {
            stream.extend(encode(&PeerMessage::Data {
                seq,
                epoch: 1,
                request: seq,
                offset: seq * 4096,
                seen: 0,
                data: vec![0xa5; PAYLOAD],
            }));
        }
        let chunks: Vec<Bytes> = stream.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
        decode_group.throughput(Throughput::Elements(frames));
        decode_group.bench_with_input(BenchmarkId::new("data_4KiB", frames), &frames, |b, &n| {
            let mut parser = FrameParser::<PooledBuf>::new();
            let mut received = Vec::with_capacity(n as usize);
            b.iter(|| {
                for chunk in &chunks {
                    let mut rest = &chunk[..];
                    while let Some(parsed) = parser.next(&mut rest).expect("valid frames") {
                        match parsed {
                            Parsed::NeedPayload { len, .. } => {
                                let buf = pool.try_acquire(len).expect("the pool has room");
                                parser.provide(buf).expect("the size asked for");
                            }
                            Parsed::Data { header, payload } => received.push((header, payload)),
                            Parsed::ResyncData { .. } => unreachable!("only Data was encoded"),
                            Parsed::Message(message) => {
                                black_box(message);
                            }
                        }
                    }
                }
                assert_eq!(received.len(), n as usize);
                // Dropped here, as the device drops them once written.
                received.clear();
            });
        });
    }
    decode_group.finish();
    assert_eq!(pool.usage().bytes_in_use, 0);
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = quick();
    targets = device_core, resource_core, buffer_pool, codec
}
criterion_main!(benches);

/// The header of the `seq`th 4 KiB write of the codec benchmarks.
fn data_header(seq: u64) -> DataHeader {
    DataHeader {
        seq,
        epoch: 1,
        request: seq,
        offset: seq * 4096,
        seen: 0,
    }
}
