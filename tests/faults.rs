//! Faults an unlucky operator or an attacker brings: a full disk under the signal journal,
//! an open admin port, floods of streams and signals, control characters, closed pipes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use agentca::grpc::pb;
use common::{Env, Server, Tmpfs, copy_sample, fill_fifo, is_allow, token_request};

fn signal(kind: &str, target: &str, reason: &str) -> pb::SignalRequest {
    pb::SignalRequest {
        kind: kind.into(),
        target: target.into(),
        reason: reason.into(),
        actor: "secops@contoso".into(),
        ..Default::default()
    }
}

fn arg(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_signal_survives_a_full_disk_and_a_restart() {
    let Some(disk) = Tmpfs::mount("size=64k") else { return };
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_sample(&policies);
    let state = disk.path().join("state");
    let args = [
        "--policies".to_string(),
        arg(&policies),
        "--audit".into(),
        arg(&dir.path().join("audit.jsonl")),
        "--state".into(),
        arg(&state),
        "--no-watch".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let mut admin = server.admin().await;
    admin.signal(pb::SignalRequest { risk: "low".into(), ..signal("set_risk", "ag-code-01", "first") }).await.unwrap();

    // Fill the disk: appends go on into the journal's last page, then one is cut part-way.
    let filler = disk.fill("filler");
    let long = "x".repeat(3000);
    let mut failed = None;
    for i in 0..40 {
        let request =
            pb::SignalRequest { risk: "low".into(), ..signal("set_risk", "ag-code-02", &format!("{i} {long}")) };
        if let Err(status) = admin.signal(request).await {
            failed = Some(status);
            break;
        }
    }
    let failed = failed.expect("the journal never filled the disk");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert!(failed.message().contains("No space left on device"), "{failed:?}");

    // Space comes back; the kill switch is acknowledged.
    std::fs::remove_file(&filler).unwrap();
    admin.signal(signal("disable_agent", "ag-mail-01", "token leaked")).await.unwrap();
    let mut decisions = server.decisions().await;
    let d = decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert_eq!(d.reasons[0].code, "agent_disabled");

    // Every line of the journal is whole: the failed append was cut back.
    let journal = std::fs::read_to_string(state.join("signals.jsonl")).unwrap();
    for line in journal.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("a torn line: {e}: {line:.80}"));
    }

    // A crash and a restart replay every acknowledged signal.
    drop(server);
    let server = Server::start(&args);
    let d = server
        .decisions()
        .await
        .evaluate(token_request("ag-mail-01", "graph", "Mail.Read"))
        .await
        .unwrap()
        .into_inner();
    assert!(!is_allow(&d));
    assert_eq!(d.reasons[0].code, "agent_disabled", "{d:?}\n{}", server.log());
    assert!(!server.log().contains("skipped an unreadable signal"), "{}", server.log());
}

/// How `agentca serve ARGS` ended: it started listening (then it is stopped), or it exited.
#[derive(Debug)]
enum Started {
    Listening,
    Exited(Option<i32>, String),
}

fn try_serve(args: &[&str], env: &[(&str, &str)]) -> Started {
    use std::io::BufRead;
    let state = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agentca"));
    command
        .arg("serve")
        .args(["--audit", "off", "--no-watch", "--state", state.path().to_str().unwrap()])
        .args(args)
        .current_dir(common::root())
        .env_remove("AGENTCA_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mut log = String::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("agentca listening on ") {
            child.kill().unwrap();
            child.wait().unwrap();
            return Started::Listening;
        }
        log.push_str(&line);
        log.push('\n');
    }
    Started::Exited(child.wait().unwrap().code(), log)
}

#[test]
fn an_open_admin_port_is_refused_off_loopback() {
    // No token on a non-loopback address: refused, saying how to fix it.
    match try_serve(&["--listen", "0.0.0.0:0"], &[]) {
        Started::Exited(Some(1), log) => {
            assert!(log.contains("refusing to serve AdminService without authentication"), "{log}");
            assert!(log.contains("--admin-token") && log.contains("--insecure-admin"), "{log}");
        }
        other => panic!("{other:?}"),
    }
    match try_serve(&["--listen", "[::]:0"], &[]) {
        Started::Exited(Some(1), _) => {}
        other => panic!("{other:?}"),
    }
    // An empty token is an error, not "no token", from the flag or the environment.
    for (args, env) in [
        (vec!["--admin-token", ""], vec![]),
        (vec!["--admin-token", "  "], vec![]),
        (vec![], vec![("AGENTCA_ADMIN_TOKEN", "")]),
        (vec!["--listen", "0.0.0.0:0"], vec![("AGENTCA_ADMIN_TOKEN", "")]),
    ] {
        match try_serve(&args, &env) {
            Started::Exited(Some(1), log) => assert!(log.contains("empty"), "{args:?} {env:?}: {log}"),
            other => panic!("{args:?} {env:?}: {other:?}"),
        }
    }
    // Loopback without a token, a token anywhere, or the explicit opt-out: served.
    for (args, env) in [
        (vec!["--listen", "127.0.0.1:0"], vec![]),
        (vec!["--listen", "0.0.0.0:0", "--admin-token", "s3cret"], vec![]),
        (vec!["--listen", "0.0.0.0:0"], vec![("AGENTCA_ADMIN_TOKEN", "s3cret")]),
        (vec!["--listen", "0.0.0.0:0", "--insecure-admin"], vec![]),
    ] {
        assert!(matches!(try_serve(&args, &env), Started::Listening), "{args:?} {env:?}");
    }
}

fn admin_cli(server: &Server, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["admin", "--server", &server.addr])
        .args(args)
        .env_remove("AGENTCA_ADMIN_TOKEN")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_signals_are_paged_capped_and_cleared() {
    let env = Env::new();
    // 1,100 signals for agents yet to come, with long reasons: more than one 4 MiB message.
    let reason = "r".repeat(4000);
    let mut journal = String::new();
    for i in 0..1100 {
        let line = serde_json::json!({"seq": i + 1, "kind": "disable_agent", "field": "agent_enabled",
            "target": format!("ag-future-{i:04}"), "value": false, "reason": reason, "actor": "risk-engine",
            "at": "2026-11-27T09:00:00Z"});
        journal.push_str(&format!("{line}\n"));
    }
    std::fs::create_dir_all(env.dir.path().join("state")).unwrap();
    std::fs::write(env.dir.path().join("state/signals.jsonl"), journal).unwrap();
    let server = env.start(&["--max-unknown-signals", "1100"]);
    let mut admin = server.admin().await;
    // The cap: one more unknown target is refused, saying why; known ids and updates still go.
    let refused = admin.signal(signal("disable_agent", "ag-future-x", "")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("1100") && refused.message().contains("admin clear"), "{refused:?}");
    admin.signal(signal("disable_agent", "ag-future-0001", "again")).await.unwrap();
    admin.signal(signal("disable_agent", "ag-mail-01", "")).await.unwrap();

    // Pages: each under the limits, together every signal once, in order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_signals(pb::ListSignalsRequest { page_size: 0, page_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.signals.len() <= 500);
        assert_eq!(page.total, 1101);
        seen.extend(page.signals.into_iter().map(|s| (s.field, s.target)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 1101);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen);
    let small = admin.list_signals(pb::ListSignalsRequest { page_size: 7, page_token: String::new() }).await.unwrap();
    assert_eq!(small.into_inner().signals.len(), 7);
    let bad =
        admin.list_signals(pb::ListSignalsRequest { page_size: 0, page_token: "nonsense".into() }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // The command line pages too.
    let out = admin_cli(&server, &["list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1101);

    // An admin removes signals: the cap has room again, and the directory's value is back.
    let out = admin_cli(&server, &["clear", "ag-future-0000", "--reason", "stale"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    admin.signal(signal("disable_agent", "ag-future-x", "")).await.unwrap();
    let d = server.decisions().await.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap();
    assert!(!is_allow(&d.into_inner()));
    let cleared = admin
        .signal(pb::SignalRequest { field: "agent_enabled".into(), ..signal("clear", "ag-mail-01", "false alarm") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.signal.unwrap().value, "cleared");
    let d = server.decisions().await.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap();
    let d = d.into_inner();
    assert!(is_allow(&d), "{d:?}");
    let none = admin.signal(signal("clear", "ag-mail-01", "")).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::NotFound);
    let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (status.live_signals, status.unknown_target_signals, status.max_unknown_target_signals),
        (1100, 1100, 1100)
    );

    // Clears are journaled: a restart keeps them.
    drop(server);
    let server = env.start(&["--max-unknown-signals", "1100"]);
    let d = server.decisions().await.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap();
    assert!(is_allow(&d.into_inner()), "{}", server.log());
    let mut admin = server.admin().await;
    assert_eq!(admin.status(pb::StatusRequest {}).await.unwrap().into_inner().live_signals, 1100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_compaction_is_one_error_in_status_not_a_warning_per_signal() {
    let env = Env::new();
    std::fs::create_dir_all(env.dir.path().join("state/signals.jsonl.compact")).unwrap();
    let server = env.start(&["--journal-compact-after", "2"]);
    let mut admin = server.admin().await;
    for i in 0..12 {
        admin
            .signal(signal(if i % 2 == 0 { "disable_agent" } else { "enable_agent" }, "ag-mail-01", ""))
            .await
            .unwrap();
    }
    let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert!(status.signals_error.contains("signals.jsonl"), "{status:?}");
    assert_eq!(server.log().matches("compaction failed").count(), 1, "{}", server.log());
    let out = admin_cli(&server, &["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("SIGNALS ERROR"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_never_reach_a_terminal() {
    let env = Env::new();
    // A journal from before reasons were checked, holding an escape sequence and a line break.
    std::fs::create_dir_all(env.dir.path().join("state")).unwrap();
    let line = serde_json::json!({"seq": 1, "kind": "disable_agent", "field": "agent_enabled", "target": "ag-mail-01",
        "value": false, "reason": "\u{1b}[2Jowned\nFAKE LINE", "actor": "x\u{7}", "at": "2026-11-27T09:00:00Z"});
    std::fs::write(env.dir.path().join("state/signals.jsonl"), format!("{line}\n")).unwrap();
    let server = env.start(&[]);
    let out = admin_cli(&server, &["list"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(text.contains("\\u{1b}[2Jowned\\u{a}FAKE LINE"), "{text:?}");

    // New signals with control characters are refused, naming the field.
    let mut admin = server.admin().await;
    for (reason, actor, field) in
        [("a\u{1b}[31m", "ok", "reason"), ("two\nlines", "ok", "reason"), ("", "bob\r", "actor")]
    {
        let e = admin
            .signal(pb::SignalRequest { actor: actor.into(), ..signal("disable_agent", "ag-mail-02", reason) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with(&format!("field `{field}`")), "{e:?}");
    }
    // An id is taken as sent: whitespace is refused by Signal and Evaluate alike.
    let e = admin.signal(signal("disable_agent", " ag-mail-02", "")).await.unwrap_err();
    assert!(e.message().starts_with("field `target`"), "{e:?}");
    let e = server.decisions().await.evaluate(token_request("ag-mail-02 ", "graph", "Mail.Read")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("field `agent`"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_lock_new_clients_out() {
    // A low descriptor limit, and more idle sockets than it allows: they are closed once idle,
    // and a real client gets through.
    let env = Env::new();
    let (policies, state) = (env.path("policies"), env.path("state"));
    let script = format!(
        "ulimit -n 48 && exec {} serve --listen 127.0.0.1:0 --policies {policies} --audit off --state {state} \
         --no-watch --idle-timeout-ms 400",
        env!("CARGO_BIN_EXE_agentca")
    );
    let server = Server::start_command(std::process::Command::new("sh").args(["-c", &script]));
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let attempt = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let channel = tonic::transport::Channel::from_shared(server.url()).unwrap().connect().await.ok()?;
            let mut client = pb::decision_service_client::DecisionServiceClient::new(channel);
            client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.ok()
        })
        .await;
        if let Ok(Some(d)) = attempt {
            assert!(is_allow(&d.into_inner()));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "locked out:\n{}", server.log());
    }
    // The idle ones were closed by the server: past its HTTP/2 settings, each reads the end.
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), idle[0].read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "an idle connection is still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_limits_are_shed_and_admin_still_answers() {
    // The audit log is a FIFO nobody reads: once its buffer is full, every decision waits for
    // its record, so the calls in flight stay in flight.
    let env = Env::new();
    let fifo = env.dir.path().join("audit.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // A reader that opens the FIFO (the server's open for writing waits for one) and reads
    // nothing until told to drain it.
    let (drain, drained) = std::sync::mpsc::channel::<()>();
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut reader = std::fs::File::open(fifo).unwrap();
            let _ = drained.recv();
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut reader, &mut sink);
        })
    };
    let (policies, state, audit) = (env.path("policies"), env.path("state"), arg(&fifo));
    let server = Server::start(&[
        "--policies",
        &policies,
        "--state",
        &state,
        "--audit",
        &audit,
        "--no-watch",
        "--max-in-flight",
        "4",
        "--max-batch-items-in-flight",
        "1000",
    ]);
    let client = server.decisions().await;
    let batch = |n: usize| pb::EvaluateBatchRequest {
        requests: (0..n).map(|_| token_request("ag-mail-01", "graph", "Mail.Read")).collect(),
    };

    // Fill the FIFO to the brim: from now on every decision waits for its record.
    fill_fifo(&fifo);
    // Two batches of 600 items at once: one takes its items and a place in flight and waits
    // there; the other does not fit under the 1,000 items in flight and is refused at once.
    let batches = (0..2).map(|_| {
        let mut c = client.clone();
        let b = batch(600);
        tokio::spawn(async move { c.evaluate_batch(b).await.map(|r| r.into_inner().results.len()) })
    });
    let (first, _, mut waiting_batch) = futures::future::select_all(batches).await;
    let e = first.unwrap().expect_err("a batch was answered while its records could not be written");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-batch-items-in-flight"), "{e:?}");
    let waiting_batch = waiting_batch.pop().unwrap();

    // Four calls at once: three take the places left in flight and wait there, so the first
    // to end is the fourth, shed.
    let calls = (0..4).map(|_| {
        let mut c = client.clone();
        tokio::spawn(async move { c.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await })
    });
    let (first, _, waiting) = futures::future::select_all(calls).await;
    let shed = first.unwrap().expect_err("a call was answered while its record could not be written");
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("--max-in-flight"), "{shed:?}");
    assert_eq!(waiting.len(), 3);

    // The kill switch is not locked out by the flood: admin calls have their own allowance.
    let status =
        tokio::time::timeout(std::time::Duration::from_secs(5), server.admin().await.status(pb::StatusRequest {}))
            .await
            .expect("Status waited behind the decisions")
            .unwrap();
    assert!(status.into_inner().revision.starts_with("sha256:"));

    // Drain the FIFO: every waiting call is answered, and each one decided.
    drain.send(()).unwrap();
    for call in waiting {
        let d = tokio::time::timeout(std::time::Duration::from_secs(20), call).await.unwrap().unwrap();
        let d = d.unwrap_or_else(|s| panic!("{s:?}"));
        assert!(is_allow(&d.into_inner()));
    }
    let items = tokio::time::timeout(std::time::Duration::from_secs(30), waiting_batch).await.unwrap().unwrap();
    assert_eq!(items.unwrap(), 600);
    drop(server);
    reader.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_sends_its_message_does_not_hold_a_place_for_ever() {
    let env = Env::new();
    let server = env.start(&["--max-in-flight", "2", "--call-timeout-ms", "1000"]);
    // Two calls opened at the HTTP/2 level whose message never comes.
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut held = Vec::new();
    for _ in 0..2 {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("{}/agentca.v1.DecisionService/Evaluate", server.url()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        h2 = h2.ready().await.unwrap();
        let (mut response, mut body) = h2.send_request(request, false).unwrap();
        // Two bytes of the five-byte message prefix, then nothing more.
        body.send_data(bytes::Bytes::from_static(&[0, 0]), false).unwrap();
        // Polled once, the stream is opened on the wire.
        assert!(futures::poll!(&mut response).is_pending());
        held.push((response, body));
    }
    // The server ends them at the call timeout (they never send their message) ...
    for (response, _body) in held {
        let response = tokio::time::timeout(std::time::Duration::from_secs(30), response).await.unwrap().unwrap();
        let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status.as_deref(), Some("4"), "{response:?}"); // DEADLINE_EXCEEDED
    }
    // ... and their places in flight are free again: both places take calls.
    let mut client = server.decisions().await;
    let mut other = client.clone();
    let (a, b) = tokio::join!(
        other.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")),
        client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read"))
    );
    assert!(is_allow(&a.unwrap().into_inner()) && is_allow(&b.unwrap().into_inner()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_signal_journal_loses_no_acknowledged_signal() {
    let env = Env::new();
    let server = env.start(&[]);
    let mut admin = server.admin().await;
    admin.signal(signal("disable_agent", "ag-mail-02", "first")).await.unwrap();
    std::fs::remove_file(env.dir.path().join("state/signals.jsonl")).unwrap();
    admin.signal(signal("disable_agent", "ag-mail-01", "after the loss")).await.unwrap();
    let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert!(status.signals_error.contains("deleted or moved"), "{status:?}");
    drop(server);
    let server = env.start(&[]);
    for agent in ["ag-mail-01", "ag-mail-02"] {
        let d = server.decisions().await.evaluate(token_request(agent, "graph", "Mail.Read")).await.unwrap();
        let d = d.into_inner();
        assert_eq!(d.reasons[0].code, "agent_disabled", "{agent}: {d:?}");
    }
}
