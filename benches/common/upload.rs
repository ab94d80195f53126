//! The streamed upload: a tar of one file of fresh pseudo-random bytes, sent as a
//! chunked body, and the check that the container got all of it.

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::{Body, Frame};
use hyper::{Method, StatusCode};
use serde_json::Value;

use super::engine::{expect_status, open_connection, request};
use super::stats::WyRand;
use super::{Context, Result};

/// Size of each chunk of the upload body. 64 KiB is in the range real clients write
/// (the docker CLI copies with 32 KiB buffers) without making per-chunk cost dominate.
pub const UPLOAD_CHUNK: usize = 64 * 1024;

/// Checks with `HEAD .../archive` that the file in the container has the full size.
pub async fn verify_upload(engine: &Path, id: &str, file: &str, size: u64) -> Result<()> {
    let path = format!("/containers/{id}/archive?path=/tmp/{file}");
    let mut sender = open_connection::<Empty<Bytes>>(engine).await?;
    let response = sender
        .send_request(request(Method::HEAD, &path, Empty::new())?)
        .await
        .context(format!("HEAD {path}"))?;
    expect_status(&response, StatusCode::OK, &path)?;
    let stat = response
        .headers()
        .get("X-Docker-Container-Path-Stat")
        .ok_or("HEAD archive: no X-Docker-Container-Path-Stat header")?;
    let stat: Value =
        serde_json::from_slice(&base64_decode(stat.as_bytes())?).context("HEAD archive: bad path stat")?;
    match stat["size"].as_u64() {
        Some(got) if got == size => Ok(()),
        got => Err(format!("uploaded {size} bytes but the container has {got:?}").into()),
    }
}

/// A chunked request body: a tar archive with one file of fresh pseudo-random bytes,
/// generated chunk by chunk so that the payload is never held in memory whole and
/// no layer could compress or deduplicate it.
pub struct TarUpload {
    header: Option<Bytes>,
    remaining: u64,
    trailer: Option<Bytes>,
    rng: WyRand,
    size: u64,
}

impl TarUpload {
    /// `file` is the name of the one file in the archive.
    pub fn new(file: &str, size: u64) -> TarUpload {
        let padding = (512 - (size % 512) as usize) % 512;
        TarUpload {
            header: Some(Bytes::copy_from_slice(&tar_header(file, size))),
            remaining: size,
            // Pad the file to a block, then the two zero blocks that end an archive.
            trailer: Some(Bytes::from(vec![0u8; padding + 1024])),
            rng: WyRand(size ^ 0x6f66_666c_6f61_6421),
            size,
        }
    }

    pub fn total_len(&self) -> u64 {
        512 + self.size.div_ceil(512) * 512 + 1024
    }
}

impl Body for TarUpload {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(header) = this.header.take() {
            return Poll::Ready(Some(Ok(Frame::data(header))));
        }
        if this.remaining > 0 {
            let len = this.remaining.min(UPLOAD_CHUNK as u64) as usize;
            let mut chunk = vec![0u8; len];
            this.rng.fill(&mut chunk);
            this.remaining -= len as u64;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))));
        }
        Poll::Ready(this.trailer.take().map(|trailer| Ok(Frame::data(trailer))))
    }
}

/// A ustar header for a regular file owned by root. Sizes of 8 GiB and more use the
/// GNU base-256 size field, which the engine's tar reader understands.
pub fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    if size < 8 << 30 {
        header[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        header[124] = 0x80;
        header[128..136].copy_from_slice(&size.to_be_bytes());
    }
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field set to spaces.
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    header
}

pub fn base64_decode(text: &[u8]) -> Result<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' | b'-' => Some(62),
            b'/' | b'_' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text.iter().filter(|&&c| c != b'=') {
        acc = (acc << 6) | value(c).ok_or("invalid base64")?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}
