//! What the kernel does with the instruction a uprobe replaced: the table
//! of instruction kinds x86-64 Linux emulates in its trap handler (~0.3–0.6
//! µs a hit on the VM we measured on) rather than single-stepping out of
//! line (~11 µs). [`placement`](super) chooses among the instructions a
//! probe may go on; this only classifies one instruction, from the kernel's
//! `arch/x86/kernel/uprobes.c`.

use iced_x86::{Code, Instruction, OpKind, Register};

/// What the kernel does with the instruction a uprobe replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cost {
    /// Emulated in the kernel's trap handler: cheap.
    Emulated,
    /// Executed out of line with a single-step trap: about 20 times dearer.
    SingleStep,
}

/// How the kernel (x86-64, `arch/x86/kernel/uprobes.c`,
/// `arch_uprobe_analyze_insn`) handles a probed instruction: `Emulated` for
/// the kinds it emulates on Linux 6.x, `SingleStep` for everything else.
///
/// Emulated (`branch_setup_xol_ops`, `push_setup_xol_ops`):
/// - `call rel32` (E8), `jmp rel8`/`jmp rel32` (EB/E9), `jcc rel8`/`jcc rel32`
///   (70–7F, 0F 80–8F): the branch emulation every 6.x kernel has;
/// - `nop` (90) and `66 90`: treated as a jump by 0 in every 6.x kernel;
/// - the multi-byte NOPs of the kernel's own `x86_nops[]` table (`0F 1F …`
///   in its exact 3- to 8-byte forms, e.g. the 5-byte `nopl [rax+rax*1+0]`):
///   emulated since the 2025 NOP emulation (Linux 6.16); older kernels
///   single-step them;
/// - `push r64` (50–57, or 41 50–57 for r8–r15): emulated since the 2024
///   push emulation; older kernels single-step it.
///
/// Deliberately `SingleStep` although some kernel might do better: any other
/// NOP form (e.g. padding with segment or repeated 66 prefixes — the kernel
/// refuses segment-prefixed instructions outright, so a probe must never be
/// moved onto one), indirect calls and jumps, `ret`, and `mov reg,reg` (only
/// proposed for emulation, as of late 2025).
///
/// Limits of deciding from the decoded instruction rather than its bytes: a
/// branch with a 66 prefix (which the kernel refuses) and a REX.W `push`
/// (49 5x, which it single-steps) look like their plain forms here. No
/// compiler emits either.
pub fn cost_class(instruction: &Instruction) -> Cost {
    let emulated = is_relative_branch(instruction)
        || is_kernel_nop(instruction)
        || is_emulated_push(instruction);
    if emulated {
        Cost::Emulated
    } else {
        Cost::SingleStep
    }
}

/// `call rel32`, `jmp rel8/rel32`, `jcc rel8/rel32`, in 64-bit code, without
/// prefixes the kernel rejects.
fn is_relative_branch(instruction: &Instruction) -> bool {
    let relative = instruction.is_call_near()
        || instruction.is_jmp_short_or_near()
        || instruction.is_jcc_short_or_near();
    relative
        && instruction.op0_kind() == OpKind::NearBranch64
        && instruction.segment_prefix() == Register::None
}

/// The NOPs the kernel emulates: `90`, `66 90`, and the multi-byte forms of
/// its `x86_nops[]` table (all `nop [rax(+rax*1)+0]` with an exact length).
fn is_kernel_nop(instruction: &Instruction) -> bool {
    if instruction.has_segment_prefix() || instruction.has_lock_prefix() {
        return false;
    }
    match instruction.code() {
        Code::Nopd => instruction.len() == 1,
        Code::Nopw => instruction.len() == 2,
        Code::Nop_rm32 | Code::Nop_rm16 => is_table_nopl(instruction),
        _ => false,
    }
}

/// `x86_nops[3..=8]`: (has `66` prefix, has SIB index, displacement bytes, length).
const TABLE_NOPLS: [(bool, bool, u32, usize); 6] = [
    (false, false, 0, 3), // 0f 1f 00
    (false, false, 1, 4), // 0f 1f 40 00
    (false, true, 1, 5),  // 0f 1f 44 00 00
    (true, true, 1, 6),   // 66 0f 1f 44 00 00
    (false, false, 4, 7), // 0f 1f 80 00 00 00 00
    (false, true, 4, 8),  // 0f 1f 84 00 00 00 00 00
];

fn is_table_nopl(instruction: &Instruction) -> bool {
    if instruction.op0_kind() != OpKind::Memory
        || instruction.memory_base() != Register::RAX
        || instruction.memory_displacement64() != 0
    {
        return false;
    }
    let has_index = match instruction.memory_index() {
        Register::None => false,
        Register::RAX if instruction.memory_index_scale() == 1 => true,
        _ => return false,
    };
    // iced reports a disp32 of 64-bit addressing as 8 bytes (it is sign-extended).
    let displacement_bytes = match instruction.memory_displ_size() {
        8 => 4,
        size => size,
    };
    let form = (
        instruction.code() == Code::Nop_rm16,
        has_index,
        displacement_bytes,
        instruction.len(),
    );
    TABLE_NOPLS.contains(&form)
}

/// `push r64` in its one- or two-byte form.
fn is_emulated_push(instruction: &Instruction) -> bool {
    instruction.code() == Code::Push_r64 && instruction.len() <= 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::decode_one;

    fn cost_of(bytes: &[u8]) -> Cost {
        cost_class(&decode_one(bytes))
    }

    #[test]
    fn relative_branches_are_emulated() {
        for bytes in [
            &[0xE8, 0x10, 0x00, 0x00, 0x00][..],   // call rel32
            &[0xE9, 0x10, 0x00, 0x00, 0x00],       // jmp rel32
            &[0xEB, 0x10],                         // jmp rel8
            &[0x74, 0x10],                         // je rel8
            &[0x0F, 0x85, 0x10, 0x00, 0x00, 0x00], // jne rel32
            &[0xF2, 0xE8, 0x10, 0x00, 0x00, 0x00], // bnd call
        ] {
            assert_eq!(cost_of(bytes), Cost::Emulated, "{bytes:02x?}");
        }
    }

    #[test]
    fn pushes_of_general_registers_are_emulated() {
        assert_eq!(cost_of(&[0x55]), Cost::Emulated); // push rbp
        assert_eq!(cost_of(&[0x53]), Cost::Emulated); // push rbx
        assert_eq!(cost_of(&[0x41, 0x57]), Cost::Emulated); // push r15
        // push imm8 and push [rdi] are other instructions.
        assert_eq!(cost_of(&[0x6A, 0x01]), Cost::SingleStep);
        assert_eq!(cost_of(&[0xFF, 0x37]), Cost::SingleStep);
    }

    #[test]
    fn only_the_kernels_own_nops_are_emulated() {
        let table: [&[u8]; 8] = [
            &[0x90],
            &[0x66, 0x90],
            &[0x0F, 0x1F, 0x00],
            &[0x0F, 0x1F, 0x40, 0x00],
            &[0x0F, 0x1F, 0x44, 0x00, 0x00],
            &[0x66, 0x0F, 0x1F, 0x44, 0x00, 0x00],
            &[0x0F, 0x1F, 0x80, 0x00, 0x00, 0x00, 0x00],
            &[0x0F, 0x1F, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
        ];
        for bytes in table {
            assert_eq!(cost_of(bytes), Cost::Emulated, "{bytes:02x?}");
        }
        for bytes in [
            // cs nopw [rax+rax*1+0]: loop-alignment padding; the kernel refuses the prefix.
            &[0x66, 0x2E, 0x0F, 0x1F, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00][..],
            &[0x0F, 0x1F, 0x44, 0x08, 0x00], // nopl [rax+rcx*1+0]
            &[0x0F, 0x1F, 0x04, 0x00],       // nopl [rax+rax*1]: not the table's 4-byte nop
            &[0x41, 0x90],                   // xchg r8d,eax, not a nop
            &[0xF3, 0x90],                   // pause
        ] {
            assert_eq!(cost_of(bytes), Cost::SingleStep, "{bytes:02x?}");
        }
    }

    #[test]
    fn other_instructions_single_step() {
        for bytes in [
            &[0x48, 0x83, 0xEC, 0x18][..],   // sub rsp,18h
            &[0x48, 0x8B, 0x07],             // mov rax,[rdi]
            &[0x48, 0x89, 0xFB],             // mov rbx,rdi
            &[0x48, 0x8D, 0x4C, 0x24, 0x08], // lea rcx,[rsp+8]
            &[0xC3],                         // ret
            &[0xFF, 0xD0],                   // call rax
            &[0xFF, 0xE0],                   // jmp rax
        ] {
            assert_eq!(cost_of(bytes), Cost::SingleStep, "{bytes:02x?}");
        }
    }
}
