//! `mover bench`: measure each stage of a reseed on the host where it happens, name the
//! bottleneck, and estimate how long a reseed of the whole dataset would take.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use mover::bench::{human_bytes, human_duration, BenchRequest, Estimate, Report, MAX_SCRATCH};

use crate::report::line;
use crate::{exit, parse_node_dataset, parse_size, Tuning};

pub(crate) const HELP: &str = "\
Examples:
  mover bench --cluster cluster.toml --from west1:mysql --to east1,east2,east3
  mover bench --cluster cluster.toml --from west1:mysql --to east1,east2 --topology star --json
  mover bench --cluster cluster.toml --from west1:mysql --to east1 --sample 256M --link-bytes 64M

Each agent measures its own part, asked over the controller's connection: the source reads a
sample of the dataset (spread over it) through its disk back end and hashes and compresses it;
every link of the topology streams incompressible data between the two agents (the receiver
accepts it only with the controller's signed grant); every target writes, fdatasyncs and
removes a scratch file where its dataset's staging area goes. Then the sample is sent for real
along the topology into a scratch dataset (STATE_DIR/bench on each agent), decoded on each
target, and removed. No dataset is written.

The bottleneck is the slowest stage in dataset bytes per second (a link carries compressed
bytes, so it moves its rate times the compression ratio of dataset). Estimates are for the
whole dataset: chain (every hop at once), star (the source's uplink shared by the targets),
serial (one-to-one copies one after another, as tprovision cascades them).

Exit status: 0 measured; 1 error (config, unknown node, unreachable or refusing agent, a
failed stage).";

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Cluster file: the controller's certificate and every node's address.
    #[arg(long, value_name = "FILE")]
    cluster: PathBuf,
    /// Source as NODE:DATASET.
    #[arg(long, value_name = "NODE:DATASET")]
    from: String,
    /// Targets, comma-separated, as NODE or NODE:DATASET (the dataset defaults to the
    /// source's; it is only used to find where the target's staging area goes).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "NODE[:DATASET],..."
    )]
    to: Vec<String>,
    #[command(flatten)]
    tuning: Tuning,
    /// Bytes of the dataset to read, send end to end and (at most 1G) write on each target.
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    sample: u64,
    /// Most bytes to stream over each link.
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE")]
    link_bytes: u64,
    /// Most seconds to stream over each link.
    #[arg(long, default_value_t = 3, value_name = "SECONDS")]
    link_seconds: u32,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Largest `--sample`: the source copies it for the end-to-end run.
const MAX_SAMPLE: u64 = 16 << 30;
/// Largest `--link-bytes`.
const MAX_LINK_BYTES: u64 = 64 << 30;

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<u8> {
    let cluster = crate::runbook::load_cluster(&args.cluster)?;
    let source = parse_node_dataset(&args.from, None).context("--from")?;
    let targets = args
        .to
        .iter()
        .map(|t| parse_node_dataset(t, Some(&source.dataset)))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("--to")?;
    let send = args.tuning.request(source, targets)?;
    if !(64 << 10..=MAX_SAMPLE).contains(&args.sample) {
        bail!("--sample must be from 64K to 16G");
    }
    if !(1 << 20..=MAX_LINK_BYTES).contains(&args.link_bytes) {
        bail!("--link-bytes must be from 1M to 64G");
    }
    if !(1..=60).contains(&args.link_seconds) {
        bail!("--link-seconds must be from 1 to 60");
    }
    let req = BenchRequest {
        send,
        sample: args.sample,
        link_bytes: args.link_bytes,
        link_time: Duration::from_secs(args.link_seconds.into()),
    };
    let report = crate::runtime()?.block_on(mover::bench::run(&cluster, &req, |step| {
        eprintln!("{step} ...");
    }))?;
    if args.json {
        line(&serde_json::to_string_pretty(&report).context("encode the report as JSON")?);
    } else {
        print(&report);
    }
    Ok(exit::OK)
}

/// The stage an id names, for people: `network link west1 -> east1`.
fn describe(r: &Report, id: &str) -> String {
    r.stages.iter().find(|s| s.id == id).map_or_else(
        || id.to_owned(),
        |s| format!("{} on {}", s.name, s.hosts.join(" -> ")),
    )
}

fn print(r: &Report) {
    let codec = if r.compress > 0 {
        format!("zstd -{}", r.compress)
    } else {
        "no compression".to_owned()
    };
    line(&format!(
        "{}:{} ({} in {} files) -> {}: {} topology, {} chunks, {codec}, {} connection{} per hop",
        r.source,
        r.dataset,
        human_bytes(r.dataset_bytes),
        r.dataset_files,
        r.targets.join(", "),
        r.topology,
        human_bytes(u64::from(r.chunk_size)),
        r.connections,
        if r.connections == 1 { "" } else { "s" }
    ));
    let whole = if r.sample_bytes >= r.dataset_bytes {
        " (the whole dataset)"
    } else {
        ""
    };
    line(&format!(
        "sample: {}{whole}, {:.2}x smaller on the wire; scratch files of at most {}",
        human_bytes(r.sample_bytes),
        r.ratio,
        human_bytes(MAX_SCRATCH)
    ));
    line("");
    let hosts: Vec<String> = r.stages.iter().map(|s| s.hosts.join(" -> ")).collect();
    let hw = hosts.iter().map(String::len).max().unwrap_or(5).max(5);
    let nw = r
        .stages
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    line(&format!(
        "{:<nw$}  {:<hw$}  {:>9}  {:>12}  NOTES",
        "STAGE", "HOSTS", "MB/S", "DATASET MB/S"
    ));
    for (s, h) in r.stages.iter().zip(&hosts) {
        line(&format!(
            "{:<nw$}  {:<hw$}  {:>9.1}  {:>12.1}  {}",
            s.name, h, s.mb_per_s, s.dataset_mb_per_s, s.notes
        ));
    }
    line("");
    let b = &r.bottleneck;
    line(&format!(
        "bottleneck: {} at {:.1} MB/s of dataset{}",
        describe(r, &b.stage),
        b.dataset_mb_per_s,
        if b.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", b.note)
        }
    ));
    line(&format!(
        "estimated time to reseed all of {}:{} ({}) to {} target{}:",
        r.source,
        r.dataset,
        human_bytes(r.dataset_bytes),
        r.targets.len(),
        if r.targets.len() == 1 { "" } else { "s" }
    ));
    let e = &r.estimates;
    for est in [&e.chain, &e.star, &e.serial] {
        line(&estimate_line(r, est));
    }
    line(&format!(
        "  {:<8} {:>14}  at {:.1} MB/s, the rate the {} transfer of the sample achieved end to end",
        "measured",
        human_duration(e.end_to_end.seconds),
        e.end_to_end.mb_per_s,
        r.topology
    ));
    for n in &r.notes {
        line(&format!("note: {n}"));
    }
}

fn estimate_line(r: &Report, e: &Estimate) -> String {
    let mut s = format!(
        "  {:<8} {:>14}  at {:.1} MB/s, limited by {}",
        e.topology,
        human_duration(e.seconds),
        e.mb_per_s,
        describe(r, &e.limited_by)
    );
    if !e.note.is_empty() {
        s += &format!(" ({})", e.note);
    }
    s
}
