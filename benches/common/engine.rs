//! A minimal Engine API client on a unix socket (hyper HTTP/1.1), and the container
//! guard that removes what a bench created.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::UnixStream;

use super::{is_running, BoxError, Context, Result, API_HOST, DEFAULT_IMAGE};

/// Opens one HTTP/1.1 connection on a unix socket; the connection task ends when the
/// sender and the last response body are dropped.
pub async fn open_connection<B>(socket: &Path) -> Result<SendRequest<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = UnixStream::connect(socket).await.context(format!("connecting to {}", socket.display()))?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.context("HTTP/1.1 handshake")?;
    // Connection errors also fail the pending request, where they are reported.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

pub fn request<B>(method: Method, path: &str, body: B) -> Result<Request<B>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, API_HOST)
        .body(body)
        .context(format!("building a request for {path}"))
}

pub fn expect_status(response: &Response<Incoming>, want: StatusCode, what: &str) -> Result<()> {
    if response.status() == want {
        Ok(())
    } else {
        Err(format!("{what}: answered {}, expected {want}", response.status()).into())
    }
}

/// A keep-alive client for sequential GETs (the latency measurements).
pub struct ApiClient {
    sender: SendRequest<Empty<Bytes>>,
}

impl ApiClient {
    pub async fn connect(socket: &Path) -> Result<ApiClient> {
        Ok(ApiClient { sender: open_connection(socket).await? })
    }

    pub async fn get(&mut self, path: &str) -> Result<Bytes> {
        self.sender.ready().await.context("connection closed")?;
        let response = self
            .sender
            .send_request(request(Method::GET, path, Empty::new())?)
            .await
            .context(format!("GET {path}"))?;
        expect_status(&response, StatusCode::OK, path)?;
        let body = response.into_body().collect().await.context(format!("body of {path}"))?;
        Ok(body.to_bytes())
    }

    /// Times `count` sequential GETs, request sent to body read; nanoseconds.
    pub async fn time_gets(&mut self, path: &str, count: usize) -> Result<Vec<u64>> {
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            self.get(path).await?;
            samples.push(started.elapsed().as_nanos() as u64);
        }
        Ok(samples)
    }
}

/// One call with an optional JSON body; returns the status and the parsed answer
/// (`Value::Null` when the body is empty).
pub async fn api_json(
    engine: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let mut sender = open_connection::<Full<Bytes>>(engine).await?;
    let payload = body.map(|value| value.to_string()).unwrap_or_default();
    let mut request = request(method.clone(), path, Full::new(Bytes::from(payload)))?;
    request.headers_mut().insert(CONTENT_TYPE, "application/json".parse().expect("static header value"));
    let response = sender.send_request(request).await.context(format!("{method} {path}"))?;
    let status = response.status();
    let bytes = response.into_body().collect().await.context(format!("body of {path}"))?.to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, value))
}

/// Like `api_json`, but any status other than `want` is an error carrying the
/// engine's message.
pub async fn api_expect(
    engine: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
    want: StatusCode,
) -> Result<Value> {
    let (status, value) = api_json(engine, method.clone(), path, body).await?;
    if status == want {
        Ok(value)
    } else {
        Err(format!("{method} {path}: {status}: {}", value["message"].as_str().unwrap_or(&value.to_string()))
            .into())
    }
}

/// A container the bench created; removed (forced, with its anonymous volumes) on
/// drop, whatever ended the bench.
pub struct Container {
    pub engine: PathBuf,
    pub id: String,
}

impl Container {
    /// `label` (the bench's own) gets the bench's pid, for `sweep_leftovers`.
    pub async fn create(engine: &Path, label: &str, mut spec: Value) -> Result<Container> {
        spec["Labels"] = json!({ label: std::process::id().to_string() });
        let created =
            api_expect(engine, Method::POST, "/containers/create", Some(spec), StatusCode::CREATED).await?;
        let id = created["Id"].as_str().ok_or("container create: no Id in the answer")?;
        Ok(Container { engine: engine.to_path_buf(), id: id.to_string() })
    }

    pub async fn start(&self) -> Result<()> {
        let path = format!("/containers/{}/start", self.id);
        api_expect(&self.engine, Method::POST, &path, None, StatusCode::NO_CONTENT).await?;
        Ok(())
    }

    /// Waits for the container to exit; returns its exit status.
    pub async fn wait(&self) -> Result<i64> {
        let path = format!("/containers/{}/wait", self.id);
        let answer = api_expect(&self.engine, Method::POST, &path, None, StatusCode::OK).await?;
        answer["StatusCode"].as_i64().ok_or_else(|| "wait: no StatusCode in the answer".into())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(err) = remove_container_blocking(&self.engine, &self.id) {
            eprintln!(
                "warning: could not remove container {}: {err}; run `docker rm -f {}`",
                self.id, self.id
            );
        }
    }
}

/// `DELETE /containers/{id}?force=1&v=1` with blocking std I/O, so that it works in
/// `Drop`, during a panic, and outside any runtime.
pub fn remove_container_blocking(engine: &Path, id: &str) -> Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(engine).context("connecting to the engine")?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).context("setting a timeout")?;
    let request = format!(
        "DELETE /containers/{id}?force=1&v=1 HTTP/1.1\r\n\
         Host: {API_HOST}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).context("sending DELETE")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).context("reading the DELETE answer")?;
    let status = answer.lines().next().unwrap_or_default();
    // 404: already gone, which is what we wanted.
    if status.contains(" 204 ") || status.contains(" 404 ") {
        Ok(())
    } else {
        Err(format!("DELETE answered {status:?}").into())
    }
}

/// Builds the test image with the project's fixture script if it is the default one
/// and missing; any other image must exist.
pub async fn ensure_image(engine: &Path, image: &str) -> Result<()> {
    let (status, _) = api_json(engine, Method::GET, &format!("/images/{image}/json"), None).await?;
    if status == StatusCode::OK {
        return Ok(());
    }
    if image != DEFAULT_IMAGE {
        return Err(format!("image {image} not found on the engine").into());
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/build-images.sh");
    let status = std::process::Command::new("bash")
        .arg(script)
        .env("OFFLOAD_TEST_ENGINE", format!("unix://{}", engine.display()))
        .status()
        .context(format!("running {script}"))?;
    if !status.success() {
        return Err(format!("{script} failed with {status}").into());
    }
    Ok(())
}

/// Removes containers left by bench runs that were killed (their pid, the value of
/// `label`, is gone); `run` names them in the message ("link bench").
pub async fn sweep_leftovers(engine: &Path, label: &str, run: &str) -> Result<()> {
    let path = format!("/containers/json?all=1&filters=%7B%22label%22%3A%5B%22{label}%22%5D%7D");
    let list = api_expect(engine, Method::GET, &path, None, StatusCode::OK).await?;
    for container in list.as_array().into_iter().flatten() {
        let owner = container["Labels"][label].as_str().unwrap_or_default();
        if let (false, Some(id)) = (is_running(owner), container["Id"].as_str()) {
            println!("removing container {id} left by an earlier {run} run (pid {owner})");
            remove_container_blocking(engine, id)?;
        }
    }
    Ok(())
}
