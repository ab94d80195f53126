//! Byte streams carried on HTTP/2 bodies: a body read as `AsyncRead`, and an
//! `AsyncWrite` that feeds a body. Shutting the writer down ends the body
//! (END_STREAM): that is how a half-close crosses the link.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::body::BoxError;

/// Frames in flight between a writer and its body; HTTP/2 flow control does
/// the real pacing, this only bounds what sits in memory.
const CHANNEL_FRAMES: usize = 4;

/// Reads the data frames of a body as a byte stream; the body's end is EOF.
pub struct BodyReader<B> {
    body: B,
    pending: Bytes,
}

impl<B> BodyReader<B> {
    pub fn new(body: B) -> Self {
        Self { body, pending: Bytes::new() }
    }

    /// Starts with bytes already taken from the body.
    pub fn with_prefix(body: B, pending: Bytes) -> Self {
        Self { body, pending }
    }
}

impl<B> AsyncRead for BodyReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error.into()))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending = data;
                    }
                }
            }
        }
    }
}

/// The body of an answer still to come, read as a byte stream once it is
/// here; a failed answer is a read error (and every read after it fails).
pub struct AnswerReader<B> {
    state: AnswerState<B>,
}

type PendingAnswer<B> = Pin<Box<dyn std::future::Future<Output = io::Result<B>> + Send>>;

enum AnswerState<B> {
    Waiting(PendingAnswer<B>),
    Reading(BodyReader<B>),
    Failed,
}

impl<B> AnswerReader<B> {
    pub fn new(answer: PendingAnswer<B>) -> Self {
        Self { state: AnswerState::Waiting(answer) }
    }
}

impl<B> AsyncRead for AnswerReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                AnswerState::Reading(reader) => return Pin::new(reader).poll_read(cx, buf),
                AnswerState::Failed => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the stream failed")))
                }
                AnswerState::Waiting(answer) => match ready!(answer.as_mut().poll(cx)) {
                    Ok(body) => self.state = AnswerState::Reading(BodyReader::new(body)),
                    Err(error) => {
                        self.state = AnswerState::Failed;
                        return Poll::Ready(Err(error));
                    }
                },
            }
        }
    }
}

/// A body fed by a [`BodyWriter`].
pub struct ChannelBody {
    frames: mpsc::Receiver<Bytes>,
    /// Tells the writer's owner how the body went: sent `()` at its end,
    /// dropped unsent when the body is dropped before it (a reset).
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(self.frames.poll_recv(cx));
        if frame.is_none() {
            if let Some(ended) = self.ended.take() {
                let _ = ended.send(());
            }
        }
        Poll::Ready(frame.map(|data| Ok(Frame::data(data))))
    }
}

/// Writes into a [`ChannelBody`]; shutdown ends the body.
pub struct BodyWriter {
    frames: PollSender<Bytes>,
}

/// A connected writer and body.
pub fn channel() -> (BodyWriter, ChannelBody) {
    let (sender, receiver) = mpsc::channel(CHANNEL_FRAMES);
    (BodyWriter { frames: PollSender::new(sender) }, ChannelBody { frames: receiver, ended: None })
}

/// The same, and a receiver that fails if the body is dropped before its
/// end: hyper drops a response body when the peer resets its stream, which an
/// idle writer would otherwise notice only at its next write.
pub fn channel_noticing_drop() -> (BodyWriter, ChannelBody, tokio::sync::oneshot::Receiver<()>) {
    let (writer, mut body) = channel();
    let (ended, notice) = tokio::sync::oneshot::channel();
    body.ended = Some(ended);
    (writer, body, notice)
}

impl BodyWriter {
    fn closed() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the stream's reader has gone")
    }
}

impl AsyncWrite for BodyWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.frames.poll_reserve(cx)).map_err(|_| Self::closed())?;
        self.frames.send_item(Bytes::copy_from_slice(buf)).map_err(|_| Self::closed())?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.frames.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_answer_reader_waits_for_its_body_and_reports_a_refusal() {
        let (mut writer, body) = channel();
        let answer: PendingAnswer<ChannelBody> = Box::pin(async move { Ok(body) });
        let mut reader = AnswerReader::new(answer);
        writer.write_all(b"late body").await.unwrap();
        writer.shutdown().await.unwrap();
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"late body");

        let refused: PendingAnswer<ChannelBody> =
            Box::pin(async { Err(io::Error::new(io::ErrorKind::ConnectionRefused, "403")) });
        let mut reader = AnswerReader::new(refused);
        let mut buf = [0u8; 8];
        assert_eq!(reader.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(reader.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_noticed() {
        let (_writer, body, notice) = channel_noticing_drop();
        drop(body);
        assert!(notice.await.is_err(), "dropped unsent with the body");

        let (mut writer, body, notice) = channel_noticing_drop();
        writer.write_all(b"x").await.unwrap();
        writer.shutdown().await.unwrap();
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"x");
        assert!(notice.await.is_ok(), "a body that ended is no reset");
    }

    #[tokio::test]
    async fn writer_feeds_reader_and_shutdown_is_end_of_stream() {
        let (mut writer, body) = channel();
        let mut reader = BodyReader::with_prefix(body, Bytes::from_static(b"prefix:"));
        let producer = tokio::spawn(async move {
            for i in 0..100 {
                writer.write_all(format!("{i},").as_bytes()).await.unwrap();
            }
            writer.shutdown().await.unwrap();
        });
        let mut text = String::new();
        reader.read_to_string(&mut text).await.unwrap();
        producer.await.unwrap();
        let expected: String = (0..100).map(|i| format!("{i},")).collect();
        assert_eq!(text, format!("prefix:{expected}"));
    }

    #[tokio::test]
    async fn writing_after_the_body_is_dropped_fails() {
        let (mut writer, body) = channel();
        drop(body);
        assert!(writer.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn channel_body_collects() {
        let (mut writer, body) = channel();
        tokio::spawn(async move {
            writer.write_all(b"abc").await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abc");
    }
}
