//! The RetryActor: the one place that owns postponed requests.
//!
//! A request that a peer answered with RetryWrite must be issued again once the conflicting
//! write has landed. Re-issuing may have to wait (I/O suspended, a full mailbox), and the
//! resource's own actors are the ones that end such waits; re-issuing from them can therefore
//! deadlock the resource (docs/protocol.md, "Postponed requests"). So a singleton service takes the
//! postponed request and re-submits it through the owning device's mailbox, waiting for room
//! there on its own time. The device takes the application-I/O count again on re-submission,
//! having released it when it postponed the request, so the count stays paired.
//!
//! Each device has a queue of its own here: a device whose mailbox is full (or whose actor is
//! stuck) holds up only its own re-submissions, never another device's.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use actix::prelude::*;

use crate::core::RequestId;
use crate::io::{IoOp, IoReply};

/// A request handed back by its device, with everything needed to issue it again.
pub struct PostponedIo {
    /// The request's id in its device's core, which it keeps when it comes back.
    pub id: RequestId,
    pub op: IoOp,
    pub reply: IoReply,
    /// The application's original issue time; re-submission keeps it.
    pub issued: Instant,
}

/// A postponed request coming back from the retry actor to its device.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resubmit(pub PostponedIo);

/// Take ownership of a postponed request and re-submit it to `device`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RetryPostponed {
    pub io: PostponedIo,
    /// Names the device's queue: unique per device for the life of the process (see
    /// [`next_device_key`]).
    pub device_key: u64,
    pub device: Recipient<Resubmit>,
}

/// A fresh key for a device's queue.
pub fn next_device_key() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Counters, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryStats {
    pub postponed: u64,
    pub resubmitted: u64,
    pub failed: u64,
    /// Requests waiting here now, over all devices.
    pub queued: u64,
}

#[derive(Message)]
#[rtype(result = "RetryStats")]
pub struct GetRetryStats;

/// One device's postponed requests, re-submitted one at a time, in order.
struct DeviceQueue {
    device: Recipient<Resubmit>,
    waiting: VecDeque<PostponedIo>,
    resubmitting: bool,
}

#[derive(Default)]
pub struct RetryActor {
    queues: BTreeMap<u64, DeviceQueue>,
    stats: RetryStats,
}

impl Actor for RetryActor {
    type Context = Context<Self>;
}

impl Supervised for RetryActor {}
impl SystemService for RetryActor {}

impl RetryActor {
    /// Re-submits the next request of one device's queue, waiting for room in that device's
    /// mailbox without holding up this actor's own mailbox or any other device's queue.
    fn resubmit_next(&mut self, key: u64, ctx: &mut Context<Self>) {
        let Some(queue) = self.queues.get_mut(&key) else {
            return;
        };
        if queue.resubmitting {
            return;
        }
        let Some(io) = queue.waiting.pop_front() else {
            // Nothing left for this device: forget it until it postpones again.
            self.queues.remove(&key);
            return;
        };
        queue.resubmitting = true;
        let device = queue.device.clone();
        let send = async move {
            match device.send(Resubmit(io)).await {
                Ok(()) => true,
                Err(error) => {
                    // The device is gone. The reply went down with the message, and a dropped
                    // FUSE reply answers EIO by itself.
                    tracing::warn!(%error, "postponed request could not be re-submitted");
                    false
                }
            }
        };
        ctx.spawn(send.into_actor(self).map(move |delivered, actor, ctx| {
            if let Some(queue) = actor.queues.get_mut(&key) {
                queue.resubmitting = false;
            }
            if delivered {
                actor.stats.resubmitted += 1;
            } else {
                actor.stats.failed += 1;
            }
            actor.count_queued();
            actor.resubmit_next(key, ctx);
        }));
    }

    fn count_queued(&mut self) {
        self.stats.queued = self.queues.values().map(|q| q.waiting.len() as u64).sum();
    }
}

impl Handler<RetryPostponed> for RetryActor {
    type Result = ();
    fn handle(&mut self, msg: RetryPostponed, ctx: &mut Context<Self>) {
        self.stats.postponed += 1;
        let queue = self
            .queues
            .entry(msg.device_key)
            .or_insert_with(|| DeviceQueue {
                device: msg.device,
                waiting: VecDeque::new(),
                resubmitting: false,
            });
        queue.waiting.push_back(msg.io);
        self.count_queued();
        self.resubmit_next(msg.device_key, ctx);
    }
}

impl Handler<GetRetryStats> for RetryActor {
    type Result = MessageResult<GetRetryStats>;
    fn handle(&mut self, _: GetRetryStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.stats)
    }
}
