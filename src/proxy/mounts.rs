//! Bind mounts that see the user's files on a remote engine: each local
//! source is mirrored to a copy the agent keeps, before the create request
//! that names it reaches the engine, and kept in step both ways while the
//! proxy runs (inotify here, inotify there, debounced by milliseconds).
//!
//! Barriers keep anyone from seeing stale files: [`Mounts::flush`] sends
//! pending local edits (before start, restart, exec), [`Mounts::pull`] brings
//! the container's writes back (before a `wait` answer reaches the client).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};
use crate::docker::binds::{rewrite_container_create, rewrite_volume_create, BindForm, HostPath};
use crate::lifecycle::Lifecycle;
use crate::link::protocol::BACKGROUND;
use crate::sync::manifest::{conflict_name, diff, Entry, Kind, Manifest};
use crate::sync::scan::{children, Tree};
use crate::sync::stream::{apply_changes, write_changes, Decision, RecordKind, Totals};
use crate::sync::watch::{Batch, TreeWatcher};
use crate::sync::{bridge, MountInfo, MountRequest, PushReport};
use crate::upstream::{FailureKind, Upstream};

const SYNC_PATH: &str = "/_offload/v1/sync/mounts";
/// Edits arriving this close together travel in one push.
const DEBOUNCE: Duration = Duration::from_millis(8);
/// ...but a steady stream of edits still goes out this often.
const MAX_DEBOUNCE: Duration = Duration::from_millis(100);
/// A sync that takes longer than this logs its progress.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);
const EVENTS_RETRY: Duration = Duration::from_secs(1);
/// How often mounts are checked for containers that still use them.
const UNUSED_CHECK: Duration = Duration::from_secs(15);
/// A mount a create named this recently is kept (its container may not exist yet).
const RECENT_USE: Duration = Duration::from_secs(10);

/// Why a create cannot go ahead; the text is the client's error message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct MountError {
    pub status: StatusCode,
    pub message: String,
}

fn mount_error(status: StatusCode, message: impl Into<String>) -> MountError {
    MountError { status, message: message.into() }
}

/// A local source: its directory, and the one file in it for a file bind.
type MountKey = (PathBuf, Option<String>);

pub struct Mounts {
    upstream: Arc<dyn Upstream>,
    lifecycle: Lifecycle,
    /// This proxy's own socket: a bind of it means the remote engine's.
    own_socket: PathBuf,
    /// By local source (root directory, single file name).
    table: Mutex<HashMap<MountKey, Arc<LocalMount>>>,
    check_now: Notify,
    /// Ignore rules for every mount (`--ignore`, the config file's `ignore`).
    ignore: Vec<String>,
}

struct LocalMount {
    /// The source as the user named it, for messages and answers.
    local_source: String,
    tree: Mutex<Tree>,
    manifest: Mutex<Manifest>,
    remote: Mutex<Remote>,
    commands: mpsc::Sender<Command>,
    stop: CancellationToken,
    /// Containers created with this mount; sync stops when none exists.
    containers: Mutex<HashSet<String>>,
    /// Used by a volume: kept while the proxy runs.
    pinned: AtomicBool,
    /// When a create last named it.
    last_used: Mutex<Instant>,
    stats: Mutex<MountStats>,
}

/// What `offload status` shows per mount.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct MountStats {
    /// Local changes seen and not yet sent.
    pending: usize,
    pushes: u64,
    pulls: u64,
    bytes_sent: u64,
    last_sync_unix: u64,
    last_error: Option<String>,
}

/// A create body with its bind sources pointed at synced copies.
#[derive(Default)]
pub struct Rewritten {
    /// `None`: nothing to change (or not JSON: the engine's own error comes back).
    pub body: Option<Vec<u8>>,
    mounts: Vec<Arc<LocalMount>>,
}

impl Rewritten {
    /// Whether the create named no synced mount.
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }
}

#[derive(Clone, Default)]
struct Remote {
    session_id: String,
    mount_id: String,
    root: String,
    /// A push failed half way: the next barrier registers again (a full compare).
    stale: bool,
}

enum Command {
    Flush(oneshot::Sender<()>),
    Pull(oneshot::Sender<()>),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Mounts {
    pub fn new(
        upstream: Arc<dyn Upstream>,
        lifecycle: Lifecycle,
        own_socket: PathBuf,
        ignore: Vec<String>,
    ) -> Arc<Self> {
        let mounts = Arc::new(Self {
            upstream,
            lifecycle: lifecycle.clone(),
            own_socket,
            ignore,
            table: Mutex::new(HashMap::new()),
            check_now: Notify::new(),
        });
        lifecycle.spawn(mounts.clone().retire_unused());
        mounts
    }

    fn mounts(&self) -> Vec<Arc<LocalMount>> {
        lock(&self.table).values().cloned().collect()
    }

    /// Rewrites a container-create body: every local bind source becomes its
    /// synced remote copy (synced before this returns). `Ok(None)`: nothing
    /// to rewrite (or not JSON: the engine's own error comes back).
    pub async fn rewrite_create(&self, body: &[u8], volume: bool) -> Result<Rewritten, MountError> {
        let mut rewritten = Rewritten::default();
        let Ok(mut parsed) = serde_json::from_slice::<serde_json::Value>(body) else { return Ok(rewritten) };
        let found = if volume {
            crate::docker::binds::volume_host_paths(&parsed)
        } else {
            crate::docker::binds::container_host_paths(&parsed)
        };
        if found.is_empty() {
            return Ok(rewritten);
        }
        let mut remote_paths = HashMap::new();
        for host_path in &found {
            if !remote_paths.contains_key(&host_path.path) {
                let (remote, mount) = self.remote_path(host_path).await?;
                remote_paths.insert(host_path.path.clone(), remote);
                if let Some(mount) = mount {
                    if volume {
                        // A volume outlives any container: it keeps its mount.
                        mount.pinned.store(true, Ordering::Relaxed);
                    }
                    rewritten.mounts.push(mount);
                }
            }
        }
        let visit = |p: &HostPath| remote_paths.get(&p.path).cloned();
        let changed = if volume {
            rewrite_volume_create(&mut parsed, visit)
        } else {
            rewrite_container_create(&mut parsed, visit)
        };
        if changed {
            rewritten.body = Some(
                serde_json::to_vec(&parsed)
                    .map_err(|e| mount_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
            );
        }
        Ok(rewritten)
    }

    /// Records that a created container uses the mounts its create named.
    pub fn used_by(&self, rewritten: &Rewritten, container_id: &str) {
        for mount in &rewritten.mounts {
            lock(&mount.containers).insert(container_id.to_string());
        }
    }

    /// Looks for unused mounts now (a container was removed through us).
    pub fn check_unused(&self) {
        self.check_now.notify_one();
    }

    /// Stops syncing mounts that no existing container uses any more (after
    /// one last pull: the container's final writes still come back).
    async fn retire_unused(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.lifecycle.token.cancelled() => return,
                _ = self.check_now.notified() => {}
                _ = tokio::time::sleep(UNUSED_CHECK) => {}
            }
            for mount in self.mounts() {
                if lock(&mount.remote).stale && lock(&mount.last_used).elapsed() >= RECENT_USE {
                    // Its session ended: nothing to sync with any more.
                    lock(&self.table).retain(|_, m| !Arc::ptr_eq(m, &mount));
                    mount.stop.cancel();
                    continue;
                }
                let containers: Vec<String> = lock(&mount.containers).iter().cloned().collect();
                // A create naming the mount may still be on its way.
                let recent = containers.is_empty() && lock(&mount.last_used).elapsed() < RECENT_USE;
                if mount.pinned.load(Ordering::Relaxed) || recent {
                    continue;
                }
                for id in containers {
                    let path = format!("/containers/{id}/json");
                    if let Ok((StatusCode::NOT_FOUND, _)) =
                        call(self.upstream.as_ref(), Method::GET, &path, body::empty(), true).await
                    {
                        lock(&mount.containers).remove(&id);
                    }
                }
                let retired = {
                    let mut table = lock(&self.table);
                    // A create that is using the mount right now bumped `last_used`.
                    let idle = lock(&mount.last_used).elapsed() >= RECENT_USE;
                    let unused = idle && lock(&mount.containers).is_empty();
                    if unused {
                        table.retain(|_, m| !Arc::ptr_eq(m, &mount));
                    }
                    unused
                };
                if retired {
                    mount.pull().await;
                    mount.stop.cancel();
                    tracing::info!(source = %mount.local_source, "no container uses the mount any more; sync stopped");
                }
            }
        }
    }

    /// Where a local path is on the remote: the engine's socket for a docker
    /// socket bind, else a synced copy.
    async fn remote_path(
        &self,
        host_path: &HostPath,
    ) -> Result<(String, Option<Arc<LocalMount>>), MountError> {
        let source = Path::new(&host_path.path);
        if source == Path::new("/var/run/docker.sock")
            || source == Path::new("/run/docker.sock")
            || source == self.own_socket
        {
            let session = self
                .upstream
                .session_info()
                .await
                .map_err(|e| mount_error(StatusCode::BAD_GATEWAY, e.user_message()))?;
            let socket = session.and_then(|s| s.engine_socket.clone());
            return Ok((socket.unwrap_or_else(|| "/var/run/docker.sock".to_string()), None));
        }
        let meta = match std::fs::metadata(source) {
            Ok(meta) => meta,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                if host_path.form != BindForm::Binds {
                    // The engine's own wording, with the path the user knows.
                    return Err(mount_error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "invalid mount config for type \"bind\": bind source path does not exist: {}",
                            host_path.path
                        ),
                    ));
                }
                // `-v` creates a missing source, as the engine does on its host.
                std::fs::create_dir_all(source).map_err(|e| {
                    mount_error(
                        StatusCode::BAD_REQUEST,
                        format!("offload cannot create the bind source {}: {e}", host_path.path),
                    )
                })?;
                std::fs::metadata(source).map_err(|e| mount_error(StatusCode::BAD_REQUEST, e.to_string()))?
            }
            Err(error) => {
                return Err(mount_error(
                    StatusCode::BAD_REQUEST,
                    format!("offload cannot read the bind source {}: {error}", host_path.path),
                ))
            }
        };
        // Binds follow symlinks on the engine's host; so do we, here.
        let real = std::fs::canonicalize(source)
            .map_err(|e| mount_error(StatusCode::BAD_REQUEST, format!("{}: {e}", host_path.path)))?;
        let (root, only) = if meta.is_dir() {
            (real, None)
        } else if meta.is_file() {
            let name = real.file_name().and_then(|n| n.to_str()).map(str::to_string);
            match (real.parent(), name) {
                (Some(parent), Some(name)) => (parent.to_path_buf(), Some(name)),
                _ => {
                    return Err(mount_error(
                        StatusCode::BAD_REQUEST,
                        format!("cannot sync {}", host_path.path),
                    ))
                }
            }
        } else {
            return Err(mount_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "offload cannot bind {} on a remote engine: only directories and regular files are synced \
                     (sockets and devices live on one machine)",
                    host_path.path
                ),
            ));
        };
        let mount = self.mount(root, only, &host_path.path).await?;
        let remote = lock(&mount.remote).clone();
        let path = match &lock(&mount.tree).only {
            Some(name) => format!("{}/{name}", remote.root),
            None => remote.root,
        };
        Ok((path, Some(mount)))
    }

    /// The mount for a source: registered and fully synced, and flushed if
    /// it existed already.
    async fn mount(
        &self,
        root: PathBuf,
        only: Option<String>,
        named: &str,
    ) -> Result<Arc<LocalMount>, MountError> {
        let key = (root.clone(), only.clone());
        let existing = {
            // Under the table's lock, so the unused check cannot retire it now.
            let table = lock(&self.table);
            let existing = table.get(&key).cloned();
            if let Some(mount) = &existing {
                *lock(&mount.last_used) = Instant::now();
            }
            existing
        };
        if let Some(mount) = existing {
            if self.current(&mount).await? {
                mount.flush().await;
                return Ok(mount);
            }
        }
        let tree = Tree::with_rules(root, only, self.ignore.clone());
        // Watch first: an edit during the initial sync is then not lost.
        let watcher = TreeWatcher::new(&tree).map_err(|e| {
            mount_error(StatusCode::INTERNAL_SERVER_ERROR, format!("offload cannot watch {named}: {e}"))
        })?;
        let (commands, command_queue) = mpsc::channel(16);
        let mount = Arc::new(LocalMount {
            local_source: named.to_string(),
            tree: Mutex::new(tree),
            manifest: Mutex::new(Manifest::new()),
            remote: Mutex::new(Remote::default()),
            commands,
            stop: self.lifecycle.token.child_token(),
            containers: Mutex::new(HashSet::new()),
            pinned: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
            stats: Mutex::new(MountStats::default()),
        });
        self.register(&mount).await?;
        if let Some(old) = lock(&self.table).insert(key, mount.clone()) {
            old.stop.cancel();
        }
        let (remote_changed, remote_events) = watch::channel(0u64);
        self.lifecycle.spawn(follow_remote(self.upstream.clone(), mount.clone(), remote_changed));
        self.lifecycle.spawn(run_mount(
            self.upstream.clone(),
            mount.clone(),
            watcher,
            command_queue,
            remote_events,
        ));
        Ok(mount)
    }

    /// Whether a mount's registration belongs to the link's current session.
    async fn current(&self, mount: &LocalMount) -> Result<bool, MountError> {
        let session = self
            .upstream
            .session_info()
            .await
            .map_err(|e| mount_error(StatusCode::BAD_GATEWAY, e.user_message()))?;
        let remote = lock(&mount.remote).clone();
        Ok(!remote.stale && session.is_some_and(|s| s.session_id == remote.session_id))
    }

    /// Registers a mount with the agent and sends what the copy lacks.
    async fn register(&self, mount: &LocalMount) -> Result<(), MountError> {
        register(self.upstream.as_ref(), mount).await
    }

    /// Sends every mount's pending local edits; returns when they are applied.
    pub async fn flush(&self) {
        let mounts = self.mounts();
        futures_util::future::join_all(mounts.iter().map(|m| m.flush())).await;
    }

    /// Brings every mount's remote changes back; returns when they are here.
    pub async fn pull(&self) {
        let mounts = self.mounts();
        futures_util::future::join_all(mounts.iter().map(|m| m.pull())).await;
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.table).is_empty()
    }

    /// Each mount's state, for `offload status` (documented in ARCHITECTURE.md).
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        self.mounts()
            .iter()
            .map(|mount| {
                let (files, bytes) = {
                    let manifest = lock(&mount.manifest);
                    let files = manifest.values().filter(|e| e.kind == Kind::File).count();
                    (files, manifest.values().map(|e| e.size).sum::<u64>())
                };
                let remote = lock(&mount.remote).clone();
                let stats = lock(&mount.stats).clone();
                serde_json::json!({
                    "source": mount.local_source,
                    "remote": remote.root,
                    "files": files,
                    "bytes": bytes,
                    "pending": stats.pending,
                    "containers": lock(&mount.containers).len(),
                    "pushes": stats.pushes,
                    "pulls": stats.pulls,
                    "bytes_sent": stats.bytes_sent,
                    "last_sync_unix": stats.last_sync_unix,
                    "last_error": stats.last_error,
                })
            })
            .collect()
    }

    /// The local path a remote path of a synced copy stands for.
    pub fn local_path(&self, remote_path: &str) -> Option<String> {
        for mount in self.mounts() {
            let remote = lock(&mount.remote).clone();
            if remote.root.is_empty() {
                continue;
            }
            let only = lock(&mount.tree).only.clone();
            let copy = match &only {
                Some(name) => format!("{}/{name}", remote.root),
                None => remote.root.clone(),
            };
            if remote_path == copy {
                return Some(mount.local_source.clone());
            }
            if let Some(rest) = remote_path.strip_prefix(&copy).filter(|r| r.starts_with('/')) {
                return Some(format!("{}{rest}", mount.local_source.trim_end_matches('/')));
            }
        }
        None
    }
}

impl LocalMount {
    async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.commands.send(Command::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }

    async fn pull(&self) {
        let (done, pulled) = oneshot::channel();
        if self.commands.send(Command::Pull(done)).await.is_ok() {
            let _ = pulled.await;
        }
    }
}

async fn register(upstream: &dyn Upstream, mount: &LocalMount) -> Result<(), MountError> {
    let started = Instant::now();
    let tree = lock(&mount.tree).clone();
    let asked = MountRequest {
        local_path: tree.root.to_string_lossy().into_owned(),
        only: tree.only.clone(),
        ignore: tree.extra_rules.clone(),
    };
    let json = serde_json::to_vec(&asked)
        .map_err(|e| mount_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (status, answer) = call(upstream, Method::POST, SYNC_PATH, body::full(json), false)
        .await
        .map_err(|e| mount_error(StatusCode::BAD_GATEWAY, e))?;
    if !status.is_success() {
        return Err(mount_error(status, agent_message(&answer, "the agent refused the mount")));
    }
    let info: MountInfo = serde_json::from_slice(&answer)
        .map_err(|e| mount_error(StatusCode::BAD_GATEWAY, format!("the agent's mount answer: {e}")))?;
    let session =
        upstream.session_info().await.ok().flatten().map(|s| s.session_id.clone()).unwrap_or_default();
    *lock(&mount.remote) = Remote {
        session_id: session,
        mount_id: info.mount_id.clone(),
        root: info.remote_root.clone(),
        stale: false,
    };
    let scan_tree = tree.clone();
    let local = tokio::task::spawn_blocking(move || scan_tree.scan())
        .await
        .map_err(|e| mount_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            mount_error(StatusCode::BAD_REQUEST, format!("offload cannot read {}: {e}", mount.local_source))
        })?;
    let changes = diff(&local, &info.manifest);
    let entries = local.len();
    *lock(&mount.manifest) = local;
    let changed = changes.upserts.len() + changes.deletions.len();
    let bytes_before = lock(&mount.stats).bytes_sent;
    if !changes.is_empty() {
        push(upstream, mount, changes).await.map_err(|e| mount_error(StatusCode::BAD_GATEWAY, e))?;
    }
    tracing::info!(
        source = %mount.local_source,
        remote = %info.remote_root,
        entries,
        changed,
        bytes_sent = lock(&mount.stats).bytes_sent - bytes_before,
        took_ms = started.elapsed().as_millis() as u64,
        "bind mount synced"
    );
    Ok(())
}

/// Sends `changes` of a mount; the manifest records each path as sent.
async fn push(
    upstream: &dyn Upstream,
    mount: &LocalMount,
    changes: crate::sync::manifest::Changes,
) -> Result<(), String> {
    let tree = lock(&mount.tree).clone();
    let remote = lock(&mount.remote).clone();
    let started = Instant::now();
    let (sent_entries, mut sent_entries_rx) = mpsc::unbounded_channel::<(String, Option<Entry>)>();
    let source = mount.local_source.clone();
    let (request_body, written) = bridge::blocking_body(move |out| {
        let mut last_report = Instant::now();
        write_changes(
            &tree,
            &changes,
            out,
            |path, entry| {
                let _ = sent_entries.send((path.to_string(), entry));
            },
            |totals: Totals| {
                if started.elapsed() > PROGRESS_AFTER && last_report.elapsed() > PROGRESS_AFTER {
                    last_report = Instant::now();
                    let rate = totals.bytes as f64 / started.elapsed().as_secs_f64() / 1048576.0;
                    tracing::info!(source = %source, files = totals.files, bytes = totals.bytes, mib_per_s = format!("{rate:.1}"), "syncing");
                }
            },
        )
    });
    let path = format!("{SYNC_PATH}/{}/push", remote.mount_id);
    let result = call(upstream, Method::POST, &path, request_body, false).await;
    let totals = written.await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()));
    let (status, answer) = match result {
        Ok(answer) => answer,
        Err(error) => {
            lock(&mount.remote).stale = true;
            return Err(error);
        }
    };
    if !status.is_success() {
        lock(&mount.remote).stale = true;
        return Err(agent_message(&answer, "the agent did not apply the sync"));
    }
    {
        let mut manifest = lock(&mount.manifest);
        while let Ok((path, entry)) = sent_entries_rx.try_recv() {
            record(&mut manifest, &path, entry);
        }
    }
    let report: PushReport = serde_json::from_slice(&answer).unwrap_or_default();
    {
        let mut stats = lock(&mount.stats);
        stats.pushes += 1;
        stats.bytes_sent += report.bytes;
        stats.last_sync_unix = unix_now();
        stats.last_error = None;
    }
    for conflict in &report.conflicts {
        tracing::warn!(
            source = %mount.local_source,
            kept_as = %conflict,
            "a file changed here and in the container at once: your version wins; the container's is kept beside it"
        );
    }
    if let Ok(totals) = totals {
        if started.elapsed() > PROGRESS_AFTER {
            tracing::info!(source = %mount.local_source, files = totals.files, bytes = totals.bytes, secs = started.elapsed().as_secs_f64(), "sync done");
        }
    }
    Ok(())
}

fn record(manifest: &mut Manifest, path: &str, entry: Option<Entry>) {
    let below: Vec<String> = children(manifest, path).collect();
    match entry {
        Some(entry) => {
            if entry.kind != Kind::Dir {
                for child in below {
                    manifest.remove(&child);
                }
            }
            manifest.insert(path.to_string(), entry);
        }
        None => {
            for child in below {
                manifest.remove(&child);
            }
            manifest.remove(path);
        }
    }
}

/// Applies the container's changes here. A file the user changed too (not
/// yet sent) keeps the user's version; the container's is written beside it.
async fn pull(upstream: &dyn Upstream, mount: &Arc<LocalMount>) -> Result<(), String> {
    let remote = lock(&mount.remote).clone();
    let path = format!("{SYNC_PATH}/{}/pull", remote.mount_id);
    let request = sync_request(Method::POST, &path, body::empty(), false)?;
    let exchange = upstream.send(request).await.map_err(|e| e.user_message())?;
    let (head, response_body) = exchange.response.into_parts();
    if !head.status.is_success() {
        let answer =
            Limited::new(response_body, 64 << 10).collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        if head.status == StatusCode::NOT_FOUND {
            lock(&mount.remote).stale = true;
        }
        return Err(agent_message(&answer, "the agent did not send the container's changes"));
    }
    let tree = lock(&mount.tree).clone();
    let shared = mount.clone();
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let applied = bridge::consume_blocking(response_body, move |input| {
        apply_changes(
            &tree,
            input,
            |head| {
                let manifest = lock(&shared.manifest);
                let current = tree.stat(&head.path);
                let known = manifest.get(&head.path);
                let agreed = match (&current, known) {
                    (Some(current), Some(known)) => known.same_as(current),
                    (None, None) => true,
                    _ => false,
                };
                let both_dirs =
                    current.as_ref().is_some_and(|c| c.kind == Kind::Dir) && head.kind == RecordKind::Dir;
                if agreed || both_dirs {
                    Decision::Apply
                } else if head.kind == RecordKind::Delete {
                    Decision::Skip
                } else {
                    Decision::Redirect(conflict_name(&head.path, stamp))
                }
            },
            |path, entry| record(&mut lock(&shared.manifest), path, entry),
            |_| Ok(()),
        )
    })
    .await
    .map_err(|e| e.to_string())?;
    let (_, conflicts) = applied.map_err(|e| e.to_string())?;
    {
        let mut stats = lock(&mount.stats);
        stats.pulls += 1;
        stats.last_sync_unix = unix_now();
        stats.last_error = None;
    }
    for conflict in conflicts {
        tracing::warn!(
            source = %mount.local_source,
            kept_as = %conflict,
            "a file changed here and in the container at once: your version wins; the container's is kept beside it"
        );
    }
    Ok(())
}

/// One mount's sync loop: local edits go out (debounced), remote changes
/// come in, barriers are answered in order with both.
async fn run_mount(
    upstream: Arc<dyn Upstream>,
    mount: Arc<LocalMount>,
    mut watcher: TreeWatcher,
    mut commands: mpsc::Receiver<Command>,
    mut remote_events: watch::Receiver<u64>,
) {
    let mut pending = Batch::default();
    loop {
        let tree = lock(&mount.tree).clone();
        tokio::select! {
            _ = mount.stop.cancelled() => break,
            batch = watcher.wait(&tree) => {
                match batch {
                    Ok(batch) => pending.merge(batch),
                    Err(error) => {
                        tracing::warn!(%error, source = %mount.local_source, "watching local files failed; sync stopped");
                        break;
                    }
                }
                settle(&mut watcher, &tree, &mut pending).await;
                send_pending(upstream.as_ref(), &mount, &tree, &mut pending).await;
            }
            command = commands.recv() => match command {
                None => break,
                Some(Command::Flush(done)) => {
                    if let Ok(batch) = watcher.drain(&tree) {
                        pending.merge(batch);
                    }
                    send_pending(upstream.as_ref(), &mount, &tree, &mut pending).await;
                    let _ = done.send(());
                }
                Some(Command::Pull(done)) => {
                    receive(upstream.as_ref(), &mount).await;
                    let _ = done.send(());
                }
            },
            changed = remote_events.changed() => {
                if changed.is_err() {
                    break;
                }
                receive(upstream.as_ref(), &mount).await;
            }
        }
    }
}

/// Waits until edits stop arriving for a moment (or a cap passes), so a
/// save that writes in several steps goes out as one change.
async fn settle(watcher: &mut TreeWatcher, tree: &Tree, pending: &mut Batch) {
    let started = Instant::now();
    while started.elapsed() < MAX_DEBOUNCE {
        tokio::time::sleep(DEBOUNCE).await;
        match watcher.drain(tree) {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => pending.merge(batch),
            Err(_) => break,
        }
    }
}

async fn send_pending(upstream: &dyn Upstream, mount: &LocalMount, tree: &Tree, pending: &mut Batch) {
    if pending.paths.contains(crate::sync::ignore::IGNORE_FILE) {
        lock(&mount.tree).reload_ignore();
    }
    if lock(&mount.remote).stale {
        pending.rescan = false;
        pending.paths.clear();
        if let Err(error) = register(upstream, mount).await {
            tracing::warn!(source = %mount.local_source, %error, "cannot sync the mount again");
        }
        return;
    }
    let batch = std::mem::take(pending);
    let changes = {
        let manifest = lock(&mount.manifest);
        if batch.rescan {
            match tree.scan() {
                Ok(now) => diff(&now, &manifest),
                Err(_) => return,
            }
        } else {
            tree.changes(&manifest, &batch.paths)
        }
    };
    if changes.is_empty() {
        return;
    }
    lock(&mount.stats).pending = changes.upserts.len() + changes.deletions.len();
    let result = push(upstream, mount, changes).await;
    lock(&mount.stats).pending = 0;
    if let Err(error) = result {
        tracing::warn!(source = %mount.local_source, %error, "sync to the remote failed; retrying at the next change");
        lock(&mount.stats).last_error = Some(error);
    }
}

async fn receive(upstream: &dyn Upstream, mount: &Arc<LocalMount>) {
    if lock(&mount.remote).stale {
        return;
    }
    if let Err(error) = pull(upstream, mount).await {
        tracing::warn!(source = %mount.local_source, %error, "bringing the container's changes back failed");
        lock(&mount.stats).last_error = Some(error);
    }
}

/// Follows the agent's change notifications for one mount (a background
/// stream: it is not the user's activity), reconnecting while the mount lives.
const GONE: &str = "gone";

async fn follow_remote(upstream: Arc<dyn Upstream>, mount: Arc<LocalMount>, changed: watch::Sender<u64>) {
    loop {
        let remote = lock(&mount.remote).clone();
        let path = format!("{SYNC_PATH}/{}/events", remote.mount_id);
        let stream = async {
            let request = sync_request(Method::GET, &path, body::empty(), true)?;
            let exchange = match upstream.send(request).await {
                Ok(exchange) => exchange,
                Err(error) if error.kind == FailureKind::SessionEnded => return Err(GONE.to_string()),
                Err(error) => return Err(error.user_message()),
            };
            if exchange.response.status() == StatusCode::NOT_FOUND {
                return Err(GONE.to_string());
            }
            if !exchange.response.status().is_success() {
                return Err(format!("the agent answered {}", exchange.response.status()));
            }
            let mut events = exchange.response.into_body();
            while let Some(frame) = events.frame().await {
                frame.map_err(|e| e.to_string())?;
                changed.send_modify(|g| *g += 1);
            }
            Ok::<(), String>(())
        };
        tokio::select! {
            _ = mount.stop.cancelled() => return,
            result = stream => match result {
                // The session (and with it the copy) is gone: a later create
                // syncs the mount afresh; until then nothing is followed.
                Err(error) if error == GONE => {
                    lock(&mount.remote).stale = true;
                    tracing::info!(source = %mount.local_source, "the session ended; the mount is no longer synced");
                    return;
                }
                Err(error) => tracing::debug!(%error, source = %mount.local_source, "the remote change stream ended"),
                Ok(()) => {}
            },
        }
        tokio::select! {
            _ = mount.stop.cancelled() => return,
            _ = tokio::time::sleep(EVENTS_RETRY) => {}
        }
        // After a reconnect, anything missed meanwhile comes with one pull.
        changed.send_modify(|g| *g += 1);
    }
}

fn sync_request(
    method: Method,
    path: &str,
    request_body: Body,
    background: bool,
) -> Result<Request<Body>, String> {
    let mut request =
        Request::builder().method(method).uri(path).body(request_body).map_err(|e| e.to_string())?;
    request.headers_mut().insert(header::HOST, HeaderValue::from_static("docker"));
    if background {
        request.headers_mut().insert(BACKGROUND, HeaderValue::from_static("1"));
    }
    Ok(request)
}

/// One request to the agent's sync endpoints; the answer's status and body.
async fn call(
    upstream: &dyn Upstream,
    method: Method,
    path: &str,
    request_body: Body,
    background: bool,
) -> Result<(StatusCode, bytes::Bytes), String> {
    let request = sync_request(method, path, request_body, background)?;
    let exchange = upstream.send(request).await.map_err(|e| e.user_message())?;
    let status = exchange.response.status();
    let answer = Limited::new(exchange.response.into_body(), 64 << 20)
        .collect()
        .await
        .map_err(|e| format!("reading the agent's answer: {e}"))?
        .to_bytes();
    Ok((status, answer))
}

fn agent_message(answer: &[u8], fallback: &str) -> String {
    serde_json::from_slice::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| fallback.to_string())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
