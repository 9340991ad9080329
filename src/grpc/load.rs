//! A tool (feature `tools`): a load generator for `Evaluate` (N requests in flight over M
//! connections for T seconds), and a no-op DecisionService to measure it against: same proto,
//! same tonic stack, a constant answer, no decision and no audit.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use super::client::{ClientError, Connect, connect, decisions};
use super::pb;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: String,
    pub request: pb::EvaluateRequest,
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Duration,
    /// Requests in this first stretch are sent but not counted.
    pub warmup: Duration,
    /// TLS and the bearer token.
    pub connect: Connect,
}

#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub allows: u64,
    pub denies: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

struct Worker {
    latencies: Vec<u32>,
    errors: u64,
    allows: u64,
    denies: u64,
    first_error: Option<String>,
}

pub async fn run(config: LoadConfig) -> Result<LoadReport, ClientError> {
    let mut channels = Vec::with_capacity(config.connections.max(1));
    for _ in 0..config.connections.max(1) {
        channels.push(connect(&config.target, &config.connect).await?);
    }
    let start = Instant::now();
    let counted_from = start + config.warmup;
    let end = counted_from + config.duration;
    let mut workers = Vec::with_capacity(config.concurrency.max(1));
    for i in 0..config.concurrency.max(1) {
        let mut client = decisions(channels[i % channels.len()].clone(), config.connect.token.as_deref())?;
        let request = config.request.clone();
        workers.push(tokio::spawn(async move {
            let mut w =
                Worker { latencies: Vec::with_capacity(1 << 16), errors: 0, allows: 0, denies: 0, first_error: None };
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = client.evaluate(request.clone()).await;
                let took = sent.elapsed();
                if sent < counted_from {
                    continue;
                }
                match result {
                    Ok(d) => {
                        w.latencies.push(took.as_micros().min(u32::MAX as u128) as u32);
                        if d.get_ref().decision == pb::Verdict::Allow as i32 {
                            w.allows += 1;
                        } else {
                            w.denies += 1;
                        }
                    }
                    Err(e) => {
                        w.errors += 1;
                        w.first_error.get_or_insert_with(|| format!("{}: {}", e.code(), e.message()));
                    }
                }
            }
            w
        }));
    }
    let mut all = Vec::new();
    let mut report = LoadReport::default();
    for w in workers {
        let Ok(w) = w.await else { continue };
        all.extend(w.latencies);
        report.errors += w.errors;
        report.allows += w.allows;
        report.denies += w.denies;
        if report.first_error.is_none() {
            report.first_error = w.first_error;
        }
    }
    all.sort_unstable();
    let pick = |q: f64| all.get(((all.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0) as u64;
    report.requests = all.len() as u64;
    report.seconds = config.duration.as_secs_f64();
    report.per_second = report.requests as f64 / report.seconds.max(f64::EPSILON);
    report.p50_us = pick(0.50);
    report.p90_us = pick(0.90);
    report.p99_us = pick(0.99);
    report.max_us = all.last().copied().unwrap_or(0) as u64;
    Ok(report)
}

/// A DecisionService that answers the same allow to everything.
struct Noop {
    answer: pb::Decision,
}

#[tonic::async_trait]
impl pb::decision_service_server::DecisionService for Noop {
    async fn evaluate(&self, _: Request<pb::EvaluateRequest>) -> Result<Response<pb::Decision>, Status> {
        Ok(Response::new(self.answer.clone()))
    }

    async fn evaluate_batch(
        &self,
        request: Request<pb::EvaluateBatchRequest>,
    ) -> Result<Response<pb::EvaluateBatchResponse>, Status> {
        let results = request
            .into_inner()
            .requests
            .iter()
            .map(|_| pb::BatchItem { result: Some(pb::batch_item::Result::Decision(self.answer.clone())) })
            .collect();
        Ok(Response::new(pb::EvaluateBatchResponse { results }))
    }
}

/// The no-op server stopped on an error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct NoopError(#[from] tonic::transport::Error);

/// Serves the no-op DecisionService until `shutdown`.
pub async fn serve_noop(listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), NoopError> {
    let answer = pb::Decision {
        decision: pb::Verdict::Allow as i32,
        decision_id: "00000000-0000-7000-8000-000000000000".into(),
        reasons: vec![pb::Reason {
            code: "policy".into(),
            policy: "noop".into(),
            effect: "permit".into(),
            reason: "the no-op baseline allows everything".into(),
        }],
        report_only_decision: pb::Verdict::Allow as i32,
        revision: "sha256:noop".into(),
        ..pb::Decision::default()
    };
    // The same accepted-socket options as `serve` (TCP_NODELAY, keepalive), so that the floor
    // and the server differ only in what they do per call.
    let limits = super::limits::Limits::default();
    let incoming = super::limits::incoming(listener, &limits, std::sync::Arc::default());
    tonic::transport::Server::builder()
        .add_service(pb::decision_service_server::DecisionServiceServer::new(Noop { answer }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(NoopError::from)
}
