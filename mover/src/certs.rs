//! Cluster certificate authority: creates the CA and the per-node and controller certificates.
//!
//! Every agent and the controller hold a certificate signed by one cluster CA. The certificate's
//! DNS subject alternative name is the node's name (or [`CONTROLLER_NAME`]), which is how peers
//! identify each other after the mutual-TLS handshake (see `tls::peer_of`).

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// The DNS name in the controller's certificate; no node may use it.
pub const CONTROLLER_NAME: &str = "mover-controller";

/// Names whose files `init` writes itself, so a node named like this would collide.
const RESERVED_NAMES: [&str; 2] = ["ca", "controller"];

/// How long the generated certificates stay valid.
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Backdating of `not_before`, so a peer whose clock runs a little behind accepts new certs.
const CLOCK_SKEW: Duration = Duration::from_secs(60 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "use node name {name:?}: {reason}; a node name is 1 to 63 lowercase ASCII letters, \
         digits or '-', starts with a letter or digit, does not end with '-' and is not all digits"
    )]
    InvalidNodeName { name: String, reason: &'static str },
    #[error("use node name {name:?}: it is reserved for files of the cluster itself")]
    ReservedNodeName { name: String },
    #[error("use node name {name:?}: it is listed more than once")]
    DuplicateNodeName { name: String },
    #[error(
        "write {}: the file already exists; pass a new directory or remove the old files",
        path.display()
    )]
    AlreadyExists { path: PathBuf },
    #[error("create directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generate certificate for {name:?}: {source}")]
    Generate { name: String, source: rcgen::Error },
}

/// Checks that `name` can be a node name: a DNS label that rustls accepts as a server name,
/// and not a name that `init` uses for its own files or the controller.
pub fn validate_node_name(name: &str) -> Result<(), CertError> {
    let invalid = |reason| {
        Err(CertError::InvalidNodeName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > 63 {
        return invalid("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return invalid("it contains a character other than a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return invalid("it starts or ends with '-'");
    }
    // TLS rejects an all-numeric name as a server name, as it could be read as an IP address.
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return invalid("it is all digits");
    }
    if name == CONTROLLER_NAME || RESERVED_NAMES.contains(&name) {
        return Err(CertError::ReservedNodeName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Creates a new cluster CA in `out` with a certificate for each node and one for the controller.
///
/// Writes `ca.pem`, `ca.key`, `<node>.pem`, `<node>.key`, `controller.pem` and `controller.key`,
/// and returns their paths. Nothing is written if any of the files exists already.
pub fn init(out: &Path, nodes: &[String]) -> Result<Vec<PathBuf>, CertError> {
    let mut seen = HashSet::new();
    for node in nodes {
        validate_node_name(node)?;
        if !seen.insert(node.as_str()) {
            return Err(CertError::DuplicateNodeName { name: node.clone() });
        }
    }

    // (file stem, DNS name) for each leaf certificate.
    let leaves: Vec<(&str, &str)> = nodes
        .iter()
        .map(|n| (n.as_str(), n.as_str()))
        .chain([("controller", CONTROLLER_NAME)])
        .collect();
    let mut files = vec![(out.join("ca.pem"), false), (out.join("ca.key"), true)];
    for (stem, _) in &leaves {
        files.push((out.join(format!("{stem}.pem")), false));
        files.push((out.join(format!("{stem}.key")), true));
    }
    // Check everything before writing anything, so a refusal leaves no half-made cluster.
    if let Some((path, _)) = files.iter().find(|(path, _)| path.exists()) {
        return Err(CertError::AlreadyExists { path: path.clone() });
    }

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (ca_cert, ca_key) = make_ca(now)?;
    let mut contents = vec![ca_cert.pem(), ca_key.serialize_pem()];
    for (_, dns) in &leaves {
        let (cert, key) = make_leaf(dns, &ca_cert, &ca_key, now)?;
        contents.push(cert.pem());
        contents.push(key.serialize_pem());
    }

    std::fs::create_dir_all(out).map_err(|source| CertError::CreateDir {
        path: out.to_owned(),
        source,
    })?;
    for ((path, secret), text) in files.iter().zip(&contents) {
        write_new(path, text.as_bytes(), *secret)?;
    }
    Ok(files.into_iter().map(|(path, _)| path).collect())
}

/// Sets the validity of a certificate made `now` (time since the Unix epoch).
fn set_validity(params: &mut CertificateParams, now: Duration) {
    // rcgen does not re-export its time type, so build the instant from the epoch.
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + now.saturating_sub(CLOCK_SKEW);
    params.not_after = params.not_before + VALIDITY;
}

fn make_ca(now: Duration) -> Result<(Certificate, KeyPair), CertError> {
    let generate = |source| CertError::Generate {
        name: "ca".to_owned(),
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A unique name per cluster: peers find issuers by name, so two clusters' CAs with one
    // name make a foreign cert fail as "bad signature" rather than as "unknown issuer".
    let name = format!("mover cluster ca {:016x}", fastrand::u64(..));
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, now);
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok((cert, key))
}

fn make_leaf(
    dns: &str,
    ca_cert: &Certificate,
    ca_key: &KeyPair,
    now: Duration,
) -> Result<(Certificate, KeyPair), CertError> {
    let generate = |source| CertError::Generate {
        name: dns.to_owned(),
        source,
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut params = CertificateParams::new(vec![dns.to_owned()]).map_err(generate)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, dns);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Agents both accept connections and dial each other, so every leaf is server and client.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, now);
    let cert = params.signed_by(&key, ca_cert, ca_key).map_err(generate)?;
    Ok((cert, key))
}

/// Writes a file that must not exist yet; private keys get mode 0600 from the start.
fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), CertError> {
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CertError::AlreadyExists {
                path: path.to_owned(),
            },
            _ => CertError::Write {
                path: path.to_owned(),
                source,
            },
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| CertError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn names(nodes: &[&str]) -> Vec<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn init_writes_ca_node_and_controller_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("cluster");
        let written = init(&out, &names(&["east1", "west-2"])).expect("init");
        let mut got: Vec<_> = written
            .iter()
            .map(|p| p.file_name().and_then(|n| n.to_str()).unwrap_or_default())
            .collect();
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "ca.key",
                "ca.pem",
                "controller.key",
                "controller.pem",
                "east1.key",
                "east1.pem",
                "west-2.key",
                "west-2.pem"
            ]
        );
        for path in &written {
            assert!(path.is_file(), "{} missing", path.display());
        }
    }

    #[test]
    fn leaf_certs_name_the_node_and_serve_both_roles() {
        let dir = tempfile::tempdir().expect("temp dir");
        init(dir.path(), &names(&["east1"])).expect("init");
        let pem = std::fs::read(dir.path().join("east1.pem")).expect("read cert");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .collect();
        assert_eq!(cn, ["east1"]);
        let eku = cert
            .extended_key_usage()
            .expect("eku parses")
            .expect("eku present");
        assert!(eku.value.server_auth && eku.value.client_auth);
        let years = (cert.validity().not_after.timestamp()
            - cert.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert_eq!(years, 10);
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("temp dir");
        init(dir.path(), &names(&["east1"])).expect("first init");
        let before = std::fs::read(dir.path().join("ca.key")).expect("read ca key");

        let err = init(dir.path(), &names(&["east1"])).expect_err("second init must fail");
        assert!(matches!(err, CertError::AlreadyExists { .. }), "{err:?}");
        assert!(err.to_string().contains("new directory"), "{err}");
        let after = std::fs::read(dir.path().join("ca.key")).expect("read ca key");
        assert_eq!(before, after, "the ca key must be untouched");

        // A single leftover file is enough to refuse, and nothing new is written.
        let other = tempfile::tempdir().expect("temp dir");
        std::fs::write(other.path().join("west1.key"), "old").expect("write leftover");
        let err = init(other.path(), &names(&["west1"])).expect_err("leftover must fail");
        assert!(err.to_string().contains("west1.key"), "{err}");
        assert!(!other.path().join("ca.pem").exists());
    }

    #[test]
    fn invalid_node_names_are_rejected() {
        for good in ["east1", "a", "1a", "db-01", &"x".repeat(63)] {
            validate_node_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for bad in [
            "",
            "East1",
            "east_1",
            "east.1",
            "-east",
            "east-",
            "123",
            "ünï",
            &"x".repeat(64),
            CONTROLLER_NAME,
            "controller",
            "ca",
        ] {
            assert!(validate_node_name(bad).is_err(), "{bad:?} must be rejected");
        }
        let err = validate_node_name("East1").expect_err("uppercase");
        assert!(err.to_string().contains("lowercase"), "{err}");

        let dir = tempfile::tempdir().expect("temp dir");
        let err = init(dir.path(), &names(&["east1", "bad name"])).expect_err("bad name");
        assert!(matches!(err, CertError::InvalidNodeName { .. }), "{err:?}");
        let err = init(dir.path(), &names(&["east1", "east1"])).expect_err("duplicate");
        assert!(
            matches!(err, CertError::DuplicateNodeName { .. }),
            "{err:?}"
        );
        assert!(!dir.path().join("ca.pem").exists(), "nothing written");
    }

    #[test]
    fn key_files_are_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = init(dir.path(), &names(&["east1"])).expect("init");
        let keys: Vec<_> = written
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "key"))
            .collect();
        assert_eq!(keys.len(), 3);
        for key in keys {
            let mode = std::fs::metadata(key).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
    }
}
