//! The configuration file, `/etc/converge/converge.toml` (another with `--config PATH` or
//! `CONVERGE_CONFIG`): one key per `converge agent` flag, named as the long flag
//! (`data-dir = "/var/lib/converge"`, `proxy = true`, `resync-secs = 30`).
//!
//! Precedence: command line > `CONVERGE_*` environment > this file > built-in default.
//! The file's values become clap's defaults before the command line is parsed, so clap
//! applies the first three itself. An unknown key, or a value that is not a string,
//! number or boolean, is an error naming the key and its line; so is a missing file
//! named explicitly (the default path may be absent).

use crate::cli::Cli;
use clap::{CommandFactory, FromArgMatches};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where the configuration is read from unless `--config`/`CONVERGE_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/converge/converge.toml";

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}:{line}: unknown key {key:?} (keys are `converge agent` flags: {known})")]
    Unknown {
        path: PathBuf,
        line: usize,
        key: String,
        known: String,
    },
    #[error("{path}:{line}: {key}: expected a string, number or boolean")]
    Type {
        path: PathBuf,
        line: usize,
        key: String,
    },
}

/// Why the command line could not be turned into a [`Cli`].
#[derive(Debug)]
pub enum ParseError {
    Config(ConfigError),
    /// Also `--help` and `--version`: `exit()` prints it as clap does.
    Clap(clap::Error),
}

/// Flags that are not configuration (they say where the configuration is, or print).
const NOT_KEYS: [&str; 3] = ["config", "help", "version"];

/// The keys the file may hold: the long names of the agent's flags, global ones
/// included, with the argument id each sets and whether it lives on the root command.
fn keys(cmd: &clap::Command) -> BTreeMap<String, (String, bool)> {
    let mut keys = BTreeMap::new();
    let agent = cmd
        .get_subcommands()
        .find(|s| s.get_name() == "agent")
        .into_iter()
        .flat_map(|s| s.get_arguments().map(|a| (a, false)));
    for (arg, root) in cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .map(|a| (a, true))
        .chain(agent)
    {
        if let Some(long) = arg.get_long() {
            if !NOT_KEYS.contains(&long) {
                keys.insert(long.to_string(), (arg.get_id().to_string(), root));
            }
        }
    }
    keys
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |t| t.bytes().filter(|b| *b == b'\n').count())
        + 1
}

/// Reads the file's keys and values (as clap would read them from the command line).
pub fn read(path: &Path, text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    type Table = BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>>;
    let table: Table = toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let known = keys(&Cli::command());
    let mut out = BTreeMap::new();
    for (key, value) in table {
        let line = line_of(text, key.span().start);
        let key = key.into_inner();
        if !known.contains_key(&key) {
            return Err(ConfigError::Unknown {
                path: path.to_path_buf(),
                line,
                key,
                known: known.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        let value = match value.into_inner() {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(ConfigError::Type {
                    path: path.to_path_buf(),
                    line,
                    key,
                })
            }
        };
        out.insert(key, value);
    }
    Ok(out)
}

/// The configuration path: `--config PATH` (or `--config=PATH`) anywhere on the command
/// line, else `env` (`CONVERGE_CONFIG`); `None` for the default path.
fn explicit_path(args: &[OsString], env: Option<OsString>) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(p));
        }
    }
    env.filter(|e| !e.is_empty()).map(PathBuf::from)
}

/// The command with the file's values as defaults.
pub fn command(values: &BTreeMap<String, String>) -> clap::Command {
    let mut cmd = Cli::command();
    let known = keys(&cmd);
    for (key, value) in values {
        let Some((id, root)) = known.get(key) else {
            continue;
        };
        // clap (without its `string` feature) takes 'static defaults: the few values
        // of one configuration file live as long as the process anyway.
        let value: &'static str = Box::leak(value.clone().into_boxed_str());
        if *root {
            cmd = cmd.mut_arg(id.as_str(), |a| a.default_value(value));
        } else {
            cmd = cmd.mut_subcommand("agent", |s| {
                s.mut_arg(id.as_str(), |a| a.default_value(value))
            });
        }
    }
    cmd
}

/// Parses `args` (program name first) with the configuration file applied: the file
/// named by `--config` or `config_env`, else [`DEFAULT_PATH`] if it exists.
pub fn parse_from(args: Vec<OsString>, config_env: Option<OsString>) -> Result<Cli, ParseError> {
    let (path, required) = match explicit_path(&args, config_env) {
        Some(p) => (p, true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let values = match std::fs::read_to_string(&path) {
        Ok(text) => read(&path, &text).map_err(ParseError::Config)?,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(source) => return Err(ParseError::Config(ConfigError::Read { path, source })),
    };
    let matches = command(&values)
        .try_get_matches_from(args)
        .map_err(ParseError::Clap)?;
    Cli::from_arg_matches(&matches).map_err(ParseError::Clap)
}

/// The process's command line with its configuration; exits as clap does on `--help`,
/// `--version` and usage errors, and with status 2 on a bad configuration file.
pub fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    match parse_from(args, std::env::var_os("CONVERGE_CONFIG")) {
        Ok(cli) => cli,
        Err(ParseError::Clap(e)) => e.exit(),
        Err(ParseError::Config(e)) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once("converge")
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn agent(cli: &Cli) -> (bool, u64, Option<String>) {
        match &cli.command {
            Command::Agent {
                proxy,
                resync_secs,
                node_id,
                ..
            } => (*proxy, *resync_secs, node_id.clone()),
            other => panic!("not agent: {other:?}"),
        }
    }

    #[test]
    fn every_agent_flag_is_a_key_with_an_environment_variable() {
        let cmd = Cli::command();
        let keys = keys(&cmd);
        for k in [
            "data-dir",
            "proxy",
            "resync-secs",
            "metrics-listen",
            "runtime",
            "max-items",
        ] {
            assert!(keys.contains_key(k), "{k} missing from {keys:?}");
        }
        let agent = cmd
            .get_subcommands()
            .find(|s| s.get_name() == "agent")
            .expect("agent");
        let globals = cmd.get_arguments().filter(|a| a.is_global_set());
        for a in agent.get_arguments().chain(globals) {
            let Some(long) = a.get_long() else { continue };
            if NOT_KEYS.contains(&long) {
                continue;
            }
            let want = format!("CONVERGE_{}", long.replace('-', "_").to_uppercase());
            assert_eq!(
                a.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{long}"
            );
        }
    }

    #[test]
    fn command_line_beats_environment_beats_file_beats_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("converge.toml");
        std::fs::write(
            &file,
            "# a comment\ndata-dir = \"/srv/converge\"\nproxy = true\nresync-secs = 30\nnode-id = \"from-file\"\n",
        )
        .expect("write");
        let config = Some(file.clone().into_os_string());
        // Default only (no file): the built-in values.
        let none = dir.path().join("absent.toml");
        let cli = parse_from(
            args(&["--config", none.to_str().expect("utf-8"), "agent"]),
            None,
        );
        assert!(matches!(
            cli,
            Err(ParseError::Config(ConfigError::Read { .. }))
        ));
        // The file over the defaults.
        let cli = parse_from(args(&["agent"]), config.clone()).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(cli.data_dir, PathBuf::from("/srv/converge"));
        assert_eq!(agent(&cli), (true, 30, Some("from-file".into())));
        // The environment over the file (one test: the environment is the process's).
        std::env::set_var("CONVERGE_RESYNC_SECS", "40");
        std::env::set_var("CONVERGE_NODE_ID", "from-env");
        let cli = parse_from(args(&["agent"]), config.clone()).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(agent(&cli), (true, 40, Some("from-env".into())));
        // The command line over both; `--config` given on the command line itself.
        let cli = parse_from(
            args(&[
                "--config",
                file.to_str().expect("utf-8"),
                "agent",
                "--resync-secs",
                "50",
                "--node-id",
                "from-cli",
            ]),
            None,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        std::env::remove_var("CONVERGE_RESYNC_SECS");
        std::env::remove_var("CONVERGE_NODE_ID");
        assert_eq!(agent(&cli), (true, 50, Some("from-cli".into())));
        // Other commands see the global keys (the data dir) too.
        let cli = parse_from(args(&["status"]), config).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(cli.data_dir, PathBuf::from("/srv/converge"));
    }

    #[test]
    fn the_packaged_default_file_names_every_key_and_parses_uncommented() {
        let text = include_str!("../install/converge.toml");
        let path = Path::new("install/converge.toml");
        assert!(read(path, text).expect("all commented").is_empty());
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let values = read(path, &uncommented).unwrap_or_else(|e| panic!("{e}"));
        for key in keys(&Cli::command()).keys() {
            assert!(
                values.contains_key(key),
                "{key} missing from install/converge.toml"
            );
        }
        command(&values)
            .try_get_matches_from(args(&["agent"]))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let path = Path::new("/etc/converge/converge.toml");
        let err = read(path, "proxy = true\n\nresync_secs = 3\n").expect_err("unknown key");
        let msg = err.to_string();
        assert!(
            msg.starts_with("/etc/converge/converge.toml:3: unknown key \"resync_secs\""),
            "{msg}"
        );
        assert!(msg.contains("resync-secs"), "lists the known keys: {msg}");
        let err = read(path, "data-dir = [\"a\"]\n").expect_err("bad type");
        assert_eq!(
            err.to_string(),
            "/etc/converge/converge.toml:1: data-dir: expected a string, number or boolean"
        );
        let err = read(path, "proxy = \n").expect_err("syntax");
        assert!(err.to_string().contains("line 1"), "{err}");
        // A value clap refuses is reported by clap, naming the flag. (A key no other
        // test sets through the environment, which tests share.)
        let values = read(path, "max-document-age-days = \"soon\"\n").expect("parses");
        let e = command(&values)
            .try_get_matches_from(args(&["agent"]))
            .expect_err("not a number");
        assert!(e.to_string().contains("--max-document-age-days"), "{e}");
    }
}
