//! `manifest.json`: the committed set of Parquet files and how far the WAL is flushed.
//!
//! The manifest is the commit point of flushes and compactions: a Parquet file exists for
//! readers once a manifest naming it has been renamed into place. Files that no manifest
//! names (a crash between writing and committing) are removed at start-up.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::Disk;
use crate::error::{Result, StorageError};
use crate::fsutil::write_atomic;

pub const MANIFEST: &str = "manifest.json";
pub const EVENTS_DIR: &str = "events";

/// One committed Parquet file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Relative to the data dir, e.g. `events/date=2026-11-11/f00000000000000000003-….parquet`.
    pub path: String,
    /// The partition folder, e.g. `date=2026-11-11`.
    pub partition: String,
    pub rows: u64,
    pub bytes: u64,
    /// Smallest and largest event ts in the file (UTC µs), for pruning.
    pub min_ts: i64,
    pub max_ts: i64,
    /// Set for another node's file on the shared object store (`[storage] url`): `path`
    /// is then its object key. None for a file of this data dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl FileMeta {
    /// When the file was written (UTC µs, to the ms): its name ends in a UUIDv7 made just
    /// before its commit. None for a name without one.
    pub fn written_at(&self) -> Option<i64> {
        let stem = self.path.strip_suffix(".parquet")?;
        let (_, id) = stem.rsplit_once('-')?;
        let uuid = uuid::Uuid::try_parse(id).ok()?;
        let (secs, nanos) = uuid.get_timestamp()?.to_unix();
        Some(secs as i64 * 1_000_000 + i64::from(nanos / 1_000))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// Every WAL segment numbered up to this one is in the files below.
    pub wal_flushed_through: u64,
    pub files: Vec<FileMeta>,
}

impl Manifest {
    pub fn load(data_dir: &Path) -> Result<Manifest> {
        let path = data_dir.join(MANIFEST);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StorageError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(StorageError::io(path)(e)),
        }
    }

    pub fn commit(&self, disk: &dyn Disk, data_dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        write_atomic(disk, &data_dir.join(MANIFEST), &bytes)
    }

    pub fn total_rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }

    /// Delete Parquet and temporary files under `events/` that this manifest does not name.
    pub fn remove_orphans(&self, data_dir: &Path) -> Result<usize> {
        let known: std::collections::HashSet<PathBuf> =
            self.files.iter().map(|f| data_dir.join(&f.path)).collect();
        let mut removed = 0;
        let mut stack = vec![data_dir.join(EVENTS_DIR)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.map_err(StorageError::io(&dir))?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if (ext == "tmp" || ext == "parquet") && !known.contains(&path) {
                    tracing::info!(file = %path.display(), "removing a file no committed manifest names");
                    fs::remove_file(&path).map_err(StorageError::io(&path))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}
