//! The sync stream: one direction's changes as records, zstd-compressed.
//!
//! Inside the compressed stream: `OFS1`, then records, each a 4-byte
//! big-endian length, a JSON [`RecordHead`] and, for a file, exactly `size`
//! bytes of content; a zero length ends the stream. Deletions come first
//! (children before parents), then upserts (parents before children).
//!
//! Not tar: the records carry nanosecond mtimes (so both manifests compare
//! exactly) and deletions, and there is nothing to refuse but what we never
//! write: only files, directories and symlinks exist in this format, and
//! every path is checked component by component before it is touched.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::{safe_components, Changes, Entry, Kind};
use super::scan::{entry_of, Tree};

const MAGIC: &[u8; 4] = b"OFS1";
/// A record head is a path and a few numbers; anything larger is garbage.
const MAX_HEAD: usize = 64 << 10;
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    File,
    Dir,
    Symlink,
    Delete,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordHead {
    pub path: String,
    pub kind: RecordKind,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Counts of what a stream carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub bytes: u64,
}

/// Writes `changes` of `tree` to `out`. `sent` is told every path as it went
/// out (`None`: deleted), so the sender's manifest records what the other
/// side now has; `progress` sees running totals.
pub fn write_changes(
    tree: &Tree,
    changes: &Changes,
    out: impl Write,
    mut sent: impl FnMut(&str, Option<Entry>),
    mut progress: impl FnMut(Totals),
) -> io::Result<Totals> {
    let mut encoder = zstd::stream::Encoder::new(out, ZSTD_LEVEL)?;
    encoder.write_all(MAGIC)?;
    let mut totals = Totals::default();
    for path in &changes.deletions {
        write_head(&mut encoder, &delete_record(path))?;
        sent(path, None);
    }
    for path in &changes.upserts {
        let Some(full) = tree.checked_path(path) else {
            write_head(&mut encoder, &delete_record(path))?;
            sent(path, None);
            continue;
        };
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(meta) => meta,
            Err(_) => {
                // Gone since it was reported: the other side loses it too.
                write_head(&mut encoder, &delete_record(path))?;
                sent(path, None);
                continue;
            }
        };
        let Some(entry) = entry_of(&meta, &full) else { continue };
        if entry.kind == Kind::File {
            let Some((entry, file)) = open_same_file(&full, &meta) else { continue };
            write_head(&mut encoder, &head_of(path, &entry))?;
            copy_exactly(file, &mut encoder, entry.size)?;
            totals.files += 1;
            totals.bytes += entry.size;
            sent(path, Some(entry));
            progress(totals);
        } else {
            write_head(&mut encoder, &head_of(path, &entry))?;
            sent(path, Some(entry));
        }
    }
    encoder.write_all(&0u32.to_be_bytes())?;
    encoder.finish()?.flush()?;
    Ok(totals)
}

fn delete_record(path: &str) -> RecordHead {
    RecordHead {
        path: path.to_string(),
        kind: RecordKind::Delete,
        mode: 0,
        size: 0,
        mtime_ns: 0,
        target: None,
    }
}

fn head_of(path: &str, entry: &Entry) -> RecordHead {
    let kind = match entry.kind {
        Kind::File => RecordKind::File,
        Kind::Dir => RecordKind::Dir,
        Kind::Symlink => RecordKind::Symlink,
    };
    RecordHead {
        path: path.to_string(),
        kind,
        mode: entry.mode,
        size: entry.size,
        mtime_ns: entry.mtime_ns,
        target: entry.target.clone(),
    }
}

/// Opens a regular file and checks it is the one that was stat'ed (not
/// swapped for a symlink in between); the entry comes from the open file.
fn open_same_file(full: &Path, meta: &std::fs::Metadata) -> Option<(Entry, File)> {
    let file = File::open(full).ok()?;
    let opened = file.metadata().ok()?;
    if opened.ino() != meta.ino() || opened.dev() != meta.dev() || !opened.file_type().is_file() {
        return None;
    }
    Some((entry_of(&opened, full)?, file))
}

/// Exactly `size` bytes: a file that shrank while read is padded, one that
/// grew is cut (the watcher reports it again).
fn copy_exactly(file: File, out: &mut impl Write, size: u64) -> io::Result<()> {
    let copied = io::copy(&mut file.take(size), out)?;
    if copied < size {
        io::copy(&mut io::repeat(0).take(size - copied), out)?;
    }
    Ok(())
}

fn write_head(out: &mut impl Write, head: &RecordHead) -> io::Result<()> {
    let json = serde_json::to_vec(head).map_err(io::Error::other)?;
    out.write_all(&(json.len() as u32).to_be_bytes())?;
    out.write_all(&json)
}

/// Why a stream was not (fully) applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An entry that could leave the mount or is not allowed: a security refusal.
    #[error("refused {path:?}: {why}")]
    Refused { path: String, why: &'static str },
    #[error("{0}")]
    TooLarge(String),
    #[error("the sync stream is corrupt: {0}")]
    Corrupt(String),
    #[error("{path}: {error}")]
    Io { path: String, error: io::Error },
}

/// What the receiver does with one incoming record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Apply,
    /// Keep what is here (a local edit that is still to be sent wins).
    Skip,
    /// Write the incoming version under another path instead (a conflict
    /// copy beside the local version).
    Redirect(String),
    /// Move what is here to another path first (the remote version of a
    /// conflict), then apply.
    MoveAside(String),
}

/// Applies a stream to `tree`. `decide` settles conflicts per record;
/// `applied` is told each path's state on disk afterwards (`None`: gone);
/// `budget` may refuse file content beyond a limit.
pub fn apply_changes(
    tree: &Tree,
    input: impl Read,
    mut decide: impl FnMut(&RecordHead) -> Decision,
    mut applied: impl FnMut(&str, Option<Entry>),
    mut budget: impl FnMut(u64) -> Result<(), String>,
) -> Result<(Totals, Vec<String>), ApplyError> {
    let corrupt = |e: io::Error| ApplyError::Corrupt(e.to_string());
    let mut input = zstd::stream::Decoder::new(input).map_err(corrupt)?;
    let mut magic = [0u8; 4];
    input.read_exact(&mut magic).map_err(corrupt)?;
    if &magic != MAGIC {
        return Err(ApplyError::Corrupt("not a sync stream".into()));
    }
    let mut totals = Totals::default();
    let mut conflicts = Vec::new();
    loop {
        let mut length = [0u8; 4];
        input.read_exact(&mut length).map_err(corrupt)?;
        let length = u32::from_be_bytes(length) as usize;
        if length == 0 {
            break;
        }
        if length > MAX_HEAD {
            return Err(ApplyError::Corrupt(format!("a record head of {length} bytes")));
        }
        let mut json = vec![0u8; length];
        input.read_exact(&mut json).map_err(corrupt)?;
        let head: RecordHead =
            serde_json::from_slice(&json).map_err(|e| ApplyError::Corrupt(format!("record head: {e}")))?;
        let refuse = |why| ApplyError::Refused { path: head.path.clone(), why };
        if safe_components(&head.path).is_none() {
            return Err(refuse("not a relative path inside the mount"));
        }
        if head.kind == RecordKind::File {
            budget(head.size).map_err(ApplyError::TooLarge)?;
        }
        let included = tree.includes(&head.path, head.kind == RecordKind::Dir);
        let decision = if included { decide(&head) } else { Decision::Skip };
        let path = match &decision {
            Decision::Skip => {
                io::copy(&mut (&mut input).take(content_size(&head)), &mut io::sink()).map_err(corrupt)?;
                continue;
            }
            Decision::Redirect(other) => {
                conflicts.push(other.clone());
                other.clone()
            }
            Decision::MoveAside(aside) => {
                move_aside(tree, &head.path, aside)?;
                // Not recorded as agreed: the moved copy is a change of
                // this side, so it travels back like any other.
                conflicts.push(aside.clone());
                head.path.clone()
            }
            Decision::Apply => head.path.clone(),
        };
        let full = prepare_parents(tree, &path)
            .ok_or_else(|| refuse("its parent is not a directory inside the mount"))?;
        let io_error = |error| ApplyError::Io { path: path.clone(), error };
        match head.kind {
            RecordKind::Delete => remove(&full).map_err(io_error)?,
            RecordKind::Dir => make_dir(&full, head.mode).map_err(io_error)?,
            RecordKind::Symlink => {
                let target = head.target.as_deref().ok_or_else(|| refuse("a symlink without a target"))?;
                remove(&full).map_err(io_error)?;
                std::os::unix::fs::symlink(target, &full).map_err(io_error)?;
            }
            RecordKind::File => {
                write_file(&full, &head, &mut input).map_err(|error| match error.kind() {
                    io::ErrorKind::UnexpectedEof => {
                        ApplyError::Corrupt(format!("{path}: content ended early"))
                    }
                    _ => io_error(error),
                })?;
                totals.files += 1;
                totals.bytes += head.size;
            }
        }
        // A redirected copy is this side's news, to be sent back as well.
        if !matches!(decision, Decision::Redirect(_)) {
            applied(&path, tree.stat(&path));
        }
    }
    Ok((totals, conflicts))
}

fn content_size(head: &RecordHead) -> u64 {
    if head.kind == RecordKind::File {
        head.size
    } else {
        0
    }
}

fn move_aside(tree: &Tree, path: &str, aside: &str) -> Result<(), ApplyError> {
    let refuse = |why| ApplyError::Refused { path: path.to_string(), why };
    let from = tree.checked_path(path).ok_or_else(|| refuse("not inside the mount"))?;
    let to = tree.checked_path(aside).ok_or_else(|| refuse("not inside the mount"))?;
    match std::fs::rename(&from, &to) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(ApplyError::Io { path: path.to_string(), error }),
    }
}

/// The full path for `path`, creating missing parents as directories; `None`
/// when a parent exists but is not a real directory (a symlink, a file).
fn prepare_parents(tree: &Tree, path: &str) -> Option<PathBuf> {
    let components = safe_components(path)?;
    let mut full = tree.root.clone();
    for parent in &components[..components.len() - 1] {
        full.push(parent);
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => return None,
            Err(_) => std::fs::create_dir(&full).ok()?,
        }
    }
    full.push(components[components.len() - 1]);
    Some(full)
}

fn remove(full: &Path) -> io::Result<()> {
    let result = match std::fs::symlink_metadata(full) {
        Ok(meta) if meta.file_type().is_dir() => std::fs::remove_dir_all(full),
        Ok(_) => std::fs::remove_file(full),
        Err(error) => Err(error),
    };
    match result {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn make_dir(full: &Path, mode: u32) -> io::Result<()> {
    match std::fs::symlink_metadata(full) {
        Ok(meta) if meta.file_type().is_dir() => {}
        Ok(_) => {
            remove(full)?;
            std::fs::create_dir(full)?;
        }
        Err(_) => std::fs::create_dir(full)?,
    }
    std::fs::set_permissions(full, std::fs::Permissions::from_mode(mode & 0o7777))
}

/// Writes in place when a regular file is there already: the inode stays,
/// so a single-file bind keeps seeing it and watchers in the container see
/// a modification, as if the user had saved the file on that machine.
fn write_file(full: &Path, head: &RecordHead, input: &mut impl Read) -> io::Result<()> {
    let mut file = match std::fs::symlink_metadata(full) {
        Ok(meta) if meta.file_type().is_file() => open_for_rewrite(full, &meta)?,
        Ok(_) => {
            remove(full)?;
            OpenOptions::new().write(true).create_new(true).open(full)?
        }
        Err(_) => OpenOptions::new().write(true).create_new(true).open(full)?,
    };
    let copied = io::copy(&mut input.take(head.size), &mut file)?;
    if copied < head.size {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    file.set_permissions(std::fs::Permissions::from_mode(head.mode & 0o7777))?;
    let mtime = filetime::FileTime::from_unix_time(
        head.mtime_ns.div_euclid(1_000_000_000),
        head.mtime_ns.rem_euclid(1_000_000_000) as u32,
    );
    filetime::set_file_handle_times(&file, None, Some(mtime))
}

fn open_for_rewrite(full: &Path, meta: &std::fs::Metadata) -> io::Result<File> {
    let open = || OpenOptions::new().write(true).truncate(true).open(full);
    match open() {
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
            // A read-only file of ours: its mode is set again after writing.
            std::fs::set_permissions(full, std::fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o200))?;
            open()
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::diff;

    fn write(dir: &Path, path: &str, text: &str) {
        let full = dir.join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, text).expect("write");
    }

    fn roundtrip(from: &Tree, to: &Tree, changes: &Changes) -> Result<(Totals, Vec<String>), ApplyError> {
        let mut bytes = Vec::new();
        write_changes(from, changes, &mut bytes, |_, _| {}, |_| {}).expect("write");
        apply_changes(to, bytes.as_slice(), |_| Decision::Apply, |_, _| {}, |_| Ok(()))
    }

    #[test]
    fn a_tree_arrives_with_modes_mtimes_links_and_empty_dirs() {
        let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
        write(a.path(), "src/main.rs", "fn main() {}");
        write(a.path(), "run.sh", "#!/bin/sh");
        std::fs::set_permissions(a.path().join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::create_dir(a.path().join("empty")).expect("mkdir");
        std::os::unix::fs::symlink("src/main.rs", a.path().join("link")).expect("symlink");
        write(b.path(), "stale.txt", "old");
        let (from, to) = (Tree::new(a.path().into(), None), Tree::new(b.path().into(), None));
        let changes = diff(&from.scan().expect("scan"), &to.scan().expect("scan"));
        let (totals, conflicts) = roundtrip(&from, &to, &changes).expect("apply");
        assert_eq!(totals, Totals { files: 2, bytes: 21 });
        assert!(conflicts.is_empty());
        assert!(diff(&from.scan().expect("scan"), &to.scan().expect("scan")).is_empty());
    }

    #[test]
    fn an_existing_file_is_rewritten_in_place() {
        let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
        write(a.path(), "f", "new content");
        write(b.path(), "f", "old");
        let inode = std::fs::metadata(b.path().join("f")).expect("stat").ino();
        let (from, to) = (Tree::new(a.path().into(), None), Tree::new(b.path().into(), None));
        let changes = Changes { upserts: vec!["f".into()], deletions: vec![] };
        roundtrip(&from, &to, &changes).expect("apply");
        assert_eq!(std::fs::read_to_string(b.path().join("f")).expect("read"), "new content");
        assert_eq!(std::fs::metadata(b.path().join("f")).expect("stat").ino(), inode);
    }

    fn hostile(head: RecordHead) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut encoder = zstd::stream::Encoder::new(&mut out, 1).expect("zstd");
            encoder.write_all(MAGIC).expect("write");
            write_head(&mut encoder, &head).expect("head");
            encoder.write_all(&vec![b'x'; head.size as usize]).expect("content");
            encoder.write_all(&0u32.to_be_bytes()).expect("end");
            encoder.finish().expect("finish");
        }
        out
    }

    #[test]
    fn paths_that_leave_the_mount_are_refused() {
        let root = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).expect("symlink");
        let tree = Tree::new(root.path().into(), None);
        for path in ["../x", "/etc/x", "a/../../x", "escape/x"] {
            let head = RecordHead {
                path: path.into(),
                kind: RecordKind::File,
                mode: 0o644,
                size: 1,
                mtime_ns: 0,
                target: None,
            };
            let result =
                apply_changes(&tree, hostile(head).as_slice(), |_| Decision::Apply, |_, _| {}, |_| Ok(()));
            assert!(matches!(result, Err(ApplyError::Refused { .. })), "{path}: {result:?}");
        }
        assert_eq!(std::fs::read_dir(outside.path()).expect("ls").count(), 0, "nothing written outside");
    }

    #[test]
    fn the_budget_and_corrupt_streams_stop_the_apply() {
        let root = tempfile::tempdir().expect("tmp");
        let tree = Tree::new(root.path().into(), None);
        let head = RecordHead {
            path: "big".into(),
            kind: RecordKind::File,
            mode: 0o644,
            size: 10,
            mtime_ns: 0,
            target: None,
        };
        let result = apply_changes(
            &tree,
            hostile(head).as_slice(),
            |_| Decision::Apply,
            |_, _| {},
            |n| Err(format!("{n} bytes is over the limit")),
        );
        assert!(matches!(result, Err(ApplyError::TooLarge(_))), "{result:?}");
        let result = apply_changes(&tree, &b"garbage"[..], |_| Decision::Apply, |_, _| {}, |_| Ok(()));
        assert!(matches!(result, Err(ApplyError::Corrupt(_))), "{result:?}");
    }

    #[test]
    fn conflicts_move_aside_or_redirect() {
        let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
        write(a.path(), "f.txt", "local");
        write(b.path(), "f.txt", "remote");
        let (from, to) = (Tree::new(a.path().into(), None), Tree::new(b.path().into(), None));
        let changes = Changes { upserts: vec!["f.txt".into()], deletions: vec![] };
        let mut bytes = Vec::new();
        write_changes(&from, &changes, &mut bytes, |_, _| {}, |_| {}).expect("write");
        let (_, conflicts) = apply_changes(
            &to,
            bytes.as_slice(),
            |_| Decision::MoveAside("f.conflict.txt".into()),
            |_, _| {},
            |_| Ok(()),
        )
        .expect("apply");
        assert_eq!(conflicts, vec!["f.conflict.txt"]);
        assert_eq!(std::fs::read_to_string(b.path().join("f.txt")).expect("read"), "local");
        assert_eq!(std::fs::read_to_string(b.path().join("f.conflict.txt")).expect("read"), "remote");
    }
}
