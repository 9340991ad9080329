//! The live directory: load time and peak memory by directory size, the cost of one agent
//! upsert at 100,000 agents, and decisions while upserts run at 1,000 a second.
//!
//! Run: `cargo bench --features tools --bench directory` (about 3 minutes on 2 cores, most
//! of it generating and loading the 1,000,000-agent bundle). `AGENTCA_DIRECTORY_AGENTS=100000`
//! picks the directory sizes. Loads are measured in a fresh process per bundle, so that each
//! peak is its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentca::directory::Change;
use agentca::engine::{Verdict, evaluate};
use agentca::generate::{Params, write_bundle};
use agentca::live::DirectoryJournal;
use agentca::request::{RawRequest, Request};
use agentca::signals::Overlay;
use agentca::snapshot::Store;
use chrono::Utc;
use criterion::Criterion;

const CHILD_ENV: &str = "AGENTCA_DIRECTORY_LOAD_OF";
const POLICIES: usize = 10_000;
/// Timed single decisions for each percentile row.
const CALLS: usize = 200_000;

/// `agentca generate`'s defaults: 1,000 blueprints, 2,000 sponsors, 50 resources.
fn params(agents: usize, policies: usize) -> Params {
    Params { agents, policies, blueprints: 1_000, sponsors: 2_000, resources: 50, seed: 1 }
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

/// In the child: opens the store (as `serve` does) and prints its load time and memory.
fn run_child(dir: &str) {
    let started = Instant::now();
    let store = Store::open(Path::new(dir)).unwrap();
    let ms = started.elapsed().as_millis();
    let (hwm, rss) = memory();
    let agents = store.current().counts().agents;
    black_box(&store);
    println!("{agents} {ms} {hwm} {rss}");
}

/// (agents, load ms, peak kB, resident kB) of a fresh process loading `dir`.
fn load_in_child(dir: &Path) -> Option<[u64; 4]> {
    let out = Command::new(std::env::current_exe().ok()?).env(CHILD_ENV, dir).output().ok()?;
    let v: Vec<u64> = String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|w| w.parse().ok()).collect();
    v.try_into().ok()
}

/// One agent's upsert: a new agent of the probe's blueprint and sponsor, or a change to one.
fn upsert(n: u64, blueprint: &str, sponsor: &str) -> String {
    let env = if n.is_multiple_of(2) { "prod" } else { "dev" };
    format!(
        r#"{{"upsert": {{"agents": [{{"id": "ag-live-{}", "blueprint": "{blueprint}", "sponsor": "{sponsor}",
            "owners": [], "framework": "langchain", "tags": {{"env": "{env}"}}}}]}}}}"#,
        n % 1000
    )
}

/// p50, p99, p99.9 of `calls` decisions, each with the store's current snapshot, in µs.
fn latency(store: &Store, req: &Request, calls: usize) -> [f64; 3] {
    let live = Overlay::new();
    let mut ns: Vec<u64> = Vec::with_capacity(calls);
    for i in 0..calls + calls / 10 {
        let started = Instant::now();
        let snap = store.current();
        black_box(evaluate(black_box(&snap), &live, black_box(req)));
        if i >= calls / 10 {
            ns.push(started.elapsed().as_nanos() as u64);
        }
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    [at(0.50), at(0.99), at(0.999)]
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        run_child(&dir);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let measuring = has("--bench") && !has("--test") && !has("--list");
    let sizes: Vec<usize> = match std::env::var("AGENTCA_DIRECTORY_AGENTS") {
        Ok(list) => list.split(',').map(|s| s.trim().replace('_', "").parse().unwrap()).collect(),
        Err(_) if measuring => vec![100_000, 1_000_000],
        Err(_) => vec![2_000],
    };
    let (calls, policies) = if measuring { (CALLS, POLICIES) } else { (2_000, 100) };
    let mut c = Criterion::default().configure_from_args();

    let mut loads = Vec::new();
    for &agents in &sizes {
        let tmp = tempfile::tempdir().unwrap();
        write_bundle(tmp.path(), &params(agents, policies)).unwrap();
        loads.push((agents, load_in_child(tmp.path())));
    }

    // Upserts and decisions at the first size (100,000 agents when measuring).
    let agents = sizes[0];
    let tmp = tempfile::tempdir().unwrap();
    let summary = write_bundle(tmp.path(), &params(agents, policies)).unwrap();
    let store = Arc::new(Store::open(tmp.path()).unwrap());
    let probe = &summary.probe;
    let snap = store.current();
    let probe_agent = snap.agent(&probe.agent).unwrap();
    let (blueprint, sponsor) = (probe_agent.blueprint_id().to_string(), probe_agent.sponsor_id().to_string());
    drop(snap);
    let raw = RawRequest {
        agent: Some(probe.agent.clone()),
        resource: Some(probe.resource.clone()),
        scopes: probe.scopes.clone(),
        client_ip: Some("10.1.2.3".into()),
        time: Some("2026-11-25T10:00:00Z".into()),
        ..RawRequest::default()
    };
    let req = raw.validate(Utc::now()).unwrap();
    let probed = evaluate(&store.current(), &Overlay::new(), &req).decision;

    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("upsert_one_agent");
    g.bench_function(format!("{agents}-agents"), |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let change = Change::from_json_str(&upsert(i, &blueprint, &sponsor)).unwrap();
            store.apply_directory(&change, |_, _, _| Ok(())).unwrap()
        })
    });
    let state = tempfile::tempdir().unwrap();
    let (journal, _) = DirectoryJournal::open(state.path()).unwrap();
    g.bench_function(format!("{agents}-agents-journaled"), |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let change = Change::from_json_str(&upsert(i, &blueprint, &sponsor)).unwrap();
            store
                .apply_directory(&change, |seq, resolved, net| {
                    journal.append(seq, resolved, "bench", "", net).map_err(|e| e.to_string())
                })
                .unwrap()
        })
    });
    g.finish();

    // Decisions alone, then with upserts at 1,000 a second on another thread.
    let quiet = latency(&store, &req, calls);
    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU64::new(0));
    let writer = {
        let (store, stop, applied) = (store.clone(), stop.clone(), applied.clone());
        let (blueprint, sponsor) = (blueprint.clone(), sponsor.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let change = Change::from_json_str(&upsert(1_000_000 + i, &blueprint, &sponsor)).unwrap();
                store.apply_directory(&change, |_, _, _| Ok(())).unwrap();
                i += 1;
                applied.store(i, Ordering::Relaxed);
                // Paced to 1,000 a second.
                let due = started + Duration::from_millis(i);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            started.elapsed()
        })
    };
    let busy = latency(&store, &req, calls);
    stop.store(true, Ordering::Relaxed);
    let ran = writer.join().unwrap();
    let upserts = applied.load(Ordering::Relaxed);
    c.final_summary();

    println!("\n== load in a fresh process ({policies} policies; Store::open, as serve) ==");
    println!("{:>10} {:>10} {:>10} {:>10} {:>12}", "agents", "load s", "peak MB", "RSS MB", "peak KB/agent");
    for (agents, load) in &loads {
        match load {
            Some([n, ms, hwm, rss]) => println!(
                "{n:>10} {:>10.2} {:>10.1} {:>10.1} {:>12.2}",
                *ms as f64 / 1000.0,
                *hwm as f64 / 1024.0,
                *rss as f64 / 1024.0,
                *hwm as f64 / *n as f64
            ),
            None => println!("{agents:>10} (the child process failed)"),
        }
    }
    let decided = if probed == Verdict::Allow { "allow" } else { "deny" };
    println!(
        "\n== engine::evaluate of the probe ({decided}) with the store's current snapshot, {agents} agents, {calls} calls (µs) =="
    );
    println!("{:>28} {:>8} {:>8} {:>8}", "", "p50", "p99", "p99.9");
    println!("{:>28} {:>8.2} {:>8.2} {:>8.2}", "no upserts", quiet[0], quiet[1], quiet[2]);
    let rate = upserts as f64 / ran.as_secs_f64();
    println!("{:>28} {:>8.2} {:>8.2} {:>8.2}", format!("upserts at {rate:.0}/s"), busy[0], busy[1], busy[2]);
}
