//! The eBPF side of rt-ebpf-trace: uprobes on tokio's task poll and worker
//! park functions, on its spawn, wake, task-end and unpark functions, on
//! waker clones inside a poll (where a task waits), and a CPU-sampling perf
//! event. Each probe filters on the target process, stamps the time and
//! thread, and writes one [`tracer_common::Event`] into the `EVENTS` ring
//! buffer; await points and samples also copy the user stack into `STACKS`.
//! Everything else (pairing starts with ends, naming tasks, unwinding,
//! writing traces) happens in user space, where it costs the target nothing.
//!
//! Every probe hit runs in the traced thread, so each program does as little
//! as it can: on the VM of BENCHMARKS.md a user-memory read or a hash-map
//! update costs ~150 ns, a ring-buffer record ~100–150 ns, a map lookup
//! ~50 ns (NOTES.md, "What a probe costs").
//!
//! The modules: [`config`] (what user space sets before loading), [`maps`]
//! (every map, declared once), [`emit`] (one event into the ring buffer),
//! [`task_id`] (reading tokio's task id), and one module per group of
//! programs: [`poll`], [`preempt`] (time preempted inside a poll), [`park`],
//! [`scheduler`] (spawn, wake, task end, unpark), [`stacks`] (await points
//! and CPU samples), and [`watch`] (the
//! always-on watch tier's own programs and maps, loaded without the others).
//! Maps, globals and programs are named after their identifiers, which are
//! the names in `tracer_common::names` (a test of the tracer checks the
//! built object).
#![no_std]
#![feature(asm_experimental_arch)]
#![no_main]
// aya-ebpf's map methods take `impl Borrow<K>`; passing the keys and values
// by value instead of by reference copies them on the 512-byte BPF stack
// first (measured: `await_point` grew from 190 to 198 instructions).
#![allow(clippy::needless_borrows_for_generic_args)]

mod block_on;
mod config;
mod emit;
mod maps;
mod park;
mod poll;
mod preempt;
mod scheduler;
mod stacks;
mod task_id;
mod watch;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
