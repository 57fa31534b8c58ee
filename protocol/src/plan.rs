//! The topology of a transfer: who sends to whom.
//!
//! A plan is a tree of nodes rooted at the source (node 0). Each node's parent comes before it,
//! so a plan is valid as soon as it decodes. The default is a chain (source -> t1 -> t2 -> …),
//! which carries the data over the source's link and disk once however many targets there are;
//! a star has every target read from the source; `tree:K` gives each node up to K children.

use std::fmt;
use std::str::FromStr;

use bytes::{Buf, BufMut};

use crate::codec::{get_string, get_u16, put_bytes16, DecodeError};

/// Most nodes one transfer may involve.
pub const MAX_PLAN_NODES: usize = 1024;
/// Longest node, dataset or address string.
pub const MAX_NAME: usize = 255;

/// How targets are arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Chain,
    Star,
    /// Each node forwards to at most this many children (breadth first).
    Tree(u16),
}

impl FromStr for Topology {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "chain" => Ok(Self::Chain),
            "star" => Ok(Self::Star),
            _ => match s.strip_prefix("tree:").map(str::parse::<u16>) {
                Some(Ok(k)) if k >= 1 => Ok(Self::Tree(k)),
                _ => Err(format!(
                    "unknown topology {s:?}: use chain, star or tree:K with K >= 1"
                )),
            },
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Chain => f.write_str("chain"),
            Self::Star => f.write_str("star"),
            Self::Tree(k) => write!(f, "tree:{k}"),
        }
    }
}

/// One participant of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanNode {
    /// The node's name, as in its certificate.
    pub name: String,
    /// Where its agent listens (`host:port`).
    pub address: String,
    /// The dataset it sends (the source) or receives (a target).
    pub dataset: String,
    /// Index of the node that sends to it; `None` only for the source.
    pub parent: Option<u16>,
}

/// Who sends to whom. Node 0 is the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    nodes: Vec<PlanNode>,
}

impl Plan {
    /// Lays out `targets` under `source` in the given topology. Parents are filled in here.
    pub fn build(
        source: PlanNode,
        targets: Vec<PlanNode>,
        topology: Topology,
    ) -> Result<Self, DecodeError> {
        if topology == Topology::Tree(0) {
            return Err(DecodeError::Invalid {
                what: "plan",
                why: "a tree needs at least one child per node".into(),
            });
        }
        let mut nodes = vec![PlanNode {
            parent: None,
            ..source
        }];
        for (i, t) in targets.into_iter().enumerate() {
            let idx = i + 1;
            let parent = match topology {
                Topology::Chain => idx - 1,
                Topology::Star => 0,
                Topology::Tree(k) => (idx - 1) / usize::from(k),
            };
            nodes.push(PlanNode {
                parent: Some(parent as u16),
                ..t
            });
        }
        Self::from_nodes(nodes)
    }

    /// Checks a list of nodes: the source first, every parent before its child, unique names.
    pub fn from_nodes(nodes: Vec<PlanNode>) -> Result<Self, DecodeError> {
        let invalid = |why: String| DecodeError::Invalid { what: "plan", why };
        if nodes.len() < 2 || nodes.len() > MAX_PLAN_NODES {
            return Err(invalid(format!(
                "has {} nodes; a transfer needs a source and 1 to {} targets",
                nodes.len(),
                MAX_PLAN_NODES - 1
            )));
        }
        for (i, n) in nodes.iter().enumerate() {
            match (i, n.parent) {
                (0, None) => {}
                (0, Some(_)) => return Err(invalid("the source has a parent".into())),
                (_, Some(p)) if usize::from(p) < i => {}
                _ => return Err(invalid(format!("node {} has no earlier parent", n.name))),
            }
            for (what, v) in [
                ("name", &n.name),
                ("address", &n.address),
                ("dataset", &n.dataset),
            ] {
                if v.len() > MAX_NAME {
                    return Err(invalid(format!(
                        "node {what} {v:?} is longer than {MAX_NAME} bytes"
                    )));
                }
            }
            if nodes[..i].iter().any(|o| o.name == n.name) {
                return Err(invalid(format!("node {} appears twice", n.name)));
            }
        }
        Ok(Self { nodes })
    }

    pub fn nodes(&self) -> &[PlanNode] {
        &self.nodes
    }

    pub fn source(&self) -> &PlanNode {
        &self.nodes[0]
    }

    pub fn targets(&self) -> &[PlanNode] {
        &self.nodes[1..]
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Indices of the nodes that `idx` sends to.
    pub fn children(&self, idx: usize) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.parent.map(usize::from) == Some(idx))
            .map(|(i, _)| i)
            .collect()
    }

    /// Every node below `idx`, in plan order.
    pub fn descendants(&self, idx: usize) -> Vec<usize> {
        let mut below = vec![false; self.nodes.len()];
        below[idx] = true;
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate().skip(idx + 1) {
            if n.parent.is_some_and(|p| below[usize::from(p)]) {
                below[i] = true;
                out.push(i);
            }
        }
        out
    }

    pub(crate) fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u16(self.nodes.len() as u16);
        for n in &self.nodes {
            put_bytes16(buf, n.name.as_bytes());
            put_bytes16(buf, n.address.as_bytes());
            put_bytes16(buf, n.dataset.as_bytes());
            buf.put_u16(n.parent.unwrap_or(u16::MAX));
        }
    }

    pub(crate) fn decode(buf: &mut impl Buf) -> Result<Self, DecodeError> {
        let count = usize::from(get_u16(buf, "plan node count")?);
        if count > MAX_PLAN_NODES {
            return Err(DecodeError::TooLarge {
                what: "plan node count",
                len: count as u64,
                max: MAX_PLAN_NODES as u64,
            });
        }
        // Each node takes at least 8 bytes: refuse a count the body cannot hold.
        crate::codec::need(buf, count * 8, "plan nodes")?;
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let name = get_string(buf, MAX_NAME, "node name")?;
            let address = get_string(buf, MAX_NAME, "node address")?;
            let dataset = get_string(buf, MAX_NAME, "dataset name")?;
            let parent = match get_u16(buf, "node parent")? {
                u16::MAX => None,
                p => Some(p),
            };
            nodes.push(PlanNode {
                name,
                address,
                dataset,
                parent,
            });
        }
        Self::from_nodes(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str) -> PlanNode {
        PlanNode {
            name: name.into(),
            address: format!("{name}:1"),
            dataset: "d".into(),
            parent: None,
        }
    }

    fn parents(p: &Plan) -> Vec<Option<u16>> {
        p.nodes().iter().map(|n| n.parent).collect()
    }

    #[test]
    fn topologies_lay_out_parents() {
        let t = || vec![n("a"), n("b"), n("c"), n("d")];
        let chain = Plan::build(n("s"), t(), Topology::Chain).unwrap();
        assert_eq!(parents(&chain), [None, Some(0), Some(1), Some(2), Some(3)]);
        let star = Plan::build(n("s"), t(), Topology::Star).unwrap();
        assert_eq!(parents(&star), [None, Some(0), Some(0), Some(0), Some(0)]);
        let tree = Plan::build(n("s"), t(), Topology::Tree(2)).unwrap();
        assert_eq!(parents(&tree), [None, Some(0), Some(0), Some(1), Some(1)]);
        assert_eq!(tree.children(1), [3, 4]);
        assert_eq!(tree.descendants(1), [3, 4]);
        assert_eq!(chain.descendants(2), [3, 4]);
    }

    #[test]
    fn refuses_bad_plans() {
        assert!(Plan::build(n("s"), vec![], Topology::Chain).is_err());
        assert!(Plan::build(n("s"), vec![n("a"), n("a")], Topology::Chain).is_err());
        let mut bad = vec![n("s"), n("a")];
        bad[1].parent = Some(1);
        assert!(Plan::from_nodes(bad).is_err());
    }

    #[test]
    fn parses_topologies() {
        assert_eq!("chain".parse::<Topology>(), Ok(Topology::Chain));
        assert_eq!("tree:3".parse::<Topology>(), Ok(Topology::Tree(3)));
        assert!("tree:0".parse::<Topology>().is_err());
        assert!("ring".parse::<Topology>().is_err());
    }
}
