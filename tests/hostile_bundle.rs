//! Bundles built to break the loader, through the real binary: expressions and types nested
//! past the limit, entries that cannot be read, files past their size cap, JSON with a key
//! twice. `validate` refuses each with exit 3 and an error naming the file; a running `serve`
//! keeps its old revision, keeps deciding, and stays alive.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentca::grpc::pb;
use common::{Server, copy_sample, token_request};

/// Runs `agentca ARGS…` and returns its exit code and standard error. A run past the deadline
/// (a loader reading `/dev/zero` or blocked on a FIFO) is killed and fails the test.
fn agentca(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("`agentca {}` did not finish within a minute", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), reader.join().unwrap())
}

fn validate(dir: &Path) -> (Option<i32>, String) {
    agentca(&["validate", "--policies", dir.to_str().unwrap()])
}

/// `validate` refuses the bundle (exit 3, not an abort) with an error that names `file`.
fn refused(dir: &Path, file: &str) -> String {
    let (code, stderr) = validate(dir);
    assert_eq!(code, Some(3), "{stderr}");
    let named = format!("{}:", dir.join(file).display());
    assert!(stderr.contains(&named), "the error does not name {file}:\n{stderr}");
    stderr
}

fn sample() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_sample(dir.path());
    dir
}

const POLICY: &str = "@id(\"deep\")\nforbid (principal, action, resource)\nwhen { ";

fn deep_policy(condition: &str) -> String {
    format!("{POLICY}{condition} }};\n")
}

/// A policy as deep as the limit allows: `when`, the brackets of the scope and of the
/// condition, 251 parentheses, `.` and `<` make 256 levels.
fn at_the_limit() -> String {
    deep_policy(&format!("{}context.hour < 99{}", "(".repeat(251), ")".repeat(251)))
}

#[test]
fn validate_refuses_deeply_nested_policies() {
    let dir = sample();
    let shapes = [
        ("100,000 parentheses", format!("{}true{}", "(".repeat(100_000), ")".repeat(100_000))),
        ("5,000 nested ifs", format!("{}true", "if true then false else ".repeat(5_000))),
        ("50,000 nested sets", format!("{}{} == []", "[".repeat(50_000), "]".repeat(50_000))),
        ("50,000 nested records", format!("{}1{} == {{}}", "{a: ".repeat(50_000), "}".repeat(50_000))),
        ("100,000 additions", format!("{} == 1", vec!["1"; 100_000].join(" + "))),
        ("100,000 negations", format!("{}true", "!".repeat(100_000))),
        ("100,000 attribute accesses", format!("context{} == 1", ".a".repeat(100_000))),
        ("100,000 disjunctions", vec!["context.hour == 1"; 100_000].join(" || ")),
    ];
    for (name, condition) in shapes {
        std::fs::write(dir.path().join("deep.cedar"), deep_policy(&condition)).unwrap();
        let stderr = refused(dir.path(), "deep.cedar");
        let at = format!("{}:3:", dir.path().join("deep.cedar").display());
        assert!(stderr.contains(&at), "{name}: no line and column:\n{stderr}");
        assert!(stderr.contains("nested too deeply: expressions may nest at most 256 levels"), "{name}:\n{stderr}");
    }
    // Ten thousand conditions on one policy: Cedar joins them with `&&`.
    let whens = format!("@id(\"deep\")\nforbid (principal, action, resource){};\n", " when { true }".repeat(10_000));
    std::fs::write(dir.path().join("deep.cedar"), whens).unwrap();
    assert!(refused(dir.path(), "deep.cedar").contains("nested too deeply"));
}

#[test]
fn policies_at_the_limit_validate_evaluate_and_explain() {
    let dir = sample();
    // 145 levels overflowed the stack of Cedar's parser in a release build, far fewer in a debug one.
    let condition = format!("{}context.hour < 99{}", "(".repeat(145), ")".repeat(145));
    std::fs::write(dir.path().join("deep.cedar"), deep_policy(&condition)).unwrap();
    let (code, stderr) = validate(dir.path());
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::write(dir.path().join("deep.cedar"), at_the_limit()).unwrap();
    let (code, stderr) = validate(dir.path());
    assert_eq!(code, Some(0), "{stderr}");
    let request = dir.path().join("request.json");
    std::fs::copy(common::root().join("examples/request.json"), &request).unwrap();
    let (code, stderr) = agentca(&[
        "eval",
        "--explain",
        "--policies",
        dir.path().to_str().unwrap(),
        "--request",
        request.to_str().unwrap(),
    ]);
    // The forbid holds, or (a debug build's evaluator runs out of room) it errs: deny either way.
    assert_eq!(code, Some(2), "{stderr}");
}

#[test]
fn validate_refuses_deeply_nested_schemas() {
    let dir = sample();
    let path = dir.path().join("schema.cedarschema");
    let schema = std::fs::read_to_string(&path).unwrap();
    let shapes = [
        format!("type Deep = {}String{};\n", "Set<".repeat(50_000), ">".repeat(50_000)),
        format!("type Deep = {}String{};\n", "{a: ".repeat(50_000), "}".repeat(50_000)),
    ];
    for deep in shapes {
        std::fs::write(&path, format!("{schema}{deep}")).unwrap();
        let stderr = refused(dir.path(), "schema.cedarschema");
        assert!(stderr.contains("nested too deeply: types may nest at most 256 levels"), "{stderr}");
    }
    // Shallow in the text, deep once Cedar puts each common type inside the one that uses it.
    let chain: String = (0..400).map(|i| format!("type T{i} = Set<T{}>;\n", i + 1)).collect();
    std::fs::write(&path, format!("{schema}{chain}type T400 = Long;\n")).unwrap();
    let stderr = refused(dir.path(), "schema.cedarschema");
    assert!(stderr.contains("common type `T0` is nested too deeply"), "{stderr}");
    // Thousands of common types are refused before Cedar spends minutes resolving them.
    let chain: String = (0..20_000).map(|i| format!("type T{i} = T{};\n", i + 1)).collect();
    std::fs::write(&path, format!("{schema}{chain}type T20000 = Long;\n")).unwrap();
    let stderr = refused(dir.path(), "schema.cedarschema");
    assert!(stderr.contains("too many common types"), "{stderr}");
}

#[test]
fn validate_refuses_entries_that_cannot_be_read() {
    let dir = sample();
    let p = dir.path();
    assert_eq!(validate(p).0, Some(0));

    symlink("nowhere.cedar", p.join("dangling.cedar")).unwrap();
    assert!(refused(p, "dangling.cedar").contains("link to `nowhere.cedar`, which does not exist"));
    std::fs::remove_file(p.join("dangling.cedar")).unwrap();

    symlink("loop.cedar", p.join("loop.cedar")).unwrap();
    refused(p, "loop.cedar");
    std::fs::remove_file(p.join("loop.cedar")).unwrap();

    std::fs::create_dir(p.join("folder.cedar")).unwrap();
    assert!(refused(p, "folder.cedar").contains("not a regular file"));
    std::fs::remove_dir(p.join("folder.cedar")).unwrap();

    // Opening a FIFO for reading would wait for a writer forever.
    assert!(Command::new("mkfifo").arg(p.join("fifo.cedar")).status().unwrap().success());
    assert!(refused(p, "fifo.cedar").contains("not a regular file"));
    std::fs::remove_file(p.join("fifo.cedar")).unwrap();

    // Reading it would never end.
    std::fs::rename(p.join("directory.json"), p.join("directory.real")).unwrap();
    symlink("/dev/zero", p.join("directory.json")).unwrap();
    assert!(refused(p, "directory.json").contains("not a regular file"));
    std::fs::remove_file(p.join("directory.json")).unwrap();
    std::fs::rename(p.join("directory.real"), p.join("directory.json")).unwrap();

    // locations.json is optional, but a link to nowhere is not an absent file.
    std::fs::remove_file(p.join("locations.json")).unwrap();
    assert_eq!(validate(p).0, Some(0));
    symlink("gone.json", p.join("locations.json")).unwrap();
    refused(p, "locations.json");
    std::fs::remove_file(p.join("locations.json")).unwrap();

    // Hidden entries are not policy files (an editor's swap file, a ConfigMap's `..data`).
    symlink("nowhere", p.join(".deep.cedar.swp")).unwrap();
    symlink("nowhere", p.join(".x.cedar")).unwrap();
    let (code, stderr) = validate(p);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn validate_refuses_files_past_their_cap() {
    let dir = sample();
    // Sparse: refused on its size, before a byte is read.
    let huge = std::fs::File::create(dir.path().join("huge.cedar")).unwrap();
    huge.set_len(agentca::input::MAX_POLICY_FILE_BYTES + 1).unwrap();
    let stderr = refused(dir.path(), "huge.cedar");
    assert!(stderr.contains(&format!("is larger than the limit of {} bytes", agentca::input::MAX_POLICY_FILE_BYTES)));
}

#[test]
fn validate_refuses_duplicate_json_keys() {
    let dir = sample();
    // serde_json alone keeps the last one: the corporate network would become the world.
    let twice = r#"{"corp-network": ["10.0.0.0/8"], "corp-network": ["0.0.0.0/0"]}"#;
    std::fs::write(dir.path().join("locations.json"), twice).unwrap();
    assert!(refused(dir.path(), "locations.json").contains("duplicate key `corp-network`"));

    copy_sample(dir.path());
    let path = dir.path().join("directory.json");
    let src = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, src.replacen("\"id\"", "\"enabled\": true, \"enabled\": false, \"id\"", 1)).unwrap();
    assert!(refused(dir.path(), "directory.json").contains("duplicate key `enabled`"));
}

#[test]
fn serve_refuses_to_start_on_a_hostile_bundle() {
    let dir = sample();
    let deep = format!("{}{} == []", "[".repeat(100_000), "]".repeat(100_000));
    std::fs::write(dir.path().join("deep.cedar"), deep_policy(&deep)).unwrap();
    let state = tempfile::tempdir().unwrap();
    let (code, stderr) = agentca(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--policies",
        dir.path().to_str().unwrap(),
        "--audit",
        "off",
        "--state",
        state.path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("nested too deeply"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_keeps_its_revision_through_hostile_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("policies");
    copy_sample(&bundle);
    // The folder is watched: each change below is also reloaded by the watcher.
    let mut server = Server::start(&[
        "--policies",
        bundle.to_str().unwrap(),
        "--audit",
        dir.path().join("audit.jsonl").to_str().unwrap(),
        "--state",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let mut admin = server.admin().await;
    let mut decisions = server.decisions().await;
    let old = admin.status(pb::StatusRequest {}).await.unwrap().into_inner().revision;

    type Break = fn(&Path);
    let hostile: [(&str, Break, &str); 5] = [
        (
            "deep.cedar",
            |b| {
                let deep = format!("{}true{}", "(".repeat(100_000), ")".repeat(100_000));
                std::fs::write(b.join("deep.cedar"), deep_policy(&deep)).unwrap()
            },
            "nested too deeply",
        ),
        (
            "deep.cedar",
            |b| std::fs::write(b.join("deep.cedar"), deep_policy(&vec!["1"; 100_000].join(" + "))).unwrap(),
            "nested too deeply",
        ),
        ("x.cedar", |b| symlink("nowhere.cedar", b.join("x.cedar")).unwrap(), "which does not exist"),
        (
            "x.cedar",
            |b| assert!(Command::new("mkfifo").arg(b.join("x.cedar")).status().unwrap().success()),
            "not a regular file",
        ),
        (
            "schema.cedarschema",
            |b| {
                let path = b.join("schema.cedarschema");
                let schema = std::fs::read_to_string(&path).unwrap();
                let deep = format!("type Deep = {}String{};\n", "Set<".repeat(50_000), ">".repeat(50_000));
                std::fs::write(&path, format!("{schema}{deep}")).unwrap();
            },
            "nested too deeply",
        ),
    ];
    for (file, break_it, why) in hostile {
        break_it(&bundle);
        let reload = admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner();
        assert_eq!((reload.outcome.as_str(), reload.revision.as_str()), ("failed", old.as_str()), "{file}");
        assert!(reload.error.contains(&format!("{}:", bundle.join(file).display())), "{}", reload.error);
        assert!(reload.error.contains(why), "{}", reload.error);

        let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.revision, old);
        assert!(status.last_reload_error.contains(why), "{}", status.last_reload_error);
        let decision = decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap();
        assert_eq!(decision.into_inner().revision, old);

        // Mend the bundle: the old revision again, nothing swapped.
        for extra in ["deep.cedar", "x.cedar"] {
            let _ = std::fs::remove_file(bundle.join(extra));
        }
        copy_sample(&bundle);
        let reload = admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner();
        assert_eq!(reload.outcome, "unchanged", "{reload:?}");
    }

    // As deep as allowed: served, and decided (a debug build's evaluator may run out of room
    // and fail closed, but the answer comes).
    std::fs::write(bundle.join("deep.cedar"), at_the_limit()).unwrap();
    let reload = admin.reload(pb::ReloadRequest {}).await.unwrap().into_inner();
    assert_eq!(reload.outcome, "swapped", "{reload:?}");
    let decision = decisions.evaluate(token_request("ag-mail-01", "graph", "Mail.Read")).await.unwrap().into_inner();
    assert_eq!(decision.revision, reload.revision);
    assert!(server.child.try_wait().unwrap().is_none(), "the server exited:\n{}", server.log());
}
