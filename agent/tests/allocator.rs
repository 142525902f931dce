//! glibc's mmap threshold stays where outpost pins it: a large block that
//! was freed does not make the next one come from (and stay in) the heap.
//! Its own test binary: the allocator settings and counters are
//! process-wide, and no other test may allocate beside it.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_large_blocks_keep_going_back_to_the_kernel() {
    // Bytes in blocks that have a mapping of their own.
    #[allow(unsafe_code)]
    fn mapped() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }
    assert!(outpost::memtrim::fix_mmap_threshold(), "mallopt refused");
    // About what zstd's compression tables take in a store flush. Without
    // the pinned threshold, freeing the first block raises the threshold
    // past this size and the second comes from the heap (and stays there).
    const SIZE: usize = 800 * 1024;
    for round in 0..4 {
        let before = mapped();
        let block = vec![round as u8 + 1; SIZE];
        let during = mapped();
        assert!(
            during >= before + SIZE,
            "round {round}: a {SIZE}-byte block was not mapped on its own \
             (mapped bytes {before} -> {during})"
        );
        assert_eq!(block[SIZE - 1], round as u8 + 1);
        drop(block);
        assert!(mapped() < during, "round {round}: not returned when freed");
    }
}
