//! The manager's configuration: API tokens (stored hashed), regions (CIDR → region tables) and
//! node groups, kept in an embedded SQLite database (`--db PATH`; in memory without one, or
//! with `--db :memory:`).
//!
//! Guarantees:
//! - Every change is written to the database before it is answered, so a restarted manager
//!   finds exactly what it had acknowledged (SQLite in WAL mode, one transaction per change).
//! - A token's secret is never stored or listed: only its SHA-256, compared by hash lookup.
//! - Records are validated here, before they are stored: a bad node group or CIDR is refused
//!   with a reason and leaves the store as it was.
//!
//! Schema (`PRAGMA user_version` 1): `tokens(id, name, access, hash, created)`,
//! `regions(name, body)`, `node_groups(name, body)`; `body` is the record's JSON.

use std::path::Path;
use std::sync::Mutex;

use ipnet::IpNet;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ManagerError, NodeRole};
use crate::names::name_ok;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Access {
    /// Everything: reads, and changes to tokens, regions, node groups and nodes.
    Admin,
    /// Reads only (and placement lookups when they need a token).
    ReadOnly,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::Admin => "admin",
            Access::ReadOnly => "read-only",
        }
    }
}

/// A token as stored and listed (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    /// Its id (for deleting it).
    pub(crate) id: String,
    /// What the operator called it.
    pub(crate) name: String,
    /// What it may do.
    pub(crate) access: Access,
    /// When it was made (Unix seconds).
    pub(crate) created: u64,
    /// SHA-256 of the secret, hex.
    #[serde(skip)]
    pub(crate) hash: String,
}

/// A region's client address table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RegionRecord {
    /// The region's name (as nodes report it with `--region`).
    pub(crate) name: String,
    /// Clients from these networks are placed in this region.
    #[serde(default)]
    pub(crate) cidrs: Vec<IpNet>,
}

/// The load figure a node group scales on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ScaleMetric {
    /// Viewers per node.
    Viewers,
    /// CPU cores in use per node.
    Cpu,
    /// Bytes per second out per node.
    BandwidthOut,
}

fn default_drain_deadline() -> u64 {
    300
}

fn default_cooldown() -> u64 {
    5
}

/// A node group: how many nodes of one role a region keeps, and when to add or drain one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeGroup {
    /// Its name (also the prefix of the ids of the nodes it starts).
    pub(crate) name: String,
    /// The region its nodes report.
    pub(crate) region: String,
    /// The role of its nodes: edge, relay, origin or transcoder.
    pub(crate) role: NodeRole,
    /// Fewest nodes kept running.
    pub(crate) min: u32,
    /// Most nodes started.
    pub(crate) max: u32,
    /// The figure compared with the thresholds: its mean over the group's live nodes.
    pub(crate) metric: ScaleMetric,
    /// A node is added when the figure is above this.
    pub(crate) scale_out_above: f64,
    /// A node is drained when the figure is below this (and stays at or under
    /// `scale_out_above` with one node fewer).
    pub(crate) scale_in_below: f64,
    /// Seconds a draining node may keep its last viewers before it is removed.
    #[serde(default = "default_drain_deadline")]
    pub(crate) drain_deadline_s: u64,
    /// Seconds between two scale actions of the group.
    #[serde(default = "default_cooldown")]
    pub(crate) cooldown_s: u64,
    /// The `--capacity` (viewers) of the nodes it starts [default: theirs].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) node_capacity: Option<u64>,
}

/// Most nodes one group may hold.
pub(crate) const MAX_GROUP_NODES: u32 = 1000;

impl NodeGroup {
    /// Why the group cannot be used, if it cannot.
    pub(crate) fn check(&self) -> Result<(), ManagerError> {
        let bad = |r: &str| Err(ManagerError::Invalid(r.to_owned()));
        if !name_ok(&self.name) || self.name.contains('/') {
            return bad("name: 1 to 128 printable ASCII characters, no spaces or '/'");
        }
        if !name_ok(&self.region) {
            return bad("region: 1 to 128 printable ASCII characters, no spaces");
        }
        if !matches!(
            self.role,
            NodeRole::Edge | NodeRole::Relay | NodeRole::Origin | NodeRole::Transcoder
        ) {
            return bad("role: edge, relay, origin or transcoder");
        }
        if self.min > self.max || self.max > MAX_GROUP_NODES {
            return bad("min ≤ max ≤ 1000 is needed");
        }
        let finite = |x: f64| x.is_finite() && x >= 0.0;
        if !finite(self.scale_out_above)
            || !finite(self.scale_in_below)
            || self.scale_in_below >= self.scale_out_above
        {
            return bad("0 ≤ scale_in_below < scale_out_above (finite numbers) is needed");
        }
        if self.drain_deadline_s > 86_400 || self.cooldown_s > 3600 {
            return bad("drain_deadline_s ≤ 86400 and cooldown_s ≤ 3600 are needed");
        }
        Ok(())
    }
}

/// SHA-256 of a token's secret, hex.
pub(crate) fn hash_secret(secret: &str) -> String {
    let d = Sha256::digest(secret.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random secret (256 bits, hex) prefixed `cn_`.
pub(crate) fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("cn_{hex}")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// SQLite failed: opening the file, setting its modes, or creating the schema.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The database's schema is newer than this castnode's.
    #[error("the database was written by a newer castnode (schema {0})")]
    NewerSchema(i64),
}

/// The database.
pub(crate) struct Store {
    conn: Mutex<Connection>,
}

fn db_error(e: rusqlite::Error) -> ManagerError {
    ManagerError::Storage(e.to_string())
}

impl Store {
    /// Opens (creating if needed) the database at `path`, or an in-memory one (None, or the
    /// path `:memory:`).
    pub(crate) fn open(path: Option<&Path>) -> Result<Self, StoreError> {
        let path = path.filter(|p| p.as_os_str() != ":memory:");
        let conn = match path {
            Some(p) => Connection::open(p)?,
            None => Connection::open_in_memory()?,
        };
        if path.is_some() {
            conn.pragma_update(None, "journal_mode", "WAL")?;
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > 1 {
            return Err(StoreError::NewerSchema(version));
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tokens (
                 id TEXT PRIMARY KEY, name TEXT NOT NULL, access TEXT NOT NULL,
                 hash TEXT NOT NULL UNIQUE, created INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS regions (name TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS node_groups (name TEXT PRIMARY KEY, body TEXT NOT NULL);
             PRAGMA user_version = 1;",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every token.
    pub(crate) fn tokens(&self) -> Result<Vec<TokenRecord>, ManagerError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT id, name, access, hash, created FROM tokens ORDER BY created, id")
            .map_err(db_error)?;
        let rows = st
            .query_map([], |r| {
                let access: String = r.get(2)?;
                Ok(TokenRecord {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    access: if access == "admin" {
                        Access::Admin
                    } else {
                        Access::ReadOnly
                    },
                    hash: r.get(3)?,
                    created: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(db_error)?;
        rows.collect::<Result<_, _>>().map_err(db_error)
    }

    /// Stores a new token for `secret`; returns its record.
    pub(crate) fn add_token(
        &self,
        name: &str,
        access: Access,
        secret: &str,
    ) -> Result<TokenRecord, ManagerError> {
        let rec = TokenRecord {
            id: format!("tok_{:016x}", rand::random::<u64>()),
            name: name.to_owned(),
            access,
            created: unix_now(),
            hash: hash_secret(secret),
        };
        self.conn()
            .execute(
                "INSERT INTO tokens (id, name, access, hash, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    rec.id,
                    rec.name,
                    access.as_str(),
                    rec.hash,
                    rec.created as i64
                ],
            )
            .map_err(db_error)?;
        Ok(rec)
    }

    /// Deletes a token; false when there was none with that id.
    pub(crate) fn delete_token(&self, id: &str) -> Result<bool, ManagerError> {
        let n = self
            .conn()
            .execute("DELETE FROM tokens WHERE id = ?1", params![id])
            .map_err(db_error)?;
        Ok(n > 0)
    }

    fn bodies<T: for<'de> Deserialize<'de>>(&self, table: &str) -> Result<Vec<T>, ManagerError> {
        let conn = self.conn();
        let mut st = conn
            .prepare(&format!("SELECT body FROM {table} ORDER BY name"))
            .map_err(db_error)?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_error)?;
        let mut out = Vec::new();
        for body in rows {
            let body = body.map_err(db_error)?;
            out.push(
                serde_json::from_str(&body)
                    .map_err(|e| ManagerError::Storage(format!("{table}: {e}")))?,
            );
        }
        Ok(out)
    }

    fn put_body<T: Serialize>(&self, table: &str, name: &str, v: &T) -> Result<(), ManagerError> {
        let body = serde_json::to_string(v).map_err(|e| ManagerError::Storage(e.to_string()))?;
        self.conn()
            .execute(
                &format!(
                    "INSERT INTO {table} (name, body) VALUES (?1, ?2)
                     ON CONFLICT(name) DO UPDATE SET body = excluded.body"
                ),
                params![name, body],
            )
            .map_err(db_error)?;
        Ok(())
    }

    fn delete_body(&self, table: &str, name: &str) -> Result<bool, ManagerError> {
        let n = self
            .conn()
            .execute(
                &format!("DELETE FROM {table} WHERE name = ?1"),
                params![name],
            )
            .map_err(db_error)?;
        Ok(n > 0)
    }

    /// Every region with a CIDR table.
    pub(crate) fn regions(&self) -> Result<Vec<RegionRecord>, ManagerError> {
        self.bodies("regions")
    }

    /// Creates or replaces a region's table.
    pub(crate) fn put_region(&self, r: &RegionRecord) -> Result<(), ManagerError> {
        self.put_body("regions", &r.name, r)
    }

    /// Deletes a region's table; false when there was none.
    pub(crate) fn delete_region(&self, name: &str) -> Result<bool, ManagerError> {
        self.delete_body("regions", name)
    }

    /// Every node group.
    pub(crate) fn node_groups(&self) -> Result<Vec<NodeGroup>, ManagerError> {
        self.bodies("node_groups")
    }

    /// Creates or replaces a node group (checked first).
    pub(crate) fn put_node_group(&self, g: &NodeGroup) -> Result<(), ManagerError> {
        g.check()?;
        self.put_body("node_groups", &g.name, g)
    }

    /// Deletes a node group; false when there was none.
    pub(crate) fn delete_node_group(&self, name: &str) -> Result<bool, ManagerError> {
        self.delete_body("node_groups", name)
    }

    /// Whether a token with this hash exists (for tests and the bootstrap token).
    pub(crate) fn has_hash(&self, hash: &str) -> Result<bool, ManagerError> {
        self.conn()
            .query_row(
                "SELECT 1 FROM tokens WHERE hash = ?1",
                params![hash],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> NodeGroup {
        NodeGroup {
            name: "edges-a".into(),
            region: "a".into(),
            role: NodeRole::Edge,
            min: 1,
            max: 3,
            metric: ScaleMetric::Viewers,
            scale_out_above: 4.0,
            scale_in_below: 1.0,
            drain_deadline_s: 300,
            cooldown_s: 5,
            node_capacity: None,
        }
    }

    #[test]
    fn records_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("castnode-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.db");
        let _ = std::fs::remove_file(&path);
        let tok = {
            let s = Store::open(Some(&path)).unwrap();
            let t = s.add_token("ops", Access::ReadOnly, "secret-1").unwrap();
            s.put_region(&RegionRecord {
                name: "a".into(),
                cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            })
            .unwrap();
            s.put_node_group(&group()).unwrap();
            t
        };
        let s = Store::open(Some(&path)).unwrap();
        assert_eq!(s.tokens().unwrap(), vec![tok.clone()]);
        assert!(s.has_hash(&hash_secret("secret-1")).unwrap());
        assert!(!s.has_hash(&hash_secret("secret-2")).unwrap());
        assert_eq!(s.regions().unwrap()[0].cidrs.len(), 1);
        assert_eq!(s.node_groups().unwrap(), vec![group()]);
        assert!(s.delete_token(&tok.id).unwrap());
        assert!(!s.delete_token(&tok.id).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_groups_are_refused() {
        let s = Store::open(None).unwrap();
        let mut g = group();
        g.min = 4;
        assert!(matches!(
            s.put_node_group(&g),
            Err(ManagerError::Invalid(_))
        ));
        let mut g = group();
        g.scale_in_below = 5.0;
        assert!(s.put_node_group(&g).is_err());
        let mut g = group();
        g.role = NodeRole::Standalone;
        assert!(s.put_node_group(&g).is_err());
        // Transcoder groups are fine (they scale on CPU, like edges can).
        let mut t = group();
        t.name = "transcoders".into();
        t.role = NodeRole::Transcoder;
        t.check().unwrap();
        assert!(s.node_groups().unwrap().is_empty());
    }
}
