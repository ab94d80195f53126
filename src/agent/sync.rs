//! The agent's half of bind-mount sync: one copy per mount under the
//! session's sync root, kept in step with the proxy over four endpoints
//! (`/_offload/v1/sync/mounts[/{id}/push|pull|events]`), and the check that
//! a container may bind only what the session synced or what is allowed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::session::Session;
use crate::body::{self, Body};
use crate::docker::binds::{container_host_paths, is_within, volume_host_paths};
use crate::docker::error::error_response;
use crate::sync::manifest::{conflict_name, Kind, Manifest};
use crate::sync::scan::{children, Tree};
use crate::sync::stream::{apply_changes, write_changes, ApplyError, Decision, RecordKind};
use crate::sync::watch::{Batch, TreeWatcher};
use crate::sync::{bridge, ignore::IGNORE_FILE, MountInfo, MountRequest, PushReport};

pub const SYNC_PREFIX: &str = "/_offload/v1/sync/mounts";

#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Each session's copies live in `<root>/<session id>/<mount id>`.
    pub root: PathBuf,
    /// Host paths a container may bind besides its session's copies
    /// (`--allow-host-path`; by default the engine's socket).
    pub allowed_host_paths: Vec<String>,
    /// The most file content one session may push (`--max-sync-bytes`).
    pub max_session_bytes: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            root: std::env::temp_dir().join("offload-sync"),
            allowed_host_paths: vec!["/var/run/docker.sock".into()],
            max_session_bytes: 20 << 30,
        }
    }
}

pub struct AgentSync {
    pub config: SyncConfig,
    sessions: Mutex<HashMap<String, SessionMounts>>,
}

#[derive(Default)]
struct SessionMounts {
    mounts: HashMap<String, Arc<RemoteMount>>,
    bytes: Arc<AtomicU64>,
}

struct RemoteMount {
    tree: Mutex<Tree>,
    manifest: Mutex<Manifest>,
    /// Paths the watcher reported that differ from the manifest.
    dirty: Mutex<Batch>,
    /// Bumped when `dirty` gains real changes; the events stream follows it.
    generation: watch::Sender<u64>,
    /// Asks the watcher task to read what the kernel has queued right now.
    drain: mpsc::Sender<oneshot::Sender<()>>,
    /// One push or pull at a time per mount.
    busy: tokio::sync::Mutex<()>,
    /// True while a push is applied. The watcher stops reading meanwhile:
    /// what it would read is mostly the push's own echo, and reading it made
    /// an initial sync of 10,000 files take 330 ms instead of 195. What else
    /// happened is still queued in the kernel afterwards, or, if the queue
    /// overflowed, found by a rescan.
    pushing: watch::Sender<bool>,
    stop: CancellationToken,
}

/// Marks a mount as being pushed to until dropped (also on error paths).
struct Pushing<'a>(&'a watch::Sender<bool>);

impl<'a> Pushing<'a> {
    fn start(flag: &'a watch::Sender<bool>) -> Self {
        flag.send_replace(true);
        Self(flag)
    }
}

impl Drop for Pushing<'_> {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AgentSync {
    pub fn new(config: SyncConfig) -> Self {
        Self { config, sessions: Mutex::new(HashMap::new()) }
    }

    fn session_root(&self, session_id: &str) -> PathBuf {
        self.config.root.join(session_id)
    }

    /// Stops a session's watchers and removes its copies.
    pub fn end_session(&self, session_id: &str) {
        if let Some(mounts) = lock(&self.sessions).remove(session_id) {
            for mount in mounts.mounts.values() {
                mount.stop.cancel();
            }
        }
        let root = self.session_root(session_id);
        match std::fs::remove_dir_all(&root) {
            Ok(()) => tracing::info!(session = session_id, "removed the session's synced copies"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(%error, root = %root.display(), "cannot remove synced copies"),
        }
    }

    /// Whether a rewritten create body binds only what it may: its session's
    /// copies or an allowed host path. `Err` says why not (a 403).
    pub fn check_create(&self, session_id: &str, body: &[u8], volume: bool) -> Result<(), String> {
        let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(body) else { return Ok(()) };
        let paths = if volume { volume_host_paths(&parsed) } else { container_host_paths(&parsed) };
        let own = resolved(&self.session_root(session_id).to_string_lossy());
        for found in paths {
            // Symlinks resolved: a container may have planted one in its copy.
            let path = resolved(&found.path);
            let allowed = is_within(&found.path, &own) && is_within(&path, &own)
                || self.config.allowed_host_paths.iter().any(|allowed| is_within(&path, &resolved(allowed)));
            if !allowed {
                return Err(format!(
                    "the offload agent refuses to bind the remote host path {}: only this session's synced \
                         mounts and the paths allowed with --allow-host-path may be bound. Bind local paths \
                         through the offload proxy, which syncs them",
                    found.path
                ));
            }
        }
        Ok(())
    }

    pub async fn handle(&self, session: &Arc<Session>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_string();
        let rest = path.strip_prefix(SYNC_PREFIX).unwrap_or_default();
        match (request.method(), rest.trim_start_matches('/').split_once('/')) {
            (&Method::POST, None) if rest.is_empty() => self.register(session, request).await,
            (method, Some((id, action))) => {
                let Some(mount) = self.mount(&session.id, id) else {
                    return error_response(
                        StatusCode::NOT_FOUND,
                        "no such synced mount in this session (did the session end?)",
                    );
                };
                match (method, action) {
                    (&Method::POST, "push") => self.push(&session.id, &mount, request).await,
                    (&Method::POST, "pull") => pull(&mount).await,
                    (&Method::GET, "events") => events(&mount),
                    _ => error_response(StatusCode::NOT_FOUND, "unknown sync endpoint"),
                }
            }
            _ => error_response(StatusCode::NOT_FOUND, "unknown sync endpoint"),
        }
    }

    fn mount(&self, session_id: &str, id: &str) -> Option<Arc<RemoteMount>> {
        lock(&self.sessions).get(session_id)?.mounts.get(id).cloned()
    }

    /// Creates (or finds) a mount's copy and answers with what it holds.
    async fn register(&self, session: &Arc<Session>, request: Request<Incoming>) -> Response<Body> {
        let bytes = match Limited::new(request.into_body(), 64 << 10).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                return error_response(StatusCode::BAD_REQUEST, &format!("unreadable mount request: {error}"))
            }
        };
        let asked: MountRequest = match serde_json::from_slice(&bytes) {
            Ok(asked) => asked,
            Err(error) => {
                return error_response(StatusCode::BAD_REQUEST, &format!("bad mount request: {error}"))
            }
        };
        if asked
            .only
            .as_deref()
            .is_some_and(|name| name.contains('/') || name == ".." || name == "." || name.is_empty())
        {
            return error_response(StatusCode::BAD_REQUEST, "a single-file mount names one file");
        }
        let mount_id = mount_id(&asked);
        let root = self.session_root(&session.id).join(&mount_id);
        if let Err(error) = std::fs::create_dir_all(&root) {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("the agent cannot create {}: {error}", root.display()),
            );
        }
        let tree = Tree::with_rules(root.clone(), asked.only.clone(), asked.ignore.clone());
        let manifest = match tree.scan() {
            Ok(manifest) => manifest,
            Err(error) => {
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("scanning the copy: {error}"),
                )
            }
        };
        let existing = self.mount(&session.id, &mount_id);
        match existing {
            // The proxy registers again after a restart: the disk is the truth.
            Some(mount) => *lock(&mount.manifest) = manifest.clone(),
            None => {
                let watcher = match TreeWatcher::new(&tree) {
                    Ok(watcher) => watcher,
                    Err(error) => {
                        return error_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &format!("watching the copy: {error}"),
                        )
                    }
                };
                let (drain, drain_requests) = mpsc::channel(4);
                let mount = Arc::new(RemoteMount {
                    tree: Mutex::new(tree.clone()),
                    manifest: Mutex::new(manifest.clone()),
                    dirty: Mutex::new(Batch::default()),
                    generation: watch::channel(0).0,
                    drain,
                    busy: tokio::sync::Mutex::new(()),
                    pushing: watch::channel(false).0,
                    stop: CancellationToken::new(),
                });
                tokio::spawn(watch_copy(mount.clone(), watcher, drain_requests));
                lock(&self.sessions)
                    .entry(session.id.clone())
                    .or_default()
                    .mounts
                    .insert(mount_id.clone(), mount);
                tracing::info!(session = %session.id, mount = %mount_id, local = %asked.local_path, "synced mount registered");
            }
        }
        let info = MountInfo { mount_id, remote_root: root.to_string_lossy().into_owned(), manifest };
        json_response(serde_json::to_vec(&info).unwrap_or_default())
    }

    /// Applies the proxy's changes. A file the container changed since the
    /// last pull and the user changed too: the user's version wins, the
    /// container's is kept beside it under a conflict name.
    async fn push(
        &self,
        session_id: &str,
        mount: &Arc<RemoteMount>,
        request: Request<Incoming>,
    ) -> Response<Body> {
        let used = lock(&self.sessions).get(session_id).map(|s| s.bytes.clone()).unwrap_or_default();
        let limit = self.config.max_session_bytes;
        let mount = mount.clone();
        // The guards live in a task of their own: a push whose client went
        // away still ends applying before the watcher or a pull go on.
        let applying = tokio::spawn(async move {
            let _busy = mount.busy.lock().await;
            let _pushing = Pushing::start(&mount.pushing);
            let tree = lock(&mount.tree).clone();
            let shared = mount.clone();
            bridge::consume_blocking(request.into_body(), move |input| {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            apply_changes(
                &tree,
                input,
                |head| {
                    let manifest = lock(&shared.manifest);
                    let Some(current) = tree.stat(&head.path) else { return Decision::Apply };
                    let agreed = manifest.get(&head.path).is_some_and(|known| known.same_as(&current));
                    let both_dirs = current.kind == Kind::Dir && head.kind == RecordKind::Dir;
                    if agreed || both_dirs {
                        Decision::Apply
                    } else {
                        Decision::MoveAside(conflict_name(&head.path, stamp))
                    }
                },
                |path, entry| {
                    let mut manifest = lock(&shared.manifest);
                    match entry {
                        Some(entry) => {
                            if entry.kind != Kind::Dir {
                                let below: Vec<String> = children(&manifest, path).collect();
                                for child in below {
                                    manifest.remove(&child);
                                }
                            }
                            manifest.insert(path.to_string(), entry);
                        }
                        None => {
                            let below: Vec<String> = children(&manifest, path).collect();
                            for child in below {
                                manifest.remove(&child);
                            }
                            manifest.remove(path);
                        }
                    }
                    if path == IGNORE_FILE {
                        lock(&shared.tree).reload_ignore();
                    }
                },
                |size| {
                    let total = used.fetch_add(size, Ordering::Relaxed) + size;
                    if total > limit {
                        Err(format!(
                            "this session has synced {total} bytes, over the agent's limit of {limit} \
                             (--max-sync-bytes); add an .offloadignore for large files you do not need remotely"
                        ))
                    } else {
                        Ok(())
                    }
                },
            )
            })
            .await
        });
        let result = match applying.await {
            Ok(result) => result,
            Err(error) => {
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("sync push failed: {error}"),
                )
            }
        };
        match result {
            Ok(Ok((totals, conflicts))) => {
                let report = PushReport { conflicts, files: totals.files, bytes: totals.bytes };
                json_response(serde_json::to_vec(&report).unwrap_or_default())
            }
            Ok(Err(error)) => apply_failure(&error),
            Err(error) => {
                error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("sync push failed: {error}"))
            }
        }
    }
}

/// A path with every symlink of its existing part resolved (the rest, which
/// the engine would create, appended as written).
fn resolved(path: &str) -> String {
    let mut existing = PathBuf::from(path);
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut full = real;
            full.extend(rest.iter().rev());
            return full.to_string_lossy().into_owned();
        }
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent().map(Path::to_path_buf)) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return path.to_string(),
        }
    }
}

fn apply_failure(error: &ApplyError) -> Response<Body> {
    let status = match error {
        ApplyError::Refused { .. } => StatusCode::FORBIDDEN,
        ApplyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ApplyError::Corrupt(_) => StatusCode::BAD_REQUEST,
        ApplyError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::warn!(%error, "sync push not applied");
    error_response(status, &format!("the agent did not apply the sync: {error}"))
}

/// Sends what the container (or anything on the remote) changed since the
/// last pull; the manifest records it as agreed once it is on its way.
async fn pull(mount: &Arc<RemoteMount>) -> Response<Body> {
    let _busy = mount.busy.lock().await;
    // Writes that returned before this request are queued in the kernel now.
    let (done, drained) = oneshot::channel();
    if mount.drain.send(done).await.is_ok() {
        let _ = drained.await;
    }
    let batch = std::mem::take(&mut *lock(&mount.dirty));
    let tree = lock(&mount.tree).clone();
    let changes = {
        let manifest = lock(&mount.manifest);
        if batch.rescan {
            match tree.scan() {
                Ok(now) => crate::sync::manifest::diff(&now, &manifest),
                Err(error) => {
                    return error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("rescanning the copy: {error}"),
                    )
                }
            }
        } else {
            tree.changes(&manifest, &batch.paths)
        }
    };
    let shared = mount.clone();
    let (body, _written) = bridge::blocking_body(move |out| {
        write_changes(
            &tree,
            &changes,
            out,
            |path, entry| {
                let mut manifest = lock(&shared.manifest);
                match entry {
                    Some(entry) => {
                        manifest.insert(path.to_string(), entry);
                    }
                    None => {
                        let below: Vec<String> = children(&manifest, path).collect();
                        for child in below {
                            manifest.remove(&child);
                        }
                        manifest.remove(path);
                    }
                }
            },
            |_| {},
        )
    });
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-offload-sync"));
    response
}

/// A line per batch of remote changes, for as long as the proxy listens.
fn events(mount: &Arc<RemoteMount>) -> Response<Body> {
    let mut generation = mount.generation.subscribe();
    let pending = !lock(&mount.dirty).is_empty();
    let stop = mount.stop.clone();
    let (sender, receiver) = mpsc::channel::<Result<http_body::Frame<Bytes>, crate::body::BodyError>>(1);
    tokio::spawn(async move {
        if pending && sender.send(Ok(http_body::Frame::data(Bytes::from_static(b"\n")))).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                changed = generation.changed() => if changed.is_err() { break },
                _ = stop.cancelled() => break,
                _ = sender.closed() => break,
            }
            if sender.send(Ok(http_body::Frame::data(Bytes::from_static(b"\n")))).await.is_err() {
                break;
            }
        }
    });
    Response::new(bridge::receiver_body(receiver))
}

/// How long the watcher waits after a push before reading what it queued.
const RESUME_AFTER_PUSH: std::time::Duration = std::time::Duration::from_millis(20);

/// Follows one copy's changes until the mount stops.
async fn watch_copy(
    mount: Arc<RemoteMount>,
    mut watcher: TreeWatcher,
    mut drain_requests: mpsc::Receiver<oneshot::Sender<()>>,
) {
    // The watcher does not read while a push is applied (see `pushing`).
    let mut pushing = mount.pushing.subscribe();
    loop {
        let tree = lock(&mount.tree).clone();
        let paused = *pushing.borrow_and_update();
        let batch = tokio::select! {
            _ = mount.stop.cancelled() => break,
            batch = watcher.wait(&tree), if !paused => batch,
            _ = pushing.changed(), if paused => {
                // Reading a push's worth of queued events takes this thread a
                // while: let the push's answer go out first.
                tokio::time::sleep(RESUME_AFTER_PUSH).await;
                continue;
            }
            Some(done) = drain_requests.recv() => {
                if let Ok(batch) = watcher.drain(&tree) {
                    record(&mount, &tree, batch);
                }
                let _ = done.send(());
                continue;
            }
        };
        match batch {
            Ok(batch) => record(&mount, &tree, batch),
            Err(error) => {
                tracing::warn!(%error, root = %tree.root.display(), "watching a synced copy failed");
                break;
            }
        }
    }
}

/// Keeps what really changed (not the echo of a push) and tells the proxy.
fn record(mount: &RemoteMount, tree: &Tree, batch: Batch) {
    if batch.paths.contains(IGNORE_FILE) {
        lock(&mount.tree).reload_ignore();
    }
    let real = batch.rescan || {
        let manifest = lock(&mount.manifest);
        !tree.changes(&manifest, &batch.paths).is_empty()
    };
    if real {
        lock(&mount.dirty).merge(batch);
        mount.generation.send_modify(|g| *g += 1);
    }
}

/// A stable, short id per local source (FNV-1a), so registering the same
/// path again finds the same copy.
fn mount_id(asked: &MountRequest) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let key = format!("{}\0{}", asked.local_path, asked.only.as_deref().unwrap_or(""));
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let name: String = Path::new(&asked.local_path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("root")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(32)
        .collect();
    format!("{}-{hash:016x}", name.trim_start_matches('.'))
}

fn json_response(json: Vec<u8>) -> Response<Body> {
    let length = json.len();
    let mut response = Response::new(body::full(json));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response.headers_mut().insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(length));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_ids_are_stable_and_readable() {
        let asked = MountRequest { local_path: "/home/u/my app".into(), only: None, ignore: Vec::new() };
        assert_eq!(mount_id(&asked), mount_id(&asked.clone()));
        assert!(mount_id(&asked).starts_with("myapp-"), "{}", mount_id(&asked));
        let file =
            MountRequest { local_path: "/home/u/my app".into(), only: Some("x".into()), ignore: Vec::new() };
        assert_ne!(mount_id(&asked), mount_id(&file));
    }

    #[test]
    fn creates_may_bind_only_synced_copies_and_allowed_paths() {
        let sync = AgentSync::new(SyncConfig { root: "/sync".into(), ..SyncConfig::default() });
        let body = |bind: &str| format!(r#"{{"HostConfig":{{"Binds":["{bind}:/x"]}}}}"#).into_bytes();
        assert!(sync.check_create("s1", &body("/sync/s1/app-1"), false).is_ok());
        assert!(sync.check_create("s1", &body("/var/run/docker.sock"), false).is_ok());
        assert!(sync.check_create("s1", &body("named"), false).is_ok());
        for refused in ["/", "/etc", "/sync/s2/app", "/sync/s1/../s2"] {
            assert!(sync.check_create("s1", &body(refused), false).is_err(), "{refused}");
        }
        let volume = br#"{"Driver":"local","DriverOpts":{"o":"bind","device":"/etc"}}"#;
        assert!(sync.check_create("s1", volume, true).is_err());
    }

    #[test]
    fn a_symlink_planted_in_a_copy_does_not_lead_out() {
        let root = tempfile::tempdir().expect("tmp");
        let copy = root.path().join("s1/app");
        std::fs::create_dir_all(&copy).expect("mkdir");
        std::os::unix::fs::symlink("/etc", copy.join("escape")).expect("symlink");
        let sync = AgentSync::new(SyncConfig { root: root.path().into(), ..SyncConfig::default() });
        let body =
            |bind: &Path| format!(r#"{{"HostConfig":{{"Binds":["{}:/x"]}}}}"#, bind.display()).into_bytes();
        assert!(sync.check_create("s1", &body(&copy), false).is_ok());
        assert!(sync.check_create("s1", &body(&copy.join("not-yet/made")), false).is_ok());
        assert!(sync.check_create("s1", &body(&copy.join("escape")), false).is_err());
        assert!(sync.check_create("s1", &body(&copy.join("escape/passwd")), false).is_err());
    }
}
