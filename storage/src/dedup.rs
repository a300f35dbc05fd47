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
//! backward shift, so the table never holds tombstones. The ring grows by a block
//! without moving what it holds. The table grows incrementally: a doubled table is
//! filled from the ring two positions per insert while lookups also see the old one,
//! because rebuilding it at once stalls the writer thread (615 ms at 13.4 M ids, longer
//! than a restart's first request could wait in the crash loop). While it grows the
//! index holds up to ~31 bytes per id; below the cap, so still less than at the cap.

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};

use crate::disk::Disk;
use crate::error::{Result, StorageError};
use crate::fsutil::write_atomic_with;
use crate::gather::prefetch;

pub fn id_hash(event_id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(event_id.as_bytes())
}

/// A slot holds EMPTY or `OCCUPIED | tag | position`: a ring position, counted mod 2^28
/// (the index holds at most [`MAX_IDS`], half of that, so positions are unambiguous), and
/// 3 bits of the id's hash. A probe reads the ring only where the tag matches: a new id
/// passes a run of occupied slots (several at the table's fill of up to 80%) with one
/// ring read in 8 of them, not one in each, each a likely cache miss (the probe was 7% of
/// the server's CPU at peak ingest). EMPTY is 0, so a new table is zeroed memory the OS
/// maps lazily: growing allocates nothing up front (filling 128 MiB with a non-zero
/// EMPTY took 80 ms of the writer's time at 13.4 M ids).
const EMPTY: u32 = 0;
const OCCUPIED: u32 = 1 << 31;
const TAG_SHIFT: u32 = 28;
const TAG_MASK: u32 = 0b111 << TAG_SHIFT;
const POS_MASK: u32 = (1 << TAG_SHIFT) - 1;
/// Most ids the index holds (2.8 GiB of index at ~21 bytes each).
pub const MAX_IDS: usize = 1 << 27;

/// Position `pos + n`, mod 2^28.
fn after(pos: u32, n: usize) -> u32 {
    pos.wrapping_add(n as u32) & POS_MASK
}

/// The slot of position `pos` holding `hash`.
fn slot(pos: u32, hash: u128) -> u32 {
    OCCUPIED | (((hash as u32) << TAG_SHIFT) & TAG_MASK) | pos
}
/// Ids within this many µs of received_at share one expiry chunk: expiry is exact to a
/// second, and a stream of one-event requests costs no chunk per id.
const CHUNK_US: i64 = 1_000_000;

pub struct DedupIndex {
    /// Every id in the index, oldest first. Position `p` (counted since the start, mod
    /// 2^28) is at `ring.get(p - head)`.
    ring: BlockRing,
    /// Absolute position of `ring[0]`, mod 2^28.
    head: u32,
    /// Slots (see [`slot`]); the length is a power of two.
    table: Vec<u32>,
    /// The previous table while `table` is filled from the ring.
    growth: Option<Growth>,
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
        // A table with room for a busy minute or so before it first grows.
        Self::with_room_for(window, max_ids, 1 << 20)
    }

    fn with_room_for(window: std::time::Duration, max_ids: usize, ids: usize) -> Self {
        let ids = max_ids.min(ids).max(16);
        Self {
            ring: BlockRing::default(),
            head: 0,
            table: vec![EMPTY; table_len(ids)],
            growth: None,
            chunks: VecDeque::new(),
            committed: 0,
            window_us: window.as_micros() as i64,
            // Config validation refuses more; tests may ask for anything.
            max_ids: max_ids.min(MAX_IDS),
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
        let old = self.growth.as_ref().map_or(0, |g| g.old.len());
        self.ring.heap_bytes() + (self.table.len() + old) * 4 + self.chunks.capacity() * 24
    }

    fn at(&self, pos: u32) -> u128 {
        self.ring.get(self.offset(pos))
    }

    /// Index in the ring of position `pos` (or of the slot holding it).
    fn offset(&self, pos: u32) -> usize {
        (pos.wrapping_sub(self.head) & POS_MASK) as usize
    }

    /// The slot of `table` holding `hash`, or the empty slot where it would go.
    fn probe(&self, table: &[u32], hash: u128) -> (usize, bool) {
        let mask = table.len() - 1;
        let tag = slot(0, hash);
        let mut at = home(hash, mask);
        loop {
            match table[at] {
                EMPTY => return (at, false),
                s if s & !POS_MASK == tag && self.at(s) == hash => return (at, true),
                _ => at = (at + 1) & mask,
            }
        }
    }

    /// Read the home slots of `hashes` before inserting them one by one: independent
    /// loads whose cache misses overlap, where each insert's probe would wait for its own.
    /// Then, the slots in the cache, ask for the ring entries the probes will compare
    /// (those whose tag matches), each a miss of its own otherwise (the ring holds 16
    /// bytes per id in arrival order): a new id's probe reads ~0.2 of them at half the
    /// table's fill and ~1.5 at its most (80%), a duplicate's one more. The table a
    /// growth empties is not warmed.
    pub fn warm(&self, hashes: &[u128]) {
        let mask = self.table.len() - 1;
        let touched = hashes.iter().fold(0, |x, &h| x ^ self.table[home(h, mask)]);
        std::hint::black_box(touched);
        for &h in hashes {
            let tag = slot(0, h);
            let mut at = home(h, mask);
            loop {
                match self.table[at] {
                    EMPTY => break,
                    s if s & !POS_MASK == tag => prefetch(self.ring.entry(self.offset(s))),
                    _ => {}
                }
                at = (at + 1) & mask;
            }
        }
    }

    /// Insert; `false` when the id was already there (a duplicate). Until
    /// [`Self::record`] it is pending and [`Self::remove_pending`] takes it back.
    pub fn insert(&mut self, hash: u128) -> bool {
        let (slot, found) = self.probe(&self.table, hash);
        if found || (self.growth.as_ref()).is_some_and(|g| self.probe(&g.old, hash).1) {
            return false;
        }
        let pos = after(self.head, self.ring.len());
        self.ring.push_back(hash);
        self.table[slot] = self::slot(pos, hash);
        self.grow_step(MOVES_PER_INSERT);
        if self.ring.len() * 5 > self.table.len() * 4 {
            self.grow_to(self.table.len() * 2);
        }
        true
    }

    /// Start a growth into a new table of `len` slots: every id held is moved there by
    /// later [`Self::grow_step`]s. A growth still under way is finished first; two moves
    /// per insert finish one long before the next is due, so that costs nothing usually
    /// and keeps it true whatever the churn.
    fn grow_to(&mut self, len: usize) {
        self.grow_step(usize::MAX);
        let old = std::mem::replace(&mut self.table, vec![EMPTY; len]);
        self.growth = Some(Growth {
            old,
            moved: self.head,
            end: after(self.head, self.ring.len()),
        });
    }

    /// Move up to `n` ring positions of a growth into the new table; drop the old
    /// table once all are in.
    fn grow_step(&mut self, n: usize) {
        let Some(mut g) = self.growth.take() else {
            return;
        };
        let mask = self.table.len() - 1;
        for _ in 0..n {
            if g.moved == g.end {
                break;
            }
            let hash = self.at(g.moved);
            let mut at = home(hash, mask);
            while self.table[at] != EMPTY {
                at = (at + 1) & mask;
            }
            self.table[at] = slot(g.moved, hash);
            g.moved = after(g.moved, 1);
        }
        if g.moved != g.end {
            self.growth = Some(g);
        }
    }

    /// Delete `pos` (holding `hash`) from the tables that hold it: the new one once it
    /// was moved or when it came after the growth began, the old one when it came before.
    fn delete(&mut self, pos: u32, hash: u128) {
        let mut g = self.growth.take();
        let (in_new, in_old) = match &g {
            None => (true, false),
            Some(g) => {
                let (at, moved, end) = (self.offset(pos), self.offset(g.moved), self.offset(g.end));
                (at < moved || at >= end, at < end)
            }
        };
        if in_new {
            let mut table = std::mem::take(&mut self.table);
            self.delete_in(&mut table, hash);
            self.table = table;
        }
        if let Some(g) = g.as_mut().filter(|_| in_old) {
            self.delete_in(&mut g.old, hash);
        }
        self.growth = g;
    }

    /// Delete the slot of `hash` (present) from `table`, shifting later entries of its
    /// run back so every entry stays reachable from its home slot.
    fn delete_in(&self, table: &mut [u32], hash: u128) {
        let mask = table.len() - 1;
        let (mut hole, found) = self.probe(table, hash);
        debug_assert!(found);
        let mut next = (hole + 1) & mask;
        while table[next] != EMPTY {
            let home = home(self.at(table[next]), mask);
            // Move the entry at `next` into the hole unless its home lies in (hole, next].
            if (next.wrapping_sub(home) & mask) >= (next.wrapping_sub(hole) & mask) {
                table[hole] = table[next];
                hole = next;
            }
            next = (next + 1) & mask;
        }
        table[hole] = EMPTY;
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
            let pos = after(self.head, self.ring.len() - 1);
            self.delete(pos, h);
            self.ring.pop_back();
            // A position taken back is given again to the next insert: it must not
            // count as one of the growth's old positions.
            if let Some(g) = &mut self.growth
                && g.end == after(pos, 1)
            {
                if g.moved == g.end {
                    g.moved = pos;
                }
                g.end = pos;
            }
            self.grow_step(0);
        }
    }

    /// Make room for `ids` more ids at once, so loading them at start-up never grows the
    /// table step by step (moving each id again and probing two tables meanwhile).
    pub fn reserve(&mut self, ids: usize) {
        let len = table_len(self.ring.len() + ids.min(self.max_ids));
        if len <= self.table.len() {
            return;
        }
        self.grow_to(len);
        self.grow_step(usize::MAX);
    }

    /// Insert and record hashes known to be stored (start-up load); returns how many were new.
    pub fn load(&mut self, received_at: i64, hashes: impl IntoIterator<Item = u128>) -> usize {
        let n = hashes.into_iter().filter(|h| self.insert(*h)).count();
        self.record(received_at, n);
        // A start-up loads a day of ids files before its first expiry; past the cap, the
        // oldest leave now (what leaves by the window here would leave at that expiry
        // too), so the ring never outgrows the positions that address it.
        if self.ring.len() > self.max_ids {
            self.expire(received_at);
        }
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
                let (pos, h) = (self.head, self.ring.get(0));
                self.delete(pos, h);
                self.ring.pop_front();
                self.head = after(pos, 1);
                // An old position that leaves before it was moved need not be moved.
                if let Some(g) = &mut self.growth
                    && g.moved == pos
                {
                    g.moved = self.head;
                }
                self.grow_step(0);
            }
            self.committed -= n;
        }
    }
}

/// Ring positions each insert moves into a growing table.
const MOVES_PER_INSERT: usize = 2;

/// A table growth under way: `old` holds the positions `[moved, end)` not yet in the
/// new table (and those before `moved`, which are in both).
struct Growth {
    old: Vec<u32>,
    moved: u32,
    end: u32,
}

fn home(hash: u128, mask: usize) -> usize {
    // The hash is uniform: its top bits are as good an index as any.
    (hash >> 64) as usize & mask
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
        *self.entry(i)
    }

    fn entry(&self, i: usize) -> &u128 {
        debug_assert!(i < self.len);
        let j = self.start + i;
        &self.blocks[j / BLOCK][j % BLOCK]
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
}

/// Table slots for `ids` at most 80% full.
fn table_len(ids: usize) -> usize {
    (ids * 5 / 4 + 1).next_power_of_two()
}

/// `dedup/<seq>.ids`: the id hashes of one flush with their received_at, sorted by
/// received_at. `FHIDS002` (since session 30): the magic, the number of ids (u64), then
/// runs of ids of one received_at, each its received_at (i64) and count (u32) and then
/// the hashes (u128), and a CRC-32 of all before it; little-endian. One received_at may
/// take several adjacent runs. 16 bytes an id instead of `FHIDS001`'s 24 (received_at
/// beside every hash: the flusher's largest write, larger than the flush's Parquet),
/// which is still read. A build from before session 30 refuses `FHIDS002` files: going
/// back to one within the dedup window means deleting `dedup/*.ids` first.
pub struct IdsFile;

impl IdsFile {
    const MAGIC_V1: &'static [u8; 8] = b"FHIDS001";
    const MAGIC_V2: &'static [u8; 8] = b"FHIDS002";
    /// `FHIDS001`: magic and CRC-32 around the entries, each received_at and a hash.
    const FRAME_V1: usize = 8 + 4;
    const ENTRY_V1: usize = 8 + 16;
    /// `FHIDS002`: magic and id count before the runs, CRC-32 after; a run's head
    /// (received_at and count); a hash.
    const FRAME: usize = 8 + 8 + 4;
    const RUN_HEAD: usize = 8 + 4;
    const HASH: usize = 16;

    pub fn path(dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!("{seq:020}.ids"))
    }

    /// Write the ids of `runs`, each (received_at, the run's hashes), given in commit
    /// order, stably sorted by received_at: what `load` needs. The hashes are taken as the
    /// file is written, 64 KiB at a time: the file and the flush's hashes held whole were
    /// ~30 MB of fresh memory at a server's first flushes, which the kernel zeroed
    /// (benches/README.md, sessions 29 and 30). A run of 2^32 ids or more (a flush holds
    /// far fewer) is refused.
    pub fn write<I>(disk: &dyn Disk, dir: &Path, seq: u64, mut runs: Vec<(i64, I)>) -> Result<()>
    where
        I: ExactSizeIterator<Item = u128>,
    {
        /// Bytes gathered before each write.
        const PIECE: usize = 64 << 10;
        crate::fsutil::create_dir_durable(disk, dir)?;
        // A request's ids share one received_at and sit together: sorting the requests'
        // runs (stable, so ids of one time stay in commit order) sorts the ids: a flush
        // has a run per request, hundreds of thousands of ids in a few thousand runs.
        // Ordering every request's ids by hash too was 1.3% of the server's samples at
        // peak.
        runs.sort_by_key(|run| run.0);
        let ids: usize = runs.iter().map(|run| run.1.len()).sum();
        write_atomic_with(disk, &Self::path(dir, seq), |file| {
            let mut crc = crc32fast::Hasher::new();
            let mut flush = |buf: &mut Vec<u8>| {
                crc.update(buf);
                let written = file.write_all(buf);
                buf.clear();
                written
            };
            let buf = &mut Vec::with_capacity(PIECE + Self::FRAME + Self::RUN_HEAD + Self::HASH);
            buf.extend_from_slice(Self::MAGIC_V2);
            buf.extend_from_slice(&(ids as u64).to_le_bytes());
            for (at, run) in runs.into_iter().filter(|run| run.1.len() > 0) {
                let n = u32::try_from(run.len())
                    .map_err(|_| std::io::Error::other("a run of 2^32 ids or more"))?;
                buf.extend_from_slice(&at.to_le_bytes());
                buf.extend_from_slice(&n.to_le_bytes());
                for h in run {
                    buf.extend_from_slice(&h.to_le_bytes());
                    if buf.len() >= PIECE {
                        flush(buf)?;
                    }
                }
            }
            flush(buf)?;
            file.write_all(&crc.finalize().to_le_bytes())
        })
    }

    /// How many ids the file at `path` holds, from its head (0 when unreadable; for
    /// `FHIDS001`, from its size): a start-up sizes the index by it.
    pub fn ids_in(path: &Path) -> usize {
        let mut head = [0u8; 16];
        let Ok(len) = fs::File::open(path).and_then(|mut f| {
            let len = f.metadata()?.len() as usize;
            std::io::Read::read_exact(&mut f, &mut head[..len.min(16)])?;
            Ok(len)
        }) else {
            return 0;
        };
        match &head[..8] {
            m if m == Self::MAGIC_V1 => len.saturating_sub(Self::FRAME_V1) / Self::ENTRY_V1,
            m if m == Self::MAGIC_V2 => u64::from_le_bytes(head[8..].try_into().unwrap()) as usize,
            _ => 0,
        }
    }

    /// The (received_at, hash) pairs of the file at `path`, in file order.
    pub fn read(path: &Path) -> Result<Vec<(i64, u128)>> {
        let buf = fs::read(path).map_err(StorageError::io(path))?;
        let corrupt = |reason: &str| StorageError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        let v1 = buf.starts_with(Self::MAGIC_V1) && buf.len() >= Self::FRAME_V1;
        let v2 = buf.starts_with(Self::MAGIC_V2) && buf.len() >= Self::FRAME;
        if !v1 && !v2 {
            return Err(corrupt("not a dedup ids file"));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(corrupt("checksum mismatch"));
        }
        let le_i64 = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap());
        let le_u128 = |b: &[u8]| u128::from_le_bytes(b.try_into().unwrap());
        if v1 {
            let entries = &body[8..];
            if entries.len() % Self::ENTRY_V1 != 0 {
                return Err(corrupt("an entry is cut short"));
            }
            return Ok(entries
                .chunks_exact(Self::ENTRY_V1)
                .map(|c| (le_i64(&c[..8]), le_u128(&c[8..])))
                .collect());
        }
        let count = u64::from_le_bytes(body[8..16].try_into().unwrap()) as usize;
        let mut entries = &body[16..];
        let mut pairs = Vec::with_capacity(count.min(entries.len() / Self::HASH));
        while !entries.is_empty() {
            let Some((head, rest)) = entries.split_at_checked(Self::RUN_HEAD) else {
                return Err(corrupt("a run's head is cut short"));
            };
            let at = le_i64(&head[..8]);
            let n = u32::from_le_bytes(head[8..].try_into().unwrap()) as usize;
            let Some((run, rest)) = rest.split_at_checked(n.saturating_mul(Self::HASH)) else {
                return Err(corrupt("a run is cut short"));
            };
            pairs.extend(run.chunks_exact(Self::HASH).map(|h| (at, le_u128(h))));
            entries = rest;
        }
        if pairs.len() != count {
            return Err(corrupt("the id count does not match the runs"));
        }
        Ok(pairs)
    }

    /// All ids files with their flush sequence number, ascending.
    pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(dir) else {
            return Ok(out);
        };
        for entry in entries {
            let path = entry.map_err(StorageError::io(dir))?.path();
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

    /// Loading more ids than the cap (a start-up with a day of ids files) keeps the
    /// newest `max_ids` of them, plus at most the last file loaded.
    #[test]
    fn loading_past_the_cap_keeps_the_newest_ids() {
        let mut idx = DedupIndex::new(Duration::from_secs(86_400), 1000);
        for file in 0..10i64 {
            let hashes = (0..500).map(|i| id_hash(&format!("f{file}-{i}")));
            assert_eq!(idx.load(file * CHUNK_US, hashes), 500);
            assert!(
                idx.len() <= 1500,
                "{} ids held after file {file}",
                idx.len()
            );
        }
        assert!(!idx.insert(id_hash("f9-499")), "the newest ids are kept");
        assert!(idx.insert(id_hash("f0-0")), "the oldest left");
    }

    /// Against a plain set and queue, with colliding hashes (equal top bits), growth
    /// from a 32-slot table (expiries and taken-back inserts land while a growth is
    /// under way), positions that wrap, expiry by window and by cap, and taken-back
    /// inserts. Steps are a second apart, so each record is its own expiry chunk, as in
    /// the model.
    #[test]
    fn agrees_with_a_reference_model() {
        use std::collections::HashSet;
        let (window, cap) = (50_000_000, 3000);
        let mut idx = DedupIndex::with_room_for(Duration::from_micros(window as u64), cap, 16);
        // Positions wrap (mod 2^28) early in the run.
        idx.head = POS_MASK - 1000;
        let mut growths = 0;
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
            // A rate that rises, so the table grows while ids also expire.
            for _ in 0..rand(1 + step as u64 / 40) {
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
            growths += usize::from(idx.growth.is_some());
        }
        assert!(growths > 100, "steps with a growth under way: {growths}");
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

    /// Growing without a cap, the index never holds more than ~31 bytes per id (ring
    /// blocks, the old table and the doubled one while it fills, chunks), measured after
    /// every insert; and a growth moves at most two ids per insert.
    #[test]
    fn growing_never_holds_more_than_32_bytes_per_id() {
        let mut idx = DedupIndex::new(Duration::from_secs(3600), 100_000_000);
        let (mut worst, mut growth_began): (f64, Option<u64>) = (0.0, None);
        for i in 0..3_000_000u64 {
            assert!(idx.insert(id_hash(&format!("event-{i}"))));
            if i % 500 == 499 {
                idx.record(i as i64, 500);
            }
            if i >= 1_000_000 {
                worst = worst.max(idx.heap_bytes() as f64 / idx.len() as f64);
            }
            // No id expires here, so positions are counts: `moved` ids in `i - began` inserts.
            if let Some(g) = &idx.growth {
                let began = *growth_began.get_or_insert(i);
                assert!(
                    u64::from(g.moved) <= 2 * (i - began),
                    "moved {} by {i}",
                    g.moved
                );
            } else {
                growth_began = None;
            }
        }
        eprintln!("dedup index while growing: at most {worst:.1} bytes per id");
        assert!(worst <= 32.0, "{worst:.1} bytes per id");
    }

    /// Reserving keeps what is held findable and makes loading that many never grow.
    #[test]
    fn reserve_sizes_the_table_for_a_start_up_load() {
        let mut idx = DedupIndex::with_room_for(Duration::from_secs(3600), 1_000_000, 16);
        idx.head = POS_MASK - 10;
        idx.load(0, (0..1000u128).map(|i| (i << 64) | i));
        idx.reserve(100_000);
        assert!(idx.growth.is_none() && idx.table.len() >= 101_000 * 5 / 4);
        assert!(
            (0..1000u128).all(|i| !idx.insert((i << 64) | i)),
            "held ids still found"
        );
        for i in 1000..101_000u128 {
            assert!(idx.insert((i << 64) | i));
            assert!(idx.growth.is_none(), "grew at {i}");
        }
    }

    /// Warming reads and prefetches only: held ids stay found and new ones new, while
    /// the table grows (a warm sees the new table alone) and once the oldest ids have
    /// left past the cap, the ring's first block with them (positions no longer start at
    /// 0). A wrong ring position trips `entry`'s bound check in a debug build.
    #[test]
    fn warming_changes_nothing() {
        const CAP: usize = 3_000;
        let mut idx = DedupIndex::with_room_for(Duration::from_secs(86_400), CAP, 16);
        let id = |i: u128| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) << 64) | i;
        let last = (BLOCK + CAP) as u128 * 3 / 2;
        for i in 0..last {
            idx.warm(&[id(i), id(i / 2)]);
            assert!(idx.insert(id(i)));
            let at = i as i64 * CHUNK_US;
            idx.record(at, 1);
            idx.expire(at);
        }
        assert!(idx.head as usize > BLOCK && idx.len() == CAP);
        let held: Vec<u128> = (last - CAP as u128..last).map(id).collect();
        let new: Vec<u128> = (last..last + CAP as u128).map(id).collect();
        idx.warm(&held);
        idx.warm(&new);
        assert!(held.iter().all(|&h| !idx.insert(h)), "held ids are found");
        assert!(new.iter().all(|&h| idx.insert(h)), "new ids are new");
    }

    #[test]
    fn ids_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let disk = crate::disk::OsDisk;
        IdsFile::write(&disk, dir.path(), 6, vec![(5, [50].into_iter())]).unwrap();
        // Requests' runs out of order (more than a small sort's 20), runs of one
        // received_at apart and side by side (a request split over two live batches),
        // an empty run, and hashes falling within a run: the order is by received_at
        // alone, else commit order. More than one piece of the file's writes.
        let mut runs: Vec<(i64, usize)> = (0..40).map(|run: i64| ((run * 7) % 13, 3)).collect();
        runs.extend([(4, 2), (4, 1), (2, 0), (11, 2), (12, 5000)]);
        let mut pairs: Vec<(i64, u128)> = Vec::new();
        for &(at, n) in &runs {
            let first = 10_000 - pairs.len() as u128;
            pairs.extend((0..n as u128).map(|i| (at, first - i)));
        }
        let mut rest = &pairs[..];
        let hashed: Vec<_> = (runs.iter())
            .map(|&(at, n)| {
                let (run, after) = rest.split_at(n);
                rest = after;
                (at, run.iter().map(|p| p.1))
            })
            .collect();
        IdsFile::write(&disk, dir.path(), 7, hashed).unwrap();
        let files = IdsFile::list(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(IdsFile::read(&files[0].1).unwrap(), vec![(5, 50)]);
        let mut sorted = pairs.clone();
        sorted.sort_by_key(|&(at, _)| at);
        assert_eq!(IdsFile::read(&files[1].1).unwrap(), sorted);
        assert_eq!(IdsFile::ids_in(&files[1].1), pairs.len());
        // 16 bytes an id and 12 a (non-empty) run.
        let size = std::fs::metadata(&files[1].1).unwrap().len() as usize;
        assert_eq!(
            size,
            IdsFile::FRAME + (runs.len() - 1) * 12 + pairs.len() * 16
        );
    }

    /// Files of the first format (received_at beside each hash) are still read, and a
    /// file changed or cut short is refused, whatever part was hit.
    #[test]
    fn ids_files_of_the_first_format_are_read_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = IdsFile::path(dir.path(), 1);
        // A body (after the magic) with its checksum, written as the file.
        let write = |magic: &[u8], body: &[u8]| {
            let mut file = [magic, body].concat();
            let crc = crc32fast::hash(&file);
            file.extend_from_slice(&crc.to_le_bytes());
            std::fs::write(&path, &file).unwrap();
        };
        let refused = |reason: &str| {
            let err = IdsFile::read(&path).unwrap_err().to_string();
            assert!(err.contains(reason), "{err}");
        };
        let pairs = [(3i64, 30u128), (3, 31), (9, 32)];
        let v1: Vec<u8> = (pairs.iter())
            .flat_map(|(at, h)| [&at.to_le_bytes()[..], &h.to_le_bytes()[..]].concat())
            .collect();
        write(b"FHIDS001", &v1);
        assert_eq!(IdsFile::read(&path).unwrap(), pairs);
        assert_eq!(IdsFile::ids_in(&path), pairs.len());
        write(b"FHIDS001", &v1[..v1.len() - 1]);
        refused("an entry is cut short");

        let disk = crate::disk::OsDisk;
        let runs = [(3, pairs[..2].iter()), (9, pairs[2..].iter())]
            .map(|(at, run)| (at, run.map(|p| p.1)));
        IdsFile::write(&disk, dir.path(), 1, runs.into()).unwrap();
        assert_eq!(IdsFile::read(&path).unwrap(), pairs);
        let good = std::fs::read(&path).unwrap();
        let body = &good[8..good.len() - 4];
        // The first run claims 100 hashes; a head left without its count; one id more
        // counted than the runs hold.
        let mut long = body.to_vec();
        long[16..20].copy_from_slice(&100u32.to_le_bytes());
        write(b"FHIDS002", &long);
        refused("a run is cut short");
        write(b"FHIDS002", &[body, &[0; 4]].concat());
        refused("a run's head is cut short");
        let mut counted = body.to_vec();
        counted[..8].copy_from_slice(&4u64.to_le_bytes());
        write(b"FHIDS002", &counted);
        refused("the id count");
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        refused("checksum");
        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        refused("checksum");
        std::fs::write(&path, b"FHIDS002").unwrap();
        refused("not a dedup ids file");
    }
}
