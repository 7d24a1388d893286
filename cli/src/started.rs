//! The processes a `custos up` started, recorded in its data directory
//! (`up.pids`: a `<pid> <start time> <name>` line each, the `custos up`
//! itself first). A `custos up` killed outright (SIGKILL, an out-of-memory
//! kill) cannot stop its children, which then keep its ports and data; the
//! next `custos up` on the same directory stops those still running before it
//! starts its own, and refuses to start while the recorded one still runs.
//! A process is the recorded one only if its start time matches too: a pid
//! reused since is left alone.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a process left running gets to stop on SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(15);

/// The record of this `custos up`'s processes; removed when it stops.
pub struct Started {
    path: PathBuf,
}

impl Started {
    /// Stops what an earlier `custos up` on `data_dir` left running, then
    /// records this one.
    pub fn claim(data_dir: &Path) -> anyhow::Result<Started> {
        let path = data_dir.join("up.pids");
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let running: Vec<(u32, u64, &str)> = recorded
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ' ');
                let pid = parts.next()?.parse().ok()?;
                let start = parts.next()?.parse().ok()?;
                Some((pid, start, parts.next()?))
            })
            .filter(|(pid, start, _)| start_time(*pid) == Some(*start))
            .collect();
        if let Some((pid, _, _)) = running.iter().find(|(_, _, name)| *name == "custos up") {
            anyhow::bail!(
                "custos up already runs on {} (pid {pid}): stop it first",
                data_dir.display()
            );
        }
        for (pid, start, name) in running {
            println!(
                "Stopping {name} (pid {pid}), left running by a custos up that did not stop cleanly"
            );
            stop(pid, start);
        }
        let me = std::process::id();
        let start = start_time(me).context("reading this process's start time")?;
        std::fs::write(&path, format!("{me} {start} custos up\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Started { path })
    }

    /// Records a process this `custos up` started.
    pub fn record(&self, name: &str, pid: Option<u32>) -> anyhow::Result<()> {
        let Some(pid) = pid else { return Ok(()) };
        let start =
            start_time(pid).with_context(|| format!("{name} (pid {pid}) is not running"))?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        writeln!(file, "{pid} {start} {name}")
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// When process `pid` started (clock ticks after boot), if it runs and is not
/// a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Field 22 of the line; the state was field 3.
    fields.nth(18)?.parse().ok()
}

/// SIGTERM, then SIGKILL if it still runs after [`GRACE`]. It is not our
/// child, so its end can only be polled for.
fn stop(pid: u32, start: u64) {
    for (signal, wait) in [("-TERM", GRACE), ("-KILL", Duration::from_secs(5))] {
        let _ = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status();
        let deadline = Instant::now() + wait;
        while start_time(pid) == Some(start) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if start_time(pid) != Some(start) {
            return;
        }
    }
}
