//! Byte streams carried on HTTP/2 bodies: a body read as `AsyncRead`, and an
//! `AsyncWrite` that feeds a body. Shutting the writer down ends the body
//! (END_STREAM): that is how a half-close crosses the link. A writer dropped
//! without that ends its body with an error, which hyper sends as RST_STREAM:
//! an abort crosses the link as an abort, not as a clean end.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::PollSender;

use crate::body::BoxError;
use crate::splice::{splice_chunks, ChunkSink, ChunkSource, OnBrokenPipe, Spliced};

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

impl<B> ChunkSource for BodyReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => return Poll::Ready(Ok(None)),
                Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error.into()))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Poll::Ready(Ok(Some(data)));
                        }
                    }
                }
            }
        }
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
        if self.pending.is_empty() {
            match ready!(self.poll_chunk(cx))? {
                Some(chunk) => self.pending = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
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

impl<B> AnswerReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The body, once the answer is here.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut BodyReader<B>>> {
        if let AnswerState::Waiting(answer) = &mut self.state {
            match ready!(answer.as_mut().poll(cx)) {
                Ok(body) => self.state = AnswerState::Reading(BodyReader::new(body)),
                Err(error) => {
                    self.state = AnswerState::Failed;
                    return Poll::Ready(Err(error));
                }
            }
        }
        match &mut self.state {
            AnswerState::Reading(reader) => Poll::Ready(Ok(reader)),
            _ => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the stream failed"))),
        }
    }
}

impl<B> ChunkSource for AnswerReader<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        ready!(self.poll_body(cx))?.poll_chunk(cx)
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
        Pin::new(ready!(self.poll_body(cx))?).poll_read(cx, buf)
    }
}

/// A body fed by a [`BodyWriter`].
pub struct ChannelBody {
    frames: mpsc::Receiver<Bytes>,
    /// Tells the writer's owner how the body went: sent `()` at its end,
    /// dropped unsent when the body is dropped before it (a reset).
    ended: Option<tokio::sync::oneshot::Sender<()>>,
    shared: Arc<Shared>,
    aborted: bool,
}

/// What a writer and its body know of each other.
#[derive(Default)]
struct Shared {
    /// Set by the writer's close: without it, the channel's end is an abort.
    closed: AtomicBool,
    /// The body is done: it yielded its end, or hyper dropped it (its stream
    /// is over either way).
    settled: AtomicBool,
    settled_notice: Notify,
}

impl Shared {
    fn settle(&self) {
        self.settled.store(true, Ordering::Release);
        self.settled_notice.notify_waiters();
    }
}

impl Drop for ChannelBody {
    fn drop(&mut self) {
        self.shared.settle();
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(self.frames.poll_recv(cx)) {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None if self.shared.closed.load(Ordering::Acquire) => {
                if let Some(ended) = self.ended.take() {
                    let _ = ended.send(());
                }
                self.shared.settle();
                Poll::Ready(None)
            }
            None if self.aborted => Poll::Ready(None),
            None => {
                // Reported once; hyper then resets the stream.
                self.aborted = true;
                self.ended = None;
                Poll::Ready(Some(Err("the stream was aborted".into())))
            }
        }
    }
}

/// Writes into a [`ChannelBody`]; shutdown ends the body, dropping the writer
/// without it aborts the body.
pub struct BodyWriter {
    frames: PollSender<Bytes>,
    shared: Arc<Shared>,
    on_abort: Option<(Box<dyn FnOnce() + Send>, Duration)>,
}

/// How long a shut-down writer's body may take to leave after the writer is
/// dropped before its stream counts as stuck (see [`BodyWriter::on_abort`]).
const DELIVERY_GRACE: Duration = Duration::from_secs(5);

/// A connected writer and body.
pub fn channel() -> (BodyWriter, ChannelBody) {
    let (sender, receiver) = mpsc::channel(CHANNEL_FRAMES);
    let shared = Arc::new(Shared::default());
    (
        BodyWriter { frames: PollSender::new(sender), shared: shared.clone(), on_abort: None },
        ChannelBody { frames: receiver, ended: None, shared, aborted: false },
    )
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

    /// Runs `hook` when the writer is dropped and its body did not end: at
    /// once if the writer was not shut down (an abort), or if it was but the
    /// body has not left within [`DELIVERY_GRACE`]. hyper sends a body's
    /// error as RST_STREAM, and its end as END_STREAM, only once the stream
    /// has flow-control window, which a peer whose program stopped reading
    /// never gives: the hook tells the peer apart.
    pub fn on_abort(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.on_abort = Some((Box::new(hook), DELIVERY_GRACE));
    }

    #[cfg(test)]
    fn on_abort_after(&mut self, grace: Duration, hook: impl FnOnce() + Send + 'static) {
        self.on_abort = Some((Box::new(hook), grace));
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        let Some((hook, grace)) = self.on_abort.take() else { return };
        if self.shared.settled.load(Ordering::Acquire) {
            return;
        }
        if !self.shared.closed.load(Ordering::Acquire) {
            return hook();
        }
        // Shut down: its end may be a moment from leaving, or stuck.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let shared = self.shared.clone();
        runtime.spawn(async move {
            let settled = shared.settled_notice.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if shared.settled.load(Ordering::Acquire) {
                return;
            }
            if tokio::time::timeout(grace, settled).await.is_err() {
                hook();
            }
        });
    }
}

impl ChunkSink for BodyWriter {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.frames.poll_reserve(cx).map_err(|_| Self::closed())
    }

    fn send(&mut self, chunk: Bytes) -> io::Result<()> {
        self.frames.send_item(chunk).map_err(|_| Self::closed())
    }

    fn close(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // A slot reserved and not used holds the channel open: give it back.
        self.frames.abort_send();
        self.frames.close();
    }
}

/// The two bodies of a link stream: what comes in, and the writer of what
/// goes out. [`LinkStream::splice`] relays them with a socket without copies.
pub struct LinkStream<R> {
    pub reader: R,
    pub writer: BodyWriter,
}

impl<R: ChunkSource> LinkStream<R> {
    pub async fn splice<S>(&mut self, socket: &mut S) -> io::Result<Spliced>
    where
        S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        self.splice_with(socket, OnBrokenPipe::EndSplice).await
    }

    pub async fn splice_with<S>(
        &mut self,
        socket: &mut S,
        on_broken_pipe: OnBrokenPipe,
    ) -> io::Result<Spliced>
    where
        S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        splice_chunks(socket, &mut self.reader, &mut self.writer, on_broken_pipe).await
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
        ChunkSink::close(&mut *self);
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
    async fn a_link_stream_splices_a_socket_both_ways_with_half_close() {
        let (outgoing_writer, outgoing_body) = channel();
        let (mut incoming_writer, incoming_body) = channel();
        let mut link = LinkStream { reader: BodyReader::new(incoming_body), writer: outgoing_writer };
        let (mut app, mut socket) = tokio::io::duplex(4096);
        let relay = tokio::spawn(async move { link.splice(&mut socket).await });

        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let collector = tokio::spawn(async move { outgoing_body.collect().await.map(|c| c.to_bytes()) });
        app.write_all(&sent).await.unwrap();
        app.shutdown().await.unwrap();
        let got = collector.await.unwrap().unwrap();
        assert!(got == expected, "the body carries every byte in order, then ends");

        // The other direction still flows after the half-close.
        incoming_writer.write_all(b"answer").await.unwrap();
        incoming_writer.shutdown().await.unwrap();
        let mut answer = Vec::new();
        app.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        let counts = relay.await.unwrap().unwrap();
        assert_eq!(counts, Spliced { a_to_b: 6, b_to_a: 3_000_000 });
    }

    /// A program that exits while its stdin still flows (`docker run -i ...
    /// head -c 5`): its last output still reaches the link, and ends cleanly.
    #[tokio::test]
    async fn a_peer_that_stops_reading_still_has_its_output_relayed() {
        let (outgoing_writer, outgoing_body) = channel();
        let (mut incoming_writer, incoming_body) = channel();
        let mut link = LinkStream { reader: BodyReader::new(incoming_body), writer: outgoing_writer };
        let (mut socket, mut program) = tokio::net::UnixStream::pair().unwrap();
        program.write_all(b"last output").await.unwrap();
        drop(program);
        incoming_writer.write_all(b"more stdin").await.unwrap();

        let error = link
            .splice_with(&mut socket, OnBrokenPipe::FinishOtherWay)
            .await
            .expect_err("the program did not take its stdin");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe, "{error}");
        drop(link);
        let output = outgoing_body.collect().await.expect("a clean end").to_bytes();
        assert_eq!(&output[..], b"last output");
    }

    #[tokio::test]
    async fn a_writer_dropped_without_shutdown_aborts_its_body() {
        let (mut writer, body, notice) = channel_noticing_drop();
        writer.write_all(b"partial").await.unwrap();
        drop(writer);
        let error = body.collect().await.expect_err("an abort is no clean end");
        assert!(error.to_string().contains("aborted"), "{error}");
        assert!(notice.await.is_err(), "an aborted body did not end");

        // The abort is reported once, and the frames before it are delivered.
        let (mut writer, mut body) = channel();
        writer.write_all(b"a").await.unwrap();
        drop(writer);
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"a"[..]));
        assert!(body.frame().await.expect("the abort").is_err());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn the_abort_hook_runs_only_for_a_body_that_did_not_end() {
        let grace = Duration::from_millis(100);
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hook = |runs: &Arc<std::sync::atomic::AtomicUsize>| {
            let runs = runs.clone();
            move || {
                runs.fetch_add(1, Ordering::SeqCst);
            }
        };
        let count = || runs.load(Ordering::SeqCst);

        // Shut down and delivered: a clean end.
        let (mut writer, body) = channel();
        writer.on_abort_after(grace, hook(&runs));
        writer.write_all(b"x").await.unwrap();
        writer.shutdown().await.unwrap();
        drop(writer);
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"x");
        tokio::time::sleep(grace * 3).await;
        assert_eq!(count(), 0, "a delivered end is no abort");

        // The body gone first (its stream ended): nothing to abort.
        let (mut writer, body) = channel();
        writer.on_abort_after(grace, hook(&runs));
        drop(body);
        drop(writer);
        assert_eq!(count(), 0);

        // Dropped unshut: an abort, at once.
        let (mut writer, _body) = channel();
        writer.on_abort_after(grace, hook(&runs));
        writer.write_all(b"x").await.unwrap();
        drop(writer);
        assert_eq!(count(), 1);

        // Shut down, but its end never leaves (nobody polls the body): an
        // abort once the grace is over, not before.
        let (mut writer, _held) = channel();
        writer.on_abort_after(grace, hook(&runs));
        writer.shutdown().await.unwrap();
        drop(writer);
        assert_eq!(count(), 1);
        tokio::time::sleep(grace * 3).await;
        assert_eq!(count(), 2);
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
