//! A real SMTP server capturing mail: aiosmtpd's `Mailbox` handler writing each
//! message to a maildir, on a free loopback port, stopped in `Drop`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::AsyncReadExt;

#[derive(Debug)]
pub struct SmtpCapture {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl SmtpCapture {
    /// Starts `python3 -m aiosmtpd` (`CUSTOS_PYTHON` names another interpreter)
    /// and waits for its greeting.
    pub async fn start() -> SmtpCapture {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = custos_adapters::nats_server::free_port().expect("free port");
        let python = std::env::var("CUSTOS_PYTHON").unwrap_or_else(|_| "python3".into());
        let log = std::fs::File::create(dir.path().join("aiosmtpd.log")).expect("log file");
        let child = Command::new(python)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.path().join("maildir"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("aiosmtpd starts (pip install aiosmtpd, or scripts/install-deps)");
        let smtp = SmtpCapture { child, port, dir };
        let ready = crate::eventually(Duration::from_secs(20), || async {
            let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return false;
            };
            let mut greeting = [0u8; 3];
            stream.read_exact(&mut greeting).await.is_ok() && &greeting == b"220"
        })
        .await;
        assert!(
            ready,
            "aiosmtpd did not greet on port {port}: {}",
            std::fs::read_to_string(smtp.dir.path().join("aiosmtpd.log")).unwrap_or_default()
        );
        smtp
    }

    /// The URL a mailer sends to (plain SMTP on loopback).
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    fn new_dir(&self) -> PathBuf {
        self.dir.path().join("maildir").join("new")
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<CapturedMail> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(self.new_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                let modified = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (modified, e.path())
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, path)| std::fs::read_to_string(path).ok())
            .map(|raw| CapturedMail { raw })
            .collect()
    }

    /// Waits until `count` messages arrived, and returns them.
    pub async fn wait_for(&self, count: usize) -> Vec<CapturedMail> {
        let arrived = crate::eventually(Duration::from_secs(20), || async {
            self.messages().len() >= count
        })
        .await;
        assert!(
            arrived,
            "expected {count} mail(s), got {}",
            self.messages().len()
        );
        self.messages()
    }
}

impl Drop for SmtpCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message as the server stored it.
#[derive(Debug, Clone)]
pub struct CapturedMail {
    pub raw: String,
}

impl CapturedMail {
    /// A header's (unfolded) value.
    pub fn header(&self, name: &str) -> Option<String> {
        let (head, _) = self.split();
        let mut value: Option<String> = None;
        for line in head.lines() {
            if let Some(v) = value.as_mut()
                && line.starts_with([' ', '\t'])
            {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            if value.is_some() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case(name)
            {
                value = Some(v.trim().to_string());
            }
        }
        value
    }

    /// The body, with quoted-printable soft line breaks and escapes undone.
    pub fn body(&self) -> String {
        let (_, body) = self.split();
        let qp = self
            .header("Content-Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("quoted-printable"));
        if !qp {
            return body.to_string();
        }
        let joined = body.replace("=\r\n", "").replace("=\n", "");
        let mut out = Vec::with_capacity(joined.len());
        let bytes = joined.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'='
                && i + 2 < bytes.len()
                && let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn split(&self) -> (&str, &str) {
        self.raw
            .split_once("\r\n\r\n")
            .or_else(|| self.raw.split_once("\n\n"))
            .unwrap_or((&self.raw, ""))
    }
}
