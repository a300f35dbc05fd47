//! Vectors a flush keeps for the next one (the sort keys).

/// Empty `v` and make room for `n` items. When it must grow it is replaced, not grown,
/// with half as much again: a server's flushes come in about one size (`flush_bytes`),
/// and growing a kept vector by even one row (`reserve`) was a `realloc` to twice the
/// size that copied the whole old capacity into fresh memory, which the kernel then
/// zeroed (the second flush of a load spent ~40% of its time faulting in memory the first
/// one had already faulted in; benches/README.md, session 30). Room never touched costs
/// address space only.
pub(crate) fn clear_for<T>(v: &mut Vec<T>, n: usize) {
    v.clear();
    if v.capacity() < n {
        // Free the old allocation first, so the allocator may hand its memory back.
        drop(std::mem::take(v));
        *v = Vec::with_capacity(n.saturating_add(n / 2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_its_room_and_grows_with_headroom() {
        let mut v: Vec<u64> = Vec::new();
        clear_for(&mut v, 1000);
        assert!(v.is_empty());
        assert!(v.capacity() >= 1500);
        v.extend(0..1000);
        let (cap, ptr) = (v.capacity(), v.as_ptr());
        // A slightly larger flush fits in the room already there.
        clear_for(&mut v, 1001);
        assert!(v.is_empty());
        assert_eq!((v.capacity(), v.as_ptr()), (cap, ptr));
        clear_for(&mut v, 4000);
        assert!(v.capacity() >= 6000);
    }
}
