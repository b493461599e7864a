//! The autoscaler: node groups and the registry's nodes in, scale actions out. Pure (time and
//! new node ids passed in); the manager's loop runs [`Autoscaler::plan`] every
//! [`EVALUATE_EVERY`] and carries the actions out through a [`super::provision::Provisioner`].
//!
//! Guarantees, per group:
//! - Fewer than `min` nodes (live and not draining, plus started ones not registered yet) →
//!   nodes are started at once, whatever the cooldown: a failed node is replaced.
//! - More than `max` → the least loaded are drained.
//! - Otherwise, at most one action per `cooldown_s`, and none while a started node has not
//!   registered: the group's figure (the mean of its metric over its live nodes) above
//!   `scale_out_above` starts one node; below `scale_in_below` drains the least loaded one,
//!   unless the others would then be above `scale_out_above` (no flapping).
//! - Draining never cuts a viewer before the deadline: a draining node exits by itself once
//!   empty (then it stops reporting and is removed); it is removed by force only at its
//!   deadline. Failed nodes and starts that never registered (within [`START_TIMEOUT`]) are
//!   removed.
//! - Nodes of a deleted group are drained.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::registry::{NodeEntry, NodeStatus, Registry};
use super::store::{NodeGroup, ScaleMetric};

/// How often groups are evaluated.
pub(crate) const EVALUATE_EVERY: Duration = Duration::from_secs(2);
/// How long a started node has to register before it is removed and started again.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What the autoscaler decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start a node with this id for the group.
    Create {
        /// The group.
        group: String,
        /// The new node's id.
        id: String,
    },
    /// Stop placing on the node; it exits once it has no viewers.
    Drain {
        /// The group.
        group: String,
        /// The node.
        id: String,
    },
    /// Remove the node (and forget it).
    Remove {
        /// The group.
        group: String,
        /// The node.
        id: String,
        /// Why: `drained`, `failed`, `drain deadline` or `never registered`.
        why: &'static str,
    },
}

impl Action {
    /// The metric label of the action.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Action::Create { .. } => "out",
            Action::Drain { .. } => "in",
            Action::Remove { .. } => "remove",
        }
    }
}

/// The autoscaler's memory between evaluations.
#[derive(Debug, Default)]
pub(crate) struct Autoscaler {
    /// Started and not registered yet: node id → (group, when).
    pending: HashMap<String, (String, Instant)>,
    /// Last scale-out or scale-in per group.
    last_action: HashMap<String, Instant>,
}

fn figure(metric: ScaleMetric, n: &NodeEntry) -> f64 {
    match metric {
        ScaleMetric::Viewers => n.load.viewers as f64,
        ScaleMetric::Cpu => n.load.cpu,
        ScaleMetric::BandwidthOut => n.load.bandwidth_out,
    }
}

impl Autoscaler {
    /// A new autoscaler with nothing pending.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Nodes started for `group` that have not registered yet.
    pub(crate) fn pending(&self, group: &str) -> usize {
        self.pending.values().filter(|(g, _)| g == group).count()
    }

    /// A start failed: the node is no longer pending.
    pub(crate) fn start_failed(&mut self, id: &str) {
        self.pending.remove(id);
    }

    /// The actions for now. `new_id` names a node to start for a group.
    pub(crate) fn plan(
        &mut self,
        groups: &[NodeGroup],
        reg: &Registry,
        now: Instant,
        mut new_id: impl FnMut(&NodeGroup) -> String,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let nodes = reg.nodes();
        let known: HashSet<&str> = nodes.iter().map(|n| n.info.id.as_str()).collect();
        // Starts that registered are no longer pending; those too slow are given up.
        self.pending.retain(|id, (group, since)| {
            if known.contains(id.as_str()) {
                return false;
            }
            if now.duration_since(*since) > START_TIMEOUT {
                actions.push(Action::Remove {
                    group: group.clone(),
                    id: id.clone(),
                    why: "never registered",
                });
                return false;
            }
            true
        });
        let names: HashSet<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        for n in &nodes {
            let Some(group) = n.info.group.as_deref() else {
                continue;
            };
            let (failed, draining) = (n.status == NodeStatus::Failed, n.draining);
            let remove = |why| Action::Remove {
                group: group.to_owned(),
                id: n.info.id.clone(),
                why,
            };
            match draining {
                _ if failed => actions.push(remove(if draining.is_some() {
                    "drained"
                } else {
                    "failed"
                })),
                Some(deadline) if now >= deadline => actions.push(remove("drain deadline")),
                None if !names.contains(group) => actions.push(Action::Drain {
                    group: group.to_owned(),
                    id: n.info.id.clone(),
                }),
                _ => {}
            }
        }
        for g in groups {
            let mut active: Vec<&NodeEntry> = nodes
                .iter()
                .copied()
                .filter(|n| n.info.group.as_deref() == Some(g.name.as_str()) && n.placeable())
                .collect();
            active.sort_by(|a, b| {
                figure(g.metric, a)
                    .total_cmp(&figure(g.metric, b))
                    .then_with(|| a.info.id.cmp(&b.info.id))
            });
            let pending = self.pending(&g.name);
            let count = active.len() + pending;
            let min = g.min as usize;
            let max = g.max as usize;
            let mut start = |this: &mut Self, actions: &mut Vec<Action>| {
                let id = new_id(g);
                this.pending.insert(id.clone(), (g.name.clone(), now));
                actions.push(Action::Create {
                    group: g.name.clone(),
                    id,
                });
            };
            if count < min {
                for _ in count..min {
                    start(self, &mut actions);
                }
                self.last_action.insert(g.name.clone(), now);
                continue;
            }
            if count > max {
                for n in active.iter().take(count - max) {
                    actions.push(Action::Drain {
                        group: g.name.clone(),
                        id: n.info.id.clone(),
                    });
                }
                self.last_action.insert(g.name.clone(), now);
                continue;
            }
            let cooled = self
                .last_action
                .get(&g.name)
                .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(g.cooldown_s));
            if pending > 0 || !cooled || active.is_empty() {
                continue;
            }
            let sum: f64 = active.iter().map(|n| figure(g.metric, n)).sum();
            let n = active.len() as f64;
            let mean = sum / n;
            if mean > g.scale_out_above && count < max {
                start(self, &mut actions);
                self.last_action.insert(g.name.clone(), now);
            } else if mean < g.scale_in_below
                && count > min
                && active.len() > 1
                && sum / (n - 1.0) <= g.scale_out_above
            {
                actions.push(Action::Drain {
                    group: g.name.clone(),
                    id: active[0].info.id.clone(),
                });
                self.last_action.insert(g.name.clone(), now);
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::{LoadReport, NodeAddresses, NodeInfo, NodeRole};

    fn group() -> NodeGroup {
        NodeGroup {
            name: "e".into(),
            region: "a".into(),
            role: NodeRole::Edge,
            min: 1,
            max: 3,
            metric: ScaleMetric::Viewers,
            scale_out_above: 4.0,
            scale_in_below: 1.0,
            drain_deadline_s: 60,
            cooldown_s: 5,
            node_capacity: None,
        }
    }

    fn join(reg: &mut Registry, id: &str, now: Instant) {
        reg.register(
            NodeInfo {
                id: id.into(),
                role: NodeRole::Edge,
                region: "a".into(),
                addresses: NodeAddresses {
                    rtmp: None,
                    http: format!("http://{id}"),
                    cluster: None,
                },
                capacity: 100,
                group: Some("e".into()),
            },
            now,
        );
    }

    fn viewers(reg: &mut Registry, id: &str, v: u64, now: Instant) {
        let load = LoadReport {
            viewers: v,
            ..LoadReport::default()
        };
        reg.report(id, load, now).unwrap();
    }

    #[test]
    fn scales_out_on_load_and_back_in_without_cutting_viewers() {
        let t0 = Instant::now();
        let mut reg = Registry::new(Duration::from_secs(3), "a");
        let mut a = Autoscaler::new();
        let mut k = 0;
        let mut ids = |_: &NodeGroup| {
            k += 1;
            format!("e-{k}")
        };
        let groups = [group()];
        // Empty group: min 1 is started at once; nothing more while it is pending.
        let acts = a.plan(&groups, &reg, t0, &mut ids);
        assert_eq!(
            acts,
            vec![Action::Create {
                group: "e".into(),
                id: "e-1".into()
            }]
        );
        assert!(a.plan(&groups, &reg, t0, &mut ids).is_empty());
        join(&mut reg, "e-1", t0);
        // 10 viewers on one node (> 4): one more, once the cooldown has passed.
        let t1 = t0 + Duration::from_secs(1);
        viewers(&mut reg, "e-1", 10, t1);
        assert!(a.plan(&groups, &reg, t1, &mut ids).is_empty());
        let t2 = t0 + Duration::from_secs(6);
        viewers(&mut reg, "e-1", 10, t2);
        assert_eq!(a.plan(&groups, &reg, t2, &mut ids).len(), 1);
        join(&mut reg, "e-2", t2);
        viewers(&mut reg, "e-2", 0, t2);
        // Mean 5 (> 4) → a third; then the group is at max.
        let t3 = t2 + Duration::from_secs(6);
        viewers(&mut reg, "e-1", 10, t3);
        viewers(&mut reg, "e-2", 0, t3);
        assert_eq!(a.plan(&groups, &reg, t3, &mut ids).len(), 1);
        join(&mut reg, "e-3", t3);
        let t4 = t3 + Duration::from_secs(6);
        for (id, v) in [("e-1", 20), ("e-2", 20), ("e-3", 20)] {
            viewers(&mut reg, id, v, t4);
        }
        assert!(a.plan(&groups, &reg, t4, &mut ids).is_empty());
        // Load drops to 1 viewer: the least loaded node drains (not the one with the viewer).
        let t5 = t4 + Duration::from_secs(6);
        for (id, v) in [("e-1", 0), ("e-2", 1), ("e-3", 0)] {
            viewers(&mut reg, id, v, t5);
        }
        assert_eq!(
            a.plan(&groups, &reg, t5, &mut ids),
            vec![Action::Drain {
                group: "e".into(),
                id: "e-1".into()
            }]
        );
        reg.drain("e-1", t5 + Duration::from_secs(60));
        // It exits (stops reporting): removed once failed.
        let t6 = t5 + Duration::from_secs(6);
        for (id, v) in [("e-2", 1), ("e-3", 0)] {
            viewers(&mut reg, id, v, t6);
        }
        reg.sweep(t6);
        let acts = a.plan(&groups, &reg, t6, &mut ids);
        assert!(acts.contains(&Action::Remove {
            group: "e".into(),
            id: "e-1".into(),
            why: "drained"
        }));
        assert!(acts.contains(&Action::Drain {
            group: "e".into(),
            id: "e-3".into()
        }));
    }

    #[test]
    fn failed_nodes_are_replaced_and_slow_starts_given_up() {
        let t0 = Instant::now();
        let mut reg = Registry::new(Duration::from_secs(3), "a");
        let mut a = Autoscaler::new();
        let groups = [group()];
        let acts = a.plan(&groups, &reg, t0, |_| "x".into());
        assert_eq!(acts.len(), 1);
        assert_eq!(a.pending("e"), 1);
        let later = t0 + START_TIMEOUT + Duration::from_secs(1);
        let acts = a.plan(&groups, &reg, later, |_| "y".into());
        assert!(acts.contains(&Action::Remove {
            group: "e".into(),
            id: "x".into(),
            why: "never registered"
        }));
        join(&mut reg, "y", later);
        let t = later + Duration::from_secs(4);
        reg.sweep(t);
        let acts = a.plan(&groups, &reg, t, |_| "z".into());
        assert!(acts.contains(&Action::Remove {
            group: "e".into(),
            id: "y".into(),
            why: "failed"
        }));
        assert!(acts.contains(&Action::Create {
            group: "e".into(),
            id: "z".into()
        }));
    }

    #[test]
    fn transcoder_groups_scale_on_cpu() {
        let t0 = Instant::now();
        let mut reg = Registry::new(Duration::from_secs(3), "a");
        let g = NodeGroup {
            name: "t".into(),
            role: NodeRole::Transcoder,
            metric: ScaleMetric::Cpu,
            scale_out_above: 3.0,
            scale_in_below: 1.0,
            ..group()
        };
        let mut a = Autoscaler::new();
        let mut k = 0;
        let mut ids = |_: &NodeGroup| {
            k += 1;
            format!("t-{k}")
        };
        assert_eq!(
            a.plan(std::slice::from_ref(&g), &reg, t0, &mut ids).len(),
            1
        );
        let cpu = |reg: &mut Registry, id: &str, cpu: f64, now: Instant| {
            let load = LoadReport {
                cpu,
                cores: 4.0,
                ..LoadReport::default()
            };
            reg.report(id, load, now).unwrap();
        };
        let join = |reg: &mut Registry, id: &str, now: Instant| {
            reg.register(
                NodeInfo {
                    id: id.into(),
                    role: NodeRole::Transcoder,
                    region: "a".into(),
                    addresses: NodeAddresses {
                        rtmp: None,
                        http: format!("http://{id}"),
                        cluster: None,
                    },
                    capacity: 0,
                    group: Some("t".into()),
                },
                now,
            );
        };
        join(&mut reg, "t-1", t0);
        // Three ladders on one transcoder (3.5 cores > 3): a second one.
        let t1 = t0 + Duration::from_secs(6);
        cpu(&mut reg, "t-1", 3.5, t1);
        assert_eq!(
            a.plan(std::slice::from_ref(&g), &reg, t1, &mut ids),
            vec![Action::Create {
                group: "t".into(),
                id: "t-2".into()
            }]
        );
        join(&mut reg, "t-2", t1);
        // Jobs spread (2.0 and 1.5: mean 1.75): nothing to do; then they end: one drains.
        let t2 = t1 + Duration::from_secs(6);
        cpu(&mut reg, "t-1", 2.0, t2);
        cpu(&mut reg, "t-2", 1.5, t2);
        assert!(
            a.plan(std::slice::from_ref(&g), &reg, t2, &mut ids)
                .is_empty()
        );
        let t3 = t2 + Duration::from_secs(6);
        cpu(&mut reg, "t-1", 0.1, t3);
        cpu(&mut reg, "t-2", 0.0, t3);
        assert_eq!(
            a.plan(std::slice::from_ref(&g), &reg, t3, &mut ids),
            vec![Action::Drain {
                group: "t".into(),
                id: "t-2".into()
            }]
        );
    }

    #[test]
    fn nodes_of_a_deleted_group_drain() {
        let t0 = Instant::now();
        let mut reg = Registry::new(Duration::from_secs(3), "a");
        join(&mut reg, "e-1", t0);
        let mut a = Autoscaler::new();
        assert_eq!(
            a.plan(&[], &reg, t0, |_| unreachable!()),
            vec![Action::Drain {
                group: "e".into(),
                id: "e-1".into()
            }]
        );
    }
}
