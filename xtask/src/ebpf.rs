//! `cargo xtask build-ebpf`: the eBPF object and what building it needs.
//!
//! The eBPF crate builds for `bpfel-unknown-none` with the nightly toolchain
//! (`build-std = ["core"]` needs rust-src) and links with bpf-linker, which
//! must use the same LLVM as that nightly's rustc: it reads the bitcode rustc
//! writes, and bitcode from a newer LLVM is unreadable to an older one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, cargo, step};

#[derive(clap::Args)]
pub struct Options {
    /// Build the debug profile instead of release (the tracer embeds the
    /// release object).
    #[arg(long)]
    pub debug: bool,
    /// Rebuild bpf-linker even if one works (it goes where `cargo install`
    /// puts it: $CARGO_INSTALL_ROOT, else $CARGO_HOME, else ~/.cargo).
    #[arg(long)]
    pub reinstall_bpf_linker: bool,
}

/// The toolchain the eBPF crate's rust-toolchain.toml names.
const NIGHTLY: &str = "nightly";

/// Where the eBPF crate builds; tracer/build.rs looks for the object here.
pub fn target_dir() -> PathBuf {
    cmd::repo_root().join("target/bpf")
}

/// Installs what is missing, builds the eBPF object and returns its path.
pub fn build(options: &Options) -> Result<PathBuf> {
    ensure_toolchain()?;
    ensure_bpf_linker(options.reinstall_bpf_linker)?;

    let profile = if options.debug { "debug" } else { "release" };
    step(&format!("building the eBPF object ({profile})"));
    let mut build = nightly_cargo();
    build.arg("build");
    if !options.debug {
        build.arg("--release");
    }
    build
        .arg("--target-dir")
        .arg(target_dir())
        .current_dir(cmd::repo_root().join("tracer-ebpf"));
    cmd::run(&mut build).context(
        "building the eBPF object failed (if bpf-linker could not read rustc's bitcode, \
         it was built against another LLVM: rerun with --reinstall-bpf-linker)",
    )?;

    let object = target_dir()
        .join("bpfel-unknown-none")
        .join(profile)
        .join("tracer-ebpf");
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is not there",
            object.display()
        );
    }
    Ok(object)
}

/// Installs the nightly toolchain and its rust-src if missing: enough to
/// check the eBPF crate (building it also needs bpf-linker).
pub fn ensure_toolchain() -> Result<()> {
    ensure_nightly()?;
    ensure_rust_src()
}

/// `cargo +nightly`, able to find a bpf-linker we just installed.
pub fn nightly_cargo() -> Command {
    let mut cargo = cargo();
    cargo
        .arg(format!("+{NIGHTLY}"))
        .env_remove("RUSTUP_TOOLCHAIN");
    if let Some(path) = path_with_install_bin() {
        cargo.env("PATH", path);
    }
    cargo
}

/// PATH with cargo's install directory in front, so that a bpf-linker that
/// `cargo install` just put there (say into $CARGO_INSTALL_ROOT) is the one
/// used, whether or not that directory is on the user's PATH.
fn path_with_install_bin() -> Option<OsString> {
    let bin = install_root()?.join("bin");
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&rest))).ok()
}

/// Where `cargo install` installs, by its own rules.
fn install_root() -> Option<PathBuf> {
    std::env::var_os("CARGO_INSTALL_ROOT")
        .or_else(|| std::env::var_os("CARGO_HOME"))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
}

fn ensure_nightly() -> Result<()> {
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to get the nightly toolchain (https://rustup.rs)")?;
    // Lines look like `nightly-x86_64-unknown-linux-gnu (default)`; a dated
    // `nightly-2025-…` is another toolchain than the one `+nightly` names.
    let present = toolchains.lines().any(|line| {
        line.split_whitespace()
            .next()
            .and_then(|name| name.strip_prefix("nightly-"))
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if !present {
        step("installing the nightly toolchain (with rust-src)");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    ensure_nightly_component("rust-src")
}

/// Installs a component of the nightly toolchain if it is missing (the
/// toolchain is installed with the minimal profile).
pub fn ensure_nightly_component(component: &str) -> Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))?;
    // Installed components are listed with their target, e.g. `rust-src`
    // or `clippy-x86_64-unknown-linux-gnu`.
    let present = installed.lines().any(|line| {
        let line = line.trim();
        line == component
            || line
                .strip_prefix(component)
                .is_some_and(|rest| rest.starts_with('-'))
    });
    if !present {
        step(&format!("installing {component} for the nightly toolchain"));
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker(reinstall: bool) -> Result<()> {
    if !reinstall {
        // Run it the way rustc will: under the nightly toolchain, whose lib
        // directory rustup puts on the library path. A bpf-linker built
        // against an LLVM the nightly no longer ships fails here too.
        let mut version = Command::new("rustup");
        version.args(["run", NIGHTLY, "bpf-linker", "--version"]);
        if let Some(path) = path_with_install_bin() {
            version.env("PATH", path);
        }
        match version.output() {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) if cmd::on_path("bpf-linker") => eprintln!(
                "bpf-linker is installed but does not run under the nightly toolchain: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            _ => {}
        }
    }
    install_bpf_linker()
}

/// Builds bpf-linker against the nightly's own libLLVM.
fn install_bpf_linker() -> Result<()> {
    let sysroot = cmd::output(
        Command::new("rustc")
            .arg(format!("+{NIGHTLY}"))
            .args(["--print", "sysroot"]),
    )?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let (libllvm, major) = find_libllvm(&lib_dir)?;

    // bpf-linker's build looks for `$LLVM_PREFIX/lib/libLLVM.so`; the
    // toolchain only has the versioned name, which is also the one the built
    // linker asks the loader for. Both are linked here, and the directory is
    // kept (in target/) since the linker records it as its library search
    // path. Without it, rustup's library path for the nightly still finds LLVM
    // whenever rustc runs the linker.
    let prefix = cmd::repo_root().join(format!("target/bpf-linker-llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("could not create {}", prefix_lib.display()))?;
    let versioned_name = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), versioned_name] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link).with_context(|| {
            format!("could not link {} to {}", link.display(), libllvm.display())
        })?;
    }

    step(&format!(
        "building bpf-linker against the nightly's LLVM {major} (about a minute)"
    ));
    let mut install = cargo();
    install
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .arg("--features")
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd::run(&mut install).with_context(|| {
        format!(
            "installing bpf-linker (with LLVM_PREFIX={}) failed",
            prefix.display()
        )
    })
}

/// Finds the nightly's libLLVM (`libLLVM.so.22.1-rust-…` or
/// `libLLVM-22-rust-….so`) and its major version.
fn find_libllvm(lib_dir: &Path) -> Result<(PathBuf, u32)> {
    let entries = std::fs::read_dir(lib_dir)
        .with_context(|| format!("could not list {}", lib_dir.display()))?;
    let mut found = None;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let version = name.strip_prefix("libLLVM.so.").or_else(|| {
            name.strip_prefix("libLLVM-")
                .filter(|_| name.ends_with(".so"))
        });
        let major = version.and_then(|v| {
            let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        if let Some(major) = major {
            // Prefer the `libLLVM.so.N…` name, the one the linker asks for.
            let preferred = name.starts_with("libLLVM.so.");
            if found.is_none() || preferred {
                found = Some((entry.path(), major));
            }
        }
    }
    found.with_context(|| {
        format!(
            "no libLLVM in the nightly toolchain's {}",
            lib_dir.display()
        )
    })
}

/// Builds the `rt-ebpf-trace` binary (release), which embeds the eBPF
/// object, and returns its path.
pub fn build_release_tracer(repo: &std::path::Path) -> Result<std::path::PathBuf> {
    crate::cmd::step("building the tracer");
    crate::cmd::run(
        crate::cmd::cargo()
            .args(["build", "--release", "-p", "rt-ebpf-trace"])
            .current_dir(repo),
    )?;
    Ok(repo.join("target/release/rt-ebpf-trace"))
}
