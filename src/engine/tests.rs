//! Engine tests on the sample bundle and on small bundles that exercise fail-closed paths.

use std::path::Path;

use chrono::Utc;

use super::*;
use crate::directory::RiskLevel;
use crate::request::RawRequest;
use crate::signals::Signal;

fn sample() -> Snapshot {
    Snapshot::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies").as_path()).unwrap()
}

/// A bundle of the sample schema, directory and locations with the given policies.
fn with_policies(policies: &str) -> (tempfile::TempDir, Snapshot) {
    let dir = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in ["schema.cedarschema", "directory.json", "locations.json"] {
        std::fs::copy(sample.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
    let snap = Snapshot::load(dir.path()).unwrap();
    (dir, snap)
}

fn request(json: &str) -> Request {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    RawRequest::from_json(&v).unwrap().validate(Utc::now()).unwrap()
}

fn mail_read() -> Request {
    request(
        r#"{"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"], "client_ip": "10.1.2.3", "time": "2026-11-25T10:00:00Z"}"#,
    )
}

fn codes(d: &Decision) -> Vec<String> {
    d.reasons.iter().map(|r| r.policy.as_deref().unwrap_or(r.code.as_str()).to_string()).collect()
}

#[test]
fn an_erroring_forbid_fails_closed() {
    // The forbid overflows for any hour after midnight; Cedar alone would skip it and allow.
    let (_dir, snap) = with_policies(
        r#"@id("allow-all") permit(principal, action, resource);
           @id("overflowing-forbid") @reason("never")
           forbid(principal, action, resource) when { context.hour + 9223372036854775807 > 0 };"#,
    );
    let d = evaluate(&snap, &Overlay::new(), &mail_read());
    assert_eq!(d.decision, Verdict::Deny);
    assert_eq!(codes(&d), ["overflowing-forbid"]);
    assert_eq!(d.reasons[0].code, ReasonCode::PolicyError);
    assert_eq!(d.errors.len(), 1);
    assert_eq!(&*d.errors[0].policy, "overflowing-forbid");
    assert!(!d.errors[0].report_only);
}

#[test]
fn an_unknown_on_behalf_of_user_fails_closed_where_a_policy_reads_it() {
    let (_dir, snap) = with_policies(
        r#"@id("allow-all") permit(principal, action, resource);
           @id("no-bob") forbid(principal, action == Action::"request_token", resource)
           when { context has user && context.user.name == "Bob Martin" };"#,
    );
    let known = request(r#"{"agent": "ag-mail-01", "resource": "graph", "flow": "on_behalf_of", "user": "u-carol"}"#);
    assert_eq!(evaluate(&snap, &Overlay::new(), &known).decision, Verdict::Allow);
    let bob = request(r#"{"agent": "ag-mail-01", "resource": "graph", "flow": "on_behalf_of", "user": "u-bob"}"#);
    assert_eq!(codes(&evaluate(&snap, &Overlay::new(), &bob)), ["no-bob"]);
    let unknown =
        request(r#"{"agent": "ag-mail-01", "resource": "graph", "flow": "on_behalf_of", "user": "u-nobody"}"#);
    let d = evaluate(&snap, &Overlay::new(), &unknown);
    assert_eq!((d.decision, d.reasons[0].code), (Verdict::Deny, ReasonCode::PolicyError));
}

#[test]
fn a_report_only_error_is_reported_but_does_not_decide() {
    let (_dir, snap) = with_policies(
        r#"@id("allow-all") permit(principal, action, resource);
           @id("pilot") @state("report-only")
           forbid(principal, action, resource) when { context.hour + 9223372036854775807 > 0 };"#,
    );
    let d = evaluate(&snap, &Overlay::new(), &mail_read());
    assert_eq!(d.decision, Verdict::Allow);
    assert_eq!(d.report_only_decision, Verdict::Deny);
    assert!(d.report_only.is_empty());
    assert_eq!(d.errors.len(), 1);
    assert!(d.errors[0].report_only);
}

#[test]
fn report_only_lists_every_match_with_its_effect() {
    let (_dir, snap) = with_policies(
        r#"@id("allow-all") permit(principal, action, resource);
           @id("ro-permit") @state("report-only") @reason("p") permit(principal in Blueprint::"bp-mail", action, resource);
           @id("ro-forbid") @state("report-only") @reason("f") forbid(principal == Agent::"ag-mail-01", action, resource);
           @id("ro-miss") @state("report-only") forbid(principal == Agent::"ag-mail-02", action, resource);
           @id("off") @state("off") forbid(principal, action, resource);"#,
    );
    let d = evaluate(&snap, &Overlay::new(), &mail_read());
    assert_eq!(d.decision, Verdict::Allow);
    let ro: Vec<_> = d.report_only.iter().map(|r| (r.policy.to_string(), r.effect)).collect();
    assert_eq!(ro, [("ro-permit".to_string(), PolicyEffect::Permit), ("ro-forbid".to_string(), PolicyEffect::Forbid)]);
    assert_eq!(d.report_only_decision, Verdict::Deny);
}

#[test]
fn report_only_can_turn_a_deny_into_a_would_be_allow() {
    let (_dir, snap) =
        with_policies(r#"@id("pilot-permit") @state("report-only") permit(principal, action, resource);"#);
    let d = evaluate(&snap, &Overlay::new(), &mail_read());
    assert_eq!((d.decision, d.report_only_decision), (Verdict::Deny, Verdict::Allow));
    assert_eq!(codes(&d), ["no_permit"]);
}

#[test]
fn reasons_follow_bundle_order_and_carry_effect_and_reason() {
    let snap = sample();
    let req = request(
        r#"{"agent": "ag-mail-01", "resource": "ledger", "scopes": ["Ledger.Read"], "client_ip": "203.0.113.1", "time": "2026-11-28T10:00:00Z"}"#,
    );
    let d = evaluate(&snap, &Overlay::new(), &req);
    assert_eq!(
        codes(&d),
        [
            "blueprint-resource-ceiling",
            "blueprint-scope-ceiling",
            "high-sensitivity-from-named-locations",
            "confidential-data-needs-clearance",
            "finance-ledger-business-hours"
        ]
    );
    assert_eq!(d.reasons[0].effect, Some(PolicyEffect::Forbid));
    assert_eq!(&*d.reasons[0].reason, "the resource is not one of the agent's blueprint resources");
    assert_eq!(d.revision, *snap.revision());
}

#[test]
fn every_failing_guard_is_listed() {
    let snap = sample();
    let d = evaluate(&snap, &Overlay::new(), &request(r#"{"agent": "nobody", "resource": "nothing"}"#));
    assert_eq!(codes(&d), ["unknown_agent", "unknown_resource"]);
    assert_eq!(&*d.reasons[0].reason, "agent `nobody` is not in the directory");
}

#[test]
fn live_signals_override_the_directory() {
    let snap = sample();
    let live = Overlay::new();
    let req = mail_read();
    assert!(evaluate(&snap, &live, &req).is_allow());

    let at = "2026-11-27T09:00:00Z".parse().unwrap();
    let signal = |kind: &str, target: &str, reason: &str| {
        Signal::new(kind, target, "", reason, "admin@contoso").unwrap().sent_at(at)
    };
    let mut sent = vec![signal("disable_agent", "ag-mail-01", "token theft suspected")];
    let d = evaluate(&snap, &Overlay::from_signals(&sent), &req);
    assert_eq!(codes(&d), ["agent_disabled"]);
    assert_eq!(
        &*d.reasons[0].reason,
        "agent `ag-mail-01` was disabled by admin@contoso at 2026-11-27T09:00:00Z: token theft suspected"
    );
    sent.push(signal("enable_agent", "ag-mail-01", ""));
    assert!(evaluate(&snap, &Overlay::from_signals(&sent), &req).is_allow());

    sent.push(signal("confirm_compromised", "ag-mail-01", "confirmed compromised"));
    assert_eq!(codes(&evaluate(&snap, &Overlay::from_signals(&sent), &req)), ["block-high-risk-agents"]);
    sent.push(signal("confirm_safe", "ag-mail-01", "confirmed safe"));

    sent.push(signal("disable_blueprint", "bp-mail", ""));
    assert_eq!(codes(&evaluate(&snap, &Overlay::from_signals(&sent), &req)), ["blueprint_disabled"]);
    sent.push(signal("enable_blueprint", "bp-mail", ""));

    sent.push(signal("sponsor_inactive", "s-alice", "left the company"));
    assert_eq!(codes(&evaluate(&snap, &Overlay::from_signals(&sent), &req)), ["sponsor_inactive"]);

    // A signal can also lift the directory's value: ag-support-02 is disabled there.
    let support = request(r#"{"agent": "ag-support-02", "resource": "tickets", "scopes": ["Tickets.Read"]}"#);
    assert_eq!(codes(&evaluate(&snap, &Overlay::from_signals(&sent), &support)), ["agent_disabled"]);
    sent.push(signal("enable_agent", "ag-support-02", "investigated"));
    let live = Overlay::from_signals(&sent);
    assert!(evaluate(&snap, &live, &support).is_allow());
}

#[test]
fn explain_names_the_first_unmet_part() {
    let (_dir, snap) = with_policies(
        r#"@id("p-principal") permit(principal == Agent::"ag-mail-02", action, resource);
           @id("p-action") permit(principal, action == Action::"call_api", resource);
           @id("p-resource") permit(principal, action, resource == Resource::"ledger");
           @id("p-condition") permit(principal in Sponsor::"s-alice", action, resource) when { context.hour > 22 };
           @id("p-applied") permit(principal in Blueprint::"bp-mail", action, resource);
           @id("p-error") forbid(principal, action, resource) when { context.hour + 9223372036854775807 > 0 };"#,
    );
    let got: Vec<_> = explain(&snap, &Overlay::new(), &mail_read())
        .into_iter()
        .map(|e| (e.policy.to_string(), e.outcome, e.unmet))
        .collect();
    use ExplainOutcome::*;
    assert_eq!(
        got,
        [
            ("p-principal".into(), NotApplied, Some(Unmet::Principal)),
            ("p-action".into(), NotApplied, Some(Unmet::Action)),
            ("p-resource".into(), NotApplied, Some(Unmet::Resource)),
            ("p-condition".into(), NotApplied, Some(Unmet::Condition)),
            ("p-applied".into(), Applied, None),
            ("p-error".into(), Error, None),
        ]
    );
}

#[test]
fn an_action_group_in_the_schema_is_resolved_like_cedar() {
    // The bundle's schema puts call_api in request_token: `action in Action::"request_token"`
    // then covers call_api too, and the index must file the forbid under both.
    let dir = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in ["directory.json", "locations.json"] {
        std::fs::copy(sample.join(f), dir.path().join(f)).unwrap();
    }
    let schema = std::fs::read_to_string(sample.join("schema.cedarschema")).unwrap();
    let grouped =
        schema.replace("action call_api appliesTo {", "action call_api in [Action::\"request_token\"] appliesTo {");
    assert_ne!(schema, grouped);
    std::fs::write(dir.path().join("schema.cedarschema"), grouped).unwrap();
    std::fs::write(
        dir.path().join("p.cedar"),
        r#"@id("allow-all") permit(principal, action, resource);
           @id("no-tokens") forbid(principal, action in Action::"request_token", resource);
           @id("no-exact") forbid(principal, action == Action::"request_token", resource) when { context.flow == "agent_user" };"#,
    )
    .unwrap();
    let snap = Snapshot::load(dir.path()).unwrap();
    let call = request(
        r#"{"agent": "ag-support-01", "resource": "tickets", "action": "call_api", "method": "GET", "path": "/"}"#,
    );
    let d = evaluate(&snap, &Overlay::new(), &call);
    assert_eq!(codes(&d), ["no-tokens"]);

    // Plain Cedar over the whole set agrees.
    let agent = snap.agent("ag-support-01").unwrap();
    let resource = snap.resource("tickets").unwrap();
    let (cedar, entities) = snap.cedar_request(&call, agent, resource, RiskLevel::None).unwrap();
    let mut all = PolicySet::new();
    for p in snap.policies() {
        all.add(p.policy.clone()).unwrap();
    }
    let full = snap.is_authorized(&cedar, &all, &entities);
    assert_eq!(full.decision(), cedar_policy::Decision::Deny);
    assert_eq!(full.diagnostics().reason().map(ToString::to_string).collect::<Vec<_>>(), ["no-tokens"]);
}

#[test]
fn the_per_thread_context_caches_follow_the_snapshot_and_the_scopes() {
    // Two snapshots that differ only in where `corp-network` is: the same request, from the
    // same thread, one after the other, must see each snapshot's own named locations.
    let policy = r#"@id("allow-all") permit(principal, action, resource);
        @id("corp-only") @reason("from corp only")
        forbid(principal, action, resource) unless { context.locations.contains("corp-network") };"#;
    let (_a_dir, a) = with_policies(policy);
    let (b_dir, _) = with_policies(policy);
    std::fs::write(b_dir.path().join("locations.json"), r#"{"corp-network": ["192.0.2.0/24"]}"#).unwrap();
    let b = Snapshot::load(b_dir.path()).unwrap();
    let live = Overlay::new();
    for _ in 0..2 {
        assert_eq!(evaluate(&a, &live, &mail_read()).decision, Verdict::Allow, "10.1.2.3 is in a's corp-network");
        assert_eq!(codes(&evaluate(&b, &live, &mail_read())), ["corp-only"], "and not in b's");
    }
    // The scope ceiling reads `context.scopes`: allowed, beyond the ceiling, allowed again.
    let snap = sample();
    let asking = |scopes: &str| {
        request(&format!(
            r#"{{"agent": "ag-mail-01", "resource": "graph", "scopes": {scopes}, "client_ip": "10.1.2.3", "time": "2026-11-25T10:00:00Z"}}"#
        ))
    };
    for _ in 0..2 {
        assert_eq!(evaluate(&snap, &live, &asking(r#"["Mail.Read"]"#)).decision, Verdict::Allow);
        let beyond = evaluate(&snap, &live, &asking(r#"["Mail.Read", "Files.ReadWrite.All"]"#));
        assert_eq!(codes(&beyond), ["blueprint-scope-ceiling"]);
        assert_eq!(evaluate(&snap, &live, &asking(r#"["Mail.Send", "Mail.Read"]"#)).decision, Verdict::Allow);
    }
}
