//! `cargo xtask test`: the test suite, whose integration tests attach uprobes
//! and so must run as root.

use anyhow::{Context, Result};

use crate::cmd::{self, cargo, step};
use crate::{compat, ebpf, root};

#[derive(clap::Args)]
pub struct Options {
    /// Run the whole compatibility matrix (every tokio version and build
    /// profile in tests/compat/matrix.rs; builds each once, ~20 builds)
    /// instead of the test suite, and write the README's table from it.
    #[arg(long)]
    pub matrix: bool,
    /// Passed on to `cargo test --workspace`, e.g. `--test trace -- --nocapture`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(options: &Options) -> Result<()> {
    let as_root = root::is_root();
    if !as_root {
        root::require_sudo("the integration tests")?;
    }

    preflight()?;
    ebpf::build(&ebpf::Options {
        debug: false,
        reinstall_bpf_linker: false,
    })?;

    let repo = cmd::repo_root();
    // The tests build the fixtures themselves, but under sudo that would be
    // root's cargo writing into the user's tests/fixtures/target and cargo
    // home. Built here first, as the user, the tests find them up to date.
    step("building the test fixtures");
    for profile in test_support::Profile::EVERY {
        cmd::run(
            cargo()
                .args(["build", "--quiet", "--profile", profile.cargo_name()])
                .current_dir(repo.join("tests/fixtures")),
        )?;
    }

    ensure_perfetto_python()?;
    ensure_capsh()?;

    let mut test = cargo();
    if options.matrix {
        compat::build(&compat::all_cells())?;
        test.args(["test", "-p", "rt-ebpf-trace", "--test", "compat"])
            .env("RT_COMPAT_CELLS", "all");
    } else {
        // The matrix's fast corners run with the suite (tests/compat.rs).
        compat::build(&compat::fast_cells())?;
        test.args(["test", "--workspace"]);
    }
    test.args(&options.cargo_args).current_dir(&repo);
    if !as_root {
        // Cargo runs each test binary through this runner (build scripts and
        // the compiler stay unprivileged). sudo's secure_path would drop
        // ~/.cargo/bin, which the tests need to build the fixtures, hence
        // PATH is passed explicitly; cargo splits the runner on whitespace.
        let path = std::env::var("PATH").unwrap_or_default();
        let runner = if path.is_empty() || path.contains(char::is_whitespace) {
            "sudo -E".to_owned()
        } else {
            format!("sudo -E env PATH={path}")
        };
        test.env(format!("CARGO_TARGET_{}_RUNNER", host_env_name()?), runner);
        step("running the tests (test binaries through sudo)");
    } else {
        step("running the tests");
    }
    let status = cmd::status(&mut test)?;
    if options.matrix {
        // Failing cells show as FAIL in the table: it is written either way.
        compat::write_table()?;
    }
    // Cargo's status is ours, whatever it is: it already said what failed.
    std::process::exit(status.code().unwrap_or(1));
}

/// The integration tests attach uprobes and load BPF programs that need the
/// kernel's BTF: on a machine without either they would all fail, each with
/// the tracer's error. Say it once, before building anything. (The same
/// check as the tracer's own, `record/preflight.rs`.)
fn preflight() -> Result<()> {
    let needs = [
        (
            "/sys/bus/event_source/devices/uprobe/type",
            "uprobes (CONFIG_UPROBE_EVENTS)",
        ),
        (
            "/sys/kernel/btf/vmlinux",
            "BTF type information (CONFIG_DEBUG_INFO_BTF, Linux 5.8+)",
        ),
    ];
    for (path, what) in needs {
        if !std::path::Path::new(path).exists() {
            anyhow::bail!(
                "this machine cannot run the integration tests: the kernel has no {what} \
                 ({path} is missing); the tracer needs it to attach its probes"
            );
        }
    }
    Ok(())
}

/// The integration tests check every Perfetto trace against Perfetto's own
/// schema, which the `perfetto` Python package ships: install it when it is
/// missing (quietly; nothing to do when it is there).
fn ensure_perfetto_python() -> Result<()> {
    const SCHEMA: &str = "import perfetto.protos.perfetto.trace.perfetto_trace_pb2";
    let present = std::process::Command::new("python3")
        .args(["-c", SCHEMA])
        .stderr(std::process::Stdio::null())
        .status()
        .context("running python3 (the tests need it to check Perfetto traces)")?
        .success();
    if present {
        return Ok(());
    }
    step("installing the perfetto Python package (its trace schema checks the tests' traces)");
    cmd::run(std::process::Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "perfetto",
    ]))
}

/// The privileges test drops capabilities with `capsh` (Debian's
/// libcap2-bin): install it when it is missing and we may (as root).
fn ensure_capsh() -> Result<()> {
    let present = std::process::Command::new("capsh")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if present || !root::is_root() {
        return Ok(());
    }
    step("installing capsh (libcap2-bin: the privileges test drops capabilities with it)");
    let installed = std::process::Command::new("apt-get")
        .args(["install", "-y", "-qq", "libcap2-bin"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        cmd::run(std::process::Command::new("apt-get").args(["update", "-qq"]))?;
        cmd::run(
            std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "libcap2-bin"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

/// The host triple as cargo spells it in `CARGO_TARGET_<TRIPLE>_RUNNER`.
fn host_env_name() -> Result<String> {
    let info = cmd::output(std::process::Command::new("rustc").arg("-vV"))?;
    let host = info
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .context("`rustc -vV` printed no host line")?;
    Ok(host.to_uppercase().replace(['-', '.'], "_"))
}
