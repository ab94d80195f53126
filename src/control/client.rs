//! A tiny HTTP/1.1 client for the commands: one request on the proxy's socket.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;

use crate::body;

/// The longest a command waits for one answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// Sends one request; returns the status and body. `Err` says what failed.
pub async fn request(socket: &Path, method: Method, path: &str) -> Result<(StatusCode, Bytes), String> {
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("talking to {}: {e}", socket.display()))?;
        let driver = tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "offload")
            .body(body::empty())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| format!("request {path}: {e}"))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), 16 << 20)
            .collect()
            .await
            .map_err(|e| format!("reading the answer to {path}: {e}"))?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    };
    tokio::time::timeout(ANSWER_LIMIT, exchange).await.map_err(|_| format!("no answer to {path} in time"))?
}

/// A JSON answer, or the error the proxy or engine gave (`{"message": ...}`).
pub async fn get_json(socket: &Path, path: &str) -> Result<serde_json::Value, String> {
    let (status, bytes) = request(socket, Method::GET, path).await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        return Err(message_of(&value).unwrap_or_else(|| format!("{path}: {status}")));
    }
    Ok(value)
}

/// The `message` of a Docker-style error body.
pub fn message_of(value: &serde_json::Value) -> Option<String> {
    value["message"].as_str().map(|m| m.trim_start_matches("offload: ").to_string())
}
