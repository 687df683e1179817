//! Images for the image tests and benchmark: a tmpfs as a daemon's storage root (its
//! usage then measurable and small), statvfs as converge reads it, and busybox images
//! carrying an incompressible payload of a chosen size.

use super::sandbox::TestNode;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

pub const MB: u64 = 1_000_000;

/// Mounts a tmpfs of `size` at `dir` (the daemon's storage root, before it starts;
/// the node's drop detaches it).
pub fn tmpfs(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).expect("store dir");
    let out = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "mount tmpfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Used and total bytes of the filesystem at `dir` (statvfs, as converge reads it).
pub fn usage(dir: &Path) -> (u64, u64) {
    let out = Command::new("stat")
        .args(["-f", "-c", "%S %b %a"])
        .arg(dir)
        .output()
        .expect("stat -f");
    let v: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|s| s.parse().expect("number"))
        .collect();
    let (bs, blocks, avail) = (v[0], v[1], v[2]);
    ((blocks - avail) * bs, blocks * bs)
}

/// A busybox image with `payload` random bytes, imported as `name` by `import` (a
/// `podman import - NAME` or `docker import - NAME` command).
pub fn import_image(node: &TestNode, name: &str, payload: u64, mut import: Command) {
    let dir = node
        .data_dir()
        .join(format!("rootfs-{}", name.replace(['/', ':'], "_")));
    let bin = dir.join("bin");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&bin).expect("rootfs");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox");
    for applet in ["sh", "sleep", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("link");
    }
    let mut f = std::fs::File::create(dir.join("payload")).expect("payload");
    let urandom = std::fs::File::open("/dev/urandom").expect("urandom");
    std::io::copy(&mut urandom.take(payload), &mut f).expect("payload bytes");
    drop(f);
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .args(["-c", "."])
        .output()
        .expect("tar");
    let mut child = import
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("import");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = tar.stdout;
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let res = child.wait_with_output().expect("import");
    let _ = writer.join();
    assert!(
        res.status.success(),
        "import {name}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
