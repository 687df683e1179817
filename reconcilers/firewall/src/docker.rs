//! Docker's FORWARD chain: the one rule converge keeps in `DOCKER-USER` when Docker is
//! the container runtime. dockerd sets the `ip filter` FORWARD policy to `drop` and
//! accepts only what its own published ports DNAT, so what converge's published ports
//! DNAT to a container on a Docker network is dropped there; an accept in
//! `inet converge` cannot undo another table's drop. `DOCKER-USER` is the chain Docker
//! leaves to the admin (it keeps its rules across dockerd restarts): converge inserts
//! one rule accepting DNATed connections, marked with its comment so it never touches
//! an operator's rules. Written with the `iptables` dockerd itself uses, since the chain
//! belongs to iptables' table (iptables-nft keeps its own rule format there).

use converge_core::DriverError;
use std::process::{Command, Output};

/// The chain Docker leaves to the admin.
pub const CHAIN: &str = "DOCKER-USER";
/// The comment that marks converge's rule.
pub const COMMENT: &str = "converge: published ports";

/// What `DOCKER-USER` holds of converge's rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerUser {
    /// The rule is in place.
    Present,
    /// The chain exists without the rule.
    Missing,
    /// No such chain: dockerd has not started (its next start makes it; the next pass
    /// after that adds the rule).
    NoChain,
}

/// The rule's match and target after the chain name.
fn rule() -> [&'static str; 10] {
    [
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "-m",
        "comment",
        "--comment",
        COMMENT,
        "-j",
        "ACCEPT",
    ]
}

fn iptables(args: &[&str]) -> Result<Output, DriverError> {
    // `-w 5`: wait for the xtables lock dockerd may hold rather than fail at once.
    Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .map_err(|e| DriverError::Failed(format!("iptables: {e}")))
}

/// Reads `DOCKER-USER` (one `iptables -S`).
pub fn observe() -> Result<DockerUser, DriverError> {
    let out = iptables(&["-S", CHAIN])?;
    if !out.status.success() {
        return Ok(DockerUser::NoChain);
    }
    let listed = String::from_utf8_lossy(&out.stdout);
    Ok(if is_present(&listed) {
        DockerUser::Present
    } else {
        DockerUser::Missing
    })
}

/// Whether `iptables -S DOCKER-USER` output holds converge's rule.
fn is_present(listed: &str) -> bool {
    listed.lines().any(|l| {
        l.starts_with(&format!("-A {CHAIN} "))
            && l.contains(&format!("--comment \"{COMMENT}\""))
            && l.contains("--ctstate DNAT")
            && l.ends_with("-j ACCEPT")
    })
}

/// Inserts converge's rule at the top of `DOCKER-USER`.
pub fn insert() -> Result<(), DriverError> {
    change("-I")
}

/// Deletes converge's rule (`converge reset`).
pub fn remove() -> Result<(), DriverError> {
    change("-D")
}

fn change(op: &str) -> Result<(), DriverError> {
    let mut args = vec![op, CHAIN];
    args.extend(rule());
    let out = iptables(&args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DriverError::Failed(format!(
            "iptables {op} {CHAIN}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_converge_s_own_rule_counts() {
        let ours = "-N DOCKER-USER\n\
            -A DOCKER-USER -m conntrack --ctstate DNAT -m comment --comment \"converge: published ports\" -j ACCEPT\n\
            -A DOCKER-USER -j RETURN\n";
        assert!(is_present(ours));
        // The same rule added by an operator (no comment) is theirs, not converge's.
        let theirs = "-N DOCKER-USER\n-A DOCKER-USER -m conntrack --ctstate DNAT -j ACCEPT\n-A DOCKER-USER -j RETURN\n";
        assert!(!is_present(theirs));
        assert!(!is_present("-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n"));
    }
}
