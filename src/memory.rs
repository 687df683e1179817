//! Keeps the idle agent small: glibc keeps freed memory in per-thread arenas, so a
//! large document pushed once would otherwise stay resident for the agent's lifetime.

/// Large blocks (an export's 8 MiB parts, a big document's text) get their own mapping
/// from this size up, returned to the kernel when freed.
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Tunes glibc's malloc for a long-lived agent: at most two arenas (one per thread by
/// default, each holding its own free memory), and a fixed mmap threshold (glibc raises
/// its default one to the size of the largest block freed; after that, such blocks come
/// from the arenas, where they fragment: a 1 GiB export peaked 43-51 MB over the idle
/// agent, 23 MB with the fixed threshold, see benches/export_rss.sh). Call once at agent
/// start, before the runtime's threads exist.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns freed heap memory to the kernel; called after work that allocates a lot
/// temporarily (accepting a document, a pass that applied changes).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
