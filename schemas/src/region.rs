//! Memory for the batches the collector holds: anonymous mappings kept out of
//! transparent huge pages, recycled once their batches are gone.
//!
//! The live buffer is the collector's largest and fastest-turning memory: every
//! acknowledged event until its flush. From the global allocator it lands in huge pages,
//! and on virtual machines whose host takes freed memory back (free page reporting works
//! on huge-page-sized blocks) each fresh 2 MiB page costs milliseconds to fault in: on the
//! 2-core benchmark VM that was a fifth of the server's CPU at peak ingest and the p99 of
//! acks at half load (benches/README.md). 4 KiB pages of a mapping of its own come from
//! the kernel's warm free lists instead, but the kernel still zeroes each on first touch
//! (9% of the server's samples at peak): so batches are packed into 4 MiB blocks, and a
//! block whose batches are all flushed and dropped is kept for the next ones, its pages
//! already in place, up to a flush's worth ([`keep_freed`]). A background thread maps a
//! few blocks ahead of need, so the thread packing batches (the WAL writer, which acks
//! wait on) does not wait for the faults. Only the live buffer's batches come here, one
//! per group commit (`pack_events`); under 64 KiB they stay on the heap, as do the
//! handlers' batches, which live only until their group commits.

use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(target_os = "linux")]
pub(crate) use linux::copy_to_region;

/// Elsewhere batches stay on the heap.
#[cfg(not(target_os = "linux"))]
pub(crate) fn copy_to_region(_parts: &[&[u8]]) -> Option<Vec<arrow::buffer::Buffer>> {
    None
}

/// Blocks of memory batches are packed into (a larger batch gets a mapping of its own).
const BLOCK: usize = 4 << 20;
/// Freed blocks kept for reuse: 32 (128 MiB) until [`keep_freed`] says otherwise.
static KEEP_BLOCKS: AtomicUsize = AtomicUsize::new(32);

/// Keep up to `bytes` of freed batch memory for the next batches (the collector passes
/// its `flush_bytes`: what one flush frees).
pub fn keep_freed(bytes: usize) {
    KEEP_BLOCKS.store(bytes.div_ceil(BLOCK), Ordering::Relaxed);
}

/// Run the calling thread at nice 10, for background work that must not delay acks on a
/// small machine (the block maker, the collector's flusher and compactor); `false` when
/// refused. On Linux `PRIO_PROCESS` with `who = 0` sets the calling thread's nice value.
#[cfg(target_os = "linux")]
pub fn background_priority() -> bool {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) == 0 }
}

/// Elsewhere threads keep their priority.
#[cfg(not(target_os = "linux"))]
pub fn background_priority() -> bool {
    true
}

#[cfg(target_os = "linux")]
mod linux {
    use std::ptr::NonNull;
    use std::sync::{Arc, Condvar, Mutex, Once};

    use arrow::buffer::Buffer;

    use super::{BLOCK, KEEP_BLOCKS, Ordering};

    /// Smallest batch worth a mapping.
    const MIN_REGION: usize = 64 << 10;
    /// Every part starts at a multiple of this (views are 16-byte integers).
    const ALIGN: usize = 16;

    /// Freed blocks, by address, ready for reuse.
    static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    fn free() -> std::sync::MutexGuard<'static, Vec<usize>> {
        FREE.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The block being filled, and how much of it is taken.
    static CURRENT: Mutex<Option<(Arc<Region>, usize)>> = Mutex::new(None);

    /// One anonymous mapping; when the last buffer into it goes, a block goes back to
    /// [`FREE`] (while it holds fewer than `KEEP_BLOCKS`) and anything else is unmapped.
    struct Region {
        ptr: NonNull<u8>,
        len: usize,
    }

    // SAFETY: the mapping is plain memory owned by this value alone; each range of it is
    // written once, before any buffer shares that range, and only read afterwards.
    unsafe impl Send for Region {}
    // SAFETY: as above; shared access to a written range is read-only.
    unsafe impl Sync for Region {}

    impl Drop for Region {
        fn drop(&mut self) {
            if self.len == BLOCK {
                let mut free = free();
                if free.len() < KEEP_BLOCKS.load(Ordering::Relaxed) {
                    free.push(self.ptr.as_ptr() as usize);
                    return;
                }
            }
            // SAFETY: `ptr` and `len` are a mapping made by `map`, unmapped once (a
            // block kept in FREE is not unmapped here).
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }

    /// A fresh private anonymous mapping of `len` bytes without huge pages.
    fn map(len: usize) -> Option<Region> {
        // SAFETY: a private anonymous mapping; the arguments are plain values.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // Under THP "always" the mapping would get huge pages unless told otherwise; a
        // refusal only costs the huge pages, so its result does not matter.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        // Fault the whole mapping in with one call (blocks fill up but for a tail shorter
        // than one batch; a larger batch fills its own mapping): the kernel still
        // zeroes each page, but without a trap per 4 KiB page on the copy. Kernels
        // before 5.14 refuse it and the pages come on first touch as before.
        // SAFETY: as above.
        unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) };
        Some(Region {
            ptr: NonNull::new(ptr.cast()).expect("a successful mmap is not null"),
            len,
        })
    }

    /// Blocks waiting in [`FREE`].
    #[cfg(test)]
    pub(super) fn free_blocks() -> usize {
        free().len()
    }

    /// Blocks kept ready in [`FREE`] ahead of need (while `KEEP_BLOCKS` allows). A new
    /// block is faulted in as it is mapped, which otherwise happens on the thread that
    /// packs the batch: the collector's WAL writer, which every ack waits on (mapping
    /// blocks was ~4% of a loaded server's samples, and moving it to a background
    /// thread raised the 8-client rate by 18%; benches/README.md, session 29). The
    /// background thread maps the next blocks while FREE runs low.
    pub(super) const READY_AHEAD: usize = 4;
    /// Wakes the block maker: FREE ran low.
    static RUN_LOW: Condvar = Condvar::new();

    /// A block from [`FREE`], or a new one.
    fn block() -> Option<Region> {
        let (reused, left) = {
            let mut free = free();
            (free.pop(), free.len())
        };
        if left < READY_AHEAD.min(KEEP_BLOCKS.load(Ordering::Relaxed)) {
            static MAKER: Once = Once::new();
            MAKER.call_once(|| {
                // Without it, blocks are mapped here as before.
                let maker = std::thread::Builder::new().name("fh-blocks".into());
                let _ = maker.spawn(make_blocks);
            });
            RUN_LOW.notify_one();
        }
        match reused {
            Some(addr) => Some(Region {
                ptr: NonNull::new(addr as *mut u8).expect("blocks are not null"),
                len: BLOCK,
            }),
            None => map(BLOCK),
        }
    }

    /// The block maker: maps blocks into FREE until it holds [`READY_AHEAD`] (or all
    /// that `KEEP_BLOCKS` allows), then waits until it runs low again. At low priority:
    /// it only moves work off the packing thread, and when the cores are busy the
    /// packing thread maps what it needs itself.
    fn make_blocks() {
        super::background_priority();
        let mut free = free();
        loop {
            let ready = READY_AHEAD.min(KEEP_BLOCKS.load(Ordering::Relaxed));
            if free.len() >= ready {
                free = RUN_LOW.wait(free).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            drop(free);
            // Dropping a block puts it in FREE while there is room (else unmaps it).
            let made = map(BLOCK).map(drop);
            free = self::free();
            if made.is_none() {
                // No memory to be had now: try again when a block is next taken.
                free = RUN_LOW.wait(free).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// `parts` copied one after another into a block (or a mapping of their own past
    /// [`BLOCK`]), each at a multiple of 16 bytes, as buffers sharing it; `None` for less
    /// than 64 KiB in all or when no mapping is to be had: the caller keeps its heap
    /// buffers.
    pub(crate) fn copy_to_region(parts: &[&[u8]]) -> Option<Vec<Buffer>> {
        let len: usize = parts.iter().map(|p| p.len().next_multiple_of(ALIGN)).sum();
        if len < MIN_REGION {
            return None;
        }
        // A block made while another thread installed one; dropped (into FREE) after the lock.
        let mut spare = None;
        let (region, start) = if len > BLOCK {
            (Arc::new(map(len)?), 0)
        } else {
            let lock = || CURRENT.lock().unwrap_or_else(|e| e.into_inner());
            let full = |c: &Option<(Arc<Region>, usize)>| {
                c.as_ref().is_none_or(|(_, used)| used + len > BLOCK)
            };
            let mut current = lock();
            if full(&current) {
                // A new block is zeroed outside the lock (the collector's writer packs
                // batches while a replay or another store's writer may too), and one
                // another thread installed meanwhile is used first (this one then waits
                // in FREE).
                drop(current);
                let fresh = Arc::new(block()?);
                current = lock();
                if full(&current) {
                    *current = Some((fresh, 0));
                } else {
                    spare = Some(fresh);
                }
            }
            let (region, used) = current.as_mut().expect("a block with room");
            let start = *used;
            *used += len;
            (Arc::clone(region), start)
        };
        // The range [start, start + len) is this call's alone: no buffer shares it yet.
        let base = region.ptr.as_ptr().wrapping_add(start);
        let mut spans = Vec::with_capacity(parts.len());
        let mut at = 0;
        for part in parts {
            // SAFETY: `start + at + part.len() <= start + len <= region.len`; the source is
            // another allocation, so the two do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), base.add(at), part.len()) };
            spans.push((at, part.len()));
            at += part.len().next_multiple_of(ALIGN);
        }
        let ptr = NonNull::new(base).expect("inside a mapping");
        // SAFETY: the range is valid for `len` bytes for as long as `region` lives, and
        // the buffer (and every slice of it) holds `region`.
        let whole = unsafe { Buffer::from_custom_allocation(ptr, len, region) };
        drop(spare);
        Some(
            spans
                .into_iter()
                .map(|(at, n)| whole.slice_with_length(at, n))
                .collect(),
        )
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::copy_to_region;

    /// Batches are built on several threads at once: none gets a range another has.
    #[test]
    fn threads_copying_at_once_get_ranges_of_their_own() {
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    (0..60u8)
                        .map(|i| {
                            let fill = t.wrapping_mul(61).wrapping_add(i);
                            let part = vec![fill; 150_000 + usize::from(i) * 1_000];
                            (copy_to_region(&[&part]).expect("a region"), part)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let copies: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        for (buffers, part) in &copies {
            assert_eq!(
                buffers[0].as_slice(),
                part.as_slice(),
                "another thread wrote here"
            );
        }
    }

    /// Once blocks are taken, the maker maps the next ones ahead of need, and no more
    /// than that (the test has its process to itself under nextest: no other test
    /// frees blocks meanwhile).
    #[test]
    fn blocks_are_made_ready_ahead_of_need() {
        use super::linux::{READY_AHEAD, free_blocks};
        use std::time::{Duration, Instant};
        let ready = || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while free_blocks() < READY_AHEAD {
                assert!(Instant::now() < deadline, "no blocks were made ahead");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(free_blocks(), READY_AHEAD, "more blocks than ahead of need");
        };
        let part = vec![7u8; 3 << 20];
        let first = copy_to_region(&[&part]).expect("a region");
        ready();
        // Each 3 MiB copy takes a block of its own: the ready ones and then some.
        let held: Vec<_> = (0..READY_AHEAD + 2)
            .map(|_| copy_to_region(&[&part]).expect("a region"))
            .collect();
        ready();
        for buffers in held.iter().chain([&first]) {
            assert_eq!(buffers[0].as_slice(), part.as_slice());
        }
    }

    #[test]
    fn packed_batches_keep_their_bytes_while_blocks_are_freed_and_reused() {
        // Parts of varied sizes over several 4 MiB blocks, one past a block, some dropped
        // as they go (their blocks recycled under the ones still held).
        let part =
            |n: usize, seed: usize| -> Vec<u8> { (0..n).map(|i| (i * 31 + seed) as u8).collect() };
        let mut held = Vec::new();
        for round in 0..200 {
            let sizes = [70_000 + round * 997, 1 + round * 13, 300_000];
            let parts: Vec<Vec<u8>> = (sizes.iter().enumerate())
                .map(|(k, &n)| part(n, round * 3 + k))
                .collect();
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let buffers = copy_to_region(&refs).expect("a region");
            for (b, p) in buffers.iter().zip(&parts) {
                assert_eq!(b.as_slice(), p.as_slice());
                assert_eq!(b.as_ptr() as usize % 16, 0);
            }
            if round % 3 != 0 {
                held.push((buffers, parts));
            }
            if round % 50 == 49 {
                held.drain(..held.len() / 2);
            }
        }
        let big = part(5 << 20, 7);
        let own = copy_to_region(&[&big]).expect("a mapping of its own");
        assert_eq!(own[0].as_slice(), big.as_slice());
        for (buffers, parts) in &held {
            for (b, p) in buffers.iter().zip(parts) {
                assert_eq!(b.as_slice(), p.as_slice(), "a later batch overwrote it");
            }
        }
        drop(held);
        let keep = super::KEEP_BLOCKS.load(super::Ordering::Relaxed);
        assert!(super::linux::free_blocks() <= keep);
    }
}
