//! The `mover` command: parses flags, validates them into engine requests, and maps every
//! outcome to a documented exit code.

mod bench;
mod demo;
mod report;
mod runbook;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use mover::config::{validate_dataset_name, AgentConfig};
use mover::controller::{NodeDataset, SendRequest};
use mover::orchestrate::Method;
use mover_protocol::Topology;

/// Exit codes, documented in the README and in `--help`.
pub mod exit {
    /// Every target committed.
    pub const OK: u8 = 0;
    /// Nothing was transferred: bad config, certificates, or the source could not be reached.
    pub const ERROR: u8 = 1;
    /// Bad command-line usage (from clap).
    pub const USAGE: u8 = 2;
    /// Partial: some targets committed, some failed (named in the summary).
    pub const PARTIAL: u8 = 3;
    /// No target committed.
    pub const FAILED: u8 = 4;
    /// The demo's verification found a target that differs from the source.
    pub const MISMATCH: u8 = 5;
    /// A runbook was stopped (Ctrl-C, SIGTERM) before its end: resume it.
    pub const INTERRUPTED: u8 = 130;
}

const AFTER_HELP: &str = "\
Exit status: 0 every target committed; 1 error before any transfer (config, certificates,
unreachable source, a site held by another runbook); 2 bad usage; 3 partial (some targets
failed); 4 no target committed, or a runbook step failed; 5 the demo found a difference
between a target and the source; 130 a runbook was interrupted (resume it).";

/// Rebuild database nodes fast: stream a data directory from one node to many, verified.
#[derive(Parser)]
#[command(
    name = "mover",
    version,
    about = "Rebuild database nodes fast: stream a data directory from one node to many, verified at every hop.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// More log output (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a cluster certificate authority and certificates for nodes and the controller.
    #[command(
        after_help = "Example:\n  mover certs init --out certs --nodes west1,east1,east2,east3"
    )]
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run an agent: send, receive and relay transfers for this host's datasets.
    #[command(
        after_help = "Examples:\n  mover agent --config /etc/mover/agent.toml\n  mover agent --config /etc/mover/agent.toml --io threads\n\nDisk I/O: io_uring where a probe at start shows it works, else a pread/pwrite\nthread pool; the log's \"disk I/O:\" line says which and why. Without --io, the\nconfig's io key decides, then the MOVER_IO environment variable, then auto.\n\nStops cleanly on SIGINT or SIGTERM."
    )]
    Agent {
        /// Agent config file (TOML; see the README).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Disk I/O back end for chunk data, overriding the config's `io`: uring (fail at
        /// start if io_uring cannot be set up), threads (pread/pwrite pool), or auto.
        #[arg(long, value_name = "BACKEND", value_parser = ["auto", "uring", "threads"])]
        io: Option<String>,
        /// How received chunks go into staging, overriding the config's `staging_writes`:
        /// direct (O_DIRECT where the filesystem takes it) or cached (the page cache).
        #[arg(long, value_name = "HOW", value_parser = ["direct", "cached"])]
        staging_writes: Option<String>,
        /// How each chunk written into staging is checked, overriding the config's
        /// `staging_verify`: memory (hashed before it is written) or read-back (read back
        /// from the device after it is written, and hashed; costs a device read per chunk).
        #[arg(long, value_name = "HOW", value_parser = ["memory", "read-back"])]
        staging_verify: Option<String>,
    },
    /// Copy a dataset from one node to one or more targets, verified, committed atomically.
    #[command(
        after_help = "Examples:\n  mover send --cluster cluster.toml --from west1:mysql --to east1,east2,east3\n  mover send --cluster cluster.toml --from west1:mysql --to east1:restore --topology star --json\n\nExit status: 0 all committed, 1 not started, 3 partial, 4 none committed."
    )]
    Send(SendArgs),
    /// Measure how fast a reseed will go and what limits it, stage by stage on each host.
    ///
    /// Each stage on the host where it happens (source disk, encode, every link, each
    /// target's decode and disk), one real transfer of a sample, the bottleneck, and
    /// estimates for chain, star and serial copies.
    #[command(after_help = bench::HELP)]
    Bench(bench::BenchArgs),
    /// Rebuild a whole site from another: maintenance, routers offline, replicators reset,
    /// one chained transfer to every host of the site, everything back online. Journalled.
    #[command(
        name = "reseed-site",
        after_help = "Example:\n  mover reseed-site --cluster cluster.toml --from west --site east --dry-run\n  mover reseed-site --cluster cluster.toml --from west --site east --source west2\n\nA failed step stops the runbook and prints how to resume it; see `mover runbook`."
    )]
    ReseedSite(runbook::ReseedSiteArgs),
    /// Rebuild hosts from a source, tprovision-style, in one chained transfer. Journalled.
    #[command(after_help = runbook::PROVISION_HELP)]
    Provision(runbook::ProvisionArgs),
    /// List, show, resume, roll back or abandon runbooks (reseed-site, provision).
    #[command(
        after_help = "Examples:\n  mover runbook list\n  mover runbook show reseed-east-20261122-041502-ab3x\n  mover runbook resume reseed-east-20261122-041502-ab3x"
    )]
    Runbook {
        #[command(subcommand)]
        command: runbook::RunbookCommand,
    },
    /// Run a local example: a two-site cluster (six agents on loopback), east drifted from
    /// west, rebuilt with reseed-site, every east host checked against west1.
    #[command(after_help = "Example:\n  mover demo --size 128M\n  mover demo --keep")]
    Demo(demo::DemoArgs),
    /// Generate a sample data directory (as the demo does), for benchmarks and tests.
    #[command(hide = true)]
    Sample {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 4000)]
        small_files: u32,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write ca.pem/ca.key, NODE.pem/NODE.key for each node, and controller.pem/key.
    Init {
        /// Directory to write into (created; existing files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated node names (lowercase letters, digits, '-').
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
    },
}

#[derive(Args)]
pub(crate) struct SendArgs {
    /// Cluster file: the controller's certificate and every node's address.
    #[arg(long, value_name = "FILE")]
    cluster: PathBuf,
    /// Source as NODE:DATASET.
    #[arg(long, value_name = "NODE:DATASET")]
    from: String,
    /// Targets, comma-separated, as NODE or NODE:DATASET (the dataset defaults to the source's).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "NODE[:DATASET],..."
    )]
    to: Vec<String>,
    #[command(flatten)]
    tuning: Tuning,
    /// files (the data directory as it is), or xtrabackup / mariabackup (a backup made by the
    /// source's `backup` hook, prepared by each target's `prepare` hook before it commits).
    #[arg(long, default_value = "files", value_parser = parse_method)]
    method: Method,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::from_name(s).ok_or_else(|| format!("{s:?}: use files, xtrabackup or mariabackup"))
}

/// Transfer tuning shared by `send` and `demo`.
#[derive(Args, Clone)]
pub(crate) struct Tuning {
    /// chain (each target relays to the next), star (all from the source), or tree:K.
    #[arg(long, default_value = "chain")]
    topology: Topology,
    /// Chunk size, a power of two from 64K to 64M.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    chunk_size: u64,
    /// zstd per chunk: auto (level 1 for as long as the link, not the CPU, is what holds the
    /// transfer back, zstd's fast level when the CPU is nearly the limit, raw when it is;
    /// decided per chunk as it goes), off, or a level 1-19 for every chunk. Chunks that do not
    /// shrink go raw.
    #[arg(long, default_value = "auto", value_parser = parse_compress)]
    compress: Compress,
    /// Most bytes per second the source sends to each of its children, e.g. 100M (MiB/s) or
    /// 800mbit. Relays pass on what they get, so the whole chain keeps to it. No limit by
    /// default.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// QUIC connections per hop (default: one per core, at most 8).
    #[arg(long)]
    connections: Option<u8>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4M, 1G or 65536"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `--compress`: a zstd level (0 for off) and whether the source decides per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Compress {
    level: u8,
    auto: bool,
}

fn parse_compress(s: &str) -> Result<Compress, String> {
    match s {
        "auto" => Ok(Compress {
            level: 1,
            auto: true,
        }),
        "off" | "0" => Ok(Compress {
            level: 0,
            auto: false,
        }),
        _ => match s.parse::<u8>() {
            Ok(level @ 1..=19) => Ok(Compress { level, auto: false }),
            _ => Err(format!("{s:?}: use auto, off or a zstd level from 1 to 19")),
        },
    }
}

/// `--max-rate`: bytes per second, as a size (`100M`, `1G`, optionally ending in `/s`) or in
/// bits as `tc` writes them (`800mbit`, decimal).
fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let bad =
        || format!("{s:?} is not a rate like 100M (bytes per second) or 800mbit (bits per second)");
    let rate = if let Some(num) = t.strip_suffix("bit") {
        let split = num.find(|c: char| !c.is_ascii_digit()).unwrap_or(num.len());
        let (n, unit) = num.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let mult: u64 = match unit {
            "" => 1,
            "k" => 1_000,
            "m" => 1_000_000,
            "g" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).ok_or_else(bad)? / 8
    } else {
        parse_size(t.strip_suffix("/s").unwrap_or(&t)).map_err(|_| bad())?
    };
    if rate == 0 {
        return Err(format!(
            "{s:?}: a rate must be above zero (leave --max-rate out for none)"
        ));
    }
    Ok(rate)
}

fn parse_node_dataset(s: &str, default_dataset: Option<&str>) -> anyhow::Result<NodeDataset> {
    let (node, dataset) = match s.split_once(':') {
        Some((n, d)) => (n, d),
        None => match default_dataset {
            Some(d) => (s, d),
            None => bail!("{s:?} must be NODE:DATASET, for example west1:mysql"),
        },
    };
    mover::certs::validate_node_name(node).with_context(|| format!("in {s:?}"))?;
    validate_dataset_name(dataset).map_err(anyhow::Error::msg)?;
    Ok(NodeDataset {
        node: node.to_owned(),
        dataset: dataset.to_owned(),
    })
}

impl Tuning {
    /// Validates the flags into a request; the engine never sees clap types.
    fn request(
        &self,
        source: NodeDataset,
        targets: Vec<NodeDataset>,
    ) -> anyhow::Result<SendRequest> {
        let chunk_size = u32::try_from(self.chunk_size)
            .ok()
            .and_then(|c| mover_protocol::check_chunk_size(c).ok())
            .with_context(|| {
                format!(
                    "--chunk-size {} must be a power of two from 64K to 64M",
                    self.chunk_size
                )
            })?;
        let connections = match self.connections {
            Some(0) => bail!("--connections must be at least 1"),
            Some(n) if n > mover_protocol::MAX_CONNECTIONS => {
                bail!(
                    "--connections must be at most {}",
                    mover_protocol::MAX_CONNECTIONS
                )
            }
            Some(n) => n,
            None => mover::cores().clamp(1, 8) as u8,
        };
        let mut seen = std::collections::HashSet::new();
        for t in &targets {
            if !seen.insert(&t.node) {
                bail!("target {} is listed twice in --to", t.node);
            }
        }
        Ok(SendRequest {
            source,
            targets,
            topology: self.topology,
            chunk_size,
            compress: self.compress.level,
            compress_auto: self.compress.auto,
            connections,
            max_rate: self.max_rate.unwrap_or(0),
            method: Method::Files,
        })
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,mover=info",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Certs {
            command: CertsCommand::Init { out, nodes },
        } => {
            let files = mover::certs::init(&out, &nodes)?;
            for f in files {
                report::line(&f.display().to_string());
            }
            Ok(exit::OK)
        }
        Command::Agent {
            config,
            io,
            staging_writes,
            staging_verify,
        } => {
            let mut cfg = AgentConfig::load(&config)?;
            if let Some(io) = io {
                cfg.io = Some(io.parse().map_err(anyhow::Error::msg)?);
            }
            if let Some(w) = staging_writes {
                cfg.staging_writes = w.parse().map_err(anyhow::Error::msg)?;
            }
            if let Some(v) = staging_verify {
                cfg.staging_verify = v.parse().map_err(anyhow::Error::msg)?;
            }
            runtime()?.block_on(mover::agent::run(cfg, shutdown_signal()))?;
            Ok(exit::OK)
        }
        Command::Send(args) => {
            let cluster = runbook::load_cluster(&args.cluster)?;
            let source = parse_node_dataset(&args.from, None).context("--from")?;
            let targets = args
                .to
                .iter()
                .map(|t| parse_node_dataset(t, Some(&source.dataset)))
                .collect::<anyhow::Result<Vec<_>>>()
                .context("--to")?;
            let req = SendRequest {
                method: args.method,
                ..args.tuning.request(source, targets)?
            };
            let summary =
                runtime()?.block_on(report::send_with_progress(&cluster, &req, args.json))?;
            report::print_summary(&summary, args.json);
            Ok(report::exit_code(&summary))
        }
        Command::Bench(args) => bench::run(args),
        Command::ReseedSite(args) => runbook::reseed_site(args),
        Command::Provision(args) => runbook::provision(args),
        Command::Runbook { command } => runbook::runbook(command),
        Command::Demo(args) => demo::run(args),
        Command::Sample {
            out,
            size,
            small_files,
        } => {
            let n = mover::sample::generate(
                &out,
                mover::sample::SampleSpec {
                    size,
                    small_files,
                    ..Default::default()
                },
            )
            .with_context(|| format!("generate sample data in {}", out.display()))?;
            report::line(&format!("wrote {n} files to {}", out.display()));
            Ok(exit::OK)
        }
    }
}

/// An error and its causes, `: `-separated, leaving out a cause whose text the message before
/// it already ends with (many errors quote their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    mover::pool::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(exit::ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_bytes_or_as_tc_bits() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("100M/s"), Ok(100 << 20));
        assert_eq!(parse_rate("65536"), Ok(65536));
        assert_eq!(parse_rate("800mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("8kbit"), Ok(1000));
        for bad in ["0", "0mbit", "fast", "10 furlongs", "12xbit", ""] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn compress_is_auto_off_or_a_level() {
        assert_eq!(
            parse_compress("auto"),
            Ok(Compress {
                level: 1,
                auto: true
            })
        );
        assert_eq!(
            parse_compress("off"),
            Ok(Compress {
                level: 0,
                auto: false
            })
        );
        assert_eq!(
            parse_compress("7"),
            Ok(Compress {
                level: 7,
                auto: false
            })
        );
        assert!(parse_compress("20").is_err());
        assert!(parse_compress("fast").unwrap_err().contains("auto, off"));
    }
}
