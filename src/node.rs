//! The node: the resources that are up, the images the FUSE mount shows, and the admin
//! commands. An actor, so that admin requests from many connections are handled in order.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use qrbd_actors::core::resource::Command;
use qrbd_actors::device::{AttachLink, SendRawData};
use qrbd_actors::status::ResourceStatus;
use qrbd_actors::supervisor::{
    Demote, DescribeState, GetStatus, Promote, ResourceHandle, ResourceSupervisor, RunCore,
    SetConnected, SetSuspended, Shutdown,
};
use tokio::sync::broadcast;

use crate::admin::{AdminRequest, AdminResponse};
use crate::config::QrbdConfig;
use crate::fuse_fs::SharedImageTable;
use crate::peer::{FindPeerLink, PeerActor, PeerLinkSetup, StopLink};
use crate::resources::{has_metadata, open_resource};

pub struct NodeActor {
    config: Arc<QrbdConfig>,
    images: SharedImageTable,
    resources: BTreeMap<String, ResourceHandle>,
    /// The QUIC endpoint, when replication is configured.
    endpoint: Option<quinn::Endpoint>,
    links: BTreeMap<(String, u8), Addr<PeerActor>>,
    /// Resources whose `up` is opening their files.
    opening: std::collections::BTreeSet<String>,
    events: broadcast::Sender<String>,
}

impl NodeActor {
    pub fn new(
        config: Arc<QrbdConfig>,
        images: SharedImageTable,
        endpoint: Option<quinn::Endpoint>,
        events: broadcast::Sender<String>,
    ) -> Self {
        NodeActor {
            config,
            images,
            resources: BTreeMap::new(),
            endpoint,
            links: BTreeMap::new(),
            opening: std::collections::BTreeSet::new(),
            events,
        }
    }

    fn start_links(&mut self, handle: &ResourceHandle) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        let Ok(resource) = self.config.resource(&handle.name) else {
            return;
        };
        for peer in &resource.peers {
            let link = PeerActor::new(PeerLinkSetup {
                resource: resource.name.clone(),
                protocol: resource.protocol,
                peer_id: peer.id,
                peer_name: peer.name.clone(),
                peer_address: peer.address,
                endpoint: endpoint.clone(),
                device: handle.device.clone(),
            })
            .start();
            handle.device.do_send(AttachLink {
                peer: peer.id,
                link: link.clone().recipient(),
            });
            self.links.insert((resource.name.clone(), peer.id), link);
        }
    }

    fn stop_links(&mut self, resource: &str) {
        let keys: Vec<(String, u8)> = self
            .links
            .keys()
            .filter(|(name, _)| name == resource)
            .cloned()
            .collect();
        for key in keys {
            if let Some(link) = self.links.remove(&key) {
                link.do_send(StopLink);
            }
        }
    }

    /// A receiver of every state change line, for `qrbd events`.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// Brings a resource up. Opening the backing file and the sled database blocks, so it
    /// runs on the blocking pool; the resource's actors start back on this actor's thread.
    fn up(&mut self, name: &str) -> ResponseActFuture<Self, Result<String, String>> {
        if self.resources.contains_key(name) || self.opening.contains(name) {
            let message = format!("{name}: already up");
            return Box::pin(fut::ready(Ok(message)));
        }
        let resource = match self.config.resource(name) {
            Ok(resource) => resource.clone(),
            Err(error) => return Box::pin(fut::ready(Err(error.to_string()))),
        };
        self.opening.insert(name.to_owned());
        let config = self.config.clone();
        let events = self.events.clone();
        let open = async move {
            tokio::task::spawn_blocking(move || open_resource(&config, &resource, Some(events)))
                .await
                .map_err(|error| format!("opening the resource failed: {error}"))?
                .map_err(|error| format!("{error:#}"))
        };
        let name = name.to_owned();
        Box::pin(open.into_actor(self).map(move |setup, node, _| {
            node.opening.remove(&name);
            let setup = setup?;
            let handle = ResourceSupervisor::start(setup);
            node.start_links(&handle);
            node.images
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    &name,
                    handle.size_bytes,
                    handle.device.clone(),
                    handle.gate.clone(),
                );
            node.resources.insert(name.clone(), handle);
            tracing::info!(resource = %name, "resource is up (Secondary)");
            Ok(format!("{name}: up"))
        }))
    }

    fn handle_of(&self, name: &str) -> Result<ResourceHandle, String> {
        if let Some(handle) = self.resources.get(name) {
            return Ok(handle.clone());
        }
        // Distinguish "not configured" from "configured but down" for the user.
        self.config.resource(name).map_err(|e| e.to_string())?;
        Err(format!("{name}: resource is not up (run `qrbd up {name}`)"))
    }
}

impl Actor for NodeActor {
    type Context = Context<Self>;
}

/// Brings up every configured resource that has metadata, as `drbdadm up all` at boot.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UpAll;

impl Handler<UpAll> for NodeActor {
    type Result = ResponseActFuture<Self, ()>;
    /// Resolves once every resource is up (or failed to come up), so that the daemon reports
    /// itself ready only then.
    fn handle(&mut self, _: UpAll, _: &mut Context<Self>) -> Self::Result {
        let names: Vec<String> = self
            .config
            .resources
            .iter()
            .map(|r| r.name.clone())
            .filter(|name| {
                let present = has_metadata(&self.config, name);
                if !present {
                    tracing::warn!(resource = %name, "not brought up: no metadata (run `qrbd create-md {name}`)");
                }
                present
            })
            .collect();
        let mut all: ResponseActFuture<Self, ()> = Box::pin(fut::ready(()));
        for name in names {
            all = Box::pin(all.then(move |(), node, _| {
                node.up(&name).map(move |result, _, _| {
                    if let Err(error) = result {
                        tracing::error!(resource = %name, %error, "cannot bring the resource up");
                    }
                })
            }));
        }
        all
    }
}

/// Takes every resource down, even if its image is open (daemon shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DownAll;

impl Handler<DownAll> for NodeActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: DownAll, _: &mut Context<Self>) -> Self::Result {
        let handles: Vec<ResourceHandle> =
            std::mem::take(&mut self.resources).into_values().collect();
        for handle in &handles {
            self.stop_links(&handle.name);
        }
        let images = self.images.clone();
        Box::pin(async move {
            for handle in handles {
                match handle
                    .supervisor
                    .send(Shutdown { even_if_open: true })
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::error!(resource = %handle.name, %error, "shutdown failed")
                    }
                    Err(error) => {
                        tracing::error!(resource = %handle.name, %error, "supervisor gone")
                    }
                }
                images
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&handle.name);
            }
        })
    }
}

/// An admin command from the socket.
#[derive(Message)]
#[rtype(result = "AdminResponse")]
pub struct Admin(pub AdminRequest);

fn state_change_answer(
    name: String,
    done: &'static str,
    result: Result<Result<(), qrbd_actors::supervisor::StateChangeError>, MailboxError>,
) -> AdminResponse {
    match result {
        Ok(Ok(())) => AdminResponse::done(format!("{name}: {done}")),
        Ok(Err(error)) => AdminResponse::failed(format!("{name}: {error}")),
        Err(error) => AdminResponse::failed(format!("{name}: resource actor unavailable: {error}")),
    }
}

impl Handler<Admin> for NodeActor {
    type Result = ResponseActFuture<Self, AdminResponse>;

    fn handle(&mut self, Admin(request): Admin, _: &mut Context<Self>) -> Self::Result {
        let ready = |response| -> Self::Result { Box::pin(fut::ready(response)) };
        match request {
            AdminRequest::Up { resource } => {
                Box::pin(self.up(&resource).map(|result, _, _| match result {
                    Ok(message) => AdminResponse::done(message),
                    Err(message) => AdminResponse::failed(message),
                }))
            }
            AdminRequest::Down { resource } => {
                let handle = match self.handle_of(&resource) {
                    Ok(handle) => handle,
                    Err(message) => return ready(AdminResponse::failed(message)),
                };
                let supervisor = handle.supervisor.clone();
                Box::pin(
                    async move {
                        supervisor
                            .send(Shutdown {
                                even_if_open: false,
                            })
                            .await
                    }
                    .into_actor(self)
                    .map(move |result, node, _| {
                        if matches!(result, Ok(Ok(()))) {
                            node.stop_links(&resource);
                            node.resources.remove(&resource);
                            node.images
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&resource);
                        }
                        state_change_answer(resource, "down", result)
                    }),
                )
            }
            AdminRequest::Primary { resource, force } => {
                self.forward(resource, "Primary", move |s| {
                    Box::pin(s.send(Promote { force }))
                })
            }
            AdminRequest::Secondary { resource } => {
                self.forward(resource, "Secondary", |s| Box::pin(s.send(Demote)))
            }
            AdminRequest::SkipInitialSync { resource } => self.forward(
                resource,
                "initial sync skipped: every replica is UpToDate in a new data generation",
                |s| Box::pin(s.send(RunCore(Command::SkipInitialSync))),
            ),
            AdminRequest::Verify { resource } => self.forward(
                resource,
                "verify started; `qrbd status` shows its progress and what differs",
                |s| Box::pin(s.send(RunCore(Command::Verify))),
            ),
            AdminRequest::Invalidate { resource, remote } => {
                let done = if remote {
                    "the peer takes every block from this node (full resync)"
                } else {
                    "Inconsistent; every block comes from the peer (full resync)"
                };
                let command = if remote {
                    Command::InvalidateRemote
                } else {
                    Command::Invalidate
                };
                self.forward(resource, done, move |s| Box::pin(s.send(RunCore(command))))
            }
            AdminRequest::Connect { resource, .. } | AdminRequest::Disconnect { resource }
                if !self.resources.contains_key(&resource) =>
            {
                ready(AdminResponse::failed(
                    self.handle_of(&resource).err().unwrap_or_default(),
                ))
            }
            AdminRequest::Connect {
                resource,
                discard_my_data,
            } => {
                if let Some(handle) = self.resources.get(&resource) {
                    handle
                        .supervisor
                        .do_send(SetConnected::Connect { discard_my_data });
                }
                ready(AdminResponse::done(if discard_my_data {
                    format!("{resource}: connecting; this node discards its data if the peer's generation split from it")
                } else {
                    format!("{resource}: connecting")
                }))
            }
            AdminRequest::Disconnect { resource } => {
                if let Some(handle) = self.resources.get(&resource) {
                    handle.supervisor.do_send(SetConnected::Disconnect);
                }
                ready(AdminResponse::done(format!(
                    "{resource}: disconnected (StandAlone)"
                )))
            }
            AdminRequest::TestSendData {
                resource,
                offset,
                len,
                byte,
            } => {
                if std::env::var_os(crate::admin::TEST_HOOKS_ENV).is_none() {
                    return ready(AdminResponse::failed(format!(
                        "test hooks are disabled (the daemon needs {}=1)",
                        crate::admin::TEST_HOOKS_ENV
                    )));
                }
                let Ok(len) = usize::try_from(len.min(1 << 20)) else {
                    return ready(AdminResponse::failed("length too large"));
                };
                match self.resources.get(&resource) {
                    Some(handle) => {
                        handle.device.do_send(SendRawData {
                            offset,
                            data: vec![byte; len],
                        });
                        ready(AdminResponse::done(format!(
                            "{resource}: sent {len} bytes at {offset} to the peers"
                        )))
                    }
                    None => ready(AdminResponse::failed(
                        self.handle_of(&resource).err().unwrap_or_default(),
                    )),
                }
            }
            AdminRequest::Events => ready(AdminResponse::failed(
                "events are streamed by the admin connection, not answered",
            )),
            AdminRequest::SuspendIo { resource } | AdminRequest::ResumeIo { resource }
                if !self.resources.contains_key(&resource) =>
            {
                ready(AdminResponse::failed(
                    self.handle_of(&resource).err().unwrap_or_default(),
                ))
            }
            AdminRequest::SuspendIo { resource } => {
                if let Some(handle) = self.resources.get(&resource) {
                    handle.supervisor.do_send(SetSuspended(true));
                }
                ready(AdminResponse::done(format!("{resource}: I/O suspended")))
            }
            AdminRequest::ResumeIo { resource } => {
                if let Some(handle) = self.resources.get(&resource) {
                    handle.supervisor.do_send(SetSuspended(false));
                }
                ready(AdminResponse::done(format!("{resource}: I/O resumed")))
            }
            AdminRequest::Status { resource } => {
                let handles: Vec<ResourceHandle> = match resource {
                    Some(name) => match self.handle_of(&name) {
                        Ok(handle) => vec![handle],
                        Err(message) => return ready(AdminResponse::failed(message)),
                    },
                    None => self.resources.values().cloned().collect(),
                };
                Box::pin(async move { collect_status(handles).await }.into_actor(self))
            }
        }
    }
}

type StateChangeFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
            Output = Result<Result<(), qrbd_actors::supervisor::StateChangeError>, MailboxError>,
        >,
    >,
>;

impl NodeActor {
    fn forward(
        &self,
        resource: String,
        done: &'static str,
        send: impl FnOnce(&Addr<ResourceSupervisor>) -> StateChangeFuture,
    ) -> ResponseActFuture<Self, AdminResponse> {
        let handle = match self.handle_of(&resource) {
            Ok(handle) => handle,
            Err(message) => return Box::pin(fut::ready(AdminResponse::failed(message))),
        };
        let pending = send(&handle.supervisor);
        Box::pin(async move { state_change_answer(resource, done, pending.await) }.into_actor(self))
    }
}

async fn collect_status(handles: Vec<ResourceHandle>) -> AdminResponse {
    let mut resources: Vec<ResourceStatus> = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle.supervisor.send(GetStatus).await {
            Ok(status) => resources.push(status),
            Err(error) => {
                return AdminResponse::failed(format!(
                    "{}: status unavailable: {error}",
                    handle.name
                ))
            }
        }
    }
    AdminResponse::Status { resources }
}

impl Handler<FindPeerLink> for NodeActor {
    type Result = Option<Addr<PeerActor>>;
    fn handle(&mut self, msg: FindPeerLink, _: &mut Context<Self>) -> Self::Result {
        self.links.get(&(msg.resource, msg.peer_id)).cloned()
    }
}

/// Subscribes to state changes: the current state as `exists` lines, and a receiver of every
/// change from now on.
#[derive(Message)]
#[rtype(result = "(Vec<String>, broadcast::Receiver<String>)")]
pub struct SubscribeEvents;

impl Handler<SubscribeEvents> for NodeActor {
    type Result = ResponseFuture<(Vec<String>, broadcast::Receiver<String>)>;
    fn handle(&mut self, _: SubscribeEvents, _: &mut Context<Self>) -> Self::Result {
        let receiver = self.subscribe();
        let supervisors: Vec<Addr<ResourceSupervisor>> = self
            .resources
            .values()
            .map(|h| h.supervisor.clone())
            .collect();
        Box::pin(async move {
            let mut lines = Vec::new();
            for supervisor in supervisors {
                if let Ok(described) = supervisor.send(DescribeState).await {
                    lines.extend(described);
                }
            }
            lines.push("exists -".to_owned());
            (lines, receiver)
        })
    }
}
