//! The `mover` binary's behaviour at its edges: usage errors, bad files, exit codes.

#![allow(clippy::unwrap_used)]

mod common;

use common::run;

#[test]
fn usage_errors_exit_2_and_help_shows_examples() {
    let out = run(&["send", "--from", "west1:mysql"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["send", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Examples:") && help.contains("--topology"),
        "{help}"
    );
}

#[test]
fn bad_flags_and_files_exit_1_and_say_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let cluster = d.path().join("cluster.toml");
    std::fs::write(&cluster, "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[nodes.west1]\naddress = \"127.0.0.1:1\"\n").unwrap();
    let c = cluster.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["send", "--cluster", c, "--from", "west1", "--to", "east1"],
            "NODE:DATASET",
        ),
        (
            &["send", "--cluster", c, "--from", "west1:d", "--to", "east1"],
            "not in the cluster file",
        ),
        (
            &["send", "--cluster", c, "--from", "west1:d", "--to", "west1"],
            "both the source and a target",
        ),
        (
            &[
                "send",
                "--cluster",
                c,
                "--from",
                "west1:d",
                "--to",
                "east1",
                "--chunk-size",
                "3M",
            ],
            "power of two",
        ),
        (
            &[
                "send",
                "--cluster",
                "/nonexistent.toml",
                "--from",
                "west1:d",
                "--to",
                "east1",
            ],
            "/nonexistent.toml",
        ),
        (&["agent", "--config", c], "unknown field `nodes`"),
    ];
    for (args, needle) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
    }
}

#[test]
fn certs_init_writes_files_and_refuses_to_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let out_dir = d.path().join("certs");
    let o = out_dir.to_str().unwrap();
    let out = run(&["certs", "init", "--out", o, "--nodes", "west1,east1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "west1.pem",
        "west1.key",
        "east1.pem",
        "controller.pem",
        "controller.key",
    ] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    let out = run(&["certs", "init", "--out", o, "--nodes", "west1"]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["certs", "init", "--out", o, "--nodes", "Bad_Name"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn demo_runs_end_to_end() {
    let out = run(&["demo", "--size", "16M", "--small-files", "200"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for t in ["east1", "east2", "east3"] {
        assert!(
            stdout.contains(&format!("verified {t}: identical")),
            "{stdout}"
        );
    }
    // It ran the reseed-site runbook, and shows what each host's hooks were asked.
    assert!(stdout.contains("starting runbook reseed-east-"), "{stdout}");
    assert!(
        stdout.contains("[31/31] site east  policy automatic"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  east2  replicator_offline east | replicator_reset east | database_stop east2 | database_start east2 | replicator_online east"),
        "{stdout}"
    );
}
