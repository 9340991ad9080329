//! A fleet of replicas sharing live state through NATS JetStream (`serve --live nats://…`).
//!
//! Signals and directory changes sent to any replica are published to one stream; every
//! replica, the sender included, applies them only as it reads them back, in the stream's
//! order, numbered by the stream's sequence. What a replica applied is kept in its own journals
//! under `--state` (the same ones a lone server keeps), so it starts and serves while NATS is
//! down and resumes after its last number. Replicas announce themselves in a key-value bucket
//! (a heartbeat a second, gone after a few seconds of silence); a sender waits until every
//! replica it hears from has applied its change, or until `--fleet-ack-timeout`, and names the
//! ones that had not.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::records::Caller;
use crate::signals::Signal;

/// How often a replica announces itself and asks the stream how far it goes.
const BEAT: Duration = Duration::from_secs(1);
/// A replica not heard from for this long is no longer waited for nor listed.
pub const GONE_AFTER: Duration = Duration::from_secs(5);
/// How long a replica lists the changes it skipped in its heartbeat, and how many at most.
const SKIPPED_FOR: Duration = Duration::from_secs(60);
const MAX_SKIPPED: usize = 1024;
/// A consumer or watch that brings nothing it should for this long is made anew.
const STALLED: Duration = Duration::from_secs(3);
/// How long the heartbeat bucket keeps a silent replica's last heartbeat.
const BUCKET_TTL: Duration = Duration::from_secs(30);
/// The file under `--state` that ties the folder to one stream.
pub const FLEET_FILE: &str = "fleet.json";

/// What `--live-stale-policy` does once the live state is older than `--live-stale-after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StalePolicy {
    /// Keep deciding with the last state applied.
    Serve,
    /// Deny every request (`live_state_unavailable`).
    Deny,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// `nats://HOST:PORT` (or `tls://…`), one or more.
    pub servers: Vec<String>,
    pub creds: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// The stream's name; its subject is `NAME.live` and the heartbeat bucket `NAME-fleet`.
    pub stream: String,
    /// This replica's id in the fleet (a key of the heartbeat bucket).
    pub replica: String,
    /// The address it serves on, as others should reach it.
    pub address: String,
    pub ack_timeout: Duration,
    /// The server's call timeout (`--call-timeout-secs`): an answer must come before it.
    pub call_timeout: Duration,
    /// Copies of the stream and the bucket the NATS cluster keeps (1 on a lone server; 3 on a
    /// cluster of three, so that losing one server loses nothing).
    pub copies: usize,
    pub stale_after: Option<Duration>,
    pub stale_policy: StalePolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("--live: `{0}` is not a NATS address (nats://HOST:PORT, or tls://HOST:PORT)")]
    Address(String),
    #[error("--replica-id `{0}`: use 1 to 64 letters, digits, `-` and `_`")]
    ReplicaId(String),
    #[error("--live-stream `{0}`: use 1 to 32 letters, digits, `-` and `_`")]
    StreamName(String),
    #[error("--live-creds `{path}`: {source}")]
    Creds { path: String, source: std::io::Error },
    #[error("--live-tls-ca `{0}`: not a readable PEM file of certificates")]
    TlsCa(String),
    #[error("--advertise: at most 256 bytes")]
    Advertise,
    #[error("--live-stale-after: at least 2s (a replica asks the stream every second)")]
    StaleAfter,
    #[error(
        "--fleet-ack-timeout ({ack:?}) plus 2s for the stream's own acknowledgement must be shorter than the call timeout ({call:?}, --call-timeout-secs): a caller would time out on a change that applied"
    )]
    AckTimeout { ack: Duration, call: Duration },
    #[error("state folder `{path}`: {message}")]
    State { path: String, message: String },
    #[error("--live: cannot set up the NATS client: {0}")]
    Client(String),
}

/// The longest wait for one JetStream request (an acknowledgement included).
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The shortest `--live-stale-after`: the stream is asked every second.
pub const MIN_STALE_AFTER: Duration = Duration::from_secs(2);

/// Why a change was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not sent: no replica applies it.
    #[error("{0}")]
    NotSent(String),
    /// Sent, but JetStream's acknowledgement did not come: the stream may have it, and then
    /// every replica applies it.
    #[error("{0}")]
    Unknown(String),
}

/// A heartbeat as the bucket holds it, if it is one: its key is its id, and its fields are of
/// sane sizes (anyone who may write the bucket could put anything there).
fn read_heartbeat(key: &str, value: &[u8]) -> Option<Heartbeat> {
    if value.len() > 256 * 1024 || !is_name(key, 64) {
        return None;
    }
    let mut heartbeat: Heartbeat = serde_json::from_slice(value).ok()?;
    if heartbeat.id != key {
        return None;
    }
    // Long fields are cut, not the heartbeat dropped: a replica is never made invisible.
    heartbeat.address = clip(heartbeat.address, 256);
    heartbeat.revision = clip(heartbeat.revision, 256);
    heartbeat.error = heartbeat.error.map(|e| clip(e, 1024));
    Some(heartbeat)
}

/// Checks `--live` (comma-separated addresses) and returns the addresses.
pub fn parse_servers(live: &str) -> Result<Vec<String>, FleetError> {
    let mut servers = Vec::new();
    for part in live.split(',').map(str::trim) {
        let ok = match part.split_once("://") {
            Some((scheme, rest)) => matches!(scheme, "nats" | "tls") && !rest.is_empty(),
            None => false,
        };
        if !ok || part.parse::<async_nats::ServerAddr>().is_err() {
            return Err(FleetError::Address(part.to_string()));
        }
        servers.push(part.to_string());
    }
    Ok(servers)
}

/// True if `id` can be a replica id or stream name: a key of the bucket, a token of a subject.
fn is_name(id: &str, max: usize) -> bool {
    !id.is_empty() && id.len() <= max && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn check_names(options: &Options) -> Result<(), FleetError> {
    if !is_name(&options.replica, 64) {
        return Err(FleetError::ReplicaId(options.replica.clone()));
    }
    if !is_name(&options.stream, 32) {
        return Err(FleetError::StreamName(options.stream.clone()));
    }
    if options.address.len() > 256 {
        return Err(FleetError::Advertise);
    }
    if options.stale_after.is_some_and(|after| after < MIN_STALE_AFTER) {
        return Err(FleetError::StaleAfter);
    }
    if options.ack_timeout + JETSTREAM_TIMEOUT >= options.call_timeout {
        return Err(FleetError::AckTimeout { ack: options.ack_timeout, call: options.call_timeout });
    }
    if let Some(ca) = &options.tls_ca {
        let pem = std::fs::read(ca).ok().filter(|pem| pem.len() <= 1 << 20);
        if !pem.is_some_and(|pem| pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----")) {
            return Err(FleetError::TlsCa(ca.display().to_string()));
        }
    }
    Ok(())
}

/// A default replica id: the host's name and the port, as a bucket key allows.
pub fn default_replica_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(50).collect();
    let host = if host.is_empty() { "agentca".to_string() } else { host };
    format!("{host}-{port}")
}

/// Who sent a change, as the replica that took it saw them (recorded by every replica).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sender {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default)]
    pub via: String,
}

impl Sender {
    pub fn of(caller: &Caller) -> Sender {
        Sender {
            peer: caller.peer.as_deref().map(str::to_string),
            identity: caller.identity.as_deref().map(str::to_string),
            token: caller.token.clone(),
            via: caller.via.to_string(),
        }
    }

    /// The caller to record on a replica that applies the change: as sent, through `origin`.
    pub fn caller(&self, origin: &str) -> Caller {
        Caller {
            peer: self.peer.as_deref().map(Arc::from),
            identity: self.identity.as_deref().map(Arc::from),
            subject: None,
            token: self.token.clone(),
            via: match self.via.as_str() {
                "grpc" => "grpc",
                "cli" => "cli",
                "envoy" => "envoy",
                _ => "fleet",
            },
            replica: Some(Arc::from(origin)),
        }
    }
}

/// A directory change as the stream carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SentDirectory {
    pub change: Box<RawValue>,
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub reason: String,
}

/// One message of the stream: a signal or a directory change, and who sent it where.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// The replica that took it.
    pub origin: String,
    #[serde(default)]
    pub caller: Sender,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<SentDirectory>,
}

/// What a replica announces every second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: String,
    pub address: String,
    pub revision: String,
    /// The stream sequence of the last change it applied (and passed its barrier for).
    pub applied: u64,
    pub started_at: DateTime<Utc>,
    /// Connected, caught up with the stream, nothing failing.
    pub healthy: bool,
    pub at: DateTime<Utc>,
    /// Why it is not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The numbers it took without applying them in the last minute (a change refused over
    /// its directory, or one it could not read): a sender names it for those.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<u64>,
    /// False once it stopped following the stream (see `error`): it applies nothing more, and
    /// is named in every answer, whatever number it had reached.
    #[serde(default = "yes")]
    pub following: bool,
}

fn yes() -> bool {
    true
}

/// One replica as `AdminService.Fleet` shows it.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub heartbeat: Heartbeat,
    pub this: bool,
    /// How far behind the stream's last sequence it is.
    pub lag: u64,
    /// Serves another bundle revision than most replicas.
    pub other_revision: bool,
    pub seen_ms_ago: u64,
}

/// The fleet as this replica sees it.
#[derive(Debug, Clone)]
pub struct View {
    pub replicas: Vec<ReplicaView>,
    pub stream_seq: u64,
    pub majority_revision: String,
}

/// How the last change this replica sent did here.
#[derive(Debug, Clone)]
pub enum Outcome {
    Applied,
    /// A directory change refused here (each error names the object and field).
    Refused(Vec<crate::directory::DirectoryError>),
}

/// The live state's freshness, as Status and metrics show it.
#[derive(Debug, Clone, Default)]
pub struct Freshness {
    pub connected: bool,
    pub healthy: bool,
    pub applied: u64,
    pub stream_seq: u64,
    /// When this replica last knew it had applied all the stream held.
    pub synced_at: Option<DateTime<Utc>>,
    pub stale_seconds: Option<u64>,
    pub error: Option<String>,
}

/// What the service gives the fleet to apply messages with.
pub trait Applier: Send + Sync + 'static {
    /// The last number applied (kept in the journals under `--state`).
    fn applied(&self) -> u64;
    /// The last numbers of the signal journal and of the directory journal.
    fn journals(&self) -> (u64, u64);
    /// True if the journals hold live state from before this folder followed a stream.
    fn has_local_state(&self) -> bool;
    /// The served bundle revision.
    fn revision(&self) -> String;
    /// Applies message `seq` durably (or marks it taken, if it cannot apply here). An error
    /// means it is not durable: it is retried, and nothing after it applies before it does.
    fn apply(
        self: Arc<Self>,
        seq: u64,
        message: Result<Message, String>,
    ) -> impl std::future::Future<Output = Result<Outcome, String>> + Send;
}

#[derive(Clone)]
struct Link {
    client: async_nats::Client,
    js: jetstream::Context,
    kv: kv::Store,
}

/// One replica seen under an id: when it started, and when it was first and last heard.
type Instance = (DateTime<Utc>, Instant, Instant);

/// What the stream says of itself every second.
struct Asked {
    created: i128,
    last: u64,
}

/// What `--state`/fleet.json holds: the stream the folder follows, and when it was last in
/// step with it (so that a restart while NATS is down knows how stale it is).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Tie {
    stream: String,
    /// The stream's creation time, in nanoseconds: a stream deleted and made anew has another.
    created: i128,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    synced_at: Option<DateTime<Utc>>,
    /// The last numbers the signal and directory journals held when this was written: a
    /// journal found behind them at start has lost changes (deleted, restored from a backup).
    #[serde(default)]
    signals: u64,
    #[serde(default)]
    directory: u64,
}

pub struct Fleet {
    options: Options,
    state: PathBuf,
    started_at: DateTime<Utc>,
    link: Mutex<Option<Link>>,
    /// The NATS client, from the start on (the link only once the folder's tie is checked).
    client: Mutex<Option<async_nats::Client>>,
    applied: tokio::sync::watch::Sender<u64>,
    stream_seq: AtomicU64,
    tie: Mutex<Option<Tie>>,
    /// When this replica last knew it had applied all the stream held, in milliseconds since
    /// the epoch (`i64::MIN`: never); read per request.
    synced_ms: std::sync::atomic::AtomicI64,
    /// Why the link is down or the state cannot follow the stream (a fatal one stays).
    error: Mutex<Option<String>>,
    fatal: AtomicBool,
    /// When the stream last answered.
    answered: Mutex<Option<Instant>>,
    replicas: Mutex<HashMap<String, (Heartbeat, Instant)>>,
    seen: tokio::sync::watch::Sender<u64>,
    /// Counts the client's (re)connections, and when the last was: a consumer or watch from
    /// before one is made anew.
    connections: Arc<tokio::sync::watch::Sender<(u64, Option<Instant>)>>,
    /// The numbers this replica took without applying them (refused or unreadable), in the
    /// last minute: senders wait for at most their call timeout.
    skipped: Mutex<std::collections::VecDeque<(u64, Instant)>>,
    /// Ids under which two replicas announce themselves, as this one saw: when last seen so.
    twins: Mutex<HashMap<String, Instant>>,
    /// Per id, the replicas seen under it (started at, first and last seen): two alive at
    /// once are twins.
    instances: Mutex<HashMap<String, Vec<Instance>>>,
    outcomes: Mutex<std::collections::BTreeMap<u64, Outcome>>,
    /// Whether requests are denied for a stale state, as the staleness watch last found (for the health
    /// service; each request works it out itself).
    deny: tokio::sync::watch::Sender<bool>,
    /// Another replica announcing itself under this one's id: its address, and when.
    twin: Mutex<Option<(String, Instant)>>,
    /// Shutting down: no more heartbeats.
    leaving: AtomicBool,
    /// Why the last heartbeat could not be put, if it could not (while connected).
    announce_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("replica", &self.options.replica).field("stream", &self.options.stream).finish()
    }
}

impl Fleet {
    /// Checks the options and the state folder's tie to a stream; connects later (`start`).
    pub fn new(options: Options, state: &Path, applied: u64) -> Result<Arc<Fleet>, FleetError> {
        check_names(&options)?;
        let tie = read_tie(state)?;
        // A time ahead of the clock (a clock stepped back) says nothing of how old the state is.
        let synced_at = tie.as_ref().and_then(|t| t.synced_at).filter(|at| *at <= Utc::now());
        Ok(Arc::new(Fleet {
            options,
            state: state.to_path_buf(),
            started_at: Utc::now(),
            link: Mutex::new(None),
            client: Mutex::new(None),
            applied: tokio::sync::watch::channel(applied).0,
            stream_seq: AtomicU64::new(0),
            tie: Mutex::new(tie),
            synced_ms: std::sync::atomic::AtomicI64::new(synced_at.map_or(i64::MIN, |at| at.timestamp_millis())),
            error: Mutex::new(Some("not connected to NATS yet".into())),
            fatal: AtomicBool::new(false),
            answered: Mutex::new(None),
            replicas: Mutex::new(HashMap::new()),
            seen: tokio::sync::watch::channel(0).0,
            connections: Arc::new(tokio::sync::watch::channel((0, None)).0),
            skipped: Mutex::new(std::collections::VecDeque::new()),
            twins: Mutex::new(HashMap::new()),
            instances: Mutex::new(HashMap::new()),
            outcomes: Mutex::new(std::collections::BTreeMap::new()),
            deny: tokio::sync::watch::channel(false).0,
            twin: Mutex::new(None),
            leaving: AtomicBool::new(false),
            announce_error: Mutex::new(None),
        }))
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// When this replica last knew it had applied all the stream held.
    fn synced_at(&self) -> Option<DateTime<Utc>> {
        match self.synced_ms.load(Ordering::SeqCst) {
            i64::MIN => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// Seconds since this replica started.
    pub fn up_seconds(&self) -> u64 {
        (Utc::now() - self.started_at).num_seconds().max(0) as u64
    }

    pub fn replica(&self) -> &str {
        &self.options.replica
    }

    fn subject(&self) -> String {
        format!("{}.live", self.options.stream)
    }

    fn bucket(&self) -> String {
        format!("{}-fleet", self.options.stream)
    }

    /// Connects (in the background: a replica starts and serves while NATS is down) and
    /// starts following the stream, announcing itself, and watching the fleet.
    pub async fn start<A: Applier>(self: &Arc<Self>, applier: Arc<A>) -> Result<(), FleetError> {
        let mut connect = async_nats::ConnectOptions::new()
            .name(format!("agentca {}", self.options.replica))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            // A connection that died without a word is found within seconds, not minutes.
            .ping_interval(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 250).min(2_000)))
            .event_callback({
                let connections = self.connections.clone();
                move |event| {
                    let connections = connections.clone();
                    async move {
                        if matches!(event, async_nats::Event::Connected) {
                            connections.send_modify(|(n, at)| {
                                *n += 1;
                                *at = Some(Instant::now());
                            });
                        }
                    }
                }
            });
        if let Some(path) = &self.options.creds {
            connect = connect
                .credentials_file(path)
                .await
                .map_err(|source| FleetError::Creds { path: path.display().to_string(), source })?;
        }
        if let Some(ca) = &self.options.tls_ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        let addrs: Vec<async_nats::ServerAddr> = self.options.servers.iter().filter_map(|s| s.parse().ok()).collect();
        // A user and password in the address (`nats://user:pass@host:4222`), as NATS tools take them.
        if let Some(addr) = addrs.iter().find(|a| a.has_user_pass())
            && let (Some(user), Some(pass)) = (addr.username(), addr.password())
        {
            connect = connect.user_and_password(user.to_string(), pass.to_string());
        }
        let client = connect.connect(addrs).await.map_err(|e| FleetError::Client(e.to_string()))?;
        if let Ok(mut slot) = self.client.lock() {
            *slot = Some(client.clone());
        }
        tokio::spawn(self.clone().keep_time(applier.clone()));
        if self.options.stale_policy == StalePolicy::Deny && self.options.stale_after.is_some() {
            tokio::spawn(self.clone().watch_staleness());
        }
        tokio::spawn(self.clone().run(client, applier));
        Ok(())
    }

    /// Sets up the stream and bucket (retried until NATS answers), checks that the state
    /// folder follows this stream, then follows it for good.
    async fn run<A: Applier>(self: Arc<Self>, client: async_nats::Client, applier: Arc<A>) {
        let js = jetstream::ContextBuilder::new().timeout(JETSTREAM_TIMEOUT).build(client.clone());
        let (stream, kv) = loop {
            match self.set_up(&js).await {
                Ok(done) => break done,
                Err(e) => self.note_error(Some(format!("cannot reach the NATS stream: {e}"))),
            }
            tokio::time::sleep(BEAT).await;
        };
        let link = Link { client, js, kv };
        // Announced whatever follows: a replica that cannot follow the stream is listed, with why.
        tokio::spawn(self.clone().announce(link.clone(), applier.clone()));
        tokio::spawn(self.clone().watch_fleet(link.clone()));
        let info = stream.cached_info().clone();
        let tied = {
            let applier = applier.clone();
            let fleet = self.clone();
            tokio::task::spawn_blocking(move || fleet.tie_to(&info, applier.as_ref())).await
        };
        if let Err(message) = tied.unwrap_or_else(|_| Err("the state folder check failed".into())) {
            self.stop_following(message);
            return;
        }
        if let Ok(mut slot) = self.link.lock() {
            *slot = Some(link.clone());
        }
        self.follow(stream, applier).await;
    }

    /// This replica can no longer follow the stream: it says why until it is restarted, and
    /// takes no change (it decides with the last state it applied).
    fn stop_following(&self, message: String) {
        if self.fatal.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!("{message}");
        if let Ok(mut slot) = self.error.lock() {
            *slot = Some(message);
        }
        // Heard by the fleet at once: no sender counts this replica as confirming anything.
        self.seen.send_modify(|n| *n += 1);
    }

    async fn set_up(&self, js: &jetstream::Context) -> Result<(stream::Stream, kv::Store), String> {
        // A folder that follows a stream never makes one: a stream deleted under it must not
        // come back empty, with numbers it has already applied.
        let tied = self.tie.lock().is_ok_and(|t| t.is_some());
        let stream = if tied {
            js.get_stream(&self.options.stream).await.map_err(|e| e.to_string())?
        } else {
            js.get_or_create_stream(stream::Config {
                name: self.options.stream.clone(),
                subjects: vec![self.subject()],
                storage: stream::StorageType::File,
                // A duplicate publish (a client retrying) within this window is dropped.
                duplicate_window: Duration::from_secs(120),
                num_replicas: self.options.copies,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
        };
        let kv = match js.get_key_value(self.bucket()).await {
            Ok(kv) => kv,
            Err(_) => self.make_bucket(js).await?,
        };
        Ok((stream, kv))
    }

    async fn make_bucket(&self, js: &jetstream::Context) -> Result<kv::Store, String> {
        js.create_key_value(kv::Config {
            bucket: self.bucket(),
            history: 1,
            max_age: BUCKET_TTL,
            storage: stream::StorageType::File,
            num_replicas: self.options.copies,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
    }

    /// Checks that the state folder follows this very stream (or nothing yet), and ties it.
    fn tie_to(&self, info: &stream::Info, applier: &impl Applier) -> Result<(), String> {
        let created = info.created.unix_timestamp_nanos();
        let applied = applier.applied();
        let (signals, directory) = applier.journals();
        let last = info.state.last_sequence;
        let state = self.state.display();
        let name = &self.options.stream;
        let mut tie = self.tie.lock().map_err(|_| "fleet lock poisoned".to_string())?;
        match tie.as_ref() {
            Some(t) if t.stream != *name || t.created != created => {
                return Err(format!(
                    "state folder `{state}` follows another stream than `{name}` as it is now (deleted and made \
                     anew, or another name): its live state cannot be laid over this one's numbers. Start this \
                     replica on an empty --state folder to take the stream's state"
                ));
            }
            Some(t) if t.signals > signals || t.directory > directory => {
                return Err(format!(
                    "state folder `{state}` has lost changes: its journals end at #{signals} (signals) and \
                     #{directory} (directory), but it had applied up to #{} and #{}. Start this replica on an empty \
                     --state folder to take the stream's state",
                    t.signals, t.directory
                ));
            }
            Some(_) => {}
            None if applier.has_local_state() => {
                return Err(format!(
                    "state folder `{state}` holds live signals or directory changes but no {FLEET_FILE}: they were \
                     made without --live (or the file was removed), and a fleet replica takes its live state from \
                     the stream only. Start it on an empty --state folder (and send what is still needed again, to \
                     any replica)"
                ));
            }
            None => {}
        }
        if info.config.subjects != [self.subject()] {
            return Err(format!(
                "the stream `{name}` holds other subjects than `{}` ({:?}): give agentca a stream of its own \
                 (--live-stream)",
                self.subject(),
                info.config.subjects
            ));
        }
        if applied > last {
            return Err(format!(
                "state folder `{state}` has applied change #{applied}, past the stream's last (#{last}): the stream \
                 lost changes. Start this replica on an empty --state folder"
            ));
        }
        if info.state.first_sequence > applied + 1 && last > applied {
            return Err(format!(
                "the stream no longer holds changes #{}..#{} that this replica has not applied. Start it on an \
                 empty --state folder only if the stream still holds all its changes; otherwise restore them",
                applied + 1,
                info.state.first_sequence - 1
            ));
        }
        if tie.is_none() {
            let new = Tie { stream: name.clone(), created, synced_at: None, signals: 0, directory: 0 };
            write_tie(&self.state, &new).map_err(|e| format!("cannot write `{state}/{FLEET_FILE}`: {e}"))?;
            *tie = Some(new);
        }
        Ok(())
    }

    /// Applies the stream's messages from the next number on, for good. A message that
    /// cannot be made durable here is retried: nothing after it applies before it does.
    async fn follow<A: Applier>(self: &Arc<Self>, stream: stream::Stream, applier: Arc<A>) {
        loop {
            let start = applier.applied() + 1;
            let created = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: self.subject(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
                    ..Default::default()
                })
                .await;
            let mut messages = match created {
                Ok(c) => match c.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        self.note_error(Some(format!("cannot read the stream: {e}")));
                        tokio::time::sleep(BEAT).await;
                        continue;
                    }
                },
                Err(e) => {
                    self.note_error(Some(format!("cannot read the stream: {e}")));
                    tokio::time::sleep(BEAT).await;
                    continue;
                }
            };
            // A consumer can go quiet for good (NATS restarted under it): one that delivers
            // nothing while the stream holds more is made anew.
            let mut stalled_since: Option<Instant> = None;
            let mut others_upto = 0;
            let mut check = tokio::time::interval(BEAT);
            let mut reconnected = self.connections.subscribe();
            reconnected.mark_unchanged();
            loop {
                let item = tokio::select! {
                    item = messages.next() => item,
                    _ = reconnected.changed() => break,
                    _ = check.tick() => {
                        let behind = self.stream_seq.load(Ordering::SeqCst) > applier.applied();
                        match (behind, stalled_since) {
                            (false, _) => stalled_since = None,
                            (true, None) => stalled_since = Some(Instant::now()),
                            (true, Some(at)) if at.elapsed() >= STALLED => {
                                tracing::info!("the stream's consumer delivers nothing while the stream holds more; made anew");
                                break;
                            }
                            (true, Some(_)) => {}
                        }
                        continue;
                    }
                };
                let Some(item) = item else { break };
                stalled_since = None;
                let message = match item {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "the stream's consumer failed; made anew");
                        break;
                    }
                };
                let Ok(info) = message.info() else {
                    tracing::debug!("a message from the stream without its sequence; the consumer is made anew");
                    break;
                };
                if self.fatal.load(Ordering::SeqCst) {
                    return;
                }
                let seq = info.stream_sequence;
                let applied = applier.applied();
                if seq <= applied {
                    continue;
                }
                if seq > applied + 1 && seq - 1 > others_upto {
                    // Numbers between belong to other subjects of the stream, or are gone.
                    match self.gone_between(&stream, (applied + 1).max(others_upto + 1), seq).await {
                        Ok(None) => others_upto = seq - 1,
                        Ok(Some(gone)) => {
                            self.stop_following(format!(
                                "the stream no longer holds change #{gone}, which this replica has not applied: it \
                                 stops here rather than skip it. Start it on an empty --state folder only if the \
                                 stream still holds all its changes"
                            ));
                            return;
                        }
                        Err(e) => {
                            self.note_error(Some(format!("cannot read the stream: {e}")));
                            break;
                        }
                    }
                }
                let parsed = serde_json::from_slice::<Message>(&message.payload).map_err(|e| e.to_string());
                let origin = parsed.as_ref().map(|m| m.origin.clone()).unwrap_or_default();
                let outcome = loop {
                    match applier.clone().apply(seq, parsed.clone()).await {
                        Ok(outcome) => break outcome,
                        Err(e) => {
                            self.note_error(Some(format!("cannot apply change #{seq} here, retrying: {e}")));
                            tokio::time::sleep(BEAT).await;
                        }
                    }
                };
                if matches!(outcome, Outcome::Refused(_))
                    && let Ok(mut skipped) = self.skipped.lock()
                {
                    skipped.push_back((seq, Instant::now()));
                    while skipped.len() > MAX_SKIPPED
                        || skipped.front().is_some_and(|(_, at)| at.elapsed() > SKIPPED_FOR)
                    {
                        skipped.pop_front();
                    }
                }
                if origin == self.options.replica
                    && let Ok(mut outcomes) = self.outcomes.lock()
                {
                    // Kept until the sender takes it; a sender that gave up leaves it, and the
                    // oldest such go first.
                    outcomes.insert(seq, outcome);
                    while outcomes.len() > 1000 {
                        outcomes.pop_first();
                    }
                }
                self.stream_seq.fetch_max(seq, Ordering::SeqCst);
                self.applied.send_replace(seq);
            }
            tokio::time::sleep(BEAT / 4).await;
        }
    }

    /// The first number in `from..to` that the stream no longer holds, if any; the numbers it
    /// does hold there are other subjects' (a stream shared with others).
    async fn gone_between(&self, stream: &stream::Stream, from: u64, to: u64) -> Result<Option<u64>, String> {
        for seq in from..to {
            match stream.get_raw_message(seq).await {
                Ok(message) if message.subject.as_str() != self.subject() => {}
                Ok(_) => return Err(format!("change #{seq} was not delivered")),
                Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => return Ok(Some(seq)),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(None)
    }

    /// Puts this replica's heartbeat every second, and at once after each change it applies.
    async fn announce<A: Applier>(self: Arc<Self>, link: Link, applier: Arc<A>) {
        let mut applied = self.applied.subscribe();
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = applied.changed() => if changed.is_err() { return },
            }
            if self.leaving.load(Ordering::SeqCst) {
                return;
            }
            let heartbeat = self.this(applier.revision());
            let Ok(body) = serde_json::to_vec(&heartbeat) else { continue };
            self.saw(heartbeat);
            let put = link.kv.put(&self.options.replica, body.into()).await;
            let error = match put {
                Ok(_) => None,
                Err(e) if link.client.connection_state() == async_nats::connection::State::Connected => {
                    // Connected, yet the bucket does not take it: deleted? Made again, as at start.
                    let made = self.make_bucket(&link.js).await;
                    Some(format!(
                        "cannot announce this replica in the bucket `{}`: {e}{}",
                        self.bucket(),
                        match made {
                            Ok(_) => String::new(),
                            Err(made) => format!("; making it again failed: {made}"),
                        }
                    ))
                }
                Err(_) => None,
            };
            if let Ok(mut slot) = self.announce_error.lock() {
                *slot = error;
            }
        }
    }

    fn skipped(&self) -> Vec<u64> {
        self.skipped
            .lock()
            .map(|s| s.iter().filter(|(_, at)| at.elapsed() <= SKIPPED_FOR).map(|(n, _)| *n).collect())
            .unwrap_or_default()
    }

    /// A heartbeat under this replica's own id that it did not put: another replica has the
    /// same id, and the fleet cannot tell them apart (it would wait for one and hear the other).
    fn check_twin(&self, heartbeat: &Heartbeat) {
        // This replica's own heartbeats from before a restart are not another replica's.
        if heartbeat.at < self.started_at {
            return;
        }
        if heartbeat.started_at == self.started_at && heartbeat.address == self.options.address {
            return;
        }
        if let Ok(mut twin) = self.twin.lock() {
            *twin = Some((heartbeat.address.clone(), Instant::now()));
        }
    }

    fn saw(&self, heartbeat: Heartbeat) {
        self.saw_aged(heartbeat, Duration::ZERO);
    }

    /// Notes which replica (by its start) announced itself under an id: two that go on
    /// announcing themselves at once are twins, whichever replica sees them.
    fn count_instances(&self, heartbeat: &Heartbeat, seen: Instant) {
        let Ok(mut instances) = self.instances.lock() else { return };
        instances.retain(|_, list| {
            list.retain(|(_, _, last)| last.elapsed() < GONE_AFTER);
            !list.is_empty()
        });
        let list = instances.entry(heartbeat.id.clone()).or_default();
        match list.iter_mut().find(|(started, _, _)| *started == heartbeat.started_at) {
            Some((_, _, last)) => *last = (*last).max(seen),
            None => list.push((heartbeat.started_at, seen, seen)),
        }
        // An older start still heard from after a newer one appeared: not a restart, a twin.
        let twin = list
            .iter()
            .any(|(older, _, last)| list.iter().any(|(newer, first, _)| older < newer && *last > *first + BEAT / 2));
        if twin && let Ok(mut twins) = self.twins.lock() {
            twins.insert(heartbeat.id.clone(), Instant::now());
        }
    }

    /// Keeps a replica's heartbeat, sent `age` ago.
    fn saw_aged(&self, heartbeat: Heartbeat, age: Duration) {
        if age >= BUCKET_TTL {
            return;
        }
        let seen = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        self.count_instances(&heartbeat, seen);
        if let Ok(mut replicas) = self.replicas.lock() {
            // Replicas gone long ago are forgotten: ids do not pile up.
            let keep = self.name_within() + GONE_AFTER;
            replicas.retain(|_, (_, seen)| seen.elapsed() < keep);
            replicas.insert(heartbeat.id.clone(), (heartbeat, seen));
        }
        self.seen.send_modify(|n| *n += 1);
    }

    /// Keeps the fleet's heartbeats as they come.
    async fn watch_fleet(self: Arc<Self>, link: Link) {
        loop {
            // With the last heartbeat of each replica first: a sender that just started knows
            // the fleet at once.
            match link.kv.watch_with_history(">").await {
                Ok(mut entries) => {
                    let mut replaying = true;
                    // This replica's own heartbeat comes every second: a watch that brings
                    // nothing for longer has gone quiet (NATS restarted under it) and is made anew,
                    // as is one from before a reconnection.
                    let mut reconnected = self.connections.subscribe();
                    reconnected.mark_unchanged();
                    loop {
                        let entry = tokio::select! {
                            entry = tokio::time::timeout(STALLED, entries.next()) => entry,
                            _ = reconnected.changed() => break,
                        };
                        let Ok(Some(Ok(entry))) = entry else { break };
                        // A heartbeat from the history is as old as it says; one as it comes is new.
                        let history = replaying;
                        replaying &= entry.delta > 0;
                        match entry.operation {
                            kv::Operation::Put => {
                                let Some(heartbeat) = read_heartbeat(&entry.key, &entry.value) else { continue };
                                if entry.key == self.options.replica {
                                    self.check_twin(&heartbeat);
                                    continue;
                                }
                                let age = if history {
                                    (Utc::now() - heartbeat.at).to_std().unwrap_or_default()
                                } else {
                                    Duration::ZERO
                                };
                                self.saw_aged(heartbeat, age);
                            }
                            kv::Operation::Delete | kv::Operation::Purge => {
                                if let Ok(mut replicas) = self.replicas.lock() {
                                    replicas.remove(&entry.key);
                                }
                                self.seen.send_modify(|n| *n += 1);
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot watch the fleet's heartbeats"),
            }
            tokio::time::sleep(BEAT).await;
        }
    }

    /// Every second: asks the stream how far it goes (without NATS, the state grows stale),
    /// keeps the time it was last in step, and decides whether requests are denied.
    async fn keep_time<A: Applier>(self: Arc<Self>, applier: Arc<A>) {
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut kept_at: Option<Instant> = None;
        loop {
            tick.tick().await;
            let link = self.link.lock().ok().and_then(|l| l.clone());
            if let Some(link) = link {
                // Read before asking: whatever it applies meanwhile, the stream held it already.
                let applied_before = applier.applied();
                // The answer tells how the stream stood when it was asked, or later; never
                // later than the answer is read. An answer that waited in the socket while the
                // process was frozen must not make a stale state look fresh, so it counts
                // from when it was asked.
                let (asked_at, asked_ms) = (Instant::now(), Utc::now().timestamp_millis());
                match self.ask_stream(&link.js).await {
                    Ok(asked)
                        if Some(asked.created) != self.tie.lock().ok().and_then(|t| t.as_ref().map(|t| t.created)) =>
                    {
                        self.stop_following(format!(
                            "the stream `{}` was deleted and made anew under this replica: its numbers start again, \
                             so nothing more is applied here. Start the replicas on empty --state folders to take \
                             the new stream's state",
                            self.options.stream
                        ));
                    }
                    Ok(asked) if asked.last < applied_before => {
                        self.stop_following(format!(
                            "the stream `{}` ends at #{}, before #{applied_before} that this replica applied: it lost \
                             changes (restored from an older copy?), and would number new ones as changes applied \
                             here already. Start the replicas on empty --state folders to take its state",
                            self.options.stream, asked.last
                        ));
                    }
                    Ok(asked) => {
                        let last = asked.last;
                        self.stream_seq.store(last, Ordering::SeqCst);
                        if let Ok(mut answered) = self.answered.lock() {
                            *answered = Some(asked_at);
                        }
                        // The fleet's own count, set once a change is applied and its barrier
                        // passed (a journal may number a change before the state holds it).
                        if *self.applied.borrow() >= last && !self.fatal.load(Ordering::SeqCst) {
                            self.note_error(None);
                            self.synced_ms.store(asked_ms, Ordering::SeqCst);
                            self.note_denying();
                            if kept_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(5)) {
                                kept_at = Some(Instant::now());
                                self.keep_tie(applier.journals()).await;
                            }
                        }
                    }
                    Err(e) => self.note_error(Some(format!("cannot reach the NATS stream: {e}"))),
                }
            }
            // Only once the folder's tie is checked (the link is set then): the numbers it holds
            // are what the check compares the journals with.
            let journals = applier.journals();
            let checked = self.link.lock().is_ok_and(|l| l.is_some());
            if checked
                && !self.fatal.load(Ordering::SeqCst)
                && self
                    .tie
                    .lock()
                    .ok()
                    .and_then(|t| t.as_ref().map(|t| (t.signals, t.directory)))
                    .is_some_and(|kept| kept != journals)
            {
                self.keep_tie(journals).await;
            }
        }
    }

    /// Keeps `denying` for the health service, on its own task: the stream's answer may take
    /// seconds (or never come), and a process woken from a freeze must not report SERVING
    /// while its requests are denied. It wakes when the state would turn stale; a sync only
    /// moves that later (and notes `denying` itself), so waking at the earlier time is never
    /// late. At most a beat apart all the same: the timer's clock stops while a host sleeps,
    /// and the wall clock, which staleness is judged by, may be stepped.
    async fn watch_staleness(self: Arc<Self>) {
        loop {
            self.note_denying();
            tokio::time::sleep(self.fresh_for().unwrap_or(BEAT).min(BEAT)).await;
        }
    }

    /// Puts `denying` where the health service reads it.
    fn note_denying(&self) {
        let deny = self.denying();
        if self.deny.send_replace(deny) != deny {
            tracing::warn!(
                deny,
                "live state staleness: requests are {}",
                if deny { "denied" } else { "decided again" }
            );
        }
    }

    /// The stream's creation time and the number of its last change.
    async fn ask_stream(&self, js: &jetstream::Context) -> Result<Asked, String> {
        let mut stream = js.get_stream(&self.options.stream).await.map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        let created = info.created.unix_timestamp_nanos();
        // The last of this stream's own changes: a stream shared with other subjects numbers
        // their messages too.
        let last = if info.config.subjects == [self.subject()] {
            info.state.last_sequence
        } else {
            match stream.get_last_raw_message_by_subject(&self.subject()).await {
                Ok(message) => message.sequence,
                Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => 0,
                Err(e) => return Err(e.to_string()),
            }
        };
        Ok(Asked { created, last })
    }

    /// Writes `fleet.json` anew (off the async threads): when the state was last in step,
    /// and the journals' last numbers.
    async fn keep_tie(self: &Arc<Self>, journals: (u64, u64)) {
        let fleet = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let synced_at = fleet.synced_at();
            let Ok(mut tie) = fleet.tie.lock() else { return };
            if let Some(tie) = tie.as_mut() {
                (tie.synced_at, tie.signals, tie.directory) = (synced_at, journals.0, journals.1);
                if let Err(e) = write_tie(&fleet.state, tie) {
                    tracing::debug!(error = %e, "cannot write the state folder's fleet.json");
                }
            }
        })
        .await;
    }

    fn note_error(&self, error: Option<String>) {
        if self.fatal.load(Ordering::SeqCst) && error.is_none() {
            return;
        }
        let Ok(mut slot) = self.error.lock() else { return };
        match (&*slot, &error) {
            (None, Some(e)) => tracing::warn!(error = %e, "the fleet's live state is not in step"),
            (Some(_), None) => tracing::info!("the fleet's live state is in step with its stream"),
            _ => {}
        }
        *slot = error;
    }

    /// Leaves the fleet on a clean shutdown: the heartbeat is removed, so no sender waits for
    /// this replica or names it.
    pub async fn leave(self: &Arc<Self>, journals: (u64, u64)) {
        self.leaving.store(true, Ordering::SeqCst);
        // The journals' last numbers, as they end: a journal lost while this replica is down
        // is found at the next start.
        if self.link.lock().is_ok_and(|l| l.is_some()) && !self.fatal.load(Ordering::SeqCst) {
            self.keep_tie(journals).await;
        }
        let link = self.link.lock().ok().and_then(|l| l.clone());
        if let Some(link) = link {
            let removed = tokio::time::timeout(BEAT, link.kv.delete(&self.options.replica)).await;
            if !matches!(removed, Ok(Ok(()))) {
                tracing::debug!("the heartbeat could not be removed; it expires by itself");
            }
        }
    }

    /// `denying`, as the staleness watch finds it.
    pub fn denying_changes(&self) -> tokio::sync::watch::Receiver<bool> {
        self.deny.subscribe()
    }

    /// True when requests are to be denied: the live state is older than --live-stale-after
    /// and the policy is deny.
    ///
    /// Worked out per request from when the replica was last known in step (noted every
    /// second), so that a process that was frozen denies from its first request on.
    pub fn denying(&self) -> bool {
        self.options.stale_policy == StalePolicy::Deny && self.fresh_for().is_none()
    }

    /// How much longer the live state is young enough to decide with: None once it is older
    /// than --live-stale-after (or was never known in step), `Duration::MAX` without it.
    fn fresh_for(&self) -> Option<Duration> {
        let Some(after) = self.options.stale_after else { return Some(Duration::MAX) };
        // SeqCst: a time stored after a change was applied brings that change with it.
        let synced = self.synced_ms.load(Ordering::SeqCst);
        if synced == i64::MIN {
            return None;
        }
        let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        // Stale once more than `after` has passed: from a millisecond past `synced + after`.
        let left = synced.saturating_add(after).saturating_sub(Utc::now().timestamp_millis());
        u64::try_from(left).ok().map(|ms| Duration::from_millis(ms.saturating_add(1)))
    }

    pub fn freshness(&self) -> Freshness {
        let connected = self.client.lock().ok().and_then(|c| c.as_ref().map(async_nats::Client::connection_state))
            == Some(async_nats::connection::State::Connected);
        let answered = self.answered.lock().ok().and_then(|a| *a).is_some_and(|a| a.elapsed() < 3 * BEAT);
        let applied = *self.applied.borrow();
        let stream_seq = self.stream_seq.load(Ordering::SeqCst);
        let error = self.error.lock().ok().and_then(|e| e.clone());
        let error = error.or_else(|| (!connected).then(|| "not connected to NATS".to_string()));
        let error = error.or_else(|| self.announce_error.lock().ok().and_then(|e| e.clone()));
        let twin = self.twin.lock().ok().and_then(|t| t.clone()).filter(|(_, at)| at.elapsed() < GONE_AFTER);
        let error = error.or_else(|| {
            twin.map(|(address, _)| {
                format!(
                    "another replica announces itself as `{}` (at {address}): give each replica its own --replica-id",
                    self.options.replica
                )
            })
        });
        let synced_at = self.synced_at();
        // Never in step while requests are denied as stale (an answer within 3 s may still be
        // older than a --live-stale-after of 2 s).
        let in_step = connected && answered && applied >= stream_seq && error.is_none() && !self.denying();
        let stale_seconds =
            if in_step { Some(0) } else { synced_at.map(|at| (Utc::now() - at).num_seconds().max(0) as u64) };
        Freshness { connected, healthy: in_step, applied, stream_seq, synced_at, stale_seconds, error }
    }

    /// Waits until this replica is in step with the stream (connected, and it has applied all
    /// the stream holds), for at most `limit`; true if it is. A replica that starts waits so
    /// before it serves: it must not allow an agent that was disabled while it was down.
    ///
    /// A replica still applying what it missed when `limit` is over goes on waiting as long
    /// as it makes progress: it would otherwise serve part of the history.
    pub async fn in_step(&self, limit: Duration) -> bool {
        let mut deadline = Instant::now() + limit;
        let mut progress = *self.applied.borrow();
        let mut applied = self.applied.subscribe();
        loop {
            let fresh = self.freshness();
            if fresh.healthy {
                return true;
            }
            if Instant::now() >= deadline {
                if !fresh.connected || fresh.applied <= progress || self.fatal.load(Ordering::SeqCst) {
                    return false;
                }
                progress = fresh.applied;
                deadline = Instant::now() + BEAT;
            }
            // Woken by each change applied, and at least every 50 ms for the stream's answer.
            let _ = tokio::time::timeout(Duration::from_millis(50), applied.changed()).await;
        }
    }

    /// Publishes a change to the stream; its sequence once JetStream has it durably.
    pub async fn publish(&self, message: &Message) -> Result<u64, PublishError> {
        if self.fatal.load(Ordering::SeqCst) {
            return Err(PublishError::NotSent(self.error.lock().ok().and_then(|e| e.clone()).unwrap_or_default()));
        }
        let link = self.link.lock().ok().and_then(|l| l.clone());
        let Some(link) = link else { return Err(PublishError::NotSent("not connected to the NATS stream yet".into())) };
        if link.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PublishError::NotSent("not connected to NATS".into()));
        }
        let body = serde_json::to_vec(message).map_err(|e| PublishError::NotSent(e.to_string()))?;
        let max = link.client.server_info().max_payload;
        if body.len() > max {
            return Err(PublishError::NotSent(format!(
                "the change takes {} bytes on the stream, more than NATS takes in one message ({max}): split it",
                body.len()
            )));
        }
        let id = uuid::Uuid::now_v7().to_string();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        let unknown = |e: &dyn std::fmt::Display| PublishError::Unknown(format!("change {id}: {e}"));
        let ack = link.js.publish_with_headers(self.subject(), headers, body.into()).await.map_err(|e| unknown(&e))?;
        let ack = ack.await.map_err(|e| unknown(&e))?;
        // A number this replica has applied already: its own consumer was quicker than the
        // acknowledgement, or the stream was deleted and made anew and numbers from 1 again.
        // Only the stream's creation time tells.
        if ack.sequence <= *self.applied.borrow() && !self.same_stream(&link.js).await {
            self.stop_following(format!(
                "the stream `{}` numbered a new change #{}, which this replica had applied already: it was \
                 deleted and made anew. Start the replicas on empty --state folders to take its state",
                self.options.stream, ack.sequence
            ));
            return Err(unknown(&"the stream was made anew; no replica here applies it"));
        }
        Ok(ack.sequence)
    }

    /// True unless the stream is known to be another than the one the folder is tied to (a
    /// stream that cannot be asked counts as the same: the check every second tells later).
    async fn same_stream(&self, js: &jetstream::Context) -> bool {
        let created = match js.get_stream(&self.options.stream).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => info.created.unix_timestamp_nanos(),
                Err(_) => return true,
            },
            Err(_) => return true,
        };
        self.tie.lock().ok().and_then(|t| t.as_ref().map(|t| t.created)) == Some(created)
    }

    /// Waits until every replica heard from (this one included) has applied `seq`, or for
    /// `--fleet-ack-timeout`; returns the ones that had not, and this replica's outcome.
    ///
    /// It waits for the replicas heard from in the last 5 s, and names, without waiting for
    /// them, the ones heard from in the last 30 s that have not applied it or skipped it (a
    /// replica gone silent may still be deciding: it is never counted as having confirmed).
    pub async fn confirm(&self, seq: u64) -> (Vec<String>, Option<Outcome>) {
        let deadline = tokio::time::Instant::now() + self.options.ack_timeout;
        // Just (re)connected: the others' heartbeats come within a beat or two, and only then
        // is it known who is in the fleet.
        let connected_at = self.connections.borrow().1;
        if let Some(at) = connected_at.filter(|at| at.elapsed() < 2 * BEAT) {
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::from_std(at + 2 * BEAT))).await;
        }
        let mut applied = self.applied.subscribe();
        let mut seen = self.seen.subscribe();
        while !self.awaited(seq).is_empty() {
            tokio::select! {
                _ = applied.changed() => {}
                _ = seen.changed() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let outcome = self.outcomes.lock().ok().and_then(|mut o| o.remove(&seq));
        (self.behind(seq), outcome)
    }

    /// How long a silent replica is named in answers: 30 s, or longer than it may take a
    /// replica cut off from NATS to deny (`--live-stale-after`; give all replicas the same).
    fn name_within(&self) -> Duration {
        BUCKET_TTL.max(self.options.stale_after.map_or(Duration::ZERO, |after| after + GONE_AFTER))
    }

    /// The replicas (this one first) that have not applied `seq`, or took it without applying
    /// it, or cannot be told to have: stopped following the stream, or two under one id.
    fn behind(&self, seq: u64) -> Vec<String> {
        self.not_confirmed(seq, self.name_within(), false)
    }

    /// Of `behind`, the ones still worth waiting for: heard from in the last 5 s, following
    /// the stream, and not twins (those will not confirm however long one waits).
    fn awaited(&self, seq: u64) -> Vec<String> {
        self.not_confirmed(seq, GONE_AFTER, true)
    }

    fn not_confirmed(&self, seq: u64, within: Duration, awaitable: bool) -> Vec<String> {
        let mut behind = Vec::new();
        let stopped = self.fatal.load(Ordering::SeqCst);
        let skipped_here = self.skipped.lock().is_ok_and(|s| s.iter().any(|(n, _)| *n == seq));
        if (*self.applied.borrow() < seq || skipped_here || stopped) && !(awaitable && stopped) {
            behind.push(self.options.replica.clone());
        }
        // Another replica under this one's id: whether it applied the change cannot be told.
        let twin = self.twin.lock().ok().and_then(|t| t.clone()).filter(|(_, at)| at.elapsed() < within);
        if let Some((address, _)) = twin.filter(|_| !awaitable) {
            behind.push(format!("{} (another replica with this id, at {address})", self.options.replica));
        }
        let twins: Vec<String> = self
            .twins
            .lock()
            .map(|t| t.iter().filter(|(_, at)| at.elapsed() < within).map(|(id, _)| id.clone()).collect())
            .unwrap_or_default();
        if let Ok(replicas) = self.replicas.lock() {
            let mut others: Vec<String> = replicas
                .values()
                .filter(|(h, seen)| h.id != self.options.replica && seen.elapsed() < within)
                .filter(|(h, _)| {
                    let cannot_tell = !h.following || twins.contains(&h.id);
                    if awaitable {
                        !cannot_tell && (h.applied < seq || h.skipped.contains(&seq))
                    } else {
                        cannot_tell || h.applied < seq || h.skipped.contains(&seq)
                    }
                })
                .map(|(h, _)| h.id.clone())
                .collect();
            others.sort();
            behind.extend(others);
        }
        behind
    }

    /// The replicas heard from in the last few seconds, with what disagrees.
    pub fn view(&self, this: Heartbeat) -> View {
        let stream_seq = self.stream_seq.load(Ordering::SeqCst);
        let mut all: Vec<(Heartbeat, u64, bool)> = vec![(this, 0, true)];
        if let Ok(replicas) = self.replicas.lock() {
            for (h, seen) in replicas.values() {
                if h.id != self.options.replica && seen.elapsed() < GONE_AFTER {
                    all.push((h.clone(), seen.elapsed().as_millis() as u64, false));
                }
            }
        }
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (h, _, _) in &all {
            *counts.entry(h.revision.as_str()).or_default() += 1;
        }
        // The most common revision; a tie goes to the first in name order, so every replica
        // names the same one.
        let majority = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(r, _)| r.to_string())
            .unwrap_or_default();
        let mut replicas: Vec<ReplicaView> = all
            .into_iter()
            .map(|(heartbeat, seen_ms_ago, this)| ReplicaView {
                lag: stream_seq.saturating_sub(heartbeat.applied),
                other_revision: heartbeat.revision != majority,
                heartbeat,
                this,
                seen_ms_ago,
            })
            .collect();
        replicas.sort_by(|a, b| a.heartbeat.id.cmp(&b.heartbeat.id));
        View { replicas, stream_seq, majority_revision: majority }
    }

    /// This replica's own heartbeat, as it would announce it now.
    pub fn this(&self, revision: String) -> Heartbeat {
        let freshness = self.freshness();
        Heartbeat {
            id: self.options.replica.clone(),
            address: self.options.address.clone(),
            revision,
            applied: freshness.applied,
            started_at: self.started_at,
            healthy: freshness.healthy,
            at: Utc::now(),
            error: freshness.error.map(|e| clip(e, 1024)),
            skipped: self.skipped(),
            following: !self.fatal.load(Ordering::SeqCst),
        }
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn read_tie(state: &Path) -> Result<Option<Tie>, FleetError> {
    let path = state.join(FLEET_FILE);
    let err = |message: String| FleetError::State { path: path.display().to_string(), message };
    match std::fs::metadata(&path) {
        Ok(m) if !m.is_file() => return Err(err("not a regular file".into())),
        Ok(m) if m.len() > 64 * 1024 => return Err(err("larger than 64 KiB: not a fleet tie".into())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    }
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(format!("unreadable ({e}); move it aside only with the folder's journals")))
}

fn write_tie(state: &Path, tie: &Tie) -> std::io::Result<()> {
    use std::io::Write;
    let path = state.join(FLEET_FILE);
    let tmp = state.join(format!("{FLEET_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(tie).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    if let Ok(dir) = std::fs::File::open(state) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names_are_checked() {
        assert_eq!(parse_servers("nats://127.0.0.1:4222, nats://h:1").unwrap().len(), 2);
        for bad in ["", "127.0.0.1:4222", "http://h:1", "nats://", "nats://h:1,"] {
            assert!(parse_servers(bad).is_err(), "{bad}");
        }
        assert!(is_name("replica-a_1", 64));
        for bad in ["", "a.b", "a b", "a*", "é"] {
            assert!(!is_name(bad, 64), "{bad}");
        }
        assert!(is_name(&default_replica_id(50051), 64));
    }

    #[test]
    fn a_message_round_trips_and_refuses_unknown_fields() {
        let signal = Signal::new("disable_agent", "ag-1", "", "why", "me").unwrap();
        let message = Message { origin: "a".into(), caller: Sender::default(), signal: Some(signal), directory: None };
        let text = serde_json::to_string(&message).unwrap();
        let back: Message = serde_json::from_str(&text).unwrap();
        assert_eq!(back.signal.unwrap().target(), "ag-1");
        assert!(serde_json::from_str::<Message>(r#"{"origin":"a","sgnal":{}}"#).is_err());
    }
}
