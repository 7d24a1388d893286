//! What the CLI tests share.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Runs `custos ARGS` against the server at `url` (as the operator's shell
/// would, without a `CUSTOS_USER`): success, and stdout and stderr together.
pub fn custos(url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(args)
        .env("CUSTOS_NATS_URL", url)
        .env_remove("CUSTOS_USER")
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

/// Sends `child` Ctrl-C (SIGINT) and waits up to `within` for it to exit.
pub fn interrupt(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    // Already gone (and reaped): its pid may be another process's by now.
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    let deadline = Instant::now() + within;
    while sent && Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // Poll for the exit.
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Stops a `custos up`: Ctrl-C, so that it stops the servers it started as
/// children (SIGKILL would leave them running), else SIGKILL after 30 s.
pub fn stop(child: &mut Child) {
    if interrupt(child, Duration::from_secs(30)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
