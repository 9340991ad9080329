//! One decision end to end (typed request -> Decision with reasons) on the sample bundle, and
//! one through the service (validation, decision, its metrics; the audit log off).
//!
//! Run: `cargo bench --bench evaluate`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use agentca::engine::evaluate;
use agentca::request::{RawRequest, Request};
use agentca::signals::{Overlay, Signal};
use agentca::snapshot::Snapshot;
use chrono::Utc;
use criterion::{Criterion, criterion_group, criterion_main};

/// The sample bundle of `policies/`.
fn sample_snapshot() -> Snapshot {
    Snapshot::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
}

fn request(json: &str) -> Request {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    RawRequest::from_json(&v).unwrap().validate(Utc::now()).unwrap()
}

fn sample(c: &mut Criterion) {
    let snap = sample_snapshot();
    let live = Overlay::new();
    let cases = [
        (
            "allow",
            r#"{"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"], "client_ip": "10.1.2.3",
                "time": "2026-11-25T10:00:00Z", "request_id": "r-1"}"#,
        ),
        (
            "deny_forbid",
            r#"{"agent": "ag-recon-01", "resource": "ledger", "scopes": ["Ledger.Read"], "client_ip": "203.0.113.7",
                "time": "2026-11-25T10:00:00Z"}"#,
        ),
        ("deny_guard", r#"{"agent": "ag-support-02", "resource": "tickets", "scopes": ["Tickets.Read"]}"#),
    ];
    let mut group = c.benchmark_group("sample_bundle");
    for (name, json) in cases {
        let req = request(json);
        group.bench_function(name, |b| b.iter(|| evaluate(black_box(&snap), &live, black_box(&req))));
    }
    // Two threads deciding at once, as the server's two workers do under load; the time is
    // per decision of one thread. `_two_threads`: one snapshot, so what both decisions write
    // to (reference counts, the memo's lock) moves between the cores' caches; `_two_snapshots`:
    // each thread its own copy of the bundle (loaded twice), so what is left is the host's:
    // two cores busy at once.
    let copies = [(sample_snapshot(), Overlay::new()), (sample_snapshot(), Overlay::new())];
    for (name, json) in &cases[..2] {
        let req = request(json);
        for (variant, pair) in [
            ("two_threads", [(&snap, &live), (&snap, &live)]),
            ("two_snapshots", copies.each_ref().map(|(s, l)| (s, l))),
        ] {
            group.bench_function(format!("{name}_{variant}"), |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    std::thread::scope(|scope| {
                        for (snap, live) in pair {
                            let req = &req;
                            scope.spawn(move || {
                                (0..iters).for_each(|_| drop(black_box(evaluate(snap, live, black_box(req)))))
                            });
                        }
                    });
                    started.elapsed()
                })
            });
        }
    }
    // Every request a millisecond apart from the last and from another client: the per-thread
    // cache of the last `time` and `client_ip` values never hits (the worst case).
    let base = request(cases[0].1);
    let fresh: Vec<_> = (0..1024)
        .map(|i| {
            let mut r = base.clone();
            r.time += chrono::Duration::milliseconds(i);
            r.client_ip = Some(format!("10.1.{}.{}", i / 256, i % 256).parse().unwrap());
            r
        })
        .collect();
    let mut i = 0;
    group.bench_function("allow_uncached", |b| {
        b.iter(|| {
            i = (i + 1) % fresh.len();
            evaluate(black_box(&snap), &live, black_box(&fresh[i]))
        })
    });
    // Every agent of the sample in turn, each with a resource and scope of its blueprint:
    // more agents than a thread keeps the entities of, so each request builds its own.
    let rounds: Vec<Request> = snap
        .agents()
        .filter_map(|a| {
            let blueprint = snap.blueprint(a.blueprint_id())?;
            let (resource, scope) = (blueprint.allowed_resources.first()?, blueprint.allowed_scopes.first()?);
            Some(request(&format!(
                r#"{{"agent": "{}", "resource": "{resource}", "scopes": ["{scope}"], "client_ip": "10.1.2.3",
                    "time": "2026-11-25T10:00:00Z"}}"#,
                a.id()
            )))
        })
        .collect();
    assert!(rounds.len() > 8);
    let mut i = 0;
    group.bench_function("agents_round_robin", |b| {
        b.iter(|| {
            i = (i + 1) % rounds.len();
            evaluate(black_box(&snap), &live, black_box(&rounds[i]))
        })
    });
    group.finish();
}

/// What a live signal costs a decision: an empty overlay (no lookups), 10,000 live values
/// for other agents, and a live value for the agent being decided.
fn signals(c: &mut Criterion) {
    let snap = sample_snapshot();
    let req = request(
        r#"{"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"], "client_ip": "10.1.2.3",
            "time": "2026-11-25T10:00:00Z"}"#,
    );
    let signal = |kind: &str, target: &str, risk: &str| Signal::new(kind, target, risk, "bench", "bench").unwrap();
    let mut group = c.benchmark_group("signals");
    let empty = Overlay::new();
    group.bench_function("overlay_empty", |b| b.iter(|| evaluate(&snap, &empty, black_box(&req))));
    let others: Vec<Signal> = (0..10_000).map(|i| signal("disable_agent", &format!("ag-other-{i}"), "")).collect();
    let others = Overlay::from_signals(&others);
    group.bench_function("overlay_10k_others", |b| b.iter(|| evaluate(&snap, &others, black_box(&req))));
    let this =
        Overlay::from_signals(&[signal("enable_agent", "ag-mail-01", ""), signal("set_risk", "ag-mail-01", "low")]);
    group.bench_function("overlay_this_agent", |b| b.iter(|| evaluate(&snap, &this, black_box(&req))));
    group.finish();
}

/// `Service::decide`: what the gRPC and Envoy doors call for each request, minus the transport
/// and the audit log: the raw request validated, decided, and counted.
fn service(c: &mut Criterion) {
    use agentca::audit::{Audit, Config, Target};
    use agentca::records::Caller;
    use agentca::service::{Service, Settings};
    use agentca::snapshot::Store;

    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let store = Store::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap();
    let audit = Audit::start(Config::new(Target::Off)).unwrap();
    let service = Service::new(store, Overlay::new(), None, None, audit, Settings::default());
    let caller = Caller { peer: Some("127.0.0.1:50000".into()), via: "grpc", ..Caller::default() };
    let raw = |json: &str| RawRequest::from_json(&serde_json::from_str(json).unwrap()).unwrap();
    let cases = [
        (
            "decide_allow",
            raw(r#"{"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"], "client_ip": "10.1.2.3",
                "time": "2026-11-25T10:00:00Z", "request_id": "r-1"}"#),
        ),
        (
            "decide_deny_forbid",
            raw(r#"{"agent": "ag-recon-01", "resource": "ledger", "scopes": ["Ledger.Read"],
                "client_ip": "203.0.113.7", "time": "2026-11-25T10:00:00Z"}"#),
        ),
    ];
    let mut group = c.benchmark_group("service");
    // What recording one decision costs on its own: its time, its verdict and code, and its
    // determining policy (a read lock and a hash lookup).
    let snap = service.store().current();
    let allow = evaluate(&snap, service.live(), &cases[0].1.clone().validate(Utc::now()).unwrap());
    let metrics = service.metrics().clone();
    group.bench_function("record_decision", |b| {
        b.iter(|| {
            metrics.evaluated(black_box(allow.eval_us));
            metrics.decided(black_box(&allow));
        })
    });
    // And what the gRPC layer records per call: the method looked up from the path, the call
    // in flight, its status and time.
    group.bench_function("record_rpc", |b| {
        b.iter(|| {
            let started = std::time::Instant::now();
            let rpc = agentca::metrics::Rpc::of_path(black_box("/agentca.v1.DecisionService/Evaluate"));
            drop(metrics.call());
            metrics.handled(rpc, 0, started.elapsed());
        })
    });
    for (name, raw) in cases {
        group.bench_function(name, |b| {
            b.iter_batched(
                || raw.clone(),
                |raw| runtime.block_on(service.decide(raw, &caller)).unwrap(),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, sample, signals, service);
criterion_main!(benches);
