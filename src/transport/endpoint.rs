//! The quinn endpoint: one UDP socket per node that both accepts connections from peers and
//! connects to them, with mutual TLS from [`super::tls`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, Endpoint, EndpointConfig, IdleTimeout, Incoming, MtuDiscoveryConfig,
    TransportConfig, VarInt,
};

use super::tls::{client_crypto, match_peer_name, server_crypto, TlsError, TlsIdentity};

/// Application close code sent to a peer whose certificate names no configured peer.
pub const CLOSE_REJECTED_PEER: VarInt = VarInt::from_u32(0x51);

/// Per-stream receive window: one stream carries all replicated writes (another all resync
/// data), so it must hold many 1 MiB writes in flight on a long fat link.
const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// Connection-wide receive window: room for the data and resync streams plus control traffic.
const CONNECTION_RECEIVE_WINDOW: u32 = 64 << 20;
const SEND_WINDOW: u64 = 64 << 20;
/// Keep-alives well inside the idle timeout keep NAT/firewall state and detect a dead peer
/// within the timeout even when no writes flow.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A peer silent this long is gone; also bounds how long a handshake can hang.
const IDLE_TIMEOUT_MS: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot connect to peer {peer:?} at {addr}: {source}")]
    Connect {
        peer: String,
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("connection to peer {peer:?} at {addr} failed: {source}")]
    Handshake {
        peer: String,
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("incoming connection from {addr} failed: {source}")]
    Accept {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("rejected connection from {addr}: {source}")]
    PeerIdentity { addr: SocketAddr, source: TlsError },
}

/// The QUIC transport settings replication uses, for both directions (measured on this
/// workload: large windows matter for throughput; GSO stays on, the quinn default).
pub fn transport_config() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))))
        // Replication only uses streams; refusing datagrams saves their receive buffer.
        .datagram_receive_buffer_size(None);
    // Search for the largest packet the path carries instead of stopping at Ethernet's 1,452
    // bytes: a 1 MiB write then takes a few dozen packets on jumbo frames or loopback instead of
    // ~900, and per-packet work (encryption setup, headers, acks, system calls) is what bulk
    // replication pays for. Paths with a smaller MTU lose only a few probes to find it.
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD)
        .black_hole_cooldown(Duration::from_secs(5));
    transport.mtu_discovery_config(Some(mtu));
    // With segmentation offload, packets beyond Ethernet size were lost on loopback at once
    // (no kernel drop counted: the batched sends themselves failed), MTU discovery took that
    // for a black hole and fell back to 1,200 bytes. Large packets without offload measured
    // cheaper than small ones with it (benches/README.md).
    transport.enable_segmentation_offload(false);
    transport
}

/// The largest UDP payload MTU discovery searches for; see [`transport_config`]. Above jumbo
/// frames (9,000) so those are found, and well below 64 KiB, whose datagrams cost the kernel
/// twice their size in socket buffer.
const MAX_UDP_PAYLOAD: u16 = 16_384;

/// Binds `listen` and returns an endpoint that accepts peers (mutual TLS) and can connect to
/// them with [`connect`]. Must be called inside a tokio runtime.
pub fn make_endpoint(listen: SocketAddr, identity: &TlsIdentity) -> anyhow::Result<Endpoint> {
    let transport = Arc::new(transport_config());

    let server_tls = server_crypto(identity).context("cannot set up the TLS server side")?;
    let server_quic = QuicServerConfig::try_from(server_tls)
        .context("TLS server configuration is not usable for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_quic));
    server.transport_config(Arc::clone(&transport));

    let client_tls = client_crypto(identity).context("cannot set up the TLS client side")?;
    let client_quic = QuicClientConfig::try_from(client_tls)
        .context("TLS client configuration is not usable for QUIC")?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_quic));
    client.transport_config(transport);

    // Tell peers we accept packets as large as MTU discovery may find (the default advertises
    // 1,472 bytes, which would cap the peer's search).
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .context("QUIC refuses the maximum UDP payload size")?;
    let socket = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("cannot listen for peers on UDP {listen}"))?;
    enlarge_socket_buffers(&socket);
    let runtime = quinn::default_runtime().context("QUIC needs a tokio runtime")?;
    let mut endpoint = Endpoint::new(endpoint_config, Some(server), socket, runtime)
        .with_context(|| format!("cannot listen for peers on UDP {listen}"))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// How many bytes of datagrams the socket may hold each way.
const SOCKET_BUFFER_BYTES: libc::c_int = 16 << 20;

/// Gives the UDP socket room for a burst of the send window.
///
/// Why: the kernel's default (208 KiB here) drops datagrams as soon as a peer sends faster than
/// this endpoint reads them for a moment; on loopback a third of a bulk transfer's packets was
/// lost that way, each loss costing a retransmission and a congestion-window cut, and the loss
/// made MTU discovery declare a black hole. As root the daemon can exceed `net.core.rmem_max`
/// (`SO_RCVBUFFORCE`); otherwise it gets what the limit allows.
fn enlarge_socket_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    for (force, plain, name) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
    ] {
        let set = |option: libc::c_int| {
            let value = SOCKET_BUFFER_BYTES;
            // SAFETY: setsockopt on a descriptor the socket owns, with a c_int option value
            // that outlives the call.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    std::ptr::addr_of!(value).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 && set(plain) != 0 {
            tracing::warn!(buffer = name, error = %std::io::Error::last_os_error(),
                "cannot enlarge the UDP socket buffer; bursts may be dropped");
        }
    }
}

/// Connects to the peer `peer_name` at `addr`. TLS checks that its certificate chains to our
/// CA and is issued to `peer_name`. The handshake gives up after the idle timeout.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    peer_name: &str,
) -> Result<Connection, EndpointError> {
    let connecting =
        endpoint
            .connect(addr, peer_name)
            .map_err(|source| EndpointError::Connect {
                peer: peer_name.to_owned(),
                addr,
                source,
            })?;
    connecting.await.map_err(|source| EndpointError::Handshake {
        peer: peer_name.to_owned(),
        addr,
        source,
    })
}

/// Completes an incoming connection and checks that the client's certificate is issued to one
/// of `expected_names` (the configured peers). Returns the connection and the matched name;
/// a connection from anyone else is closed with [`CLOSE_REJECTED_PEER`].
pub async fn accept_checked<S: AsRef<str>>(
    incoming: Incoming,
    expected_names: &[S],
) -> Result<(Connection, String), EndpointError> {
    let addr = incoming.remote_address();
    let conn = incoming
        .await
        .map_err(|source| EndpointError::Accept { addr, source })?;
    match match_peer_name(&conn, expected_names) {
        Ok(name) => Ok((conn, name)),
        Err(source) => {
            conn.close(
                CLOSE_REJECTED_PEER,
                b"certificate not issued to a configured peer",
            );
            Err(EndpointError::PeerIdentity { addr, source })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use qrbd_actors::core::messages::{PeerMessage, PROTOCOL_VERSION};
    use qrbd_actors::core::ReplicationProtocol;
    use qrbd_actors::core::{DiskState, Role};
    use tokio::time::timeout;

    use super::*;
    use crate::config::TlsConfig;
    use crate::transport::tls::{
        generate_certificates, load_identity, load_unchecked, peer_certificate_names,
        verify_peer_name,
    };
    use crate::transport::wire::{read_message, write_message};

    const LIMIT: Duration = Duration::from_secs(30);

    fn tls_files(dir: &Path, ca_dir: &Path, node: &str) -> TlsConfig {
        TlsConfig {
            ca: ca_dir.join("ca.crt"),
            cert: dir.join(format!("{node}.crt")),
            key: dir.join(format!("{node}.key")),
        }
    }

    fn node(dir: &Path, name: &str) -> TlsIdentity {
        generate_certificates(dir, Some(name)).unwrap();
        load_identity(&tls_files(dir, dir, name)).unwrap()
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn hello(name: &str, id: u8) -> PeerMessage {
        PeerMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: id,
            node_name: name.into(),
            resource: "r0".into(),
            size_bytes: 1 << 30,
            protocol: ReplicationProtocol::C,
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            current_uuid: 4,
            bitmap_uuid: 0,
            history_uuids: vec![8, 16],
            receiver_missing_bytes: 0,
            discard_my_data: false,
            primary_before_split: false,
            resuming_initial_sync: false,
            allow_two_primaries: false,
        }
    }

    fn megabyte() -> PeerMessage {
        PeerMessage::Data {
            seq: 7,
            epoch: 1,
            request: 99,
            offset: 1 << 20,
            seen: 0,
            data: (0..1u32 << 20)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        }
    }

    /// Loopback carries 64 KiB datagrams: MTU discovery must find far more than Ethernet's
    /// 1,452 bytes, in both directions, while data flows.
    #[tokio::test]
    async fn mtu_discovery_finds_large_packets_on_loopback() {
        timeout(LIMIT, async {
            let dir = tempfile::tempdir().unwrap();
            let alpha = make_endpoint(localhost(), &node(dir.path(), "alpha")).unwrap();
            let beta = make_endpoint(localhost(), &node(dir.path(), "beta")).unwrap();
            let alpha_addr = alpha.local_addr().unwrap();
            let alpha_mtu = Arc::new(std::sync::atomic::AtomicU16::new(0));
            let seen = Arc::clone(&alpha_mtu);
            let server = tokio::spawn(async move {
                let incoming = alpha.accept().await.unwrap();
                let (conn, _) = accept_checked(incoming, &["beta"]).await.unwrap();
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                while let Some(msg) = read_message(&mut recv).await.unwrap() {
                    let mtu = conn.stats().path.current_mtu;
                    seen.store(mtu, std::sync::atomic::Ordering::Relaxed);
                    write_message(&mut send, &msg).await.unwrap();
                }
            });
            let conn = connect(&beta, alpha_addr, "alpha").await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            // Echo megabytes until both sides' discovery has grown the packets (each side
            // probes on its own; the deadline is the test's timeout).
            let grown = |mtu: u16| mtu > 8192;
            while !grown(conn.stats().path.current_mtu)
                || !grown(alpha_mtu.load(std::sync::atomic::Ordering::Relaxed))
            {
                write_message(&mut send, &megabyte()).await.unwrap();
                read_message(&mut recv).await.unwrap().unwrap();
            }
            send.finish().unwrap();
            server.await.unwrap();
            let alpha_mtu = alpha_mtu.load(std::sync::atomic::Ordering::Relaxed);
            assert!(alpha_mtu > 8192, "alpha's path MTU stayed at {alpha_mtu}");
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn hello_and_a_megabyte_arrive_intact() {
        timeout(LIMIT, async {
            let dir = tempfile::tempdir().unwrap();
            let alpha_id = node(dir.path(), "alpha");
            let beta_id = node(dir.path(), "beta");
            let alpha = make_endpoint(localhost(), &alpha_id).unwrap();
            let beta = make_endpoint(localhost(), &beta_id).unwrap();
            let alpha_addr = alpha.local_addr().unwrap();

            let server = tokio::spawn(async move {
                let incoming = alpha.accept().await.unwrap();
                let (conn, name) = accept_checked(incoming, &["gamma", "beta"]).await.unwrap();
                assert_eq!(name, "beta");
                verify_peer_name(&conn, "beta").unwrap();
                assert_eq!(peer_certificate_names(&conn).unwrap(), ["beta"]);
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let mut got = Vec::new();
                while let Some(msg) = read_message(&mut recv).await.unwrap() {
                    got.push(msg);
                }
                write_message(&mut send, &hello("alpha", 0)).await.unwrap();
                send.finish().unwrap();
                conn.closed().await;
                got
            });

            let conn = connect(&beta, alpha_addr, "alpha").await.unwrap();
            assert_eq!(peer_certificate_names(&conn).unwrap(), ["alpha"]);
            verify_peer_name(&conn, "alpha").unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            write_message(&mut send, &hello("beta", 1)).await.unwrap();
            write_message(&mut send, &megabyte()).await.unwrap();
            send.finish().unwrap();
            assert_eq!(
                read_message(&mut recv).await.unwrap(),
                Some(hello("alpha", 0))
            );
            assert_eq!(read_message(&mut recv).await.unwrap(), None);
            conn.close(VarInt::from_u32(0), b"done");

            let got = server.await.unwrap();
            assert_eq!(got.len(), 2);
            assert_eq!(got[0], hello("beta", 1));
            assert!(got[1] == megabyte(), "1 MiB Data message arrived altered");
        })
        .await
        .expect("test timed out");
    }

    /// The server refuses a client certificate from another CA even when the client itself
    /// trusts our CA (so only the server-side check is exercised).
    #[tokio::test]
    async fn client_certificate_from_another_ca_is_refused() {
        timeout(LIMIT, async {
            let ours = tempfile::tempdir().unwrap();
            let theirs = tempfile::tempdir().unwrap();
            let alpha = make_endpoint(localhost(), &node(ours.path(), "alpha")).unwrap();
            generate_certificates(theirs.path(), Some("beta")).unwrap();
            let forged = load_unchecked(&tls_files(theirs.path(), ours.path(), "beta")).unwrap();
            let beta = make_endpoint(localhost(), &forged).unwrap();
            let alpha_addr = alpha.local_addr().unwrap();

            let server = tokio::spawn(async move {
                let incoming = alpha.accept().await.unwrap();
                accept_checked(incoming, &["beta"]).await.map(|_| ())
            });
            // TLS 1.3 lets the client finish before the server has judged its certificate,
            // so the refusal shows either as a failed connect or as the connection closing.
            let client_error = match connect(&beta, alpha_addr, "alpha").await {
                Err(err) => err.to_string(),
                Ok(conn) => conn.closed().await.to_string(),
            };
            let server_error = server.await.unwrap().unwrap_err().to_string();
            assert!(server_error.contains("UnknownIssuer"), "{server_error}");
            assert!(client_error.contains("handshake"), "{client_error}");
        })
        .await
        .expect("test timed out");
    }

    /// And the client refuses a server certificate from another CA.
    #[tokio::test]
    async fn server_certificate_from_another_ca_is_refused() {
        timeout(LIMIT, async {
            let ours = tempfile::tempdir().unwrap();
            let theirs = tempfile::tempdir().unwrap();
            let beta = make_endpoint(localhost(), &node(ours.path(), "beta")).unwrap();
            generate_certificates(theirs.path(), Some("alpha")).unwrap();
            let forged = load_unchecked(&tls_files(theirs.path(), ours.path(), "alpha")).unwrap();
            let alpha = make_endpoint(localhost(), &forged).unwrap();
            let alpha_addr = alpha.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let incoming = alpha.accept().await.unwrap();
                accept_checked(incoming, &["beta"]).await.map(|_| ())
            });
            let err = connect(&beta, alpha_addr, "alpha").await.unwrap_err();
            assert!(matches!(err, EndpointError::Handshake { .. }), "{err}");
            assert!(err.to_string().contains("UnknownIssuer"), "{err}");
            assert!(server.await.unwrap().is_err());
        })
        .await
        .expect("test timed out");
    }

    /// Connecting checks the server's name: alpha's certificate does not pass for "gamma".
    #[tokio::test]
    async fn server_with_the_wrong_name_is_refused() {
        timeout(LIMIT, async {
            let dir = tempfile::tempdir().unwrap();
            let alpha = make_endpoint(localhost(), &node(dir.path(), "alpha")).unwrap();
            let beta = make_endpoint(localhost(), &node(dir.path(), "beta")).unwrap();
            let alpha_addr = alpha.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let incoming = alpha.accept().await.unwrap();
                accept_checked(incoming, &["beta"]).await.map(|_| ())
            });
            let err = connect(&beta, alpha_addr, "gamma").await.unwrap_err();
            assert!(err.to_string().contains("gamma"), "{err}");
            assert!(err.to_string().contains("not valid for name"), "{err}");
            assert!(server.await.unwrap().is_err());

            let err = connect(&beta, alpha_addr, "007").await.unwrap_err();
            assert!(matches!(err, EndpointError::Connect { .. }), "{err}");
        })
        .await
        .expect("test timed out");
    }

    /// A certificate from the right CA but for the wrong node is detected after the handshake.
    #[tokio::test]
    async fn mallory_is_detected_by_name() {
        timeout(LIMIT, async {
            let dir = tempfile::tempdir().unwrap();
            let alpha = make_endpoint(localhost(), &node(dir.path(), "alpha")).unwrap();
            let mallory = make_endpoint(localhost(), &node(dir.path(), "mallory")).unwrap();
            let alpha_addr = alpha.local_addr().unwrap();

            let server = tokio::spawn(async move {
                // Plain accept + verify_peer_name.
                let conn = alpha.accept().await.unwrap().await.unwrap();
                assert_eq!(peer_certificate_names(&conn).unwrap(), ["mallory"]);
                let err = verify_peer_name(&conn, "beta").unwrap_err();
                conn.close(CLOSE_REJECTED_PEER, b"no");
                // accept_checked closes the connection itself.
                let incoming = alpha.accept().await.unwrap();
                let checked = accept_checked(incoming, &["beta"]).await.unwrap_err();
                (err, checked)
            });

            let first = connect(&mallory, alpha_addr, "alpha").await.unwrap();
            first.closed().await;
            let second = connect(&mallory, alpha_addr, "alpha").await.unwrap();
            let reason = second.closed().await;
            assert!(
                matches!(&reason, quinn::ConnectionError::ApplicationClosed(close)
                    if close.error_code == CLOSE_REJECTED_PEER),
                "{reason}"
            );

            let (err, checked) = server.await.unwrap();
            assert_eq!(
                err.to_string(),
                r#"peer presented a certificate for "mallory", expected "beta""#
            );
            let checked = checked.to_string();
            assert!(
                checked.contains(r#"peer presented a certificate for "mallory", expected "beta""#),
                "{checked}"
            );
        })
        .await
        .expect("test timed out");
    }

    /// Garbage datagrams at the listening port (and at the client's) do not disturb an
    /// established connection.
    #[tokio::test]
    async fn garbage_datagrams_do_not_break_a_connection() {
        timeout(LIMIT, async {
            let dir = tempfile::tempdir().unwrap();
            let alpha = make_endpoint(localhost(), &node(dir.path(), "alpha")).unwrap();
            let beta = make_endpoint(localhost(), &node(dir.path(), "beta")).unwrap();
            let alpha_addr = alpha.local_addr().unwrap();
            let beta_addr = beta.local_addr().unwrap();

            // Echo server: answers every Ping with a PingAck and every Data with a WriteAck.
            let server = tokio::spawn(async move {
                let incoming = alpha.accept().await.unwrap();
                let (conn, _) = accept_checked(incoming, &["beta"]).await.unwrap();
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                while let Some(msg) = read_message(&mut recv).await.unwrap() {
                    let reply = match msg {
                        PeerMessage::Ping { nonce } => PeerMessage::PingAck { nonce },
                        PeerMessage::Data { seq, .. } => PeerMessage::WriteAck { up_to: seq },
                        other => panic!("unexpected {other:?}"),
                    };
                    write_message(&mut send, &reply).await.unwrap();
                }
                send.finish().unwrap();
                conn.closed().await;
            });

            let conn = connect(&beta, alpha_addr, "alpha").await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            write_message(&mut send, &PeerMessage::Ping { nonce: 1 })
                .await
                .unwrap();
            assert_eq!(
                read_message(&mut recv).await.unwrap(),
                Some(PeerMessage::PingAck { nonce: 1 })
            );

            let garbage = tokio::net::UdpSocket::bind(localhost()).await.unwrap();
            let mut state = 0x2545_F491_4F6C_DD1Du64;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            for i in 0..3000u32 {
                let len = 1 + (next() % 1400) as usize;
                let mut packet: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                // Make many look like QUIC: long-header v1 (Initial/Handshake) and short-header
                // packets, so they get past the first sanity checks.
                match i % 3 {
                    0 => {
                        packet[0] = 0xC0 | (packet[0] & 0x3F);
                        if packet.len() >= 5 {
                            packet[1..5].copy_from_slice(&1u32.to_be_bytes());
                        }
                    }
                    1 => packet[0] = 0x40 | (packet[0] & 0x3F),
                    _ => {}
                }
                let target = if i % 4 == 3 { beta_addr } else { alpha_addr };
                garbage.send_to(&packet, target).await.unwrap();
                if i % 200 == 0 {
                    tokio::task::yield_now().await;
                }
            }

            // No sleep for the garbage to be "processed": each endpoint reads its one UDP
            // socket in order, so once this ping (sent after all the garbage, to alpha) has
            // been answered (to beta), both endpoints have read every garbage datagram.
            write_message(&mut send, &PeerMessage::Ping { nonce: 2 })
                .await
                .unwrap();
            assert_eq!(
                read_message(&mut recv).await.unwrap(),
                Some(PeerMessage::PingAck { nonce: 2 })
            );
            assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
            write_message(&mut send, &megabyte()).await.unwrap();
            assert_eq!(
                read_message(&mut recv).await.unwrap(),
                Some(PeerMessage::WriteAck { up_to: 7 })
            );
            send.finish().unwrap();
            assert_eq!(read_message(&mut recv).await.unwrap(), None);
            conn.close(VarInt::from_u32(0), b"done");
            server.await.unwrap();
        })
        .await
        .expect("test timed out");
    }

    #[test]
    fn transport_settings() {
        // Guards the measured values against accidental edits; quinn offers no getters.
        let text = format!("{:?}", transport_config());
        for expected in [
            "stream_receive_window: 16777216",
            "receive_window: 67108864",
            "send_window: 67108864",
            "keep_alive_interval: Some(2s)",
        ] {
            assert!(text.contains(expected), "{expected} missing from {text}");
        }
    }
}
