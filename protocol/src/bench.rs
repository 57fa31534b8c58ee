//! The messages of `mover bench`: the controller asks agents to measure, each on its own host,
//! the stages a transfer would go through (reading the source, encoding, each network link,
//! decoding and writing on each target), so that an operator knows how fast a reseed will go
//! and what limits it.
//!
//! ```text
//! controller -> agent:      Bench { probe: Source | Link | Target | Reset }
//! agent -> controller:      BenchDone
//! upstream -> downstream:   Sink, then raw bytes until the stream ends   (for a Link probe)
//! downstream -> upstream:   SinkDone
//! ```
//!
//! A `Link` probe makes the upstream agent dial the downstream one and stream bytes that the
//! downstream reads and throws away. The downstream accepts that only with a [`Grant`] of the
//! controller's over [`link_grant_bytes`] (the test, both ends, the byte bound), so a node's
//! certificate alone cannot make an agent sink data. The `Reset` probe removes what earlier
//! probes left (the scratch dataset the end-to-end run lands in).

use bytes::{Buf, BufMut};

use crate::codec::{get_string, get_u16, get_u32, get_u64, get_u8, put_bytes16, DecodeError};
use crate::message::{
    check_chunk_size, check_connections, check_level, Grant, MAX_ACTION, MAX_REASON,
    PROTOCOL_VERSION,
};
use crate::plan::MAX_NAME;

/// Most bytes a source probe may sample from a dataset.
pub const MAX_SAMPLE: u64 = 64 << 30;
/// Most bytes one link probe may stream (over all its connections).
pub const MAX_LINK_BYTES: u64 = 1 << 40;
/// Longest a link probe may stream for.
pub const MAX_LINK_MILLIS: u32 = 600_000;
/// What every link-test grant starts with: no transfer grant (which starts with
/// [`crate::message::GRANT_DOMAIN`]) can pass for one, nor the other way round.
pub const LINK_GRANT_DOMAIN: &[u8] = b"mover link grant v1\0";

/// Controller -> agent, first on a control stream of its own: measure one stage here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bench {
    /// Names this run's scratch files and, in a `Link` probe, the test the grant signs.
    pub id: u64,
    pub probe: Probe,
}

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Read up to `sample` bytes of `dataset`'s files through the disk back end in
    /// `chunk_size` reads, then hash and compress them at level `compress` on one core and on
    /// all. With `stage`, copy what was sampled into the scratch dataset, for an end-to-end
    /// run to send.
    Source {
        dataset: String,
        sample: u64,
        chunk_size: u32,
        compress: u8,
        stage: bool,
    },
    /// Stream up to `bytes` of incompressible data, for at most `millis`, over `connections`
    /// QUIC connections to the agent `to` at `address`, which reads and discards them.
    Link {
        to: String,
        address: String,
        bytes: u64,
        millis: u32,
        connections: u8,
        /// The controller's grant over [`link_grant_bytes`], with this agent as `from`.
        grant: Grant,
    },
    /// Write a scratch file of `bytes` where `dataset`'s staging area goes, fdatasync it and
    /// remove it; decode (decompress and verify) the scratch dataset an end-to-end run left
    /// here, on one core and on all, then remove that too.
    Target {
        dataset: String,
        bytes: u64,
        chunk_size: u32,
        compress: u8,
    },
    /// Remove the scratch dataset and any leftovers of earlier probes.
    Reset,
}

/// A source probe's measurements.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceStats {
    /// The whole dataset, as scanned.
    pub total_bytes: u64,
    pub files: u64,
    /// Sampled and read, and how long that took.
    pub read_bytes: u64,
    pub read_micros: u64,
    /// Of the sample, bytes that were in the page cache before the read.
    pub cached_bytes: u64,
    /// Raw bytes encoded in each encode pass, and the frames they made.
    pub encode_bytes: u64,
    pub wire_bytes: u64,
    pub encode_one_micros: u64,
    pub encode_all_micros: u64,
    /// Threads of the all-cores pass.
    pub threads: u16,
    /// Bytes copied into the scratch dataset for an end-to-end run.
    pub staged_bytes: u64,
    /// The disk back end (`uring`, `threads`).
    pub io: String,
}

/// A link probe's measurement, as the downstream counted it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkStats {
    pub bytes: u64,
    pub micros: u64,
    pub connections: u8,
}

/// A target probe's measurements.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetStats {
    /// The scratch file: bytes, time to write them, and of that the final fdatasync.
    pub write_bytes: u64,
    pub write_micros: u64,
    pub sync_micros: u64,
    /// Raw bytes decoded per pass (0 when no end-to-end copy was here to decode).
    pub decode_bytes: u64,
    pub decode_one_micros: u64,
    pub decode_all_micros: u64,
    pub threads: u16,
    pub io: String,
    /// The directory the scratch file was written in.
    pub scratch_dir: String,
}

/// Agent -> controller: the answer to `Bench`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchReply {
    /// Refused, or failed; nothing is left behind.
    Failed {
        reason: String,
    },
    Source(SourceStats),
    Link(LinkStats),
    Target(TargetStats),
    Reset,
}

/// Upstream -> downstream, first on a stream of each connection of a link probe; raw bytes
/// follow until the stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sink {
    pub id: u64,
    pub from: String,
    pub to: String,
    /// The most bytes the whole test may carry; each of the `connections` streams carries at
    /// most its share, [`Sink::per_stream`].
    pub bytes: u64,
    pub connections: u8,
    /// Which connection this stream is on, `0..connections`.
    pub index: u8,
    pub grant: Grant,
}

impl Sink {
    /// The bytes `grant` must sign for this stream to be accepted.
    pub fn grant_bytes(&self) -> Vec<u8> {
        link_grant_bytes(
            self.id,
            &self.from,
            &self.to,
            self.bytes,
            self.connections,
            self.grant.not_after_unix,
        )
    }

    /// The most bytes one stream may carry.
    pub fn per_stream(&self) -> u64 {
        self.bytes.div_ceil(u64::from(self.connections.max(1)))
    }
}

/// The exact bytes a link-test grant signs: [`LINK_GRANT_DOMAIN`], the protocol version, the
/// test's id, both ends, the byte bound, the connection count and the expiry.
pub fn link_grant_bytes(
    id: u64,
    from: &str,
    to: &str,
    bytes: u64,
    connections: u8,
    not_after_unix: u64,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(LINK_GRANT_DOMAIN.len() + 64 + from.len() + to.len());
    buf.extend_from_slice(LINK_GRANT_DOMAIN);
    buf.put_u16(PROTOCOL_VERSION);
    buf.put_u64(id);
    put_bytes16(&mut buf, from.as_bytes());
    put_bytes16(&mut buf, to.as_bytes());
    buf.put_u64(bytes);
    buf.put_u8(connections);
    buf.put_u64(not_after_unix);
    buf
}

impl Bench {
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u16(PROTOCOL_VERSION);
        buf.put_u64(self.id);
        match &self.probe {
            Probe::Source {
                dataset,
                sample,
                chunk_size,
                compress,
                stage,
            } => {
                buf.put_u8(0);
                put_bytes16(buf, dataset.as_bytes());
                buf.put_u64(*sample);
                buf.put_u32(*chunk_size);
                buf.put_u8(*compress);
                buf.put_u8(u8::from(*stage));
            }
            Probe::Link {
                to,
                address,
                bytes,
                millis,
                connections,
                grant,
            } => {
                buf.put_u8(1);
                put_bytes16(buf, to.as_bytes());
                put_bytes16(buf, address.as_bytes());
                buf.put_u64(*bytes);
                buf.put_u32(*millis);
                buf.put_u8(*connections);
                grant.encode(buf);
            }
            Probe::Target {
                dataset,
                bytes,
                chunk_size,
                compress,
            } => {
                buf.put_u8(2);
                put_bytes16(buf, dataset.as_bytes());
                buf.put_u64(*bytes);
                buf.put_u32(*chunk_size);
                buf.put_u8(*compress);
            }
            Probe::Reset => buf.put_u8(3),
        }
    }

    /// Decodes a body after its version, which the caller checked.
    pub(crate) fn decode(body: &mut impl Buf) -> Result<Self, DecodeError> {
        let id = get_u64(body, "bench id")?;
        let probe = match get_u8(body, "bench probe")? {
            0 => Probe::Source {
                dataset: get_string(body, MAX_NAME, "dataset name")?,
                sample: at_most(get_u64(body, "sample size")?, MAX_SAMPLE, "sample size")?,
                chunk_size: check_chunk_size(get_u32(body, "chunk size")?)?,
                compress: check_level(get_u8(body, "compression level")?)?,
                stage: get_flag(body, "stage flag")?,
            },
            1 => Probe::Link {
                to: get_string(body, MAX_NAME, "node name")?,
                address: get_string(body, MAX_NAME, "node address")?,
                bytes: at_most(get_u64(body, "link bytes")?, MAX_LINK_BYTES, "link bytes")?,
                millis: at_most(
                    get_u32(body, "link time")?.into(),
                    MAX_LINK_MILLIS.into(),
                    "link time",
                )? as u32,
                connections: check_connections(get_u8(body, "connections")?)?,
                grant: Grant::decode(body)?,
            },
            2 => Probe::Target {
                dataset: get_string(body, MAX_NAME, "dataset name")?,
                bytes: at_most(get_u64(body, "scratch size")?, MAX_SAMPLE, "scratch size")?,
                chunk_size: check_chunk_size(get_u32(body, "chunk size")?)?,
                compress: check_level(get_u8(body, "compression level")?)?,
            },
            3 => Probe::Reset,
            p => {
                return Err(DecodeError::Invalid {
                    what: "bench probe",
                    why: format!("unknown probe {p}"),
                })
            }
        };
        Ok(Self { id, probe })
    }
}

impl BenchReply {
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Self::Failed { reason } => {
                buf.put_u8(0);
                put_bytes16(buf, head(reason, MAX_REASON).as_bytes());
            }
            Self::Source(s) => {
                buf.put_u8(1);
                for v in [
                    s.total_bytes,
                    s.files,
                    s.read_bytes,
                    s.read_micros,
                    s.cached_bytes,
                    s.encode_bytes,
                    s.wire_bytes,
                    s.encode_one_micros,
                    s.encode_all_micros,
                ] {
                    buf.put_u64(v);
                }
                buf.put_u16(s.threads);
                buf.put_u64(s.staged_bytes);
                put_bytes16(buf, head(&s.io, MAX_ACTION).as_bytes());
            }
            Self::Link(l) => {
                buf.put_u8(2);
                buf.put_u64(l.bytes);
                buf.put_u64(l.micros);
                buf.put_u8(l.connections);
            }
            Self::Target(t) => {
                buf.put_u8(3);
                for v in [
                    t.write_bytes,
                    t.write_micros,
                    t.sync_micros,
                    t.decode_bytes,
                    t.decode_one_micros,
                    t.decode_all_micros,
                ] {
                    buf.put_u64(v);
                }
                buf.put_u16(t.threads);
                put_bytes16(buf, head(&t.io, MAX_ACTION).as_bytes());
                put_bytes16(buf, head(&t.scratch_dir, MAX_REASON).as_bytes());
            }
            Self::Reset => buf.put_u8(4),
        }
    }

    pub(crate) fn decode(body: &mut impl Buf) -> Result<Self, DecodeError> {
        Ok(match get_u8(body, "bench reply")? {
            0 => Self::Failed {
                reason: get_string(body, MAX_REASON, "failure reason")?,
            },
            1 => Self::Source(SourceStats {
                total_bytes: get_u64(body, "dataset bytes")?,
                files: get_u64(body, "dataset files")?,
                read_bytes: get_u64(body, "read bytes")?,
                read_micros: get_u64(body, "read time")?,
                cached_bytes: get_u64(body, "cached bytes")?,
                encode_bytes: get_u64(body, "encoded bytes")?,
                wire_bytes: get_u64(body, "wire bytes")?,
                encode_one_micros: get_u64(body, "encode time")?,
                encode_all_micros: get_u64(body, "encode time")?,
                threads: get_u16(body, "threads")?,
                staged_bytes: get_u64(body, "staged bytes")?,
                io: get_string(body, MAX_ACTION, "disk back end")?,
            }),
            2 => Self::Link(LinkStats {
                bytes: get_u64(body, "link bytes")?,
                micros: get_u64(body, "link time")?,
                connections: get_u8(body, "connections")?,
            }),
            3 => Self::Target(TargetStats {
                write_bytes: get_u64(body, "written bytes")?,
                write_micros: get_u64(body, "write time")?,
                sync_micros: get_u64(body, "sync time")?,
                decode_bytes: get_u64(body, "decoded bytes")?,
                decode_one_micros: get_u64(body, "decode time")?,
                decode_all_micros: get_u64(body, "decode time")?,
                threads: get_u16(body, "threads")?,
                io: get_string(body, MAX_ACTION, "disk back end")?,
                scratch_dir: get_string(body, MAX_REASON, "scratch directory")?,
            }),
            4 => Self::Reset,
            r => {
                return Err(DecodeError::Invalid {
                    what: "bench reply",
                    why: format!("unknown reply {r}"),
                })
            }
        })
    }
}

impl Sink {
    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u16(PROTOCOL_VERSION);
        buf.put_u64(self.id);
        put_bytes16(buf, self.from.as_bytes());
        put_bytes16(buf, self.to.as_bytes());
        buf.put_u64(self.bytes);
        buf.put_u8(self.connections);
        buf.put_u8(self.index);
        self.grant.encode(buf);
    }

    /// Decodes a body after its version, which the caller checked.
    pub(crate) fn decode(body: &mut impl Buf) -> Result<Self, DecodeError> {
        let id = get_u64(body, "link test id")?;
        let from = get_string(body, MAX_NAME, "node name")?;
        let to = get_string(body, MAX_NAME, "node name")?;
        let bytes = at_most(get_u64(body, "link bytes")?, MAX_LINK_BYTES, "link bytes")?;
        let connections = check_connections(get_u8(body, "connections")?)?;
        let index = get_u8(body, "connection index")?;
        if index >= connections {
            return Err(DecodeError::Invalid {
                what: "connection index",
                why: format!("{index} is not below the {connections} connections"),
            });
        }
        Ok(Self {
            id,
            from,
            to,
            bytes,
            connections,
            index,
            grant: Grant::decode(body)?,
        })
    }
}

fn at_most(v: u64, max: u64, what: &'static str) -> Result<u64, DecodeError> {
    if v > max {
        return Err(DecodeError::TooLarge { what, len: v, max });
    }
    Ok(v)
}

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
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::{FrameHeader, MAX_FRAME_LEN};

    fn grant() -> Grant {
        Grant {
            controller_cert: vec![0x30; 300],
            not_after_unix: 1_700_000_000,
            signature: vec![7; 70],
        }
    }

    fn round_trip(msg: Message) {
        let frame = msg.to_frame();
        let mut buf = frame.clone();
        let header = FrameHeader::decode(&mut buf, MAX_FRAME_LEN).unwrap();
        assert_eq!(header.len as usize, buf.len());
        let back = Message::decode(header.kind, &mut buf).unwrap();
        assert_eq!(back, msg);
        // Every strict prefix of the body is refused, never misread.
        for cut in 0..frame.len() - 5 {
            let mut body = &frame[5..5 + cut];
            assert!(
                Message::decode(header.kind, &mut body).is_err(),
                "{} decoded from {cut} bytes",
                msg.name()
            );
        }
    }

    fn bench(probe: Probe) -> Message {
        Message::Bench(Bench {
            id: 0x0123_4567_89ab_cdef,
            probe,
        })
    }

    #[test]
    fn every_probe_round_trips() {
        round_trip(bench(Probe::Source {
            dataset: "mysql".into(),
            sample: 1 << 30,
            chunk_size: 4 << 20,
            compress: 1,
            stage: true,
        }));
        round_trip(bench(Probe::Link {
            to: "east1".into(),
            address: "10.0.0.2:7000".into(),
            bytes: 256 << 20,
            millis: 3000,
            connections: 2,
            grant: grant(),
        }));
        round_trip(bench(Probe::Target {
            dataset: "mysql".into(),
            bytes: 1 << 30,
            chunk_size: 1 << 20,
            compress: 0,
        }));
        round_trip(bench(Probe::Reset));
    }

    #[test]
    fn every_reply_round_trips() {
        let done = |reply| Message::BenchDone {
            node: "west1".into(),
            reply,
        };
        round_trip(done(BenchReply::Failed {
            reason: "unknown dataset".into(),
        }));
        round_trip(done(BenchReply::Source(SourceStats {
            total_bytes: 1 << 40,
            files: 4000,
            read_bytes: 1 << 30,
            read_micros: 2_000_000,
            cached_bytes: 12,
            encode_bytes: 128 << 20,
            wire_bytes: 66 << 20,
            encode_one_micros: 400_000,
            encode_all_micros: 210_000,
            threads: 2,
            staged_bytes: 1 << 30,
            io: "uring".into(),
        })));
        round_trip(done(BenchReply::Link(LinkStats {
            bytes: 256 << 20,
            micros: 1_500_000,
            connections: 2,
        })));
        round_trip(done(BenchReply::Target(TargetStats {
            write_bytes: 1 << 30,
            write_micros: 3_000_000,
            sync_micros: 400_000,
            decode_bytes: 0,
            decode_one_micros: 0,
            decode_all_micros: 0,
            threads: 4,
            io: "threads".into(),
            scratch_dir: "/var/lib/mover/staging".into(),
        })));
        round_trip(done(BenchReply::Reset));
    }

    #[test]
    fn sink_messages_round_trip() {
        round_trip(Message::Sink(Sink {
            id: 9,
            from: "west1".into(),
            to: "east1".into(),
            bytes: 1 << 28,
            connections: 3,
            index: 2,
            grant: grant(),
        }));
        round_trip(Message::SinkDone {
            node: "east1".into(),
            bytes: 1 << 28,
            micros: 99,
        });
    }

    #[test]
    fn out_of_bounds_values_are_refused() {
        let frame = |m: Message| m.to_frame();
        let decode = |f: bytes::Bytes| {
            let mut buf = f;
            let h = FrameHeader::decode(&mut buf, MAX_FRAME_LEN).unwrap();
            Message::decode(h.kind, &mut buf)
        };
        let sample = frame(bench(Probe::Source {
            dataset: "d".into(),
            sample: MAX_SAMPLE + 1,
            chunk_size: 1 << 20,
            compress: 1,
            stage: false,
        }));
        assert!(matches!(
            decode(sample),
            Err(DecodeError::TooLarge {
                what: "sample size",
                ..
            })
        ));
        let sink = Sink {
            id: 1,
            from: "a".into(),
            to: "b".into(),
            bytes: 10,
            connections: 2,
            index: 2,
            grant: grant(),
        };
        assert!(matches!(
            decode(frame(Message::Sink(sink))),
            Err(DecodeError::Invalid {
                what: "connection index",
                ..
            })
        ));
        let link = frame(bench(Probe::Link {
            to: "b".into(),
            address: "b:1".into(),
            bytes: MAX_LINK_BYTES + 1,
            millis: 1,
            connections: 1,
            grant: grant(),
        }));
        assert!(decode(link).is_err());
    }

    #[test]
    fn link_grants_sign_every_field_and_differ_from_transfer_grants() {
        let base = link_grant_bytes(1, "a", "b", 100, 2, 1000);
        assert!(base.starts_with(LINK_GRANT_DOMAIN));
        assert!(!base.starts_with(crate::message::GRANT_DOMAIN));
        for other in [
            link_grant_bytes(2, "a", "b", 100, 2, 1000),
            link_grant_bytes(1, "b", "a", 100, 2, 1000),
            link_grant_bytes(1, "a", "c", 100, 2, 1000),
            link_grant_bytes(1, "ab", "", 100, 2, 1000),
            link_grant_bytes(1, "a", "b", 101, 2, 1000),
            link_grant_bytes(1, "a", "b", 100, 3, 1000),
            link_grant_bytes(1, "a", "b", 100, 2, 1001),
        ] {
            assert_ne!(other, base);
        }
        let sink = Sink {
            id: 1,
            from: "a".into(),
            to: "b".into(),
            bytes: 100,
            connections: 3,
            index: 0,
            grant: Grant {
                not_after_unix: 1000,
                ..grant()
            },
        };
        assert_eq!(
            sink.grant_bytes(),
            link_grant_bytes(1, "a", "b", 100, 3, 1000)
        );
        assert_eq!(
            sink.per_stream(),
            34,
            "three streams carry at least 100 bytes"
        );
    }
}
