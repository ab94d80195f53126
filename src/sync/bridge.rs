//! Between blocking file I/O and streamed HTTP bodies: a sync stream is
//! written and applied on blocking threads, while its bytes travel as body
//! frames with backpressure (a bounded channel of `Bytes`).

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::body::{self, Body, BodyError};

/// Chunks in flight; with 64 KiB chunks this bounds a stream's memory.
const CHANNEL_CHUNKS: usize = 8;
const CHUNK: usize = 64 << 10;

/// `Write` on a blocking thread, frames of a body on the other end.
struct ChannelWriter {
    sender: mpsc::Sender<Result<Frame<Bytes>, BodyError>>,
    buffer: BytesMut,
}

impl ChannelWriter {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = self.buffer.split().freeze();
        self.sender
            .blocking_send(Ok(Frame::data(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the receiver went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.send_buffer()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

/// A body produced by `produce` on a blocking thread. Returns the body and
/// the producer's result (which arrives when the body has been written).
pub fn blocking_body<T, F>(produce: F) -> (Body, tokio::task::JoinHandle<io::Result<T>>)
where
    F: FnOnce(&mut dyn Write) -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    let failure = sender.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter { sender, buffer: BytesMut::with_capacity(CHUNK) };
        let result = produce(&mut writer).and_then(|value| writer.flush().map(|()| value));
        if let Err(error) = &result {
            // The reader must see a failed body, not a short one that looks complete.
            let _ = failure.blocking_send(Err(BodyError(error.to_string().into())));
        }
        result
    });
    (receiver_body(receiver), task)
}

/// The frames sent on a channel, as a body (ends when the senders are gone).
pub fn receiver_body(receiver: mpsc::Receiver<Result<Frame<Bytes>, BodyError>>) -> Body {
    body::stream(ReceiverBody(receiver))
}

struct ReceiverBody(mpsc::Receiver<Result<Frame<Bytes>, BodyError>>);

impl http_body::Body for ReceiverBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.0.poll_recv(cx)
    }
}

/// `Read` on a blocking thread over a body's data frames.
struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(error)) => return Err(error),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Runs `consume` on a blocking thread, reading `incoming` as it arrives.
pub async fn consume_blocking<B, T, F>(incoming: B, consume: F) -> io::Result<T>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
    F: FnOnce(&mut dyn Read) -> T + Send + 'static,
    T: Send + 'static,
{
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    let pump = async move {
        let mut incoming = incoming;
        while let Some(frame) = incoming.frame().await {
            let item = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => Ok(data),
                    Err(_) => continue,
                },
                Err(error) => Err(io::Error::other(error.to_string())),
            };
            let failed = item.is_err();
            if sender.send(item).await.is_err() || failed {
                break;
            }
        }
    };
    let work = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader { receiver, current: Bytes::new() };
        let result = consume(&mut reader);
        // Drain so the pump never blocks on a consumer that stopped early.
        drop(reader);
        result
    });
    let (_, result) = tokio::join!(pump, work);
    result.map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_cross_from_a_blocking_writer_to_a_blocking_reader() {
        let (body, produced) = blocking_body(|out| {
            for i in 0..100u32 {
                out.write_all(&[i as u8; 10_000])?;
            }
            Ok(7)
        });
        let total = consume_blocking(body, |input| {
            let mut all = Vec::new();
            input.read_to_end(&mut all).map(|_| all)
        })
        .await
        .expect("join")
        .expect("read");
        assert_eq!(total.len(), 1_000_000);
        assert_eq!(total[999_999], 99);
        assert_eq!(produced.await.expect("join").expect("produce"), 7);
    }

    #[tokio::test]
    async fn a_failing_producer_fails_the_body() {
        let (body, _produced) = blocking_body(|out| {
            out.write_all(b"partial")?;
            out.flush()?;
            Err::<(), _>(io::Error::other("disk on fire"))
        });
        let read = consume_blocking(body, |input| {
            let mut all = Vec::new();
            input.read_to_end(&mut all)
        })
        .await
        .expect("join");
        assert!(read.is_err());
    }
}
