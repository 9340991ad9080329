//! Who may ask what (`serve --access FILE`): caller identities (from client certificates) and
//! bearer tokens (kept in the file as SHA-256 hashes only) mapped to roles, and the count of
//! calls refused, by reason. It knows nothing of the transport: the gRPC layer asks it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::input::{InputError, printable, read_file};

/// Largest access file.
pub const MAX_ACCESS_BYTES: u64 = 4 << 20;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// DecisionService (Evaluate, EvaluateBatch) and Envoy's Check.
    Decide,
    /// AdminService Status, ListSignals and Fleet.
    Read,
    /// AdminService Signal.
    Signal,
    /// Everything, Reload included.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Decide, Role::Read, Role::Signal, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Decide => "decide",
            Role::Read => "read",
            Role::Signal => "signal",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    /// True if these roles allow `need` (None: any role will do): `admin` allows everything.
    pub fn allow(self, need: Option<Role>) -> bool {
        match need {
            Some(role) => self.0 & (role.bit() | Role::Admin.bit()) != 0,
            None => self.0 != 0,
        }
    }

    fn add(&mut self, other: Roles) {
        self.0 |= other.0;
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Neither a certificate identity nor a bearer token (gRPC UNAUTHENTICATED).
    NoCredentials,
    /// A bearer token the file does not know, or an `authorization` header that is not
    /// `Bearer <token>` (PERMISSION_DENIED: wrong credentials).
    BadToken,
    /// A known caller, or a certificate identity the file does not list, without the role the
    /// call needs (PERMISSION_DENIED).
    NoRole,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::NoCredentials, Refusal::BadToken, Refusal::NoRole];

    /// The reason's name in logs, audit records and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCredentials => "no_credentials",
            Refusal::BadToken => "bad_token",
            Refusal::NoRole => "no_role",
        }
    }
}

/// A call let through: the name of the token that allowed it, if one was given.
#[derive(Debug, Clone, Default)]
pub struct Granted {
    pub token: Option<String>,
}

/// The access file, checked: every call is asked of it.
#[derive(Debug)]
pub struct Access {
    path: PathBuf,
    identities: Vec<(Match, Roles)>,
    tokens: Vec<Token>,
    refused: [AtomicU64; 3],
}

#[derive(Debug)]
enum Match {
    Exact(String),
    Prefix(String),
}

impl Match {
    fn matches(&self, identity: &str) -> bool {
        match self {
            Match::Exact(e) => e == identity,
            Match::Prefix(p) => identity.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug)]
struct Token {
    name: String,
    sha256: [u8; 32],
    roles: Roles,
}

/// Why an access file is refused; the message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("access file `{}`: {source}", printable(&path.display().to_string()))]
    Read { path: PathBuf, source: InputError },
    #[error("access file `{}`: {error}", printable(&path.display().to_string()))]
    Parse { path: PathBuf, error: String },
    #[error("access file `{}`: {field}: {error}", printable(&path.display().to_string()))]
    Field { path: PathBuf, field: String, error: String },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    identities: Vec<RawIdentity>,
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    identity: Option<String>,
    prefix: Option<String>,
    roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    sha256: String,
    roles: Vec<String>,
}

/// Most characters an identity, prefix or token name may have.
const MAX_NAME: usize = 1024;

impl Access {
    /// Reads and checks an access file: TOML, or JSON if its name ends in `.json` (or its
    /// text starts with `{`).
    pub fn load(path: &Path) -> Result<Access, AccessError> {
        let text = read_file(path, MAX_ACCESS_BYTES)
            .map_err(|source| AccessError::Read { path: path.to_path_buf(), source })?;
        Access::parse(path, &text)
    }

    /// Checks the text of an access file; `path` names it in errors and says its format.
    pub fn parse(path: &Path, text: &str) -> Result<Access, AccessError> {
        let parse_error = |error: String| AccessError::Parse { path: path.to_path_buf(), error };
        let json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
            || (path.extension().is_none_or(|e| !e.eq_ignore_ascii_case("toml")) && text.trim_start().starts_with('{'));
        let raw: RawFile = if json {
            let value = crate::input::parse_json(text).map_err(|e| parse_error(e.to_string()))?;
            serde_json::from_value(value).map_err(|e| parse_error(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| parse_error(e.to_string().trim_end().to_string()))?
        };
        let field = |field: String, error: String| AccessError::Field { path: path.to_path_buf(), field, error };

        let mut identities = Vec::with_capacity(raw.identities.len());
        for (i, entry) in raw.identities.iter().enumerate() {
            let at = format!("identities[{i}]");
            let rule = match (&entry.identity, &entry.prefix) {
                (Some(e), None) => {
                    check_name(e).map_err(|error| field(format!("{at}.identity"), error))?;
                    Match::Exact(e.clone())
                }
                (None, Some(p)) => {
                    check_name(p).map_err(|error| field(format!("{at}.prefix"), error))?;
                    if !p.ends_with('/') {
                        return Err(field(
                            format!("{at}.prefix"),
                            format!(
                                "`{}` must end with `/`, so that it names a path and not the start of a name \
                                 (`spiffe://corp.example/ns/a` would also match `spiffe://corp.example/ns/ab`)",
                                printable(p)
                            ),
                        ));
                    }
                    Match::Prefix(p.clone())
                }
                (Some(_), Some(_)) => {
                    return Err(field(at, "give `identity` (exact) or `prefix`, not both".into()));
                }
                (None, None) => {
                    return Err(field(
                        at,
                        "give `identity` (an exact SPIFFE ID, DNS name or common name) or `prefix`".into(),
                    ));
                }
            };
            let duplicate = identities.iter().position(|(m, _): &(Match, Roles)| match (m, &rule) {
                (Match::Exact(a), Match::Exact(b)) | (Match::Prefix(a), Match::Prefix(b)) => a == b,
                _ => false,
            });
            if let Some(first) = duplicate {
                return Err(field(
                    at,
                    format!("the same as identities[{first}]: give each identity once, with all its roles"),
                ));
            }
            let roles = roles(&entry.roles).map_err(|(j, error)| field(format!("{at}.roles{j}"), error))?;
            identities.push((rule, roles));
        }

        let mut tokens: Vec<Token> = Vec::with_capacity(raw.tokens.len());
        for (i, entry) in raw.tokens.iter().enumerate() {
            let at = format!("tokens[{i}]");
            check_name(&entry.name).map_err(|error| field(format!("{at}.name"), error))?;
            if let Some(first) = tokens.iter().position(|t| t.name == entry.name) {
                return Err(field(
                    format!("{at}.name"),
                    format!("`{}` is the name of tokens[{first}] too", printable(&entry.name)),
                ));
            }
            let sha256 = parse_sha256(&entry.sha256).ok_or_else(|| {
                field(
                    format!("{at}.sha256"),
                    "not a SHA-256 hash: 64 hexadecimal digits, as `printf %s \"$TOKEN\" | sha256sum` prints (the token itself never goes in the file)".into(),
                )
            })?;
            if let Some(first) = tokens.iter().position(|t| t.sha256 == sha256) {
                return Err(field(format!("{at}.sha256"), format!("the same hash as tokens[{first}]")));
            }
            let roles = roles(&entry.roles).map_err(|(j, error)| field(format!("{at}.roles{j}"), error))?;
            tokens.push(Token { name: entry.name.clone(), sha256, roles });
        }
        if identities.is_empty() && tokens.is_empty() {
            return Err(field(
                "identities".into(),
                "no identity and no token: every call would be refused; give at least one".into(),
            ));
        }
        Ok(Access { path: path.to_path_buf(), identities, tokens, refused: Default::default() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True if some rule names an identity (which only a client certificate gives).
    pub fn has_identities(&self) -> bool {
        !self.identities.is_empty()
    }

    /// Decides whether a caller with this certificate `identity` and this `authorization`
    /// header value may make a call that needs `need` (None: any role). A refusal is counted.
    pub fn check(
        &self,
        identity: Option<&str>,
        authorization: Option<&[u8]>,
        need: Option<Role>,
    ) -> Result<Granted, Refusal> {
        let result = self.decide(identity, authorization, need);
        if let Err(refusal) = result {
            self.refused[refusal as usize].fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn decide(
        &self,
        identity: Option<&str>,
        authorization: Option<&[u8]>,
        need: Option<Role>,
    ) -> Result<Granted, Refusal> {
        let mut granted = Granted::default();
        let mut roles = Roles::default();
        if let Some(header) = authorization {
            let t = self.token(header).ok_or(Refusal::BadToken)?;
            roles.add(t.roles);
            granted.token = Some(t.name.clone());
        }
        if let Some(identity) = identity {
            for (rule, r) in &self.identities {
                if rule.matches(identity) {
                    roles.add(*r);
                }
            }
        }
        if identity.is_none() && authorization.is_none() {
            return Err(Refusal::NoCredentials);
        }
        if roles.allow(need) { Ok(granted) } else { Err(Refusal::NoRole) }
    }

    /// The token entry an `authorization` header value (`Bearer <token>`) names.
    fn token(&self, header: &[u8]) -> Option<&Token> {
        let token = bearer(header)?;
        let hash: [u8; 32] = Sha256::digest(token).into();
        // Every entry is compared, in constant time, whichever matches.
        let mut found = None;
        for t in &self.tokens {
            if constant_time_eq(&t.sha256, &hash) {
                found = Some(t);
            }
        }
        found
    }

    /// The name of the token an `authorization` header value carries, if the file knows it
    /// (for the record of a call refused to a known token).
    pub fn token_name(&self, authorization: &[u8]) -> Option<&str> {
        self.token(authorization).map(|t| t.name.as_str())
    }

    /// Calls refused so far, by reason.
    pub fn refused(&self) -> [(Refusal, u64); 3] {
        Refusal::ALL.map(|r| (r, self.refused[r as usize].load(Ordering::Relaxed)))
    }
}

fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().count() > MAX_NAME {
        return Err(format!("longer than {MAX_NAME} characters"));
    }
    if s.chars().any(|c| c.is_whitespace() || crate::input::is_unsafe_char(c)) {
        return Err(format!("`{}` has whitespace or control characters", printable(s)));
    }
    Ok(())
}

/// The roles of a list; an error gives the index (as `[j]`) and what is wrong.
fn roles(names: &[String]) -> Result<Roles, (String, String)> {
    if names.is_empty() {
        return Err((String::new(), "empty: give at least one of decide, read, signal, admin".into()));
    }
    let mut roles = Roles::default();
    for (j, name) in names.iter().enumerate() {
        let role = Role::parse(name).ok_or_else(|| {
            (
                format!("[{j}]"),
                format!("unknown role `{}`: expected one of decide, read, signal, admin", printable(name)),
            )
        })?;
        roles.0 |= role.bit();
    }
    Ok(roles)
}

fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Compares two hashes without stopping at the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token of an `authorization` header value `Bearer <token>`; the scheme's name is
/// case-insensitive (RFC 7235), so `bearer <token>` is the same header.
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn sample() -> Access {
        let text = format!(
            r#"
[[identities]]
prefix = "spiffe://corp.example/ns/issuers/"
roles = ["decide"]

[[identities]]
identity = "gw.corp.example"
roles = ["decide", "read"]

[[identities]]
identity = "spiffe://corp.example/ns/ops/sa/admin"
roles = ["admin"]

[[tokens]]
name = "soc"
sha256 = "{}"
roles = ["signal", "read"]
"#,
            sha("soc-secret")
        );
        Access::parse(Path::new("access.toml"), &text).unwrap()
    }

    #[test]
    fn roles_follow_identities_prefixes_and_tokens() {
        let a = sample();
        let issuer = Some("spiffe://corp.example/ns/issuers/sa/mint");
        assert!(a.check(issuer, None, Some(Role::Decide)).is_ok());
        assert_eq!(a.check(issuer, None, Some(Role::Signal)).unwrap_err(), Refusal::NoRole);
        assert_eq!(
            a.check(Some("spiffe://corp.example/ns/issuers"), None, Some(Role::Decide)).unwrap_err(),
            Refusal::NoRole
        );
        assert!(a.check(Some("gw.corp.example"), None, Some(Role::Read)).is_ok());
        assert_eq!(a.check(Some("gw.corp.example."), None, Some(Role::Read)).unwrap_err(), Refusal::NoRole);
        let admin = Some("spiffe://corp.example/ns/ops/sa/admin");
        for role in Role::ALL {
            assert!(a.check(admin, None, Some(role)).is_ok(), "{role:?}");
        }
        let soc = Some(&b"Bearer soc-secret"[..]);
        assert_eq!(a.check(None, soc, Some(Role::Signal)).unwrap().token.as_deref(), Some("soc"));
        assert_eq!(a.check(None, soc, Some(Role::Admin)).unwrap_err(), Refusal::NoRole);
        // A token adds its roles to the certificate's.
        assert!(a.check(issuer, soc, Some(Role::Signal)).is_ok());
        assert!(a.check(issuer, soc, Some(Role::Decide)).is_ok());
        assert_eq!(a.check(None, Some(b"Bearer soc-secreT"), Some(Role::Read)).unwrap_err(), Refusal::BadToken);
        assert_eq!(a.check(issuer, Some(b"soc-secret"), Some(Role::Decide)).unwrap_err(), Refusal::BadToken);
        assert_eq!(a.check(None, None, Some(Role::Decide)).unwrap_err(), Refusal::NoCredentials);
        let counts = a.refused();
        assert_eq!(counts.map(|(_, n)| n), [1, 2, 4]);
    }

    #[test]
    fn json_is_read_too() {
        let text = format!(r#"{{"tokens": [{{"name": "ci", "sha256": "{}", "roles": ["decide"]}}]}}"#, sha("t"));
        let a = Access::parse(Path::new("access.json"), &text).unwrap();
        assert!(a.check(None, Some(b"Bearer t"), Some(Role::Decide)).is_ok());
        assert!(a.check(None, Some(b"bearer t"), Some(Role::Decide)).is_ok());
        assert!(a.check(None, Some(b"BEARER t"), Some(Role::Decide)).is_ok());
        assert_eq!(a.check(None, Some(b"Bearert"), Some(Role::Decide)).unwrap_err(), Refusal::BadToken);
        assert_eq!(a.check(None, Some(b"Basic t"), Some(Role::Decide)).unwrap_err(), Refusal::BadToken);
        let dup = r#"{"tokens": [], "tokens": []}"#;
        let e = Access::parse(Path::new("access.json"), dup).unwrap_err().to_string();
        assert!(e.contains("tokens"), "{e}");
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let cases = [
            (
                "[[identities]]\nidentity = \"a\"\nroles = [\"admn\"]\n",
                "access file `a.toml`: identities[0].roles[0]: unknown role `admn`",
            ),
            ("[[identities]]\nidentity = \"a\"\nroles = []\n", "access file `a.toml`: identities[0].roles: empty"),
            (
                "[[identities]]\nprefix = \"spiffe://corp.example/ns\"\nroles = [\"read\"]\n",
                "identities[0].prefix: `spiffe://corp.example/ns` must end with `/`",
            ),
            ("[[identities]]\nroles = [\"read\"]\n", "identities[0]: give `identity`"),
            (
                "[[identities]]\nidentity = \"a\"\nprefix = \"b/\"\nroles = [\"read\"]\n",
                "identities[0]: give `identity` (exact) or `prefix`, not both",
            ),
            ("[[identities]]\nidentity = \"\"\nroles = [\"read\"]\n", "identities[0].identity: must not be empty"),
            (
                "[[identities]]\nidentity = \"a\"\nroles = [\"read\"]\n[[identities]]\nidentity = \"a\"\nroles = [\"decide\"]\n",
                "identities[1]: the same as identities[0]",
            ),
            (
                "[[tokens]]\nname = \"x\"\nsha256 = \"abc\"\nroles = [\"read\"]\n",
                "tokens[0].sha256: not a SHA-256 hash",
            ),
            ("[[tokens]]\nname = \"x\"\ntoken = \"plain\"\nroles = [\"read\"]\n", "unknown field `token`"),
            ("", "identities: no identity and no token"),
            ("[[identities]]\nidentity = \"a\"\n", "missing field `roles`"),
        ];
        for (text, want) in cases {
            let e = Access::parse(Path::new("a.toml"), text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = Access::load(Path::new("/nonexistent/access.toml")).unwrap_err().to_string();
        assert!(e.starts_with("access file `/nonexistent/access.toml`: cannot read"), "{e}");
    }
}
