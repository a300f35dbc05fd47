//! Memory for the batches the collector holds: one anonymous mapping per batch, kept out
//! of transparent huge pages.
//!
//! The live buffer is the collector's largest and fastest-turning memory: every
//! acknowledged event until its flush. From the global allocator it lands in huge pages,
//! and on virtual machines whose host takes freed memory back (free page reporting works
//! on huge-page-sized blocks) each fresh 2 MiB page costs milliseconds to fault in: on the
//! 2-core benchmark VM that was a fifth of the server's CPU at peak ingest and the p99 of
//! acks at half load (benches/README.md). 4 KiB pages of a mapping of its own come from
//! the kernel's warm free lists instead. Small batches stay on the heap.

#[cfg(target_os = "linux")]
pub(crate) use linux::copy_to_region;

/// Elsewhere batches stay on the heap.
#[cfg(not(target_os = "linux"))]
pub(crate) fn copy_to_region(_parts: &[&[u8]]) -> Option<Vec<arrow::buffer::Buffer>> {
    None
}

#[cfg(target_os = "linux")]
mod linux {
    use std::ptr::NonNull;
    use std::sync::Arc;

    use arrow::buffer::Buffer;

    /// Smallest batch worth a mapping of its own.
    const MIN_REGION: usize = 64 << 10;
    /// Every part starts at a multiple of this (views are 16-byte integers).
    const ALIGN: usize = 16;

    /// One anonymous mapping, unmapped when the last buffer into it goes.
    struct Region {
        ptr: NonNull<u8>,
        len: usize,
    }

    // SAFETY: the mapping is plain memory owned by this value alone; it is written once,
    // before any buffer shares it, and only read afterwards.
    unsafe impl Send for Region {}
    // SAFETY: as above; shared access is read-only.
    unsafe impl Sync for Region {}

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: `ptr` and `len` are the mapping made by `copy_to_region`, unmapped
            // once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }

    /// `parts` copied one after another into one fresh mapping (each at a multiple of 16
    /// bytes), as buffers sharing it; `None` for less than 64 KiB in all or when no mapping
    /// is to be had: the caller keeps its heap buffers.
    pub(crate) fn copy_to_region(parts: &[&[u8]]) -> Option<Vec<Buffer>> {
        let len: usize = parts.iter().map(|p| p.len().next_multiple_of(ALIGN)).sum();
        if len < MIN_REGION {
            return None;
        }
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
        let region = Arc::new(Region {
            ptr: NonNull::new(ptr.cast()).expect("a successful mmap is not null"),
            len,
        });
        let mut spans = Vec::with_capacity(parts.len());
        let mut at = 0;
        for part in parts {
            // SAFETY: `at + part.len() <= len` by the sum above; the source is another
            // allocation, so the two do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    part.as_ptr(),
                    region.ptr.as_ptr().add(at),
                    part.len(),
                )
            };
            spans.push((at, part.len()));
            at += part.len().next_multiple_of(ALIGN);
        }
        let ptr = region.ptr;
        // SAFETY: the mapping is valid for `len` bytes for as long as `region` lives, and
        // the buffer (and every slice of it) holds `region`.
        let whole = unsafe { Buffer::from_custom_allocation(ptr, len, region) };
        Some(
            spans
                .into_iter()
                .map(|(at, n)| whole.slice_with_length(at, n))
                .collect(),
        )
    }
}
