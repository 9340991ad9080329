//! The chain: a record is one line, `{"v":1,"seq":N,` + body + `,"prev_hash":"P","hash":"H"}`,
//! where H = SHA-256(P ‖ the line up to and including `"prev_hash":"P"`, closed with `}`), hex.
//! Editing, removing, reordering or cutting a record breaks the chain at that record.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::AuditError;

/// The version of the record layout.
pub const RECORD_VERSION: u32 = 1;
/// The `prev_hash` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The last record of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tail {
    pub(super) seq: u64,
    pub(super) hash: String,
}

impl Tail {
    /// Before the first record.
    pub(super) fn genesis() -> Tail {
        Tail { seq: 0, hash: GENESIS.into() }
    }
}

/// Appends one record line for `body` (a JSON object) and `extra` (fields the writer adds, or
/// empty) after `prev`; returns the new tail.
pub(super) fn append_record(out: &mut Vec<u8>, prev: &Tail, body: &str, extra: &str) -> Tail {
    let seq = prev.seq + 1;
    let start = out.len();
    let inner = body.trim().strip_prefix('{').and_then(|b| b.strip_suffix('}')).unwrap_or("").trim();
    let _ = write!(out, "{{\"v\":{RECORD_VERSION},\"seq\":{seq},");
    for fields in [inner, extra] {
        if !fields.is_empty() {
            out.extend_from_slice(fields.as_bytes());
            out.push(b',');
        }
    }
    let _ = write!(out, "\"prev_hash\":\"{}\"", prev.hash);
    let hash = chain_hash(&prev.hash, &out[start..]);
    let _ = writeln!(out, ",\"hash\":\"{hash}\"}}");
    Tail { seq, hash }
}

/// SHA-256 over `prev_hash` and the record up to its `prev_hash` field, closed with `}`.
pub(super) fn chain_hash(prev: &str, unclosed: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(unclosed);
    h.update(b"}");
    hex::encode(h.finalize())
}

/// The last complete record, and where the file should end if its last line is torn.
pub(super) fn read_tail(file: &mut File, path: &Path) -> Result<(Option<Tail>, Option<u64>), AuditError> {
    let err = |source: io::Error| AuditError::Io { path: path.display().to_string(), source };
    let meta = file.metadata().map_err(err)?;
    // A pipe or device (e.g. /dev/stdout given as a path) has no tail to read.
    if !meta.is_file() || meta.len() == 0 {
        return Ok((None, None));
    }
    let len = meta.len();
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start)).map_err(err)?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::take(&mut *file, len - start).read_to_end(&mut buf).map_err(err)?;
        let whole_window = start == 0;
        // Bytes after the last newline are a torn line: the write of a record that a crash cut.
        let (complete, torn_at) = match buf.iter().rposition(|b| *b == b'\n') {
            Some(i) if i + 1 == buf.len() => (&buf[..i], None),
            Some(i) => (&buf[..i], Some(start + i as u64 + 1)),
            None if whole_window => return Ok((None, (len > 0).then_some(0))),
            None => {
                window *= 4;
                continue;
            }
        };
        let line = match complete.iter().rposition(|b| *b == b'\n') {
            Some(j) => &complete[j + 1..],
            None if whole_window => complete,
            None => {
                window *= 4;
                continue;
            }
        };
        if line.is_empty() {
            return Ok((None, torn_at));
        }
        let tail = parse_tail(line)
            .map_err(|e| AuditError::Corrupt { path: path.display().to_string(), message: e.to_string() })?;
        return Ok((Some(tail), torn_at));
    }
}

fn parse_tail(line: &[u8]) -> Result<Tail, BadRecord> {
    let v: Value = serde_json::from_slice(line).map_err(|e| BadRecord::NotJson(e.to_string()))?;
    let seq = v.get("seq").and_then(Value::as_u64).ok_or(BadRecord::NoSeq)?;
    let hash = v.get("hash").and_then(Value::as_str).ok_or(BadRecord::Missing { seq, field: "hash" })?.to_string();
    Ok(Tail { seq, hash })
}

/// Why a line is not the next record of the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRecord {
    #[error("not a whole JSON record (torn or edited): {0}")]
    NotJson(String),
    #[error("the record has no `seq`")]
    NoSeq,
    #[error("record seq {seq} has no `{field}`")]
    Missing { seq: u64, field: &'static str },
    #[error("record seq {seq} follows seq {prev}: records were removed or reordered (expected seq {})", .prev.wrapping_add(1))]
    OutOfOrder { seq: u64, prev: u64 },
    #[error("record seq {seq}: its prev_hash is not the hash of record seq {prev}")]
    PrevHash { seq: u64, prev: u64 },
    #[error("record seq {seq}: `hash` is not the last field: the record was rewritten")]
    HashNotLast { seq: u64 },
    #[error("record seq {seq} was edited: its hash does not match its content")]
    Edited { seq: u64 },
}

/// What `verify` found in an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
    /// True if the first record is the start of the chain (its prev_hash is the genesis).
    pub from_genesis: bool,
    /// The note of the first record if it is a `recovery` record: it may say why the chain
    /// does not start here (the file before it was deleted or moved).
    pub first_note: Option<String>,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct Broken {
    pub file: String,
    pub line: u64,
    pub message: String,
}

/// Checks the chain across `paths` (ordered by their first record's seq, so rotated files may
/// come in any order).
pub fn verify(paths: &[PathBuf]) -> Result<Verified, Broken> {
    let mut files: Vec<(u64, &PathBuf)> = Vec::with_capacity(paths.len());
    for p in paths {
        let broken = |message: String| Broken { file: p.display().to_string(), line: 0, message };
        let f = File::open(p).map_err(|e| broken(format!("cannot read: {e}")))?;
        let mut first = Vec::new();
        Read::take(BufReader::new(f), MAX_RECORD_BYTES)
            .read_until(b'\n', &mut first)
            .map_err(|e| broken(format!("cannot read: {e}")))?;
        let seq = serde_json::from_slice::<Value>(&first).ok().and_then(|v| v.get("seq").and_then(Value::as_u64));
        files.push((seq.unwrap_or(u64::MAX), p));
    }
    files.sort();

    let mut prev: Option<Tail> = None;
    let mut verified = Verified {
        records: 0,
        first_seq: 0,
        last_seq: 0,
        last_hash: String::new(),
        from_genesis: false,
        first_note: None,
    };
    for (_, path) in files {
        let file = path.display().to_string();
        let mut reader = BufReader::new(File::open(path).map_err(|e| Broken {
            file: file.clone(),
            line: 0,
            message: e.to_string(),
        })?);
        let mut line = Vec::new();
        for line_no in 1u64.. {
            let broken = |message: String| Broken { file: file.clone(), line: line_no, message };
            line.clear();
            // A record is a few KiB: a longer "line" (a device, a hostile file) is never read whole.
            let n = Read::take(&mut reader, MAX_RECORD_BYTES + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| broken(format!("cannot read: {e}")))?;
            if n == 0 {
                break;
            }
            if line.len() as u64 > MAX_RECORD_BYTES {
                return Err(broken(format!("a line longer than {MAX_RECORD_BYTES} bytes is not a record")));
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            let tail = check_line(&line, prev.as_ref()).map_err(|e| broken(e.to_string()))?;
            if prev.is_none() {
                let first: Value = serde_json::from_slice(&line).unwrap_or_default();
                verified.first_seq = tail.seq;
                verified.from_genesis = first.get("prev_hash").and_then(Value::as_str) == Some(GENESIS);
                verified.first_note = (first.get("kind").and_then(Value::as_str) == Some("recovery"))
                    .then(|| first.get("note").and_then(Value::as_str).map(str::to_string))
                    .flatten();
            }
            verified.records += 1;
            verified.last_seq = tail.seq;
            verified.last_hash = tail.hash.clone();
            prev = Some(tail);
        }
    }
    Ok(verified)
}

/// Longest record `verify` reads.
const MAX_RECORD_BYTES: u64 = 16 << 20;

pub(super) const HASH_SUFFIX_LEN: usize = ",\"hash\":\"\"}".len() + 64;

fn check_line(line: &[u8], prev: Option<&Tail>) -> Result<Tail, BadRecord> {
    let v: Value = serde_json::from_slice(line).map_err(|e| BadRecord::NotJson(e.to_string()))?;
    let seq = v.get("seq").and_then(Value::as_u64).ok_or(BadRecord::NoSeq)?;
    let hash = v.get("hash").and_then(Value::as_str).ok_or(BadRecord::Missing { seq, field: "hash" })?;
    let prev_hash = v.get("prev_hash").and_then(Value::as_str).ok_or(BadRecord::Missing { seq, field: "prev_hash" })?;
    if let Some(p) = prev {
        if seq != p.seq.wrapping_add(1) {
            return Err(BadRecord::OutOfOrder { seq, prev: p.seq });
        }
        if prev_hash != p.hash {
            return Err(BadRecord::PrevHash { seq, prev: p.seq });
        }
    }
    let suffix_ok = line.len() > HASH_SUFFIX_LEN && line.ends_with(format!(",\"hash\":\"{hash}\"}}").as_bytes());
    if !suffix_ok {
        return Err(BadRecord::HashNotLast { seq });
    }
    let unclosed = &line[..line.len() - HASH_SUFFIX_LEN];
    if chain_hash(prev_hash, unclosed) != hash {
        return Err(BadRecord::Edited { seq });
    }
    Ok(Tail { seq, hash: hash.to_string() })
}
