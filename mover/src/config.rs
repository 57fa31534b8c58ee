//! Agent configuration and the cluster file, parsed and validated before any work starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::certs::{validate_node_name, CONTROLLER_NAME};
use crate::tls::TlsPaths;

/// A configuration file that could not be used. Fix the file and run again.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One dataset an agent can send or receive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The directory: read when sending, replaced atomically when receiving.
    pub path: PathBuf,
}

/// `mover agent --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's node name; must match the name in its certificate.
    pub node: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Staging areas and (later) journals.
    pub state_dir: PathBuf,
    pub tls: TlsPaths,
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetConfig>,
    /// Concurrent disk/CPU jobs per transfer; defaults to twice the number of cores.
    #[serde(default)]
    pub workers: Option<usize>,
}

/// One node in the cluster file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// Where the node's agent listens (`host:port`).
    pub address: String,
}

/// The cluster file: the controller's identity and where every node's agent listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub tls: TlsPaths,
    pub nodes: BTreeMap<String, NodeEntry>,
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T, ConfigError> {
    // toml's messages carry the line and column and quote the offending line.
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Resolves relative paths in a config file against the file's own directory.
fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

fn resolve_tls(base: &Path, tls: &mut TlsPaths) {
    resolve(base, &mut tls.ca);
    resolve(base, &mut tls.cert);
    resolve(base, &mut tls.key);
}

/// Dataset names travel in plans and name staging areas: keep them short and plain.
pub fn validate_dataset_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "dataset name {name:?} must be 1-64 characters of letters, digits, '_', '-' or '.', not starting with '.'"
        ))
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Self = parse(path, &read(path)?)?;
        let base = path.parent().unwrap_or(Path::new("."));
        resolve(base, &mut cfg.state_dir);
        resolve_tls(base, &mut cfg.tls);
        for d in cfg.datasets.values_mut() {
            resolve(base, &mut d.path);
        }
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        validate_node_name(&self.node).map_err(|e| format!("node: {e}"))?;
        for (name, d) in &self.datasets {
            validate_dataset_name(name).map_err(|e| format!("[datasets.{name}]: {e}"))?;
            if d.path.parent().is_none() {
                return Err(format!(
                    "[datasets.{name}] path {} has no parent directory",
                    d.path.display()
                ));
            }
        }
        if self.workers == Some(0) {
            return Err("workers must be at least 1".into());
        }
        Ok(())
    }

    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| 2 * crate::cores())
    }
}

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Self = parse(path, &read(path)?)?;
        let base = path.parent().unwrap_or(Path::new("."));
        resolve_tls(base, &mut cfg.tls);
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if cfg.nodes.is_empty() {
            return Err(invalid("no [nodes.NAME] tables: list every agent".into()));
        }
        for (name, n) in &cfg.nodes {
            if name == CONTROLLER_NAME {
                return Err(invalid(format!(
                    "{CONTROLLER_NAME} is reserved for the controller"
                )));
            }
            validate_node_name(name).map_err(|e| invalid(format!("[nodes.{name}]: {e}")))?;
            if n.address.is_empty() || !n.address.contains(':') {
                return Err(invalid(format!(
                    "[nodes.{name}] address {:?} must be host:port",
                    n.address
                )));
            }
        }
        Ok(cfg)
    }

    pub fn address(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).map(|n| n.address.as_str())
    }
}

/// Resolves `host:port` to a socket address.
pub async fn resolve_address(address: &str) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("c.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn agent_config_resolves_relative_paths() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            r#"node = "east1"
listen = "127.0.0.1:7001"
state_dir = "state"
[tls]
ca = "certs/ca.pem"
cert = "certs/east1.pem"
key = "certs/east1.key"
[datasets.mysql]
path = "/var/lib/mysql"
"#,
        );
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.state_dir, d.path().join("state"));
        assert_eq!(c.tls.ca, d.path().join("certs/ca.pem"));
        assert_eq!(c.datasets["mysql"].path, Path::new("/var/lib/mysql"));
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "node = \"east1\"\nlisten = 12\n");
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let p = write(
            d.path(),
            "node = \"East 1\"\nlisten = \"127.0.0.1:1\"\nstate_dir = \"s\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
        );
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("node"), "{e}");
        let p = write(
            d.path(),
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[nodes.west1]\naddress = \"nowhere\"\n",
        );
        let e = ClusterConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("host:port"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[nodes.west1]\naddres = \"x:1\"\n",
        );
        let e = ClusterConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("addres"), "{e}");
    }
}
