//! Reading a mount's tree from disk: a full scan (once, when a mount is
//! registered) and the state of the few paths a watcher reported.
//!
//! Symlinks are never followed: they are entries of their own, and a path
//! whose parent is not a real directory inside the mount is treated as absent.

use std::collections::BTreeSet;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::ignore::{IgnoreRules, IGNORE_FILE};
use super::manifest::{safe_components, Changes, Entry, Kind, Manifest};

/// One side of a mount on disk: a directory, or one file in a directory.
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: PathBuf,
    /// For a single-file bind: the one name under `root` that is synced.
    pub only: Option<String>,
    pub ignore: IgnoreRules,
    /// Rules every mount has (the config file's `ignore`), before `.offloadignore`'s.
    pub extra_rules: Vec<String>,
}

impl Tree {
    pub fn new(root: PathBuf, only: Option<String>) -> Self {
        Self::with_rules(root, only, Vec::new())
    }

    pub fn with_rules(root: PathBuf, only: Option<String>, extra_rules: Vec<String>) -> Self {
        let mut tree = Self { root, only, ignore: IgnoreRules::default(), extra_rules };
        tree.reload_ignore();
        tree
    }

    /// Reads `.offloadignore` at the root (directory mounts only).
    pub fn reload_ignore(&mut self) {
        self.ignore = match self.only {
            Some(_) => IgnoreRules::default(),
            None => {
                let file = std::fs::read_to_string(self.root.join(IGNORE_FILE)).unwrap_or_default();
                IgnoreRules::parse(&format!("{}\n{file}", self.extra_rules.join("\n")))
            }
        };
    }

    /// Whether a relative path takes part in sync.
    pub fn includes(&self, path: &str, is_dir: bool) -> bool {
        match &self.only {
            Some(name) => path == name,
            None => !self.ignore.is_ignored(path, is_dir),
        }
    }

    /// The absolute path of a relative one, if every parent is a real
    /// directory (not a symlink) inside the mount.
    pub fn checked_path(&self, path: &str) -> Option<PathBuf> {
        let components = safe_components(path)?;
        let mut full = self.root.clone();
        for parent in &components[..components.len() - 1] {
            full.push(parent);
            let meta = std::fs::symlink_metadata(&full).ok()?;
            if !meta.file_type().is_dir() {
                return None;
            }
        }
        full.push(components[components.len() - 1]);
        Some(full)
    }

    /// The current state of one path, `None` when absent or not syncable.
    pub fn stat(&self, path: &str) -> Option<Entry> {
        let full = self.checked_path(path)?;
        let meta = std::fs::symlink_metadata(&full).ok()?;
        entry_of(&meta, &full)
    }

    /// Every syncable entry of the tree.
    pub fn scan(&self) -> io::Result<Manifest> {
        let mut manifest = Manifest::new();
        if let Some(name) = &self.only {
            if let Some(entry) = self.stat(name) {
                manifest.insert(name.clone(), entry);
            }
            return Ok(manifest);
        }
        self.scan_into(String::new(), &mut manifest)?;
        Ok(manifest)
    }

    /// Adds everything under the relative directory `from` ("" = root).
    fn scan_into(&self, from: String, manifest: &mut Manifest) -> io::Result<()> {
        let mut pending = vec![from];
        while let Some(dir) = pending.pop() {
            let full = if dir.is_empty() { self.root.clone() } else { self.root.join(&dir) };
            let entries = match std::fs::read_dir(&full) {
                Ok(entries) => entries,
                // Gone or unreadable meanwhile: the watcher reports what follows.
                Err(error) if !dir.is_empty() => {
                    tracing::debug!(%error, dir, "skipping a directory");
                    continue;
                }
                Err(error) => return Err(error),
            };
            for item in entries {
                let item = item?;
                let Some(name) = item.file_name().to_str().map(str::to_string) else {
                    tracing::warn!(path = %item.path().display(), "skipping a file name that is not UTF-8");
                    continue;
                };
                let path = if dir.is_empty() { name } else { format!("{dir}/{name}") };
                let Ok(meta) = item.path().symlink_metadata() else { continue };
                let is_dir = meta.file_type().is_dir();
                if !self.includes(&path, is_dir) {
                    continue;
                }
                let Some(entry) = entry_of(&meta, &item.path()) else { continue };
                if is_dir {
                    pending.push(path.clone());
                }
                manifest.insert(path, entry);
            }
        }
        Ok(())
    }

    /// What changed among `paths` (reported by a watcher) compared with
    /// `manifest`: new directories bring their contents, a removed directory
    /// takes its manifest children with it. Paths equal to their entry (our
    /// own writes coming back as events) are not changes.
    pub fn changes(&self, manifest: &Manifest, paths: &BTreeSet<String>) -> Changes {
        let mut upserts = Manifest::new();
        let mut deletions = BTreeSet::new();
        for path in paths {
            match self.stat(path) {
                Some(entry) if self.includes(path, entry.kind == Kind::Dir) => {
                    let known = manifest.get(path);
                    let new_dir = entry.kind == Kind::Dir && !known.is_some_and(|old| old.kind == Kind::Dir);
                    if !known.is_some_and(|old| old.same_as(&entry)) {
                        upserts.insert(path.clone(), entry);
                    }
                    if new_dir {
                        // A directory moved in or created with contents
                        // before its watch existed.
                        let _ = self.scan_into(path.clone(), &mut upserts);
                    }
                    if known.is_some_and(|old| old.kind == Kind::Dir)
                        && upserts.get(path).is_some_and(|e| e.kind != Kind::Dir)
                    {
                        deletions.extend(children(manifest, path));
                    }
                }
                _ => {
                    if manifest.contains_key(path) {
                        deletions.insert(path.clone());
                        deletions.extend(children(manifest, path));
                    }
                }
            }
        }
        upserts.retain(|path, entry| !manifest.get(path).is_some_and(|old| old.same_as(entry)));
        let mut deletions: Vec<String> = deletions.into_iter().collect();
        deletions.reverse();
        Changes { upserts: upserts.into_keys().collect(), deletions }
    }
}

/// Manifest paths strictly below `dir`.
pub fn children<'a>(manifest: &'a Manifest, dir: &str) -> impl Iterator<Item = String> + 'a {
    let prefix = format!("{dir}/");
    manifest
        .range(prefix.clone()..)
        .take_while(move |(path, _)| path.starts_with(&prefix))
        .map(|(p, _)| p.clone())
}

/// The entry for a file's metadata; sockets, FIFOs and devices are not synced.
pub fn entry_of(meta: &Metadata, full: &Path) -> Option<Entry> {
    let file_type = meta.file_type();
    let mtime_ns = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec());
    let mode = meta.mode() & 0o7777;
    if file_type.is_file() {
        Some(Entry { kind: Kind::File, mode, size: meta.size(), mtime_ns, target: None })
    } else if file_type.is_dir() {
        Some(Entry { kind: Kind::Dir, mode, size: 0, mtime_ns, target: None })
    } else if file_type.is_symlink() {
        let target = std::fs::read_link(full).ok()?.to_str()?.to_string();
        Some(Entry { kind: Kind::Symlink, mode: 0o777, size: 0, mtime_ns, target: Some(target) })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) -> Tree {
        Tree::new(dir.to_path_buf(), None)
    }

    #[test]
    fn scans_files_dirs_and_links_without_following_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/empty")).expect("mkdir");
        std::fs::write(dir.path().join("a/f.txt"), "hello").expect("write");
        std::os::unix::fs::symlink("/etc", dir.path().join("out")).expect("symlink");
        let manifest = tree(dir.path()).scan().expect("scan");
        let paths: Vec<&str> = manifest.keys().map(String::as_str).collect();
        assert_eq!(paths, vec!["a", "a/empty", "a/f.txt", "out"]);
        assert_eq!(manifest["a/f.txt"].size, 5);
        assert_eq!(manifest["out"].target.as_deref(), Some("/etc"));
        assert!(tree(dir.path()).stat("out/passwd").is_none(), "never through a symlink");
    }

    #[test]
    fn changes_cover_new_directories_and_removed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("old/sub")).expect("mkdir");
        std::fs::write(dir.path().join("old/sub/x"), "x").expect("write");
        let t = tree(dir.path());
        let manifest = t.scan().expect("scan");
        std::fs::rename(dir.path().join("old"), dir.path().join("new")).expect("rename");
        let paths: BTreeSet<String> = ["old".to_string(), "new".to_string()].into();
        let changes = t.changes(&manifest, &paths);
        assert_eq!(changes.upserts, vec!["new", "new/sub", "new/sub/x"]);
        assert_eq!(changes.deletions, vec!["old/sub/x", "old/sub", "old"]);
        let unchanged: BTreeSet<String> = ["new/sub/x".to_string()].into();
        let now = t.scan().expect("scan");
        assert!(t.changes(&now, &unchanged).is_empty(), "an unchanged path is an echo");
    }

    #[test]
    fn ignore_rules_and_single_file_mounts_limit_the_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".offloadignore"), "*.log\nnode_modules/\n").expect("write");
        std::fs::create_dir_all(dir.path().join("node_modules/x")).expect("mkdir");
        std::fs::write(dir.path().join("a.log"), "").expect("write");
        std::fs::write(dir.path().join("b.txt"), "").expect("write");
        let paths: Vec<String> = tree(dir.path()).scan().expect("scan").into_keys().collect();
        assert_eq!(paths, vec![".offloadignore", "b.txt"]);
        let single = Tree::new(dir.path().to_path_buf(), Some("b.txt".into()));
        let paths: Vec<String> = single.scan().expect("scan").into_keys().collect();
        assert_eq!(paths, vec!["b.txt"]);
    }
}
