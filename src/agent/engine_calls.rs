//! Small requests the agent makes to the engine on its own behalf.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::body;
use crate::docker::ownership::SESSION_LABEL;
use crate::upstream::engine::EngineUpstream;
use crate::upstream::Upstream;

/// Sends a bodiless request and collects the (bounded) answer.
pub async fn call(
    engine: &EngineUpstream,
    method: Method,
    path: &str,
) -> Result<(StatusCode, Bytes), String> {
    let mut request = Request::new(body::empty());
    *request.method_mut() = method;
    *request.uri_mut() = path.parse().map_err(|e| format!("bad path {path:?}: {e}"))?;
    let exchange = engine.send(request).await.map_err(|e| e.to_string())?;
    let status = exchange.response.status();
    let bytes = Limited::new(exchange.response.into_body(), 16 << 20)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

pub async fn json(engine: &EngineUpstream, path: &str) -> Result<serde_json::Value, String> {
    let (status, bytes) = call(engine, Method::GET, path).await?;
    if !status.is_success() {
        return Err(format!("{path}: {status} {}", String::from_utf8_lossy(&bytes)));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{path}: {e}"))
}

/// `filters=` for "labelled with this session" (plus extra filters), URL-encoded.
pub fn session_filter(session_id: &str, extra: &str) -> String {
    let filters = format!(r#"{{"label":["{SESSION_LABEL}={session_id}"]{extra}}}"#);
    let mut encoded = String::new();
    for byte in filters.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("filters={encoded}")
}

/// IDs (or names) of the session's resources of one kind.
pub async fn labelled(engine: &EngineUpstream, session_id: &str, kind: Kind) -> Result<Vec<String>, String> {
    let (path, extra, list_key, id_key) = match kind {
        Kind::Containers => ("/containers/json?all=1&", "", None, "Id"),
        Kind::RunningContainers => ("/containers/json?", r#","status":["running"]"#, None, "Id"),
        Kind::Volumes => ("/volumes?", "", Some("Volumes"), "Name"),
        Kind::Networks => ("/networks?", "", None, "Id"),
    };
    let value = json(engine, &format!("{path}{}", session_filter(session_id, extra))).await?;
    let list = match list_key {
        Some(key) => value[key].clone(),
        None => value,
    };
    Ok(list
        .as_array()
        .map(|items| items.iter().filter_map(|item| item[id_key].as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Containers,
    RunningContainers,
    Volumes,
    Networks,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_is_url_encoded_json() {
        assert_eq!(
            session_filter("ab12", ""),
            "filters=%7B%22label%22%3A%5B%22offload.session%3Dab12%22%5D%7D"
        );
    }
}
