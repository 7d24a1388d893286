//! A TCP proxy between one NATS client and the server, to hold or cut that
//! client's traffic the way a slow network or a killed process would.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections on a loopback port to `upstream`.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    /// While true, bytes from the server wait in the proxy.
    held: watch::Sender<bool>,
    /// Once true, every connection is closed and new ones are refused.
    severed: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (held, _) = watch::channel(false);
        let (severed, _) = watch::channel(false);
        let (held_rx, mut severed_rx) = (held.subscribe(), severed.subscribe());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = severed_rx.wait_for(|s| *s) => break,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => break,
                    },
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(pump(client, server, held_rx.clone(), severed_rx.clone()));
            }
        });
        Proxy {
            addr,
            held,
            severed,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Holds what the server sends until [`Proxy::release`]. Only moments: a
    /// client that reads nothing for long is dropped by the server as slow.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Closes every connection and refuses new ones: to the server, the client
    /// is gone at once, as when its process is killed.
    pub fn sever(&self) {
        self.severed.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.sever();
    }
}

async fn pump(
    client: TcpStream,
    server: TcpStream,
    held: watch::Receiver<bool>,
    mut severed: watch::Receiver<bool>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let down = async {
        let mut held = held;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Read while held (a read may have begun before): keep it until released.
            if held.wait_for(|h| !*h).await.is_err() {
                break;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    // Dropping both halves of both sockets closes them.
    tokio::select! {
        _ = severed.wait_for(|s| *s) => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}
