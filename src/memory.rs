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

/// Unmaps the agent's own code and read-only data pages once start-up is over
/// (`MADV_DONTNEED`), so its resident set holds only what it keeps using. Start-up
/// (argument parsing, the schema, the runtime, every reconciler's first pass) touches
/// most of the binary, and the kernel maps the pages around each fault too, which kept
/// ~19 MB of the binary mapped in an idle agent that uses a few MB of it. The pages stay
/// in the page cache (shared, reclaimable); a page used again is mapped again by a minor
/// fault. Returns the bytes that were mapped in the released ranges.
pub fn release_startup_pages() -> usize {
    #[cfg(target_os = "linux")]
    {
        let exe = std::fs::read_link("/proc/self/exe").ok();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let Some(exe) = exe.as_deref().and_then(|p| p.to_str()) else {
            return 0;
        };
        let mut released = 0;
        for r in releasable(&smaps, exe) {
            // SAFETY: the range is one whole mapping of our own executable that is not
            // writable and holds no private (copied-on-write) page: every page is a clean
            // copy of the file, and a later access maps the same bytes again.
            if unsafe { libc::madvise(r.start as *mut libc::c_void, r.len, libc::MADV_DONTNEED) }
                == 0
            {
                released += r.rss;
            }
        }
        released
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// One mapping `release_startup_pages` may drop.
#[derive(Debug, PartialEq)]
struct Releasable {
    start: usize,
    len: usize,
    rss: usize,
}

/// The mappings of `exe` in `smaps` (`/proc/self/smaps`) that can be dropped safely:
/// private, not writable, and without anonymous pages (a relocated RELRO page is
/// anonymous: dropping it would lose the relocation).
fn releasable(smaps: &str, exe: &str) -> Vec<Releasable> {
    let mut out = Vec::new();
    let mut current: Option<Releasable> = None;
    let kb = |line: &str| -> Option<usize> {
        line.split_whitespace()
            .nth(1)?
            .parse::<usize>()
            .ok()
            .map(|k| k * 1024)
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            out.extend(current.take());
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            if path == exe && perms.starts_with('r') && perms.ends_with('p') && !perms.contains('w')
            {
                current = Some(Releasable {
                    start,
                    len: end.saturating_sub(start),
                    rss: 0,
                });
            }
        } else if let Some(r) = current.as_mut() {
            match first {
                "Rss:" => r.rss = kb(line).unwrap_or(0),
                // A copied page, or an unreadable count: keep the mapping as it is.
                "Anonymous:" if kb(line) != Some(0) => current = None,
                _ => {}
            }
        }
    }
    out.extend(current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5600-5800 r--p 00000000 fe:00 12 /usr/bin/converge
Rss:                   8 kB
Anonymous:             0 kB
5800-6000 r-xp 00002000 fe:00 12 /usr/bin/converge
Rss:                  20 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
6000-6100 r--p 00007000 fe:00 12 /usr/bin/converge
Rss:                   4 kB
Anonymous:             4 kB
6100-6200 rw-p 00008000 fe:00 12 /usr/bin/converge
Rss:                   4 kB
Anonymous:             0 kB
7000-7100 r-xp 00000000 fe:00 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                   4 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_binary_are_released() {
        let r = releasable(SMAPS, "/usr/bin/converge");
        assert_eq!(
            r,
            vec![
                Releasable {
                    start: 0x5600,
                    len: 0x200,
                    rss: 8192
                },
                Releasable {
                    start: 0x5800,
                    len: 0x800,
                    rss: 20480
                },
            ]
        );
        assert!(releasable(SMAPS, "/usr/bin/other").is_empty());
        assert!(releasable("garbage\n1-2\n", "/usr/bin/converge").is_empty());
    }

    #[test]
    fn the_process_runs_on_after_its_pages_are_released() {
        release_startup_pages();
        // Code and constants come back from the file on use.
        let v: Vec<String> = (0..100).map(|i| format!("{i}")).collect();
        assert_eq!(v[42], "42");
    }
}
