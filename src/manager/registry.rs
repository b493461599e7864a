//! The node registry and placement, as plain data and functions (no I/O, time passed in).
//!
//! Guarantees:
//! - A node that has not reported for the TTL is *failed*: out of placement until it reports
//!   again (a report from a failed node revives it; one from an unknown node is refused, and the
//!   node re-registers).
//! - Placement never picks a node at or over its capacity, counting the placements made since
//!   its last report, so a burst of lookups spreads before reports catch up.
//! - Region first (the asked one, else the default), falling back to every region when the
//!   region has no node with room; then least load against capacity (players prefer nodes that
//!   already carry the broadcast); a random pick among the best [`BEST_FEW`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use ipnet::IpNet;

use super::store::RegionRecord;
use super::{Hint, LoadReport, ManagerError, NodeInfo, NodeRole, PlacedNode, Placement};

/// How many of the best candidates a placement picks from at random.
pub(crate) const BEST_FEW: usize = 3;
/// Default heartbeat TTL.
#[cfg(test)]
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(3);
/// How long a placement counts against its node's room: a viewer sent to a node shows up in its
/// reports only once it connected, so the manager counts it itself meanwhile (erring towards
/// full, never towards over capacity).
pub(crate) const PLACEMENT_MEMORY: Duration = Duration::from_secs(2);
/// How much a node that already carries a broadcast is preferred for its players (in load
/// fraction).
pub(crate) const CARRY_BONUS: f64 = 0.25;

/// Whether a node takes placements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum NodeStatus {
    /// Reporting.
    Live,
    /// Reporting, but scaled in: no new placements; it exits when empty or at its deadline.
    Draining,
    /// Missed its heartbeats.
    Failed,
}

/// A registered node.
#[derive(Clone, Debug)]
pub(crate) struct NodeEntry {
    /// As registered.
    pub(crate) info: NodeInfo,
    /// The last report.
    pub(crate) load: LoadReport,
    /// When it last reported (or registered).
    pub(crate) last_seen: Instant,
    /// Live or failed (draining is [`NodeEntry::draining`]).
    pub(crate) status: NodeStatus,
    /// When it is draining: the deadline for its last viewers.
    pub(crate) draining: Option<Instant>,
    /// The sequence number of its last UDP heartbeat (replays at or below it are ignored).
    pub(crate) heartbeat_seq: u64,
    /// When viewers or publishers were sent to it, within [`PLACEMENT_MEMORY`].
    pub(crate) placed: VecDeque<Instant>,
    /// The broadcasts of its last report (for the carriers' preference).
    carried: HashSet<String>,
}

impl NodeEntry {
    /// Whether new viewers, publishers or downstream nodes may be sent to it.
    pub(crate) fn placeable(&self) -> bool {
        self.status == NodeStatus::Live && self.draining.is_none()
    }

    /// Its state as listed: failed, draining or live.
    pub(crate) fn state(&self) -> NodeStatus {
        match (self.status, self.draining) {
            (NodeStatus::Failed, _) => NodeStatus::Failed,
            (_, Some(_)) => NodeStatus::Draining,
            _ => NodeStatus::Live,
        }
    }

    /// Load against capacity, counting recent placements; 1.0 or more is full.
    pub(crate) fn fill(&self) -> f64 {
        let used = self.load.viewers + self.placed.len() as u64;
        used as f64 / self.info.capacity.max(1) as f64
    }

    fn forget_placements(&mut self, now: Instant) {
        while self
            .placed
            .front()
            .is_some_and(|&t| now.duration_since(t) > PLACEMENT_MEMORY)
        {
            self.placed.pop_front();
        }
    }

    fn carries(&self, broadcast: &str) -> bool {
        self.carried.contains(broadcast)
    }

    fn publishing(&self) -> impl Iterator<Item = &str> {
        self.load
            .broadcasts
            .iter()
            .filter(|b| b.publishing)
            .map(|b| b.name.as_str())
    }
}

/// Node `id` of `nodes` (a free function, so the other fields stay borrowable).
fn node_in<'a>(
    nodes: &'a mut HashMap<String, NodeEntry>,
    id: &str,
) -> Result<&'a mut NodeEntry, ManagerError> {
    nodes
        .get_mut(id)
        .ok_or_else(|| ManagerError::UnknownNode(id.to_owned()))
}

/// The nodes a manager knows.
#[derive(Debug)]
pub struct Registry {
    nodes: HashMap<String, NodeEntry>,
    /// Broadcast → the nodes that report its publisher (kept in step with reports).
    publishers: HashMap<String, HashSet<String>>,
    ttl: Duration,
    default_region: String,
    /// Client networks → region, longest prefix first.
    cidrs: Vec<(IpNet, String)>,
    /// Region → the ids of its nodes (placement looks at one region's nodes only).
    by_region: HashMap<String, Vec<String>>,
    /// When [`Registry::sweep`] last ran.
    last_sweep: Option<Instant>,
    /// Rises whenever a node comes, goes, fails, revives or drains, or reports other published
    /// broadcasts or ladders: what transcode jobs depend on.
    generation: u64,
}

/// How often [`Registry::maybe_sweep`] sweeps (placement checks liveness by itself; the sweep
/// keeps the listed states, the publishers and the placement memory current).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_millis(100);

impl Registry {
    /// An empty registry.
    pub fn new(ttl: Duration, default_region: &str) -> Self {
        Self {
            nodes: HashMap::new(),
            publishers: HashMap::new(),
            ttl,
            default_region: default_region.to_owned(),
            cidrs: Vec::new(),
            by_region: HashMap::new(),
            last_sweep: None,
            generation: 0,
        }
    }

    /// Replaces the client network → region table.
    pub(crate) fn set_regions(&mut self, regions: &[RegionRecord]) {
        self.cidrs = regions
            .iter()
            .flat_map(|r| r.cidrs.iter().map(|c| (c.trunc(), r.name.clone())))
            .collect();
        self.cidrs
            .sort_by_key(|c| std::cmp::Reverse(c.0.prefix_len()));
    }

    /// The region a lookup is placed in: the one asked for, else the one whose CIDR holds the
    /// client's address (longest prefix), else the default region.
    pub(crate) fn region_for<'a>(&'a self, hint: &'a Hint) -> &'a str {
        if let Some(r) = &hint.region {
            return r;
        }
        hint.client
            .and_then(|ip| {
                let ip = match ip {
                    std::net::IpAddr::V6(v6) => v6
                        .to_ipv4_mapped()
                        .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
                    v4 => v4,
                };
                self.cidrs.iter().find(|(net, _)| net.contains(&ip))
            })
            .map_or(self.default_region.as_str(), |(_, r)| r.as_str())
    }

    /// The heartbeat TTL.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Node `id`, when registered.
    pub(crate) fn node(&self, id: &str) -> Option<&NodeEntry> {
        self.nodes.get(id)
    }

    /// A number that rises whenever a node registers, is forgotten, fails, revives or is
    /// drained, or reports other broadcasts, publishers or ladders than before.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether some node reports `region`, a CIDR table names it, or it is the default.
    pub(crate) fn known_region(&self, region: &str) -> bool {
        region == self.default_region
            || self.by_region.contains_key(region)
            || self.cidrs.iter().any(|(_, r)| r == region)
    }

    /// Registers or re-registers a node (it is live from now; a draining node stays draining).
    pub fn register(&mut self, info: NodeInfo, now: Instant) {
        self.generation += 1;
        let old = self.nodes.get(&info.id);
        let load = old.map(|n| n.load.clone()).unwrap_or_default();
        let draining = old.and_then(|n| n.draining);
        let carried = old.map(|n| n.carried.clone()).unwrap_or_default();
        let heartbeat_seq = old.map_or(0, |n| n.heartbeat_seq);
        if let Some(old_region) = old.map(|n| n.info.region.clone()) {
            self.unindex(&info.id, &old_region);
        }
        self.by_region
            .entry(info.region.clone())
            .or_default()
            .push(info.id.clone());
        self.nodes.insert(
            info.id.clone(),
            NodeEntry {
                info,
                load,
                last_seen: now,
                status: NodeStatus::Live,
                draining,
                heartbeat_seq,
                placed: VecDeque::new(),
                carried,
            },
        );
    }

    /// Scales a node in: no new placements; `deadline` is when its last viewers are cut.
    /// False when the node is unknown.
    pub(crate) fn drain(&mut self, id: &str, deadline: Instant) -> bool {
        match self.nodes.get_mut(id) {
            Some(n) => {
                if n.draining.is_none() {
                    self.generation += 1;
                }
                n.draining.get_or_insert(deadline);
                true
            }
            None => false,
        }
    }

    fn unindex(&mut self, id: &str, region: &str) {
        if let Some(ids) = self.by_region.get_mut(region) {
            ids.retain(|x| x != id);
            if ids.is_empty() {
                self.by_region.remove(region);
            }
        }
    }

    /// Forgets a node (it was removed).
    pub(crate) fn forget(&mut self, id: &str) {
        if let Some(n) = self.nodes.remove(id) {
            self.generation += 1;
            self.unindex(id, &n.info.region);
            for b in n.publishing() {
                if let Some(set) = self.publishers.get_mut(b) {
                    set.remove(id);
                    if set.is_empty() {
                        self.publishers.remove(b);
                    }
                }
            }
        }
    }

    /// A node's heartbeat; answers its drain deadline when it is draining.
    pub fn report(
        &mut self,
        id: &str,
        load: LoadReport,
        now: Instant,
    ) -> Result<Option<Instant>, ManagerError> {
        let node = node_in(&mut self.nodes, id)?;
        // Nodes mostly report the same broadcasts as a second ago: then the indexes stand.
        let same = node.load.broadcasts.len() == load.broadcasts.len()
            && node
                .load
                .broadcasts
                .iter()
                .zip(&load.broadcasts)
                .all(|(a, b)| {
                    a.name == b.name
                        && a.publishing == b.publishing
                        && a.ladder_from == b.ladder_from
                });
        if node.status != NodeStatus::Live || !same {
            self.generation += 1;
        }
        if same {
            node.load = load;
        } else {
            for b in node.publishing() {
                if let Some(set) = self.publishers.get_mut(b) {
                    set.remove(id);
                    if set.is_empty() {
                        self.publishers.remove(b);
                    }
                }
            }
            node.carried = load.broadcasts.iter().map(|b| b.name.clone()).collect();
            node.load = load;
            for b in node.publishing() {
                self.publishers
                    .entry(b.to_owned())
                    .or_default()
                    .insert(id.to_owned());
            }
        }
        node.last_seen = now;
        node.status = NodeStatus::Live;
        node.forget_placements(now);
        Ok(node.draining)
    }

    /// A heartbeat datagram's report: taken only when `seq` is above the node's last one (a
    /// replay is ignored: `Ok(None)`); else as [`Registry::report`].
    pub(crate) fn report_seq(
        &mut self,
        id: &str,
        seq: u64,
        load: LoadReport,
        now: Instant,
    ) -> Result<Option<Instant>, ManagerError> {
        let node = node_in(&mut self.nodes, id)?;
        if seq <= node.heartbeat_seq {
            return Ok(None);
        }
        node.heartbeat_seq = seq;
        self.report(id, load, now)
    }

    /// [`Registry::sweep`], unless it ran less than [`SWEEP_EVERY`] ago.
    pub(crate) fn maybe_sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY)
        {
            self.sweep(now);
        }
    }

    /// Marks nodes silent for the TTL as failed; returns their ids.
    pub(crate) fn sweep(&mut self, now: Instant) -> Vec<String> {
        self.last_sweep = Some(now);
        let mut failed = Vec::new();
        for n in self.nodes.values_mut() {
            n.forget_placements(now);
            if n.status == NodeStatus::Live && now.duration_since(n.last_seen) > self.ttl {
                n.status = NodeStatus::Failed;
                self.generation += 1;
                failed.push(n.info.id.clone());
            }
        }
        failed
    }

    /// Every node, sorted by id.
    pub(crate) fn nodes(&self) -> Vec<&NodeEntry> {
        let mut v: Vec<_> = self.nodes.values().collect();
        v.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        v
    }

    /// Where to publish `broadcast`: the node that already has its publisher (a reconnecting
    /// broadcaster goes back there), else the least loaded ingest node. The placement counts
    /// against the node from `now` for [`PLACEMENT_MEMORY`].
    pub(crate) fn place_publish(
        &mut self,
        broadcast: &str,
        hint: &Hint,
        pick: &mut impl FnMut(usize) -> usize,
        now: Instant,
    ) -> Result<Placement, ManagerError> {
        let existing = self
            .live_publishers(broadcast)
            .find(|n| n.info.role.ingests())
            .map(|n| n.info.id.clone());
        let id = match existing {
            Some(id) => id,
            None => self
                .choose(hint, NodeRole::ingests, |_| 0.0, pick, now)
                .ok_or(ManagerError::Full("publisher"))?,
        };
        Ok(self.placed(&id, broadcast, false, now))
    }

    /// Where to watch `broadcast`: a player node with room in the region, preferring one that
    /// already carries it. `NotLive` while no node reports its publisher. Time as in
    /// [`Registry::place_publish`].
    pub fn place_subscribe(
        &mut self,
        broadcast: &str,
        hint: &Hint,
        pick: &mut impl FnMut(usize) -> usize,
        now: Instant,
    ) -> Result<Placement, ManagerError> {
        if self.live_publishers(broadcast).next().is_none() {
            return Err(ManagerError::NotLive(broadcast.to_owned()));
        }
        let bonus = |n: &NodeEntry| {
            if n.carries(broadcast) {
                CARRY_BONUS
            } else {
                0.0
            }
        };
        let id = self
            .choose(hint, NodeRole::serves_players, bonus, pick, now)
            .ok_or(ManagerError::Full("viewer"))?;
        Ok(self.placed(&id, broadcast, true, now))
    }

    /// The cluster-link addresses node `asker` should use for `broadcast`: for an edge, the
    /// relays of its region (least loaded first), then the origins; for a relay or a
    /// transcoder, the origins only (relays do not chain through the manager, and a
    /// transcoder's ladder must reach the origin that has the publisher, where the broadcast
    /// is). Among origins the one that has the publisher comes first, then by load. Failed
    /// nodes and the asker are left out.
    pub(crate) fn upstreams(&self, broadcast: &str, asker: &str) -> Vec<String> {
        let me = self.nodes.get(asker);
        let region = me.map_or(self.default_region.as_str(), |n| n.info.region.as_str());
        let is_relay =
            me.is_some_and(|n| matches!(n.info.role, NodeRole::Relay | NodeRole::Transcoder));
        let usable = |n: &&NodeEntry| {
            n.placeable() && n.info.id != asker && n.info.addresses.cluster.is_some()
        };
        let mut relays: Vec<&NodeEntry> = self
            .nodes
            .values()
            .filter(usable)
            .filter(|n| !is_relay && n.info.role == NodeRole::Relay && n.info.region == region)
            .collect();
        relays.sort_by(|a, b| {
            a.fill()
                .total_cmp(&b.fill())
                .then(a.info.id.cmp(&b.info.id))
        });
        let publishers: HashSet<&str> = self
            .live_publishers(broadcast)
            .map(|n| n.info.id.as_str())
            .collect();
        let mut origins: Vec<&NodeEntry> = self
            .nodes
            .values()
            .filter(usable)
            .filter(|n| n.info.role.ingests())
            .collect();
        origins.sort_by(|a, b| {
            let (pa, pb) = (
                publishers.contains(a.info.id.as_str()),
                publishers.contains(b.info.id.as_str()),
            );
            pb.cmp(&pa)
                .then(a.fill().total_cmp(&b.fill()))
                .then(a.info.id.cmp(&b.info.id))
        });
        relays
            .into_iter()
            .chain(origins)
            .filter_map(|n| n.info.addresses.cluster.clone())
            .collect()
    }

    /// The live nodes that report `broadcast`'s publisher.
    fn live_publishers<'a>(&'a self, broadcast: &str) -> impl Iterator<Item = &'a NodeEntry> {
        self.publishers
            .get(broadcast)
            .into_iter()
            .flatten()
            .filter_map(|id| self.nodes.get(id))
            .filter(|n| n.status == NodeStatus::Live)
    }

    /// The best few live nodes of a role with room, region first; one picked by `pick`.
    fn choose(
        &self,
        hint: &Hint,
        role: fn(NodeRole) -> bool,
        bonus: impl Fn(&NodeEntry) -> f64,
        pick: &mut impl FnMut(usize) -> usize,
        now: Instant,
    ) -> Option<String> {
        let region = self.region_for(hint);
        let best = |in_region: bool| {
            // One pass, keeping the best few (lowest score; ties by id) in order.
            let mut best: Vec<(f64, &NodeEntry)> = Vec::with_capacity(BEST_FEW + 1);
            let regional = self
                .by_region
                .get(region)
                .into_iter()
                .flatten()
                .filter_map(|id| self.nodes.get(id));
            let nodes: Box<dyn Iterator<Item = &NodeEntry>> = if in_region {
                Box::new(regional)
            } else {
                Box::new(self.nodes.values())
            };
            for n in nodes {
                // Liveness is checked here too: the last sweep may be up to SWEEP_EVERY old.
                if !n.placeable()
                    || !role(n.info.role)
                    || now.saturating_duration_since(n.last_seen) > self.ttl
                {
                    continue;
                }
                let fill = n.fill();
                if fill >= 1.0 {
                    continue;
                }
                let score = fill - bonus(n);
                let at = best.partition_point(|(s, e)| {
                    s.total_cmp(&score)
                        .then_with(|| e.info.id.cmp(&n.info.id))
                        .is_lt()
                });
                if at < BEST_FEW {
                    best.insert(at, (score, n));
                    best.truncate(BEST_FEW);
                }
            }
            best
        };
        let mut candidates = best(true);
        if candidates.is_empty() {
            candidates = best(false);
        }
        if candidates.is_empty() {
            return None;
        }
        let k = candidates.len();
        Some(candidates[pick(k) % k].1.info.id.clone())
    }

    fn placed(&mut self, id: &str, broadcast: &str, player: bool, now: Instant) -> Placement {
        let node = self.nodes.get_mut(id).expect("chosen from the registry");
        node.placed.push_back(now);
        let info = &node.info;
        let (app_key, http) = (broadcast, info.addresses.http.trim_end_matches('/'));
        let mut urls = serde_json::Map::new();
        if player {
            urls.insert("whep".into(), format!("{http}/whep/{app_key}").into());
            urls.insert("flv".into(), format!("{http}/{app_key}.flv").into());
        } else {
            urls.insert("whip".into(), format!("{http}/whip/{app_key}").into());
        }
        if let Some(rtmp) = &info.addresses.rtmp {
            urls.insert(
                "rtmp".into(),
                format!("{}/{app_key}", rtmp.trim_end_matches('/')).into(),
            );
        }
        Placement {
            node: PlacedNode {
                id: info.id.clone(),
                role: info.role,
                region: info.region.clone(),
            },
            urls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::{BroadcastLoad, NodeAddresses};

    fn node(id: &str, role: NodeRole, region: &str, capacity: u64) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            role,
            region: region.into(),
            addresses: NodeAddresses {
                rtmp: Some(format!("rtmp://{id}:1935")),
                http: format!("http://{id}:8080"),
                cluster: Some(format!("{id}:4443")),
            },
            capacity,
            group: None,
        }
    }

    fn load(viewers: u64, broadcasts: &[(&str, bool)]) -> LoadReport {
        LoadReport {
            viewers,
            broadcasts: broadcasts
                .iter()
                .map(|(n, p)| BroadcastLoad {
                    name: (*n).into(),
                    viewers: 0,
                    node_subscriptions: 0,
                    publishing: *p,
                    ladder_from: None,
                })
                .collect(),
            ..LoadReport::default()
        }
    }

    fn cluster(now: Instant) -> Registry {
        let mut r = Registry::new(DEFAULT_TTL, "a");
        r.register(node("origin-a", NodeRole::Origin, "a", 100), now);
        for (id, region) in [("edge-a", "a"), ("edge-b1", "b"), ("edge-b2", "b")] {
            r.register(node(id, NodeRole::Edge, region, 10), now);
        }
        r
    }

    #[test]
    fn publish_goes_to_an_origin_of_the_region_and_back_to_it() {
        let now = Instant::now();
        let mut r = cluster(now);
        let hint = Hint {
            region: Some("a".into()),
            client: None,
        };
        let p = r.place_publish("live/x", &hint, &mut |_| 0, now).unwrap();
        assert_eq!(p.node.id, "origin-a");
        assert_eq!(p.urls["rtmp"], "rtmp://origin-a:1935/live/x");
        assert_eq!(p.urls["whip"], "http://origin-a:8080/whip/live/x");
        // Subscribing waits for the publisher to show up in a report.
        assert_eq!(
            r.place_subscribe("live/x", &hint, &mut |_| 0, now),
            Err(ManagerError::NotLive("live/x".into()))
        );
        r.report("origin-a", load(0, &[("live/x", true)]), now)
            .unwrap();
        let b = Hint {
            region: Some("b".into()),
            client: None,
        };
        let s = r.place_subscribe("live/x", &b, &mut |_| 0, now).unwrap();
        assert_eq!(s.node.region, "b");
        assert_eq!(
            s.urls["flv"],
            format!("http://{}:8080/live/x.flv", s.node.id)
        );
    }

    #[test]
    fn placements_spread_by_room_and_never_overfill() {
        let now = Instant::now();
        let mut r = cluster(now);
        r.report("origin-a", load(0, &[("live/x", true)]), now)
            .unwrap();
        let b = Hint {
            region: Some("b".into()),
            client: None,
        };
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut i = 0;
        for _ in 0..20 {
            let p = r
                .place_subscribe(
                    "live/x",
                    &b,
                    &mut |k| {
                        i += 1;
                        i % k
                    },
                    now,
                )
                .unwrap();
            *counts.entry(p.node.id).or_default() += 1;
        }
        // Region b is full after 20 (2 × 10): the next goes elsewhere, then none is left.
        assert_eq!(counts["edge-b1"], 10);
        assert_eq!(counts["edge-b2"], 10);
        let p = r.place_subscribe("live/x", &b, &mut |_| 0, now).unwrap();
        assert_eq!(p.node.id, "edge-a");
        for _ in 0..9 {
            r.place_subscribe("live/x", &b, &mut |_| 0, now).unwrap();
        }
        assert_eq!(
            r.place_subscribe("live/x", &b, &mut |_| 0, now),
            Err(ManagerError::Full("viewer"))
        );
    }

    #[test]
    fn silent_nodes_fail_and_come_back() {
        let now = Instant::now();
        let mut r = cluster(now);
        let later = now + Duration::from_secs(4);
        r.report("origin-a", load(0, &[("live/x", true)]), later)
            .unwrap();
        r.report("edge-b1", load(0, &[]), later).unwrap();
        let mut failed = r.sweep(later);
        failed.sort();
        assert_eq!(failed, vec!["edge-a", "edge-b2"]);
        let b = Hint {
            region: Some("b".into()),
            client: None,
        };
        for _ in 0..5 {
            let p = r
                .place_subscribe("live/x", &b, &mut |k| k - 1, later)
                .unwrap();
            assert_eq!(p.node.id, "edge-b1");
        }
        r.report("edge-b2", load(0, &[]), later).unwrap();
        assert!(
            r.nodes()
                .iter()
                .all(|n| n.status == NodeStatus::Live || n.info.id == "edge-a")
        );
        assert_eq!(
            r.report("nobody", load(0, &[]), later),
            Err(ManagerError::UnknownNode("nobody".into()))
        );
    }

    #[test]
    fn upstreams_are_regional_relays_then_the_publishing_origin() {
        let now = Instant::now();
        let mut r = cluster(now);
        r.register(node("origin-b", NodeRole::Origin, "b", 100), now);
        r.register(node("relay-b", NodeRole::Relay, "b", 100), now);
        r.register(node("relay-a", NodeRole::Relay, "a", 100), now);
        r.report("origin-a", load(0, &[("live/x", true)]), now)
            .unwrap();
        assert_eq!(
            r.upstreams("live/x", "edge-b1"),
            vec!["relay-b:4443", "origin-a:4443", "origin-b:4443"]
        );
        // Relays go straight to the origins, and so do transcoders.
        assert_eq!(
            r.upstreams("live/x", "relay-b"),
            vec!["origin-a:4443", "origin-b:4443"]
        );
        r.register(node("tc-b", NodeRole::Transcoder, "b", 100), now);
        assert_eq!(
            r.upstreams("live/x", "tc-b"),
            vec!["origin-a:4443", "origin-b:4443"]
        );
    }

    #[test]
    fn client_networks_pick_the_region_and_draining_nodes_get_nothing() {
        let now = Instant::now();
        let mut r = cluster(now);
        r.report("origin-a", load(0, &[("live/x", true)]), now)
            .unwrap();
        r.set_regions(&[
            RegionRecord {
                name: "b".into(),
                cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            },
            RegionRecord {
                name: "a".into(),
                cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            },
        ]);
        let from = |ip: &str| Hint {
            region: None,
            client: Some(ip.parse().unwrap()),
        };
        // Longest prefix wins; an IPv4-mapped IPv6 address counts as IPv4; no match → default.
        assert_eq!(r.region_for(&from("10.2.3.4")), "b");
        assert_eq!(r.region_for(&from("10.1.3.4")), "a");
        assert_eq!(r.region_for(&from("::ffff:10.9.9.9")), "b");
        assert_eq!(r.region_for(&from("192.0.2.1")), "a");
        let asked = Hint {
            region: Some("a".into()),
            client: Some("10.2.3.4".parse().unwrap()),
        };
        assert_eq!(r.region_for(&asked), "a");
        let p = r
            .place_subscribe("live/x", &from("10.2.3.4"), &mut |_| 0, now)
            .unwrap();
        assert_eq!(p.node.region, "b");
        // Draining edge-b1 and edge-b2: region b has no room left, so region a serves.
        r.drain("edge-b1", now + Duration::from_secs(60));
        r.drain("edge-b2", now + Duration::from_secs(60));
        let p = r
            .place_subscribe("live/x", &from("10.2.3.4"), &mut |_| 0, now)
            .unwrap();
        assert_eq!(p.node.id, "edge-a");
        assert_eq!(
            r.report("edge-b1", load(0, &[]), now),
            Ok(Some(now + Duration::from_secs(60)))
        );
    }

    #[test]
    fn reregistering_keeps_the_report_and_can_move_regions() {
        let now = Instant::now();
        let mut r = cluster(now);
        r.report("origin-a", load(0, &[("live/x", true)]), now)
            .unwrap();
        r.report("edge-b2", load(2, &[("live/x", false)]), now)
            .unwrap();
        // Re-registered (a manager that forgot it), then the same report: still a carrier.
        r.register(node("edge-b2", NodeRole::Edge, "b", 10), now);
        r.report("edge-b2", load(2, &[("live/x", false)]), now)
            .unwrap();
        let in_region = |name: &str| Hint {
            region: Some(name.into()),
            client: None,
        };
        let p = r
            .place_subscribe("live/x", &in_region("b"), &mut |_| 0, now)
            .unwrap();
        assert_eq!(p.node.id, "edge-b2");
        // Moved to region c: placed there, and no longer in b.
        r.register(node("edge-b2", NodeRole::Edge, "c", 10), now);
        let p = r
            .place_subscribe("live/x", &in_region("c"), &mut |_| 0, now)
            .unwrap();
        assert_eq!(p.node.id, "edge-b2");
        for _ in 0..5 {
            let p = r
                .place_subscribe("live/x", &in_region("b"), &mut |k| k - 1, now)
                .unwrap();
            assert_eq!(p.node.id, "edge-b1");
        }
        assert!(r.known_region("c") && !r.known_region("nowhere"));
        // The origin stops publishing: subscribe lookups say so.
        r.report("origin-a", load(0, &[]), now).unwrap();
        assert!(matches!(
            r.place_subscribe("live/x", &in_region("b"), &mut |_| 0, now),
            Err(ManagerError::NotLive(_))
        ));
    }

    #[test]
    fn carriers_are_preferred() {
        let now = Instant::now();
        let mut r = cluster(now);
        r.report("origin-a", load(0, &[("live/x", true)]), now)
            .unwrap();
        r.report("edge-b2", load(2, &[("live/x", false)]), now)
            .unwrap();
        let b = Hint {
            region: Some("b".into()),
            client: None,
        };
        // edge-b2 has 2 of 10 viewers but carries the broadcast: 0.2 − 0.25 beats 0.0.
        let p = r.place_subscribe("live/x", &b, &mut |_| 0, now).unwrap();
        assert_eq!(p.node.id, "edge-b2");
    }

    #[test]
    fn placements_are_forgotten_after_the_placement_memory() {
        let now = Instant::now();
        let mut r = cluster(now);
        r.report("origin-a", load(0, &[("live/x", true)]), now)
            .unwrap();
        let b = Hint {
            region: Some("b".into()),
            client: None,
        };
        let fill_b = |r: &mut Registry, at: Instant| {
            let mut i = 0;
            for _ in 0..20 {
                let p = r
                    .place_subscribe(
                        "live/x",
                        &b,
                        &mut |k| {
                            i += 1;
                            i % k
                        },
                        at,
                    )
                    .unwrap();
                assert_eq!(p.node.region, "b");
            }
            // Region b is full (2 × 10): the next goes to region a.
            let p = r.place_subscribe("live/x", &b, &mut |_| 0, at).unwrap();
            assert_eq!(p.node.id, "edge-a");
        };
        fill_b(&mut r, now);
        // Within the memory the placements still count, whether the edges report or not.
        let edge = now + PLACEMENT_MEMORY;
        r.sweep(edge);
        r.report("edge-b1", load(0, &[]), edge).unwrap();
        let p = r.place_subscribe("live/x", &b, &mut |_| 0, edge).unwrap();
        assert_eq!(p.node.id, "edge-a");
        // Past it, a report or a sweep forgets them: region b has room for 20 again.
        let past = now + PLACEMENT_MEMORY + Duration::from_millis(100);
        r.report("edge-b1", load(0, &[]), past).unwrap();
        r.sweep(past);
        fill_b(&mut r, past);
    }

    #[test]
    fn placement_skips_nodes_silent_for_the_ttl_before_any_sweep() {
        let now = Instant::now();
        let mut r = cluster(now);
        let later = now + DEFAULT_TTL + Duration::from_millis(100);
        r.report("origin-a", load(0, &[("live/x", true)]), later)
            .unwrap();
        r.report("edge-b2", load(0, &[]), later).unwrap();
        let b = Hint {
            region: Some("b".into()),
            client: None,
        };
        // No sweep ran since `now`: edge-b1 is still listed live, yet never chosen.
        for _ in 0..5 {
            let p = r
                .place_subscribe("live/x", &b, &mut |k| k - 1, later)
                .unwrap();
            assert_eq!(p.node.id, "edge-b2");
        }
    }
}
