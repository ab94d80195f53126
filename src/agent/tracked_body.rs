//! Response bodies that keep the agent's books: one holds an activity guard
//! until the body is finished or dropped; one lets a callback read what went
//! by (bounded), for responses whose content says what was created.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::session::ActivityGuard;
use crate::body::{Body, BodyError};

/// How much of a response `Inspected` keeps for its callback.
const INSPECT_LIMIT: usize = 256 << 10;

pub struct Guarded {
    inner: Body,
    guard: Option<ActivityGuard>,
}

impl Guarded {
    pub fn new(inner: Body, guard: ActivityGuard) -> Self {
        Self { inner, guard: Some(guard) }
    }
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type Callback = Box<dyn FnOnce(&[u8]) + Send + Sync>;

pub struct Inspected {
    inner: Body,
    seen: Vec<u8>,
    on_end: Option<Callback>,
}

impl Inspected {
    pub fn new(inner: Body, on_end: impl FnOnce(&[u8]) + Send + Sync + 'static) -> Self {
        Self { inner, seen: Vec::new(), on_end: Some(Box::new(on_end)) }
    }
}

impl HttpBody for Inspected {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let room = INSPECT_LIMIT.saturating_sub(self.seen.len());
                    let take = data.len().min(room);
                    self.seen.extend_from_slice(&data[..take]);
                }
            }
            Poll::Ready(None) => {
                if let Some(callback) = self.on_end.take() {
                    callback(&self.seen);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
