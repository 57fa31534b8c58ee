//! The cluster inventory: sites, hosts, replication services, datasets and the hook
//! profile, parsed from the cluster file and validated before anything is planned.
//!
//! An inventory is a cluster file (`[tls]`, `[nodes.NAME] address`, as `mover send` reads)
//! with more in it. `[nodes.NAME]` gains `site`, `role` and `replication`; new tables name
//! the sites, the datasets and the hooks:
//!
//! ```toml
//! database = "mysql"                  # optional when there is one dataset
//!
//! [tls]
//! ca = "certs/ca.pem"
//! cert = "certs/controller.pem"
//! key = "certs/controller.key"
//!
//! [sites.west]
//! service = "west"                    # the site's data service (cctrl `use`); default: its name
//! replication = { west = "west", west_from_east = "east" }  # service -> the site it applies
//!
//! [nodes.west1]
//! address = "10.0.1.1:7000"
//! site = "west"
//! role = "primary"                    # or "replica", the default; one primary per site
//! # replication = { ... }             # replaces the site's for this host
//!
//! [datasets.mysql]
//! method = "xtrabackup"               # files | xtrabackup | mariabackup
//!
//! [hooks]
//! profile = "tungsten"                # or "custom", which needs every action below
//! [hooks.commands]                    # argv arrays, or { argv = [...], stdin = "..." }
//! database_stop = ["systemctl", "stop", "mariadb"]
//! ```
//!
//! The order of hosts in the file is the inventory order (the order targets are chained
//! in). Every error names the key and the line. `ClusterConfig::load` refuses the new keys,
//! so commands that take an inventory use [`Inventory::cluster_config`] instead.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::hooks::{check_name, profile_from_table, BackupTool, HookProfile, RawCommands};
use crate::certs::validate_node_name;
use crate::config::{validate_dataset_name, ClusterConfig, NodeEntry};
use crate::tls::TlsPaths;

/// An inventory that could not be used. Fix the file and run again: retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("failed to read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or not the shape of an inventory; the message quotes the line.
    #[error("failed to parse {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid {}{}: {message}", path.display(), AtLine(*line))]
    Invalid {
        path: PathBuf,
        /// 1-based; `None` when the problem is something missing from the whole file.
        line: Option<usize>,
        message: String,
    },
}

struct AtLine(Option<usize>);

impl fmt::Display for AtLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, " line {n}"),
            None => Ok(()),
        }
    }
}

/// A host's part in its site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The site's writable master: the default source, the first target of a reseed.
    Primary,
    Replica,
}

/// How a dataset is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The agent reads and writes the (stopped) data directory itself.
    Files,
    /// A streamed `xtrabackup` backup, prepared on each target.
    Xtrabackup,
    /// A streamed `mariabackup` backup, prepared on each target.
    Mariabackup,
}

impl Method {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "files" => Some(Method::Files),
            "xtrabackup" => Some(Method::Xtrabackup),
            "mariabackup" => Some(Method::Mariabackup),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Files => "files",
            Method::Xtrabackup => "xtrabackup",
            Method::Mariabackup => "mariabackup",
        }
    }

    /// The tool whose copy needs a `prepare` step, if any.
    pub fn backup_tool(self) -> Option<BackupTool> {
        match self {
            Method::Files => None,
            Method::Xtrabackup => Some(BackupTool::Xtrabackup),
            Method::Mariabackup => Some(BackupTool::Mariabackup),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A replication service running on a host and the site whose writes it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub service: String,
    pub from_site: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub name: String,
    /// The site's data service: what site-wide hooks address (`cctrl` `use`).
    pub service: String,
    /// In inventory order.
    pub hosts: Vec<String>,
    pub primary: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// Where its agent listens (`host:port`).
    pub address: String,
    pub site: String,
    pub role: Role,
    pub replication: Vec<Replication>,
}

impl Host {
    /// The service on this host that applies `site`'s writes: its own site's gives the
    /// local service, another site's the cross-site one.
    pub fn service_from(&self, site: &str) -> Option<&str> {
        self.replication
            .iter()
            .find(|r| r.from_site == site)
            .map(|r| r.service.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub name: String,
    pub method: Method,
}

/// A validated inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    tls: TlsPaths,
    sites: Vec<Site>,
    hosts: Vec<Host>,
    datasets: Vec<Dataset>,
    database: usize,
    hooks: HookProfile,
}

type Services = BTreeMap<Spanned<String>, Spanned<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    tls: TlsPaths,
    database: Option<Spanned<String>>,
    #[serde(default)]
    sites: BTreeMap<Spanned<String>, RawSite>,
    #[serde(default)]
    nodes: BTreeMap<Spanned<String>, RawNode>,
    #[serde(default)]
    datasets: BTreeMap<Spanned<String>, RawDataset>,
    hooks: Option<RawHooks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    service: Option<Spanned<String>>,
    replication: Option<Services>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    address: Spanned<String>,
    site: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    replication: Option<Services>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    method: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    profile: Spanned<String>,
    #[serde(default)]
    commands: RawCommands,
}

/// Turns byte offsets into line numbers for error messages.
struct Lines<'a>(&'a str);

impl Lines<'_> {
    fn of<T>(&self, s: &Spanned<T>) -> Option<usize> {
        self.line_at(s.span().start)
    }

    fn line_at(&self, offset: usize) -> Option<usize> {
        let before = self.0.get(..offset)?;
        Some(before.bytes().filter(|&b| b == b'\n').count() + 1)
    }
}

fn names(items: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    items
        .into_iter()
        .map(|s| s.as_ref().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Items of a map in the order the file gives them (maps sort by name).
fn in_file_order<V>(map: &BTreeMap<Spanned<String>, V>) -> Vec<(&Spanned<String>, &V)> {
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`; `path` names the file in errors and is what relative TLS paths are
    /// relative to (its directory).
    pub fn parse(text: &str, path: &Path) -> Result<Self, InventoryError> {
        let raw: RawInventory = toml::from_str(text).map_err(|e| InventoryError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let lines = Lines(text);
        let mut inv =
            Self::validate(raw, &lines).map_err(|(line, message)| InventoryError::Invalid {
                path: path.to_owned(),
                line,
                message,
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut inv.tls.ca, &mut inv.tls.cert, &mut inv.tls.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(inv)
    }

    fn validate(raw: RawInventory, lines: &Lines<'_>) -> Result<Self, (Option<usize>, String)> {
        let err = |at: Option<usize>, msg: String| (at, msg);
        if raw.sites.is_empty() {
            return Err(err(
                None,
                "no [sites.NAME] table: name every site (for example [sites.west])".into(),
            ));
        }
        let site_names: Vec<&str> = in_file_order(&raw.sites)
            .into_iter()
            .map(|(k, _)| k.get_ref().as_str())
            .collect();
        let known_sites = || names(&site_names);
        // Checks a replication table: valid service names, known sites, one service per site.
        let check_services = |table: &Services,
                              owner: &str|
         -> Result<Vec<Replication>, (Option<usize>, String)> {
            let mut out: Vec<Replication> = Vec::new();
            for (service, from) in in_file_order(table) {
                check_name(service.get_ref()).map_err(|e| {
                    err(
                        lines.of(service),
                        format!("{owner} replication service {:?}: {e}", service.get_ref()),
                    )
                })?;
                if !site_names.contains(&from.get_ref().as_str()) {
                    return Err(err(
                        lines.of(from),
                        format!(
                            "{owner} replication service {} applies site {:?}, which is not a site (sites: {})",
                            service.get_ref(),
                            from.get_ref(),
                            known_sites()
                        ),
                    ));
                }
                if let Some(other) = out.iter().find(|r| &r.from_site == from.get_ref()) {
                    return Err(err(
                        lines.of(from),
                        format!(
                            "{owner} replication services {} and {} both apply site {}: keep one",
                            other.service,
                            service.get_ref(),
                            from.get_ref()
                        ),
                    ));
                }
                out.push(Replication {
                    service: service.get_ref().clone(),
                    from_site: from.get_ref().clone(),
                });
            }
            Ok(out)
        };

        let mut sites = Vec::new();
        let mut site_services = BTreeMap::new();
        let mut site_lines = BTreeMap::new();
        for (name, site) in in_file_order(&raw.sites) {
            let owner = format!("[sites.{}]", name.get_ref());
            check_name(name.get_ref())
                .map_err(|e| err(lines.of(name), format!("{owner}: site name: {e}")))?;
            let service = match &site.service {
                Some(s) => {
                    check_name(s.get_ref())
                        .map_err(|e| err(lines.of(s), format!("{owner} service: {e}")))?;
                    s.get_ref().clone()
                }
                None => name.get_ref().clone(),
            };
            if let Some(table) = &site.replication {
                site_services.insert(name.get_ref().clone(), check_services(table, &owner)?);
            }
            site_lines.insert(name.get_ref().clone(), lines.of(name));
            sites.push(Site {
                name: name.get_ref().clone(),
                service,
                hosts: Vec::new(),
                primary: String::new(),
            });
        }

        if raw.nodes.is_empty() {
            return Err(err(
                None,
                "no [nodes.NAME] table: list every host with its address and site".into(),
            ));
        }
        let mut hosts: Vec<Host> = Vec::new();
        for (name, node) in in_file_order(&raw.nodes) {
            let owner = format!("[nodes.{}]", name.get_ref());
            validate_node_name(name.get_ref())
                .map_err(|e| err(lines.of(name), format!("{owner}: {e}")))?;
            let address = node.address.get_ref();
            if address.is_empty() || !address.contains(':') {
                return Err(err(
                    lines.of(&node.address),
                    format!("{owner} address {address:?} must be host:port"),
                ));
            }
            if let Some(other) = hosts.iter().find(|h| &h.address == address) {
                return Err(err(
                    lines.of(&node.address),
                    format!(
                        "{owner} address {address} is also {}'s: each host has its own agent",
                        other.name
                    ),
                ));
            }
            let Some(site) = &node.site else {
                return Err(err(
                    lines.of(name),
                    format!(
                        "{owner} has no site: add site = \"NAME\" (sites: {})",
                        known_sites()
                    ),
                ));
            };
            let Some(s) = sites.iter_mut().find(|s| &s.name == site.get_ref()) else {
                return Err(err(
                    lines.of(site),
                    format!(
                        "{owner} site {:?} is not a site (sites: {})",
                        site.get_ref(),
                        known_sites()
                    ),
                ));
            };
            let role = match node.role.as_ref().map(|r| (r, r.get_ref().as_str())) {
                None | Some((_, "replica")) => Role::Replica,
                Some((_, "primary")) => Role::Primary,
                Some((r, other)) => {
                    return Err(err(
                        lines.of(r),
                        format!("{owner} role {other:?} must be \"primary\" or \"replica\""),
                    ))
                }
            };
            if role == Role::Primary {
                if !s.primary.is_empty() {
                    let at = node.role.as_ref().and_then(|r| lines.of(r));
                    return Err(err(
                        at,
                        format!(
                            "{owner} is a second primary for site {}: {} is already its primary",
                            s.name, s.primary
                        ),
                    ));
                }
                s.primary = name.get_ref().clone();
            }
            s.hosts.push(name.get_ref().clone());
            let replication = match &node.replication {
                Some(table) => check_services(table, &owner)?,
                None => site_services.get(&s.name).cloned().unwrap_or_default(),
            };
            hosts.push(Host {
                name: name.get_ref().clone(),
                address: address.clone(),
                site: s.name.clone(),
                role,
                replication,
            });
        }
        for s in &sites {
            let at = site_lines.get(&s.name).copied().flatten();
            if s.hosts.is_empty() {
                return Err(err(
                    at,
                    format!(
                        "[sites.{}] has no hosts: give a [nodes.NAME] site = \"{}\", or remove the site",
                        s.name, s.name
                    ),
                ));
            }
            if s.primary.is_empty() {
                return Err(err(
                    at,
                    format!(
                        "[sites.{}] has no primary: set role = \"primary\" on one of {}",
                        s.name,
                        names(&s.hosts)
                    ),
                ));
            }
        }

        if raw.datasets.is_empty() {
            return Err(err(
                None,
                "no [datasets.NAME] table: name the dataset that holds the database and its method"
                    .into(),
            ));
        }
        let mut datasets = Vec::new();
        for (name, d) in in_file_order(&raw.datasets) {
            let owner = format!("[datasets.{}]", name.get_ref());
            validate_dataset_name(name.get_ref())
                .map_err(|e| err(lines.of(name), format!("{owner}: {e}")))?;
            let method = Method::from_name(d.method.get_ref()).ok_or_else(|| {
                err(
                    lines.of(&d.method),
                    format!(
                        "{owner} method {:?} must be files, xtrabackup or mariabackup",
                        d.method.get_ref()
                    ),
                )
            })?;
            datasets.push(Dataset {
                name: name.get_ref().clone(),
                method,
            });
        }
        let database = match &raw.database {
            Some(db) => datasets
                .iter()
                .position(|d| &d.name == db.get_ref())
                .ok_or_else(|| {
                    err(
                        lines.of(db),
                        format!(
                            "database {:?} is not a dataset (datasets: {})",
                            db.get_ref(),
                            names(datasets.iter().map(|d| &d.name))
                        ),
                    )
                })?,
            None if datasets.len() == 1 => 0,
            None => {
                return Err(err(
                    None,
                    format!(
                    "several datasets ({}): say which holds the database with database = \"NAME\"",
                    names(datasets.iter().map(|d| &d.name))
                ),
                ))
            }
        };

        let Some(h) = raw.hooks else {
            return Err(err(
                None,
                "no [hooks] table: set profile = \"tungsten\" or \"custom\"".into(),
            ));
        };
        let hooks = profile_from_table(&h.profile, &h.commands)
            .map_err(|e| err(lines.line_at(e.span.start), e.message))?;

        Ok(Inventory {
            tls: raw.tls,
            sites,
            hosts,
            datasets,
            database,
            hooks,
        })
    }

    /// Sites in inventory order.
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// Hosts in inventory order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// A site's hosts in inventory order.
    pub fn hosts_of<'a>(&'a self, site: &'a str) -> impl Iterator<Item = &'a Host> + 'a {
        self.hosts.iter().filter(move |h| h.site == site)
    }

    pub fn datasets(&self) -> &[Dataset] {
        &self.datasets
    }

    /// The dataset `provision` and `reseed-site` copy.
    pub fn database(&self) -> &Dataset {
        &self.datasets[self.database]
    }

    pub fn hooks(&self) -> &HookProfile {
        &self.hooks
    }

    pub fn tls(&self) -> &TlsPaths {
        &self.tls
    }

    /// The cluster file's view (identity and agent addresses), for the transfer controller.
    pub fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig {
            tls: self.tls.clone(),
            nodes: self
                .hosts
                .iter()
                .map(|h| {
                    (
                        h.name.clone(),
                        NodeEntry {
                            address: h.address.clone(),
                        },
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::hooks::{HookAction, ProfileKind};
    use super::*;

    const TWO_SITES: &str = include_str!("testdata/two_sites.toml");

    fn parse(text: &str) -> Result<Inventory, InventoryError> {
        Inventory::parse(text, Path::new("/etc/mover/cluster.toml"))
    }

    /// The two-site example with `from` replaced by `to` (which must occur).
    fn edited(from: &str, to: &str) -> String {
        assert!(TWO_SITES.contains(from), "{from:?} not in the example");
        TWO_SITES.replacen(from, to, 1)
    }

    /// Line (1-based) of the first occurrence of `needle` in `text`.
    fn line_of(text: &str, needle: &str) -> usize {
        let at = text.find(needle).unwrap();
        text[..at].matches('\n').count() + 1
    }

    /// Asserts the error is on `line` and mentions every word of `words`.
    fn invalid(text: &str, line: Option<usize>, words: &[&str]) {
        let e = parse(text).unwrap_err();
        let msg = e.to_string();
        match &e {
            InventoryError::Invalid { line: l, .. } => assert_eq!(*l, line, "{msg}"),
            other => panic!("not a validation error: {other}"),
        }
        for w in words {
            assert!(msg.contains(w), "{w:?} not in {msg}");
        }
    }

    #[test]
    fn two_site_example() {
        let inv = parse(TWO_SITES).unwrap();
        let names = |s: &Site| s.hosts.clone();
        assert_eq!(inv.sites().len(), 2);
        let west = inv.site("west").unwrap();
        assert_eq!(names(west), ["west1", "west2", "west3"]);
        assert_eq!(west.primary, "west1");
        assert_eq!(west.service, "west");
        let east = inv.site("east").unwrap();
        assert_eq!(names(east), ["east1", "east2", "east3"]);
        assert_eq!(east.primary, "east1");
        let order: Vec<_> = inv.hosts().iter().map(|h| h.name.as_str()).collect();
        assert_eq!(
            order,
            ["west1", "west2", "west3", "east1", "east2", "east3"]
        );
        let w2 = inv.host("west2").unwrap();
        assert_eq!(w2.role, Role::Replica);
        assert_eq!(w2.service_from("east"), Some("west_from_east"));
        assert_eq!(w2.service_from("west"), Some("west"));
        assert_eq!(
            inv.host("east3").unwrap().service_from("east"),
            Some("east")
        );
        assert_eq!(
            inv.database(),
            &Dataset {
                name: "mysql".into(),
                method: Method::Xtrabackup
            }
        );
        assert_eq!(inv.hooks().kind(), ProfileKind::Tungsten);
        assert_eq!(inv.tls().ca, Path::new("/etc/mover/certs/ca.pem"));
        let cluster = inv.cluster_config();
        assert_eq!(cluster.address("east2"), Some("10.0.2.2:7000"));
        assert_eq!(cluster.nodes.len(), 6);
    }

    #[test]
    fn host_replication_replaces_the_sites() {
        let text = edited(
            "address = \"10.0.2.3:7000\"\n",
            "address = \"10.0.2.3:7000\"\nreplication = { east = \"east\" }\n",
        );
        let inv = parse(&text).unwrap();
        assert_eq!(inv.host("east3").unwrap().service_from("west"), None);
        assert_eq!(
            inv.host("east2").unwrap().service_from("west"),
            Some("east_from_west")
        );
    }

    #[test]
    fn unknown_site_of_a_host() {
        let text = edited("site = \"east\"\nrole", "site = \"esat\"\nrole");
        let line = line_of(&text, "\"esat\"");
        invalid(
            &text,
            Some(line),
            &["[nodes.east1]", "esat", "sites: west, east"],
        );
    }

    #[test]
    fn host_without_site() {
        let text = edited(
            "address = \"10.0.1.2:7000\"\nsite = \"west\"\n",
            "address = \"10.0.1.2:7000\"\n",
        );
        let line = line_of(&text, "[nodes.west2]");
        invalid(&text, Some(line), &["[nodes.west2] has no site"]);
    }

    #[test]
    fn duplicate_host() {
        // A second [nodes.east2] table is refused by TOML itself, with the line.
        let text =
            format!("{TWO_SITES}\n[nodes.east2]\naddress = \"10.0.2.9:7000\"\nsite = \"east\"\n");
        let e = parse(&text).unwrap_err();
        assert!(matches!(e, InventoryError::Parse { .. }), "{e}");
        let msg = e.to_string();
        let line = text.lines().count() - 2;
        assert!(msg.contains(&format!("line {line}")), "{msg}");
        assert!(msg.contains("duplicate"), "{msg}");
    }

    #[test]
    fn duplicate_address() {
        let text = edited("10.0.2.3:7000", "10.0.2.2:7000");
        let line = line_of(&text, "[nodes.east3]") + 1;
        invalid(&text, Some(line), &["[nodes.east3]", "also east2's"]);
    }

    #[test]
    fn site_with_no_hosts() {
        let text = edited("[sites.east]\n", "[sites.north]\n[sites.east]\n");
        let line = line_of(&text, "[sites.north]");
        invalid(&text, Some(line), &["[sites.north] has no hosts"]);
    }

    #[test]
    fn site_without_primary_and_two_primaries() {
        let text = edited("site = \"east\"\nrole = \"primary\"\n", "site = \"east\"\n");
        let line = line_of(&text, "[sites.east]");
        invalid(
            &text,
            Some(line),
            &["[sites.east] has no primary", "east1, east2, east3"],
        );
        let text = edited(
            "address = \"10.0.1.3:7000\"\nsite = \"west\"\n",
            "address = \"10.0.1.3:7000\"\nsite = \"west\"\nrole = \"primary\"\n",
        );
        let line = line_of(&text, "[nodes.west3]") + 3;
        invalid(&text, Some(line), &["second primary", "west1"]);
        let text = edited("role = \"primary\"", "role = \"master\"");
        invalid(
            &text,
            Some(line_of(&text, "\"master\"")),
            &["role \"master\""],
        );
    }

    #[test]
    fn replication_service_naming_an_unknown_site() {
        let text = edited("west_from_east = \"east\"", "west_from_east = \"est\"");
        let line = line_of(&text, "\"est\"");
        invalid(
            &text,
            Some(line),
            &["[sites.west]", "west_from_east", "\"est\"", "not a site"],
        );
        let text = edited("west_from_east = \"east\"", "\"west;x\" = \"east\"");
        invalid(&text, Some(line), &["\"west;x\""]);
        let text = edited("west_from_east = \"east\"", "west2 = \"west\"");
        invalid(&text, Some(line), &["west and west2 both apply site west"]);
    }

    #[test]
    fn unknown_profile() {
        let text = edited("profile = \"tungsten\"", "profile = \"galera\"");
        let line = line_of(&text, "\"galera\"");
        invalid(
            &text,
            Some(line),
            &["profile \"galera\"", "tungsten", "custom"],
        );
    }

    fn custom(commands: &str) -> String {
        edited(
            "profile = \"tungsten\"\n",
            &format!("profile = \"custom\"\n[hooks.commands]\n{commands}"),
        )
    }

    const ALL_COMMANDS: &str = r#"policy_maintenance = ["/opt/rec", "policy-maintenance", "{site}"]
policy_automatic = ["/opt/rec", "policy-automatic", "{site}"]
routers_offline = ["/opt/rec", "routers-offline", "{site}"]
routers_online = ["/opt/rec", "routers-online", "{site}"]
replicator_offline = ["/opt/rec", "replicator-offline", "{service}"]
replicator_reset = ["/opt/rec", "replicator-reset", "{service}"]
replicator_online = ["/opt/rec", "replicator-online", "{service}"]
database_stop = ["/opt/rec", "database-stop", "{datadir}"]
database_start = ["/opt/rec", "database-start", "{datadir}"]
prepare = { argv = ["/opt/rec", "prepare"], stdin = "{staging}\n" }
mark_primary = ["/opt/rec", "mark-primary", "{host}"]
"#;

    #[test]
    fn custom_profile() {
        let inv = parse(&custom(ALL_COMMANDS)).unwrap();
        assert_eq!(inv.hooks().kind(), ProfileKind::Custom);
        let ctx = super::super::hooks::HookContext {
            site: Some("east"),
            host: Some("east1"),
            staging: Some("/s/1"),
            ..Default::default()
        };
        let c = inv
            .hooks()
            .render(HookAction::Prepare(BackupTool::Mariabackup), &ctx)
            .unwrap();
        assert_eq!(c.argv, ["/opt/rec", "prepare"]);
        assert_eq!(c.stdin.as_deref(), Some("/s/1\n"));
    }

    #[test]
    fn custom_profile_missing_a_command() {
        let text = custom(&ALL_COMMANDS.replace(
            "routers_online = [\"/opt/rec\", \"routers-online\", \"{site}\"]\n",
            "",
        ));
        let line = line_of(&text, "profile = \"custom\"");
        invalid(&text, Some(line), &["no command for routers_online"]);
    }

    #[test]
    fn unknown_placeholder_and_action() {
        let text = custom(&ALL_COMMANDS.replace(
            "\"{datadir}\"]\ndatabase_start",
            "\"{port}\"]\ndatabase_start",
        ));
        let line = line_of(&text, "{port}");
        invalid(
            &text,
            Some(line),
            &["database_stop", "unknown placeholder {port}"],
        );
        let text = custom(&ALL_COMMANDS.replace(
            "\"{site}\"]\npolicy_automatic",
            "\"{staging}\"]\npolicy_automatic",
        ));
        let line = line_of(&text, "{staging}");
        invalid(
            &text,
            Some(line),
            &["{staging} has no value in policy_maintenance"],
        );
        let text = custom(&format!("{ALL_COMMANDS}reboot = [\"/sbin/reboot\"]\n"));
        let line = line_of(&text, "reboot =");
        invalid(&text, Some(line), &["\"reboot\" is not an action"]);
    }

    #[test]
    fn a_command_is_an_argv() {
        let text = edited(
            "profile = \"tungsten\"\n",
            "profile = \"tungsten\"\n[hooks.commands]\ndatabase_stop = \"systemctl stop mysqld\"\n",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("an array of strings (the argv)"), "{msg}");
        assert!(
            msg.contains(&format!("line {}", line_of(&text, "database_stop ="))),
            "{msg}"
        );
        let text = edited(
            "profile = \"tungsten\"\n",
            "profile = \"tungsten\"\n[hooks.commands]\ndatabase_stop = { argv = [\"x\"], stdn = \"\" }\n",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("stdn"), "{msg}");
    }

    #[test]
    fn tungsten_overrides() {
        let text = edited(
            "profile = \"tungsten\"\n",
            "profile = \"tungsten\"\n[hooks.commands]\ndatabase_stop = [\"systemctl\", \"stop\", \"mariadb\"]\n",
        );
        let inv = parse(&text).unwrap();
        let c = inv
            .hooks()
            .render(HookAction::DatabaseStop, &Default::default())
            .unwrap();
        assert_eq!(c.argv, ["systemctl", "stop", "mariadb"]);
    }

    #[test]
    fn datasets_and_database() {
        let text = edited("method = \"xtrabackup\"", "method = \"rsync\"");
        invalid(
            &text,
            Some(line_of(&text, "\"rsync\"")),
            &["method \"rsync\""],
        );
        let text = edited("database = \"mysql\"", "database = \"pg\"");
        invalid(
            &text,
            Some(line_of(&text, "\"pg\"")),
            &["database \"pg\" is not a dataset"],
        );
        let text = edited("database = \"mysql\"", "").replace(
            "[datasets.mysql]",
            "[datasets.binlogs]\nmethod = \"files\"\n[datasets.mysql]",
        );
        invalid(&text, None, &["several datasets (binlogs, mysql)"]);
        let text = edited("database = \"mysql\"", "");
        assert_eq!(parse(&text).unwrap().database().name, "mysql");
    }

    #[test]
    fn missing_sections() {
        let text = edited("[hooks]\nprofile = \"tungsten\"\n", "");
        invalid(&text, None, &["no [hooks] table"]);
        let e = parse(
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[nodes.west1]\naddress = \"h:1\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("no [sites.NAME] table"), "{e}");
    }

    #[test]
    fn bad_names_and_addresses() {
        let text = edited("[nodes.west2]", "[nodes.West2]");
        invalid(
            &text,
            Some(line_of(&text, "[nodes.West2]")),
            &["[nodes.West2]"],
        );
        let text = edited("10.0.1.2:7000", "10.0.1.2");
        invalid(&text, Some(line_of(&text, "\"10.0.1.2\"")), &["host:port"]);
        let text = edited("[sites.west]", "[sites.west]\nservice = \"west coast\"");
        invalid(
            &text,
            Some(line_of(&text, "\"west coast\"")),
            &["[sites.west] service"],
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let text = edited("role = \"primary\"", "rol = \"primary\"");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("rol"), "{msg}");
        assert!(
            msg.contains(&format!("line {}", line_of(&text, "rol ="))),
            "{msg}"
        );
    }
}
