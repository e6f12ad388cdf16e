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

use std::ops::Range;

pub use debuginfo::{DebugFile, DebugInfoLocator};
pub use maps::{Mapping, Module, ProcessMaps};
pub use symbolize::{Frame, Symbolizer};
pub use unwind::{CapturedStack, Unwinder};

/// Puts back the return addresses that uretprobes replaced.
///
/// A uretprobe makes its function return into the kernel's `[uprobes]`
/// trampoline, so an unwound stack shows the trampoline where the real
/// caller was. Each address of `addresses` inside `trampoline` is replaced,
/// in order, by the next of `real_returns` (innermost first, as the probe
/// recorded them on function entry). Left as is when `real_returns` runs out.
///
/// Stacks unwound by [`Unwinder::unwind_through_uretprobes`] need no repair;
/// this is for stacks unwound elsewhere (or by [`Unwinder::unwind`], which
/// stops right after the trampoline).
pub fn restore_uretprobe_returns(
    addresses: &mut [u64],
    trampoline: Range<u64>,
    real_returns: &[u64],
) {
    let mut real_returns = real_returns.iter();
    for address in addresses.iter_mut().filter(|a| trampoline.contains(a)) {
        match real_returns.next() {
            Some(&real) => *address = real,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_trampoline_returns_in_order() {
        let trampoline = 0x7fff_ffff_e000..0x7fff_ffff_f000;
        let mut stack = [
            0x1000,
            0x7fff_ffff_e000,
            0x2000,
            0x7fff_ffff_e000,
            0x7fff_ffff_e000,
        ];
        restore_uretprobe_returns(&mut stack, trampoline, &[0xaaaa, 0xbbbb]);
        // The third trampoline frame has no real return left: kept as is.
        assert_eq!(stack, [0x1000, 0xaaaa, 0x2000, 0xbbbb, 0x7fff_ffff_e000]);
    }

    #[test]
    fn restore_leaves_other_addresses_alone() {
        let mut stack = [0x1000, 0x2000];
        restore_uretprobe_returns(&mut stack, 0x5000..0x6000, &[0xaaaa]);
        assert_eq!(stack, [0x1000, 0x2000]);
    }
}
