//! `mover demo`: a two-site cluster on one machine, rebuilt with `mover reseed-site`.
//!
//! Generates certificates, an inventory and six agents' configs (west1..3, east1..3) in a
//! temporary directory, a sample data directory on west1, and drifted copies of it on east1
//! and east2 (east3 has none, like a host rebuilt from scratch). Every agent runs the
//! `custom` hook profile: each action is a small script that appends what it was asked to the
//! host's `actions.log`. Then it starts the agents (`mover agent`, as separate processes) on
//! loopback, runs the reseed-site runbook (east from west), checks every east host against
//! west1, and prints what each host was asked to do.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::report::{self, line};
use crate::{exit, parse_size};

const WEST: [&str; 3] = ["west1", "west2", "west3"];
const EAST: [&str; 3] = ["east1", "east2", "east3"];

#[derive(Args)]
pub struct DemoArgs {
    /// Size of the generated data directory.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    size: u64,
    /// Number of small files in it.
    #[arg(long, default_value_t = 4000)]
    small_files: u32,
    /// Work in this directory (kept afterwards) instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the temporary directory (certificates, configs, data, agent logs, journal).
    #[arg(long)]
    keep: bool,
    /// Write the cluster (certificates, configs, inventory, data) into --dir and stop,
    /// without starting agents: for tests and for trying the commands by hand.
    #[arg(long, hide = true, requires = "dir")]
    setup_only: bool,
    /// Print the runbook's events as JSON.
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

/// The hook script: appends its arguments to `actions.log` in its working directory (each
/// agent runs in its host's directory), as a real hook would change that host.
const RECORD: &str = "#!/bin/sh
# mover demo hook: records the action it was asked to run in this host's actions.log.
printf '%s\\n' \"$*\" >> actions.log
echo \"recorded: $*\"
";

/// `[hooks]` of the custom profile: every action runs the record script with its name and
/// values. The inventory shows the same commands in `--dry-run` that the agents run.
fn hooks_table(record: &Path) -> String {
    let r = record.display();
    let mut t = String::from("[hooks]\nprofile = \"custom\"\n[hooks.commands]\n");
    for (action, args) in [
        ("policy_maintenance", "\"{site}\""),
        ("policy_automatic", "\"{site}\""),
        ("routers_offline", "\"{site}\""),
        ("routers_online", "\"{site}\""),
        ("replicator_offline", "\"{service}\""),
        ("replicator_reset", "\"{service}\""),
        ("replicator_online", "\"{service}\""),
        ("mark_primary", "\"{service}\""),
        ("database_stop", "\"{host}\""),
        ("database_start", "\"{host}\""),
        ("prepare", "\"{staging}\""),
    ] {
        let _ = writeln!(t, "{action} = [\"{r}\", \"{action}\", {args}]");
    }
    t
}

/// Writes certificates, the inventory and the agents' configs; returns the inventory's path.
fn write_configs(dir: &Path) -> anyhow::Result<PathBuf> {
    let record = dir.join("bin/record");
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::write(&record, RECORD)?;
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o755))?;
    let hooks = hooks_table(&record);
    let mut names: Vec<String> = WEST.iter().chain(&EAST).map(|s| s.to_string()).collect();
    names.sort();
    mover::certs::init(&dir.join("certs"), &names)?;
    let mut cluster = String::from(
        "# A two-site active/active cluster on loopback: west holds the right data, east is
# rebuilt from it. Every host runs its site's replicator and one that applies the other
# site's writes.
database = \"mysql\"

[tls]
ca = \"certs/ca.pem\"
cert = \"certs/controller.pem\"
key = \"certs/controller.key\"

[sites.west]
replication = { west = \"west\", west_from_east = \"east\" }
[sites.east]
replication = { east = \"east\", east_from_west = \"west\" }

[datasets.mysql]
method = \"files\"

",
    );
    for node in WEST.iter().chain(&EAST) {
        let port = free_udp_port()?;
        let site = &node[..4];
        let role = if node.ends_with('1') {
            "primary"
        } else {
            "replica"
        };
        let agent = format!(
            "node = \"{node}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{node}/state\"\n\
             [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{node}.pem\"\nkey = \"certs/{node}.key\"\n\
             [datasets.mysql]\npath = \"{node}/mysql\"\n{hooks}"
        );
        std::fs::create_dir_all(dir.join(node))?;
        std::fs::write(dir.join(format!("{node}.toml")), agent)?;
        let _ = write!(
            cluster,
            "[nodes.{node}]\naddress = \"127.0.0.1:{port}\"\nsite = \"{site}\"\nrole = \"{role}\"\n"
        );
    }
    cluster.push('\n');
    cluster.push_str(&hooks);
    let path = dir.join("cluster.toml");
    std::fs::write(&path, cluster)?;
    Ok(path)
}

/// Copies a tree of directories, files and symlinks (copied as links), as the sample has.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            copy_tree(&src, &dst)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// The largest regular file under `dir` (symlinks are not followed).
fn largest_file(dir: &Path) -> std::io::Result<Option<(PathBuf, u64)>> {
    let mut best: Option<(PathBuf, u64)> = None;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        let found = if t.is_dir() {
            largest_file(&e.path())?
        } else if t.is_file() {
            Some((e.path(), e.metadata()?.len()))
        } else {
            None
        };
        if let Some((p, n)) = found {
            if best.as_ref().is_none_or(|b| n > b.1) {
                best = Some((p, n));
            }
        }
    }
    Ok(best)
}

/// A replica that drifted: a few pages of its largest file differ, a file is gone, one is
/// extra.
fn drift(dir: &Path, seed: u8) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    if let Some((big, len)) = largest_file(dir)? {
        let f = std::fs::OpenOptions::new().write(true).open(&big)?;
        for k in 0..3u64 {
            f.write_all_at(&[seed; 16384], (len / 4) * (k + 1) % len.max(1))?;
        }
    }
    std::fs::write(dir.join("drifted-extra.ibd"), vec![seed; 100_000])?;
    Ok(())
}

/// Everything but the agents: certificates, configs, inventory, west1's data, east's drift.
fn setup(dir: &Path, args: &DemoArgs, say: &dyn Fn(&str)) -> anyhow::Result<PathBuf> {
    let cluster = write_configs(dir)?;
    let src = dir.join("west1/mysql");
    say(&format!(
        "generating a {} sample data directory on west1 ...",
        report::human_bytes(args.size)
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
        "  {files} files in {:.1} s; east1 and east2 get drifted copies, east3 none",
        t.elapsed().as_secs_f64()
    ));
    for (i, node) in ["east1", "east2"].iter().enumerate() {
        let dst = dir.join(node).join("mysql");
        copy_tree(&src, &dst).with_context(|| format!("copy west1's data to {node}"))?;
        drift(&dst, 0xa0 + i as u8)?;
    }
    Ok(cluster)
}

/// Starts every agent in its host's directory (where its hooks record).
fn start_agents(dir: &Path) -> anyhow::Result<Agents> {
    let exe = std::env::current_exe().context("find the mover executable")?;
    let mut agents = Agents(Vec::new());
    for node in WEST.iter().chain(&EAST) {
        let log = std::fs::File::create(dir.join(format!("{node}.log")))?;
        let child = Command::new(&exe)
            .arg("agent")
            .arg("--config")
            .arg(dir.join(format!("{node}.toml")))
            .current_dir(dir.join(node))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start agent {node}"))?;
        agents.0.push((node.to_string(), child));
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
    let (temp, dir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, std::fs::canonicalize(d)?)
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
    let json = args.json;
    let say = |s: &str| {
        if !json {
            line(s)
        }
    };
    say(&format!("demo directory: {}", dir.display()));
    let cluster = setup(&dir, &args, &say)?;
    if args.setup_only {
        return Ok(exit::OK);
    }
    say("starting agents west1..3 and east1..3 on loopback ...");
    let agents = start_agents(&dir)?;
    let state = dir.join("controller");
    say(&format!(
        "$ mover reseed-site --cluster {} --from west --site east --state-dir {}",
        cluster.display(),
        state.display()
    ));
    let common = crate::runbook::Common {
        state_dir: Some(state),
        json,
    };
    let op = mover::orchestrate::Operation::ReseedSite {
        from_site: "west".into(),
        site: "east".into(),
        source: None,
    };
    let mut code = crate::runbook::start(op, &cluster, false, &common, Default::default())?;
    drop(agents);

    let src = dir.join("west1/mysql");
    for node in EAST {
        let dst = dir.join(node).join("mysql");
        let diffs = mover::compare::compare_trees(&src, &dst)
            .with_context(|| format!("compare {} with west1's", dst.display()))?;
        if diffs.is_empty() {
            say(&format!(
                "verified {node}: identical to west1 (contents by b3sum, modes, mtimes, symlinks)"
            ));
        } else {
            line(&format!(
                "MISMATCH {node}: {} differences, first: {}",
                diffs.len(),
                diffs[0]
            ));
            code = exit::MISMATCH;
        }
    }
    say("what each host's hooks were asked to do, in order (its actions.log):");
    for node in WEST.iter().chain(&EAST) {
        let log = std::fs::read_to_string(dir.join(node).join("actions.log")).unwrap_or_default();
        let actions: Vec<&str> = log.lines().collect();
        say(&format!("  {node:<6} {}", actions.join(" | ")));
    }
    if args.keep {
        if let Some(t) = temp {
            let kept = t.keep();
            say(&format!("kept {}", kept.display()));
        }
    }
    Ok(code)
}
