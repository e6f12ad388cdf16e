//! The second strategy on hand-assembled functions (GNU as, Intel syntax;
//! each listing is at address 0x1000, `ext` stands for a function outside).

use iced_x86::Register;

use super::*;
use crate::placement::{Placement, Strategy, place_entry};

const RDI_ONLY: ProbeInputs = ProbeInputs {
    registers: &[Register::RDI],
    reads_stack: false,
};

/// Unwind info says the function has no landing pads; no call is known to
/// diverge.
const NO_LANDING_PADS: FunctionContext<'static> = FunctionContext {
    has_landing_pads: false,
    ..FunctionContext::UNKNOWN
};

fn place(code: &[u8], inputs: ProbeInputs, context: &FunctionContext) -> Placement {
    place_entry(code, 0x1000, inputs, true, context).unwrap()
}

/// Where the second strategy alone puts the probe.
fn once_at(code: &[u8], inputs: ProbeInputs, context: &FunctionContext) -> Option<u64> {
    runs_once_per_call(code, 0x1000, inputs, context).map(|instruction| instruction.ip())
}

/// ```text
/// 1000: sub rsp,0x18
/// 1004: mov rax,[rdi]
/// 1007: test al,0x2          <- loop head: the prefix rule stops here
/// 1009: jne 1015
/// 100b: mov rcx,rax
/// 100e: lock cmpxchg [rdi],rcx
/// 1013: jne 1007
/// 1015: test sil,sil
/// 1018: je 1025              <- every returning path, once
/// 101a: mov rax,[rdi+0x10]
/// 101e: add rsp,0x18
/// 1022: jmp [rax+0x8]        (tail call)
/// 1025: add rsp,0x18
/// 1029: ret
/// ```
const LOOP_THEN_BRANCH: [u8; 42] = [
    0x48, 0x83, 0xEC, 0x18, 0x48, 0x8B, 0x07, 0xA8, 0x02, 0x75, 0x0A, 0x48, 0x89, 0xC1, 0xF0, 0x48,
    0x0F, 0xB1, 0x0F, 0x75, 0xF2, 0x40, 0x84, 0xF6, 0x74, 0x0B, 0x48, 0x8B, 0x47, 0x10, 0x48, 0x83,
    0xC4, 0x18, 0xFF, 0x60, 0x08, 0x48, 0x83, 0xC4, 0x18, 0xC3,
];

#[test]
fn the_branch_after_a_loop_that_every_returning_path_takes_is_chosen() {
    let placement = place(&LOOP_THEN_BRANCH, RDI_ONLY, &FunctionContext::UNKNOWN);
    assert_eq!(placement.address, 0x1018);
    assert_eq!(placement.instruction, "je short 1025h");
    assert_eq!(placement.cost, Cost::Emulated);
    assert_eq!(placement.strategy, Strategy::RunsOncePerCall);
}

#[test]
fn return_probed_and_stack_reading_sites_do_not_use_it() {
    let placement = place_entry(
        &LOOP_THEN_BRANCH,
        0x1000,
        RDI_ONLY,
        false,
        &FunctionContext::UNKNOWN,
    )
    .unwrap();
    assert_eq!(placement.address, 0x1000);
    assert_eq!(placement.strategy, Strategy::FirstInstruction);
    let stack = ProbeInputs {
        registers: &[],
        reads_stack: true,
    };
    let placement = place(&LOOP_THEN_BRANCH, stack, &NO_LANDING_PADS);
    assert_eq!(placement.address, 0x1000);
    assert_eq!(placement.cost, Cost::SingleStep);
}

/// `tokio::runtime::task::waker::wake_by_ref` as built in bench-work
/// (release, panic=unwind), at its own address: a CAS loop behind padding
/// the kernel won't probe, a panic path ending the function with an
/// indirect call (`call [rip+…]`, nothing after it), a tail call and a ret.
const WAKE_BY_REF: [u8; 0xC0] = [
    0x48, 0x83, 0xEC, 0x18, 0x48, 0x8B, 0x07, 0x48, 0x8D, 0x4C, 0x24, 0x08, 0x48, 0x8D, 0x54, 0x24,
    0x10, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x2E, 0x0F, 0x1F, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xA8, 0x02, 0x75, 0x1C, 0xA8, 0x04, 0x75, 0x38, 0xA8, 0x01, 0x75, 0x3B, 0x48, 0x85, 0xC0, 0x78,
    0x76, 0x4C, 0x8D, 0x40, 0x44, 0x40, 0xB6, 0x01, 0xEB, 0x36, 0x66, 0x0F, 0x1F, 0x44, 0x00, 0x00,
    0x31, 0xF6, 0x49, 0x89, 0xC9, 0x45, 0x31, 0xC0, 0x4D, 0x89, 0x01, 0x83, 0x7C, 0x24, 0x08, 0x01,
    0x74, 0x34, 0xEB, 0x3E, 0x66, 0x66, 0x66, 0x2E, 0x0F, 0x1F, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x31, 0xF6, 0x49, 0x89, 0xC0, 0xEB, 0x09, 0x49, 0x89, 0xC0, 0x49, 0x83, 0xC8, 0x04, 0x31, 0xF6,
    0x48, 0xC7, 0x44, 0x24, 0x08, 0x01, 0x00, 0x00, 0x00, 0x49, 0x89, 0xD1, 0x4D, 0x89, 0x01, 0x83,
    0x7C, 0x24, 0x08, 0x01, 0x75, 0x0C, 0x4C, 0x8B, 0x44, 0x24, 0x10, 0xF0, 0x4C, 0x0F, 0xB1, 0x07,
    0x75, 0x8E, 0x40, 0x84, 0xF6, 0x74, 0x0B, 0x48, 0x8B, 0x47, 0x10, 0x48, 0x83, 0xC4, 0x18, 0xFF,
    0x60, 0x08, 0x48, 0x83, 0xC4, 0x18, 0xC3, 0x48, 0x8D, 0x3D, 0xBF, 0xDD, 0xFB, 0xFF, 0x48, 0x8D,
    0x15, 0x5B, 0xFD, 0x05, 0x00, 0xBE, 0x2F, 0x00, 0x00, 0x00, 0xFF, 0x15, 0x10, 0x34, 0x06, 0x00,
];

#[test]
fn wake_by_ref_is_probed_at_its_last_branch() {
    let placement = place_entry(
        &WAKE_BY_REF,
        0x5BB60,
        RDI_ONLY,
        true,
        &FunctionContext::UNKNOWN,
    )
    .unwrap();
    assert_eq!(placement.address, 0x5BB60 + 0x95);
    assert_eq!(placement.instruction, "je short 5BC02h");
    assert_eq!(placement.cost, Cost::Emulated);
    assert_eq!(placement.strategy, Strategy::RunsOncePerCall);
}

#[test]
fn no_instruction_when_the_exit_paths_share_none_after_the_loop() {
    // 1000: mov rax,[rdi]
    // 1003: test al,0x1         <- loop head
    // 1005: jne 1017
    // 1007: add rax,0x1
    // 100b: cmp rax,0xa
    // 100f: jb 1003
    // 1011: call ext            (on one exit path only)
    // 1016: ret
    // 1017: push rbx            (on the other only)
    // 1018: pop rbx
    // 1019: ret
    let code = [
        0x48, 0x8B, 0x07, 0xA8, 0x01, 0x75, 0x10, 0x48, 0x83, 0xC0, 0x01, 0x48, 0x83, 0xF8, 0x0A,
        0x72, 0xF2, 0xE8, 0x04, 0x01, 0x00, 0x00, 0xC3, 0x53, 0x5B, 0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), None);
    assert_eq!(once_at(&code, ProbeInputs::NOTHING, &NO_LANDING_PADS), None);
    let placement = place(&code, RDI_ONLY, &NO_LANDING_PADS);
    assert_eq!(placement.address, 0x1000);
    assert_eq!(placement.cost, Cost::SingleStep);
    assert_eq!(placement.strategy, Strategy::FirstInstruction);
}

#[test]
fn a_branch_inside_a_loop_is_rejected() {
    // 1000: mov rax,[rdi]
    // 1003: test al,0x1          <- loop head
    // 1005: je 100a
    // 1007: dec rax
    // 100a: dec rax
    // 100d: jne 1003             <- on every path, but once per iteration
    // 100f: ret
    let code = [
        0x48, 0x8B, 0x07, 0xA8, 0x01, 0x74, 0x03, 0x48, 0xFF, 0xC8, 0x48, 0xFF, 0xC8, 0x75, 0xF4,
        0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), None);

    // The same loop, then `test rsi,rsi; js 1015; ret; 1015: ret`: the `js`
    // after the loop is chosen, not the earlier `jne` in it.
    let code = [
        0x48, 0x8B, 0x07, 0xA8, 0x01, 0x74, 0x03, 0x48, 0xFF, 0xC8, 0x48, 0xFF, 0xC8, 0x75, 0xF4,
        0x48, 0x85, 0xF6, 0x78, 0x01, 0xC3, 0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), Some(0x1012));
}

#[test]
fn a_write_to_an_input_on_one_path_before_it_is_rejected() {
    // 1000: mov rax,[rdi]
    // 1003: test al,0x1          <- loop head
    // 1005: jne 100c
    // 1007: mov rdi,rax          <- RDI changes on this path only
    // 100a: jmp 1011
    // 100c: dec rax
    // 100f: jne 1003
    // 1011: test al,al
    // 1013: je 1016              <- every returning path, once
    // 1015: ret
    // 1016: ret
    let code = [
        0x48, 0x8B, 0x07, 0xA8, 0x01, 0x75, 0x05, 0x48, 0x89, 0xC7, 0xEB, 0x05, 0x48, 0xFF, 0xC8,
        0x75, 0xF2, 0x84, 0xC0, 0x74, 0x01, 0xC3, 0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), None);
    let rsi_only = ProbeInputs {
        registers: &[Register::RSI],
        reads_stack: false,
    };
    assert_eq!(once_at(&code, rsi_only, &NO_LANDING_PADS), Some(0x1013));
    assert_eq!(
        once_at(&code, ProbeInputs::NOTHING, &NO_LANDING_PADS),
        Some(0x1013)
    );
}

#[test]
fn a_call_on_one_path_before_it_is_rejected_for_register_inputs() {
    // As above with `call ext` in place of `mov rdi,rax`: the callee may
    // overwrite every argument register.
    // 1007: call ext
    // 100c: jmp 1013
    // 1015: je 1018              <- every returning path, once
    let code = [
        0x48, 0x8B, 0x07, 0xA8, 0x01, 0x75, 0x07, 0xE8, 0x0D, 0x01, 0x00, 0x00, 0xEB, 0x05, 0x48,
        0xFF, 0xC8, 0x75, 0xF0, 0x84, 0xC0, 0x74, 0x01, 0xC3, 0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), None);
    assert_eq!(
        once_at(&code, ProbeInputs::NOTHING, &NO_LANDING_PADS),
        Some(0x1015)
    );
}

/// ```text
/// 1000: mov rax,[rdi]
/// 1003: test rax,rax         <- loop head
/// 1006: js 1013              -> the panic path
/// 1008: dec rax
/// 100b: jne 1003
/// 100d: test al,al
/// 100f: je 1012              <- every returning path, once
/// 1011: ret
/// 1012: ret
/// 1013: lea rdi,[rip+…]      (RDI changes, but never on the way to 100f)
/// 101a: call core_panic      (1126h; never returns)
/// 101f: mov eax,0x1          (as if it did)
/// 1024: ret
/// ```
const PANIC_PATH: [u8; 37] = [
    0x48, 0x8B, 0x07, 0x48, 0x85, 0xC0, 0x78, 0x0B, 0x48, 0xFF, 0xC8, 0x75, 0xF6, 0x84, 0xC0, 0x74,
    0x01, 0xC3, 0xC3, 0x48, 0x8D, 0x3D, 0x0E, 0x01, 0x00, 0x00, 0xE8, 0x07, 0x01, 0x00, 0x00, 0xB8,
    0x01, 0x00, 0x00, 0x00, 0xC3,
];
const CORE_PANIC: u64 = 0x1126;

#[test]
fn a_path_ending_in_a_panic_is_ignored() {
    let panics = |target: u64| target == CORE_PANIC;
    let context = FunctionContext {
        never_returns: &panics,
        has_landing_pads: true,
    };
    let placement = place(&PANIC_PATH, RDI_ONLY, &context);
    assert_eq!(placement.address, 0x100F);
    assert_eq!(placement.strategy, Strategy::RunsOncePerCall);
    // Not knowing that `core_panic` never returns, the path through it
    // returns without passing 100f.
    assert_eq!(
        once_at(&PANIC_PATH, RDI_ONLY, &FunctionContext::UNKNOWN),
        None
    );
}

#[test]
fn a_call_followed_by_a_trap_or_by_nothing_never_returns() {
    // PANIC_PATH with `call [rip+…]; ud2` for the panic: an indirect call,
    // so only the `ud2` says it never returns.
    let code = [
        0x48, 0x8B, 0x07, 0x48, 0x85, 0xC0, 0x78, 0x0B, 0x48, 0xFF, 0xC8, 0x75, 0xF6, 0x84, 0xC0,
        0x74, 0x01, 0xC3, 0xC3, 0x48, 0x8D, 0x3D, 0x11, 0x01, 0x00, 0x00, 0xFF, 0x15, 0x0B, 0x01,
        0x00, 0x00, 0x0F, 0x0B, 0xB8, 0x01, 0x00, 0x00, 0x00, 0xC3,
    ];
    assert_eq!(
        once_at(&code, RDI_ONLY, &FunctionContext::UNKNOWN),
        Some(0x100F)
    );
    // PANIC_PATH cut after its call: nothing follows it in the function.
    assert_eq!(
        once_at(&PANIC_PATH[..0x1F], RDI_ONLY, &FunctionContext::UNKNOWN),
        Some(0x100F)
    );
}

#[test]
fn a_jump_table_gives_up() {
    // 1000: mov rax,[rdi]
    // 1003: dec rax              <- loop head
    // 1006: jne 1003
    // 1008: lea rcx,[rip+table]
    // 100f: movsxd rax,dword [rcx+rax*4]
    // 1013: add rax,rcx
    // 1016: jmp rax              <- somewhere in the function
    // 1018: test al,al
    // 101a: je 101d
    // 101c: ret
    // 101d: ret
    let code = [
        0x48, 0x8B, 0x07, 0x48, 0xFF, 0xC8, 0x75, 0xFB, 0x48, 0x8D, 0x0D, 0x13, 0x01, 0x00, 0x00,
        0x48, 0x63, 0x04, 0x81, 0x48, 0x01, 0xC8, 0xFF, 0xE0, 0x84, 0xC0, 0x74, 0x01, 0xC3, 0xC3,
    ];
    assert!(Cfg::build(&code, 0x1000, &NO_LANDING_PADS).is_none());
    assert_eq!(once_at(&code, ProbeInputs::NOTHING, &NO_LANDING_PADS), None);
    // `jmp [rax*8+table]` too.
    let mut indexed = code;
    // movsxd rax,dword [rcx+rax*4]; add rax,rcx; jmp rax
    //   -> nop; nop; nop; nop; jmp [rax*8+0]... spelled out:
    indexed[15..24].copy_from_slice(&[0xFF, 0x24, 0xC5, 0x00, 0x00, 0x00, 0x00, 0x90, 0x90]);
    assert!(Cfg::build(&indexed, 0x1000, &NO_LANDING_PADS).is_none());
}

#[test]
fn a_jump_through_a_loaded_pointer_is_a_tail_call() {
    // 1000: mov rax,[rdi]
    // 1003: dec rax              <- loop head
    // 1006: jne 1003
    // 1008: test al,al
    // 100a: je 1012              <- every returning path, once
    // 100c: mov rax,[rdi+0x10]
    // 1010: jmp rax              (tail call)
    // 1012: ret
    let code = [
        0x48, 0x8B, 0x07, 0x48, 0xFF, 0xC8, 0x75, 0xFB, 0x84, 0xC0, 0x74, 0x06, 0x48, 0x8B, 0x47,
        0x10, 0xFF, 0xE0, 0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), Some(0x100A));
}

#[test]
fn with_landing_pads_no_call_may_follow_it() {
    // 1000: mov rax,[rdi]
    // 1003: dec rax              <- loop head
    // 1006: jne 1003
    // 1008: test al,al
    // 100a: je 1011              <- every returning path, once
    // 100c: call ext             (could unwind to a landing pad)
    // 1011: ret
    let code = [
        0x48, 0x8B, 0x07, 0x48, 0xFF, 0xC8, 0x75, 0xFB, 0x84, 0xC0, 0x74, 0x05, 0xE8, 0x01, 0x01,
        0x00, 0x00, 0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), Some(0x100A));
    assert_eq!(once_at(&code, RDI_ONLY, &FunctionContext::UNKNOWN), None);
}

#[test]
fn code_the_entry_does_not_reach_must_not_lead_to_it() {
    // 1000: mov rax,[rdi]
    // 1003: dec rax              <- loop head
    // 1006: je 1011
    // 1008: jmp 1003
    // 100a: mov rax,1            <- reached some other way (a landing pad?)
    // 1011: test al,al
    // 1013: je 1016              <- else every returning path, once
    // 1015: ret
    // 1016: ret
    let code = [
        0x48, 0x8B, 0x07, 0x48, 0xFF, 0xC8, 0x74, 0x09, 0xEB, 0xF9, 0x48, 0xC7, 0xC0, 0x01, 0x00,
        0x00, 0x00, 0x84, 0xC0, 0x74, 0x01, 0xC3, 0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), None);
    // Alignment padding there instead (`cs nopw [rax+rax*1+0]`) is fine.
    let code = [
        0x48, 0x8B, 0x07, 0x48, 0xFF, 0xC8, 0x74, 0x0C, 0xEB, 0xF9, 0x66, 0x2E, 0x0F, 0x1F, 0x84,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x84, 0xC0, 0x74, 0x01, 0xC3, 0xC3,
    ];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), Some(0x1016));
}

#[test]
fn a_branch_into_the_middle_of_an_instruction_gives_up() {
    // LOOP_THEN_BRANCH with its `jne 1007` (at 1013) retargeted to 1008,
    // inside `test al,0x2`.
    let mut code = LOOP_THEN_BRANCH;
    code[0x14] = 0xF3;
    assert!(Cfg::build(&code, 0x1000, &NO_LANDING_PADS).is_none());
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), None);
}

#[test]
fn undecodable_bytes_give_up() {
    let mut code = LOOP_THEN_BRANCH.to_vec();
    code.push(0x0F); // a truncated instruction at the end
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), None);
}

#[test]
fn a_function_that_never_returns_gives_none() {
    // 1000: dec rax              <- loop head
    // 1002: jne 1000             (entry in a cycle)
    // 1004: nop
    // 1005: ud2
    let code = [0x48, 0xFF, 0xC8, 0x75, 0xFB, 0x90, 0x0F, 0x0B];
    assert_eq!(once_at(&code, RDI_ONLY, &NO_LANDING_PADS), None);
}

#[test]
fn recognises_panic_functions_by_name() {
    assert!(crate::placement::is_panic_function(
        "core::panicking::panic"
    ));
    assert!(crate::placement::is_panic_function(
        "core::panicking::panic_const::panic_const_add_overflow"
    ));
    assert!(crate::placement::is_panic_function(
        "core::option::unwrap_failed"
    ));
    assert!(!crate::placement::is_panic_function("std::panicking::try"));
    assert!(!crate::placement::is_panic_function(
        "std::panicking::panic_count::increase"
    ));
    assert!(!crate::placement::is_panic_function(
        "tokio::runtime::task::waker::wake_by_ref"
    ));
}
