//! Which code runs a task's poll, per task type: how a sampled stack says
//! which task was running without a probe on every poll.
//!
//! A task's poll sits on its worker's stack as long as it runs: a return
//! address inside the `raw::poll::<T, S>` instance of its type, or, where
//! that instance is only a `jmp` to `Harness<T, S>::poll` (cargo's default
//! release profile: a 5-byte thunk that never appears on the stack), inside
//! the function the jump leads to. Under fat LTO `raw::poll` is a whole
//! function and holds the calls itself. Both are generic over `T`, so each
//! range belongs to exactly one task type; the innermost frame in any of
//! them names the task a sample or a blocking switch hit.
//!
//! Ranges are file offsets, so that user space can match them against
//! runtime addresses through `/proc/PID/maps` without knowing the load bias.

use std::ops::Range;
use std::path::Path;

use anyhow::Context;
use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};

use crate::image::Image;
use crate::symbols::SymbolTable;
use crate::{ProbePlan, SiteKind};

/// How many tail jumps are followed from `raw::poll` (thunk → `Harness::poll`
/// is one; a second one covers a `Harness::poll` that is itself a thunk).
const MAX_TAIL_JUMPS: usize = 2;

/// The code of one poll site (by its index in [`ProbePlan::sites`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollCode {
    pub site: usize,
    /// File-offset ranges: `raw::poll` itself and the functions it tail-jumps to.
    pub ranges: Vec<Range<u64>>,
}

/// The poll code of every poll site of `plan`, read from `binary` (the file
/// the plan was made from).
pub fn poll_code(binary: &Path, plan: &ProbePlan) -> anyhow::Result<Vec<PollCode>> {
    site_code(binary, plan, SiteKind::Poll)
}

/// The code of every site of `kind` the same way: the watch tier takes the
/// park functions' too, to tell a worker asleep in its park from one
/// blocked inside a poll by the user stack at the switch.
pub fn site_code(binary: &Path, plan: &ProbePlan, kind: SiteKind) -> anyhow::Result<Vec<PollCode>> {
    let data =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an ELF file", binary.display()))?;
    let image = Image::new(&data, &file);
    let symbols = SymbolTable::read(&file);
    let mut found = Vec::new();
    for (index, site) in plan.sites.iter().enumerate() {
        if site.kind != kind {
            continue;
        }
        let mut ranges = Vec::new();
        let mut address = site.address;
        for _ in 0..=MAX_TAIL_JUMPS {
            let size = symbols
                .at(address)
                .iter()
                .map(|symbol| symbol.size)
                .max()
                .unwrap_or(0);
            let Some(start) = image.file_offset(address).filter(|_| size > 0) else {
                break;
            };
            ranges.push(start..start + size);
            match image
                .bytes(address, size)
                .and_then(|code| tail_jump(code, address))
            {
                Some(target) => address = target,
                None => break,
            }
        }
        if !ranges.is_empty() {
            found.push(PollCode {
                site: index,
                ranges,
            });
        }
    }
    Ok(found)
}

/// The target of a function that is one direct `jmp` (a thunk), possibly
/// inside an empty frame-pointer frame (`push rbp; mov rbp, rsp; pop rbp;
/// jmp …`: what `-C force-frame-pointers=yes` makes of the same thunk, seen
/// in the compat matrix's frame-pointer cell).
fn tail_jump(code: &[u8], address: u64) -> Option<u64> {
    use iced_x86::{Code, Register};
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut pushed = 0;
    // The empty frame is three instructions; the jump comes after it.
    for _ in 0..4 {
        let instruction = decoder.decode();
        match instruction.code() {
            Code::Push_r64 if instruction.op0_register() == Register::RBP => pushed += 1,
            Code::Pop_r64 if instruction.op0_register() == Register::RBP && pushed > 0 => {
                pushed -= 1
            }
            Code::Mov_rm64_r64 | Code::Mov_r64_rm64
                if instruction.op0_register() == Register::RBP
                    && instruction.op1_register() == Register::RSP => {}
            _ => {
                let is_jump = instruction.flow_control() == FlowControl::UnconditionalBranch
                    && instruction.op0_kind() == OpKind::NearBranch64;
                let target = instruction.near_branch_target();
                let inside = address..address + code.len() as u64;
                return (is_jump && pushed == 0 && !inside.contains(&target)).then_some(target);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thunk_jumps_to_its_target() {
        // jmp rel32 (+0x100 from the next instruction at 0x1005).
        let code = [0xe9, 0x00, 0x01, 0x00, 0x00];
        assert_eq!(tail_jump(&code, 0x1000), Some(0x1105));
    }

    #[test]
    fn a_thunk_in_an_empty_frame_pointer_frame_jumps_to_its_target() {
        // push rbp; mov rbp, rsp; pop rbp; jmp rel32 (+0x100 from 0x100a).
        let code = [0x55, 0x48, 0x89, 0xe5, 0x5d, 0xe9, 0x00, 0x01, 0x00, 0x00];
        assert_eq!(tail_jump(&code, 0x1000), Some(0x110a));
        // Without the pop, the jump leaves a frame behind: no thunk.
        let code = [0x55, 0x48, 0x89, 0xe5, 0xe9, 0x00, 0x01, 0x00, 0x00];
        assert_eq!(tail_jump(&code, 0x1000), None);
    }

    #[test]
    fn a_real_function_is_no_thunk() {
        // push r15; ...
        let code = [0x41, 0x57, 0x41, 0x56];
        assert_eq!(tail_jump(&code, 0x1000), None);
    }
}
