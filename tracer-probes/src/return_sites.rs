//! Where `tokio::runtime::task::raw::poll::<T, S>` returns to: the places
//! an entry-style uprobe can mark the end of a poll, instead of a uretprobe
//! on `raw::poll` (which costs more on the kernels we measured).
//!
//! `raw::poll` is only ever called through the task vtable: `RawTask::poll`
//! does `(header.vtable.poll)(ptr)`, where `vtable` is the pointer at
//! `vtable_offset` in tokio's task `Header` and `poll` is the vtable's first
//! field. After inlining, every caller looks like
//!
//! ```text
//! mov rax,[r15+0x10] ; mov rdi,r15 ; call qword ptr [rax]
//! ```
//!
//! possibly with other instructions in between, or with the header copied
//! through another register first. [`poll_call_sites`] finds such calls by
//! a small forward symbolic evaluation over the instructions before each
//! `call qword ptr [R]`: it accepts the call iff R holds the value loaded
//! from `[S + vtable_offset]` and RDI holds `S` itself, for the same `S`.
//! Other indirect calls through a loaded pointer (a waker's vtable:
//! `mov rax,[X+0x10] ; mov rdi,[X+0x8] ; call [rax]`, or a vtable slot
//! other than the first) fail that test.
//!
//! The evaluation only looks back over instructions every path to the call
//! runs: it stops at a branch target inside the function (code before a join
//! point might not have run on the path that reached the call) and after an
//! instruction that never falls through (`jmp`, `ret`, `ud2`: the code after
//! it is entered from somewhere else).
//!
//! [`place_return_probe`] then chooses the instruction to probe after each
//! call: the first one the kernel emulates on the straight-line run from the
//! return address, provided nothing before it moves RSP (the eBPF program
//! compares RSP with the poll's entry RSP + 8 there) and no branch lands
//! between the return address and it (another path would hit the probe). If
//! none qualifies, the return address itself, single-stepped.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use iced_x86::{Code, FlowControl, Instruction, InstructionInfoFactory, OpKind, Register};

use crate::disasm::format_instruction;
use crate::placement::{Cost, branch_targets_inside, cost_class, writes, writes_register};

/// How many decoded instructions before a call the evaluation looks at.
pub const WINDOW: usize = 16;

/// The registers a call may overwrite (System V x86-64).
const CALLER_SAVED: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

/// A symbolic 64-bit value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    /// What the register held when the window began.
    Initial(Register),
    /// The 8 bytes loaded from `[base + displacement]`.
    Load(Rc<Value>, i64),
    /// Something the evaluation does not follow; equal only to itself.
    Unknown(usize),
}

/// The registers' symbolic values along the window.
struct State {
    values: HashMap<Register, Value>,
    next_unknown: usize,
}

impl State {
    fn new() -> Self {
        State {
            values: HashMap::new(),
            next_unknown: 0,
        }
    }

    fn get(&self, register: Register) -> Value {
        self.values
            .get(&register)
            .cloned()
            .unwrap_or(Value::Initial(register))
    }

    fn forget(&mut self, register: Register) {
        let unknown = Value::Unknown(self.next_unknown);
        self.next_unknown += 1;
        self.values.insert(register, unknown);
    }

    fn step(&mut self, instruction: &Instruction, factory: &mut InstructionInfoFactory) {
        if let Some((destination, value)) = self.tracked_move(instruction) {
            self.values.insert(destination, value);
            return;
        }
        let written: Vec<Register> = factory
            .info(instruction)
            .used_registers()
            .iter()
            .filter(|used| writes(used.access()))
            .map(|used| used.register().full_register())
            .collect();
        for register in written {
            self.forget(register);
        }
        if matches!(
            instruction.flow_control(),
            FlowControl::Call | FlowControl::IndirectCall
        ) {
            for register in CALLER_SAVED {
                self.forget(register);
            }
        }
    }

    /// `mov r64, r64` and `mov r64, qword ptr [B + d]`: the destination and
    /// its new value.
    fn tracked_move(&self, instruction: &Instruction) -> Option<(Register, Value)> {
        if !matches!(instruction.code(), Code::Mov_r64_rm64 | Code::Mov_rm64_r64)
            || instruction.op0_kind() != OpKind::Register
        {
            return None;
        }
        let destination = instruction.op0_register();
        match instruction.op1_kind() {
            OpKind::Register => Some((destination, self.get(instruction.op1_register()))),
            OpKind::Memory if plain_memory_operand(instruction) => {
                let base = self.get(instruction.memory_base());
                let displacement = instruction.memory_displacement64() as i64;
                Some((destination, Value::Load(Rc::new(base), displacement)))
            }
            _ => None,
        }
    }
}

/// `[B + d]`: a 64-bit general base register (not RIP), no index, no
/// segment override.
fn plain_memory_operand(instruction: &Instruction) -> bool {
    let base = instruction.memory_base();
    base.is_gpr64()
        && instruction.memory_index() == Register::None
        && instruction.segment_prefix() == Register::None
}

/// `call qword ptr [R]`: the register R, if `instruction` is one.
fn indirect_call_register(instruction: &Instruction) -> Option<Register> {
    let is_one = instruction.code() == Code::Call_rm64
        && instruction.op0_kind() == OpKind::Memory
        && plain_memory_operand(instruction)
        && instruction.memory_displacement64() == 0;
    is_one.then(|| instruction.memory_base())
}

/// Does execution never continue with the next instruction after this one?
fn never_falls_through(instruction: &Instruction) -> bool {
    matches!(
        instruction.flow_control(),
        FlowControl::Return
            | FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Interrupt
            | FlowControl::Exception
    )
}

/// Is the call at `instructions[index]` a call of the task vtable's `poll`?
fn is_vtable_poll_call(
    instructions: &[Instruction],
    index: usize,
    targets: &HashSet<u64>,
    vtable_offset: u64,
    factory: &mut InstructionInfoFactory,
) -> bool {
    let Some(register) = indirect_call_register(&instructions[index]) else {
        return false;
    };
    // The window: back from the call, at most WINDOW instructions, keeping a
    // branch target but nothing before it, and nothing up to an instruction
    // that never falls through.
    let mut start = index;
    while start > 0 && index - start < WINDOW {
        if targets.contains(&instructions[start].ip()) {
            break;
        }
        if never_falls_through(&instructions[start - 1]) {
            break;
        }
        start -= 1;
    }
    let mut state = State::new();
    for instruction in &instructions[start..index] {
        state.step(instruction, factory);
    }
    let header = state.get(Register::RDI);
    state.get(register) == Value::Load(Rc::new(header), vtable_offset as i64)
}

/// The addresses of the calls in `code` (one whole function at `address`)
/// that call a task's `raw::poll` through its vtable, the vtable pointer
/// being at `vtable_offset` in the task header. In address order.
pub fn poll_call_sites(code: &[u8], address: u64, vtable_offset: u64) -> Vec<u64> {
    let instructions: Vec<Instruction> = crate::disasm::instructions(code, address).collect();
    let targets = branch_targets(&instructions, code, address);
    poll_calls_in(&instructions, &targets, vtable_offset)
        .into_iter()
        .map(|index| instructions[index].ip())
        .collect()
}

/// The direct branch targets inside the function, or none at all when it
/// has no indirect call (then there is nothing to look for, and decoding
/// it again for its branches would be wasted).
fn branch_targets(instructions: &[Instruction], code: &[u8], address: u64) -> HashSet<u64> {
    if !instructions
        .iter()
        .any(|instruction| indirect_call_register(instruction).is_some())
    {
        return HashSet::new();
    }
    branch_targets_inside(code, address).into_iter().collect()
}

/// The indices of the vtable `poll` calls among `instructions`.
fn poll_calls_in(
    instructions: &[Instruction],
    targets: &HashSet<u64>,
    vtable_offset: u64,
) -> Vec<usize> {
    let mut factory = InstructionInfoFactory::new();
    (0..instructions.len())
        .filter(|&index| {
            is_vtable_poll_call(instructions, index, targets, vtable_offset, &mut factory)
        })
        .collect()
}

/// Where the probe after one poll call goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReturnPlacement {
    pub call_address: u64,
    /// The instruction after the call.
    pub return_address: u64,
    /// The probed instruction.
    pub address: u64,
    pub instruction: String,
    pub cost: Cost,
}

/// The poll calls of `code` (one whole function at `address`) and where
/// the probe after each goes (see the module doc).
pub fn poll_returns(code: &[u8], address: u64, vtable_offset: u64) -> Vec<ReturnPlacement> {
    let instructions: Vec<Instruction> = crate::disasm::instructions(code, address).collect();
    let targets = branch_targets(&instructions, code, address);
    poll_calls_in(&instructions, &targets, vtable_offset)
        .into_iter()
        .filter_map(|index| place_after(&instructions, index, &targets))
        .collect()
}

/// The probe after the call at `instructions[call]`; `None` if nothing
/// decodes after it.
fn place_after(
    instructions: &[Instruction],
    call: usize,
    targets: &HashSet<u64>,
) -> Option<ReturnPlacement> {
    let returned = instructions.get(call + 1)?;
    let mut chosen = returned;
    for (position, instruction) in instructions[call + 1..].iter().enumerate() {
        // Another path could land here (the return address itself is where
        // the call comes back to anyway).
        if position > 0 && targets.contains(&instruction.ip()) {
            break;
        }
        if cost_class(instruction) == Cost::Emulated {
            chosen = instruction;
            break;
        }
        if writes_register(instruction, Register::RSP)
            || instruction.flow_control() != FlowControl::Next
        {
            break;
        }
    }
    Some(ReturnPlacement {
        call_address: instructions[call].ip(),
        return_address: returned.ip(),
        address: chosen.ip(),
        instruction: format_instruction(chosen),
        cost: cost_class(chosen),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VTABLE: u64 = 0x10;
    const BASE: u64 = 0x1000;

    /// Assembles `parts` back to back; returns the code and each part's address.
    fn assemble(parts: &[&[u8]]) -> (Vec<u8>, Vec<u64>) {
        let mut code = Vec::new();
        let mut addresses = Vec::new();
        for part in parts {
            addresses.push(BASE + code.len() as u64);
            code.extend_from_slice(part);
        }
        (code, addresses)
    }

    // The instructions of the patterns (Intel syntax).
    const MOV_RAX_R15_10: &[u8] = &[0x49, 0x8B, 0x47, 0x10]; // mov rax,[r15+10h]
    const MOV_RDI_R15: &[u8] = &[0x4C, 0x89, 0xFF]; // mov rdi,r15
    const MOV_RAX_R12_10: &[u8] = &[0x49, 0x8B, 0x44, 0x24, 0x10]; // mov rax,[r12+10h]
    const MOV_RDI_R12: &[u8] = &[0x4C, 0x89, 0xE7]; // mov rdi,r12
    const MOV_RAX_R14_10: &[u8] = &[0x49, 0x8B, 0x46, 0x10]; // mov rax,[r14+10h]
    const MOV_RDI_R14: &[u8] = &[0x4C, 0x89, 0xF7]; // mov rdi,r14
    const CALL_RAX: &[u8] = &[0xFF, 0x10]; // call qword ptr [rax]
    const CMP_RBX_8_0: &[u8] = &[0x48, 0x83, 0x7B, 0x08, 0x00]; // cmp qword ptr [rbx+8],0
    const JNE_REL32: &[u8] = &[0x0F, 0x85, 0x00, 0x01, 0x00, 0x00]; // jne +100h
    const INC_R13: &[u8] = &[0x49, 0xFF, 0xC5]; // inc r13
    const CMP_R13_RBP: &[u8] = &[0x49, 0x39, 0xED]; // cmp r13,rbp
    const JE_REL8: &[u8] = &[0x74, 0x10]; // je +10h
    const CMP_BPL_2: &[u8] = &[0x40, 0x80, 0xFD, 0x02]; // cmp bpl,2
    const RET: &[u8] = &[0xC3];

    fn calls(code: &[u8]) -> Vec<u64> {
        poll_call_sites(code, BASE, VTABLE)
    }

    #[test]
    fn multi_thread_run_task_call_is_found_and_probed_at_its_jne() {
        let (code, at) = assemble(&[
            MOV_RAX_R15_10,
            MOV_RDI_R15,
            CALL_RAX,
            CMP_RBX_8_0,
            JNE_REL32,
            RET,
        ]);
        let returns = poll_returns(&code, BASE, VTABLE);
        assert_eq!(
            returns,
            [ReturnPlacement {
                call_address: at[2],
                return_address: at[3],
                address: at[4],
                instruction: format!("jne {:X}h", at[5] + 0x100),
                cost: Cost::Emulated,
            }]
        );
    }

    #[test]
    fn lifo_slot_call_is_probed_past_inc_and_cmp() {
        let (code, at) = assemble(&[
            MOV_RAX_R12_10,
            MOV_RDI_R12,
            CALL_RAX,
            INC_R13,
            CMP_R13_RBP,
            JE_REL8,
            RET,
        ]);
        let returns = poll_returns(&code, BASE, VTABLE);
        assert_eq!(returns.len(), 1);
        assert_eq!(returns[0].call_address, at[2]);
        assert_eq!(returns[0].return_address, at[3]);
        assert_eq!(returns[0].address, at[5]);
        assert_eq!(returns[0].cost, Cost::Emulated);
    }

    #[test]
    fn current_thread_call_is_found() {
        let (code, at) = assemble(&[
            MOV_RAX_R14_10,
            MOV_RDI_R14,
            CALL_RAX,
            CMP_BPL_2,
            JE_REL8,
            RET,
        ]);
        assert_eq!(calls(&code), [at[2]]);
        assert_eq!(poll_returns(&code, BASE, VTABLE)[0].address, at[4]);
    }

    #[test]
    fn blocking_pool_call_through_a_copy_is_found() {
        let (code, at) = assemble(&[
            &[0x49, 0x89, 0xC5],                               // mov r13,rax
            &[0xF0, 0x49, 0xFF, 0x8E, 0xF8, 0x03, 0x00, 0x00], // lock dec qword ptr [r14+3F8h]
            &[0x48, 0x8B, 0x40, 0x10],                         // mov rax,[rax+10h]
            &[0x4C, 0x89, 0xEF],                               // mov rdi,r13
            CALL_RAX,
            &[0x48, 0xC7, 0xC0, 0xC0, 0xFF, 0xFF, 0xFF], // mov rax,-40h
            &[0xF0, 0x49, 0x0F, 0xC1, 0x06],             // lock xadd [r14],rax
            RET,
        ]);
        assert_eq!(calls(&code), [at[4]]);
        // Nothing emulated before the ret ends the run: the return address,
        // single-stepped.
        let returns = poll_returns(&code, BASE, VTABLE);
        assert_eq!(returns[0].address, at[5]);
        assert_eq!(returns[0].cost, Cost::SingleStep);
    }

    #[test]
    fn the_other_calls_of_the_window_do_not_confuse_it() {
        // A direct call earlier clobbers rax and rdi, but the loads come after.
        let (code, at) = assemble(&[
            &[0xE8, 0x00, 0x10, 0x00, 0x00], // call +1000h (outside)
            &[0x48, 0x89, 0xC3],             // mov rbx,rax
            &[0x48, 0x8B, 0x43, 0x10],       // mov rax,[rbx+10h]
            &[0x48, 0x89, 0xDF],             // mov rdi,rbx
            CALL_RAX,
            RET,
        ]);
        assert_eq!(calls(&code), [at[4]]);
        // A call between the loads and the poll call clobbers rax.
        let (code, _) = assemble(&[
            MOV_RAX_R15_10,
            MOV_RDI_R15,
            &[0xE8, 0x00, 0x10, 0x00, 0x00], // call +1000h (outside)
            CALL_RAX,
            RET,
        ]);
        assert_eq!(calls(&code), [] as [u64; 0]);
    }

    #[test]
    fn waker_vtable_call_is_rejected() {
        let (code, _) = assemble(&[
            &[0x49, 0x8B, 0x47, 0x10], // mov rax,[r15+10h]
            &[0x49, 0x8B, 0x7F, 0x08], // mov rdi,[r15+8]
            CALL_RAX,
            RET,
        ]);
        assert_eq!(calls(&code), [] as [u64; 0]);
    }

    #[test]
    fn dealloc_call_through_a_later_slot_is_rejected() {
        let (code, _) = assemble(&[
            MOV_RAX_R15_10,
            &[0x48, 0x83, 0xC0, 0x10], // add rax,10h
            MOV_RDI_R15,
            CALL_RAX,
            RET,
        ]);
        assert_eq!(calls(&code), [] as [u64; 0]);
        // Nor `call [rax+10h]`: not the vtable's first field.
        let (code, _) = assemble(&[MOV_RAX_R15_10, MOV_RDI_R15, &[0xFF, 0x50, 0x10], RET]);
        assert_eq!(calls(&code), [] as [u64; 0]);
    }

    #[test]
    fn a_write_to_part_of_rdi_is_not_a_copy() {
        let (code, _) = assemble(&[
            MOV_RAX_R15_10,
            &[0x44, 0x89, 0xFF], // mov edi,r15d
            CALL_RAX,
            RET,
        ]);
        assert_eq!(calls(&code), [] as [u64; 0]);
    }

    #[test]
    fn the_window_stops_at_a_branch_target() {
        // 1000: mov rax,[r15+10h]
        // 1004: mov rdi,r15
        // 1007: call [rax]      ; a loop head: on the second pass, rax and
        //                       ; rdi hold whatever the callee left
        // 1009: jne 1007h
        // 100B: ret
        let (code, at) = assemble(&[
            MOV_RAX_R15_10,
            MOV_RDI_R15,
            CALL_RAX,
            &[0x75, 0xFC], // jne -4
            RET,
        ]);
        assert!(branch_targets_inside(&code, BASE).contains(&at[2]));
        assert_eq!(calls(&code), [] as [u64; 0]);
        // A join point between the loads and the call.
        let (code, at) = assemble(&[
            MOV_RAX_R15_10,
            &[0x74, 0x00], // je +0: lands on the next instruction
            MOV_RDI_R15,
            CALL_RAX,
            RET,
        ]);
        assert!(branch_targets_inside(&code, BASE).contains(&at[2]));
        assert_eq!(calls(&code), [] as [u64; 0]);
        // The same with the join point before the loads: found.
        let (code, at) = assemble(&[
            &[0x74, 0x00], // je +0: lands on the next instruction
            MOV_RAX_R15_10,
            MOV_RDI_R15,
            CALL_RAX,
            RET,
        ]);
        assert!(branch_targets_inside(&code, BASE).contains(&at[1]));
        assert_eq!(calls(&code), [at[3]]);
    }

    #[test]
    fn the_window_stops_after_an_unconditional_jump() {
        let (code, _) = assemble(&[
            MOV_RAX_R15_10,
            MOV_RDI_R15,
            &[0xEB, 0x00], // jmp +0 (lands on the call: a target too)
            CALL_RAX,
            RET,
        ]);
        assert_eq!(calls(&code), [] as [u64; 0]);
        let (code, _) = assemble(&[MOV_RAX_R15_10, MOV_RDI_R15, RET, CALL_RAX, RET]);
        assert_eq!(calls(&code), [] as [u64; 0]);
    }

    #[test]
    fn the_window_is_bounded() {
        let filler: &[u8] = &[0x48, 0x89, 0xD9]; // mov rcx,rbx
        let mut parts = vec![MOV_RAX_R15_10, MOV_RDI_R15];
        parts.extend(std::iter::repeat_n(filler, WINDOW - 2));
        parts.push(CALL_RAX);
        let (code, at) = assemble(&parts);
        assert_eq!(calls(&code), [at[WINDOW]]);
        parts.insert(2, filler);
        let (code, _) = assemble(&parts);
        assert_eq!(calls(&code), [] as [u64; 0]);
    }

    #[test]
    fn probe_does_not_pass_an_rsp_write() {
        let (code, at) = assemble(&[
            MOV_RAX_R15_10,
            MOV_RDI_R15,
            CALL_RAX,
            &[0x48, 0x83, 0xC4, 0x08], // add rsp,8
            JE_REL8,
            RET,
        ]);
        let returns = poll_returns(&code, BASE, VTABLE);
        assert_eq!(returns[0].return_address, at[3]);
        assert_eq!(returns[0].address, at[3]);
        assert_eq!(returns[0].cost, Cost::SingleStep);
    }

    #[test]
    fn probe_does_not_pass_a_branch_target_after_the_return_address() {
        // 1000: mov rax,[r15+10h]
        // 1004: mov rdi,r15
        // 1007: call [rax]
        // 1009: inc r13
        // 100C: cmp r13,rbp     <- target of the jmp at 1011
        // 100F: je ...
        // 1011: jmp 100Ch
        let (code, at) = assemble(&[
            MOV_RAX_R15_10,
            MOV_RDI_R15,
            CALL_RAX,
            INC_R13,
            CMP_R13_RBP,
            JE_REL8,
            &[0xEB, 0xF9], // jmp -7
        ]);
        assert!(branch_targets_inside(&code, BASE).contains(&at[4]));
        let returns = poll_returns(&code, BASE, VTABLE);
        assert_eq!(returns[0].address, at[3]);
        assert_eq!(returns[0].cost, Cost::SingleStep);
    }

    #[test]
    fn an_emulated_return_address_is_probed_itself() {
        let (code, at) = assemble(&[MOV_RAX_R15_10, MOV_RDI_R15, CALL_RAX, JE_REL8, RET]);
        let returns = poll_returns(&code, BASE, VTABLE);
        assert_eq!(returns[0].address, at[3]);
        assert_eq!(returns[0].cost, Cost::Emulated);
    }
}
