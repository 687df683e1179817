//! Keeps the idle agent small: glibc keeps freed memory in per-thread arenas, so a
//! large document pushed once would otherwise stay resident for the agent's lifetime.

/// Caps glibc's malloc arenas (one per thread by default, each holding its own free
/// memory). Call once at agent start, before the runtime's threads exist.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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
