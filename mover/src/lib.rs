//! mover's engine: the agent that sends, receives and relays datasets, the controller that
//! starts transfers and follows them, and the pieces they share.
//!
//! The wire format lives in `mover-protocol`; this crate drives it over QUIC (quinn) and the
//! local disk.

pub mod agent;
pub mod auto_compress;
pub(crate) mod backup;
pub(crate) mod basis;
pub mod bench;
pub mod certs;
pub mod chunk;
pub mod compare;
pub mod config;
pub mod controller;
pub mod disk;
pub mod error;
pub(crate) mod fault;
pub(crate) mod frame;
pub mod hookrun;
pub(crate) mod link;
pub mod net;
pub mod orchestrate;
pub mod pool;
pub(crate) mod rate;
pub(crate) mod receiver;
pub mod sample;
pub mod scan;
pub(crate) mod source;
pub mod staging;
pub(crate) mod table;
pub mod tls;

/// Cores available to this process (at least 1).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
