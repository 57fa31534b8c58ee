//! Link tests: the upstream agent streams incompressible bytes over mutual-TLS QUIC to the
//! downstream one ([`link`]), which reads and discards them ([`sink`]) only if the controller
//! granted this very test, from this peer, to it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mover_protocol::bench::{LinkStats, Sink};
use mover_protocol::{Grant, Message};
use quinn::{RecvStream, SendStream};
use rustls::pki_types::UnixTime;

use super::probe::micros;
use crate::agent::Ctx;
use crate::frame::{read_message, write_message};
use crate::link::close;

/// How long a link test's stream may last on the downstream side, whatever it was granted.
const SINK_LIMIT: Duration = Duration::from_secs(660);
/// How long the upstream waits for the downstream's count after its last byte.
const SINK_ANSWER: Duration = Duration::from_secs(60);
/// Link-test streams remembered, so that a grant is good for each of its connections once.
const SINKS_KEPT: usize = 4096;

/// Link-test streams already taken: (test id, connection index), newest last.
#[derive(Debug, Default)]
pub(crate) struct Taken(std::sync::Mutex<VecDeque<(u64, u8)>>);

/// A link probe's parameters.
pub(super) struct LinkTest {
    pub id: u64,
    pub to: String,
    pub address: String,
    pub bytes: u64,
    pub time: Duration,
    pub connections: u8,
    pub grant: Grant,
}

/// Streams incompressible bytes to `test.to` over its connections until the byte bound or the
/// time bound, and returns what the downstream says arrived and how long it took.
pub(super) async fn link(ctx: &Arc<Ctx>, test: LinkTest) -> Result<LinkStats, String> {
    if test.to == ctx.node {
        return Err(format!("{} cannot test a link to itself", ctx.node));
    }
    let addr = crate::config::resolve_address(&test.address)
        .await
        .map_err(|e| format!("resolve address {} of {}: {e}", test.address, test.to))?;
    let mut conns = Vec::with_capacity(usize::from(test.connections));
    for _ in 0..test.connections {
        conns.push(
            crate::net::connect(&ctx.endpoint, ctx.loopback_client.as_ref(), addr, &test.to)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let mut noise = vec![0u8; 1 << 20];
    fastrand::fill(&mut noise);
    let noise = Bytes::from(noise);
    let sink = Sink {
        id: test.id,
        from: ctx.node.clone(),
        to: test.to.clone(),
        bytes: test.bytes,
        connections: test.connections,
        index: 0,
        grant: test.grant,
    };
    let started = Instant::now();
    let deadline = started + test.time;
    let mut tasks = tokio::task::JoinSet::new();
    for (index, conn) in conns.iter().enumerate() {
        let sink = Sink {
            index: index as u8,
            ..sink.clone()
        };
        tasks.spawn(stream_to(conn.clone(), sink, noise.clone(), deadline));
    }
    let mut bytes = 0;
    let mut failure = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(n)) => bytes += n,
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(e.to_string())),
        }
    }
    let elapsed = started.elapsed();
    for c in &conns {
        c.close(close::DONE.into(), b"link test done");
    }
    if let Some(reason) = failure {
        return Err(format!("link test {} -> {}: {reason}", ctx.node, test.to));
    }
    Ok(LinkStats {
        bytes,
        micros: micros(elapsed),
        connections: test.connections,
    })
}

/// Sends `sink` and then `noise` over and over on a new stream of `conn`, until its share of
/// the bytes or `deadline`; returns the bytes the downstream counted.
async fn stream_to(
    conn: quinn::Connection,
    sink: Sink,
    noise: Bytes,
    deadline: Instant,
) -> Result<u64, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let share = sink.per_stream();
    let sent = async {
        write_message(&mut send, &Message::Sink(sink)).await?;
        let mut sent = 0u64;
        while sent < share && Instant::now() < deadline {
            let n = (share - sent).min(noise.len() as u64) as usize;
            send.write_chunk(noise.slice(..n))
                .await
                .map_err(crate::error::LinkError::from)?;
            sent += n as u64;
        }
        let _ = send.finish();
        Ok::<_, crate::error::LinkError>(())
    }
    .await;
    // A refusal stops the stream: the answer says why, whatever the write saw.
    let answer = tokio::time::timeout(SINK_ANSWER, read_message(&mut recv, 64 << 10)).await;
    match answer {
        Ok(Ok(Message::SinkDone { bytes, .. })) => Ok(bytes),
        Ok(Ok(Message::Report {
            outcome: mover_protocol::Outcome::Failed { reason, .. },
            ..
        })) => Err(reason),
        Ok(Ok(other)) => Err(format!(
            "the downstream answered with a {} message",
            other.name()
        )),
        Ok(Err(e)) => Err(match sent {
            Err(w) => format!("{w} ({e})"),
            Ok(()) => e.to_string(),
        }),
        Err(_) => Err(format!(
            "no count from the downstream within {} s",
            SINK_ANSWER.as_secs()
        )),
    }
}

/// The downstream's side of a link test: checks the grant, then reads and discards the
/// stream's bytes (never more than its share) and answers with their count.
pub(crate) async fn sink(
    ctx: Arc<Ctx>,
    from: String,
    sink: Sink,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    if let Err(reason) = check_sink(&ctx, &from, &sink) {
        let _ = recv.stop(close::FAILED.into());
        crate::link::refuse(&mut send, &ctx.node, reason).await;
        return;
    }
    let share = sink.per_stream();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + SINK_LIMIT;
    let mut got = 0u64;
    let ended = loop {
        match tokio::time::timeout_at(deadline, recv.read_chunk(1 << 20, false)).await {
            Err(_) => break Err("the link test went on past its time bound".to_owned()),
            Ok(Ok(Some(c))) => {
                got += c.bytes.len() as u64;
                if got > share {
                    break Err(format!(
                        "the link test sent more than the {share} bytes granted to its stream"
                    ));
                }
            }
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(%from, error = %e, "a link test's stream failed");
                return;
            }
        }
    };
    if let Err(reason) = ended {
        let _ = recv.stop(close::FAILED.into());
        crate::link::refuse(&mut send, &ctx.node, reason).await;
        return;
    }
    let done = Message::SinkDone {
        node: ctx.node.clone(),
        bytes: got,
        micros: micros(started.elapsed()),
    };
    if write_message(&mut send, &done).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
    }
}

/// Why this agent will not sink `sink` from `from`, if it will not: the controller must have
/// granted this very test, from this peer to this agent, and each of its streams runs once.
fn check_sink(ctx: &Ctx, from: &str, sink: &Sink) -> Result<(), String> {
    crate::tls::verify_grant(&ctx.roots, &sink.grant, &sink.grant_bytes(), UnixTime::now())
        .map_err(|e| {
            format!(
                "{} refused the link test from {from}: it is not granted by the cluster's controller: {e}",
                ctx.node
            )
        })?;
    if sink.to != ctx.node {
        return Err(format!(
            "{} refused the link test: its grant is for {}",
            ctx.node, sink.to
        ));
    }
    if sink.from != from {
        return Err(format!(
            "{} refused the link test: its grant is for data from {}, not from {from}",
            ctx.node, sink.from
        ));
    }
    let mut used = ctx.bench.sinks.0.lock().unwrap_or_else(|p| p.into_inner());
    if used.contains(&(sink.id, sink.index)) {
        return Err(format!(
            "{} refused the link test: connection {} of test {:016x} already ran",
            ctx.node, sink.index, sink.id
        ));
    }
    used.push_back((sink.id, sink.index));
    if used.len() > SINKS_KEPT {
        used.pop_front();
    }
    Ok(())
}
