//! Byte-level framing through the proxy, against a scripted fake engine.
//!
//! The real engine is used everywhere else; this fake only exists to produce
//! what the real one cannot on demand (split writes, garbage, exact heads,
//! read-ahead after a 101) and to show exactly what the proxy sent upstream.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{raw_exchange, Proxy};

/// A fake engine on a unix socket, one thread per connection.
struct FakeEngine {
    dir_guard: tempfile::TempDir,
    socket: PathBuf,
}

impl FakeEngine {
    fn start() -> FakeEngine {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("engine.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake engine");
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let root = root.clone();
                std::thread::spawn(move || serve(stream, root));
            }
        });
        FakeEngine { dir_guard: dir, socket }
    }

    fn dir(&self) -> &Path {
        self.dir_guard.path()
    }

    fn proxy(&self) -> Proxy {
        Proxy::start_with(&["--docker", &format!("unix://{}", self.socket.display())])
    }
}

struct Received {
    head: String,
    body: Vec<u8>,
    /// The fake engine's directory, for markers tests can look at.
    dir: PathBuf,
}

/// Reads one request: head, then a body framed by Content-Length or chunked.
fn read_request(reader: &mut BufReader<UnixStream>, dir: &Path) -> Option<Received> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).ok()?;
            let size = usize::from_str_radix(size_line.trim(), 16).ok()?;
            let mut chunk = vec![0u8; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk[..size]);
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = header_value(&lower, "content-length") {
        let mut chunk = vec![0u8; length.parse().ok()?];
        reader.read_exact(&mut chunk).ok()?;
        body = chunk;
    }
    Some(Received { head, body, dir: dir.to_path_buf() })
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| line.strip_prefix(&format!("{name}: "))).map(str::trim)
}

fn serve(stream: UnixStream, dir: PathBuf) {
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader, &dir) {
        let path = request.head.split(' ').nth(1).unwrap_or("").to_string();
        let keep_going = respond(&path, &request, &mut reader, &mut writer);
        if !keep_going {
            return;
        }
    }
}

/// Answers by path; returns false when the connection is finished.
fn respond(path: &str, request: &Received, reader: &mut BufReader<UnixStream>, out: &mut UnixStream) -> bool {
    let send = |out: &mut UnixStream, bytes: &[u8]| out.write_all(bytes).is_ok();
    match path {
        "/echo" => {
            let mut body = request.head.clone().into_bytes();
            body.extend_from_slice(b"--body--");
            body.extend_from_slice(&request.body);
            let head = format!("HTTP/1.1 200 OK\r\napi-version: 1.41\r\nostype: linux\r\nContent-Length: {}\r\n\r\n", body.len());
            send(out, head.as_bytes()) && send(out, &body)
        }
        "/chunked" => send(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n3\r\n{}\n\r\n0\r\n\r\n",
        ),
        "/no-content" => send(out, b"HTTP/1.1 204 No Content\r\nApi-Version: 1.41\r\n\r\n"),
        "/not-modified" => send(out, b"HTTP/1.1 304 Not Modified\r\nApi-Version: 1.41\r\n\r\n"),
        "/head" => send(out, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\n"),
        "/slow-body" => {
            // Headers at once, the body a second later (like `wait`).
            send(out, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                && {
                    std::thread::sleep(Duration::from_millis(1000));
                    send(out, b"10\r\n{\"StatusCode\":0}\r\n0\r\n\r\n")
                }
        }
        "/split" => {
            let response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"split\":\"reads\"}";
            for byte in response {
                if !send(out, &[*byte]) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        }
        "/hold" => {
            // A stream that runs until the proxy closes it (like `logs -f`).
            let mut ok = send(out, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n");
            while ok {
                std::thread::sleep(Duration::from_millis(50));
                ok = send(out, b"5\r\ntick\n\r\n");
            }
            let marker = std::path::Path::new(&request.dir).join("hold-closed");
            let _ = std::fs::write(marker, b"closed");
            false
        }
        "/garbage" => {
            send(out, b"this is not HTTP at all\r\n\r\n");
            false
        }
        "/hijack-200" => {
            // What the engine does for an attach without `Upgrade`.
            send(out, b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\nraw stream bytes");
            let _ = out.shutdown(std::net::Shutdown::Both);
            false
        }
        "/upgrade" => {
            // 101 and the first payload bytes in one write (read-ahead on our side).
            let ok = send(
                out,
                b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.multiplexed-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\nearly|",
            );
            if !ok {
                return false;
            }
            // Echo what the client sends, upper-cased, until its half-close.
            let mut buffer = [0u8; 1024];
            loop {
                match reader.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !send(out, &buffer[..n].to_ascii_uppercase()) {
                            return false;
                        }
                    }
                }
            }
            send(out, b"|after-eof");
            let _ = out.shutdown(std::net::Shutdown::Write);
            false
        }
        _ => send(out, b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n{\"message\":\"page not found\"}\n"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn exchange(proxy: &Proxy, request: &str) -> String {
    text(&raw_exchange(&proxy.socket, request.as_bytes(), Duration::from_secs(10)))
}

#[test]
fn request_framing_reaches_the_engine_intact() {
    let engine = FakeEngine::start();
    let proxy = engine.proxy();

    // An empty POST stays `Content-Length: 0` (the engine rejects `start` otherwise).
    let response = exchange(&proxy, "POST /echo HTTP/1.1\r\nHost: api.moby.localhost\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let seen = response.split_once("\r\n\r\n").map(|(_, b)| b.to_ascii_lowercase()).unwrap_or_default();
    assert!(seen.contains("content-length: 0\r\n"), "{response}");
    assert!(!seen.contains("transfer-encoding"), "{response}");
    assert!(seen.contains("host: api.moby.localhost\r\n"), "{response}");

    // Chunked stays chunked, with the body intact.
    let response = exchange(&proxy, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{response}");
    assert!(response.ends_with("--body--hello world"), "{response}");

    // Repeated header lines stay separate lines, in order.
    let response = exchange(&proxy, "POST /echo HTTP/1.1\r\nHost: x\r\nX-Docker-Expose-Session-Grpc-Method: /a\r\nX-Docker-Expose-Session-Grpc-Method: /b\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let lower = response.to_ascii_lowercase();
    let first = lower.find("x-docker-expose-session-grpc-method: /a\r\n").expect(&response);
    let second = lower.find("x-docker-expose-session-grpc-method: /b\r\n").expect(&response);
    assert!(first < second);

    // A client without Host (HTTP/1.0) still gets one upstream.
    let response = exchange(&proxy, "GET /echo HTTP/1.0\r\n\r\n");
    assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
    assert!(response.to_ascii_lowercase().contains("host: api.moby.localhost"), "{response}");
    // Engine headers come back in Go's canonical casing.
    assert!(response.contains("Api-Version: 1.41\r\n"), "{response}");
    assert!(response.contains("Ostype: linux\r\n"), "{response}");
}

#[test]
fn response_framing_is_kept() {
    let engine = FakeEngine::start();
    let proxy = engine.proxy();
    let response = exchange(&proxy, "GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(response.contains("Transfer-Encoding: chunked\r\n"), "{response}");
    assert!(response.contains("{}\n\r\n") && response.ends_with("0\r\n\r\n"), "{response}");

    let response = exchange(
        &proxy,
        "POST /no-content HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 204 No Content\r\n"), "{response}");
    assert!(!response.to_ascii_lowercase().contains("content-length"), "{response}");
    assert!(response.ends_with("\r\n\r\n"), "{response}");

    let response = exchange(
        &proxy,
        "POST /not-modified HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\n"), "{response}");

    let response = exchange(&proxy, "HEAD /head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(response.contains("Content-Length: 2\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\n"), "HEAD must have no body: {response}");

    let response = exchange(&proxy, "GET /split HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(response.ends_with("{\"split\":\"reads\"}"), "{response}");
}

#[test]
fn response_head_is_relayed_before_the_body() {
    let engine = FakeEngine::start();
    let proxy = engine.proxy();
    let mut stream = UnixStream::connect(&proxy.socket).expect("connect");
    let started = Instant::now();
    stream
        .write_all(b"POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    let head_after = started.elapsed();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(head_after < Duration::from_millis(700), "head took {head_after:?}");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("rest");
    assert!(rest.contains("{\"StatusCode\":0}"), "{rest}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn hijack_without_upgrade_is_answered_close_delimited() {
    let engine = FakeEngine::start();
    let proxy = engine.proxy();
    let response = exchange(&proxy, "POST /hijack-200 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    let (head, body) = response.split_once("\r\n\r\n").expect(&response);
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{response}");
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("content-length") && !lower.contains("transfer-encoding"), "{response}");
    assert!(head.contains("Content-Type: application/vnd.docker.raw-stream"), "{response}");
    assert_eq!(body, "raw stream bytes");
}

#[test]
fn upgrade_keeps_head_read_ahead_and_half_close() {
    let engine = FakeEngine::start();
    let proxy = engine.proxy();
    let mut stream = UnixStream::connect(&proxy.socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    // A body on the upgrade request (like exec start), nothing sent after it yet.
    stream
        .write_all(b"POST /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        .expect("write");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("head");
        head.push_str(&line);
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: tcp\r\n") && lower.contains("connection: upgrade\r\n"), "{head}");
    assert!(!lower.contains("content-length") && !lower.contains("transfer-encoding"), "{head}");
    assert!(head.contains("Content-Type: application/vnd.docker.multiplexed-stream"), "{head}");

    stream.write_all(b"ping").expect("write");
    stream.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("rest");
    assert_eq!(rest, "early|PING|after-eof");
}

/// docker-py loses stream bytes that arrive in the same read as the 101 head
/// (docker-py#3332). The fake engine sends both in one write; a client that
/// reads late must still find the head alone in its first read.
#[test]
fn a_late_reader_gets_the_101_head_apart_from_the_stream() {
    let engine = FakeEngine::start();
    let proxy = engine.proxy();
    let mut stream = UnixStream::connect(&proxy.socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream
        .write_all(b"POST /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n")
        .expect("write");
    // Long enough for the proxy to have everything from the engine.
    std::thread::sleep(Duration::from_millis(100));
    let mut first = vec![0u8; 64 << 10];
    let n = stream.read(&mut first).expect("read");
    let first = text(&first[..n]);
    assert!(first.starts_with("HTTP/1.1 101 ") && first.ends_with("\r\n\r\n"), "first read: {first:?}");
    let mut rest = vec![0u8; 64];
    let n = stream.read(&mut rest).expect("read");
    assert_eq!(text(&rest[..n]), "early|");
}

#[test]
fn engine_garbage_becomes_a_json_error_and_the_proxy_keeps_serving() {
    let engine = FakeEngine::start();
    let proxy = engine.proxy();
    let response = exchange(&proxy, "GET /garbage HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{response}");
    assert!(response.contains("Content-Type: application/json"), "{response}");
    assert!(
        response.contains("{\"message\":\"offload: the connection to the Docker engine at unix://"),
        "{response}"
    );
    let response = exchange(&proxy, "GET /missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    // The next request is served normally: one bad answer harmed nobody else.
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert!(response.ends_with("{\"message\":\"page not found\"}\n"), "{response}");
}

#[test]
fn client_disconnect_cancels_the_upstream_stream() {
    let engine = FakeEngine::start();
    let proxy = engine.proxy();
    let mut stream = UnixStream::connect(&proxy.socket).expect("connect");
    stream.write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut first = [0u8; 64];
    let n = stream.read(&mut first).expect("head");
    assert!(text(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(stream);
    let marker = engine.dir().join("hold-closed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(marker.exists(), "the engine-side stream was not closed");
}
