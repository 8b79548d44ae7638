//! The RetryActor: the one place that owns postponed requests.
//!
//! A request that a peer answered with RetryWrite must be issued again once the conflicting
//! write has landed. Re-issuing may have to wait (I/O suspended, a full mailbox), and the
//! resource's own actors are the ones that end such waits; re-issuing from them can therefore
//! deadlock the resource (docs/protocol.md, "Postponed requests"). So a singleton service takes the
//! postponed request and re-submits it through the owning device's mailbox, waiting for room
//! there on its own time. The device takes the application-I/O count again on re-submission,
//! having released it when it postponed the request, so the count stays paired.

use std::collections::VecDeque;
use std::time::Instant;

use actix::prelude::*;

use crate::io::{IoOp, IoReply};

/// A request handed back by its device, with everything needed to issue it again.
pub struct PostponedIo {
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
    pub device: Recipient<Resubmit>,
}

/// Counters, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryStats {
    pub postponed: u64,
    pub resubmitted: u64,
    pub failed: u64,
    pub queued: u64,
}

#[derive(Message)]
#[rtype(result = "RetryStats")]
pub struct GetRetryStats;

#[derive(Default)]
pub struct RetryActor {
    queue: VecDeque<RetryPostponed>,
    resubmitting: bool,
    stats: RetryStats,
}

impl Actor for RetryActor {
    type Context = Context<Self>;
}

impl Supervised for RetryActor {}
impl SystemService for RetryActor {}

impl RetryActor {
    /// Re-submits queued requests one at a time, each waiting for room in its device's
    /// mailbox without holding up this actor's own mailbox.
    fn resubmit_next(&mut self, ctx: &mut Context<Self>) {
        if self.resubmitting {
            return;
        }
        let Some(RetryPostponed { io, device }) = self.queue.pop_front() else {
            return;
        };
        self.resubmitting = true;
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
        ctx.spawn(send.into_actor(self).map(|delivered, actor, ctx| {
            actor.resubmitting = false;
            if delivered {
                actor.stats.resubmitted += 1;
            } else {
                actor.stats.failed += 1;
            }
            actor.stats.queued = actor.queue.len() as u64;
            actor.resubmit_next(ctx);
        }));
    }
}

impl Handler<RetryPostponed> for RetryActor {
    type Result = ();
    fn handle(&mut self, msg: RetryPostponed, ctx: &mut Context<Self>) {
        self.stats.postponed += 1;
        self.queue.push_back(msg);
        self.stats.queued = self.queue.len() as u64;
        self.resubmit_next(ctx);
    }
}

impl Handler<GetRetryStats> for RetryActor {
    type Result = MessageResult<GetRetryStats>;
    fn handle(&mut self, _: GetRetryStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.stats)
    }
}
