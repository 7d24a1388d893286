//! A guardian's record of the signing sessions it signed in: an append-only
//! log, one claim per line (`<session id> <unix seconds>`). A session id is
//! claimed once; shares leave only after the claim is on disk, so an id signs
//! at most once, also across restarts. What keeps the key safe is that each
//! nonce signs at most one package (`custody::sign::Signer`); this log is
//! defence in depth beside it, and the guardian's own record of what it
//! signed. Claims are
//! group-committed: one writer thread appends every claim made meanwhile and
//! syncs once for all of them (an fsync per signing, with its journal commit,
//! cost more than the signing).
//!
//! Claims are kept for [`KEEP`], then forgotten, in memory and on disk (the
//! writer rewrites the log without them once it is mostly forgotten claims):
//! at 300 signings a second a log that kept everything grew by 26 million
//! lines a day, all read into memory at every start. Forgetting is safe:
//! nonces live only in the guardian's memory, each for one package, and a
//! claim outlives every nonce that could have served its session ([`KEEP`]
//! is six commitment lifetimes); an id replayed after that can sign only with
//! commitments handed out since, as any new id the coordinator picks would,
//! and only what the trail justifies.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

/// Answers once a claim is on disk, or why it could not be written.
pub(crate) type Durable = oneshot::Receiver<Result<(), String>>;

type Claim = (String, u64, oneshot::Sender<Result<(), String>>);

/// Most claims written with one sync.
const MAX_GROUP: usize = 1_024;

/// How long a claim is kept: six times a handed-out commitment's lifetime
/// ([`crate::signing::COMMITMENT_TTL`], 10 min).
const KEEP: Duration = Duration::from_secs(3_600);

/// The log is rewritten once its lines outnumber the kept claims by this much
/// (so rewriting costs O(1) per claim).
const COMPACT_SLACK: usize = 4_096;

/// The claims kept, oldest first.
#[derive(Default)]
struct Claims {
    ids: HashSet<String>,
    order: VecDeque<(u64, String)>,
}

impl Claims {
    fn insert(&mut self, id: String, at: u64) -> bool {
        if !self.ids.insert(id.clone()) {
            return false;
        }
        self.order.push_back((at, id));
        true
    }

    /// Forgets the claims older than the window, as of `now`.
    fn expire(&mut self, now: u64) {
        while let Some((at, _)) = self.order.front()
            && at.saturating_add(KEEP.as_secs()) < now
        {
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
    }

    fn lines(&self) -> String {
        self.order.iter().map(|(at, id)| line(id, *at)).collect()
    }
}

/// A claim's line in the log.
fn line(id: &str, at: u64) -> String {
    format!("{id} {at}\n")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) struct SessionLog {
    claimed: Arc<Mutex<Claims>>,
    writer: mpsc::Sender<Claim>,
}

impl SessionLog {
    /// Opens `dir/sessions.log` (created if missing), keeping its claims of the
    /// last [`KEEP`] and those the per-session marker files of earlier
    /// versions (`dir/sessions/`, dated by their modification time) record,
    /// and starts its writer.
    pub(crate) fn open(dir: &Path) -> Result<SessionLog, String> {
        let path = dir.join("sessions.log");
        let at = |e: std::io::Error| format!("{}: {e}", path.display());
        let now = now_secs();
        let mut found: Vec<(u64, String)> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir.join("sessions")) {
            for entry in entries.flatten() {
                let when = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(now, |d| d.as_secs());
                found.push((when, entry.file_name().to_string_lossy().into_owned()));
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
        let mut lines = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            lines += 1;
            // A line of an earlier version has no time: kept a window from now.
            let (id, when) = match line.split_once(' ') {
                Some((id, when)) => (id, when.parse().unwrap_or(now)),
                None => (line, now),
            };
            found.push((when, id.to_string()));
        }
        // An id claimed twice (again after it was forgotten) counts from its
        // last claim.
        found.sort_by(|(t1, id1), (t2, id2)| id1.cmp(id2).then(t2.cmp(t1)));
        found.dedup_by(|later, kept| later.1 == kept.1);
        found.sort();
        let mut claims = Claims::default();
        for (when, id) in found {
            claims.insert(id, when);
        }
        claims.expire(now);
        if created {
            // The file's name lives in the directory.
            sync_dir(dir)?;
        }
        // A claim cut short by a crash was never synced, so its session never
        // released a share: end its line so that the next claim starts its own.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n").map_err(at)?;
            file.sync_data().map_err(at)?;
        }
        let log = LogFile {
            dir: dir.to_path_buf(),
            path: path.clone(),
            file,
            lines,
        };
        let claimed = Arc::new(Mutex::new(claims));
        let (writer, queued) = mpsc::channel();
        let kept = claimed.clone();
        std::thread::Builder::new()
            .name("session-log".into())
            .spawn(move || write_claims(log, queued, kept))
            .map_err(|e| format!("starting the session log writer: {e}"))?;
        Ok(SessionLog { claimed, writer })
    }

    /// Whether `id` was claimed (a poisoned lock says yes: fail closed).
    pub(crate) fn claimed(&self, id: &str) -> bool {
        self.claimed
            .lock()
            .map_or(true, |claimed| claimed.ids.contains(id))
    }

    /// Claims `id` (a validated token: no spaces or line breaks), or refuses
    /// an id claimed before. The answer comes once the claim is on disk.
    pub(crate) fn claim(&self, id: &str) -> Result<Durable, String> {
        let now = now_secs();
        let mut claimed = self.claimed.lock().map_err(|_| "session log poisoned")?;
        claimed.expire(now);
        if !claimed.insert(id.to_string(), now) {
            return Err(format!("session {id} was already consumed"));
        }
        let (done, durable) = oneshot::channel();
        self.writer
            .send((id.to_string(), now, done))
            .map_err(|_| "the session log writer stopped".to_string())?;
        Ok(durable)
    }
}

/// The log file as the writer thread holds it.
struct LogFile {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Lines in the file, kept claims or not.
    lines: usize,
}

impl LogFile {
    /// Replaces the file with one holding only the kept claims: written and
    /// synced aside, then renamed over it (a crash leaves one or the other).
    fn compact(&mut self, kept: &Mutex<Claims>) -> Result<(), String> {
        let (text, lines) = {
            let mut claims = kept.lock().map_err(|_| "session log poisoned")?;
            claims.expire(now_secs());
            (claims.lines(), claims.order.len())
        };
        let aside = self.path.with_extension("log.compacting");
        let at = |e: std::io::Error| format!("{}: {e}", aside.display());
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&aside).map_err(at)?;
        file.write_all(text.as_bytes()).map_err(at)?;
        file.sync_data().map_err(at)?;
        std::fs::rename(&aside, &self.path).map_err(at)?;
        // Claims go on at the end of the file just written, now the log.
        self.file = file;
        self.lines = lines;
        sync_dir(&self.dir)
    }
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Appends claims as they come, each group with one write and one sync,
/// until the log is dropped; rewrites the log once it is mostly claims no
/// longer kept.
fn write_claims(mut log: LogFile, queued: mpsc::Receiver<Claim>, kept: Arc<Mutex<Claims>>) {
    while let Ok(first) = queued.recv() {
        let mut group = vec![first];
        group.extend(queued.try_iter().take(MAX_GROUP - 1));
        let lines: String = group.iter().map(|(id, at, _)| line(id, *at)).collect();
        let written = log
            .file
            .write_all(lines.as_bytes())
            .and_then(|()| log.file.sync_data())
            .map_err(|e| format!("writing the session log: {e}"));
        log.lines += group.len();
        for (_, _, done) in group {
            let _ = done.send(written.clone());
        }
        let live = kept.lock().map_or(0, |c| c.order.len());
        if written.is_ok()
            && log.lines > live.saturating_mul(2).saturating_add(COMPACT_SLACK)
            && let Err(e) = log.compact(&kept)
        {
            // The log stays whole (appends go on to the old file); only its
            // size keeps growing until a rewrite succeeds.
            tracing::warn!(error = %e, "the session log could not be rewritten");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session ids of the log's lines, in order.
    fn ids_in(text: &str) -> Vec<&str> {
        text.lines()
            .map(|l| l.split(' ').next().unwrap_or_default())
            .collect()
    }

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
        assert_eq!(ids_in(&text), ["s-1", "s-2-cut", "s-3"]);
    }

    /// Claims older than the window are forgotten on opening; a line of an
    /// earlier version (no time) counts as claimed now.
    #[tokio::test]
    async fn claims_older_than_the_window_are_forgotten() {
        let dir = tempfile::tempdir().expect("dir");
        let now = now_secs();
        let old = now - KEEP.as_secs() - 10;
        std::fs::write(
            dir.path().join("sessions.log"),
            format!("s-old {old}\ns-recent {}\ns-untimed\n", now - 60),
        )
        .expect("log");
        let log = SessionLog::open(dir.path()).expect("opens");
        assert!(!log.claimed("s-old"));
        assert!(log.claimed("s-recent"));
        assert!(log.claimed("s-untimed"));
        let durable = log
            .claim("s-old")
            .expect("a forgotten id opens a new session");
        assert_eq!(durable.await.expect("answered"), Ok(()));
        assert!(log.claim("s-old").is_err());
    }

    /// A log that is mostly forgotten claims is rewritten with the kept ones
    /// only, and what it holds still opens.
    #[tokio::test]
    async fn a_log_of_forgotten_claims_is_rewritten() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sessions.log");
        let ancient: String = (0..10_000).map(|i| format!("s-{i} 1000\n")).collect();
        std::fs::write(&path, ancient).expect("log");
        let log = SessionLog::open(dir.path()).expect("opens");
        let durable = log.claim("s-new").expect("claims");
        assert_eq!(durable.await.expect("answered"), Ok(()));
        // The writer rewrites the log right after answering that claim, before
        // it takes the next one: once the next is on disk, both are the log.
        let durable = log.claim("s-after").expect("claims");
        assert_eq!(durable.await.expect("answered"), Ok(()));
        let text = std::fs::read_to_string(&path).expect("log");
        let mut ids = ids_in(&text);
        // A claim made while the log is rewritten may be in the rewrite and
        // then appended as well: a repeated line, read as one claim.
        ids.dedup();
        assert_eq!(ids, ["s-new", "s-after"]);
        drop(log);
        let reopened = SessionLog::open(dir.path()).expect("reopens");
        assert!(reopened.claimed("s-new") && reopened.claimed("s-after"));
        assert!(!reopened.claimed("s-1"));
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
