//! Probe placement and the scheduler-event sites on the real fixture
//! programs, in both build profiles. Each placed probe is checked against the
//! fixture's own bytes, decoded here independently of `discover`; a probe
//! placed beyond the straight-line prefix is checked against a control-flow
//! graph built here, one instruction per node.

mod common;
use test_support as support;

use common::fixtures;
use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    OpKind, Register,
};
use object::{Object, ObjectSection, ObjectSymbol};
use tracer_probes::disasm::format_instruction;
use tracer_probes::placement::{cost_class, is_panic_function};
use tracer_probes::{Cost, ProbePlan, ProbeSite, SiteKind, TaskArg};

/// The bytes of the function at `address`: its largest symbol size, from the
/// file's own symbol table.
fn function_code<'a>(file: &object::File<'a>, address: u64) -> &'a [u8] {
    let size = file
        .symbols()
        .filter(|symbol| symbol.address() == address)
        .map(|symbol| symbol.size())
        .max()
        .expect("a symbol at the site's address");
    let section = file
        .sections()
        .find(|s| address >= s.address() && address < s.address() + s.size())
        .expect("a section holds the function");
    let start = (address - section.address()) as usize;
    &section.data().unwrap()[start..start + size as usize]
}

fn decode_all(code: &[u8], address: u64) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut all = Vec::new();
    while decoder.can_decode() {
        all.push(decoder.decode());
    }
    all
}

fn probe_address(site: &ProbeSite) -> u64 {
    site.address + (site.probe_offset - site.file_offset)
}

fn read_registers(site: &ProbeSite) -> Vec<Register> {
    match site.task_arg {
        // A return probe reads the return registers, at the function's end.
        TaskArg::None | TaskArg::ReturnValue => vec![],
        TaskArg::Rdi => vec![Register::RDI],
        TaskArg::Rsi | TaskArg::RsiDeref => vec![Register::RSI],
    }
}

fn writes_any(instruction: &Instruction, registers: &[Register]) -> bool {
    let mut factory = InstructionInfoFactory::new();
    factory
        .info(instruction)
        .used_registers()
        .iter()
        .any(|used| {
            matches!(
                used.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) && registers.contains(&used.register().full_register())
        })
}

fn is_call(instruction: &Instruction) -> bool {
    matches!(
        instruction.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    )
}

/// How a site was placed, as far as this test can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placed {
    /// At or before the first control-flow instruction.
    OnThePrefix,
    /// Past it: by the strategy that finds an instruction every returning
    /// call runs exactly once.
    BeyondThePrefix,
}

/// Checks one site against the function's decoded bytes; `never_returns`
/// says which direct call targets are panic functions.
fn check_site(
    label: &str,
    site: &ProbeSite,
    code: &[u8],
    never_returns: &dyn Fn(u64) -> bool,
) -> Placed {
    let instructions = decode_all(code, site.address);
    let probe = probe_address(site);
    let context = format!("{label}: {} at {:#x}", site.symbol, site.address);

    // An instruction boundary.
    let index = instructions
        .iter()
        .position(|instruction| instruction.ip() == probe)
        .unwrap_or_else(|| panic!("{context}: probe {probe:#x} is not an instruction boundary"));
    let before = &instructions[..index];
    let placed = if before
        .iter()
        .all(|instruction| instruction.flow_control() == FlowControl::Next)
    {
        Placed::OnThePrefix
    } else {
        Placed::BeyondThePrefix
    };
    let probed = &instructions[index];
    assert_eq!(site.cost, cost_class(probed), "{context}");
    assert_eq!(
        site.probe_instruction,
        format_instruction(probed),
        "{context}"
    );

    // Return-probed sites never move.
    assert_eq!(
        site.needs_return_probe,
        site.kind.needs_return_probe(),
        "{context}"
    );
    if site.needs_return_probe {
        assert_eq!(
            site.probe_offset, site.file_offset,
            "{context}: a uretprobe site moved"
        );
        return placed;
    }

    let registers = read_registers(site);
    // The straight-line prefix goes first: a probe goes beyond it only when
    // no emulated instruction on it was safe.
    if placed == Placed::BeyondThePrefix || site.cost == Cost::SingleStep {
        check_no_safe_emulated_prefix(&context, &instructions, &registers);
    }
    if placed == Placed::BeyondThePrefix {
        assert_eq!(
            site.cost,
            Cost::Emulated,
            "{context}: moved to a single-step"
        );
        assert_ne!(
            site.kind,
            SiteKind::AwaitPoint,
            "{context}: a stack-reading probe left the prefix"
        );
        check_runs_once(
            &context,
            &instructions,
            code.len(),
            index,
            &registers,
            never_returns,
        );
        return placed;
    }

    // Nothing before it changes what the eBPF program reads.
    for instruction in before {
        assert!(
            !writes_any(instruction, &registers),
            "{context}: `{}` writes {registers:?} before the probe",
            format_instruction(instruction)
        );
    }
    // No branch in the function re-enters the prefix at or before the probe.
    let reentries: Vec<u64> = instructions
        .iter()
        .filter(|instruction| instruction.op0_kind() == OpKind::NearBranch64)
        .map(Instruction::near_branch_target)
        .filter(|&target| target > site.address && target <= probe)
        .collect();
    assert!(
        reentries.is_empty(),
        "{context}: branches land at {reentries:x?}"
    );
    placed
}

/// No emulated instruction on the prefix is safe: before the first
/// control-flow instruction, a loop head, or a write to `registers`.
fn check_no_safe_emulated_prefix(
    context: &str,
    instructions: &[Instruction],
    registers: &[Register],
) {
    let targets: Vec<u64> = instructions
        .iter()
        .filter(|instruction| instruction.op0_kind() == OpKind::NearBranch64)
        .map(Instruction::near_branch_target)
        .collect();
    for (i, instruction) in instructions.iter().enumerate() {
        if i > 0 && targets.contains(&instruction.ip()) {
            break;
        }
        assert_ne!(
            cost_class(instruction),
            Cost::Emulated,
            "{context}: `{}` at {:#x} on the prefix is emulated and safe, yet the probe is elsewhere",
            format_instruction(instruction),
            instruction.ip()
        );
        if instruction.flow_control() != FlowControl::Next || writes_any(instruction, registers) {
            break;
        }
    }
}

/// Where control goes after one instruction: the indices of the next
/// instructions, and whether it may return to the caller (`ret` or a tail
/// call). No successor and no return: a trap or a call that never returns.
fn successors(
    context: &str,
    instructions: &[Instruction],
    index: usize,
    function: std::ops::Range<u64>,
    never_returns: &dyn Fn(u64) -> bool,
) -> (Vec<usize>, bool) {
    let instruction = &instructions[index];
    let text = format_instruction(instruction);
    let at = |target: u64| {
        instructions
            .iter()
            .position(|i| i.ip() == target)
            .unwrap_or_else(|| panic!("{context}: `{text}` lands inside an instruction"))
    };
    let next = || {
        assert!(
            index + 1 < instructions.len(),
            "{context}: `{text}` runs off the function's end"
        );
        index + 1
    };
    match instruction.flow_control() {
        FlowControl::Next => (vec![next()], false),
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
            assert_eq!(
                instruction.op0_kind(),
                OpKind::NearBranch64,
                "{context}: `{text}`"
            );
            let target = instruction.near_branch_target();
            let mut to = Vec::new();
            if function.contains(&target) {
                to.push(at(target));
            }
            if instruction.flow_control() == FlowControl::ConditionalBranch {
                to.push(next());
            }
            (to, !function.contains(&target))
        }
        FlowControl::IndirectBranch => {
            // Nothing like a jump table in a function the probe left the prefix of.
            assert!(
                instruction.op0_kind() == OpKind::Register
                    || instruction.memory_index() == Register::None,
                "{context}: `{text}` may be a jump table"
            );
            (vec![], true)
        }
        FlowControl::Return => (vec![], true),
        FlowControl::Call | FlowControl::IndirectCall => {
            let diverges = match instructions.get(index + 1) {
                None => true,
                Some(after) => {
                    after.code() == Code::Int3
                        || after.flow_control() == FlowControl::Exception
                        || (instruction.op0_kind() == OpKind::NearBranch64
                            && never_returns(instruction.near_branch_target()))
                }
            };
            (if diverges { vec![] } else { vec![next()] }, false)
        }
        FlowControl::Interrupt | FlowControl::Exception => (vec![], false),
        FlowControl::XbeginXabortXend => panic!("{context}: `{text}`"),
    }
}

/// Marks what `starts` reach (themselves included) by `next`, never entering
/// `avoid`.
fn reach(
    count: usize,
    starts: &[usize],
    avoid: Option<usize>,
    next: impl Fn(usize) -> Vec<usize>,
) -> Vec<bool> {
    let mut seen = vec![false; count];
    let mut stack: Vec<usize> = starts
        .iter()
        .copied()
        .filter(|&s| Some(s) != avoid)
        .collect();
    for &start in &stack {
        seen[start] = true;
    }
    while let Some(node) = stack.pop() {
        for to in next(node) {
            if Some(to) != avoid && !seen[to] {
                seen[to] = true;
                stack.push(to);
            }
        }
    }
    seen
}

/// On a graph with one node per instruction: the probed instruction
/// `probe` runs exactly once on every path from the entry that returns
/// (every such path passes it, and no path comes back to it), and no
/// instruction on a path from the entry to it writes `registers` or calls.
fn check_runs_once(
    context: &str,
    instructions: &[Instruction],
    size: usize,
    probe: usize,
    registers: &[Register],
    never_returns: &dyn Fn(u64) -> bool,
) {
    let start = instructions[0].ip();
    let function = start..start + size as u64;
    let count = instructions.len();
    let edges: Vec<(Vec<usize>, bool)> = (0..count)
        .map(|i| successors(context, instructions, i, function.clone(), never_returns))
        .collect();
    let forward = |i: usize| edges[i].0.clone();
    let mut backward = vec![Vec::new(); count];
    for (from, (to, _)) in edges.iter().enumerate() {
        for &to in to {
            backward[to].push(from);
        }
    }
    let at_probe = format!("{context}: probe at {:#x}", instructions[probe].ip());

    let from_entry = reach(count, &[0], None, forward);
    assert!(from_entry[probe], "{at_probe}: the entry doesn't reach it");
    assert!(
        (0..count).any(|i| from_entry[i] && edges[i].1),
        "{at_probe}: the function never returns"
    );
    let after = reach(count, &edges[probe].0, None, forward);
    assert!(!after[probe], "{at_probe}: it is in a loop");
    let without = reach(count, &[0], Some(probe), forward);
    let missed: Vec<u64> = (0..count)
        .filter(|&i| without[i] && edges[i].1)
        .map(|i| instructions[i].ip())
        .collect();
    assert!(
        missed.is_empty(),
        "{at_probe}: returns at {missed:x?} without passing it"
    );
    let before = reach(count, &backward[probe], None, |i| backward[i].clone());
    for i in (0..count).filter(|&i| before[i] && from_entry[i]) {
        let instruction = &instructions[i];
        assert!(
            !writes_any(instruction, registers) && !is_call(instruction),
            "{at_probe}: `{}` at {:#x} may change {registers:?} before it",
            format_instruction(instruction),
            instruction.ip()
        );
    }
}

/// Is the function at `address` a panic function, by its symbols' names?
fn never_returns(file: &object::File, address: u64) -> bool {
    file.symbols()
        .filter(|symbol| symbol.address() == address)
        .filter_map(|symbol| symbol.name().ok())
        .any(|name| {
            let name = name.split_once(".llvm.").map_or(name, |(name, _)| name);
            let demangled = format!("{:#}", rustc_demangle::demangle(name));
            is_panic_function(demangled.split('<').next().unwrap_or_default())
        })
}

#[test]
fn every_probe_sits_on_a_safe_instruction_boundary() {
    for fixture in fixtures() {
        let file = object::File::parse(&*fixture.data).unwrap();
        let panics = |target: u64| never_returns(&file, target);
        let mut beyond = Vec::new();
        for site in &fixture.plan.sites {
            let code = function_code(&file, site.address);
            if check_site(&fixture.label(), site, code, &panics) == Placed::BeyondThePrefix {
                beyond.push(site.symbol.as_str());
            }
        }
        // `wake_by_ref` starts with `sub rsp,18h` and a CAS loop behind
        // padding the kernel won't probe: only the second strategy finds it
        // an emulated instruction.
        for site in &fixture.plan.sites {
            if site.symbol == "tokio::runtime::task::waker::wake_by_ref" {
                assert_eq!(site.cost, Cost::Emulated, "{}: {site:?}", fixture.label());
                assert!(
                    beyond.contains(&site.symbol.as_str()),
                    "{}: {site:?}",
                    fixture.label()
                );
            }
        }
        println!("{}: placed beyond the prefix: {beyond:?}", fixture.label());
    }
}

fn sites_of(plan: &ProbePlan, kind: SiteKind) -> Vec<&ProbeSite> {
    plan.sites.iter().filter(|site| site.kind == kind).collect()
}

#[test]
fn scheduler_event_sites_are_found_with_their_task_register() {
    for fixture in fixtures() {
        let plan = &fixture.plan;
        let label = &fixture.label();

        let spawns = sites_of(plan, SiteKind::Spawn);
        assert!(!spawns.is_empty(), "{label}: no spawn site");
        for site in &spawns {
            assert!(site.symbol.contains("OwnedTasks") && site.symbol.ends_with("::bind_inner"));
            assert_eq!(site.task_arg, TaskArg::Rsi, "{label}");
        }

        let wakes = sites_of(plan, SiteKind::Wake);
        for name in ["wake_by_val", "wake_by_ref"] {
            assert!(
                wakes
                    .iter()
                    .any(|site| site.symbol == format!("tokio::runtime::task::waker::{name}")),
                "{label}: no {name}"
            );
        }
        assert!(wakes.iter().all(|site| site.task_arg == TaskArg::Rdi));

        // Task ends: `OwnedTasks::remove` (RSI points at the header pointer)
        // where it exists, else the `raw::dealloc` instances (RDI).
        let ends = sites_of(plan, SiteKind::TaskEnd);
        assert!(!ends.is_empty(), "{label}: no task-end site");
        for site in &ends {
            let expected = if site.symbol.ends_with("::remove") {
                TaskArg::RsiDeref
            } else {
                TaskArg::Rdi
            };
            assert_eq!(site.task_arg, expected, "{label}: {}", site.symbol);
        }

        let unparks = sites_of(plan, SiteKind::Unpark);
        assert_eq!(unparks.len(), 1, "{label}");
        assert_eq!(unparks[0].task_arg, TaskArg::None);

        for site in &plan.sites {
            assert_eq!(
                site.needs_return_probe,
                site.kind.needs_return_probe() || site.task_arg == TaskArg::ReturnValue,
                "{label}: {site:?}"
            );
        }
        assert!(plan.warnings.is_empty(), "{label}: {:?}", plan.warnings);
    }
}

#[test]
fn sites_keep_their_kind_order() {
    let order = [
        SiteKind::Poll,
        SiteKind::Park,
        SiteKind::Spawn,
        SiteKind::Wake,
        SiteKind::TaskEnd,
        SiteKind::Unpark,
        SiteKind::AwaitPoint,
        SiteKind::BlockOn,
        SiteKind::RootPark,
        SiteKind::BlockOnPark,
        SiteKind::RootWake,
        SiteKind::RootPoll,
    ];
    for fixture in fixtures() {
        let ranks: Vec<usize> = fixture
            .plan
            .sites
            .iter()
            .map(|site| order.iter().position(|&kind| kind == site.kind).unwrap())
            .collect();
        assert!(ranks.is_sorted(), "{}: {ranks:?}", fixture.label());
    }
}

#[test]
fn table_shows_placement_and_warns_about_single_steps() {
    let fixture = fixtures().remove(0);
    let mut table = Vec::new();
    tracer_probes::write_table(&fixture.plan, &mut table).unwrap();
    let table = String::from_utf8(table).unwrap();
    println!("{table}");
    assert!(
        table.contains("PROBE AT") && table.contains("COST"),
        "{table}"
    );
    assert!(table.contains("emulated"), "{table}");
    let single_steps = fixture
        .plan
        .sites
        .iter()
        .filter(|site| site.cost == Cost::SingleStep)
        .count();
    let warnings = table
        .lines()
        .filter(|line| line.contains("single-steps"))
        .count();
    assert_eq!(single_steps, warnings, "{table}");
}
