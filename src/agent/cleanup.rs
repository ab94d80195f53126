//! Ends a session: removes what it created (containers, images, volumes,
//! networks) and nothing else. The shared build cache stays unless asked.

use http::Method;

use super::engine_calls::{call, labelled, Kind};
use super::session::Session;
use crate::upstream::engine::EngineUpstream;

/// What a cleanup removed, for the log and the status answer.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Removed {
    pub containers: usize,
    pub images: usize,
    pub volumes: usize,
    pub networks: usize,
    pub failures: Vec<String>,
}

pub async fn clean_up(engine: &EngineUpstream, session: &Session, purge_build_cache: bool) -> Removed {
    let mut removed = Removed::default();
    let id = &session.id;
    // Containers first (with their anonymous volumes): they hold images,
    // volumes and networks in use.
    remove_all(
        engine,
        id,
        Kind::Containers,
        "/containers/{}?force=1&v=1",
        &mut removed.containers,
        &mut removed.failures,
    )
    .await;
    for reference in session.images() {
        // noprune keeps untagged parent layers: they are the classic builder's cache.
        let path = format!("/images/{reference}?noprune=1");
        match call(engine, Method::DELETE, &path).await {
            Ok((status, _)) if status.is_success() => removed.images += 1,
            Ok((status, _)) if status.as_u16() == 404 => {}
            Ok((status, body)) => removed
                .failures
                .push(format!("image {reference}: {status} {}", String::from_utf8_lossy(&body).trim())),
            Err(error) => removed.failures.push(format!("image {reference}: {error}")),
        }
    }
    remove_all(engine, id, Kind::Volumes, "/volumes/{}", &mut removed.volumes, &mut removed.failures).await;
    remove_all(engine, id, Kind::Networks, "/networks/{}", &mut removed.networks, &mut removed.failures)
        .await;
    if purge_build_cache {
        if let Err(error) = call(engine, Method::POST, "/build/prune?all=1").await {
            removed.failures.push(format!("build cache: {error}"));
        }
    }
    removed
}

async fn remove_all(
    engine: &EngineUpstream,
    session_id: &str,
    kind: Kind,
    path_template: &str,
    count: &mut usize,
    failures: &mut Vec<String>,
) {
    let ids = match labelled(engine, session_id, kind).await {
        Ok(ids) => ids,
        Err(error) => return failures.push(format!("listing {kind:?}: {error}")),
    };
    for resource in ids {
        let path = path_template.replace("{}", &resource);
        match call(engine, Method::DELETE, &path).await {
            Ok((status, _)) if status.is_success() || status.as_u16() == 404 => *count += 1,
            Ok((status, body)) => failures
                .push(format!("{kind:?} {resource}: {status} {}", String::from_utf8_lossy(&body).trim())),
            Err(error) => failures.push(format!("{kind:?} {resource}: {error}")),
        }
    }
}
