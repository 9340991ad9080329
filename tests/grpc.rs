//! The gRPC service through a real client over 127.0.0.1: decisions match `agentca eval`,
//! batches, health and reflection, reloads under load (admin call, SIGHUP, symlink swaps),
//! broken bundles, bad input, graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agentca::grpc::pb;
use common::{Answered, Server, copy_sample, is_allow, proto_request, root, token_request};
use serde_json::Value;

fn cli_eval(request: &Value) -> (Option<i32>, String, String) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, request.to_string().as_bytes()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["eval", "--request", f.path().to_str().unwrap()])
        .current_dir(root())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn verdict(v: i32) -> &'static str {
    if v == pb::Verdict::Allow as i32 { "allow" } else { "deny" }
}

/// The decision as the CLI prints it, minus what differs per call.
fn comparable(d: &pb::Decision) -> Value {
    serde_json::json!({
        "decision": verdict(d.decision),
        "request_id": if d.request_id.is_empty() { Value::Null } else { d.request_id.clone().into() },
        "reasons": d.reasons.iter().map(|r| {
            let mut o = serde_json::json!({"code": r.code, "reason": r.reason});
            if !r.policy.is_empty() { o["policy"] = r.policy.clone().into(); }
            if !r.effect.is_empty() { o["effect"] = r.effect.clone().into(); }
            o
        }).collect::<Vec<_>>(),
        "report_only": d.report_only.iter().map(|r| serde_json::json!({"policy": r.policy, "effect": r.effect, "reason": r.reason})).collect::<Vec<_>>(),
        "report_only_decision": verdict(d.report_only_decision),
        "errors": d.errors.iter().map(|e| serde_json::json!({"policy": e.policy, "message": e.message})).collect::<Vec<_>>(),
        "revision": d.revision,
    })
}

fn strip(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    o.remove("decision_id");
    o.remove("eval_us");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_match_the_cli_for_every_sample_case() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--audit", "off", "--state", dir.path().to_str().unwrap()]);
    let mut client = server.decisions().await;
    let mut checked = 0;
    for file in std::fs::read_dir(root().join("policies/tests")).unwrap() {
        let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(file.unwrap().path()).unwrap()).unwrap();
        for case in cases {
            let request = &case["request"];
            let (code, stdout, stderr) = cli_eval(request);
            let answer = client.evaluate(proto_request(request)).await;
            match code {
                Some(0 | 2) => {
                    let d = answer.unwrap_or_else(|e| panic!("{}: {e}", case["name"])).into_inner();
                    let cli: Value = serde_json::from_str(&stdout).unwrap();
                    assert_eq!(comparable(&d), strip(cli), "{}", case["name"]);
                    assert_eq!(code == Some(0), is_allow(&d));
                }
                Some(1) => {
                    let status = answer.unwrap_err();
                    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", case["name"]);
                    let cli_message = stderr.trim().strip_prefix("agentca: invalid request: ").unwrap();
                    assert_eq!(status.message(), cli_message, "{}", case["name"]);
                }
                other => panic!("{}: eval exited {other:?}: {stderr}", case["name"]),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 33);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_unknown_agents_are_denied() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--audit", "off", "--state", dir.path().to_str().unwrap()]);
    let mut client = server.decisions().await;
    let bad = [
        (pb::EvaluateRequest { resource: "graph".into(), ..Default::default() }, "field `agent`: must not be empty"),
        (
            pb::EvaluateRequest { client_ip: "10.1".into(), ..token_request("ag-mail-01", "graph", "Mail.Read") },
            "field `client_ip`: `10.1` is not an IPv4 or IPv6 address",
        ),
        (
            pb::EvaluateRequest { time: "tomorrow".into(), ..token_request("ag-mail-01", "graph", "Mail.Read") },
            "field `time`: `tomorrow` is not an RFC 3339 time",
        ),
        (
            pb::EvaluateRequest { flow: "implicit".into(), ..token_request("ag-mail-01", "graph", "Mail.Read") },
            "field `flow`: unknown flow `implicit`",
        ),
    ];
    for (request, want) in bad {
        let status = client.evaluate(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with(want), "{}", status.message());
    }
    let d = client.evaluate(token_request("ag-nobody", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert!(!is_allow(&d));
    assert_eq!(d.reasons[0].code, "unknown_agent");

    // A message past the size limit is a resource limit (RESOURCE_EXHAUSTED), not decided.
    let huge = pb::EvaluateRequest { scopes: vec!["x".repeat(1024); 5000], ..token_request("ag-mail-01", "graph", "") };
    let status = client.evaluate(huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("message length too large"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_decides_each_item_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let server = Server::start(&["--audit", audit.to_str().unwrap(), "--state", dir.path().to_str().unwrap()]);
    let mut client = server.decisions().await;
    let requests = vec![
        token_request("ag-mail-01", "graph", "Mail.Read"),
        pb::EvaluateRequest { flow: "sideways".into(), ..token_request("ag-mail-01", "graph", "Mail.Read") },
        token_request("ag-mail-02", "graph", "Mail.Read"),
    ];
    let out = client.evaluate_batch(pb::EvaluateBatchRequest { requests }).await.unwrap().into_inner();
    assert_eq!(out.results.len(), 3);
    let decision = |i: usize| match &out.results[i].result {
        Some(pb::batch_item::Result::Decision(d)) => d.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    assert!(is_allow(&decision(0)));
    match &out.results[1].result {
        Some(pb::batch_item::Result::Error(e)) => {
            assert_eq!((e.code.as_str(), e.field.as_str()), ("invalid_argument", "flow"));
            assert!(e.message.starts_with("field `flow`: unknown flow `sideways`"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(decision(2).reasons[0].policy, "block-high-risk-agents");

    let too_many = vec![token_request("ag-mail-01", "graph", "Mail.Read"); 1001];
    let status = client.evaluate_batch(pb::EvaluateBatchRequest { requests: too_many }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("field `requests`: at most 1000"));

    // Each decided item has its own audit record.
    let log = std::fs::read_to_string(&audit).unwrap();
    for id in [decision(0).decision_id, decision(2).decision_id] {
        assert_eq!(log.matches(&format!("\"decision_id\":\"{id}\"")).count(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--audit", "off", "--state", dir.path().to_str().unwrap()]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    for service in ["", "agentca.v1.DecisionService"] {
        let r =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service}");
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let answer = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else { panic!("{answer:?}") };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["agentca.v1.DecisionService", "agentca.v1.AdminService", "grpc.health.v1.Health"] {
        assert!(names.contains(want), "{names:?}");
    }
}

type Answers = Vec<(String, Instant, Result<pb::Decision, tonic::Status>)>;

/// Requests ag-mail-01 in a loop from several tasks until `stop`, counting each answer in
/// `answered`; returns every answer with the request id it was sent with (unique).
fn load(
    server: &Server,
    tasks: usize,
    stop: Arc<AtomicBool>,
    answered: &Answered,
) -> Vec<tokio::task::JoinHandle<Answers>> {
    (0..tasks)
        .map(|task| {
            let url = server.url();
            let stop = stop.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
                let mut client = pb::decision_service_client::DecisionServiceClient::new(channel);
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("load-{task}-{}", out.len());
                    let request = pb::EvaluateRequest {
                        request_id: id.clone(),
                        ..token_request("ag-mail-01", "graph", "Mail.Read")
                    };
                    let sent = Instant::now();
                    let r = client.evaluate(request).await;
                    out.push((id, sent, r.map(|r| r.into_inner())));
                    answered.add();
                }
                out
            })
        })
        .collect()
}

async fn answers(handles: Vec<tokio::task::JoinHandle<Answers>>) -> Vec<(Instant, pb::Decision)> {
    let mut all = Vec::new();
    for h in handles {
        for (_, sent, r) in h.await.unwrap() {
            all.push((sent, r.unwrap_or_else(|e| panic!("a request failed during the reload: {e}"))));
        }
    }
    all
}

const BLOCK_MAIL_01: &str =
    "@id(\"block-mail-01\") @reason(\"isolated\")\nforbid(principal == Agent::\"ag-mail-01\", action, resource);\n";

async fn wait_for_load(server: &Server) {
    // Readiness: the first answer of a fresh client.
    let mut c = server.decisions().await;
    c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_drops_nothing_and_never_mixes_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("policies");
    copy_sample(&bundle);
    let state = dir.path().join("state");
    let server = Server::start(&[
        "--policies",
        bundle.to_str().unwrap(),
        "--audit",
        dir.path().join("audit.jsonl").to_str().unwrap(),
        "--audit-durability",
        "buffered",
        "--state",
        state.to_str().unwrap(),
        "--no-watch",
    ]);
    wait_for_load(&server).await;
    let mut admin = server.admin().await;
    let old = admin.status(pb::StatusRequest {}).await.unwrap().into_inner().revision;

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Answered::new();
    let handles = load(&server, 8, stop.clone(), &answered);
    answered.reach(60).await;
    std::fs::write(bundle.join("isolate.cedar"), BLOCK_MAIL_01).unwrap();
    let reload = admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner();
    assert_eq!(reload.outcome, "swapped", "{reload:?}");
    assert_eq!(reload.previous_revision, old);
    let new = reload.revision.clone();
    assert_ne!(new, old);
    // Requests sent from now on must all see the new revision.
    let after = Instant::now();
    let mut c = server.decisions().await;
    let d = c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert_eq!((d.revision.as_str(), d.reasons[0].policy.as_str()), (new.as_str(), "block-mail-01"));
    // More answers than tasks: some load request was sent after the reload (`Answered::more`).
    answered.more(60).await;
    stop.store(true, Ordering::Relaxed);
    let all = answers(handles).await;
    assert!(all.len() > 100, "only {} answers", all.len());
    let (mut olds, mut news, mut sent_after) = (0, 0, 0);
    for (sent, d) in &all {
        // Each answer is wholly one revision: old ones allow, new ones deny for the new policy.
        if d.revision == old {
            assert!(is_allow(d), "{d:?}");
            // Once the reload is answered, every request sent sees the new revision.
            assert!(*sent < after, "a request sent after the reload was answered with the old revision");
            olds += 1;
        } else {
            assert_eq!(d.revision, new);
            assert!(!is_allow(d) && d.reasons[0].policy == "block-mail-01", "{d:?}");
            news += 1;
        }
        sent_after += usize::from(*sent >= after);
    }
    assert!(olds > 0 && news > 0 && sent_after > 0, "old {olds}, new {news}, sent after {sent_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_bundle_under_load_keeps_the_old_revision() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("policies");
    copy_sample(&bundle);
    let server = Server::start(&[
        "--policies",
        bundle.to_str().unwrap(),
        "--audit",
        "off",
        "--state",
        dir.path().join("state").to_str().unwrap(),
        "--no-watch",
    ]);
    wait_for_load(&server).await;
    let mut admin = server.admin().await;
    let old = admin.status(pb::StatusRequest {}).await.unwrap().into_inner().revision;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Answered::new();
    let handles = load(&server, 8, stop.clone(), &answered);
    answered.reach(40).await;
    std::fs::write(
        bundle.join("broken.cedar"),
        "@id(\"typo\") forbid(principal, action, resource) when { resource.sensitivty == \"high\" };",
    )
    .unwrap();
    let reload = admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner();
    assert_eq!((reload.outcome.as_str(), reload.revision.as_str()), ("failed", old.as_str()));
    assert!(reload.error.contains("broken.cedar:1:"), "{}", reload.error);
    assert!(reload.error.contains("sensitivty"), "{}", reload.error);
    answered.more(40).await;
    stop.store(true, Ordering::Relaxed);
    let all = answers(handles).await;
    assert!(all.iter().all(|(_, d)| d.revision == old && is_allow(d)));

    let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.revision, old);
    assert!(status.last_reload_error.contains("sensitivty"));
    assert!(!status.stale_since.is_empty());

    // Fixing the bundle clears the error.
    std::fs::remove_file(bundle.join("broken.cedar")).unwrap();
    let reload = admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner();
    assert_eq!(reload.outcome, "unchanged");
    let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert!(status.last_reload_error.is_empty() && status.stale_since.is_empty());
}

async fn wait_for_revision(server: &Server, not: &str) -> String {
    let mut admin = server.admin().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = admin.status(pb::StatusRequest {}).await.unwrap().into_inner().revision;
        if r != not {
            return r;
        }
        assert!(Instant::now() < deadline, "the revision never changed:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn symlink_swap(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp");
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swap_of_the_folder_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (dir.path().join("releases/v1"), dir.path().join("releases/v2"));
    copy_sample(&v1);
    copy_sample(&v2);
    std::fs::write(v2.join("isolate.cedar"), BLOCK_MAIL_01).unwrap();
    let current = dir.path().join("current");
    std::os::unix::fs::symlink(&v1, &current).unwrap();
    let server = Server::start(&[
        "--policies",
        current.to_str().unwrap(),
        "--audit",
        "off",
        "--state",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let mut c = server.decisions().await;
    let first = c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert!(is_allow(&first));
    symlink_swap(&current, &v2);
    let second = wait_for_revision(&server, &first.revision).await;
    let d = c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert_eq!((d.revision.as_str(), d.reasons[0].policy.as_str()), (second.as_str(), "block-mail-01"));
    // And back: the watch follows the new target.
    symlink_swap(&current, &v1);
    assert_eq!(wait_for_revision(&server, &second).await, first.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_data_swap_reloads() {
    // Kubernetes mounts a ConfigMap as files linking into `..data`, itself a link to a
    // timestamped folder that an update replaces atomically.
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("mount");
    let (t1, t2) = (mount.join("..2026_11_27_10_00_00.1"), mount.join("..2026_11_27_10_05_00.2"));
    copy_sample(&t1);
    copy_sample(&t2);
    std::fs::write(t2.join("isolate.cedar"), BLOCK_MAIL_01).unwrap();
    std::os::unix::fs::symlink("..2026_11_27_10_00_00.1", mount.join("..data")).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(&t1).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    for name in &names {
        std::os::unix::fs::symlink(format!("..data/{name}"), mount.join(name)).unwrap();
    }
    let server = Server::start(&[
        "--policies",
        mount.to_str().unwrap(),
        "--audit",
        "off",
        "--state",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let mut c = server.decisions().await;
    let first = c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert!(is_allow(&first), "{first:?}");
    let tmp = mount.join("..data_tmp");
    std::os::unix::fs::symlink("..2026_11_27_10_05_00.2", &tmp).unwrap();
    std::fs::rename(&tmp, mount.join("..data")).unwrap();
    // As the kubelet does: a new key's link is made once `..data` holds it (a link to a file
    // that is not there is an error, not a policy left out).
    std::os::unix::fs::symlink("..data/isolate.cedar", mount.join("isolate.cedar")).unwrap();
    let second = wait_for_revision(&server, &first.revision).await;
    let d = c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert_eq!((d.revision.as_str(), d.reasons[0].policy.as_str()), (second.as_str(), "block-mail-01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_finishes_calls_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("policies");
    copy_sample(&bundle);
    let mut server = Server::start(&[
        "--policies",
        bundle.to_str().unwrap(),
        "--audit",
        dir.path().join("audit.jsonl").to_str().unwrap(),
        "--state",
        dir.path().join("state").to_str().unwrap(),
        "--no-watch",
    ]);
    let mut c = server.decisions().await;
    let first = c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    std::fs::write(bundle.join("isolate.cedar"), BLOCK_MAIL_01).unwrap();
    server.signal("HUP");
    wait_for_revision(&server, &first.revision).await;

    // SIGTERM while calls are in flight: every call started gets its answer, then exit 0.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Answered::new();
    let handles = load(&server, 8, stop.clone(), &answered);
    answered.reach(50).await;
    server.signal("TERM");
    let code = tokio::task::block_in_place(|| server.wait());
    stop.store(true, Ordering::Relaxed);
    assert_eq!(code, Some(0), "{}", server.log());
    // Every call the server decided was answered: a failed call is one it never took.
    let audit = dir.path().join("audit.jsonl");
    let log = std::fs::read_to_string(&audit).unwrap();
    let decided: BTreeSet<&str> = log
        .lines()
        .filter_map(|l| l.split("\"request_id\":\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    let (mut answered, mut refused) = (0, 0);
    for h in handles {
        for (id, _, r) in h.await.unwrap() {
            match r {
                Ok(d) => {
                    assert_eq!(d.request_id, id);
                    assert!(decided.contains(id.as_str()), "{id} was answered but not audited");
                    answered += 1;
                }
                Err(s) => {
                    assert!(!decided.contains(id.as_str()), "{id} was decided but its answer was lost: {s:?}");
                    refused += 1;
                }
            }
        }
    }
    assert!(answered > 0);
    assert!(refused > 0, "calls after the shutdown are refused");
    let verify = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["audit", "verify", audit.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", String::from_utf8_lossy(&verify.stdout));
}
