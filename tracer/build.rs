//! Finds the eBPF object that the tracer embeds (`include_bytes!` of
//! `env!("TRACER_EBPF_OBJECT")`). It is built separately, for another target
//! and with the nightly toolchain, by `cargo xtask build-ebpf`; cargo cannot
//! build it as a dependency of this crate.
//!
//! Without the object (a fresh clone, an editor's `cargo check`) the crate
//! still builds, with a warning and `cfg(ebpf_object_missing)`: that tracer
//! lists probes (`rt-ebpf-trace probes`) but refuses to trace, saying to run
//! `cargo xtask build-ebpf`. Every `cargo xtask` command that runs the
//! tracer builds the object first.

use std::path::{Path, PathBuf};

/// Where `cargo xtask build-ebpf` puts the object, relative to the repository.
const DEFAULT_OBJECT: &str = "target/bpf/bpfel-unknown-none/release/tracer-ebpf";

fn main() {
    println!("cargo::rerun-if-env-changed=TRACER_EBPF_OBJECT");
    println!("cargo::rustc-check-cfg=cfg(ebpf_object_missing)");

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
    // Cargo reruns this script while a watched file is missing, so the
    // object is picked up as soon as it is built.
    println!("cargo::rerun-if-changed={}", object.display());

    // `include_bytes!` resolves relative paths against the including file, so
    // the path handed to it must be absolute.
    match std::fs::canonicalize(&object) {
        Ok(path) if path.is_file() => {
            println!("cargo::rustc-env=TRACER_EBPF_OBJECT={}", path.display());
        }
        _ => {
            println!(
                "cargo::warning=the eBPF object {} is missing: this rt-ebpf-trace can list \
                 probes but not trace; run `cargo xtask build-ebpf`, then build again",
                object.display()
            );
            println!("cargo::rustc-cfg=ebpf_object_missing");
        }
    }
}
