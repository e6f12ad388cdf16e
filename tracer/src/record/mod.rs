//! Recording: from "trace this process" to a finished trace file.
//!
//! The steps, in order: check privileges and kernel ([`preflight`]); find or
//! launch the process ([`target`], [`launch`]); find its probe sites
//! (`tracer_probes`); open the output; load and attach the eBPF programs
//! ([`loader`]); drain events until told to stop ([`session`], [`drain`]),
//! into a spill file ([`spill`]) with the stacks unwound as they come and the
//! binary's symbols loaded on the side ([`symbol_prep`]); then symbolize the
//! stacks ([`stacks`]) and render the trace from the spill
//! file in one pass ([`sink`]) into the output ([`trace_file`]).

mod await_chain;
pub mod detach;
pub mod drain;
pub mod launch;
pub mod loader;
#[cfg(test)]
mod object_names;
pub mod preflight;
pub mod session;
pub mod sink;
pub mod spill;
mod spill_codec;
pub mod stacks;
pub mod status;
mod symbol_prep;
pub mod target;
pub mod trace_file;
pub mod trace_size;
mod waits_on;

pub use loader::Settings;
pub use session::{Mode, Outcome, RecordOptions, StopReason, TargetSpec, record};
