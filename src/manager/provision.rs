//! Provisioners: what creates and removes the nodes of a node group. [`Provisioner`] is the seam
//! (a Kubernetes provisioner would create and delete pods behind it); [`ProcessProvisioner`]
//! starts local `castnode` processes on free ports, so one machine can show autoscaling.
//!
//! Guarantees of the process provisioner:
//! - A started node gets its id, group, region and role, the manager's URL and the cluster
//!   token (in its environment, not on its command line), and binds every port on the
//!   provision host with port 0: several run side by side without clashes. It registers the
//!   addresses it bound.
//! - Its output goes to `<dir>/<node id>.log`.
//! - `remove` ends the process (SIGKILL: a node is removed only once it drained, failed or
//!   passed its drain deadline) and reaps it; a node it did not start is left alone.
//! - [`ProcessProvisioner::shutdown`] asks every node it started to stop (SIGTERM), then kills
//!   those still running after 5 s: a stopped manager leaves no process behind.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::BoxFuture;
use super::NodeRole;

/// A node to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeSpec {
    /// Its id (it registers with it).
    pub(crate) id: String,
    /// Its node group.
    pub(crate) group: String,
    /// Its role.
    pub(crate) role: NodeRole,
    /// Its region.
    pub(crate) region: String,
    /// Its capacity (viewers), when the group sets one.
    pub(crate) capacity: Option<u64>,
}

/// Why a node could not be created or removed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProvisionError {
    /// Node groups start edges, relays, origins or transcoders, never a standalone node.
    #[error("node groups start edges, relays, origins or transcoders")]
    Role,
    /// A directory, log file or process could not be made.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Creates and removes nodes.
pub(crate) trait Provisioner: Send + Sync {
    /// Its name, for logs.
    fn name(&self) -> &'static str;
    /// Starts a node; it registers with the manager by itself.
    fn create<'a>(&'a self, spec: &'a NodeSpec) -> BoxFuture<'a, Result<(), ProvisionError>>;
    /// Ends a node (it has drained, failed, or passed its drain deadline).
    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>>;
}

/// Starts local `castnode` processes.
pub(crate) struct ProcessProvisioner {
    exe: PathBuf,
    manager_url: String,
    token: String,
    host: String,
    dir: PathBuf,
    children: Mutex<HashMap<String, Child>>,
}

impl ProcessProvisioner {
    /// Nodes run `exe`, report to `manager_url` proving `token`, bind on `host`, and write
    /// their logs into `dir` (created if needed).
    pub(crate) fn new(
        exe: PathBuf,
        manager_url: &str,
        token: &str,
        host: &str,
        dir: PathBuf,
    ) -> Result<Self, ProvisionError> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            exe,
            manager_url: manager_url.to_owned(),
            token: token.to_owned(),
            host: host.to_owned(),
            dir,
            children: Mutex::new(HashMap::new()),
        })
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<String, Child>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every node it started: SIGTERM, then SIGKILL after 5 s.
    pub(crate) async fn shutdown(&self) {
        let mut children: Vec<(String, Child)> = self.children().drain().collect();
        for (_, child) in &children {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
        }
        for (id, child) in &mut children {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                tracing::warn!(node = %id, "node did not stop within 5 s; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

impl Provisioner for ProcessProvisioner {
    fn name(&self) -> &'static str {
        "process"
    }

    fn create<'a>(&'a self, spec: &'a NodeSpec) -> BoxFuture<'a, Result<(), ProvisionError>> {
        Box::pin(async move {
            let role = match spec.role {
                NodeRole::Edge => "edge",
                NodeRole::Relay => "relay",
                NodeRole::Origin => "origin",
                NodeRole::Transcoder => "transcoder",
                NodeRole::Standalone => return Err(ProvisionError::Role),
            };
            let log = std::fs::File::create(self.dir.join(format!("{}.log", spec.id)))?;
            let any = format!("{}:0", self.host);
            let mut cmd = Command::new(&self.exe);
            // The node's settings are its flags; none leaks in from the manager's environment.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("CASTNODE_") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg(role)
                .args(["--node-id", &spec.id])
                .args(["--node-group", &spec.group])
                .args(["--region", &spec.region])
                .args(["--manager", &self.manager_url])
                .args(["--public-host", &self.host])
                .args(["--http", &any, "--rtmp", &any, "--webrtc-udp", &any])
                .env("CASTNODE_CLUSTER_TOKEN", &self.token)
                // Anything a node writes lands next to its log, not in the manager's directory.
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if let Some(c) = spec.capacity {
                cmd.args(["--capacity", &c.to_string()]);
            }
            // Origins and relays serve other nodes; edges and transcoders only fetch (and a
            // transcoder publishes its ladder upstream).
            if matches!(spec.role, NodeRole::Origin | NodeRole::Relay) {
                cmd.args(["--cluster", &any]);
            }
            let child = cmd.spawn()?;
            tracing::info!(node = %spec.id, group = %spec.group, pid = child.id(), "node process started");
            self.children().insert(spec.id.clone(), child);
            Ok(())
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ProvisionError>> {
        Box::pin(async move {
            let child = self.children().remove(id);
            if let Some(mut child) = child {
                let _ = child.kill().await;
                tracing::info!(node = %id, "node process ended");
            }
            Ok(())
        })
    }
}
