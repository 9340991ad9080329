//! Envoy's ext_authz Check, called as Envoy calls it: the same decisions as `call_api`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use common::Server;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

fn check(agent: Option<&str>, host: &str, method: &str, path: &str, extensions: &[(&str, &str)]) -> CheckRequest {
    let mut headers = HashMap::new();
    if let Some(a) = agent {
        headers.insert("x-agent-id".to_string(), a.to_string());
    }
    headers.insert("x-request-id".to_string(), "envoy-req-1".to_string());
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.1.2.3".into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: host.into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: extensions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_allows_and_denies_like_call_api() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let server =
        Server::start(&["--audit", audit.to_str().unwrap(), "--state", dir.path().join("state").to_str().unwrap()]);
    let mut client = AuthorizationClient::new(server.channel().await);

    // The host names the resource by its audience.
    let ok = client
        .check(check(Some("ag-support-01"), "tickets.contoso.com", "GET", "/v1/tickets/42?x=1", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.status.as_ref().unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok_http)) = ok.http_response else { panic!("{ok:?}") };
    assert!(ok_http.headers.iter().any(|h| h.header.as_ref().unwrap().key == "x-agentca-decision-id"));

    // A write is not permitted (no_permit); the body carries the reasons.
    let denied = client
        .check(check(Some("ag-support-01"), "tickets.contoso.com", "POST", "/v1/tickets", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.status.as_ref().unwrap().code, tonic::Code::PermissionDenied as i32);
    let Some(HttpResponse::DeniedResponse(d)) = denied.http_response else { panic!("{denied:?}") };
    assert_eq!(d.status.unwrap().code, 403);
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(body["reasons"][0]["code"], "no_permit");

    // The route can name agent and resource through context_extensions.
    let ext = client
        .check(check(None, "unknown.example", "GET", "/", &[("agent", "ag-mail-02"), ("resource", "graph")]))
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::DeniedResponse(d)) = ext.http_response else { panic!("{ext:?}") };
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(body["reasons"][0]["policy"], "block-high-risk-agents");

    // A host that is only a resource's id names nothing, and no client header names one.
    for host in ["tickets", "tickets:443"] {
        let mut request = check(Some("ag-support-01"), host, "GET", "/v1/tickets/42", &[]);
        let http = request.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap();
        http.headers.insert("x-agentca-resource".into(), "tickets".into());
        let by_id = client.check(request).await.unwrap().into_inner();
        let Some(HttpResponse::DeniedResponse(d)) = by_id.http_response else { panic!("{host}: {by_id:?}") };
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body["reasons"][0]["code"], "unknown_resource", "{host}: {body}");
    }
    // The audience with its scheme, or with a port, does.
    for host in ["https://tickets.contoso.com", "tickets.contoso.com:443"] {
        let ok = client.check(check(Some("ag-support-01"), host, "GET", "/v1/tickets/42", &[])).await.unwrap();
        assert_eq!(ok.into_inner().status.unwrap().code, 0, "{host}");
    }

    // No agent at all is a bad request, not a decision.
    let bad = client.check(check(None, "tickets.contoso.com", "GET", "/", &[])).await.unwrap().into_inner();
    let Some(HttpResponse::DeniedResponse(d)) = bad.http_response else { panic!("{bad:?}") };
    assert_eq!(d.status.unwrap().code, 400);
    assert!(d.body.contains("field `agent`"), "{}", d.body);

    let log = std::fs::read_to_string(&audit).unwrap();
    let checks: Vec<&str> = log.lines().filter(|l| l.contains("\"via\":\"envoy\"")).collect();
    assert_eq!(checks.len(), 7);
    assert!(checks[0].contains("\"action\":\"call_api\"") && checks[0].contains("\"path\":\"/v1/tickets/42\""));
    assert!(checks[0].contains("\"request_id\":\"envoy-req-1\""));
}
