//! glibc allocator tuning for a process that moves large Arrow buffers between threads.
//!
//! glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so after the
//! first request every multi-megabyte Arrow message is carved from per-thread arenas instead of mapped.
//! Decoded on a runtime thread and freed on a DuckDB thread, those blocks fragment the arenas, which
//! rarely shrink: a 1 GiB upload left the server at ~600 MB resident. A fixed threshold keeps large
//! buffers mapped, so freeing one returns it to the system at once (measured: ~340 MB peak for the same
//! upload). The price is zero-filling fresh pages: about 2% of the server's CPU in a profile of a load.
#![allow(unsafe_code)]

/// Fixes the mmap threshold. Call once, first thing in `main`, before other threads start.
pub fn keep_large_buffers_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Blocks at least this large are mapped on their own and unmapped when freed.
        const MMAP_THRESHOLD_BYTES: i32 = 1 << 20;
        // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread exists.
        let accepted = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        if accepted != 1 {
            tracing::warn!("Could not set the allocator's mmap threshold; memory may fragment.");
        }
    }
}
