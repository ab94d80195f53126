//! UDP datagrams on a link stream (a forwarded UDP port). A stream is a byte
//! stream, so each datagram travels as a frame: a 2-byte big-endian length,
//! then that many bytes. A zero-length datagram is a frame of its own. Pure.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest datagram a frame can carry (and larger than any UDP payload).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// A UDP flow with nothing in either direction for this long is closed (by
/// the proxy, which ends its stream; the agent gives up on it after as long).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

const HEADER: usize = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a datagram of {0} bytes is larger than {MAX_DATAGRAM}")]
pub struct TooLong(pub usize);

/// Appends one datagram's frame to `out`.
pub fn encode(datagram: &[u8], out: &mut BytesMut) -> Result<(), TooLong> {
    let length = u16::try_from(datagram.len()).map_err(|_| TooLong(datagram.len()))?;
    out.reserve(HEADER + datagram.len());
    out.put_u16(length);
    out.put_slice(datagram);
    Ok(())
}

/// Collects bytes as they arrive and hands out whole datagrams: a frame may
/// be split over many reads, and one read may hold many frames.
#[derive(Debug, Default)]
pub struct Decoder {
    pending: BytesMut,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next whole datagram, or `None` until more bytes arrive.
    pub fn next_datagram(&mut self) -> Option<Bytes> {
        let header: [u8; HEADER] = self.pending.get(..HEADER)?.try_into().ok()?;
        let length = usize::from(u16::from_be_bytes(header));
        if self.pending.len() < HEADER + length {
            return None;
        }
        self.pending.advance(HEADER);
        Some(self.pending.split_to(length).freeze())
    }

    /// Bytes of an incomplete frame are waiting (a stream that ends now was
    /// cut mid-datagram).
    pub fn is_mid_frame(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(datagrams: &[&[u8]]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for datagram in datagrams {
            encode(datagram, &mut out).unwrap();
        }
        out.to_vec()
    }

    fn drain(decoder: &mut Decoder) -> Vec<Bytes> {
        std::iter::from_fn(|| decoder.next_datagram()).collect()
    }

    #[test]
    fn a_frame_is_a_big_endian_length_then_the_bytes() {
        assert_eq!(framed(&[b"abc"]), b"\x00\x03abc");
        assert_eq!(framed(&[b""]), b"\x00\x00");
    }

    #[test]
    fn many_frames_in_one_read() {
        let mut decoder = Decoder::new();
        decoder.push(&framed(&[b"one", b"", b"three"]));
        assert_eq!(drain(&mut decoder), vec![&b"one"[..], b"", b"three"]);
        assert!(!decoder.is_mid_frame());
    }

    #[test]
    fn frames_split_over_reads_byte_by_byte() {
        let bytes = framed(&[b"hello", b"", b"world!"]);
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for byte in &bytes {
            decoder.push(std::slice::from_ref(byte));
            out.extend(drain(&mut decoder));
        }
        assert_eq!(out, vec![&b"hello"[..], b"", b"world!"]);
        assert!(!decoder.is_mid_frame());
    }

    #[test]
    fn a_split_header_and_a_partial_body_wait_for_more() {
        let bytes = framed(&[b"datagram"]);
        let mut decoder = Decoder::new();
        decoder.push(&bytes[..1]);
        assert_eq!(decoder.next_datagram(), None);
        decoder.push(&bytes[1..5]);
        assert_eq!(decoder.next_datagram(), None);
        assert!(decoder.is_mid_frame());
        decoder.push(&bytes[5..]);
        assert_eq!(decoder.next_datagram().as_deref(), Some(&b"datagram"[..]));
        assert_eq!(decoder.next_datagram(), None);
    }

    #[test]
    fn the_largest_datagram_travels_and_a_larger_one_is_refused() {
        let largest = vec![7u8; MAX_DATAGRAM];
        let bytes = framed(&[&largest, b"x"]);
        assert_eq!(&bytes[..2], b"\xff\xff");
        let mut decoder = Decoder::new();
        let (first, second) = bytes.split_at(40_000);
        decoder.push(first);
        assert_eq!(decoder.next_datagram(), None);
        decoder.push(second);
        assert_eq!(drain(&mut decoder), vec![&largest[..], b"x"]);
        let mut out = BytesMut::new();
        assert_eq!(encode(&vec![0u8; MAX_DATAGRAM + 1], &mut out), Err(TooLong(MAX_DATAGRAM + 1)));
        assert!(out.is_empty());
    }
}
