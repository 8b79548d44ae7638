//! Replication transport: QUIC (quinn) with mutual TLS between nodes that share one CA, and a
//! compact binary framing of [`PeerMessage`](qrbd_actors::core::messages::PeerMessage)s on
//! QUIC streams.
//!
//! - [`tls`]: certificate generation (`qrbd` CA and node certificates), loading the configured
//!   identity, the rustls configurations and the post-handshake peer name check.
//! - [`endpoint`]: the quinn endpoint (listening and connecting) with the transport settings
//!   replication wants.
//! - [`wire`]: the frame codec.
//!
//! Identity model: every node certificate carries the node name as its DNS subject alternative
//! name. The connecting side checks the server's certificate against the peer name it is
//! configured with (it uses that name as the TLS server name); the accepting side requires a
//! client certificate from the CA and then checks its name against the configured peers with
//! [`tls::verify_peer_name`] (TLS alone cannot, since the client's name is not known before the
//! handshake).

pub mod endpoint;
pub mod tls;
pub mod wire;

pub use endpoint::{
    accept_checked, connect, make_endpoint, transport_config, EndpointError, CLOSE_REJECTED_PEER,
};
pub use tls::{
    check_certificate_name, client_crypto, generate_certificates, load_identity, match_peer_name,
    peer_certificate_names, server_crypto, verify_peer_name, TlsError, TlsIdentity, ALPN_PROTOCOL,
};
pub use wire::{
    check_limits, decode_frame_body, encode, encode_data_header, encode_into,
    encode_resync_data_header_into, read_message, write_batch, write_data, write_message,
    DataHeader, FrameBatch, FrameParser, Parsed, PayloadHeader, WireError, DATA_HEADER_LEN,
    MAX_DATA_PAYLOAD, MAX_FRAME_BODY, MAX_RESYNC_PAYLOAD, MAX_SYNC_BITMAP_RUNS,
    RESYNC_DATA_HEADER_LEN, ZERO_COPY_MIN,
};
