//! Test harness: a cluster of real `mover agent` processes on loopback, and checks that two
//! trees are the same.

#![allow(dead_code)]

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use filetime::FileTime;

pub fn mover() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mover"))
}

/// Runs `mover` with `args` and returns its output (never panics on a non-zero exit).
pub fn run(args: &[&str]) -> Output {
    mover()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mover")
}

mod port;
pub use port::free_port;

/// Agents on loopback, one process per node, each with a `data` dataset at `dir/NODE/data`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<String>,
    agents: Vec<(String, Option<Child>)>,
    /// Where each node's agent listens.
    addrs: Vec<String>,
    /// Network namespaces, one per node, when the cluster runs in them.
    netns: Option<Netns>,
    /// Extra arguments for every `mover agent` started.
    agent_args: Vec<String>,
}

impl Cluster {
    /// Certificates, configs and running agents for `nodes`, on loopback.
    pub fn start(nodes: &[&str]) -> Self {
        let addrs = nodes
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        Self::start_with(nodes, addrs, None, &[])
    }

    /// The same, every agent started with the extra arguments `args` (`--io threads`).
    pub fn start_with_agent_args(nodes: &[&str], args: &[&str]) -> Self {
        let addrs = nodes
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        Self::start_with(nodes, addrs, None, args)
    }

    /// The same, each node in a network namespace of its own with its uplink limited to
    /// `rate` (`tc tbf`), all joined by a bridge. `None` (after saying SKIP loudly) when this
    /// process may not make namespaces.
    pub fn start_in_netns(nodes: &[&str], rate: &str) -> Option<Self> {
        let netns = Netns::create(nodes.len(), rate)?;
        let addrs = (0..nodes.len())
            .map(|i| format!("{}:7400", netns.addr(i)))
            .collect();
        Some(Self::start_with(nodes, addrs, Some(netns), &[]))
    }

    fn start_with(
        nodes: &[&str],
        addrs: Vec<String>,
        netns: Option<Netns>,
        agent_args: &[&str],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mover-e2e-")
            .tempdir()
            .expect("tempdir");
        let list = nodes.join(",");
        let out = run(&[
            "certs",
            "init",
            "--out",
            &dir.path().join("certs").to_string_lossy(),
            "--nodes",
            &list,
        ]);
        assert!(
            out.status.success(),
            "certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = String::from("[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/controller.pem\"\nkey = \"certs/controller.key\"\n");
        for (n, a) in nodes.iter().zip(&addrs) {
            cluster += &format!("[nodes.{n}]\naddress = \"{a}\"\n");
        }
        std::fs::write(dir.path().join("cluster.toml"), cluster).expect("write cluster");
        let mut c = Self {
            dir,
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            agents: Vec::new(),
            addrs,
            netns,
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        };
        for (i, node) in nodes.iter().enumerate() {
            c.write_agent_config(i, "certs");
            c.agents.push(((*node).to_owned(), None));
            c.start_agent(node);
        }
        c
    }

    /// `mover`, run in node `i`'s namespace when there are namespaces.
    fn mover_on(&self, i: usize) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name(i)])
                    .arg(env!("CARGO_BIN_EXE_mover"));
                c
            }
            None => mover(),
        }
    }

    /// Takes node `node`'s network link down (`up = false`) or brings it back.
    pub fn set_link(&self, node: &str, up: bool) {
        let ns = self.netns.as_ref().expect("a cluster in namespaces");
        let i = self.index(node);
        let st = Command::new("ip")
            .args(["-n", &ns.name(i), "link", "set", "eth0"])
            .arg(if up { "up" } else { "down" })
            .status()
            .expect("run ip");
        assert!(st.success(), "ip link set {node} {up}");
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `data` dataset's directory on `node`.
    pub fn data(&self, node: &str) -> PathBuf {
        self.path().join(node).join("data")
    }

    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.path().join(node).join("state")
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.path().join("cluster.toml")
    }

    fn index(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n == node)
            .expect("known node")
    }

    /// Writes NODE.toml using certificates from `certs_dir` (relative to the cluster dir).
    pub fn write_agent_config(&self, i: usize, certs_dir: &str) {
        let n = &self.nodes[i];
        std::fs::create_dir_all(self.path().join(n)).expect("mkdir");
        let cfg = format!(
            "node = \"{n}\"\nlisten = \"{}\"\nstate_dir = \"{n}/state\"\n[tls]\nca = \"{certs_dir}/ca.pem\"\ncert = \"{certs_dir}/{n}.pem\"\nkey = \"{certs_dir}/{n}.key\"\n[datasets.data]\npath = \"{n}/data\"\n[datasets.other]\npath = \"{n}/other\"\n",
            self.addrs[i]
        );
        std::fs::write(self.path().join(format!("{n}.toml")), cfg).expect("write agent config");
    }

    pub fn start_agent(&mut self, node: &str) {
        self.start_agent_with_env(node, &[]);
    }

    /// Starts a node's agent with extra environment variables (the test-only fault switches).
    pub fn start_agent_with_env(&mut self, node: &str, env: &[(&str, &str)]) {
        self.start_agent_with(node, &[], env);
    }

    /// Starts a node's agent with extra arguments (after the cluster's own agent arguments)
    /// and environment variables.
    pub fn start_agent_with(&mut self, node: &str, args: &[&str], env: &[(&str, &str)]) {
        let i = self.index(node);
        let log_path = self.path().join(format!("{node}.log"));
        let log = std::fs::File::create(&log_path).expect("log");
        let child = self
            .mover_on(i)
            .args(["agent", "--config"])
            .arg(self.path().join(format!("{node}.toml")))
            .args(&self.agent_args)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.agents[i].1 = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("agent listening") {
                return;
            }
            if let Some(Ok(Some(st))) = self.agents[i].1.as_mut().map(|c| c.try_wait()) {
                panic!("agent {node} exited at start ({st}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "agent {node} did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a node's agent is running.
    pub fn is_running(&mut self, node: &str) -> bool {
        let i = self.index(node);
        self.agents[i]
            .1
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `sig` to a node's agent and waits for it to exit.
    pub fn stop_agent(&mut self, node: &str, sig: i32) {
        let i = self.index(node);
        if let Some(mut c) = self.agents[i].1.take() {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc_kill(c.id() as i32, sig) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("agent {node} did not stop within 15 s of signal {sig}");
        }
    }

    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.path().join(format!("{node}.log"))).unwrap_or_default()
    }

    /// Starts `mover send --json` in the background (to act on the cluster while it runs).
    pub fn spawn_send(&self, from: &str, to: &str, extra: &[&str]) -> Child {
        self.mover_on(0)
            .arg("send")
            .arg("--cluster")
            .arg(self.cluster_file())
            .args(["--from", from, "--to", to, "--json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mover send")
    }

    /// Waits until `node` has a staging area, i.e. it has the manifest and data is coming.
    pub fn wait_for_staging(&self, node: &str) {
        let staging = self.state_dir(node).join("staging");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "{node} never started staging");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Counts the staging areas `node` holds (directories; not their records).
    pub fn staging_count(&self, node: &str) -> usize {
        std::fs::read_dir(self.state_dir(node).join("staging"))
            .map(|d| {
                d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Waits for a background send and returns its exit code and parsed summary.
    pub fn finish_send(child: Child) -> (Option<i32>, serde_json::Value) {
        let out = child.wait_with_output().expect("wait for mover send");
        let summary = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), summary)
    }

    /// Runs `mover send --json` and returns its exit code and parsed summary.
    pub fn send(&self, from: &str, to: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
        let cluster = self.cluster_file();
        let mut args = vec![
            "send",
            "--cluster",
            cluster.to_str().expect("utf-8 path"),
            "--from",
            from,
            "--to",
            to,
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = self.mover_on(0).args(&args).output().expect("run mover");
        let code = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (code, json, stderr)
    }
}

#[allow(unused_imports)]
pub use libc::{SIGKILL, SIGTERM};

unsafe fn libc_kill(pid: i32, sig: i32) {
    // SAFETY: the caller passes the pid of a child it has not reaped.
    unsafe { libc::kill(pid, sig) };
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            if let Some(c) = c {
                // SAFETY: kill(2) on our own child process.
                unsafe { libc_kill(c.id() as i32, SIGKILL) };
                let _ = c.wait();
            }
        }
        // Leave the directory for a post-mortem when a test failed.
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("kept test directory {}", kept.keep().display());
        }
    }
}

/// The target entry of a summary, by node.
pub fn target<'a>(summary: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    summary["targets"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["node"] == node))
        .unwrap_or_else(|| panic!("no target {node} in summary {summary}"))
}

/// Asserts that `dst` holds exactly `src`: contents (by BLAKE3, i.e. b3sum), sizes, modes,
/// mtimes, symlinks and empty directories, and that every file's b3sum root matches.
pub fn assert_same_tree(src: &Path, dst: &Path) {
    let diffs = mover::compare::compare_trees(src, dst).expect("compare trees");
    assert!(
        diffs.is_empty(),
        "{} differs from {}:\n{}",
        dst.display(),
        src.display(),
        diffs.join("\n")
    );
}

/// Builds a tree with everything a copy must preserve: large semi-compressible files, small
/// ones, empty files and directories, odd names, modes, nanosecond mtimes, and symlinks
/// (one pointing outside the tree, one dangling).
pub fn mixed_tree(root: &Path, size: u64) {
    let out = run(&[
        "sample",
        "--out",
        root.to_str().expect("utf-8"),
        "--size",
        &size.to_string(),
        "--small-files",
        "300",
    ]);
    assert!(
        out.status.success(),
        "sample: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let odd = root.join("odd names");
    std::fs::create_dir(&odd).expect("mkdir");
    std::fs::write(odd.join("with space.txt"), b"space").expect("write");
    std::fs::write(odd.join("new\nline"), b"newline").expect("write");
    std::fs::write(odd.join("caf\u{e9} \u{65e5}\u{672c}"), b"utf8").expect("write");
    use std::os::unix::ffi::OsStrExt;
    std::fs::write(
        odd.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9\xff")),
        b"bytes",
    )
    .expect("write");
    std::fs::write(odd.join("empty"), b"").expect("write");
    std::fs::create_dir_all(root.join("empty/dir/nested")).expect("mkdir");
    symlink("/etc/passwd", root.join("outside-link")).expect("symlink");
    symlink("../../nowhere", odd.join("dangling")).expect("symlink");
    symlink("odd names", root.join("dir-link")).expect("symlink");
    let secret = root.join("secret.key");
    std::fs::write(&secret, b"k").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let ro = root.join("readonly");
    std::fs::create_dir(&ro).expect("mkdir");
    std::fs::write(ro.join("f"), b"r").expect("write");
    std::fs::set_permissions(ro.join("f"), std::fs::Permissions::from_mode(0o444)).expect("chmod");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let t = FileTime::from_unix_time(1_600_000_000, 123_456_789);
    filetime::set_file_mtime(odd.join("with space.txt"), t).expect("mtime");
    filetime::set_file_mtime(&odd, t).expect("mtime");
    filetime::set_symlink_file_times(root.join("outside-link"), t, t).expect("mtime");
}

/// A tmpfs mounted for one test, unmounted on drop. `None` (after saying SKIP loudly) when this
/// process may not mount one.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: not root, cannot mount a tmpfs");
            return None;
        }
        std::fs::create_dir_all(at).ok()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(at.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "SKIP: mount tmpfs failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bytes of verified chunks listed in `node`'s record of its staging area for `data`.
pub fn recorded_bytes(c: &Cluster, node: &str) -> u64 {
    let bytes =
        std::fs::read(c.state_dir(node).join("staging").join("data.record")).unwrap_or_default();
    // Each record: path_len u16, path, file_size u64, offset u64, len u32, hash, check.
    let mut rest = &bytes[..];
    let mut total = 0;
    while rest.len() >= 2 {
        let plen = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let rec = 2 + plen + 8 + 8 + 4 + 32 + 4;
        if rest.len() < rec {
            break;
        }
        let len = &rest[2 + plen + 16..2 + plen + 20];
        total += u64::from(u32::from_be_bytes(len.try_into().expect("4 bytes")));
        rest = &rest[rec..];
    }
    total
}

/// Waits until `node` has verified at least `bytes` of chunks, and returns how much.
pub fn wait_recorded(c: &Cluster, node: &str, bytes: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = recorded_bytes(c, node);
        if n >= bytes {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{node} verified only {n} bytes in 120 s:\n{}",
            c.log(node)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A number from the summary's JSON.
pub fn num(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Network namespaces for one test: `mvt<pid>-<i>` per node with an `eth0` at
/// 198.18.<k>.<i+1>/24, joined by a bridge in `mvt<pid>-sw`, each uplink limited by `tc tbf`.
/// Deleted on drop.
pub struct Netns {
    prefix: String,
    subnet: u8,
    nodes: usize,
}

impl Netns {
    fn create(nodes: usize, rate: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: not root, cannot make network namespaces");
            return None;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            eprintln!("SKIP: no `ip` command (iproute2) to make network namespaces");
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = Self {
            prefix: format!("mvt{}-{k}", std::process::id()),
            subnet: 100 + k,
            nodes,
        };
        let sw = format!("{}-sw", ns.prefix);
        let ip = |args: &[&str]| -> bool {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let mut ok = ip(&["netns", "add", &sw])
            && ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])
            && ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for i in 0..nodes {
            if !ok {
                break;
            }
            let (name, host, peer) = (ns.name(i), format!("v{k}x{i}"), format!("v{k}x{i}p"));
            let addr = format!("{}/24", ns.addr(i));
            ok = ip(&["netns", "add", &name])
                && ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])
                && ip(&["link", "set", &host, "netns", &name])
                && ip(&["link", "set", &peer, "netns", &sw])
                && ip(&["-n", &sw, "link", "set", &peer, "master", "br0", "up"])
                && ip(&["-n", &name, "link", "set", "lo", "up"])
                && ip(&["-n", &name, "link", "set", &host, "name", "eth0"])
                && ip(&["-n", &name, "addr", "add", &addr, "dev", "eth0"])
                && ip(&["-n", &name, "link", "set", "eth0", "up"])
                && Command::new("ip")
                    .args(["netns", "exec", &name, "tc", "qdisc", "add", "dev", "eth0"])
                    .args([
                        "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms",
                    ])
                    .status()
                    .is_ok_and(|s| s.success());
        }
        if !ok {
            eprintln!("SKIP: could not set up network namespaces (see the ip errors above)");
            return None;
        }
        Some(ns)
    }

    fn name(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    fn addr(&self, i: usize) -> String {
        format!("198.18.{}.{}", self.subnet, i + 1)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("{}-sw", self.prefix)])
            .status();
    }
}
