//! TLS for replication: a small private CA, node certificates named after the node, loading the
//! configured identity and the rustls configurations both sides of a connection use.
//!
//! Everything uses the *ring* provider explicitly (never the process default), TLS 1.3 only
//! (QUIC requires it) and ALPN [`ALPN_PROTOCOL`].

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// ALPN protocol id of the replication protocol; bumped together with incompatible wire changes.
pub const ALPN_PROTOCOL: &[u8] = b"qrbd/1";

/// File names of the CA inside the certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

/// Longest accepted node name (matches the configuration's name limit).
const MAX_NAME_LEN: usize = 64;
/// Long lifetimes on purpose: an expiring certificate silently stops replication, and these
/// certificates only ever authenticate nodes of one private cluster to each other.
const CA_VALIDITY: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
const NODE_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Back-dating absorbs clock skew between the node that issues and the nodes that verify.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS {what} file {} does not exist", path.display())]
    Missing { what: &'static str, path: PathBuf },
    #[error("cannot read TLS {what} file {}: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("TLS {what} file {} is not valid PEM: {reason}", path.display())]
    BadPem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS {what} file {} contains no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("TLS key file {} contains no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    #[error("TLS CA file {} holds a certificate that cannot be a trust anchor: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS key file {} does not belong to certificate {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS certificate {} is not usable with CA {}: {source}", cert.display(), ca.display())]
    NotTrusted {
        cert: PathBuf,
        ca: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS certificate {} names no DNS host (subject alternative name); qrbd node certificates carry the node name", path.display())]
    NoName { path: PathBuf },
    #[error("invalid node name {name:?} for a certificate: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot set up TLS certificate verification: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("peer presented no TLS certificate")]
    NoPeerCertificate,
    #[error("cannot parse the peer's TLS certificate: {0}")]
    BadPeerCertificate(webpki::Error),
    #[error("peer presented a certificate {}, expected {expected:?}", describe_names(.presented))]
    NameMismatch {
        presented: Vec<String>,
        expected: String,
    },
    #[error("peer presented a certificate {}, expected one of {}", describe_names(.presented), quote_all(.expected))]
    NameNotExpected {
        presented: Vec<String>,
        expected: Vec<String>,
    },
}

fn quote_all(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    quoted.join(", ")
}

fn describe_names(names: &[String]) -> String {
    if names.is_empty() {
        return "with no DNS name".to_owned();
    }
    format!("for {}", quote_all(names))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

/// Checks that `name` can be a node name in a certificate: the configuration's name rules
/// (1..=64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`) and a valid DNS name, since it
/// is used as the TLS server name (so e.g. `007` or `node-` are refused).
pub fn check_certificate_name(name: &str) -> Result<(), TlsError> {
    let invalid = |reason: &str| TlsError::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(&format!(
            "at most {MAX_NAME_LEN} characters are allowed"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(invalid(&format!(
            "contains {bad:?}; only letters, digits, '_', '.' and '-' are allowed"
        )));
    }
    if name.eq_ignore_ascii_case("ca") {
        return Err(invalid("\"ca\" is reserved for the CA's own files"));
    }
    if DnsName::try_from(name).is_err() {
        return Err(invalid(
            "not usable as a DNS name: dot-separated parts must be non-empty, must not start or \
             end with '-', and the last part must not be a number",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Certificate generation
// ---------------------------------------------------------------------------------------------

/// Creates the CA (`ca_dir/ca.crt`, `ca_dir/ca.key`) unless both already exist, and with
/// `Some(name)` a certificate for node `name` (`ca_dir/<name>.crt`, `ca_dir/<name>.key`) signed
/// by it, valid as TLS server and client. Returns the files written. Keys are written with mode
/// 0600. Never overwrites a file; on failure, files written by this call are removed again.
pub fn generate_certificates(ca_dir: &Path, node: Option<&str>) -> anyhow::Result<Vec<PathBuf>> {
    let ca_crt = ca_dir.join(CA_CERT_FILE);
    let ca_key = ca_dir.join(CA_KEY_FILE);
    let node_files = match node {
        Some(name) => {
            check_certificate_name(name)?;
            let crt = ca_dir.join(format!("{name}.crt"));
            let key = ca_dir.join(format!("{name}.key"));
            // Checked before touching anything so a refused request creates no CA either.
            for path in [&crt, &key] {
                if path.exists() {
                    bail!(
                        "{} already exists; to issue a new certificate for {name:?}, delete {} \
                         and {} first",
                        path.display(),
                        crt.display(),
                        key.display()
                    );
                }
            }
            Some((name, crt, key))
        }
        None => None,
    };

    match (ca_crt.exists(), ca_key.exists()) {
        (true, false) | (false, true) => {
            let (present, absent) = if ca_crt.exists() {
                (&ca_crt, &ca_key)
            } else {
                (&ca_key, &ca_crt)
            };
            bail!(
                "found {} but not {}; restore the missing file, or delete both to create a new \
                 CA (which invalidates every certificate it signed)",
                present.display(),
                absent.display()
            );
        }
        _ => {}
    }

    fs::create_dir_all(ca_dir)
        .with_context(|| format!("cannot create certificate directory {}", ca_dir.display()))?;

    let mut written = Vec::new();
    let result = generate_into(&ca_crt, &ca_key, node_files.as_ref(), &mut written);
    if result.is_err() {
        for path in &written {
            let _ = fs::remove_file(path);
        }
    }
    result.map(|()| written)
}

fn generate_into(
    ca_crt: &Path,
    ca_key: &Path,
    node: Option<&(&str, PathBuf, PathBuf)>,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    if !ca_crt.exists() {
        let key = KeyPair::generate().context("cannot generate the CA key")?;
        let cert = ca_params()
            .self_signed(&key)
            .context("cannot create the CA certificate")?;
        write_new(ca_key, key.serialize_pem().as_bytes(), 0o600, written)?;
        write_new(ca_crt, cert.pem().as_bytes(), 0o644, written)?;
    }
    let Some((name, crt_path, key_path)) = node else {
        return Ok(());
    };
    let issuer = load_ca_issuer(ca_crt, ca_key)?;
    let key = KeyPair::generate().with_context(|| format!("cannot generate a key for {name:?}"))?;
    let cert = node_params(name)?
        .signed_by(&key, &issuer)
        .with_context(|| format!("cannot sign the certificate for {name:?}"))?;
    write_new(key_path, key.serialize_pem().as_bytes(), 0o600, written)?;
    write_new(crt_path, cert.pem().as_bytes(), 0o644, written)?;
    Ok(())
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "qrbd");
    // A unique name per CA: verifiers find the issuer by name, so with a shared name a
    // certificate from another qrbd CA would fail as "bad signature" rather than as the
    // clearer "unknown issuer".
    dn.push(
        DnType::CommonName,
        format!("qrbd CA {:08x}", rand::random::<u32>()),
    );
    params.distinguished_name = dn;
    // Path length 0: the CA signs node certificates only, never intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_VALIDITY);
    params
}

fn node_params(name: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![name.to_owned()])
        .with_context(|| format!("cannot use {name:?} as a certificate name"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "qrbd");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node both accepts and initiates connections with the same certificate.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, NODE_VALIDITY);
    Ok(params)
}

/// Loads an existing CA for signing, after checking that its key belongs to its certificate
/// (otherwise we would hand out certificates nobody can verify).
fn load_ca_issuer(ca_crt: &Path, ca_key: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let cert_pem = fs::read_to_string(ca_crt)
        .with_context(|| format!("cannot read CA certificate {}", ca_crt.display()))?;
    let key_pem = fs::read_to_string(ca_key)
        .with_context(|| format!("cannot read CA key {}", ca_key.display()))?;
    let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .with_context(|| format!("{} holds no PEM certificate", ca_crt.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .with_context(|| format!("{} holds no PEM private key", ca_key.display()))?;
    CertifiedKey::from_der(vec![cert_der], key_der, &provider()).with_context(|| {
        format!(
            "CA key {} does not belong to CA certificate {}",
            ca_key.display(),
            ca_crt.display()
        )
    })?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("cannot load CA key {}", ca_key.display()))?;
    Issuer::from_ca_cert_pem(&cert_pem, key)
        .with_context(|| format!("cannot use {} as a CA certificate", ca_crt.display()))
}

/// Writes a file that must not exist yet, with `mode` applied at creation (so a key is never
/// readable by others, not even briefly), and records it in `written`.
fn write_new(
    path: &Path,
    contents: &[u8],
    mode: u32,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    written.push(path.to_owned());
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

/// This node's TLS identity: the CA it trusts and its own certificate chain and key, loaded
/// and checked against each other.
pub struct TlsIdentity {
    ca_path: PathBuf,
    cert_path: PathBuf,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    names: Vec<String>,
}

impl TlsIdentity {
    /// The DNS names our certificate is valid for (normally just the node name).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Our certificate chain, end-entity certificate first.
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            ca_path: self.ca_path.clone(),
            cert_path: self.cert_path.clone(),
            roots: Arc::clone(&self.roots),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            names: self.names.clone(),
        }
    }
}

// Hand-written so the private key can never end up in a log.
impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("ca_path", &self.ca_path)
            .field("cert_path", &self.cert_path)
            .field("names", &self.names)
            .field("key", &"[elided]")
            .finish()
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TlsError::Missing {
                what,
                path: path.to_owned(),
            }
        } else {
            TlsError::Unreadable {
                what,
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::BadPem {
            what,
            path: path.to_owned(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file("key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|err| match err {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        other => TlsError::BadPem {
            what: "key",
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, webpki::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)?;
    Ok(parsed.valid_dns_names().map(str::to_owned).collect())
}

/// Loads and cross-checks the configured CA, certificate and key: the key must belong to the
/// certificate, and the certificate must chain to the CA and be valid now for both server and
/// client use under its own name. Catching this at startup gives an error naming the file
/// instead of a handshake failure on the peer.
pub fn load_identity(tls: &crate::config::TlsConfig) -> Result<TlsIdentity, TlsError> {
    let identity = load_unchecked(tls)?;
    check_identity(&identity, &tls.key)?;
    Ok(identity)
}

/// Reads the files without checking them against each other (tests use it to build the
/// identities a misconfigured or hostile peer would have).
pub(crate) fn load_unchecked(tls: &crate::config::TlsConfig) -> Result<TlsIdentity, TlsError> {
    let ca_certs = read_certificates("CA", &tls.ca)?;
    let chain = read_certificates("certificate", &tls.cert)?;
    let key = read_key(&tls.key)?;

    let mut roots = RootCertStore::empty();
    for ca in ca_certs {
        roots.add(ca).map_err(|source| TlsError::BadCa {
            path: tls.ca.clone(),
            source,
        })?;
    }
    let names = match chain.first() {
        Some(end_entity) => dns_names(end_entity).map_err(|err| TlsError::BadPem {
            what: "certificate",
            path: tls.cert.clone(),
            reason: format!("cannot parse the certificate: {err}"),
        })?,
        None => Vec::new(),
    };
    Ok(TlsIdentity {
        ca_path: tls.ca.clone(),
        cert_path: tls.cert.clone(),
        roots: Arc::new(roots),
        chain,
        key,
        names,
    })
}

fn check_identity(identity: &TlsIdentity, key_path: &Path) -> Result<(), TlsError> {
    let provider = provider();
    CertifiedKey::from_der(identity.chain.clone(), identity.key.clone_key(), &provider).map_err(
        |source| TlsError::KeyMismatch {
            cert: identity.cert_path.clone(),
            key: key_path.to_owned(),
            source,
        },
    )?;

    let (end_entity, intermediates) =
        identity
            .chain
            .split_first()
            .ok_or_else(|| TlsError::NoCertificate {
                what: "certificate",
                path: identity.cert_path.clone(),
            })?;
    let Some(first_name) = identity.names.first() else {
        return Err(TlsError::NoName {
            path: identity.cert_path.clone(),
        });
    };
    let not_trusted = |source| TlsError::NotTrusted {
        cert: identity.cert_path.clone(),
        ca: identity.ca_path.clone(),
        source,
    };
    let now = UnixTime::now();
    WebPkiClientVerifier::builder_with_provider(Arc::clone(&identity.roots), Arc::clone(&provider))
        .build()?
        .verify_client_cert(end_entity, intermediates, now)
        .map_err(not_trusted)?;
    let server_name = ServerName::try_from(first_name.as_str())
        .map_err(|err| not_trusted(rustls::Error::General(err.to_string())))?;
    WebPkiServerVerifier::builder_with_provider(Arc::clone(&identity.roots), provider)
        .build()?
        .verify_server_cert(end_entity, intermediates, &server_name, &[], now)
        .map_err(not_trusted)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// rustls configurations
// ---------------------------------------------------------------------------------------------

/// The accepting side: presents our certificate and requires a client certificate chained to
/// our CA. Which node the client is (its name) is checked after the handshake with
/// [`verify_peer_name`].
pub fn server_crypto(identity: &TlsIdentity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&identity.roots),
        Arc::clone(&provider),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    // No resumption: every connection does a full handshake, so the peer's certificate is
    // always checked against the CA as it is now, and `peer_identity` is always the
    // certificate just presented. Connections are long-lived, so the cost does not matter.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The connecting side: presents our certificate and requires the server's to chain to our CA
/// and to be valid for the server name given at connect time (the configured peer name).
pub fn client_crypto(identity: &TlsIdentity) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(Arc::clone(&identity.roots))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// Peer name checks
// ---------------------------------------------------------------------------------------------

fn peer_end_entity(conn: &quinn::Connection) -> Result<CertificateDer<'static>, TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    chain.into_iter().next().ok_or(TlsError::NoPeerCertificate)
}

/// The DNS names (subject alternative names) of the certificate the peer presented.
pub fn peer_certificate_names(conn: &quinn::Connection) -> Result<Vec<String>, TlsError> {
    let cert = peer_end_entity(conn)?;
    dns_names(&cert).map_err(TlsError::BadPeerCertificate)
}

/// Checks that the peer's certificate is valid for `expected` (the configured peer name).
/// The handshake has already checked that it chains to our CA.
pub fn verify_peer_name(conn: &quinn::Connection, expected: &str) -> Result<(), TlsError> {
    let cert = peer_end_entity(conn)?;
    let parsed = webpki::EndEntityCert::try_from(&cert).map_err(TlsError::BadPeerCertificate)?;
    let name = ServerName::try_from(expected).map_err(|_| TlsError::InvalidName {
        name: expected.to_owned(),
        reason: "not a valid DNS name".to_owned(),
    })?;
    if parsed.verify_is_valid_for_subject_name(&name).is_ok() {
        return Ok(());
    }
    Err(TlsError::NameMismatch {
        presented: parsed.valid_dns_names().map(str::to_owned).collect(),
        expected: expected.to_owned(),
    })
}

/// Which of the `expected` names (the configured peers) the peer's certificate is valid for;
/// the first match wins. With one expected name a mismatch reads like [`verify_peer_name`]'s.
pub fn match_peer_name<S: AsRef<str>>(
    conn: &quinn::Connection,
    expected: &[S],
) -> Result<String, TlsError> {
    let mut presented = None;
    for name in expected {
        match verify_peer_name(conn, name.as_ref()) {
            Ok(()) => return Ok(name.as_ref().to_owned()),
            Err(TlsError::NameMismatch { presented: p, .. }) => presented = Some(p),
            Err(TlsError::InvalidName { .. }) => {}
            Err(other) => return Err(other),
        }
    }
    let presented = match presented {
        Some(presented) => presented,
        None => peer_certificate_names(conn)?,
    };
    match expected {
        [only] => Err(TlsError::NameMismatch {
            presented,
            expected: only.as_ref().to_owned(),
        }),
        _ => Err(TlsError::NameNotExpected {
            presented,
            expected: expected.iter().map(|n| n.as_ref().to_owned()).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsConfig;

    fn tls_config(dir: &Path, node: &str) -> TlsConfig {
        TlsConfig {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("{node}.crt")),
            key: dir.join(format!("{node}.key")),
        }
    }

    #[test]
    fn generates_ca_then_nodes_and_loads_them() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate_certificates(dir.path(), None).unwrap();
        assert_eq!(
            written,
            vec![dir.path().join("ca.key"), dir.path().join("ca.crt")]
        );
        let ca_before = fs::read(dir.path().join("ca.crt")).unwrap();

        let written = generate_certificates(dir.path(), Some("alpha")).unwrap();
        assert_eq!(
            written,
            vec![dir.path().join("alpha.key"), dir.path().join("alpha.crt")]
        );
        // The CA is reused, not replaced.
        assert_eq!(fs::read(dir.path().join("ca.crt")).unwrap(), ca_before);

        let mode = |p: &str| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("alpha.key"), 0o600);

        let identity = load_identity(&tls_config(dir.path(), "alpha")).unwrap();
        assert_eq!(identity.names(), ["alpha".to_owned()]);
        let debug = format!("{identity:?}");
        assert!(debug.contains("[elided]") && !debug.contains("PRIVATE"));
        server_crypto(&identity).unwrap();
        client_crypto(&identity).unwrap();
    }

    #[test]
    fn node_and_ca_in_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("tls");
        let written = generate_certificates(&sub, Some("beta")).unwrap();
        assert_eq!(written.len(), 4);
        load_identity(&tls_config(&sub, "beta")).unwrap();
    }

    #[test]
    fn refuses_to_overwrite_node_certificate() {
        let dir = tempfile::tempdir().unwrap();
        generate_certificates(dir.path(), Some("alpha")).unwrap();
        let before = fs::read(dir.path().join("alpha.crt")).unwrap();
        let err = generate_certificates(dir.path(), Some("alpha")).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("already exists"), "{text}");
        assert!(text.contains("delete"), "{text}");
        assert_eq!(fs::read(dir.path().join("alpha.crt")).unwrap(), before);
    }

    #[test]
    fn refuses_half_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        generate_certificates(dir.path(), None).unwrap();
        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let text = format!(
            "{:#}",
            generate_certificates(dir.path(), Some("alpha")).unwrap_err()
        );
        assert!(text.contains("ca.crt") && text.contains("ca.key"), "{text}");
        assert!(!dir.path().join("alpha.crt").exists());
    }

    #[test]
    fn refuses_mismatched_ca_key() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        generate_certificates(a.path(), None).unwrap();
        generate_certificates(b.path(), None).unwrap();
        fs::copy(b.path().join("ca.key"), a.path().join("other.key")).unwrap();
        fs::remove_file(a.path().join("ca.key")).unwrap();
        fs::rename(a.path().join("other.key"), a.path().join("ca.key")).unwrap();
        let text = format!(
            "{:#}",
            generate_certificates(a.path(), Some("alpha")).unwrap_err()
        );
        assert!(text.contains("does not belong"), "{text}");
        assert!(!a.path().join("alpha.key").exists());
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "a b",
            "-x",
            ".x",
            "x-",
            "007",
            "node.1",
            "ca",
            "é",
            &"a".repeat(65),
        ] {
            assert!(check_certificate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["alpha", "node_1", "n1.example", "A-b"] {
            check_certificate_name(good).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(generate_certificates(dir.path(), Some("../evil")).is_err());
        assert!(!dir.path().join("ca.crt").exists());
    }

    #[test]
    fn load_identity_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        generate_certificates(dir.path(), Some("alpha")).unwrap();
        let good = tls_config(dir.path(), "alpha");

        let missing = TlsConfig {
            cert: dir.path().join("nope.crt"),
            ..good.clone()
        };
        let text = load_identity(&missing).unwrap_err().to_string();
        assert!(
            text.contains("nope.crt") && text.contains("does not exist"),
            "{text}"
        );

        // A key where a certificate belongs, and a certificate where a key belongs.
        let swapped = TlsConfig {
            cert: good.key.clone(),
            key: good.cert.clone(),
            ..good.clone()
        };
        let text = load_identity(&swapped).unwrap_err().to_string();
        assert!(
            text.contains("alpha.key") && text.contains("no PEM certificate"),
            "{text}"
        );
        let no_key = TlsConfig {
            key: good.cert.clone(),
            ..good.clone()
        };
        let text = load_identity(&no_key).unwrap_err().to_string();
        assert!(
            text.contains("alpha.crt") && text.contains("no PEM private key"),
            "{text}"
        );

        let dir_as_file = TlsConfig {
            ca: dir.path().to_owned(),
            ..good.clone()
        };
        let text = load_identity(&dir_as_file).unwrap_err().to_string();
        assert!(text.contains("cannot read TLS CA file"), "{text}");

        // Certificate from another CA.
        let other = tempfile::tempdir().unwrap();
        generate_certificates(other.path(), Some("alpha")).unwrap();
        let foreign = TlsConfig {
            ca: good.ca.clone(),
            ..tls_config(other.path(), "alpha")
        };
        let text = load_identity(&foreign).unwrap_err().to_string();
        assert!(text.contains("not usable with CA"), "{text}");

        // Key of another node.
        generate_certificates(dir.path(), Some("beta")).unwrap();
        let wrong_key = TlsConfig {
            key: dir.path().join("beta.key"),
            ..good
        };
        let text = load_identity(&wrong_key).unwrap_err().to_string();
        assert!(text.contains("does not belong"), "{text}");
    }

    #[test]
    fn mismatch_message_names_both() {
        let err = TlsError::NameMismatch {
            presented: vec!["mallory".to_owned()],
            expected: "beta".to_owned(),
        };
        assert_eq!(
            err.to_string(),
            r#"peer presented a certificate for "mallory", expected "beta""#
        );
        let none = TlsError::NameMismatch {
            presented: vec![],
            expected: "beta".to_owned(),
        };
        assert!(none.to_string().contains("no DNS name"));
    }
}
