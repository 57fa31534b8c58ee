//! The mover protocol: how a dataset travels from one agent to many, verified at every hop.
//!
//! This crate is sans-IO: message types, their codec, and the receiver's bookkeeping. It opens
//! no sockets or files and reads no clock; the `mover` crate drives it over QUIC.
//!
//! # Participants
//!
//! - The **controller** (the `mover` CLI) holds a certificate with the reserved name
//!   `mover-controller`. It dials the source agent and sends [`Message::Start`] with the
//!   [`Plan`]: every node, its address, its dataset, and its parent.
//! - The **source** agent scans its dataset into a [`Manifest`], dials its children in the plan
//!   and streams the manifest and the chunks to each.
//! - Each **target** agent receives into a staging area; if the plan gives it children it is
//!   also a **relay**: it forwards every frame exactly as received (no re-compression, no
//!   re-hash) while decoding and verifying its own copy.
//!
//! All peers authenticate with certificates from one cluster CA (mutual TLS, in QUIC); a node's
//! certificate names it, and a dialer checks that name.
//!
//! A transfer's [`Method`] says what is sent. `files`: the dataset's directory as it is.
//! `xtrabackup` or `mariabackup`: the source first runs its own `backup` hook into a fresh
//! directory and sends that; each target (and relay, for its own copy) runs its own `prepare`
//! hook on the verified copy in its staging area before it commits, and commits nothing if
//! that fails. Hooks are each agent's own configuration: the method names a tool, never a
//! command.
//!
//! # Grants
//!
//! Only the controller may start a transfer, and a target must be able to tell that it did
//! although it never talks to the controller. So `Start` carries a [`Grant`]: the controller's
//! certificate, an expiry, and the controller's signature over [`grant_bytes`] (the transfer's
//! id and parameters and the whole plan: nodes, addresses, datasets and parents). The source
//! copies the grant into every `Open`, relays forward it unchanged, and each target checks,
//! before it acts on an `Open`, that the certificate is the controller's under the cluster
//! CA, that the signature covers this `Open`, and that the grant has not expired; then that
//! the `Open` comes from a node above it in the plan: its parent, or an ancestor that links
//! past a parent that died (with the same plan and grant). This crate only carries grants and
//! defines the signed bytes; signing and verifying is the `mover` crate's.
//!
//! # Failures
//!
//! When a child's link fails, its parent dials it once more; if it cannot be reached, the
//! parent reports it failed and sends `Open` to the highest unreported nodes below it, which
//! replace their own receive of the transfer, say what they hold, get the rest of the main
//! pass on new data streams, and ask for what they missed with `Need`. The source counts any
//! target's answer since its last resend, so a node that joined late is never waited for by
//! round number.
//!
//! # Streams and messages
//!
//! Every stream carries frames: `kind u8, length u32, body` (big endian). A frame's length is
//! checked against a bound before its body is read: [`MAX_FRAME_LEN`] in general, the
//! transfer's chunk size plus a small header once it is known.
//!
//! Between a parent and a child there are `connections` QUIC connections. On the first one the
//! parent opens a bidirectional **control stream**:
//!
//! ```text
//! parent -> child: Open, ManifestPart*, ManifestEnd,            [Chunk* Repaired]*, End
//! child -> parent:        Have*, Ready, Progress*, Need+, ..., Need+, Report*
//! ```
//!
//! Upstream messages carry the node they are about and are relayed hop by hop; a child sends
//! its own and its subtree's. Before `Ready` every node of the subtree says with `Have` which
//! chunks it already holds (verified in an interrupted run's staging area, or found in an
//! older copy of the dataset), by hash, in increasing (file, offset) order over as many
//! messages as it takes (an entry out of that order is ignored: that chunk is then sent
//! anyway). Relays pass these lists up as they come and the source folds them into
//! [`have::HaveMerge`] rather than keeping them: one record per chunk in a [`table::Table`],
//! which agents keep in a file. After `Ready`, the parent opens one
//! unidirectional **data stream** per connection, each starting with `Attach { transfer_id }`
//! and followed by `Chunk` frames: the **main pass**. The source skips a chunk that every
//! target holds with the hash it reads.
//!
//! When a node's data streams have ended it reads its staging area back and sends `Need` for
//! round 0: the chunks it still lacks (never sent, lost with a link, or failed verification in
//! transit or on disk), possibly empty, the last part marked `done`. Once every target has
//! answered, the source resends the union of the needs as `Chunk` frames on the control
//! streams (relays pass them on, and each node takes what it lacks), then `Repaired { round }`,
//! after which each node sends its needs for the next round. When nobody needs anything (or
//! after [`message::MAX_ROUNDS`]) the source sends `End`: the chunk count and a digest over
//! every file's root hash, which each node checks before it commits. The source relays every
//! report, with its own `Sent`, on the controller's stream.
//!
//! # Hooks
//!
//! The controller also asks agents to act on their hosts' database services (stop a
//! replicator, start the database...) with [`Message::Hook`], first on a control stream of its
//! own. A hook names an abstract action (a configuration key such as `replicator_reset`, with a
//! backup tool for `prepare`), a site, and optionally a service and one of the agent's
//! datasets, plus the runbook and step it belongs to. It never carries a command line: the
//! agent renders the command from its own configuration, runs it only if that allows the
//! action, and answers with one [`Message::HookDone`]: the command, its exit status and the
//! tail of its output, or why it refused or could not start it. Only the controller's
//! certificate may send `Hook`. The agent runs a `(runbook, step)` once and records the result;
//! asked again, it answers with the record, marked `replayed`.
//!
//! ```text
//! controller -> agent: Hook
//! agent -> controller: HookDone
//! ```
//!
//! # Benchmarks
//!
//! `mover bench` asks agents to measure, each on its own host, the stages a transfer goes
//! through, with [`Message::Bench`] first on a control stream of the controller's own, answered
//! by one [`Message::BenchDone`] (see [`bench`]). Only the controller's certificate may send
//! `Bench`, and a probe names things (a dataset of the agent's config, a node and its address,
//! sizes bounded by [`bench::MAX_SAMPLE`] and [`bench::MAX_LINK_BYTES`]), never a command or a
//! path. The probes:
//!
//! - `Source`: read a sample of a dataset through the disk back end in chunk-size reads, then
//!   hash and compress it on one core and on all; optionally copy the sample into the agent's
//!   scratch dataset (`mover-bench`, under its state directory) for an end-to-end run.
//! - `Link`: the agent asked (upstream) dials the agent `to` (downstream) with its own node
//!   certificate and, on each of `connections` connections, sends [`Message::Sink`] and then
//!   raw incompressible bytes until its share of the byte bound or the time bound is reached;
//!   the downstream reads and discards them and answers [`Message::SinkDone`] with what
//!   arrived. `Sink` carries a [`Grant`] of the controller's over
//!   [`bench::link_grant_bytes`] (test id, both ends, byte bound, connections, expiry); the
//!   downstream checks it as a target checks an `Open`'s grant, checks that the peer's
//!   certificate names the grant's upstream and that it is the grant's downstream, takes each
//!   connection of a test once, and never reads past the stream's share of the bound.
//! - `Target`: write, fdatasync and remove a scratch file where the dataset's staging area
//!   goes, and decode (decompress and verify) the scratch dataset an end-to-end run left.
//! - `Reset`: remove the scratch dataset and any leftovers.
//!
//! The end-to-end measurement is an ordinary transfer (`Start`, `Open`...) of the sampled
//! copy, from the source's scratch dataset to each target's.
//!
//! ```text
//! controller -> agent:       Bench
//! agent -> controller:       BenchDone
//! upstream -> downstream:    Sink, raw bytes...     (per connection, Link probes only)
//! downstream -> upstream:    SinkDone
//! ```
//!
//! # Chunks and hashes
//!
//! Files are cut into chunks of `chunk_size` bytes (a power of two, 64 KiB..=64 MiB). A chunk
//! carries its raw length, its encoding (raw, or zstd when that is smaller), and a BLAKE3
//! value from which a receiver verifies the chunk and builds the file's root hash, equal to
//! `b3sum` of the file (see [`hash`]). Chunks arrive in any order on any data stream; a
//! [`Tracker`] refuses any that the manifest does not call for.
//!
//! # Versioning
//!
//! `Start`, `Open`, `Hook`, `Bench` and `Sink` carry [`PROTOCOL_VERSION`]; a peer that speaks another version
//! is refused with an error naming both. New message kinds get new numbers; unknown kinds are
//! errors, never ignored. Version 2 added `Have`, `Need` and `Repaired`; version 3 added the
//! grant to `Start` and `Open`; version 4 added `Hook` and `HookDone`; version 5 added the
//! method to `Start`, `Open` and the grant; version 6 added automatic compression and the
//! rate limit to `Start`, and `Bench`, `BenchDone`, `Sink` and `SinkDone`. The version is also
//! part of the signed grant bytes, so a grant made for one version is no good for another.

pub mod bench;
pub mod codec;
pub mod hash;
pub mod have;
pub mod manifest;
pub mod message;
pub mod plan;
pub mod receive;
pub mod table;

pub use codec::{DecodeError, FrameHeader, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use manifest::{Entry, EntryKind, Manifest, ManifestBuilder, ManifestError};
pub use message::{
    grant_bytes, Chunk, Encoding, Grant, Held, Hook, HookRan, HookReply, Message, Method, Open,
    Outcome, Start, PROTOCOL_VERSION,
};
pub use plan::{Plan, PlanNode, Topology};
pub use receive::{Admit, ChunkError, Tracker};

/// Smallest chunk: BLAKE3 subtrees need whole 1 KiB chunks; smaller would only add overhead.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk, which bounds every frame and every buffer.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Default chunk: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Most QUIC connections per hop.
pub const MAX_CONNECTIONS: u8 = 64;

/// Checks that a chunk size is a power of two within bounds.
pub fn check_chunk_size(size: u32) -> Result<u32, String> {
    if !size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(format!(
            "{size} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        ));
    }
    Ok(size)
}

/// The largest frame body for a transfer with this chunk size.
pub fn max_frame_len(chunk_size: u32) -> u32 {
    chunk_size.saturating_add(1024).max(manifest_frame_budget())
}

/// A manifest part may be as large as this whatever the chunk size.
pub const fn manifest_frame_budget() -> u32 {
    4 << 20
}
