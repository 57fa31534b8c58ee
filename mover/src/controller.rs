//! The controller: starts a transfer on the source agent and follows it to the end.
//!
//! It dials the source with the controller certificate, sends `Start` with the plan, and reads
//! events (progress, reports, the source's totals) until every target has reported. A target
//! that never reports is failed with the reason the link gave.
//!
//! `Start` carries a grant: the controller's signature over the transfer, which every target
//! checks before it receives anything (see `tls::verify_grant`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mover_protocol::{
    manifest_frame_budget, Grant, Message, Outcome, Plan, PlanNode, Start, Topology,
};
use serde::Serialize;

use crate::config::ClusterConfig;
use crate::error::LinkError;
use crate::frame::{read_message, write_message};
use crate::orchestrate::Method;
use crate::tls::Identity;

/// How long a grant stays valid. Long enough that no transfer outlives it (a relay that
/// re-links a grandchild late in a transfer reuses it), short enough that a recorded grant is
/// soon worthless.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a transfer could not be started or followed at all.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("node {node:?} is not in the cluster file (known: {known})")]
    UnknownNode { node: String, known: String },
    #[error("{0}")]
    Plan(String),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Net(#[from] Box<crate::net::NetError>),
    #[error("resolve address {address} of {node}: {source}")]
    Resolve {
        node: String,
        address: String,
        source: std::io::Error,
    },
    #[error("talk to source {node}: {source}")]
    Link {
        node: String,
        source: Box<LinkError>,
    },
    #[error("the source {node} refused the transfer: {reason}")]
    Refused { node: String, reason: String },
}

/// A node and one of its datasets, as in `west1:mysql`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDataset {
    pub node: String,
    pub dataset: String,
}

/// What `mover send` asks for, validated.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub source: NodeDataset,
    pub targets: Vec<NodeDataset>,
    pub topology: Topology,
    pub chunk_size: u32,
    /// zstd level, 0 for none.
    pub compress: u8,
    /// Compress only while the link is what holds the transfer back.
    pub compress_auto: bool,
    pub connections: u8,
    /// Most bytes per second the source sends, or 0 for no limit.
    pub max_rate: u64,
    /// `Files` sends the dataset's directory; `Xtrabackup` and `Mariabackup` send a backup
    /// made by the source's `backup` hook, which each target's `prepare` hook finishes before
    /// it commits (see the agent config's `[hooks]`).
    pub method: Method,
}

/// Something that happened during a transfer, for progress displays.
#[derive(Debug, Clone)]
pub enum Event {
    /// The source scanned its dataset.
    Scanned {
        entries: u64,
        total_bytes: u64,
    },
    Progress {
        node: String,
        bytes: u64,
        files: u64,
    },
    Finished {
        node: String,
        committed: bool,
    },
    /// The source read and sent everything.
    Sent {
        bytes: u64,
        wire_bytes: u64,
    },
}

/// How one target ended.
#[derive(Debug, Clone, Serialize)]
pub struct TargetSummary {
    pub node: String,
    pub dataset: String,
    pub result: &'static str,
    pub bytes: u64,
    pub files: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    /// Bytes that were already on the target (an interrupted run, an older copy) and kept.
    pub held_bytes: u64,
    /// Chunks fetched again after failing verification (in transit or in staging).
    pub repaired: u64,
    /// Digest over every file's BLAKE3 root, hex; equal on every target that committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
}

/// How the source did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceSummary {
    pub node: String,
    pub dataset: String,
    pub entries: u64,
    pub total_bytes: u64,
    /// Bytes of frames sent to each first hop (after compression), repairs included.
    pub wire_bytes: u64,
    pub chunks: u64,
    /// Bytes not sent because every target already held them.
    pub skipped_bytes: u64,
    /// Chunks sent again in repair rounds.
    pub resent_chunks: u64,
}

/// The whole transfer.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub transfer_id: String,
    pub topology: String,
    pub seconds: f64,
    pub source: SourceSummary,
    pub targets: Vec<TargetSummary>,
}

impl Summary {
    pub fn committed(&self) -> usize {
        self.targets
            .iter()
            .filter(|t| t.result == "committed")
            .count()
    }
}

/// Why the controller could not connect to an agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("node {node:?} is not in the cluster file (known: {known})")]
    UnknownNode { node: String, known: String },
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("resolve address {address} of {node}: {source}")]
    Resolve {
        node: String,
        address: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Net(#[from] Box<crate::net::NetError>),
}

impl From<DialError> for ControlError {
    fn from(e: DialError) -> Self {
        match e {
            DialError::UnknownNode { node, known } => ControlError::UnknownNode { node, known },
            DialError::Tls(e) => ControlError::Tls(e),
            DialError::Resolve {
                node,
                address,
                source,
            } => ControlError::Resolve {
                node,
                address,
                source,
            },
            DialError::Net(e) => ControlError::Net(e),
        }
    }
}

fn known_nodes(cluster: &ClusterConfig) -> String {
    cluster.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// Connects to `node`'s agent with the controller's identity (from the cluster file), on an
/// endpoint of its own.
pub(crate) async fn dial(
    cluster: &ClusterConfig,
    node: &str,
) -> Result<(quinn::Endpoint, quinn::Connection), DialError> {
    let address = cluster
        .address(node)
        .ok_or_else(|| DialError::UnknownNode {
            node: node.to_owned(),
            known: known_nodes(cluster),
        })?;
    let identity = Identity::load(&cluster.tls)?;
    let transport = Arc::new(crate::net::transport_config());
    let client = crate::tls::client_config(&identity, transport)?;
    let addr = crate::config::resolve_address(address)
        .await
        .map_err(|source| DialError::Resolve {
            node: node.to_owned(),
            address: address.to_owned(),
            source,
        })?;
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = crate::net::client_endpoint(bind, client).map_err(Box::new)?;
    let conn = crate::net::connect(&endpoint, None, addr, node)
        .await
        .map_err(Box::new)?;
    Ok((endpoint, conn))
}

fn plan_node(cluster: &ClusterConfig, nd: &NodeDataset) -> Result<PlanNode, ControlError> {
    let address = cluster
        .address(&nd.node)
        .ok_or_else(|| ControlError::UnknownNode {
            node: nd.node.clone(),
            known: known_nodes(cluster),
        })?;
    Ok(PlanNode {
        name: nd.node.clone(),
        address: address.to_owned(),
        dataset: nd.dataset.clone(),
        parent: None,
    })
}

/// Builds the plan for a request from the cluster file's addresses.
pub fn plan(cluster: &ClusterConfig, req: &SendRequest) -> Result<Plan, ControlError> {
    let source = plan_node(cluster, &req.source)?;
    let targets = req
        .targets
        .iter()
        .map(|t| plan_node(cluster, t))
        .collect::<Result<Vec<_>, _>>()?;
    if targets.iter().any(|t| t.name == source.name) {
        return Err(ControlError::Plan(format!(
            "{} is both the source and a target",
            source.name
        )));
    }
    Plan::build(source, targets, req.topology).map_err(|e| ControlError::Plan(e.to_string()))
}

/// The method as the protocol carries it.
fn wire_method(m: Method) -> mover_protocol::Method {
    match m {
        Method::Files => mover_protocol::Method::Files,
        Method::Xtrabackup => mover_protocol::Method::Xtrabackup,
        Method::Mariabackup => mover_protocol::Method::Mariabackup,
    }
}

/// Runs a transfer and follows it until every target reports. `on_event` sees progress.
pub async fn send(
    cluster: &ClusterConfig,
    req: &SendRequest,
    mut on_event: impl FnMut(&Event),
) -> Result<Summary, ControlError> {
    let started = Instant::now();
    let plan = plan(cluster, req)?;
    let identity = Identity::load(&cluster.tls)?;
    let src = plan.source().clone();
    let (endpoint, conn) = dial(cluster, &src.name).await?;
    let link = |source: LinkError| ControlError::Link {
        node: src.name.clone(),
        source: Box::new(source),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| link(e.into()))?;
    let transfer_id = fastrand::u64(..);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut start = Start {
        transfer_id,
        chunk_size: req.chunk_size,
        compress: req.compress,
        compress_auto: req.compress_auto,
        connections: req.connections,
        max_rate: req.max_rate,
        method: wire_method(req.method),
        plan: plan.clone(),
        grant: Grant {
            controller_cert: identity.cert_der().to_vec(),
            not_after_unix: (now + GRANT_LIFETIME).as_secs(),
            signature: Vec::new(),
        },
    };
    start.grant.signature = crate::tls::sign_grant(&identity, &start.grant_bytes())?;
    write_message(&mut send, &Message::Start(start))
        .await
        .map_err(link)?;
    let _ = send.finish();

    let mut source = SourceSummary {
        node: src.name.clone(),
        dataset: src.dataset.clone(),
        ..Default::default()
    };
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let targets: Vec<&PlanNode> = plan.targets().iter().collect();
    let end_reason = loop {
        if outcomes.len() == targets.len() {
            break None;
        }
        match read_message(&mut recv, manifest_frame_budget()).await {
            Ok(Message::ManifestEnd {
                entries,
                total_bytes,
            }) => {
                source.entries = entries;
                source.total_bytes = total_bytes;
                on_event(&Event::Scanned {
                    entries,
                    total_bytes,
                });
            }
            Ok(Message::Progress { node, bytes, files }) => {
                on_event(&Event::Progress { node, bytes, files })
            }
            Ok(Message::Report { node, outcome }) => {
                if node == src.name && !targets.iter().any(|t| t.name == node) {
                    if let Outcome::Failed { reason, .. } = outcome {
                        return Err(ControlError::Refused {
                            node: src.name.clone(),
                            reason,
                        });
                    }
                    continue;
                }
                on_event(&Event::Finished {
                    node: node.clone(),
                    committed: matches!(outcome, Outcome::Committed { .. }),
                });
                outcomes.entry(node).or_insert(outcome);
            }
            Ok(Message::Sent {
                bytes,
                wire_bytes,
                chunks,
                skipped,
                resent,
                ..
            }) => {
                source.wire_bytes = wire_bytes;
                source.chunks = chunks;
                source.skipped_bytes = skipped;
                source.resent_chunks = resent;
                on_event(&Event::Sent { bytes, wire_bytes });
            }
            Ok(other) => {
                break Some(format!(
                    "the source sent an unexpected {} message",
                    other.name()
                ))
            }
            Err(LinkError::Closed) => {
                break Some("the source closed the stream before every target reported".into())
            }
            Err(e) => break Some(format!("lost contact with the source {}: {e}", src.name)),
        }
    };
    crate::net::close_done(&endpoint, &conn).await;
    let seconds = started.elapsed().as_secs_f64();
    let summaries = targets
        .iter()
        .map(|t| {
            let outcome = outcomes.remove(&t.name).unwrap_or_else(|| Outcome::Failed {
                reason: end_reason.clone().unwrap_or_else(|| "no report".to_owned()),
                retryable: true,
            });
            summarize(t, outcome)
        })
        .collect();
    Ok(Summary {
        transfer_id: format!("{transfer_id:016x}"),
        topology: req.topology.to_string(),
        seconds,
        source,
        targets: summaries,
    })
}

fn summarize(t: &PlanNode, outcome: Outcome) -> TargetSummary {
    let base = TargetSummary {
        node: t.name.clone(),
        dataset: t.dataset.clone(),
        result: "failed",
        bytes: 0,
        files: 0,
        seconds: 0.0,
        mb_per_s: 0.0,
        held_bytes: 0,
        repaired: 0,
        digest: None,
        reason: None,
        retryable: false,
    };
    match outcome {
        Outcome::Committed {
            bytes,
            files,
            elapsed_ms,
            digest,
            held,
            repaired,
        } => {
            let seconds = elapsed_ms as f64 / 1000.0;
            TargetSummary {
                result: "committed",
                bytes,
                files,
                seconds,
                held_bytes: held,
                repaired,
                mb_per_s: if seconds > 0.0 {
                    bytes as f64 / 1e6 / seconds
                } else {
                    0.0
                },
                digest: Some(digest.iter().map(|b| format!("{b:02x}")).collect()),
                ..base
            }
        }
        Outcome::Failed { reason, retryable } => TargetSummary {
            reason: Some(reason),
            retryable,
            ..base
        },
    }
}
