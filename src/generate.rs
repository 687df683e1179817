//! `converge generate man|completions DIR` (hidden): man pages (clap_mangen, one per
//! command: `converge.1`, `converge-agent.1`, …) and shell completions (clap_complete:
//! bash, zsh, fish) from the command line's own definitions, for the Debian package
//! (`install/deb.sh`).

use crate::cli::Cli;
use clap::CommandFactory;
use std::path::Path;

/// What to generate.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum What {
    Man,
    Completions,
}

/// Writes the pages or completion scripts into `dir` (created if missing) and lists
/// the files written on stdout.
pub fn generate(what: What, dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let cmd = Cli::command();
    match what {
        What::Man => {
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("write man pages to {}", dir.display()))?;
        }
        What::Completions => {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let mut cmd = cmd.clone();
                clap_complete::generate_to(shell, &mut cmd, "converge", dir)
                    .with_context(|| format!("write {shell} completions to {}", dir.display()))?;
            }
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        println!("{}", dir.join(n).display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(What::Man, &dir.path().join("man")).expect("man");
        generate(What::Completions, &dir.path().join("comp")).expect("completions");
        let page = std::fs::read_to_string(dir.path().join("man/converge-agent.1")).expect("page");
        assert!(page.contains("metrics\\-listen"), "{page}");
        assert!(
            !dir.path().join("man/converge-generate.1").exists(),
            "hidden"
        );
        for f in ["converge.bash", "_converge", "converge.fish"] {
            assert!(dir.path().join("comp").join(f).exists(), "{f}");
        }
    }
}
