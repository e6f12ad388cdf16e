//! Turns the tracer's raw ring-buffer events into something people can read.
//!
//! - [`timeline`] pairs start/end events into slices and keeps per-thread
//!   statistics. Pure logic, no I/O, so it is easy to test.
//! - [`chrome`] streams slices into a Chrome trace-event JSON file that the
//!   Perfetto UI (<https://ui.perfetto.dev>) opens.
//! - [`summary`] renders the short text report printed when recording ends.

pub mod chrome;
pub mod summary;
pub mod timeline;
