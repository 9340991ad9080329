//! Watches the policies folder and asks for a reload when it changes, debounced. It survives
//! the folder being replaced by an atomic symlink swap (a Kubernetes ConfigMap's `..data`
//! link, or `current -> releases/v2`): the parent folder is watched too, and the watches are
//! set up again after every change, so they follow the new target.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// How long the folder must be quiet before a reload is asked for.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// The watching thread; it runs for the life of the process.
pub struct Watch {
    _thread: std::thread::JoinHandle<()>,
}

/// Calls `changed` (from a watcher thread) after each burst of changes in `dir`.
pub fn watch(dir: &Path, changed: impl Fn() + Send + 'static) -> notify::Result<Watch> {
    // Absolute, but not resolved: the link itself is what gets swapped.
    let dir = std::path::absolute(dir)?;
    let parent = dir.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let (tx, rx) = mpsc::channel::<Event>();
    let mut watcher: RecommendedWatcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        if let Ok(e) = event {
            let _ = tx.send(e);
        }
    })?;
    arm(&mut watcher, &dir, &parent);
    let thread = std::thread::Builder::new().name("agentca-watch".into()).spawn(move || {
        while let Ok(event) = rx.recv() {
            let relevant =
                !matches!(event.kind, EventKind::Access(_)) && event.paths.iter().any(|p| bundle_path(&dir, p));
            if !relevant {
                continue;
            }
            // Debounce: wait until no event has come for DEBOUNCE.
            while rx.recv_timeout(DEBOUNCE).is_ok() {}
            changed();
            arm(&mut watcher, &dir, &parent);
        }
    })?;
    Ok(Watch { _thread: thread })
}

/// True for the paths that make up the bundle: the folder itself (its symlink, in the parent),
/// its bundle files, and a ConfigMap's `..data` links and folders. Anything else (an audit log
/// someone keeps in the same folder, an editor's swap file) does not trigger a reload.
fn bundle_path(dir: &Path, p: &Path) -> bool {
    let Ok(rest) = p.strip_prefix(dir) else { return false };
    let Some(first) = rest.components().next() else { return true };
    let name = first.as_os_str().to_string_lossy();
    name.starts_with("..")
        || name.ends_with(".cedar")
        || [crate::bundle::SCHEMA_FILE, crate::bundle::DIRECTORY_FILE, crate::bundle::LOCATIONS_FILE]
            .contains(&name.as_ref())
}

/// (Re)watches the folder (following its symlink to today's target) and its parent.
fn arm(watcher: &mut RecommendedWatcher, dir: &Path, parent: &Path) {
    let _ = watcher.unwatch(dir);
    let _ = watcher.unwatch(parent);
    if let Err(e) = watcher.watch(dir, RecursiveMode::Recursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the policies folder");
    }
    if let Err(e) = watcher.watch(parent, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %parent.display(), error = %e, "cannot watch the policies folder's parent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bundle_paths_trigger() {
        let dir = Path::new("/etc/agentca/policies");
        let yes = ["", "base.cedar", "directory.json", "schema.cedarschema", "..data", "..2026_11_27.1/x.cedar"];
        for p in yes {
            assert!(bundle_path(dir, &dir.join(p)), "{p}");
        }
        for p in ["decisions.jsonl", ".base.cedar.swp", "tests/cases.json"] {
            assert!(!bundle_path(dir, &dir.join(p)), "{p}");
        }
        assert!(!bundle_path(dir, Path::new("/etc/agentca/other")));
    }
}
