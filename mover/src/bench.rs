//! `mover bench`: how fast a reseed will go, and what limits it.
//!
//! The controller asks each agent, over its authenticated control connection, to measure the
//! stages of a transfer that happen on its host ([`probe`]): the source reads a sample of the
//! dataset through its disk back end and hashes and compresses it on one core and on all;
//! each upstream node of the plan streams incompressible bytes to its downstream node over
//! mutual-TLS QUIC, which the downstream accepts only with the controller's grant; each target
//! writes, syncs and removes a scratch file where its dataset's staging area goes. Then a real
//! transfer sends the sample, along the plan, into a scratch dataset (`mover-bench`, under each
//! agent's state directory), and each target decodes that copy and removes it.
//!
//! From the rates, [`model`] names the slowest stage (in dataset bytes per second: links carry
//! compressed bytes) and estimates how long a reseed of the whole dataset would take as a
//! chain, a star, and a serial cascade of one-to-one copies.

mod link;
pub(crate) mod model;
mod probe;
pub(crate) mod sampling;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mover_protocol::bench::{
    link_grant_bytes, Bench, BenchReply, LinkStats, Probe, SourceStats, TargetStats,
};
use mover_protocol::{manifest_frame_budget, Grant, Message, Outcome, Plan, Topology};
use serde::Serialize;

use crate::config::ClusterConfig;
use crate::controller::{self, ControlError, NodeDataset, SendRequest};
use crate::error::LinkError;
use crate::frame::{read_message, write_message};
use crate::tls::Identity;

pub(crate) use link::sink;
pub use model::{human_duration, Estimate};
pub(crate) use probe::{install, serve, AgentBench};

/// The dataset an end-to-end run sends from and into: `STATE_DIR/bench` on every agent. Names
/// starting with it are reserved.
pub const SCRATCH_DATASET: &str = "mover-bench";
/// The largest scratch file a target writes.
pub const MAX_SCRATCH: u64 = 1 << 30;
/// How long a link-test grant stays valid.
const LINK_GRANT_LIFETIME: Duration = Duration::from_secs(600);
/// How long the controller waits for a probe that reads or writes a sample.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long the controller waits for an answer beyond a link test's own time bound.
const LINK_SLACK: Duration = Duration::from_secs(120);

/// What `mover bench` asks for, validated.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    /// The transfer it stands for: source, targets, topology (chain or star), chunk size,
    /// compression, connections per hop.
    pub send: SendRequest,
    /// Most bytes of the dataset to read (and send end to end).
    pub sample: u64,
    /// Most bytes per link test, and its time bound.
    pub link_bytes: u64,
    pub link_time: Duration,
}

/// Why a benchmark could not be run or finished.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Control(#[from] ControlError),
    #[error(
        "the cluster file's certificate names {name}, not the controller ({}): only the \
         controller's certificate may run benchmarks",
        crate::certs::CONTROLLER_NAME
    )]
    NotController { name: String },
    #[error("bench measures a chain or a star, not {0}")]
    Topology(Topology),
    #[error("could not reach the agent on {node}: {reason}")]
    Unreachable { node: String, reason: String },
    #[error("{node} refused: {reason}")]
    Refused { node: String, reason: String },
    #[error("{what} on {node} failed: {reason}")]
    Probe {
        node: String,
        what: String,
        reason: String,
    },
    #[error("{node} broke the protocol: {reason}")]
    Protocol { node: String, reason: String },
    #[error("dataset {dataset} on {node} holds no data: there is nothing to measure")]
    Empty { node: String, dataset: String },
    #[error("the end-to-end transfer failed: {0}")]
    EndToEnd(String),
}

/// One measured stage, a row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// `kind:host` or `kind:from->to`: what the bottleneck and estimates name.
    pub id: String,
    /// `source_read`, `encode_1core`, `encode`, `link`, `decode_1core`, `decode`,
    /// `disk_write` or `end_to_end`.
    pub kind: &'static str,
    /// For people.
    pub name: String,
    pub hosts: Vec<String>,
    pub bytes: u64,
    pub seconds: f64,
    /// What the stage moved, per second (frame bytes for a link).
    pub mb_per_s: f64,
    /// The dataset bytes per second that rate stands for (a link's times the ratio).
    pub dataset_mb_per_s: f64,
    /// Whether it is one of the stages a transfer goes through at once (the per-core and
    /// end-to-end rows are there to read, not to limit).
    pub limits: bool,
    pub notes: String,
}

/// The slowest stage of the measured topology.
#[derive(Debug, Clone, Serialize)]
pub struct Bottleneck {
    /// A [`Stage::id`].
    pub stage: String,
    pub dataset_mb_per_s: f64,
    pub note: String,
}

/// How long a reseed of the whole dataset would take.
#[derive(Debug, Clone, Serialize)]
pub struct Estimates {
    pub chain: Estimate,
    pub star: Estimate,
    pub serial: Estimate,
    /// At the rate the end-to-end run of the sample achieved, in the measured topology.
    pub end_to_end: Estimate,
}

/// Everything `mover bench` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source: String,
    pub dataset: String,
    pub dataset_bytes: u64,
    pub dataset_files: u64,
    pub targets: Vec<String>,
    pub topology: String,
    pub chunk_size: u32,
    pub compress: u8,
    pub connections: u8,
    pub sample_bytes: u64,
    /// Dataset bytes per frame byte, from the sample.
    pub ratio: f64,
    pub stages: Vec<Stage>,
    pub bottleneck: Bottleneck,
    pub estimates: Estimates,
    /// What to keep in mind when reading the figures.
    pub notes: Vec<String>,
}

/// Runs every probe and the end-to-end transfer, and reports. `progress` gets a line before
/// each step. Whatever happens, every agent is asked at the end to remove what the run left.
pub async fn run(
    cluster: &ClusterConfig,
    req: &BenchRequest,
    mut progress: impl FnMut(&str),
) -> Result<Report, BenchError> {
    if !matches!(req.send.topology, Topology::Chain | Topology::Star) {
        return Err(BenchError::Topology(req.send.topology));
    }
    let plan = controller::plan(cluster, &req.send)?;
    let identity = Identity::load(&cluster.tls).map_err(ControlError::from)?;
    if identity.name() != crate::certs::CONTROLLER_NAME {
        return Err(BenchError::NotController {
            name: identity.name().to_owned(),
        });
    }
    let nodes: Vec<String> = plan.nodes().iter().map(|n| n.name.clone()).collect();
    progress(&format!("checking the agents on {}", nodes.join(", ")));
    for n in &nodes {
        call(
            cluster,
            n,
            Probe::Reset,
            "clearing old scratch data",
            PROBE_TIMEOUT,
        )
        .await?;
    }
    let result = measure(cluster, req, &plan, &identity, &mut progress).await;
    progress("removing the scratch data");
    for n in &nodes {
        let reset = call(
            cluster,
            n,
            Probe::Reset,
            "removing scratch data",
            PROBE_TIMEOUT,
        );
        if let Err(e) = reset.await {
            tracing::warn!(node = %n, error = %e, "could not remove the bench's scratch data");
        }
    }
    result
}

/// Measures every stage, in an order where none disturbs another.
async fn measure(
    cluster: &ClusterConfig,
    req: &BenchRequest,
    plan: &Plan,
    identity: &Identity,
    progress: &mut impl FnMut(&str),
) -> Result<Report, BenchError> {
    let send = &req.send;
    let src = plan.source();
    progress(&format!(
        "{}: reading up to {} of {} and encoding it",
        src.name,
        human_bytes(req.sample),
        src.dataset
    ));
    let source = match call(
        cluster,
        &src.name,
        Probe::Source {
            dataset: src.dataset.clone(),
            sample: req.sample,
            chunk_size: send.chunk_size,
            compress: send.compress,
            stage: true,
        },
        "reading and encoding the source",
        PROBE_TIMEOUT,
    )
    .await?
    {
        BenchReply::Source(s) => s,
        other => return Err(unexpected(&src.name, &other)),
    };
    if source.read_bytes == 0 {
        return Err(BenchError::Empty {
            node: src.name.clone(),
            dataset: src.dataset.clone(),
        });
    }

    let mut links = Vec::new();
    for (i, t) in plan.nodes().iter().enumerate().skip(1) {
        let Some(parent) = t.parent.map(|p| &plan.nodes()[usize::from(p)]) else {
            continue;
        };
        progress(&format!(
            "link {} -> {}: up to {} for up to {:.0} s",
            parent.name,
            t.name,
            human_bytes(req.link_bytes),
            req.link_time.as_secs_f64()
        ));
        let id = fastrand::u64(..);
        let not_after_unix = (SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            + LINK_GRANT_LIFETIME)
            .as_secs();
        let signed = link_grant_bytes(
            id,
            &parent.name,
            &t.name,
            req.link_bytes,
            send.connections,
            not_after_unix,
        );
        let grant = Grant {
            controller_cert: identity.cert_der().to_vec(),
            not_after_unix,
            signature: crate::tls::sign_grant(identity, &signed).map_err(ControlError::from)?,
        };
        let probe = Probe::Link {
            to: t.name.clone(),
            address: t.address.clone(),
            bytes: req.link_bytes,
            millis: u32::try_from(req.link_time.as_millis()).unwrap_or(u32::MAX),
            connections: send.connections,
            grant,
        };
        let bench = Bench { id, probe };
        let what = format!("the link test to {}", t.name);
        let timeout = req.link_time + LINK_SLACK;
        match call_bench(cluster, &parent.name, bench, &what, timeout).await? {
            BenchReply::Link(l) => links.push((i, parent.name.clone(), l)),
            other => return Err(unexpected(&parent.name, &other)),
        }
    }

    progress(&format!(
        "end to end: sending the {} sample {} ({}) into scratch dataset {SCRATCH_DATASET}",
        human_bytes(source.staged_bytes),
        nodes_path(plan, send.topology),
        send.topology
    ));
    let e2e = end_to_end(cluster, send, progress).await?;

    let mut targets = Vec::new();
    for t in plan.targets() {
        progress(&format!(
            "{}: writing a scratch file, decoding the end-to-end copy",
            t.name
        ));
        let probe = Probe::Target {
            dataset: t.dataset.clone(),
            bytes: req.sample.min(MAX_SCRATCH),
            chunk_size: send.chunk_size,
            compress: send.compress,
        };
        let what = "writing and decoding on the target";
        match call(cluster, &t.name, probe, what, PROBE_TIMEOUT).await? {
            BenchReply::Target(s) if s.decode_bytes == 0 => {
                return Err(BenchError::Probe {
                    node: t.name.clone(),
                    what: what.into(),
                    reason: "the end-to-end copy to decode was not there".into(),
                })
            }
            BenchReply::Target(s) => targets.push(s),
            other => return Err(unexpected(&t.name, &other)),
        }
    }
    Ok(report(req, plan, &source, &links, &targets, &e2e))
}

/// The nodes of a plan as people read them: `a -> b -> c`, or `a -> {b, c}`.
fn nodes_path(plan: &Plan, topology: Topology) -> String {
    let targets: Vec<&str> = plan.targets().iter().map(|t| t.name.as_str()).collect();
    match topology {
        Topology::Star if targets.len() > 1 => {
            format!("{} -> {{{}}}", plan.source().name, targets.join(", "))
        }
        _ => std::iter::once(plan.source().name.as_str())
            .chain(targets)
            .collect::<Vec<_>>()
            .join(" -> "),
    }
}

/// What the end-to-end run measured.
struct EndToEnd {
    bytes: u64,
    seconds: f64,
    wire_bytes: u64,
    slowest_target: f64,
}

/// Sends the sample the source probe staged, along the plan, into every target's scratch
/// dataset: the real data path (scan, read, encode, QUIC, relay, decode, verify, write,
/// commit).
async fn end_to_end(
    cluster: &ClusterConfig,
    send: &SendRequest,
    progress: &mut impl FnMut(&str),
) -> Result<EndToEnd, BenchError> {
    let scratch = |nd: &NodeDataset| NodeDataset {
        node: nd.node.clone(),
        dataset: SCRATCH_DATASET.to_owned(),
    };
    let req = SendRequest {
        source: scratch(&send.source),
        targets: send.targets.iter().map(scratch).collect(),
        method: crate::orchestrate::Method::Files,
        ..send.clone()
    };
    let summary = controller::send(cluster, &req, |ev| {
        if let controller::Event::Finished { node, committed } = ev {
            let how = if *committed { "committed" } else { "FAILED" };
            progress(&format!("end to end: {node} {how}"));
        }
    })
    .await
    .map_err(|e| BenchError::EndToEnd(e.to_string()))?;
    let failed: Vec<String> = summary
        .targets
        .iter()
        .filter(|t| t.result != "committed")
        .map(|t| {
            format!(
                "{}: {}",
                t.node,
                t.reason.as_deref().unwrap_or("no reason given")
            )
        })
        .collect();
    if !failed.is_empty() {
        return Err(BenchError::EndToEnd(failed.join("; ")));
    }
    let slowest_target = summary
        .targets
        .iter()
        .map(|t| t.mb_per_s)
        .fold(f64::INFINITY, f64::min);
    Ok(EndToEnd {
        bytes: summary.source.total_bytes,
        seconds: summary.seconds,
        wire_bytes: summary.source.wire_bytes,
        slowest_target,
    })
}

/// Puts the measurements together: the rows, the bottleneck, the estimates.
fn report(
    req: &BenchRequest,
    plan: &Plan,
    source: &SourceStats,
    links: &[(usize, String, LinkStats)],
    targets: &[TargetStats],
    e2e: &EndToEnd,
) -> Report {
    let send = &req.send;
    let src = plan.source().name.clone();
    let ratio = if source.wire_bytes > 0 {
        source.encode_bytes as f64 / source.wire_bytes as f64
    } else {
        1.0
    };
    let codec = if send.compress > 0 {
        format!("blake3 + zstd -{}", send.compress)
    } else {
        "blake3, no compression".to_owned()
    };
    let mut stages = Vec::new();
    let mut row = |kind: &'static str,
                   name: String,
                   hosts: &[&str],
                   bytes: u64,
                   micros: u64,
                   dataset_factor: f64,
                   limits: bool,
                   notes: String| {
        let rate = model::rate(bytes, micros);
        stages.push(Stage {
            id: model::stage_id(kind, hosts),
            kind,
            name,
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            bytes,
            seconds: micros as f64 / 1e6,
            mb_per_s: rate / 1e6,
            dataset_mb_per_s: rate * dataset_factor / 1e6,
            limits,
            notes,
        });
        rate * dataset_factor
    };

    let cached = source.cached_bytes as f64 / source.read_bytes.max(1) as f64;
    let mut read_note = format!(
        "{} of {} in {} reads, {} back end",
        human_bytes(source.read_bytes),
        human_bytes(source.total_bytes),
        human_bytes(u64::from(send.chunk_size)),
        source.io
    );
    if cached >= 0.5 {
        read_note += &format!(
            "; {:.0}% was in the page cache before the read, so this is mostly memory's rate, \
             not the disk's",
            cached * 100.0
        );
    } else if cached > 0.0 {
        read_note += &format!("; {:.0}% was in the page cache", cached * 100.0);
    }
    let source_read = row(
        "source_read",
        "source disk read".into(),
        &[&src],
        source.read_bytes,
        source.read_micros,
        1.0,
        true,
        read_note,
    );
    row(
        "encode_1core",
        format!("encode ({codec}), 1 core"),
        &[&src],
        source.encode_bytes,
        source.encode_one_micros,
        1.0,
        false,
        format!(
            "{} of the sample, {ratio:.2}x smaller on the wire",
            human_bytes(source.encode_bytes)
        ),
    );
    let encode = row(
        "encode",
        format!("encode, all {} cores", source.threads),
        &[&src],
        source.encode_bytes,
        source.encode_all_micros,
        1.0,
        true,
        scaling(source.encode_one_micros, source.encode_all_micros),
    );

    let mut measured = model::Measured {
        source: src.clone(),
        source_read,
        encode,
        ratio,
        targets: Vec::new(),
    };
    for (t, (i, parent, l)) in targets.iter().zip(links) {
        let node = plan.nodes()[*i].name.clone();
        let link = row(
            "link",
            "network link".into(),
            &[parent, &node],
            l.bytes,
            l.micros,
            ratio,
            true,
            format!(
                "{} of incompressible data over {} connection{}; carries {ratio:.2}x as much dataset",
                human_bytes(l.bytes),
                l.connections,
                if l.connections == 1 { "" } else { "s" }
            ),
        ) / ratio;
        row(
            "decode_1core",
            "decode (zstd + blake3), 1 core".into(),
            &[&node],
            t.decode_bytes,
            t.decode_one_micros,
            1.0,
            false,
            format!("{} of the end-to-end copy", human_bytes(t.decode_bytes)),
        );
        let decode = row(
            "decode",
            format!("decode, all {} cores", t.threads),
            &[&node],
            t.decode_bytes,
            t.decode_all_micros,
            1.0,
            true,
            scaling(t.decode_one_micros, t.decode_all_micros),
        );
        let write = row(
            "disk_write",
            "disk write + fdatasync".into(),
            &[&node],
            t.write_bytes,
            t.write_micros,
            1.0,
            true,
            format!(
                "{} scratch file in {}, {} back end; fdatasync {:.2} s",
                human_bytes(t.write_bytes),
                t.scratch_dir,
                t.io,
                t.sync_micros as f64 / 1e6
            ),
        );
        measured.targets.push(model::TargetMeasured {
            node,
            fed_by: parent.clone(),
            link,
            decode,
            write,
        });
    }
    let all: Vec<&str> = plan.nodes().iter().map(|n| n.name.as_str()).collect();
    let e2e_micros = (e2e.seconds * 1e6) as u64;
    let e2e_rate = row(
        "end_to_end",
        format!("end to end ({})", send.topology),
        &all,
        e2e.bytes,
        e2e_micros,
        1.0,
        false,
        format!(
            "a real transfer of the sample into scratch dataset {SCRATCH_DATASET}, committed on \
             {} target{} (slowest {:.1} MB/s; {} on the wire); includes scan, connecting and \
             commit",
            targets.len(),
            if targets.len() == 1 { "" } else { "s" },
            e2e.slowest_target,
            human_bytes(e2e.wire_bytes)
        ),
    );

    let dataset_bytes = source.total_bytes;
    let chain = model::chain(&measured, dataset_bytes);
    let star = model::star(&measured, dataset_bytes);
    let serial = model::serial(&measured, dataset_bytes);
    let chosen = match send.topology {
        Topology::Star => &star,
        _ => &chain,
    };
    let bottleneck = Bottleneck {
        stage: chosen.limited_by.clone(),
        dataset_mb_per_s: chosen.mb_per_s,
        note: chosen.note.clone(),
    };
    let end_to_end = Estimate {
        topology: "end_to_end",
        seconds: dataset_bytes as f64 / e2e_rate,
        mb_per_s: e2e_rate / 1e6,
        limited_by: model::stage_id("end_to_end", &all),
        note: format!(
            "at the rate the {} transfer of the sample went end to end",
            send.topology
        ),
    };
    let mut notes = Vec::new();
    if cached >= 0.5 {
        notes.push(
            "the source's sample was mostly in the page cache: a cold read of the whole dataset \
             may be slower than the source read figure"
                .to_owned(),
        );
    }
    let share = e2e_rate / (bottleneck.dataset_mb_per_s * 1e6);
    if share < 0.7 {
        notes.push(format!(
            "end to end went at {:.0}% of the bottleneck's rate: the stages compete for something \
             when they run at once (hosts that share cores, disks or a network path), or the \
             sample was too small to amortise the transfer's start and commit",
            share * 100.0
        ));
    }
    Report {
        source: src,
        dataset: plan.source().dataset.clone(),
        dataset_bytes,
        dataset_files: source.files,
        targets: plan.targets().iter().map(|t| t.name.clone()).collect(),
        topology: send.topology.to_string(),
        chunk_size: send.chunk_size,
        compress: send.compress,
        connections: send.connections,
        sample_bytes: source.read_bytes,
        ratio,
        stages,
        bottleneck,
        estimates: Estimates {
            chain,
            star,
            serial,
            end_to_end,
        },
        notes,
    }
}

/// How much faster the all-cores pass went than the one-core pass.
fn scaling(one_micros: u64, all_micros: u64) -> String {
    format!(
        "{:.1}x the rate of one core",
        one_micros as f64 / all_micros.max(1) as f64
    )
}

fn unexpected(node: &str, reply: &BenchReply) -> BenchError {
    BenchError::Protocol {
        node: node.to_owned(),
        reason: format!("it answered with the wrong kind of result ({reply:?})"),
    }
}

/// Asks `node` for one probe (with a fresh id) and waits up to `timeout` for its answer.
async fn call(
    cluster: &ClusterConfig,
    node: &str,
    probe: Probe,
    what: &str,
    timeout: Duration,
) -> Result<BenchReply, BenchError> {
    let bench = Bench {
        id: fastrand::u64(..),
        probe,
    };
    call_bench(cluster, node, bench, what, timeout).await
}

async fn call_bench(
    cluster: &ClusterConfig,
    node: &str,
    bench: Bench,
    what: &str,
    timeout: Duration,
) -> Result<BenchReply, BenchError> {
    let unreachable = |reason: String| BenchError::Unreachable {
        node: node.to_owned(),
        reason,
    };
    let (endpoint, conn) = controller::dial(cluster, node).await.map_err(|e| match e {
        controller::DialError::UnknownNode { .. } | controller::DialError::Tls(_) => {
            BenchError::Control(e.into())
        }
        other => unreachable(other.to_string()),
    })?;
    let answer = tokio::time::timeout(timeout, async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(LinkError::from)?;
        write_message(&mut send, &Message::Bench(bench)).await?;
        let _ = send.finish();
        read_message(&mut recv, manifest_frame_budget()).await
    })
    .await;
    crate::net::close_done(&endpoint, &conn).await;
    let protocol = |reason: String| BenchError::Protocol {
        node: node.to_owned(),
        reason,
    };
    match answer {
        Err(_) => Err(unreachable(format!(
            "no answer to {what} within {} s",
            timeout.as_secs()
        ))),
        Ok(Ok(Message::BenchDone {
            reply: BenchReply::Failed { reason },
            ..
        })) => Err(BenchError::Probe {
            node: node.to_owned(),
            what: what.to_owned(),
            reason,
        }),
        Ok(Ok(Message::BenchDone { reply, .. })) => Ok(reply),
        // How an agent refuses a request it will not take from this peer.
        Ok(Ok(Message::Report {
            outcome: Outcome::Failed { reason, .. },
            ..
        })) => Err(BenchError::Refused {
            node: node.to_owned(),
            reason,
        }),
        Ok(Ok(other)) => Err(protocol(format!(
            "it answered a bench probe with a {} message",
            other.name()
        ))),
        Ok(Err(LinkError::Closed)) => Err(protocol(
            "it closed the stream without answering (does it run the same mover version? its log says why)"
                .into(),
        )),
        Ok(Err(e @ (LinkError::Decode(_) | LinkError::Unexpected { .. }))) => {
            Err(protocol(e.to_string()))
        }
        Ok(Err(e)) => Err(unreachable(e.to_string())),
    }
}

/// `1.0 GiB`, `512.0 MiB`, `42 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
