//! The planner: an operation and an inventory in, a runbook out. Pure, so that the exact
//! steps of every operation are tested without an agent.
//!
//! `reseed-site` is the active/active recovery of issue 4 (site `east` rebuilt from `west`):
//!
//! 1. `policy_maintenance` on east.
//! 2. `routers_offline` on east.
//! 3. On every west host, in parallel: `replicator_offline` then `replicator_reset` of the
//!    service that applies east's writes (`west_from_east`), so that nothing reads east
//!    while it is rebuilt; then a wait for all of them.
//! 4. On every east host, in parallel: `replicator_offline` then `replicator_reset` of the
//!    local service (`east`), then `database_stop` (tprovision stops its target too).
//! 5. One chained transfer (steps 5-6 of the issue): the source (default: west's primary)
//!    to east's primary, then on to the other east hosts in inventory order. With a backup
//!    method the source's agent takes the backup and each target's agent prepares its copy
//!    in staging before it commits: neither is a step of its own.
//! 6. On each target `database_start`; `mark_primary` and `replicator_online` of the local
//!    service on the first, then `replicator_online` on the others (they follow it).
//! 7. On every west host: `replicator_online` of `west_from_east`, after the commit and the
//!    new primary.
//! 8. `routers_online` on east, once every east replicator is online.
//! 9. `policy_automatic` on east.
//!
//! `provision` is tprovision for one or many targets: on each target `replicator_offline`
//! (of its site's local service, if it runs one) and `database_stop`; one chained transfer in
//! the order given (prepared before commit, as above); then on each target `database_start`,
//! `replicator_reset`, `mark_primary` on the first with `--create-master`, and
//! `replicator_online`.

use super::hooks::HookAction;
use super::inventory::{Host, Inventory, Method};
use super::runbook::{Runbook, Step, StepAction, StepId, Target, Transfer};

/// What the operator asked for; journalled (as JSON) so that `resume` plans it again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "operation", rename_all = "kebab-case")]
pub enum Operation {
    /// Rebuild every host of `site` from `from_site`.
    ReseedSite {
        from_site: String,
        site: String,
        /// A host of `from_site`; default: its primary.
        source: Option<String>,
    },
    /// Copy `source`'s database to `targets`, chained in the order given.
    Provision {
        source: String,
        method: Method,
        /// The first target becomes its site's primary (tprovision `-c`).
        create_master: bool,
        threads: Option<u32>,
        targets: Vec<String>,
    },
}

/// An operation that cannot be planned against this inventory. Retrying cannot help: fix
/// the command or the inventory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{site} is not a site of the inventory (sites: {known})")]
    UnknownSite { site: String, known: String },
    #[error("{host} is not a host of the inventory")]
    UnknownHost { host: String },
    #[error("cannot reseed site {site} from itself: name the site that holds the right data")]
    SameSite { site: String },
    #[error("source {host} is in site {actual}, not {from_site}: choose one of {hosts}")]
    SourceNotInSite {
        host: String,
        actual: String,
        from_site: String,
        hosts: String,
    },
    #[error("{host} is both the source and a target")]
    TargetIsSource { host: String },
    #[error("{host} is named twice as a target")]
    DuplicateTarget { host: String },
    #[error("no targets: name at least one host to provision")]
    NoTargets,
    #[error("host {host} runs no replication service applying site {from_site}: add it to its replication table")]
    MissingService { host: String, from_site: String },
    #[error("threads must be at least 1")]
    ZeroThreads,
}

/// Plans `op` against `inventory`.
pub fn plan(op: &Operation, inventory: &Inventory) -> Result<Runbook, PlanError> {
    match op {
        Operation::ReseedSite {
            from_site,
            site,
            source,
        } => reseed_site(inventory, from_site, site, source.as_deref()),
        Operation::Provision {
            source,
            method,
            create_master,
            threads,
            targets,
        } => provision(
            inventory,
            source,
            *method,
            *create_master,
            *threads,
            targets,
        ),
    }
}

#[derive(Default)]
struct Builder {
    steps: Vec<Step>,
}

impl Builder {
    fn add(&mut self, on: Target, action: StepAction, after: &[StepId]) -> StepId {
        let id = StepId(self.steps.len() as u32 + 1);
        let mut after = after.to_vec();
        after.sort();
        after.dedup();
        self.steps.push(Step {
            id,
            on,
            action,
            after,
        });
        id
    }

    fn hook(
        &mut self,
        on: Target,
        action: HookAction,
        service: Option<&str>,
        after: &[StepId],
    ) -> StepId {
        let action = StepAction::Hook {
            action,
            service: service.map(str::to_owned),
        };
        self.add(on, action, after)
    }

    /// One chained transfer of the inventory's database from `source` to `targets`, run by
    /// the source's agent.
    fn transfer(
        &mut self,
        inv: &Inventory,
        source: &Host,
        targets: &[&Host],
        method: Method,
        threads: Option<u32>,
        after: &[StepId],
    ) -> StepId {
        let action = StepAction::Transfer(Transfer {
            source: source.name.clone(),
            targets: targets.iter().map(|h| h.name.clone()).collect(),
            dataset: inv.database().name.clone(),
            method,
            threads,
        });
        self.add(Target::Host(source.name.clone()), action, after)
    }

    fn site(&mut self, site: &str, action: HookAction, after: &[StepId]) -> StepId {
        self.hook(Target::Site(site.to_owned()), action, None, after)
    }

    fn host(
        &mut self,
        host: &str,
        action: HookAction,
        service: Option<&str>,
        after: &[StepId],
    ) -> StepId {
        self.hook(Target::Host(host.to_owned()), action, service, after)
    }
}

fn known_site<'a>(inv: &'a Inventory, site: &str) -> Result<&'a super::inventory::Site, PlanError> {
    inv.site(site).ok_or_else(|| PlanError::UnknownSite {
        site: site.to_owned(),
        known: inv
            .sites()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn known_host<'a>(inv: &'a Inventory, host: &str) -> Result<&'a Host, PlanError> {
    inv.host(host).ok_or_else(|| PlanError::UnknownHost {
        host: host.to_owned(),
    })
}

fn service_from<'a>(host: &'a Host, from_site: &str) -> Result<&'a str, PlanError> {
    host.service_from(from_site)
        .ok_or_else(|| PlanError::MissingService {
            host: host.name.clone(),
            from_site: from_site.to_owned(),
        })
}

/// After the commit: start each target. (A backup method's copy was prepared by each
/// target's agent before it committed, as part of the transfer.) Returns the start step of
/// each target, in chain order.
fn start_targets(b: &mut Builder, targets: &[&Host], transfer: StepId) -> Vec<StepId> {
    targets
        .iter()
        .map(|t| b.host(&t.name, HookAction::DatabaseStart, None, &[transfer]))
        .collect()
}

fn reseed_site(
    inv: &Inventory,
    from_site: &str,
    site: &str,
    source: Option<&str>,
) -> Result<Runbook, PlanError> {
    let from = known_site(inv, from_site)?;
    let rebuilt = known_site(inv, site)?;
    if from.name == rebuilt.name {
        return Err(PlanError::SameSite {
            site: site.to_owned(),
        });
    }
    let source = known_host(inv, source.unwrap_or(&from.primary))?;
    if source.site != from.name {
        return Err(PlanError::SourceNotInSite {
            host: source.name.clone(),
            actual: source.site.clone(),
            from_site: from.name.clone(),
            hosts: from.hosts.join(", "),
        });
    }
    let from_hosts: Vec<&Host> = inv.hosts_of(&from.name).collect();
    // The rebuilt site's primary first: it is the first hop and becomes the primary again.
    let mut targets: Vec<&Host> = inv.hosts_of(&rebuilt.name).collect();
    targets.sort_by_key(|h| h.name != rebuilt.primary);
    let cross: Vec<&str> = from_hosts
        .iter()
        .map(|h| service_from(h, &rebuilt.name))
        .collect::<Result<_, _>>()?;
    let local: Vec<&str> = targets
        .iter()
        .map(|h| service_from(h, &rebuilt.name))
        .collect::<Result<_, _>>()?;

    let mut b = Builder::default();
    let maintenance = b.site(site, HookAction::PolicyMaintenance, &[]);
    let routers_off = b.site(site, HookAction::RoutersOffline, &[maintenance]);
    let mut cross_reset = Vec::new();
    for (h, svc) in from_hosts.iter().zip(&cross) {
        let off = b.host(
            &h.name,
            HookAction::ReplicatorOffline,
            Some(svc),
            &[routers_off],
        );
        cross_reset.push(b.host(&h.name, HookAction::ReplicatorReset, Some(svc), &[off]));
    }
    let mut services = cross.clone();
    services.sort_unstable();
    services.dedup();
    let quiet = b.add(
        Target::Controller,
        StepAction::Wait {
            reason: format!(
                "{} on {} {} reset",
                services.join(", "),
                from.name,
                if from_hosts.len() == 1 { "is" } else { "are" }
            ),
        },
        &cross_reset,
    );
    let mut stopped = Vec::new();
    for (h, svc) in targets.iter().zip(&local) {
        let off = b.host(&h.name, HookAction::ReplicatorOffline, Some(svc), &[quiet]);
        let reset = b.host(&h.name, HookAction::ReplicatorReset, Some(svc), &[off]);
        stopped.push(b.host(&h.name, HookAction::DatabaseStop, None, &[reset]));
    }
    let method = inv.database().method;
    let transfer = b.transfer(inv, source, &targets, method, None, &stopped);
    let started = start_targets(&mut b, &targets, transfer);
    // The new primary first, then the replicas follow it.
    let primary = b.host(
        &targets[0].name,
        HookAction::MarkPrimary,
        Some(local[0]),
        &started[..1],
    );
    let primary_online = b.host(
        &targets[0].name,
        HookAction::ReplicatorOnline,
        Some(local[0]),
        &[primary],
    );
    let mut ready = vec![primary_online];
    for ((h, svc), start) in targets.iter().zip(&local).zip(&started).skip(1) {
        ready.push(b.host(
            &h.name,
            HookAction::ReplicatorOnline,
            Some(svc),
            &[*start, primary_online],
        ));
    }
    for (h, svc) in from_hosts.iter().zip(&cross) {
        ready.push(b.host(
            &h.name,
            HookAction::ReplicatorOnline,
            Some(svc),
            &[transfer, primary],
        ));
    }
    let routers_on = b.site(site, HookAction::RoutersOnline, &ready);
    b.site(site, HookAction::PolicyAutomatic, &[routers_on]);
    Ok(Runbook {
        title: format!(
            "reseed-site {} from {} (source {})",
            rebuilt.name, from.name, source.name
        ),
        steps: b.steps,
    })
}

fn provision(
    inv: &Inventory,
    source: &str,
    method: Method,
    create_master: bool,
    threads: Option<u32>,
    targets: &[String],
) -> Result<Runbook, PlanError> {
    let source = known_host(inv, source)?;
    if threads == Some(0) {
        return Err(PlanError::ZeroThreads);
    }
    if targets.is_empty() {
        return Err(PlanError::NoTargets);
    }
    let mut hosts: Vec<&Host> = Vec::new();
    for t in targets {
        let h = known_host(inv, t)?;
        if h.name == source.name {
            return Err(PlanError::TargetIsSource {
                host: h.name.clone(),
            });
        }
        if hosts.iter().any(|o| o.name == h.name) {
            return Err(PlanError::DuplicateTarget {
                host: h.name.clone(),
            });
        }
        hosts.push(h);
    }
    // The new master needs a service to take the role; the others reset theirs if they
    // run one.
    let local: Vec<Option<&str>> = hosts.iter().map(|h| h.service_from(&h.site)).collect();
    if create_master && local[0].is_none() {
        return Err(PlanError::MissingService {
            host: hosts[0].name.clone(),
            from_site: hosts[0].site.clone(),
        });
    }

    let mut b = Builder::default();
    let mut stopped = Vec::new();
    for (h, svc) in hosts.iter().zip(&local) {
        let after = match svc {
            Some(svc) => vec![b.host(&h.name, HookAction::ReplicatorOffline, Some(svc), &[])],
            None => Vec::new(),
        };
        stopped.push(b.host(&h.name, HookAction::DatabaseStop, None, &after));
    }
    let transfer = b.transfer(inv, source, &hosts, method, threads, &stopped);
    for (i, (h, svc)) in hosts.iter().zip(&local).enumerate() {
        let start = b.host(&h.name, HookAction::DatabaseStart, None, &[transfer]);
        let Some(svc) = svc else { continue };
        let mut last = b.host(&h.name, HookAction::ReplicatorReset, Some(svc), &[start]);
        if create_master && i == 0 {
            last = b.host(&h.name, HookAction::MarkPrimary, Some(svc), &[last]);
        }
        b.host(&h.name, HookAction::ReplicatorOnline, Some(svc), &[last]);
    }
    Ok(Runbook {
        title: format!(
            "provision {} from {} ({}{})",
            targets.join(", "),
            source.name,
            method,
            if create_master { ", create master" } else { "" }
        ),
        steps: b.steps,
    })
}

/// The action that undoes `action`, if there is one: maintenance and offline states are
/// undone; a reset, a new primary or a committed copy cannot be.
fn inverse(action: HookAction) -> Option<HookAction> {
    match action {
        HookAction::PolicyMaintenance => Some(HookAction::PolicyAutomatic),
        HookAction::RoutersOffline => Some(HookAction::RoutersOnline),
        HookAction::ReplicatorOffline => Some(HookAction::ReplicatorOnline),
        HookAction::DatabaseStop => Some(HookAction::DatabaseStart),
        _ => None,
    }
}

/// The way back from a runbook stopped part-way: the inverse of every state it left changed
/// (a site in maintenance, routers or replicators offline, a database stopped), newest
/// first, one at a time. `done` are the steps that finished. Also returns, for people, what
/// cannot be undone (a replicator reset, a committed copy, a new primary).
pub fn rollback(original: &Runbook, done: &[StepId], title: String) -> (Runbook, Vec<String>) {
    // What each done step left changed, keyed by where and what: an action and its inverse
    // both done cancel out.
    let mut open: Vec<(&Step, HookAction, Option<&str>)> = Vec::new();
    let mut kept = Vec::new();
    for s in original.steps.iter().filter(|s| done.contains(&s.id)) {
        match &s.action {
            StepAction::Hook { action, service } => {
                if let Some(i) = open.iter().position(|(o, a, svc)| {
                    o.on == s.on && *a == *action && *svc == service.as_deref()
                }) {
                    open.remove(i);
                } else if let Some(undo) = inverse(*action) {
                    open.push((s, undo, service.as_deref()));
                } else {
                    kept.push(format!(
                        "step {} ({} on {}) cannot be undone",
                        s.id,
                        s.describe(),
                        s.on
                    ));
                }
            }
            StepAction::Transfer(t) => kept.push(format!(
                "step {} committed {} on {}: the copy stays",
                s.id,
                t.dataset,
                t.targets.join(", ")
            )),
            StepAction::Wait { .. } => {}
        }
    }
    let mut b = Builder::default();
    let mut last: Option<StepId> = None;
    for (s, undo, service) in open.into_iter().rev() {
        let after: Vec<StepId> = last.into_iter().collect();
        last = Some(b.hook(s.on.clone(), undo, service, &after));
    }
    (
        Runbook {
            title,
            steps: b.steps,
        },
        kept,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Sites west and east with `n` hosts each; `east_primary` is the number of east's primary.
    fn cluster(n: usize, east_primary: usize) -> Inventory {
        let mut t = String::from(
            "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n\
             [sites.west]\nreplication = { west = \"west\", west_from_east = \"east\" }\n\
             [sites.east]\nreplication = { east = \"east\", east_from_west = \"west\" }\n",
        );
        for site in ["west", "east"] {
            let primary = if site == "west" { 1 } else { east_primary };
            for i in 1..=n {
                let role = if i == primary { "primary" } else { "replica" };
                let port = if site == "west" { 7000 + i } else { 7100 + i };
                t.push_str(&format!(
                    "[nodes.{site}{i}]\naddress = \"127.0.0.1:{port}\"\nsite = \"{site}\"\nrole = \"{role}\"\n"
                ));
            }
        }
        t.push_str("[datasets.mysql]\nmethod = \"xtrabackup\"\n[hooks]\nprofile = \"tungsten\"\n");
        Inventory::parse(&t, Path::new("cluster.toml")).unwrap()
    }

    fn reseed(source: Option<&str>) -> Operation {
        Operation::ReseedSite {
            from_site: "west".into(),
            site: "east".into(),
            source: source.map(str::to_owned),
        }
    }

    fn provision(source: &str, method: Method, create_master: bool, targets: &[&str]) -> Operation {
        Operation::Provision {
            source: source.into(),
            method,
            create_master,
            threads: None,
            targets: targets.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// One line per step: `id on: what <- after`.
    fn summary(rb: &Runbook) -> Vec<String> {
        rb.lines()
    }

    fn check(op: &Operation, inv: &Inventory, expected: &[&str]) -> Runbook {
        let rb = plan(op, inv).unwrap();
        assert_eq!(summary(&rb), expected, "\n{}", summary(&rb).join("\n"));
        for s in &rb.steps {
            assert!(
                s.after.iter().all(|a| *a < s.id),
                "{s:?} depends on a later step"
            );
        }
        rb
    }

    #[test]
    fn reseed_site_one_host_per_site() {
        check(
            &reseed(None),
            &cluster(1, 1),
            &[
                "1 site east: policy maintenance",
                "2 site east: routers offline <- 1",
                "3 west1: replicator west_from_east offline <- 2",
                "4 west1: replicator west_from_east reset <- 3",
                "5 controller: wait until west_from_east on west is reset <- 4",
                "6 east1: replicator east offline <- 5",
                "7 east1: replicator east reset <- 6",
                "8 east1: stop the database <- 7",
                "9 west1: transfer mysql (xtrabackup) west1 -> east1 <- 8",
                "10 east1: start the database <- 9",
                "11 east1: mark primary for east <- 10",
                "12 east1: replicator east online <- 11",
                "13 west1: replicator west_from_east online <- 9,11",
                "14 site east: routers online <- 12,13",
                "15 site east: policy automatic <- 14",
            ],
        );
    }

    #[test]
    fn reseed_site_two_hosts_per_site() {
        check(
            &reseed(None),
            &cluster(2, 1),
            &[
                "1 site east: policy maintenance",
                "2 site east: routers offline <- 1",
                "3 west1: replicator west_from_east offline <- 2",
                "4 west1: replicator west_from_east reset <- 3",
                "5 west2: replicator west_from_east offline <- 2",
                "6 west2: replicator west_from_east reset <- 5",
                "7 controller: wait until west_from_east on west are reset <- 4,6",
                "8 east1: replicator east offline <- 7",
                "9 east1: replicator east reset <- 8",
                "10 east1: stop the database <- 9",
                "11 east2: replicator east offline <- 7",
                "12 east2: replicator east reset <- 11",
                "13 east2: stop the database <- 12",
                "14 west1: transfer mysql (xtrabackup) west1 -> east1 -> east2 <- 10,13",
                "15 east1: start the database <- 14",
                "16 east2: start the database <- 14",
                "17 east1: mark primary for east <- 15",
                "18 east1: replicator east online <- 17",
                "19 east2: replicator east online <- 16,18",
                "20 west1: replicator west_from_east online <- 14,17",
                "21 west2: replicator west_from_east online <- 14,17",
                "22 site east: routers online <- 18,19,20,21",
                "23 site east: policy automatic <- 22",
            ],
        );
    }

    const RESEED_THREE: [&str; 31] = [
        "1 site east: policy maintenance",
        "2 site east: routers offline <- 1",
        "3 west1: replicator west_from_east offline <- 2",
        "4 west1: replicator west_from_east reset <- 3",
        "5 west2: replicator west_from_east offline <- 2",
        "6 west2: replicator west_from_east reset <- 5",
        "7 west3: replicator west_from_east offline <- 2",
        "8 west3: replicator west_from_east reset <- 7",
        "9 controller: wait until west_from_east on west are reset <- 4,6,8",
        "10 east1: replicator east offline <- 9",
        "11 east1: replicator east reset <- 10",
        "12 east1: stop the database <- 11",
        "13 east2: replicator east offline <- 9",
        "14 east2: replicator east reset <- 13",
        "15 east2: stop the database <- 14",
        "16 east3: replicator east offline <- 9",
        "17 east3: replicator east reset <- 16",
        "18 east3: stop the database <- 17",
        "19 west1: transfer mysql (xtrabackup) west1 -> east1 -> east2 -> east3 <- 12,15,18",
        "20 east1: start the database <- 19",
        "21 east2: start the database <- 19",
        "22 east3: start the database <- 19",
        "23 east1: mark primary for east <- 20",
        "24 east1: replicator east online <- 23",
        "25 east2: replicator east online <- 21,24",
        "26 east3: replicator east online <- 22,24",
        "27 west1: replicator west_from_east online <- 19,23",
        "28 west2: replicator west_from_east online <- 19,23",
        "29 west3: replicator west_from_east online <- 19,23",
        "30 site east: routers online <- 24,25,26,27,28,29",
        "31 site east: policy automatic <- 30",
    ];

    #[test]
    fn reseed_site_three_hosts_per_site() {
        let inv = cluster(3, 1);
        check(&reseed(None), &inv, &RESEED_THREE);
        // Naming the default source changes nothing.
        check(&reseed(Some("west1")), &inv, &RESEED_THREE);
        let rb = plan(&reseed(None), &inv).unwrap();
        assert_eq!(rb.title, "reseed-site east from west (source west1)");
    }

    #[test]
    fn reseed_site_from_another_source_to_another_primary() {
        // west2 sends; east2 is east's primary, so it is the first hop and is marked primary.
        let rb = plan(&reseed(Some("west2")), &cluster(3, 2)).unwrap();
        let lines = summary(&rb);
        assert_eq!(lines[9], "10 east2: replicator east offline <- 9");
        assert_eq!(lines[12], "13 east1: replicator east offline <- 9");
        assert_eq!(
            lines[18],
            "19 west2: transfer mysql (xtrabackup) west2 -> east2 -> east1 -> east3 <- 12,15,18"
        );
        assert_eq!(lines[19], "20 east2: start the database <- 19");
        assert_eq!(lines[22], "23 east2: mark primary for east <- 20");
        assert_eq!(lines[23], "24 east2: replicator east online <- 23");
        assert_eq!(lines[24], "25 east1: replicator east online <- 21,24");
        let StepAction::Transfer(t) = &rb.steps[18].action else {
            panic!("step 19 is not the transfer");
        };
        assert_eq!(t.source, "west2");
        assert_eq!(t.targets, ["east2", "east1", "east3"]);
        assert_eq!(rb.steps[18].on, Target::Host("west2".into()));
    }

    #[test]
    fn reseed_site_the_other_way_uses_the_other_services() {
        let rb = plan(
            &Operation::ReseedSite {
                from_site: "east".into(),
                site: "west".into(),
                source: None,
            },
            &cluster(1, 1),
        )
        .unwrap();
        let lines = summary(&rb);
        assert_eq!(lines[2], "3 east1: replicator east_from_west offline <- 2");
        assert_eq!(lines[5], "6 west1: replicator west offline <- 5");
        assert_eq!(
            lines[8],
            "9 east1: transfer mysql (xtrabackup) east1 -> west1 <- 8"
        );
    }

    #[test]
    fn provision_one_target() {
        check(
            &provision("west1", Method::Xtrabackup, true, &["east1"]),
            &cluster(3, 1),
            &[
                "1 east1: replicator east offline",
                "2 east1: stop the database <- 1",
                "3 west1: transfer mysql (xtrabackup) west1 -> east1 <- 2",
                "4 east1: start the database <- 3",
                "5 east1: replicator east reset <- 4",
                "6 east1: mark primary for east <- 5",
                "7 east1: replicator east online <- 6",
            ],
        );
    }

    #[test]
    fn provision_two_targets_files_without_master() {
        check(
            &provision("east1", Method::Files, false, &["east3", "east2"]),
            &cluster(3, 1),
            &[
                "1 east3: replicator east offline",
                "2 east3: stop the database <- 1",
                "3 east2: replicator east offline",
                "4 east2: stop the database <- 3",
                "5 east1: transfer mysql (files) east1 -> east3 -> east2 <- 2,4",
                "6 east3: start the database <- 5",
                "7 east3: replicator east reset <- 6",
                "8 east3: replicator east online <- 7",
                "9 east2: start the database <- 5",
                "10 east2: replicator east reset <- 9",
                "11 east2: replicator east online <- 10",
            ],
        );
    }

    #[test]
    fn provision_three_targets() {
        let op = Operation::Provision {
            source: "west2".into(),
            method: Method::Mariabackup,
            create_master: true,
            threads: Some(4),
            targets: vec!["east1".into(), "east2".into(), "east3".into()],
        };
        let rb = check(
            &op,
            &cluster(3, 1),
            &[
                "1 east1: replicator east offline",
                "2 east1: stop the database <- 1",
                "3 east2: replicator east offline",
                "4 east2: stop the database <- 3",
                "5 east3: replicator east offline",
                "6 east3: stop the database <- 5",
                "7 west2: transfer mysql (mariabackup) west2 -> east1 -> east2 -> east3 <- 2,4,6",
                "8 east1: start the database <- 7",
                "9 east1: replicator east reset <- 8",
                "10 east1: mark primary for east <- 9",
                "11 east1: replicator east online <- 10",
                "12 east2: start the database <- 7",
                "13 east2: replicator east reset <- 12",
                "14 east2: replicator east online <- 13",
                "15 east3: start the database <- 7",
                "16 east3: replicator east reset <- 15",
                "17 east3: replicator east online <- 16",
            ],
        );
        let StepAction::Transfer(t) = &rb.steps[6].action else {
            panic!("step 7 is not the transfer");
        };
        assert_eq!(t.threads, Some(4));
        assert_eq!(t.method, Method::Mariabackup);
        assert_eq!(
            rb.title,
            "provision east1, east2, east3 from west2 (mariabackup, create master)"
        );
    }

    #[test]
    fn provision_a_host_without_replication_only_copies() {
        let inv = cluster(2, 1);
        let text = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[sites.lab]\n\
                    [nodes.db1]\naddress = \"h:1\"\nsite = \"lab\"\nrole = \"primary\"\n\
                    [nodes.db2]\naddress = \"h:2\"\nsite = \"lab\"\n\
                    [datasets.pg]\nmethod = \"files\"\n[hooks]\nprofile = \"tungsten\"\n";
        let lab = Inventory::parse(text, Path::new("c.toml")).unwrap();
        check(
            &provision("db1", Method::Files, false, &["db2"]),
            &lab,
            &[
                "1 db2: stop the database",
                "2 db1: transfer pg (files) db1 -> db2 <- 1",
                "3 db2: start the database <- 2",
            ],
        );
        assert_eq!(
            plan(&provision("db1", Method::Files, true, &["db2"]), &lab),
            Err(PlanError::MissingService {
                host: "db2".into(),
                from_site: "lab".into()
            })
        );
        assert!(plan(&provision("west1", Method::Files, false, &["east1"]), &inv).is_ok());
    }

    #[test]
    fn plan_errors() {
        let inv = cluster(3, 1);
        let err = |op: Operation| plan(&op, &inv).unwrap_err();
        let reseed_of = |from: &str, site: &str, source: Option<&str>| Operation::ReseedSite {
            from_site: from.into(),
            site: site.into(),
            source: source.map(str::to_owned),
        };
        assert_eq!(
            err(reseed_of("west", "north", None)),
            PlanError::UnknownSite {
                site: "north".into(),
                known: "west, east".into()
            }
        );
        assert!(matches!(
            err(reseed_of("south", "east", None)),
            PlanError::UnknownSite { .. }
        ));
        assert_eq!(
            err(reseed_of("east", "east", None)),
            PlanError::SameSite {
                site: "east".into()
            }
        );
        assert_eq!(
            err(reseed_of("west", "east", Some("west9"))),
            PlanError::UnknownHost {
                host: "west9".into()
            }
        );
        let e = err(reseed_of("west", "east", Some("east2")));
        assert_eq!(
            e,
            PlanError::SourceNotInSite {
                host: "east2".into(),
                actual: "east".into(),
                from_site: "west".into(),
                hosts: "west1, west2, west3".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "source east2 is in site east, not west: choose one of west1, west2, west3"
        );
        assert_eq!(
            err(provision(
                "west1",
                Method::Files,
                false,
                &["east1", "west1"]
            )),
            PlanError::TargetIsSource {
                host: "west1".into()
            }
        );
        assert_eq!(
            err(provision(
                "west1",
                Method::Files,
                false,
                &["east1", "east1"]
            )),
            PlanError::DuplicateTarget {
                host: "east1".into()
            }
        );
        assert_eq!(
            err(provision("west1", Method::Files, false, &["east4"])),
            PlanError::UnknownHost {
                host: "east4".into()
            }
        );
        assert_eq!(
            err(provision("west0", Method::Files, false, &["east1"])),
            PlanError::UnknownHost {
                host: "west0".into()
            }
        );
        assert_eq!(
            err(provision("west1", Method::Files, false, &[])),
            PlanError::NoTargets
        );
        let mut op = provision("west1", Method::Files, false, &["east1"]);
        if let Operation::Provision { threads, .. } = &mut op {
            *threads = Some(0);
        }
        assert_eq!(err(op), PlanError::ZeroThreads);
    }

    #[test]
    fn reseed_needs_the_services() {
        // west2 runs no service applying east's writes: nothing could be reset there.
        let text = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
                    [sites.west]\nreplication = { west = \"west\", west_from_east = \"east\" }\n\
                    [sites.east]\nreplication = { east = \"east\" }\n\
                    [nodes.west1]\naddress = \"h:1\"\nsite = \"west\"\nrole = \"primary\"\n\
                    [nodes.west2]\naddress = \"h:2\"\nsite = \"west\"\nreplication = { west = \"west\" }\n\
                    [nodes.east1]\naddress = \"h:3\"\nsite = \"east\"\nrole = \"primary\"\n\
                    [datasets.mysql]\nmethod = \"files\"\n[hooks]\nprofile = \"tungsten\"\n";
        let inv = Inventory::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(
            plan(&reseed(None), &inv),
            Err(PlanError::MissingService {
                host: "west2".into(),
                from_site: "east".into()
            })
        );
    }

    #[test]
    fn rollback_undoes_what_is_still_changed_newest_first() {
        let inv = cluster(2, 1);
        let rb = plan(&reseed(None), &inv).unwrap();
        // Stopped after east1's database stop (10) and east2's replicator reset (12).
        let done: Vec<StepId> = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12].map(StepId).to_vec();
        let (back, kept) = rollback(&rb, &done, "rollback".into());
        assert_eq!(
            back.lines(),
            [
                "1 east2: replicator east online",
                "2 east1: start the database <- 1",
                "3 east1: replicator east online <- 2",
                "4 west2: replicator west_from_east online <- 3",
                "5 west1: replicator west_from_east online <- 4",
                "6 site east: routers online <- 5",
                "7 site east: policy automatic <- 6",
            ]
        );
        assert_eq!(kept.len(), 4, "{kept:?}");
        assert!(
            kept[0].contains("replicator west_from_east reset"),
            "{kept:?}"
        );
        // After the whole runbook there is nothing left to undo but the copy and resets.
        let all: Vec<StepId> = rb.steps.iter().map(|s| s.id).collect();
        let (back, kept) = rollback(&rb, &all, "rollback".into());
        assert!(back.steps.is_empty(), "{:?}", back.lines());
        assert!(
            kept.iter().any(|k| k.contains("the copy stays")),
            "{kept:?}"
        );
    }

    #[test]
    fn dry_run_prints_steps_commands_and_waits() {
        let inv = cluster(1, 1);
        let text = plan(&reseed(None), &inv).unwrap().dry_run(&inv);
        assert_eq!(text, DRY_RUN_ONE);
    }

    const DRY_RUN_ONE: &str = r#"reseed-site east from west (source west1): 15 steps
  1  site east   policy maintenance
                 $ cctrl -multi <<< "use east\nset policy maintenance\n"
  2  site east   routers offline  (after 1)
                 $ cctrl -multi <<< "use east\nrouter * offline\n"
  3  west1       replicator west_from_east offline  (after 2)
                 $ trepctl -service west_from_east offline
  4  west1       replicator west_from_east reset  (after 3)
                 $ trepctl -service west_from_east reset -all -y
  5  controller  wait until west_from_east on west is reset  (after 4)
  6  east1       replicator east offline  (after 5)
                 $ trepctl -service east offline
  7  east1       replicator east reset  (after 6)
                 $ trepctl -service east reset -all -y
  8  east1       stop the database  (after 7)
                 $ sudo -n systemctl stop mysqld
  9  west1       transfer mysql (xtrabackup) west1 -> east1  (after 8)
     west1:      $ xtrabackup --backup '--target-dir={staging}' '--datadir={datadir}'  (first, into a directory of its own)
     east1:      $ xtrabackup --prepare '--target-dir={staging}'  (before the commit)
 10  east1       start the database  (after 9)
                 $ sudo -n systemctl start mysqld
 11  east1       mark primary for east  (after 10)
                 $ trepctl -service east setrole -role master
 12  east1       replicator east online  (after 11)
                 $ trepctl -service east online
 13  west1       replicator west_from_east online  (after 9, 11)
                 $ trepctl -service west_from_east online
 14  site east   routers online  (after 12, 13)
                 $ cctrl -multi <<< "use east\nrouter * online\n"
 15  site east   policy automatic  (after 14)
                 $ cctrl -multi <<< "use east\nset policy automatic\n"
"#;
}
