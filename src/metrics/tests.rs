use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::engine::Reason;

/// The samples of a Prometheus text exposition: `name{labels}` (labels as written) → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse::<f64>().unwrap())
        })
        .collect()
}

fn sample_bundle() -> Snapshot {
    Snapshot::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
}

fn by_policy(policy: &str, verdict: Verdict) -> Decision {
    let mut d = Decision::deny(ReasonCode::NoPermit, "x", "rev".into(), None);
    d.decision = verdict;
    d.reasons =
        vec![Reason { code: ReasonCode::Policy, policy: Some(policy.into()), effect: None, reason: "r".into() }];
    d
}

#[test]
fn decisions_are_counted_by_verdict_code_and_policy() {
    let snap = sample_bundle();
    let metrics = Metrics::new();
    metrics.serving(&snap);
    let on = snap.policies().iter().find(|p| p.state == PolicyState::On).unwrap().id.to_string();
    metrics.decided(&by_policy(&on, Verdict::Allow));
    metrics.decided(&by_policy(&on, Verdict::Allow));
    metrics.decided(&by_policy("not-in-the-bundle", Verdict::Deny));
    metrics.decided(&Decision::deny(ReasonCode::UnknownAgent, "x", "rev".into(), None));
    assert_eq!(metrics.decisions(Verdict::Allow, ReasonCode::Policy), 2);
    assert_eq!(metrics.decisions(Verdict::Deny, ReasonCode::Policy), 1);
    assert_eq!(metrics.decisions(Verdict::Deny, ReasonCode::UnknownAgent), 1);

    let text = metrics.render(Sample { revision: Some(snap.revision().clone()), ..Sample::default() });
    let s = samples(&text);
    assert_eq!(s[r#"agentca_decisions_total{decision="allow",code="policy"}"#], 2.0);
    assert_eq!(s[r#"agentca_decisions_total{decision="deny",code="unknown_agent"}"#], 1.0);
    assert_eq!(s[&format!(r#"agentca_policy_decisions_total{{policy="{on}"}}"#)], 2.0);
    assert!(!text.contains("not-in-the-bundle"), "{text}");
    assert_eq!(s[&format!(r#"agentca_bundle_info{{revision="{}"}}"#, snap.revision())], 1.0);
    // Every enforced policy is exposed, at zero until it decides.
    let enforced = snap.policies().iter().filter(|p| p.state == PolicyState::On).count();
    assert_eq!(s.keys().filter(|k| k.starts_with("agentca_policy_decisions_total")).count(), enforced);
}

#[test]
fn the_policy_label_set_follows_the_served_bundle() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let first = Snapshot::load(dir.path()).unwrap();
    let metrics = Metrics::new();
    metrics.serving(&first);
    let kept = first.policies().iter().find(|p| p.state == PolicyState::On).unwrap().id.to_string();
    metrics.decided(&by_policy(&kept, Verdict::Allow));
    // A new revision with one more policy: its id joins, the kept policy keeps its count.
    std::fs::write(
        dir.path().join("extra.cedar"),
        "@id(\"extra-permit\")\n@reason(\"extra\")\npermit(principal, action, resource) when { false };\n",
    )
    .unwrap();
    let second = Snapshot::load(dir.path()).unwrap();
    metrics.serving(&second);
    let s = samples(&metrics.render(Sample::default()));
    assert_eq!(s[&format!(r#"agentca_policy_decisions_total{{policy="{kept}"}}"#)], 1.0);
    assert_eq!(s[r#"agentca_policy_decisions_total{policy="extra-permit"}"#], 0.0);
    // And leaves again with it.
    std::fs::remove_file(dir.path().join("extra.cedar")).unwrap();
    metrics.serving(&Snapshot::load(dir.path()).unwrap());
    let text = metrics.render(Sample::default());
    assert!(!text.contains("extra-permit"), "{text}");
    assert!(!text.contains("agentca_bundle_info{"), "no revision, no info: {text}");
}

#[test]
fn histograms_are_cumulative_with_sum_and_count() {
    // Bounds are written as Go writes floats (`5e-06`), as Prometheus's own clients do.
    let metrics = Metrics::new();
    for us in [3, 7, 7, 40, 20_000_000] {
        metrics.evaluated(us);
    }
    let s = samples(&metrics.render(Sample::default()));
    assert_eq!(s[r#"agentca_decision_seconds_bucket{le="5e-06"}"#], 1.0);
    assert_eq!(s[r#"agentca_decision_seconds_bucket{le="1e-05"}"#], 3.0);
    assert_eq!(s[r#"agentca_decision_seconds_bucket{le="5e-05"}"#], 4.0);
    assert_eq!(s[r#"agentca_decision_seconds_bucket{le="10"}"#], 4.0);
    assert_eq!(s[r#"agentca_decision_seconds_bucket{le="+Inf"}"#], 5.0);
    assert_eq!(s["agentca_decision_seconds_count"], 5.0);
    assert!((s["agentca_decision_seconds_sum"] - 20.000057).abs() < 1e-9);
}

#[test]
fn rpcs_are_labelled_from_a_closed_set() {
    let metrics = Metrics::new();
    let evaluate = Rpc::of_path("/agentca.v1.DecisionService/Evaluate");
    assert_eq!((evaluate.service(), evaluate.method()), ("agentca.v1.DecisionService", "Evaluate"));
    metrics.handled(evaluate, 0, Duration::from_micros(80));
    metrics.handled(evaluate, 3, Duration::from_micros(80));
    // Any other path is `unknown`, and so is a status code out of range (as Unknown).
    for path in ["/agentca.v1.DecisionService/Nope", "/x", "", "//", "/a/b/c"] {
        let rpc = Rpc::of_path(path);
        assert_eq!((rpc.service(), rpc.method()), ("unknown", "unknown"), "{path}");
        metrics.handled(rpc, 99, Duration::ZERO);
    }
    let s = samples(&metrics.render(Sample::default()));
    let handled = |m: &str, c: &str| {
        s[&format!(
            r#"grpc_server_handled_total{{grpc_service="agentca.v1.DecisionService",grpc_method="{m}",grpc_code="{c}"}}"#
        )]
    };
    assert_eq!(handled("Evaluate", "OK"), 1.0);
    assert_eq!(handled("Evaluate", "InvalidArgument"), 1.0);
    assert_eq!(
        s[r#"grpc_server_handled_total{grpc_service="unknown",grpc_method="unknown",grpc_code="Unknown"}"#],
        5.0
    );
    assert_eq!(s[r#"agentca_rpc_seconds_count{method="Evaluate",service="agentca.v1.DecisionService"}"#], 2.0);
}

#[test]
fn every_refusal_reason_is_exposed_and_in_flight_follows_its_guards() {
    let metrics = Metrics::new();
    metrics.refused(Refusal::CallTimeout);
    let a = metrics.call();
    let _b = metrics.call();
    drop(a);
    let s = samples(&metrics.render(Sample::default()));
    for r in Refusal::ALL {
        let n = s[&format!(r#"agentca_refused_total{{reason="{}"}}"#, r.as_str())];
        assert_eq!(n, if r == Refusal::CallTimeout { 1.0 } else { 0.0 });
    }
    assert_eq!(s["agentca_in_flight"], 1.0);
}

#[test]
fn sampled_gauges_and_audit_counters_are_rendered() {
    let metrics = Metrics::new();
    metrics.audit_wrote(Duration::from_millis(2));
    metrics.reloaded(&Reloaded::Unchanged("r".into()));
    metrics.signalled(SignalKind::DisableAgent);
    let sample = Sample {
        revision: Some("sha256:abc".into()),
        stale_seconds: 7,
        live_signals: 3,
        audit_pending: 2,
        audit_written: 11,
        audit_errors: 1,
        fleet: Some(crate::metrics::FleetSample {
            replicas: 3,
            lag: 2,
            revision_disagreement: true,
            stale_seconds: 4,
            healthy: false,
        }),
    };
    let s = samples(&metrics.render(sample));
    assert_eq!((s["agentca_fleet_replicas"], s["agentca_live_lag"]), (3.0, 2.0));
    assert_eq!((s["agentca_bundle_revision_disagreement"], s["agentca_live_stale_seconds"]), (1.0, 4.0));
    assert_eq!(s["agentca_live_healthy"], 0.0);
    assert_eq!(s["agentca_bundle_stale_seconds"], 7.0);
    assert_eq!(s["agentca_live_signals"], 3.0);
    assert_eq!(s["agentca_audit_queue_depth"], 2.0);
    assert_eq!(s["agentca_audit_records_total"], 11.0);
    assert_eq!(s["agentca_audit_errors_total"], 1.0);
    assert_eq!(s["agentca_audit_write_seconds_count"], 1.0);
    assert_eq!(s[r#"agentca_reloads_total{outcome="unchanged"}"#], 1.0);
    assert_eq!(s[r#"agentca_signals_total{kind="disable_agent"}"#], 1.0);
    assert_eq!(s[r#"agentca_signals_total{kind="clear"}"#], 0.0);
}
