//! A watch (inotify) on the directory of converge's generated keys,
//! `<data-dir>/wireguard/`, so that a key written there while the agent runs (by
//! `converge wireguard rotate-key`) is applied at once instead of at the next resync.
//! Only file names are read from the events, never a key.

use converge_core::HostEvent;
use futures::stream::BoxStream;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// An inotify instance watching one directory.
struct Inotify(OwnedFd);

impl AsRawFd for Inotify {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn open(dir: &Path) -> io::Result<Inotify> {
    // SAFETY: plain syscall; the descriptor is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the key directory"))?;
    // A key written atomically arrives by rename (IN_MOVED_TO); one written in place
    // is complete at IN_CLOSE_WRITE.
    let mask = libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE | libc::IN_DELETE;
    // SAFETY: valid descriptor and NUL-terminated path for the call.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Inotify(fd))
}

/// The first `*.key` file named in a buffer of inotify events (temp files of atomic
/// writes, `.<name>.tmp.<pid>`, are left out).
fn first_key(buf: &[u8]) -> Option<String> {
    let head = std::mem::size_of::<libc::inotify_event>();
    let mut at = 0;
    while at + head <= buf.len() {
        // struct inotify_event { int wd; uint32_t mask, cookie, len; char name[]; }
        let len = buf
            .get(at + 12..at + 16)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_ne_bytes)? as usize;
        let name = buf.get(at + head..at + head + len).unwrap_or_default();
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        if name.ends_with(b".key") && !name.starts_with(b".") {
            return Some(String::from_utf8_lossy(name).into_owned());
        }
        at += head + len;
    }
    None
}

/// A stream with one event per burst of changes to a key file in `dir` (which must
/// exist). Registered with the runtime on first poll.
pub fn watch(dir: &Path) -> io::Result<BoxStream<'static, HostEvent>> {
    let ino = open(dir)?;
    let state = (Some(ino), None::<AsyncFd<Inotify>>, vec![0u8; 4096]);
    Ok(Box::pin(futures::stream::unfold(
        state,
        |(mut raw, mut fd, mut buf)| async move {
            loop {
                if fd.is_none() {
                    let ino = raw.take()?;
                    // SAFETY: the instance owns its descriptor until it is dropped, which
                    // only the AsyncFd does.
                    let r = unsafe { AsyncFd::register_with_interest(ino, Interest::READABLE) };
                    fd = Some(r.ok()?);
                }
                let name = {
                    let afd = fd.as_ref()?;
                    let mut guard = afd.readable().await.ok()?;
                    let read = guard.try_io(|inner| {
                        // SAFETY: reads into a buffer we own, at most its length.
                        let n = unsafe {
                            libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                        };
                        if n < 0 {
                            Err(io::Error::last_os_error())
                        } else {
                            Ok(n as usize)
                        }
                    });
                    match read {
                        Ok(Ok(n)) => buf.get(..n).and_then(first_key),
                        // Not ready after all (readiness cleared): wait again.
                        Err(_would_block) => None,
                        Ok(Err(_)) => return None,
                    }
                };
                if let Some(name) = name {
                    let event = HostEvent(format!("key file {name}"));
                    return Some((event, (raw, fd, buf)));
                }
            }
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::time::Duration;

    #[tokio::test]
    async fn a_written_key_file_is_an_event_and_temp_files_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut events = watch(dir.path()).expect("watch");
        // Registers the descriptor; nothing has happened yet.
        let none = tokio::time::timeout(Duration::from_millis(50), events.next()).await;
        assert!(none.is_err());
        converge_core::fsutil::write_atomic(&dir.path().join("wg0.key"), b"x\n", 0o600)
            .expect("write");
        let e = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event")
            .expect("stream open");
        assert_eq!(e.0, "key file wg0.key");
    }
}
