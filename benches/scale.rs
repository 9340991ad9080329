//! Scale: the indexed decision against full-set Cedar, and bundle load time and memory, for
//! 10 to 100,000 policies over 100,000 agents (bundles from `agentca::generate`).
//!
//! Run: `cargo bench --features tools --bench scale` (about 6 minutes on 2 cores; the
//! generator is a tool, outside the default build). `AGENTCA_SCALE_SIZES=10,1000` picks the
//! policy counts. After criterion's groups it prints per-call latency percentiles, load time
//! by phase and memory, measured in a child process per bundle so that each peak is its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentca::bundle::{Bundle, PolicyState, SCHEMA_FILE};
use agentca::engine::{Verdict, evaluate};
use agentca::generate::{Params, Probe, write_bundle};
use agentca::request::{Action, Ask, RawRequest, Request};
use agentca::signals::Overlay;
use agentca::snapshot::Snapshot;
use cedar_policy::{
    Context, Decision as CedarDecision, Entities, PolicySet, Request as CedarRequest, RestrictedExpression, Schema,
};
use chrono::{Datelike, Timelike, Utc};
use criterion::{BenchmarkId, Criterion, SamplingMode};

const SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];
const AGENTS: usize = 100_000;
/// Single calls timed one by one for the latency percentiles.
const CALLS: usize = 200_000;
/// Set in the child that loads one bundle and reports its memory.
const CHILD_ENV: &str = "AGENTCA_SCALE_MEMORY_OF";
/// Criterion's "load" group needs at least 11 loads (warm-up and 10 samples); a bundle that
/// takes longer than this to load is reported from its two measured loads instead.
const CRITERION_LOAD_LIMIT: Duration = Duration::from_secs(10);
const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One bundle, loaded, with its probe request in both forms.
struct Case {
    label: String,
    dir: PathBuf,
    snap: Snapshot,
    req: Request,
    cedar_req: CedarRequest,
    /// The whole directory as one entity set: what plain Cedar is given.
    all: Entities,
    /// The enforced policies, as one set: what plain Cedar evaluates on every call.
    on: PolicySet,
    /// Policies in the probe request's slices: what the index evaluates.
    slice: usize,
    /// A typical agent's allowed request (the median slice among the first agents), and its slice.
    typical: Option<(Request, usize)>,
}

impl Case {
    fn load(label: &str, dir: &Path, probe: &Probe) -> Case {
        let snap = Snapshot::load(dir).unwrap_or_else(|e| panic!("{}:\n{e}", dir.display()));
        let raw = RawRequest {
            agent: Some(probe.agent.clone()),
            resource: Some(probe.resource.clone()),
            scopes: probe.scopes.clone(),
            client_ip: Some("10.1.2.3".into()),
            time: Some("2026-11-25T10:00:00Z".into()),
            request_id: Some("bench".into()),
            ..RawRequest::default()
        };
        let req = raw.validate(Utc::now()).unwrap();
        let schema = Schema::from_cedarschema_str(&std::fs::read_to_string(dir.join(SCHEMA_FILE)).unwrap()).unwrap().0;
        let cedar_req = cedar_request(&snap, &schema, &req);
        let mut on = PolicySet::new();
        for p in snap.policies().iter().filter(|p| p.state == PolicyState::On) {
            on.add(p.policy.clone()).unwrap();
        }
        let slice = slice_size(&snap, &req);
        let typical = typical_request(&snap);
        let all = snap.all_entities().unwrap();
        let case = Case { label: label.into(), dir: dir.to_path_buf(), snap, req, cedar_req, all, on, slice, typical };
        case.check_agreement();
        case
    }

    /// The index and plain Cedar must give the same decision and determining policies.
    fn check_agreement(&self) {
        let ours = evaluate(&self.snap, &Overlay::new(), &self.req);
        let theirs = self.snap.is_authorized(&self.cedar_req, &self.on, &self.all);
        assert!(ours.errors.is_empty() && theirs.diagnostics().errors().next().is_none(), "{}: errors", self.label);
        let cedar_allows = theirs.decision() == CedarDecision::Allow;
        assert_eq!(ours.decision == Verdict::Allow, cedar_allows, "{}: decisions differ", self.label);
        let ours: BTreeSet<String> =
            ours.reasons.iter().filter_map(|r| r.policy.as_deref().map(str::to_string)).collect();
        let theirs: BTreeSet<String> = theirs.diagnostics().reason().map(ToString::to_string).collect();
        assert_eq!(ours, theirs, "{}: determining policies differ", self.label);
    }
}

/// Policies in a request's slices: what the index evaluates for it.
fn slice_size(snap: &Snapshot, req: &Request) -> usize {
    snap.slice_len(snap.agent(&req.agent).unwrap(), snap.resource(&req.resource).unwrap(), req.action())
}

/// An allowed request of a typical agent: among the first agents, one whose slice is the
/// median (the probe agent is given extra agent-scoped policies on purpose; this one is not).
fn typical_request(snap: &Snapshot) -> Option<(Request, usize)> {
    let mut candidates = Vec::new();
    // The first agents by id (the directory keeps no order).
    let mut agents: Vec<_> = snap.agents().collect();
    agents.sort_unstable_by_key(|a| a.id());
    for agent in agents.into_iter().take(3_000) {
        let Some(blueprint) = snap.blueprint(agent.blueprint_id()) else { continue };
        let (Some(resource), Some(scope)) = (
            blueprint.allowed_resources.first(),
            blueprint.allowed_scopes.iter().find(|s| s.ends_with(".Read")).or(blueprint.allowed_scopes.first()),
        ) else {
            continue;
        };
        let raw = RawRequest {
            agent: Some(agent.id().to_string()),
            resource: Some(resource.to_string()),
            scopes: vec![scope.to_string()],
            client_ip: Some("10.1.2.3".into()),
            time: Some("2026-11-25T10:00:00Z".into()),
            request_id: Some("bench".into()),
            ..RawRequest::default()
        };
        let req = raw.validate(Utc::now()).ok()?;
        if evaluate(snap, &Overlay::new(), &req).decision == Verdict::Allow {
            candidates.push((slice_size(snap, &req), req));
        }
    }
    candidates.sort_by_key(|(slice, req)| (*slice, req.agent.clone()));
    let (slice, req) = candidates.get(candidates.len() / 2)?.clone();
    Some((req, slice))
}

/// The probe request as plain Cedar takes it: the same context fields as the engine's.
fn cedar_request(snap: &Snapshot, schema: &Schema, req: &Request) -> CedarRequest {
    let agent = snap.agent(&req.agent).unwrap();
    let resource = snap.resource(&req.resource).unwrap();
    let s = |v: &str| RestrictedExpression::new_string(v.to_string());
    let Ask::Token { scopes, grant_type, .. } = &req.ask else { panic!("the probe asks for a token") };
    let locations = req.client_ip.into_iter().flat_map(|ip| snap.locations_containing(ip)).map(|l| s(l));
    let mut pairs = vec![
        ("scopes", RestrictedExpression::new_set(scopes.iter().map(|v| s(v)))),
        ("flow", s(req.flow.as_str())),
        ("grant_type", s(grant_type)),
        ("locations", RestrictedExpression::new_set(locations)),
        ("time", RestrictedExpression::new_datetime(req.time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())),
        ("hour", RestrictedExpression::new_long(i64::from(req.time.hour()))),
        ("weekday", s(WEEKDAYS[req.time.weekday().num_days_from_monday() as usize])),
        ("agent_risk", s(agent.risk().as_str())),
        ("signin_risk", s(req.signin_risk.as_str())),
    ];
    if let Some(ip) = req.client_ip {
        pairs.push(("client_ip", RestrictedExpression::new_ip(ip.to_string())));
    }
    let context = Context::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_string(), v))).unwrap();
    let action = snap.action_uid(Action::RequestToken).clone();
    CedarRequest::new(agent.uid().clone(), action, resource.uid().clone(), context, Some(schema)).unwrap()
}

fn params(policies: usize, agents: usize) -> Params {
    Params {
        agents,
        blueprints: (agents / 100).max(1),
        sponsors: (agents / 50).max(1),
        policies,
        resources: 50,
        seed: 1,
    }
}

fn bench(c: &mut Criterion, case: &Case, policies: usize) {
    let live = Overlay::new();
    let id = BenchmarkId::from_parameter(&case.label);

    let mut g = c.benchmark_group("decision_indexed");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.bench_function(id.clone(), |b| b.iter(|| evaluate(black_box(&case.snap), &live, black_box(&case.req))));
    if let Some((typical, _)) = &case.typical {
        let id = BenchmarkId::from_parameter(format!("{}-typical", case.label));
        g.bench_function(id, |b| b.iter(|| evaluate(black_box(&case.snap), &live, black_box(typical))));
    }
    g.finish();

    // Plain Cedar walks every policy on every call: about 0.7 µs each.
    let mut g = c.benchmark_group("decision_full_cedar");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    if policies >= 10_000 {
        g.sample_size(10).sampling_mode(SamplingMode::Flat).measurement_time(Duration::from_secs(5));
    }
    g.bench_function(id.clone(), |b| {
        b.iter(|| case.snap.is_authorized(black_box(&case.cedar_req), &case.on, &case.all))
    });
    g.finish();

    if Duration::from_millis(case.snap.load_ms()) <= CRITERION_LOAD_LIMIT {
        let mut g = c.benchmark_group("load");
        g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(if case.label == "sample" { 3 } else { 20 }));
        g.bench_function(id, |b| b.iter(|| Snapshot::load(black_box(&case.dir)).unwrap()));
        g.finish();
    }
}

/// What is printed after criterion's summary.
struct Report {
    label: String,
    policies: usize,
    slice: usize,
    decision: Verdict,
    generated: Option<(Duration, u64)>,
    /// `Snapshot::load` in this process (the first load of the bundle), in ms.
    load_ms: u64,
    /// p50, p99, p99.9, max in µs.
    latency: [f64; 4],
    /// The typical agent's slice and latency.
    typical: Option<(usize, [f64; 4])>,
    child: Option<ChildMemory>,
    /// (VmHWM, VmRSS) of this process with the bundle loaded, in kB.
    parent: (u64, u64),
}

fn latency(snap: &Snapshot, req: &Request, calls: usize) -> [f64; 4] {
    let live = Overlay::new();
    for _ in 0..calls / 10 {
        black_box(evaluate(snap, &live, req));
    }
    let mut ns: Vec<u64> = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        black_box(evaluate(black_box(snap), &live, black_box(req)));
        ns.push(started.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    [at(0.50), at(0.99), at(0.999), at(1.0)]
}

/// `VmHWM` and `VmRSS` of this process, in kB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// What the child measured: memory in kB, and its load by phase in ms.
struct ChildMemory {
    before_rss: u64,
    hwm: u64,
    rss: u64,
    /// Read, parse and validate (`Bundle::load`).
    bundle_ms: u64,
    /// Entities, index and lookups (`Snapshot::from_bundle`).
    snapshot_ms: u64,
}

/// Loads `dir` in a fresh process of this binary: its peak is the load's alone.
fn child_memory(dir: &Path) -> Option<ChildMemory> {
    let out = Command::new(std::env::current_exe().ok()?).env(CHILD_ENV, dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    match v[..] {
        [before_rss, hwm, rss, bundle_ms, snapshot_ms] => {
            Some(ChildMemory { before_rss, hwm, rss, bundle_ms, snapshot_ms })
        }
        _ => None,
    }
}

/// `Snapshot::load`, its two phases timed apart.
fn run_child(dir: &str) {
    let (_, before_rss) = memory();
    let started = Instant::now();
    let bundle = Bundle::load(Path::new(dir)).unwrap();
    let bundle_ms = started.elapsed().as_millis();
    let started = Instant::now();
    let snap = Snapshot::from_bundle(bundle).unwrap();
    let snapshot_ms = started.elapsed().as_millis();
    let (hwm, rss) = memory();
    black_box(&snap);
    println!("{before_rss} {hwm} {rss} {bundle_ms} {snapshot_ms}");
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        run_child(&dir);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    // `cargo test --benches` and `--list` run without `--bench`: keep it small and quick.
    let measuring = has("--bench") && !has("--test") && !has("--list");
    let (agents, calls) = if measuring { (AGENTS, CALLS) } else { (2_000, 1_000) };
    let sizes: Vec<usize> = match std::env::var("AGENTCA_SCALE_SIZES") {
        Ok(list) => list.split(',').map(|s| s.trim().replace('_', "").parse().unwrap()).collect(),
        Err(_) if measuring => SIZES.to_vec(),
        Err(_) => vec![10, 1_000],
    };

    let mut c = Criterion::default().configure_from_args();
    let mut reports = Vec::new();

    let sample_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let probe = Probe {
        agent: "ag-mail-01".into(),
        resource: "graph".into(),
        scopes: vec!["Mail.Read".into()],
        agent_policies: 0,
    };
    let case = Case::load("sample", &sample_dir, &probe);
    bench(&mut c, &case, case.snap.policies().len());
    reports.push(report(&case, None, calls));
    drop(case);

    for policies in sizes {
        let tmp = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let summary = write_bundle(tmp.path(), &params(policies, agents)).unwrap();
        let took = started.elapsed();
        let bytes = summary.files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).sum();
        let case = Case::load(&policies.to_string(), tmp.path(), &summary.probe);
        bench(&mut c, &case, policies);
        reports.push(report(&case, Some((took, bytes)), calls));
    }

    c.final_summary();
    print_reports(&reports, agents, calls);
}

fn report(case: &Case, generated: Option<(Duration, u64)>, calls: usize) -> Report {
    Report {
        label: case.label.clone(),
        policies: case.snap.policies().len(),
        slice: case.slice,
        decision: evaluate(&case.snap, &Overlay::new(), &case.req).decision,
        generated,
        load_ms: case.snap.load_ms(),
        latency: latency(&case.snap, &case.req, calls),
        typical: case.typical.as_ref().map(|(req, slice)| (*slice, latency(&case.snap, req, calls))),
        parent: memory(),
        child: child_memory(&case.dir),
    }
}

fn print_reports(reports: &[Report], agents: usize, calls: usize) {
    println!("\n== generated bundles ({agents} agents) ==");
    println!("{:>8} {:>10} {:>10}", "policies", "write s", "MB");
    for r in reports {
        if let Some((took, bytes)) = r.generated {
            println!("{:>8} {:>10.2} {:>10.1}", r.policies, took.as_secs_f64(), bytes as f64 / 1e6);
        }
    }
    println!("\n== engine::evaluate, {calls} single calls each timed with Instant (µs) ==");
    println!(
        "{:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "bundle", "policies", "slice", "decision", "p50", "p99", "p99.9", "max"
    );
    for r in reports {
        let [p50, p99, p999, max] = r.latency;
        let decision = format!("{:?}", r.decision).to_lowercase();
        println!(
            "{:>8} {:>8} {:>6} {:>8} {p50:>8.1} {p99:>8.1} {p999:>8.1} {max:>8.1}",
            r.label, r.policies, r.slice, decision
        );
        if let Some((slice, [p50, p99, p999, max])) = r.typical {
            let label = format!("{}-typ", r.label);
            println!(
                "{label:>8} {:>8} {slice:>6} {:>8} {p50:>8.1} {p99:>8.1} {p999:>8.1} {max:>8.1}",
                r.policies, "allow"
            );
        }
    }
    println!(
        "\n== load (ms): first load here; a fresh process by phase (Bundle::load: read, parse, validate; \
         from_bundle: entities, index) =="
    );
    println!("{:>8} {:>10} {:>10} {:>12} {:>12}", "bundle", "here", "fresh", "Bundle::load", "from_bundle");
    for r in reports {
        match &r.child {
            Some(m) => println!(
                "{:>8} {:>10} {:>10} {:>12} {:>12}",
                r.label,
                r.load_ms,
                m.bundle_ms + m.snapshot_ms,
                m.bundle_ms,
                m.snapshot_ms
            ),
            None => println!("{:>8} {:>10} (the child process failed)", r.label, r.load_ms),
        }
        if Duration::from_millis(r.load_ms) > CRITERION_LOAD_LIMIT {
            println!("{:>8} (not in criterion's load group: one load exceeds {CRITERION_LOAD_LIMIT:?})", "");
        }
    }
    println!("\n== memory (MB): a fresh process loading each bundle; this process, cumulative ==");
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "bundle", "RSS before", "peak", "RSS after", "retained", "this VmHWM", "this VmRSS"
    );
    for r in reports {
        let (hwm, rss) = r.parent;
        match &r.child {
            Some(m) => println!(
                "{:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12.1}",
                r.label,
                mb(m.before_rss),
                mb(m.hwm),
                mb(m.rss),
                mb(m.rss.saturating_sub(m.before_rss)),
                mb(hwm),
                mb(rss)
            ),
            None => println!("{:>8} (the child process failed) {:>12.1} {:>12.1}", r.label, mb(hwm), mb(rss)),
        }
    }
}
