//! The `converge` binary: parses the command line and runs the command.

use std::process::ExitCode;

fn main() -> ExitCode {
    converge::privacy::harden_process();
    // The command line over CONVERGE_* over /etc/converge/converge.toml (src/config.rs).
    let cli = converge::config::parse();
    converge::cli::init_tracing(cli.log_format);
    use converge::cli::{Command, ControlPlaneCommand};
    match &cli.command {
        Command::Agent { .. } => converge::memory::tune_allocator(),
        Command::ControlPlane {
            command: ControlPlaneCommand::Serve { .. },
        } => {}
        // Output piped into `grep -q` or `head` ends the command quietly when the reader
        // goes away, as with other Unix tools (Rust ignores SIGPIPE, so a print would
        // panic). The daemons keep ignoring it: a peer closing a socket is handled there.
        // SAFETY: resetting a signal disposition to its default before any thread starts.
        _ => unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        },
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(converge::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
