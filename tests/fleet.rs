//! A fleet: three `agentca serve` replicas sharing live state through a real NATS server
//! with JetStream, all on 127.0.0.1, driven by real gRPC clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use agentca::grpc::pb;
use common::nats::Nats;
use common::{Server, copy_sample, is_allow, token_request};
use tonic_health::ServingStatus;

/// Three replicas' worth of folders: one bundle each (a copy of the sample), their own state
/// and audit log, and NATS's store.
struct Fleet {
    dir: tempfile::TempDir,
    nats: Nats,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let nats = Nats::start(&dir.path().join("nats"));
        Fleet { dir, nats }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// Starts replica `id` on its own copy of the sample bundle (made once).
    fn replica(&self, id: &str, extra: &[&str]) -> Server {
        let policies = self.dir.path().join(format!("{id}/policies"));
        if !policies.exists() {
            copy_sample(&policies);
        }
        let (policies, audit, state) = (
            self.path(&format!("{id}/policies")),
            self.path(&format!("{id}/audit.jsonl")),
            self.path(&format!("{id}/state")),
        );
        let url = self.nats.url();
        let mut args = vec![
            "--policies",
            &policies,
            "--audit",
            &audit,
            "--state",
            &state,
            "--no-watch",
            "--live",
            &url,
            "--replica-id",
            id,
        ];
        if !extra.contains(&"--fleet-ack-timeout") {
            // The machine is shared: wait long enough that a slow replica is not named.
            args.extend(["--fleet-ack-timeout", "20s"]);
        }
        args.extend_from_slice(extra);
        Server::start(&args)
    }
}

async fn status(server: &Server) -> pb::StatusResponse {
    server.admin().await.status(pb::StatusRequest {}).await.unwrap().into_inner()
}

async fn live(server: &Server) -> pb::LiveStatus {
    status(server).await.live.expect("a replica's Status has a live section")
}

/// Waits (up to a minute) until `done` holds for the replica's live status.
async fn until(server: &Server, what: &str, done: impl Fn(&pb::LiveStatus) -> bool) -> pb::LiveStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = live(server).await;
        if done(&live) {
            return live;
        }
        assert!(Instant::now() < deadline, "{what} never held: {live:?}\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every replica hears from all of them and is in step.
async fn formed(replicas: &[&Server]) {
    for r in replicas {
        until(r, "the fleet formed", |l| l.replicas as usize == replicas.len() && l.healthy).await;
    }
}

/// Waits (up to a minute) until the gRPC health service reports `want`.
async fn health_becomes(server: &Server, want: ServingStatus) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ask = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let status = health.check(ask).await.unwrap().into_inner().status;
        if status == want as i32 {
            return;
        }
        assert!(Instant::now() < deadline, "health never became {want:?}:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(kind: &str, target: &str) -> pb::SignalRequest {
    pb::SignalRequest {
        kind: kind.into(),
        target: target.into(),
        reason: "fleet test".into(),
        actor: "secops".into(),
        ..Default::default()
    }
}

async fn decide(server: &Server, agent: &str) -> pb::Decision {
    let (resource, scope) = if agent.starts_with("ag-code") { ("code", "Repo.Read") } else { ("graph", "Mail.Read") };
    server.decisions().await.evaluate(token_request(agent, resource, scope)).await.unwrap().into_inner()
}

async fn signals(server: &Server) -> Vec<(String, String, String, String)> {
    let listed = server.admin().await.list_signals(pb::ListSignalsRequest::default()).await.unwrap().into_inner();
    listed.signals.into_iter().map(|s| (s.field, s.target, s.value, s.at)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_sent_to_one_replica_holds_on_every_replica_when_it_is_acknowledged() {
    let fleet = Fleet::new();
    let (a, b, c) = (fleet.replica("a", &[]), fleet.replica("b", &[]), fleet.replica("c", &[]));
    formed(&[&a, &b, &c]).await;
    for r in [&a, &b, &c] {
        assert!(is_allow(&decide(r, "ag-mail-01").await));
    }

    let done = a.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap().into_inner();
    assert!(done.unconfirmed_replicas.is_empty(), "{:?}", done.unconfirmed_replicas);
    // The very next request, on any replica, is denied.
    for r in [&b, &c, &a] {
        let d = decide(r, "ag-mail-01").await;
        assert_eq!(d.reasons[0].code, "agent_disabled", "{d:?}");
    }

    // A directory change sent to another replica: a new agent, known everywhere once answered.
    let change = serde_json::json!({"upsert": {"agents": [{
        "id": "ag-new-01", "blueprint": "bp-mail", "sponsor": "s-alice", "owners": ["u-bob"], "tags": {"env": "prod"}
    }]}});
    let request = pb::DirectoryChange { json: change.to_string(), actor: "hr".into(), reason: "onboarding".into() };
    let applied = b.admin().await.apply_directory(request).await.unwrap().into_inner();
    assert!(applied.unconfirmed_replicas.is_empty(), "{:?}", applied.unconfirmed_replicas);
    assert_eq!(applied.seq, done.seq + 1, "signals and directory changes share the stream's numbers");
    for r in [&a, &c, &b] {
        assert!(is_allow(&decide(r, "ag-new-01").await), "{}", r.log());
    }
    // A change refused over the directory served never enters the stream.
    let dangling =
        serde_json::json!({"upsert": {"agents": [{"id": "ag-x", "blueprint": "bp-none", "sponsor": "s-alice"}]}});
    let refused = c
        .admin()
        .await
        .apply_directory(pb::DirectoryChange { json: dangling.to_string(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    let fleet_view = c.admin().await.fleet(pb::FleetRequest {}).await.unwrap().into_inner();
    let ids: Vec<_> = fleet_view.replicas.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(fleet_view.stream_seq, applied.seq);
    for r in &fleet_view.replicas {
        assert_eq!(r.applied_seq, applied.seq, "{r:?}");
        assert!(!r.other_revision && r.lag == 0, "{r:?}");
    }
    // Every replica recorded both changes, naming the replica they were sent to.
    for id in ["a", "b", "c"] {
        let audit = std::fs::read_to_string(fleet.path(&format!("{id}/audit.jsonl"))).unwrap();
        let records: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let signal = records.iter().find(|r| r["kind"] == "signal").expect("a signal record");
        assert_eq!((signal["journal_seq"].as_u64(), signal["caller"]["replica"].as_str()), (Some(done.seq), Some("a")));
        let directory = records.iter().find(|r| r["kind"] == "directory").expect("a directory record");
        assert_eq!(directory["caller"]["replica"], "b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_waits_for_a_slow_replica_and_names_one_that_does_not_answer() {
    let fleet = Fleet::new();
    let a = fleet.replica("a", &[]);
    let b = fleet.replica("b", &["--fleet-ack-timeout", "1s"]);
    let c = fleet.replica("c", &[]);
    formed(&[&a, &b, &c]).await;

    // c is frozen: a's answer waits for it (up to a's 20 s), and comes once c has applied.
    c.signal("STOP");
    let sent = Instant::now();
    let mut admin = a.admin().await;
    let waiting = tokio::spawn(async move { admin.signal(signal("disable_agent", "ag-mail-01")).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "answered before the frozen replica applied the signal");
    c.signal("CONT");
    let done = waiting.await.unwrap().unwrap().into_inner();
    assert!(done.unconfirmed_replicas.is_empty(), "{:?}", done.unconfirmed_replicas);
    assert!(sent.elapsed() >= Duration::from_millis(1500));
    assert_eq!(decide(&c, "ag-mail-01").await.reasons[0].code, "agent_disabled");

    // b waits 1 s only: its answer names the replica that had not applied the change.
    c.signal("STOP");
    let done = b.admin().await.signal(signal("enable_agent", "ag-mail-01")).await.unwrap().into_inner();
    assert_eq!(done.unconfirmed_replicas, ["c"]);
    c.signal("CONT");
    until(&c, "c caught up", |l| l.applied_seq == done.seq).await;
    assert!(is_allow(&decide(&c, "ag-mail-01").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_starts_applies_what_it_missed_before_it_serves() {
    let fleet = Fleet::new();
    let a = fleet.replica("a", &[]);
    let mut c = fleet.replica("c", &[]);
    formed(&[&a, &c]).await;
    c.signal("KILL");
    c.wait();
    drop(c);
    // While c is down: many changes, the kill switch last.
    let mut admin = a.admin().await;
    for i in 0..60 {
        admin
            .signal(signal(if i % 2 == 0 { "set_risk" } else { "dismiss_risk" }, "ag-code-01").risk_if(i % 2 == 0))
            .await
            .unwrap();
    }
    let last = admin.signal(signal("disable_agent", "ag-mail-01")).await.unwrap().into_inner();
    let c = fleet.replica("c", &[]);
    // Its very first answer already knows.
    assert_eq!(decide(&c, "ag-mail-01").await.reasons[0].code, "agent_disabled", "{}", c.log());
    assert_eq!(live(&c).await.applied_seq, last.seq);
}

trait Risk {
    fn risk_if(self, set: bool) -> Self;
}

impl Risk for pb::SignalRequest {
    fn risk_if(mut self, set: bool) -> Self {
        if set {
            self.risk = "low".into();
        }
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_signals_on_two_replicas_end_in_the_same_state_everywhere() {
    let fleet = Fleet::new();
    let (a, b, c) = (fleet.replica("a", &[]), fleet.replica("b", &[]), fleet.replica("c", &[]));
    formed(&[&a, &b, &c]).await;
    for round in 0..10 {
        let (on_a, on_b) =
            if round % 2 == 0 { ("disable_agent", "enable_agent") } else { ("enable_agent", "disable_agent") };
        let (mut admin_a, mut admin_b) = (a.admin().await, b.admin().await);
        let (x, y) =
            tokio::join!(admin_a.signal(signal(on_a, "ag-mail-01")), admin_b.signal(signal(on_b, "ag-mail-01")),);
        let (x, y) = (x.unwrap().into_inner(), y.unwrap().into_inner());
        assert!(x.unconfirmed_replicas.is_empty() && y.unconfirmed_replicas.is_empty());
        assert_ne!(x.seq, y.seq);
        // Whichever the stream took last holds, on every replica.
        let last = if x.seq > y.seq { on_a } else { on_b };
        for r in [&a, &b, &c] {
            let denied = decide(r, "ag-mail-01").await.reasons.first().is_some_and(|r| r.code == "agent_disabled");
            assert_eq!(denied, last == "disable_agent", "round {round}");
        }
    }
    // Many at once through one replica: its consumer often applies a change before the
    // stream's acknowledgement of an earlier one comes back, which is no reason to stop.
    let senders = (0..4).map(|task| {
        let channel = a.channel();
        async move {
            let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.await);
            for i in 0..50 {
                let kind = if i % 2 == 0 { "disable_agent" } else { "enable_agent" };
                let done = admin.signal(signal(kind, "ag-mail-02")).await;
                let done = done.unwrap_or_else(|e| panic!("sender {task}, signal {i}: {e:?}")).into_inner();
                assert!(done.unconfirmed_replicas.is_empty(), "{:?}", done.unconfirmed_replicas);
            }
        }
    });
    futures::future::join_all(senders).await;
    let (sa, sb, sc) = (signals(&a).await, signals(&b).await, signals(&c).await);
    assert_eq!(sa.len(), 2);
    assert_eq!((&sa, &sa), (&sb, &sc));
    let (la, lb, lc) = (live(&a).await, live(&b).await, live(&c).await);
    assert_eq!((la.applied_seq, lb.applied_seq, lc.applied_seq), (220, 220, 220));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_replicas_decide_refuse_signals_say_they_are_stale_and_catch_up_after() {
    let mut fleet = Fleet::new();
    let (a, b) = (fleet.replica("a", &[]), fleet.replica("b", &[]));
    let mut c = fleet.replica("c", &[]);
    formed(&[&a, &b, &c]).await;
    let done = a.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap().into_inner();
    assert!(done.unconfirmed_replicas.is_empty());
    // Load on a and b all along: every request is answered, and the disabled agent is never
    // allowed, whatever NATS does.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = [a.channel().await, b.channel().await]
        .into_iter()
        .map(|channel| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = pb::decision_service_client::DecisionServiceClient::new(channel);
                let mut answered = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let d =
                        client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
                    assert_eq!(d.reasons[0].code, "agent_disabled");
                    answered += 1;
                }
                answered
            })
        })
        .collect();

    fleet.nats.stop();
    // Decisions go on, with the last state applied.
    for r in [&a, &b, &c] {
        assert_eq!(decide(r, "ag-mail-01").await.reasons[0].code, "agent_disabled");
        assert!(is_allow(&decide(r, "ag-code-01").await));
    }
    // A signal is refused, never taken by one replica only.
    let refused = b.admin().await.signal(signal("disable_agent", "ag-code-01")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(is_allow(&decide(&a, "ag-code-01").await));
    let stale = until(&c, "staleness is reported", |l| !l.healthy && l.stale_seconds >= 1).await;
    assert!(!stale.connected && !stale.error.is_empty(), "{stale:?}");

    // A replica killed and started again while NATS is down serves what it applied, and says
    // how old it is.
    c.signal("KILL");
    c.wait();
    drop(c);
    let c = fleet.replica("c", &["--live-start-wait", "1s"]);
    assert_eq!(decide(&c, "ag-mail-01").await.reasons[0].code, "agent_disabled");
    let restarted = live(&c).await;
    assert!(!restarted.healthy && restarted.stale_seconds >= 1 && restarted.applied_seq == done.seq, "{restarted:?}");

    // NATS back: replicas catch up and take signals again.
    fleet.nats.resume();
    formed(&[&a, &b, &c]).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for answered in futures::future::join_all(load).await {
        assert!(answered.unwrap() > 10, "the load never ran");
    }
    let enabled = b.admin().await.signal(signal("enable_agent", "ag-mail-01")).await.unwrap().into_inner();
    assert!(enabled.unconfirmed_replicas.is_empty(), "{:?}", enabled.unconfirmed_replicas);
    for r in [&a, &b, &c] {
        assert!(is_allow(&decide(r, "ag-mail-01").await));
        assert_eq!(live(r).await.applied_seq, enabled.seq);
        // The signal refused while NATS was away never landed later.
        assert!(is_allow(&decide(r, "ag-code-01").await));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_past_its_stale_limit_denies_when_told_to_and_decides_again_in_step() {
    let mut fleet = Fleet::new();
    let a = fleet.replica("a", &["--live-stale-after", "2s", "--live-stale-policy", "deny"]);
    until(&a, "in step", |l| l.healthy).await;
    assert!(is_allow(&decide(&a, "ag-mail-01").await));
    fleet.nats.stop();
    until(&a, "denying", |l| l.denying).await;
    let d = decide(&a, "ag-mail-01").await;
    assert_eq!(d.reasons[0].code, "live_state_unavailable", "{d:?}");
    // The health service sends callers elsewhere meanwhile.
    health_becomes(&a, ServingStatus::NotServing).await;
    fleet.nats.resume();
    until(&a, "in step again", |l| l.healthy && !l.denying).await;
    assert!(is_allow(&decide(&a, "ag-mail-01").await));
    health_becomes(&a, ServingStatus::Serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_another_bundle_revision_is_flagged() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.replica("a", &["--metrics-listen", "127.0.0.1:0"]), fleet.replica("b", &[]));
    // Replica c's bundle differs by one comment: another revision.
    let policies = fleet.dir.path().join("c/policies");
    copy_sample(&policies);
    let baseline = policies.join("baseline.cedar");
    let text = std::fs::read_to_string(&baseline).unwrap();
    std::fs::write(&baseline, format!("{text}\n// an older bundle\n")).unwrap();
    let c = fleet.replica("c", &[]);
    formed(&[&a, &b, &c]).await;
    let view = a.admin().await.fleet(pb::FleetRequest {}).await.unwrap().into_inner();
    let flagged: Vec<_> = view.replicas.iter().filter(|r| r.other_revision).map(|r| r.id.as_str()).collect();
    assert_eq!(flagged, ["c"], "{view:?}");
    assert_eq!(view.majority_revision, status(&a).await.revision);
    assert!(live(&b).await.revision_disagreement);
    let metrics = common::scrape(a.metrics_addr.as_deref().unwrap());
    for line in [
        "agentca_fleet_replicas 3",
        "agentca_bundle_revision_disagreement 1",
        "agentca_live_lag 0",
        "agentca_live_healthy 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in:\n{metrics}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["admin", "--server", &a.addr, "fleet"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(text.lines().any(|l| l.starts_with("c at") && l.contains("OTHER REVISION")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_folder_with_local_changes_does_not_join_a_fleet() {
    let fleet = Fleet::new();
    let state = fleet.path("a/state");
    let policies = fleet.dir.path().join("a/policies");
    copy_sample(&policies);
    let lone = Server::start(&["--policies", policies.to_str().unwrap(), "--state", &state, "--audit", "off"]);
    lone.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap();
    drop(lone);
    let a = fleet.replica("a", &[]);
    let l = until(&a, "the refusal", |l| l.error.contains("made without --live")).await;
    assert!(!l.healthy, "{l:?}");
    let refused = a.admin().await.signal(signal("enable_agent", "ag-mail-01")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains("made without --live"), "{}", refused.message());
    // Its journal holds #1 already, yet it never counts as confirming the stream's #1: it is
    // named, and not waited for.
    let b = fleet.replica("b", &[]);
    until(&b, "a is heard", |l| l.replicas == 2).await;
    let sent = Instant::now();
    let done = b.admin().await.signal(signal("disable_agent", "ag-code-01")).await.unwrap().into_inner();
    assert_eq!((done.seq, done.unconfirmed_replicas.as_slice()), (1, ["a".to_string()].as_slice()));
    assert!(sent.elapsed() < Duration::from_secs(10), "waited for a stopped replica: {:?}", sent.elapsed());
    assert!(is_allow(&decide(&a, "ag-code-01").await), "a stopped replica applied a change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_one_id_both_say_so() {
    let fleet = Fleet::new();
    let a = fleet.replica("a", &[]);
    // Its own folders, the same id.
    let policies = fleet.dir.path().join("twin/policies");
    copy_sample(&policies);
    let (state, policies) = (fleet.path("twin/state"), policies.to_str().unwrap().to_string());
    let url = fleet.nats.url();
    let twin = Server::start(&[
        "--policies",
        &policies,
        "--state",
        &state,
        "--audit",
        "off",
        "--no-watch",
        "--live",
        &url,
        "--replica-id",
        "a",
        "--live-start-wait",
        "1s",
    ]);
    for r in [&a, &twin] {
        let l = until(r, "the twin is seen", |l| l.error.contains("another replica announces itself as `a`")).await;
        assert!(!l.healthy);
    }
    // A third replica tells them apart by their starts: it names `a` in its answers, without
    // waiting for it.
    let b = fleet.replica("b", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = b.admin().await.signal(signal("disable_agent", "ag-code-01")).await.unwrap().into_inner();
        if done.unconfirmed_replicas == ["a"] {
            break;
        }
        assert!(Instant::now() < deadline, "b never named the twins: {:?}", done.unconfirmed_replicas);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_one_replica_cannot_apply_is_named_in_the_answer() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.replica("a", &[]), fleet.replica("b", &[]));
    // Replica c's directory lacks ag-support-01: a patch of it is, there, a new agent without
    // its blueprint, which is refused.
    let policies = fleet.dir.path().join("c/policies");
    copy_sample(&policies);
    let path = policies.join("directory.json");
    let mut directory: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    directory["agents"].as_array_mut().unwrap().retain(|a| a["id"] != "ag-support-01");
    std::fs::write(&path, directory.to_string()).unwrap();
    let c = fleet.replica("c", &[]);
    formed(&[&a, &b, &c]).await;

    let patch = serde_json::json!({"upsert": {"agents": [{"id": "ag-support-01", "risk": "high"}]}});
    let request = pb::DirectoryChange { json: patch.to_string(), actor: "secops".into(), reason: "suspicious".into() };
    let applied = a.admin().await.apply_directory(request).await.unwrap().into_inner();
    assert_eq!(applied.unconfirmed_replicas, ["c"]);
    // c went on: the next change applies there.
    let done = b.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap().into_inner();
    assert!(done.unconfirmed_replicas.is_empty(), "{:?}", done.unconfirmed_replicas);
    assert_eq!(decide(&c, "ag-mail-01").await.reasons[0].code, "agent_disabled");
    assert!(c.log().contains("does not apply here; skipped"), "{}", c.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_anew_under_the_replicas_is_not_followed() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.replica("a", &[]), fleet.replica("b", &[]));
    formed(&[&a, &b]).await;
    a.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap();

    let client = async_nats::connect(fleet.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.delete_stream("agentca").await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "agentca".into(),
        subjects: vec!["agentca.live".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for r in [&a, &b] {
        until(r, "the new stream is refused", |l| l.error.contains("deleted and made anew")).await;
        // Its numbers start again at 1, which the replicas have applied: nothing is sent.
        let refused = r.admin().await.signal(signal("enable_agent", "ag-mail-01")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert_eq!(decide(r, "ag-mail-01").await.reasons[0].code, "agent_disabled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_is_named_and_denies_from_its_first_request_under_the_deny_policy() {
    let fleet = Fleet::new();
    let a = fleet.replica("a", &[]);
    let c = fleet.replica("c", &["--live-stale-after", "2s", "--live-stale-policy", "deny"]);
    formed(&[&a, &c]).await;
    c.signal("STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    // c has been silent for more than 5 s: not waited for, but named.
    let sent = Instant::now();
    let done = a.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap().into_inner();
    assert_eq!(done.unconfirmed_replicas, ["c"]);
    assert!(sent.elapsed() < Duration::from_secs(15), "waited for a silent replica: {:?}", sent.elapsed());
    // A request that reached c while it was frozen is answered once it wakes: deny, for its
    // live state is older than 2 s, never an allow from before the signal.
    let mut client = c.decisions().await;
    let asked = tokio::spawn(async move { client.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.signal("CONT");
    let d = asked.await.unwrap().unwrap().into_inner();
    assert!(!is_allow(&d), "{d:?}\n{}", c.log());
    until(&c, "c caught up", |l| l.applied_seq == done.seq && !l.denying).await;
    assert_eq!(decide(&c, "ag-mail-01").await.reasons[0].code, "agent_disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_journal_was_lost_does_not_follow_and_is_named() {
    let fleet = Fleet::new();
    let a = fleet.replica("a", &["--fleet-ack-timeout", "2s"]);
    let mut c = fleet.replica("c", &[]);
    formed(&[&a, &c]).await;
    let done = a.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap().into_inner();
    // fleet.json notes the journals' numbers within a second or so.
    let tie = std::path::PathBuf::from(fleet.path("c/state/fleet.json"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&tie).is_ok_and(|t| t.contains(&format!("\"signals\":{}", done.seq))) {
        assert!(Instant::now() < deadline, "fleet.json never noted #{}", done.seq);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.signal("KILL");
    c.wait();
    drop(c);
    std::fs::remove_file(fleet.path("c/state/signals.jsonl")).unwrap();
    let c = fleet.replica("c", &["--live-start-wait", "1s"]);
    let l = until(&c, "the loss is seen", |l| l.error.contains("has lost changes")).await;
    assert!(!l.healthy, "{l:?}");
    let next = a.admin().await.signal(signal("set_risk", "ag-code-01").risk_if(true)).await.unwrap().into_inner();
    assert_eq!(next.unconfirmed_replicas, ["c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_message_on_the_stream_is_skipped_everywhere_and_later_changes_apply() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.replica("a", &[]), fleet.replica("b", &[]));
    formed(&[&a, &b]).await;
    let client = async_nats::connect(fleet.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let huge = serde_json::json!({"origin": "x", "signal": {
        "kind": "disable_agent", "field": "agent_enabled", "target": "ag-code-01", "value": false,
        "reason": "r".repeat(100_000), "actor": "x", "at": "2026-12-01T00:00:00Z"
    }});
    for body in [b"not json".to_vec(), huge.to_string().into_bytes(), b"{\"origin\":\"x\"}".to_vec()] {
        js.publish("agentca.live", body.into()).await.unwrap().await.unwrap();
    }
    let done = a.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap().into_inner();
    assert!(done.unconfirmed_replicas.is_empty(), "{:?}", done.unconfirmed_replicas);
    for r in [&a, &b] {
        assert_eq!(decide(r, "ag-mail-01").await.reasons[0].code, "agent_disabled");
        assert!(is_allow(&decide(r, "ag-code-01").await), "the over-long signal applied");
        assert_eq!(signals(r).await.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_rolled_back_under_the_replicas_stops_them() {
    let mut fleet = Fleet::new();
    let (a, b) = (fleet.replica("a", &[]), fleet.replica("b", &[]));
    formed(&[&a, &b]).await;
    a.admin().await.signal(signal("disable_agent", "ag-code-01")).await.unwrap();
    // NATS's store as it is now, restored after two more changes: same stream, fewer changes.
    fleet.nats.stop();
    let (store, copy) = (fleet.dir.path().join("nats"), fleet.dir.path().join("nats-copy"));
    assert!(std::process::Command::new("cp").arg("-a").arg(&store).arg(&copy).status().unwrap().success());
    fleet.nats.resume();
    formed(&[&a, &b]).await;
    for kind in ["disable_agent", "enable_agent"] {
        let done = a.admin().await.signal(signal(kind, "ag-mail-01")).await.unwrap().into_inner();
        assert!(done.unconfirmed_replicas.is_empty());
    }
    fleet.nats.stop();
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::rename(&copy, &store).unwrap();
    fleet.nats.resume();
    for r in [&a, &b] {
        let l = until(r, "the rollback is seen", |l| l.error.contains("lost changes")).await;
        assert!(!l.healthy, "{l:?}");
        let refused = r.admin().await.signal(signal("disable_agent", "ag-mail-01")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    }
}
