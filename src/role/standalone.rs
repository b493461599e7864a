//! The media-node roles: `castnode standalone` (RTMP and WHIP ingest; RTMP, HTTP-FLV and WHEP
//! playback; API and metrics, in one process), `origin` (the same, serving other nodes over the
//! cluster link), `relay` (cluster link in and out, plus health and metrics) and `edge`
//! (playback of broadcasts fetched from upstream on demand) and `transcoder` (ABR ladders of
//! broadcasts fetched from upstream, published back as their rungs: [`crate::transcode::Jobs`])
//! and `mixer` (one mix of broadcasts fetched from upstream, published upstream as a broadcast
//! of its own: [`crate::mix`]). Each only wires modules together.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cluster::link::{Link, StaticUpstreams, UpstreamChoice};
use crate::config::NodeConfig;
use crate::manager::StreamManager;
use crate::manager::remote::ManagerUpstreams;
use crate::node::NodeContext;
use crate::webrtc::driver::Webrtc;

/// Binds the listeners `role` needs, prints where to publish and play, and serves until
/// SIGINT/SIGTERM.
pub async fn run_role(cfg: NodeConfig, role: &str) -> anyhow::Result<()> {
    // Roles without players or publishers of their own: no RTMP, no WebRTC.
    let relay = matches!(role, "relay" | "transcoder" | "mixer");
    let rtmp = match relay {
        true => None,
        false => Some(
            TcpListener::bind(cfg.rtmp)
                .await
                .with_context(|| format!("binding RTMP to {}", cfg.rtmp))?,
        ),
    };
    let http = TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("binding HTTP to {}", cfg.http))?;
    let rtmp_port = match &rtmp {
        Some(l) => l.local_addr()?.port(),
        None => 0,
    };
    let http_port = http.local_addr()?.port();
    let host = cfg.public_host.clone();
    let (udp, public_ips) = (cfg.webrtc_udp, cfg.webrtc_public_ip.clone());
    let cluster = cfg.cluster.clone();
    let ctx = NodeContext::new(cfg);
    // The embedded manager (standalone): its own token, known only in process.
    let mut admin_secret = None;
    let embedded = match ctx.cfg.manager.embedded {
        true => {
            let token: String = (0..32)
                .map(|_| rand::random_range(b'a'..=b'z') as char)
                .collect();
            if let Some(dir) = &ctx.cfg.manager.data_dir {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the data directory {}", dir.display()))?;
            }
            let store = crate::manager::store::Store::open(ctx.cfg.manager.db.as_deref())
                .context("opening the manager database")?;
            let m = Arc::new(crate::manager::embedded::Embedded::new(
                &token,
                ctx.cfg.manager.heartbeat_ttl,
                &ctx.cfg.manager.region,
                store,
                ctx.cfg.manager.require_token,
            )?);
            admin_secret = m.ensure_admin(ctx.cfg.manager.admin_token.as_deref())?;
            Some((m, token))
        }
        false => None,
    };
    let manager: Option<Arc<dyn StreamManager>> = match (&embedded, ctx.cfg.manager.url.as_deref())
    {
        (Some((m, _)), _) => Some(m.clone()),
        (None, Some(url)) => Some(Arc::new(crate::manager::remote::Remote::new(
            url,
            &cluster.token,
        ))),
        (None, None) => None,
    };
    let manager_token = embedded
        .as_ref()
        .map_or_else(|| cluster.token.clone(), |(_, t)| t.clone());
    let fetches = matches!(role, "relay" | "edge" | "transcoder" | "mixer");
    let linked =
        cluster.listen.is_some() || !cluster.upstream.is_empty() || (manager.is_some() && fetches);
    let link = if linked {
        let upstreams: Box<dyn UpstreamChoice> = match (&manager, fetches) {
            (Some(m), true) => Box::new(ManagerUpstreams {
                manager: m.clone(),
                node: cluster.node_id.clone(),
                fallback: cluster.upstream.clone(),
            }),
            _ => Box::new(StaticUpstreams(cluster.upstream.clone())),
        };
        let link = Link::start(ctx.hub.clone(), &cluster, role, upstreams)
            .context("starting the cluster link")?;
        let _ = ctx.link.set(link.clone());
        Some(link)
    } else {
        None
    };
    let cluster_addr = link
        .as_ref()
        .and_then(|l| cluster.listen.and(l.local_addr()))
        .map_or_else(|| "none".to_owned(), |a| a.to_string());
    let webrtc = match relay {
        true => None,
        false => Some(
            Webrtc::start(udp, &public_ips, ctx.clone())
                .await
                .with_context(|| format!("binding WebRTC UDP to {udp}"))?,
        ),
    };
    let webrtc_udp = webrtc
        .as_ref()
        .map_or_else(|| "none".to_owned(), |w| w.local_addr().to_string());
    let rtmp_addr = match &rtmp {
        Some(l) => l.local_addr()?.to_string(),
        None => "none".to_owned(),
    };
    let http_addr = http.local_addr()?;
    tracing::info!(rtmp = %rtmp_addr, http = %http_addr, webrtc_udp = %webrtc_udp, cluster = %cluster_addr, node_id = %cluster.node_id, "{role} node started");
    if let Some(manager) = manager.clone() {
        let cluster_port = link
            .as_ref()
            .and_then(|l| cluster.listen.and(l.local_addr()))
            .map(|a| a.port());
        let info = crate::manager::NodeInfo {
            id: cluster.node_id.clone(),
            role: crate::manager::NodeRole::parse(role).unwrap_or(crate::manager::NodeRole::Edge),
            region: ctx.cfg.manager.region.clone(),
            addresses: crate::manager::NodeAddresses {
                rtmp: (rtmp_port != 0).then(|| format!("rtmp://{host}:{rtmp_port}")),
                http: format!("http://{host}:{http_port}"),
                cluster: cluster_port.map(|p| format!("{host}:{p}")),
            },
            capacity: ctx.cfg.manager.capacity,
            group: ctx.cfg.manager.node_group.clone(),
        };
        tokio::spawn(crate::manager::remote::run_reporter(
            manager,
            info,
            manager_token,
            ctx.clone(),
        ));
    }
    if role == "transcoder" {
        let jobs = ctx.cfg.jobs.clone();
        let ladder = ctx.ladders.as_ref().map_or(0, |l| l.rungs());
        println!("castnode transcoder {} is running.", cluster.node_id);
        println!("  ABR ladder: up to {ladder} rungs, none above the source (--ladder)");
        if jobs.is_empty() {
            println!("  Jobs: given by the stream manager");
        } else {
            println!("  Jobs: {} (--jobs)", jobs.join(", "));
        }
        if manager.is_some() {
            println!(
                "  Upstream (fetches sources, takes the ladders): the origin the stream manager \
                 names, else {:?}",
                cluster.upstream
            );
        } else {
            println!(
                "  Upstream (fetches sources, takes the ladders): {}",
                cluster.upstream.join(", ")
            );
        }
        println!("  Metrics:    http://{host}:{http_port}/metrics");
        if let (Some(link), Some(ladders)) = (ctx.link.get(), ctx.ladders.clone()) {
            match (&manager, jobs.is_empty()) {
                (Some(m), true) => {
                    tokio::spawn(take_jobs(
                        m.clone(),
                        cluster.node_id.clone(),
                        ctx.clone(),
                        link.clone(),
                        ladders,
                    ));
                }
                _ => ctx.jobs.set(&ctx.hub, link, &ladders, &jobs),
            }
        }
    } else if role == "mixer" {
        let mix = ctx.cfg.mix.clone().context("a mixer needs --mix")?;
        let link = ctx
            .link
            .get()
            .cloned()
            .context("a mixer needs --upstream")?;
        println!("castnode mixer {} is running.", cluster.node_id);
        println!(
            "  Mix {:?}: {} inputs ({}) into {}, {}x{} at {} fps (--mix)",
            mix.name,
            mix.layout.inputs.len(),
            mix.layout
                .inputs
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            mix.output,
            mix.layout.width,
            mix.layout.height,
            mix.layout.fps
        );
        println!(
            "  Upstream (fetches the inputs, takes the mix): {}",
            cluster.upstream.join(", ")
        );
        println!("  Metrics:    http://{host}:{http_port}/metrics");
        crate::mix::start(ctx.hub.clone(), link, mix).await?;
    } else if role == "relay" || role == "edge" {
        println!("castnode {role} {} is running.", cluster.node_id);
        if ctx.cfg.manager.url.is_some() {
            println!(
                "  Upstream: chosen by the stream manager, else {:?}",
                cluster.upstream
            );
        } else {
            println!("  Upstream: {}", cluster.upstream.join(", "));
        }
        println!("  Cluster link (QUIC): {cluster_addr}");
        println!("  Start page (what is live, with play links): http://{host}:{http_port}/");
        if role == "edge" {
            println!("  Watch in a browser: http://{host}:{http_port}/play/live/mystream");
            println!("  Watch (HTTP-FLV): http://{host}:{http_port}/live/mystream.flv");
            println!("  Watch (RTMP):     rtmp://{host}:{rtmp_port}/live/mystream");
        }
        println!("  Metrics:    http://{host}:{http_port}/metrics");
    } else {
        print_banner(
            role,
            &host,
            rtmp_port,
            http_port,
            &webrtc_udp,
            &cluster_addr,
        );
    }
    if embedded.is_some() {
        println!(
            "  Console (embedded stream manager): http://{host}:{http_port}/console   (give it the admin token)"
        );
    }
    if let Some(secret) = admin_secret {
        println!("  Manager API admin token (generated; shown only now): {secret}");
    }
    let facts = crate::http::NodeFacts {
        role: role.to_owned(),
        node_id: cluster.node_id.clone(),
        public_host: host.clone(),
        http_port,
        rtmp_port: (rtmp_port != 0).then_some(rtmp_port),
        webrtc_udp: webrtc.as_ref().map(|w| w.local_addr().to_string()),
        console: embedded.is_some(),
    };
    let manager = embedded.map(|(m, _)| m);
    serve(ctx, rtmp, http, webrtc, facts, manager).await
}

/// A transcoder's jobs from the stream manager: asked again as soon as the last answer came
/// (the manager answers when they change, or after a while), every second while it cannot be
/// reached or does not know the node yet (the reporter registers it).
async fn take_jobs(
    manager: Arc<dyn StreamManager>,
    node: String,
    ctx: Arc<NodeContext>,
    link: Arc<Link>,
    ladders: Arc<crate::transcode::Ladders>,
) {
    let mut after = 0;
    let mut failing = false;
    loop {
        match manager.jobs(&node, after).await {
            Ok(list) => {
                failing = false;
                after = list.version;
                let wanted: Vec<String> = list.jobs.into_iter().map(|j| j.broadcast).collect();
                ctx.jobs.set(&ctx.hub, &link, &ladders, &wanted);
            }
            Err(e) => {
                if !failing && !matches!(e, crate::manager::ManagerError::UnknownNode(_)) {
                    tracing::warn!(error = %e, "cannot get transcode jobs from the stream manager; retrying every second");
                }
                failing = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn print_banner(
    role: &str,
    host: &str,
    rtmp_port: u16,
    http_port: u16,
    webrtc_udp: &str,
    cluster_addr: &str,
) {
    println!("castnode {role} is running.");
    println!("  Start page (what is live, with play links): http://{host}:{http_port}/");
    println!("  OBS: Settings > Stream > Service: Custom");
    println!("       Server:     rtmp://{host}:{rtmp_port}/live");
    println!("       Stream key: mystream   (any key; the broadcast is live/<key>)");
    println!(
        "  ffmpeg: ffmpeg -re -i clip.flv -c copy -f flv rtmp://{host}:{rtmp_port}/live/mystream"
    );
    println!(
        "  Publish from a browser (camera + microphone, WHIP): http://{host}:{http_port}/publish/live/mystream"
    );
    println!(
        "       (browsers open cameras only on https:// or http://localhost; tunnel the port if remote)"
    );
    println!("  WHIP (OBS 30+, GStreamer): http://{host}:{http_port}/whip/live/mystream");
    println!("  Watch in a browser: http://{host}:{http_port}/play/live/mystream");
    println!(
        "  Watch (HTTP-FLV): http://{host}:{http_port}/live/mystream.flv   e.g. ffplay <that URL>"
    );
    println!("  Watch (RTMP):     rtmp://{host}:{rtmp_port}/live/mystream");
    println!(
        "  Watch (WebRTC, WHEP): http://{host}:{http_port}/whep/live/mystream   (UDP {webrtc_udp})"
    );
    println!("  Broadcasts: http://{host}:{http_port}/api/v1/broadcasts");
    if role == "standalone" {
        println!(
            "  Placement (embedded stream manager): http://{host}:{http_port}/api/v1/broadcasts/live/mystream/subscribe"
        );
    }
    println!("  Metrics:    http://{host}:{http_port}/metrics");
    if role == "origin" {
        println!("  Cluster link (QUIC): {cluster_addr}");
    }
}

async fn serve(
    ctx: Arc<NodeContext>,
    rtmp: Option<TcpListener>,
    http: TcpListener,
    webrtc: Option<Arc<Webrtc>>,
    facts: crate::http::NodeFacts,
    manager: Option<Arc<crate::manager::embedded::Embedded>>,
) -> anyhow::Result<()> {
    if let Some(rtmp) = rtmp {
        tokio::spawn(crate::rtmp::driver::serve(rtmp, ctx.clone()));
    }
    let reaper = Arc::clone(&ctx);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            reaper.hub.reap(std::time::Instant::now());
            // Broadcasts published here go upstream (nodes with upstreams only).
            if let Some(link) = reaper.link.get() {
                link.publish_local();
            }
            // ABR ladders for the broadcasts published here (`--ladder`).
            if let Some(ladders) = &reaper.ladders {
                let link = reaper.link.get();
                ladders.start_new(&reaper.hub, |name| link.is_some_and(|l| l.fetches(name)));
            }
        }
    });
    let http = crate::http::flv::HttpListener::new(http, ctx.clone())?;
    let mut routes = crate::http::router(ctx.clone(), facts, manager.clone());
    if let Some(webrtc) = webrtc {
        routes = routes.merge(crate::webrtc::signal::router(ctx, webrtc));
    }
    if let Some(m) = manager {
        routes = routes.merge(crate::manager::api::api_routes(m));
    }
    axum::serve(
        http,
        routes.into_make_service_with_connect_info::<crate::http::ClientAddr>(),
    )
    .with_graceful_shutdown(crate::shutdown::signal())
    .await
    .context("HTTP server")?;
    tracing::info!("shutting down");
    Ok(())
}
