//! The link's relayed streams (upgrades, tunnels) by the proxy's number, so
//! that `POST /_offload/v1/abort/<id>` can end one. A stream whose program
//! stopped reading holds its request body's flow-control window: the proxy's
//! RST_STREAM cannot leave it then, and the stream, its engine connection and
//! the session's activity would stay until the link ends.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Aborts kept for streams not yet watched: an abort can overtake its
/// stream's registration (the agent dials a port before it watches).
const EARLY_ABORTS_KEPT: usize = 64;

/// One per link: stream numbers are the proxy's, unique on its link.
#[derive(Default)]
pub struct StreamAborts {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Stream number → (the watch's generation, its trigger).
    waiting: HashMap<u64, (u64, oneshot::Sender<()>)>,
    next_generation: u64,
    early: VecDeque<u64>,
}

impl StreamAborts {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic elsewhere cannot leave the map half-changed: keep using it.
        self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watches for an abort of stream `id` for as long as the watch lives.
    pub fn watch(self: &Arc<Self>, id: u64) -> AbortWatch {
        let (sender, receiver) = oneshot::channel();
        let mut registry = self.registry();
        let generation = registry.next_generation;
        registry.next_generation += 1;
        if let Some(position) = registry.early.iter().position(|&early| early == id) {
            registry.early.remove(position);
            let _ = sender.send(());
        } else {
            registry.waiting.insert(id, (generation, sender));
        }
        AbortWatch { aborts: self.clone(), id, generation, receiver }
    }

    /// Aborts stream `id`; false when no such stream is watched (it ended,
    /// or is not watched yet: then its watch fires as it starts).
    pub fn abort(&self, id: u64) -> bool {
        let mut registry = self.registry();
        match registry.waiting.remove(&id) {
            Some((_, sender)) => sender.send(()).is_ok(),
            None => {
                if registry.early.len() == EARLY_ABORTS_KEPT {
                    registry.early.pop_front();
                }
                registry.early.push_back(id);
                false
            }
        }
    }
}

pub struct AbortWatch {
    aborts: Arc<StreamAborts>,
    id: u64,
    generation: u64,
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
        let mut registry = self.aborts.registry();
        // Only its own entry: a later watch may have taken the number.
        if registry.waiting.get(&self.id).is_some_and(|(generation, _)| *generation == self.generation) {
            registry.waiting.remove(&self.id);
        }
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

        // Ended streams: nothing to abort, nothing kept.
        drop(second);
        assert!(!aborts.abort(2));
        drop(first);
        assert!(aborts.registry().waiting.is_empty());

        // An abort that comes before its stream is watched fires as it starts.
        assert!(!aborts.abort(9));
        let mut late = aborts.watch(9);
        tokio::time::timeout(Duration::from_secs(5), late.aborted()).await.expect("aborted early");

        // A number taken again: the older watch's end leaves the newer alone.
        let older = aborts.watch(11);
        let mut newer = aborts.watch(11);
        drop(older);
        assert!(aborts.abort(11));
        tokio::time::timeout(Duration::from_secs(5), newer.aborted()).await.expect("the newer watch");
    }
}
