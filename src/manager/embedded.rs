//! The in-process stream manager: a [`Registry`] behind a lock, answering at once.
//!
//! Guarantees: the lock is never held across an await (every method is synchronous inside);
//! registration needs the cluster token (compared in constant time); failed nodes are swept
//! before every placement, so a node silent for the TTL is never chosen; API tokens are checked
//! against an in-memory copy of the store's hashes, refreshed on every token change.
//!
//! The [`Registry`] reads no clock: this is where the time is read (once per call) and passed
//! in, for sweeps, reports, drains and placements.
//!
//! Transcode jobs ([`Jobs`]) are brought in line with the registry after every change that can
//! matter to them (a node coming, going, failing, draining, or reporting other publishers or
//! ladders) and on every sweep; a job list long poll ([`StreamManager::jobs`]) waits on a watch
//! of its node's list version, which every such update that changes the list moves on.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;

use super::heartbeat;
use super::jobs::{JobState, Jobs, LONG_POLL, TranscodeRule};
use super::registry::{NodeEntry, NodeStatus, Registry};
use super::store::{Access, NodeGroup, RegionRecord, Store, TokenRecord, hash_secret, new_secret};
use super::{
    BoxFuture, Hint, JobList, LoadReport, ManagerError, NodeInfo, Placement, ReportReply,
    StreamManager,
};
use crate::names::name_ok;

/// The in-process manager.
pub(crate) struct Embedded {
    registry: Mutex<Registry>,
    token: String,
    store: Store,
    /// Token hash → (id, access): the store's tokens, for checks without a query.
    tokens: RwLock<HashMap<String, (String, Access)>>,
    /// Placement lookups need a token.
    require_token: bool,
    /// Placements by (kind, region, result), for `/metrics`.
    /// Placements by region placed in (known regions; others count as `other`): counts by
    /// kind × result, see [`PLACEMENT_LABELS`].
    placements: Mutex<BTreeMap<String, [u64; 6]>>,
    /// Load reports taken: (UDP heartbeats, HTTP), for `/metrics`.
    reports: [std::sync::atomic::AtomicU64; 2],
    /// Scale actions by (group, action), for `/metrics`.
    scale_actions: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Transcode jobs and their long polls (locked after the registry, never before).
    jobs: Mutex<JobBook>,
}

/// The transcode jobs with what their long polls wait on.
struct JobBook {
    jobs: Jobs,
    /// Node → a watch of its job list's version, while someone polls it.
    watches: HashMap<String, tokio::sync::watch::Sender<u64>>,
    /// The registry generation the jobs were last updated at.
    generation: Option<u64>,
}

/// A transcode job as the API lists it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct TranscodeView {
    /// `app/key`.
    pub(crate) broadcast: String,
    /// The origin that has its publisher.
    pub(crate) origin: String,
    /// The transcoder making its ladder (none: no transcoder can take it now).
    pub(crate) transcoder: Option<String>,
    /// Unassigned, assigned, or running (the origin reports that transcoder's ladder).
    pub(crate) state: JobState,
    /// Milliseconds since it entered that state.
    pub(crate) since_ms: u64,
}

/// Counts by label, for `/metrics`.
pub(crate) type Counts = Vec<(&'static str, u64)>;

/// The (kind, result) of each placement counter slot.
const PLACEMENT_LABELS: [(&str, &str); 6] = [
    ("publish", "ok"),
    ("publish", "not_live"),
    ("publish", "full"),
    ("subscribe", "ok"),
    ("subscribe", "not_live"),
    ("subscribe", "full"),
];

/// A node as the API lists it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct NodeView {
    /// As registered.
    #[serde(flatten)]
    pub(crate) info: NodeInfo,
    /// Live, draining or failed.
    pub(crate) status: NodeStatus,
    /// Its last report.
    pub(crate) load: LoadReport,
    /// Milliseconds since its last report.
    pub(crate) last_seen_ms: u64,
}

/// A broadcast as the API lists it: which nodes carry it.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct BroadcastView {
    /// `app/key`.
    pub(crate) name: String,
    /// Viewers on every node together (people, not nodes).
    pub(crate) viewers: u64,
    /// Node subscriptions on every node together: nodes fetching it from another node over
    /// the cluster link (an edge's one subscription, whatever its viewers).
    pub(crate) node_subscriptions: u64,
    /// The nodes that have its publisher.
    pub(crate) publishers: Vec<String>,
    /// Every live node that carries it, with its viewers there.
    pub(crate) nodes: Vec<CarrierView>,
}

/// One node carrying a broadcast.
#[derive(Debug, serde::Serialize)]
pub(crate) struct CarrierView {
    /// The node's id.
    pub(crate) id: String,
    /// Its viewers of the broadcast.
    pub(crate) viewers: u64,
    /// Other nodes reading the broadcast from it.
    pub(crate) node_subscriptions: u64,
}

/// A region as the API lists it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct RegionView {
    /// As configured (an empty CIDR list when only nodes name it).
    #[serde(flatten)]
    pub(crate) region: RegionRecord,
    /// Live nodes that report it.
    pub(crate) nodes: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Embedded {
    /// A manager whose nodes prove `token`, failing after `ttl` without a report, keeping its
    /// configuration in `store`; placement lookups need a token when `require_token`.
    pub(crate) fn new(
        token: &str,
        ttl: Duration,
        default_region: &str,
        store: Store,
        require_token: bool,
    ) -> Result<Self, ManagerError> {
        let mut registry = Registry::new(ttl, default_region);
        registry.set_regions(&store.regions()?);
        // Versions rise across restarts: they start at the wall clock in microseconds.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let m = Self {
            registry: Mutex::new(registry),
            token: token.to_owned(),
            store,
            tokens: RwLock::new(HashMap::new()),
            require_token,
            placements: Mutex::new(BTreeMap::new()),
            reports: Default::default(),
            scale_actions: Mutex::new(BTreeMap::new()),
            // For one TTL after a start, jobs only go back to transcoders already making them:
            // those of a restarted manager register again first.
            jobs: Mutex::new(JobBook {
                jobs: Jobs::new(TranscodeRule::None, seed, Instant::now(), ttl),
                watches: HashMap::new(),
                generation: None,
            }),
        };
        m.reload_tokens()?;
        Ok(m)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    /// Which broadcasts get a transcoder's ladder unasked (`--transcode`).
    pub(crate) fn set_transcode(&self, rule: TranscodeRule) {
        lock(&self.jobs).jobs.set_rule(rule);
        let reg = self.registry();
        self.update_jobs(&reg, Instant::now(), true);
    }

    /// Brings the jobs in line with `reg` (when it changed since, or `always`) and wakes the
    /// long polls of the nodes whose list changed.
    fn update_jobs(&self, reg: &Registry, now: Instant, always: bool) {
        let mut book = lock(&self.jobs);
        if !always && book.generation == Some(reg.generation()) {
            return;
        }
        book.generation = Some(reg.generation());
        for (node, version) in book.jobs.update(reg, now) {
            if let Some(tx) = book.watches.get(&node) {
                tx.send_replace(version);
            }
        }
        book.watches.retain(|_, tx| tx.receiver_count() > 0);
    }

    /// Marks `broadcast` for a transcoder's ladder (a publish lookup with `?transcode=true`).
    pub(crate) fn mark_transcode(&self, broadcast: &str) -> Result<(), ManagerError> {
        let now = Instant::now();
        if !lock(&self.jobs).jobs.mark(broadcast, now) {
            return Err(ManagerError::Full("transcode request"));
        }
        let reg = self.registry();
        self.update_jobs(&reg, now, true);
        Ok(())
    }

    /// Every transcode job, sorted by broadcast.
    pub(crate) fn transcodes(&self) -> Vec<TranscodeView> {
        let now = Instant::now();
        let mut reg = self.registry();
        reg.maybe_sweep(now);
        self.update_jobs(&reg, now, false);
        drop(reg);
        let book = lock(&self.jobs);
        book.jobs
            .jobs()
            .map(|j| TranscodeView {
                broadcast: j.broadcast.clone(),
                origin: j.origin.clone(),
                transcoder: j.transcoder.clone(),
                state: j.state,
                since_ms: now.saturating_duration_since(j.since).as_millis() as u64,
            })
            .collect()
    }

    /// Transcode jobs by state, and jobs taken from a transcoder by why (for `/metrics`).
    pub(crate) fn job_counts(&self) -> (Counts, Counts) {
        let book = lock(&self.jobs);
        let states = JobState::ALL
            .iter()
            .map(|s| {
                let n = book.jobs.jobs().filter(|j| j.state == *s).count();
                (s.label(), n as u64)
            })
            .collect();
        let taken = book.jobs.taken().map(|(why, n)| (why.label(), n)).collect();
        (states, taken)
    }

    fn reload_tokens(&self) -> Result<(), ManagerError> {
        let map = self
            .store
            .tokens()?
            .into_iter()
            .map(|t| (t.hash, (t.id, t.access)))
            .collect();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// Makes sure an admin token exists: `secret` (from `--admin-token`) is added when it is not
    /// stored yet; with no admin token at all, one is made and its secret returned (to be shown
    /// once).
    pub(crate) fn ensure_admin(
        &self,
        secret: Option<&str>,
    ) -> Result<Option<String>, ManagerError> {
        if let Some(s) = secret
            && !self.store.has_hash(&hash_secret(s))?
        {
            self.store
                .add_token("admin (--admin-token)", Access::Admin, s)?;
        }
        let any_admin = self
            .store
            .tokens()?
            .iter()
            .any(|t| t.access == Access::Admin);
        let made = if any_admin {
            None
        } else {
            let s = new_secret();
            self.store
                .add_token("admin (generated)", Access::Admin, &s)?;
            Some(s)
        };
        self.reload_tokens()?;
        Ok(made)
    }

    /// What an API token may do (None: not a token of this manager).
    pub(crate) fn access(&self, bearer: &str) -> Option<Access> {
        if bearer.is_empty() {
            return None;
        }
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        tokens.get(&hash_secret(bearer)).map(|(_, a)| *a)
    }

    /// Whether placement lookups need a token.
    pub(crate) fn require_token(&self) -> bool {
        self.require_token
    }

    /// Every token (never a secret).
    pub(crate) fn tokens(&self) -> Result<Vec<TokenRecord>, ManagerError> {
        self.store.tokens()
    }

    /// Makes a token; returns its record and its secret (shown once).
    pub(crate) fn add_token(
        &self,
        name: &str,
        access: Access,
    ) -> Result<(TokenRecord, String), ManagerError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(ManagerError::BadRequest(
                "name: 1 to 128 characters, no control characters".into(),
            ));
        }
        let secret = new_secret();
        let rec = self.store.add_token(name, access, &secret)?;
        self.reload_tokens()?;
        Ok((rec, secret))
    }

    /// Deletes a token; the last admin token cannot go.
    pub(crate) fn delete_token(&self, id: &str) -> Result<(), ManagerError> {
        let all = self.store.tokens()?;
        let Some(t) = all.iter().find(|t| t.id == id) else {
            return Err(ManagerError::NotFound(format!("token {id}")));
        };
        if t.access == Access::Admin
            && all.iter().filter(|t| t.access == Access::Admin).count() == 1
        {
            return Err(ManagerError::Conflict(
                "the last admin token cannot be deleted".into(),
            ));
        }
        self.store.delete_token(id)?;
        self.reload_tokens()
    }

    /// Configured regions and the regions nodes report.
    pub(crate) fn regions(&self) -> Result<Vec<RegionView>, ManagerError> {
        let mut by_name: BTreeMap<String, RegionView> = self
            .store
            .regions()?
            .into_iter()
            .map(|r| {
                (
                    r.name.clone(),
                    RegionView {
                        region: r,
                        nodes: 0,
                    },
                )
            })
            .collect();
        let reg = self.registry();
        for n in reg.nodes() {
            let v = by_name
                .entry(n.info.region.clone())
                .or_insert_with(|| RegionView {
                    region: RegionRecord {
                        name: n.info.region.clone(),
                        cidrs: Vec::new(),
                    },
                    nodes: 0,
                });
            if n.state() != NodeStatus::Failed {
                v.nodes += 1;
            }
        }
        Ok(by_name.into_values().collect())
    }

    /// Creates or replaces a region's CIDR table.
    pub(crate) fn put_region(&self, r: &RegionRecord) -> Result<(), ManagerError> {
        if !name_ok(&r.name) || r.cidrs.len() > 10_000 {
            return Err(ManagerError::Invalid(
                "region: 1 to 128 printable ASCII characters, at most 10000 CIDRs".into(),
            ));
        }
        self.store.put_region(r)?;
        self.registry().set_regions(&self.store.regions()?);
        Ok(())
    }

    /// Deletes a region's CIDR table.
    pub(crate) fn delete_region(&self, name: &str) -> Result<(), ManagerError> {
        if !self.store.delete_region(name)? {
            return Err(ManagerError::NotFound(format!("region {name}")));
        }
        self.registry().set_regions(&self.store.regions()?);
        Ok(())
    }

    /// Every node group.
    pub(crate) fn node_groups(&self) -> Result<Vec<NodeGroup>, ManagerError> {
        self.store.node_groups()
    }

    /// Creates or replaces a node group; true when it is new.
    pub(crate) fn put_node_group(&self, g: &NodeGroup) -> Result<bool, ManagerError> {
        let new = !self.store.node_groups()?.iter().any(|x| x.name == g.name);
        self.store.put_node_group(g)?;
        Ok(new)
    }

    /// Deletes a node group (its nodes are drained by the autoscaler).
    pub(crate) fn delete_node_group(&self, name: &str) -> Result<(), ManagerError> {
        if !self.store.delete_node_group(name)? {
            return Err(ManagerError::NotFound(format!("node group {name}")));
        }
        Ok(())
    }

    /// Marks silent nodes failed (also done before every placement).
    pub(crate) fn sweep(&self) -> Vec<String> {
        let now = Instant::now();
        let mut reg = self.registry();
        let failed = reg.sweep(now);
        self.update_jobs(&reg, now, true);
        failed
    }

    /// Drains a node: no new placements; it exits once empty, or is removed after `deadline`.
    pub(crate) fn drain(&self, id: &str, deadline: Duration) -> Result<(), ManagerError> {
        let now = Instant::now();
        let mut reg = self.registry();
        if reg.drain(id, now + deadline) {
            self.update_jobs(&reg, now, false);
            Ok(())
        } else {
            Err(ManagerError::NotFound(format!("node {id}")))
        }
    }

    /// Forgets a node that was removed.
    pub(crate) fn forget(&self, id: &str) {
        let mut reg = self.registry();
        reg.forget(id);
        self.update_jobs(&reg, Instant::now(), false);
    }

    /// Runs `f` on the registry (swept first): for the autoscaler.
    pub(crate) fn with_registry<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        let mut reg = self.registry();
        reg.sweep(Instant::now());
        f(&reg)
    }

    /// Every node with its state.
    pub(crate) fn nodes(&self) -> Vec<NodeView> {
        let now = Instant::now();
        let mut reg = self.registry();
        reg.sweep(now);
        reg.nodes()
            .into_iter()
            .map(|n: &NodeEntry| NodeView {
                info: n.info.clone(),
                status: n.state(),
                load: n.load.clone(),
                last_seen_ms: now.duration_since(n.last_seen).as_millis() as u64,
            })
            .collect()
    }

    /// Every broadcast some live node carries, sorted by name.
    pub(crate) fn broadcasts(&self) -> Vec<BroadcastView> {
        let mut reg = self.registry();
        reg.sweep(Instant::now());
        let mut out: BTreeMap<&str, BroadcastView> = BTreeMap::new();
        for n in reg.nodes() {
            if n.status == NodeStatus::Failed {
                continue;
            }
            for b in &n.load.broadcasts {
                let v = out.entry(&b.name).or_insert_with(|| BroadcastView {
                    name: b.name.clone(),
                    ..BroadcastView::default()
                });
                v.viewers += b.viewers;
                v.node_subscriptions += b.node_subscriptions;
                if b.publishing {
                    v.publishers.push(n.info.id.clone());
                }
                v.nodes.push(CarrierView {
                    id: n.info.id.clone(),
                    viewers: b.viewers,
                    node_subscriptions: b.node_subscriptions,
                });
            }
        }
        out.into_values().collect()
    }

    /// Placement counts: ((kind, region, result), count), leaving out zeros.
    pub(crate) fn placement_counts(&self) -> Vec<((&'static str, String, &'static str), u64)> {
        let m = lock(&self.placements);
        let mut out = Vec::new();
        for (region, counts) in m.iter() {
            for (i, &n) in counts.iter().enumerate() {
                if n > 0 {
                    let (kind, result) = PLACEMENT_LABELS[i];
                    out.push(((kind, region.clone(), result), n));
                }
            }
        }
        out
    }

    /// Load reports taken: (over UDP heartbeats, over HTTP or in process).
    pub(crate) fn report_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.reports[0].load(Relaxed), self.reports[1].load(Relaxed))
    }

    /// Counts a scale action of a group.
    pub(crate) fn count_scale_action(&self, group: &str, action: &'static str) {
        *lock(&self.scale_actions)
            .entry((group.to_owned(), action))
            .or_default() += 1;
    }

    /// Scale actions: ((group, action), count).
    pub(crate) fn scale_action_counts(&self) -> Vec<((String, &'static str), u64)> {
        let m = lock(&self.scale_actions);
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// A node's load report, taken by value (the API's path: no copy of the report).
    pub(crate) fn report_owned(
        &self,
        node: &str,
        load: LoadReport,
    ) -> Result<ReportReply, ManagerError> {
        self.reports[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let mut reg = self.registry();
        let r = reg.report(node, load, now);
        self.update_jobs(&reg, now, false);
        drop(reg);
        r.map(|drain| ReportReply {
            draining: drain.is_some(),
            drain_deadline_s: drain.map(|d| d.saturating_duration_since(now).as_secs()),
        })
    }

    /// Handles one UDP heartbeat datagram (see [`super::heartbeat`]); the reply to send back,
    /// when the node must act. Unauthenticated, malformed or replayed datagrams are dropped.
    pub(crate) fn heartbeat(&self, datagram: &[u8]) -> Option<Vec<u8>> {
        let token = self.token.as_bytes();
        let r = match heartbeat::decode_report(token, datagram) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat datagram dropped");
                return None;
            }
        };
        let load: LoadReport = match serde_json::from_slice(r.body) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(node = %r.node, error = %e, "heartbeat with a malformed report");
                return None;
            }
        };
        let now = Instant::now();
        let mut reg = self.registry();
        let reply = reg.report_seq(r.node, r.seq, load, now);
        self.update_jobs(&reg, now, false);
        drop(reg);
        if reply.is_ok() {
            self.reports[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let directive = match reply {
            Err(_) => heartbeat::Directive::Unknown,
            Ok(None) if r.answer => heartbeat::Directive::Taken,
            Ok(None) => return None,
            Ok(Some(deadline)) => heartbeat::Directive::Draining(
                deadline
                    .saturating_duration_since(now)
                    .as_secs()
                    .min(u64::from(u32::MAX)) as u32,
            ),
        };
        Some(heartbeat::encode_reply(token, r.node, r.seq, directive))
    }

    /// Registers a node whose caller is already authenticated (cluster or admin token).
    pub(crate) fn register_node(&self, node: &NodeInfo) -> Result<(), ManagerError> {
        if !name_ok(&node.id)
            || !name_ok(&node.region)
            || node.addresses.http.is_empty()
            || node.group.as_deref().is_some_and(|g| !name_ok(g))
        {
            return Err(ManagerError::BadRequest(
                "a node needs an id and a region (1 to 128 printable ASCII characters, no spaces) and an HTTP address".into(),
            ));
        }
        let now = Instant::now();
        let mut reg = self.registry();
        reg.register(node.clone(), now);
        self.update_jobs(&reg, now, false);
        Ok(())
    }

    /// Whether `bearer` may make node calls: the cluster token, or an admin token.
    pub(crate) fn node_caller(&self, bearer: &str) -> bool {
        self.token_ok(bearer) || self.access(bearer) == Some(Access::Admin)
    }

    /// Whether `token` is the cluster token.
    pub(crate) fn token_ok(&self, token: &str) -> bool {
        let (a, b) = (token.as_bytes(), self.token.as_bytes());
        !b.is_empty()
            && a.len() == b.len()
            && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
    }

    fn place(
        &self,
        kind: &'static str,
        broadcast: &str,
        hint: &Hint,
    ) -> Result<Placement, ManagerError> {
        let mut rng = rand::rng();
        let mut pick = |k: usize| rng.random_range(0..k.max(1));
        let now = Instant::now();
        let mut reg = self.registry();
        reg.maybe_sweep(now);
        let r = if kind == "publish" {
            reg.place_publish(broadcast, hint, &mut pick, now)
        } else {
            reg.place_subscribe(broadcast, hint, &mut pick, now)
        };
        let result = match &r {
            Ok(_) => 0,
            Err(ManagerError::NotLive(_)) => 1,
            Err(_) => 2,
        };
        let at = usize::from(kind != "publish") * 3 + result;
        // A region nobody has (an arbitrary `?region=`) must not grow the metrics.
        let region = reg.region_for(hint);
        let region = if reg.known_region(region) {
            region
        } else {
            "other"
        };
        let mut counts = lock(&self.placements);
        match counts.get_mut(region) {
            Some(c) => c[at] += 1,
            None => {
                let mut c = [0; 6];
                c[at] = 1;
                counts.insert(region.to_owned(), c);
            }
        }
        r
    }
}

impl StreamManager for Embedded {
    fn register<'a>(
        &'a self,
        node: &'a NodeInfo,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), ManagerError>> {
        let r = if self.token_ok(token) {
            self.register_node(node)
        } else {
            Err(ManagerError::Unauthorized)
        };
        Box::pin(std::future::ready(r))
    }

    fn report<'a>(
        &'a self,
        node: &'a str,
        load: &'a LoadReport,
    ) -> BoxFuture<'a, Result<ReportReply, ManagerError>> {
        Box::pin(std::future::ready(self.report_owned(node, load.clone())))
    }

    fn publish<'a>(
        &'a self,
        broadcast: &'a str,
        hint: &'a Hint,
    ) -> BoxFuture<'a, Result<Placement, ManagerError>> {
        Box::pin(std::future::ready(self.place("publish", broadcast, hint)))
    }

    fn subscribe<'a>(
        &'a self,
        broadcast: &'a str,
        hint: &'a Hint,
    ) -> BoxFuture<'a, Result<Placement, ManagerError>> {
        Box::pin(std::future::ready(self.place("subscribe", broadcast, hint)))
    }

    fn upstream<'a>(
        &'a self,
        broadcast: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, ManagerError>> {
        let mut reg = self.registry();
        reg.sweep(Instant::now());
        let list = reg.upstreams(broadcast, node);
        Box::pin(std::future::ready(Ok(list)))
    }

    fn jobs<'a>(
        &'a self,
        node: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<JobList, ManagerError>> {
        Box::pin(async move {
            let mut version = {
                if self.registry().node(node).is_none() {
                    return Err(ManagerError::UnknownNode(node.to_owned()));
                }
                let mut book = lock(&self.jobs);
                let list = book.jobs.list(node);
                if list.version != after {
                    return Ok(list);
                }
                let tx = book
                    .watches
                    .entry(node.to_owned())
                    .or_insert_with(|| tokio::sync::watch::channel(list.version).0);
                tx.send_if_modified(|v| {
                    let moved = *v != list.version;
                    *v = list.version;
                    moved
                });
                tx.subscribe()
            };
            // Changed, or the poll's time is up: either way the list as it is now.
            let _ = tokio::time::timeout(LONG_POLL, version.wait_for(|v| *v != after)).await;
            Ok(lock(&self.jobs).jobs.list(node))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::{BroadcastLoad, NodeAddresses, NodeRole};
    use std::sync::Arc;

    const TOKEN: &str = "cluster-token-0123456789";

    fn manager() -> Embedded {
        let store = Store::open(None).unwrap();
        // A long TTL: the nodes below report only when the test says.
        let m = Embedded::new(TOKEN, Duration::from_secs(600), "a", store, false).unwrap();
        m.set_transcode(TranscodeRule::All);
        for (id, role) in [
            ("origin-a", NodeRole::Origin),
            ("t-1", NodeRole::Transcoder),
        ] {
            let info = NodeInfo {
                id: id.into(),
                role,
                region: "a".into(),
                addresses: NodeAddresses {
                    rtmp: None,
                    http: format!("http://{id}"),
                    cluster: None,
                },
                capacity: 10,
                group: None,
            };
            m.register_node(&info).unwrap();
        }
        m.report_owned(
            "t-1",
            LoadReport {
                cores: 8.0,
                ..LoadReport::default()
            },
        )
        .unwrap();
        m
    }

    fn origin_publishes(m: &Embedded, ladder_from: Option<&str>, publishing: bool) {
        let load = LoadReport {
            broadcasts: vec![BroadcastLoad {
                name: "live/x".into(),
                publishing,
                ladder_from: ladder_from.map(str::to_owned),
                ..BroadcastLoad::default()
            }],
            ..LoadReport::default()
        };
        m.report_owned("origin-a", load).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn job_lists_are_long_polls() {
        let m = Arc::new(manager());
        // Unknown nodes are told so at once.
        assert_eq!(
            m.jobs("nobody", 0).await,
            Err(ManagerError::UnknownNode("nobody".into()))
        );
        let empty = m.jobs("t-1", 0).await.unwrap();
        assert!(empty.jobs.is_empty());
        // Nothing changes: the poll answers after LONG_POLL with the same list.
        let start = tokio::time::Instant::now();
        assert_eq!(m.jobs("t-1", empty.version).await.unwrap(), empty);
        assert_eq!(start.elapsed(), LONG_POLL);
        // A poll waiting when the origin reports the broadcast (with t-1 already publishing its
        // ladder, as after a manager restart: it is t-1's at once) wakes with the new list.
        let waiting = tokio::spawn({
            let m = m.clone();
            async move { m.jobs("t-1", empty.version).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        origin_publishes(&m, Some("t-1"), true);
        let got = waiting.await.unwrap().unwrap();
        assert!(got.version > empty.version);
        assert_eq!(
            got.jobs,
            [crate::manager::TranscodeJob {
                broadcast: "live/x".into()
            }]
        );
        assert_eq!(m.transcodes()[0].state, JobState::Running);
        // A version from elsewhere (an earlier manager) gets the list at once.
        let start = tokio::time::Instant::now();
        assert_eq!(m.jobs("t-1", got.version + 7).await.unwrap(), got);
        assert_eq!(start.elapsed(), Duration::ZERO);
        // The broadcast ends: the waiting poll answers the empty list.
        let waiting = tokio::spawn({
            let m = m.clone();
            async move { m.jobs("t-1", got.version).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        origin_publishes(&m, None, false);
        let ended = waiting.await.unwrap().unwrap();
        assert!(ended.jobs.is_empty() && ended.version > got.version);
        assert!(m.transcodes().is_empty());
    }

    #[test]
    fn jobs_are_counted_for_metrics() {
        let m = manager();
        origin_publishes(&m, Some("t-1"), true);
        let (states, taken) = m.job_counts();
        assert_eq!(states, [("unassigned", 0), ("assigned", 0), ("running", 1)]);
        assert!(taken.is_empty());
        // The origin loses t-1's ladder: taken (lost); unassigned, as in the manager's first TTL
        // (600 s here) jobs only go back to a transcoder already making them.
        origin_publishes(&m, None, true);
        let (states, taken) = m.job_counts();
        assert_eq!(states, [("unassigned", 1), ("assigned", 0), ("running", 0)]);
        assert_eq!(taken, [("lost", 1)]);
        let view = &m.transcodes()[0];
        assert_eq!(
            (view.origin.as_str(), view.transcoder.as_deref()),
            ("origin-a", None)
        );
    }
}
