//! `cargo xtask lint`: rustfmt and clippy over every crate of the
//! repository, the ones outside the workspace included, failing on any
//! finding. CI runs it before the tests (.ci/run).
//!
//! The eBPF crate is formatted and linted with its own (nightly) toolchain
//! for its own target (`bpfel-unknown-none`, from its .cargo/config.toml);
//! clippy only checks, so bpf-linker is not needed. The fixtures, the demo
//! and the benchmark workloads are ordinary tokio programs: formatted, not
//! linted (clippy would compile tokio three more times on a 2-core machine).
//! Measured here with warm caches: about a minute, nearly all of it the
//! workspace's clippy.

use anyhow::{Result, bail};

use crate::cmd::{self, cargo, step};
use crate::ebpf;

/// Crates outside the workspace, by directory: formatted with `cargo fmt`
/// run there.
const OUTSIDE_WORKSPACE: [&str; 4] = ["tracer-ebpf", "tests/fixtures", "demo", "bench"];

pub fn run() -> Result<()> {
    let repo = cmd::repo_root();
    let mut failed = Vec::new();

    step("rustfmt: the workspace");
    if !cmd::status(cargo().args(["fmt", "--all", "--check"]).current_dir(&repo))?.success() {
        failed.push("rustfmt (workspace)".to_owned());
    }
    ebpf::ensure_toolchain()?;
    for component in ["rustfmt", "clippy"] {
        ebpf::ensure_nightly_component(component)?;
    }
    for dir in OUTSIDE_WORKSPACE {
        step(&format!("rustfmt: {dir}"));
        // Each directory's rust-toolchain.toml (if any) picks the toolchain.
        let mut fmt = cargo();
        fmt.args(["fmt", "--check"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .current_dir(repo.join(dir));
        if !cmd::status(&mut fmt)?.success() {
            failed.push(format!("rustfmt ({dir})"));
        }
    }

    step("clippy: the workspace");
    let mut clippy = cargo();
    clippy
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&repo);
    if !cmd::status(&mut clippy)?.success() {
        failed.push("clippy (workspace)".to_owned());
    }

    step("clippy: tracer-ebpf (nightly, bpfel-unknown-none)");
    let mut clippy = ebpf::nightly_cargo();
    clippy
        .args(["clippy", "--release", "--target-dir"])
        .arg(ebpf::target_dir())
        .args(["--", "-D", "warnings"])
        .current_dir(repo.join("tracer-ebpf"));
    if !cmd::status(&mut clippy)?.success() {
        failed.push("clippy (tracer-ebpf)".to_owned());
    }

    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    eprintln!("lint: clean");
    Ok(())
}
