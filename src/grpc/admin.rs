//! `agentca.v1.AdminService`: status, reload, live signals.

use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use tonic::{Request, Response, Status};

use crate::access::Access;
use crate::directory::Change as DirectoryChange;
use crate::service::{DirectoryFailure, Service, SignalFailure};
use crate::signals::{Change, Field, Mark, Signal};
use crate::snapshot::Reloaded;
use crate::tls::Tls;

use super::limits::Shed;
use super::pb;

pub struct Admin {
    service: Arc<Service>,
    tls: Option<Arc<Tls>>,
    access: Option<Arc<Access>>,
    shed: Arc<Shed>,
}

impl Admin {
    pub fn new(service: Arc<Service>, tls: Option<Arc<Tls>>, access: Option<Arc<Access>>, shed: Arc<Shed>) -> Self {
        Admin { service, tls, access, shed }
    }

    fn tls_status(&self) -> Option<pb::TlsStatus> {
        let tls = self.tls.as_ref()?;
        let (served, failure) = tls.status();
        Some(pb::TlsStatus {
            client_auth: served.client_auth,
            identity: served.identity.unwrap_or_default(),
            not_after: rfc3339(served.not_after),
            fingerprint: served.fingerprint,
            loaded_at: rfc3339(served.loaded_at),
            reloads: tls.reloads(),
            reload_error: failure.as_ref().map(|f| f.error.clone()).unwrap_or_default(),
            reload_error_at: failure.as_ref().map(|f| rfc3339(f.at)).unwrap_or_default(),
            handshakes_failed: self.shed.handshakes_failed.load(std::sync::atomic::Ordering::Relaxed),
            handshakes_timed_out: self.shed.handshakes_timed_out.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn live_status(&self) -> Option<pb::LiveStatus> {
        let fleet = self.service.fleet()?;
        let fresh = fleet.freshness();
        let view = fleet.view(fleet.this(self.service.store().current().revision().to_string()));
        let options = fleet.options();
        Some(pb::LiveStatus {
            replica: options.replica.clone(),
            stream: options.stream.clone(),
            stream_seq: fresh.stream_seq,
            applied_seq: fresh.applied,
            connected: fresh.connected,
            healthy: fresh.healthy,
            synced_at: fresh.synced_at.map(rfc3339).unwrap_or_default(),
            stale_seconds: fresh.stale_seconds.map_or(-1, |s| s as i64),
            error: fresh.error.unwrap_or_default(),
            stale_after_seconds: options.stale_after.map_or(0, |d| d.as_secs()),
            stale_policy: format!("{:?}", options.stale_policy).to_lowercase(),
            denying: fleet.denying(),
            replicas: view.replicas.len() as u32,
            revision_disagreement: view.replicas.iter().any(|r| r.other_revision),
        })
    }

    fn access_status(&self) -> Option<pb::AccessStatus> {
        let access = self.access.as_ref()?;
        let [(_, no_credentials), (_, bad_token), (_, no_role)] = access.refused();
        Some(pb::AccessStatus {
            file: access.path().display().to_string(),
            refused_no_credentials: no_credentials,
            refused_bad_token: bad_token,
            refused_no_role: no_role,
        })
    }
}

/// Checks `authorization: Bearer <token>` when an admin token is configured.
pub fn authorize(token: Option<String>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let Some(token) = &token else { return Ok(request) };
        let given = request.metadata().get("authorization").map(|v| v.as_bytes());
        match given.and_then(crate::access::bearer) {
            Some(t) if constant_time_eq(t, token.as_bytes()) => Ok(request),
            _ => Err(Status::unauthenticated("AdminService needs `authorization: Bearer <admin token>`")),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn rfc3339(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for Admin {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let snap = self.service.store().current();
        let counts = snap.counts();
        let failure = self.service.store().last_failure();
        let audit = self.service.audit();
        let stats = audit.stats();
        let config = audit.config();
        Ok(Response::new(pb::StatusResponse {
            revision: snap.revision().to_string(),
            loaded_at: rfc3339(snap.loaded_at()),
            load_ms: snap.load_ms(),
            policies_dir: self.service.store().dir().display().to_string(),
            policies: counts.policies as u64,
            agents: counts.agents as u64,
            last_reload_error: failure.as_ref().map(|f| f.error.clone()).unwrap_or_default(),
            last_reload_error_at: failure.as_ref().map(|f| rfc3339(f.at)).unwrap_or_default(),
            stale_since: failure.as_ref().map(|f| rfc3339(f.stale_since)).unwrap_or_default(),
            stale_seconds: failure.as_ref().map_or(0, |f| (Utc::now() - f.stale_since).num_seconds().max(0) as u64),
            audit: Some(pb::AuditStatus {
                sink: config.target.describe(),
                durability: format!("{:?}", config.durability).to_lowercase(),
                on_full: format!("{:?}", config.on_full).to_lowercase(),
                written: stats.written,
                waited: stats.waited,
                refused: stats.refused,
                error: stats.error.unwrap_or_default(),
                seq: stats.seq,
                notice: stats.notice.unwrap_or_default(),
            }),
            live_signals: self.service.live().len() as u64,
            unknown_target_signals: self.service.unknown_signals(&snap) as u64,
            max_unknown_target_signals: self.service.settings().max_unknown_signals as u64,
            signals_error: self.service.journal_error().unwrap_or_default(),
            tls: self.tls_status(),
            access: self.access_status(),
            live_directory_seq: snap.live_seq(),
            live_directory_objects: snap.live_objects() as u64,
            live_directory_error: self.service.directory_error().unwrap_or_default(),
            live: self.live_status(),
        }))
    }

    async fn fleet(&self, _: Request<pb::FleetRequest>) -> Result<Response<pb::FleetResponse>, Status> {
        let fleet = self.service.fleet().ok_or_else(|| {
            Status::failed_precondition("this server is not in a fleet: it was started without --live")
        })?;
        let view = fleet.view(fleet.this(self.service.store().current().revision().to_string()));
        let replicas = view
            .replicas
            .into_iter()
            .map(|r| pb::Replica {
                id: r.heartbeat.id,
                address: r.heartbeat.address,
                revision: r.heartbeat.revision,
                applied_seq: r.heartbeat.applied,
                started_at: rfc3339(r.heartbeat.started_at),
                healthy: r.heartbeat.healthy,
                error: r.heartbeat.error.unwrap_or_default(),
                lag: r.lag,
                other_revision: r.other_revision,
                seen_ms_ago: r.seen_ms_ago,
                this: r.this,
            })
            .collect();
        Ok(Response::new(pb::FleetResponse {
            replicas,
            stream_seq: view.stream_seq,
            majority_revision: view.majority_revision,
        }))
    }

    async fn apply_directory(
        &self,
        request: Request<pb::DirectoryChange>,
    ) -> Result<Response<pb::DirectoryChangeResponse>, Status> {
        let caller = super::caller(&request, "grpc");
        let r = request.into_inner();
        crate::signals::check_text("directory", &r.reason, &r.actor)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Reading a large change is work: off the async threads.
        let parsed = tokio::task::spawn_blocking(move || DirectoryChange::from_json_str(&r.json))
            .await
            .map_err(|_| Status::internal("reading the change failed"))?;
        let change = parsed.map_err(|errors| {
            Status::invalid_argument(format!("field `json`: {}", crate::directory::listed(&errors, "\n")))
        })?;
        match self.service.apply_directory(change, r.actor, r.reason, caller).await {
            Ok(done) => Ok(Response::new(pb::DirectoryChangeResponse {
                seq: done.seq,
                summary: done.summary,
                warnings: done.warnings,
                revision: done.revision.to_string(),
                unconfirmed_replicas: done.unconfirmed,
            })),
            Err(e @ DirectoryFailure::Refused(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ DirectoryFailure::NoJournal) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ DirectoryFailure::Unknown(_)) => Err(Status::deadline_exceeded(e.to_string())),
            Err(
                e @ (DirectoryFailure::NotDurable(_) | DirectoryFailure::Aborted | DirectoryFailure::Unavailable(_)),
            ) => Err(Status::unavailable(e.to_string())),
        }
    }

    type ExportDirectoryStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::DirectoryChunk, Status>> + Send + 'static>>;

    async fn export_directory(
        &self,
        _: Request<pb::ExportDirectoryRequest>,
    ) -> Result<Response<Self::ExportDirectoryStream>, Status> {
        let snap = self.service.store().current();
        let (revision, live_seq) = (snap.revision().to_string(), snap.live_seq());
        let text = tokio::task::spawn_blocking(move || snap.directory().to_json())
            .await
            .map_err(|_| Status::internal("writing the directory failed"))?
            .map_err(|e| Status::internal(format!("writing the directory failed: {e}")))?;
        let mut chunks: Vec<Result<pb::DirectoryChunk, Status>> = text
            .as_bytes()
            .chunks(EXPORT_CHUNK)
            .map(|piece| Ok(pb::DirectoryChunk { data: piece.to_vec(), revision: String::new(), live_seq: 0 }))
            .collect();
        if let Some(Ok(first)) = chunks.first_mut() {
            first.revision = revision;
            first.live_seq = live_seq;
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn reload(&self, request: Request<pb::ReloadRequest>) -> Result<Response<pb::ReloadResponse>, Status> {
        let caller = super::caller(&request, "grpc");
        let response = match self.service.reload_for("admin", Some(caller)).await {
            Reloaded::Swapped { from, to } => pb::ReloadResponse {
                outcome: "swapped".into(),
                revision: to.to_string(),
                previous_revision: from.to_string(),
                error: String::new(),
            },
            Reloaded::Unchanged(r) => pb::ReloadResponse {
                outcome: "unchanged".into(),
                revision: r.to_string(),
                previous_revision: r.to_string(),
                error: String::new(),
            },
            Reloaded::Failed { kept, error } => pb::ReloadResponse {
                outcome: "failed".into(),
                revision: kept.to_string(),
                previous_revision: kept.to_string(),
                error: error.to_string(),
            },
        };
        Ok(Response::new(response))
    }

    async fn signal(&self, request: Request<pb::SignalRequest>) -> Result<Response<pb::SignalResponse>, Status> {
        let caller = super::caller(&request, "grpc");
        let r = request.into_inner();
        if r.kind == "clear" {
            if !r.risk.is_empty() {
                return Err(Status::invalid_argument("field `risk`: applies only to set_risk, not clear"));
            }
            let field = match r.field.as_str() {
                "" => None,
                f => Some(f.parse::<Field>().map_err(|e| Status::invalid_argument(format!("field `field`: {e}")))?),
            };
            let done = self.service.clear(&r.target, field, &r.reason, &r.actor, caller).await.map_err(failure)?;
            // INVARIANT: `clear` answers at least one signal or an error.
            let last = done.last().ok_or_else(|| Status::internal("nothing was cleared"))?;
            return Ok(Response::new(pb::SignalResponse {
                seq: last.seq,
                signal: Some(signalled(&last.signal, last.unknown_target)),
                unknown_target: last.unknown_target,
                unconfirmed_replicas: last.unconfirmed.clone(),
            }));
        }
        if !r.field.is_empty() {
            return Err(Status::invalid_argument(format!(
                "field `field`: applies only to clear, not {}",
                crate::input::printable(&r.kind)
            )));
        }
        let signal = Signal::new(&r.kind, &r.target, &r.risk, &r.reason, &r.actor)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        match self.service.signal(signal, caller).await {
            Ok(done) => Ok(Response::new(pb::SignalResponse {
                seq: done.seq,
                signal: Some(signalled(&done.signal, done.unknown_target)),
                unknown_target: done.unknown_target,
                unconfirmed_replicas: done.unconfirmed,
            })),
            Err(e) => Err(failure(e)),
        }
    }

    async fn list_signals(
        &self,
        request: Request<pb::ListSignalsRequest>,
    ) -> Result<Response<pb::ListSignalsResponse>, Status> {
        let r = request.into_inner();
        let size = match r.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        // The token is the last (field, target) of the previous page: entries are sorted by it.
        let after = match r.page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .split_once('/')
                    .and_then(|(f, t)| Some((f.parse::<Field>().ok()?, t)))
                    .ok_or_else(|| Status::invalid_argument("field `page_token`: not a token this server gave"))?,
            ),
        };
        let snap = self.service.store().current();
        let live = self.service.live();
        let total = live.len() as u64;
        let (page, more) = live.page(after, size);
        let next_page_token = match page.last() {
            Some(last) if more => format!("{}/{}", last.change.field().as_str(), last.target),
            _ => String::new(),
        };
        let signals = page
            .iter()
            .map(|l| {
                let unknown = self.service.unknown_target(&snap, l.change.field(), &l.target);
                live_signal(l.change, &l.target, &l.mark, unknown)
            })
            .collect();
        Ok(Response::new(pb::ListSignalsResponse { signals, next_page_token, total }))
    }
}

/// The size of one ExportDirectory chunk: well under the default 4 MiB message limit.
const EXPORT_CHUNK: usize = 1 << 20;

/// Most signals in one ListSignals page: at the longest reason, actor and target a page
/// stays well under the default 4 MiB message limit.
const MAX_PAGE: usize = 500;

fn failure(e: SignalFailure) -> Status {
    match e {
        SignalFailure::NoJournal => Status::failed_precondition(e.to_string()),
        SignalFailure::Invalid(e) => Status::invalid_argument(e.to_string()),
        SignalFailure::TooManyUnknown { .. } => Status::resource_exhausted(e.to_string()),
        SignalFailure::NothingToClear(_) => Status::not_found(e.to_string()),
        SignalFailure::Unknown(_) => Status::deadline_exceeded(e.to_string()),
        SignalFailure::Journal(_) | SignalFailure::Aborted | SignalFailure::Unavailable(_) => {
            Status::unavailable(e.to_string())
        }
    }
}

fn live_signal(change: Change, target: &str, mark: &Mark, unknown_target: bool) -> pb::LiveSignal {
    pb::LiveSignal {
        field: change.field().as_str().into(),
        target: target.to_string(),
        value: change.value().to_string(),
        reason: mark.reason.clone(),
        actor: mark.by.clone(),
        at: rfc3339(mark.at),
        unknown_target,
    }
}

fn signalled(s: &Signal, unknown_target: bool) -> pb::LiveSignal {
    live_signal(s.change(), s.target(), s.mark(), unknown_target)
}
