//! The arithmetic of `mover bench`: every stage's rate in dataset bytes per second, which
//! stage limits each topology, and how long a reseed of the whole dataset would take. Pure
//! functions of the measurements, so that tests check them without any agent.
//!
//! Network stages carry compressed frames: a link that moves `L` bytes per second of frames
//! moves `L × ratio` bytes of dataset, where `ratio` is raw bytes over frame bytes. Every other
//! stage (reading, encoding, decoding, writing) handles raw dataset bytes.

use serde::Serialize;

/// What was measured, in bytes per second. Links are in frame (wire) bytes; the rest in
/// dataset bytes.
#[derive(Debug, Clone)]
pub struct Measured {
    pub source: String,
    pub source_read: f64,
    /// Hashing and compressing on every core of the source.
    pub encode: f64,
    /// Dataset bytes per frame byte (at least about 1: chunks that do not shrink go raw).
    pub ratio: f64,
    /// Every target, in plan order.
    pub targets: Vec<TargetMeasured>,
}

/// One target's measurements, and the measured link that feeds it.
#[derive(Debug, Clone)]
pub struct TargetMeasured {
    pub node: String,
    /// The node upstream of the measured link into this target.
    pub fed_by: String,
    /// That link's rate, in frame bytes per second.
    pub link: f64,
    /// Decompressing and verifying on every core.
    pub decode: f64,
    /// Writing and syncing its disk.
    pub write: f64,
}

/// How long a reseed of the whole dataset would take in one topology.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub topology: &'static str,
    pub seconds: f64,
    /// Dataset bytes per second, in MB/s, each target receives at (for `serial`, the slowest
    /// copy's).
    pub mb_per_s: f64,
    /// The id of the stage that limits it (for `serial`, the slowest copy's).
    pub limited_by: String,
    pub note: String,
}

/// A stage's id, as the report's stages and estimates name it.
pub fn stage_id(stage: &str, hosts: &[&str]) -> String {
    format!("{stage}:{}", hosts.join("->"))
}

/// The id and rate of the slowest of `stages`; `None` for none.
pub fn slowest(stages: impl IntoIterator<Item = (String, f64)>) -> Option<(String, f64)> {
    stages
        .into_iter()
        .fold(None, |min: Option<(String, f64)>, (id, rate)| match min {
            Some((_, r)) if r <= rate => min,
            _ => Some((id, rate)),
        })
}

impl Measured {
    /// The source's own stages, which every copy goes through.
    fn source_stages(&self) -> [(String, f64); 2] {
        [
            (stage_id("source_read", &[&self.source]), self.source_read),
            (stage_id("encode", &[&self.source]), self.encode),
        ]
    }

    /// Target `t`'s stages, its incoming link at `link` frame bytes per second.
    fn target_stages(&self, t: &TargetMeasured, link: f64) -> [(String, f64); 3] {
        [
            (stage_id("link", &[&t.fed_by, &t.node]), link * self.ratio),
            (stage_id("decode", &[&t.node]), t.decode),
            (stage_id("disk_write", &[&t.node]), t.write),
        ]
    }

    /// The source's uplink: the fastest measured link out of it.
    fn uplink(&self) -> f64 {
        self.targets
            .iter()
            .filter(|t| t.fed_by == self.source)
            .map(|t| t.link)
            .fold(0.0, f64::max)
    }

    /// Every stage of the measured topology, each at its dataset rate, for the table.
    pub fn stages(&self) -> Vec<(String, f64)> {
        let mut v = self.source_stages().to_vec();
        for t in &self.targets {
            v.extend(self.target_stages(t, t.link));
        }
        v
    }
}

/// A chain (source -> t1 -> t2 ...): every node handles the data once, all at the same time,
/// so the slowest stage anywhere sets the pace. Each hop is taken at the rate measured into its
/// target.
pub fn chain(m: &Measured, dataset_bytes: u64) -> Estimate {
    let (limited_by, rate) = slowest(m.stages()).unwrap_or_default();
    estimate("chain", dataset_bytes, rate, limited_by, String::new())
}

/// A star (the source sends to every target itself): the source's uplink is shared by the N
/// targets, so each gets at most a 1/N share of it (and no more than its own measured link).
pub fn star(m: &Measured, dataset_bytes: u64) -> Estimate {
    let n = m.targets.len().max(1) as f64;
    let uplink = m.uplink();
    let mut stages = m.source_stages().to_vec();
    // The links held back to their share of the uplink.
    let mut shared = Vec::new();
    for t in &m.targets {
        let mut s = m.target_stages(t, t.link.min(uplink / n));
        s[0].0 = stage_id("link", &[&m.source, &t.node]);
        if uplink / n < t.link {
            shared.push(s[0].0.clone());
        }
        stages.extend(s);
    }
    let (limited_by, rate) = slowest(stages).unwrap_or_default();
    let note = if shared.contains(&limited_by) {
        format!(
            "the source's uplink ({:.1} MB/s measured) shared by {} targets",
            uplink / 1e6,
            m.targets.len()
        )
    } else {
        String::new()
    };
    estimate("star", dataset_bytes, rate, limited_by, note)
}

/// A serial cascade, as tprovision does it: one one-to-one copy per target, one after the
/// other, each at the pace of its own slowest stage.
pub fn serial(m: &Measured, dataset_bytes: u64) -> Estimate {
    let mut seconds = 0.0;
    let mut slowest_copy: Option<(String, f64)> = None;
    for t in &m.targets {
        let stages = m
            .source_stages()
            .into_iter()
            .chain(m.target_stages(t, t.link));
        let Some((id, rate)) = slowest(stages) else {
            continue;
        };
        seconds += dataset_bytes as f64 / rate;
        if slowest_copy.as_ref().is_none_or(|(_, r)| rate < *r) {
            slowest_copy = Some((id, rate));
        }
    }
    let (limited_by, rate) = slowest_copy.unwrap_or_default();
    Estimate {
        topology: "serial",
        seconds,
        mb_per_s: rate / 1e6,
        limited_by,
        note: format!("{} one-to-one copies, one after another", m.targets.len()),
    }
}

fn estimate(
    topology: &'static str,
    dataset_bytes: u64,
    rate: f64,
    limited_by: String,
    note: String,
) -> Estimate {
    let seconds = if rate > 0.0 {
        dataset_bytes as f64 / rate
    } else {
        f64::INFINITY
    };
    Estimate {
        topology,
        seconds,
        mb_per_s: mb(dataset_bytes as f64, seconds),
        limited_by,
        note,
    }
}

/// Bytes over seconds, in MB/s (10^6 bytes).
pub fn mb(bytes: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes / seconds / 1e6
    } else {
        0.0
    }
}

/// A rate from a byte count and a duration in microseconds (at least 1, so that a tiny
/// measurement does not divide by zero).
pub fn rate(bytes: u64, micros: u64) -> f64 {
    bytes as f64 / (micros.max(1) as f64 / 1e6)
}

/// A duration for people: `850 ms`, `42.0 s`, `12 min 5 s`, `3 h 20 min`.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "unknown".into();
    }
    if seconds < 1.0 {
        return format!("{:.0} ms", seconds * 1000.0);
    }
    if seconds < 120.0 {
        return format!("{seconds:.1} s");
    }
    let s = seconds.round() as u64;
    if s < 3600 {
        return format!("{} min {} s", s / 60, s % 60);
    }
    if s < 48 * 3600 {
        return format!("{} h {} min", s / 3600, s % 3600 / 60);
    }
    format!("{} d {} h", s / 86_400, s % 86_400 / 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn target(node: &str, fed_by: &str, link: f64, decode: f64, write: f64) -> TargetMeasured {
        TargetMeasured {
            node: node.into(),
            fed_by: fed_by.into(),
            link: link * MB,
            decode: decode * MB,
            write: write * MB,
        }
    }

    /// A chain west1 -> east1 -> east2 where the second hop is the slowest stage.
    fn chain_measured() -> Measured {
        Measured {
            source: "west1".into(),
            source_read: 500.0 * MB,
            encode: 600.0 * MB,
            ratio: 2.0,
            targets: vec![
                target("east1", "west1", 100.0, 900.0, 300.0),
                target("east2", "east1", 80.0, 900.0, 300.0),
            ],
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn a_link_carries_its_rate_times_the_ratio_of_dataset() {
        let m = chain_measured();
        let stages = m.stages();
        let hop = stages
            .iter()
            .find(|(id, _)| id == "link:east1->east2")
            .expect("the second hop is a stage");
        assert!(close(hop.1, 160.0 * MB), "{hop:?}");
        assert_eq!(stages.len(), 2 + 3 * 2);
    }

    #[test]
    fn a_chain_goes_at_its_slowest_stage() {
        let e = chain(&chain_measured(), 1_600_000_000);
        assert_eq!(e.limited_by, "link:east1->east2");
        assert!(close(e.seconds, 10.0), "{e:?}");
        assert!(close(e.mb_per_s, 160.0), "{e:?}");

        // A slow disk anywhere is the limit instead.
        let mut m = chain_measured();
        m.targets[0].write = 50.0 * MB;
        let e = chain(&m, 1_000_000_000);
        assert_eq!(e.limited_by, "disk_write:east1");
        assert!(close(e.seconds, 20.0), "{e:?}");
    }

    #[test]
    fn a_star_shares_the_source_uplink() {
        // Uplink 100 MB/s of frames shared by 2: 50 each, 100 MB/s of dataset.
        let e = star(&chain_measured(), 1_000_000_000);
        assert_eq!(e.limited_by, "link:west1->east1");
        assert!(close(e.seconds, 10.0), "{e:?}");
        assert!(e.note.contains("shared by 2"), "{e:?}");

        // With a fast uplink a target's own link is the limit, and nothing is shared.
        let mut m = chain_measured();
        m.targets[0].link = 1000.0 * MB;
        let e = star(&m, 1_000_000_000);
        assert_eq!(e.limited_by, "link:west1->east2");
        assert!(close(e.mb_per_s, 160.0), "{e:?}");
        assert!(e.note.is_empty(), "{e:?}");
    }

    #[test]
    fn a_serial_cascade_adds_one_copy_per_target() {
        let m = chain_measured();
        // Copy 1 at min(500, 600, 200, 900, 300) = 200 MB/s, copy 2 at 160 MB/s.
        let e = serial(&m, 1_600_000_000);
        assert!(close(e.seconds, 8.0 + 10.0), "{e:?}");
        assert_eq!(e.limited_by, "link:east1->east2");
        assert!(close(e.mb_per_s, 160.0), "the slowest copy's rate: {e:?}");
        assert!(e.seconds >= chain(&m, 1_600_000_000).seconds);
    }

    #[test]
    fn serial_is_never_faster_than_a_chain() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let mut r = || 1.0 + rng.f64() * 1000.0;
            let n = 1 + (r() as usize) % 5;
            let mut m = Measured {
                source: "s".into(),
                source_read: r() * MB,
                encode: r() * MB,
                ratio: 1.0 + r() / 500.0,
                targets: Vec::new(),
            };
            for i in 0..n {
                let fed_by = if i == 0 {
                    "s".into()
                } else {
                    format!("t{}", i - 1)
                };
                m.targets
                    .push(target(&format!("t{i}"), &fed_by, r(), r(), r()));
            }
            let bytes = 1u64 << 30;
            let (c, s, st) = (chain(&m, bytes), serial(&m, bytes), star(&m, bytes));
            assert!(s.seconds >= c.seconds * (1.0 - 1e-12), "{c:?} {s:?}");
            assert!(st.seconds >= c.seconds * (1.0 - 1e-12), "{c:?} {st:?}");
            assert!(c.seconds > 0.0 && c.seconds.is_finite());
        }
    }

    #[test]
    fn the_slowest_stage_is_the_first_of_equals() {
        assert_eq!(slowest(Vec::new()), None);
        let s = slowest([("a".into(), 2.0), ("b".into(), 1.0), ("c".into(), 1.0)]);
        assert_eq!(s, Some(("b".into(), 1.0)));
    }

    #[test]
    fn rates_and_durations() {
        assert!(close(rate(1_000_000, 1_000_000), 1e6));
        assert!(rate(5, 0).is_finite());
        assert_eq!(human_duration(0.25), "250 ms");
        assert_eq!(human_duration(42.04), "42.0 s");
        assert_eq!(human_duration(725.0), "12 min 5 s");
        assert_eq!(human_duration(12_000.0), "3 h 20 min");
        assert_eq!(human_duration(f64::INFINITY), "unknown");
    }
}
