//! The dedup index: 128-bit hashes of the event_ids received within `dedup_window`
//! (measured on received_at), capped at `dedup_max_ids`.
//!
//! It survives restarts through one small "ids file" per flush (`dedup/<wal seq>.ids`,
//! written before the flush commits) plus the replay of the WAL segments not yet flushed.
//!
//! Layout, for about 21 bytes per id at the cap (a `HashSet<u128>` plus an expiry queue
//! took 35-55): the hashes sit once, in arrival order, in a ring of fixed blocks (16
//! bytes each); a linear-probing table of 32-bit ring positions (at most 80% full, so
//! 5-10 bytes per id) finds them. Expiry pops the ring's front and deletes its slot by
//! backward shift, so the table never holds tombstones. Nothing is ever held twice: the
//! ring grows by a block without moving what it holds, and the table is rebuilt from the
//! ring after the old one is freed, so memory never passes ~26 bytes per id, not even
//! while growing (a ring in one allocation held old and new copies at once, ~50).

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};

use crate::disk::Disk;
use crate::error::{IngestError, Result};
use crate::fsutil::write_atomic;

pub fn id_hash(event_id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(event_id.as_bytes())
}

const EMPTY: u32 = u32::MAX;
/// Ids within this many µs of received_at share one expiry chunk: expiry is exact to a
/// second, and a stream of one-event requests costs no chunk per id.
const CHUNK_US: i64 = 1_000_000;

pub struct DedupIndex {
    /// Every id in the index, oldest first. Position `p` (counted since the start, mod
    /// 2^32) is at `ring.get(p - head)`.
    ring: BlockRing,
    /// Absolute position of `ring[0]`, mod 2^32.
    head: u32,
    /// Slots holding a ring position or EMPTY; the length is a power of two.
    table: Vec<u32>,
    /// (first received_at, last received_at, ids) of committed runs, oldest first; the
    /// ids after them in the ring are inserted but not yet durable.
    chunks: VecDeque<(i64, i64, usize)>,
    committed: usize,
    window_us: i64,
    max_ids: usize,
    /// Ids that left before their window ended because of `max_ids`.
    pub evicted: u64,
}

impl DedupIndex {
    pub fn new(window: std::time::Duration, max_ids: usize) -> Self {
        // A table with room for a busy minute or so: growing it rehashes every id on
        // the writer thread, which showed up under load. (The ring grows by blocks.)
        const INITIAL_IDS: usize = 1 << 20;
        let ids = max_ids.clamp(16, INITIAL_IDS);
        Self {
            ring: BlockRing::default(),
            head: 0,
            table: vec![EMPTY; table_len(ids)],
            chunks: VecDeque::new(),
            committed: 0,
            window_us: window.as_micros() as i64,
            max_ids: max_ids.min(u32::MAX as usize / 2),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Heap bytes held, for the memory figure per id.
    pub fn heap_bytes(&self) -> usize {
        self.ring.heap_bytes() + self.table.len() * 4 + self.chunks.capacity() * 24
    }

    fn slot_of(&self, hash: u128) -> usize {
        // The hash is uniform: its top bits are as good an index as any.
        (hash >> 64) as usize & (self.table.len() - 1)
    }

    fn at(&self, pos: u32) -> u128 {
        self.ring.get(pos.wrapping_sub(self.head) as usize)
    }

    /// The slot holding `hash`, or the empty slot where it would go.
    fn probe(&self, hash: u128) -> (usize, bool) {
        let mask = self.table.len() - 1;
        let mut slot = self.slot_of(hash);
        loop {
            match self.table[slot] {
                EMPTY => return (slot, false),
                pos if self.at(pos) == hash => return (slot, true),
                _ => slot = (slot + 1) & mask,
            }
        }
    }

    /// Insert; `false` when the id was already there (a duplicate). Until
    /// [`Self::record`] it is pending and [`Self::remove_pending`] takes it back.
    pub fn insert(&mut self, hash: u128) -> bool {
        let (slot, found) = self.probe(hash);
        if found {
            return false;
        }
        let pos = self.head.wrapping_add(self.ring.len() as u32);
        self.ring.push_back(hash);
        self.table[slot] = pos;
        if self.ring.len() * 5 > self.table.len() * 4 {
            self.rebuild(self.table.len() * 2);
        }
        true
    }

    fn rebuild(&mut self, len: usize) {
        // Free the old table first: the ring alone says where every id goes.
        self.table = Vec::new();
        self.table = vec![EMPTY; len];
        let mask = len - 1;
        for (i, h) in self.ring.iter().enumerate() {
            let mut slot = self.slot_of(h);
            while self.table[slot] != EMPTY {
                slot = (slot + 1) & mask;
            }
            self.table[slot] = self.head.wrapping_add(i as u32);
        }
    }

    /// Delete the slot of `hash` (present), shifting later entries of its run back so
    /// every entry stays reachable from its home slot.
    fn delete(&mut self, hash: u128) {
        let mask = self.table.len() - 1;
        let (mut hole, found) = self.probe(hash);
        debug_assert!(found);
        let mut next = (hole + 1) & mask;
        while self.table[next] != EMPTY {
            let home = self.slot_of(self.at(self.table[next]));
            // Move the entry at `next` into the hole unless its home lies in (hole, next].
            if (next.wrapping_sub(home) & mask) >= (next.wrapping_sub(hole) & mask) {
                self.table[hole] = self.table[next];
                hole = next;
            }
            next = (next + 1) & mask;
        }
        self.table[hole] = EMPTY;
    }

    /// The pending ids inserted since the last record are durable, received at
    /// `received_at`: they now expire with the window.
    pub fn record(&mut self, received_at: i64, count: usize) {
        if count == 0 {
            return;
        }
        debug_assert!(self.committed + count <= self.ring.len());
        self.committed += count;
        match self.chunks.back_mut() {
            Some((first, last, n)) if received_at >= *first && received_at - *first < CHUNK_US => {
                *last = (*last).max(received_at);
                *n += count;
            }
            _ => self.chunks.push_back((received_at, received_at, count)),
        }
    }

    /// Take back the pending ids: their write failed.
    pub fn remove_pending(&mut self) {
        while self.ring.len() > self.committed {
            let h = self.ring.back().expect("pending ids are in the ring");
            self.delete(h);
            self.ring.pop_back();
        }
    }

    /// Insert and record hashes known to be stored (start-up load); returns how many were new.
    pub fn load(&mut self, received_at: i64, hashes: impl IntoIterator<Item = u128>) -> usize {
        let n = hashes.into_iter().filter(|h| self.insert(*h)).count();
        self.record(received_at, n);
        n
    }

    /// Drop ids received before `now - window`, then the oldest past `max_ids`.
    pub fn expire(&mut self, now: i64) {
        let cutoff = now - self.window_us;
        while let Some(&(_, last, n)) = self.chunks.front() {
            let over_cap = self.ring.len() > self.max_ids;
            if last >= cutoff && !over_cap {
                break;
            }
            self.chunks.pop_front();
            if last >= cutoff {
                self.evicted += n as u64;
            }
            for _ in 0..n {
                let h = self.ring.get(0);
                self.delete(h);
                self.ring.pop_front();
                self.head = self.head.wrapping_add(1);
            }
            self.committed -= n;
        }
    }
}

/// Ids per ring block (256 KiB): small enough that the blocks' slack is a rounding error.
const BLOCK: usize = 1 << 14;

/// A double-ended queue of hashes in fixed blocks: growing adds a block and never moves
/// what is held; popping the front frees each block as it empties.
#[derive(Default)]
struct BlockRing {
    blocks: VecDeque<Box<[u128]>>,
    /// Index of the first hash in `blocks[0]`.
    start: usize,
    len: usize,
}

impl BlockRing {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn heap_bytes(&self) -> usize {
        self.blocks.len() * BLOCK * 16 + self.blocks.capacity() * 16
    }

    fn get(&self, i: usize) -> u128 {
        debug_assert!(i < self.len);
        let j = self.start + i;
        self.blocks[j / BLOCK][j % BLOCK]
    }

    fn back(&self) -> Option<u128> {
        (!self.is_empty()).then(|| self.get(self.len - 1))
    }

    fn push_back(&mut self, hash: u128) {
        let j = self.start + self.len;
        if j / BLOCK == self.blocks.len() {
            self.blocks.push_back(vec![0; BLOCK].into_boxed_slice());
        }
        self.blocks[j / BLOCK][j % BLOCK] = hash;
        self.len += 1;
    }

    fn pop_front(&mut self) {
        if self.is_empty() {
            return;
        }
        self.start += 1;
        self.len -= 1;
        if self.start == BLOCK {
            self.blocks.pop_front();
            self.start = 0;
        }
    }

    fn pop_back(&mut self) {
        self.len = self.len.saturating_sub(1);
    }

    fn iter(&self) -> impl Iterator<Item = u128> + '_ {
        (0..self.len).map(|i| self.get(i))
    }
}

/// Table slots for `ids` at most 80% full.
fn table_len(ids: usize) -> usize {
    (ids * 5 / 4 + 1).next_power_of_two()
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
        idx.record(0, 1);
        assert!(idx.insert(2) && idx.insert(3));
        idx.record(5_000_000, 2);
        idx.expire(10_000_000);
        assert_eq!(idx.len(), 3);
        idx.expire(10_000_001);
        assert_eq!(idx.len(), 2, "id 1 left with its window");
        assert!(idx.insert(1), "an expired id is new again");
        idx.remove_pending();
        assert!(idx.insert(4) && idx.insert(5));
        idx.record(6_000_000, 2);
        idx.expire(6_000_000);
        assert_eq!(idx.len(), 2, "past the cap the oldest leave early");
        assert_eq!(idx.evicted, 2);
        assert!(!idx.insert(4) && !idx.insert(5) && idx.insert(2));
    }

    /// Against a plain set and queue, with colliding hashes (equal top bits), growth,
    /// expiry by window and by cap, and taken-back inserts. Steps are a second apart, so
    /// each record is its own expiry chunk, as in the model.
    #[test]
    fn agrees_with_a_reference_model() {
        use std::collections::HashSet;
        let (window, cap) = (50_000_000, 3000);
        let mut idx = DedupIndex::new(Duration::from_micros(window as u64), cap);
        let mut set = HashSet::new();
        let mut queue: VecDeque<(i64, Vec<u128>)> = VecDeque::new();
        let mut x: u64 = 1;
        let mut rand = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for step in 0..6_000i64 {
            let now = step * 1_000_000;
            let mut pending = Vec::new();
            for _ in 0..rand(120) {
                // Top halves (the home slots) often shared: probe runs and shifts across them.
                let top = rand(2048).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let h = ((top as u128) << 64) | rand(6000) as u128;
                let new = !set.contains(&h) && !pending.contains(&h);
                assert_eq!(idx.insert(h), new, "step {step}");
                if new {
                    pending.push(h);
                }
            }
            if rand(10) == 0 {
                idx.remove_pending();
            } else {
                idx.record(now, pending.len());
                set.extend(pending.iter().copied());
                if !pending.is_empty() {
                    queue.push_back((now, pending));
                }
            }
            idx.expire(now);
            while let Some((at, ids)) = queue.front() {
                if *at >= now - window && set.len() <= cap {
                    break;
                }
                ids.iter().for_each(|h| {
                    set.remove(h);
                });
                queue.pop_front();
            }
            assert_eq!(idx.len(), set.len(), "step {step}");
        }
    }

    /// The contract's "about 2 GiB" at the default 100M cap: about 21 bytes per id.
    #[test]
    fn about_21_bytes_per_id_at_the_cap() {
        let n = 3_000_000;
        let mut idx = DedupIndex::new(Duration::from_secs(3600), n);
        for i in 0..n as u64 {
            let h = id_hash(&format!("event-{i}"));
            assert!(idx.insert(h));
            if i % 500 == 499 {
                idx.record(i as i64, 500);
            }
        }
        let per_id = idx.heap_bytes() as f64 / idx.len() as f64;
        eprintln!("dedup index: {per_id:.1} bytes per id at {n} ids");
        assert!(per_id <= 22.0, "{per_id:.1} bytes per id");
    }

    /// Growing without a cap, the index never holds more than ~27 bytes per id (ring
    /// blocks, the table right after it doubles, chunks), measured after every insert.
    #[test]
    fn growing_never_holds_more_than_27_bytes_per_id() {
        let mut idx = DedupIndex::new(Duration::from_secs(3600), 100_000_000);
        let mut worst: f64 = 0.0;
        for i in 0..3_000_000u64 {
            assert!(idx.insert(id_hash(&format!("event-{i}"))));
            if i % 500 == 499 {
                idx.record(i as i64, 500);
            }
            if i >= 1_000_000 {
                worst = worst.max(idx.heap_bytes() as f64 / idx.len() as f64);
            }
        }
        eprintln!("dedup index while growing: at most {worst:.1} bytes per id");
        assert!(worst <= 27.0, "{worst:.1} bytes per id");
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
