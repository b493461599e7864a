//! `castnode manager`: the stream manager service — node registry with heartbeats, placement
//! lookups, WHIP/WHEP redirects, tokens, regions, node groups with the autoscaler and the
//! process provisioner, transcode jobs for transcoder nodes — on its HTTP port (default 5080).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::manager::api;
use crate::manager::embedded::Embedded;
use crate::manager::provision::{NodeSpec, ProcessProvisioner, Provisioner};
use crate::manager::scale::{Action, Autoscaler, EVALUATE_EVERY};
use crate::manager::store::Store;

/// Serves the manager until SIGINT/SIGTERM.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    if let Some(dir) = &cfg.manager.data_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
        // Before the data directory, the database's default was the working directory.
        if std::path::Path::new("castnode-manager.db").exists() {
            tracing::warn!(
                data_dir = %dir.display(),
                "castnode-manager.db in the working directory is no longer read (the state is \
                 in the data directory now): move it to <data dir>/manager.db, or pass --db"
            );
        }
    }
    let store = Store::open(cfg.manager.db.as_deref()).with_context(|| {
        format!(
            "opening the database {}",
            cfg.manager
                .db
                .as_deref()
                .map_or("(in memory)".into(), |p| p.display().to_string())
        )
    })?;
    let http = TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("binding HTTP to {}", cfg.http))?;
    let addr = http.local_addr()?;
    // Heartbeats (UDP) on the HTTP port's number.
    let udp = tokio::net::UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding the heartbeat UDP port {addr}"))?;
    let manager = Arc::new(Embedded::new(
        &cfg.cluster.token,
        cfg.manager.heartbeat_ttl,
        &cfg.manager.region,
        store,
        cfg.manager.require_token,
    )?);
    let generated = manager.ensure_admin(cfg.manager.admin_token.as_deref())?;
    manager.set_transcode(cfg.manager.transcode.clone());
    let provisioner = if cfg.manager.process_provisioner {
        let host = &cfg.manager.provision_host;
        let reach = if addr.ip().is_unspecified() {
            host.clone()
        } else {
            addr.ip().to_string()
        };
        Some(Arc::new(ProcessProvisioner::new(
            std::env::current_exe().context("finding the castnode executable")?,
            &format!("http://{reach}:{}", addr.port()),
            &cfg.cluster.token,
            host,
            cfg.manager.provision_dir.clone(),
        )?))
    } else {
        None
    };
    let beats = manager.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            match udp.recv_from(&mut buf).await {
                Ok((n, from)) => {
                    if let Some(reply) = beats.heartbeat(&buf[..n]) {
                        let _ = udp.send_to(&reply, from).await;
                    }
                }
                // ICMP errors from earlier replies surface here; nothing to do.
                Err(e) => tracing::debug!(error = %e, "heartbeat socket"),
            }
        }
    });
    let sweeper = manager.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            for node in sweeper.sweep() {
                tracing::warn!(%node, "node missed its heartbeats; out of placement");
            }
        }
    });
    let scaler = tokio::spawn(autoscale(
        manager.clone(),
        provisioner.clone().map(|p| p as Arc<dyn Provisioner>),
    ));
    let host = &cfg.public_host;
    let port = addr.port();
    println!("castnode manager is running.");
    println!("  Console: http://{host}:{port}/console   (with an API token)");
    println!(
        "  Nodes register with: --manager http://{host}:{port} --cluster-token <the token>   (heartbeats: UDP {port})"
    );
    println!(
        "  Where to publish: http://{host}:{port}/api/v1/broadcasts/live/mystream/publish?region=R"
    );
    println!(
        "  Where to watch:   http://{host}:{port}/api/v1/broadcasts/live/mystream/subscribe?region=R"
    );
    println!(
        "  WHIP / WHEP (redirects): http://{host}:{port}/whip/live/mystream, /whep/live/mystream"
    );
    println!("  Nodes:   http://{host}:{port}/api/v1/nodes   (Authorization: Bearer <API token>)");
    println!("  OpenAPI: http://{host}:{port}/api/v1/openapi.json");
    println!("  Metrics: http://{host}:{port}/metrics");
    println!(
        "  Transcode jobs (ladders by transcoder nodes): {} (+ publish lookups with ?transcode=true); http://{host}:{port}/api/v1/transcodes",
        cfg.manager.transcode
    );
    match &cfg.manager.db {
        Some(p) if p.as_os_str() != ":memory:" => println!("  Database: {}", p.display()),
        _ => println!("  Database: in memory (nothing survives a restart)"),
    }
    if let Some(secret) = generated {
        println!("  Admin API token (generated; shown only now, stored hashed): {secret}");
        println!("  Console, signed in: http://{host}:{port}/console#token={secret}");
    }
    tracing::info!(http = %addr, region = %cfg.manager.region, "manager node started");
    let served = axum::serve(
        http,
        api::router(manager).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(crate::shutdown::signal())
    .await
    .context("HTTP server");
    scaler.abort();
    if let Some(p) = provisioner {
        p.shutdown().await;
    }
    served
}

/// Evaluates the node groups every [`EVALUATE_EVERY`] and carries the actions out.
async fn autoscale(manager: Arc<Embedded>, provisioner: Option<Arc<dyn Provisioner>>) {
    let mut scaler = Autoscaler::new();
    let mut tick = tokio::time::interval(EVALUATE_EVERY);
    loop {
        tick.tick().await;
        let groups = match manager.node_groups() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the node groups");
                continue;
            }
        };
        let Some(prov) = &provisioner else {
            continue;
        };
        let actions = manager.with_registry(|reg| {
            scaler.plan(&groups, reg, Instant::now(), |g| {
                format!("{}-{:06x}", g.name, rand::random::<u32>() & 0xFF_FFFF)
            })
        });
        for action in actions {
            let label = action.label();
            match &action {
                Action::Create { group, id } => {
                    let Some(g) = groups.iter().find(|g| &g.name == group) else {
                        continue;
                    };
                    let spec = NodeSpec {
                        id: id.clone(),
                        group: group.clone(),
                        role: g.role,
                        region: g.region.clone(),
                        capacity: g.node_capacity,
                    };
                    tracing::info!(group = %group, node = %id, provisioner = prov.name(), "scale out: starting a node");
                    if let Err(e) = prov.create(&spec).await {
                        tracing::error!(group = %group, node = %id, error = %e, "cannot start a node");
                        scaler.start_failed(id);
                        manager.count_scale_action(group, "start_failed");
                        continue;
                    }
                }
                Action::Drain { group, id } => {
                    let deadline = groups
                        .iter()
                        .find(|g| &g.name == group)
                        .map_or(300, |g| g.drain_deadline_s);
                    tracing::info!(group = %group, node = %id, deadline_s = deadline, "scale in: draining a node");
                    let _ = manager.drain(id, std::time::Duration::from_secs(deadline));
                }
                Action::Remove { group, id, why } => {
                    tracing::info!(group = %group, node = %id, why, "removing a node");
                    if let Err(e) = prov.remove(id).await {
                        tracing::error!(node = %id, error = %e, "cannot remove a node");
                    }
                    manager.forget(id);
                }
            }
            manager.count_scale_action(action_group(&action), label);
        }
    }
}

fn action_group(a: &Action) -> &str {
    match a {
        Action::Create { group, .. }
        | Action::Drain { group, .. }
        | Action::Remove { group, .. } => group,
    }
}
