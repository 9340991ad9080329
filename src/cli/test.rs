//! `agentca test`: run test cases against the bundle and report each failure.
//!
//! A case: `{"name": "...", "request": {...}, "expect": "allow" | "deny" | "error",
//! "reasons": ["policy-id" | "reason_code", ...], "report_only": ["policy-id", ...],
//! "report_only_decision": "allow" | "deny"}`; only `name`, `request` and `expect` are required.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

use crate::audit::Audit;
use crate::engine::{Decision, Verdict, evaluate};
use crate::signals::Overlay;
use crate::snapshot::Snapshot;

use super::eval::parse_request;
use super::{Error, audit_decision, exit, load, offline_audit, print_error};

/// Exit 0 if every case passed, 1 (an answer, not an error) if one failed or none was found.
pub fn run(dir: &Path, files: &[PathBuf], verbose: bool, audit: Option<&str>) -> Result<ExitCode, Error> {
    let snap = load(dir)?;
    let audit = offline_audit(audit)?;
    let files = if files.is_empty() { default_files(dir) } else { files.to_vec() };
    let live = Overlay::new();
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in &files {
        let cases = match read_cases(file) {
            Ok(c) => c,
            Err(message) => {
                outln!("FAIL {}: {message}", file.display())?;
                failed += 1;
                continue;
            }
        };
        for (i, case) in cases.iter().enumerate() {
            let name =
                case.get("name").and_then(Value::as_str).map_or_else(|| format!("case {}", i + 1), str::to_string);
            match run_case(&snap, &live, case, audit.as_ref()) {
                Ok(summary) => {
                    passed += 1;
                    if verbose {
                        outln!("ok   {}: {name}: {summary}", file.display())?;
                    }
                }
                Err(why) => {
                    failed += 1;
                    outln!("FAIL {}: {name}: {why}", file.display())?;
                }
            }
        }
    }
    if passed + failed == 0 {
        outln!("no test cases found in {}", if files.is_empty() { "tests/*.json".to_string() } else { list(&files) })?;
        outln!("0 passed, 0 failed")?;
        return Ok(ExitCode::from(exit::FAILURE));
    }
    outln!("{passed} passed, {failed} failed")?;
    Ok(ExitCode::from(if failed == 0 { exit::OK } else { exit::FAILURE }))
}

fn list(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn default_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tests"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A test case file that cannot be read as cases.
#[derive(Debug, thiserror::Error)]
enum CaseFileError {
    #[error(transparent)]
    Read(#[from] crate::input::InputError),
    #[error("not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("expected a JSON array of test cases")]
    NotAnArray,
}

fn read_cases(file: &Path) -> Result<Vec<Value>, CaseFileError> {
    let text = crate::input::read_file(file, crate::input::MAX_TEST_FILE_BYTES)?;
    match crate::input::parse_json(&text)? {
        Value::Array(cases) => Ok(cases),
        _ => Err(CaseFileError::NotAnArray),
    }
}

/// What a failed case got wrong (or why it could not run), in one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CaseFailed(String);

impl From<&str> for CaseFailed {
    fn from(why: &str) -> Self {
        CaseFailed(why.to_string())
    }
}

impl From<String> for CaseFailed {
    fn from(why: String) -> Self {
        CaseFailed(why)
    }
}

/// Runs one case; Ok with a one-line summary, or Err saying what differed.
fn run_case(snap: &Snapshot, live: &Overlay, case: &Value, audit: Option<&Audit>) -> Result<String, CaseFailed> {
    let field = |name: &str| case.get(name).filter(|v| !v.is_null());
    let expect = match field("expect").and_then(Value::as_str) {
        Some(e @ ("allow" | "deny" | "error")) => e,
        Some(other) => return Err(format!("field `expect`: `{other}` is not one of allow, deny, error").into()),
        None => return Err("field `expect` is required: allow, deny or error".into()),
    };
    let request = field("request").ok_or("field `request` is required")?;
    let strings = |name: &str| -> Result<Vec<&str>, CaseFailed> {
        match field(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().ok_or_else(|| format!("field `{name}`: expected an array of strings").into()))
                .collect(),
            Some(_) => Err(format!("field `{name}`: expected an array of strings").into()),
        }
    };
    let reasons = strings("reasons")?;
    let report_only = strings("report_only")?;
    let request = match (parse_request(request), expect) {
        (Err(e), "error") => {
            // An expected error may name what it must mention, through `reasons`.
            let e = e.to_string();
            return match reasons.iter().find(|r| !e.contains(*r)) {
                None => Ok(format!("error: {e}")),
                Some(missing) => Err(format!("expected an error mentioning `{missing}`, got: {e}").into()),
            };
        }
        (Err(e), _) => return Err(format!("expected {expect}, got an invalid request: {e}").into()),
        (Ok(_), "error") => return Err("expected an invalid request, but it was accepted".into()),
        (Ok(r), _) => r,
    };
    let d = evaluate(snap, live, &request);
    // A record not written fails this case, and the run goes on.
    audit_decision(audit, snap, &request, &d).map_err(|e| {
        print_error(&e);
        CaseFailed::from("the audit record could not be written")
    })?;
    let got = verdict(d.decision);
    let mut problems = Vec::new();
    if got != expect {
        problems.push(format!("expected {expect}, got {got}"));
    }
    let missing: Vec<&str> = reasons.iter().copied().filter(|r| !d.has_reason(r)).collect();
    if !missing.is_empty() {
        problems.push(format!("missing reasons {}", missing.join(", ")));
    }
    let unreported: Vec<&str> =
        report_only.iter().copied().filter(|r| !d.report_only.iter().any(|m| &*m.policy == *r)).collect();
    if !unreported.is_empty() {
        problems.push(format!("missing report-only {}", unreported.join(", ")));
    }
    if let Some(want) = field("report_only_decision") {
        let got = verdict(d.report_only_decision);
        if want.as_str() != Some(got) {
            problems.push(format!("expected report_only_decision {want}, got {got}"));
        }
    }
    let summary = summarize(&d);
    if problems.is_empty() { Ok(summary) } else { Err(format!("{} ({summary})", problems.join("; ")).into()) }
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    }
}

fn summarize(d: &Decision) -> String {
    let reasons: Vec<&str> = d.reasons.iter().map(|r| r.policy.as_deref().unwrap_or(r.code.as_str())).collect();
    let mut s = format!("{}: {}", verdict(d.decision), reasons.join(", "));
    if !d.report_only.is_empty() {
        let ro: Vec<&str> = d.report_only.iter().map(|r| &*r.policy).collect();
        s.push_str(&format!("; report-only {} would {}", ro.join(", "), verdict(d.report_only_decision)));
    }
    for e in &d.errors {
        s.push_str(&format!("; error in `{}`: {}", e.policy, e.message));
    }
    s
}
