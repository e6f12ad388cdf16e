//! Running as root: tracing attaches uprobes, which needs it.

use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd;

/// Whether this process's effective uid is 0.
pub fn is_root() -> bool {
    // `Uid:` lists the real, effective, saved and filesystem uids; reading it
    // spares a libc dependency.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The command that runs a program as root: the program itself when we are
/// root, else `sudo` in front of it.
pub fn as_root(program: impl AsRef<std::ffi::OsStr>, why: &str) -> Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    require_sudo(why)?;
    let mut cmd = Command::new("sudo");
    cmd.arg(program);
    Ok(cmd)
}

/// Fails with a clear message when we are not root and sudo is missing.
pub fn require_sudo(why: &str) -> Result<()> {
    if !cmd::on_path("sudo") {
        bail!("{why} must run as root: run this command as root, or install sudo");
    }
    Ok(())
}
