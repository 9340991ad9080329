//! The audit log of a real server: killed with SIGKILL under load in fsync mode, every
//! decision a client received is in the log and the chain verifies; tampering is caught by
//! `agentca audit verify`; a stalled log under `deny` answers audit_unavailable; a file
//! deleted or moved under the server is followed by a new one; a full disk refuses promptly
//! and recovers with an intact chain; SIGTERM ends the server even while writes cannot finish.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentca::grpc::pb;
use common::{Answered, Server, Tmpfs, fill_fifo, is_allow, token_request};
use tonic_health::pb::health_check_response::ServingStatus;

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
    let answered = Answered::new();
    let mut tasks = Vec::new();
    for task in 0..16 {
        let url = server.url();
        let stop = stop.clone();
        let answered = answered.clone();
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
                answered.add();
            }
            received
        }));
    }
    // Killed once 300 decisions were acknowledged, while the 16 tasks go on calling.
    answered.reach(300).await;
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
    // The queue holds 16: at least that many are accepted before one is refused.
    assert!(after >= 16, "refused after only {after} decisions");
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
    health_becomes(&server, ServingStatus::NotServing).await;
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

/// How long a call or a shutdown may take before the test calls it hung.
const HUNG: Duration = Duration::from_secs(20);

/// One decision, failing the test if it does not come back in time.
async fn decide(
    client: &mut pb::decision_service_client::DecisionServiceClient<tonic::transport::Channel>,
    what: &str,
) -> pb::Decision {
    let call = client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read"));
    match tokio::time::timeout(HUNG, call).await {
        Ok(answer) => answer.unwrap().into_inner(),
        Err(_) => panic!("{what}: no answer within {HUNG:?}"),
    }
}

async fn audit_status(server: &Server) -> pb::AuditStatus {
    let mut admin = server.admin().await;
    admin.status(pb::StatusRequest {}).await.unwrap().into_inner().audit.unwrap()
}

/// Waits, on the health Watch stream, until the server reports `want`.
async fn health_becomes(server: &Server, want: ServingStatus) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let mut stream =
        health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let reached = tokio::time::timeout(HUNG, async {
        while let Some(update) = stream.message().await.unwrap() {
            if update.status == want as i32 {
                return;
            }
        }
    })
    .await;
    assert!(reached.is_ok(), "health never became {want:?}:\n{}", server.log());
}

/// SIGTERM, then the exit code and the whole log; fails (and kills it) if it does not exit in time.
fn terminate(mut server: Server) -> (Option<i32>, String) {
    server.signal("TERM");
    let pid = server.child.id();
    let log = server.stderr.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.wait());
    });
    match rx.recv_timeout(HUNG) {
        Ok(code) => (code, log.lock().unwrap().clone()),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("SIGTERM did not end the server within {HUNG:?}:\n{}", log.lock().unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_audit_file_is_noticed_and_a_new_one_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit/decisions.jsonl");
    let server =
        Server::start(&["--audit", audit.to_str().unwrap(), "--state", dir.path().join("state").to_str().unwrap()]);
    let mut client = server.decisions().await;
    for _ in 0..3 {
        assert!(is_allow(&decide(&mut client, "before the delete").await));
    }
    std::fs::remove_file(&audit).unwrap();
    for _ in 0..3 {
        assert!(is_allow(&decide(&mut client, "after the delete").await));
    }
    assert!(audit.exists(), "no new file at the path:\n{}", server.log());

    // Alone, the new file is a chain that does not start at its beginning, and says why.
    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the chain starts at seq 5 and not at the first record"), "{out}");
    assert!(out.contains("its first record is a recovery record: `"), "{out}");
    assert!(
        out.contains("was deleted while agentca had it open: records up to seq 4 were written to the deleted file")
    );
    let partial = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["audit", "verify", "--partial"])
        .arg(&audit)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&partial.stdout);
    assert_eq!(partial.status.code(), Some(0), "{out}");
    assert!(out.starts_with("intact: 4 records, seq 5..8 (from seq 5)"), "{out}");

    let status = audit_status(&server).await;
    assert!(status.notice.contains("was deleted while agentca had it open"), "{status:?}");
    assert_eq!((status.error.as_str(), status.seq), ("", 8), "{status:?}");
    health_becomes(&server, ServingStatus::Serving).await;
    assert!(server.log().contains("was deleted while agentca had it open"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_audit_file_then_rotation_hangs_neither_calls_nor_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("decisions.jsonl");
    let moved = dir.path().join("moved-away.jsonl");
    let server = Server::start(&[
        "--audit",
        audit.to_str().unwrap(),
        "--audit-max-bytes",
        "4000",
        "--state",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let mut client = server.decisions().await;
    for _ in 0..2 {
        decide(&mut client, "before the move").await;
    }
    std::fs::rename(&audit, &moved).unwrap();
    // A decision record is about 1 KB: several rotations.
    for _ in 0..20 {
        assert!(is_allow(&decide(&mut client, "after the move").await));
    }
    assert!(audit_status(&server).await.notice.contains("was moved or replaced"));
    let (code, log) = terminate(server);
    assert_eq!(code, Some(0), "{log}");

    let mut files: Vec<PathBuf> = agentca::audit::rotated_files(&audit);
    assert!(files.len() >= 3, "{files:?}");
    files.push(audit.clone());
    files.push(moved);
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (code, out) = verify(&paths);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("intact: 24 records, seq 1..24 (from the start of the chain)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_deny_refuses_promptly_then_recovers_with_an_intact_chain() {
    let Some(disk) = Tmpfs::mount("size=256k") else { return };
    let state = tempfile::tempdir().unwrap();
    let audit = disk.path().join("decisions.jsonl");
    let server = Server::start(&[
        "--audit",
        audit.to_str().unwrap(),
        "--audit-on-full",
        "deny",
        "--state",
        state.path().to_str().unwrap(),
    ]);
    let mut client = server.decisions().await;
    assert!(is_allow(&decide(&mut client, "before the disk fills").await));
    let filler = disk.path().join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        while std::io::Write::write_all(&mut f, &[b'x'; 4096]).is_ok() {}
    }
    // What is left of the file's last page takes a few records; then every call is refused,
    // each in bounded time.
    let mut refused = 0;
    for _ in 0..50 {
        let d = decide(&mut client, "on a full disk").await;
        if !is_allow(&d) {
            assert_eq!(d.reasons[0].code, "audit_unavailable", "{d:?}");
            refused += 1;
            if refused == 3 {
                break;
            }
        }
    }
    assert_eq!(refused, 3, "the disk never filled:\n{}", server.log());
    health_becomes(&server, ServingStatus::NotServing).await;
    let status = audit_status(&server).await;
    assert!(status.error.contains("No space left on device"), "{status:?}");
    assert!(status.refused >= 3, "{status:?}");

    std::fs::remove_file(&filler).unwrap();
    health_becomes(&server, ServingStatus::Serving).await;
    assert!(is_allow(&decide(&mut client, "after space is freed").await));
    let status = audit_status(&server).await;
    assert_eq!(status.error, "", "{status:?}");
    assert!(status.notice.contains("audit writes failed from"), "{status:?}");
    let (code, log) = terminate(server);
    assert_eq!(code, Some(0), "{log}");

    let (code, out) = verify(&[&audit]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("(from the start of the chain)"), "{out}");
    // The first refused caller waited on its record: the record was kept, and says so.
    let written = std::fs::read_to_string(&audit).unwrap();
    assert!(written.contains("\"answered\":\"audit_unavailable\""), "{written}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_server_while_audit_writes_cannot_finish() {
    let dir = tempfile::tempdir().unwrap();
    // A FIFO nobody reads: once its buffer is full, the writer blocks and calls wait (`wait`).
    let fifo = dir.path().join("audit.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let server = Server::start(&[
        "--audit",
        fifo.to_str().unwrap(),
        "--shutdown-grace-ms",
        "500",
        "--max-in-flight",
        "1",
        "--state",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let client = server.decisions().await;
    // Fill the FIFO: the writer stalls on the next record. Of two calls at once, one takes the
    // only place in flight and waits there for its record; the other is shed, and ends first.
    fill_fifo(&fifo);
    let calls = (0..2).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move { client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await })
    });
    let (first, _, mut in_flight) = futures::future::select_all(calls).await;
    let shed = first.unwrap().expect_err("a call was answered while the writer was stalled");
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    let stuck = in_flight.pop().unwrap();
    let (code, log) = terminate(server);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("calls still in flight after the shutdown grace period"), "{log}");
    assert!(log.contains("records could not be written before exit; none of their decisions went out"), "{log}");
    // The waiting caller was never answered with a decision.
    assert!(stuck.await.unwrap().is_err());
}
