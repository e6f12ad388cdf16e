//! Probe placement and the scheduler-event sites on the real fixture
//! programs, in both build profiles. Each placed probe is checked against the
//! fixture's own bytes, decoded here independently of `discover`.

#[path = "../../tests/support/mod.rs"]
mod support;

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, OpKind,
    Register,
};
use object::{Object, ObjectSection, ObjectSymbol};
use support::Profile;
use tracer_probes::placement::{cost_class, format_instruction};
use tracer_probes::{Cost, ProbePlan, ProbeSite, SiteKind, TaskArg, discover};

const FIXTURES: [&str; 2] = ["multi_worker", "current_thread"];

/// A fixture's plan and the file it came from.
struct Fixture {
    label: String,
    plan: ProbePlan,
    data: Vec<u8>,
}

fn fixtures() -> Vec<Fixture> {
    let mut all = Vec::new();
    for name in FIXTURES {
        for profile in Profile::ALL {
            let path = support::fixture(name, profile);
            let plan = discover(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            all.push(Fixture {
                label: format!("{name} ({profile:?})"),
                plan,
                data: std::fs::read(&path).unwrap(),
            });
        }
    }
    all
}

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

/// Checks one site against the function's decoded bytes.
fn check_site(label: &str, site: &ProbeSite, code: &[u8]) {
    let instructions = decode_all(code, site.address);
    let probe = probe_address(site);
    let context = format!("{label}: {} at {:#x}", site.symbol, site.address);

    // An instruction boundary on the straight-line prefix.
    let index = instructions
        .iter()
        .position(|instruction| instruction.ip() == probe)
        .unwrap_or_else(|| panic!("{context}: probe {probe:#x} is not an instruction boundary"));
    let before = &instructions[..index];
    assert!(
        before
            .iter()
            .all(|instruction| instruction.flow_control() == FlowControl::Next),
        "{context}: the probe is past a branch"
    );
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
        return;
    }

    // Nothing before it changes what the eBPF program reads.
    let registers = read_registers(site);
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

    // Emulated whenever the safe part of the prefix has an emulated instruction.
    if site.cost == Cost::SingleStep {
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
                "{context}: `{}` at {:#x} is emulated and safe, yet the probe single-steps",
                format_instruction(instruction),
                instruction.ip()
            );
            if instruction.flow_control() != FlowControl::Next
                || writes_any(instruction, &registers)
            {
                break;
            }
        }
    }
}

#[test]
fn every_probe_sits_on_a_safe_instruction_boundary() {
    for fixture in fixtures() {
        let file = object::File::parse(&*fixture.data).unwrap();
        for site in &fixture.plan.sites {
            check_site(&fixture.label, site, function_code(&file, site.address));
        }
    }
}

fn sites_of(plan: &ProbePlan, kind: SiteKind) -> Vec<&ProbeSite> {
    plan.sites.iter().filter(|site| site.kind == kind).collect()
}

#[test]
fn scheduler_event_sites_are_found_with_their_task_register() {
    for fixture in fixtures() {
        let plan = &fixture.plan;
        let label = &fixture.label;

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
                matches!(site.kind, SiteKind::Poll | SiteKind::Park)
                    || site.task_arg == TaskArg::ReturnValue,
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
    ];
    for fixture in fixtures() {
        let ranks: Vec<usize> = fixture
            .plan
            .sites
            .iter()
            .map(|site| order.iter().position(|&kind| kind == site.kind).unwrap())
            .collect();
        assert!(ranks.is_sorted(), "{}: {ranks:?}", fixture.label);
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
