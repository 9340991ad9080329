//! `agentca eval`: one decision, offline, as JSON (What If), optionally explained per policy.

use std::path::Path;
use std::process::ExitCode;

use chrono::Utc;
use serde_json::Value;

use crate::engine::{evaluate, explain};
use crate::input::InputError;
use crate::request::{RawRequest, Request, RequestError};
use crate::signals::Overlay;

use super::{Error, audit_decision, exit, load, offline_audit};

pub fn run(dir: &Path, request_path: &str, with_explain: bool, audit: Option<&str>) -> Result<ExitCode, Error> {
    let request = read_request(request_path)?;
    let snap = load(dir)?;
    let audit = offline_audit(audit)?;
    let live = Overlay::new();
    let decision = evaluate(&snap, &live, &request);
    audit_decision(audit.as_ref(), &snap, &request, &decision)?;
    let mut out = serde_json::to_value(&decision).map_err(Error::Print)?;
    if with_explain && let Value::Object(map) = &mut out {
        map.insert("explain".into(), serde_json::to_value(explain(&snap, &live, &request)).unwrap_or(Value::Null));
    }
    outln!("{}", serde_json::to_string_pretty(&out).map_err(Error::Print)?)?;
    Ok(ExitCode::from(if decision.is_allow() { exit::OK } else { exit::DENY }))
}

/// A request that could not be read (the file or standard input) or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum RequestInputError {
    #[error("standard input {0}")]
    Stdin(InputError),
    #[error("`{path}` {source}")]
    File { path: String, source: InputError },
    #[error("`{path}` is not JSON: {source}")]
    NotJson { path: String, source: serde_json::Error },
    #[error(transparent)]
    Invalid(#[from] RequestError),
}

/// Reads and validates a request from a file or standard input.
pub(super) fn read_request(path: &str) -> Result<Request, RequestInputError> {
    let limit = crate::input::MAX_REQUEST_BYTES;
    let text = if path == "-" {
        crate::input::read_capped(std::io::stdin().lock(), limit).map_err(RequestInputError::Stdin)?
    } else {
        crate::input::read_file(Path::new(path), limit)
            .map_err(|source| RequestInputError::File { path: path.to_string(), source })?
    };
    // A key given twice (`"agent"` twice) is refused: which one was meant cannot be known.
    let value: Value = crate::input::parse_json(&text)
        .map_err(|source| RequestInputError::NotJson { path: path.to_string(), source })?;
    Ok(parse_request(&value)?)
}

pub(super) fn parse_request(value: &Value) -> Result<Request, RequestError> {
    RawRequest::from_json(value).and_then(|raw| raw.validate(Utc::now()))
}
