//! A guardian's record of the signing sessions it committed to: an
//! append-only log, one session id per line. A session id is claimed once;
//! round 2 releases shares only after the claim is on disk, so an id signs at
//! most once, also across restarts. Claims are group-committed: one writer
//! thread appends every claim made meanwhile and syncs once for all of them
//! (an fsync per signing, with its journal commit, cost more than the signing).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc;

use tokio::sync::oneshot;

/// Answers once a claim is on disk, or why it could not be written.
pub(crate) type Durable = oneshot::Receiver<Result<(), String>>;

type Claim = (String, oneshot::Sender<Result<(), String>>);

/// Most claims written with one sync.
const MAX_GROUP: usize = 1_024;

pub(crate) struct SessionLog {
    claimed: Mutex<HashSet<String>>,
    writer: mpsc::Sender<Claim>,
}

impl SessionLog {
    /// Opens `dir/sessions.log` (created if missing), with the sessions it and
    /// the per-session marker files of earlier versions (`dir/sessions/`)
    /// record as claimed, and starts its writer.
    pub(crate) fn open(dir: &Path) -> Result<SessionLog, String> {
        let path = dir.join("sessions.log");
        let at = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut claimed = HashSet::new();
        if let Ok(entries) = std::fs::read_dir(dir.join("sessions")) {
            for entry in entries.flatten() {
                claimed.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let created = !path.exists();
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(at)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(at)?;
        claimed.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_string));
        // A claim cut short by a crash was never synced, so its session never
        // released a share: end its line so that the next claim starts its own.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n").map_err(at)?;
            file.sync_data().map_err(at)?;
        }
        if created {
            // The file's name lives in the directory.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let (writer, claims) = mpsc::channel();
        std::thread::Builder::new()
            .name("session-log".into())
            .spawn(move || write_claims(file, claims))
            .map_err(|e| format!("starting the session log writer: {e}"))?;
        Ok(SessionLog {
            claimed: Mutex::new(claimed),
            writer,
        })
    }

    /// Whether `id` was claimed (a poisoned lock says yes: fail closed).
    pub(crate) fn claimed(&self, id: &str) -> bool {
        self.claimed
            .lock()
            .map_or(true, |claimed| claimed.contains(id))
    }

    /// Claims `id` (a validated token: no line breaks), or refuses an id
    /// claimed before. The answer comes once the claim is on disk.
    pub(crate) fn claim(&self, id: &str) -> Result<Durable, String> {
        let mut claimed = self.claimed.lock().map_err(|_| "session log poisoned")?;
        if !claimed.insert(id.to_string()) {
            return Err(format!("session {id} was already consumed"));
        }
        let (done, durable) = oneshot::channel();
        self.writer
            .send((id.to_string(), done))
            .map_err(|_| "the session log writer stopped".to_string())?;
        Ok(durable)
    }
}

/// Appends claims as they come, each group with one write and one sync,
/// until the log is dropped.
fn write_claims(mut file: File, claims: mpsc::Receiver<Claim>) {
    while let Ok(first) = claims.recv() {
        let mut group = vec![first];
        group.extend(claims.try_iter().take(MAX_GROUP - 1));
        let mut lines = String::new();
        for (id, _) in &group {
            lines.push_str(id);
            lines.push('\n');
        }
        let written = file
            .write_all(lines.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("writing the session log: {e}"));
        for (_, done) in group {
            let _ = done.send(written.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_claim_is_refused_again_also_after_reopening() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir(dir.path().join("sessions")).expect("legacy dir");
        std::fs::write(dir.path().join("sessions").join("old-1"), b"wf").expect("marker");
        let log = SessionLog::open(dir.path()).expect("opens");
        assert!(
            log.claimed("old-1"),
            "a marker of an earlier version counts"
        );
        let durable = log.claim("s-1").expect("claims");
        assert_eq!(durable.await.expect("answered"), Ok(()));
        assert!(log.claim("s-1").is_err());
        assert!(log.claim("old-1").is_err());
        drop(log);

        // A claim cut short by a crash: its line is ended, the next is whole.
        let path = dir.path().join("sessions.log");
        let mut file = OpenOptions::new().append(true).open(&path).expect("log");
        file.write_all(b"s-2-cut").expect("torn write");
        drop(file);
        let log = SessionLog::open(dir.path()).expect("reopens");
        assert!(log.claimed("s-1"));
        assert!(log.claim("s-1").is_err());
        let durable = log.claim("s-3").expect("claims");
        assert_eq!(durable.await.expect("answered"), Ok(()));
        drop(log);
        let text = std::fs::read_to_string(&path).expect("log");
        assert_eq!(text, "s-1\ns-2-cut\ns-3\n");
    }

    #[tokio::test]
    async fn concurrent_claims_are_all_written() {
        let dir = tempfile::tempdir().expect("dir");
        let log = std::sync::Arc::new(SessionLog::open(dir.path()).expect("opens"));
        let claims: Vec<Durable> = (0..200)
            .map(|i| log.claim(&format!("s-{i}")).expect("claims"))
            .collect();
        for durable in claims {
            assert_eq!(durable.await.expect("answered"), Ok(()));
        }
        drop(log);
        let reopened = SessionLog::open(dir.path()).expect("reopens");
        assert!((0..200).all(|i| reopened.claimed(&format!("s-{i}"))));
    }
}
