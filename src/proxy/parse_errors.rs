//! Gives hyper's automatic answers to unparsable requests a Docker-style body.
//!
//! When a request cannot be parsed (garbage, a bad URI, headers over the
//! limit), hyper answers by itself with a bare `400`/`414`/`431` and closes the
//! connection; the service never sees the request. Docker clients print the
//! body of an error, so an empty one tells the user nothing. This wrapper sits
//! under hyper on the client connection and swaps exactly those heads (a 4xx
//! whose only headers are hyper's own length/date/connection) for the same
//! status with a JSON message. Everything else passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::docker::error::error_json;

pin_project_lite::pin_project! {
    pub struct JsonParseErrors<T> {
        #[pin]
        inner: T,
        pending: Bytes,
    }
}

impl<T> JsonParseErrors<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, pending: Bytes::new() }
    }
}

impl<T: AsyncWrite> JsonParseErrors<T> {
    fn poll_drain(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        while !this.pending.is_empty() {
            let n = ready!(this.inner.as_mut().poll_write(cx, this.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead> AsyncRead for JsonParseErrors<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.as_mut().poll_drain(cx))?;
        if let Some(replacement) = replace_automatic_error(buf) {
            *self.as_mut().project().pending = replacement;
            // The replacement is written on the next poll (hyper flushes next).
            return Poll::Ready(Ok(buf.len()));
        }
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.as_mut().poll_drain(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if let Some(replacement) = replace_automatic_error(first) {
                *self.as_mut().project().pending = replacement;
                return Poll::Ready(Ok(first.len()));
            }
        }
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_drain(cx))?;
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_drain(cx))?;
        self.project().inner.poll_shutdown(cx)
    }
}

pub const HEADERS_TOO_LARGE: &str =
    "the request's headers are too large (the limit is 1 MiB); send fewer or smaller headers";

/// The size of a request's head as it arrived (request line, header lines,
/// blank line). hyper refuses a head larger than its buffer only when the
/// buffer fills before the head is complete: one read can take it past the
/// limit with the whole head in, so the limit is checked again here.
pub fn head_size(method: &http::Method, uri: &http::Uri, headers: &http::HeaderMap) -> usize {
    let target = uri.scheme_str().map_or(0, |scheme| scheme.len() + 3)
        + uri.authority().map_or(0, |authority| authority.as_str().len())
        + uri.path_and_query().map_or(0, |path| path.as_str().len());
    let request_line = method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let header_lines: usize =
        headers.iter().map(|(name, value)| name.as_str().len() + 2 + value.len() + 2).sum();
    request_line + header_lines + 2
}

/// If `written` is one of hyper's automatic error heads, the full replacement
/// response (head and JSON body); otherwise `None`.
pub fn replace_automatic_error(written: &[u8]) -> Option<Bytes> {
    if !(written.starts_with(b"HTTP/1.1 4") || written.starts_with(b"HTTP/1.0 4")) {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(written) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if head_len != written.len() {
        return None;
    }
    let only_hypers_own = response.headers.iter().all(|h| {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "content-length" => h.value == b"0",
            "date" | "connection" => true,
            _ => false,
        }
    });
    if !only_hypers_own {
        return None;
    }
    let code = response.code?;
    let message = match code {
        431 => HEADERS_TOO_LARGE,
        414 => "the request's URI is too long; send large parameters in the request body instead",
        _ => "the request is not valid HTTP/1.1 (bad request line, header or URI); check the client that sent it",
    };
    let body = error_json(message);
    let version = if written.starts_with(b"HTTP/1.0") { "HTTP/1.0" } else { "HTTP/1.1" };
    let reason = response.reason.unwrap_or("");
    let head = format!(
        "{version} {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_size_counts_the_request_line_and_every_header_line() {
        let mut headers = http::HeaderMap::new();
        headers.insert("host", http::HeaderValue::from_static("x"));
        headers.insert("x-filler", http::HeaderValue::from_static("aaaa"));
        let size = head_size(&http::Method::GET, &"/_ping".parse().unwrap(), &headers);
        assert_eq!(size, "GET /_ping HTTP/1.1\r\nhost: x\r\nx-filler: aaaa\r\n\r\n".len());
    }

    #[test]
    fn replaces_hypers_bare_error_heads() {
        let head =
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nDate: Thu, 03 Dec 2026 17:00:00 GMT\r\n\r\n";
        let out = replace_automatic_error(head).expect("replaced");
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"));
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(json["message"].as_str().unwrap().starts_with("offload: the request is not valid"));
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));

        let too_large = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let text = String::from_utf8(replace_automatic_error(too_large).unwrap().to_vec()).unwrap();
        assert!(text.contains("too large"));
    }

    #[test]
    fn leaves_real_responses_alone() {
        // A forwarded engine error carries its own headers and body.
        let engine = b"HTTP/1.1 400 Bad Request\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n";
        assert!(replace_automatic_error(engine).is_none());
        // Head and body in one write: not a bare head.
        let with_body = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}";
        assert!(replace_automatic_error(with_body).is_none());
        assert!(replace_automatic_error(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").is_none());
        assert!(replace_automatic_error(b"some body bytes").is_none());
    }
}
