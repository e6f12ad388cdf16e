//! Finds the eBPF object that the tracer embeds (`include_bytes!` of
//! `env!("TRACER_EBPF_OBJECT")`). It is built separately, for another target
//! and with the nightly toolchain, by `cargo xtask build-ebpf`; cargo cannot
//! build it as a dependency of this crate.

use std::path::{Path, PathBuf};

/// Where `cargo xtask build-ebpf` puts the object, relative to the repository.
const DEFAULT_OBJECT: &str = "target/bpf/bpfel-unknown-none/release/tracer-ebpf";

fn main() {
    println!("cargo::rerun-if-env-changed=TRACER_EBPF_OBJECT");

    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let repo = Path::new(&manifest_dir)
        .parent()
        .expect("tracer/ is inside the repository");
    // An override that is a relative path is taken from the repository root
    // (a build script runs in tracer/, which is not where anyone types it).
    let object = match std::env::var_os("TRACER_EBPF_OBJECT") {
        Some(path) => repo.join(PathBuf::from(path)),
        None => repo.join(DEFAULT_OBJECT),
    };

    // `include_bytes!` resolves relative paths against the including file, so
    // the path handed to it must be absolute.
    let object = match std::fs::canonicalize(&object) {
        Ok(path) if path.is_file() => path,
        _ => {
            println!(
                "cargo::error=the eBPF object {} is missing: run `cargo xtask build-ebpf` first",
                object.display()
            );
            return;
        }
    };

    println!("cargo::rerun-if-changed={}", object.display());
    println!("cargo::rustc-env=TRACER_EBPF_OBJECT={}", object.display());
}
