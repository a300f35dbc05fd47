//! Crash-safe file steps: write to a temporary name, fsync, rename, fsync the directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{IngestError, Result};

/// Make a directory entry change (create, rename, delete) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(IngestError::io(dir))
}

/// Replace `path` with `bytes` atomically: readers and crashes see the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(IngestError::io(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(IngestError::io(&tmp))?;
    rename_durable(&tmp, path)
}

/// Rename a file that is already fsynced, and fsync the target directory.
pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(IngestError::io(to))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}
