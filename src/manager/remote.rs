//! The stream manager over HTTP ([`Remote`], a client of [`super::api`]) and the reporter task
//! every node with `--manager URL` runs.
//!
//! Guarantees: a node registers, then reports its load every [`REPORT_INTERVAL`], and at once
//! (checked every [`LADDER_CHECK`]) when the ladder publisher of one of its broadcasts changed,
//! so the manager learns of a transcoder lost by an origin within a fraction of a second of the
//! origin noticing; when the manager forgot it (restart, or marked failed and pruned) it registers again at once; while the
//! manager is unreachable it keeps serving and retries every interval (logged once per streak).
//! A node the manager drains keeps serving whoever is connected and stops the process (as
//! SIGTERM would) once nobody is (no viewer, publisher or downstream node), or at the deadline.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tracing::{info, warn};

use super::{
    BoxFuture, BroadcastLoad, Hint, JobList, LoadReport, ManagerError, NodeInfo, Placement,
    ReportReply, StreamManager,
};
use crate::node::NodeContext;

/// How often a node reports.
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// How often an ingest node looks whether a broadcast's ladder publisher changed (then it
/// reports at once).
pub(crate) const LADDER_CHECK: Duration = Duration::from_millis(100);

/// How long a job list long poll may take over HTTP: the manager's longest wait and a margin.
const JOBS_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a node waits for the manager's answer to a UDP heartbeat (it answers only when the
/// node must act: register again, or drain).
pub(crate) const HEARTBEAT_REPLY_WAIT: Duration = Duration::from_millis(50);

/// A `castnode manager` reached over HTTP, with load reports as UDP heartbeats
/// ([`super::heartbeat`]) to the same port number.
pub(crate) struct Remote {
    base: String,
    token: String,
    http: reqwest::Client,
    /// The heartbeat socket, connected to the manager (made on first use).
    udp: tokio::sync::Mutex<Option<Arc<tokio::net::UdpSocket>>>,
    /// The last heartbeat's sequence number.
    seq: std::sync::atomic::AtomicU64,
    /// Heartbeats sent.
    sent: std::sync::atomic::AtomicU64,
    /// Reports go over HTTP until then: a heartbeat that asked for an answer got none.
    udp_off_until: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Every how many heartbeats a node asks for an answer (the first one always does).
pub(crate) const HEARTBEAT_ANSWER_EVERY: u64 = 10;
/// How long a node reports over HTTP after its heartbeats went unanswered.
pub(crate) const HEARTBEAT_OFF: Duration = Duration::from_secs(60);

impl Remote {
    /// A client of the manager at `base` (`http://host:port`) proving `token`.
    pub(crate) fn new(base: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
            udp: tokio::sync::Mutex::new(None),
            seq: std::sync::atomic::AtomicU64::new(0),
            udp_off_until: std::sync::Mutex::new(None),
            sent: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The heartbeat socket, connected to the manager's host and port.
    async fn udp(&self) -> std::io::Result<Arc<tokio::net::UdpSocket>> {
        let mut slot = self.udp.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let url = reqwest::Url::parse(&self.base).map_err(std::io::Error::other)?;
        let (host, port) = (
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(80),
        );
        let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{host} has no address")))?;
        let local: std::net::SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = tokio::net::UdpSocket::bind(local).await?;
        sock.connect(addr).await?;
        let sock = Arc::new(sock);
        *slot = Some(sock.clone());
        Ok(sock)
    }

    /// Sends `load` as a UDP heartbeat and waits [`HEARTBEAT_REPLY_WAIT`] for an answer. `None`
    /// when it cannot go that way (too large, no socket, the port refuses): use HTTP.
    async fn heartbeat(
        &self,
        node: &str,
        load: &LoadReport,
    ) -> Option<Result<ReportReply, ManagerError>> {
        use std::sync::atomic::Ordering::SeqCst;
        let body = serde_json::to_vec(load).ok()?;
        // Rising across restarts: the wall clock in microseconds, or one more than the last.
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        {
            let off = self.udp_off_until.lock().unwrap_or_else(|p| p.into_inner());
            if off.is_some_and(|t| std::time::Instant::now() < t) {
                return None;
            }
        }
        let prev = self.seq.load(SeqCst);
        let seq = now_us.max(prev + 1);
        self.seq.store(seq, SeqCst);
        let sent = self.sent.fetch_add(1, SeqCst);
        let answer = sent.is_multiple_of(HEARTBEAT_ANSWER_EVERY);
        let datagram =
            super::heartbeat::encode_report(self.token.as_bytes(), node, seq, &body, answer)?;
        let sock = self.udp().await.ok()?;
        sock.send(&datagram).await.ok()?;
        let deadline = tokio::time::Instant::now() + HEARTBEAT_REPLY_WAIT;
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                // No answer: the manager took it, unless it was asked to answer.
                Err(_) if !answer => return Some(Ok(ReportReply::default())),
                Err(_) => {
                    warn!(
                        "the stream manager did not answer a UDP heartbeat; reporting over HTTP for {} s",
                        HEARTBEAT_OFF.as_secs()
                    );
                    *self.udp_off_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(std::time::Instant::now() + HEARTBEAT_OFF);
                    return None;
                }
                // The port refuses (no manager there, or an old one without heartbeats).
                Ok(Err(_)) => return None,
                Ok(Ok(n)) => {
                    let Ok((id, s, d)) =
                        super::heartbeat::decode_reply(self.token.as_bytes(), &buf[..n])
                    else {
                        continue;
                    };
                    if id != node || s != seq {
                        continue;
                    }
                    return Some(match d {
                        super::heartbeat::Directive::Unknown => {
                            Err(ManagerError::UnknownNode(node.to_owned()))
                        }
                        super::heartbeat::Directive::Draining(s) => Ok(ReportReply {
                            draining: true,
                            drain_deadline_s: Some(u64::from(s)),
                        }),
                        super::heartbeat::Directive::Taken => Ok(ReportReply::default()),
                    });
                }
            }
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ManagerError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| ManagerError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let reason = resp
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| status.to_string());
        Err(match status {
            StatusCode::UNAUTHORIZED => ManagerError::Unauthorized,
            StatusCode::FORBIDDEN => ManagerError::Forbidden("this call"),
            StatusCode::NOT_FOUND => ManagerError::UnknownNode(reason),
            StatusCode::SERVICE_UNAVAILABLE => ManagerError::Full("request"),
            StatusCode::BAD_REQUEST => ManagerError::BadRequest(reason),
            _ => ManagerError::Unreachable(reason),
        })
    }

    async fn lookup(
        &self,
        kind: &str,
        broadcast: &str,
        hint: &Hint,
    ) -> Result<Placement, ManagerError> {
        let mut url = format!("{}/api/v1/broadcasts/{broadcast}/{kind}", self.base);
        if let Some(r) = &hint.region {
            url.push_str("?region=");
            for b in r.bytes() {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    url.push(b as char);
                } else {
                    url.push_str(&format!("%{b:02X}"));
                }
            }
        }
        let req = self.http.get(url);
        match self.send(req).await {
            Ok(resp) => resp
                .json()
                .await
                .map_err(|e| ManagerError::Unreachable(e.to_string())),
            Err(ManagerError::UnknownNode(_)) => Err(ManagerError::NotLive(broadcast.to_owned())),
            Err(e) => Err(e),
        }
    }
}

/// Upstreams chosen by the stream manager, with the `--upstream` list as a fallback when the
/// manager cannot answer.
pub(crate) struct ManagerUpstreams {
    /// The manager.
    pub(crate) manager: Arc<dyn StreamManager>,
    /// This node's id.
    pub(crate) node: String,
    /// `--upstream`, tried when the manager gives nothing.
    pub(crate) fallback: Vec<String>,
}

impl crate::cluster::link::UpstreamChoice for ManagerUpstreams {
    fn candidates<'a>(&'a self, broadcast: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            match self.manager.upstream(broadcast, &self.node).await {
                Ok(list) if !list.is_empty() => list,
                Ok(_) => self.fallback.clone(),
                Err(e) => {
                    warn!(error = %e, "stream manager gave no upstream; using --upstream");
                    self.fallback.clone()
                }
            }
        })
    }

    fn any(&self) -> bool {
        true
    }
}

impl StreamManager for Remote {
    fn register<'a>(
        &'a self,
        node: &'a NodeInfo,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), ManagerError>> {
        Box::pin(async move {
            let req = self
                .http
                .post(format!("{}/api/v1/nodes", self.base))
                .bearer_auth(token)
                .json(node);
            self.send(req).await.map(|_| ())
        })
    }

    fn report<'a>(
        &'a self,
        node: &'a str,
        load: &'a LoadReport,
    ) -> BoxFuture<'a, Result<ReportReply, ManagerError>> {
        Box::pin(async move {
            if let Some(r) = self.heartbeat(node, load).await {
                return r;
            }
            let req = self
                .http
                .put(format!("{}/api/v1/nodes/{node}/load", self.base))
                .json(load);
            let resp = self.send(req).await?;
            if resp.status() == StatusCode::NO_CONTENT {
                return Ok(ReportReply::default());
            }
            resp.json()
                .await
                .map_err(|e| ManagerError::Unreachable(e.to_string()))
        })
    }

    fn publish<'a>(
        &'a self,
        broadcast: &'a str,
        hint: &'a Hint,
    ) -> BoxFuture<'a, Result<Placement, ManagerError>> {
        Box::pin(self.lookup("publish", broadcast, hint))
    }

    fn upstream<'a>(
        &'a self,
        broadcast: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, ManagerError>> {
        Box::pin(async move {
            let url = format!(
                "{}/api/v1/broadcasts/{broadcast}/upstream?node={}",
                self.base,
                node.bytes()
                    .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    })
                    .collect::<String>()
            );
            let resp = self.send(self.http.get(url)).await?;
            let v: serde_json::Value = resp
                .json()
                .await
                .map_err(|e| ManagerError::Unreachable(e.to_string()))?;
            Ok(v["upstreams"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|u| u.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn subscribe<'a>(
        &'a self,
        broadcast: &'a str,
        hint: &'a Hint,
    ) -> BoxFuture<'a, Result<Placement, ManagerError>> {
        Box::pin(self.lookup("subscribe", broadcast, hint))
    }

    fn jobs<'a>(
        &'a self,
        node: &'a str,
        after: u64,
    ) -> BoxFuture<'a, Result<JobList, ManagerError>> {
        Box::pin(async move {
            let url = format!(
                "{}/api/v1/nodes/{}/jobs?after={after}",
                self.base,
                path_segment(node)
            );
            // The manager holds the answer up to its long poll's length: more than the client's
            // timeout for other calls.
            let resp = self.send(self.http.get(url).timeout(JOBS_TIMEOUT)).await?;
            resp.json()
                .await
                .map_err(|e| ManagerError::Unreachable(e.to_string()))
        })
    }
}

/// `s` percent-encoded for a URL path segment or query value.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the last load sample saw, to turn counters into rates.
#[derive(Default)]
struct Sample {
    at: Option<Instant>,
    cpu_ticks: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// This process's CPU time in clock ticks (USER_HZ, 100 on Linux) and resident memory.
fn proc_self() -> (u64, u64) {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start after ')'.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024);
    (ticks, rss)
}

/// The cores this process may use (read once: it reads cgroup files).
fn cores() -> f64 {
    static CORES: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from) as f64)
}

/// A digest of which node publishes the ladder of which broadcast: it changes when one
/// starts, stops or moves (an order-independent sum of one hash per ladder).
fn ladders(ctx: &NodeContext) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(Default::default);
    let mut sum = 0u64;
    for b in ctx.hub.broadcasts() {
        if let Some(from) = b.ladder_from() {
            let mut h = keys.build_hasher();
            b.name().hash(&mut h);
            from.hash(&mut h);
            sum = sum.wrapping_add(h.finish());
        }
    }
    sum
}

/// The node's load now.
fn collect(ctx: &NodeContext, last: &mut Sample) -> LoadReport {
    let now = Instant::now();
    let (ticks, memory) = proc_self();
    let hub = ctx.hub.stats();
    let cluster = ctx.link.get();
    let (mut bytes_in, mut bytes_out) = (hub.bytes_in.load(Relaxed), hub.bytes_out.load(Relaxed));
    if let Some(l) = cluster {
        bytes_in += l.stats.bytes_in.load(Relaxed);
        bytes_out += l.stats.bytes_out.load(Relaxed);
    }
    let secs = last.at.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
    let rate = |now: u64, before: u64| {
        if secs > 0.0 {
            now.saturating_sub(before) as f64 / secs
        } else {
            0.0
        }
    };
    let cpu = rate(ticks, last.cpu_ticks) / 100.0;
    let report_in = rate(bytes_in, last.bytes_in);
    let report_out = rate(bytes_out, last.bytes_out);
    *last = Sample {
        at: Some(now),
        cpu_ticks: ticks,
        bytes_in,
        bytes_out,
    };
    let s = &ctx.stats;
    let viewers =
        s.rtmp_players.load(Relaxed) + s.flv_players.load(Relaxed) + s.webrtc_viewers.load(Relaxed);
    let connections = viewers
        + s.webrtc_publishers.load(Relaxed)
        + cluster.map_or(0, |l| l.stats.peers_in.load(Relaxed));
    let broadcasts = ctx
        .hub
        .broadcasts()
        .iter()
        .map(|b| BroadcastLoad {
            name: b.name().to_owned(),
            viewers: b.stats.players.load(Relaxed),
            node_subscriptions: b.stats.node_subscriptions.load(Relaxed),
            publishing: b.is_live() && !cluster.is_some_and(|l| l.fetches(b.name())),
            ladder_from: b.ladder_from().map(|n| n.to_string()),
        })
        .collect();
    LoadReport {
        cpu,
        cores: cores(),
        memory,
        bandwidth_in: report_in,
        bandwidth_out: report_out,
        connections,
        viewers,
        broadcasts,
    }
}

/// Registers `node` with `manager`, then reports the node's load every [`REPORT_INTERVAL`]
/// until the process ends.
pub(crate) async fn run_reporter(
    manager: Arc<dyn StreamManager>,
    node: NodeInfo,
    token: String,
    ctx: Arc<NodeContext>,
) {
    let mut registered = false;
    let mut failing = false;
    let mut draining = false;
    let mut last = Sample::default();
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    // Only ingest nodes take ladders over the cluster link.
    let watch_ladders = node.role.ingests();
    let mut check = tokio::time::interval(LADDER_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported_ladders = 0u64;
    loop {
        if watch_ladders {
            tokio::select! {
                _ = tick.tick() => {}
                _ = check.tick() => {
                    if ladders(&ctx) == reported_ladders {
                        continue;
                    }
                    // Reported now: the next regular report is a full interval away.
                    tick.reset();
                }
            }
        } else {
            tick.tick().await;
        }
        if watch_ladders {
            reported_ladders = ladders(&ctx);
        }
        if !registered {
            match manager.register(&node, &token).await {
                Ok(()) => {
                    info!(node = %node.id, "registered with the stream manager");
                    registered = true;
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "cannot register with the stream manager; retrying every second");
                    }
                    failing = true;
                    continue;
                }
            }
        }
        let load = collect(&ctx, &mut last);
        match manager.report(&node.id, &load).await {
            Ok(reply) => {
                failing = false;
                if reply.draining && !draining {
                    info!(
                        deadline_s = reply.drain_deadline_s,
                        "the stream manager drains this node: no new placements; it stops once \
                         nobody is connected"
                    );
                }
                draining = reply.draining;
                let empty = load.connections == 0 && !load.broadcasts.iter().any(|b| b.publishing);
                if draining && (empty || reply.drain_deadline_s == Some(0)) {
                    info!(empty, "drained; stopping");
                    crate::shutdown::request();
                    return;
                }
            }
            Err(ManagerError::UnknownNode(_)) => {
                // A restarted manager: register again now, not a heartbeat later.
                info!("the stream manager forgot this node; registering again");
                registered = manager.register(&node, &token).await.is_ok();
                if registered {
                    let _ = manager.report(&node.id, &load).await;
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "load report failed; retrying every second");
                }
                failing = true;
            }
        }
    }
}
