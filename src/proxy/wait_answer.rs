//! The `wait` answer when the upstream fails before the engine has answered.
//!
//! `docker run` learns the container's exit code from a `wait` whose 200 head
//! went out long before its one JSON line. If the link (or the engine
//! connection) dies in between, a bare cut makes the CLI print `error waiting
//! for container: unexpected EOF`, which says nothing about why. The engine's
//! own way to report a failed wait is a result with `Error.Message`, which
//! every client shows (the CLI: `Error waiting for container: ...`, exit 125;
//! docker-py and bollard: an error result), so that is what the client gets.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::body::{self, Body, BodyError};

/// Wraps a wait answer's body: a failure before its first byte becomes a
/// wait result that names the failure, and the body then ends cleanly.
pub fn explain_failures(inner: Body, upstream: String) -> Body {
    body::stream(ExplainedWait { inner, upstream, answered: false, done: false })
}

/// The wait result for a failure; `StatusCode` -1 so that code reading only
/// the status (scripts, bollard) does not take it for a clean exit.
pub fn failure_result(upstream: &str, reason: &str) -> Bytes {
    let message = format!(
        "offload: the connection to {upstream} was lost while waiting for the container ({reason}); \
         it may still be running there: `docker ps` reconnects and shows it"
    );
    let result = serde_json::json!({"Error": {"Message": message}, "StatusCode": -1});
    let mut line = serde_json::to_vec(&result).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

struct ExplainedWait {
    inner: Body,
    upstream: String,
    /// A byte of the engine's answer went out: a later failure is relayed as is.
    answered: bool,
    done: bool,
}

impl http_body::Body for ExplainedWait {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Err(error)) if !this.answered => {
                tracing::warn!(upstream = %this.upstream, %error, "a wait lost its upstream; telling the client");
                this.done = true;
                let chain = crate::upstream::error_chain(&error);
                // rustls appends a documentation link; the client needs the cause only.
                let reason = chain.split(": https://").next().unwrap_or(&chain);
                Poll::Ready(Some(Ok(Frame::data(failure_result(&this.upstream, reason)))))
            }
            Some(Ok(frame)) => {
                this.answered |= frame.data_ref().is_some_and(|d| !d.is_empty());
                Poll::Ready(Some(Ok(frame)))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        // The length changes when a failure is explained; never promise one.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body_of(frames: Vec<Result<Frame<Bytes>, BodyError>>) -> Body {
        body::stream(StreamBody::new(futures_util::stream::iter(frames)))
    }

    fn failure() -> BodyError {
        BodyError("stream reset by the agent".into())
    }

    #[tokio::test]
    async fn a_failure_before_the_answer_becomes_a_wait_error() {
        let wrapped =
            explain_failures(body_of(vec![Err(failure())]), "the offload agent at tls://h:1".into());
        let bytes = wrapped.collect().await.expect("ends cleanly").to_bytes();
        let result: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(result["StatusCode"], -1);
        let message = result["Error"]["Message"].as_str().unwrap_or_default();
        assert!(message.contains("tls://h:1") && message.contains("stream reset"), "{message}");
        assert!(bytes.ends_with(b"\n"));
    }

    #[tokio::test]
    async fn a_real_answer_passes_unchanged() {
        let answer = Bytes::from_static(b"{\"StatusCode\":3}\n");
        let wrapped = explain_failures(body_of(vec![Ok(Frame::data(answer.clone()))]), "x".into());
        assert_eq!(wrapped.collect().await.expect("ok").to_bytes(), answer);
    }

    #[tokio::test]
    async fn a_failure_after_the_answer_began_stays_a_failure() {
        let frames = vec![Ok(Frame::data(Bytes::from_static(b"{\"Status"))), Err(failure())];
        assert!(explain_failures(body_of(frames), "x".into()).collect().await.is_err());
    }
}
