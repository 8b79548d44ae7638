//! The metadata actor: serialises durable metadata updates on a thread of its own, since a
//! durable save blocks on fsync.

use actix::prelude::*;

use crate::meta::{BitmapUpdate, DeviceMeta, StoredBitmaps};
use crate::ports::{MetaError, MetaStore};

pub struct MetaActor {
    store: Box<dyn MetaStore>,
}

impl MetaActor {
    /// Starts the actor on its own thread.
    pub fn start_on_thread(store: Box<dyn MetaStore>) -> Addr<MetaActor> {
        let store = std::sync::Mutex::new(Some(store));
        SyncArbiter::start(1, move || MetaActor {
            // SyncArbiter calls the factory once per thread, and we ask for one thread.
            store: store
                .lock()
                .ok()
                .and_then(|mut slot| slot.take())
                .unwrap_or_else(|| Box::new(NoStore)),
        })
    }
}

impl Actor for MetaActor {
    type Context = SyncContext<Self>;
}

/// Durably replaces the stored metadata.
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct SaveMeta(pub DeviceMeta);

impl Handler<SaveMeta> for MetaActor {
    type Result = Result<(), MetaError>;
    fn handle(&mut self, SaveMeta(meta): SaveMeta, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.save(&meta)
    }
}

/// Durably applies one transaction of the out-of-sync bitmaps and the activity log.
#[derive(Message)]
#[rtype(result = "Result<(), MetaError>")]
pub struct SaveBitmaps(pub BitmapUpdate);

impl Handler<SaveBitmaps> for MetaActor {
    type Result = Result<(), MetaError>;
    fn handle(
        &mut self,
        SaveBitmaps(update): SaveBitmaps,
        _: &mut SyncContext<Self>,
    ) -> Self::Result {
        self.store.save_bitmaps(&update)
    }
}

/// Stands in if the arbiter ever restarts the factory: every save fails loudly.
struct NoStore;

impl MetaStore for NoStore {
    fn load(&self) -> Result<Option<DeviceMeta>, MetaError> {
        Err(MetaError::Backend("metadata store was lost".into()))
    }
    fn save(&mut self, _: &DeviceMeta) -> Result<(), MetaError> {
        Err(MetaError::Backend("metadata store was lost".into()))
    }
    fn save_bitmaps(&mut self, _: &BitmapUpdate) -> Result<(), MetaError> {
        Err(MetaError::Backend("metadata store was lost".into()))
    }
    fn load_bitmaps(&self) -> Result<StoredBitmaps, MetaError> {
        Err(MetaError::Backend("metadata store was lost".into()))
    }
}

/// Stops the metadata thread once its resource is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopMeta;

impl Handler<StopMeta> for MetaActor {
    type Result = ();
    fn handle(&mut self, _: StopMeta, ctx: &mut SyncContext<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Records the activity log of every bitmap transaction, in the order the store gets them.
    #[derive(Clone, Default)]
    struct OrderRecorder(Arc<Mutex<Vec<Vec<u64>>>>);

    impl MetaStore for OrderRecorder {
        fn load(&self) -> Result<Option<DeviceMeta>, MetaError> {
            Ok(None)
        }
        fn save(&mut self, _: &DeviceMeta) -> Result<(), MetaError> {
            Ok(())
        }
        fn save_bitmaps(&mut self, update: &BitmapUpdate) -> Result<(), MetaError> {
            let hot = update.activity_log.clone().unwrap_or_default();
            if hot.contains(&u64::MAX) {
                return Err(MetaError::Backend("refused for the test".into()));
            }
            self.0.lock().expect("recorder lock").push(hot);
            Ok(())
        }
        fn load_bitmaps(&self) -> Result<StoredBitmaps, MetaError> {
            Ok(StoredBitmaps::default())
        }
    }

    fn update(version: u64) -> SaveBitmaps {
        SaveBitmaps(BitmapUpdate {
            activity_log: Some(vec![version]),
            chunks: Vec::new(),
        })
    }

    #[actix_rt::test]
    async fn bitmap_transactions_reach_the_store_in_the_order_they_were_sent() {
        let recorder = OrderRecorder::default();
        let actor = MetaActor::start_on_thread(Box::new(recorder.clone()));
        // As the device actor does: every request is queued when made, and the replies are
        // awaited later, here even in the opposite order.
        let requests: Vec<_> = (1..=64)
            .map(|version| actor.send(update(version)))
            .collect();
        let refused = actor.send(update(u64::MAX));
        for request in requests.into_iter().rev() {
            request.await.expect("metadata actor alive").expect("saved");
        }
        match refused.await.expect("metadata actor alive") {
            Err(MetaError::Backend(msg)) => assert!(msg.contains("refused"), "{msg}"),
            other => panic!("expected the store's error, got {other:?}"),
        }
        let seen = recorder.0.lock().expect("recorder lock").clone();
        let expected: Vec<Vec<u64>> = (1..=64).map(|version| vec![version]).collect();
        assert_eq!(seen, expected);
        actor.send(StopMeta).await.expect("stop");
    }
}
