//! The exact bytes of each kind of record, framed and chained by the audit log, pinned by a
//! golden file: a renamed, moved or retyped field shows up here rather than in the logs of a
//! format whose `v` still says 1. `AGENTCA_BLESS=1` rewrites the file (only with a new `v`).

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;

use super::*;
use crate::audit::{self, Audit, Config, Target};
use crate::engine::{PolicyEffect, ReasonCode};
use crate::request::RawRequest;

fn at(time: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(time).unwrap().with_timezone(&Utc)
}

fn request(raw: serde_json::Value) -> Request {
    RawRequest::from_json(&raw).unwrap().validate(at("2026-11-27T10:00:00Z")).unwrap()
}

fn decision(verdict: Verdict, id: &str, request_id: Option<&str>) -> Decision {
    Decision {
        decision: verdict,
        decision_id: id.into(),
        request_id: request_id.map(str::to_string),
        reasons: Vec::new(),
        report_only: Vec::new(),
        report_only_decision: verdict,
        errors: Vec::new(),
        revision: Arc::from("3f2a9c"),
        eval_us: 42,
    }
}

/// One record of each kind, as the service makes them, at fixed times and ids.
fn bodies() -> Vec<String> {
    let time = at("2026-11-27T10:00:01.250Z");
    let cli = Caller { identity: Some("alice".into()), via: "cli", ..Caller::default() };
    let grpc = Caller { peer: Some("127.0.0.1:50000".into()), via: "grpc", ..Caller::default() };
    let mtls = Caller {
        peer: Some("10.0.0.7:41000".into()),
        identity: Some("spiffe://corp.example/ns/issuers/sa/mint".into()),
        via: "grpc",
        ..Caller::default()
    };
    let gateway = Caller {
        peer: Some("10.0.0.9:42000".into()),
        identity: Some("gw.corp.example".into()),
        subject: Some("spiffe://corp.example/ns/apps/sa/mail-agent".into()),
        via: "envoy",
        ..Caller::default()
    };
    let stranger = Caller {
        peer: Some("10.0.0.8:43000".into()),
        identity: Some("spiffe://corp.example/ns/issuers/sa/mint".into()),
        token: Some("soc".into()),
        via: "grpc",
        ..Caller::default()
    };
    let mut out = Vec::new();

    let token = request(json!({
        "agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read", "Mail.Send"],
        "client_ip": "10.1.2.3", "time": "2026-11-27T09:59:58Z", "request_id": "req-1",
    }));
    let mut allow = decision(Verdict::Allow, "0197a000-0000-7000-8000-000000000001", Some("req-1"));
    allow.reasons.push(Reason {
        code: ReasonCode::Policy,
        policy: Some(Arc::from("allow-within-blueprint")),
        effect: Some(PolicyEffect::Permit),
        reason: Arc::from("the resource is one of the agent's blueprint resources"),
    });
    let mut record = DecisionRecord::of(&token, Some("bp-mail"), Some("sp-ops"), &allow, &cli);
    record.time = time;
    out.push(body(&record));

    let call = request(json!({
        "agent": "ag-mail-02", "resource": "graph", "action": "call_api", "method": "DELETE",
        "path": "/v1.0/me/messages/1", "signin_risk": "medium", "time": "2026-11-27T09:59:59Z",
    }));
    let mut deny = decision(Verdict::Deny, "0197a000-0000-7000-8000-000000000002", None);
    deny.reasons.push(Reason {
        code: ReasonCode::Policy,
        policy: Some(Arc::from("forbid-deletes-at-risk")),
        effect: Some(PolicyEffect::Forbid),
        reason: Arc::from("no deletes while the sign-in is risky"),
    });
    deny.reasons.push(Reason {
        code: ReasonCode::PolicyError,
        policy: None,
        effect: None,
        reason: Arc::from("a policy failed to evaluate: denied"),
    });
    deny.report_only.push(ReportOnly {
        policy: Arc::from("trial-office-hours"),
        effect: PolicyEffect::Forbid,
        reason: Arc::from("outside office hours"),
    });
    deny.errors.push(PolicyError {
        policy: Arc::from("permit-by-tag"),
        message: "`resource` has no attribute `tag`".into(),
        report_only: false,
    });
    deny.errors.push(PolicyError {
        policy: Arc::from("trial-by-tag"),
        message: "`resource` has no attribute `tag`".into(),
        report_only: true,
    });
    let mut record = DecisionRecord::of(&call, Some("bp-mail"), Some("sp-ops"), &deny, &grpc);
    record.time = time;
    out.push(body(&record));

    let unknown = request(json!({"agent": "ag-nobody", "resource": "graph", "time": "2026-11-27T10:00:00Z"}));
    let mut denied = decision(Verdict::Deny, "0197a000-0000-7000-8000-000000000003", None);
    denied.reasons.push(Reason {
        code: ReasonCode::UnknownAgent,
        policy: None,
        effect: None,
        reason: Arc::from("agent `ag-nobody` is not in the directory"),
    });
    let mut record = DecisionRecord::of(&unknown, None, None, &denied, &grpc);
    record.time = time;
    out.push(body(&record));

    let risk = Signal::new("set_risk", "ag-mail-02", "high", "impossible travel", "soc")
        .unwrap()
        .sent_at(at("2026-11-27T10:00:00.5Z"));
    let mut record = SignalRecord::new(7, &risk, false, &grpc);
    record.time = time;
    out.push(body(&record));

    let gone =
        Signal::new("disable_agent", "ag-yet-to-come", "", "", "").unwrap().sent_at(at("2026-11-27T10:00:00.5Z"));
    let mut record = SignalRecord::new(8, &gone, true, &grpc);
    record.time = time;
    out.push(body(&record));

    for (outcome, from, revision, error, trigger) in [
        ("loaded", None, "3f2a9c", None, "start"),
        ("swapped", Some("3f2a9c"), "8b1d07", None, "watch"),
        ("failed", None, "8b1d07", Some("policies/main.cedar:3:7: unexpected token `)`"), "admin"),
    ] {
        let mut record = ReloadRecord::new(outcome, from, revision, error, trigger);
        record.time = time;
        out.push(body(&record));
    }

    out.push(audit::recovery_body(time, "cut 26 bytes of a torn last line from `audit/decisions.jsonl`"));

    // A reload an admin asked for, with who asked.
    let mut record = ReloadRecord::new("swapped", Some("8b1d07"), "5c33e1", None, "admin");
    record.time = time;
    record.caller = Some(&stranger);
    out.push(body(&record));

    // Callers known by their client certificate, and a gateway's downstream subject.
    let mut record = DecisionRecord::of(&token, Some("bp-mail"), Some("sp-ops"), &allow, &mtls);
    record.time = time;
    out.push(body(&record));
    let mut record = DecisionRecord::of(&call, Some("bp-mail"), Some("sp-ops"), &deny, &gateway);
    record.time = time;
    out.push(body(&record));

    // Admin calls the access rules refused.
    let mut record = RefusedRecord::new("/agentca.v1.AdminService/Signal", "signal", "no_role", &mtls);
    record.time = time;
    out.push(body(&record));
    let mut record = RefusedRecord::new("/agentca.v1.AdminService/Reload", "admin", "no_role", &stranger);
    record.time = time;
    out.push(body(&record));
    let mut record = RefusedRecord::new("/agentca.v1.AdminService/Status", "read", "no_credentials", &grpc);
    record.time = time;
    out.push(body(&record));
    // A live directory change, with the change itself; and a start with live changes in force.
    let change = crate::directory::Change::from_json_str(
        r#"{"upsert": {"agents": [{"id": "ag-mail-03", "blueprint": "bp-mail", "sponsor": "sp-ops", "tags": {"env": "prod"}}]},
            "remove": {"agents": ["ag-mail-02"]}}"#,
    )
    .unwrap();
    let mut record = DirectoryRecord::new(12, &change, "idp@contoso", "provisioning", "3f2a9c", &mtls);
    record.time = time;
    out.push(body(&record));
    let mut record = ReloadRecord::new("loaded", None, "3f2a9c", None, "start");
    record.time = time;
    record.live_directory_seq = Some(12);
    out.push(body(&record));

    out
}

#[test]
fn every_kind_of_record_keeps_its_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let log = Audit::start(Config::new(Target::File(path.clone()))).unwrap();
    for body in bodies() {
        log.submit_blocking(body).unwrap();
    }
    drop(log);
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(audit::verify(std::slice::from_ref(&path)).unwrap().records, 17);

    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/audit-records.jsonl");
    if std::env::var_os("AGENTCA_BLESS").is_some() {
        std::fs::write(&golden, &written).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    for (n, (got, want)) in written.lines().zip(expected.lines()).enumerate() {
        assert_eq!(
            got,
            want,
            "record {} differs from {} (a new `v` first, then AGENTCA_BLESS=1)",
            n + 1,
            golden.display()
        );
    }
    assert_eq!(written, expected, "{} differs (a new `v` first, then AGENTCA_BLESS=1)", golden.display());
}
