//! The executor's [`Actions`] on a real cluster: hooks through each host's agent, transfers
//! through the source's agent.

use tokio::sync::mpsc;

use super::exec::{ActionError, Actions, BoxFuture, TransferProgress};
use super::runbook::Transfer;
use crate::config::ClusterConfig;
use crate::controller::{self, Event, NodeDataset, SendRequest, Summary};
use crate::hookrun::{call_hook, HookCall, HookCallError, HookResult};

/// How runbook transfers are tuned (what `mover send` takes as flags).
#[derive(Debug, Clone)]
pub struct TransferTuning {
    pub chunk_size: u32,
    /// zstd level, 0 for none.
    pub compress: u8,
    /// Compress only while the link is what holds the transfer back.
    pub compress_auto: bool,
    /// Most bytes per second the source sends, or 0 for no limit.
    pub max_rate: u64,
    /// Connections per hop when the step does not say (tprovision's `--threads` does).
    pub connections: u8,
}

impl Default for TransferTuning {
    fn default() -> Self {
        TransferTuning {
            chunk_size: 4 << 20,
            compress: 1,
            compress_auto: true,
            max_rate: 0,
            connections: crate::cores().clamp(1, 8) as u8,
        }
    }
}

pub struct ClusterActions {
    pub cluster: ClusterConfig,
    pub tuning: TransferTuning,
}

impl Actions for ClusterActions {
    fn hook(&self, host: &str, call: HookCall) -> BoxFuture<'_, Result<HookResult, ActionError>> {
        let host = host.to_owned();
        Box::pin(async move {
            call_hook(&self.cluster, &host, &call)
                .await
                .map_err(|e| ActionError {
                    unreachable: matches!(e, HookCallError::Unreachable { .. }),
                    message: e.to_string(),
                })
        })
    }

    fn transfer(
        &self,
        t: &Transfer,
        progress: mpsc::UnboundedSender<TransferProgress>,
    ) -> BoxFuture<'_, Result<Summary, ActionError>> {
        let connections = t
            .threads
            .map(|n| n.clamp(1, u32::from(mover_protocol::MAX_CONNECTIONS)) as u8)
            .unwrap_or(self.tuning.connections);
        let req = SendRequest {
            source: NodeDataset {
                node: t.source.clone(),
                dataset: t.dataset.clone(),
            },
            targets: t
                .targets
                .iter()
                .map(|n| NodeDataset {
                    node: n.clone(),
                    dataset: t.dataset.clone(),
                })
                .collect(),
            topology: mover_protocol::Topology::Chain,
            chunk_size: self.tuning.chunk_size,
            compress: self.tuning.compress,
            compress_auto: self.tuning.compress_auto,
            connections,
            max_rate: self.tuning.max_rate,
            method: t.method,
        };
        Box::pin(async move {
            controller::send(&self.cluster, &req, |ev| {
                let p = match ev {
                    Event::Scanned { total_bytes, .. } => TransferProgress::Scanned {
                        total_bytes: *total_bytes,
                    },
                    Event::Progress { node, bytes, .. } => TransferProgress::Progress {
                        node: node.clone(),
                        bytes: *bytes,
                    },
                    Event::Finished { node, committed } => TransferProgress::Finished {
                        node: node.clone(),
                        committed: *committed,
                    },
                    _ => return,
                };
                let _ = progress.send(p);
            })
            .await
            .map_err(|e| ActionError {
                message: e.to_string(),
                unreachable: false,
            })
        })
    }
}
