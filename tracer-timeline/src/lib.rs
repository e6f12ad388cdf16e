//! Turns the tracer's raw ring-buffer events into something people can read.
//!
//! - [`timeline`] pairs start/end events into slices, follows tasks (spawns,
//!   wakes, scheduling delay, ends) and keeps statistics. Pure logic, no
//!   I/O, so it is easy to test. It produces [`output::TimelineOutput`]s.
//! - [`tasks`], [`counters`] and [`histogram`] are its parts: per-task
//!   bookkeeping, rate-limited counter tracks, delay percentiles.
//! - [`render`] turns timeline outputs into Chrome trace events, which
//!   [`chrome`] streams into a JSON file that the Perfetto UI
//!   (<https://ui.perfetto.dev>) opens.
//! - [`task_types`] names task types by probe site.
//! - [`summary`] renders the short text report printed when recording ends.

pub mod chrome;
pub mod counters;
pub mod histogram;
pub mod output;
pub mod render;
#[cfg(test)]
mod scheduler_tests;
pub mod summary;
pub mod task_types;
pub mod tasks;
#[cfg(test)]
mod test_util;
pub mod timeline;
