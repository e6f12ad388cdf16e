//! Where `raw::poll` returns to, on the real fixture programs in both build
//! profiles: each return site is checked against the fixture's own bytes,
//! decoded here from the enclosing symbol independently of `discover`.

mod common;
use test_support as support;

use common::fixtures;
use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use support::Profile;
use tracer_probes::placement::cost_class;
use tracer_probes::{Cost, ReturnSite};

/// The decoded instructions of every function symbol that holds `address`.
fn enclosing_functions(file: &object::File, address: u64) -> Vec<Vec<Instruction>> {
    let mut functions = Vec::new();
    for symbol in file.symbols() {
        if symbol.kind() != SymbolKind::Text
            || symbol.size() == 0
            || !(symbol.address()..symbol.address() + symbol.size()).contains(&address)
        {
            continue;
        }
        let section = file
            .sections()
            .find(|s| symbol.address() >= s.address() && symbol.address() < s.address() + s.size())
            .expect("a section holds the function");
        let start = (symbol.address() - section.address()) as usize;
        let code = &section.data().unwrap()[start..start + symbol.size() as usize];
        let mut decoder = Decoder::with_ip(64, code, symbol.address(), DecoderOptions::NONE);
        let mut instructions = Vec::new();
        while decoder.can_decode() {
            instructions.push(decoder.decode());
        }
        functions.push(instructions);
    }
    functions
}

fn file_offset(file: &object::File, address: u64) -> u64 {
    let section = file
        .sections()
        .find(|s| address >= s.address() && address < s.address() + s.size())
        .expect("a section holds the address");
    let (offset, _) = section.file_range().expect("the section has file bytes");
    address - section.address() + offset
}

/// `call qword ptr [reg]`, no index, no displacement, no segment override.
fn is_call_through_register(instruction: &Instruction) -> bool {
    instruction.code() == Code::Call_rm64
        && instruction.op0_kind() == OpKind::Memory
        && instruction.memory_base().is_gpr64()
        && instruction.memory_index() == Register::None
        && instruction.memory_displacement64() == 0
        && instruction.segment_prefix() == Register::None
}

/// Does some enclosing function, decoded linearly from its start, have the
/// call at `call_address` followed by the return address, and the probe on
/// an emulated instruction of the straight-line run from there?
fn check_site(label: &str, file: &object::File, site: &ReturnSite) {
    let context = format!(
        "{label}: {} call at {:#x}",
        site.function, site.call_address
    );
    assert_eq!(
        site.file_offset,
        file_offset(file, site.address),
        "{context}"
    );
    assert!(site.address >= site.return_address, "{context}");
    let functions = enclosing_functions(file, site.call_address);
    assert!(!functions.is_empty(), "{context}: no symbol holds the call");
    let confirmed = functions.iter().any(|instructions| {
        let Some(call) = instructions
            .iter()
            .position(|instruction| instruction.ip() == site.call_address)
        else {
            return false;
        };
        if !is_call_through_register(&instructions[call])
            || instructions[call].next_ip() != site.return_address
        {
            return false;
        }
        // The straight-line run from the return address up to the probe.
        for instruction in &instructions[call + 1..] {
            if instruction.ip() == site.address {
                return cost_class(instruction) == Cost::Emulated
                    && site.cost == Cost::Emulated
                    && !site.instruction.is_empty();
            }
            if instruction.ip() > site.address || instruction.flow_control() != FlowControl::Next {
                return false;
            }
        }
        false
    });
    assert!(
        confirmed,
        "{context}: return {:#x}, probe {:#x} `{}` is not an emulated instruction on the \
         straight-line run after a `call qword ptr [reg]`",
        site.return_address, site.address, site.instruction
    );
}

#[test]
fn every_return_site_follows_a_vtable_call_and_probes_an_emulated_instruction() {
    for fixture in fixtures() {
        let label = fixture.label();
        let sites = &fixture.plan.poll_returns;
        assert!(!sites.is_empty(), "{label}: no return site found");
        let file = object::File::parse(&*fixture.data).unwrap();
        for site in sites {
            check_site(&label, &file, site);
        }
        // Deduplicated, in address order.
        let addresses: Vec<u64> = sites.iter().map(|site| site.address).collect();
        assert!(addresses.is_sorted(), "{label}: {addresses:x?}");
        let mut returns: Vec<u64> = sites.iter().map(|site| site.return_address).collect();
        returns.sort_unstable();
        returns.dedup();
        assert_eq!(returns.len(), sites.len(), "{label}: duplicate sites");
    }
}

#[test]
fn the_schedulers_run_task_contributes_sites() {
    for fixture in fixtures() {
        let label = fixture.label();
        let in_function = |path: &str| {
            fixture
                .plan
                .poll_returns
                .iter()
                .filter(|site| site.function.contains(path))
                .count()
        };
        // Linked into both fixtures, and not inlined away in either profile.
        assert!(
            in_function("tokio::runtime::scheduler::multi_thread::worker::Context::run_task") >= 1,
            "{label}: {:#?}",
            fixture.plan.poll_returns
        );
        // Under fat LTO the current-thread scheduler's run_task is inlined
        // into the fixture's `main`.
        let current_thread_run_task = match fixture.profile {
            Profile::Lto => format!("{}::main", fixture.name),
            _ => "tokio::runtime::scheduler::current_thread::Context::run_task".to_string(),
        };
        if fixture.name == "current_thread" {
            assert!(
                in_function(&current_thread_run_task) >= 1,
                "{label}: {:#?}",
                fixture.plan.poll_returns
            );
        }
    }
}

#[test]
fn table_lists_the_return_sites() {
    for fixture in fixtures() {
        let mut table = Vec::new();
        tracer_probes::write_table(&fixture.plan, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        let rows: Vec<&str> = table
            .lines()
            .filter(|line| line.starts_with("poll end "))
            .collect();
        assert_eq!(rows.len(), fixture.plan.poll_returns.len(), "{table}");
        for (row, site) in rows.iter().zip(&fixture.plan.poll_returns) {
            let expected = format!("{:#x}", site.return_address);
            assert!(row.contains(&expected), "{row}");
            assert!(row.contains("emulated"), "{row}");
        }
        let count = format!(
            "{} call site(s) of a task vtable's poll found",
            fixture.plan.poll_returns.len()
        );
        assert!(table.contains(&count), "{table}");
    }
}
