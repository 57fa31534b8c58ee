//! `mover demo`: the whole data path on one machine, with nothing to set up.
//!
//! Generates certificates and a sample data directory in a temporary directory, starts four
//! agents (`mover agent`, as separate processes) on loopback, sends west1 -> east1 -> east2 ->
//! east3, checks every target against the source, and prints the summary.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use mover::config::ClusterConfig;
use mover::controller::NodeDataset;

use crate::report::{self, line};
use crate::{exit, parse_size, Tuning};

const NODES: [&str; 4] = ["west1", "east1", "east2", "east3"];

#[derive(Args)]
pub struct DemoArgs {
    /// Size of the generated data directory.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Number of small files in it.
    #[arg(long, default_value_t = 4000)]
    small_files: u32,
    /// Work in this directory (kept afterwards) instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the temporary directory (certificates, configs, data, agent logs).
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    tuning: Tuning,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Agents started by the demo; stopped (SIGTERM, then SIGKILL) when dropped.
struct Agents(Vec<(String, Child)>);

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, c) in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("find a free UDP port")?;
    Ok(s.local_addr()?.port())
}

fn write_configs(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut cluster = String::from(
        "# The controller's identity and every agent's address.\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/controller.pem\"\nkey = \"certs/controller.key\"\n",
    );
    for node in NODES {
        let port = free_udp_port()?;
        let agent = format!(
            "node = \"{node}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{node}/state\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{node}.pem\"\nkey = \"certs/{node}.key\"\n[datasets.mysql]\npath = \"{node}/mysql\"\n"
        );
        std::fs::create_dir_all(dir.join(node))?;
        std::fs::write(dir.join(format!("{node}.toml")), agent)?;
        let _ = write!(cluster, "[nodes.{node}]\naddress = \"127.0.0.1:{port}\"\n");
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, cluster)?;
    Ok(path)
}

fn start_agents(dir: &Path) -> anyhow::Result<Agents> {
    let exe = std::env::current_exe().context("find the mover executable")?;
    let mut agents = Agents(Vec::new());
    for node in NODES {
        let log = std::fs::File::create(dir.join(format!("{node}.log")))?;
        let child = Command::new(&exe)
            .arg("agent")
            .arg("--config")
            .arg(dir.join(format!("{node}.toml")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start agent {node}"))?;
        agents.0.push((node.to_owned(), child));
    }
    // Wait until each agent says it listens, or report its log.
    let deadline = Instant::now() + Duration::from_secs(20);
    for (node, child) in &mut agents.0 {
        let log = dir.join(format!("{node}.log"));
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("agent listening") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("agent {node} exited ({status}) at start:\n{text}");
            }
            if Instant::now() > deadline {
                bail!("agent {node} did not start within 20 s; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(agents)
}

pub fn run(args: DemoArgs) -> anyhow::Result<u8> {
    let (_temp, dir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("mover-demo-")
                .tempdir()
                .context("create a temporary directory")?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    let say = |s: &str| {
        if !args.json {
            line(s)
        }
    };
    say(&format!("demo directory: {}", dir.display()));
    let mut names: Vec<String> = NODES.iter().map(|s| s.to_string()).collect();
    names.sort();
    mover::certs::init(&dir.join("certs"), &names)?;
    let cluster_path = write_configs(&dir)?;
    let src = dir.join("west1/mysql");
    say(&format!(
        "generating a {} sample data directory in {} ...",
        report::human_bytes(args.size),
        src.display()
    ));
    let t = Instant::now();
    let files = mover::sample::generate(
        &src,
        mover::sample::SampleSpec {
            size: args.size,
            small_files: args.small_files,
            ..Default::default()
        },
    )
    .context("generate the sample data")?;
    say(&format!(
        "  {files} files in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    // Give east3 an older copy, as a drifted replica would have: it is replaced only on commit.
    std::fs::create_dir_all(dir.join("east3/mysql"))?;
    std::fs::write(
        dir.join("east3/mysql/stale.txt"),
        b"old data, replaced at commit\n",
    )?;

    say("starting agents west1, east1, east2, east3 on loopback ...");
    let agents = start_agents(&dir)?;
    let cluster = ClusterConfig::load(&cluster_path)?;
    let nd = |n: &str| NodeDataset {
        node: n.to_owned(),
        dataset: "mysql".to_owned(),
    };
    let req = args
        .tuning
        .request(nd("west1"), NODES[1..].iter().map(|n| nd(n)).collect())?;
    say(&format!(
        "sending west1:mysql -> {} ({})",
        NODES[1..].join(" -> "),
        req.topology
    ));
    let rt = crate::runtime()?;
    let summary = rt.block_on(report::send_with_progress(&cluster, &req, args.json))?;
    drop(agents);
    report::print_summary(&summary, args.json);

    let mut code = report::exit_code(&summary);
    for t in summary.targets.iter().filter(|t| t.result == "committed") {
        let dst = dir.join(&t.node).join("mysql");
        let diffs = mover::compare::compare_trees(&src, &dst)
            .with_context(|| format!("compare {} with the source", dst.display()))?;
        if diffs.is_empty() {
            say(&format!(
                "verified {}: identical to west1 (contents by b3sum, modes, mtimes, symlinks)",
                t.node
            ));
        } else {
            line(&format!(
                "MISMATCH {}: {} differences, first: {}",
                t.node,
                diffs.len(),
                diffs[0]
            ));
            code = exit::MISMATCH;
        }
    }
    if args.keep {
        if let Some(t) = _temp {
            let kept = t.keep();
            say(&format!("kept {}", kept.display()));
        }
    }
    Ok(code)
}
