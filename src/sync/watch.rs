//! Which paths of a tree changed, from inotify: one watch per directory,
//! added as directories appear, so nothing is ever rescanned while nothing
//! changes. The caller compares the reported paths with its manifest
//! ([`super::scan::Tree::changes`]); a path reported for our own write is
//! equal to its entry and drops out there.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::io::unix::AsyncFd;

use super::scan::Tree;

const EVENT_BUFFER: usize = 64 << 10;

/// What the watcher saw since the last call.
#[derive(Debug, Default)]
pub struct Batch {
    pub paths: BTreeSet<String>,
    /// The kernel dropped events (queue overflow): compare the whole tree.
    pub rescan: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && !self.rescan
    }

    pub fn merge(&mut self, other: Batch) {
        self.paths.extend(other.paths);
        self.rescan |= other.rescan;
    }
}

pub struct TreeWatcher {
    fd: AsyncFd<Inotify>,
    /// Watched directories, as paths relative to the root ("" = the root).
    dirs: HashMap<WatchDescriptor, String>,
    buffer: Vec<u8>,
}

fn mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DONT_FOLLOW
        | WatchMask::ONLYDIR
}

/// One event, copied out of the kernel's buffer.
struct Seen {
    wd: WatchDescriptor,
    mask: EventMask,
    name: Option<String>,
}

impl TreeWatcher {
    /// Watches every directory of `tree` (only the root for a single file).
    pub fn new(tree: &Tree) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        // Deprecated for types whose fd may close while registered; an
        // `Inotify` owns its fd and AsyncFd deregisters before dropping it.
        #[allow(deprecated)]
        let fd = AsyncFd::new(inotify)?;
        let mut watcher = Self { fd, dirs: HashMap::new(), buffer: vec![0; EVENT_BUFFER] };
        watcher.add_dir(tree, String::new())?;
        Ok(watcher)
    }

    /// Watches `dir` and, for a directory mount, every directory below it.
    /// Returns the entries found below `dir`: written before the watch
    /// existed, they raised no event of their own.
    fn add_dir(&mut self, tree: &Tree, dir: String) -> io::Result<Vec<String>> {
        let mut found = Vec::new();
        let mut pending = vec![dir];
        while let Some(dir) = pending.pop() {
            let full = if dir.is_empty() { tree.root.clone() } else { tree.root.join(&dir) };
            let wd = match self.fd.get_mut().watches().add(&full, mask()) {
                Ok(wd) => wd,
                // Removed meanwhile: its deletion is reported anyway.
                Err(error) if !dir.is_empty() => {
                    tracing::debug!(%error, dir, "cannot watch a directory");
                    continue;
                }
                Err(error) => return Err(watch_error(error)),
            };
            self.dirs.insert(wd, dir.clone());
            if tree.only.is_some() {
                return Ok(found);
            }
            let Ok(entries) = std::fs::read_dir(&full) else { continue };
            for item in entries.flatten() {
                let Ok(kind) = item.file_type() else { continue };
                let Some(name) = item.file_name().to_str().map(str::to_string) else { continue };
                let path = if dir.is_empty() { name } else { format!("{dir}/{name}") };
                if kind.is_dir() && tree.includes(&path, true) {
                    pending.push(path.clone());
                }
                found.push(path);
            }
        }
        Ok(found)
    }

    /// Waits until something changed, then returns all that is queued.
    pub async fn wait(&mut self, tree: &Tree) -> io::Result<Batch> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let buffer = &mut self.buffer;
            let read = guard.try_io(|fd| {
                let events = fd.get_mut().read_events(buffer)?;
                Ok(events
                    .map(|e| Seen {
                        wd: e.wd,
                        mask: e.mask,
                        name: e.name.and_then(OsStr::to_str).map(str::to_string),
                    })
                    .collect::<Vec<_>>())
            });
            drop(guard);
            match read {
                Ok(Ok(seen)) => {
                    let mut batch = self.handle(tree, seen);
                    batch.merge(self.drain(tree)?);
                    if !batch.is_empty() {
                        return Ok(batch);
                    }
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => {}
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => {}
            }
        }
    }

    /// Everything queued right now, without waiting: a barrier calls this to
    /// be sure that writes which have already returned are seen.
    pub fn drain(&mut self, tree: &Tree) -> io::Result<Batch> {
        let mut batch = Batch::default();
        loop {
            let seen: Vec<Seen> = match self.fd.get_mut().read_events(&mut self.buffer) {
                Ok(events) => events
                    .map(|e| Seen {
                        wd: e.wd,
                        mask: e.mask,
                        name: e.name.and_then(OsStr::to_str).map(str::to_string),
                    })
                    .collect(),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(batch),
                Err(error) => return Err(error),
            };
            if seen.is_empty() {
                return Ok(batch);
            }
            batch.merge(self.handle(tree, seen));
        }
    }

    fn handle(&mut self, tree: &Tree, seen: Vec<Seen>) -> Batch {
        let mut batch = Batch::default();
        for event in seen {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                // Lost events may include new directories: watch them too.
                if !batch.rescan {
                    if let Err(error) = self.add_dir(tree, String::new()) {
                        tracing::warn!(%error, "cannot watch the tree again after lost events");
                    }
                }
                batch.rescan = true;
                continue;
            }
            if event.mask.contains(EventMask::IGNORED) {
                self.dirs.remove(&event.wd);
                continue;
            }
            let (Some(dir), Some(name)) = (self.dirs.get(&event.wd), event.name) else { continue };
            let path = if dir.is_empty() { name } else { format!("{dir}/{name}") };
            let is_dir = event.mask.contains(EventMask::ISDIR);
            if !tree.includes(&path, is_dir) {
                continue;
            }
            if is_dir && event.mask.contains(EventMask::MOVED_FROM) {
                // Its watches would report paths under the old name.
                self.forget_below(&path);
            }
            if is_dir && (event.mask.contains(EventMask::CREATE) || event.mask.contains(EventMask::MOVED_TO))
            {
                match self.add_dir(tree, path.clone()) {
                    // Reported as possibly changed; what only echoes a push
                    // matches the manifest and drops out.
                    Ok(found) => batch.paths.extend(found.into_iter().filter(|p| tree.includes(p, false))),
                    Err(error) => {
                        tracing::warn!(%error, path, "cannot watch a new directory");
                        batch.rescan = true;
                    }
                }
            }
            batch.paths.insert(path);
        }
        batch
    }

    fn forget_below(&mut self, path: &str) {
        let prefix = format!("{path}/");
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, dir)| *dir == path || dir.starts_with(&prefix))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.fd.get_mut().watches().remove(wd);
        }
    }
}

fn watch_error(error: io::Error) -> io::Error {
    // ENOSPC from inotify_add_watch means the per-user watch limit, not disk.
    if error.raw_os_error() == Some(28) {
        return io::Error::other(
            "the inotify watch limit is reached; raise fs.inotify.max_user_watches (sysctl) or add an .offloadignore",
        );
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(watcher: &mut TreeWatcher, tree: &Tree) -> Batch {
        tokio::time::timeout(Duration::from_secs(5), watcher.wait(tree))
            .await
            .expect("no event")
            .expect("watch")
    }

    #[tokio::test]
    async fn reports_edits_new_directories_and_their_contents() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("a")).expect("mkdir");
        let tree = Tree::new(dir.path().into(), None);
        let mut watcher = TreeWatcher::new(&tree).expect("watch");
        std::fs::write(dir.path().join("a/f.txt"), "x").expect("write");
        let batch = next(&mut watcher, &tree).await;
        assert!(batch.paths.contains("a/f.txt"), "{batch:?}");
        std::fs::create_dir(dir.path().join("new")).expect("mkdir");
        let batch = next(&mut watcher, &tree).await;
        assert!(batch.paths.contains("new"), "{batch:?}");
        std::fs::write(dir.path().join("new/g.txt"), "y").expect("write");
        let batch = next(&mut watcher, &tree).await;
        assert!(batch.paths.contains("new/g.txt"), "a new directory is watched: {batch:?}");
    }

    #[tokio::test]
    async fn files_made_in_a_new_directory_before_its_watch_are_reported() {
        let dir = tempfile::tempdir().expect("tmp");
        let tree = Tree::new(dir.path().into(), None);
        let mut watcher = TreeWatcher::new(&tree).expect("watch");
        // Both happen before the watcher reads (it pauses during pushes):
        // the file raises no event, as its directory had no watch yet.
        std::fs::create_dir(dir.path().join("new")).expect("mkdir");
        std::fs::write(dir.path().join("new/early.txt"), "x").expect("write");
        let batch = next(&mut watcher, &tree).await;
        assert!(batch.paths.contains("new/early.txt"), "{batch:?}");
    }

    #[tokio::test]
    async fn lost_events_still_leave_new_directories_watched() {
        let queue: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(16384);
        let dir = tempfile::tempdir().expect("tmp");
        let tree = Tree::new(dir.path().into(), None);
        let mut watcher = TreeWatcher::new(&tree).expect("watch");
        // Enough events to fill the kernel's queue while nobody reads (each
        // write is at least create + close), then a directory whose creation
        // is lost with the overflow.
        for index in 0..queue / 2 + 64 {
            std::fs::write(dir.path().join(format!("f{index}")), "x").expect("write");
        }
        std::fs::create_dir(dir.path().join("late")).expect("mkdir");
        let batch = watcher.drain(&tree).expect("drain");
        assert!(batch.rescan, "the queue overflowed: {} paths", batch.paths.len());
        assert!(watcher.drain(&tree).expect("drain").is_empty());
        std::fs::write(dir.path().join("late/g.txt"), "y").expect("write");
        let batch = next(&mut watcher, &tree).await;
        assert!(batch.paths.contains("late/g.txt"), "the new directory is watched: {batch:?}");
    }

    #[tokio::test]
    async fn drain_sees_writes_that_already_returned() {
        let dir = tempfile::tempdir().expect("tmp");
        let tree = Tree::new(dir.path().into(), Some("only.txt".into()));
        let mut watcher = TreeWatcher::new(&tree).expect("watch");
        std::fs::write(dir.path().join("other.txt"), "x").expect("write");
        std::fs::write(dir.path().join("only.txt"), "x").expect("write");
        let batch = watcher.drain(&tree).expect("drain");
        assert_eq!(batch.paths.into_iter().collect::<Vec<_>>(), vec!["only.txt"]);
        assert!(watcher.drain(&tree).expect("drain").is_empty());
    }
}
