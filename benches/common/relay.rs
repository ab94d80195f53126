//! The delay relay in front of a bench's remote end, and the round trip measured
//! through it, for benches that include this file with `#[path = "common/relay.rs"]
//! mod relay;` next to `mod common;` and `mod delay;` (`tests/support/delay.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::stats::Percentiles;
use crate::common::{within, BoxError, Context, Result};
use crate::delay::DelayRelay;

/// The relay builds its own runtime, which cannot happen on a runtime thread.
pub fn start_relay(target: SocketAddr, rtt: Duration) -> Result<DelayRelay> {
    std::thread::spawn(move || DelayRelay::start(target, rtt))
        .join()
        .map_err(|_| "starting the delay relay panicked".into())
}

pub struct RttFigures {
    pub relay: Percentiles,
    pub direct: Percentiles,
}

/// 1-byte TCP ping-pong to an echo server, through a relay identical to the ones in
/// front of the bench's agents (and sshd), and directly; 50 samples each after 5
/// warm-ups.
pub async fn measure_rtt(rtt: Duration) -> Result<RttFigures> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the echo server")?;
    let echo_addr = listener.local_addr().context("echo server address")?;
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let relay = start_relay(echo_addr, rtt)?;
    let ping_pong = |addr: SocketAddr| async move {
        let mut stream = TcpStream::connect(addr).await.context("connecting for the ping-pong")?;
        stream.set_nodelay(true).context("nodelay")?;
        let mut samples = Vec::new();
        for i in 0..55 {
            let started = Instant::now();
            stream.write_all(&[i as u8]).await.context("ping")?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.context("pong")?;
            if i >= 5 {
                samples.push(started.elapsed().as_nanos() as u64);
            }
        }
        Ok::<_, BoxError>(Percentiles::of(samples))
    };
    let measured = within(Duration::from_secs(30), "RTT ping-pong", async {
        Ok(RttFigures { relay: ping_pong(relay.addr).await?, direct: ping_pong(echo_addr).await? })
    })
    .await;
    server.abort();
    drop(relay);
    measured
}
