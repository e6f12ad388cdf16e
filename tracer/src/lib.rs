//! rt-ebpf-trace: trace the tokio runtime inside an unmodified, running Rust
//! binary with eBPF uprobes.
//!
//! This crate is the recording side; the pieces either side of it are crates
//! of their own:
//! - `tracer-probes` reads the target's ELF and decides where to attach (and
//!   what each polled task is called);
//! - [`record`] loads the eBPF programs, attaches them, and drains events;
//! - `tracer-timeline` turns events into slices, flows and counters and
//!   writes the trace (Perfetto protobuf or Chrome JSON) and the summary;
//! - [`serve`] hands the finished trace to the Perfetto UI (`--open`);
//! - `tracer-symbolize` unwinds the captured stacks and names their frames.
//!
//! [`dump`] is another command: the live tasks of a process and where each
//! waits, read from its memory; [`watch`] the always-on tier (no per-poll
//! probe, findings and a kept window, escalation to full detail).

pub mod clock;
pub mod dump;
pub mod output_file;
pub mod record;
pub mod serve;
pub mod watch;
