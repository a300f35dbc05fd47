//! The dedup index: 128-bit hashes of the event_ids received within `dedup_window`
//! (measured on received_at), capped at `dedup_max_ids`.
//!
//! It survives restarts through one small "ids file" per flush (`dedup/<wal seq>.ids`,
//! written before the flush commits) plus the replay of the WAL segments not yet flushed.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

use crate::disk::Disk;
use crate::error::{IngestError, Result};
use crate::fsutil::write_atomic;

/// The ids are already uniform hashes; hashing them again would be wasted work.
#[derive(Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

pub fn id_hash(event_id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(event_id.as_bytes())
}

pub struct DedupIndex {
    ids: HashSet<u128, BuildHasherDefault<PassThroughHasher>>,
    /// Insertion order, in chunks that share one received_at (one request or one record).
    order: VecDeque<(i64, Vec<u128>)>,
    window_us: i64,
    max_ids: usize,
    /// Ids that left before their window ended because of `max_ids`.
    pub evicted: u64,
}

impl DedupIndex {
    pub fn new(window: std::time::Duration, max_ids: usize) -> Self {
        // Start with room for a busy minute or so: growing the set rehashes every id on
        // the writer thread, which showed up under load.
        const INITIAL_IDS: usize = 1 << 20;
        Self {
            ids: HashSet::with_capacity_and_hasher(max_ids.min(INITIAL_IDS), Default::default()),
            order: VecDeque::new(),
            window_us: window.as_micros() as i64,
            max_ids,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Insert; `false` when the id was already there (a duplicate).
    pub fn insert(&mut self, hash: u128) -> bool {
        self.ids.insert(hash)
    }

    /// Take back inserts whose write failed.
    pub fn remove(&mut self, hashes: &[u128]) {
        for h in hashes {
            self.ids.remove(h);
        }
    }

    /// Record the order of inserted hashes (after their write is durable) so they expire.
    pub fn record(&mut self, received_at: i64, hashes: Vec<u128>) {
        if !hashes.is_empty() {
            self.order.push_back((received_at, hashes));
        }
    }

    /// Insert and record hashes known to be stored (start-up load); returns how many were new.
    pub fn load(&mut self, received_at: i64, hashes: Vec<u128>) -> usize {
        let new: Vec<u128> = hashes.into_iter().filter(|h| self.ids.insert(*h)).collect();
        let n = new.len();
        self.record(received_at, new);
        n
    }

    /// Drop ids received before `now - window`, then the oldest past `max_ids`.
    pub fn expire(&mut self, now: i64) {
        let cutoff = now - self.window_us;
        while let Some(at) = self.order.front().map(|(at, _)| *at) {
            let over_cap = self.ids.len() > self.max_ids;
            if at >= cutoff && !over_cap {
                break;
            }
            let (_, hashes) = self.order.pop_front().expect("front exists");
            if at >= cutoff {
                self.evicted += hashes.len() as u64;
            }
            for h in &hashes {
                self.ids.remove(h);
            }
        }
    }
}

/// `dedup/<seq>.ids`: the (received_at, hash) pairs of one flush, sorted by received_at.
pub struct IdsFile;

impl IdsFile {
    const MAGIC: &'static [u8; 8] = b"FHIDS001";

    pub fn path(dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!("{seq:020}.ids"))
    }

    pub fn write(disk: &dyn Disk, dir: &Path, seq: u64, mut pairs: Vec<(i64, u128)>) -> Result<()> {
        crate::fsutil::create_dir_durable(disk, dir)?;
        pairs.sort_unstable();
        let mut buf = Vec::with_capacity(16 + pairs.len() * 24);
        buf.extend_from_slice(Self::MAGIC);
        for (at, h) in &pairs {
            buf.extend_from_slice(&at.to_le_bytes());
            buf.extend_from_slice(&h.to_le_bytes());
        }
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        write_atomic(disk, &Self::path(dir, seq), &buf)
    }

    pub fn read(path: &Path) -> Result<Vec<(i64, u128)>> {
        let buf = fs::read(path).map_err(IngestError::io(path))?;
        let corrupt = |reason: &str| IngestError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        if buf.len() < 12 || &buf[..8] != Self::MAGIC || (buf.len() - 12) % 24 != 0 {
            return Err(corrupt("not a dedup ids file"));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(corrupt("checksum mismatch"));
        }
        Ok(body[8..]
            .chunks_exact(24)
            .map(|c| {
                let at = i64::from_le_bytes(c[..8].try_into().unwrap());
                let h = u128::from_le_bytes(c[8..].try_into().unwrap());
                (at, h)
            })
            .collect())
    }

    /// All ids files with their flush sequence number, ascending.
    pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(dir) else {
            return Ok(out);
        };
        for entry in entries {
            let path = entry.map_err(IngestError::io(dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(seq) = name
                .strip_suffix(".ids")
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((seq, path));
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn window_and_cap() {
        let mut idx = DedupIndex::new(Duration::from_secs(10), 3);
        assert!(idx.insert(1));
        assert!(!idx.insert(1));
        idx.record(0, vec![1]);
        assert!(idx.insert(2) && idx.insert(3));
        idx.record(5_000_000, vec![2, 3]);
        idx.expire(10_000_000);
        assert_eq!(idx.len(), 3);
        idx.expire(10_000_001);
        assert_eq!(idx.len(), 2, "id 1 left with its window");
        assert!(idx.insert(4) && idx.insert(5));
        idx.record(6_000_000, vec![4, 5]);
        idx.expire(6_000_000);
        assert_eq!(idx.len(), 2, "past the cap the oldest leave early");
        assert_eq!(idx.evicted, 2);
    }

    #[test]
    fn ids_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        IdsFile::write(&crate::disk::OsDisk, dir.path(), 7, vec![(2, 20), (1, 10)]).unwrap();
        let files = IdsFile::list(dir.path()).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(IdsFile::read(&files[0].1).unwrap(), vec![(1, 10), (2, 20)]);
    }
}
