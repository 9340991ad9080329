//! The offline CLI, run as a user runs it: `agentca validate`, `eval`, `test`, and which
//! commands the binary has.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn agentca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentca")).args(args).current_dir(root()).output().unwrap()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A copy of the sample bundle that a test may break.
fn sample_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root().join("policies")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

fn edit(path: &Path, from: &str, to: &str) {
    let src = std::fs::read_to_string(path).unwrap();
    assert!(src.contains(from), "{from} not in {}", path.display());
    std::fs::write(path, src.replacen(from, to, 1)).unwrap();
}

/// Compares with a golden file; `AGENTCA_BLESS=1` rewrites it.
fn golden(name: &str, actual: &str) {
    let path = root().join("tests/golden").join(name);
    if std::env::var_os("AGENTCA_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(actual, expected, "golden file {} differs (AGENTCA_BLESS=1 to rewrite)", path.display());
}

fn write_request(json: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(json.as_bytes()).unwrap();
    f
}

#[test]
fn validate_accepts_the_sample_bundle() {
    let out = agentca(&["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("is valid: 14 policies (12 on, 1 report-only, 1 off), 13 agents"), "{stdout}");
    assert!(stdout.contains("revision sha256:"), "{stdout}");
}

#[test]
fn validate_reports_every_error_with_file_line_and_column() {
    let dir = sample_copy();
    let p = dir.path();
    edit(&p.join("conditions.cedar"), "resource.sensitivity == \"high\"", "resource.sensitivty == \"high\"");
    edit(&p.join("scoped.cedar"), "@id(\"support-eu-delegated-only\")", "@id(\"finance-ledger-business-hours\")");
    edit(&p.join("baseline.cedar"), "@id(\"block-agent-users\")\n", "");
    edit(&p.join("baseline.cedar"), "@state(\"report-only\")", "@state(\"pilot\")");
    edit(&p.join("directory.json"), "\"sponsor\": \"s-dan\"", "\"sponsor\": \"s-nobody\"");
    edit(
        &p.join("directory.json"),
        "\"allowed_resources\": [\"code\"]",
        "\"allowed_resources\": [\"code\", \"gitlab\"]",
    );
    edit(&p.join("locations.json"), "10.42.0.0/16", "10.42.0.0/99");
    let out = agentca(&["validate", "--policies", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    golden("validate-broken.txt", &text(&out.stderr).replace(p.to_str().unwrap(), "BUNDLE"));
}

#[test]
fn validate_reports_parse_errors_and_a_missing_schema() {
    let dir = sample_copy();
    std::fs::write(
        dir.path().join("extra.cedar"),
        "@id(\"x\")\npermit(principal, action, resource)\nwhen { context.hour > };\n",
    )
    .unwrap();
    let out = agentca(&["validate", "--policies", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("extra.cedar:3:23: unexpected token"), "{stderr}");

    std::fs::remove_file(dir.path().join("schema.cedarschema")).unwrap();
    let out = agentca(&["validate", "--policies", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("schema.cedarschema: cannot read"), "{}", text(&out.stderr));
}

fn decision_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)))
}

#[test]
fn eval_exits_0_on_allow_and_2_on_deny() {
    let allow = write_request(
        r#"{"agent": "ag-mail-01", "resource": "graph", "scopes": ["Mail.Read"], "client_ip": "10.1.2.3",
            "time": "2026-11-27T10:00:00Z", "request_id": "caller-correlation-id"}"#,
    );
    let out = agentca(&["eval", "--request", allow.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut d = decision_json(&out);
    assert_eq!(d["decision"], "allow");
    assert_eq!(d["request_id"], "caller-correlation-id");
    assert!(d["decision_id"].as_str().is_some_and(|s| s.len() == 36));
    assert!(d["revision"].as_str().is_some_and(|s| s.starts_with("sha256:")));
    d["decision_id"] = "ID".into();
    d["eval_us"] = 0.into();
    d["revision"] = "REV".into();
    golden("eval-allow.json", &serde_json::to_string_pretty(&d).unwrap());

    let deny = write_request(r#"{"agent": "ag-mail-02", "resource": "graph", "scopes": ["Mail.Read"]}"#);
    let out = agentca(&["eval", "--request", deny.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let d = decision_json(&out);
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["reasons"][0]["policy"], "block-high-risk-agents");
    assert_eq!(d["reasons"][0]["effect"], "forbid");
    assert_eq!(d["reasons"][0]["reason"], "the agent's risk level is high");
}

#[test]
fn eval_reads_standard_input() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["eval", "--request", "-"])
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"agent": "ag-ghost", "resource": "graph"}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(decision_json(&out)["reasons"][0]["code"], "unknown_agent");
}

#[test]
fn eval_rejects_malformed_input_naming_the_field() {
    let cases = [
        (r#"{"agent": "", "resource": "graph"}"#, "field `agent`: must not be empty"),
        (r#"{"agent": "a", "resource": "graph", "client_ip": "300.1.1.1"}"#, "field `client_ip`"),
        (r#"{"agent": "a", "resource": "graph", "time": "yesterday"}"#, "field `time`"),
        (r#"{"agent": "a", "resource": "graph", "flow": "implicit"}"#, "field `flow`: unknown flow `implicit`"),
        (r#"{"agent": "a", "resource": "graph", "scopes": "Mail.Read"}"#, "field `scopes`"),
        (r#"{"agent": "a", "resource": "graph",}"#, "is not JSON"),
    ];
    for (json, want) in cases {
        let f = write_request(json);
        let out = agentca(&["eval", "--request", f.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{json}");
        assert!(out.stdout.is_empty(), "{json}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(want), "{json}: {stderr}");
    }
    let out = agentca(&["eval", "--request", "/nonexistent/request.json"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn eval_explain_lists_every_policy() {
    let f = write_request(
        r#"{"agent": "ag-recon-01", "resource": "ledger", "scopes": ["Ledger.Read"], "client_ip": "203.0.113.7",
            "time": "2026-11-25T10:00:00Z"}"#,
    );
    let out = agentca(&["eval", "--explain", "--request", f.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let d = decision_json(&out);
    let explain = d["explain"].as_array().unwrap();
    assert_eq!(explain.len(), 14);
    let find = |id: &str| explain.iter().find(|e| e["policy"] == id).unwrap().clone();
    assert_eq!(find("high-sensitivity-from-named-locations")["outcome"], "applied");
    assert_eq!(find("support-eu-delegated-only")["unmet"], "principal");
    assert_eq!(find("gateway-read-within-blueprint")["unmet"], "action");
    assert_eq!(find("block-high-risk-agents")["unmet"], "condition");
    assert_eq!(find("block-agent-users")["state"], "off");
    assert!(find("allow-within-blueprint")["at"].as_str().unwrap().ends_with("baseline.cedar:4:1"));
}

#[test]
fn test_runs_the_sample_suite() {
    let out = agentca(&["test"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.ends_with("33 passed, 0 failed\n"), "{stdout}");
}

#[test]
fn test_prints_each_failure_with_what_it_got() {
    let cases = write_request(
        r#"[{"name": "passes", "request": {"agent": "ag-mail-02", "resource": "graph"}, "expect": "deny",
             "reasons": ["block-high-risk-agents"]},
            {"name": "wrong decision", "request": {"agent": "ag-mail-02", "resource": "graph"}, "expect": "allow"},
            {"name": "wrong reason", "request": {"agent": "ag-ghost", "resource": "graph"}, "expect": "deny",
             "reasons": ["agent_disabled"]},
            {"name": "bad request", "request": {"agent": "ag-mail-01", "resource": "graph", "flow": "x"}, "expect": "deny"}]"#,
    );
    let out = agentca(&["test", cases.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout).replace(cases.path().to_str().unwrap(), "CASES");
    golden("test-failures.txt", &stdout);
}

/// Runs `agentca ARGS` with standard output a pipe nobody reads any more.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(args)
        .current_dir(root())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let audit = tempfile::tempdir().unwrap();
    let log = audit.path().join("a.jsonl");
    agentca(&["eval", "--request", "examples/request.json", "--audit", log.to_str().unwrap()]);
    for args in [
        vec!["validate"],
        vec!["eval", "--request", "examples/request.json"],
        vec!["eval", "--explain", "--request", "examples/request.json"],
        vec!["test"],
        vec!["audit", "verify", log.to_str().unwrap()],
    ] {
        let out = with_closed_stdout(&args);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {}", text(&out.stderr));
        assert!(!text(&out.stderr).contains("panicked"), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn hostile_requests_are_bad_input_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    };
    let cases = [
        (
            write("dup.json", r#"{"agent": "ag-mail-01", "resource": "graph", "agent": "ag-mail-02"}"#),
            "duplicate key `agent`",
        ),
        (
            write("leap.json", r#"{"agent": "ag-mail-01", "resource": "graph", "time": "2016-12-31T23:59:60Z"}"#),
            "field `time`",
        ),
        (write("space.json", r#"{"agent": "ag-mail-01 ", "resource": "graph"}"#), "field `agent`"),
        (write("big.json", &format!("{{\"agent\": \"{}\"}}", "a".repeat(2 << 20))), "larger than the limit"),
        ("/dev/zero".to_string(), "not a regular file"),
    ];
    for (path, want) in cases {
        let out = agentca(&["eval", "--request", &path]);
        assert_eq!(out.status.code(), Some(1), "{path}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(want), "{path}: {}", text(&out.stderr));
    }
    // Standard input is capped too.
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["eval", "--request", "-"])
        .current_dir(root())
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(1));
    assert!(stderr.contains("larger than the limit"), "{stderr}");
    // Duplicate keys in a test case file are refused too.
    let cases = write("cases.json", r#"[{"name": "x", "expect": "allow", "expect": "deny", "request": {}}]"#);
    let out = agentca(&["test", &cases]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("duplicate key `expect`"), "{}", text(&out.stdout));
}

#[test]
fn audit_verify_never_reads_a_device_for_ever() {
    let out = agentca(&["audit", "verify", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("is not a record"), "{}", text(&out.stdout));
}

#[test]
fn bundle_text_never_reaches_a_terminal_raw_and_reasons_are_bounded() {
    let dir = sample_copy();
    let evil = dir.path().join("\u{1b}[31mRED\nfake.cedar");
    std::fs::write(&evil, "@id(\"a\")\nforbid(principal, action, resource) when { bogus };\n").unwrap();
    let out = agentca(&["validate", "--policies", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(!err.contains('\u{1b}') && err.contains("\\u{1b}[31mRED\\u{a}fake.cedar"), "{err}");
    std::fs::remove_file(&evil).unwrap();

    for (policy, want) in [
        ("@id(\"a\\u{1b}[2J\")\nforbid(principal, action, resource);\n", "is not an id"),
        (
            &format!("@id(\"big\") @reason(\"{}\")\nforbid(principal, action, resource);\n", "r".repeat(5000)),
            "@reason must be at most 4096 bytes",
        ),
        ("@id(\"b\") @reason(\"line\\nbreak\")\nforbid(principal, action, resource);\n", "@reason must be"),
    ] {
        std::fs::write(dir.path().join("extra.cedar"), policy).unwrap();
        let out = agentca(&["validate", "--policies", dir.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{policy:.60}");
        let err = text(&out.stderr);
        assert!(err.contains(want) && !err.contains('\u{1b}'), "{err}");
    }
}

#[test]
fn the_tools_are_in_the_binary_only_with_their_feature() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("generated");
    let bundle = bundle.to_str().unwrap();
    let out = agentca(&[
        "generate",
        "--out",
        bundle,
        "--agents",
        "20",
        "--blueprints",
        "2",
        "--sponsors",
        "3",
        "--policies",
        "12",
        "--resources",
        "3",
    ]);
    if cfg!(feature = "tools") {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).starts_with("wrote 12 policies and 20 agents"), "{}", text(&out.stdout));
        let out = agentca(&["validate", "--policies", bundle]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    } else {
        // The server's binary carries only the product: clap does not know the command.
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("unrecognized subcommand 'generate'"), "{}", text(&out.stderr));
        for tool in ["loadgen", "noop-serve"] {
            assert_eq!(agentca(&[tool, "--help"]).status.code(), Some(2), "{tool}");
        }
    }
}

#[test]
fn an_offline_audit_log_that_cannot_be_written_fails_the_command() {
    // `--audit -` on a full stdout: the command fails at once, it does not retry for ever.
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_agentca"))
        .args(["eval", "--request", "examples/request.json", "--audit", "-"])
        .current_dir(root())
        .stdout(std::fs::File::options().write(true).open("/dev/full").unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("the audit log cannot be written"), "{}", text(&out.stderr));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn policy_files_are_never_left_out_silently() {
    for odd in ["baseline.CEDAR", "baseline.Cedar", "baseline.cedar "] {
        let dir = sample_copy();
        std::fs::rename(dir.path().join("baseline.cedar"), dir.path().join(odd)).unwrap();
        let out = agentca(&["validate", "--policies", dir.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{odd}");
        assert!(
            text(&out.stderr).contains("looks like a policy file but is not named `*.cedar`"),
            "{odd}: {}",
            text(&out.stderr)
        );
    }
    let dir = sample_copy();
    let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"a\xffb.cedar");
    std::fs::write(dir.path().join(name), "").unwrap();
    let out = agentca(&["validate", "--policies", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("the file name is not UTF-8"), "{}", text(&out.stderr));

    // Left out on purpose, and said so: a hidden file, a subfolder.
    let dir = sample_copy();
    std::fs::copy(dir.path().join("baseline.cedar"), dir.path().join(".old.cedar")).unwrap();
    std::fs::create_dir(dir.path().join("drafts")).unwrap();
    std::fs::write(dir.path().join("drafts/new.cedar"), "").unwrap();
    let out = agentca(&["validate", "--policies", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains(".old.cedar: a hidden file is not part of the bundle"), "{err}");
    assert!(err.contains("drafts: policies in a subfolder are not part of the bundle"), "{err}");
}
