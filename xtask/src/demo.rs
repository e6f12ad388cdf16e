//! `cargo xtask demo`: build everything and trace the bundled demo service.

use anyhow::{Context, Result, bail};

use crate::cmd::{self, cargo, step};
use crate::{ebpf, root};

#[derive(clap::Args)]
pub struct Options {
    /// How long to trace, in seconds.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

pub fn run(options: &Options) -> Result<()> {
    // Checked first so that a missing sudo is not found out after the builds.
    if !root::is_root() {
        root::require_sudo("tracing")?;
    }

    ebpf::build(&ebpf::Options {
        debug: false,
        reinstall_bpf_linker: false,
    })?;

    let repo = cmd::repo_root();
    let tracer = ebpf::build_release_tracer(&repo)?;

    step("building the demo service");
    let demo_dir = repo.join("demo");
    cmd::run(cargo().args(["build", "--release"]).current_dir(&demo_dir))?;

    let demo = demo_dir.join("target/release/demo-service");
    for built in [&tracer, &demo] {
        if !built.is_file() {
            bail!("the build succeeded but {} is not there", built.display());
        }
    }

    let trace = repo.join("trace.pftrace");
    let mut trace_cmd = root::as_root(&tracer, "tracing")?;
    trace_cmd
        .arg("-o")
        .arg(&trace)
        .arg("--duration")
        .arg(format!("{}s", options.seconds))
        .arg("--")
        .arg(&demo)
        // The demo is told to stop a second after the trace does: it is
        // traced for the whole time, and it ends by itself either way.
        .arg((options.seconds + 1).to_string())
        .current_dir(&repo);
    step(&format!(
        "tracing the demo service for {} s: {}",
        options.seconds,
        cmd::display(&trace_cmd)
    ));
    cmd::run(&mut trace_cmd).context("tracing the demo failed")?;

    if trace.is_file() {
        eprintln!("trace written to {}", trace.display());
    }
    Ok(())
}
