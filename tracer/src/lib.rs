//! rt-ebpf-trace: trace the tokio runtime inside an unmodified, running Rust
//! binary with eBPF uprobes.
//!
//! This crate is the recording side; the pieces either side of it are crates
//! of their own:
//! - `tracer-probes` reads the target's ELF and decides where to attach (and
//!   what each polled task is called);
//! - [`record`] loads the eBPF programs, attaches them, and drains events;
//! - `tracer-timeline` turns events into slices, flows and counters and
//!   writes the Perfetto-readable file and the summary;
//! - `tracer-symbolize` unwinds the captured stacks and names their frames.

pub mod record;
pub mod watch;
