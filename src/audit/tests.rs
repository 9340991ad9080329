//! The audit chain: written, continued across restarts and rotation, tampered with, a
//! writer that stalls (a FIFO nobody reads) to fill the queue, a file deleted or moved under
//! the writer, and writes that fail (a full tmpfs, /dev/full) without tearing the chain.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::chain::{HASH_SUFFIX_LEN, chain_hash};
use super::*;

fn file_config(path: &Path) -> Config {
    Config::new(Target::File(path.to_path_buf()))
}

fn note(i: usize) -> String {
    format!("{{\"kind\":\"test\",\"n\":{i},\"text\":\"record {i}\"}}")
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn verify_one(path: &Path) -> Result<Verified, Broken> {
    verify(&[path.to_path_buf()])
}

#[test]
fn a_chain_verifies_and_continues_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit/decisions.jsonl");
    let audit = Audit::start(file_config(&path)).unwrap();
    for i in 0..5 {
        audit.submit_blocking(note(i)).unwrap();
    }
    drop(audit);
    let audit = Audit::start(file_config(&path)).unwrap();
    assert_eq!(audit.stats().seq, 5);
    audit.submit_blocking(note(5)).unwrap();
    drop(audit);

    let v = verify_one(&path).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq, v.from_genesis), (6, 1, 6, true));
    let first: Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(first["v"], 1);
    assert_eq!(first["kind"], "test");
    assert_eq!(first["prev_hash"], GENESIS);
}

fn chain_of(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let audit = Audit::start(file_config(&path)).unwrap();
    for i in 0..n {
        audit.submit_blocking(note(i)).unwrap();
    }
    (dir, path)
}

#[test]
fn an_edited_record_is_found() {
    let (_dir, path) = chain_of(5);
    let mut l = lines(&path);
    l[2] = l[2].replace("record 2", "record 9");
    write_lines(&path, &l);
    let e = verify_one(&path).unwrap_err();
    assert_eq!((e.line, e.message.as_str()), (3, "record seq 3 was edited: its hash does not match its content"));
}

#[test]
fn a_rehashed_edit_is_found_at_the_next_record() {
    // An editor who recomputes the edited record's own hash still breaks the next link.
    let (_dir, path) = chain_of(4);
    let mut l = lines(&path);
    let edited = l[1].replace("record 1", "record X");
    let cut = edited.len() - HASH_SUFFIX_LEN;
    let prev: Value = serde_json::from_str(&l[0]).unwrap();
    let hash = chain_hash(prev["hash"].as_str().unwrap(), &edited.as_bytes()[..cut]);
    l[1] = format!("{},\"hash\":\"{hash}\"}}", &edited[..cut]);
    write_lines(&path, &l);
    let e = verify_one(&path).unwrap_err();
    assert_eq!(e.line, 3);
    assert!(e.message.contains("prev_hash is not the hash of record seq 2"), "{}", e.message);
}

#[test]
fn a_removed_record_is_found() {
    let (_dir, path) = chain_of(5);
    let mut l = lines(&path);
    l.remove(1);
    write_lines(&path, &l);
    let e = verify_one(&path).unwrap_err();
    assert_eq!(e.line, 2);
    assert!(e.message.contains("record seq 3 follows seq 1"), "{}", e.message);
}

#[test]
fn reordered_records_are_found() {
    let (_dir, path) = chain_of(5);
    let mut l = lines(&path);
    l.swap(2, 3);
    write_lines(&path, &l);
    let e = verify_one(&path).unwrap_err();
    assert_eq!(e.line, 3);
    assert!(e.message.contains("record seq 4 follows seq 2"), "{}", e.message);
}

#[test]
fn a_truncated_record_is_found() {
    let (_dir, path) = chain_of(3);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() - 20]).unwrap();
    let e = verify_one(&path).unwrap_err();
    assert_eq!(e.line, 3);
    assert!(e.message.starts_with("not a whole JSON record"), "{}", e.message);
}

#[test]
fn a_torn_tail_is_cut_at_start_and_noted() {
    let (_dir, path) = chain_of(3);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"v\":1,\"seq\":4,\"kind\":\"dec").unwrap();
    drop(f);
    let audit = Audit::start(file_config(&path)).unwrap();
    audit.submit_blocking(note(4)).unwrap();
    drop(audit);
    let v = verify_one(&path).unwrap();
    assert_eq!(v.last_seq, 5);
    let recovery: Value = serde_json::from_str(&lines(&path)[3]).unwrap();
    assert_eq!(recovery["kind"], "recovery");
    assert!(recovery["note"].as_str().unwrap().starts_with("cut 26 bytes of a torn last line"), "{}", recovery["note"]);
}

#[test]
fn rotation_keeps_one_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let mut config = file_config(&path);
    config.max_bytes = 600;
    let audit = Audit::start(config.clone()).unwrap();
    for i in 0..20 {
        audit.submit_blocking(note(i)).unwrap();
    }
    drop(audit);
    // A restart after rotation continues from the newest file.
    let audit = Audit::start(config).unwrap();
    audit.submit_blocking(note(20)).unwrap();
    drop(audit);
    let mut files = rotated_files(&path);
    assert!(files.len() >= 3, "{files:?}");
    files.push(path.clone());
    files.reverse(); // verify orders files by their first seq
    let v = verify(&files).unwrap();
    assert_eq!((v.records, v.last_seq), (21, 21));
    // Leaving out a middle file breaks the chain.
    files.remove(2);
    assert!(verify(&files).is_err());
}

fn fifo(dir: &Path) -> PathBuf {
    let path = dir.join("stalled.jsonl");
    let status = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(status.success());
    path
}

/// Opens the FIFO for reading and drains it on a thread, releasing the stalled writer.
fn drain(path: PathBuf) {
    std::thread::spawn(move || {
        let mut f = File::open(path).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while f.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
}

fn stalled(on_full: OnFull) -> (tempfile::TempDir, PathBuf, Audit) {
    let dir = tempfile::tempdir().unwrap();
    let path = fifo(dir.path());
    let mut config = Config::new(Target::File(path.clone()));
    config.durability = Durability::Buffered;
    config.flush_interval = Duration::from_secs(3600);
    config.queue = 8;
    config.on_full = on_full;
    let audit = Audit::start(config).unwrap();
    (dir, path, audit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_under_deny_and_never_drops() {
    let (_dir, path, audit) = stalled(OnFull::Deny);
    // The pipe holds 64 KiB; past that the writer blocks and the queue fills.
    let mut accepted = 0u64;
    let mut refused = 0u64;
    for i in 0..5_000 {
        match audit.submit(note(i)).await {
            Ok(()) => accepted += 1,
            Err(Refused::QueueFull) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "the queue never filled");
    assert_eq!(audit.stats().refused, refused);
    drain(path);
    audit.flush().await;
    let stats = audit.stats();
    assert_eq!(stats.written, accepted, "every accepted record is written");
    assert_eq!(stats.seq, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_waits_under_wait() {
    let (_dir, path, audit) = stalled(OnFull::Wait);
    let filler = {
        let audit = audit.clone();
        tokio::spawn(async move {
            for i in 0..2_000 {
                audit.submit(note(i)).await.unwrap();
            }
        })
    };
    // The filler cannot finish while nobody reads: it waits for room.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), async {
            while !filler.is_finished() {
                tokio::task::yield_now().await
            }
        })
        .await
        .is_err()
    );
    assert!(audit.stats().waited > 0);
    drain(path);
    filler.await.unwrap();
    audit.flush().await;
    assert_eq!(audit.stats().written, 2_000);
    assert_eq!(audit.stats().refused, 0);
}

#[test]
fn written_mode_answers_once_the_record_is_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.jsonl");
    let mut config = file_config(&path);
    config.durability = Durability::Written;
    config.flush_interval = Duration::from_secs(3600);
    let audit = Audit::start(config).unwrap();
    for i in 0..3 {
        audit.submit_blocking(note(i)).unwrap();
        // Already in the file (page cache) when the submit returns, long before any fsync.
        assert_eq!(lines(&path).len(), i + 1);
    }
}

/// Runs `f` on a thread and fails the test if it has not finished by `limit`: a writer that
/// hangs must fail the test, not hang the suite.
fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what}: still blocked after {limit:?}"))
}

fn recovery_notes(path: &Path) -> Vec<String> {
    lines(path)
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "recovery")
        .map(|v| v["note"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_deleted_file_is_noticed_and_a_new_one_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let audit = Audit::start(file_config(&path)).unwrap();
    for i in 0..3 {
        audit.submit_blocking(note(i)).unwrap();
    }
    fs::remove_file(&path).unwrap();
    for i in 3..5 {
        audit.submit_blocking(note(i)).unwrap();
    }
    assert!(path.exists(), "no new file at the path");
    let l = lines(&path);
    assert_eq!(l.len(), 3, "{l:?}");
    let first: Value = serde_json::from_str(&l[0]).unwrap();
    assert_eq!((first["kind"].as_str(), first["seq"].as_u64()), (Some("recovery"), Some(4)));
    let said = first["note"].as_str().unwrap();
    assert!(said.contains("was deleted while agentca had it open: records up to seq 3"), "{said}");
    let v = verify_one(&path).unwrap();
    assert_eq!((v.first_seq, v.last_seq, v.from_genesis), (4, 6, false));
    assert_eq!(v.first_note.as_deref(), Some(said));
    let stats = audit.stats();
    assert!(stats.notice.as_deref().is_some_and(|n| n.ends_with(said)), "{stats:?}");
    assert_eq!((stats.seq, stats.pending, stats.error), (6, 0, None));
}

#[test]
fn a_moved_file_stays_whole_and_the_new_one_continues_its_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let moved = dir.path().join("d.jsonl.old");
    let audit = Audit::start(file_config(&path)).unwrap();
    for i in 0..3 {
        audit.submit_blocking(note(i)).unwrap();
    }
    fs::rename(&path, &moved).unwrap();
    for i in 3..5 {
        audit.submit_blocking(note(i)).unwrap();
    }
    drop(audit);
    assert_eq!(lines(&moved).len(), 3);
    let said = &recovery_notes(&path)[0];
    assert!(
        said.contains("was moved or replaced while agentca had it open: records up to seq 3 are in the old file"),
        "{said}"
    );
    // Alone, the new file is a chain that does not start at the genesis; with the old file, whole.
    assert!(!verify_one(&path).unwrap().from_genesis);
    let v = verify(&[path.clone(), moved]).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq, v.from_genesis), (6, 1, 6, true));
}

#[test]
fn logrotate_create_is_followed_into_the_new_empty_file() {
    // logrotate without copytruncate: the file is renamed and an empty one created in its place.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let moved = dir.path().join("d.jsonl-20261125");
    let audit = Audit::start(file_config(&path)).unwrap();
    audit.submit_blocking(note(0)).unwrap();
    fs::rename(&path, &moved).unwrap();
    File::create(&path).unwrap();
    audit.submit_blocking(note(1)).unwrap();
    drop(audit);
    assert_eq!(lines(&moved).len(), 1);
    assert_eq!(lines(&path).len(), 2);
    assert_eq!(verify(&[moved, path]).unwrap().records, 3);
}

#[test]
fn logrotate_copytruncate_is_noticed_and_the_chain_goes_on_in_the_emptied_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let copy = dir.path().join("d.jsonl.1");
    let audit = Audit::start(file_config(&path)).unwrap();
    for i in 0..3 {
        audit.submit_blocking(note(i)).unwrap();
    }
    fs::copy(&path, &copy).unwrap();
    OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    audit.submit_blocking(note(3)).unwrap();
    drop(audit);
    let said = &recovery_notes(&path)[0];
    assert!(said.contains("was truncated from") && said.contains("records up to seq 3 were in it"), "{said}");
    assert_eq!(lines(&path).len(), 2);
    let v = verify(&[copy, path]).unwrap();
    assert_eq!((v.records, v.from_genesis), (5, true));
}

#[test]
fn a_moved_file_then_rotation_neither_hangs_nor_loses_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let moved = dir.path().join("elsewhere.jsonl");
    let mut config = file_config(&path);
    config.max_bytes = 600;
    let audit = Audit::start(config).unwrap();
    for i in 0..3 {
        audit.submit_blocking(note(i)).unwrap();
    }
    fs::rename(&path, &moved).unwrap();
    let audit = within(Duration::from_secs(20), "submits across a rotation after a move", move || {
        for i in 3..25 {
            audit.submit_blocking(note(i)).unwrap();
        }
        audit
    });
    assert_eq!(audit.stats().error, None);
    drop(audit);
    let mut files = rotated_files(&path);
    assert!(files.len() >= 2, "{files:?}");
    files.push(path.clone());
    files.push(moved);
    let v = verify(&files).unwrap();
    assert_eq!((v.records, v.last_seq, v.from_genesis), (26, 26, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_from_another_chain_is_refused_until_moved_away() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let mut config = file_config(&path);
    config.on_full = OnFull::Deny;
    let audit = Audit::start(config).unwrap();
    let mut health = audit.health();
    assert!(*health.borrow_and_update());
    audit.submit(note(0)).await.unwrap();
    // Another chain's file put in its place: appending to it would break both.
    let (_other_dir, other) = tokio::task::block_in_place(|| chain_of(2));
    fs::rename(&other, &path).unwrap();
    let limit = Duration::from_secs(10);
    // The waiting caller is refused after the first failed attempt; later ones at once.
    let refused = tokio::time::timeout(limit, audit.submit(note(1))).await.expect("the caller was left waiting");
    assert_eq!(refused, Err(Refused::Unavailable));
    assert_eq!(audit.submit(note(2)).await, Err(Refused::Unavailable));
    let stats = audit.stats();
    assert_eq!(stats.refused, 2);
    assert!(!audit.healthy());
    // Watchers hear of it (the health service reports NOT_SERVING), and of the recovery.
    assert!(health.has_changed().unwrap());
    assert!(!*health.borrow_and_update());
    assert!(stats.error.as_deref().is_some_and(|e| e.contains("move it away")), "{stats:?}");
    // A signal's record waits; once the foreign file is moved away, everything lands.
    let waiting = tokio::spawn({
        let audit = audit.clone();
        async move { audit.submit_waiting(note(3)).await }
    });
    fs::rename(&path, dir.path().join("foreign.jsonl")).unwrap();
    tokio::time::timeout(limit, waiting).await.expect("the record never landed").unwrap().unwrap();
    assert!(audit.healthy());
    tokio::time::timeout(limit, health.changed()).await.expect("no news of the recovery").unwrap();
    assert!(*health.borrow());
    // The new file: why it starts here, the refused caller's record (kept, and saying how its
    // caller was answered), the note on the outage right after it; the waiting record lands in
    // that write or the next.
    let records: Vec<Value> = lines(&path).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 4, "{records:#?}");
    assert!(records[0]["note"].as_str().unwrap().contains("records up to seq 1"), "{records:#?}");
    assert_eq!((records[1]["n"].as_u64(), records[1]["answered"].as_str()), (Some(1), Some("audit_unavailable")));
    let outage = records.iter().position(|r| r["kind"] == "recovery" && r["seq"] != 2).unwrap();
    let said = records[outage]["note"].as_str().unwrap();
    assert!(said.starts_with("audit writes failed from "), "{said}");
    assert!(said.contains("the callers of 1 of them were answered deny with audit_unavailable"), "{said}");
    let waited = records.iter().find(|r| r["n"] == 3).unwrap();
    assert_eq!(waited.get("answered"), None);
    assert_eq!(audit.stats().notice.as_deref().map(|n| n.ends_with(said)), Some(true));
    assert!(!verify_one(&path).unwrap().from_genesis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_deny_a_failing_write_refuses_its_waiting_caller_promptly() {
    // /dev/full answers every write with ENOSPC, as a full disk does.
    let mut config = Config::new(Target::File("/dev/full".into()));
    config.on_full = OnFull::Deny;
    let audit = Audit::start(config).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), audit.submit(note(0))).await;
    assert_eq!(refused.expect("the caller was left waiting"), Err(Refused::Unavailable));
    let at_once = tokio::time::timeout(Duration::from_millis(100), audit.submit(note(1))).await;
    assert_eq!(at_once.expect("a new submit waited"), Err(Refused::Unavailable));
    let stats = audit.stats();
    assert_eq!((stats.refused, stats.pending, stats.written), (2, 1, 0), "{stats:?}");
    assert!(stats.error.is_some_and(|e| e.contains("No space left on device")));
    // Retries keep reporting the device's own error (a device cannot be cut back: no attempt).
    let flushed = tokio::time::timeout(Duration::from_millis(1200), audit.flush()).await;
    assert!(flushed.is_err(), "nothing can be flushed to /dev/full");
    let error = audit.stats().error.unwrap_or_default();
    assert!(error.contains("No space left on device"), "{error}");
}

/// A small tmpfs mounted on a temporary folder (tests run as root here), unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None (and the test skips) if it cannot be mounted.
    fn mount(options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out =
            std::process::Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(dir.path()).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!("skipped: cannot mount a tmpfs: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the tmpfs is full.
    fn fill(&self, name: &str) -> PathBuf {
        let path = self.path().join(name);
        let mut f = File::create(&path).unwrap();
        while f.write_all(&[b'x'; 512]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the writer thread may still hold its file open for a moment.
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_is_cut_back_and_the_chain_stays_whole() {
    let Some(fs) = Tmpfs::mount("size=64k") else { return };
    let path = fs.path().join("d.jsonl");
    let mut config = file_config(&path);
    config.on_full = OnFull::Deny;
    let audit = Audit::start(config.clone()).unwrap();
    audit.submit(note(0)).await.unwrap();
    let good = fs::metadata(&path).unwrap().len();
    let filler = fs.fill("filler");
    // Larger than what is left of the file's last page: part of it is written, then ENOSPC.
    let big = format!("{{\"kind\":\"test\",\"text\":\"{}\"}}", "y".repeat(8192));
    let refused = tokio::time::timeout(Duration::from_secs(10), audit.submit(big)).await.expect("left waiting");
    assert_eq!(refused, Err(Refused::Unavailable));
    // While the write keeps failing, the file holds exactly its whole records.
    assert_eq!(fs::metadata(&path).unwrap().len(), good);
    assert_eq!(verify_one(&path).unwrap().last_seq, 1);
    fs::remove_file(filler).unwrap();
    tokio::time::timeout(Duration::from_secs(10), audit.submit_waiting(note(2))).await.expect("never landed").unwrap();
    drop(audit);
    let v = verify_one(&path).unwrap();
    assert_eq!((v.records, v.from_genesis), (4, true), "the big record, the waiting one and the outage note");
    // A restart finds nothing to cut.
    let audit = Audit::start(config).unwrap();
    assert!(audit.stats().notice.is_none());
    assert_eq!(audit.stats().seq, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reopen_after_rotation_appends_nothing_until_a_file_opens() {
    // Room for two files only: once the log is rotated, its new file cannot be created.
    let Some(fs) = Tmpfs::mount("size=64k,nr_inodes=3") else { return };
    let path = fs.path().join("d.jsonl");
    let placeholder = fs.path().join("placeholder");
    File::create(&placeholder).unwrap();
    let mut config = file_config(&path);
    config.max_bytes = 600;
    config.on_full = OnFull::Deny;
    let audit = Audit::start(config).unwrap();
    let limit = Duration::from_secs(10);
    let mut refused = None;
    for i in 0..20 {
        match tokio::time::timeout(limit, audit.submit(note(i))).await.expect("left waiting") {
            Ok(()) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, e) = refused.expect("the rotation never failed");
    assert_eq!(e, Refused::Unavailable);
    assert!(!path.exists());
    let rotated = rotated_files(&path);
    assert_eq!(rotated.len(), 1);
    let before = fs::read(&rotated[0]).unwrap();
    assert_eq!(verify(&rotated).unwrap().last_seq, at as u64, "the rotated file ends whole");
    // Retries go on and append nothing to the rotated file.
    let waiting = tokio::spawn({
        let audit = audit.clone();
        async move { audit.submit_waiting(note(100)).await }
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(1200), async {
            while audit.stats().written == 0 || !waiting.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .is_err()
    );
    assert_eq!(fs::read(&rotated[0]).unwrap(), before);
    fs::remove_file(placeholder).unwrap();
    tokio::time::timeout(limit, waiting).await.expect("never landed").unwrap().unwrap();
    let mut files = rotated_files(&path);
    files.push(path.clone());
    let v = verify(&files).unwrap();
    assert_eq!((v.last_seq, v.from_genesis), (at as u64 + 3, true), "refused, waiting, outage note");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_replaced_by_a_file_is_a_loud_failure_not_a_silent_loss() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("audit");
    let path = folder.join("d.jsonl");
    let mut config = file_config(&path);
    config.on_full = OnFull::Deny;
    let audit = Audit::start(config).unwrap();
    audit.submit(note(0)).await.unwrap();
    // The folder goes and a file takes its name: the path cannot lead to any file now.
    fs::remove_dir_all(&folder).unwrap();
    fs::write(&folder, b"").unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), audit.submit(note(1))).await;
    assert_eq!(refused.expect("the caller was left waiting"), Err(Refused::Unavailable));
    let error = audit.stats().error.unwrap_or_default();
    assert!(error.contains("cannot check that") && error.contains("d.jsonl"), "{error}");
}
