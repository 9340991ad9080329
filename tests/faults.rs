//! Faults an unlucky operator or an attacker brings: a full disk under the signal journal,
//! an open admin port, floods of streams and signals, control characters, closed pipes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use agentca::grpc::pb;
use common::{Server, Tmpfs, copy_sample, is_allow, token_request};

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
    let Some(disk) = Tmpfs::mount("64k") else { return };
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
        let request = pb::SignalRequest { risk: "low".into(), ..signal("set_risk", "ag-code-02", &format!("{i} {long}")) };
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
