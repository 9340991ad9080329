//! The request: the raw fields as a caller sends them, their validation, and the typed
//! request the engine trusts. A malformed field is an error naming it, never ignored.

use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::directory::RiskLevel;
use crate::input::{UnknownName, parse_name, shown};

/// Longest id, scope, user or request id accepted, in bytes.
pub const MAX_ID_LEN: usize = crate::input::MAX_ID_LEN;
/// Most scopes in one request.
pub const MAX_SCOPES: usize = 256;
/// Longest `path` accepted (call_api), in bytes.
pub const MAX_PATH_LEN: usize = 8192;

/// A request field that is missing, malformed or does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("field `{field}`: {message}")]
    Field { field: &'static str, message: String },
    #[error("unknown field `{}`: expected one of {list}", crate::input::printable(.0), list = FIELDS.join(", "))]
    UnknownField(String),
    #[error("the request must be a JSON object")]
    NotAnObject,
}

impl RequestError {
    fn field(field: &'static str, message: impl Into<String>) -> Self {
        RequestError::Field { field, message: message.into() }
    }

    /// The field at fault, if the error is about one.
    pub fn field_name(&self) -> Option<&str> {
        match self {
            RequestError::Field { field, .. } => Some(field),
            RequestError::UnknownField(f) => Some(f),
            RequestError::NotAnObject => None,
        }
    }
}

const FIELDS: [&str; 13] = [
    "agent",
    "resource",
    "action",
    "scopes",
    "flow",
    "grant_type",
    "user",
    "client_ip",
    "time",
    "signin_risk",
    "request_id",
    "method",
    "path",
];

/// The two questions agentca answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A token issuer asks before it mints a token.
    RequestToken,
    /// A gateway asks inline before it forwards a call.
    CallApi,
}

impl Action {
    pub const ALL: [Action; 2] = [Action::RequestToken, Action::CallApi];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::RequestToken => "request_token",
            Action::CallApi => "call_api",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::str::FromStr for Action {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        parse_name("action", s, &Action::ALL, Action::as_str)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the agent gets its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// The agent acts as itself (client credentials).
    AppOnly,
    /// The agent acts for a signed-in user.
    OnBehalfOf,
    /// The agent acts as its own agent user account.
    AgentUser,
}

impl std::str::FromStr for Flow {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        let all = [Flow::AppOnly, Flow::OnBehalfOf, Flow::AgentUser];
        parse_name("flow", s, &all, Flow::as_str)
    }
}

impl Flow {
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::AppOnly => "app_only",
            Flow::OnBehalfOf => "on_behalf_of",
            Flow::AgentUser => "agent_user",
        }
    }

    /// The grant type used when the request names none.
    pub fn default_grant_type(self) -> &'static str {
        match self {
            Flow::AppOnly => "client_credentials",
            Flow::OnBehalfOf | Flow::AgentUser => "urn:ietf:params:oauth:grant-type:jwt-bearer",
        }
    }
}

/// The fields as a caller sent them (CLI JSON or a proto message), not yet checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRequest {
    pub agent: Option<String>,
    pub resource: Option<String>,
    pub action: Option<String>,
    pub scopes: Vec<String>,
    pub flow: Option<String>,
    pub grant_type: Option<String>,
    pub user: Option<String>,
    pub client_ip: Option<String>,
    pub time: Option<String>,
    pub signin_risk: Option<String>,
    pub request_id: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
}

/// What the caller asks for, with the fields that belong to that question alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// A token issuer asks before it mints a token: the grant type is filled from the flow
    /// when the caller named none; `user` is there exactly when the flow acts for a user.
    Token { scopes: Vec<String>, grant_type: String, user: Option<String> },
    /// A gateway asks before it forwards a call: the method upper-cased, the path as sent.
    Call { method: String, path: String },
}

/// A validated request: every field typed, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub agent: String,
    pub resource: String,
    pub ask: Ask,
    pub flow: Flow,
    pub client_ip: Option<IpAddr>,
    pub time: DateTime<Utc>,
    pub signin_risk: RiskLevel,
    pub request_id: Option<String>,
}

impl Request {
    pub fn action(&self) -> Action {
        match self.ask {
            Ask::Token { .. } => Action::RequestToken,
            Ask::Call { .. } => Action::CallApi,
        }
    }
}

/// The request as audit records hold it (DESIGN §5's shape): fields in this order, those
/// that do not apply left out. `tests/golden/audit-records.jsonl` pins the bytes.
impl Serialize for Request {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(None)?;
        m.serialize_entry("agent", &self.agent)?;
        m.serialize_entry("resource", &self.resource)?;
        m.serialize_entry("action", &self.action())?;
        if let Ask::Token { scopes, .. } = &self.ask
            && !scopes.is_empty()
        {
            m.serialize_entry("scopes", scopes)?;
        }
        m.serialize_entry("flow", &self.flow)?;
        if let Ask::Token { grant_type, user, .. } = &self.ask {
            m.serialize_entry("grant_type", grant_type)?;
            if let Some(user) = user {
                m.serialize_entry("user", user)?;
            }
        }
        if let Some(ip) = &self.client_ip {
            m.serialize_entry("client_ip", ip)?;
        }
        m.serialize_entry("time", &self.time)?;
        m.serialize_entry("signin_risk", &self.signin_risk)?;
        if let Some(id) = &self.request_id {
            m.serialize_entry("request_id", id)?;
        }
        if let Ask::Call { method, path } = &self.ask {
            m.serialize_entry("method", method)?;
            m.serialize_entry("path", path)?;
        }
        m.end()
    }
}

impl RawRequest {
    /// Reads the JSON shape of DESIGN §5; a field of the wrong type is an error naming it.
    pub fn from_json(value: &Value) -> Result<RawRequest, RequestError> {
        let Value::Object(map) = value else { return Err(RequestError::NotAnObject) };
        let mut raw = RawRequest::default();
        for (key, v) in map {
            let Some(&field) = FIELDS.iter().find(|f| **f == key.as_str()) else {
                return Err(RequestError::UnknownField(key.clone()));
            };
            if field == "scopes" {
                raw.scopes = match v {
                    Value::Null => Vec::new(),
                    Value::Array(items) => items
                        .iter()
                        .map(|s| s.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| RequestError::field("scopes", "expected an array of strings"))?,
                    _ => return Err(RequestError::field("scopes", "expected an array of strings")),
                };
                continue;
            }
            let text = match v {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                _ => return Err(RequestError::field(field, "expected a string")),
            };
            *raw.slot(field) = text;
        }
        Ok(raw)
    }

    fn slot(&mut self, field: &str) -> &mut Option<String> {
        match field {
            "agent" => &mut self.agent,
            "resource" => &mut self.resource,
            "action" => &mut self.action,
            "flow" => &mut self.flow,
            "grant_type" => &mut self.grant_type,
            "user" => &mut self.user,
            "client_ip" => &mut self.client_ip,
            "time" => &mut self.time,
            "signin_risk" => &mut self.signin_risk,
            "request_id" => &mut self.request_id,
            "method" => &mut self.method,
            _ => &mut self.path,
        }
    }

    /// Checks every field and applies the defaults (`time` defaults to `now`).
    pub fn validate(self, now: DateTime<Utc>) -> Result<Request, RequestError> {
        self.validate_with(now, None)
    }

    /// As `validate`, refusing a `time` more than `max_skew` away from `now` when one is given.
    pub fn validate_with(self, now: DateTime<Utc>, max_skew: Option<TimeDelta>) -> Result<Request, RequestError> {
        let agent = id_field("agent", self.agent)?.ok_or_else(|| RequestError::field("agent", "is required"))?;
        let resource =
            id_field("resource", self.resource)?.ok_or_else(|| RequestError::field("resource", "is required"))?;
        let action = name_field("action", self.action.as_deref(), Action::RequestToken)?;
        let flow = name_field("flow", self.flow.as_deref(), Flow::AppOnly)?;
        let user = id_field("user", self.user)?;
        let signin_risk = name_field("signin_risk", self.signin_risk.as_deref(), RiskLevel::None)?;
        let client_ip = match self.client_ip.as_deref() {
            None | Some("") => None,
            Some(s) => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| {
                        RequestError::field("client_ip", format!("`{}` is not an IPv4 or IPv6 address", shown(s)))
                    })?
                    // An IPv4 client seen through a dual-stack socket is matched as IPv4.
                    .to_canonical(),
            ),
        };
        let time = match self.time.as_deref() {
            None | Some("") => now,
            Some(s) => DateTime::parse_from_rfc3339(s)
                .map_err(|e| {
                    RequestError::field(
                        "time",
                        format!("`{}` is not an RFC 3339 time such as 2026-11-27T10:00:00Z: {e}", shown(s)),
                    )
                })?
                .with_timezone(&Utc),
        };
        // chrono reads `23:59:60` as a leap second, which Cedar's datetime cannot hold.
        if time.nanosecond() >= 1_000_000_000 {
            return Err(RequestError::field(
                "time",
                format!(
                    "`{}` is a leap second, which is not supported: use :59",
                    shown(self.time.as_deref().unwrap_or(""))
                ),
            ));
        }
        if let Some(skew) = max_skew
            && (time - now).abs() > skew
        {
            return Err(RequestError::field(
                "time",
                format!(
                    "`{}` is more than {} s from the server's clock ({})",
                    shown(self.time.as_deref().unwrap_or("")),
                    skew.num_seconds(),
                    now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
            ));
        }
        let request_id = id_field("request_id", self.request_id)?;
        for scope in &self.scopes {
            if scope.is_empty()
                || scope.len() > MAX_ID_LEN
                || scope.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(RequestError::field(
                    "scopes",
                    format!("`{}` is not a scope: a scope is 1 to {MAX_ID_LEN} bytes without spaces", shown(scope)),
                ));
            }
        }
        if self.scopes.len() > MAX_SCOPES {
            return Err(RequestError::field(
                "scopes",
                format!("at most {MAX_SCOPES} scopes, got {}", self.scopes.len()),
            ));
        }
        let grant_type = self.grant_type.filter(|g| !g.is_empty());
        let method = self.method.filter(|m| !m.is_empty());
        let path = self.path.filter(|p| !p.is_empty());

        let ask = match action {
            Action::RequestToken => {
                for (field, given) in [("method", method.is_some()), ("path", path.is_some())] {
                    if given {
                        return Err(RequestError::field(field, "applies only to action call_api"));
                    }
                }
                match (flow, &user) {
                    (Flow::AppOnly, Some(_)) => {
                        return Err(RequestError::field("user", "must be empty when flow is app_only"));
                    }
                    (Flow::OnBehalfOf | Flow::AgentUser, None) => {
                        return Err(RequestError::field("user", format!("is required when flow is {}", flow.as_str())));
                    }
                    _ => {}
                }
                if let Some(g) = &grant_type
                    && (g.len() > MAX_ID_LEN || g.chars().any(char::is_control))
                {
                    return Err(RequestError::field("grant_type", "is not a grant type"));
                }
                Ask::Token {
                    scopes: self.scopes,
                    grant_type: grant_type.unwrap_or_else(|| flow.default_grant_type().to_string()),
                    user,
                }
            }
            Action::CallApi => {
                for (field, given) in [
                    ("scopes", !self.scopes.is_empty()),
                    ("grant_type", grant_type.is_some()),
                    ("user", user.is_some()),
                ] {
                    if given {
                        return Err(RequestError::field(field, "applies only to action request_token"));
                    }
                }
                let method = method.ok_or_else(|| RequestError::field("method", "is required for action call_api"))?;
                if method.len() > 32 || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(RequestError::field("method", format!("`{}` is not an HTTP method", shown(&method))));
                }
                let path = path.ok_or_else(|| RequestError::field("path", "is required for action call_api"))?;
                if !path.starts_with('/') || path.len() > MAX_PATH_LEN || path.chars().any(char::is_control) {
                    return Err(RequestError::field(
                        "path",
                        format!(
                            "`{}` is not a request path: it starts with / and is at most {MAX_PATH_LEN} bytes",
                            shown(&path)
                        ),
                    ));
                }
                Ask::Call { method: method.to_ascii_uppercase(), path }
            }
        };
        Ok(Request { agent, resource, ask, flow, client_ip, time, signin_risk, request_id })
    }
}

/// An identifier: absent when null or empty is not allowed for required ones (the caller
/// decides); too long or containing control characters is an error.
fn id_field(field: &'static str, value: Option<String>) -> Result<Option<String>, RequestError> {
    match value {
        None => Ok(None),
        Some(v) if v.is_empty() => match field {
            "agent" | "resource" => Err(RequestError::field(field, "must not be empty")),
            _ => Ok(None),
        },
        Some(v) if v.len() > MAX_ID_LEN => {
            Err(RequestError::field(field, format!("is longer than {MAX_ID_LEN} bytes")))
        }
        Some(v) if v.chars().any(char::is_control) => {
            Err(RequestError::field(field, "must not contain control characters"))
        }
        // Ids are taken as sent, never trimmed: `ag-1 ` is not `ag-1`, and no id has spaces.
        Some(v) if field != "request_id" && v.chars().any(char::is_whitespace) => {
            Err(RequestError::field(field, format!("`{}` is not an id: an id has no whitespace", shown(&v))))
        }
        Some(v) => Ok(Some(v)),
    }
}

/// A name from a closed list (an action, a flow, a risk level); absent or empty is `default`.
fn name_field<T: std::str::FromStr<Err = UnknownName>>(
    field: &'static str,
    value: Option<&str>,
    default: T,
) -> Result<T, RequestError> {
    match value {
        None | Some("") => Ok(default),
        Some(s) => s.parse().map_err(|e: UnknownName| RequestError::field(field, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Request, String> {
        let v: Value = serde_json::from_str(json).unwrap();
        RawRequest::from_json(&v).and_then(|r| r.validate(Utc::now())).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_apply() {
        let r = parse(r#"{"agent": "a", "resource": "r", "time": "2026-11-27T10:00:00+01:00"}"#).unwrap();
        assert_eq!(r.action(), Action::RequestToken);
        assert_eq!(r.flow, Flow::AppOnly);
        let Ask::Token { grant_type, .. } = &r.ask else { panic!("{r:?}") };
        assert_eq!(grant_type, "client_credentials");
        assert_eq!(r.signin_risk, RiskLevel::None);
        assert_eq!(r.time.to_rfc3339(), "2026-11-27T09:00:00+00:00");
    }

    #[test]
    fn malformed_fields_are_named() {
        let cases = [
            (r#"{"agent": "", "resource": "r"}"#, "field `agent`: must not be empty"),
            (r#"{"resource": "r"}"#, "field `agent`: is required"),
            (
                r#"{"agent": "a", "resource": "r", "flow": "ap_only"}"#,
                "field `flow`: unknown flow `ap_only`: expected one of app_only, on_behalf_of, agent_user",
            ),
            (
                r#"{"agent": "a", "resource": "r", "client_ip": "10.0.0.256"}"#,
                "field `client_ip`: `10.0.0.256` is not an IPv4 or IPv6 address",
            ),
            (
                r#"{"agent": "a", "resource": "r", "signin_risk": "severe"}"#,
                "field `signin_risk`: unknown risk level `severe`: expected one of none, low, medium, high",
            ),
            (
                r#"{"agent": "a", "resource": "r", "scopes": "Mail.Read"}"#,
                "field `scopes`: expected an array of strings",
            ),
            (
                r#"{"agent": "a", "resource": "r", "scopes": ["Mail Read"]}"#,
                "field `scopes`: `Mail Read` is not a scope: a scope is 1 to 512 bytes without spaces",
            ),
            (
                r#"{"agent": "a", "resource": "r", "action": "delete"}"#,
                "field `action`: unknown action `delete`: expected one of request_token, call_api",
            ),
            (r#"{"agent": 7, "resource": "r"}"#, "field `agent`: expected a string"),
            (
                r#"{"agent": "a", "resource": "r", "scope": ["x"]}"#,
                "unknown field `scope`: expected one of agent, resource, action, scopes, flow, grant_type, user, client_ip, time, signin_risk, request_id, method, path",
            ),
            (
                r#"{"agent": "a", "resource": "r", "flow": "on_behalf_of"}"#,
                "field `user`: is required when flow is on_behalf_of",
            ),
            (r#"{"agent": "a", "resource": "r", "user": "u"}"#, "field `user`: must be empty when flow is app_only"),
            (
                r#"{"agent": "a", "resource": "r", "action": "call_api", "path": "/x"}"#,
                "field `method`: is required for action call_api",
            ),
            (
                r#"{"agent": "a", "resource": "r", "action": "call_api", "method": "GET", "path": "x"}"#,
                "field `path`: `x` is not a request path: it starts with / and is at most 8192 bytes",
            ),
            (
                r#"{"agent": "a", "resource": "r", "action": "call_api", "method": "GET", "path": "/", "scopes": ["s"]}"#,
                "field `scopes`: applies only to action request_token",
            ),
            (r#"{"agent": "a", "resource": "r", "method": "GET"}"#, "field `method`: applies only to action call_api"),
            ("[]", "the request must be a JSON object"),
        ];
        for (json, want) in cases {
            assert_eq!(parse(json).unwrap_err(), want, "{json}");
        }
        let bad_time = parse(r#"{"agent": "a", "resource": "r", "time": "27/11/2026"}"#).unwrap_err();
        assert!(bad_time.starts_with("field `time`: `27/11/2026` is not an RFC 3339 time"), "{bad_time}");
    }

    #[test]
    fn ids_are_not_trimmed_and_leap_seconds_are_refused() {
        let e = parse(r#"{"agent": "ag-1 ", "resource": "r"}"#).unwrap_err();
        assert_eq!(e, "field `agent`: `ag-1 ` is not an id: an id has no whitespace");
        let e = parse(r#"{"agent": "a", "resource": " r"}"#).unwrap_err();
        assert!(e.starts_with("field `resource`:"), "{e}");
        let e = parse(r#"{"agent": "a", "resource": "r", "time": "2016-12-31T23:59:60Z"}"#).unwrap_err();
        assert_eq!(e, "field `time`: `2016-12-31T23:59:60Z` is a leap second, which is not supported: use :59");
        assert!(parse(r#"{"agent": "a", "resource": "r", "request_id": "trace 42"}"#).is_ok());
    }

    #[test]
    fn a_time_far_from_the_clock_is_refused_when_asked() {
        let now = "2026-11-27T10:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let raw = |t: &str| RawRequest {
            agent: Some("a".into()),
            resource: Some("r".into()),
            time: Some(t.into()),
            ..RawRequest::default()
        };
        let skew = Some(TimeDelta::seconds(300));
        assert!(raw("2026-11-27T10:04:59Z").validate_with(now, skew).is_ok());
        let e = raw("2026-11-27T09:50:00Z").validate_with(now, skew).unwrap_err().to_string();
        assert!(
            e.starts_with("field `time`: `2026-11-27T09:50:00Z` is more than 300 s from the server's clock"),
            "{e}"
        );
        assert!(raw("2020-01-01T00:00:00Z").validate_with(now, None).is_ok());
    }

    #[test]
    fn mapped_ipv4_is_canonical() {
        let r = parse(r#"{"agent": "a", "resource": "r", "client_ip": "::ffff:10.1.2.3"}"#).unwrap();
        assert_eq!(r.client_ip, Some("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn call_api_takes_method_and_path() {
        let r = parse(r#"{"agent": "a", "resource": "r", "action": "call_api", "method": "get", "path": "/v1/x"}"#)
            .unwrap();
        assert_eq!(r.ask, Ask::Call { method: "GET".into(), path: "/v1/x".into() });
    }
}
