//! The tower layer that asks the access rules (`--access`) before a call reaches a service,
//! and runs each call in a log span that names its method, peer and certificate identity.
//! A refused call is counted (by `Access`), logged, and for AdminService written to the audit
//! log as a `refused` record before it is answered.

use std::sync::Arc;
use std::task::{Context, Poll};

use tracing::Instrument;

use super::limits::ConnInfo;
use crate::access::{Access, Granted, Refusal, Role};
use crate::input::printable;
use crate::records::Caller;
use crate::service::Service;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health checks, which probes make without credentials.
    Open,
    /// Any role at all (reflection: it only describes the services).
    AnyRole,
    Role(Role),
}

impl Need {
    fn as_str(self) -> &'static str {
        match self {
            Need::Open => "none",
            Need::AnyRole => "any",
            Need::Role(r) => r.as_str(),
        }
    }
}

/// What a gRPC method needs. A method not known here needs `admin`: a new admin call is
/// closed until it is given a role.
pub fn need_of(path: &str) -> Need {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match (service, method) {
        ("grpc.health.v1.Health", _) => Need::Open,
        ("agentca.v1.DecisionService" | "envoy.service.auth.v3.Authorization", _) => Need::Role(Role::Decide),
        ("agentca.v1.AdminService", "Status" | "ListSignals" | "Fleet") => Need::Role(Role::Read),
        ("agentca.v1.AdminService", "Signal") => Need::Role(Role::Signal),
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => Need::AnyRole,
        _ => Need::Role(Role::Admin),
    }
}

#[derive(Clone)]
pub struct GateLayer {
    access: Option<Arc<Access>>,
    service: Arc<Service>,
    /// Run calls in a span (with TLS or access rules: then a call has an identity to show).
    spans: bool,
    /// Refused admin calls whose `refused` record is being written. The gate runs before the
    /// in-flight limits (a refused call must not take a slot from the kill switch), so this
    /// bounds what a flood of refused calls holds: past it, they wait their turn.
    recording: Arc<tokio::sync::Semaphore>,
}

/// Refused admin calls writing their records at once.
const MAX_REFUSED_RECORDING: usize = 64;

impl GateLayer {
    pub fn new(access: Option<Arc<Access>>, service: Arc<Service>, spans: bool) -> Self {
        let spans = spans || access.is_some();
        let recording = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSED_RECORDING));
        GateLayer { access, service, spans, recording }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    layer: GateLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !self.layer.spans {
            return Box::pin(inner.call(request));
        }
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let identity = conn.as_ref().and_then(|c| c.identity.clone());
        let peer = conn.as_ref().and_then(|c| c.peer.clone());
        // Borrowed, not copied: a call that is let through costs no allocation here.
        let path = request.uri().path();
        let span = tracing::info_span!(
            "call",
            method = %path,
            peer = tracing::field::Empty,
            identity = tracing::field::Empty,
        );
        if let Some(p) = &peer {
            span.record("peer", tracing::field::display(p));
        }
        if let Some(id) = &identity {
            span.record("identity", tracing::field::display(printable(id)));
        }
        let need = need_of(path);
        let (Some(access), Need::Role(_) | Need::AnyRole) = (&self.layer.access, need) else {
            return Box::pin(async move { inner.call(request).await }.instrument(span));
        };
        let role = match need {
            Need::Role(r) => Some(r),
            Need::Open | Need::AnyRole => None,
        };
        let authorization = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        match access.check(identity.as_deref(), authorization, role) {
            Ok(granted) => {
                request.extensions_mut().insert(granted);
                Box::pin(async move { inner.call(request).await }.instrument(span))
            }
            Err(refusal) => {
                let started = std::time::Instant::now();
                let method = path.to_string();
                let service = self.layer.service.clone();
                let recording = self.layer.recording.clone();
                service.metrics().refused(match refusal {
                    Refusal::NoCredentials => crate::metrics::Refusal::NoCredentials,
                    Refusal::BadToken => crate::metrics::Refusal::BadToken,
                    Refusal::NoRole => crate::metrics::Refusal::NoRole,
                });
                let caller = Caller {
                    peer,
                    identity,
                    token: authorization.and_then(|a| access.token_name(a)).map(str::to_string),
                    via: "grpc",
                    ..Caller::default()
                };
                Box::pin(
                    async move {
                        tracing::warn!(
                            need = need.as_str(),
                            reason = refusal.as_str(),
                            "call refused by the access rules"
                        );
                        if method.starts_with("/agentca.v1.AdminService/") {
                            let _turn = recording.acquire_owned().await;
                            service.refused(&method, need.as_str(), refusal.as_str(), &caller).await;
                        }
                        let status = status(refusal, need);
                        let rpc = crate::metrics::Rpc::of_path(&method);
                        service.metrics().handled(rpc, status.code() as i32, started.elapsed());
                        Ok(status.into_http())
                    }
                    .instrument(span),
                )
            }
        }
    }
}

/// What a refused caller is told: UNAUTHENTICATED without credentials, PERMISSION_DENIED
/// with the wrong ones (an unknown token, or a caller without the role).
fn status(refusal: Refusal, need: Need) -> tonic::Status {
    let needs = match need {
        Need::Role(r) => format!("the `{}` role", r.as_str()),
        Need::Open | Need::AnyRole => "a role".to_string(),
    };
    match refusal {
        Refusal::NoCredentials => tonic::Status::unauthenticated(format!(
            "this call needs {needs}: present a client certificate or `authorization: Bearer <token>`"
        )),
        Refusal::BadToken => tonic::Status::permission_denied("the bearer token is not one the server knows"),
        Refusal::NoRole => {
            tonic::Status::permission_denied(format!("this call needs {needs}, which the caller does not have"))
        }
    }
}

/// The token that let a call through, if any (for its audit record).
pub fn granted_token<T>(request: &tonic::Request<T>) -> Option<String> {
    request.extensions().get::<Granted>().and_then(|g| g.token.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_needs_its_role() {
        for (path, need) in [
            ("/agentca.v1.DecisionService/Evaluate", Need::Role(Role::Decide)),
            ("/agentca.v1.DecisionService/EvaluateBatch", Need::Role(Role::Decide)),
            ("/envoy.service.auth.v3.Authorization/Check", Need::Role(Role::Decide)),
            ("/agentca.v1.AdminService/Status", Need::Role(Role::Read)),
            ("/agentca.v1.AdminService/ListSignals", Need::Role(Role::Read)),
            ("/agentca.v1.AdminService/Fleet", Need::Role(Role::Read)),
            ("/agentca.v1.AdminService/Signal", Need::Role(Role::Signal)),
            ("/agentca.v1.AdminService/Reload", Need::Role(Role::Admin)),
            ("/agentca.v1.AdminService/SomethingNew", Need::Role(Role::Admin)),
            ("/grpc.health.v1.Health/Check", Need::Open),
            ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Need::AnyRole),
            ("/unknown", Need::Role(Role::Admin)),
            ("", Need::Role(Role::Admin)),
        ] {
            assert_eq!(need_of(path), need, "{path}");
        }
    }
}
