//! Agent configuration and the cluster file, parsed and validated before any work starts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::certs::{validate_node_name, CONTROLLER_NAME};
use crate::disk::{IoChoice, SourceCache};
use crate::orchestrate::hooks::{profile_from_table, RawCommands};
use crate::orchestrate::{HookAction, HookProfile};
use crate::staging::{StagingVerify, StagingWrites};
use crate::tls::TlsPaths;

/// How long a hook command may run when `[hooks] timeout` does not say.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest `[hooks] timeout` (a week): anything longer is a mistake.
pub const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

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
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This agent's node name; must match the name in its certificate.
    pub node: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Staging areas, and the record of hook steps run (`hooks/`).
    pub state_dir: PathBuf,
    pub tls: TlsPaths,
    pub datasets: BTreeMap<String, DatasetConfig>,
    /// Concurrent disk/CPU jobs per transfer; defaults to twice the number of cores.
    pub workers: Option<usize>,
    /// The hook commands this agent runs for the controller; without a `[hooks]` table it
    /// runs none.
    pub hooks: Option<AgentHooks>,
    /// The disk I/O back end (`io`); `None` when the file does not say, and then the
    /// `MOVER_IO` environment variable or `auto` decides (see [`AgentConfig::io_choice`]).
    pub io: Option<IoChoice>,
    /// What reading a source dataset does to the page cache (`source_cache`).
    pub source_cache: SourceCache,
    /// How received chunks go into staging (`staging_writes`).
    pub staging_writes: StagingWrites,
    /// How each chunk written into staging is checked (`staging_verify`).
    pub staging_verify: StagingVerify,
}

/// The hook commands an agent runs when the controller asks for an action: the `[hooks]`
/// table of its config. Only this table decides what runs on the host; the controller names
/// an action, never a command.
///
/// ```toml
/// [hooks]
/// profile = "tungsten"   # built-in cctrl/trepctl commands; or "custom": give every action
/// timeout = 600          # seconds a command may run before its process group is killed
/// allow = ["replicator_offline", "replicator_reset", "replicator_online", "prepare"]
///                        # the actions the controller may ask for; default: all of them
/// [hooks.commands]       # argv arrays, or { argv = [...], stdin = "..." }
/// database_stop = ["sudo", "-n", "systemctl", "stop", "mariadb"]
/// ```
///
/// `profile` and `[hooks.commands]` are as in the inventory (see
/// [`crate::orchestrate::hooks`]). `timeout` (default 600, at most a week) bounds every
/// command, backups included. `allow` lists action keys (`prepare` allows it for both
/// tools); `allow = []` allows nothing.
#[derive(Debug, Clone)]
pub struct AgentHooks {
    pub profile: HookProfile,
    pub timeout: Duration,
    /// The actions the controller may ask for; `None` for every action of the profile.
    pub allow: Option<BTreeSet<HookAction>>,
}

impl AgentHooks {
    /// Hooks from `profile` with the default timeout, every action allowed.
    pub fn new(profile: HookProfile) -> Self {
        Self {
            profile,
            timeout: DEFAULT_HOOK_TIMEOUT,
            allow: None,
        }
    }

    pub fn allows(&self, action: HookAction) -> bool {
        self.allow.as_ref().is_none_or(|a| a.contains(&action))
    }
}

/// The agent config file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    node: String,
    listen: SocketAddr,
    state_dir: PathBuf,
    tls: TlsPaths,
    #[serde(default)]
    datasets: BTreeMap<String, DatasetConfig>,
    #[serde(default)]
    workers: Option<usize>,
    hooks: Option<HooksTable>,
    #[serde(default)]
    io: Option<IoChoice>,
    #[serde(default)]
    source_cache: SourceCache,
    #[serde(default)]
    staging_writes: StagingWrites,
    #[serde(default)]
    staging_verify: StagingVerify,
}

/// The agent's `[hooks]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HooksTable {
    profile: Spanned<String>,
    #[serde(default)]
    commands: RawCommands,
    timeout: Option<Spanned<u64>>,
    allow: Option<Spanned<Vec<Spanned<String>>>>,
}

impl HooksTable {
    /// The validated hooks, or what is wrong and at which byte of the file.
    fn build(self) -> Result<AgentHooks, (usize, String)> {
        let profile = profile_from_table(&self.profile, &self.commands)
            .map_err(|e| (e.span.start, e.message))?;
        let timeout = match &self.timeout {
            None => DEFAULT_HOOK_TIMEOUT,
            Some(t) => {
                let d = Duration::from_secs(*t.get_ref());
                if d.is_zero() || d > MAX_HOOK_TIMEOUT {
                    return Err((
                        t.span().start,
                        format!(
                            "[hooks] timeout = {} must be from 1 to {} seconds",
                            t.get_ref(),
                            MAX_HOOK_TIMEOUT.as_secs()
                        ),
                    ));
                }
                d
            }
        };
        let allow = match &self.allow {
            None => None,
            Some(keys) => {
                let mut set = BTreeSet::new();
                for key in keys.get_ref() {
                    let actions = HookAction::for_key(key.get_ref()).ok_or_else(|| {
                        (
                            key.span().start,
                            format!(
                                "[hooks] allow: {:?} is not an action (actions: {})",
                                key.get_ref(),
                                HookAction::keys().collect::<Vec<_>>().join(", ")
                            ),
                        )
                    })?;
                    set.extend(actions.iter().copied());
                }
                Some(set)
            }
        };
        Ok(AgentHooks {
            profile,
            timeout,
            allow,
        })
    }
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
        let text = read(path)?;
        let file: AgentFile = parse(path, &text)?;
        let hooks = file
            .hooks
            .map(HooksTable::build)
            .transpose()
            .map_err(|(at, message)| {
                let line = text
                    .get(..at)
                    .map_or(0, |b| b.bytes().filter(|&c| c == b'\n').count())
                    + 1;
                ConfigError::Invalid {
                    path: path.to_owned(),
                    message: format!("line {line}: {message}"),
                }
            })?;
        let mut cfg = AgentConfig {
            node: file.node,
            listen: file.listen,
            state_dir: file.state_dir,
            tls: file.tls,
            datasets: file.datasets,
            workers: file.workers,
            hooks,
            io: file.io,
            source_cache: file.source_cache,
            staging_writes: file.staging_writes,
            staging_verify: file.staging_verify,
        };
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
            if name.starts_with(crate::bench::SCRATCH_DATASET) {
                return Err(format!(
                    "[datasets.{name}]: names starting with {} are reserved for the scratch \
                     copies of `mover bench`",
                    crate::bench::SCRATCH_DATASET
                ));
            }
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

    /// The disk I/O back end to use: `io` from the file (or `mover agent --io`), else the
    /// `MOVER_IO` environment variable (so that a test suite can run every agent on one back
    /// end), else `auto`.
    pub fn io_choice(&self) -> Result<IoChoice, String> {
        match (self.io, std::env::var("MOVER_IO")) {
            (Some(io), _) => Ok(io),
            (None, Ok(env)) if !env.is_empty() => env.parse().map_err(|e| format!("MOVER_IO: {e}")),
            (None, _) => Ok(IoChoice::Auto),
        }
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
    fn the_bench_scratch_dataset_names_are_reserved() {
        let d = tempfile::tempdir().unwrap();
        let base = "node = \"east1\"\nlisten = \"127.0.0.1:7001\"\nstate_dir = \"s\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        for name in ["mover-bench", "mover-bench2"] {
            let p = write(
                d.path(),
                &format!("{base}[datasets.{name}]\npath = \"/d\"\n"),
            );
            let e = AgentConfig::load(&p).unwrap_err().to_string();
            assert!(e.contains("reserved"), "{e}");
        }
        let p = write(
            d.path(),
            &format!("{base}[datasets.mover]\npath = \"/d\"\n"),
        );
        assert!(AgentConfig::load(&p).is_ok());
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

    const AGENT: &str = r#"node = "east1"
listen = "127.0.0.1:7001"
state_dir = "state"
[tls]
ca = "ca.pem"
cert = "east1.pem"
key = "east1.key"
"#;

    #[test]
    fn disk_keys_parse_and_bad_values_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let c = AgentConfig::load(&write(d.path(), AGENT)).unwrap();
        assert_eq!((c.io, c.source_cache), (None, SourceCache::Keep));
        assert_eq!(c.staging_writes, StagingWrites::Direct);
        assert_eq!(c.staging_verify, StagingVerify::Memory);
        let text = format!(
            "io = \"threads\"\nsource_cache = \"drop\"\nstaging_writes = \"cached\"\n\
             staging_verify = \"read-back\"\n{AGENT}"
        );
        let c = AgentConfig::load(&write(d.path(), &text)).unwrap();
        assert_eq!(c.io, Some(IoChoice::Threads));
        assert_eq!(
            c.io_choice(),
            Ok(IoChoice::Threads),
            "the file wins over MOVER_IO"
        );
        assert_eq!(c.source_cache, SourceCache::Drop);
        assert_eq!(c.staging_writes, StagingWrites::Cached);
        assert_eq!(c.staging_verify, StagingVerify::ReadBack);
        let text = format!("io = \"aio\"\n{AGENT}");
        let e = AgentConfig::load(&write(d.path(), &text))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("uring"), "{e}");
        let text = format!("staging_verify = \"readback\"\n{AGENT}");
        let e = AgentConfig::load(&write(d.path(), &text))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("read-back"), "{e}");
    }

    #[test]
    fn an_agent_without_hooks_has_none() {
        let d = tempfile::tempdir().unwrap();
        let c = AgentConfig::load(&write(d.path(), AGENT)).unwrap();
        assert!(c.hooks.is_none());
    }

    #[test]
    fn agent_hooks_table() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "{AGENT}[hooks]\nprofile = \"custom\"\ntimeout = 30\nallow = [\"replicator_reset\", \"prepare\"]\n[hooks.commands]\n{}",
            crate::orchestrate::hooks::testutil::ALL_COMMANDS
        );
        let c = AgentConfig::load(&write(d.path(), &text)).unwrap();
        let h = c.hooks.unwrap();
        assert_eq!(h.timeout, Duration::from_secs(30));
        assert!(h.allows(HookAction::ReplicatorReset));
        assert!(h.allows(HookAction::Prepare(
            crate::orchestrate::hooks::BackupTool::Mariabackup
        )));
        assert!(!h.allows(HookAction::DatabaseStop));
        // Defaults: ten minutes, every action.
        let text = format!("{AGENT}[hooks]\nprofile = \"tungsten\"\n");
        let h = AgentConfig::load(&write(d.path(), &text))
            .unwrap()
            .hooks
            .unwrap();
        assert_eq!(h.timeout, DEFAULT_HOOK_TIMEOUT);
        assert!(h.allows(HookAction::DatabaseStop));
    }

    #[test]
    fn agent_hooks_errors_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let hooks_line = AGENT.lines().count() + 1;
        let cases = [
            (
                "profile = \"tungsten\"\nallow = [\"replicator_reset\", \"reboot\"]\n",
                hooks_line + 2,
                "\"reboot\" is not an action",
            ),
            (
                "profile = \"tungsten\"\ntimeout = 0\n",
                hooks_line + 2,
                "timeout = 0 must be from 1",
            ),
            (
                "profile = \"tungsten\"\n[hooks.commands]\ndatabase_stop = [\"x\", \"{port}\"]\n",
                hooks_line + 3,
                "unknown placeholder {port}",
            ),
            (
                "profile = \"galera\"\n",
                hooks_line + 1,
                "profile \"galera\"",
            ),
            (
                "profile = \"custom\"\n[hooks.commands]\ndatabase_stop = [\"x\"]\n",
                hooks_line + 1,
                "no command for",
            ),
        ];
        for (table, line, words) in cases {
            let text = format!("{AGENT}[hooks]\n{table}");
            let e = AgentConfig::load(&write(d.path(), &text))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("line {line}:")), "{table}: {e}");
            assert!(e.contains(words), "{table}: {e}");
        }
        let text = format!("{AGENT}[hooks]\nprofile = \"tungsten\"\nallowed = []\n");
        let e = AgentConfig::load(&write(d.path(), &text))
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowed"), "{e}");
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
