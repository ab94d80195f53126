//! A TCP relay on loopback that delays every byte by half a round trip in each
//! direction (this kernel has no netem), and can cut or freeze its connections
//! to simulate a dying link. Owned by the test; it stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

pub struct DelayRelay {
    pub addr: SocketAddr,
    cut: Arc<Notify>,
    frozen: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl DelayRelay {
    /// Relays connections accepted on a fresh loopback port to `target`,
    /// adding `rtt` to every round trip.
    pub fn start(target: SocketAddr, rtt: Duration) -> DelayRelay {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("relay runtime");
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let cut = Arc::new(Notify::new());
        let frozen = Arc::new(AtomicBool::new(false));
        let (cut_all, frozen_flag) = (cut.clone(), frozen.clone());
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (cut, frozen) = (cut_all.clone(), frozen_flag.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    tokio::select! {
                        _ = relay_pair(client, server, rtt / 2, frozen) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        DelayRelay { addr, cut, frozen, runtime: Some(runtime) }
    }

    /// Drops every open connection at once (new ones are still accepted).
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }

    /// Stops moving bytes but keeps the connections open: a silent dead link.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn relay_pair(client: TcpStream, server: TcpStream, delay: Duration, frozen: Arc<AtomicBool>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        delayed_copy(client_read, server_write, delay, frozen.clone()),
        delayed_copy(server_read, client_write, delay, frozen),
    );
}

/// Reads as fast as bytes come, and writes each chunk `delay` after it was
/// read. No task is spawned: dropping this future closes both sockets (a cut).
async fn delayed_copy<R, W>(mut reader: R, mut writer: W, delay: Duration, frozen: Arc<AtomicBool>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buffer[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writing = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            while frozen.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    };
    tokio::join!(reading, writing);
}
