//! Files holding secrets.

use std::io::Write;
use std::path::Path;

/// Creates `path` readable only by its owner (never overwriting), writes
/// `contents` and syncs it, and its name in the directory, to disk before
/// returning: after a crash the file is there whole or not at all.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    // The name lives in the directory: without this a crash can forget a
    // file whose contents were on disk (a guardian's session marker, say).
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
