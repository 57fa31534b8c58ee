//! Writes seed inputs for the fuzz targets, encoded by the crate itself so that they stay in
//! step with the wire format: `cargo run --example seeds` (from `fuzz/`).

use std::fs;
use std::path::Path;

use mover_protocol::{
    Chunk, Encoding, Entry, EntryKind, Grant, Hook, HookRan, HookReply, Message, Method, Open,
    Outcome, Plan, PlanNode, Start, Topology,
};

fn node(name: &str) -> PlanNode {
    PlanNode {
        name: name.into(),
        address: format!("{name}.example:4433"),
        dataset: "pg".into(),
        parent: None,
    }
}

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o755,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
    }
}

fn main() -> std::io::Result<()> {
    let plan = |topology| {
        Plan::build(node("src"), vec![node("a"), node("b"), node("c")], topology)
            .expect("valid plan")
    };
    let payload = b"hello hello hello hello".to_vec();
    // Decoding does not judge a grant; any bytes within the bounds will do as a seed.
    let grant = Grant {
        controller_cert: vec![0x30; 400],
        not_after_unix: 1_700_086_400,
        signature: vec![0x30; 71],
    };
    let frames = [
        Message::Start(Start {
            transfer_id: 7,
            chunk_size: 4 << 20,
            compress: 1,
            connections: 4,
            method: Method::Xtrabackup,
            plan: plan(Topology::Chain),
            grant: grant.clone(),
        }),
        Message::Open(Open {
            transfer_id: 7,
            chunk_size: 1 << 16,
            connections: 1,
            method: Method::Files,
            plan: plan(Topology::Tree(2)),
            grant,
        }),
        Message::Ready,
        Message::Attach { transfer_id: 7 },
        Message::ManifestEnd {
            entries: 3,
            total_bytes: 10,
        },
        Message::Chunk(Chunk {
            file: 2,
            offset: 0,
            raw_len: payload.len() as u32,
            encoding: Encoding::Raw,
            hash: [1; 32],
            payload: payload.clone().into(),
        }),
        Message::Chunk(Chunk {
            file: 2,
            offset: 1 << 16,
            raw_len: 1 << 16,
            encoding: Encoding::Zstd,
            hash: [2; 32],
            payload: payload.into(),
        }),
        Message::End {
            chunks: 1,
            digest: [3; 32],
        },
        Message::Progress {
            node: "a".into(),
            bytes: 10,
            files: 1,
        },
        Message::Report {
            node: "a".into(),
            outcome: Outcome::Committed {
                bytes: 10,
                files: 1,
                elapsed_ms: 3,
                digest: [4; 32],
                held: 0,
                repaired: 0,
            },
        },
        Message::Report {
            node: "b".into(),
            outcome: Outcome::Failed {
                reason: "disk full".into(),
                retryable: true,
            },
        },
        Message::Sent {
            bytes: 10,
            wire_bytes: 8,
            chunks: 1,
            files: 1,
            skipped: 0,
            resent: 0,
        },
        Message::Have {
            node: "east1".into(),
            chunks: vec![mover_protocol::Held {
                file: 1,
                offset: 0,
                hash: [5; 32],
            }],
        },
        Message::Need {
            node: "east1".into(),
            round: 1,
            done: true,
            chunks: vec![(1, 0), (2, 65536)],
        },
        Message::Repaired { round: 1 },
        Message::Hook(Hook {
            runbook: "reseed-east-1".into(),
            step: 4,
            action: "replicator_reset".into(),
            tool: None,
            service: Some("east_from_west".into()),
            site: "east".into(),
            dataset: None,
        }),
        Message::Hook(Hook {
            runbook: "reseed-east-1".into(),
            step: 9,
            action: "prepare".into(),
            tool: Some("mariabackup".into()),
            service: None,
            site: "east".into(),
            dataset: Some("mysql".into()),
        }),
        Message::HookDone {
            node: "east1".into(),
            reply: HookReply::Ran(HookRan {
                command: "trepctl -service east_from_west reset -all -y".into(),
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                output: "ok\n".into(),
                elapsed_ms: 250,
                replayed: false,
            }),
        },
        Message::HookDone {
            node: "east1".into(),
            reply: HookReply::Ran(HookRan {
                command: "sudo -n systemctl start mysqld".into(),
                exit_code: None,
                signal: Some(9),
                timed_out: true,
                output: "starting\n".into(),
                elapsed_ms: 600_000,
                replayed: true,
            }),
        },
        Message::HookDone {
            node: "east1".into(),
            reply: HookReply::Refused {
                reason: "the agent config of east1 does not allow database_stop".into(),
            },
        },
        Message::HookDone {
            node: "east1".into(),
            reply: HookReply::NotStarted {
                command: "cctrl -multi".into(),
                reason: "cctrl: no such program".into(),
            },
        },
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    fs::create_dir_all(dir.join("frame"))?;
    fs::create_dir_all(dir.join("manifest"))?;
    for (i, m) in frames.iter().enumerate() {
        let name = m.name().replace(' ', "-");
        fs::write(
            dir.join("frame").join(format!("{i:02}-{name}")),
            m.to_frame(),
        )?;
    }

    let tree = [
        entry("", EntryKind::Dir),
        entry("base", EntryKind::Dir),
        entry("base/1", EntryKind::Dir),
        entry("base/1/PG_VERSION", EntryKind::File { size: 3 }),
        entry(
            "pg_wal",
            EntryKind::Symlink {
                target: b"/var/wal".to_vec(),
            },
        ),
        entry("postgresql.conf", EntryKind::File { size: 7 }),
    ];
    let (first, second) = tree.split_at(3);
    let mut two_parts = Vec::new();
    Message::ManifestPart(first.to_vec()).encode(&mut two_parts);
    Message::ManifestPart(second.to_vec()).encode(&mut two_parts);
    Message::ManifestEnd {
        entries: 6,
        total_bytes: 10,
    }
    .encode(&mut two_parts);
    fs::write(dir.join("manifest").join("two-parts"), &two_parts)?;

    let mut root_only = Vec::new();
    Message::ManifestPart(tree[..1].to_vec()).encode(&mut root_only);
    Message::ManifestEnd {
        entries: 1,
        total_bytes: 0,
    }
    .encode(&mut root_only);
    fs::write(dir.join("manifest").join("root-only"), &root_only)?;
    Ok(())
}
