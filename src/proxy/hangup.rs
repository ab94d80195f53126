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
