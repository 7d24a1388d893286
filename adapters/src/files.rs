//! Files holding secrets.

use std::io::Write;
use std::path::Path;

/// Creates `path` readable only by its owner (never overwriting), writes
/// `contents` and syncs it to disk before returning.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
