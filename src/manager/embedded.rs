//! The in-process stream manager: a [`Registry`] behind a lock, answering at once.
//!
//! Guarantees: the lock is never held across an await (every method is synchronous inside);
//! registration needs the cluster token (compared in constant time); failed nodes are swept
//! before every placement, so a node silent for the TTL is never chosen.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

use super::registry::{NodeEntry, NodeStatus, Registry};
use super::{BoxFuture, Hint, LoadReport, ManagerError, NodeInfo, Placement, StreamManager};

/// The in-process manager.
pub struct Embedded {
    registry: Mutex<Registry>,
    token: String,
    /// Placements by (kind, region asked, result), for `/metrics`.
    placements: Mutex<BTreeMap<(&'static str, String, &'static str), u64>>,
}

/// A node as the API lists it.
#[derive(Debug, serde::Serialize)]
pub struct NodeView {
    /// As registered.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Live or failed.
    pub status: NodeStatus,
    /// Its last report.
    pub load: LoadReport,
    /// Milliseconds since its last report.
    pub last_seen_ms: u64,
}

impl Embedded {
    /// A manager whose nodes prove `token`, failing after `ttl` without a report.
    pub fn new(token: &str, ttl: Duration, default_region: &str) -> Self {
        Self {
            registry: Mutex::new(Registry::new(ttl, default_region)),
            token: token.to_owned(),
            placements: Mutex::new(BTreeMap::new()),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks silent nodes failed (also done before every placement).
    pub fn sweep(&self) -> Vec<String> {
        self.registry().sweep(Instant::now())
    }

    /// Every node with its state.
    pub fn nodes(&self) -> Vec<NodeView> {
        let now = Instant::now();
        let mut reg = self.registry();
        reg.sweep(now);
        reg.nodes()
            .into_iter()
            .map(|n: &NodeEntry| NodeView {
                info: n.info.clone(),
                status: n.status,
                load: n.load.clone(),
                last_seen_ms: now.duration_since(n.last_seen).as_millis() as u64,
            })
            .collect()
    }

    /// Placement counts: ((kind, region, result), count).
    pub fn placement_counts(&self) -> Vec<((&'static str, String, &'static str), u64)> {
        let m = self.placements.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Whether `token` is the cluster token.
    pub fn token_ok(&self, token: &str) -> bool {
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
        let mut reg = self.registry();
        reg.sweep(Instant::now());
        let r = if kind == "publish" {
            reg.place_publish(broadcast, hint, &mut pick)
        } else {
            reg.place_subscribe(broadcast, hint, &mut pick)
        };
        drop(reg);
        let result = match &r {
            Ok(_) => "ok",
            Err(ManagerError::NotLive(_)) => "not_live",
            Err(_) => "full",
        };
        let region = hint.region.clone().unwrap_or_default();
        *self
            .placements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((kind, region, result))
            .or_default() += 1;
        r
    }
}

/// A node id or region: 1 to 128 printable ASCII characters, no spaces.
fn name_ok(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

impl StreamManager for Embedded {
    fn register<'a>(
        &'a self,
        node: &'a NodeInfo,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), ManagerError>> {
        let r = if !self.token_ok(token) {
            Err(ManagerError::Unauthorized)
        } else if !name_ok(&node.id) || !name_ok(&node.region) || node.addresses.http.is_empty() {
            Err(ManagerError::BadRequest(
                "a node needs an id and a region (1 to 128 printable ASCII characters, no spaces) and an HTTP address".into(),
            ))
        } else {
            self.registry().register(node.clone(), Instant::now());
            Ok(())
        };
        Box::pin(std::future::ready(r))
    }

    fn report<'a>(
        &'a self,
        node: &'a str,
        load: &'a LoadReport,
    ) -> BoxFuture<'a, Result<(), ManagerError>> {
        let r = self.registry().report(node, load.clone(), Instant::now());
        Box::pin(std::future::ready(r))
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
}
