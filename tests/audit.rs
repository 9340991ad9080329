//! The audit log of a real server: killed with SIGKILL under load in fsync mode, every
//! decision a client received is in the log and the chain verifies; tampering is caught by
//! `agentca audit verify`; a stalled log under `deny` answers audit_unavailable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentca::grpc::pb;
use common::{Server, is_allow, token_request};

fn verify(paths: &[&Path]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentca")).args(["audit", "verify"]).args(paths).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_decision() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit/decisions.jsonl");
    let state = dir.path().join("state");
    let args = ["--audit", audit.to_str().unwrap(), "--audit-durability", "fsync", "--state", state.to_str().unwrap()];
    let mut server = Server::start(&args);

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..16 {
        let url = server.url();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
            let mut client = pb::decision_service_client::DecisionServiceClient::new(channel);
            let mut received = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let agent = if n % 3 == 0 { "ag-mail-02" } else { "ag-mail-01" };
                let request = pb::EvaluateRequest {
                    request_id: format!("crash-{task}-{n}"),
                    ..token_request(agent, "graph", "Mail.Read")
                };
                match client.evaluate(request).await {
                    Ok(d) => received.push(d.into_inner().decision_id),
                    Err(_) => break,
                }
            }
            received
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.signal("KILL");
    tokio::task::block_in_place(|| server.wait());
    stop.store(true, Ordering::Relaxed);
    let mut received = Vec::new();
    for t in tasks {
        received.extend(t.await.unwrap());
    }
    assert!(received.len() > 100, "only {} decisions before the kill", received.len());

    // Whatever the kill left, a torn tail included, a restart cuts what was never acknowledged
    // and goes on. Make sure of a torn tail, as a kill mid-write leaves one.
    let mut f = std::fs::OpenOptions::new().append(true).open(&audit).unwrap();
    std::io::Write::write_all(&mut f, b"{\"v\":1,\"seq\":999999,\"kind\":\"decis").unwrap();
    drop(f);
    let restarted = Server::start(&args);
    let mut c = restarted.decisions().await;
    c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap();
    drop(restarted);

    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(0), "{out}");
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains("\"kind\":\"recovery\""), "the cut is recorded in the chain");
    let logged: BTreeSet<&str> = log
        .lines()
        .filter_map(|l| l.split("\"decision_id\":\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    let missing: Vec<&String> = received.iter().filter(|id| !logged.contains(id.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged decisions are not in the log: {:?}",
        missing.len(),
        received.len(),
        &missing[..missing.len().min(5)]
    );
}

fn chain(dir: &Path) -> std::path::PathBuf {
    let audit = dir.join("decisions.jsonl");
    for i in 0..4 {
        let request = dir.join(format!("r{i}.json"));
        std::fs::write(
            &request,
            format!(r#"{{"agent": "ag-mail-0{}", "resource": "graph", "request_id": "r{i}"}}"#, 1 + i % 2),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
            .args(["eval", "--request", request.to_str().unwrap(), "--audit", audit.to_str().unwrap()])
            .current_dir(common::root())
            .output()
            .unwrap();
        assert!(matches!(out.status.code(), Some(0 | 2)));
    }
    audit
}

#[test]
fn verify_finds_edits_removals_reorders_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let audit = chain(dir.path());
    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("intact: 4 records, seq 1..4 (from the start of the chain)"), "{out}");
    let original = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let write =
        |ls: &[String]| std::fs::write(&audit, ls.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let owned = || lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();

    let mut edited = owned();
    edited[1] = edited[1].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    assert_ne!(edited[1], lines[1]);
    write(&edited);
    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(1));
    assert!(out.contains("decisions.jsonl:2: record seq 2 was edited"), "{out}");

    let mut removed = owned();
    removed.remove(2);
    write(&removed);
    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(1));
    assert!(out.contains("decisions.jsonl:3: record seq 4 follows seq 2"), "{out}");

    let mut reordered = owned();
    reordered.swap(0, 1);
    write(&reordered);
    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(1));
    assert!(out.contains("decisions.jsonl:2: record seq 1 follows seq 2"), "{out}");

    // The first records removed: the chain no longer starts at its beginning.
    write(&owned()[2..]);
    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(1));
    assert!(out.contains("the chain starts at seq 3 and not at the first record"), "{out}");
    let partial = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["audit", "verify", "--partial"])
        .arg(&audit)
        .output()
        .unwrap();
    assert_eq!(partial.status.code(), Some(0));

    std::fs::write(&audit, &original[..original.len() - 30]).unwrap();
    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(1));
    assert!(out.contains("decisions.jsonl:4: not a whole JSON record"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_under_deny_answers_audit_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    // A FIFO nobody reads: once its buffer is full, the writer blocks and the queue fills.
    let fifo = dir.path().join("audit.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let server = Server::start(&[
        "--audit",
        fifo.to_str().unwrap(),
        "--audit-durability",
        "buffered",
        "--audit-flush-ms",
        "3600000",
        "--audit-on-full",
        "deny",
        "--audit-queue",
        "16",
        "--state",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let mut client = server.decisions().await;
    let mut refused = None;
    for i in 0..20_000 {
        let d = client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
        if !is_allow(&d) {
            refused = Some((i, d));
            break;
        }
    }
    let (after, d) = refused.expect("the queue never filled");
    assert!(after > 16, "refused after only {after} decisions");
    assert_eq!(d.reasons.len(), 1);
    assert_eq!(d.reasons[0].code, "audit_unavailable");
    let mut admin = server.admin().await;
    let audit = admin.status(pb::StatusRequest {}).await.unwrap().into_inner().audit.unwrap();
    assert!(audit.refused >= 1, "{audit:?}");
    assert_eq!(audit.on_full, "deny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_loud_and_turns_health_not_serving_under_deny() {
    // /dev/full answers every write with ENOSPC, as a full disk does.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&[
        "--audit",
        "/dev/full",
        "--audit-durability",
        "buffered",
        "--audit-on-full",
        "deny",
        "--audit-queue",
        "8",
        "--state",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        if status.into_inner().status == not_serving {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "health never went NOT_SERVING:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut admin = server.admin().await;
    let audit = admin.status(pb::StatusRequest {}).await.unwrap().into_inner().audit.unwrap();
    assert!(audit.error.contains("No space left on device"), "{audit:?}");
    // Nothing is written, so the queue fills and decisions are refused, never unrecorded.
    let mut client = server.decisions().await;
    let mut refused = false;
    for _ in 0..50 {
        let d = client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
        if d.reasons[0].code == "audit_unavailable" {
            assert!(!is_allow(&d));
            refused = true;
            break;
        }
    }
    assert!(refused);
    assert!(server.log().contains("audit write failed"), "{}", server.log());
}
