//! Running commands, with errors that say which command failed and how.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result, bail};

/// The root of the repository (the xtask crate is one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the repository")
        .to_path_buf()
}

/// Says what is about to happen, on one line of stderr.
pub fn step(what: &str) {
    eprintln!("{what}…");
}

/// The command as one would type it, for messages.
pub fn display(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` with inherited stdio and returns its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` with inherited stdio; fails unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails unless it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed something that is not UTF-8", display(cmd)))
}

/// A `cargo` command without the variables that `cargo run` (the way xtask is
/// started) puts in our environment, nor those that redirect or alter builds:
/// the builds we start must put their output where we (and tracer/build.rs)
/// look for it, and flags meant for x86_64 would break the eBPF build.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for (name, _) in std::env::vars_os() {
        let leaked = name.to_str().is_some_and(|name| {
            name.starts_with("CARGO_PKG_")
                || matches!(
                    name,
                    "CARGO"
                        | "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_TARGET_DIR"
                        | "CARGO_BUILD_TARGET_DIR"
                        | "CARGO_BUILD_TARGET"
                        | "CARGO_ENCODED_RUSTFLAGS"
                        | "RUSTFLAGS"
                        | "RUSTC"
                        | "RUSTC_WRAPPER"
                        | "RUSTC_WORKSPACE_WRAPPER"
                        | "RUSTDOC"
                )
        });
        if leaked {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Whether a program is found on PATH.
pub fn on_path(program: impl AsRef<OsStr>) -> bool {
    let program = program.as_ref();
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_is_named_with_its_status() {
        let error = run(Command::new("false").arg("now")).unwrap_err();
        assert_eq!(error.to_string(), "`false now` failed (exit status: 1)");
        let error = run(&mut Command::new("/nonexistent/program")).unwrap_err();
        assert_eq!(error.to_string(), "could not start `/nonexistent/program`");
    }
}
