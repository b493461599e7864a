//! What every role's modules share: the hub, the counters and the validated configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::NodeConfig;
use crate::media::{BroadcastConsumer, Hub, HubConfig};
use crate::metrics::NodeStats;

/// Shared state of one media node.
pub struct NodeContext {
    /// The node's broadcasts.
    pub hub: Hub,
    /// Counters for `/metrics`.
    pub(crate) stats: NodeStats,
    /// Settings.
    pub(crate) cfg: NodeConfig,
    /// On-demand transcoders.
    pub(crate) transcoders: crate::transcode::Transcoders,
    /// The ABR ladders this node makes itself (`--ladder`), when it has one.
    pub ladders: Option<Arc<crate::transcode::Ladders>>,
    /// A transcoder's jobs (the ladders it makes of broadcasts fetched from upstream).
    pub(crate) jobs: crate::transcode::Jobs,
    /// Per-broadcast WebRTC figures.
    pub(crate) webrtc: crate::metrics::webrtc::WebrtcStats,
    /// When players write: the node's write budget (`--write-budget` writes per second across
    /// all players) shared out among them, at most `--player-batch-ms` apart. Few players get
    /// every frame at once; many get frames merged, because each write costs the kernel about
    /// the same whatever its size.
    pub(crate) pacer: Arc<crate::media::pace::Pacer>,
    /// The cluster link, on nodes that have one (it holds the hub, not this context).
    pub link: std::sync::OnceLock<Arc<crate::cluster::link::Link>>,
}

impl NodeContext {
    /// A node with an empty hub.
    pub fn new(cfg: NodeConfig) -> Arc<Self> {
        let hub = Hub::new(HubConfig {
            reconnect_grace: cfg.publish_grace,
            ..HubConfig::default()
        });
        let pacer = crate::media::pace::Pacer::new(cfg.write_budget, cfg.player_batch);
        let ladders = cfg
            .ladder
            .clone()
            .map(|l| Arc::new(crate::transcode::Ladders::new(l)));
        Arc::new(Self {
            ladders,
            hub,
            pacer,
            stats: NodeStats::default(),
            cfg,
            transcoders: Default::default(),
            jobs: Default::default(),
            webrtc: Default::default(),
            link: Default::default(),
        })
    }

    /// A consumer of `name` for a local player: from the hub, or fetched over the cluster link
    /// (waiting for the upstream's answer). `None` when it is live nowhere this node can see.
    pub(crate) async fn subscribe(&self, name: &str) -> Option<BroadcastConsumer> {
        match self.link.get() {
            Some(link) => link.subscribe(name).await,
            None => self.hub.subscribe(name),
        }
    }

    /// Whether `bc`'s ladder has a rung named `rendition`, waiting (at most 3 s) for the
    /// ladder this node makes to declare its rungs when it has not yet (a broadcast that just
    /// went live).
    pub async fn rendition_ready(
        &self,
        bc: &Arc<crate::media::hub::Broadcast>,
        rendition: &str,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut changes = bc.watch();
        loop {
            if bc.has_rendition(rendition) {
                return true;
            }
            if self.ladders.is_none() || !bc.is_live() {
                return false;
            }
            if !bc.renditions().is_empty() {
                // Rungs are declared together (from one picture): a ladder that has some and
                // not this one after a moment never will.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                return bc.has_rendition(rendition);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return bc.has_rendition(rendition),
            }
        }
    }

    /// The cluster link's counters, on nodes that have a link.
    pub(crate) fn cluster_stats(&self) -> Option<&crate::metrics::ClusterStats> {
        self.link.get().map(|l| &*l.stats)
    }

    /// Registers a player of `counter` if the node has room; the guard unregisters it.
    pub(crate) fn admit_player(self: &Arc<Self>, flv: bool) -> Option<PlayerGuard> {
        let players = self.stats.rtmp_players.load(Relaxed) + self.stats.flv_players.load(Relaxed);
        if players >= self.cfg.max_players as u64 {
            return None;
        }
        let counter = self.counter(flv);
        counter.fetch_add(1, Relaxed);
        Some(PlayerGuard {
            ctx: self.clone(),
            flv,
        })
    }

    fn counter(&self, flv: bool) -> &AtomicU64 {
        if flv {
            &self.stats.flv_players
        } else {
            &self.stats.rtmp_players
        }
    }
}

/// Counts a player while it lives.
pub(crate) struct PlayerGuard {
    ctx: Arc<NodeContext>,
    flv: bool,
}

impl Drop for PlayerGuard {
    fn drop(&mut self) {
        self.ctx.counter(self.flv).fetch_sub(1, Relaxed);
    }
}
