//! Where in a probed function the entry uprobe goes, and what it costs.
//!
//! A uprobe replaces one instruction with `int3`. When it fires, the kernel
//! runs the eBPF program and then has to execute the instruction it replaced.
//! For a few kinds of instruction it EMULATES that (it updates the saved
//! registers itself: ~0.3–0.6 µs per hit on the VM we measured on); for every
//! other kind it copies the instruction to a scratch page and SINGLE-STEPS it
//! there, a second trap (~11 µs per hit). On a function that runs once per
//! wake or spawn, that is the difference between noise and a slowed program.
//! Which instructions the kernel emulates is the table in `placement/cost.rs`
//! ([`cost_class`]); this module chooses among the instructions a probe may
//! go on.
//!
//! So an entry-only probe may move from the function's first instruction to a
//! cheaper one further on, as long as it still fires exactly once per call and
//! sees the same argument values. That holds for an instruction on the
//! function's *straight-line prefix* — the instructions from the entry up to
//! and including the first control-flow instruction, which every call runs in
//! order — provided that:
//! - no branch in the function lands inside the prefix at or before it (a loop
//!   head there would make it fire once per iteration), and
//! - no instruction before it writes a register the eBPF program reads there,
//!   nor (for programs that read the stack) moves RSP or stores to the stack.
//!
//! When the prefix offers no such instruction, a second strategy
//! (`placement/once.rs`) looks at the whole function. It decodes every instruction from
//! the symbol's start to its end, cuts them into basic blocks and builds the
//! control-flow graph, and takes the earliest emulated instruction `I` that
//! every call which returns runs exactly once, with the inputs intact:
//! - `I`'s block lies on every path from the entry to a *returning* exit
//!   (`ret`, or a tail call: a direct jump out of the function, or an
//!   indirect jump through a pointer just loaded from memory). Paths that end
//!   in a call that never returns (a panic) are left out: such a call gets no
//!   event, as a call that panics before the probe never did either;
//! - `I`'s block is in no cycle, so it runs at most once per call;
//! - no instruction on any path from the entry to `I` writes a register the
//!   program reads, and none of them is a call (the callee may overwrite
//!   every argument register); stack-reading programs don't use this
//!   strategy at all;
//! - no code the entry does not reach (other than NOP padding) leads to
//!   `I`: such code is entered some way the graph does not show, e.g. a
//!   landing pad, where unwinding resumes;
//! - if unwinding may resume in the function at all (its unwind info has an
//!   LSDA, or it has no unwind info), no call follows `I`: a call that
//!   unwinds to a landing pad is an edge the graph lacks and could lead back
//!   to `I`.
//!
//! Why that is safe: on a call that returns, control passes through `I`'s
//! block at least once (every returning path does) and at most once (no path
//! comes back to it), and enters it at its first instruction, so `I` runs
//! exactly once; the registers the program reads hold their entry values
//! there, because nothing on any way there writes them. Among such
//! instructions the earliest is taken, so the event's time stays close to
//! the call's. The candidates all lie on every returning path, always in the
//! same order (two seen in both orders would make a cycle), so "earliest" is
//! well defined. The cost: the event is recorded a little later than at the
//! entry, and not at all for a call that panics before reaching `I`.
//!
//! The analysis gives up (the probe stays where the prefix rule put it) on
//! anything it cannot account for: undecodable bytes, a branch into the
//! middle of an instruction, a call into the function's own body, an
//! indirect jump that may be a jump table, or an instruction with unusual
//! control flow (`int n`, far branches, `xbegin`, `iret`). A probe is only
//! ever put at the start of a decoded instruction reached along the graph's
//! edges from the entry, so it lands on a real instruction boundary. It
//! assumes what the prefix rule assumes too: control only enters the
//! function at its start (and at the return addresses of its own calls).
//!
//! A site with a return probe cannot move: the uretprobe's entry breakpoint
//! must be the function's first instruction, because it swaps the return
//! address at `[rsp]`, which is only there before the prologue runs.

mod cost;
mod once;

pub use cost::{Cost, cost_class};

use iced_x86::{FlowControl, Instruction, InstructionInfoFactory, OpAccess, Register};

use crate::disasm::format_instruction;

/// What the eBPF program attached at a site reads from the probed thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeInputs {
    /// Registers read (full 64-bit registers, e.g. `Register::RDI`).
    pub registers: &'static [Register],
    /// Reads memory at or above RSP (e.g. the caller's address at `[rsp]`).
    pub reads_stack: bool,
}

impl ProbeInputs {
    pub const NOTHING: ProbeInputs = ProbeInputs {
        registers: &[],
        reads_stack: false,
    };
}

/// What a function's bytes don't say about it, which placement beyond the
/// straight-line prefix needs.
#[derive(Clone, Copy)]
pub struct FunctionContext<'a> {
    /// Does the function at this address never return (e.g. a panic
    /// function)? A direct call to it ends its path in the function.
    pub never_returns: &'a dyn Fn(u64) -> bool,
    /// May an unwinding panic resume inside the function, at a landing pad?
    /// True when its unwind info has an LSDA, or when it has no unwind info.
    pub has_landing_pads: bool,
}

fn no_function_known(_address: u64) -> bool {
    false
}

impl FunctionContext<'static> {
    /// Nothing known: no call is known to diverge, and landing pads may exist.
    pub const UNKNOWN: FunctionContext<'static> = FunctionContext {
        never_returns: &no_function_known,
        has_landing_pads: true,
    };
}

/// Does the function with this demangled, generic-free path (e.g.
/// `core::panicking::panic`) never return? Rust's panic entry points and the
/// failure paths of `unwrap`, indexing and allocation: all declared `-> !`.
/// (Not all of `std::panicking`: `std::panicking::try` returns.)
pub fn is_panic_function(path: &str) -> bool {
    const NEVER_RETURN: [&str; 24] = [
        "std::panicking::begin_panic",
        "std::panicking::begin_panic_handler",
        "std::panicking::rust_panic_with_hook",
        "std::panicking::rust_panic",
        "std::panic::panic_any",
        "std::panic::resume_unwind",
        "std::process::abort",
        "std::process::exit",
        "alloc::alloc::handle_alloc_error",
        "alloc::raw_vec::capacity_overflow",
        "alloc::raw_vec::handle_error",
        "core::option::unwrap_failed",
        "core::option::expect_failed",
        "core::result::unwrap_failed",
        "core::slice::index::slice_start_index_len_fail",
        "core::slice::index::slice_end_index_len_fail",
        "core::slice::index::slice_index_order_fail",
        "core::slice::index::slice_start_index_overflow_fail",
        "core::slice::index::slice_end_index_overflow_fail",
        "core::str::slice_error_fail",
        "core::cell::panic_already_borrowed",
        "core::cell::panic_already_mutably_borrowed",
        "_Unwind_Resume",
        "abort",
    ];
    (path.starts_with("core::panicking::") && !path.contains("{{closure}}"))
        || NEVER_RETURN.contains(&path)
}

/// Which rule chose a site's probed instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The function's first instruction: a return-probed site, one whose
    /// first instruction is emulated already, or nothing cheaper was safe.
    FirstInstruction,
    /// An emulated instruction on the straight-line prefix.
    StraightLinePrefix,
    /// An emulated instruction further on that every returning call runs
    /// exactly once (see the module doc).
    RunsOncePerCall,
}

/// Where a site's entry probe goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Virtual address of the probed instruction.
    pub address: u64,
    /// That instruction in Intel syntax; "?" if it did not decode.
    pub instruction: String,
    pub cost: Cost,
    /// Which rule chose it.
    pub strategy: Strategy,
}

/// Decodes the function's straight-line prefix: from `address` up to and
/// including the first control-flow instruction, or up to the end of `code`
/// or the first undecodable bytes.
pub fn straight_line_prefix(code: &[u8], address: u64) -> Vec<Instruction> {
    let mut prefix = Vec::new();
    for instruction in crate::disasm::instructions(code, address) {
        let ends_prefix = instruction.flow_control() != FlowControl::Next;
        prefix.push(instruction);
        if ends_prefix {
            break;
        }
    }
    prefix
}

/// The targets of the direct branches in `code` (one whole function at
/// `address`) that land inside it.
pub fn branch_targets_inside(code: &[u8], address: u64) -> Vec<u64> {
    let inside = address..address + code.len() as u64;
    crate::disasm::near_branch_targets(code, address)
        .filter(|target| inside.contains(target))
        .collect()
}

/// Does running `instruction` change something the eBPF program reads: one of
/// its registers (any part of it: writing EDI changes RDI), or, for a program
/// that reads the stack, RSP or memory addressed from RSP?
pub fn clobbers(instruction: &Instruction, inputs: ProbeInputs) -> bool {
    let mut factory = InstructionInfoFactory::new();
    let info = factory.info(instruction);
    let writes_input_register = info.used_registers().iter().any(|used| {
        writes(used.access())
            && inputs
                .registers
                .iter()
                .any(|&read| used.register().full_register() == read.full_register())
    });
    if writes_input_register {
        return true;
    }
    if !inputs.reads_stack {
        return false;
    }
    let moves_rsp = info
        .used_registers()
        .iter()
        .any(|used| writes(used.access()) && used.register().full_register() == Register::RSP);
    let stores_to_stack = info
        .used_memory()
        .iter()
        .any(|memory| writes(memory.access()) && memory.base().full_register() == Register::RSP);
    moves_rsp || stores_to_stack
}

/// Does this operand access change the operand?
pub(crate) fn writes(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// Does running `instruction` change any part of `register`'s full register?
pub(crate) fn writes_register(instruction: &Instruction, register: Register) -> bool {
    let mut factory = InstructionInfoFactory::new();
    factory
        .info(instruction)
        .used_registers()
        .iter()
        .any(|used| {
            writes(used.access()) && used.register().full_register() == register.full_register()
        })
}

/// Chooses where the entry probe of the function `code` (its whole body,
/// starting at virtual `address`) goes. A site that `may_move` gets the first
/// emulated instruction of the straight-line prefix that is safe for
/// `inputs`; failing that, the earliest emulated instruction that every
/// returning call runs exactly once with `inputs` intact (see the module
/// doc); failing that, or if it may not move, the first instruction.
/// Returns `None` if the first instruction does not decode.
pub fn place_entry(
    code: &[u8],
    address: u64,
    inputs: ProbeInputs,
    may_move: bool,
    context: &FunctionContext,
) -> Option<Placement> {
    let prefix = straight_line_prefix(code, address);
    let first = *prefix.first()?;
    let (chosen, strategy) = if may_move {
        let targets = branch_targets_inside(code, address);
        if let Some(&instruction) = first_safe_emulated(&prefix, &targets, inputs) {
            (instruction, Strategy::StraightLinePrefix)
        } else if let Some(instruction) = once::runs_once_per_call(code, address, inputs, context) {
            (instruction, Strategy::RunsOncePerCall)
        } else {
            (first, Strategy::FirstInstruction)
        }
    } else {
        (first, Strategy::FirstInstruction)
    };
    // The first instruction is where the probe already is.
    let strategy = if chosen.ip() == address {
        Strategy::FirstInstruction
    } else {
        strategy
    };
    Some(Placement {
        address: chosen.ip(),
        instruction: format_instruction(&chosen),
        cost: cost_class(&chosen),
        strategy,
    })
}

/// The first emulated instruction of `prefix` that only the entry reaches by
/// falling through and before which nothing clobbers `inputs`.
fn first_safe_emulated<'a>(
    prefix: &'a [Instruction],
    branch_targets: &[u64],
    inputs: ProbeInputs,
) -> Option<&'a Instruction> {
    for (index, instruction) in prefix.iter().enumerate() {
        // A branch landing here (a loop head) would fire the probe again.
        if index > 0 && branch_targets.contains(&instruction.ip()) {
            return None;
        }
        // The probe fires before its instruction runs, so the instruction
        // itself may clobber the inputs; only the ones before it must not.
        if cost_class(instruction) == Cost::Emulated {
            return Some(instruction);
        }
        if clobbers(instruction, inputs) {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const RDI_ONLY: ProbeInputs = ProbeInputs {
        registers: &[Register::RDI],
        reads_stack: false,
    };
    const STACK_ONLY: ProbeInputs = ProbeInputs {
        registers: &[],
        reads_stack: true,
    };

    pub(super) fn decode_one(bytes: &[u8]) -> Instruction {
        let instruction =
            iced_x86::Decoder::with_ip(64, bytes, 0x1000, iced_x86::DecoderOptions::NONE).decode();
        assert!(!instruction.is_invalid(), "{bytes:02x?} did not decode");
        assert_eq!(
            instruction.len(),
            bytes.len(),
            "{bytes:02x?} is not one instruction"
        );
        instruction
    }

    #[test]
    fn prefix_ends_with_the_first_control_flow_instruction() {
        // push rbx; mov rbx,rdi; call +0; test al,al; ret
        let code = [0x53, 0x48, 0x89, 0xFB, 0xE8, 0, 0, 0, 0, 0x84, 0xC0, 0xC3];
        let prefix = straight_line_prefix(&code, 0x1000);
        let addresses: Vec<u64> = prefix.iter().map(Instruction::ip).collect();
        assert_eq!(addresses, [0x1000, 0x1001, 0x1004]);
    }

    #[test]
    fn writes_to_any_part_of_a_read_register_clobber_it() {
        let writes_edi = decode_one(&[0x31, 0xFF]); // xor edi,edi
        let writes_dil = decode_one(&[0x40, 0xB7, 0x01]); // mov dil,1
        let reads_rdi = decode_one(&[0x48, 0x8B, 0x07]); // mov rax,[rdi]
        let moves_rsp = decode_one(&[0x48, 0x83, 0xEC, 0x18]); // sub rsp,18h
        let push = decode_one(&[0x53]); // push rbx
        let stack_store = decode_one(&[0x48, 0x89, 0x3C, 0x24]); // mov [rsp],rdi
        assert!(clobbers(&writes_edi, RDI_ONLY));
        assert!(clobbers(&writes_dil, RDI_ONLY));
        assert!(!clobbers(&reads_rdi, RDI_ONLY));
        assert!(!clobbers(&moves_rsp, RDI_ONLY));
        assert!(clobbers(&moves_rsp, STACK_ONLY));
        assert!(clobbers(&push, STACK_ONLY));
        assert!(clobbers(&stack_store, STACK_ONLY));
        assert!(!clobbers(&reads_rdi, STACK_ONLY));
        assert!(!clobbers(&moves_rsp, ProbeInputs::NOTHING));
    }

    /// `sub rsp,18h; mov rax,[rdi]; lea rcx,[rsp+8]; call +0; ret`.
    const WAKE_LIKE: [u8; 18] = [
        0x48, 0x83, 0xEC, 0x18, 0x48, 0x8B, 0x07, 0x48, 0x8D, 0x4C, 0x24, 0x08, 0xE8, 0, 0, 0, 0,
        0xC3,
    ];

    #[test]
    fn entry_only_probe_moves_to_the_call_when_rdi_survives() {
        let placement = place_entry(
            &WAKE_LIKE,
            0x1000,
            RDI_ONLY,
            true,
            &FunctionContext::UNKNOWN,
        )
        .unwrap();
        assert_eq!(placement.address, 0x100C);
        assert_eq!(placement.cost, Cost::Emulated);
        assert_eq!(placement.instruction, "call 1011h");
    }

    #[test]
    fn return_probed_sites_stay_on_the_first_instruction() {
        let placement = place_entry(
            &WAKE_LIKE,
            0x1000,
            RDI_ONLY,
            false,
            &FunctionContext::UNKNOWN,
        )
        .unwrap();
        assert_eq!(placement.address, 0x1000);
        assert_eq!(placement.cost, Cost::SingleStep);
        assert_eq!(placement.instruction, "sub rsp,18h");
    }

    #[test]
    fn stack_reading_probe_cannot_pass_an_rsp_change() {
        let placement = place_entry(
            &WAKE_LIKE,
            0x1000,
            STACK_ONLY,
            true,
            &FunctionContext::UNKNOWN,
        )
        .unwrap();
        assert_eq!(placement.address, 0x1000);
        assert_eq!(placement.cost, Cost::SingleStep);
    }

    #[test]
    fn probe_does_not_pass_a_write_to_its_register() {
        // mov rax,[rdi]; mov rdi,rax; call +0
        let code = [0x48, 0x8B, 0x07, 0x48, 0x89, 0xC7, 0xE8, 0, 0, 0, 0];
        let placement =
            place_entry(&code, 0x1000, RDI_ONLY, true, &FunctionContext::UNKNOWN).unwrap();
        assert_eq!(placement.address, 0x1000);
        // But a probe that reads nothing may.
        let placement = place_entry(
            &code,
            0x1000,
            ProbeInputs::NOTHING,
            true,
            &FunctionContext::UNKNOWN,
        )
        .unwrap();
        assert_eq!(placement.address, 0x1006);
    }

    #[test]
    fn probe_does_not_pass_a_loop_head() {
        // 1000: mov rax,[rdi]
        // 1003: mov rcx,rax        <- loop head, target of the jne below
        // 1006: je 100Ah
        // 1008: jne 1003h
        // 100A: ret
        let code = [
            0x48, 0x8B, 0x07, 0x48, 0x89, 0xC1, 0x74, 0x02, 0x75, 0xF9, 0xC3,
        ];
        assert!(branch_targets_inside(&code, 0x1000).contains(&0x1003));
        let placement =
            place_entry(&code, 0x1000, RDI_ONLY, true, &FunctionContext::UNKNOWN).unwrap();
        assert_eq!(placement.address, 0x1000);
        assert_eq!(placement.cost, Cost::SingleStep);
    }

    #[test]
    fn an_emulated_first_instruction_stays() {
        // push rbx; mov rbx,rdi; call +0
        let code = [0x53, 0x48, 0x89, 0xFB, 0xE8, 0, 0, 0, 0];
        let placement =
            place_entry(&code, 0x1000, RDI_ONLY, true, &FunctionContext::UNKNOWN).unwrap();
        assert_eq!(placement.address, 0x1000);
        assert_eq!(placement.cost, Cost::Emulated);
        assert_eq!(placement.instruction, "push rbx");
    }

    #[test]
    fn undecodable_entry_gives_none() {
        assert_eq!(
            place_entry(&[0x0F], 0x1000, RDI_ONLY, true, &FunctionContext::UNKNOWN),
            None
        );
    }
}
