//! Reading outside input safely: files only if they are regular files under a size cap (never
//! a device, a FIFO or a dangling link), and JSON that refuses duplicate keys at any depth
//! (serde_json keeps the last one silently, so `{"enabled": false, "enabled": true}` would
//! read as enabled).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Value};

/// Largest `schema.cedarschema`.
pub const MAX_SCHEMA_BYTES: u64 = 4 << 20;
/// Largest single `*.cedar` file.
pub const MAX_POLICY_FILE_BYTES: u64 = 64 << 20;
/// Largest `directory.json` (about 3 million agents).
pub const MAX_DIRECTORY_BYTES: u64 = 1 << 30;
/// Largest `locations.json`.
pub const MAX_LOCATIONS_BYTES: u64 = 16 << 20;
/// Largest request for `eval --request` (a file or standard input).
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// The longest id (of an agent, a resource, a blueprint …) anywhere.
pub const MAX_ID_LEN: usize = 512;
/// Largest test case file for `agentca test`.
pub const MAX_TEST_FILE_BYTES: u64 = 64 << 20;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    #[error("cannot read: it is a link to `{0}`, which does not exist")]
    Dangling(String),
    #[error("cannot read: not a regular file")]
    NotAFile,
    #[error("is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("is not UTF-8 text")]
    NotUtf8,
}

impl InputError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, InputError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Why `id` is not an id, if it is not. Ids are taken as sent, never trimmed: 1 to 512 bytes
/// without whitespace or control characters (they reach logs, terminals and audit records,
/// and a request could never name one with a space).
pub fn id_problem(id: &str) -> Option<String> {
    // Characters that print as nothing (format characters, fillers, variation selectors,
    // tags): two ids that look the same must be the same id.
    let invisible = |c: char| {
        matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200D}' | '\u{2060}'..='\u{2064}' | '\u{2800}'
            | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}'
            | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
    };
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || id.chars().any(|c| c.is_whitespace() || is_unsafe_char(c) || invisible(c))
    {
        Some(format!("is not an id: 1 to {MAX_ID_LEN} bytes, no whitespace, control or invisible characters"))
    } else {
        None
    }
}

/// Reads a regular file (links followed) of at most `limit` bytes as UTF-8.
pub fn read_file(path: &Path, limit: u64) -> Result<String, InputError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A link that exists but leads nowhere is not an absent file.
            if let Ok(target) = std::fs::read_link(path) {
                return Err(InputError::Dangling(target.display().to_string()));
            }
            return Err(InputError::Io(e));
        }
        Err(e) => return Err(InputError::Io(e)),
    };
    if !meta.is_file() {
        return Err(InputError::NotAFile);
    }
    if meta.len() > limit {
        return Err(InputError::TooLarge { limit });
    }
    read_capped(File::open(path)?, limit)
}

/// Reads a stream (standard input) of at most `limit` bytes as UTF-8.
pub fn read_capped(reader: impl Read, limit: u64) -> Result<String, InputError> {
    let mut bytes = Vec::new();
    // One byte past the limit tells a file that grew while being read from one that fits.
    reader.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(InputError::TooLarge { limit });
    }
    String::from_utf8(bytes).map_err(|_| InputError::NotUtf8)
}

/// True for characters that change how text shows rather than what it says: control
/// characters (escapes, line breaks) and Unicode's bidirectional and line-separator marks.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200E}' | '\u{200F}' | '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Text from outside, safe to print to a terminal or a log line: every unsafe character
/// (see `is_unsafe_char`) escaped, as `\u{1b}`.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(is_unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A caller's value cut to 80 characters, printable (see `printable`), so that an error
/// message quoting it stays readable.
pub fn shown(s: &str) -> String {
    const MAX: usize = 80;
    let cut: String = s.chars().take(MAX).collect();
    let mut out = printable(&cut).into_owned();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// A name that is not one of a closed list (a risk level, a sensitivity, a signal, a flow):
/// the message names what was expected, once for every place that reads such a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{}`: expected one of {}", shown(.given), .expected.join(", "))]
pub struct UnknownName {
    pub what: &'static str,
    pub given: String,
    pub expected: Vec<&'static str>,
}

/// The item of `all` whose `name` is `given`, or the error listing every name.
pub fn parse_name<T: Copy>(
    what: &'static str,
    given: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T, UnknownName> {
    all.iter().copied().find(|item| name(*item) == given).ok_or_else(|| UnknownName {
        what,
        given: given.to_string(),
        expected: all.iter().map(|item| name(*item)).collect(),
    })
}

/// A JSON value read with every object's keys unique.
pub struct StrictValue(pub Value);

/// Parses JSON, refusing a key that appears twice in one object (the error names it).
pub fn parse_json(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<StrictValue>(text).map(|v| v.0)
}

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            // One lookup per key: a directory of a million objects reads as fast as with serde_json.
            match out.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(v);
                }
                Entry::Occupied(slot) => {
                    return Err(de::Error::custom(format_args!("duplicate key `{}`", slot.key())));
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let err = parse_json(r#"{"agent": "a", "agent": "b"}"#).unwrap_err().to_string();
        assert!(err.starts_with("duplicate key `agent`"), "{err}");
        let err = parse_json(r#"{"a": [{"x": 1, "y": {"z": 1, "z": 2}}]}"#).unwrap_err().to_string();
        assert!(err.starts_with("duplicate key `z`"), "{err}");
        let v = parse_json(r#"{"a": [1, 2.5, "s", null, true, {"b": {}}]}"#).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, 2.5, "s", null, true, {"b": {}}]}));
    }

    #[test]
    fn unsafe_characters_are_escaped_for_printing() {
        assert_eq!(printable("plain text, ünïcode"), "plain text, ünïcode");
        assert_eq!(printable("a\u{1b}[2Jb\nc\u{202E}d"), "a\\u{1b}[2Jb\\u{a}c\\u{202e}d");
    }

    #[test]
    fn deep_json_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(parse_json(&deep).is_err());
    }

    #[test]
    fn files_are_capped_and_must_be_regular() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(11)).unwrap();
        assert!(matches!(read_file(&big, 10), Err(InputError::TooLarge { limit: 10 })));
        assert_eq!(read_file(&big, 11).unwrap().len(), 11);
        assert!(matches!(read_file(Path::new("/dev/zero"), 10), Err(InputError::NotAFile)));
        assert!(matches!(read_file(dir.path(), 10), Err(InputError::NotAFile)));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("nowhere", &link).unwrap();
        assert!(matches!(read_file(&link, 10), Err(InputError::Dangling(t)) if t == "nowhere"));
        assert!(read_file(&dir.path().join("absent"), 10).unwrap_err().is_not_found());
        assert!(matches!(read_capped(&b"12345"[..], 4), Err(InputError::TooLarge { limit: 4 })));
    }
}
