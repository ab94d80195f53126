//! Tells a client that hung up (closed its socket) from one that only
//! half-closed (shut down its write side).
//!
//! The proxy serves with hyper's `half_close(true)`, because HTTP/1.0 tools
//! (`printf ... | nc -U`) send a request and shut down their write side before
//! reading the answer, which the engine answers. But then a client that
//! abandons `logs -f`, `events` or an attach by closing its socket would leave
//! the upstream stream open until the next byte fails to write. On a unix
//! socket the two cases differ: a full close raises HUP, a half-close does not.
//! This watches a duplicate of the socket for HUP so the caller can cancel.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixStream;

pub struct HangupWatch {
    duplicate: UnixStream,
}

impl HangupWatch {
    /// Splits `stream` into the stream to serve and a watch on the same socket.
    pub fn new(stream: UnixStream) -> io::Result<(UnixStream, Self)> {
        let std_stream = stream.into_std()?;
        let duplicate = std_stream.try_clone()?;
        let stream = UnixStream::from_std(std_stream)?;
        let duplicate = UnixStream::from_std(duplicate)?;
        Ok((stream, Self { duplicate }))
    }

    /// Resolves once the peer has closed the socket completely.
    pub async fn hung_up(&self) {
        loop {
            match self.duplicate.ready(Interest::WRITABLE).await {
                Ok(ready) if ready.is_write_closed() => return,
                Ok(_) => {
                    // Writable is the normal state: clear it and wait for the
                    // next change (the socket's events are edge-triggered).
                    let _ = self
                        .duplicate
                        .try_io(Interest::WRITABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                }
                Err(_) => return,
            }
        }
    }

    /// Starts listening for the client's next read of what we send it; call
    /// before the answer is written. See [`ReadNotice`].
    pub async fn read_notice(&self) -> Option<ReadNotice> {
        let duplicate = StdUnixStream::from(self.duplicate.as_fd().try_clone_to_owned().ok()?);
        duplicate.set_nonblocking(true).ok()?;
        // Deprecated for types whose fd may close while registered; the
        // AsyncFd owns this one and deregisters before closing it.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(duplicate, Interest::WRITABLE).ok()?;
        // A new registration reports the socket writable once: take that
        // report, so only a later read by the client counts.
        let mut first = tokio::time::timeout(Duration::from_millis(50), fd.writable()).await.ok()?.ok()?;
        first.clear_ready();
        drop(first);
        Some(ReadNotice { fd })
    }
}

/// Tells when the client has read from the socket.
///
/// On a unix socket the kernel wakes the writer's waiters each time the
/// reader takes data from it. docker-py drops stream bytes that arrive in the
/// same `recv` as a 101 head (docker-py#3332); the engine's own pause between
/// head and output usually avoids that, but a relay that got both at once
/// would send them back to back. Waiting for the client to read the head
/// first keeps them apart.
pub struct ReadNotice {
    fd: AsyncFd<StdUnixStream>,
}

impl ReadNotice {
    /// Resolves when the client has read, or after `limit`.
    pub async fn wait(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.fd.writable()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn half_close_is_not_a_hangup_but_close_is() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_ours, watch) = HangupWatch::new(ours).unwrap();
        let theirs = theirs.into_std().unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), watch.hung_up()).await;
        assert!(early.is_err(), "a half-close must not count as a hang-up");
        drop(theirs);
        tokio::time::timeout(Duration::from_secs(5), watch.hung_up())
            .await
            .expect("a full close is a hang-up");
    }
}
