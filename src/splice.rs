//! The one place bytes are pumped between two streams (hijacked connections).
//!
//! Like `tokio::io::copy_bidirectional`, EOF in one direction becomes a
//! half-close (shutdown of the write side) in that direction only, and the
//! other direction keeps flowing until its own EOF: `docker exec` without `-i`
//! half-closes at once and still reads all output. Unlike it, buffers start
//! small and grow only for streams that move data, so a thousand idle
//! attaches cost little memory.
//!
//! With [`OnBrokenPipe::FinishOtherWay`], a write that fails with a broken
//! pipe (the engine stopped reading the stdin of a container that exited)
//! ends that direction only: what the peer still sends, its last output
//! first of all, is relayed to its end before the splice reports the
//! failure. Any other error ends both directions at once, and so does a
//! broken pipe by default: a port's relay could otherwise wait forever on a
//! direction that nobody will end.
//!
//! [`splice_chunks`] does the same between a socket and a source and sink of
//! owned chunks (the two HTTP/2 bodies of a link stream): the socket is read
//! straight into the chunks that go out, and the chunks that come in are
//! written straight to the socket, with no copy in between.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const INITIAL_BUFFER: usize = 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Byte counts moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// What a write that fails with a broken pipe ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum OnBrokenPipe {
    /// The whole splice, at once.
    #[default]
    EndSplice,
    /// That direction only; the other relays to its own end first.
    FinishOtherWay,
}

/// Relays `a` ⇄ `b` until both directions reached EOF, or one failed.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_with(a, b, OnBrokenPipe::EndSplice).await
}

/// The same, with a broken pipe handled as `on_broken_pipe` says.
pub async fn splice_with<A, B>(a: &mut A, b: &mut B, on_broken_pipe: OnBrokenPipe) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Pipe { on_broken_pipe, ..Pipe::default() };
    let mut b_to_a = Pipe { on_broken_pipe, ..Pipe::default() };
    poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, &mut *a, &mut *b)?;
        let backward = b_to_a.poll_copy(cx, &mut *b, &mut *a)?;
        match (forward, backward) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok::<(), io::Error>(())),
            _ => Poll::Pending,
        }
    })
    .await?;
    first_broken(&mut a_to_b.broken, &mut b_to_a.broken)?;
    Ok(Spliced { a_to_b: a_to_b.total, b_to_a: b_to_a.total })
}

/// Bytes that arrive as chunks the reader may keep (an HTTP/2 body).
pub trait ChunkSource {
    /// The next non-empty chunk; `None` at the end.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>;
}

/// A sink that takes chunks by value (the writer of an HTTP/2 body).
pub trait ChunkSink {
    /// Ready when the sink has room for one more chunk.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Sends one chunk; only after `poll_ready` answered ready.
    fn send(&mut self, chunk: Bytes) -> io::Result<()>;
    /// Ends the stream (the half-close).
    fn close(&mut self);
}

/// Relays `socket` → `sink` and `source` → `socket` until both directions
/// reached their end, or one failed; half-closes like [`splice`]. In the
/// counts, `a` is the chunk side and `b` the socket.
pub async fn splice_chunks<S, R, W>(
    socket: &mut S,
    source: &mut R,
    sink: &mut W,
    on_broken_pipe: OnBrokenPipe,
) -> io::Result<Spliced>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    R: ChunkSource + ?Sized,
    W: ChunkSink + ?Sized,
{
    let mut outgoing = IntoChunks { on_broken_pipe, ..IntoChunks::default() };
    let mut incoming = FromChunks { on_broken_pipe, ..FromChunks::default() };
    poll_fn(|cx| {
        // Incoming first: a refusal in the answer explains a sink that closed.
        let back = incoming.poll_pump(cx, &mut *source, &mut *socket)?;
        let out = outgoing.poll_pump(cx, &mut *socket, &mut *sink)?;
        match (out, back) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok::<(), io::Error>(())),
            _ => Poll::Pending,
        }
    })
    .await?;
    first_broken(&mut incoming.broken, &mut outgoing.broken)?;
    Ok(Spliced { a_to_b: incoming.total, b_to_a: outgoing.total })
}

/// A write's failure that ends only its direction (`Ok`); any other is
/// returned at once.
fn broken_pipe(error: io::Error, on_broken_pipe: OnBrokenPipe) -> Result<io::Error, io::Error> {
    if on_broken_pipe == OnBrokenPipe::FinishOtherWay && error.kind() == io::ErrorKind::BrokenPipe {
        Ok(error)
    } else {
        Err(error)
    }
}

/// The splice's outcome once both directions ended: a broken pipe in either
/// is still a failure (the peer did not take everything it was sent).
fn first_broken(one: &mut Option<io::Error>, other: &mut Option<io::Error>) -> io::Result<()> {
    match one.take().or_else(|| other.take()) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Socket → sink: reads into the free end of a buffer and sends what each
/// read got as a chunk of it (no copy); a busy stream reads a lot at once.
struct IntoChunks {
    buffer: BytesMut,
    /// Room wanted for the next read; grows while reads come back full,
    /// shrinks again when they come back small (a burst that ended).
    read_size: usize,
    finished: bool,
    /// The sink's reader went away (see the module's note on broken pipes).
    broken: Option<io::Error>,
    on_broken_pipe: OnBrokenPipe,
    total: u64,
}

impl Default for IntoChunks {
    fn default() -> Self {
        Self {
            buffer: BytesMut::new(),
            read_size: INITIAL_BUFFER,
            finished: false,
            broken: None,
            on_broken_pipe: OnBrokenPipe::EndSplice,
            total: 0,
        }
    }
}

impl IntoChunks {
    fn poll_pump<S, W>(&mut self, cx: &mut Context<'_>, socket: &mut S, sink: &mut W) -> Poll<io::Result<()>>
    where
        S: AsyncRead + Unpin + ?Sized,
        W: ChunkSink + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Read only what the sink can take: its backpressure is ours.
            if let Err(error) = ready!(sink.poll_ready(cx)) {
                return self.stop(error);
            }
            // Every read gets its full size: reads cut short by a nearly used
            // buffer cost more syscalls and smaller frames than the memory saved.
            if self.buffer.capacity() < self.read_size {
                self.buffer.reserve(self.read_size);
            }
            let room = self.buffer.capacity();
            let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *socket), cx, &mut self.buffer))?;
            if n == 0 {
                sink.close();
                self.finished = true;
                self.buffer = BytesMut::new();
                return Poll::Ready(Ok(()));
            }
            if n == room && self.read_size < MAX_BUFFER {
                self.read_size *= 4;
            } else if n < self.read_size / 16 && self.read_size > INITIAL_BUFFER {
                self.read_size /= 4;
            }
            self.total += n as u64;
            if let Err(error) = sink.send(self.buffer.split().freeze()) {
                return self.stop(error);
            }
        }
    }

    /// Ends this direction after the sink failed: for good if its reader
    /// went away, the whole splice otherwise.
    fn stop(&mut self, error: io::Error) -> Poll<io::Result<()>> {
        self.broken = Some(broken_pipe(error, self.on_broken_pipe)?);
        self.finished = true;
        self.buffer = BytesMut::new();
        Poll::Ready(Ok(()))
    }
}

/// Source → socket: writes each chunk as it came.
#[derive(Default)]
struct FromChunks {
    pending: Bytes,
    source_done: bool,
    needs_flush: bool,
    finished: bool,
    /// The socket's peer stopped reading (see the module's note).
    broken: Option<io::Error>,
    on_broken_pipe: OnBrokenPipe,
    total: u64,
}

impl FromChunks {
    fn poll_pump<R, S>(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut R,
        socket: &mut S,
    ) -> Poll<io::Result<()>>
    where
        R: ChunkSource + ?Sized,
        S: AsyncWrite + Unpin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while !self.pending.is_empty() {
                let n = match ready!(Pin::new(&mut *socket).poll_write(cx, &self.pending)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => n,
                    Err(error) => return self.stop(error),
                };
                self.pending.advance(n);
                self.total += n as u64;
                self.needs_flush = true;
            }
            if self.source_done {
                ready!(Pin::new(&mut *socket).poll_flush(cx))?;
                ready!(Pin::new(&mut *socket).poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            match source.poll_chunk(cx) {
                Poll::Ready(Ok(Some(chunk))) => self.pending = chunk,
                Poll::Ready(Ok(None)) => self.source_done = true,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    if self.needs_flush {
                        ready!(Pin::new(&mut *socket).poll_flush(cx))?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Ends this direction after a failed write to the socket (see
    /// [`Pipe::stop`]).
    fn stop(&mut self, error: io::Error) -> Poll<io::Result<()>> {
        self.broken = Some(broken_pipe(error, self.on_broken_pipe)?);
        self.finished = true;
        self.pending = Bytes::new();
        Poll::Ready(Ok(()))
    }
}

#[derive(Default)]
struct Pipe {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled the whole buffer: a busy stream, grow next time.
    filled: bool,
    read_done: bool,
    needs_flush: bool,
    finished: bool,
    /// The writer's peer stopped reading (see the module's note).
    broken: Option<io::Error>,
    on_broken_pipe: OnBrokenPipe,
    total: u64,
}

impl Pipe {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.start == self.end && !self.read_done {
                self.prepare_buffer();
                let mut read_buf = ReadBuf::new(&mut self.buffer);
                match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        self.filled = n == self.buffer.len();
                        self.start = 0;
                        self.end = n;
                        self.read_done = n == 0;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => {
                        // Nothing more to read for now: push out what was written.
                        if self.needs_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let n = match ready!(Pin::new(&mut *writer).poll_write(cx, &self.buffer[self.start..self.end]))
                {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => n,
                    Err(error) => return self.stop(error),
                };
                self.start += n;
                self.total += n as u64;
                self.needs_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.finished = true;
                self.buffer = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Ends this direction after a failed write: for good if the writer's
    /// peer stopped reading, the whole splice otherwise.
    fn stop(&mut self, error: io::Error) -> Poll<io::Result<()>> {
        self.broken = Some(broken_pipe(error, self.on_broken_pipe)?);
        self.finished = true;
        self.buffer = Vec::new();
        Poll::Ready(Ok(()))
    }

    fn prepare_buffer(&mut self) {
        if self.buffer.is_empty() {
            self.buffer = vec![0; INITIAL_BUFFER];
        } else if self.filled && self.buffer.len() < MAX_BUFFER {
            self.buffer = vec![0; self.buffer.len() * 4];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_flowing() {
        let (mut client, mut client_side) = duplex(64);
        let (mut server_side, mut server) = duplex(64);
        let relay = tokio::spawn(async move { splice(&mut client_side, &mut server_side).await });

        // The client says something and half-closes, like `docker exec` without -i.
        client.write_all(b"stdin").await.unwrap();
        client.shutdown().await.unwrap();

        // The server sees the bytes, then EOF, and still answers afterwards.
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"stdin");
        let reply = vec![7u8; 300_000];
        let expected = reply.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&reply).await.unwrap();
            server.shutdown().await.unwrap();
        });

        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, expected);
        writer.await.unwrap();
        let counts = relay.await.unwrap().unwrap();
        assert_eq!(counts, Spliced { a_to_b: 5, b_to_a: 300_000 });
    }

    /// A peer that closed while bytes still flowed to it: what it sent before
    /// closing still reaches the other side, then the splice reports the
    /// broken pipe. Other failures end the splice at once.
    #[tokio::test]
    async fn a_peer_that_stops_reading_still_has_its_output_relayed() {
        let (mut client, mut client_side) = tokio::net::UnixStream::pair().unwrap();
        let (mut server_side, mut server) = tokio::net::UnixStream::pair().unwrap();
        client.write_all(b"stdin").await.unwrap();
        server.write_all(b"last output").await.unwrap();
        drop(server);

        let error = splice_with(&mut client_side, &mut server_side, OnBrokenPipe::FinishOtherWay)
            .await
            .expect_err("stdin was not taken");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe, "{error}");
        drop(client_side);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last output");

        // By default a broken pipe ends the splice at once, the other way too.
        let (mut client, mut client_side) = tokio::net::UnixStream::pair().unwrap();
        let (mut server_side, mut server) = tokio::net::UnixStream::pair().unwrap();
        client.write_all(b"stdin").await.unwrap();
        server.write_all(b"last output").await.unwrap();
        drop(server);
        let error = splice(&mut client_side, &mut server_side).await.expect_err("stdin was not taken");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe, "{error}");
        drop(client_side);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "{got:?}");

        // A read that fails is no broken pipe of the writer's: it ends both ways.
        struct Failing;
        impl AsyncRead for Failing {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the stream failed")))
            }
        }
        impl AsyncWrite for Failing {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        // `silent` never ends on its own: only an immediate failure returns.
        let (mut silent, _held) = duplex(64);
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            splice_with(&mut Failing, &mut silent, OnBrokenPipe::FinishOtherWay),
        )
        .await;
        assert!(outcome.expect("a failed read ends the splice").is_err());
    }

    #[tokio::test]
    async fn buffers_grow_only_for_busy_streams() {
        let mut pipe = Pipe::default();
        pipe.prepare_buffer();
        assert_eq!(pipe.buffer.len(), INITIAL_BUFFER);
        pipe.filled = true;
        pipe.prepare_buffer();
        assert_eq!(pipe.buffer.len(), INITIAL_BUFFER * 4);
        pipe.filled = false;
        pipe.prepare_buffer();
        assert_eq!(pipe.buffer.len(), INITIAL_BUFFER * 4);
    }
}
