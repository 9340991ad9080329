//! Envoy `ext_authz` (`envoy.service.auth.v3.Authorization/Check`): a gateway asks inline
//! whether an agent may make this call (`call_api`).
//!
//! The agent comes from the route's `context_extensions.agent`, else the `x-agent-id` header,
//! which the gateway must set from the caller's authenticated identity (and strip from what
//! clients send). The resource comes from `context_extensions.resource` (the route's own
//! configuration), else the request's host matched against the resources' audiences only
//! (`HOST` or `https://HOST`, with and without its port): never from a header a client could
//! set, and a host that merely equals a resource id names no resource. Allow answers OK with `x-agentca-decision-id`
//! added upstream; deny answers 403 with the reasons as JSON; a malformed request answers 400.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpStatusCode};
use envoy_types::ext_authz::v3::{CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder};
use tonic::{Request, Response, Status};

use crate::request::RawRequest;
use crate::service::Service;
use crate::snapshot::Snapshot;

pub const AGENT_HEADER: &str = "x-agent-id";

pub struct Check {
    service: Arc<Service>,
}

pub fn server(service: Arc<Service>, limit: usize) -> AuthorizationServer<Check> {
    AuthorizationServer::new(Check { service }).max_decoding_message_size(limit).max_encoding_message_size(limit)
}

/// Turns Envoy's attributes into our raw request; the host is resolved later, against the
/// snapshot that decides.
pub(crate) fn raw_request(check: &CheckRequest) -> (RawRequest, Option<String>) {
    let attributes = check.attributes.as_ref();
    let http = attributes.and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
    let extensions = attributes.map(|a| &a.context_extensions);
    let header = |name: &str| check.get_client_headers().and_then(|h| h.get(name)).filter(|v| !v.is_empty()).cloned();
    let agent = extensions.and_then(|e| e.get("agent")).cloned().or_else(|| header(AGENT_HEADER));
    let resource = extensions.and_then(|e| e.get("resource")).cloned();
    let host = http.map(|h| h.host.clone()).filter(|h| !h.is_empty());
    let path = http.map(|h| {
        let p = if h.path.is_empty() { "/" } else { &h.path };
        p.split(['?', '#']).next().unwrap_or("/").to_string()
    });
    let raw = RawRequest {
        agent: Some(agent.unwrap_or_default()),
        resource: Some(resource.unwrap_or_default()),
        action: Some("call_api".into()),
        method: http.map(|h| h.method.clone()),
        path,
        client_ip: check.get_client_address().cloned(),
        request_id: header("x-request-id").or_else(|| http.map(|h| h.id.clone()).filter(|id| !id.is_empty())),
        ..RawRequest::default()
    };
    (raw, host)
}

/// Most bytes of a downstream principal kept in the audit record.
const MAX_SUBJECT: usize = 1024;

/// The downstream principal Envoy reports (`attributes.source.principal`: the SAN of the
/// client's certificate, or what the gateway authenticated), cut to `MAX_SUBJECT` bytes.
fn subject(check: &CheckRequest) -> Option<String> {
    let principal = &check.attributes.as_ref()?.source.as_ref()?.principal;
    if principal.is_empty() {
        return None;
    }
    let mut end = principal.len().min(MAX_SUBJECT);
    while !principal.is_char_boundary(end) {
        end -= 1;
    }
    Some(principal[..end].to_string())
}

/// A host names a resource by one of its audiences, bare or as `https://host`. A host that
/// names none stays as `https://host`, an audience no resource has: an unknown resource.
pub(crate) fn resolve_host(snap: &Snapshot, host: &str) -> String {
    let bare =
        host.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h);
    let candidates = [host.to_string(), format!("https://{host}"), bare.to_string(), format!("https://{bare}")];
    for candidate in &candidates {
        if let Some(resource) = snap.resource_by_audience(candidate) {
            return resource.id.to_string();
        }
    }
    let [_, as_audience, ..] = candidates;
    as_audience
}

#[tonic::async_trait]
impl Authorization for Check {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let mut caller = super::caller(&request, "envoy");
        caller.subject = subject(request.get_ref());
        let (raw, host) = raw_request(request.get_ref());
        let mut response = CheckResponse::new();
        let resolve = |snap: &Snapshot, raw: &mut RawRequest| {
            if raw.resource.as_deref().is_none_or(str::is_empty)
                && let Some(host) = &host
            {
                raw.resource = Some(resolve_host(snap, host));
            }
        };
        match self.service.decide_with(raw, &caller, resolve).await {
            Ok(d) if d.is_allow() => {
                let mut ok = OkHttpResponseBuilder::new();
                ok.add_header("x-agentca-decision-id", d.decision_id.clone(), None, false);
                response.set_status(Status::ok("allowed")).set_http_response(ok.build());
            }
            Ok(d) => {
                let mut denied = DeniedHttpResponseBuilder::new();
                denied
                    .set_http_status(HttpStatusCode::Forbidden)
                    .add_header("content-type", "application/json", None, false)
                    .add_header("x-agentca-decision-id", d.decision_id.clone(), None, false)
                    .set_body(
                        serde_json::json!({"decision": "deny", "decision_id": d.decision_id, "reasons": d.reasons})
                            .to_string(),
                    );
                response.set_status(Status::permission_denied("denied")).set_http_response(denied.build());
            }
            Err(e) => {
                let mut denied = DeniedHttpResponseBuilder::new();
                denied
                    .set_http_status(HttpStatusCode::BadRequest)
                    .add_header("content-type", "application/json", None, false)
                    .set_body(serde_json::json!({"error": e.to_string()}).to_string());
                response.set_status(Status::permission_denied(e.to_string())).set_http_response(denied.build());
            }
        }
        Ok(Response::new(response))
    }
}
