//! Live signals on a real server: the kill switch under load, blueprint cascade, risk,
//! durability across SIGKILL and restarts, reloads, a torn journal line, and the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use agentca::grpc::pb;
use common::{Answered, Env, Server, is_allow, token_request};

fn signal(kind: &str, target: &str) -> pb::SignalRequest {
    pb::SignalRequest {
        kind: kind.into(),
        target: target.into(),
        reason: format!("test {kind}"),
        actor: "secops@contoso".into(),
        ..Default::default()
    }
}

async fn decide(server: &Server, agent: &str) -> pb::Decision {
    let scope = match agent {
        a if a.starts_with("ag-mail") || a.starts_with("ag-research") => ("graph", "Mail.Read"),
        a if a.starts_with("ag-code") => ("code", "Repo.Read"),
        _ => ("tickets", "Tickets.Read"),
    };
    let request = pb::EvaluateRequest { client_ip: "10.42.0.1".into(), ..token_request(agent, scope.0, scope.1) };
    server.decisions().await.evaluate(request).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_allow_is_sent_after_a_disable_is_acknowledged() {
    let env = Env::new();
    let server = env.start(&[]);
    assert!(is_allow(&decide(&server, "ag-mail-01").await));

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Answered::new();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = server.url();
        let stop = stop.clone();
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
            let mut client = pb::decision_service_client::DecisionServiceClient::new(channel);
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let d = client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
                seen.push((sent, Instant::now(), d));
                answered.add();
            }
            seen
        }));
    }
    // Each stretch of load lasts until it has been answered 100 times (more than the 8 tasks,
    // so some request was sent within the stretch, see `Answered::more`).
    answered.reach(100).await;
    let mut admin = server.admin().await;
    let ack = admin.signal(signal("disable_agent", "ag-mail-01")).await.unwrap().into_inner();
    let acked = Instant::now();
    assert!(!ack.unknown_target);
    answered.more(100).await;
    let enabling = Instant::now();
    let enable = admin.signal(signal("enable_agent", "ag-mail-01")).await.unwrap().into_inner();
    let enabled = Instant::now();
    assert!(enable.seq > ack.seq);
    answered.more(100).await;
    stop.store(true, Ordering::Relaxed);

    let (mut before, mut during, mut after) = (0, 0, 0);
    for t in tasks {
        for (sent, received, d) in t.await.unwrap() {
            if sent >= acked && received < enabling {
                // Sent after the disable was acknowledged, answered before the enable was sent.
                assert!(!is_allow(&d), "an allow after the acknowledgement: {d:?}");
                assert_eq!(d.reasons[0].code, "agent_disabled");
                assert!(d.reasons[0].reason.contains("was disabled by secops@contoso"), "{}", d.reasons[0].reason);
                during += 1;
            } else if sent >= enabled {
                assert!(is_allow(&d), "{d:?}");
                after += 1;
            } else {
                before += 1;
            }
        }
    }
    assert!(before > 0 && during > 0 && after > 0, "{before} {during} {after}");
    // Other agents were never touched.
    assert!(is_allow(&decide(&server, "ag-code-01").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_survive_sigkill_restarts_and_reloads() {
    let env = Env::new();
    let mut server = env.start(&[]);
    let mut admin = server.admin().await;
    admin.signal(signal("disable_agent", "ag-mail-01")).await.unwrap();
    admin.signal(signal("confirm_compromised", "ag-code-01")).await.unwrap();
    admin.signal(signal("sponsor_inactive", "s-erin")).await.unwrap();
    // Killed right after the acknowledgements.
    server.signal("KILL");
    server.wait();

    let server = env.start(&[]);
    assert_eq!(decide(&server, "ag-mail-01").await.reasons[0].code, "agent_disabled");
    assert_eq!(decide(&server, "ag-code-01").await.reasons[0].policy, "block-high-risk-agents");
    assert_eq!(decide(&server, "ag-support-01").await.reasons[0].code, "sponsor_inactive");

    // A reload with a changed bundle keeps the overlay.
    std::fs::write(
        env.dir.path().join("policies/extra.cedar"),
        "@id(\"extra\") forbid(principal == Agent::\"ag-pipeline-01\", action, resource);",
    )
    .unwrap();
    let mut admin = server.admin().await;
    assert_eq!(admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner().outcome, "swapped");
    assert_eq!(decide(&server, "ag-mail-01").await.reasons[0].code, "agent_disabled");
    let listed = admin.list_signals(pb::ListSignalsRequest::default()).await.unwrap().into_inner().signals;
    let fields: Vec<(String, String, String)> =
        listed.iter().map(|s| (s.field.clone(), s.target.clone(), s.value.clone())).collect();
    assert_eq!(
        fields,
        [
            ("agent_enabled".to_string(), "ag-mail-01".to_string(), "false".to_string()),
            ("agent_risk".into(), "ag-code-01".into(), "high".into()),
            ("sponsor_active".into(), "s-erin".into(), "false".into()),
        ]
    );
    admin.signal(signal("confirm_safe", "ag-code-01")).await.unwrap();
    assert!(is_allow(&decide(&server, "ag-code-01").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blueprint_cascades_to_present_and_future_agents() {
    let env = Env::new();
    let server = env.start(&[]);
    let mut admin = server.admin().await;
    admin.signal(signal("disable_blueprint", "bp-mail")).await.unwrap();
    assert_eq!(decide(&server, "ag-mail-01").await.reasons[0].code, "blueprint_disabled");
    assert_eq!(decide(&server, "ag-research-01").await.reasons[0].code, "blueprint_disabled");
    assert!(is_allow(&decide(&server, "ag-code-01").await));

    // An agent of that blueprint arriving with the next bundle is denied too, and a signal for
    // an agent not yet in the directory waits for it.
    let future = admin.signal(signal("disable_agent", "ag-code-03")).await.unwrap().into_inner();
    assert!(future.unknown_target);
    let dir_path = env.dir.path().join("policies/directory.json");
    let mut dir: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dir_path).unwrap()).unwrap();
    let mut mail = dir["agents"][0].clone();
    mail["id"] = "ag-mail-03".into();
    let mut code =
        dir["agents"].as_array().unwrap().iter().find(|a| a["blueprint"] == "bp-code-review").unwrap().clone();
    code["id"] = "ag-code-03".into();
    dir["agents"].as_array_mut().unwrap().extend([mail, code]);
    std::fs::write(&dir_path, dir.to_string()).unwrap();
    assert_eq!(admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner().outcome, "swapped");
    assert_eq!(decide(&server, "ag-mail-03").await.reasons[0].code, "blueprint_disabled");
    assert_eq!(decide(&server, "ag-code-03").await.reasons[0].code, "agent_disabled");
    let listed = admin.list_signals(pb::ListSignalsRequest::default()).await.unwrap().into_inner().signals;
    assert!(listed.iter().all(|s| !s.unknown_target), "{listed:?}");

    admin.signal(signal("enable_blueprint", "bp-mail")).await.unwrap();
    assert!(is_allow(&decide(&server, "ag-mail-03").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_line_is_skipped_and_reported() {
    let env = Env::new();
    let mut server = env.start(&[]);
    server.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap();
    server.signal("KILL");
    server.wait();
    let journal = env.dir.path().join("state/signals.jsonl");
    let mut f = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":2,\"kind\":\"enable_ag").unwrap();
    drop(f);
    let server = env.start(&[]);
    assert_eq!(decide(&server, "ag-mail-01").await.reasons[0].code, "agent_disabled");
    assert!(server.log().contains("skipped an unreadable signal"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_signals_and_they_are_audited() {
    let env = Env::new();
    let server = env.start(&[]);
    let admin = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
            .args(["admin", "--server", &server.addr, "--actor", "alice"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = admin(&["disable-agent", "ag-mail-01", "--reason", "token leaked"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("agent_enabled ag-mail-01 = false, by alice"), "{out}");
    assert_eq!(decide(&server, "ag-mail-01").await.reasons[0].code, "agent_disabled");
    let (code, out) = admin(&["risk", "ag-code-01", "high", "--reason", "anomalous"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(decide(&server, "ag-code-01").await.reasons[0].policy, "block-high-risk-agents");
    let (code, out) = admin(&["list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("agent_risk ag-code-01 = high") && out.contains("agent_enabled ag-mail-01 = false"), "{out}");
    let (code, out) = admin(&["risk", "ag-code-01", "severe"]);
    assert_ne!(code, Some(0), "{out}");
    let (code, out) = admin(&["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("live signals   2"), "{out}");

    let log = std::fs::read_to_string(env.dir.path().join("audit.jsonl")).unwrap();
    let signals: Vec<&str> = log.lines().filter(|l| l.contains("\"kind\":\"signal\"")).collect();
    assert_eq!(signals.len(), 2);
    assert!(signals[0].contains("\"reason\":\"token leaked\"") && signals[0].contains("\"actor\":\"alice\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_guards_the_admin_service() {
    let env = Env::new();
    let server = Server::start(&[
        "--policies",
        &env.path("policies"),
        "--audit",
        "off",
        "--state",
        &env.path("state"),
        "--admin-token",
        "s3cret",
    ]);
    let status = server.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["admin", "--server", &server.addr, "--token", "s3cret", "disable-agent", "ag-mail-01"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(decide(&server, "ag-mail-01").await.reasons[0].code, "agent_disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_signals_and_compaction_keep_what_was_acknowledged() {
    let env = Env::new();
    let args = |env: &Env| {
        vec![
            "--policies".to_string(),
            env.path("policies"),
            "--audit".into(),
            env.path("audit.jsonl"),
            "--state".into(),
            env.path("state"),
            "--no-watch".into(),
            "--journal-compact-after".into(),
            "4".into(),
        ]
    };
    let a = args(&env);
    let mut server = Server::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let targets = ["ag-mail-01", "ag-code-01", "ag-support-01", "ag-recon-01", "ag-pipeline-01"];
    let mut tasks = Vec::new();
    for (t, target) in targets.into_iter().enumerate() {
        let url = server.url();
        tasks.push(tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
            let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
            for i in 0..(6 + t) {
                let kind = if i % 2 == 0 { "disable_agent" } else { "enable_agent" };
                admin.signal(signal(kind, target)).await.unwrap();
                admin.signal(signal("set_risk", target)).await.unwrap_err();
                let mut risk = signal("set_risk", target);
                risk.risk = ["low", "medium"][i % 2].into();
                admin.signal(risk).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let listed = |s: Vec<pb::LiveSignal>| s.into_iter().map(|s| (s.field, s.target, s.value)).collect::<Vec<_>>();
    let before = listed(
        server.admin().await.list_signals(pb::ListSignalsRequest::default()).await.unwrap().into_inner().signals,
    );
    assert_eq!(before.len(), 10);
    for (t, target) in targets.iter().enumerate() {
        // Each target's last disable/enable and risk, in the order they were acknowledged.
        let last = 5 + t;
        let enabled = if last % 2 == 0 { "false" } else { "true" };
        assert!(before.contains(&("agent_enabled".into(), target.to_string(), enabled.into())), "{before:?}");
        assert!(before.contains(&("agent_risk".into(), target.to_string(), ["low", "medium"][last % 2].into())));
    }
    let journal = std::fs::read_to_string(env.dir.path().join("state/signals.jsonl")).unwrap();
    assert!(journal.lines().count() < 40, "the journal was never compacted: {} lines", journal.lines().count());

    server.signal("KILL");
    server.wait();
    let server = Server::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let after = listed(
        server.admin().await.list_signals(pb::ListSignalsRequest::default()).await.unwrap().into_inner().signals,
    );
    assert_eq!(before, after);
}
