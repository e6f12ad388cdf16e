//! What the tests share, as one crate (a dev-dependency of the crates
//! whose tests use it; `xtask` takes the fixture profiles from it):
//!
//! - [`fixtures`]: the fixture programs (`tests/fixtures`) and the one list
//!   of the profiles they are built in;
//! - [`trace`]: running the tracer under test, taking turns, and reading
//!   back the trace it wrote (Perfetto traces through `check_pftrace.py`).

pub mod fixtures;
pub mod trace;

pub use fixtures::{Profile, fixture, fixture_variant, repo_root};
