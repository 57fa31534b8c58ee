//! Transfers of the backup methods between real agents in this process, with fake backup and
//! prepare tools (shell scripts that leave markers): the source sends what its `backup` hook
//! made, each target commits what its `prepare` hook finished, and a failing hook commits
//! nothing and says what ran and what it wrote.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mover::config::{AgentConfig, ClusterConfig, NodeEntry};
use mover::controller::{NodeDataset, SendRequest, Summary, TargetSummary};
use mover::orchestrate::Method;
use mover::tls::TlsPaths;
use mover_protocol::Topology;

const NODES: [&str; 3] = ["west1", "east1", "east2"];

/// `backup DATADIR STAGING`: copies the data directory and leaves a marker.
const BACKUP: &str = r#"#!/bin/sh
cp -a "$1"/. "$2"/ || exit 1
echo "backup of $1" > "$2/BACKUP_MARKER"
echo "backup done"
"#;

const FAILING_BACKUP: &str = r#"#!/bin/sh
echo "connecting to the database"
echo "backup: Access denied for user 'backup'@'localhost'" >&2
exit 1
"#;

/// `prepare STAGING`: leaves a marker, as `xtrabackup --prepare` leaves its logs.
const PREPARE: &str = r#"#!/bin/sh
echo "prepared on $(basename "$(dirname "$(dirname "$0")")")" > "$1/PREPARED"
echo "prepare done"
"#;

const FAILING_PREPARE: &str = r#"#!/bin/sh
echo "InnoDB: starting crash recovery"
echo "InnoDB: log sequence number is in the future" >&2
exit 2
"#;

/// What a node's `[hooks]` holds.
#[derive(Clone, Copy)]
enum Hooks {
    None,
    /// Custom profile: `backup` and `prepare` run these scripts.
    Scripts {
        backup: &'static str,
        prepare: &'static str,
    },
}

const WORKING: Hooks = Hooks::Scripts {
    backup: BACKUP,
    prepare: PREPARE,
};

struct Agents {
    dir: tempfile::TempDir,
    cluster: ClusterConfig,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn tls(dir: &Path, node: &str) -> TlsPaths {
    TlsPaths {
        ca: dir.join("certs/ca.pem"),
        cert: dir.join(format!("certs/{node}.pem")),
        key: dir.join(format!("certs/{node}.key")),
    }
}

fn script(path: &Path, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_owned()
}

/// A custom `[hooks]` table for `node`: the backup and prepare scripts, `true` for the rest.
fn hooks_table(bin: &Path, backup: &str, prepare: &str) -> String {
    std::fs::create_dir_all(bin).unwrap();
    let backup = script(&bin.join("fake-backup"), backup);
    let prepare = script(&bin.join("fake-prepare"), prepare);
    let rest: String = [
        "policy_maintenance",
        "policy_automatic",
        "routers_offline",
        "routers_online",
        "replicator_offline",
        "replicator_reset",
        "replicator_online",
        "database_stop",
        "database_start",
        "mark_primary",
    ]
    .iter()
    .map(|k| format!("{k} = [\"true\"]\n"))
    .collect();
    format!(
        "[hooks]\nprofile = \"custom\"\ntimeout = 60\n[hooks.commands]\n{rest}backup = [\"{}\", \"{{datadir}}\", \"{{staging}}\"]\nprepare = [\"{}\", \"{{staging}}\"]\n",
        backup.display(),
        prepare.display()
    )
}

#[path = "../../tests/common/port.rs"]
mod port;

fn free_addr() -> std::net::SocketAddr {
    format!("127.0.0.1:{}", port::free_port()).parse().unwrap()
}

/// Starts an agent per node, each with a `mysql` dataset at `DIR/NODE/mysql` and the given
/// hooks, loaded from a config file as `mover agent` does.
async fn start(hooks: [Hooks; 3]) -> Agents {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<String> = NODES.iter().map(|n| n.to_string()).collect();
    mover::certs::init(&dir.path().join("certs"), &nodes).unwrap();
    let mut cluster = ClusterConfig {
        tls: tls(dir.path(), "controller"),
        nodes: BTreeMap::new(),
    };
    let (mut stops, mut tasks) = (Vec::new(), Vec::new());
    for (node, hooks) in NODES.into_iter().zip(hooks) {
        let home = dir.path().join(node);
        std::fs::create_dir_all(&home).unwrap();
        let addr = free_addr();
        let table = match hooks {
            Hooks::None => String::new(),
            Hooks::Scripts { backup, prepare } => hooks_table(&home.join("bin"), backup, prepare),
        };
        let file = home.join("agent.toml");
        let c = tls(dir.path(), node);
        std::fs::write(
            &file,
            format!(
                "node = \"{node}\"\nlisten = \"{addr}\"\nstate_dir = \"state\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[datasets.mysql]\npath = \"mysql\"\n{table}",
                c.ca.display(),
                c.cert.display(),
                c.key.display()
            ),
        )
        .unwrap();
        let cfg = AgentConfig::load(&file).unwrap();
        assert_eq!(cfg.datasets["mysql"].path, home.join("mysql"));
        cluster.nodes.insert(
            node.to_owned(),
            NodeEntry {
                address: addr.to_string(),
            },
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        tasks.push(tokio::spawn(async move {
            mover::agent::run(cfg, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Agents {
        dir,
        cluster,
        stops,
        tasks,
    }
}

impl Agents {
    fn mysql(&self, node: &str) -> PathBuf {
        self.dir.path().join(node).join("mysql")
    }

    fn state(&self, node: &str) -> PathBuf {
        self.dir.path().join(node).join("state")
    }

    async fn send(&self, method: Method) -> Summary {
        let nd = |node: &str| NodeDataset {
            node: node.into(),
            dataset: "mysql".into(),
        };
        let req = SendRequest {
            source: nd("west1"),
            targets: vec![nd("east1"), nd("east2")],
            topology: Topology::Chain,
            chunk_size: 1 << 16,
            compress: 1,
            compress_auto: false,
            connections: 1,
            max_rate: 0,
            method,
        };
        tokio::time::timeout(
            Duration::from_secs(120),
            mover::controller::send(&self.cluster, &req, |_| {}),
        )
        .await
        .expect("the transfer ends in time")
        .unwrap()
    }

    async fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("agent stops")
                .unwrap();
        }
    }
}

/// The source's data directory: a few files, one in a subdirectory.
fn source_data(a: &Agents) {
    let d = a.mysql("west1");
    std::fs::create_dir_all(d.join("db1")).unwrap();
    std::fs::write(d.join("ibdata1"), vec![7u8; 200_000]).unwrap();
    std::fs::write(d.join("db1/t1.ibd"), b"rows of t1").unwrap();
}

/// What a target held before: must survive any failure.
fn old_data(a: &Agents, node: &str) {
    let d = a.mysql(node);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("old-ibdata1"), b"the old copy").unwrap();
}

/// A file's content, short enough to read in a failed assertion.
fn digest(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if text.len() < 200 => format!("{text:?}"),
        _ => format!(
            "{} bytes, blake3 {}",
            bytes.len(),
            blake3::hash(bytes).to_hex()
        ),
    }
}

/// Every file under `dir`, relative, with its content's digest.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, digest(&std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn target<'a>(s: &'a Summary, node: &str) -> &'a TargetSummary {
    s.targets.iter().find(|t| t.node == node).unwrap()
}

fn is_empty_or_missing(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test]
async fn targets_commit_what_the_backup_made_once_prepared() {
    let a = start([WORKING; 3]).await;
    source_data(&a);
    old_data(&a, "east1");
    let before = tree(&a.mysql("west1"));
    let s = a.send(Method::Mariabackup).await;
    for node in ["east1", "east2"] {
        let t = target(&s, node);
        assert_eq!(t.result, "committed", "{node}: {:?}", t.reason);
        let got = tree(&a.mysql(node));
        // What the backup made (the data and its marker) and the prepare marker, and nothing
        // of what was there before.
        let mut want = before.clone();
        want.insert(
            "BACKUP_MARKER".into(),
            digest(format!("backup of {}\n", a.mysql("west1").display()).as_bytes()),
        );
        want.insert(
            "PREPARED".into(),
            digest(format!("prepared on {node}\n").as_bytes()),
        );
        assert_eq!(got, want, "{node}");
        assert!(is_empty_or_missing(&a.state(node).join("staging")));
    }
    // The source's own data is untouched and its backup is gone.
    assert_eq!(tree(&a.mysql("west1")), before);
    assert!(is_empty_or_missing(&a.state("west1").join("backups")));
    a.stop().await;
}

#[tokio::test]
async fn a_failing_prepare_commits_nothing_there_and_names_the_command() {
    let a = start([
        WORKING,
        Hooks::Scripts {
            backup: BACKUP,
            prepare: FAILING_PREPARE,
        },
        WORKING,
    ])
    .await;
    source_data(&a);
    old_data(&a, "east1");
    let old = tree(&a.mysql("east1"));
    let s = a.send(Method::Xtrabackup).await;
    let e1 = target(&s, "east1");
    assert_eq!(e1.result, "failed");
    let reason = e1.reason.as_deref().unwrap();
    let prepare = a.dir.path().join("east1/bin/fake-prepare");
    for words in [
        "east1",
        "prepare (xtrabackup) failed",
        &format!("`{} ", prepare.display()),
        "exited with status 2",
        "log sequence number is in the future",
        "old data is untouched",
    ] {
        assert!(reason.contains(words), "{words:?} not in {reason}");
    }
    assert!(!e1.retryable);
    assert_eq!(tree(&a.mysql("east1")), old, "east1's old data changed");
    assert!(is_empty_or_missing(&a.state("east1").join("staging")));
    // The relay kept forwarding: the node below it prepared and committed its own copy.
    let e2 = target(&s, "east2");
    assert_eq!(e2.result, "committed", "{:?}", e2.reason);
    assert!(a.mysql("east2").join("PREPARED").is_file());
    assert!(a.mysql("east2").join("BACKUP_MARKER").is_file());
    a.stop().await;
}

#[tokio::test]
async fn a_failing_backup_fails_the_transfer_with_its_command_and_output() {
    let a = start([
        Hooks::Scripts {
            backup: FAILING_BACKUP,
            prepare: PREPARE,
        },
        WORKING,
        WORKING,
    ])
    .await;
    source_data(&a);
    old_data(&a, "east1");
    let old = tree(&a.mysql("east1"));
    let s = a.send(Method::Xtrabackup).await;
    let backup = a.dir.path().join("west1/bin/fake-backup");
    for node in ["east1", "east2"] {
        let t = target(&s, node);
        assert_eq!(t.result, "failed", "{node}");
        let reason = t.reason.as_deref().unwrap();
        for words in [
            "source west1 failed",
            "backup (xtrabackup) failed",
            &format!("`{} ", backup.display()),
            "exited with status 1",
            "Access denied for user",
        ] {
            assert!(reason.contains(words), "{node}: {words:?} not in {reason}");
        }
    }
    assert_eq!(tree(&a.mysql("east1")), old);
    assert!(!a.mysql("east2").exists());
    assert!(is_empty_or_missing(&a.state("west1").join("backups")));
    a.stop().await;
}

#[tokio::test]
async fn a_target_without_hooks_fails_before_any_data_and_the_others_go_on() {
    let a = start([WORKING, WORKING, Hooks::None]).await;
    source_data(&a);
    let s = a.send(Method::Xtrabackup).await;
    let e2 = target(&s, "east2");
    assert_eq!(e2.result, "failed");
    let reason = e2.reason.as_deref().unwrap();
    assert!(
        reason.contains("prepare (xtrabackup) cannot run")
            && reason.contains("add a [hooks] table"),
        "{reason}"
    );
    assert!(!a.mysql("east2").exists());
    assert_eq!(target(&s, "east1").result, "committed");
    assert!(a.mysql("east1").join("PREPARED").is_file());
    a.stop().await;
}

#[tokio::test]
async fn the_files_method_runs_no_hooks() {
    let a = start([WORKING; 3]).await;
    source_data(&a);
    let s = a.send(Method::Files).await;
    for node in ["east1", "east2"] {
        assert_eq!(target(&s, node).result, "committed");
        assert_eq!(tree(&a.mysql(node)), tree(&a.mysql("west1")), "{node}");
    }
    a.stop().await;
}
