//! What a power cut requires of the files the agent relies on after a restart: directories
//! fsynced after a file in them was created or renamed (the queue and the model store).

use std::io;
use std::path::Path;

/// fsyncs a directory, so that a rename or a file created in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (and its parents) if missing; a new directory is synced into its parent.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}
