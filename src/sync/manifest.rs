//! What one side of a mount last agreed with the other: path → kind, mode,
//! size, mtime (nanoseconds), link target. Comparing a file's current state
//! with its entry tells a real change from the echo of our own write. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    #[serde(default)]
    pub size: u64,
    /// Nanoseconds since the epoch.
    #[serde(default)]
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Entry {
    /// Whether both describe the same content. Directory mtimes change with
    /// their contents and say nothing on their own; they are not compared.
    pub fn same_as(&self, other: &Entry) -> bool {
        if self.kind != other.kind {
            return false;
        }
        match self.kind {
            Kind::File => {
                self.mode == other.mode && self.size == other.size && self.mtime_ns == other.mtime_ns
            }
            Kind::Dir => self.mode == other.mode,
            Kind::Symlink => self.target == other.target,
        }
    }
}

/// Relative paths (`/`-separated, no leading slash) to entries. Sorted, so a
/// directory always comes before what it holds.
pub type Manifest = BTreeMap<String, Entry>;

/// What one side must do to match the other.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Paths to write, parents before children.
    pub upserts: Vec<String>,
    /// Paths to remove, children before parents.
    pub deletions: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletions.is_empty()
    }
}

/// What turns `target` into `source`.
pub fn diff(source: &Manifest, target: &Manifest) -> Changes {
    let upserts = source
        .iter()
        .filter(|(path, entry)| !target.get(*path).is_some_and(|old| old.same_as(entry)))
        .map(|(path, _)| path.clone())
        .collect();
    let mut deletions: Vec<String> = target
        .keys()
        .filter(|path| !source.contains_key(*path) && !has_removed_parent(path, source, target))
        .cloned()
        .collect();
    // Removing a directory takes its contents: children go first anyway, so
    // a failure half way leaves no orphaned parent entry.
    deletions.reverse();
    Changes { upserts, deletions }
}

/// A path whose parent directory is deleted too needs no deletion of its own.
fn has_removed_parent(path: &str, source: &Manifest, target: &Manifest) -> bool {
    let mut current = path;
    while let Some((parent, _)) = current.rsplit_once('/') {
        if target.contains_key(parent) && !source.contains_key(parent) {
            return true;
        }
        current = parent;
    }
    false
}

/// Splits a relative path into components, refusing anything that could
/// leave the mount: empty, absolute, `.` or `..` components, NUL bytes.
pub fn safe_components(path: &str) -> Option<Vec<&str>> {
    if path.is_empty() || path.starts_with('/') || path.contains('\0') {
        return None;
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.iter().any(|part| part.is_empty() || *part == "." || *part == "..") {
        return None;
    }
    Some(parts)
}

/// The name a remote version gets when both sides wrote the same file:
/// `dir/name.conflict-remote-<stamp>.ext` (the extension kept, so editors
/// still know the file).
pub fn conflict_name(path: &str, stamp: u64) -> String {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let renamed = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}.conflict-remote-{stamp}.{ext}"),
        _ => format!("{name}.conflict-remote-{stamp}"),
    };
    match dir {
        Some(dir) => format!("{dir}/{renamed}"),
        None => renamed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64, mtime_ns: i64) -> Entry {
        Entry { kind: Kind::File, mode: 0o644, size, mtime_ns, target: None }
    }

    fn dir() -> Entry {
        Entry { kind: Kind::Dir, mode: 0o755, size: 0, mtime_ns: 1, target: None }
    }

    #[test]
    fn diff_finds_new_changed_and_removed_paths_in_order() {
        let mut local = Manifest::new();
        local.insert("a".into(), dir());
        local.insert("a/new.txt".into(), file(3, 1));
        local.insert("same.txt".into(), file(1, 1));
        local.insert("touched.txt".into(), file(1, 2));
        let mut remote = Manifest::new();
        remote.insert("same.txt".into(), file(1, 1));
        remote.insert("touched.txt".into(), file(1, 1));
        remote.insert("gone".into(), dir());
        remote.insert("gone/x".into(), file(1, 1));
        remote.insert("gone/y".into(), file(1, 1));
        remote.insert("old.txt".into(), file(1, 1));
        let changes = diff(&local, &remote);
        assert_eq!(changes.upserts, vec!["a", "a/new.txt", "touched.txt"]);
        assert_eq!(changes.deletions, vec!["old.txt", "gone"]);
        assert!(diff(&local, &local).is_empty());
    }

    #[test]
    fn directory_mtimes_do_not_count_but_modes_and_kinds_do() {
        let mut later = dir();
        later.mtime_ns = 99;
        assert!(dir().same_as(&later));
        later.mode = 0o700;
        assert!(!dir().same_as(&later));
        assert!(!dir().same_as(&file(0, 1)));
        let link = |t: &str| Entry {
            kind: Kind::Symlink,
            mode: 0o777,
            size: 0,
            mtime_ns: 0,
            target: Some(t.into()),
        };
        assert!(link("a").same_as(&link("a")));
        assert!(!link("a").same_as(&link("b")));
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(safe_components("a/b.txt"), Some(vec!["a", "b.txt"]));
        for bad in ["", "/etc/passwd", "a/../../x", "./a", "a//b", "a/", "a\0b", ".."] {
            assert_eq!(safe_components(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn conflict_names_keep_the_extension() {
        assert_eq!(conflict_name("src/main.rs", 7), "src/main.conflict-remote-7.rs");
        assert_eq!(conflict_name("Makefile", 7), "Makefile.conflict-remote-7");
        assert_eq!(conflict_name(".env", 7), ".env.conflict-remote-7");
    }
}
