//! A UDP proxy on 127.0.0.1 to put between two qrbd nodes (alpha → proxy → beta) and cut the
//! link at will, both ways, without touching either daemon.
//!
//! Every client address that sends to the proxy gets an upstream socket of its own, so beta's
//! replies find their way back to the right client. While [`FaultProxy::cut`] is set, every
//! datagram is dropped in both directions. The proxy runs on threads and stops on drop.
//!
//! Included by `tests/replication.rs` with `#[path]`, so that it needs no line in
//! `tests/common/mod.rs`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the proxy threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Larger than any datagram quinn sends (it stays below 1500-byte MTUs, GSO aside: GSO
/// segments arrive as separate datagrams on loopback).
const MAX_DATAGRAM: usize = 65_536;

/// Counters of what the proxy did, for diagnostics and assertions.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
}

pub struct FaultProxy {
    address: SocketAddr,
    upstream: Arc<OnceLock<SocketAddr>>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    counters: Arc<ProxyCounters>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FaultProxy {
    /// Starts a proxy that forwards to `upstream`; clients send to [`FaultProxy::address`].
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let proxy = FaultProxy::bind()?;
        proxy.set_upstream(upstream);
        Ok(proxy)
    }

    /// Starts a proxy whose upstream is not known yet (see [`FaultProxy::set_upstream`]); until
    /// it is set, datagrams from clients are dropped. Lets a test hand the proxy's address to
    /// a configuration before it knows the address of the node behind it.
    pub fn bind() -> io::Result<FaultProxy> {
        let upstream = Arc::new(OnceLock::new());
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        front.set_read_timeout(Some(POLL))?;
        let address = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ProxyCounters::default());
        let threads = Arc::new(Mutex::new(Vec::new()));
        let front_thread = {
            let front = Arc::clone(&front);
            let upstream = Arc::clone(&upstream);
            let cut = Arc::clone(&cut);
            let stop = Arc::clone(&stop);
            let counters = Arc::clone(&counters);
            let threads = Arc::clone(&threads);
            std::thread::Builder::new()
                .name("fault-proxy-front".into())
                .spawn(move || {
                    front_loop(&front, &upstream, &cut, &stop, &counters, &threads);
                })?
        };
        lock(&threads).push(front_thread);
        Ok(FaultProxy {
            address,
            upstream,
            cut,
            stop,
            counters,
            threads,
        })
    }

    /// Where clients send to reach the upstream through the proxy.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Sets where the proxy forwards to (once: setting another address later panics).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        if let Err(refused) = self.upstream.set(upstream) {
            let current = self.upstream.get();
            assert_eq!(
                current,
                Some(&refused),
                "the proxy already forwards to {current:?}"
            );
        }
    }

    /// The switch: `true` drops every datagram both ways.
    pub fn cut_switch(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cut)
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    pub fn forwarded(&self) -> u64 {
        self.counters.forwarded.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The front thread may add a thread while we join, so take them in rounds.
        loop {
            let batch: Vec<_> = lock(&self.threads).drain(..).collect();
            if batch.is_empty() {
                break;
            }
            for handle in batch {
                // A proxy thread that panicked has stopped forwarding, which the test saw as
                // lost datagrams already; panicking here, in drop, could abort the run.
                let _ = handle.join();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn front_loop(
    front: &Arc<UdpSocket>,
    upstream: &OnceLock<SocketAddr>,
    cut: &Arc<AtomicBool>,
    stop: &Arc<AtomicBool>,
    counters: &Arc<ProxyCounters>,
    threads: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::SeqCst) {
        let (len, client) = match front.recv_from(&mut buf) {
            Ok(received) => received,
            Err(error) if is_timeout(&error) => continue,
            // ICMP errors (a port not listening yet) surface as errors on recv: ignore them.
            Err(_) => continue,
        };
        let Some(&upstream) = upstream.get().filter(|_| !cut.load(Ordering::SeqCst)) else {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let socket = match clients.get(&client) {
            Some(socket) => Arc::clone(socket),
            None => {
                let Ok(socket) = new_upstream_socket(upstream) else {
                    continue;
                };
                let socket = Arc::new(socket);
                let back = {
                    let socket = Arc::clone(&socket);
                    let front = Arc::clone(front);
                    let cut = Arc::clone(cut);
                    let stop = Arc::clone(stop);
                    let counters = Arc::clone(counters);
                    std::thread::Builder::new()
                        .name("fault-proxy-back".into())
                        .spawn(move || back_loop(&socket, &front, client, &cut, &stop, &counters))
                };
                if let Ok(handle) = back {
                    lock(threads).push(handle);
                }
                clients.insert(client, Arc::clone(&socket));
                socket
            }
        };
        if socket.send(&buf[..len]).is_ok() {
            counters.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn new_upstream_socket(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(upstream)?;
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

/// Carries the upstream's replies back to `client`.
fn back_loop(
    socket: &UdpSocket,
    front: &UdpSocket,
    client: SocketAddr,
    cut: &AtomicBool,
    stop: &AtomicBool,
    counters: &ProxyCounters,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::SeqCst) {
        let len = match socket.recv(&mut buf) {
            Ok(len) => len,
            Err(error) if is_timeout(&error) => continue,
            Err(_) => continue,
        };
        if cut.load(Ordering::SeqCst) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if front.send_to(&buf[..len], client).is_ok() {
            counters.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
