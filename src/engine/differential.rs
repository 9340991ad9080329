//! Differential property test: the index (slices + one evaluator per request) must agree
//! with plain Cedar over the whole policy set: same decision, same determining policies,
//! same erroring policies, and the same report-only matches.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use cedar_policy::{Decision as CedarDecision, PolicySet};
use chrono::{TimeZone, Utc};
use proptest::prelude::*;

use super::*;
use crate::bundle::PolicyState;
use crate::directory::RiskLevel;
use crate::request::Ask;

const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");

#[derive(Debug, Clone)]
struct Gen {
    blueprints: usize,
    sponsors: usize,
    /// (blueprint, sponsor, env tag, risk) per agent.
    agents: Vec<(usize, usize, Option<&'static str>, &'static str)>,
    /// Sensitivity per resource.
    resources: Vec<&'static str>,
    policies: Vec<GenPolicy>,
}

#[derive(Debug, Clone)]
struct GenPolicy {
    forbid: bool,
    state: u8,
    principal: u8,
    principal_arg: usize,
    action: u8,
    resource: u8,
    resource_arg: usize,
    condition: u8,
}

const RISKS: [&str; 4] = ["none", "low", "medium", "high"];
const SENSITIVITY: [&str; 3] = ["low", "medium", "high"];

fn bundles() -> impl Strategy<Value = Gen> {
    (1usize..4, 1usize..4, 1usize..7, 1usize..4).prop_flat_map(|(b, s, a, r)| {
        let agent = (
            0..b,
            0..s,
            prop::option::of(prop::sample::select(vec!["prod", "dev"])),
            prop::sample::select(RISKS.to_vec()),
        );
        let policy = (any::<bool>(), 0u8..4, 0u8..9, 0usize..8, 0u8..4, 0u8..5, 0usize..4, 0u8..16).prop_map(
            |(forbid, state, principal, principal_arg, action, resource, resource_arg, condition)| GenPolicy {
                forbid,
                state,
                principal,
                principal_arg,
                action,
                resource,
                resource_arg,
                condition,
            },
        );
        (
            Just(b),
            Just(s),
            prop::collection::vec(agent, a),
            prop::collection::vec(prop::sample::select(SENSITIVITY.to_vec()), r),
            prop::collection::vec(policy, 0..14),
        )
            .prop_map(|(blueprints, sponsors, agents, resources, policies)| Gen {
                blueprints,
                sponsors,
                agents,
                resources,
                policies,
            })
    })
}

impl Gen {
    fn directory(&self) -> String {
        let mut d = String::from("{\"sponsors\": [");
        d += &(0..self.sponsors).map(|i| format!("{{\"id\": \"s{i}\"}}")).collect::<Vec<_>>().join(",");
        d += "], \"blueprints\": [";
        let all_resources = (0..self.resources.len()).map(|i| format!("\"r{i}\"")).collect::<Vec<_>>().join(",");
        d += &(0..self.blueprints)
            .map(|i| format!("{{\"id\": \"b{i}\", \"allowed_resources\": [{all_resources}]}}"))
            .collect::<Vec<_>>()
            .join(",");
        d += "], \"agents\": [";
        d += &self
            .agents
            .iter()
            .enumerate()
            .map(|(i, (b, s, env, risk))| {
                let tags = env.map_or(String::new(), |e| format!("\"env\": \"{e}\""));
                format!("{{\"id\": \"a{i}\", \"blueprint\": \"b{b}\", \"sponsor\": \"s{s}\", \"risk\": \"{risk}\", \"tags\": {{{tags}}}}}")
            })
            .collect::<Vec<_>>()
            .join(",");
        d += "], \"resources\": [";
        d += &self
            .resources
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{{\"id\": \"r{i}\", \"sensitivity\": \"{s}\"}}"))
            .collect::<Vec<_>>()
            .join(",");
        d + "]}"
    }

    fn policies(&self) -> String {
        let mut out = String::new();
        for (i, p) in self.policies.iter().enumerate() {
            let state = ["on", "on", "report-only", "off"][p.state as usize];
            let n = p.principal_arg;
            // Ids past the directory's (a9, b9, s9) exercise scopes naming no one.
            let principal = match p.principal {
                0 => "principal".to_string(),
                1 => format!("principal == Agent::\"a{}\"", if n >= 7 { 9 } else { n }),
                2 => format!("principal in Blueprint::\"b{}\"", if n >= 4 { 9 } else { n % 4 }),
                3 => format!("principal in Sponsor::\"s{}\"", if n >= 4 { 9 } else { n % 4 }),
                4 => "principal is Agent".to_string(),
                5 => format!("principal is Agent in Blueprint::\"b{}\"", n % 4),
                6 => format!("principal in Agent::\"a{}\"", n % 7),
                7 => format!("principal is Agent in Sponsor::\"s{}\"", n % 4),
                // Never an agent: the index drops these; Cedar must agree they never match.
                _ => format!("principal == Blueprint::\"b{}\"", n % 4),
            };
            let action = [
                "action",
                "action == Action::\"request_token\"",
                "action == Action::\"call_api\"",
                "action in [Action::\"request_token\", Action::\"call_api\"]",
            ][p.action as usize];
            let resource = match p.resource {
                0 => "resource".to_string(),
                1 => format!("resource == Resource::\"r{}\"", p.resource_arg),
                2 => "resource is Resource".to_string(),
                3 => format!("resource in Resource::\"r{}\"", p.resource_arg),
                _ => "resource in Blueprint::\"b0\"".to_string(),
            };
            let condition = [
                "",
                "when { context.agent_risk == \"high\" }",
                "when { resource.sensitivity == \"high\" }",
                "when { principal.hasTag(\"env\") && principal.getTag(\"env\") == \"prod\" }",
                "unless { context.hour > 12 }",
                // Overflows for any hour after midnight: a runtime error.
                "when { context.hour + 9223372036854775807 > 0 }",
                "when { context.locations.contains(\"corp\") }",
                "when { principal.blueprint.allowed_resources.contains(resource) && context.flow == \"app_only\" }",
                // Conjuncts that read no context come before, after and around ones that do (the
                // index learns the former once per agent, resource and action), and one of them
                // fails for some agents only.
                "when { resource.sensitivity == \"high\" } unless { context.hour > 12 }",
                "when { context.hour > 12 && principal.blueprint.allowed_resources.contains(resource) }",
                "when { principal.hasTag(\"env\") } unless { principal.getTag(\"env\") == \"prod\" || context.locations.contains(\"corp\") }",
                "when { principal.hasTag(\"env\") && principal.getTag(\"env\") == \"prod\" && 9223372036854775807 + 1 > 0 }",
                // Set literals (the index tests their values one by one instead of building them).
                "when { [1, 5, 13, 20].contains(context.hour) }",
                "unless { context.locations.containsAny([\"corp\", \"lab\"]) || [\"x\"].containsAny(context.locations) }",
                "when { principal.hasTag(\"env\") && !([\"prod\", \"dev\"].contains(principal.getTag(\"env\"))) }",
                "unless { context.locations.containsAll([\"corp\", \"lab\"]) }",
            ][p.condition as usize];
            let effect = if p.forbid { "forbid" } else { "permit" };
            let _ = writeln!(
                out,
                "@id(\"p{i}\") @state(\"{state}\") {effect}({principal}, {action}, {resource}) {condition};"
            );
        }
        out
    }
}

#[derive(Debug, Clone)]
struct GenRequest {
    agent: usize,
    resource: usize,
    call_api: bool,
    hour: u32,
    corp: bool,
}

fn gen_request() -> impl Strategy<Value = GenRequest> {
    (0usize..7, 0usize..4, any::<bool>(), 0u32..24, any::<bool>())
        .prop_map(|(agent, resource, call_api, hour, corp)| GenRequest { agent, resource, call_api, hour, corp })
}

fn ids<'a>(it: impl Iterator<Item = &'a Compiled>) -> BTreeSet<String> {
    it.map(|p| p.id.to_string()).collect()
}

fn cedar_ids<'a>(it: impl Iterator<Item = &'a cedar_policy::PolicyId>) -> BTreeSet<String> {
    it.map(ToString::to_string).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn index_agrees_with_full_cedar(g in bundles(), requests in prop::collection::vec(gen_request(), 1..8)) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("schema.cedarschema"), SCHEMA).unwrap();
        std::fs::write(dir.path().join("directory.json"), g.directory()).unwrap();
        std::fs::write(dir.path().join("locations.json"), r#"{"corp": ["10.0.0.0/8"]}"#).unwrap();
        std::fs::write(dir.path().join("p.cedar"), g.policies()).unwrap();
        let snap = Snapshot::load(dir.path()).unwrap_or_else(|e| panic!("{e}\n{}", g.policies()));

        let set_of = |state: PolicyState, effect: Option<Effect>| {
            let mut set = PolicySet::new();
            for p in snap.policies().iter().filter(|p| p.state == state && effect.is_none_or(|e| p.effect == e)) {
                set.add(p.policy.clone()).unwrap();
            }
            set
        };
        // Plain Cedar's entities: the whole directory, from its JSON with the schema, by
        // Cedar's public API (nothing of ours).
        let schema = cedar_policy::Schema::from_cedarschema_str(SCHEMA).unwrap().0;
        let oracle = crate::directory::entity_tests::reference(&g.directory(), &schema);
        let full_on = set_of(PolicyState::On, None);
        let full_ro_forbid = set_of(PolicyState::ReportOnly, Some(Effect::Forbid));
        let full_ro_permit = set_of(PolicyState::ReportOnly, Some(Effect::Permit));

        for r in requests {
            let agent = format!("a{}", r.agent % g.agents.len());
            let resource = format!("r{}", r.resource % g.resources.len());
            let time = Utc.with_ymd_and_hms(2026, 11, 25, r.hour, 30, 0).unwrap();
            let ask = if r.call_api {
                Ask::Call { method: "GET".into(), path: "/".into() }
            } else {
                Ask::Token { scopes: Vec::new(), grant_type: "client_credentials".into(), user: None }
            };
            let req = Request {
                agent: agent.clone(),
                resource: resource.clone(),
                ask,
                flow: crate::request::Flow::AppOnly,
                client_ip: Some(if r.corp { "10.1.1.1" } else { "192.0.2.1" }.parse().unwrap()),
                time,
                signin_risk: RiskLevel::None,
                request_id: None,
            };
            let a = snap.agent(&agent).unwrap();
            let res = snap.resource(&resource).unwrap();
            let (cedar, entities) = snap.cedar_request(&req, a, res, a.risk()).unwrap();
            let full = snap.is_authorized(&cedar, &full_on, &oracle);
            let full_errors: BTreeSet<String> = full.diagnostics().errors().map(|e| {
                let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = e;
                e.policy_id().to_string()
            }).collect();
            let ro_forbid = snap.is_authorized(&cedar, &full_ro_forbid, &oracle);
            let ro_permit = snap.is_authorized(&cedar, &full_ro_permit, &oracle);
            // Twice: the first evaluation of a key learns its context-free conjuncts, the
            // second uses them; both must agree with Cedar.
            for _ in 0..2 {
                let got = snap.evaluate_slices(a, res, req.action(), &cedar, &entities);
                prop_assert_eq!(got.on.allows(), full.decision() == CedarDecision::Allow, "decision\n{}", g.policies());
                prop_assert_eq!(ids(got.on.determining().iter().copied()), cedar_ids(full.diagnostics().reason()), "determining\n{}", g.policies());
                prop_assert_eq!(ids(got.on.errors.iter().map(|(p, _)| *p)), full_errors.clone(), "errors\n{}", g.policies());
                prop_assert_eq!(ids(got.report_only.forbids.iter().copied()), cedar_ids(ro_forbid.diagnostics().reason()));
                prop_assert_eq!(ids(got.report_only.permits.iter().copied()), cedar_ids(ro_permit.diagnostics().reason()));
            }
        }
    }
}
