//! Crash-safe file steps: write to a temporary name, fsync, rename, fsync the directory;
//! and the data dir's lock, so two processes never write one data dir.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::disk::Disk;
use crate::error::{Result, StorageError};

/// Make a directory entry change (create, rename, delete) durable.
pub fn sync_dir(disk: &dyn Disk, dir: &Path) -> Result<()> {
    disk.sync_dir(dir).map_err(StorageError::io(dir))
}

/// Create `dir` and any missing parents, each fsynced into its parent, so a file made
/// durable inside it cannot vanish with a directory entry lost in a power cut.
pub fn create_dir_durable(disk: &dyn Disk, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dir_durable(disk, parent)?;
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Made meanwhile by another thread: the sync below covers it all the same.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StorageError::io(dir)(e)),
    }
    sync_dir(disk, parent)
}

/// Replace `path` with `bytes` atomically: readers and crashes see the old or the new file.
pub fn write_atomic(disk: &dyn Disk, path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(disk, path, |f| f.write_all(bytes))
}

/// Replace `path` atomically with what `write` writes, as [`write_atomic`] does: for a
/// file written as it is made, not held whole in memory first.
pub fn write_atomic_with(
    disk: &dyn Disk,
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = path.with_extension("tmp");
    // Left by a crash, or by an earlier attempt that failed.
    let _ = fs::remove_file(&tmp);
    let mut f = disk.create(&tmp).map_err(StorageError::io(&tmp))?;
    write(&mut *f)
        .and_then(|()| f.sync())
        .map_err(StorageError::io(&tmp))?;
    rename_durable(disk, &tmp, path)
}

/// Rename a file that is already fsynced, and fsync the target directory.
pub fn rename_durable(disk: &dyn Disk, from: &Path, to: &Path) -> Result<()> {
    disk.rename(from, to).map_err(StorageError::io(to))?;
    sync_dir(disk, to.parent().unwrap_or(Path::new(".")))
}

/// An exclusive lock on `data_dir/LOCK` (which holds the owner's pid), held while a
/// process writes the data dir. The kernel drops it when the process dies, so a kill -9
/// leaves no stale lock behind.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock> {
        use std::io::{Read, Seek};
        let path = data_dir.join("LOCK");
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(StorageError::io(&path))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)
                    .and_then(|()| file.rewind())
                    .and_then(|()| write!(file, "{}", std::process::id()))
                    .map_err(StorageError::io(&path))?;
                Ok(DataDirLock { _file: file })
            }
            Err(fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Err(StorageError::Locked {
                    data_dir: data_dir.to_path_buf(),
                    pid: pid.trim().to_string(),
                })
            }
            Err(fs::TryLockError::Error(e)) => Err(StorageError::io(&path)(e)),
        }
    }
}
