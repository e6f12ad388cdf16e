//! Unwinding and symbolizing the user stacks the tracer captures.
//!
//! The eBPF side records, at chosen moments, a thread's `rip`, `rsp`, `rbp`
//! and a copy of its stack from `rsp` up. Everything after that happens here,
//! after recording, off the hot path:
//!
//! 1. [`ProcessMaps`] says which file is mapped where (`maps`);
//! 2. [`Unwinder`] follows the DWARF CFI of those files to find the return
//!    addresses in the stack copy (`unwind`), since Rust code keeps no frame
//!    pointers;
//! 3. [`Symbolizer`] names each address, with inlined functions and source
//!    lines when DWARF is there (`symbolize`), found next to the binary or in
//!    a separate debug file (`debuginfo`).
//!
//! Unwinding needs the files as they were while recording: build the
//! [`Unwinder`] (which copies the unwind info) before the process exits.

mod debuginfo;
mod maps;
mod symbolize;
mod unwind;

pub use debuginfo::{DebugFile, DebugInfoLocator, is_c_library};
pub use maps::{Mapping, Module, ProcessMaps};
pub use symbolize::{Frame, Symbolizer};
pub use unwind::{CapturedStack, Unwinder};
