//! Task vtables on the real fixture programs in both build profiles: each
//! probed `raw::poll` instance has a vtable, and what follows its first word
//! is the rest of tokio's `Vtable` — six more functions — checked against
//! the fixture's own symbol table, independently of `vtables`.

mod common;
use test_support as support;

use std::collections::HashSet;

use common::fixtures;
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use tracer_probes::SiteKind;
use tracer_probes::vtables::task_vtables;

/// The word at `address` of the loaded image: the file's bytes, or the
/// addend of the relative relocation that fills it at load time.
fn word_at(file: &object::File, address: u64) -> Option<u64> {
    if let Some(relocations) = file.dynamic_relocations()
        && let Some((_, relocation)) = relocations
            .into_iter()
            .find(|(offset, _)| *offset == address)
    {
        return Some(relocation.addend() as u64);
    }
    let section = file
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&address))?;
    let data = section.data().ok()?;
    let at = (address - section.address()) as usize;
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

#[test]
fn every_poll_site_has_a_vtable_of_functions() {
    for fixture in fixtures() {
        let file = object::File::parse(&*fixture.data).unwrap();
        let functions: HashSet<u64> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text)
            .map(|s| s.address())
            .collect();
        let polls: Vec<u64> = fixture
            .plan
            .sites
            .iter()
            .filter(|s| s.kind == SiteKind::Poll)
            .map(|s| s.address)
            .collect();
        let vtables = task_vtables(&file, &polls);
        for poll in &polls {
            let found: Vec<_> = vtables.iter().filter(|v| v.poll == *poll).collect();
            assert!(
                !found.is_empty(),
                "{}: no vtable for poll {poll:#x}",
                fixture.label()
            );
            for vtable in found {
                // poll, schedule, dealloc, try_read_output, drop_join_handle_slow,
                // drop_abort_handle, shutdown: all functions.
                for index in 0..7 {
                    let word = word_at(&file, vtable.address + index * 8).unwrap();
                    assert!(
                        functions.contains(&word),
                        "{}: vtable {:#x} word {index} = {word:#x} is no function",
                        fixture.label(),
                        vtable.address
                    );
                }
            }
        }
    }
}
