//! A watch (inotify) on the directory of converge's generated keys,
//! `<data-dir>/wireguard/`, so that a key written there while the agent runs (by
//! `converge wireguard rotate-key`) is applied at once instead of at the next resync.
//! Only file names are read from the events, never a key.

use converge_core::HostEvent;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::ffi::OsString;
use std::path::Path;

/// The first `*.key` file among `names` (the temp files of atomic writes are dotfiles
/// and are left out).
fn first_key(names: &[OsString]) -> Option<String> {
    names
        .iter()
        .map(|n| n.to_string_lossy())
        .find(|n| n.ends_with(".key") && !n.starts_with('.'))
        .map(|n| n.into_owned())
}

/// A stream with one event per burst of changes to a key file in `dir` (which must
/// exist): the names the watch has ready together are one burst.
pub fn watch(dir: &Path) -> std::io::Result<BoxStream<'static, HostEvent>> {
    Ok(converge_core::host::dir_watch(&[dir])?
        .ready_chunks(64)
        .filter_map(|names| {
            std::future::ready(first_key(&names).map(|name| HostEvent(format!("key file {name}"))))
        })
        .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
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
