//! The live directory's journal (`STATE/directory.jsonl`): each change is appended and
//! fsynced before it applies, so before it is acknowledged; replayed at start; and rewritten
//! as the net of the live changes when it has grown, or when a reload folded some of them
//! into the bundle.
//!
//! Unlike a signal, a change can depend on an earlier one (an agent upserted, then its
//! tags): a whole line that cannot be read is therefore an error at start, never skipped.
//! Only a last line without its newline (a write a crash cut) is cut away: it was never
//! acknowledged.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::directory::Change;

pub const DIRECTORY_JOURNAL_FILE: &str = "directory.jsonl";

/// One journal line.
#[derive(Serialize)]
struct Entry<'a> {
    seq: u64,
    at: DateTime<Utc>,
    by: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    change: &'a RawValue,
}

#[derive(Deserialize)]
struct ReadEntry<'a> {
    seq: u64,
    /// Absent on the line a compaction writes when no live change is left: it keeps the
    /// sequence, so that change numbers are never used twice.
    #[serde(borrow)]
    change: Option<&'a RawValue>,
}

/// What a line that cannot be read leaves the operator to do.
const UNREADABLE: &str = "the journal is read at start to lay the live directory changes over the bundle; \
     repair the line, or move the file aside to start from the bundle's directory alone";

#[derive(Debug, thiserror::Error)]
#[error("directory journal `{path}`: {message}")]
pub struct LiveJournalError {
    pub path: String,
    pub message: String,
}

/// What replaying the journal gave: the changes in order, and the last sequence number.
#[derive(Debug, Default)]
pub struct Replay {
    pub changes: Vec<Change>,
    pub seq: u64,
    /// A last line cut by a crash was removed (it was never acknowledged).
    pub cut_tail: bool,
}

struct Tail {
    file: File,
    /// The length after the last whole, synced line: a failed append is cut back to it.
    len: u64,
    /// A failed append could not be cut back yet: nothing is appended until it is.
    torn: bool,
}

/// The durable journal of live directory changes.
pub struct DirectoryJournal {
    path: PathBuf,
    tail: Mutex<Tail>,
    lines: AtomicU64,
    /// Rewrite once the journal holds this many lines more than one.
    compact_after: u64,
    /// The journal's length after its last compaction (or at start).
    compacted_len: AtomicU64,
}

/// A journal longer than this and four times its compacted length is compacted, however
/// few its lines (changes that add and remove many objects).
const COMPACT_BYTES: u64 = 16 << 20;

impl DirectoryJournal {
    /// Opens `DIR/directory.jsonl` and reads its changes back; a last line cut by a crash is
    /// removed from the file.
    pub fn open(dir: &Path) -> Result<(DirectoryJournal, Replay), LiveJournalError> {
        let path = dir.join(DIRECTORY_JOURNAL_FILE);
        let err =
            |e: &dyn std::fmt::Display| LiveJournalError { path: path.display().to_string(), message: e.to_string() };
        fs::create_dir_all(dir).map_err(|e| err(&e))?;
        let (mut replay, lines, whole) = read_file(&path)?;
        if let Some(whole) = whole {
            let f = OpenOptions::new().write(true).open(&path).map_err(|e| err(&e))?;
            f.set_len(whole).and_then(|()| f.sync_all()).map_err(|e| err(&e))?;
            replay.cut_tail = true;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| err(&e))?;
        let len = file.metadata().map_err(|e| err(&e))?.len();
        let journal = DirectoryJournal {
            path,
            tail: Mutex::new(Tail { file, len, torn: false }),
            lines: AtomicU64::new(lines),
            compact_after: 1_000,
            compacted_len: AtomicU64::new(len.min(COMPACT_BYTES)),
        };
        Ok((journal, replay))
    }

    /// Reads the changes of `DIR/directory.jsonl` without changing anything (`validate`).
    pub fn read(dir: &Path) -> Result<Replay, LiveJournalError> {
        let (mut replay, _, whole) = read_file(&dir.join(DIRECTORY_JOURNAL_FILE))?;
        replay.cut_tail = whole.is_some();
        Ok(replay)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a change as entry `seq` and fsyncs it. On failure (a full disk) the journal is
    /// cut back to its last whole line, so that a restart replays exactly the acknowledged
    /// changes. If the file at the path is no longer the one appended to (deleted or
    /// replaced), it is first written anew from `net`, the live changes so far.
    pub fn append(
        &self,
        seq: u64,
        change: &Change,
        by: &str,
        reason: &str,
        net: &dyn Fn() -> Change,
    ) -> Result<(), LiveJournalError> {
        let err = |e: &dyn std::fmt::Display| LiveJournalError {
            path: self.path.display().to_string(),
            message: e.to_string(),
        };
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if self.gone(&tail.file) {
            tracing::error!(journal = %self.path.display(), "the directory journal was deleted or replaced: writing it anew from the live changes");
            self.rewrite(&mut tail, seq - 1, &net()).map_err(|e| err(&e))?;
        }
        if tail.torn {
            cut_back(&mut tail).map_err(|e| err(&e))?;
        }
        let line = entry_line(seq, change, by, reason).map_err(|e| err(&e))?;
        if let Err(e) = tail.file.write_all(&line).and_then(|()| tail.file.sync_data()) {
            tail.torn = true;
            if let Err(cut) = cut_back(&mut tail) {
                tracing::error!(journal = %self.path.display(), error = %cut, "cannot cut a failed append back; no change is taken until it can");
            }
            return Err(err(&e));
        }
        tail.len += line.len() as u64;
        self.lines.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// True if the journal holds many more lines than the one its compaction would write, or
    /// has grown well past its compacted length.
    pub fn wants_compaction(&self) -> bool {
        let len = self.tail.lock().map_or(0, |t| t.len);
        self.lines.load(Ordering::Relaxed) > self.compact_after
            || (len > COMPACT_BYTES && len > 4 * self.compacted_len.load(Ordering::Relaxed))
    }

    /// Rewrites the journal as one entry holding `net`, the live changes as one change (or no
    /// change if there are none), numbered `seq`: written aside, fsynced, renamed over.
    pub fn compact(&self, seq: u64, net: &Change) -> Result<(), LiveJournalError> {
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        self.rewrite(&mut tail, seq, net)
            .map_err(|e| LiveJournalError { path: self.path.display().to_string(), message: e.to_string() })
    }

    fn rewrite(&self, tail: &mut Tail, seq: u64, net: &Change) -> io::Result<()> {
        let tmp = self.path.with_extension("jsonl.compact");
        let mut out = File::create(&tmp)?;
        let empty = net.upsert.is_empty() && net.remove.is_empty();
        if empty && seq == 0 {
            // No change was ever taken: nothing to keep, not even a number.
        } else if empty {
            let mut line = serde_json::to_vec(&serde_json::json!({"seq": seq, "at": Utc::now(), "by": "compaction"}))
                .map_err(io::Error::other)?;
            line.push(b'\n');
            out.write_all(&line)?;
        } else {
            out.write_all(&entry_line(seq, net, "compaction", "the live changes, net").map_err(io::Error::other)?)?;
        }
        out.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = File::open(dir)
        {
            d.sync_all()?;
        }
        let file = OpenOptions::new().append(true).open(&self.path)?;
        let len = file.metadata()?.len();
        *tail = Tail { file, len, torn: false };
        self.lines.store(u64::from(len > 0), Ordering::Relaxed);
        self.compacted_len.store(len, Ordering::Relaxed);
        Ok(())
    }

    fn gone(&self, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(open) = file.metadata() else { return true };
        !matches!(fs::metadata(&self.path), Ok(m) if (m.dev(), m.ino()) == (open.dev(), open.ino()))
    }
}

/// The journal's changes, how many lines it has, and, if its last line was cut by a crash,
/// the length of its whole lines. An absent journal has none.
fn read_file(path: &Path) -> Result<(Replay, u64, Option<u64>), LiveJournalError> {
    let err = |e: &dyn std::fmt::Display| LiveJournalError { path: path.display().to_string(), message: e.to_string() };
    let mut replay = Replay::default();
    let mut lines = 0;
    let text = match fs::metadata(path) {
        Ok(m) if m.is_file() => fs::read(path).map_err(|e| err(&e))?,
        Ok(_) => return Err(err(&"not a regular file")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(err(&e)),
    };
    let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |last| last + 1);
    for (i, line) in text[..whole].split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let at = i + 1;
        let unreadable = |why: &str| err(&format!("line {at}: {why} ({UNREADABLE})"));
        let line = std::str::from_utf8(line).map_err(|_| unreadable("not UTF-8"))?;
        let entry: ReadEntry<'_> = serde_json::from_str(line).map_err(|e| unreadable(&e.to_string()))?;
        // A compaction before any change wrote `#0` with no change: nothing to read back.
        if entry.seq == 0 && entry.change.is_none() && replay.seq == 0 {
            lines += 1;
            continue;
        }
        if entry.seq <= replay.seq {
            return Err(unreadable(&format!("change #{} does not follow #{}", entry.seq, replay.seq)));
        }
        if let Some(change) = entry.change {
            let change = Change::from_json_str(change.get())
                .map_err(|errors| unreadable(&crate::directory::listed(&errors, "; ")))?;
            replay.changes.push(change);
        }
        replay.seq = entry.seq;
        lines += 1;
    }
    Ok((replay, lines, (whole < text.len()).then_some(whole as u64)))
}

fn entry_line(seq: u64, change: &Change, by: &str, reason: &str) -> Result<Vec<u8>, serde_json::Error> {
    let change = RawValue::from_string(change.to_json()?)?;
    let mut line = serde_json::to_vec(&Entry { seq, at: Utc::now(), by, reason, change: &change })?;
    line.push(b'\n');
    Ok(line)
}

fn cut_back(tail: &mut Tail) -> io::Result<()> {
    tail.file.set_len(tail.len)?;
    tail.file.sync_all()?;
    tail.torn = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(json: &str) -> Change {
        Change::from_json_str(json).unwrap()
    }

    #[test]
    fn changes_read_back_in_order_and_a_cut_last_line_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, replay) = DirectoryJournal::open(dir.path()).unwrap();
        assert!(replay.changes.is_empty());
        let none = || Change::default();
        let a = change(r#"{"upsert": {"agents": [{"id": "a", "blueprint": "b", "sponsor": "s"}]}}"#);
        let b = change(r#"{"remove": {"agents": ["a"]}}"#);
        journal.append(1, &a, "admin", "new agent", &none).unwrap();
        journal.append(2, &b, "admin", "", &none).unwrap();
        drop(journal);
        // A crash cut the third write.
        let path = dir.path().join(DIRECTORY_JOURNAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":3,"at":"2026-12-01T00:00:00Z","by":"x","change":{"rem"#).unwrap();
        let (journal, replay) = DirectoryJournal::open(dir.path()).unwrap();
        assert_eq!((replay.changes.len(), replay.seq, replay.cut_tail), (2, 2, true));
        assert_eq!(replay.changes[0].to_json().unwrap(), a.to_json().unwrap());
        assert_eq!(replay.changes[1].to_json().unwrap(), b.to_json().unwrap());
        journal.append(3, &b, "admin", "", &none).unwrap();
        let (_, replay) = DirectoryJournal::open(dir.path()).unwrap();
        assert_eq!((replay.changes.len(), replay.seq, replay.cut_tail), (3, 3, false));
    }

    #[test]
    fn a_whole_line_that_cannot_be_read_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRECTORY_JOURNAL_FILE);
        fs::write(&path, "{\"seq\":1,\"change\":{\"remove\":{\"agents\":[\"a\"]}}}\nnot json\n").unwrap();
        let err = DirectoryJournal::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("line 2"), "{err}");
        fs::write(&path, "{\"seq\":1,\"change\":{\"delete\":{}}}\n").unwrap();
        let err = DirectoryJournal::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("line 1") && err.contains("delete"), "{err}");
        // Numbers only go up: a line numbered again (two servers on one journal) is named.
        let line = "{\"seq\":1,\"change\":{\"remove\":{\"agents\":[\"a\"]}}}\n";
        fs::write(&path, format!("{line}{line}")).unwrap();
        let err = DirectoryJournal::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("line 2: change #1 does not follow #1"), "{err}");
    }

    #[test]
    fn compaction_keeps_the_net_and_a_deleted_journal_is_written_anew() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = DirectoryJournal::open(dir.path()).unwrap();
        let a = change(r#"{"upsert": {"agents": [{"id": "a", "blueprint": "b", "sponsor": "s"}]}}"#);
        let net = || change(r#"{"upsert": {"agents": [{"id": "a", "blueprint": "b", "sponsor": "s"}]}}"#);
        journal.append(1, &a, "admin", "", &net).unwrap();
        journal.compact(1, &net()).unwrap();
        let (_, replay) = DirectoryJournal::open(dir.path()).unwrap();
        assert_eq!((replay.changes.len(), replay.seq), (1, 1));
        fs::remove_file(dir.path().join(DIRECTORY_JOURNAL_FILE)).unwrap();
        let b = change(r#"{"upsert": {"agents": [{"id": "c", "blueprint": "b", "sponsor": "s"}]}}"#);
        journal.append(2, &b, "admin", "", &net).unwrap();
        let (_, replay) = DirectoryJournal::open(dir.path()).unwrap();
        assert_eq!((replay.changes.len(), replay.seq), (2, 2));
        assert!(replay.changes[1].to_json().unwrap().contains("\"c\""));
        // Never a change: compacted, the journal is empty, and reads back (as a `#0` marker does).
        let fresh = tempfile::tempdir().unwrap();
        let (never, _) = DirectoryJournal::open(fresh.path()).unwrap();
        never.compact(0, &Change::default()).unwrap();
        assert_eq!(fs::read(fresh.path().join(DIRECTORY_JOURNAL_FILE)).unwrap().len(), 0);
        fs::write(fresh.path().join(DIRECTORY_JOURNAL_FILE), "{\"seq\":0,\"by\":\"compaction\"}\n").unwrap();
        let (never, replay) = DirectoryJournal::open(fresh.path()).unwrap();
        assert_eq!((replay.changes.len(), replay.seq), (0, 0));
        never.append(1, &b, "admin", "", &net).unwrap();
        assert_eq!(DirectoryJournal::read(fresh.path()).unwrap().seq, 1);
        // Nothing live: the compacted journal keeps only the sequence, which goes on from there.
        journal.compact(2, &Change::default()).unwrap();
        let (journal, replay) = DirectoryJournal::open(dir.path()).unwrap();
        assert_eq!((replay.changes.len(), replay.seq), (0, 2));
        journal.append(3, &b, "admin", "", &net).unwrap();
        let (_, replay) = DirectoryJournal::open(dir.path()).unwrap();
        assert_eq!((replay.changes.len(), replay.seq), (1, 3));
    }
}
