//! Configuration: one struct read from flags, `CASTNODE_*` environment variables and an optional
//! TOML file (`--config`), in that order of precedence, validated before any port is bound.
//!
//! A bad value is a [`ConfigError`] naming the key; `main` exits with status 64 (EX_USAGE).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::ladder::TranscodeRule;
use crate::ladder::{DEFAULT_LADDER, Ladder, LadderSpec};

mod mix;
pub use mix::MixConfig;

/// castnode: a live-streaming cluster in one binary.
#[derive(Parser, Debug)]
#[command(name = "castnode", version, about)]
pub struct Cli {
    /// The role this process plays.
    #[command(subcommand)]
    pub role: Role,
}

/// Roles of the binary.
#[derive(Subcommand, Debug)]
pub enum Role {
    /// Everything one machine needs in one process: ingest, playback, (later) stream manager.
    Standalone(NodeArgs),
    /// Ingest node (RTMP/WHIP) serving the cluster.
    Origin(NodeArgs),
    /// Fans broadcasts out between nodes over QUIC.
    Relay(NodeArgs),
    /// Serves viewers, pulling broadcasts from upstream on demand.
    Edge(NodeArgs),
    /// Builds ABR ladders with FFmpeg.
    Transcoder(NodeArgs),
    /// Composites several broadcasts into one.
    Mixer(NodeArgs),
    /// The stream manager: placement, scaling, API and console.
    Manager(NodeArgs),
}

impl Role {
    /// The role's name and its arguments.
    pub fn parts(&self) -> (&'static str, &NodeArgs) {
        match self {
            Role::Standalone(a) => ("standalone", a),
            Role::Origin(a) => ("origin", a),
            Role::Relay(a) => ("relay", a),
            Role::Edge(a) => ("edge", a),
            Role::Transcoder(a) => ("transcoder", a),
            Role::Mixer(a) => ("mixer", a),
            Role::Manager(a) => ("manager", a),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A listen address as given: `HOST:PORT`, the host an IP address (`[…]` around IPv6) or a
/// name. Names are resolved when the configuration is resolved, before anything is bound.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ListenAddr {
    host: String,
    port: u16,
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr {
                host: a.ip().to_string(),
                port: a.port(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("{s:?} is not HOST:PORT (the port is a number up to 65535)"))?;
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !name_ok {
            return Err(format!(
                "{s:?} is not HOST:PORT (HOST: an IP address or a host name)"
            ));
        }
        Ok(ListenAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl ListenAddr {
    /// The address to bind: the IP address given, or what the host name resolves to (its first
    /// IPv4 address when it has one, so `localhost` is 127.0.0.1, else its first address).
    /// `key` names the setting in the error.
    pub(crate) fn resolve(&self, key: &str) -> Result<SocketAddr, ConfigError> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| bad(key, format!("{self}: cannot resolve {}: {e}", self.host)))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| bad(key, format!("{self}: {} has no address", self.host)))
    }
}

/// Settings of a media node. Every field can come from a flag, an environment variable or the
/// TOML file (same names as the flags, e.g. `max-message-bytes = 1048576`).
#[derive(Args, Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, env = "CASTNODE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// RTMP listen address, HOST:PORT (an IP address or a host name) [default: 0.0.0.0:1935].
    #[arg(long, env = "CASTNODE_RTMP")]
    pub rtmp: Option<ListenAddr>,
    /// HTTP listen address, HOST:PORT: HTTP-FLV, API, health, metrics [default: 0.0.0.0:8080;
    /// manager: 0.0.0.0:5080].
    #[arg(long, env = "CASTNODE_HTTP")]
    pub http: Option<ListenAddr>,
    /// Log format [default: text].
    #[arg(long, env = "CASTNODE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Largest RTMP message accepted, bytes [default: 8388608].
    #[arg(long, env = "CASTNODE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Most RTMP connections at once [default: 10000].
    #[arg(long, env = "CASTNODE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most players (RTMP + HTTP-FLV) at once [default: 20000].
    #[arg(long, env = "CASTNODE_MAX_PLAYERS")]
    pub max_players: Option<usize>,
    /// Seconds a broadcast waits for its publisher to reconnect [default: 5].
    #[arg(long, env = "CASTNODE_PUBLISH_GRACE")]
    pub publish_grace: Option<f64>,
    /// Seconds a client has to finish the RTMP handshake [default: 10].
    #[arg(long, env = "CASTNODE_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<f64>,
    /// Most milliseconds between two writes to one player (5 at the least: players are
    /// written to every 5 ms when there are few); frames in between go out in one write
    /// [default: 100].
    #[arg(long, env = "CASTNODE_PLAYER_BATCH_MS")]
    pub player_batch_ms: Option<u64>,
    /// Writes per second to players, all together, before frames are merged into fewer writes
    /// [default: 10000].
    #[arg(long, env = "CASTNODE_WRITE_BUDGET")]
    pub write_budget: Option<u64>,
    /// Seconds a player may block a write before it is disconnected [default: 10].
    #[arg(long, env = "CASTNODE_STALL_TIMEOUT")]
    pub stall_timeout: Option<f64>,
    /// WebRTC media: the one UDP address every peer uses, HOST:PORT [default: 0.0.0.0:8189].
    #[arg(long, env = "CASTNODE_WEBRTC_UDP")]
    pub webrtc_udp: Option<ListenAddr>,
    /// Address handed to WebRTC peers as a candidate (repeatable; comma-separated in the
    /// environment) [default: the bound address, or this host's primary address and 127.0.0.1].
    #[arg(long, env = "CASTNODE_WEBRTC_PUBLIC_IP", value_delimiter = ',')]
    #[serde(default)]
    pub webrtc_public_ip: Vec<IpAddr>,
    /// Most WebRTC viewers at once [default: 2000].
    #[arg(long, env = "CASTNODE_MAX_VIEWERS")]
    pub max_viewers: Option<usize>,
    /// Host name printed in the URLs given to broadcasters and players [default: localhost].
    #[arg(long, env = "CASTNODE_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// This node's name in the cluster [default: <role>-<host name>-<pid>].
    #[arg(long, env = "CASTNODE_NODE_ID")]
    pub node_id: Option<String>,
    /// Cluster link: the UDP address this node serves other nodes on over QUIC, HOST:PORT
    /// [default for origin and relay: 0.0.0.0:4443; others serve none unless given].
    #[arg(long, env = "CASTNODE_CLUSTER")]
    pub cluster: Option<ListenAddr>,
    /// Cluster link: upstream nodes to fetch broadcasts from, tried in order (HOST:PORT;
    /// repeatable; comma-separated).
    #[arg(long, env = "CASTNODE_UPSTREAM", value_delimiter = ',')]
    #[serde(default)]
    pub upstream: Vec<String>,
    /// Cluster link: the shared secret every node must prove.
    #[arg(long, env = "CASTNODE_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// Cluster link: a file holding the shared secret (first line).
    #[arg(long, env = "CASTNODE_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// Cluster link: PEM certificate chain to present (with --cluster-key) instead of a
    /// self-signed one.
    #[arg(long, env = "CASTNODE_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// Cluster link: PEM private key of --cluster-cert.
    #[arg(long, env = "CASTNODE_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,
    /// Cluster link: PEM CA certificates upstream nodes are verified against.
    #[arg(long, env = "CASTNODE_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// Seconds an upstream subscription outlives its last local viewer [default: 10].
    #[arg(long, env = "CASTNODE_LINGER")]
    pub linger: Option<f64>,
    /// Cluster link: threads serving other nodes [default: one per 4 cores, at least 1].
    #[arg(long, env = "CASTNODE_CLUSTER_THREADS")]
    pub cluster_threads: Option<usize>,
    /// The stream manager this node registers with and reports its load to
    /// (`http://host:port`), or `embedded` (standalone's default: the manager runs in process).
    #[arg(long, env = "CASTNODE_MANAGER")]
    pub manager: Option<String>,
    /// This node's region [default: default].
    #[arg(long, env = "CASTNODE_REGION")]
    pub region: Option<String>,
    /// Viewers this node takes, for placement [default: --max-viewers].
    #[arg(long, env = "CASTNODE_CAPACITY")]
    pub capacity: Option<u64>,
    /// Manager: seconds without a load report after which a node is failed [default: 3].
    #[arg(long, env = "CASTNODE_HEARTBEAT_TTL")]
    pub heartbeat_ttl: Option<f64>,
    /// The node group this node belongs to (set by the provisioner that starts it).
    #[arg(long, env = "CASTNODE_NODE_GROUP")]
    pub node_group: Option<String>,
    /// Manager: the SQLite database keeping tokens, regions and node groups (`:memory:` keeps
    /// nothing) [manager default: manager.db in --data-dir; standalone: in memory, or
    /// manager.db in --data-dir when one is given].
    #[arg(long, env = "CASTNODE_DB")]
    pub db: Option<PathBuf>,
    /// Where the manager keeps its state (the database) [default: $XDG_DATA_HOME/castnode, or
    /// ~/.local/share/castnode; standalone: none, state in memory].
    #[arg(long, env = "CASTNODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Manager: an admin API token (stored hashed; at least 16 characters). Without one and
    /// with none stored, a token is generated and printed once.
    #[arg(long, env = "CASTNODE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Manager: placement lookups and WHIP/WHEP redirects need an API token too.
    #[arg(long, env = "CASTNODE_REQUIRE_TOKEN")]
    #[serde(default)]
    pub require_token: bool,
    /// Manager: what starts the nodes of node groups: `process` (local castnode processes) or
    /// `none` [default: process].
    #[arg(long, env = "CASTNODE_PROVISIONER")]
    pub provisioner: Option<String>,
    /// Manager, process provisioner: the host nodes bind and are reached on [default: 127.0.0.1].
    #[arg(long, env = "CASTNODE_PROVISION_HOST")]
    pub provision_host: Option<String>,
    /// Manager, process provisioner: where node logs go [default: a castnode-nodes-<pid>
    /// folder in the temporary directory].
    #[arg(long, env = "CASTNODE_PROVISION_DIR")]
    pub provision_dir: Option<PathBuf>,
    /// Manager: which broadcasts published on origins get an ABR ladder from a transcoder
    /// node: `none`, `all`, or a comma-separated list of apps (`live,events`); a publish lookup
    /// with `?transcode=true` asks for one as well [default: none].
    #[arg(long, env = "CASTNODE_TRANSCODE")]
    pub transcode: Option<String>,
    /// The ABR ladder to build: `default` (built in) or a `[ladders.NAME]` table of the
    /// --config file (standalone: its broadcasts get the ladder's renditions; transcoder).
    #[arg(long, env = "CASTNODE_LADDER")]
    pub ladder: Option<String>,
    /// Named ABR ladders: the --config file's `[ladders.NAME]` tables (no flag), every one
    /// checked at start ([`crate::ladder::LadderSpec`]).
    #[arg(skip)]
    #[serde(default)]
    pub ladders: BTreeMap<String, LadderSpec>,
    /// Transcoder: broadcasts (`app/key`, comma-separated) to make the ladder of whenever they
    /// are live upstream, without a stream manager (with one, the manager gives the jobs).
    #[arg(long, env = "CASTNODE_JOBS", value_delimiter = ',')]
    #[serde(default)]
    pub jobs: Vec<String>,
    /// Mixer: the mix to make, a JSON file ([`MixConfig`]: output, canvas, inputs' rectangles,
    /// gains, PNG overlays), checked whole before anything binds.
    #[arg(long, env = "CASTNODE_MIX")]
    pub mix: Option<PathBuf>,
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {}: {reason}", self.from.as_deref().unwrap_or(&self.key))]
pub struct ConfigError {
    /// The key (flag name without dashes, as in the TOML file).
    pub(crate) key: String,
    /// What is wrong.
    pub(crate) reason: String,
    /// Where the value came from, as the user gave it (`--max-viewers`, `CASTNODE_MAX_VIEWERS`),
    /// when known ([`ConfigError::located`]); the message names it instead of the key.
    pub(crate) from: Option<String>,
}

fn bad(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
        from: None,
    }
}

impl ConfigError {
    /// Names where the bad value came from, as `matches` (the role's) tell: the flag, or the
    /// environment variable. A value from the `--config` file keeps its key, the TOML key.
    pub fn located(mut self, matches: &ArgMatches, role: &str) -> Self {
        let id = self.key.replace('-', "_");
        if !matches.ids().any(|i| i.as_str() == id) {
            return self;
        }
        self.from = match matches.value_source(&id) {
            Some(ValueSource::CommandLine) => Some(format!("--{}", self.key)),
            Some(ValueSource::EnvVariable) => role_arg(role, &id).and_then(|a| {
                let env = a.get_env()?.to_string_lossy().into_owned();
                Some(format!("{env} (--{})", self.key))
            }),
            _ => None,
        };
        self
    }
}

/// The argument `id` of `role`'s command line.
fn role_arg(role: &str, id: &str) -> Option<clap::Arg> {
    command()
        .find_subcommand(role)?
        .get_arguments()
        .find(|a| a.get_id() == id)
        .cloned()
}

/// The command line, with the help of each role telling that role's defaults.
pub fn command() -> clap::Command {
    let help = |s: clap::Command, id: &str, text: &str| {
        let text = text.to_owned();
        s.mut_arg(id, |a| a.help(text.clone()).long_help(text))
    };
    Cli::command()
        .mut_subcommand("manager", |s| {
            let s = help(
                s,
                "http",
                "HTTP listen address, HOST:PORT: the API, console and WHIP/WHEP redirects; \
                 heartbeats on the same port over UDP [default: 0.0.0.0:5080]",
            );
            let s = help(
                s,
                "db",
                "The SQLite database keeping tokens, regions and node groups (`:memory:` keeps \
                 nothing) [default: manager.db in --data-dir]",
            );
            help(
                s,
                "data_dir",
                "Where the manager keeps its state (manager.db); created at start \
                 [default: $XDG_DATA_HOME/castnode, or ~/.local/share/castnode]",
            )
        })
        .mut_subcommand("standalone", |s| {
            let s = help(
                s,
                "db",
                "The embedded manager's SQLite database of tokens, regions and node groups \
                 [default: in memory, or manager.db in --data-dir when one is given]",
            );
            help(
                s,
                "data_dir",
                "Where the embedded manager keeps its state (manager.db); created at start \
                 [default: none, the state is in memory]",
            )
        })
        .mut_subcommands(|s| {
            let name = s.get_name().to_owned();
            if name == "manager" {
                return s;
            }
            let s = help(
                s,
                "http",
                "HTTP listen address, HOST:PORT: HTTP-FLV, API, health, metrics \
                 [default: 0.0.0.0:8080]",
            );
            match name.as_str() {
                "origin" | "relay" => help(
                    s,
                    "cluster",
                    "Cluster link: the UDP address this node serves other nodes on over QUIC, \
                     HOST:PORT [default: 0.0.0.0:4443]",
                ),
                _ => help(
                    s,
                    "cluster",
                    "Cluster link: the UDP address this node serves other nodes on over QUIC, \
                     HOST:PORT [default: none, it serves no other node]",
                ),
            }
        })
}

/// What `main` prints for a value clap refused (`e`, while parsing `args`), when the value came
/// from an environment variable: clap names the flag whatever the source, this names the
/// variable. `None` when the value was on the command line, or `e` is about something else.
pub fn env_value_error(e: &clap::Error, args: &[OsString]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let on_command_line = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a.strip_prefix("--")
            .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
    });
    if on_command_line {
        return None;
    }
    let cmd = command();
    let env = cmd
        .get_subcommands()
        .flat_map(|s| s.get_arguments())
        .find(|a| a.get_long() == Some(long))?
        .get_env()?
        .to_string_lossy()
        .into_owned();
    std::env::var_os(&env)?;
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => format!(" {v:?}"),
        _ => String::new(),
    };
    let why = std::error::Error::source(e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    Some(format!(
        "invalid configuration: {env}: invalid value{value} for --{long}{why}"
    ))
}

/// The platform's data directory for castnode: `$XDG_DATA_HOME/castnode` (when it is an
/// absolute path), else `$HOME/.local/share/castnode`.
pub(crate) fn default_data_dir(
    xdg_data_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(xdg_data_home)
        .or_else(|| absolute(home).map(|h| h.join(".local/share")))
        .map(|d| d.join("castnode"))
}

/// A media node's validated settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// RTMP listen address.
    pub(crate) rtmp: SocketAddr,
    /// HTTP listen address.
    pub(crate) http: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Largest RTMP message.
    pub(crate) max_message_bytes: usize,
    /// Most RTMP connections.
    pub(crate) max_connections: usize,
    /// Most players.
    pub(crate) max_players: usize,
    /// Reconnect grace.
    pub(crate) publish_grace: Duration,
    /// RTMP handshake deadline.
    pub(crate) handshake_timeout: Duration,
    /// Longest interval between writes to a player.
    pub(crate) player_batch: Duration,
    /// Writes per second to all players before batching sets in.
    pub(crate) write_budget: u64,
    /// How long a player may block a write.
    pub(crate) stall_timeout: Duration,
    /// Host used in printed URLs.
    pub(crate) public_host: String,
    /// WebRTC UDP address.
    pub(crate) webrtc_udp: SocketAddr,
    /// Candidate addresses for WebRTC peers (empty: derived from the bound address).
    pub(crate) webrtc_public_ip: Vec<IpAddr>,
    /// Most WebRTC viewers.
    pub(crate) max_viewers: usize,
    /// The cluster link's settings.
    pub cluster: ClusterConfig,
    /// The stream manager's settings.
    pub(crate) manager: ManagerConfig,
    /// The ladder `--ladder` chose (none given: `None`; a transcoder's default is `default`).
    pub ladder: Option<Ladder>,
    /// Transcoder: the broadcasts whose ladders it makes without a manager (`--jobs`).
    pub(crate) jobs: Vec<String>,
    /// Mixer: the mix it makes (`--mix`).
    pub(crate) mix: Option<MixConfig>,
}

/// Where a node reports, and the manager's own settings.
#[derive(Debug, Clone)]
pub(crate) struct ManagerConfig {
    /// The manager's URL (none: this node reports to no remote manager).
    pub(crate) url: Option<String>,
    /// The manager runs inside this node (standalone's default): its API is served on the
    /// node's HTTP port and the node registers with it.
    pub(crate) embedded: bool,
    /// This node's region (the manager's default region).
    pub(crate) region: String,
    /// Viewers this node takes.
    pub(crate) capacity: u64,
    /// Manager: heartbeat TTL.
    pub(crate) heartbeat_ttl: Duration,
    /// This node's node group.
    pub(crate) node_group: Option<String>,
    /// Manager: the database (None: in memory).
    pub(crate) db: Option<PathBuf>,
    /// The data directory the database is in, when the database was placed there (created at
    /// start).
    pub(crate) data_dir: Option<PathBuf>,
    /// Manager: an admin token to make sure of.
    pub(crate) admin_token: Option<String>,
    /// Manager: placement lookups need a token.
    pub(crate) require_token: bool,
    /// Manager: start node-group nodes as local processes (else no provisioner).
    pub(crate) process_provisioner: bool,
    /// Manager: the host provisioned processes bind.
    pub(crate) provision_host: String,
    /// Manager: where provisioned processes log.
    pub(crate) provision_dir: PathBuf,
    /// Manager: which broadcasts get a transcoder's ladder unasked.
    pub(crate) transcode: TranscodeRule,
}

/// The cluster link's validated settings.
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// This node's name.
    pub(crate) node_id: String,
    /// Where this node serves other nodes (QUIC), if it does.
    pub(crate) listen: Option<SocketAddr>,
    /// Upstream nodes, in the order they are tried.
    pub(crate) upstream: Vec<String>,
    /// The shared secret (empty: no cluster link may be used).
    pub(crate) token: String,
    /// Certificate to present instead of a self-signed one.
    pub(crate) cert: Option<PathBuf>,
    /// Its key.
    pub(crate) key: Option<PathBuf>,
    /// CA to verify upstream nodes against.
    pub(crate) ca: Option<PathBuf>,
    /// How long an upstream subscription outlives its last local viewer.
    pub(crate) linger: Duration,
    /// Threads serving other nodes (each with its own socket on `listen`).
    pub(crate) threads: usize,
}

fn seconds(key: &str, v: Option<f64>, default: f64, max: f64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if !(0.0..=max).contains(&v) {
        return Err(bad(key, format!("{v} is outside 0..={max} seconds")));
    }
    Ok(Duration::from_secs_f64(v))
}

impl NodeArgs {
    /// [`NodeArgs::resolve_for`] a node that is not part of a cluster.
    #[cfg(test)]
    pub(crate) fn resolve(&self) -> Result<NodeConfig, ConfigError> {
        self.resolve_for("standalone")
    }

    /// Fills what flags and environment left unset from the TOML file, then validates, with the
    /// defaults of `role`.
    pub fn resolve_for(&self, role: &str) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
                toml::from_str::<NodeArgs>(&text).map_err(|e| {
                    // Name the key: the text before `=` on the line the error points at.
                    let line_start = e
                        .span()
                        .map_or(0, |s| text[..s.start].rfind('\n').map_or(0, |i| i + 1));
                    let line = text[line_start..].lines().next().unwrap_or_default();
                    let key = line
                        .split('=')
                        .next()
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .unwrap_or("config");
                    bad(key, format!("{}: {}", path.display(), e.message()))
                })?
            }
            None => NodeArgs::default(),
        };
        let a = self.clone();
        let ladder = ladder_config(role, &a, &file)?;
        let jobs = if a.jobs.is_empty() {
            file.jobs.clone()
        } else {
            a.jobs.clone()
        };
        if !jobs.is_empty() && role != "transcoder" {
            return Err(bad("jobs", format!("a {role} takes no transcode jobs")));
        }
        let managed = a.manager.is_some() || file.manager.is_some();
        if role == "transcoder" && jobs.is_empty() && !managed {
            return Err(bad(
                "jobs",
                "a transcoder needs --jobs app/key,… or a --manager that gives it jobs",
            ));
        }
        if let Some(j) = jobs.iter().find(|j| !crate::media::valid_name(j)) {
            return Err(bad(
                "jobs",
                format!("{j:?} is not a broadcast name (app/key)"),
            ));
        }
        let mix = match a.mix.clone().or(file.mix.clone()) {
            Some(_) if role != "mixer" => {
                return Err(bad(
                    "mix",
                    format!("a {role} makes no mix: only a mixer takes --mix"),
                ));
            }
            Some(path) => Some(MixConfig::read(&path).map_err(|e| bad("mix", e))?),
            None if role == "mixer" => {
                return Err(bad("mix", "a mixer needs --mix FILE (the mix, as JSON)"));
            }
            None => None,
        };
        if role == "mixer" && (a.manager.is_some() || file.manager.is_some()) {
            return Err(bad(
                "manager",
                "a mixer does not work with a stream manager yet: give it --upstream and --mix",
            ));
        }
        let cluster = cluster_config(role, &a, &file)?;
        // The manager's state: --db, else manager.db in the data directory (the manager's, or
        // standalone's when it is given one); never the working directory.
        let data_dir = a.data_dir.clone().or(file.data_dir.clone());
        let (db, db_in_data_dir) = match a.db.clone().or(file.db.clone()) {
            Some(db) => (Some(db), None),
            None if role == "manager" || (role == "standalone" && data_dir.is_some()) => {
                let dir = match data_dir {
                    Some(d) => d,
                    None => default_data_dir(
                        std::env::var_os("XDG_DATA_HOME"),
                        std::env::var_os("HOME"),
                    )
                    .ok_or_else(|| {
                        bad(
                            "data-dir",
                            "neither XDG_DATA_HOME nor HOME is set: give --data-dir",
                        )
                    })?,
                };
                (Some(dir.join("manager.db")), Some(dir))
            }
            None => (None, None),
        };
        let manager = ManagerConfig {
            embedded: match a.manager.as_deref().or(file.manager.as_deref()) {
                Some("embedded") if role != "standalone" => {
                    return Err(bad(
                        "manager",
                        "only standalone embeds the manager; other roles take its URL",
                    ));
                }
                Some("embedded") | None => role == "standalone",
                Some(_) => false,
            },
            url: match a.manager.clone().or(file.manager.clone()) {
                Some(u) if u == "embedded" => None,
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u),
                Some(u) => {
                    return Err(bad(
                        "manager",
                        format!("{u:?} is not an http:// or https:// URL"),
                    ));
                }
                None => None,
            },
            region: match a.region.clone().or(file.region.clone()) {
                Some(r) if r.is_empty() || r.len() > 64 || r.contains(char::is_whitespace) => {
                    return Err(bad(
                        "region",
                        format!("{r:?}: 1 to 64 characters, no spaces"),
                    ));
                }
                Some(r) => r,
                None => "default".into(),
            },
            capacity: a
                .capacity
                .or(file.capacity)
                .or(a.max_viewers.or(file.max_viewers).map(|v| v as u64))
                .unwrap_or(2000),
            heartbeat_ttl: seconds(
                "heartbeat-ttl",
                a.heartbeat_ttl.or(file.heartbeat_ttl),
                3.0,
                600.0,
            )?,
            node_group: match a.node_group.clone().or(file.node_group.clone()) {
                Some(g) if !crate::names::name_ok(&g) => {
                    return Err(bad(
                        "node-group",
                        format!("{g:?}: 1 to 128 printable characters, no spaces"),
                    ));
                }
                g => g,
            },
            db: db.clone(),
            data_dir: db_in_data_dir,
            admin_token: match a.admin_token.clone().or(file.admin_token.clone()) {
                Some(t) if t.len() < 16 || t.chars().any(char::is_whitespace) => {
                    return Err(bad("admin-token", "at least 16 characters, no spaces"));
                }
                t => t,
            },
            require_token: a.require_token || file.require_token,
            process_provisioner: match a.provisioner.as_deref().or(file.provisioner.as_deref()) {
                None | Some("process") => true,
                Some("none") => false,
                Some(p) => {
                    return Err(bad("provisioner", format!("{p:?}: process or none")));
                }
            },
            provision_host: a
                .provision_host
                .clone()
                .or(file.provision_host.clone())
                .unwrap_or_else(|| "127.0.0.1".into()),
            provision_dir: a
                .provision_dir
                .clone()
                .or(file.provision_dir.clone())
                .unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("castnode-nodes-{}", std::process::id()))
                }),
            transcode: match a.transcode.as_deref().or(file.transcode.as_deref()) {
                None => TranscodeRule::None,
                Some(t) => {
                    let rule = TranscodeRule::parse(t).map_err(|e| bad("transcode", e))?;
                    if rule != TranscodeRule::None && role != "manager" {
                        return Err(bad(
                            "transcode",
                            format!(
                                "only the manager (castnode manager) gives transcode jobs, not a \
                                 {role}{}",
                                if role == "standalone" {
                                    " (it makes its own ladder: --ladder)"
                                } else {
                                    ""
                                }
                            ),
                        ));
                    }
                    rule
                }
            },
        };
        if role == "manager" && cluster.token.len() < 16 {
            return Err(bad(
                "cluster-token",
                "the manager needs the cluster token (at least 16 characters) nodes register with",
            ));
        }
        if manager.url.is_some() && cluster.token.len() < 16 {
            return Err(bad(
                "cluster-token",
                "a node reporting to a manager needs the cluster token (at least 16 characters)",
            ));
        }
        let default_http = if role == "manager" {
            "0.0.0.0:5080"
        } else {
            "0.0.0.0:8080"
        };
        let max_message_bytes = a
            .max_message_bytes
            .or(file.max_message_bytes)
            .unwrap_or(8 << 20);
        if !(1024..=0xFF_FFFF).contains(&max_message_bytes) {
            return Err(bad(
                "max-message-bytes",
                format!("{max_message_bytes} is outside 1024..=16777215"),
            ));
        }
        let max_connections = a.max_connections.or(file.max_connections).unwrap_or(10_000);
        if max_connections == 0 {
            return Err(bad("max-connections", "must be at least 1"));
        }
        let max_players = a.max_players.or(file.max_players).unwrap_or(20_000);
        let player_batch_ms = a.player_batch_ms.or(file.player_batch_ms).unwrap_or(100);
        let write_budget = a.write_budget.or(file.write_budget).unwrap_or(10_000);
        if write_budget == 0 {
            return Err(bad("write-budget", "must be at least 1"));
        }
        if player_batch_ms > 1000 {
            return Err(bad(
                "player-batch-ms",
                format!("{player_batch_ms} is over 1000"),
            ));
        }
        let public_host = a
            .public_host
            .or(file.public_host)
            .unwrap_or_else(|| "localhost".into());
        if public_host.is_empty() || public_host.contains(['/', ' ']) {
            return Err(bad(
                "public-host",
                format!("{public_host:?} is not a host name"),
            ));
        }
        let rtmp = match a.rtmp.or(file.rtmp) {
            Some(l) => l.resolve("rtmp")?,
            None => "0.0.0.0:1935".parse().expect("literal address"),
        };
        let http = match a.http.or(file.http) {
            Some(l) => l.resolve("http")?,
            None => default_http.parse().expect("literal address"),
        };
        let webrtc_udp = match a.webrtc_udp.or(file.webrtc_udp) {
            Some(l) => l.resolve("webrtc-udp")?,
            None => "0.0.0.0:8189".parse().expect("literal address"),
        };
        Ok(NodeConfig {
            cluster,
            manager,
            rtmp,
            http,
            log_format: a.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            max_message_bytes,
            max_connections,
            max_players,
            publish_grace: seconds(
                "publish-grace",
                a.publish_grace.or(file.publish_grace),
                5.0,
                3600.0,
            )?,
            handshake_timeout: seconds(
                "handshake-timeout",
                a.handshake_timeout.or(file.handshake_timeout),
                10.0,
                600.0,
            )?,
            player_batch: Duration::from_millis(player_batch_ms),
            write_budget,
            stall_timeout: seconds(
                "stall-timeout",
                a.stall_timeout.or(file.stall_timeout),
                10.0,
                3600.0,
            )?,
            public_host,
            webrtc_udp,
            webrtc_public_ip: if a.webrtc_public_ip.is_empty() {
                file.webrtc_public_ip
            } else {
                a.webrtc_public_ip
            },
            max_viewers: a.max_viewers.or(file.max_viewers).unwrap_or(2000),
            ladder,
            jobs,
            mix,
        })
    }
}

/// Checks every ladder of the file (a bad rung is refused whether or not it is chosen), then
/// gives the one `--ladder` names: a table of the file, else the built-in `default`.
fn ladder_config(role: &str, a: &NodeArgs, file: &NodeArgs) -> Result<Option<Ladder>, ConfigError> {
    let mut ladders = BTreeMap::new();
    for (name, spec) in &file.ladders {
        let ladder = Ladder::from_spec(name, spec).map_err(|e| bad("ladders", e.to_string()))?;
        ladders.insert(name.as_str(), ladder);
    }
    let name = a.ladder.as_deref().or(file.ladder.as_deref());
    let Some(name) = name.or((role == "transcoder").then_some(DEFAULT_LADDER)) else {
        return Ok(None);
    };
    if !matches!(role, "standalone" | "transcoder") {
        return Err(bad(
            "ladder",
            format!("a {role} builds no renditions: only standalone and transcoder take a ladder"),
        ));
    }
    match ladders.remove(name) {
        Some(l) => Ok(Some(l)),
        None if name == DEFAULT_LADDER => Ok(Some(Ladder::default_ladder())),
        None => {
            let known: Vec<&str> = std::iter::once(DEFAULT_LADDER)
                .chain(ladders.keys().copied().filter(|k| *k != DEFAULT_LADDER))
                .collect();
            Err(bad(
                "ladder",
                format!(
                    "no ladder {name:?} (there are: {}; others go in the --config file as \
                     [ladders.NAME])",
                    known.join(", ")
                ),
            ))
        }
    }
}

/// The cluster link's settings of a `role` node.
fn cluster_config(role: &str, a: &NodeArgs, file: &NodeArgs) -> Result<ClusterConfig, ConfigError> {
    let node_id = match a.node_id.clone().or(file.node_id.clone()) {
        Some(id) => id,
        None => {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "host".into());
            format!("{role}-{host}-{}", std::process::id())
        }
    };
    if node_id.is_empty() || node_id.len() > 128 || node_id.chars().any(|c| c.is_whitespace()) {
        return Err(bad(
            "node-id",
            format!("{node_id:?}: 1 to 128 characters, no spaces"),
        ));
    }
    let serves = matches!(role, "origin" | "relay");
    let listen = match a.cluster.clone().or(file.cluster.clone()) {
        Some(l) => Some(l.resolve("cluster")?),
        None => serves.then(|| "0.0.0.0:4443".parse().expect("literal address")),
    };
    let upstream = if a.upstream.is_empty() {
        file.upstream.clone()
    } else {
        a.upstream.clone()
    };
    for u in &upstream {
        let ok = u
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(bad("upstream", format!("{u:?} is not HOST:PORT")));
        }
    }
    let managed = a.manager.is_some() || file.manager.is_some();
    if matches!(role, "relay" | "edge" | "transcoder" | "mixer") && upstream.is_empty() && !managed
    {
        return Err(bad(
            "upstream",
            format!("a {role} needs at least one --upstream HOST:PORT, or a --manager to ask"),
        ));
    }
    let token = match (
        a.cluster_token.clone().or(file.cluster_token.clone()),
        a.cluster_token_file
            .clone()
            .or(file.cluster_token_file.clone()),
    ) {
        (Some(t), None) => t,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| bad("cluster-token-file", format!("{}: {e}", path.display())))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        (Some(_), Some(_)) => {
            return Err(bad(
                "cluster-token",
                "give --cluster-token or --cluster-token-file, not both",
            ));
        }
        (None, None) => String::new(),
    };
    let linked = listen.is_some()
        || !upstream.is_empty()
        || (managed && matches!(role, "relay" | "edge" | "transcoder" | "mixer"));
    if linked && token.len() < 16 {
        return Err(bad(
            "cluster-token",
            "a node on the cluster link needs a shared token of at least 16 characters",
        ));
    }
    let cert = a.cluster_cert.clone().or(file.cluster_cert.clone());
    let key = a.cluster_key.clone().or(file.cluster_key.clone());
    if cert.is_some() != key.is_some() {
        return Err(bad(
            "cluster-cert",
            "--cluster-cert and --cluster-key go together",
        ));
    }
    Ok(ClusterConfig {
        node_id,
        listen,
        upstream,
        token,
        cert,
        key,
        ca: a.cluster_ca.clone().or(file.cluster_ca.clone()),
        linger: seconds("linger", a.linger.or(file.linger), 10.0, 3600.0)?,
        threads: match a.cluster_threads.or(file.cluster_threads) {
            Some(n) if (1..=MAX_CLUSTER_THREADS).contains(&n) => n,
            Some(n) => {
                return Err(bad(
                    "cluster-threads",
                    format!("{n} is outside 1..={}", MAX_CLUSTER_THREADS),
                ));
            }
            None => default_cluster_threads(),
        },
    })
}

/// Cluster serving threads at most (`--cluster-threads`).
pub(crate) const MAX_CLUSTER_THREADS: usize = 16;
/// Cores per cluster serving thread by default. One thread serves a frame's copies more cheaply
/// than two (BENCHMARKS.md, "Cluster link": 11–12 µs against 13–15 µs per copy on 2 cores), and
/// a relay of many cores still spreads its peers.
pub(crate) const CORES_PER_CLUSTER_THREAD: usize = 4;

/// How many cluster serving threads a node runs unless told (`--cluster-threads`): one per
/// [`CORES_PER_CLUSTER_THREAD`] cores it may use, at least 1, at most [`MAX_CLUSTER_THREADS`].
pub(crate) fn default_cluster_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores / CORES_PER_CLUSTER_THREAD).clamp(1, MAX_CLUSTER_THREADS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> NodeArgs {
        let mut v = vec!["castnode", "standalone"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().role {
            Role::Standalone(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_and_file_and_flags() {
        let dir = std::env::temp_dir().join(format!("castnode-cfg-{}", std::process::id()));
        std::fs::write(
            &dir,
            "rtmp = \"127.0.0.1:1999\"\nmax-message-bytes = 2048\n",
        )
        .unwrap();
        let cfg = parse(&[
            "--config",
            dir.to_str().unwrap(),
            "--max-message-bytes",
            "4096",
        ])
        .resolve()
        .unwrap();
        assert_eq!(cfg.rtmp, "127.0.0.1:1999".parse().unwrap());
        assert_eq!(cfg.max_message_bytes, 4096);
        assert_eq!(cfg.http, "0.0.0.0:8080".parse().unwrap());
        std::fs::write(&dir, "bogus = 1\n").unwrap();
        let err = parse(&["--config", dir.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert_eq!(err.key, "bogus");
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(
            parse(&["--max-message-bytes", "1"])
                .resolve()
                .unwrap_err()
                .key,
            "max-message-bytes"
        );
    }

    #[test]
    fn listen_addresses() {
        for ok in [
            "0.0.0.0:1935",
            "[::1]:80",
            "localhost:0",
            "my-host.example:8080",
        ] {
            assert!(ok.parse::<ListenAddr>().is_ok(), "{ok}");
        }
        for bad in [
            "nowhere",
            "host:",
            ":80",
            "host:99999",
            "a b:1",
            "http://x:1",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        let l: ListenAddr = "[::1]:80".parse().unwrap();
        assert_eq!(l.to_string(), "[::1]:80");
        assert_eq!(l.resolve("http").unwrap(), "[::1]:80".parse().unwrap());
        let l: ListenAddr = "localhost:7".parse().unwrap();
        assert_eq!(l.resolve("rtmp").unwrap(), "127.0.0.1:7".parse().unwrap());
        let err = "no-such-host.invalid:7"
            .parse::<ListenAddr>()
            .unwrap()
            .resolve("rtmp")
            .unwrap_err();
        assert_eq!(err.key, "rtmp");
    }

    #[test]
    fn data_dir() {
        let d = |x: Option<&str>, h: Option<&str>| {
            default_data_dir(x.map(Into::into), h.map(Into::into))
        };
        assert_eq!(d(Some("/x"), Some("/h")), Some("/x/castnode".into()));
        assert_eq!(d(None, Some("/h")), Some("/h/.local/share/castnode".into()));
        // A relative XDG_DATA_HOME is ignored (XDG Base Directory specification).
        assert_eq!(
            d(Some("rel"), Some("/h")),
            Some("/h/.local/share/castnode".into())
        );
        assert_eq!(d(None, None), None);
        let cfg = parse(&["--data-dir", "/var/lib/castnode"])
            .resolve()
            .unwrap();
        assert_eq!(cfg.manager.db, Some("/var/lib/castnode/manager.db".into()));
        let cfg = parse(&[]).resolve().unwrap();
        assert_eq!(cfg.manager.db, None);
    }

    #[test]
    fn ladders_are_checked_before_anything_binds() {
        let dir = std::env::temp_dir().join(format!("castnode-ladders-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = 0;
        let mut file = |text: &str| {
            files += 1;
            let path = dir.join(format!("{files}.toml"));
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        // No --ladder: no ladder, as before.
        assert_eq!(parse(&[]).resolve().unwrap().ladder, None);
        let cfg = parse(&["--ladder", "default"]).resolve().unwrap();
        assert_eq!(cfg.ladder, Some(Ladder::default_ladder()));
        let good = file(
            "[ladders.mobile]\nrungs = [\n  { name = \"720p\", height = 720, bitrate-kbps = 2500 },\n  \
             { name = \"360p\", height = 360, bitrate-kbps = 700, fps = 30, profile = \"main\" },\n]\n",
        );
        let cfg = parse(&[
            "--config",
            &good,
            "--ladder",
            "mobile",
            "--jobs",
            "live/a",
            "--upstream",
            "127.0.0.1:4443",
            "--cluster-token",
            "0123456789abcdef",
        ])
        .resolve_for("transcoder")
        .unwrap();
        let ladder = cfg.ladder.unwrap();
        assert_eq!(ladder.name, "mobile");
        assert_eq!(ladder.rungs[1].fps, Some(30));
        // A bad rung stops the node even when its ladder is not the one chosen, naming it.
        let odd = file(
            "[ladders.mobile]\nrungs = [{ name = \"720p\", height = 720, bitrate-kbps = 2500 }]\n\
             [ladders.odd]\nrungs = [{ name = \"tiny\", height = 145, bitrate-kbps = 100 }]\n",
        );
        let err = parse(&["--config", &odd, "--ladder", "mobile"])
            .resolve()
            .unwrap_err();
        assert_eq!(err.key, "ladders");
        assert!(
            err.to_string().contains("rung \"tiny\": odd size 145"),
            "{err}"
        );
        let free =
            file("[ladders.free]\nrungs = [{ name = \"240p\", height = 240, bitrate-kbps = 0 }]\n");
        let err = parse(&["--config", &free]).resolve().unwrap_err();
        assert!(
            err.to_string().contains("rung \"240p\": zero bitrate"),
            "{err}"
        );
        let unknown = file("[ladders.x]\nrungs = [{ name = \"a\", height = 240, bitrate = 1 }]\n");
        let err = parse(&["--config", &unknown]).resolve().unwrap_err();
        assert!(err.reason.contains("bitrate"), "{err}");
        let err = parse(&["--config", &good, "--ladder", "desktop"])
            .resolve()
            .unwrap_err();
        assert_eq!(err.key, "ladder");
        assert!(err.reason.contains("default, mobile"), "{}", err.reason);
        let err = parse(&["--ladder", "default"])
            .resolve_for("relay")
            .unwrap_err();
        assert_eq!(err.key, "ladder");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn transcode_rule() {
        let manager = |args: &[&str]| {
            let mut v = vec!["castnode", "manager", "--cluster-token", "0123456789abcdef"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).unwrap().role {
                Role::Manager(a) => a.resolve_for("manager"),
                _ => unreachable!(),
            }
        };
        let none = manager(&["--db", ":memory:"]).unwrap();
        assert_eq!(none.manager.transcode, TranscodeRule::None);
        let all = manager(&["--db", ":memory:", "--transcode", "all"]).unwrap();
        assert_eq!(all.manager.transcode, TranscodeRule::All);
        let apps = manager(&["--db", ":memory:", "--transcode", "live, events"]).unwrap();
        assert_eq!(
            apps.manager.transcode,
            TranscodeRule::Apps(["events".to_owned(), "live".to_owned()].into())
        );
        assert_eq!(apps.manager.transcode.to_string(), "events,live");
        for bad in ["", "live,,events", "live/key", "a b"] {
            let err = manager(&["--db", ":memory:", "--transcode", bad]).unwrap_err();
            assert_eq!(err.key, "transcode", "{bad}");
        }
        // Only the manager gives jobs; `none` is harmless anywhere.
        let err = parse(&["--transcode", "all"]).resolve().unwrap_err();
        assert_eq!(err.key, "transcode");
        assert!(err.reason.contains("--ladder"), "{}", err.reason);
        assert!(parse(&["--transcode", "none"]).resolve().is_ok());
        let dir = std::env::temp_dir().join(format!("castnode-transcode-{}", std::process::id()));
        std::fs::write(&dir, "transcode = \"live\"\n").unwrap();
        let file = manager(&["--db", ":memory:", "--config", dir.to_str().unwrap()]).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(
            file.manager.transcode,
            TranscodeRule::Apps(["live".to_owned()].into())
        );
    }

    #[test]
    fn cluster_threads() {
        let cfg = parse(&["--cluster-threads", "3"]).resolve().unwrap();
        assert_eq!(cfg.cluster.threads, 3);
        let cfg = parse(&[]).resolve().unwrap();
        assert_eq!(cfg.cluster.threads, default_cluster_threads());
        for bad in ["0", "17"] {
            let err = parse(&["--cluster-threads", bad]).resolve().unwrap_err();
            assert_eq!(err.key, "cluster-threads");
        }
    }
}
