//! Memory for a process that moves large Arrow buffers between threads.
//!
//! Arrow messages of many megabytes are decoded on a runtime thread and freed on a DuckDB thread. From
//! glibc's per-thread arenas those blocks fragment memory that rarely shrinks: a 1 GiB upload left the
//! server at ~600 MB resident. [`LargeBuffersMapped`] therefore maps the large blocks of Rust code (the
//! Arrow buffers) on their own, returning them to the system the moment they are freed, and asks for
//! transparent huge pages, which take one page fault per 2 MiB instead of 512. A few freed mappings
//! (64 MiB in all) are kept as spares for the next large blocks, so a stream of large messages reuses
//! resident pages instead of faulting in and zeroing fresh ones for each message (in the benchmark's
//! bulk load, up to a quarter of the server's CPU went to zeroing fresh huge pages); they are given back
//! within a second.
//!
//! DuckDB's own allocations stay with glibc and its adaptive thresholds: DuckDB reuses its scratch
//! buffers (compression analysis, row-group building) from the arenas. Forcing those into fresh
//! mappings too (`M_MMAP_THRESHOLD` of 1 MiB) doubled the server's page faults for ~10% more CPU, and
//! saved only ~15 MB at the peak of a 1 GiB upload. What those arenas free in their middle, though,
//! glibc keeps resident (it only gives back their tops): 50–70 MB of a 1 GiB upload's peak.
//! [`release_free_memory`], every second, gives it back: −25 MB at that peak, for ~5% more page faults
//! and no measurable CPU.
//!
//! All of this is glibc's (arenas, `malloc_trim`) and Linux's (`mremap`, huge pages), so it exists only
//! on Linux with glibc. Elsewhere (musl, other systems) the binary keeps the system allocator as it is,
//! and [`release_free_memory_every`] does nothing.
#![allow(unsafe_code)]

/// Blocks at least this large are mapped on their own and unmapped when freed (on Linux with glibc).
/// Defined everywhere: the transports size their frames below it.
pub const LARGE_BYTES: usize = 1 << 20;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub use glibc::{LargeBuffersMapped, release_free_memory, release_free_memory_every};

/// Without glibc there are no arenas to trim: does nothing, and starts no thread.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory_every(_interval: std::time::Duration) -> std::io::Result<()> {
    Ok(())
}

/// The glibc- and Linux-specific implementation.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::{Mutex, PoisonError};
    use std::time::Duration;

    use super::LARGE_BYTES;

    /// Blocks at least this large are also offered transparent huge pages; below it, rounding up to whole
    /// huge pages would waste too much.
    const HUGE_BYTES: usize = 4 << 20;
    const HUGE_PAGE_BYTES: usize = 2 << 20;
    const PAGE_BYTES: usize = 4096;
    /// Freed mappings kept for reuse, at most this many bytes and blocks in all.
    const SPARE_BYTES: usize = 64 << 20;
    const SPARE_BLOCKS: usize = 8;

    /// Freed mappings, most recent last, each `(address, length)`.
    struct Spares {
        blocks: [(usize, usize); SPARE_BLOCKS],
        count: usize,
        bytes: usize,
    }

    impl Spares {
        const fn new() -> Self {
            Self { blocks: [(0, 0); SPARE_BLOCKS], count: 0, bytes: 0 }
        }

        /// Keeps a freed mapping if there is room for it; false if the caller must unmap it.
        fn keep(&mut self, addr: usize, len: usize) -> bool {
            if self.count == SPARE_BLOCKS || self.bytes + len > SPARE_BYTES {
                return false;
            }
            self.blocks[self.count] = (addr, len);
            self.count += 1;
            self.bytes += len;
            true
        }

        /// The most recently kept mapping.
        fn take(&mut self) -> Option<(usize, usize)> {
            self.count = self.count.checked_sub(1)?;
            let block = self.blocks[self.count];
            self.bytes -= block.1;
            Some(block)
        }
    }

    static SPARES: Mutex<Spares> = Mutex::new(Spares::new());

    fn spares() -> std::sync::MutexGuard<'static, Spares> {
        SPARES.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands the free pages inside glibc's arenas back to the system (`malloc_trim`; the pages stay mapped,
    /// so the next allocation there costs a page fault, not a system call) and unmaps the spare mappings.
    pub fn release_free_memory() {
        // SAFETY: malloc_trim only walks glibc's own free lists, under their locks.
        unsafe { libc::malloc_trim(0) };
        loop {
            // The lock is released before the unmapping (a `while let` would hold it through the body).
            let Some((addr, len)) = spares().take() else { break };
            // SAFETY: a spare is a whole mapping of ours that nothing uses.
            unsafe { unmap(addr as *mut u8, len) };
        }
    }

    /// Calls [`release_free_memory`] every `interval` on a thread of its own, for the life of the process.
    pub fn release_free_memory_every(interval: Duration) -> std::io::Result<()> {
        std::thread::Builder::new().name("release-memory".into()).spawn(move || {
            loop {
                std::thread::sleep(interval);
                release_free_memory();
            }
        })?;
        Ok(())
    }

    /// The global allocator of the `arrowport` binary: the system allocator, except that blocks of
    /// [`LARGE_BYTES`] or more are mappings of their own, on huge pages from [`HUGE_BYTES`].
    pub struct LargeBuffersMapped;

    /// How a block of `size` bytes with `align` is allocated: `None` for the system allocator, otherwise
    /// the length of its mapping.
    fn mapping_len(size: usize, align: usize) -> Option<usize> {
        if size < LARGE_BYTES || align > PAGE_BYTES {
            return None;
        }
        let unit = if size >= HUGE_BYTES { HUGE_PAGE_BYTES } else { PAGE_BYTES };
        size.checked_next_multiple_of(unit)
    }

    /// A mapping of `len` bytes, a spare resized if there is one (its contents are then not zero); null if
    /// the system has no memory for it.
    fn reuse_or_map(len: usize) -> *mut u8 {
        let Some((addr, spare_len)) = spares().take() else {
            return map(len);
        };
        let spare = addr as *mut u8;
        if spare_len == len {
            return spare;
        }
        // SAFETY: a spare is a whole mapping of ours that nothing uses.
        let resized = unsafe { remap(spare, spare_len, len) };
        if resized.is_null() {
            // SAFETY: mremap failed and left the spare as it was.
            unsafe { unmap(spare, spare_len) };
            return map(len);
        }
        resized
    }

    /// Maps `len` zeroed bytes; null if the system has no memory for them.
    fn map(len: usize) -> *mut u8 {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no existing memory.
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
            return std::ptr::null_mut();
        }
        if len.is_multiple_of(HUGE_PAGE_BYTES) {
            // Only advice: where huge pages are off (`never`), the mapping keeps small pages.
            // SAFETY: the range is the mapping just made.
            unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        }
        ptr.cast()
    }

    /// Unmaps a block made by [`map`] with the same `len`.
    ///
    /// # Safety
    /// `ptr` and `len` must be a mapping from [`map`] that nothing uses any more.
    unsafe fn unmap(ptr: *mut u8, len: usize) {
        // SAFETY: the caller passes a whole mapping of ours. munmap only fails for invalid ranges.
        unsafe { libc::munmap(ptr.cast(), len) };
    }

    /// Resizes a mapping made by [`map`], moving it if need be (without copying: the kernel moves the pages).
    ///
    /// # Safety
    /// `ptr` and `old_len` must be a mapping from [`map`] that nothing else uses any more.
    unsafe fn remap(ptr: *mut u8, old_len: usize, new_len: usize) -> *mut u8 {
        // SAFETY: the caller passes a whole mapping of ours; MREMAP_MAYMOVE lets the kernel pick a new place.
        let moved = unsafe { libc::mremap(ptr.cast(), old_len, new_len, libc::MREMAP_MAYMOVE) };
        if moved == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        if new_len.is_multiple_of(HUGE_PAGE_BYTES) {
            // SAFETY: the range is the mapping just resized.
            unsafe { libc::madvise(moved, new_len, libc::MADV_HUGEPAGE) };
        }
        moved.cast()
    }

    // SAFETY: every block comes either from `System` (and goes back to it) or from `map` (and goes back to
    // `munmap` with the length it was mapped with, possibly after a time as a spare that `alloc` resizes to
    // the new block's length), decided by its layout alone, which the caller passes unchanged to `dealloc`
    // and `realloc`. Mappings are page-aligned, which covers every alignment routed to them; `alloc_zeroed`
    // maps fresh (zeroed) memory, never a spare.
    unsafe impl GlobalAlloc for LargeBuffersMapped {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            match mapping_len(layout.size(), layout.align()) {
                Some(len) => reuse_or_map(len),
                // SAFETY: the caller's contract for `alloc` is the same as for `System.alloc`.
                None => unsafe { System.alloc(layout) },
            }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            match mapping_len(layout.size(), layout.align()) {
                Some(len) => map(len),
                // SAFETY: as in `alloc`.
                None => unsafe { System.alloc_zeroed(layout) },
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            match mapping_len(layout.size(), layout.align()) {
                Some(len) => {
                    if !spares().keep(ptr as usize, len) {
                        // SAFETY: a block of this layout was mapped with this length.
                        unsafe { unmap(ptr, len) }
                    }
                }
                // SAFETY: a block of this layout came from `System`.
                None => unsafe { System.dealloc(ptr, layout) },
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let old_len = mapping_len(layout.size(), layout.align());
            let new_len = mapping_len(new_size, layout.align());
            match (old_len, new_len) {
                // SAFETY: the block came from `System` and stays there.
                (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
                (Some(old_len), Some(new_len)) if old_len == new_len => ptr,
                // SAFETY: the block was mapped with `old_len`; the caller gives it up for the new one.
                (Some(old_len), Some(new_len)) => unsafe { remap(ptr, old_len, new_len) },
                _ => {
                    // Moving between the system allocator and a mapping: copy. Growing buffers double, so
                    // this is amortised like any reallocation.
                    // SAFETY: `new_size` is non-zero and, rounded up to `align`, does not overflow (the
                    // caller's contract for `realloc`).
                    let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                    // SAFETY: as in `alloc`.
                    let new_ptr = unsafe { self.alloc(new_layout) };
                    if !new_ptr.is_null() {
                        // SAFETY: both blocks are valid for the smaller size and are distinct allocations.
                        unsafe {
                            std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
                            self.dealloc(ptr, layout);
                        }
                    }
                    new_ptr
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Held by every test that allocates through [`LargeBuffersMapped`] or releases memory: they share
        /// the spares.
        static ALLOCATOR: Mutex<()> = Mutex::new(());

        fn exclusive() -> std::sync::MutexGuard<'static, ()> {
            ALLOCATOR.lock().unwrap_or_else(PoisonError::into_inner)
        }

        #[test]
        fn spares_are_kept_within_their_limits_and_taken_most_recent_first() {
            let mut spares = Spares::new();
            assert!(spares.keep(0x1000, SPARE_BYTES / 2));
            assert!(!spares.keep(0x2000, SPARE_BYTES / 2 + PAGE_BYTES), "over the byte limit");
            assert!(spares.keep(0x3000, PAGE_BYTES));
            assert_eq!(spares.take(), Some((0x3000, PAGE_BYTES)));
            assert_eq!(spares.take(), Some((0x1000, SPARE_BYTES / 2)));
            assert_eq!(spares.take(), None);
            assert!((0..SPARE_BLOCKS).all(|i| spares.keep(i * PAGE_BYTES, PAGE_BYTES)));
            assert!(!spares.keep(0x9000, PAGE_BYTES), "over the block limit");
        }

        /// A freed large block's pages serve the next one (of another size) without faulting, and are
        /// given back by [`release_free_memory`].
        #[test]
        fn a_freed_large_block_is_reused_resident_and_released() {
            let _exclusive = exclusive();
            release_free_memory();
            let allocator = LargeBuffersMapped;
            let (first, second) = (HUGE_BYTES + 1, HUGE_BYTES - PAGE_BYTES);
            // SAFETY: each block is written within its size and freed once; afterwards only the residency
            // of its pages is queried, never its contents.
            unsafe {
                let layout = Layout::from_size_align(first, 64).unwrap();
                let ptr = allocator.alloc(layout);
                ptr.write_bytes(1, first);
                allocator.dealloc(ptr, layout);
                let layout = Layout::from_size_align(second, 64).unwrap();
                let reused = allocator.alloc(layout);
                let len = mapping_len(second, 64).unwrap();
                assert_eq!(resident_pages(reused as usize, len), len / PAGE_BYTES, "the spare's pages");
                allocator.dealloc(reused, layout);
                assert_eq!(resident_pages(reused as usize, len), len / PAGE_BYTES, "kept as a spare");
                release_free_memory();
                assert!(spares().take().is_none(), "no spare left after the release");
            }
        }

        #[test]
        fn large_blocks_are_mapped_in_whole_pages_and_huge_pages_from_four_mib() {
            assert_eq!(mapping_len(1000, 8), None);
            assert_eq!(mapping_len(LARGE_BYTES - 1, 64), None);
            assert_eq!(mapping_len(LARGE_BYTES + 1, 64), Some(LARGE_BYTES + PAGE_BYTES));
            assert_eq!(mapping_len(HUGE_BYTES + 1, 64), Some(HUGE_BYTES + HUGE_PAGE_BYTES));
            assert_eq!(mapping_len(HUGE_BYTES, 8192), None, "alignments above a page stay with the system");
        }

        /// Fills a block, reallocates it to each size in turn, and checks the contents survive every move
        /// between the system allocator, small-page and huge-page mappings.
        #[test]
        fn blocks_keep_their_contents_across_every_kind_of_reallocation() {
            let _exclusive = exclusive();
            let allocator = LargeBuffersMapped;
            let sizes = [100, LARGE_BYTES + 10, LARGE_BYTES + 20, HUGE_BYTES * 3, HUGE_BYTES + 5, 200, 64];
            let mut layout = Layout::from_size_align(sizes[0], 64).unwrap();
            // SAFETY: the layout is non-zero; every block is used within its size and freed once, below.
            unsafe {
                let mut ptr = allocator.alloc(layout);
                assert!(!ptr.is_null());
                let pattern = |i: usize| (i % 251) as u8;
                for i in 0..layout.size() {
                    *ptr.add(i) = pattern(i);
                }
                for &size in &sizes[1..] {
                    ptr = allocator.realloc(ptr, layout, size);
                    assert!(!ptr.is_null());
                    let kept = layout.size().min(size);
                    assert!((0..kept).all(|i| *ptr.add(i) == pattern(i)), "contents lost at {size} bytes");
                    layout = Layout::from_size_align(size, 64).unwrap();
                    for i in kept..size {
                        *ptr.add(i) = pattern(i);
                    }
                }
                allocator.dealloc(ptr, layout);
            }
        }

        /// Frees blocks from glibc's arenas and checks that the whole pages inside them stop being resident
        /// once released. (Blocks of other tests may take some of them back in between: hence the margin.)
        #[test]
        fn freed_arena_memory_goes_back_to_the_system() {
            let _exclusive = exclusive();
            const BLOCK: usize = 64 << 10;
            let layout = Layout::from_size_align(BLOCK, 16).unwrap();
            let resident = |blocks: &[usize]| -> usize {
                blocks
                    .iter()
                    .map(|&start| {
                        let first = start.next_multiple_of(PAGE_BYTES);
                        resident_pages(first, (start + BLOCK - first) / PAGE_BYTES * PAGE_BYTES)
                    })
                    .sum()
            };
            // SAFETY: every block is written within its size and freed once; afterwards only the residency
            // of its pages is queried, never its contents.
            let (before, after) = unsafe {
                let blocks: Vec<*mut u8> = (0..64).map(|_| System.alloc(layout)).collect();
                assert!(blocks.iter().all(|b| !b.is_null()));
                // A block allocated last keeps glibc from giving the freed ones back by shrinking the arena.
                let pin = System.alloc(layout);
                for &block in &blocks {
                    block.write_bytes(1, BLOCK);
                }
                let addresses: Vec<usize> = blocks.iter().map(|&b| b as usize).collect();
                for &block in &blocks {
                    System.dealloc(block, layout);
                }
                let before = resident(&addresses);
                release_free_memory();
                let after = resident(&addresses);
                System.dealloc(pin, layout);
                (before, after)
            };
            assert!(before >= 64 * 15, "freed blocks stay resident until released: {before} pages");
            assert!(after * 4 < before, "{after} of {before} pages still resident after release");
        }

        /// How many of the pages in `len` bytes from the page-aligned `addr` are resident.
        fn resident_pages(addr: usize, len: usize) -> usize {
            let mut pages = vec![0u8; len / PAGE_BYTES];
            // SAFETY: the range lies inside a mapping of this process; mincore only reports on it.
            let status = unsafe { libc::mincore(addr as *mut libc::c_void, len, pages.as_mut_ptr()) };
            assert_eq!(status, 0, "mincore: {}", std::io::Error::last_os_error());
            pages.iter().filter(|&&page| page & 1 == 1).count()
        }

        #[test]
        fn zeroed_blocks_are_zero() {
            let _exclusive = exclusive();
            let allocator = LargeBuffersMapped;
            for size in [64, LARGE_BYTES, HUGE_BYTES * 2] {
                let layout = Layout::from_size_align(size, 64).unwrap();
                // SAFETY: the block is read within its size and freed once.
                unsafe {
                    let ptr = allocator.alloc_zeroed(layout);
                    assert!(!ptr.is_null());
                    assert!(std::slice::from_raw_parts(ptr, size).iter().all(|&b| b == 0));
                    allocator.dealloc(ptr, layout);
                }
            }
        }
    }
}
