//! Build script: names the build. `CONVERGE_GIT_COMMIT` is the short commit of the source
//! tree (`git rev-parse --short HEAD`), or "unknown" when it is not a git checkout (a
//! source tarball, a vendored build) or git is missing.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CONVERGE_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=CONVERGE_GIT_COMMIT");
    // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points to (a
    // commit), packed refs. In a worktree HEAD is in the worktree's git dir and the
    // branches in the common one.
    if let (Some(dir), Some(common)) = (
        git(&["rev-parse", "--git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ) {
        let (dir, common) = (PathBuf::from(dir), PathBuf::from(common));
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        println!(
            "cargo:rerun-if-changed={}",
            common.join("packed-refs").display()
        );
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", common.join(head).display());
        }
    }
}
