//! The stream manager: the one seam between media nodes and placement (`docs/manager-api.md`).
//!
//! Nodes register (id, role, region, public addresses, capacity) and report their load every
//! second; broadcasters and players ask where to publish and where to watch. [`StreamManager`]
//! is the interface; [`embedded::Embedded`] answers in-process from a [`registry::Registry`],
//! [`remote::Remote`] asks a `castnode manager` over HTTP ([`api`] is that service's REST API).
//!
//! # Module map
//!
//! - [`registry`]: nodes, liveness (heartbeat TTL) and the placement functions (pure).
//! - [`jobs`]: transcode jobs: which broadcasts get an ABR ladder, on which transcoder (pure).
//! - [`embedded`]: the in-process manager.
//! - [`api`]: the manager's HTTP API (axum), including the WHIP/WHEP redirects.
//! - [`remote`]: the HTTP client of that API, and the reporter task every node runs.
//! - [`heartbeat`]: load reports as authenticated UDP datagrams (the cheap path).
//! - [`store`]: tokens, regions and node groups in SQLite.
//! - [`scale`]: the autoscaler (pure: groups and nodes in, actions out).
//! - [`provision`]: the provisioner trait and the local-process provisioner.
//!
//! The web console (`console.html`) is served by [`api`]. Not built yet: a Kubernetes
//! provisioner, a shared store for several managers.

pub(crate) mod api;
pub(crate) mod embedded;
pub(crate) mod heartbeat;
pub(crate) mod jobs;
pub(crate) mod provision;
pub mod registry;
pub(crate) mod remote;
pub(crate) mod scale;
pub(crate) mod store;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// A boxed future (the trait is used as `dyn StreamManager`).
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Everything in one process: can take publishers and players.
    Standalone,
    /// Takes publishers (and players).
    Origin,
    /// Between nodes only.
    Relay,
    /// Takes players.
    Edge,
    /// Makes ABR ladders of origins' broadcasts (its jobs come from the manager): takes neither
    /// publishers nor players.
    Transcoder,
}

impl NodeRole {
    /// The role named `s` (a role name of the command line).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "standalone" => NodeRole::Standalone,
            "origin" => NodeRole::Origin,
            "relay" => NodeRole::Relay,
            "edge" => NodeRole::Edge,
            "transcoder" => NodeRole::Transcoder,
            _ => return None,
        })
    }

    /// Whether publishers may be sent to it.
    pub(crate) fn ingests(self) -> bool {
        matches!(self, NodeRole::Standalone | NodeRole::Origin)
    }

    /// Whether players may be sent to it.
    pub(crate) fn serves_players(self) -> bool {
        matches!(self, NodeRole::Standalone | NodeRole::Edge)
    }
}

/// Where a node is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddresses {
    /// `rtmp://host:port` (no path), when the node takes RTMP.
    pub rtmp: Option<String>,
    /// `http://host:port` (no path): HTTP-FLV, WHIP, WHEP, API.
    pub http: String,
    /// `host:port` of its cluster link (QUIC), when it serves other nodes.
    #[serde(default)]
    pub cluster: Option<String>,
}

/// A node as it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique name.
    pub id: String,
    /// What it does.
    pub role: NodeRole,
    /// Its region.
    pub region: String,
    /// Where it is reached.
    pub addresses: NodeAddresses,
    /// Most viewers (players + WebRTC) it takes.
    pub capacity: u64,
    /// The node group it belongs to (set by the provisioner that started it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The manager's answer to a load report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReportReply {
    /// The node is scaled in: it gets no new placements and should exit once it has no viewers.
    #[serde(default)]
    pub(crate) draining: bool,
    /// While draining: seconds left before its last viewers are cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) drain_deadline_s: Option<u64>,
}

/// A node's load, reported every second.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// CPU in use, in cores.
    pub cpu: f64,
    /// Cores the node may use (`std::thread::available_parallelism`); 0 from nodes too old to
    /// say. Its CPU headroom is `cores - cpu`.
    #[serde(default)]
    pub cores: f64,
    /// Resident memory, bytes.
    pub memory: u64,
    /// Bytes per second in.
    pub bandwidth_in: f64,
    /// Bytes per second out.
    pub bandwidth_out: f64,
    /// Connections (publishers, players, WebRTC sessions, cluster peers).
    pub connections: u64,
    /// Viewers now (players + WebRTC viewers: people, not other nodes).
    pub viewers: u64,
    /// Broadcasts the node carries, with their viewers and node subscriptions there.
    pub broadcasts: Vec<BroadcastLoad>,
}

/// One broadcast on a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BroadcastLoad {
    /// `app/key`.
    pub name: String,
    /// Its viewers on the node (people: RTMP, HTTP-FLV and WebRTC players).
    pub viewers: u64,
    /// Other nodes reading it from this node over the cluster link (not viewers).
    #[serde(default)]
    pub node_subscriptions: u64,
    /// The node has its publisher.
    pub publishing: bool,
    /// On an origin: the node whose transcoder publishes the broadcast's ABR ladder here, while
    /// one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ladder_from: Option<String>,
}

/// A transcoder's jobs, as the manager answers [`StreamManager::jobs`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    /// The version of the node's job list: it changes whenever the list does, and never goes
    /// back, not even when the node registers again or the manager restarts.
    pub version: u64,
    /// The jobs, sorted by broadcast.
    pub jobs: Vec<TranscodeJob>,
}

/// One transcode job: make the ABR ladder of a broadcast and publish its rungs back to the
/// origin that has its publisher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscodeJob {
    /// `app/key`.
    pub broadcast: String,
}

/// What the asker tells about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// The region asked for.
    pub region: Option<String>,
    /// The client's address (placed by the CIDR → region table when no region is asked).
    pub client: Option<IpAddr>,
}

/// The answer to a placement lookup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The chosen node.
    pub(crate) node: PlacedNode,
    /// Ready-to-use URLs on it.
    pub(crate) urls: serde_json::Map<String, serde_json::Value>,
}

/// The chosen node, as answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlacedNode {
    /// Its id.
    pub(crate) id: String,
    /// Its role.
    pub(crate) role: NodeRole,
    /// Its region.
    pub(crate) region: String,
}

/// Why the manager could not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManagerError {
    /// Nobody publishes the broadcast (subscribe lookups).
    #[error("broadcast {0} is not live")]
    NotLive(String),
    /// No live node of the needed role has room.
    #[error("no node with room for this {0}")]
    Full(&'static str),
    /// The node is not registered (heartbeats).
    #[error("node {0} is not registered")]
    UnknownNode(String),
    /// A missing or unknown token.
    #[error("wrong or missing token")]
    Unauthorized,
    /// A valid token that may not do this (a read-only token asking for a change).
    #[error("this token may not do that: {0}")]
    Forbidden(&'static str),
    /// No such record (token, region, node group, node).
    #[error("{0} not found")]
    NotFound(String),
    /// The change would break something (deleting the last admin token).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request is well formed but its values contradict each other (min above max …).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The manager could not be reached or answered nonsense.
    #[error("stream manager unreachable: {0}")]
    Unreachable(String),
}

/// The stream manager, as media nodes and the HTTP API see it.
pub(crate) trait StreamManager: Send + Sync {
    /// Registers (or re-registers) a node; `token` is the cluster token it proves.
    fn register<'a>(
        &'a self,
        node: &'a NodeInfo,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), ManagerError>>;
    /// A node's load report (its heartbeat); the answer says whether it is draining.
    fn report<'a>(
        &'a self,
        node: &'a str,
        load: &'a LoadReport,
    ) -> BoxFuture<'a, Result<ReportReply, ManagerError>>;
    /// Where to publish `broadcast`.
    fn publish<'a>(
        &'a self,
        broadcast: &'a str,
        hint: &'a Hint,
    ) -> BoxFuture<'a, Result<Placement, ManagerError>>;
    /// Where to watch `broadcast`.
    fn subscribe<'a>(
        &'a self,
        broadcast: &'a str,
        hint: &'a Hint,
    ) -> BoxFuture<'a, Result<Placement, ManagerError>>;
    /// The cluster-link addresses node `node` should fetch `broadcast` from (or publish it
    /// to), in the order to try them: a relay of its region, then origins (the one with the
    /// publisher first).
    fn upstream<'a>(
        &'a self,
        broadcast: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, ManagerError>>;
    /// Node `node`'s transcode jobs (a long poll): answers at once when the list's version
    /// differs from `after` (it is newer, or `after` came from an earlier manager), else when
    /// the list changes, or after [`jobs::LONG_POLL`] with the list as it is.
    /// `UnknownNode` when the node is not registered.
    fn jobs<'a>(
        &'a self,
        node: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<JobList, ManagerError>>;
}
