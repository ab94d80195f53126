//! The link's relayed streams (upgrades, tunnels) by the proxy's number, so
//! that `POST /_offload/v1/abort/<id>` can end one. A stream whose program
//! stopped reading holds its request body's flow-control window: the proxy's
//! RST_STREAM cannot leave it then, and the stream, its engine connection and
//! the session's activity would stay until the link ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// One per link: stream numbers are the proxy's, unique on its link.
#[derive(Default)]
pub struct StreamAborts {
    waiting: Mutex<HashMap<u64, oneshot::Sender<()>>>,
}

impl StreamAborts {
    fn waiting(&self) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<()>>> {
        // A panic elsewhere cannot leave the map half-changed: keep using it.
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watches for an abort of stream `id` for as long as the watch lives.
    pub fn watch(self: &Arc<Self>, id: u64) -> AbortWatch {
        let (sender, receiver) = oneshot::channel();
        self.waiting().insert(id, sender);
        AbortWatch { aborts: self.clone(), id, receiver }
    }

    /// Aborts stream `id`; false when no such stream is relayed (it ended).
    pub fn abort(&self, id: u64) -> bool {
        self.waiting().remove(&id).is_some_and(|sender| sender.send(()).is_ok())
    }
}

pub struct AbortWatch {
    aborts: Arc<StreamAborts>,
    id: u64,
    receiver: oneshot::Receiver<()>,
}

impl AbortWatch {
    /// Resolves when the proxy aborts the stream; never otherwise.
    pub async fn aborted(&mut self) {
        if (&mut self.receiver).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for AbortWatch {
    fn drop(&mut self) {
        self.aborts.waiting().remove(&self.id);
    }
}

/// Until `watch` (if any) fires.
pub async fn aborted(watch: &mut Option<AbortWatch>) {
    match watch {
        Some(watch) => watch.aborted().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn an_abort_reaches_its_stream_only() {
        let aborts = Arc::new(StreamAborts::default());
        let mut first = aborts.watch(1);
        let mut second = Some(aborts.watch(2));
        assert!(aborts.abort(1));
        tokio::time::timeout(Duration::from_secs(5), first.aborted()).await.expect("aborted");
        let quiet = tokio::time::timeout(Duration::from_millis(50), aborted(&mut second)).await;
        assert!(quiet.is_err(), "stream 2 was not aborted");

        // Unknown and ended streams: nothing to abort, nothing kept.
        assert!(!aborts.abort(7));
        drop(second);
        assert!(!aborts.abort(2));
        drop(first);
        assert!(aborts.waiting().is_empty());
    }
}
