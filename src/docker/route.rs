//! Classifies Docker API requests. The engine registers every route twice, as
//! `/v{version}/path` and as `/path`, so we match both and never normalize.

use http::Method;

/// The requests the proxy treats specially; everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Ping,
    Version,
    ContainerCreate,
    ContainerAttach,
    ContainerWait,
    /// `GET /containers/{id}/json`
    ContainerInspect,
    /// `GET /containers/json`
    ContainerList,
    ExecCreate,
    VolumeCreate,
    ExecStart,
    /// BuildKit session (`/session`): the engine speaks h2 first after the 101.
    Session,
    /// BuildKit control API (`/grpc`): the client speaks h2 first after the 101.
    Grpc,
    Other,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Ping => "ping",
            Route::Version => "version",
            Route::ContainerCreate => "container-create",
            Route::ContainerAttach => "attach",
            Route::ContainerWait => "wait",
            Route::ContainerInspect => "container-inspect",
            Route::ContainerList => "container-list",
            Route::ExecCreate => "exec-create",
            Route::VolumeCreate => "volume-create",
            Route::ExecStart => "exec-start",
            Route::Session => "session",
            Route::Grpc => "grpc",
            Route::Other => "api",
        }
    }
}

/// `(container, action)` for `POST /containers/{id}/{start|restart|unpause}`:
/// the requests after which a container's published ports may have changed.
pub fn container_started<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    if method != Method::POST {
        return None;
    }
    let rest = unversioned(path).strip_prefix("/containers/")?;
    let (id, action) = rest.split_once('/')?;
    matches!(action, "start" | "restart" | "unpause").then_some(id).filter(|id| !id.is_empty())
}

/// The container a successful request stops or removes (`stop`, `kill`,
/// `pause`, `DELETE /containers/{id}`): its forwards can close at once.
pub fn container_stopped<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    let rest = unversioned(path).strip_prefix("/containers/")?;
    let id = match (method, rest.split_once('/')) {
        (&Method::DELETE, None) => rest,
        (&Method::POST, Some((id, "stop" | "kill" | "pause"))) => id,
        _ => return None,
    };
    (!id.is_empty()).then_some(id)
}

/// Strips a `/v1.41`-style prefix; returns the path unchanged when there is none.
pub fn unversioned(path: &str) -> &str {
    let Some(rest) = path.strip_prefix("/v") else {
        return path;
    };
    let version_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    let (version, tail) = rest.split_at(version_len);
    if version.is_empty() || !tail.starts_with('/') {
        return path;
    }
    tail
}

pub fn classify(method: &Method, path: &str) -> Route {
    let path = unversioned(path);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["_ping"]) => Route::Ping,
        (&Method::GET, ["version"]) => Route::Version,
        (&Method::POST, ["containers", "create"]) => Route::ContainerCreate,
        (&Method::POST, ["containers", _, "attach"]) => Route::ContainerAttach,
        (&Method::POST, ["containers", _, "wait"]) => Route::ContainerWait,
        (&Method::POST, ["containers", _, "exec"]) => Route::ExecCreate,
        (&Method::GET, ["containers", "json"]) => Route::ContainerList,
        (&Method::GET, ["containers", _, "json"]) => Route::ContainerInspect,
        (&Method::POST, ["volumes", "create"]) => Route::VolumeCreate,
        (&Method::POST, ["exec", _, "start"]) => Route::ExecStart,
        (&Method::POST, ["session"]) => Route::Session,
        (&Method::POST, ["grpc"]) => Route::Grpc,
        _ => Route::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_stopped_containers() {
        assert_eq!(container_stopped(&Method::DELETE, "/v1.41/containers/abc"), Some("abc"));
        assert_eq!(container_stopped(&Method::POST, "/containers/web/kill"), Some("web"));
        assert_eq!(container_stopped(&Method::POST, "/containers/web/start"), None);
        assert_eq!(container_stopped(&Method::GET, "/containers/web"), None);
    }

    #[test]
    fn finds_started_containers() {
        assert_eq!(container_started(&Method::POST, "/v1.41/containers/abc/start"), Some("abc"));
        assert_eq!(container_started(&Method::POST, "/containers/web/restart"), Some("web"));
        assert_eq!(container_started(&Method::POST, "/containers/web/stop"), None);
        assert_eq!(container_started(&Method::GET, "/containers/web/start"), None);
        assert_eq!(container_started(&Method::POST, "/containers//start"), None);
    }

    #[test]
    fn strips_version_prefix_only_when_it_is_one() {
        assert_eq!(unversioned("/v1.41/containers/json"), "/containers/json");
        assert_eq!(unversioned("/v1/info"), "/info");
        assert_eq!(unversioned("/containers/json"), "/containers/json");
        assert_eq!(unversioned("/v1.41"), "/v1.41");
        assert_eq!(unversioned("/volumes/x"), "/volumes/x");
        assert_eq!(unversioned("/vx/info"), "/vx/info");
    }

    #[test]
    fn classifies_versioned_and_unversioned_paths() {
        assert_eq!(classify(&Method::HEAD, "/_ping"), Route::Ping);
        assert_eq!(classify(&Method::GET, "/v1.41/_ping"), Route::Ping);
        assert_eq!(classify(&Method::POST, "/v1.41/containers/create"), Route::ContainerCreate);
        assert_eq!(classify(&Method::POST, "/containers/abc/attach"), Route::ContainerAttach);
        assert_eq!(classify(&Method::POST, "/v1.50/exec/abc/start"), Route::ExecStart);
        assert_eq!(classify(&Method::POST, "/session"), Route::Session);
        assert_eq!(classify(&Method::POST, "/v1.41/grpc"), Route::Grpc);
        assert_eq!(classify(&Method::GET, "/containers/create"), Route::Other);
        assert_eq!(classify(&Method::POST, "/containers/a/b/attach"), Route::Other);
        assert_eq!(classify(&Method::POST, "/v1.41/containers/abc/wait"), Route::ContainerWait);
        assert_eq!(classify(&Method::GET, "/containers/json"), Route::ContainerList);
        assert_eq!(classify(&Method::GET, "/v1.41/containers/abc/json"), Route::ContainerInspect);
        assert_eq!(classify(&Method::POST, "/containers/abc/exec"), Route::ExecCreate);
        assert_eq!(classify(&Method::POST, "/v1.24/volumes/create"), Route::VolumeCreate);
    }
}
