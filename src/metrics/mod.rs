//! The metric names and their recording: fixed arrays of atomic counters and lock-free
//! histograms, indexed by closed enums, so that counting a decision is a few relaxed atomic
//! adds (no label allocation, no registry lookup). A scrape samples the gauges and writes the
//! Prometheus text format (prometheus-client's encoder); `listener` serves it over HTTP.

pub mod listener;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::bundle::PolicyState;
use crate::engine::{Decision, ReasonCode, Verdict};
use crate::signals::SignalKind;
use crate::snapshot::{Reloaded, Snapshot};

/// Why a call or a connection was turned away before it was answered (`agentca_refused_total`).
/// To add a reason: a variant, its name in `as_str`, and its place in `ALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A decision call past `--max-in-flight`.
    InFlight,
    /// An admin, health or reflection call past `--max-admin-in-flight`.
    AdminInFlight,
    /// An EvaluateBatch past `--max-batch-items-in-flight`.
    BatchItems,
    /// A call not answered within `--call-timeout-secs`.
    CallTimeout,
    /// A connection past `--max-connections`, closed as soon as it was accepted.
    Connections,
    /// A message larger than `--max-message-bytes`.
    MessageSize,
    /// A TLS handshake that failed (no or an untrusted client certificate, not TLS at all).
    TlsHandshake,
    /// A TLS handshake not done within `--tls-handshake-timeout-secs`.
    TlsHandshakeTimeout,
    /// A call that needs a role, without credentials (`--access`; UNAUTHENTICATED).
    NoCredentials,
    /// A call with a bearer token the access file does not know (PERMISSION_DENIED).
    BadToken,
    /// A known caller without the role the call needs (PERMISSION_DENIED).
    NoRole,
}

impl Refusal {
    pub const ALL: [Refusal; 11] = [
        Refusal::InFlight,
        Refusal::AdminInFlight,
        Refusal::BatchItems,
        Refusal::CallTimeout,
        Refusal::Connections,
        Refusal::MessageSize,
        Refusal::TlsHandshake,
        Refusal::TlsHandshakeTimeout,
        Refusal::NoCredentials,
        Refusal::BadToken,
        Refusal::NoRole,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::InFlight => "in_flight",
            Refusal::AdminInFlight => "admin_in_flight",
            Refusal::BatchItems => "batch_items",
            Refusal::CallTimeout => "call_timeout",
            Refusal::Connections => "connections",
            Refusal::MessageSize => "message_size",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::TlsHandshakeTimeout => "tls_handshake_timeout",
            Refusal::NoCredentials => "no_credentials",
            Refusal::BadToken => "bad_token",
            Refusal::NoRole => "no_role",
        }
    }
}

/// The gRPC methods the server knows, as `(service, method)`: the label space of the RPC
/// metrics. A path outside it is counted as `unknown`, so a caller cannot grow the label set.
const METHODS: [(&str, &str); 15] = [
    ("agentca.v1.DecisionService", "Evaluate"),
    ("agentca.v1.DecisionService", "EvaluateBatch"),
    ("agentca.v1.AdminService", "Status"),
    ("agentca.v1.AdminService", "Reload"),
    ("agentca.v1.AdminService", "Signal"),
    ("agentca.v1.AdminService", "ListSignals"),
    ("envoy.service.auth.v3.Authorization", "Check"),
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo"),
    ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo"),
    ("agentca.v1.AdminService", "ApplyDirectory"),
    ("agentca.v1.AdminService", "ExportDirectory"),
    ("agentca.v1.AdminService", "Fleet"),
    ("unknown", "unknown"),
];

/// One of `METHODS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rpc(usize);

impl Rpc {
    /// The method of a request path `/service/method` (`unknown` for any other path).
    pub fn of_path(path: &str) -> Rpc {
        let found = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .and_then(|(service, method)| METHODS.iter().position(|&(s, m)| s == service && m == method));
        Rpc(found.unwrap_or(METHODS.len() - 1))
    }

    pub fn service(self) -> &'static str {
        METHODS[self.0].0
    }

    pub fn method(self) -> &'static str {
        METHODS[self.0].1
    }
}

/// gRPC status codes by number, as `grpc_code` names them.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The reason codes of DESIGN §5, in the order of their counters.
const CODES: [ReasonCode; 10] = [
    ReasonCode::Policy,
    ReasonCode::NoPermit,
    ReasonCode::PolicyError,
    ReasonCode::UnknownAgent,
    ReasonCode::UnknownResource,
    ReasonCode::AgentDisabled,
    ReasonCode::BlueprintDisabled,
    ReasonCode::SponsorInactive,
    ReasonCode::AuditUnavailable,
    ReasonCode::LiveStateUnavailable,
];

fn code_index(code: ReasonCode) -> usize {
    match code {
        ReasonCode::Policy => 0,
        ReasonCode::NoPermit => 1,
        ReasonCode::PolicyError => 2,
        ReasonCode::UnknownAgent => 3,
        ReasonCode::UnknownResource => 4,
        ReasonCode::AgentDisabled => 5,
        ReasonCode::BlueprintDisabled => 6,
        ReasonCode::SponsorInactive => 7,
        ReasonCode::AuditUnavailable => 8,
        ReasonCode::LiveStateUnavailable => 9,
    }
}

const RELOAD_OUTCOMES: [&str; 3] = ["swapped", "unchanged", "failed"];

/// Histogram bucket bounds, in microseconds: 5 µs to 10 s.
const BOUNDS_US: [u64; 20] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// A histogram of durations kept in microseconds: one add to a bucket, the sum and the count,
/// each relaxed (a scrape may see a count one ahead of its buckets, never a torn value).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        let i = BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe(&self, took: Duration) {
        self.observe_us(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn encode(&self, encoder: &mut MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = BOUNDS_US
            .iter()
            .map(|&b| b as f64 / 1e6)
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Counters and a histogram of one RPC method.
#[derive(Debug, Default)]
struct RpcStats {
    seconds: Histogram,
    handled: [AtomicU64; GRPC_CODES.len()],
}

/// Decisions by determining policy: the enforced policies of the served bundle, and only those,
/// so the label set follows the bundle across reloads.
#[derive(Debug, Default)]
struct PolicyCounts {
    revision: Option<Arc<str>>,
    counts: HashMap<Arc<str>, AtomicU64>,
}

/// Every metric the server records. One per service; cheap to share.
#[derive(Debug, Default)]
pub struct Metrics {
    /// By verdict (allow, deny) and the code of the first reason.
    decisions: [[AtomicU64; CODES.len()]; 2],
    policies: RwLock<PolicyCounts>,
    decision_seconds: Histogram,
    invalid_requests: AtomicU64,
    rpcs: [RpcStats; METHODS.len()],
    in_flight: AtomicI64,
    refused: [AtomicU64; Refusal::ALL.len()],
    reloads: [AtomicU64; RELOAD_OUTCOMES.len()],
    signals: [AtomicU64; SignalKind::ALL.len()],
    audit_write_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Counts an answered decision and the policies that determined it.
    pub fn decided(&self, decision: &Decision) {
        let verdict = usize::from(decision.decision == Verdict::Deny);
        let code = decision.reasons.first().map_or(ReasonCode::NoPermit, |r| r.code);
        self.decisions[verdict][code_index(code)].fetch_add(1, Ordering::Relaxed);
        let mut determining = decision.reasons.iter().filter(|r| r.code == ReasonCode::Policy).peekable();
        if determining.peek().is_none() {
            return;
        }
        let Ok(policies) = self.policies.read() else { return };
        for reason in determining {
            // A policy a reload has just removed is no longer counted (nor exposed).
            if let Some(n) = reason.policy.as_ref().and_then(|p| policies.counts.get(p)) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// How long the engine took to decide (the decision's `eval_us`).
    pub fn evaluated(&self, eval_us: u64) {
        self.decision_seconds.observe_us(eval_us);
    }

    /// A request (or batch item) refused as malformed before any decision.
    pub fn invalid_request(&self) {
        self.invalid_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The served bundle is `snap`: its enforced policies become the `policy` label set, and
    /// those it shares with the last keep their counts.
    pub fn serving(&self, snap: &Snapshot) {
        let Ok(mut policies) = self.policies.write() else { return };
        if policies.revision.as_ref() == Some(snap.revision()) {
            return;
        }
        let mut old = std::mem::take(&mut policies.counts);
        policies.counts = snap
            .policies()
            .iter()
            .filter(|p| p.state == PolicyState::On)
            .map(|p| {
                let n = old.remove(&p.id).map_or(0, |n| n.into_inner());
                (p.id.clone(), AtomicU64::new(n))
            })
            .collect();
        policies.revision = Some(snap.revision().clone());
    }

    pub fn reloaded(&self, result: &Reloaded) {
        let i = match result {
            Reloaded::Swapped { .. } => 0,
            Reloaded::Unchanged(_) => 1,
            Reloaded::Failed { .. } => 2,
        };
        self.reloads[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn signalled(&self, kind: SignalKind) {
        if let Some(i) = SignalKind::ALL.iter().position(|&k| k == kind) {
            self.signals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Marks a call in flight until the guard drops.
    pub fn call(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A call answered with the gRPC status `code` after `took`.
    pub fn handled(&self, rpc: Rpc, code: i32, took: Duration) {
        let stats = &self.rpcs[rpc.0];
        stats.seconds.observe(took);
        let code = usize::try_from(code).ok().filter(|&c| c < GRPC_CODES.len()).unwrap_or(2);
        stats.handled[code].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, why: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|&r| r == why) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One write (and fsync) of the audit writer took `took`.
    pub fn audit_wrote(&self, took: Duration) {
        self.audit_write_seconds.observe(took);
    }

    /// The metrics in the Prometheus text format (version 0.0.4), with the gauges of `sample`.
    pub fn render(self: &Arc<Self>, sample: Sample) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape { metrics: self.clone(), sample }));
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail; a metric that could not be written is left out.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
        text
    }

    #[cfg(test)]
    fn decisions(&self, verdict: Verdict, code: ReasonCode) -> u64 {
        self.decisions[usize::from(verdict == Verdict::Deny)][code_index(code)].load(Ordering::Relaxed)
    }
}

/// A call in flight (`agentca_in_flight`), until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a scrape reads from the running service rather than from counters.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The served revision (None before a bundle is loaded).
    pub revision: Option<Arc<str>>,
    /// Seconds since the served bundle became stale (reloads failing), 0 when it is not.
    pub stale_seconds: u64,
    pub live_signals: u64,
    /// Records accepted by the audit log and not yet written.
    pub audit_pending: u64,
    /// Records written to the audit log.
    pub audit_written: u64,
    /// Audit writes that failed (each is retried until it lands).
    pub audit_errors: u64,
    /// In a fleet (`--live`): its size and agreement, and this replica's place in its stream.
    pub fleet: Option<FleetSample>,
}

/// What a fleet's replica shows (`--live`).
#[derive(Debug, Clone, Default)]
pub struct FleetSample {
    /// Replicas heard from in the last few seconds, this one included.
    pub replicas: u64,
    /// Changes in the stream this replica has not applied yet.
    pub lag: u64,
    /// 1 if some replica serves another bundle revision than the majority.
    pub revision_disagreement: bool,
    /// Seconds since the live state was last known in step with the stream (0 while it is;
    /// since the start if it never was).
    pub stale_seconds: u64,
    /// Connected and caught up.
    pub healthy: bool,
}

#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    sample: Sample,
}

/// A value written as a counter or a gauge.
struct Value(MetricType, u64);

impl Value {
    fn write(&self, encoder: &mut MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            MetricType::Counter => encoder.encode_counter::<NoLabelSet, _, u64>(&self.1, None),
            _ => encoder.encode_gauge(&(self.1 as i64)),
        }
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Writes one metric family: its descriptor, then each labelled value.
fn family<'a, L: prometheus_client::encoding::EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let mut row = metric.encode_family(&labels)?;
        Value(kind, value).write(&mut row)?;
    }
    Ok(())
}

fn single(encoder: &mut DescriptorEncoder, name: &str, help: &str, kind: MetricType, value: u64) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    Value(kind, value).write(&mut metric)
}

fn histogram(encoder: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    h.encode(&mut metric)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let m = &self.metrics;
        let s = &self.sample;
        let decisions = (0..2).flat_map(|v| {
            let verdict = if v == 0 { "allow" } else { "deny" };
            // An allow has only permits for reasons.
            let codes = if v == 0 { &CODES[..1] } else { &CODES[..] };
            codes
                .iter()
                .map(move |&c| ([("decision", verdict), ("code", c.as_str())], load(&m.decisions[v][code_index(c)])))
        });
        family(
            &mut e,
            "agentca_decisions",
            "Decisions answered, by verdict and the code of the first reason.",
            Counter,
            decisions,
        )?;
        {
            let policies = m.policies.read().map_err(|_| std::fmt::Error)?;
            let mut rows: Vec<(&Arc<str>, u64)> = policies.counts.iter().map(|(p, n)| (p, load(n))).collect();
            rows.sort_unstable();
            family(
                &mut e,
                "agentca_policy_decisions",
                "Decisions a policy determined (an allowing permit or a denying forbid), for the enforced policies of the served bundle.",
                Counter,
                rows.into_iter().map(|(p, n)| ([("policy", p.as_ref())], n)),
            )?;
        }
        histogram(
            &mut e,
            "agentca_decision_seconds",
            "Time the engine took to decide one request (the decision's eval_us).",
            &m.decision_seconds,
        )?;
        single(
            &mut e,
            "agentca_invalid_requests",
            "Requests (and batch items) refused as malformed, before any decision.",
            Counter,
            load(&m.invalid_requests),
        )?;
        {
            let mut metric = e.encode_descriptor(
                "agentca_rpc_seconds",
                "Time from a call's arrival to its answer, by method.",
                None,
                MetricType::Histogram,
            )?;
            for (i, stats) in m.rpcs.iter().enumerate().filter(|(_, s)| s.seconds.count() > 0) {
                let labels = [("method", METHODS[i].1), ("service", METHODS[i].0)];
                stats.seconds.encode(&mut metric.encode_family(&labels)?)?;
            }
        }
        let handled = m.rpcs.iter().enumerate().flat_map(|(i, stats)| {
            stats.handled.iter().enumerate().filter(|(_, n)| load(n) > 0).map(move |(c, n)| {
                ([("grpc_service", METHODS[i].0), ("grpc_method", METHODS[i].1), ("grpc_code", GRPC_CODES[c])], load(n))
            })
        });
        family(
            &mut e,
            "grpc_server_handled",
            "Calls answered, by service, method and gRPC status code.",
            Counter,
            handled,
        )?;
        single(
            &mut e,
            "agentca_in_flight",
            "gRPC calls in flight.",
            Gauge,
            u64::try_from(m.in_flight.load(Ordering::Relaxed)).unwrap_or(0),
        )?;
        let refused = Refusal::ALL.iter().zip(&m.refused).map(|(r, n)| ([("reason", r.as_str())], load(n)));
        family(
            &mut e,
            "agentca_refused",
            "Calls and connections turned away before an answer, by reason.",
            Counter,
            refused,
        )?;
        let reloads = RELOAD_OUTCOMES.iter().zip(&m.reloads).map(|(o, n)| ([("outcome", *o)], load(n)));
        family(&mut e, "agentca_reloads", "Bundle reloads, by outcome.", Counter, reloads)?;
        family(
            &mut e,
            "agentca_bundle_info",
            "The served bundle's revision (value 1).",
            Gauge,
            s.revision.iter().map(|r| ([("revision", r.as_ref())], 1)),
        )?;
        single(
            &mut e,
            "agentca_bundle_stale_seconds",
            "Seconds since reloads started failing (the served bundle is stale); 0 when the last reload succeeded.",
            Gauge,
            s.stale_seconds,
        )?;
        let signals = SignalKind::ALL.iter().zip(&m.signals).map(|(k, n)| ([("kind", k.as_str())], load(n)));
        family(&mut e, "agentca_signals", "Live signals taken (journaled and applied), by kind.", Counter, signals)?;
        single(&mut e, "agentca_live_signals", "Live values set by signals now.", Gauge, s.live_signals)?;
        if let Some(f) = &s.fleet {
            single(
                &mut e,
                "agentca_fleet_replicas",
                "Replicas of the fleet heard from, this one included.",
                Gauge,
                f.replicas,
            )?;
            single(
                &mut e,
                "agentca_live_lag",
                "Changes in the fleet's stream this replica has not applied yet.",
                Gauge,
                f.lag,
            )?;
            single(
                &mut e,
                "agentca_bundle_revision_disagreement",
                "1 if a replica of the fleet serves another bundle revision than most.",
                Gauge,
                u64::from(f.revision_disagreement),
            )?;
            single(
                &mut e,
                "agentca_live_stale_seconds",
                "Seconds since the live state was last in step with the fleet's stream (0 while it is).",
                Gauge,
                f.stale_seconds,
            )?;
            single(
                &mut e,
                "agentca_live_healthy",
                "1 while connected to the fleet's stream and caught up.",
                Gauge,
                u64::from(f.healthy),
            )?;
        }
        single(
            &mut e,
            "agentca_audit_queue_depth",
            "Audit records accepted and not yet written.",
            Gauge,
            s.audit_pending,
        )?;
        single(&mut e, "agentca_audit_records", "Audit records written.", Counter, s.audit_written)?;
        histogram(
            &mut e,
            "agentca_audit_write_seconds",
            "Time of one audit write (a group of records) and its fsync.",
            &m.audit_write_seconds,
        )?;
        single(
            &mut e,
            "agentca_audit_errors",
            "Audit writes that failed (each is retried until it lands).",
            Counter,
            s.audit_errors,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
