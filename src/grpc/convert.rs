//! Proto messages to and from our types.

use crate::engine::{Decision, Verdict};
use crate::request::{RawRequest, RequestError};

use super::pb;

fn opt(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

impl From<pb::EvaluateRequest> for RawRequest {
    fn from(r: pb::EvaluateRequest) -> Self {
        RawRequest {
            // An empty agent or resource is sent on so that validation names it.
            agent: Some(r.agent),
            resource: Some(r.resource),
            action: opt(r.action),
            scopes: r.scopes,
            flow: opt(r.flow),
            grant_type: opt(r.grant_type),
            user: opt(r.user),
            client_ip: opt(r.client_ip),
            time: opt(r.time),
            signin_risk: opt(r.signin_risk),
            request_id: opt(r.request_id),
            method: opt(r.method),
            path: opt(r.path),
        }
    }
}

impl From<RawRequest> for pb::EvaluateRequest {
    fn from(r: RawRequest) -> Self {
        pb::EvaluateRequest {
            agent: r.agent.unwrap_or_default(),
            resource: r.resource.unwrap_or_default(),
            action: r.action.unwrap_or_default(),
            scopes: r.scopes,
            flow: r.flow.unwrap_or_default(),
            grant_type: r.grant_type.unwrap_or_default(),
            user: r.user.unwrap_or_default(),
            client_ip: r.client_ip.unwrap_or_default(),
            time: r.time.unwrap_or_default(),
            signin_risk: r.signin_risk.unwrap_or_default(),
            request_id: r.request_id.unwrap_or_default(),
            method: r.method.unwrap_or_default(),
            path: r.path.unwrap_or_default(),
        }
    }
}

pub fn verdict(v: Verdict) -> i32 {
    match v {
        Verdict::Allow => pb::Verdict::Allow as i32,
        Verdict::Deny => pb::Verdict::Deny as i32,
    }
}

impl From<Decision> for pb::Decision {
    fn from(d: Decision) -> Self {
        pb::Decision {
            decision: verdict(d.decision),
            decision_id: d.decision_id,
            request_id: d.request_id.unwrap_or_default(),
            reasons: d
                .reasons
                .into_iter()
                .map(|r| pb::Reason {
                    code: r.code.as_str().to_string(),
                    policy: r.policy.map(|p| p.to_string()).unwrap_or_default(),
                    effect: r.effect.map(effect).unwrap_or_default(),
                    reason: r.reason.to_string(),
                })
                .collect(),
            report_only: d
                .report_only
                .into_iter()
                .map(|r| pb::ReportOnlyMatch {
                    policy: r.policy.to_string(),
                    effect: effect(r.effect),
                    reason: r.reason.to_string(),
                })
                .collect(),
            report_only_decision: verdict(d.report_only_decision),
            errors: d
                .errors
                .into_iter()
                .map(|e| pb::PolicyError {
                    policy: e.policy.to_string(),
                    message: e.message,
                    report_only: e.report_only,
                })
                .collect(),
            revision: d.revision.to_string(),
            eval_us: d.eval_us,
        }
    }
}

fn effect(e: crate::engine::PolicyEffect) -> String {
    match e {
        crate::engine::PolicyEffect::Permit => "permit".into(),
        crate::engine::PolicyEffect::Forbid => "forbid".into(),
    }
}

pub fn item_error(e: &RequestError) -> pb::ItemError {
    pb::ItemError {
        code: "invalid_argument".into(),
        field: e.field_name().unwrap_or_default().to_string(),
        message: e.to_string(),
    }
}
