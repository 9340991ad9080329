//! `agentca serve`: load the bundle, open the audit log and the signal journal, serve gRPC
//! until SIGTERM or ctrl-c, reloading on folder changes, SIGHUP and the admin call.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::access::Access;
use crate::audit::{self, Audit, Target};
use crate::grpc;
use crate::live::DirectoryJournal;
use crate::metrics::listener::Probes;
use crate::service::{Service, Settings};
use crate::signals::{Journal, Overlay};
use crate::snapshot::Store;
use crate::tls::{Files, Tls};

use super::{BundleArgs, Error, Threads, block_on, exit};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    bundle: BundleArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051", env = "AGENTCA_LISTEN")]
    listen: SocketAddr,
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` over HTTP on this address (off
    /// by default).
    #[arg(long, value_name = "ADDR", env = "AGENTCA_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log lines as `text` or `json` (one object a line, on standard error).
    #[arg(long, value_enum, default_value = "text", env = "AGENTCA_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(flatten)]
    tls: TlsArgs,
    /// Who may ask what: certificate identities and bearer-token hashes mapped to the roles
    /// decide, read, signal and admin (TOML, or JSON; see the README). Without it, decisions
    /// are open and AdminService follows --admin-token.
    #[arg(long, value_name = "FILE", env = "AGENTCA_ACCESS")]
    access: Option<PathBuf>,
    #[command(flatten)]
    audit: AuditArgs,
    /// Folder of the live-signal journal.
    #[arg(long, value_name = "DIR", default_value = "state", env = "AGENTCA_STATE")]
    state: PathBuf,
    #[command(flatten)]
    live: LiveArgs,
    /// Require `authorization: Bearer TOKEN` on AdminService calls.
    #[arg(long, env = "AGENTCA_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Serve AdminService without a token on a non-loopback address (anyone who can reach the
    /// port can then re-enable a disabled agent).
    #[arg(long)]
    insecure_admin: bool,
    /// Do not reload when the policies folder changes (SIGHUP and the admin call still do).
    #[arg(long)]
    no_watch: bool,
    /// Compact the signal journal once it holds this many more lines than live signals.
    #[arg(long, default_value_t = 10_000, hide = true)]
    journal_compact_after: u64,
    /// Refuse a request whose `time` is further than this many seconds from the server's
    /// clock (off by default: the caller's clock is trusted).
    #[arg(long, value_name = "SECONDS")]
    max_clock_skew: Option<u32>,
    /// Most live signals for ids the served directory does not know (agents yet to come).
    #[arg(long, default_value_t = 10_000)]
    max_unknown_signals: usize,
    /// Largest gRPC message accepted or sent, in bytes (one larger is RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(16384..))]
    max_message_bytes: usize,
    #[command(flatten)]
    limits: LimitArgs,
    /// On SIGTERM or ctrl-c: how long calls in flight get to finish, and then how long the
    /// audit log gets to be written, in milliseconds (each).
    #[arg(long, default_value_t = 10_000)]
    shutdown_grace_ms: u64,
}

/// A fleet: live state shared with other replicas through NATS JetStream.
#[derive(Debug, clap::Args)]
pub struct LiveArgs {
    /// Share live signals and directory changes with every replica through NATS JetStream:
    /// `nats://HOST:PORT[,nats://HOST:PORT…]`. Without it, they stay on this server
    /// (journaled under --state).
    #[arg(long, value_name = "URL", env = "AGENTCA_LIVE")]
    live: Option<String>,
    /// NATS credentials (a `.creds` file: a user JWT and its NKey seed).
    #[arg(long, value_name = "FILE", requires = "live", env = "AGENTCA_LIVE_CREDS")]
    live_creds: Option<PathBuf>,
    /// Trust this CA (PEM) for NATS over TLS, and require TLS.
    #[arg(long, value_name = "FILE", requires = "live", env = "AGENTCA_LIVE_TLS_CA")]
    live_tls_ca: Option<PathBuf>,
    /// The JetStream stream's name (its subject is NAME.live, the heartbeat bucket NAME-fleet).
    #[arg(long, value_name = "NAME", default_value = "agentca", env = "AGENTCA_LIVE_STREAM")]
    live_stream: String,
    /// This replica's id in the fleet (default: the host's name and the listening port).
    #[arg(long, value_name = "ID", env = "AGENTCA_REPLICA_ID")]
    replica_id: Option<String>,
    /// The address other replicas and admins reach this one at, as the fleet lists it
    /// (default: the listening address).
    #[arg(long, value_name = "ADDR", env = "AGENTCA_ADVERTISE")]
    advertise: Option<String>,
    /// How long a signal or directory change waits for every replica to apply it before it
    /// is answered with the ones that had not (e.g. `2s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    fleet_ack_timeout: Duration,
    /// The age past which the live state counts as stale when NATS cannot be reached (see
    /// --live-stale-policy); unset, it never does.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, env = "AGENTCA_LIVE_STALE_AFTER")]
    live_stale_after: Option<Duration>,
    /// How many NATS servers keep a copy of the stream and the heartbeat bucket when this
    /// replica creates them (3 on a cluster of three: one server lost loses nothing).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    live_copies: u8,
    /// How long a starting replica waits to be in step with the stream before it serves the
    /// last live state it applied (calls wait meanwhile).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    live_start_wait: Duration,
    /// What a replica does once its live state is stale: keep deciding with it (`serve`), or
    /// deny every request with `live_state_unavailable` (`deny`).
    #[arg(long, value_enum, default_value = "serve", env = "AGENTCA_LIVE_STALE_POLICY")]
    live_stale_policy: StalePolicyArg,
}

/// `--live-stale-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StalePolicyArg {
    /// Keep deciding with the last state applied.
    Serve,
    /// Deny every request (`live_state_unavailable`).
    Deny,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

impl ServeArgs {
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

/// TLS on the listener; the files are reloaded when they change (and on SIGHUP).
#[derive(Debug, clap::Args)]
pub struct TlsArgs {
    /// Serve TLS with this certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE", requires = "tls_key", env = "AGENTCA_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "AGENTCA_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: require a client certificate issued by one of these CAs (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "AGENTCA_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> Option<Files> {
        Some(Files { cert: self.tls_cert.clone()?, key: self.tls_key.clone()?, client_ca: self.tls_client_ca.clone() })
    }
}

/// What one caller can take; the defaults hold about 2 GB (README, "Limits").
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    /// Open connections; more are closed as soon as they are accepted. Keep it under `ulimit -n`.
    #[arg(long, default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_connection: u32,
    /// Decision calls in flight; more are answered RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_in_flight: usize,
    /// Admin, health and reflection calls in flight (apart from decisions, so a flood of
    /// decisions cannot lock the kill switch out).
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_admin_in_flight: usize,
    /// EvaluateBatch items in flight across all batches; a batch past it is RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 20_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1000..))]
    max_batch_items_in_flight: usize,
    /// Close a connection that has had no call for this many seconds (0: never).
    #[arg(long, default_value_t = 120)]
    idle_timeout_secs: u64,
    /// Send an HTTP/2 PING this often (seconds), and close the connection if it is not
    /// answered within `--keepalive-timeout-secs`.
    #[arg(long, default_value_t = 30)]
    keepalive_interval_secs: u64,
    #[arg(long, default_value_t = 10)]
    keepalive_timeout_secs: u64,
    /// As `--idle-timeout-secs`, in milliseconds (for tests).
    #[arg(long, hide = true)]
    idle_timeout_ms: Option<u64>,
    /// End a call not answered within this many seconds (DEADLINE_EXCEEDED): a caller that
    /// opens a stream and never sends its message cannot hold a place in flight.
    #[arg(long, default_value_t = 30)]
    call_timeout_secs: u64,
    /// As `--call-timeout-secs`, in milliseconds (for tests).
    #[arg(long, hide = true)]
    call_timeout_ms: Option<u64>,
    /// Close a connection whose TLS handshake is not done within this many seconds, so that a
    /// client that connects and stalls cannot hold a place under --max-connections.
    #[arg(long, default_value_t = 10)]
    tls_handshake_timeout_secs: u64,
    /// As `--tls-handshake-timeout-secs`, in milliseconds (for tests).
    #[arg(long, hide = true)]
    tls_handshake_timeout_ms: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> grpc::limits::Limits {
        let idle = self.idle_timeout_ms.map_or(Duration::from_secs(self.idle_timeout_secs), Duration::from_millis);
        grpc::limits::Limits {
            max_connections: self.max_connections,
            max_streams_per_connection: self.max_streams_per_connection,
            max_in_flight: self.max_in_flight,
            max_admin_in_flight: self.max_admin_in_flight,
            max_batch_items_in_flight: self.max_batch_items_in_flight,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            call_timeout: self
                .call_timeout_ms
                .map_or(Duration::from_secs(self.call_timeout_secs), Duration::from_millis)
                .max(Duration::from_millis(1)),
            keepalive_interval: Duration::from_secs(self.keepalive_interval_secs.max(1)),
            keepalive_timeout: Duration::from_secs(self.keepalive_timeout_secs.max(1)),
            handshake_timeout: self
                .tls_handshake_timeout_ms
                .map_or(Duration::from_secs(self.tls_handshake_timeout_secs), Duration::from_millis)
                .max(Duration::from_millis(1)),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Audit log: a file, `-` for stdout, or `off`.
    #[arg(long = "audit", value_name = "PATH|-|off", default_value = "audit/decisions.jsonl", env = "AGENTCA_AUDIT")]
    target: String,
    /// `fsync`: answer once the record is on disk; `written`: once it is in the file (survives
    /// a crash of agentca, not of the machine); `buffered`: once it is queued.
    #[arg(long = "audit-durability", value_enum, default_value = "fsync")]
    durability: DurabilityArg,
    /// When the queue is full: `wait` for room, or `deny` with audit_unavailable.
    #[arg(long = "audit-on-full", value_enum, default_value = "wait")]
    on_full: OnFullArg,
    /// Records the queue holds.
    #[arg(long = "audit-queue", default_value_t = 65_536)]
    queue: usize,
    /// Bytes of records the queue holds.
    #[arg(long = "audit-queue-bytes", default_value_t = 64 * 1024 * 1024)]
    queue_bytes: usize,
    /// Rotate the file past this size, in bytes (0: never).
    #[arg(long = "audit-max-bytes", default_value_t = 256 * 1024 * 1024)]
    max_bytes: u64,
    /// Buffered mode: fsync at least this often, in milliseconds.
    #[arg(long = "audit-flush-ms", default_value_t = 100)]
    flush_ms: u64,
}

/// `--audit-durability` (see `audit::Durability`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DurabilityArg {
    /// Only once its record is on disk (fsync, many records per fsync).
    Fsync,
    /// Once its record is written to the file (it survives a crash of agentca, not of the
    /// machine); fsynced within the flush interval.
    Written,
    /// Once its record is queued; written at once and fsynced within the flush interval.
    Buffered,
}

impl From<DurabilityArg> for audit::Durability {
    fn from(arg: DurabilityArg) -> Self {
        match arg {
            DurabilityArg::Fsync => audit::Durability::Fsync,
            DurabilityArg::Written => audit::Durability::Written,
            DurabilityArg::Buffered => audit::Durability::Buffered,
        }
    }
}

/// `--audit-on-full` (see `audit::OnFull`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OnFullArg {
    /// Wait for room (backpressure).
    Wait,
    /// Answer deny with `audit_unavailable`.
    Deny,
}

impl From<OnFullArg> for audit::OnFull {
    fn from(arg: OnFullArg) -> Self {
        match arg {
            OnFullArg::Wait => audit::OnFull::Wait,
            OnFullArg::Deny => audit::OnFull::Deny,
        }
    }
}

impl AuditArgs {
    pub fn config(&self) -> audit::Config {
        audit::Config {
            target: Target::parse(&self.target),
            durability: self.durability.into(),
            on_full: self.on_full.into(),
            queue: self.queue,
            queue_bytes: self.queue_bytes,
            max_bytes: self.max_bytes,
            flush_interval: Duration::from_millis(self.flush_ms.max(1)),
        }
    }
}

pub fn run(args: ServeArgs) -> Result<ExitCode, Error> {
    block_on(Threads::Many, serve(args))?
}

/// Why `serve` refuses its admin settings.
#[derive(Debug, thiserror::Error)]
pub enum AdminAccess {
    #[error("the admin token is empty: give a token (--admin-token or AGENTCA_ADMIN_TOKEN), or none at all")]
    EmptyToken,
    #[error("the admin token must be visible ASCII (an HTTP header value): no spaces, control or non-ASCII characters")]
    TokenCharacters,
    #[error("AGENTCA_ADMIN_TOKEN is set but empty: give a token, or unset it")]
    EmptyTokenVariable,
    #[error(
        "refusing to serve AdminService without authentication on {0}, which is not a loopback address: \
         anyone who can reach it could re-enable a disabled agent. Set --access FILE or --admin-token (or \
         AGENTCA_ADMIN_TOKEN), listen on 127.0.0.1, or pass --insecure-admin to accept the risk"
    )]
    Open(SocketAddr),
    #[error(
        "--admin-token (or AGENTCA_ADMIN_TOKEN) and --access cannot be used together: put the token's \
         SHA-256 hash in the access file with the `admin` role"
    )]
    TokenWithAccess,
}

/// Refuses an admin port that anyone on the network could use: without a token, AdminService
/// is served only on a loopback address, unless `--insecure-admin` says so on purpose.
fn check_admin_access(args: &ServeArgs) -> Result<(), AdminAccess> {
    if args.access.is_some() {
        // The access file decides who may call AdminService, on any address.
        if args.admin_token.is_some() || std::env::var_os("AGENTCA_ADMIN_TOKEN").is_some() {
            return Err(AdminAccess::TokenWithAccess);
        }
        return Ok(());
    }
    let from_env = std::env::var_os("AGENTCA_ADMIN_TOKEN").is_some_and(|v| v.is_empty());
    match args.admin_token.as_deref() {
        Some(t) if t.trim().is_empty() => return Err(AdminAccess::EmptyToken),
        // A token travels in an HTTP header: visible ASCII only, or no client could send it.
        Some(t) if !t.bytes().all(|b| b.is_ascii_graphic()) => return Err(AdminAccess::TokenCharacters),
        Some(_) => return Ok(()),
        None if from_env => return Err(AdminAccess::EmptyTokenVariable),
        None => {}
    }
    if args.listen.ip().is_loopback() || args.insecure_admin {
        return Ok(());
    }
    Err(AdminAccess::Open(args.listen))
}

async fn serve(args: ServeArgs) -> Result<ExitCode, Error> {
    check_admin_access(&args)?;
    let access = args.access.as_deref().map(Access::load).transpose()?.map(Arc::new);
    let tls = args.tls.files().map(Tls::load).transpose()?;
    // The probes answer while the bundle loads (up, not ready): a large bundle takes a while.
    let probes = match args.metrics_listen {
        Some(addr) => Some(start_probes(addr, args.listen, args.log_format).await?),
        None => None,
    };
    let dir = args.bundle.policies.clone();
    // One server per state folder: two would number changes twice and compact away each
    // other's. The lock is the kernel's, on the folder, so a killed server leaves none behind.
    let _state = lock_state(&args.state)?;
    // The live directory changes are laid over the bundle's directory as it loads.
    let (directory_journal, replay) = DirectoryJournal::open(&args.state)?;
    if replay.cut_tail {
        tracing::warn!(journal = %directory_journal.path().display(), "removed a directory change cut by a crash (it was never acknowledged)");
    }
    let store = tokio::task::block_in_place(|| Store::open_with(&dir, &replay.changes, replay.seq))
        .map_err(|errors| Error::InvalidBundle { dir: dir.clone(), errors })?;
    if !replay.changes.is_empty() {
        let snap = store.current();
        tracing::info!(
            changes = replay.changes.len(),
            seq = replay.seq,
            objects = snap.live_objects(),
            "replayed the directory journal"
        );
    }
    drop(replay);
    if directory_journal.wants_compaction() {
        let (net, seq) = store.live_change();
        directory_journal.compact(seq, &net)?;
    }
    let audit = Audit::start(args.audit.config())?;
    let live = Overlay::new();
    let (mut journal, replayed) = Journal::open(&args.state, &live)?;
    journal.set_compact_after(args.journal_compact_after);
    for (line, error) in &replayed.skipped {
        tracing::warn!(journal = %journal.path().display(), line, %error, "skipped an unreadable signal (a write cut by a crash)");
    }
    if replayed.applied > 0 {
        tracing::info!(signals = replayed.applied, live = live.len(), "replayed the signal journal");
    }
    let listener = TcpListener::bind(args.listen).await.map_err(|source| Error::Listen {
        flag: "listen",
        addr: args.listen,
        source,
    })?;
    let addr = listener.local_addr().map_or_else(|_| args.listen.to_string(), |a| a.to_string());
    let port = listener.local_addr().map_or(args.listen.port(), |a| a.port());
    let fleet = match &args.live.live {
        Some(live) => {
            let options = crate::fleet::Options {
                servers: crate::fleet::parse_servers(live)?,
                creds: args.live.live_creds.clone(),
                tls_ca: args.live.live_tls_ca.clone(),
                stream: args.live.live_stream.clone(),
                replica: args.live.replica_id.clone().unwrap_or_else(|| crate::fleet::default_replica_id(port)),
                address: args.live.advertise.clone().unwrap_or_else(|| addr.clone()),
                ack_timeout: args.live.fleet_ack_timeout,
                call_timeout: args.limits.limits().call_timeout,
                copies: usize::from(args.live.live_copies),
                stale_after: args.live.live_stale_after,
                stale_policy: match args.live.live_stale_policy {
                    StalePolicyArg::Serve => crate::fleet::StalePolicy::Serve,
                    StalePolicyArg::Deny => crate::fleet::StalePolicy::Deny,
                },
            };
            let applied = journal.seq().max(store.current().live_seq());
            Some(crate::fleet::Fleet::new(options, &args.state, applied)?)
        }
        None => None,
    };
    let settings = Settings {
        max_clock_skew: args.max_clock_skew.map(|s| chrono::TimeDelta::seconds(i64::from(s))),
        max_unknown_signals: args.max_unknown_signals,
        fleet: fleet.clone(),
    };
    let service = Service::new(store, live, Some(journal), Some(directory_journal), audit, settings);
    service.loaded().await;
    if let Some(fleet) = &fleet {
        fleet.start(service.clone()).await?;
        tracing::info!(replica = fleet.replica(), stream = %fleet.options().stream, servers = %fleet.options().servers.join(","), "sharing live state through NATS JetStream");
        // Calls wait in the listener's backlog meanwhile: none is decided with a live state
        // older than what the stream holds, unless the stream cannot be reached in time.
        if fleet.in_step(args.live.live_start_wait).await {
            tracing::info!(applied = fleet.freshness().applied, "in step with the fleet's stream");
        } else {
            let fresh = fleet.freshness();
            tracing::warn!(
                applied = fresh.applied,
                error = fresh.error.as_deref().unwrap_or(""),
                "not in step with the fleet's stream after --live-start-wait: serving the last live state applied"
            );
        }
    }
    let snap = service.store().current();
    tracing::info!(%addr, revision = %snap.revision(), policies = snap.policies().len(), audit = %service.audit().config().target.describe(), "serving");
    if let Some(tls) = &tls {
        let (served, _) = tls.status();
        tracing::info!(
            identity = %served.identity.as_deref().map(crate::input::printable).unwrap_or_default(),
            not_after = %served.not_after,
            client_auth = served.client_auth,
            "serving TLS"
        );
    }
    match &access {
        Some(access) => {
            if access.has_identities() && args.tls.tls_client_ca.is_none() {
                tracing::warn!(
                    "the access file names identities, which only client certificates give: without --tls-client-ca they never match"
                );
            }
            if tls.is_none() && !args.listen.ip().is_loopback() {
                tracing::warn!("bearer tokens travel in clear text without TLS (set --tls-cert and --tls-key)");
            }
        }
        None if args.admin_token.is_none() => {
            tracing::warn!(
                "AdminService has no token: anyone who can reach {addr} may send signals (set --access or --admin-token)"
            );
        }
        None => {}
    }
    // Ready from here on: the bundle is loaded and the gRPC port bound (calls queue in its
    // backlog until `grpc::serve` takes them).
    if let Some(probes) = &probes {
        probes.serve_from(service.clone());
    }
    // Tests and scripts wait for this line.
    announce("agentca listening on", &addr, args.log_format);

    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<&'static str>(4);
    let _watch = if args.no_watch {
        None
    } else {
        let tx = reload_tx.clone();
        match crate::watch::watch(&dir, move || {
            let _ = tx.try_send("watch");
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the policies folder: reload with SIGHUP or the admin call");
                None
            }
        }
    };
    // Certificates rotate by themselves (cert-manager, SPIRE): their files are always watched.
    let _tls_watch = match &tls {
        Some(tls) => match tls.watch() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the TLS files: reload them with SIGHUP");
                None
            }
        },
        None => None,
    };
    let hup_tx = reload_tx.clone();
    let hup_tls = tls.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        while hup.recv().await.is_some() {
            let _ = hup_tx.try_send("sighup");
            if let Some(tls) = hup_tls.clone() {
                let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
            }
        }
    });
    let reloader = {
        let service = service.clone();
        tokio::spawn(async move {
            while let Some(trigger) = reload_rx.recv().await {
                service.reload(trigger).await;
            }
        })
    };

    let options = grpc::Options {
        max_message_bytes: args.max_message_bytes,
        admin_token: args.admin_token.clone(),
        limits: args.limits.limits(),
        tls: tls.clone(),
        access,
    };
    let grace = Duration::from_millis(args.shutdown_grace_ms);
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let signal = async move {
        shutdown_signal().await;
        if let Some(probes) = &probes {
            probes.stopping();
        }
        let _ = stopping.send(());
    };
    let serving = grpc::serve(listener, service.clone(), options, signal);
    // Calls in flight get `grace` to finish after the signal. One still running then is most
    // likely waiting on an audit write that cannot finish: it is dropped unanswered, so no
    // decision goes out without its record.
    let overdue = async {
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        result = serving => result,
        () = overdue => {
            tracing::error!(grace_ms = args.shutdown_grace_ms, "calls still in flight after the shutdown grace period: stopping without answering them");
            Ok(())
        }
    };
    reloader.abort();
    if let Some(fleet) = &fleet {
        fleet.leave(crate::fleet::Applier::journals(service.as_ref())).await;
    }
    // Make every record durable before exiting, within the grace period again.
    let flushed = tokio::time::timeout(grace, service.audit().flush()).await.is_ok();
    if !flushed {
        report_unwritten(service.audit());
    }
    result?;
    if !flushed {
        // Said in the log by `report_unwritten`.
        return Ok(ExitCode::from(exit::FAILURE));
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Binds the metrics listener and serves the probes on it until the process ends.
/// Locks the state folder itself (no lock file to delete by mistake) for as long as the
/// returned handle is open.
fn lock_state(dir: &std::path::Path) -> Result<std::fs::File, Error> {
    let io = |source| Error::State { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let folder = std::fs::File::open(dir).map_err(io)?;
    match folder.try_lock() {
        Ok(()) => Ok(folder),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::StateInUse(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

async fn start_probes(addr: SocketAddr, grpc: SocketAddr, format: LogFormat) -> Result<Arc<Probes>, Error> {
    if addr == grpc && addr.port() != 0 {
        return Err(Error::MetricsOnGrpcPort(addr));
    }
    let listener =
        TcpListener::bind(addr).await.map_err(|source| Error::Listen { flag: "metrics-listen", addr, source })?;
    let bound = listener.local_addr().map_or_else(|_| addr.to_string(), |a| a.to_string());
    let probes = Probes::new();
    tokio::spawn(crate::metrics::listener::serve(listener, probes.clone(), std::future::pending()));
    // Tests and scripts wait for this line.
    announce("agentca metrics listening on", &bound, format);
    Ok(probes)
}

/// A line that tests and scripts wait for (`agentca listening on ADDR`), whatever the log
/// level: plain text, or in JSON mode an object whose `message` is that line and whose `addr`
/// is the address.
fn announce(what: &str, addr: &str, format: LogFormat) {
    match format {
        LogFormat::Text => errln!("{what} {addr}"),
        LogFormat::Json => {
            let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let line = serde_json::json!({"timestamp": time, "level": "INFO", "message": format!("{what} {addr}"), "addr": addr});
            errln!("{line}");
        }
    }
}

/// Says how many records the audit log could not write before exit, and what that meant for
/// their callers.
fn report_unwritten(audit: &Audit) {
    let stats = audit.stats();
    let error = stats.error.as_deref().unwrap_or("none: the writer is stalled");
    if stats.pending == 0 {
        tracing::error!(%error, "audit log: the last records could not be fsynced before exit");
        return;
    }
    let callers = match audit.config().durability {
        audit::Durability::Buffered => {
            "with --audit-durability buffered their callers were already answered, so these decisions are not in the log"
        }
        audit::Durability::Fsync | audit::Durability::Written => {
            "none of their decisions went out: their callers were left unanswered or denied with audit_unavailable"
        }
    };
    tracing::error!(
        records = stats.pending,
        %error,
        "audit log: {} records could not be written before exit; {callers}",
        stats.pending
    );
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing calls in flight");
}
