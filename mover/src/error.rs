//! Errors of the transfer engine.

use mover_protocol::{ChunkError, DecodeError, ManifestError};

/// A stream or connection to a peer failed, or the peer broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("peer closed the stream early")]
    Closed,
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write to peer: {0}")]
    Write(quinn::WriteError),
    #[error("read from peer: {0}")]
    Read(quinn::ReadError),
    #[error("stream already closed")]
    ClosedStream(#[from] quinn::ClosedStream),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("peer sent {got} where {expected} was expected")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("{0}")]
    Net(#[from] crate::net::NetError),
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: &'static str, secs: u64 },
    /// This node's own manifest could not be read back from its table.
    #[error("{0}")]
    Manifest(#[from] ManifestError),
}

impl LinkError {
    /// Whether the link failed (a rerun may find it working) rather than the peer breaking
    /// the protocol.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Closed
            | Self::Decode(_)
            | Self::Unexpected { .. }
            | Self::ClosedStream(_)
            | Self::Manifest(_) => false,
            Self::Net(e) => e.is_retryable(),
            Self::Connection(_) | Self::Write(_) | Self::Read(_) | Self::Timeout { .. } => true,
        }
    }
}

// quinn's "connection lost" hides why; keep the connection error, which says (timed out,
// reset, closed by peer with its reason).
impl From<quinn::ReadError> for LinkError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => Self::Connection(c),
            other => Self::Read(other),
        }
    }
}

impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => Self::Connection(c),
            other => Self::Write(other),
        }
    }
}

impl From<quinn::ReadExactError> for LinkError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => Self::Closed,
            quinn::ReadExactError::ReadError(e) => e.into(),
        }
    }
}

/// A chunk's bytes did not decode to what its frame promised.
#[derive(Debug, thiserror::Error)]
pub enum ChunkCodecError {
    #[error("decompress chunk at offset {offset}: {reason}")]
    Decompress { offset: u64, reason: String },
    #[error("decode chunk at offset {offset}: {len} bytes, expected {expected}")]
    Length {
        offset: u64,
        len: usize,
        expected: u32,
    },
    #[error("verify chunk at offset {offset}: BLAKE3 hash mismatch (corrupted in transit or by a broken peer)")]
    HashMismatch { offset: u64 },
}

/// Why one node's part of a transfer failed. The message goes into the summary as the reason.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    Chunk(#[from] ChunkError),
    #[error("{path}: {source}")]
    ChunkCodec {
        path: String,
        source: ChunkCodecError,
    },
    #[error("{0}")]
    Staging(#[from] crate::staging::StagingError),
    #[error("{0}")]
    Scan(#[from] crate::scan::ScanError),
    #[error("read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("source file {path} changed while it was being sent ({detail}); stop the database or use a snapshot, then run again")]
    SourceChanged { path: String, detail: String },
    // Reports carry the node's name in front of this message.
    #[error("unknown dataset {dataset:?}: add [datasets.{dataset}] to the agent config of {node}")]
    UnknownDataset { node: String, dataset: String },
    #[error("refused: {0}")]
    Refused(String),
    /// The node had committed this transfer before it was linked in again (its report went to
    /// a relay that died); what it reported then.
    #[error("it had committed this transfer already")]
    AlreadyCommitted(mover_protocol::Outcome),
    #[error("transfer incomplete: {missing} chunks never arrived")]
    Incomplete { missing: u64 },
    #[error(
        "tree digest mismatch: what this node holds differs from what the source sent \
         (did files change on the source during the transfer?); nothing was committed"
    )]
    DigestMismatch,
    #[error("dataset {dataset} is still busy with an earlier transfer that did not stop within {secs} s")]
    Busy { dataset: String, secs: u64 },
    #[error("{missing} chunks still missing after {rounds} repair rounds")]
    Unrepaired { missing: u64, rounds: u32 },
    #[error("every target dropped out")]
    NoTargetsLeft,
    /// A backup method's hook that this agent's config does not let it run.
    #[error("{action} cannot run: {reason}")]
    HookUnavailable { action: String, reason: String },
    #[error("{action} could not start `{command}`: {reason}")]
    HookNotStarted {
        action: String,
        command: String,
        reason: String,
    },
    #[error(
        "{action} failed: `{command}` {status}; {consequence}{}",
        quoted_output(output)
    )]
    HookFailed {
        action: String,
        command: String,
        status: String,
        /// The end of what it wrote.
        output: String,
        /// What the failure means for the transfer.
        consequence: &'static str,
    },
    #[error("internal: {0}")]
    Internal(String),
}

fn quoted_output(output: &str) -> String {
    if output.is_empty() {
        " (it wrote nothing)".into()
    } else {
        // Indented, so that it reads as a quote under the line that names the command.
        let quoted: String = output.lines().map(|l| format!("\n    {l}")).collect();
        format!("; its output ended with:{quoted}")
    }
}

impl TransferError {
    /// Whether this node's own endpoint is closing (the agent is shutting down): nothing it
    /// dials from now on can succeed.
    pub fn endpoint_stopping(&self) -> bool {
        matches!(
            self,
            Self::Link(LinkError::Net(crate::net::NetError::Connect {
                source: quinn::ConnectError::EndpointStopping,
                ..
            }))
        )
    }

    /// Whether running the same transfer again may succeed without changing anything.
    pub fn retryable(&self) -> bool {
        if let Self::Link(l) = self {
            return l.retryable();
        }
        matches!(
            self,
            Self::Link(_)
                | Self::Incomplete { .. }
                | Self::SourceChanged { .. }
                | Self::Busy { .. }
                | Self::Unrepaired { .. }
        )
    }
}
