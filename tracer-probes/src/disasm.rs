//! x86-64 decoding with iced-x86: the instruction a probe replaces, and the
//! functions a function calls or tail-calls directly.

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, OpKind};

/// The first instruction of `code` (which starts at virtual address
/// `address`) in Intel syntax, e.g. `jmp 2EF80h` or `push r15`; `None` if the
/// bytes don't decode.
pub fn first_instruction(code: &[u8], address: u64) -> Option<String> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return None;
    }
    Some(format_instruction(&instruction))
}

/// Intel syntax, branch targets without leading zeros: `jmp 2EF80h` rather
/// than `jmp 000000000002EF80h` (a table column, read by people).
pub fn format_instruction(instruction: &Instruction) -> String {
    let mut formatter = IntelFormatter::new();
    formatter.options_mut().set_branch_leading_zeros(false);
    let mut text = String::new();
    formatter.format(instruction, &mut text);
    text
}

/// The instructions of `code` (starting at virtual address `address`) in
/// linear order, up to its end or the first undecodable bytes.
pub fn instructions(code: &[u8], address: u64) -> impl Iterator<Item = Instruction> + '_ {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    std::iter::from_fn(move || {
        if !decoder.can_decode() {
            return None;
        }
        let instruction = decoder.decode();
        (!instruction.is_invalid()).then_some(instruction)
    })
}

/// The targets of every direct near branch (`call`, `jmp`, `jcc`, and
/// `loop`/`jrcxz`) in the function `code` starting at `address`, in
/// instruction order. Indirect branches through registers or memory have
/// other operand kinds and are not included.
pub fn near_branch_targets(code: &[u8], address: u64) -> impl Iterator<Item = u64> + '_ {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    std::iter::from_fn(move || {
        while decoder.can_decode() {
            decoder.decode_out(&mut instruction);
            if instruction.op0_kind() == OpKind::NearBranch64 {
                return Some(instruction.near_branch_target());
            }
        }
        None
    })
}

/// The targets of direct `call`s and `jmp`s in the function `code` (starting
/// at `address`) that leave the function: its callees and tail-callees.
/// Branches inside the function are control flow, not calls, and are skipped.
pub fn direct_call_targets(code: &[u8], address: u64) -> Vec<u64> {
    let inside = address..address + code.len() as u64;
    let mut targets = Vec::new();
    for target in near_branch_targets(code, address) {
        if !inside.contains(&target) && !targets.contains(&target) {
            targets.push(target);
        }
    }
    targets
}

/// The memory slots of every `call qword ptr [rip+…]` in the function
/// `code` (starting at `address`): calls through the GOT, which is how a
/// PIE calls functions exported from another codegen unit.
pub fn rip_relative_call_slots(code: &[u8], address: u64) -> Vec<u64> {
    instructions(code, address)
        .filter(|instruction| {
            instruction.mnemonic() == iced_x86::Mnemonic::Call
                && instruction.op0_kind() == OpKind::Memory
                && instruction.is_ip_rel_memory_operand()
        })
        .map(|instruction| instruction.ip_rel_memory_address())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_relative_jump_with_its_absolute_target() {
        // jmp rel32 with displacement 0x10 from 0x1000 + 5.
        let code = [0xE9, 0x10, 0x00, 0x00, 0x00];
        assert_eq!(
            first_instruction(&code, 0x1000).as_deref(),
            Some("jmp 1015h")
        );
    }

    #[test]
    fn undecodable_bytes_give_none() {
        assert_eq!(first_instruction(&[0x0F], 0x1000), None);
    }

    #[test]
    fn collects_calls_leaving_the_function_only() {
        // call +0x100 ; jmp -2 (to itself, inside) ; ret
        let code = [0xE8, 0x00, 0x01, 0x00, 0x00, 0xEB, 0xFE, 0xC3];
        assert_eq!(direct_call_targets(&code, 0x2000), [0x2105]);
    }
}
