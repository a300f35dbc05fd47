//! The file-system seam under the WAL, the Parquet writer and every atomic file write.
//!
//! Durability rests on five operations: create a file, write it, fsync it, rename it, and
//! fsync its directory. [`Disk`] is those operations; [`OsDisk`] performs them. [`FaultDisk`]
//! performs them too, but can be told to fail one (EIO, ENOSPC, on write, fsync, cut or
//! rename; before or after its effect) and to lose power: everything not made durable by an
//! fsync is dropped or zero-filled, files and renames whose directory was not fsynced are
//! undone, and every later operation fails. Tests use it to check the rules "no fsync, no
//! ack", "nothing of a refused request appears later" and "after a power loss every
//! acknowledged event is present once".

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// A file being written through a [`Disk`].
pub trait DiskFile: Write + Send {
    /// fdatasync: the data written so far (and the length) survive a power loss.
    fn sync(&mut self) -> io::Result<()>;
    /// Cut (or extend) the file to `len` bytes; durable only after [`DiskFile::sync`].
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// A hint after [`DiskFile::sync`]: the synced bytes will not be read again soon, so
    /// the page cache may let them go. Only the WAL says it: read back only after a crash.
    fn release_synced(&mut self) {}
}

/// The durable-write operations of a data dir.
pub trait Disk: Send + Sync + Debug {
    /// Create a new file for appending; fails if `path` exists.
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Rename a file; durable only after [`Disk::sync_dir`] of the target's directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Make the directory's entries (creates, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Rename the file `spare` to `path` and open it for writing from its first byte,
    /// keeping its blocks: rewriting allocated blocks needs no journal commit at each
    /// fsync, as appending to a new file does. `Unsupported` (the default) makes the
    /// caller create a new file instead.
    fn reuse(&self, spare: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let _ = (spare, path);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsDisk;

// Only Linux reads `len` and `released` (see `release_synced`).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct OsFile {
    file: File,
    /// Bytes written since it was opened: its length when created in append mode, the
    /// bytes rewritten from its start when reused ([`Disk::reuse`]; a segment is never
    /// written again after a failed write cuts it, so no write lands past a cut).
    len: u64,
    /// Bytes before this have been released from the page cache.
    released: u64,
}

impl Write for OsFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DiskFile for OsFile {
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.len = len;
        self.released = self.released.min(len);
        Ok(())
    }
    /// Drop the synced whole pages from the page cache. A WAL is written once and read
    /// only at replay, yet every byte written sits in a fresh page-cache page until its
    /// segment is deleted; dropped at once, those pages go back to the kernel's free lists
    /// warm and the next appends reuse them (on a VM whose host reclaims free memory, the
    /// first touch of a fresh page is what the copy into the cache cost; see
    /// benches/README.md). The last partial page stays, so the next append does not read
    /// it back from disk.
    fn release_synced(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: sysconf reads a constant of the system.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(512) as u64;
            let upto = self.len - self.len % page;
            if upto > self.released {
                // Safety: a plain syscall on an fd this struct owns; a failure only means
                // the pages stay cached.
                let rc = unsafe {
                    libc::posix_fadvise(
                        self.file.as_raw_fd(),
                        self.released as libc::off_t,
                        (upto - self.released) as libc::off_t,
                        libc::POSIX_FADV_DONTNEED,
                    )
                };
                if rc == 0 {
                    self.released = upto;
                }
            }
        }
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    // Append mode: after a cut, the next write lands at the new end, not past a hole.
    OpenOptions::new().create_new(true).append(true).open(path)
}

impl Disk for OsDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(OsFile {
            file: create_new(path)?,
            len: 0,
            released: 0,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn reuse(&self, spare: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        // Opened first: a spare that cannot be written is never renamed into place.
        let file = OpenOptions::new().write(true).open(spare)?;
        self.rename(spare, path)?;
        Ok(Box::new(OsFile {
            file,
            len: 0,
            released: 0,
        }))
    }
}

// ---- fault injection ----

/// An operation [`FaultDisk`] can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    Create,
    Write,
    Sync,
    SetLen,
    Rename,
    SyncDir,
}

/// The error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// EIO: the device failed.
    Io,
    /// ENOSPC: the disk is full.
    NoSpace,
}

impl Errno {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Errno::Io => libc::EIO,
            Errno::NoSpace => libc::ENOSPC,
        })
    }
}

/// One planned failure: the next `times` operations `op` on a path containing `path_part`
/// fail with `errno`. With `after_effect` the operation is carried out first (a write
/// that reached the file, an fsync that reached the platter) and then reported failed:
/// the worst case for "a refused request leaves nothing behind".
#[derive(Debug, Clone)]
pub struct Fault {
    pub op: DiskOp,
    pub path_part: String,
    pub errno: Errno,
    pub times: usize,
    pub after_effect: bool,
}

impl Fault {
    pub fn new(op: DiskOp, path_part: &str, errno: Errno) -> Self {
        Self {
            op,
            path_part: path_part.to_string(),
            errno,
            times: 1,
            after_effect: false,
        }
    }
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }
    pub fn after_effect(mut self) -> Self {
        self.after_effect = true;
        self
    }
}

/// What a simulated power loss does to data written since the last fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// The file is back at its length and content of the last fsync.
    Drop,
    /// The file keeps its length; everything after the last fsync reads as zeros
    /// (what ext4 and XFS can leave behind).
    ZeroFill,
}

#[derive(Debug, Default)]
struct Tracked {
    /// Content at the last successful fsync.
    durable: Vec<u8>,
    /// Its directory entry survives a power loss (the directory was fsynced after it).
    entry_durable: bool,
}

#[derive(Debug)]
struct PendingRename {
    to: PathBuf,
    /// What `to` held durably before the rename, if it existed.
    before: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct FaultState {
    off: bool,
    faults: Vec<Fault>,
    files: HashMap<PathBuf, Tracked>,
    renames: Vec<PendingRename>,
    injected: usize,
    reused: usize,
}

/// A [`Disk`] that fails on request and can lose power. Clones share one state.
#[derive(Debug, Clone, Default)]
pub struct FaultDisk {
    state: Arc<Mutex<FaultState>>,
    /// Held (shared) by every operation from its check to the end of its effect, and
    /// (exclusively) by a power loss, so no write lands after the power went off.
    gate: Arc<RwLock<()>>,
}

enum Check {
    Go,
    /// Carry the operation out, then report this error.
    GoThenFail(io::Error),
}

impl FaultDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Plan a failure.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// How many planned failures have happened.
    pub fn injected(&self) -> usize {
        self.lock().injected
    }

    /// How many WAL spares were reused as segments.
    pub fn reused(&self) -> usize {
        self.lock().reused
    }

    /// Fail every later operation with EIO and keep what was written, as after a
    /// kill -9: the page cache outlives the process.
    pub fn halt(&self) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.lock().off = true;
    }

    /// Cut the power: undo what no fsync covered (see [`PowerLoss`]) and fail every later
    /// operation with EIO, as a machine that is off would.
    pub fn power_loss(&self, mode: PowerLoss) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        st.off = true;
        for (path, t) in &st.files {
            if !t.entry_durable {
                let _ = fs::remove_file(path);
                continue;
            }
            let Ok(len) = fs::metadata(path).map(|m| m.len() as usize) else {
                continue;
            };
            let mut content = t.durable.clone();
            if mode == PowerLoss::ZeroFill && len > content.len() {
                content.resize(len, 0);
            }
            let _ = fs::write(path, &content);
        }
        for r in st.renames.iter().rev() {
            let _ = match &r.before {
                Some(bytes) => fs::write(&r.to, bytes),
                None => fs::remove_file(&r.to),
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, op: DiskOp, path: &Path) -> io::Result<Check> {
        let mut st = self.lock();
        if st.off {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let path = path.to_string_lossy();
        let Some(f) = st
            .faults
            .iter_mut()
            .find(|f| f.op == op && f.times > 0 && path.contains(&f.path_part))
        else {
            return Ok(Check::Go);
        };
        f.times -= 1;
        let (err, after) = (f.errno.error(), f.after_effect);
        st.injected += 1;
        if after {
            Ok(Check::GoThenFail(err))
        } else {
            Err(err)
        }
    }

    /// Run `op` on `path` under the planned faults; `effect` is the real operation.
    fn run<T>(
        &self,
        op: DiskOp,
        path: &Path,
        effect: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        match self.check(op, path)? {
            Check::Go => effect(),
            Check::GoThenFail(err) => {
                effect()?;
                Err(err)
            }
        }
    }
}

struct FaultFile {
    disk: FaultDisk,
    path: PathBuf,
    file: File,
}

impl Write for FaultFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = &mut self.file;
        self.disk
            .run(DiskOp::Write, &self.path, || file.write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DiskFile for FaultFile {
    fn sync(&mut self) -> io::Result<()> {
        let (file, path) = (&self.file, &self.path);
        self.disk.run(DiskOp::Sync, path, || {
            file.sync_data()?;
            let content = fs::read(path)?;
            if let Some(t) = self.disk.lock().files.get_mut(path) {
                t.durable = content;
            }
            Ok(())
        })
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let file = &self.file;
        self.disk
            .run(DiskOp::SetLen, &self.path, || file.set_len(len))
    }
}

impl Disk for FaultDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = self.run(DiskOp::Create, path, || create_new(path))?;
        self.lock()
            .files
            .insert(path.to_path_buf(), Tracked::default());
        Ok(Box::new(FaultFile {
            disk: self.clone(),
            path: path.to_path_buf(),
            file,
        }))
    }

    /// The spare holds what it held durably (a synced segment); a power loss undoes its
    /// rewriting since the last fsync, and loses the file if no directory fsync covered
    /// the rename (a real disk would keep the spare under its old name: no loss either
    /// way, as its events were flushed).
    fn reuse(&self, spare: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = self.run(DiskOp::Create, path, || {
            OpenOptions::new().write(true).open(spare)
        })?;
        let durable = fs::read(spare)?;
        self.rename(spare, path)?;
        {
            let mut st = self.lock();
            st.reused += 1;
            if let Some(t) = st.files.get_mut(path) {
                t.durable = durable;
            }
        }
        Ok(Box::new(FaultFile {
            disk: self.clone(),
            path: path.to_path_buf(),
            file,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.run(DiskOp::Rename, to, || {
            let mut st = self.lock();
            let before = match st.files.get(to) {
                Some(t) => t.entry_durable.then(|| t.durable.clone()),
                None => fs::read(to).ok(),
            };
            fs::rename(from, to)?;
            let moved = st.files.remove(from).unwrap_or_default();
            st.files.insert(
                to.to_path_buf(),
                Tracked {
                    entry_durable: false,
                    ..moved
                },
            );
            st.renames.push(PendingRename {
                to: to.to_path_buf(),
                before,
            });
            Ok(())
        })
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.run(DiskOp::SyncDir, dir, || {
            File::open(dir)?.sync_all()?;
            let mut st = self.lock();
            for (path, t) in st.files.iter_mut() {
                if path.parent() == Some(dir) {
                    t.entry_durable = true;
                }
            }
            st.renames.retain(|r| r.to.parent() != Some(dir));
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_loss_keeps_only_what_was_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FaultDisk::new();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut fa = disk.create(&a).unwrap();
        fa.write_all(b"kept").unwrap();
        fa.sync().unwrap();
        disk.sync_dir(dir.path()).unwrap();
        fa.write_all(b"lost").unwrap();
        let mut fb = disk.create(&b).unwrap();
        fb.write_all(b"never in the directory").unwrap();
        fb.sync().unwrap();
        disk.power_loss(PowerLoss::ZeroFill);
        assert_eq!(fs::read(&a).unwrap(), b"kept\0\0\0\0");
        assert!(!b.exists());
        assert!(fa.write_all(b"x").is_err(), "the power is off");
    }

    #[test]
    fn an_unsynced_rename_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FaultDisk::new();
        let (tmp, target) = (dir.path().join("m.tmp"), dir.path().join("m"));
        fs::write(&target, b"old").unwrap();
        let mut f = disk.create(&tmp).unwrap();
        f.write_all(b"new").unwrap();
        f.sync().unwrap();
        disk.rename(&tmp, &target).unwrap();
        disk.power_loss(PowerLoss::Drop);
        assert_eq!(fs::read(&target).unwrap(), b"old");
    }

    #[test]
    fn a_fault_after_its_effect_reports_failure_but_changes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let disk = FaultDisk::new();
        disk.inject(Fault::new(DiskOp::Write, "w", Errno::NoSpace).after_effect());
        let path = dir.path().join("w");
        let mut f = disk.create(&path).unwrap();
        let err = f.write_all(b"abc").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(fs::read(&path).unwrap(), b"abc");
        assert_eq!(disk.injected(), 1);
        f.write_all(b"d").unwrap();
    }
}
