//! The second placement strategy: the earliest emulated instruction that
//! every call of the function which returns runs exactly once, with the
//! probe's inputs intact there (the rules and why they are safe are in the
//! [`placement`](super) module doc).
//!
//! The function is decoded whole, from its symbol's start to its end, and
//! cut into basic blocks. Leaders: the entry, every direct branch target
//! inside the function, and every instruction after a control-flow
//! instruction. Edges: fallthrough (including past a call that returns) and
//! direct jumps inside the function. A block may also *exit*: `ret`, or a
//! tail call (a direct jump out of the function, or an indirect jump through
//! a pointer loaded from memory). A block that ends in a trap or in a call
//! that never returns has no successor at all: such paths don't return.

use iced_x86::{Code, FlowControl, Instruction, OpKind, Register};

use super::{Cost, FunctionContext, ProbeInputs, clobbers, cost_class, writes_register};

/// Where control goes after one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// To the next instruction only.
    Next,
    /// A direct jump to this address inside the function.
    Jump(u64),
    /// A conditional jump to this address inside the function, else the next
    /// instruction.
    Branch(u64),
    /// A conditional tail call: out of the function for good, else the next
    /// instruction.
    BranchOut,
    /// A call that returns to the next instruction.
    Call,
    /// Out of the function for good, returning to its caller: `ret` or a
    /// tail call.
    Exit,
    /// Nowhere: a trap, or a call that never returns.
    Stop,
}

/// A basic block: `instructions[first..=last]`.
#[derive(Debug)]
struct Block {
    first: usize,
    last: usize,
    /// Blocks control may go to next, by index.
    successors: Vec<usize>,
    /// Control may leave the function here, returning to the caller.
    exits: bool,
}

/// The function's control-flow graph. Block 0 is the entry.
struct Cfg {
    instructions: Vec<Instruction>,
    blocks: Vec<Block>,
    predecessors: Vec<Vec<usize>>,
}

/// The earliest emulated instruction of the function `code` (starting at
/// virtual `address`) that every returning call runs exactly once, with
/// nothing before it changing `inputs`; `None` when there is none or when
/// the function does something the analysis can't account for.
pub(super) fn runs_once_per_call(
    code: &[u8],
    address: u64,
    inputs: ProbeInputs,
    context: &FunctionContext,
) -> Option<Instruction> {
    // The caller's return address at [rsp] is only where the program looks
    // for it before the prologue; keep stack-reading programs on the prefix.
    if inputs.reads_stack {
        return None;
    }
    let cfg = Cfg::build(code, address, context)?;
    let count = cfg.blocks.len();
    let from_entry = cfg.reachable(&[0], None);
    if !(0..count).any(|block| from_entry[block] && cfg.blocks[block].exits) {
        // The function never returns: nothing to post-dominate.
        return None;
    }

    // Blocks that every returning call runs exactly once, each with the
    // blocks it reaches and the blocks that reach it.
    let mut candidates = Vec::new();
    for block in 0..count {
        if !from_entry[block] {
            continue;
        }
        let after = cfg.reachable(&cfg.blocks[block].successors, None);
        if after[block] {
            // In a cycle: it may run more than once.
            continue;
        }
        let without = cfg.reachable(&[0], Some(block));
        if (0..count).any(|other| without[other] && cfg.blocks[other].exits) {
            // Some returning path misses it.
            continue;
        }
        let before = cfg.reaching(block);
        if (0..count).any(|other| before[other] && !from_entry[other] && !cfg.is_padding(other)) {
            // Code entered some way the graph doesn't show (a landing pad?)
            // leads here.
            continue;
        }
        candidates.push((block, after, before));
    }

    // They all lie on every returning path, in one order (two of them seen in
    // both orders would make a cycle): the earliest reaches all the others.
    let later_candidates = |after: &Vec<bool>| {
        candidates
            .iter()
            .filter(|(other, _, _)| after[*other])
            .count()
    };
    let mut ordered: Vec<_> = candidates
        .iter()
        .map(|candidate| (later_candidates(&candidate.1), candidate))
        .collect();
    ordered.sort_by_key(|(later, _)| std::cmp::Reverse(*later));

    for (_, (block, after, before)) in ordered {
        let path_intact = (0..count).filter(|&other| before[other]).all(|other| {
            cfg.block_instructions(other)
                .iter()
                .all(|i| !changes_inputs(i, inputs))
        });
        if !path_intact {
            continue;
        }
        let calls_after = (0..count)
            .filter(|&other| after[other])
            .any(|other| cfg.block_instructions(other).iter().any(is_call));
        let instructions = cfg.block_instructions(*block);
        for (index, instruction) in instructions.iter().enumerate() {
            // A call from here on that unwinds to a landing pad could come
            // back: the graph has no unwind edges.
            let unwinds_back = context.has_landing_pads
                && (calls_after || instructions[index..].iter().any(is_call));
            if cost_class(instruction) == Cost::Emulated && !unwinds_back {
                return Some(*instruction);
            }
            // The probe fires before its instruction runs: only the
            // instructions before it must leave the inputs alone.
            if changes_inputs(instruction, inputs) {
                break;
            }
        }
    }
    None
}

/// Does `instruction` change what the probe reads: a write to an input
/// register, or a call (the callee may overwrite any argument register)?
fn changes_inputs(instruction: &Instruction, inputs: ProbeInputs) -> bool {
    clobbers(instruction, inputs) || (!inputs.registers.is_empty() && is_call(instruction))
}

fn is_call(instruction: &Instruction) -> bool {
    matches!(
        instruction.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    )
}

impl Cfg {
    /// Decodes the whole function and builds its graph; `None` if some of it
    /// does not decode or its control flow can't be accounted for.
    fn build(code: &[u8], address: u64, context: &FunctionContext) -> Option<Cfg> {
        let instructions = decode_all(code, address)?;
        let count = instructions.len();
        let end = address + code.len() as u64;
        let index_of = |target: u64| {
            instructions
                .binary_search_by_key(&target, Instruction::ip)
                .ok()
        };
        // Every direct branch target inside must be an instruction boundary.
        let mut targets = Vec::new();
        for instruction in &instructions {
            if instruction.op0_kind() == OpKind::NearBranch64 {
                let target = instruction.near_branch_target();
                if (address..end).contains(&target) {
                    targets.push(index_of(target)?);
                }
            }
        }
        targets.sort_unstable();
        targets.dedup();

        let flows = (0..count)
            .map(|index| flow(&instructions, index, address..end, &targets, context))
            .collect::<Option<Vec<Flow>>>()?;

        let mut leader = vec![false; count];
        leader[0] = true;
        for &target in &targets {
            leader[target] = true;
        }
        for (index, flow) in flows.iter().enumerate() {
            if *flow != Flow::Next && index + 1 < count {
                leader[index + 1] = true;
            }
        }
        let starts: Vec<usize> = (0..count).filter(|&index| leader[index]).collect();
        let block_at = |index: usize| starts.binary_search(&index).ok();

        let mut blocks = Vec::with_capacity(starts.len());
        for (block, &first) in starts.iter().enumerate() {
            let last = starts.get(block + 1).map_or(count - 1, |&next| next - 1);
            // The block after this one in the file, if any.
            let fallthrough = (block + 1 < starts.len()).then_some(block + 1);
            let target_block = |target: u64| block_at(index_of(target)?);
            let (successors, exits) = match flows[last] {
                // Running off the end of the function: not something a
                // compiler emits; give up.
                Flow::Next | Flow::Call => (vec![fallthrough?], false),
                Flow::Jump(target) => (vec![target_block(target)?], false),
                Flow::Branch(target) => (vec![target_block(target)?, fallthrough?], false),
                Flow::BranchOut => (vec![fallthrough?], true),
                Flow::Exit => (vec![], true),
                Flow::Stop => (vec![], false),
            };
            blocks.push(Block {
                first,
                last,
                successors,
                exits,
            });
        }
        let mut predecessors = vec![Vec::new(); blocks.len()];
        for (block, data) in blocks.iter().enumerate() {
            for &successor in &data.successors {
                predecessors[successor].push(block);
            }
        }
        Some(Cfg {
            instructions,
            blocks,
            predecessors,
        })
    }

    fn block_instructions(&self, block: usize) -> &[Instruction] {
        let block = &self.blocks[block];
        &self.instructions[block.first..=block.last]
    }

    /// The blocks reachable from `starts` (themselves included) without
    /// entering `avoid`.
    fn reachable(&self, starts: &[usize], avoid: Option<usize>) -> Vec<bool> {
        self.search(starts, avoid, |block| &self.blocks[block].successors)
    }

    /// The blocks from which `block` is reachable (itself only if it is in a
    /// cycle).
    fn reaching(&self, block: usize) -> Vec<bool> {
        self.search(&self.predecessors[block], None, |block| {
            &self.predecessors[block]
        })
    }

    fn search<'a>(
        &'a self,
        starts: &[usize],
        avoid: Option<usize>,
        next: impl Fn(usize) -> &'a Vec<usize>,
    ) -> Vec<bool> {
        let mut seen = vec![false; self.blocks.len()];
        let mut stack: Vec<usize> = Vec::new();
        for &start in starts {
            if Some(start) != avoid && !seen[start] {
                seen[start] = true;
                stack.push(start);
            }
        }
        while let Some(block) = stack.pop() {
            for &successor in next(block) {
                if Some(successor) != avoid && !seen[successor] {
                    seen[successor] = true;
                    stack.push(successor);
                }
            }
        }
        seen
    }

    /// Alignment padding: NOPs only, falling through.
    fn is_padding(&self, block: usize) -> bool {
        self.block_instructions(block).iter().all(is_nop)
    }
}

/// Every instruction of the function, or None if any of its bytes don't
/// decode (the analysis needs all of them).
fn decode_all(code: &[u8], address: u64) -> Option<Vec<Instruction>> {
    let instructions: Vec<Instruction> = crate::disasm::instructions(code, address).collect();
    let decoded: usize = instructions.iter().map(Instruction::len).sum();
    (!instructions.is_empty() && decoded == code.len()).then_some(instructions)
}

/// How `instructions[index]` passes control on, in the function spanning
/// `function` whose direct branch targets are the instruction indices
/// `targets`; `None` for control flow the analysis does not model.
fn flow(
    instructions: &[Instruction],
    index: usize,
    function: std::ops::Range<u64>,
    targets: &[usize],
    context: &FunctionContext,
) -> Option<Flow> {
    let instruction = &instructions[index];
    let direct_target = || {
        (instruction.op0_kind() == OpKind::NearBranch64).then(|| instruction.near_branch_target())
    };
    match instruction.flow_control() {
        FlowControl::Next => Some(Flow::Next),
        FlowControl::UnconditionalBranch => {
            let target = direct_target()?;
            Some(if function.contains(&target) {
                Flow::Jump(target)
            } else {
                Flow::Exit
            })
        }
        FlowControl::ConditionalBranch => {
            let target = direct_target()?;
            Some(if function.contains(&target) {
                Flow::Branch(target)
            } else {
                Flow::BranchOut
            })
        }
        FlowControl::IndirectBranch => {
            is_tail_call(instructions, index, targets).then_some(Flow::Exit)
        }
        FlowControl::Return => {
            matches!(instruction.code(), Code::Retnq | Code::Retnq_imm16).then_some(Flow::Exit)
        }
        FlowControl::Call | FlowControl::IndirectCall => {
            if instruction.is_call_near() {
                let target = direct_target()?;
                // A call into its own body (other than recursion) is no
                // ordinary function's code.
                if function.contains(&target) && target != function.start {
                    return None;
                }
                if (context.never_returns)(target) {
                    return Some(Flow::Stop);
                }
            } else if !instruction.is_call_near_indirect() && instruction.code() != Code::Syscall {
                return None;
            }
            // Indirect calls are assumed to return, unless nothing follows
            // the call in the function or a trap does.
            match instructions.get(index + 1) {
                Some(next) if !is_trap(next) => Some(Flow::Call),
                _ => Some(Flow::Stop),
            }
        }
        FlowControl::Interrupt => (instruction.code() == Code::Int3).then_some(Flow::Stop),
        // `ud0`/`ud1`/`ud2` (invalid bytes were rejected when decoding).
        FlowControl::Exception => Some(Flow::Stop),
        FlowControl::XbeginXabortXend => None,
    }
}

/// `int3`, `ud2` and the like: what compilers put after a call that never
/// returns.
fn is_trap(instruction: &Instruction) -> bool {
    instruction.code() == Code::Int3 || instruction.flow_control() == FlowControl::Exception
}

fn is_nop(instruction: &Instruction) -> bool {
    matches!(
        instruction.code(),
        Code::Nopw | Code::Nopd | Code::Nopq | Code::Nop_rm16 | Code::Nop_rm32 | Code::Nop_rm64
    )
}

/// Is the indirect jump `instructions[index]` clearly a tail call rather
/// than a jump inside the function (a jump table)? It is when it jumps
/// through a GOT slot (`jmp [rip+…]`), or through a register or `[reg+disp]`
/// whose register was, in the same block, last set by a plain load of a
/// pointer from memory without an index (`mov rax,[rdi+10h]`: a vtable or a
/// function pointer). Jump tables index (`jmp [rax*8+…]`) or add the table's
/// base to an entry loaded with an index (`add rax,rcx; jmp rax`).
fn is_tail_call(instructions: &[Instruction], index: usize, targets: &[usize]) -> bool {
    let jump = &instructions[index];
    if !jump.is_jmp_near_indirect() {
        return false;
    }
    let pointer = match jump.op0_kind() {
        OpKind::Register => jump.op0_register(),
        OpKind::Memory => {
            if jump.memory_index() != Register::None {
                return false;
            }
            match jump.memory_base() {
                Register::RIP => return true,
                Register::None => return false,
                base => base,
            }
        }
        _ => return false,
    };
    if pointer.full_register() != pointer || pointer == Register::RSP {
        return false;
    }
    // Back through the block: stop where another way in joins it.
    let mut at = index;
    while at > 0 && targets.binary_search(&at).is_err() {
        let earlier = &instructions[at - 1];
        if earlier.flow_control() != FlowControl::Next {
            return false;
        }
        if writes_register(earlier, pointer) {
            return earlier.code() == Code::Mov_r64_rm64
                && earlier.op0_register() == pointer
                && earlier.op1_kind() == OpKind::Memory
                && earlier.memory_index() == Register::None
                && earlier.memory_base() != Register::None;
        }
        at -= 1;
    }
    false
}

#[cfg(test)]
mod tests;
