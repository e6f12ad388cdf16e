//! What a run needs before it starts: the programs (built, and the tracer
//! copied so that a rebuild during a long run doesn't change what is
//! measured halfway) and the external tools (wrk, bpftrace), installed from
//! Debian when missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Options;
use super::plan::Workload;
use crate::cmd::{self, cargo, step};
use crate::ebpf;

/// Installs a Debian package named like its program when it is missing.
pub(super) fn ensure_tool(program: &str) -> Result<()> {
    if cmd::on_path(program) {
        return Ok(());
    }
    if !cmd::on_path("apt-get") {
        bail!("{program} is missing: install it (Debian: apt-get install -y {program})");
    }
    step(&format!(
        "installing {program} (apt-get install -y {program})"
    ));
    cmd::run(Command::new("apt-get").args(["install", "-y", program]))
        .with_context(|| format!("{program} is needed: try `apt-get update` first"))
}

/// Mounts tracefs where it is missing (it is not mounted at boot on some
/// machines): bpftrace attaches its uprobes through
/// `/sys/kernel/tracing/uprobe_events` (rt-ebpf-trace needs none of it).
pub(super) fn ensure_tracefs() -> Result<()> {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("uprobe_events").exists() {
        return Ok(());
    }
    step("mounting tracefs for bpftrace (mount -t tracefs nodev /sys/kernel/tracing)");
    cmd::run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
        .context("bpftrace needs tracefs at /sys/kernel/tracing")
}

/// The programs a run uses.
pub(super) struct Tools {
    pub tracer: PathBuf,
    pub work: PathBuf,
    pub http_server: PathBuf,
    pub load: PathBuf,
    pub kv_server: PathBuf,
    pub kv_load: PathBuf,
    /// Where traces, summaries and generated bpftrace scripts go.
    pub scratch: PathBuf,
}

impl Tools {
    /// The binary a workload's process runs: what the tracers probe.
    pub fn workload_binary(&self, workload: Workload) -> &Path {
        match workload {
            Workload::Http => &self.http_server,
            Workload::Kv => &self.kv_server,
            _ => &self.work,
        }
    }
}

/// Builds the eBPF object (if missing), the release tracer and the
/// workloads, unless `--no-build`; then copies the tracer aside.
pub(super) fn build(options: &Options) -> Result<Tools> {
    let repo = cmd::repo_root();
    let bench = repo.join("bench");
    if !options.no_build {
        let object = ebpf::target_dir().join("bpfel-unknown-none/release/tracer-ebpf");
        if !object.is_file() {
            ebpf::build(&ebpf::Options {
                debug: false,
                reinstall_bpf_linker: false,
            })?;
        }
        ebpf::build_release_tracer(&repo)?;
        step("building the workloads");
        cmd::run(cargo().args(["build", "--release"]).current_dir(&bench))?;
    }
    let release = bench.join("target/release");
    let scratch = bench.join("target/bench");
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let tracer = scratch.join("rt-ebpf-trace");
    let built = repo.join("target/release/rt-ebpf-trace");
    // Removed first: the old copy may be the one a tracer still runs.
    let _ = fs::remove_file(&tracer);
    fs::copy(&built, &tracer).with_context(|| format!("copying {}", built.display()))?;
    let tools = Tools {
        tracer,
        work: release.join("bench-work"),
        http_server: release.join("bench-http-server"),
        load: release.join("bench-load"),
        kv_server: release.join("bench-kv-server"),
        kv_load: release.join("bench-kv-load"),
        scratch,
    };
    for program in [
        &tools.work,
        &tools.http_server,
        &tools.load,
        &tools.kv_server,
        &tools.kv_load,
    ] {
        if !program.is_file() {
            bail!(
                "{} is not built (run without --no-build)",
                program.display()
            );
        }
    }
    Ok(tools)
}
