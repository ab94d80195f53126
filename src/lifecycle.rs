//! One place that owns cancellation and task tracking for a process.
//!
//! `token` says "stop"; `tracker` knows when everything spawned has finished.
//! Every connection task and every relay of an upgraded stream is spawned on
//! `tracker`, so shutdown can wait for them within a grace period.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Lifecycle {
    pub token: CancellationToken,
    pub tracker: TaskTracker,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a task owned by this lifecycle.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Asks everything to stop, then waits up to `grace` for tracked tasks.
    /// Returns false when some tasks were still running at the deadline.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait()).await.is_ok()
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn termination_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
