//! A TCP fault proxy for the tests: forwards to an upstream until told to drop, stall
//! (blackhole) or slow the traffic, on new and already open connections alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Forward everything.
    Pass = 0,
    /// Close every connection (open ones at their next byte), refuse new ones after accepting.
    Drop = 1,
    /// Accept and read, forward nothing either way: the peer waits until its deadline.
    Blackhole = 2,
    /// Forward, each chunk from the upstream delayed by `latency_ms`.
    Slow = 3,
}

pub struct FaultProxy {
    pub port: u16,
    fault: Arc<AtomicU8>,
    latency_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port, forwarding to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let fault = Arc::new(AtomicU8::new(Fault::Pass as u8));
        let latency_ms = Arc::new(AtomicU64::new(0));
        let (f, l) = (fault.clone(), latency_ms.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (f, l) = (f.clone(), l.clone());
                tokio::spawn(async move {
                    if f.load(Ordering::SeqCst) == Fault::Drop as u8 {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pipe(cr, sw, f.clone(), l.clone(), false));
                    pipe(sr, cw, f, l, true).await;
                    up.abort();
                });
            }
        });
        FaultProxy {
            port,
            fault,
            latency_ms,
            task,
        }
    }

    pub fn set(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    pub fn set_latency(&self, ms: u64) {
        self.latency_ms.store(ms, Ordering::SeqCst);
        self.set(Fault::Slow);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    fault: Arc<AtomicU8>,
    latency_ms: Arc<AtomicU64>,
    delay_this_way: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match fault.load(Ordering::SeqCst) {
            f if f == Fault::Drop as u8 => return,
            f if f == Fault::Blackhole as u8 => continue,
            f if f == Fault::Slow as u8 && delay_this_way => {
                tokio::time::sleep(Duration::from_millis(latency_ms.load(Ordering::SeqCst))).await;
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
