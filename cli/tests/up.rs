//! `custos up` as a newcomer runs it: an embedded nats-server child, intake, the
//! audit trail; Ctrl-C stops it cleanly; running it again on the same data
//! directory resumes where it stopped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custos_adapters::nats_server::free_port;

struct Up {
    child: Child,
}

impl Up {
    /// Starts `custos up` and waits until it says it is up.
    fn start(data_dir: &std::path::Path, port: u16) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_custos"))
            .args(["up", "--data-dir"])
            .arg(data_dir)
            .args(["--nats-port", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("custos up starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "custos up did not come up");
            match lines.next() {
                Some(Ok(line)) if line.starts_with("Custos is up") => break,
                Some(Ok(_)) => {}
                _ => panic!("custos up exited before it was up"),
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Up { child }
    }

    /// Sends Ctrl-C and waits for a clean exit.
    fn interrupt(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "custos up did not stop after Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn custos(url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(args)
        .env("CUSTOS_NATS_URL", url)
        .output()
        .expect("custos runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn up_runs_the_engine_stops_on_ctrl_c_and_resumes_on_the_same_data() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port().expect("port");
    let url = format!("nats://127.0.0.1:{port}");
    let submit = [
        "tx",
        "submit",
        "--wallet",
        "treasury",
        "--asset",
        "LTC",
        "--to",
        "rltc1qxyz",
        "--amount",
        "1",
        "--request-id",
        "first",
    ];

    let up = Up::start(dir.path(), port);
    let (ok, out) = custos(&url, &submit);
    assert!(!ok && out.contains("wallet: unknown wallet"), "{out}");
    assert!(dir.path().join("audit-key").exists() && dir.path().join("audit-key.pub").exists());
    let status = up.interrupt();
    assert!(
        status.success(),
        "custos up exits cleanly on Ctrl-C: {status}"
    );
    assert!(
        port_is_free(port),
        "the embedded nats-server stopped with it"
    );

    // Again on the same data directory: the same key, the same trail, which verifies.
    let key = std::fs::read_to_string(dir.path().join("audit-key.pub")).expect("pub key");
    let up = Up::start(dir.path(), port);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("audit-key.pub")).expect("pub key"),
        key
    );
    let (ok, out) = custos(&url, &submit);
    assert!(!ok, "{out}");
    let data_dir = dir.path().to_string_lossy().to_string();
    let (ok, out) = custos(&url, &["audit", "verify", "--data-dir", &data_dir]);
    assert!(ok && out.starts_with("OK:"), "{out}");
    assert!(up.interrupt().success());
}
