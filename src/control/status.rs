//! `offload status`: the proxy's own facts and the session's, as one JSON
//! document (stable, documented in ARCHITECTURE.md) or a few readable lines.

use std::time::Instant;

use super::client::get_json;
use super::paths::Paths;
use super::start::process_alive;
use crate::proxy::service::LOCAL_STATUS_PATH;

pub async fn status(paths: &Paths) -> serde_json::Value {
    let state = paths.read_state();
    let Some(state) = state.filter(|s| process_alive(s.pid)) else {
        return serde_json::json!({"running": false});
    };
    let socket = paths.socket();
    let proxy = get_json(&socket, LOCAL_STATUS_PATH).await;
    let asked = Instant::now();
    let session = get_json(&socket, "/_offload/v1/status").await;
    let round_trip_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let (link, session) = match session {
        Ok(session) => (serde_json::json!({"state": "up", "round_trip_ms": round_trip_ms}), session),
        Err(error) => (serde_json::json!({"state": "down", "error": error}), serde_json::Value::Null),
    };
    let proxy = proxy.unwrap_or_default();
    serde_json::json!({
        "running": true,
        "pid": state.pid,
        "remote": state.remote,
        "socket": socket.display().to_string(),
        "link": link,
        "session": session,
        "forwards": proxy["forwards"],
        "mounts": proxy["mounts"],
    })
}

/// The same, for people.
pub fn pretty(report: &serde_json::Value) -> String {
    if report["running"] != true {
        return "offload is not running (start it with `offload start`)".to_string();
    }
    let mut lines = vec![format!(
        "offload: remote {} (pid {}), socket {}",
        report["remote"].as_str().unwrap_or("?"),
        report["pid"],
        report["socket"].as_str().unwrap_or("?")
    )];
    let link = &report["link"];
    match link["state"].as_str() {
        Some("up") => lines
            .push(format!("  link: up, round trip {:.1} ms", link["round_trip_ms"].as_f64().unwrap_or(0.0))),
        _ => lines.push(format!("  link: down ({})", link["error"].as_str().unwrap_or("?"))),
    }
    let session = &report["session"];
    if !session.is_null() {
        let activity = &session["activity"];
        lines.push(format!(
            "  session {}: {}, idle {:.0}s, ends in {:.0}s if idle; {} requests, {} streams, {} running containers",
            session["session_id"].as_str().unwrap_or("?"),
            session["state"].as_str().unwrap_or("?"),
            session["idle_seconds"].as_f64().unwrap_or(0.0),
            session["ends_in_seconds"].as_f64().unwrap_or(0.0),
            activity["requests"],
            activity["streams"],
            activity["running_containers"]
        ));
    }
    for forward in report["forwards"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  port {}/{} -> {}",
            forward["port"],
            forward["protocol"].as_str().unwrap_or("tcp"),
            forward["container"].as_str().unwrap_or("?")
        ));
    }
    for mount in report["mounts"].as_array().into_iter().flatten() {
        let error = mount["last_error"].as_str().map(|e| format!(", last error: {e}")).unwrap_or_default();
        lines.push(format!(
            "  mount {}: {} files, {} bytes, {} pending{error}",
            mount["source"].as_str().unwrap_or("?"),
            mount["files"],
            mount["bytes"],
            mount["pending"]
        ));
    }
    lines.join("\n")
}
