//! Sessions as the agent owns them: identity and resumption, activity
//! accounting, and a record on disk that outlives an agent crash.
//!
//! Activity is anything a user is doing: a request in flight, an open stream
//! (attach, exec, logs -f, events, a build), or a running container of the
//! session (the idle watcher checks those). The proxy's own background
//! streams do not count.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How sessions live and end.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Without activity for this long, a session is idle.
    pub idle_timeout: Duration,
    /// After idle, this long more without a reconnect ends it (with cleanup).
    pub grace: Duration,
    /// Where session records are kept; `None` keeps them in memory only.
    pub state_dir: Option<PathBuf>,
    /// Also prune the build cache when a session is cleaned up.
    pub purge_build_cache: bool,
    /// Run this (with `sh -c`) and exit once no session has existed for the idle timeout.
    pub on_idle_exit: Option<String>,
    /// Exit once no session has existed for the idle timeout (the resident agent).
    pub exit_when_idle: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30 * 60),
            grace: Duration::from_secs(5 * 60),
            state_dir: None,
            purge_build_cache: false,
            on_idle_exit: None,
            exit_when_idle: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivityKind {
    Request,
    Stream,
}

/// What is written to disk for each session.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    resume_token: String,
    started_unix: u64,
    last_activity_unix: u64,
    images: Vec<String>,
}

pub struct Session {
    pub id: String,
    pub resume_token: String,
    pub started: SystemTime,
    requests: AtomicUsize,
    streams: AtomicUsize,
    tracked: Mutex<Tracked>,
}

struct Tracked {
    last_activity: Instant,
    running_containers: usize,
    images: Vec<String>,
    links: Vec<CancellationToken>,
    ended: bool,
}

impl Session {
    fn new(id: String, resume_token: String, started: SystemTime, idle_for: Duration) -> Self {
        let last_activity = Instant::now().checked_sub(idle_for).unwrap_or_else(Instant::now);
        Self {
            id,
            resume_token,
            started,
            requests: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            tracked: Mutex::new(Tracked {
                last_activity,
                running_containers: 0,
                images: Vec::new(),
                links: Vec::new(),
                ended: false,
            }),
        }
    }

    fn tracked(&self) -> MutexGuard<'_, Tracked> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.tracked.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn touch(&self) {
        self.tracked().last_activity = Instant::now();
    }

    /// Counts as activity until the guard is dropped.
    pub fn activity(self: &Arc<Self>, kind: ActivityKind) -> ActivityGuard {
        self.counter(kind).fetch_add(1, Ordering::SeqCst);
        self.touch();
        ActivityGuard { session: self.clone(), kind }
    }

    fn counter(&self, kind: ActivityKind) -> &AtomicUsize {
        match kind {
            ActivityKind::Request => &self.requests,
            ActivityKind::Stream => &self.streams,
        }
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.requests.load(Ordering::SeqCst), self.streams.load(Ordering::SeqCst))
    }

    pub fn busy(&self) -> bool {
        let (requests, streams) = self.counts();
        requests + streams > 0
    }

    pub fn idle_for(&self) -> Duration {
        self.tracked().last_activity.elapsed()
    }

    pub fn set_running_containers(&self, running: usize) {
        let mut tracked = self.tracked();
        tracked.running_containers = running;
        if running > 0 {
            tracked.last_activity = Instant::now();
        }
    }

    pub fn running_containers(&self) -> usize {
        self.tracked().running_containers
    }

    pub fn record_images(&self, references: impl IntoIterator<Item = String>) {
        let mut tracked = self.tracked();
        for reference in references {
            if !tracked.images.contains(&reference) {
                tracked.images.push(reference);
            }
        }
    }

    pub fn images(&self) -> Vec<String> {
        self.tracked().images.clone()
    }

    /// Ties a link to this session, so ending the session closes the link.
    pub fn bind_link(&self, link: CancellationToken) {
        let mut tracked = self.tracked();
        tracked.links.retain(|l| !l.is_cancelled());
        tracked.links.push(link);
    }

    pub fn is_ended(&self) -> bool {
        self.tracked().ended
    }

    /// Marks the session ended and closes its links; returns false if it already was.
    pub fn end(&self) -> bool {
        let mut tracked = self.tracked();
        if tracked.ended {
            return false;
        }
        tracked.ended = true;
        for link in tracked.links.drain(..) {
            link.cancel();
        }
        true
    }

    fn record(&self) -> Record {
        let tracked = self.tracked();
        let now_unix = unix_seconds(SystemTime::now());
        Record {
            id: self.id.clone(),
            resume_token: self.resume_token.clone(),
            started_unix: unix_seconds(self.started),
            last_activity_unix: now_unix.saturating_sub(tracked.last_activity.elapsed().as_secs()),
            images: tracked.images.clone(),
        }
    }
}

pub struct ActivityGuard {
    session: Arc<Session>,
    kind: ActivityKind,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.session.counter(self.kind).fetch_sub(1, Ordering::SeqCst);
        self.session.touch();
    }
}

pub struct Sessions {
    pub config: SessionConfig,
    by_token: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    /// The registry, with the sessions a previous agent left on disk (their
    /// idle time counts from their last recorded activity).
    pub fn load(config: SessionConfig) -> Self {
        let sessions = Sessions { config, by_token: Mutex::new(HashMap::new()) };
        for record in sessions.stored_records() {
            let idle = unix_seconds(SystemTime::now()).saturating_sub(record.last_activity_unix);
            let started = UNIX_EPOCH + Duration::from_secs(record.started_unix);
            let session = Session::new(record.id, record.resume_token, started, Duration::from_secs(idle));
            session.record_images(record.images);
            tracing::info!(session = %session.id, idle_s = idle, "found the record of an earlier session");
            sessions.table().insert(session.resume_token.clone(), Arc::new(session));
        }
        sessions
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.by_token.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Resumes the session a token names, or starts a new one.
    pub fn open(&self, resume_token: Option<&str>) -> std::io::Result<(Arc<Session>, bool)> {
        if let Some(session) = resume_token.and_then(|token| self.table().get(token).cloned()) {
            if !session.is_ended() {
                session.touch();
                return Ok((session, true));
            }
        }
        let session =
            Arc::new(Session::new(random_hex(8)?, random_hex(24)?, SystemTime::now(), Duration::ZERO));
        self.table().insert(session.resume_token.clone(), session.clone());
        self.save(&session);
        Ok((session, false))
    }

    /// The live session for a token, without counting it as activity.
    pub fn resume(&self, resume_token: Option<&str>) -> Option<Arc<Session>> {
        let session = self.table().get(resume_token?).cloned()?;
        (!session.is_ended()).then_some(session)
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.table().values().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.table().is_empty()
    }

    /// Forgets a session after its cleanup; its record on disk goes too,
    /// unless kept so that a later agent start retries an incomplete cleanup.
    pub fn forget(&self, session: &Session, keep_record: bool) {
        self.table().remove(&session.resume_token);
        if keep_record {
            self.save(session);
        } else if let Some(path) = self.record_path(&session.id) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Writes the session's record, if records are kept.
    pub fn save(&self, session: &Session) {
        let Some(path) = self.record_path(&session.id) else { return };
        let result = serde_json::to_vec(&session.record())
            .map_err(std::io::Error::other)
            .and_then(|json| write_atomically(&path, &json));
        if let Err(error) = result {
            tracing::warn!(path = %path.display(), %error, "cannot save the session record");
        }
    }

    fn record_path(&self, id: &str) -> Option<PathBuf> {
        let dir = self.config.state_dir.as_ref()?;
        Some(dir.join(format!("session-{id}.json")))
    }

    fn stored_records(&self) -> Vec<Record> {
        let Some(dir) = &self.config.state_dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("session-"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect()
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let staging = path.with_extension("tmp");
    std::fs::write(&staging, bytes)?;
    std::fs::rename(&staging, path)
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buffer = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buffer)?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_by_token_and_starts_fresh_otherwise() {
        let sessions = Sessions::load(SessionConfig::default());
        let (first, resumed) = sessions.open(None).unwrap();
        assert!(!resumed);
        let (again, resumed) = sessions.open(Some(&first.resume_token)).unwrap();
        assert!(resumed);
        assert_eq!(again.id, first.id);
        let (other, resumed) = sessions.open(Some("unknown")).unwrap();
        assert!(!resumed);
        assert_ne!(other.id, first.id);
        assert_eq!(first.resume_token.len(), 48);
        // An ended session cannot be resumed.
        first.end();
        let (fresh, resumed) = sessions.open(Some(&first.resume_token)).unwrap();
        assert!(!resumed);
        assert_ne!(fresh.id, first.id);
    }

    #[test]
    fn guards_count_activity() {
        let sessions = Sessions::load(SessionConfig::default());
        let (session, _) = sessions.open(None).unwrap();
        assert!(!session.busy());
        let request = session.activity(ActivityKind::Request);
        let stream = session.activity(ActivityKind::Stream);
        assert_eq!(session.counts(), (1, 1));
        drop(request);
        assert_eq!(session.counts(), (0, 1));
        drop(stream);
        assert!(!session.busy());
    }

    #[test]
    fn records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let config = SessionConfig { state_dir: Some(dir.path().to_path_buf()), ..SessionConfig::default() };
        let sessions = Sessions::load(config.clone());
        let (session, _) = sessions.open(None).unwrap();
        session.record_images(["mine:1".to_string()]);
        sessions.save(&session);
        drop(sessions);

        let reloaded = Sessions::load(config.clone());
        let (again, resumed) = reloaded.open(Some(&session.resume_token)).unwrap();
        assert!(resumed);
        assert_eq!(again.id, session.id);
        assert_eq!(again.images(), vec!["mine:1".to_string()]);
        reloaded.forget(&again, false);
        assert!(Sessions::load(config).is_empty());
    }
}
