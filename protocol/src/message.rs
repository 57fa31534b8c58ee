//! The messages of the protocol and their encoding.

use bytes::{Buf, BufMut, Bytes};

use crate::bench::{Bench, BenchReply, Sink};
use crate::codec::{
    get_bytes16, get_hash, get_payload, get_string, get_string32, get_u16, get_u32, get_u64,
    get_u8, put_bytes16, put_bytes32, DecodeError, FrameHeader, FRAME_HEADER_LEN,
};
use crate::manifest::Entry;
use crate::plan::{Plan, MAX_NAME};

/// The protocol version this build speaks. Start and Open carry it; a mismatch is refused.
pub const PROTOCOL_VERSION: u16 = 6;
/// Longest failure reason carried in a report.
pub const MAX_REASON: usize = 4096;
/// Most entries in one manifest part (parts also respect the frame length bound).
pub const MAX_PART_ENTRIES: u32 = 65_536;
/// Most chunks named in one `Have` or `Need` message; longer lists take several messages.
pub const MAX_LIST_ENTRIES: u32 = 65_536;
/// Most repair rounds a transfer may run.
pub const MAX_ROUNDS: u32 = 16;
/// Longest controller certificate (DER) a grant may carry; ours are well under 1 KiB.
pub const MAX_GRANT_CERT: usize = 16 << 10;
/// Longest grant signature; an ECDSA P-256 signature in DER is at most 72 bytes.
pub const MAX_GRANT_SIGNATURE: usize = 512;
/// What every signed grant starts with, so that no other signature by the controller's key
/// (a TLS handshake's, say) can pass for a grant, nor a grant for anything else.
pub const GRANT_DOMAIN: &[u8] = b"mover grant v1\0";
/// Longest action key or backup tool name in a `Hook`.
pub const MAX_ACTION: usize = 32;
/// Longest command line in a hook's answer.
pub const MAX_HOOK_COMMAND: usize = 16 << 10;
/// Most output in a hook's answer: the last 64 KiB of what the command wrote.
pub const MAX_HOOK_OUTPUT: usize = 64 << 10;

/// How a chunk's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    Zstd,
}

/// How the source makes what it sends, and what each target does with its copy before it
/// commits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// The dataset's directory as it is (stopped, or a snapshot).
    #[default]
    Files,
    /// A backup that the source's `backup` hook makes with xtrabackup into a directory of its
    /// own, which is sent; each target runs its `prepare` hook on its copy before it commits.
    Xtrabackup,
    /// As `Xtrabackup`, with mariabackup.
    Mariabackup,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Files, Method::Xtrabackup, Method::Mariabackup];

    pub fn name(self) -> &'static str {
        match self {
            Method::Files => "files",
            Method::Xtrabackup => "xtrabackup",
            Method::Mariabackup => "mariabackup",
        }
    }

    fn code(self) -> u8 {
        match self {
            Method::Files => 0,
            Method::Xtrabackup => 1,
            Method::Mariabackup => 2,
        }
    }

    fn decode(body: &mut impl Buf) -> Result<Self, DecodeError> {
        match get_u8(body, "method")? {
            0 => Ok(Method::Files),
            1 => Ok(Method::Xtrabackup),
            2 => Ok(Method::Mariabackup),
            m => Err(DecodeError::Invalid {
                what: "method",
                why: format!("unknown method {m}"),
            }),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Controller -> source: start a transfer of `dataset` along `plan`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub transfer_id: u64,
    pub chunk_size: u32,
    /// zstd level 1..=19, or 0 for no compression.
    pub compress: u8,
    /// Compress a chunk only while the link is what holds the data stream back (the source
    /// decides per chunk, as it goes); otherwise every chunk at `compress`.
    pub compress_auto: bool,
    /// QUIC connections per hop.
    pub connections: u8,
    /// Most bytes per second the source sends (to each child), or 0 for no limit.
    pub max_rate: u64,
    pub method: Method,
    pub plan: Plan,
    /// The controller's signature of this transfer, which the source copies into `Open`.
    pub grant: Grant,
}

impl Start {
    /// The bytes `grant` signs; see [`grant_bytes`].
    pub fn grant_bytes(&self) -> Vec<u8> {
        grant_bytes(
            self.transfer_id,
            self.chunk_size,
            self.connections,
            self.method,
            self.grant.not_after_unix,
            &self.plan,
        )
    }
}

/// Parent -> child: a transfer is coming; prepare to receive (and to forward to your children).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub transfer_id: u64,
    pub chunk_size: u32,
    pub connections: u8,
    pub method: Method,
    pub plan: Plan,
    /// The controller's signature of this transfer, as it came in `Start`; a target checks it
    /// before it acts on the `Open`.
    pub grant: Grant,
}

impl Open {
    /// The bytes `grant` must sign for this `Open` to be acted on; see [`grant_bytes`].
    pub fn grant_bytes(&self) -> Vec<u8> {
        grant_bytes(
            self.transfer_id,
            self.chunk_size,
            self.connections,
            self.method,
            self.grant.not_after_unix,
            &self.plan,
        )
    }
}

/// The controller's authorization of one transfer: its certificate, and its signature over
/// [`grant_bytes`] of the transfer, valid until `not_after_unix` (seconds since the Unix
/// epoch). This crate only carries it; the `mover` crate signs and verifies it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grant {
    /// The controller's certificate (DER), which names `mover-controller`.
    pub controller_cert: Vec<u8>,
    pub not_after_unix: u64,
    pub signature: Vec<u8>,
}

impl Grant {
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        put_bytes16(buf, &self.controller_cert);
        buf.put_u64(self.not_after_unix);
        put_bytes16(buf, &self.signature);
    }

    pub(crate) fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        Ok(Self {
            controller_cert: get_bytes16(buf, MAX_GRANT_CERT, "grant certificate")?,
            not_after_unix: get_u64(buf, "grant expiry")?,
            signature: get_bytes16(buf, MAX_GRANT_SIGNATURE, "grant signature")?,
        })
    }
}

/// The exact bytes a grant signs: [`GRANT_DOMAIN`], the protocol version, the transfer's
/// parameters (the method among them), the expiry, and every node of the plan (name, address, dataset and parent, in
/// plan order, so node 0 is the source), each string length-prefixed.
///
/// The whole tree is signed. A relay that links past a dead node sends the same plan, and a
/// target accepts an `Open` from any node above it in that tree (its parent, or an ancestor
/// taking over for a parent that died), never from a node beside or below it.
pub fn grant_bytes(
    transfer_id: u64,
    chunk_size: u32,
    connections: u8,
    method: Method,
    not_after_unix: u64,
    plan: &Plan,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + plan.nodes().len() * 48);
    buf.put_slice(GRANT_DOMAIN);
    buf.put_u16(PROTOCOL_VERSION);
    buf.put_u64(transfer_id);
    buf.put_u32(chunk_size);
    buf.put_u8(connections);
    buf.put_u8(method.code());
    buf.put_u64(not_after_unix);
    buf.put_u16(plan.nodes().len() as u16);
    for n in plan.nodes() {
        put_bytes16(&mut buf, n.name.as_bytes());
        put_bytes16(&mut buf, n.address.as_bytes());
        put_bytes16(&mut buf, n.dataset.as_bytes());
        buf.put_u16(n.parent.unwrap_or(u16::MAX));
    }
    buf
}

/// Controller -> agent: run the agent's own command for one hook action, as step `step` of
/// runbook `runbook`. It names things only; the agent renders the command line from its own
/// configuration and runs it only if that allows the action. A `(runbook, step)` runs at most
/// once: asked again, the agent answers with what it recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub runbook: String,
    pub step: u32,
    /// The action's configuration key (`replicator_reset`, `prepare`, ...).
    pub action: String,
    /// The backup tool (`xtrabackup`, `mariabackup`), for the actions that need one.
    pub tool: Option<String>,
    /// The replication or data service the action addresses, if any.
    pub service: Option<String>,
    pub site: String,
    /// One of the agent's datasets, for actions on its directory or staging area.
    pub dataset: Option<String>,
}

/// A hook command that ran, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRan {
    /// The command line as the agent rendered it, for people.
    pub command: String,
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// It ran past the agent's timeout and was killed.
    pub timed_out: bool,
    /// Its standard output and error, interleaved: the last [`MAX_HOOK_OUTPUT`] bytes.
    pub output: String,
    pub elapsed_ms: u64,
    /// It ran earlier, and this is the recorded result: nothing ran now.
    pub replayed: bool,
}

/// Agent -> controller: what became of a `Hook`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookReply {
    Ran(HookRan),
    /// The agent will not run it (not configured, not allowed, a bad value); nothing ran.
    Refused {
        reason: String,
    },
    /// The command could not be started (no such program, say); nothing ran.
    NotStarted {
        command: String,
        reason: String,
    },
}

/// A chunk of file data. `hash` is [`crate::hash::chunk_hash`] of the raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub file: u32,
    pub offset: u64,
    pub raw_len: u32,
    pub encoding: Encoding,
    pub hash: [u8; 32],
    pub payload: Bytes,
}

/// A chunk a receiver already holds in its staging area, with the hash of its bytes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub file: u32,
    pub offset: u64,
    pub hash: [u8; 32],
}

/// How a target's part of a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed {
        bytes: u64,
        files: u64,
        elapsed_ms: u64,
        digest: [u8; 32],
        /// Bytes that were already here (an interrupted run, an older copy) and were kept.
        held: u64,
        /// Chunks fetched again after failing verification (in transit or on disk).
        repaired: u64,
    },
    Failed {
        reason: String,
        retryable: bool,
    },
}

/// Every message. Frames carry one each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Start(Start),
    Open(Open),
    /// Child -> parent: staging is ready, send data.
    Ready,
    /// First frame of every data stream: which transfer it belongs to.
    Attach {
        transfer_id: u64,
    },
    ManifestPart(Vec<Entry>),
    ManifestEnd {
        entries: u64,
        total_bytes: u64,
    },
    Chunk(Chunk),
    /// Parent -> child: every chunk has been sent; `digest` is [`crate::hash::tree_digest`].
    End {
        chunks: u64,
        digest: [u8; 32],
    },
    /// Upstream: a target's progress, relayed hop by hop to the controller.
    Progress {
        node: String,
        bytes: u64,
        files: u64,
    },
    /// Upstream: a target's final outcome.
    Report {
        node: String,
        outcome: Outcome,
    },
    /// Source -> controller: everything was read and sent.
    Sent {
        bytes: u64,
        wire_bytes: u64,
        chunks: u64,
        files: u64,
        /// Bytes not sent because every target already held them.
        skipped: u64,
        /// Chunks sent again in repair rounds.
        resent: u64,
    },
    /// Upstream, before `Ready`: chunks `node` already holds (from an interrupted run, or an
    /// older copy of the dataset), in increasing (file, offset) order across all of the
    /// node's `Have` messages. The source does not send a chunk that every target holds with
    /// the hash it reads.
    Have {
        node: String,
        chunks: Vec<Held>,
    },
    /// Upstream, after each round of data: the chunks `node` still lacks (never arrived, or
    /// failed verification). `done` marks the last `Need` of the round; an empty list with
    /// `done` means the node has everything.
    Need {
        node: String,
        round: u32,
        done: bool,
        chunks: Vec<(u32, u64)>,
    },
    /// Downstream on the control stream: every chunk resent for the needs of `round` has been
    /// sent; report the needs of `round + 1`.
    Repaired {
        round: u32,
    },
    /// Controller -> agent, first on a control stream of its own.
    Hook(Hook),
    /// Agent -> controller: the answer to `Hook`, from `node`.
    HookDone {
        node: String,
        reply: HookReply,
    },
    /// Controller -> agent, first on a control stream of its own: measure one stage of a
    /// transfer on this host (`mover bench`; see [`crate::bench`]).
    Bench(Bench),
    /// Agent -> controller: the answer to `Bench`, from `node`.
    BenchDone {
        node: String,
        reply: BenchReply,
    },
    /// Upstream -> downstream, first on a stream of a link probe; raw bytes follow.
    Sink(Sink),
    /// Downstream -> upstream: the stream ended; `bytes` arrived over `micros`.
    SinkDone {
        node: String,
        bytes: u64,
        micros: u64,
    },
}

mod kind {
    pub const START: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const READY: u8 = 3;
    pub const ATTACH: u8 = 4;
    pub const MANIFEST_PART: u8 = 5;
    pub const MANIFEST_END: u8 = 6;
    pub const CHUNK: u8 = 7;
    pub const END: u8 = 8;
    pub const PROGRESS: u8 = 9;
    pub const REPORT: u8 = 10;
    pub const SENT: u8 = 11;
    pub const HAVE: u8 = 12;
    pub const NEED: u8 = 13;
    pub const REPAIRED: u8 = 14;
    pub const HOOK: u8 = 15;
    pub const HOOK_DONE: u8 = 16;
    pub const BENCH: u8 = 17;
    pub const BENCH_DONE: u8 = 18;
    pub const SINK: u8 = 19;
    pub const SINK_DONE: u8 = 20;
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Self::Start(_) => kind::START,
            Self::Open(_) => kind::OPEN,
            Self::Ready => kind::READY,
            Self::Attach { .. } => kind::ATTACH,
            Self::ManifestPart(_) => kind::MANIFEST_PART,
            Self::ManifestEnd { .. } => kind::MANIFEST_END,
            Self::Chunk(_) => kind::CHUNK,
            Self::End { .. } => kind::END,
            Self::Progress { .. } => kind::PROGRESS,
            Self::Report { .. } => kind::REPORT,
            Self::Sent { .. } => kind::SENT,
            Self::Have { .. } => kind::HAVE,
            Self::Need { .. } => kind::NEED,
            Self::Repaired { .. } => kind::REPAIRED,
            Self::Hook(_) => kind::HOOK,
            Self::HookDone { .. } => kind::HOOK_DONE,
            Self::Bench(_) => kind::BENCH,
            Self::BenchDone { .. } => kind::BENCH_DONE,
            Self::Sink(_) => kind::SINK,
            Self::SinkDone { .. } => kind::SINK_DONE,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Start(_) => "start",
            Self::Open(_) => "open",
            Self::Ready => "ready",
            Self::Attach { .. } => "attach",
            Self::ManifestPart(_) => "manifest part",
            Self::ManifestEnd { .. } => "manifest end",
            Self::Chunk(_) => "chunk",
            Self::End { .. } => "end",
            Self::Progress { .. } => "progress",
            Self::Report { .. } => "report",
            Self::Sent { .. } => "sent",
            Self::Have { .. } => "have",
            Self::Need { .. } => "need",
            Self::Repaired { .. } => "repaired",
            Self::Hook(_) => "hook",
            Self::HookDone { .. } => "hook done",
            Self::Bench(_) => "bench",
            Self::BenchDone { .. } => "bench done",
            Self::Sink(_) => "sink",
            Self::SinkDone { .. } => "sink done",
        }
    }

    /// Appends the whole frame (header and body) to `buf`.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        let start = buf.len();
        FrameHeader { kind: 0, len: 0 }.encode(buf);
        self.encode_body(buf);
        let len = (buf.len() - start - FRAME_HEADER_LEN) as u32;
        buf[start] = self.kind();
        buf[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// The whole frame as one buffer.
    pub fn to_frame(&self) -> Bytes {
        let mut v = Vec::with_capacity(64);
        self.encode(&mut v);
        v.into()
    }

    fn encode_body(&self, buf: &mut impl BufMut) {
        match self {
            Self::Start(s) => {
                buf.put_u16(PROTOCOL_VERSION);
                buf.put_u64(s.transfer_id);
                buf.put_u32(s.chunk_size);
                buf.put_u8(s.compress);
                buf.put_u8(u8::from(s.compress_auto));
                buf.put_u8(s.connections);
                buf.put_u64(s.max_rate);
                buf.put_u8(s.method.code());
                s.plan.encode(buf);
                s.grant.encode(buf);
            }
            Self::Open(o) => {
                buf.put_u16(PROTOCOL_VERSION);
                buf.put_u64(o.transfer_id);
                buf.put_u32(o.chunk_size);
                buf.put_u8(o.connections);
                buf.put_u8(o.method.code());
                o.plan.encode(buf);
                o.grant.encode(buf);
            }
            Self::Ready => {}
            Self::Attach { transfer_id } => buf.put_u64(*transfer_id),
            Self::ManifestPart(entries) => {
                buf.put_u32(entries.len() as u32);
                for e in entries {
                    e.encode(buf);
                }
            }
            Self::ManifestEnd {
                entries,
                total_bytes,
            } => {
                buf.put_u64(*entries);
                buf.put_u64(*total_bytes);
            }
            Self::Chunk(c) => {
                c.encode_header(buf);
                buf.put_slice(&c.payload);
            }
            Self::End { chunks, digest } => {
                buf.put_u64(*chunks);
                buf.put_slice(digest);
            }
            Self::Progress { node, bytes, files } => {
                put_bytes16(buf, node.as_bytes());
                buf.put_u64(*bytes);
                buf.put_u64(*files);
            }
            Self::Report { node, outcome } => {
                put_bytes16(buf, node.as_bytes());
                match outcome {
                    Outcome::Committed {
                        bytes,
                        files,
                        elapsed_ms,
                        digest,
                        held,
                        repaired,
                    } => {
                        buf.put_u8(0);
                        buf.put_u64(*bytes);
                        buf.put_u64(*files);
                        buf.put_u64(*elapsed_ms);
                        buf.put_slice(digest);
                        buf.put_u64(*held);
                        buf.put_u64(*repaired);
                    }
                    Outcome::Failed { reason, retryable } => {
                        buf.put_u8(1);
                        let cut = floor_char_boundary(reason, MAX_REASON);
                        put_bytes16(buf, &reason.as_bytes()[..cut]);
                        buf.put_u8(u8::from(*retryable));
                    }
                }
            }
            Self::Sent {
                bytes,
                wire_bytes,
                chunks,
                files,
                skipped,
                resent,
            } => {
                buf.put_u64(*bytes);
                buf.put_u64(*wire_bytes);
                buf.put_u64(*chunks);
                buf.put_u64(*files);
                buf.put_u64(*skipped);
                buf.put_u64(*resent);
            }
            Self::Have { node, chunks } => {
                put_bytes16(buf, node.as_bytes());
                buf.put_u32(chunks.len() as u32);
                for c in chunks {
                    buf.put_u32(c.file);
                    buf.put_u64(c.offset);
                    buf.put_slice(&c.hash);
                }
            }
            Self::Need {
                node,
                round,
                done,
                chunks,
            } => {
                put_bytes16(buf, node.as_bytes());
                buf.put_u32(*round);
                buf.put_u8(u8::from(*done));
                buf.put_u32(chunks.len() as u32);
                for (file, offset) in chunks {
                    buf.put_u32(*file);
                    buf.put_u64(*offset);
                }
            }
            Self::Repaired { round } => buf.put_u32(*round),
            Self::Hook(h) => {
                buf.put_u16(PROTOCOL_VERSION);
                put_bytes16(buf, h.runbook.as_bytes());
                buf.put_u32(h.step);
                put_bytes16(buf, h.action.as_bytes());
                put_opt_string(buf, h.tool.as_deref());
                put_opt_string(buf, h.service.as_deref());
                put_bytes16(buf, h.site.as_bytes());
                put_opt_string(buf, h.dataset.as_deref());
            }
            Self::HookDone { node, reply } => {
                put_bytes16(buf, node.as_bytes());
                match reply {
                    HookReply::Ran(r) => {
                        buf.put_u8(0);
                        put_bytes16(buf, head(&r.command, MAX_HOOK_COMMAND).as_bytes());
                        put_opt_i32(buf, r.exit_code);
                        put_opt_i32(buf, r.signal);
                        buf.put_u8(u8::from(r.timed_out));
                        // The end of the output says most about a failure: keep that.
                        put_bytes32(buf, tail(&r.output, MAX_HOOK_OUTPUT).as_bytes());
                        buf.put_u64(r.elapsed_ms);
                        buf.put_u8(u8::from(r.replayed));
                    }
                    HookReply::Refused { reason } => {
                        buf.put_u8(1);
                        put_bytes16(buf, head(reason, MAX_REASON).as_bytes());
                    }
                    HookReply::NotStarted { command, reason } => {
                        buf.put_u8(2);
                        put_bytes16(buf, head(command, MAX_HOOK_COMMAND).as_bytes());
                        put_bytes16(buf, head(reason, MAX_REASON).as_bytes());
                    }
                }
            }
            Self::Bench(b) => b.encode(buf),
            Self::BenchDone { node, reply } => {
                put_bytes16(buf, node.as_bytes());
                reply.encode(buf);
            }
            Self::Sink(s) => s.encode(buf),
            Self::SinkDone {
                node,
                bytes,
                micros,
            } => {
                put_bytes16(buf, node.as_bytes());
                buf.put_u64(*bytes);
                buf.put_u64(*micros);
            }
        }
    }

    /// Decodes one frame body of the given kind. The whole body must be consumed.
    pub fn decode(kind: u8, body: &mut impl Buf) -> Result<Self, DecodeError> {
        let msg = match kind {
            kind::START => {
                check_version(body)?;
                Self::Start(Start {
                    transfer_id: get_u64(body, "transfer id")?,
                    chunk_size: check_chunk_size(get_u32(body, "chunk size")?)?,
                    compress: check_level(get_u8(body, "compression level")?)?,
                    compress_auto: get_flag(body, "automatic compression")?,
                    connections: check_connections(get_u8(body, "connections")?)?,
                    max_rate: get_u64(body, "max rate")?,
                    method: Method::decode(body)?,
                    plan: Plan::decode(body)?,
                    grant: Grant::decode(body)?,
                })
            }
            kind::OPEN => {
                check_version(body)?;
                Self::Open(Open {
                    transfer_id: get_u64(body, "transfer id")?,
                    chunk_size: check_chunk_size(get_u32(body, "chunk size")?)?,
                    connections: check_connections(get_u8(body, "connections")?)?,
                    method: Method::decode(body)?,
                    plan: Plan::decode(body)?,
                    grant: Grant::decode(body)?,
                })
            }
            kind::READY => Self::Ready,
            kind::ATTACH => Self::Attach {
                transfer_id: get_u64(body, "transfer id")?,
            },
            kind::MANIFEST_PART => {
                let n = get_u32(body, "manifest part count")?;
                if n > MAX_PART_ENTRIES {
                    return Err(DecodeError::TooLarge {
                        what: "manifest part count",
                        len: n.into(),
                        max: MAX_PART_ENTRIES.into(),
                    });
                }
                // Each entry takes at least 19 bytes; refuse a count the body cannot hold
                // before reserving room for it.
                if u64::from(n) * 19 > body.remaining() as u64 {
                    return Err(DecodeError::Truncated {
                        what: "manifest part",
                        need: n as usize * 19 - body.remaining(),
                    });
                }
                let mut entries = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    entries.push(Entry::decode(body)?);
                }
                Self::ManifestPart(entries)
            }
            kind::MANIFEST_END => Self::ManifestEnd {
                entries: get_u64(body, "manifest entry count")?,
                total_bytes: get_u64(body, "manifest byte count")?,
            },
            kind::CHUNK => Self::Chunk(Chunk::decode(body)?),
            kind::END => Self::End {
                chunks: get_u64(body, "chunk count")?,
                digest: get_hash(body, "tree digest")?,
            },
            kind::PROGRESS => Self::Progress {
                node: get_string(body, MAX_NAME, "node name")?,
                bytes: get_u64(body, "progress bytes")?,
                files: get_u64(body, "progress files")?,
            },
            kind::REPORT => {
                let node = get_string(body, MAX_NAME, "node name")?;
                let outcome = match get_u8(body, "outcome")? {
                    0 => Outcome::Committed {
                        bytes: get_u64(body, "bytes")?,
                        files: get_u64(body, "files")?,
                        elapsed_ms: get_u64(body, "elapsed")?,
                        digest: get_hash(body, "tree digest")?,
                        held: get_u64(body, "held bytes")?,
                        repaired: get_u64(body, "repaired chunks")?,
                    },
                    1 => Outcome::Failed {
                        reason: get_string(body, MAX_REASON, "failure reason")?,
                        retryable: get_u8(body, "retryable")? != 0,
                    },
                    o => {
                        return Err(DecodeError::Invalid {
                            what: "outcome",
                            why: format!("unknown outcome {o}"),
                        })
                    }
                };
                Self::Report { node, outcome }
            }
            kind::SENT => Self::Sent {
                bytes: get_u64(body, "bytes")?,
                wire_bytes: get_u64(body, "wire bytes")?,
                chunks: get_u64(body, "chunks")?,
                files: get_u64(body, "files")?,
                skipped: get_u64(body, "skipped bytes")?,
                resent: get_u64(body, "resent chunks")?,
            },
            kind::HAVE => {
                let node = get_string(body, MAX_NAME, "node name")?;
                let n = list_len(body, 44, "have list")?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(Held {
                        file: get_u32(body, "have file id")?,
                        offset: get_u64(body, "have offset")?,
                        hash: get_hash(body, "have hash")?,
                    });
                }
                Self::Have { node, chunks }
            }
            kind::NEED => {
                let node = get_string(body, MAX_NAME, "node name")?;
                let round = check_round(get_u32(body, "round")?)?;
                let done = match get_u8(body, "need done flag")? {
                    0 => false,
                    1 => true,
                    d => {
                        return Err(DecodeError::Invalid {
                            what: "need done flag",
                            why: format!("{d} is not 0 or 1"),
                        })
                    }
                };
                let n = list_len(body, 12, "need list")?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push((
                        get_u32(body, "need file id")?,
                        get_u64(body, "need offset")?,
                    ));
                }
                Self::Need {
                    node,
                    round,
                    done,
                    chunks,
                }
            }
            kind::REPAIRED => Self::Repaired {
                round: check_round(get_u32(body, "round")?)?,
            },
            kind::HOOK => {
                check_version(body)?;
                Self::Hook(Hook {
                    runbook: get_string(body, MAX_NAME, "runbook id")?,
                    step: get_u32(body, "step")?,
                    action: get_string(body, MAX_ACTION, "hook action")?,
                    tool: get_opt_string(body, MAX_ACTION, "backup tool")?,
                    service: get_opt_string(body, MAX_NAME, "service name")?,
                    site: get_string(body, MAX_NAME, "site name")?,
                    dataset: get_opt_string(body, MAX_NAME, "dataset name")?,
                })
            }
            kind::HOOK_DONE => {
                let node = get_string(body, MAX_NAME, "node name")?;
                let reply = match get_u8(body, "hook reply")? {
                    0 => HookReply::Ran(HookRan {
                        command: get_string(body, MAX_HOOK_COMMAND, "hook command")?,
                        exit_code: get_opt_i32(body, "exit code")?,
                        signal: get_opt_i32(body, "signal")?,
                        timed_out: get_flag(body, "timed out flag")?,
                        output: get_string32(body, MAX_HOOK_OUTPUT, "hook output")?,
                        elapsed_ms: get_u64(body, "hook elapsed")?,
                        replayed: get_flag(body, "replayed flag")?,
                    }),
                    1 => HookReply::Refused {
                        reason: get_string(body, MAX_REASON, "refusal reason")?,
                    },
                    2 => HookReply::NotStarted {
                        command: get_string(body, MAX_HOOK_COMMAND, "hook command")?,
                        reason: get_string(body, MAX_REASON, "failure reason")?,
                    },
                    r => {
                        return Err(DecodeError::Invalid {
                            what: "hook reply",
                            why: format!("unknown reply {r}"),
                        })
                    }
                };
                Self::HookDone { node, reply }
            }
            kind::BENCH => {
                check_version(body)?;
                Self::Bench(Bench::decode(body)?)
            }
            kind::BENCH_DONE => Self::BenchDone {
                node: get_string(body, MAX_NAME, "node name")?,
                reply: BenchReply::decode(body)?,
            },
            kind::SINK => {
                check_version(body)?;
                Self::Sink(Sink::decode(body)?)
            }
            kind::SINK_DONE => Self::SinkDone {
                node: get_string(body, MAX_NAME, "node name")?,
                bytes: get_u64(body, "sink bytes")?,
                micros: get_u64(body, "sink time")?,
            },
            k => return Err(DecodeError::UnknownKind(k)),
        };
        if body.has_remaining() {
            return Err(DecodeError::Trailing {
                what: msg.name(),
                extra: body.remaining(),
            });
        }
        Ok(msg)
    }
}

impl Chunk {
    /// Bytes in a chunk body before the payload.
    pub const HEADER_LEN: usize = 4 + 8 + 4 + 1 + 32 + 4;

    /// Where a chunk frame's payload starts, counted from the frame's first byte, if a frame
    /// of this `kind` is a chunk: so that a receiver can place the payload where it wants
    /// it (on a block boundary, for direct I/O) as it reads the frame.
    pub fn payload_at(kind: u8) -> Option<usize> {
        (kind == kind::CHUNK).then_some(FRAME_HEADER_LEN + Self::HEADER_LEN)
    }

    /// From a chunk body's first [`Chunk::HEADER_LEN`] bytes, the file, offset and length of
    /// a chunk sent raw (whose payload is the file's bytes themselves), decoded as
    /// [`Message::decode`] does; `None` for a compressed chunk or a header it would refuse.
    /// Whether the span is a chunk of that file is for the tracker to say.
    pub fn raw_span(mut header: &[u8]) -> Option<(u32, u64, u32)> {
        let h = ChunkHeader::decode(&mut header).ok()?;
        (h.encoding == Encoding::Raw).then_some((h.file, h.offset, h.raw_len))
    }

    fn encode_header(&self, buf: &mut impl BufMut) {
        buf.put_u32(self.file);
        buf.put_u64(self.offset);
        buf.put_u32(self.raw_len);
        buf.put_u8(match self.encoding {
            Encoding::Raw => 0,
            Encoding::Zstd => 1,
        });
        buf.put_slice(&self.hash);
        buf.put_u32(self.payload.len() as u32);
    }

    /// The frame header and chunk header, to send before the payload without copying it.
    pub fn frame_prefix(&self) -> Bytes {
        let mut v = Vec::with_capacity(FRAME_HEADER_LEN + Self::HEADER_LEN);
        FrameHeader {
            kind: kind::CHUNK,
            len: (Self::HEADER_LEN + self.payload.len()) as u32,
        }
        .encode(&mut v);
        self.encode_header(&mut v);
        v.into()
    }

    fn decode(body: &mut impl Buf) -> Result<Self, DecodeError> {
        let ChunkHeader {
            file,
            offset,
            raw_len,
            encoding,
            hash,
            len,
        } = ChunkHeader::decode(body)?;
        let payload = get_payload(body, len, "chunk payload")?;
        Ok(Self {
            file,
            offset,
            raw_len,
            encoding,
            hash,
            payload,
        })
    }
}

/// A chunk body's fields before its payload.
struct ChunkHeader {
    file: u32,
    offset: u64,
    raw_len: u32,
    encoding: Encoding,
    hash: [u8; 32],
    /// The payload's length.
    len: usize,
}

impl ChunkHeader {
    fn decode(body: &mut impl Buf) -> Result<Self, DecodeError> {
        let file = get_u32(body, "chunk file id")?;
        let offset = get_u64(body, "chunk offset")?;
        let raw_len = get_u32(body, "chunk length")?;
        if raw_len > crate::MAX_CHUNK_SIZE {
            return Err(DecodeError::TooLarge {
                what: "chunk length",
                len: raw_len.into(),
                max: crate::MAX_CHUNK_SIZE.into(),
            });
        }
        let encoding = match get_u8(body, "chunk encoding")? {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            e => {
                return Err(DecodeError::Invalid {
                    what: "chunk encoding",
                    why: format!("unknown encoding {e}"),
                })
            }
        };
        let hash = get_hash(body, "chunk hash")?;
        let len = get_u32(body, "chunk payload length")? as usize;
        if encoding == Encoding::Raw && len != raw_len as usize {
            return Err(DecodeError::Invalid {
                what: "chunk",
                why: format!("raw payload of {len} bytes declared as {raw_len}"),
            });
        }
        Ok(Self {
            file,
            offset,
            raw_len,
            encoding,
            hash,
            len,
        })
    }
}

/// Reads a list's count and checks it against the bound and against what the body can hold
/// (`item` bytes each) before anything is reserved for it.
fn list_len(body: &mut impl Buf, item: usize, what: &'static str) -> Result<usize, DecodeError> {
    let n = get_u32(body, what)?;
    if n > MAX_LIST_ENTRIES {
        return Err(DecodeError::TooLarge {
            what,
            len: n.into(),
            max: MAX_LIST_ENTRIES.into(),
        });
    }
    let n = n as usize;
    if n * item > body.remaining() {
        return Err(DecodeError::Truncated {
            what,
            need: n * item - body.remaining(),
        });
    }
    Ok(n)
}

fn check_round(round: u32) -> Result<u32, DecodeError> {
    if round > MAX_ROUNDS {
        return Err(DecodeError::Invalid {
            what: "round",
            why: format!("{round} is past the last round, {MAX_ROUNDS}"),
        });
    }
    Ok(round)
}

fn check_version(body: &mut impl Buf) -> Result<(), DecodeError> {
    match get_u16(body, "protocol version")? {
        PROTOCOL_VERSION => Ok(()),
        peer => Err(DecodeError::Version {
            peer,
            ours: PROTOCOL_VERSION,
        }),
    }
}

pub(crate) fn check_chunk_size(size: u32) -> Result<u32, DecodeError> {
    crate::check_chunk_size(size).map_err(|why| DecodeError::Invalid {
        what: "chunk size",
        why,
    })
}

pub(crate) fn check_level(level: u8) -> Result<u8, DecodeError> {
    if level > 19 {
        return Err(DecodeError::Invalid {
            what: "compression level",
            why: format!("{level} is not off (0) or a zstd level 1..=19"),
        });
    }
    Ok(level)
}

pub(crate) fn check_connections(n: u8) -> Result<u8, DecodeError> {
    if n == 0 || n > crate::MAX_CONNECTIONS {
        return Err(DecodeError::Invalid {
            what: "connections",
            why: format!("{n} is not in 1..={}", crate::MAX_CONNECTIONS),
        });
    }
    Ok(n)
}

fn put_opt_string(buf: &mut impl BufMut, s: Option<&str>) {
    match s {
        None => buf.put_u8(0),
        Some(s) => {
            buf.put_u8(1);
            put_bytes16(buf, s.as_bytes());
        }
    }
}

fn get_opt_string(
    body: &mut impl Buf,
    max: usize,
    what: &'static str,
) -> Result<Option<String>, DecodeError> {
    Ok(match get_flag(body, what)? {
        false => None,
        true => Some(get_string(body, max, what)?),
    })
}

fn put_opt_i32(buf: &mut impl BufMut, v: Option<i32>) {
    match v {
        None => buf.put_u8(0),
        Some(v) => {
            buf.put_u8(1);
            buf.put_i32(v);
        }
    }
}

fn get_opt_i32(body: &mut impl Buf, what: &'static str) -> Result<Option<i32>, DecodeError> {
    Ok(match get_flag(body, what)? {
        false => None,
        true => Some(get_u32(body, what)? as i32),
    })
}

/// A byte that must be 0 or 1, so that every value has one encoding.
fn get_flag(body: &mut impl Buf, what: &'static str) -> Result<bool, DecodeError> {
    match get_u8(body, what)? {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(DecodeError::Invalid {
            what,
            why: format!("{b} is not 0 or 1"),
        }),
    }
}

/// At most the first `max` bytes of `s`, cut at a character boundary.
fn head(s: &str, max: usize) -> &str {
    &s[..floor_char_boundary(s, max)]
}

/// At most the last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    let mut from = s.len().saturating_sub(max);
    while !s.is_char_boundary(from) {
        from += 1;
    }
    &s[from..]
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlanNode, Topology};

    #[test]
    fn a_raw_chunks_span_is_read_from_its_header_alone() {
        let mut c = Chunk {
            file: 7,
            offset: 3 << 20,
            raw_len: 5,
            encoding: Encoding::Raw,
            hash: [9; 32],
            payload: Bytes::from_static(b"hello"),
        };
        let frame = Message::Chunk(c.clone()).to_frame();
        let header = &frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + Chunk::HEADER_LEN];
        assert_eq!(Chunk::raw_span(header), Some((7, 3 << 20, 5)));
        assert_eq!(Chunk::raw_span(&header[..Chunk::HEADER_LEN - 1]), None);
        c.encoding = Encoding::Zstd;
        let frame = Message::Chunk(c).to_frame();
        let header = &frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + Chunk::HEADER_LEN];
        assert_eq!(Chunk::raw_span(header), None, "compressed");
    }

    fn node(name: &str) -> PlanNode {
        PlanNode {
            name: name.into(),
            address: format!("{name}:1"),
            dataset: "d".into(),
            parent: None,
        }
    }

    fn plan(topology: Topology) -> Plan {
        Plan::build(node("s"), vec![node("a"), node("b"), node("c")], topology).expect("plan")
    }

    fn bytes(plan: &Plan) -> Vec<u8> {
        grant_bytes(7, 1 << 20, 4, Method::Files, 1000, plan)
    }

    #[test]
    fn grant_bytes_cover_the_tree() {
        // Who feeds whom is part of what the controller decided.
        assert_ne!(bytes(&plan(Topology::Chain)), bytes(&plan(Topology::Star)));
        assert!(bytes(&plan(Topology::Chain)).starts_with(GRANT_DOMAIN));
    }

    #[test]
    fn grant_bytes_cover_everything_else() {
        let base = plan(Topology::Chain);
        let ours = bytes(&base);
        let mut changed = vec![
            grant_bytes(8, 1 << 20, 4, Method::Files, 1000, &base),
            grant_bytes(7, 1 << 21, 4, Method::Files, 1000, &base),
            grant_bytes(7, 1 << 20, 5, Method::Files, 1000, &base),
            grant_bytes(7, 1 << 20, 4, Method::Xtrabackup, 1000, &base),
            grant_bytes(7, 1 << 20, 4, Method::Mariabackup, 1000, &base),
            grant_bytes(7, 1 << 20, 4, Method::Files, 1001, &base),
        ];
        let edits: [fn(&mut PlanNode); 3] = [
            |n| n.name.push('x'),
            |n| n.address.push('x'),
            |n| n.dataset = "other".into(),
        ];
        for edit in edits {
            for i in 0..base.nodes().len() {
                let mut nodes = base.nodes().to_vec();
                edit(&mut nodes[i]);
                changed.push(bytes(&Plan::from_nodes(nodes).expect("plan")));
            }
        }
        // A target left out, or two nodes swapped (which makes another node the source).
        let mut fewer = base.nodes().to_vec();
        fewer.pop();
        changed.push(bytes(&Plan::from_nodes(fewer).expect("plan")));
        let mut swapped = base.nodes().to_vec();
        swapped.swap(0, 1);
        swapped[0].parent = None;
        swapped[1].parent = Some(0);
        changed.push(bytes(&Plan::from_nodes(swapped).expect("plan")));
        // Moving a byte from one string to the next does not give the same bytes either.
        let mut shifted = base.nodes().to_vec();
        shifted[1].name = "a:".into();
        shifted[1].address = "1".into();
        changed.push(bytes(&Plan::from_nodes(shifted).expect("plan")));
        for (i, c) in changed.iter().enumerate() {
            assert_ne!(c, &ours, "change {i} kept the grant bytes");
        }
    }

    #[test]
    fn start_and_open_sign_the_same_bytes() {
        let grant = Grant {
            controller_cert: vec![1, 2],
            not_after_unix: 1000,
            signature: vec![3],
        };
        let start = Start {
            transfer_id: 7,
            chunk_size: 1 << 20,
            compress: 3,
            compress_auto: true,
            connections: 4,
            max_rate: 0,
            method: Method::Mariabackup,
            plan: plan(Topology::Chain),
            grant: grant.clone(),
        };
        let open = Open {
            transfer_id: 7,
            chunk_size: 1 << 20,
            connections: 4,
            method: Method::Mariabackup,
            plan: plan(Topology::Chain),
            grant,
        };
        assert_eq!(start.grant_bytes(), open.grant_bytes());
        assert_ne!(
            open.grant_bytes(),
            bytes(&open.plan),
            "the method is signed"
        );
    }
}
