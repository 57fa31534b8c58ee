//! Mutual TLS for QUIC: loads a node's identity from PEM files and builds quinn configs.
//!
//! Both sides of every connection present a certificate signed by the cluster CA (made by
//! `certs::init`) and trust nothing else. A client names the node it expects as the server
//! name, so it cannot be talked to by a different node; a server learns who called from the
//! DNS name in the client's certificate ([`peer_of`]).
//!
//! The controller's key also signs each transfer it starts: a grant ([`sign_grant`]), which
//! every target checks ([`verify_grant`]) before it acts on an `Open`, so that a node with a
//! valid certificate cannot start a transfer of its own by sending `Open` itself.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mover_protocol::Grant;
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use x509_parser::extensions::GeneralName;

use crate::certs::CONTROLLER_NAME;

/// The ALPN protocol of mover connections; a peer speaking anything else is refused.
pub const ALPN: &[u8] = b"mover/1";

/// Where a node's TLS files are; the `[tls]` table of agent and controller configs.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate (`ca.pem`).
    pub ca: PathBuf,
    /// This node's certificate (`<node>.pem`).
    pub cert: PathBuf,
    /// This node's private key (`<node>.key`).
    pub key: PathBuf,
}

/// Errors of loading TLS files and of identifying peers. None of them goes away on retry: the
/// files or the cluster's certificates need fixing.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {what} {}: the file does not exist", path.display())]
    Missing { what: &'static str, path: PathBuf },
    #[error("read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {what} {}: not a valid PEM file: {reason}", path.display())]
    NotPem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("load {what} {}: the file holds no {expected} PEM block", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("load ca certificate {}: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("read the name in certificate {}: {reason}", path.display())]
    CertName { path: PathBuf, reason: String },
    #[error(
        "load identity: private key {} does not belong to certificate {}: {reason}",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error(
        "load identity: certificate {} is not valid under ca {}: {reason}",
        cert.display(),
        ca.display()
    )]
    NotFromCa {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("build tls configuration: {reason}")]
    Config { reason: String },
    #[error("build quic crypto configuration: {0}")]
    Quic(#[from] NoInitialCipherSuite),
    #[error("identify peer: the connection carries no peer certificate")]
    NoPeerCertificate,
    #[error("identify peer: {reason}")]
    PeerName { reason: String },
    #[error("sign grant: {reason}")]
    GrantKey { reason: String },
    #[error("verify grant: its certificate is not one of the cluster ca's: {reason}")]
    GrantNotFromCa { reason: String },
    #[error(
        "verify grant: its certificate names {name}, not the controller ({})",
        CONTROLLER_NAME
    )]
    GrantNotController { name: String },
    #[error("verify grant: the signature does not match this transfer: {reason}")]
    GrantSignature { reason: String },
    #[error("verify grant: it expired at {not_after} (unix time), {} s ago", now.saturating_sub(*not_after))]
    GrantExpired { not_after: u64, now: u64 },
}

/// A node's (or the controller's) TLS identity: the CA it trusts and its own cert and key.
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    name: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Identity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads the CA, certificate and key, and checks that they fit together: the key matches
    /// the certificate and the certificate is currently valid under the CA.
    pub fn load(paths: &TlsPaths) -> Result<Identity, TlsError> {
        let provider = provider();

        let ca_certs = read_certs(&paths.ca, "ca certificate")?;
        let mut roots = RootCertStore::empty();
        for cert in ca_certs {
            roots.add(cert).map_err(|e| TlsError::BadCa {
                path: paths.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);

        let chain = read_certs(&paths.cert, "certificate")?;
        let key = read_key(&paths.key)?;
        let name = dns_name(&chain[0]).map_err(|reason| TlsError::CertName {
            path: paths.cert.clone(),
            reason,
        })?;

        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| {
            TlsError::KeyMismatch {
                cert: paths.cert.clone(),
                key: paths.key.clone(),
                reason: e.to_string(),
            }
        })?;
        check_signed_by_ca(&roots, &chain, &name, &provider).map_err(|reason| {
            TlsError::NotFromCa {
                cert: paths.cert.clone(),
                ca: paths.ca.clone(),
                reason,
            }
        })?;

        Ok(Identity {
            roots,
            chain,
            key,
            name,
        })
    }

    /// The DNS name in our own certificate: a node name or [`CONTROLLER_NAME`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Our own certificate (DER), as a grant carries it.
    pub fn cert_der(&self) -> &[u8] {
        // `load` refuses a file without certificates, so the chain has its end entity.
        self.chain.first().map_or(&[], |c| c.as_ref())
    }

    /// The cluster CA's certificates, which grants are checked against.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }
}

/// Signs `bytes` (a transfer's [`mover_protocol::grant_bytes`]) with this identity's key, as
/// ECDSA P-256 with SHA-256: the kind of key `certs::init` makes for every certificate.
///
/// Any identity can sign; only the controller's signature passes [`verify_grant`].
pub fn sign_grant(id: &Identity, bytes: &[u8]) -> Result<Vec<u8>, TlsError> {
    let key_error = |reason: String| TlsError::GrantKey { reason };
    let key = rustls::crypto::ring::sign::any_ecdsa_type(&id.key)
        .map_err(|e| key_error(format!("the private key is not an ECDSA key: {e}")))?;
    let signer = key
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or_else(|| {
            key_error("the private key is not an ECDSA P-256 key, which grants need".to_owned())
        })?;
    signer.sign(bytes).map_err(|e| key_error(e.to_string()))
}

/// Checks that `grant` is the cluster controller's signature over `signed` (the
/// [`mover_protocol::grant_bytes`] of the transfer at hand), valid at `now`: its certificate
/// chains to one of `roots` for client authentication and names [`CONTROLLER_NAME`], the
/// signature verifies under that certificate's key, and `not_after` is still ahead.
pub fn verify_grant(
    roots: &RootCertStore,
    grant: &Grant,
    signed: &[u8],
    now: UnixTime,
) -> Result<(), TlsError> {
    let der = CertificateDer::from(grant.controller_cert.as_slice());
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| TlsError::GrantNotFromCa {
        reason: format!("the certificate does not parse: {e}"),
    })?;
    cert.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &roots.roots,
        &[],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| TlsError::GrantNotFromCa {
        reason: format!("{e:?}"),
    })?;
    let controller = ServerName::try_from(CONTROLLER_NAME).map_err(config_error)?;
    cert.verify_is_valid_for_subject_name(&controller)
        .map_err(|_| TlsError::GrantNotController {
            name: dns_name(&der).unwrap_or_else(|why| format!("no usable name ({why})")),
        })?;
    cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, signed, &grant.signature)
        .map_err(|e| TlsError::GrantSignature {
            reason: format!("{e:?}"),
        })?;
    if now.as_secs() >= grant.not_after_unix {
        return Err(TlsError::GrantExpired {
            not_after: grant.not_after_unix,
            now: now.as_secs(),
        });
    }
    Ok(())
}

/// Who is on the other end of a connection, by the name in its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    Controller,
    Node(String),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Controller => f.write_str("the controller"),
            Peer::Node(name) => write!(f, "node {name}"),
        }
    }
}

/// Identifies the peer of an established connection from its certificate, which the handshake
/// has already verified against the cluster CA.
pub fn peer_of(conn: &quinn::Connection) -> Result<Peer, TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::PeerName {
            reason: "the peer identity is not an x.509 certificate chain".to_owned(),
        })?;
    let end_entity = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    let name = dns_name(end_entity).map_err(|reason| TlsError::PeerName { reason })?;
    Ok(if name == CONTROLLER_NAME {
        Peer::Controller
    } else {
        Peer::Node(name)
    })
}

/// A quinn server config that accepts only clients with a certificate from the cluster CA.
pub fn server_config(
    id: &Identity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .build()
        .map_err(config_error)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(config_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport);
    Ok(config)
}

/// A quinn client config that trusts only the cluster CA and presents our certificate.
///
/// The server name given at connect time must be the node we mean to reach; the handshake
/// fails if the server's certificate names another node.
pub fn client_config(
    id: &Identity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_root_certificates(id.roots.clone())
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(config_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport);
    Ok(config)
}

/// The ring provider, chosen explicitly so no process-wide default is needed, with
/// AES-128-GCM put first: every byte a transfer moves is encrypted at one end and decrypted
/// at the other, and AES-128 takes 10 rounds per block where AES-256 (ring's first choice)
/// takes 14. AES-128-GCM is the suite TLS 1.3 requires every implementation to have.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn config_error(e: impl fmt::Display) -> TlsError {
    TlsError::Config {
        reason: e.to_string(),
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => TlsError::Missing {
            what,
            path: path.to_owned(),
        },
        _ => TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        },
    })
}

/// Reads all CERTIFICATE blocks of a PEM file; there must be at least one.
fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NotPem {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    let bytes = read_file(path, WHAT)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Empty {
            what: WHAT,
            path: path.to_owned(),
            expected: "PRIVATE KEY",
        },
        e => TlsError::NotPem {
            what: WHAT,
            path: path.to_owned(),
            reason: e.to_string(),
        },
    })
}

/// Verifies our own chain the way a peer will, so a wrong CA or an expired cert shows up at
/// start-up rather than as failed handshakes later.
fn check_signed_by_ca(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    name: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<(), String> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let (end_entity, intermediates) = chain.split_first().ok_or("the chain is empty")?;
    verifier
        .verify_server_cert(
            end_entity,
            intermediates,
            &server_name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The single DNS subject alternative name of a certificate.
fn dns_name(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("the subject alternative name does not parse: {e}"))?
        .ok_or("the certificate has no subject alternative name")?;
    let mut names = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::DNSName(name) => Some(*name),
        _ => None,
    });
    match (names.next(), names.next()) {
        (Some(name), None) => Ok(name.to_owned()),
        (None, _) => Err("the certificate has no DNS name".to_owned()),
        (Some(_), Some(_)) => Err("the certificate has more than one DNS name".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    fn cluster(nodes: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        certs::init(dir.path(), &nodes).expect("init certs");
        dir
    }

    #[test]
    fn aes_128_gcm_is_offered_first_and_the_others_still_accepted() {
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
        assert!(suites.contains(&rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
    }

    fn paths(dir: &Path, stem: &str) -> TlsPaths {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    #[test]
    fn load_reads_names_from_certificates() {
        let dir = cluster(&["east1"]);
        let node = Identity::load(&paths(dir.path(), "east1")).expect("load east1");
        assert_eq!(node.name(), "east1");
        let controller = Identity::load(&paths(dir.path(), "controller")).expect("load controller");
        assert_eq!(controller.name(), CONTROLLER_NAME);
    }

    #[test]
    fn tls_paths_read_from_a_toml_table() {
        #[derive(serde::Deserialize)]
        struct Config {
            tls: TlsPaths,
        }
        let config: Config =
            toml::from_str("[tls]\nca = \"/c/ca.pem\"\ncert = \"/c/a.pem\"\nkey = \"/c/a.key\"\n")
                .expect("parse");
        assert_eq!(config.tls.key, Path::new("/c/a.key"));
        let typo =
            toml::from_str::<Config>("[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\ncrt = \"d\"\n");
        assert!(typo.is_err(), "unknown keys must be refused");
    }

    #[test]
    fn load_names_a_missing_file() {
        let dir = cluster(&["east1"]);
        let mut p = paths(dir.path(), "east1");
        p.key = dir.path().join("nope.key");
        let err = Identity::load(&p).expect_err("missing key must fail");
        assert!(matches!(err, TlsError::Missing { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.key"), "{err}");
    }

    #[test]
    fn load_rejects_a_file_without_pem() {
        let dir = cluster(&["east1"]);
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello\n").expect("write junk");
        let mut p = paths(dir.path(), "east1");
        p.cert = junk.clone();
        let err = Identity::load(&p).expect_err("junk cert must fail");
        assert!(matches!(err, TlsError::Empty { .. }), "{err:?}");
        assert!(err.to_string().contains("junk.pem"), "{err}");

        let mut p = paths(dir.path(), "east1");
        p.key = dir.path().join("east1.pem");
        let err = Identity::load(&p).expect_err("cert as key must fail");
        assert!(matches!(err, TlsError::Empty { .. }), "{err:?}");
    }

    #[test]
    fn load_rejects_a_key_of_another_cert() {
        let dir = cluster(&["east1", "east2"]);
        let mut p = paths(dir.path(), "east1");
        p.key = dir.path().join("east2.key");
        let err = Identity::load(&p).expect_err("wrong key must fail");
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn load_rejects_a_cert_of_another_ca() {
        let ours = cluster(&["east1"]);
        let theirs = cluster(&["east1"]);
        let mut p = paths(theirs.path(), "east1");
        p.ca = ours.path().join("ca.pem");
        let err = Identity::load(&p).expect_err("foreign cert must fail");
        assert!(matches!(err, TlsError::NotFromCa { .. }), "{err:?}");
    }

    fn grant_by(id: &Identity, signer: &Identity, bytes: &[u8], not_after_unix: u64) -> Grant {
        Grant {
            controller_cert: id.cert_der().to_vec(),
            not_after_unix,
            signature: sign_grant(signer, bytes).expect("sign"),
        }
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn a_controller_grant_verifies() {
        let dir = cluster(&["east1"]);
        let ctl = Identity::load(&paths(dir.path(), "controller")).expect("controller");
        let node = Identity::load(&paths(dir.path(), "east1")).expect("east1");
        let grant = grant_by(&ctl, &ctl, b"transfer", u64::MAX);
        verify_grant(&node.roots(), &grant, b"transfer", now()).expect("a valid grant");
        let sig = &grant.signature;
        assert!(
            sig.len() <= mover_protocol::message::MAX_GRANT_SIGNATURE,
            "{}",
            sig.len()
        );
        assert!(ctl.cert_der().len() <= mover_protocol::message::MAX_GRANT_CERT);
    }

    #[test]
    fn a_grant_for_other_bytes_is_refused() {
        let dir = cluster(&["east1"]);
        let ctl = Identity::load(&paths(dir.path(), "controller")).expect("controller");
        let grant = grant_by(&ctl, &ctl, b"transfer", u64::MAX);
        let err = verify_grant(&ctl.roots(), &grant, b"transfes", now()).expect_err("other bytes");
        assert!(matches!(err, TlsError::GrantSignature { .. }), "{err}");
        let mut flipped = grant.clone();
        flipped.signature[10] ^= 1;
        let err = verify_grant(&ctl.roots(), &flipped, b"transfer", now()).expect_err("bad sig");
        assert!(matches!(err, TlsError::GrantSignature { .. }), "{err}");
    }

    #[test]
    fn a_grant_signed_by_a_node_is_refused() {
        let dir = cluster(&["east1", "east2"]);
        let ctl = Identity::load(&paths(dir.path(), "controller")).expect("controller");
        let node = Identity::load(&paths(dir.path(), "east2")).expect("east2");
        // With the node's own certificate: it is not the controller.
        let own = grant_by(&node, &node, b"transfer", u64::MAX);
        let err = verify_grant(&ctl.roots(), &own, b"transfer", now()).expect_err("node grant");
        assert!(matches!(err, TlsError::GrantNotController { .. }), "{err}");
        assert!(err.to_string().contains("names east2"), "{err}");
        // With the controller's certificate: the signature is not the controller's.
        let posing = grant_by(&ctl, &node, b"transfer", u64::MAX);
        let err = verify_grant(&ctl.roots(), &posing, b"transfer", now()).expect_err("posing");
        assert!(matches!(err, TlsError::GrantSignature { .. }), "{err}");
    }

    #[test]
    fn a_grant_of_another_clusters_controller_is_refused() {
        let ours = cluster(&["east1"]);
        let theirs = cluster(&["east1"]);
        let node = Identity::load(&paths(ours.path(), "east1")).expect("east1");
        let foreign = Identity::load(&paths(theirs.path(), "controller")).expect("controller");
        let grant = grant_by(&foreign, &foreign, b"transfer", u64::MAX);
        let err = verify_grant(&node.roots(), &grant, b"transfer", now()).expect_err("foreign");
        assert!(matches!(err, TlsError::GrantNotFromCa { .. }), "{err}");
        let junk = Grant {
            controller_cert: b"not a certificate".to_vec(),
            ..grant
        };
        let err = verify_grant(&node.roots(), &junk, b"transfer", now()).expect_err("junk");
        assert!(matches!(err, TlsError::GrantNotFromCa { .. }), "{err}");
    }

    #[test]
    fn an_expired_grant_is_refused() {
        let dir = cluster(&["east1"]);
        let ctl = Identity::load(&paths(dir.path(), "controller")).expect("controller");
        // Within the certificates' validity, which starts at `init`.
        let end = now().as_secs() + 3600;
        let grant = grant_by(&ctl, &ctl, b"transfer", end);
        verify_grant(&ctl.roots(), &grant, b"transfer", at(end - 1)).expect("valid just before");
        for t in [end, end + 90] {
            let err = verify_grant(&ctl.roots(), &grant, b"transfer", at(t)).expect_err("expired");
            assert!(matches!(err, TlsError::GrantExpired { .. }), "{err}");
        }
        let err = verify_grant(&ctl.roots(), &grant, b"transfer", at(end + 90)).expect_err("late");
        assert!(err.to_string().contains("90 s ago"), "{err}");
        // A time outside the certificate's validity fails the chain check instead.
        let err = verify_grant(&ctl.roots(), &grant, b"transfer", at(1000)).expect_err("too early");
        assert!(matches!(err, TlsError::GrantNotFromCa { .. }), "{err}");
    }
}
