//! The metrics listener of a real server (`--metrics-listen`): `/metrics` scraped and parsed
//! as Prometheus text after known calls, `/healthz` and `/readyz`, hostile HTTP, and JSON logs
//! (`--log-format json`) that carry decision ids and callers and never the admin token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use agentca::grpc::pb;
use common::{Env, Server, is_allow, token_request};
use tonic::metadata::MetadataValue;

const TOKEN: &str = "s3cret-admin-token-9f2b";

/// One HTTP/1.1 exchange on a fresh connection: the status code and the body.
fn http(addr: &str, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn get(addr: &str, path: &str) -> (u16, String) {
    http(addr, format!("GET {path} HTTP/1.1\r\nHost: agentca\r\nConnection: close\r\n\r\n").as_bytes())
}

/// A Prometheus text exposition: each sample's name and labels → its value. Checks the
/// format as it goes: every sample belongs to a family declared by `# TYPE`.
#[derive(Debug)]
struct Scrape(BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut types = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("not a value: {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap())),
                None => (series, BTreeMap::new()),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
                .unwrap_or(name);
            assert!(types.contains_key(family), "a sample without # TYPE: {line}");
            assert!(samples.insert((name.to_string(), labels), value).is_none(), "a sample twice: {line}");
        }
        Scrape(samples)
    }

    /// The value of `name` with exactly `labels` (0 when absent).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.0.get(&(name.to_string(), labels)).copied().unwrap_or(0.0)
    }

    /// The sum of `name` over the samples whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, l), _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, v)| v)
            .sum()
    }
}

/// `a="x",b="y"` (with `\"`, `\\` and `\n` escapes) → a map.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").unwrap();
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().unwrap() {
                (_, '\\') => match chars.next().unwrap().1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

fn scrape(server: &Server) -> Scrape {
    let (status, body) = get(server.metrics_addr.as_ref().unwrap(), "/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(&body)
}

fn admin_request<T>(message: T) -> tonic::Request<T> {
    bearer(TOKEN, message)
}

fn signal(kind: &str, target: &str) -> pb::SignalRequest {
    pb::SignalRequest {
        kind: kind.into(),
        target: target.into(),
        reason: "metrics test".into(),
        actor: "secops@contoso".into(),
        ..Default::default()
    }
}

/// `message` with `authorization: Bearer TOKEN`.
fn bearer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).unwrap());
    request
}

/// `serve` on `env` with `--metrics-listen 127.0.0.1:0`, JSON logs at `log` level, the admin
/// token, and `extra`.
fn start(env: &Env, log: &str, extra: &[&str]) -> Server {
    let (policies, audit, state) = (env.path("policies"), env.path("audit.jsonl"), env.path("state"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentca"));
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--policies", &policies, "--audit", &audit, "--state", &state, "--no-watch"])
        .args(extra)
        .env("AGENTCA_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", log);
    Server::start_command(&mut command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_the_calls_made() {
    let env = Env::new();
    let server = start(&env, "trace", &[]);
    let probes = server.metrics_addr.clone().expect("the metrics listener's address");
    assert_eq!(get(&probes, "/healthz").0, 200);
    assert_eq!(get(&probes, "/readyz").0, 200);
    let before = scrape(&server);
    assert_eq!(before.sum("agentca_decisions_total", &[]), 0.0);

    let mut decisions = server.decisions().await;
    let mut answers = Vec::new();
    let asks = [
        token_request("ag-mail-01", "graph", "Mail.Read"),
        token_request("ag-mail-01", "graph", "Mail.Read"),
        token_request("ag-mail-01", "ledger", "Ledger.Read"),
        token_request("ag-mail-02", "graph", "Mail.Read"),
        token_request("ag-nobody", "graph", "Mail.Read"),
    ];
    for ask in asks {
        answers.push(decisions.evaluate(ask).await.unwrap().into_inner());
    }
    // Bad requests: no decision, INVALID_ARGUMENT.
    for bad in [
        token_request("", "graph", "Mail.Read"),
        pb::EvaluateRequest { client_ip: "10.1.2".into(), ..token_request("ag-mail-01", "graph", "Mail.Read") },
    ] {
        let status = decisions.evaluate(bad).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    // A batch of one good and one bad item: one decision, one invalid request.
    let batch = pb::EvaluateBatchRequest {
        requests: vec![token_request("ag-mail-01", "graph", "Mail.Read"), token_request("", "graph", "Mail.Read")],
    };
    let items = decisions.evaluate_batch(batch).await.unwrap().into_inner().results;
    match &items[0].result {
        Some(pb::batch_item::Result::Decision(d)) => answers.push(d.clone()),
        other => panic!("{other:?}"),
    }
    // Signals: the agent disabled, decided on (a guard), enabled again.
    let mut admin = server.admin().await;
    admin.signal(admin_request(signal("disable_agent", "ag-mail-01"))).await.unwrap();
    answers.push(decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner());
    admin.signal(admin_request(signal("enable_agent", "ag-mail-01"))).await.unwrap();
    // A signal without the token is refused; a reload finds the bundle unchanged.
    let refused = admin.signal(signal("disable_agent", "ag-mail-01")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    admin.reload(admin_request(pb::ReloadRequest {})).await.unwrap();
    let status = admin.status(admin_request(pb::StatusRequest {})).await.unwrap().into_inner();

    let m = scrape(&server);
    // Each decision under its verdict and first reason code, and each determining policy.
    let mut expected: BTreeMap<(&str, String), f64> = BTreeMap::new();
    let mut by_policy: BTreeMap<String, f64> = BTreeMap::new();
    for d in &answers {
        let verdict = if is_allow(d) { "allow" } else { "deny" };
        *expected.entry((verdict, d.reasons[0].code.clone())).or_default() += 1.0;
        for r in d.reasons.iter().filter(|r| r.code == "policy") {
            *by_policy.entry(r.policy.clone()).or_default() += 1.0;
        }
    }
    assert!(expected.len() >= 4, "allow and several kinds of deny: {expected:?}");
    for ((verdict, code), n) in &expected {
        assert_eq!(m.get("agentca_decisions_total", &[("decision", verdict), ("code", code)]), *n, "{verdict} {code}");
    }
    assert_eq!(m.sum("agentca_decisions_total", &[]), answers.len() as f64);
    for (policy, n) in &by_policy {
        assert_eq!(m.get("agentca_policy_decisions_total", &[("policy", policy)]), *n, "{policy}");
    }
    assert_eq!(m.sum("agentca_policy_decisions_total", &[]), by_policy.values().sum::<f64>());
    assert_eq!(m.get("agentca_decision_seconds_count", &[]), answers.len() as f64);
    assert_eq!(m.get("agentca_decision_seconds_bucket", &[("le", "+Inf")]), answers.len() as f64);
    assert_eq!(m.get("agentca_invalid_requests_total", &[]), 3.0);

    let handled = |service: &str, method: &str, code: &str| {
        m.get("grpc_server_handled_total", &[("grpc_service", service), ("grpc_method", method), ("grpc_code", code)])
    };
    let (decision, admin_service) = ("agentca.v1.DecisionService", "agentca.v1.AdminService");
    assert_eq!(handled(decision, "Evaluate", "OK"), 6.0);
    assert_eq!(handled(decision, "Evaluate", "InvalidArgument"), 2.0);
    assert_eq!(handled(decision, "EvaluateBatch", "OK"), 1.0);
    assert_eq!(handled(admin_service, "Signal", "OK"), 2.0);
    assert_eq!(handled(admin_service, "Signal", "Unauthenticated"), 1.0);
    assert_eq!(handled(admin_service, "Reload", "OK"), 1.0);
    // Status was answered before the scrape.
    assert_eq!(handled(admin_service, "Status", "OK"), 1.0);
    assert_eq!(m.get("agentca_rpc_seconds_count", &[("service", decision), ("method", "Evaluate")]), 8.0);

    assert_eq!(m.get("agentca_signals_total", &[("kind", "disable_agent")]), 1.0);
    assert_eq!(m.get("agentca_signals_total", &[("kind", "enable_agent")]), 1.0);
    assert_eq!(m.get("agentca_live_signals", &[]), status.live_signals as f64);
    assert_eq!(m.get("agentca_reloads_total", &[("outcome", "unchanged")]), 1.0);
    assert_eq!(m.sum("agentca_reloads_total", &[]), 1.0);
    assert_eq!(m.get("agentca_bundle_info", &[("revision", &status.revision)]), 1.0);
    assert_eq!(m.get("agentca_bundle_stale_seconds", &[]), 0.0);
    // Every record was written before its answer (fsync durability), the first load's included.
    let audit = status.audit.unwrap();
    assert_eq!(m.get("agentca_audit_records_total", &[]), audit.written as f64);
    assert_eq!(audit.written as usize, 1 + answers.len() + 2);
    assert_eq!(m.get("agentca_audit_queue_depth", &[]), 0.0);
    assert_eq!(m.get("agentca_audit_errors_total", &[]), 0.0);
    assert!(m.get("agentca_audit_write_seconds_count", &[]) >= 1.0);
    assert_eq!(m.get("agentca_in_flight", &[]), 0.0);
    assert_eq!(m.sum("agentca_refused_total", &[]), 0.0);

    // Request-scoped log lines are JSON objects with the decision id and the caller.
    let log = server.log();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    for d in &answers {
        let line = lines
            .iter()
            .find(|l| l["decision_id"] == d.decision_id.as_str())
            .unwrap_or_else(|| panic!("no line for decision {}:\n{log}", d.decision_id));
        assert_eq!(line["message"], "decided");
        assert!(line["caller"].as_str().unwrap().starts_with("grpc 127.0.0.1:"), "{line}");
    }
    let applied = lines.iter().filter(|l| l["message"] == "signal applied").count();
    assert_eq!(applied, 2, "{log}");
    assert!(!log.contains(TOKEN), "the admin token is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_are_counted_and_the_policy_labels_follow_the_bundle() {
    let env = Env::new();
    let server = start(&env, "info", &[]);
    let mut admin = server.admin().await;
    let first = scrape(&server);
    let revision = |m: &Scrape| {
        let info: Vec<_> = m.0.keys().filter(|(n, _)| n == "agentca_bundle_info").collect();
        assert_eq!(info.len(), 1, "one revision at a time: {info:?}");
        info[0].1["revision"].clone()
    };
    let old = revision(&first);
    let extra = std::path::Path::new(&env.path("policies")).join("extra.cedar");
    std::fs::write(
        &extra,
        "@id(\"extra-permit\")\n@reason(\"extra\")\npermit(principal, action, resource) when { false };\n",
    )
    .unwrap();
    let reloaded = admin.reload(admin_request(pb::ReloadRequest {})).await.unwrap().into_inner();
    assert_eq!(reloaded.outcome, "swapped");
    let m = scrape(&server);
    assert_eq!(revision(&m), reloaded.revision);
    assert_ne!(reloaded.revision, old);
    assert_eq!(m.get("agentca_reloads_total", &[("outcome", "swapped")]), 1.0);
    assert!(
        m.0.contains_key(&("agentca_policy_decisions_total".into(), [("policy".into(), "extra-permit".into())].into()))
    );

    // A broken bundle: the old one is served, and says since when it is stale.
    std::fs::write(&extra, "permit(principal, action, resource) when {").unwrap();
    let failed = admin.reload(admin_request(pb::ReloadRequest {})).await.unwrap().into_inner();
    assert_eq!(failed.outcome, "failed");
    let m = scrape(&server);
    assert_eq!(m.get("agentca_reloads_total", &[("outcome", "failed")]), 1.0);
    assert_eq!(revision(&m), reloaded.revision);
    assert!(m.0.contains_key(&("agentca_bundle_stale_seconds".into(), BTreeMap::new())));
    assert!(m.0.keys().any(|(_, l)| l.get("policy").is_some_and(|p| p == "extra-permit")));

    // Fixed by removing the file: the policy leaves the label set with the bundle.
    std::fs::remove_file(&extra).unwrap();
    assert_eq!(admin.reload(admin_request(pb::ReloadRequest {})).await.unwrap().into_inner().outcome, "swapped");
    let m = scrape(&server);
    assert_eq!(revision(&m), old);
    assert!(!m.0.keys().any(|(_, l)| l.get("policy").is_some_and(|p| p == "extra-permit")));
    assert_eq!(m.get("agentca_bundle_stale_seconds", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_door_is_counted_under_its_own_method() {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    let env = Env::new();
    let server = start(&env, "info", &[]);
    let mut envoy = AuthorizationClient::new(server.channel().await);
    let check = |method: &str| CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest { method: method.into(), path: "/v1/tickets/42".into(), ..Default::default() }),
                ..Default::default()
            }),
            context_extensions: [("agent", "ag-support-01"), ("resource", "tickets")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    };
    envoy.check(check("GET")).await.unwrap();
    envoy.check(check("POST")).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();

    let m = scrape(&server);
    let envoy_check =
        [("grpc_service", "envoy.service.auth.v3.Authorization"), ("grpc_method", "Check"), ("grpc_code", "OK")];
    assert_eq!(m.get("grpc_server_handled_total", &envoy_check), 2.0);
    let health_check = [("grpc_service", "grpc.health.v1.Health"), ("grpc_method", "Check"), ("grpc_code", "OK")];
    assert_eq!(m.get("grpc_server_handled_total", &health_check), 1.0);
    // A read within the blueprint is allowed; nothing permits the write.
    assert_eq!(m.get("agentca_decisions_total", &[("decision", "allow"), ("code", "policy")]), 1.0);
    assert_eq!(m.get("agentca_decisions_total", &[("decision", "deny"), ("code", "no_permit")]), 1.0);
    assert_eq!(m.get("agentca_policy_decisions_total", &[("policy", "gateway-read-within-blueprint")]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_by_reason() {
    let env = Env::new();
    let server = start(&env, "info", &["--max-message-bytes", "16384"]);
    let mut decisions = server.decisions().await;
    let big =
        pb::EvaluateRequest { request_id: "x".repeat(20_000), ..token_request("ag-mail-01", "graph", "Mail.Read") };
    let status = decisions.evaluate(big).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let m = scrape(&server);
    assert_eq!(m.get("agentca_refused_total", &[("reason", "message_size")]), 1.0);
    let handled = [
        ("grpc_service", "agentca.v1.DecisionService"),
        ("grpc_method", "Evaluate"),
        ("grpc_code", "ResourceExhausted"),
    ];
    assert_eq!(m.get("grpc_server_handled_total", &handled), 1.0);
}

#[test]
fn the_probes_survive_hostile_http_and_answer_only_their_paths() {
    let env = Env::new();
    let server = start(&env, "trace", &[]);
    let probes = server.metrics_addr.clone().unwrap();
    assert_eq!(get(&probes, "/nope").0, 404);
    assert_eq!(get(&probes, "/metrics?x=1").0, 200);
    let (status, _) =
        http(&probes, b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc");
    assert_eq!(status, 405);
    let (status, _) = http(&probes, b"DELETE /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 405);
    // Garbage, a head too large, a request cut short, a binary blob, HTTP/2's preface:
    // each is answered 400 (or the connection closed), and the server goes on.
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(64 * 1024));
    let hostile: [&[u8]; 6] = [
        b"\x00\x01\x02garbage\r\n\r\n",
        huge.as_bytes(),
        b"GET /metrics HTTP/1.1\r\nHost: a\r\n",
        &[0xff; 4096],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
    ];
    for request in hostile {
        let mut stream = TcpStream::connect(&probes).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = stream.write_all(request);
        // A cut-short request: the client goes away.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "{answer}");
    }
    assert_eq!(get(&probes, "/healthz").0, 200);
    assert_eq!(get(&probes, "/readyz").0, 200);
    // Connections past the cap are closed, and the listener serves again once they go.
    let held: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(&probes).unwrap()).collect();
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get(&probes, "/healthz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "the listener did not recover");
    }
    let log = server.log();
    assert!(!log.contains(TOKEN), "the admin token is in the log");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn metrics_listen_errors_name_the_flag() {
    let env = Env::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
            .args(["serve", "--policies", &env.path("policies"), "--audit", "off", "--state", &env.path("state")])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run(&["--metrics-listen", &addr]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("cannot listen on {addr} (--metrics-listen)")), "{stderr}");
    let (code, stderr) = run(&["--metrics-listen", "127.0.0.1:50551", "--listen", "127.0.0.1:50551"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("--metrics-listen 127.0.0.1:50551 is the gRPC address (--listen)"), "{stderr}");
    let (code, stderr) = run(&["--metrics-listen", "localhost"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--metrics-listen"), "{stderr}");
    let (code, stderr) = run(&["--log-format", "yaml"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--log-format"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_refusals_are_counted_and_the_call_span_is_on_json_lines() {
    use sha2::{Digest, Sha256};
    const DECIDER: &str = "decider-token-3c1e";
    let env = Env::new();
    let access = env.path("access.toml");
    std::fs::write(
        &access,
        format!(
            "[[tokens]]\nname = \"issuer\"\nsha256 = \"{}\"\nroles = [\"decide\"]\n",
            hex::encode(Sha256::digest(DECIDER.as_bytes()))
        ),
    )
    .unwrap();
    let (policies, audit, state) = (env.path("policies"), env.path("audit.jsonl"), env.path("state"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentca"));
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--policies", &policies, "--audit", &audit, "--state", &state, "--no-watch", "--access", &access])
        .env("RUST_LOG", "trace");
    let server = Server::start_command(&mut command);
    let mut decisions = server.decisions().await;
    let ask = || token_request("ag-mail-01", "graph", "Mail.Read");
    let none = decisions.evaluate(ask()).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    let bad = decisions.evaluate(bearer("not-a-known-token", ask())).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::PermissionDenied);
    let decided = decisions.evaluate(bearer(DECIDER, ask())).await.unwrap().into_inner();
    let mut admin = server.admin().await;
    let no_role = admin.signal(bearer(DECIDER, signal("disable_agent", "ag-mail-01"))).await.unwrap_err();
    assert_eq!(no_role.code(), tonic::Code::PermissionDenied);

    let m = scrape(&server);
    for (reason, n) in [("no_credentials", 1.0), ("bad_token", 1.0), ("no_role", 1.0), ("in_flight", 0.0)] {
        assert_eq!(m.get("agentca_refused_total", &[("reason", reason)]), n, "{reason}");
    }
    let evaluate = |code| {
        m.get(
            "grpc_server_handled_total",
            &[("grpc_service", "agentca.v1.DecisionService"), ("grpc_method", "Evaluate"), ("grpc_code", code)],
        )
    };
    assert_eq!(evaluate("Unauthenticated"), 1.0);
    assert_eq!(evaluate("PermissionDenied"), 1.0);
    assert_eq!(evaluate("OK"), 1.0);
    assert_eq!(m.sum("agentca_decisions_total", &[]), 1.0);

    let log = server.log();
    let line = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["decision_id"] == decided.decision_id.as_str())
        .unwrap_or_else(|| panic!("no line for the decision:\n{log}"));
    assert_eq!(line["span"]["method"], "/agentca.v1.DecisionService/Evaluate", "{line}");
    assert!(line["span"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
    assert!(!log.contains(DECIDER), "a token is in the log");
}
