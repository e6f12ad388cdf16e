//! Turns the tracer's raw ring-buffer events into something people can read.
//!
//! - [`timeline`] pairs start/end events into slices, follows tasks (spawns,
//!   wakes, scheduling delay, ends), names threads and attributes CPU
//!   samples. Pure logic, no I/O, so it is easy to test. It produces
//!   [`output::TimelineOutput`]s: all of the trace's content.
//! - [`tasks`], [`counters`] and [`histogram`] are its parts: per-task
//!   bookkeeping, rate-limited counter tracks, delay percentiles.
//! - [`writer`] is the one interface to a file format; [`perfetto`] writes
//!   Perfetto's native protobuf (the default), [`json`] Chrome JSON through
//!   [`chrome`]. [`symbols`] holds the symbolized stacks they look up.
//! - [`watch`] composes the watch tier's kept window (off-CPU spans,
//!   findings, health, samples) into the same outputs.
//! - [`task_types`] names task types by probe site.
//! - [`summary`] renders the short text report printed when recording ends;
//!   [`findings`] decides what it flags (HOG, IMBALANCE) as typed values;
//!   `waits_summary` counts what each task type waited on.

pub mod chrome;
pub mod counters;
pub mod findings;
pub mod histogram;
#[cfg(test)]
mod hog_tests;
pub mod json;
pub mod output;
pub mod perfetto;
#[cfg(test)]
mod scheduler_tests;
pub mod summary;
pub mod summary_json;
pub mod symbols;
mod table;
#[cfg(test)]
mod task_tracker_tests;
pub mod task_types;
pub mod tasks;
#[cfg(test)]
mod test_util;
mod thread_index;
pub mod timeline;
mod type_table;
pub mod units;
mod waits_summary;
pub mod watch;
pub mod writer;

/// The hash map for maps looked up per event (task ids, tids, interned
/// strings): foldhash instead of std's SipHash, which was ~9 % of a `perf
/// record` of the render. Keys come from the traced process's events, not
/// from an attacker who could pick colliding keys to slow the tracer down
/// more than its events already can, and the fixed seed keeps renders
/// repeatable.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;
