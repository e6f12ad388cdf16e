//! The names of the embedded eBPF object's maps, globals and programs are
//! `tracer_common::names`: aya-ebpf names each part after its identifier
//! (its `name = ` arguments take only literals, so the eBPF side cannot use
//! the constants), and the loader finds them by these constants. A name
//! spelled differently on one side would only fail at load time, as root;
//! this test reads the built object's symbol table instead.

use std::collections::BTreeSet;

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use tracer_common::names::{globals, maps, programs};

use super::loader::EBPF_OBJECT;

/// aya-log's own parts, which its macros declare in the object.
const AYA_LOG_MAPS: [&str; 1] = ["AYA_LOGS"];
const AYA_LOG_GLOBALS: [&str; 1] = ["AYA_LOG_LEVEL"];

/// What the object declares: (maps, globals, programs by section).
struct Declared {
    maps: BTreeSet<String>,
    globals: BTreeSet<String>,
    programs: BTreeSet<(String, String)>,
}

fn declared() -> Declared {
    super::loader::check_object().expect("the tracer embeds the eBPF object");
    let file = object::File::parse(EBPF_OBJECT).expect("the embedded eBPF object is an ELF file");
    let mut declared = Declared {
        maps: BTreeSet::new(),
        globals: BTreeSet::new(),
        programs: BTreeSet::new(),
    };
    for symbol in file
        .symbols()
        .filter(|s| s.is_global() && s.is_definition())
    {
        let Some(index) = symbol.section_index() else {
            continue;
        };
        let section = file.section_by_index(index).expect("a symbol's section");
        let section = section.name().expect("a section name").to_owned();
        let name = symbol.name().expect("a symbol name").to_owned();
        match (symbol.kind(), section.as_str()) {
            (SymbolKind::Data, "maps") => {
                declared.maps.insert(name);
            }
            (SymbolKind::Data, ".rodata" | ".data" | ".bss") => {
                declared.globals.insert(name);
            }
            // Helpers the compiler emits (memcpy, memset, …) live in .text;
            // programs in a section named after their kind.
            (SymbolKind::Text, ".text") => {}
            (SymbolKind::Text, _) => {
                declared.programs.insert((name, section));
            }
            _ => {}
        }
    }
    declared
}

fn set<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    names.into_iter().map(str::to_owned).collect()
}

#[test]
fn every_map_is_named_in_tracer_common_and_none_else() {
    let expected = set(maps::ALL.into_iter().chain(AYA_LOG_MAPS));
    assert_eq!(declared().maps, expected);
}

#[test]
fn every_global_is_named_in_tracer_common_and_none_else() {
    let expected = set(globals::ALL.into_iter().chain(AYA_LOG_GLOBALS));
    assert_eq!(declared().globals, expected);
}

#[test]
fn every_program_is_named_in_tracer_common_and_none_else() {
    let programs = declared().programs;
    let names: BTreeSet<String> = programs.iter().map(|(name, _)| name.clone()).collect();
    let expected = set(programs::UPROBES
        .into_iter()
        .chain(programs::WATCH_UPROBES)
        .chain([
            programs::SAMPLE,
            programs::WATCH_SAMPLE,
            programs::WATCH_SWITCH,
            programs::WATCH_WAKEUP,
            programs::POLL_PREEMPTED,
        ]));
    assert_eq!(names, expected);
    // The loaders treat the uprobe lists as uprobes or uretprobes, the
    // samplers as perf event programs, the switch and wakeup as BTF tracepoints.
    for (name, section) in &programs {
        let kinds: &[&str] = if name == programs::SAMPLE || name == programs::WATCH_SAMPLE {
            &["perf_event"]
        } else if name == programs::WATCH_SWITCH || name == programs::POLL_PREEMPTED {
            &["tp_btf/sched_switch"]
        } else if name == programs::WATCH_WAKEUP {
            &["tp_btf/sched_wakeup"]
        } else {
            &["uprobe", "uretprobe"]
        };
        assert!(
            kinds.contains(&section.as_str()),
            "{name} is in section {section}"
        );
    }
}
