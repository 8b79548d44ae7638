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
