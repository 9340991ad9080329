//! The live directory on a real server: agents upserted and changed without a reload, bad
//! changes refused whole, durability across SIGKILL, restarts and reloads, folding into the
//! bundle with `export-directory`, and upserts under load.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agentca::grpc::pb;
use common::{Env, Server, is_allow, token_request};

fn agent(id: &str, env: &str) -> String {
    format!(
        r#"{{"id": "{id}", "blueprint": "bp-mail", "sponsor": "s-alice", "owners": ["u-bob"],
            "framework": "langchain", "tags": {{"env": "{env}"}}}}"#
    )
}

fn change(json: String) -> pb::DirectoryChange {
    pb::DirectoryChange { json, actor: "idp@contoso".into(), reason: "provisioning".into() }
}

fn upsert(agents: &[String]) -> pb::DirectoryChange {
    change(format!(r#"{{"upsert": {{"agents": [{}]}}}}"#, agents.join(",")))
}

async fn decide(server: &Server, agent: &str) -> pb::Decision {
    let request = pb::EvaluateRequest { client_ip: "10.42.0.1".into(), ..token_request(agent, "graph", "Mail.Read") };
    server.decisions().await.evaluate(request).await.unwrap().into_inner()
}

async fn status(server: &Server) -> pb::StatusResponse {
    server.admin().await.status(pb::StatusRequest {}).await.unwrap().into_inner()
}

fn cli(server: &Server, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["admin", "--server", &server.addr, "--actor", "cli-admin"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_upserted_live_decide_at_once_and_survive_sigkill_restarts_and_reloads() {
    let env = Env::new();
    let mut server = env.start(&[]);
    assert_eq!(decide(&server, "ag-new-01").await.reasons[0].code, "unknown_agent");

    let mut admin = server.admin().await;
    let done = admin.apply_directory(upsert(&[agent("ag-new-01", "prod")])).await.unwrap().into_inner();
    assert_eq!((done.seq, done.summary.as_str()), (1, "upsert 1 agents"));
    assert!(is_allow(&decide(&server, "ag-new-01").await));

    // A live change to its tags flips the tag policy, through the CLI and standard input.
    let (ok, out, err) = cli(
        &server,
        &["apply-directory", "-"],
        Some(&format!(r#"{{"upsert": {{"agents": [{}]}}}}"#, agent("ag-new-01", "dev"))),
    );
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("applied as #2 over sha256:"), "{out}");
    let denied = decide(&server, "ag-new-01").await;
    assert_eq!(denied.reasons[0].policy, "prod-resources-need-prod-agents", "{denied:?}");
    assert!(is_allow(&decide(&server, "ag-mail-01").await));

    // Killed right after the acknowledgements: the journal has both.
    server.signal("KILL");
    server.wait();
    let server = env.start(&[]);
    assert_eq!(decide(&server, "ag-new-01").await.reasons[0].policy, "prod-resources-need-prod-agents");
    let s = status(&server).await;
    assert_eq!((s.live_directory_seq, s.live_directory_objects, s.agents), (2, 1, 14));

    // A reload of a changed bundle keeps the live changes.
    std::fs::write(
        env.dir.path().join("policies/extra.cedar"),
        "@id(\"extra\") forbid(principal == Agent::\"ag-pipeline-01\", action, resource);",
    )
    .unwrap();
    let mut admin = server.admin().await;
    assert_eq!(admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner().outcome, "swapped");
    assert_eq!(decide(&server, "ag-new-01").await.reasons[0].policy, "prod-resources-need-prod-agents");

    // Folded into the bundle: the exported directory becomes the bundle's, and the next reload
    // drops the live change it now holds; decisions stay the same.
    let directory = env.path("policies/directory.json");
    let (ok, out, err) = cli(&server, &["export-directory", "--out", &directory], None);
    assert!(ok, "{out}{err}");
    assert!(err.contains("with live change #2"), "{err}");
    assert_eq!(admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner().outcome, "swapped");
    let s = status(&server).await;
    assert_eq!((s.live_directory_seq, s.live_directory_objects, s.agents), (2, 0, 14));
    assert_eq!(decide(&server, "ag-new-01").await.reasons[0].policy, "prod-resources-need-prod-agents");
    // The journal was compacted to its sequence alone: a restart serves the bundle alone, the
    // same way, and numbers the next change after the last.
    let journal = std::fs::read_to_string(env.dir.path().join("state/directory.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = journal.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((lines.len(), &lines[0]["seq"], lines[0].get("change")), (1, &serde_json::json!(2), None));
    drop(server);
    let server = env.start(&[]);
    assert_eq!(decide(&server, "ag-new-01").await.reasons[0].policy, "prod-resources-need-prod-agents");
    let (ok, out, _) = cli(&server, &["status"], None);
    assert!(ok && out.contains("live directory change #2: 0 objects"), "{out}");

    // Every change is in the audit log, and the chain holds.
    drop(server);
    let log = std::fs::read_to_string(env.path("audit.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let changes: Vec<&serde_json::Value> = records.iter().filter(|r| r["kind"] == "directory").collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1]["upsert"]["agents"], serde_json::json!(["ag-new-01"]));
    assert_eq!(changes[1]["by"], "cli-admin");
    // Each start says which live changes were in force: the restart after the kill had both.
    let starts: Vec<&serde_json::Value> = records.iter().filter(|r| r["outcome"] == "loaded").collect();
    assert_eq!(starts[0].get("live_directory_seq"), None);
    assert_eq!(starts[1]["live_directory_seq"], 2);
    let verify = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["audit", "verify", &env.path("audit.jsonl")])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_change_is_refused_whole_with_every_error_named() {
    let env = Env::new();
    let server = env.start(&[]);
    let mut admin = server.admin().await;

    let refused = admin.apply_directory(change(r#"{"remove": {"blueprints": ["bp-mail"]}}"#.into())).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("blueprint `bp-mail`: cannot be removed: 3 agents are made from it"),
        "{}",
        refused.message()
    );
    assert!(is_allow(&decide(&server, "ag-mail-01").await));

    // One good agent and one with a dangling sponsor: neither applies.
    let dangling = r#"{"id": "ag-new-02", "blueprint": "bp-mail", "sponsor": "s-nobody"}"#.to_string();
    let refused = admin.apply_directory(upsert(&[agent("ag-new-01", "prod"), dangling])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("agent `ag-new-02`: field `sponsor`: unknown sponsor `s-nobody`"),
        "{}",
        refused.message()
    );
    assert_eq!(decide(&server, "ag-new-01").await.reasons[0].code, "unknown_agent");

    // Not a change at all, and a change that does not fit the schema's types.
    let refused = admin.apply_directory(change("[]".into())).await.unwrap_err();
    assert!(refused.message().starts_with("field `json`: expected a JSON object"), "{}", refused.message());
    let bad_type =
        r#"{"upsert": {"agents": [{"id": "ag-x", "blueprint": "bp-mail", "sponsor": "s-alice", "enabled": "yes"}]}}"#;
    let refused = admin.apply_directory(change(bad_type.into())).await.unwrap_err();
    assert!(
        refused.message().contains("agent `ag-x`: field `enabled`: expected true or false"),
        "{}",
        refused.message()
    );

    // A change to some fields of an agent leaves the others: re-tagging a disabled agent, or
    // one at high risk, turns neither back on.
    let retag = r#"{"upsert": {"agents": [{"id": "ag-mail-02", "tags": {"env": "prod", "team": "mail"}}]}}"#;
    admin.apply_directory(change(retag.into())).await.unwrap();
    assert_eq!(decide(&server, "ag-mail-02").await.reasons[0].policy, "block-high-risk-agents");
    let mut decisions = server.decisions().await;
    let support = token_request("ag-support-02", "tickets", "Tickets.Read");
    let retag = r#"{"upsert": {"agents": [{"id": "ag-support-02", "tags": {"env": "prod"}}]}}"#;
    admin.apply_directory(change(retag.into())).await.unwrap();
    assert_eq!(decisions.evaluate(support).await.unwrap().into_inner().reasons[0].code, "agent_disabled");

    // A misspelt field is refused, not dropped in silence.
    let typo = r#"{"upsert": {"agents": [{"id": "ag-mail-01", "enabeld": false}]}}"#;
    let refused = admin.apply_directory(change(typo.into())).await.unwrap_err();
    assert!(refused.message().contains("agent `ag-mail-01`: field `enabeld`: unknown field"), "{}", refused.message());

    // Removing the agents first lets the blueprint go, in one change.
    let both = r#"{"remove": {"agents": ["ag-mail-01", "ag-mail-02", "ag-research-01"], "blueprints": ["bp-mail"]}}"#;
    let done = admin.apply_directory(change(both.into())).await.unwrap().into_inner();
    assert_eq!(done.summary, "remove 1 blueprints, remove 3 agents");
    assert_eq!(decide(&server, "ag-mail-01").await.reasons[0].code, "unknown_agent");
    let s = status(&server).await;
    assert_eq!((s.live_directory_seq, s.live_directory_objects), (3, 5));

    // Refused changes took no sequence number and left no record; a small change is in its
    // record whole.
    drop(server);
    let log = std::fs::read_to_string(env.path("audit.jsonl")).unwrap();
    let changes: Vec<serde_json::Value> =
        log.lines().filter(|l| l.contains(r#""kind":"directory""#)).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(changes.len(), 3);
    assert_eq!(
        changes[0]["change"]["upsert"]["agents"][0],
        serde_json::json!({"id": "ag-mail-02", "tags": {"env": "prod", "team": "mail"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_per_state_folder_and_export_writes_only_files() {
    let env = Env::new();
    let server = env.start(&[]);
    // A second server on the same state folder would number changes twice: it is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["serve", "--listen", "127.0.0.1:0", "--no-watch", "--audit", "off"])
        .args(["--policies", &env.path("policies"), "--state", &env.path("state")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another `agentca serve` uses the state folder"), "{err}");

    // Through a link, the file it leads to is replaced and the link stays; a FIFO is refused.
    let real = env.path("real.json");
    std::fs::write(&real, "old").unwrap();
    let link = env.path("link.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (ok, _, err) = cli(&server, &["export-directory", "--out", &link], None);
    assert!(ok, "{err}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    let exported: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&real).unwrap()).unwrap();
    assert_eq!(exported["agents"].as_array().unwrap().len(), 13);
    // A link to a file not there yet makes it; a file's mode is kept.
    let ahead = env.path("ahead.json");
    std::os::unix::fs::symlink(env.path("later.json"), &ahead).unwrap();
    let (ok, _, err) = cli(&server, &["export-directory", "--out", &ahead], None);
    assert!(ok, "{err}");
    assert!(std::fs::metadata(env.path("later.json")).unwrap().is_file());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, _, err) = cli(&server, &["export-directory", "--out", &real], None);
    assert!(ok, "{err}");
    assert_eq!(std::fs::metadata(&real).unwrap().permissions().mode() & 0o777, 0o600);
    let fifo = env.path("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (ok, _, err) = cli(&server, &["export-directory", "--out", &fifo], None);
    assert!(!ok && err.contains("not a regular file"), "{err}");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upserts_under_load_fail_no_request_and_each_is_effective_when_acknowledged() {
    let env = Env::new();
    let server = env.start(&["--audit-durability", "buffered"]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..4 {
        let (url, stop) = (server.url(), stop.clone());
        load.push(tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
            let mut client = pb::decision_service_client::DecisionServiceClient::new(channel);
            let (mut allowed, mut n) = (0, 0u64);
            while !stop.load(Ordering::Relaxed) {
                // The sample's agents, and agents being created.
                let agent = if n % 2 == 0 { "ag-mail-01".to_string() } else { format!("ag-load-{}", (n / 2 + i) % 50) };
                let request = pb::EvaluateRequest {
                    client_ip: "10.42.0.1".into(),
                    ..token_request(&agent, "graph", "Mail.Read")
                };
                let d = client.evaluate(request).await.expect("no request fails").into_inner();
                allowed += usize::from(is_allow(&d));
                n += 1;
            }
            (n, allowed)
        }));
    }
    let mut admin = server.admin().await;
    let mut decisions = server.decisions().await;
    for i in 0..50 {
        let id = format!("ag-load-{i}");
        let done = admin.apply_directory(upsert(&[agent(&id, "prod")])).await.unwrap().into_inner();
        assert_eq!(done.seq, i + 1);
        // Acknowledged: the next request sees it.
        let request = pb::EvaluateRequest { client_ip: "10.42.0.1".into(), ..token_request(&id, "graph", "Mail.Read") };
        assert!(is_allow(&decisions.evaluate(request).await.unwrap().into_inner()), "{id}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let (n, allowed) = task.await.unwrap();
        assert!(allowed > 0);
        total += n;
    }
    assert!(total > 100, "{total} requests");
    assert_eq!(status(&server).await.agents, 63);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_before_any_live_change_leaves_a_journal_that_starts() {
    let env = Env::new();
    let server = env.start(&[]);
    let directory = env.path("policies/directory.json");
    let text = std::fs::read_to_string(&directory).unwrap();
    std::fs::write(&directory, text.replace("Mail triage 01", "Mail triage one")).unwrap();
    let mut admin = server.admin().await;
    assert_eq!(admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner().outcome, "swapped");
    drop(server);
    let server = env.start(&[]);
    assert!(is_allow(&decide(&server, "ag-mail-01").await));
    let done = server.admin().await.apply_directory(upsert(&[agent("ag-new-01", "prod")])).await.unwrap().into_inner();
    assert_eq!(done.seq, 1);
    drop(server);
    let server = env.start(&[]);
    assert_eq!(status(&server).await.live_directory_seq, 1);
}

#[test]
fn validate_lays_a_state_folders_live_changes_over_the_bundle() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("state")).unwrap();
    let journal = env.path("state/directory.jsonl");
    let validate = || {
        Command::new(env!("CARGO_BIN_EXE_agentca"))
            .args(["validate", "--policies", &env.path("policies"), "--state", &env.path("state")])
            .output()
            .unwrap()
    };
    let line =
        |seq: u32, change: &str| format!(r#"{{"seq":{seq},"at":"2026-12-01T00:00:00Z","by":"t","change":{change}}}"#);
    let one_line: serde_json::Value = serde_json::from_str(&agent("ag-new-01", "prod")).unwrap();
    let add = line(1, &format!(r#"{{"upsert": {{"agents": [{one_line}]}}}}"#));
    std::fs::write(&journal, format!("{add}\n")).unwrap();
    let out = validate();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("live directory: 1 changes (the last #1) lay over it: 1 objects"), "{text}");
    assert!(text.contains("14 agents"), "{text}");

    // A bundle that drops the blueprint the live agent uses: invalid, and the journal is named.
    let directory = env.path("policies/directory.json");
    let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&directory).unwrap()).unwrap();
    doc["agents"].as_array_mut().unwrap().retain(|a| a["blueprint"] != "bp-mail");
    doc["blueprints"].as_array_mut().unwrap().retain(|b| b["id"] != "bp-mail");
    std::fs::write(&directory, doc.to_string()).unwrap();
    let out = validate();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the live directory changes (the journal `directory.jsonl` under --state) no longer apply"),
        "{err}"
    );
    assert!(err.contains("agent `ag-new-01`: field `blueprint`: unknown blueprint `bp-mail`"), "{err}");
    // Nothing was changed by looking.
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), format!("{add}\n"));
}
