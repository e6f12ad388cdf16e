//! Reads the target ELF and builds its [`ProbePlan`]: which functions to
//! probe, where they are in the file, and what task types they poll.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use object::{Architecture, Object};

use crate::image::Image;
use crate::symbols::{FunctionSymbol, SymbolTable};
use crate::unwind::UnwindTable;
use crate::{
    PlanWarning, ProbePlan, ProbeSite, ReturnSite, SiteKind, TaskArg, WarningAbout, catalog,
    disasm, dwarf, naming, placement, return_sites, version,
};

/// Larger than any executable we would trace (debug builds of big programs
/// are a few hundred MB); a bound on what a mistaken path makes us read.
const MAX_EXECUTABLE_BYTES: u64 = 8 << 30;

/// Reads an executable: a regular file (a device or FIFO would be read
/// without end, or block), of a sane size.
fn read_executable(binary: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = binary.display();
    // Not blocking: opening a FIFO for reading waits for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(binary)
        .with_context(|| format!("cannot read {shown}"))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {shown}"))?;
    if !meta.is_file() {
        bail!("{shown} is not a regular file, so it is not an executable to trace");
    }
    if meta.len() > MAX_EXECUTABLE_BYTES {
        bail!(
            "{shown} is {} bytes, more than the {MAX_EXECUTABLE_BYTES} an executable is taken to be",
            meta.len()
        );
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_EXECUTABLE_BYTES)
        .read_to_end(&mut data)
        .with_context(|| format!("cannot read {shown}"))?;
    Ok(data)
}

/// Finds the probe sites of the tokio program at `binary`.
pub fn discover(binary: &Path) -> anyhow::Result<ProbePlan> {
    let data = read_executable(binary)?;
    let file = parse_x86_64_elf(binary, &data)?;
    let image = Image::new(&data, &file);
    let symbols = SymbolTable::read(&file);
    let unwind = UnwindTable::read(&file);
    let code = Code {
        image: &image,
        symbols: &symbols,
        unwind: &unwind,
    };

    let poll_groups = group_by_address(
        catalog::POLL_PATHS
            .iter()
            .flat_map(|path| symbols.with_path(path)),
    );
    if poll_groups.is_empty() {
        if !symbols.has_symtab {
            bail!(
                "{} is stripped: it has no symbol table (.symtab), so tokio's functions can't be found; \
                 rebuild without `strip` or point at the unstripped binary",
                binary.display()
            );
        }
        bail!(
            "{} does not look like a tokio program: no `tokio::runtime::task::raw::poll` among its {} \
             function symbols (searched .symtab and .dynsym for: {})",
            binary.display(),
            symbols.count,
            catalog::all_paths().join(", ")
        );
    }

    let park_paths = catalog::choose_park_paths(|path| symbols.has_path(path));
    let park_groups = group_by_address(park_paths.iter().flat_map(|path| symbols.with_path(path)));

    let mut warnings = Vec::new();
    if park_groups.is_empty() {
        warnings.push(PlanWarning::new(WarningAbout::Parks, format!(
            "no scheduler park function found (looked for: {}); polls will be traced but idle time will not",
            catalog::PARK_FAMILIES
                .iter()
                .flat_map(|family| family.alternatives.iter().flat_map(|alternative| alternative.iter()))
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    let dwarf_names = if dwarf::has_debug_info(&file) {
        dwarf::poll_task_types(&file, &poll_groups.keys().copied().collect::<Vec<_>>())
    } else {
        Default::default()
    };

    let mut sites = Vec::new();
    let mut skipped = Vec::new();
    for (&address, group) in &poll_groups {
        // `raw::poll(ptr: NonNull<Header>)`: the header is argument 0.
        let mut site =
            site(SiteKind::Poll, TaskArg::Rdi, address, group, &code).with_context(|| {
                format!(
                    "{}: poll function at {address:#x} is outside the file's sections",
                    binary.display()
                )
            })?;
        site.task_type =
            naming::name_poll_site(address, group, dwarf_names.get(&address), &symbols, &image);
        if site
            .task_type
            .as_ref()
            .is_some_and(|t| catalog::is_runtime_thread_body(&t.full))
        {
            skipped.push((site, "a runtime worker thread's whole life, not a task"));
            continue;
        }
        sites.push(site);
    }
    for (&address, group) in &park_groups {
        let site =
            site(SiteKind::Park, TaskArg::None, address, group, &code).with_context(|| {
                format!(
                    "{}: park function at {address:#x} is outside the file's sections",
                    binary.display()
                )
            })?;
        sites.push(site);
    }
    for family in catalog::EVENT_FAMILIES {
        let functions = catalog::choose_event_functions(family, |path| symbols.has_path(path));
        if functions.is_empty() {
            warnings.push(PlanWarning::new(
                WarningAbout::Events,
                missing_event_warning(family),
            ));
        }
        for function in functions {
            let groups = group_by_address(symbols.with_path(function.path));
            for (&address, group) in &groups {
                let site = site(family.kind, function.task_arg, address, group, &code)
                    .with_context(|| {
                        format!(
                            "{}: {} function at {address:#x} is outside the file's sections",
                            binary.display(),
                            family.kind.name()
                        )
                    })?;
                sites.push(site);
            }
        }
    }

    let tokio_version = image
        .read_only_data()
        .find_map(version::scan_tokio_version)
        .or_else(|| {
            // Panic locations may sit in a section we didn't classify as read-only.
            version::scan_tokio_version(&data)
        });
    let task_id_layout = task_id_layout(tokio_version.as_deref());
    if tokio_version.is_none() {
        warnings.push(PlanWarning::new(
            WarningAbout::TaskIds,
            "tokio version unknown: task ids will not be read",
        ));
    }
    let layout = tokio_version
        .as_deref()
        .map(version::parse_version)
        .and_then(catalog::task_layout);
    let poll_returns = match layout {
        Some(layout) => find_poll_returns(&code, layout.vtable_offset),
        None => Vec::new(),
    };
    if !park_groups.is_empty() {
        for scheduler in schedulers_without_park(&sites, &symbols) {
            warnings.push(PlanWarning::new(WarningAbout::Parks, format!(
                "no park function of the {scheduler} scheduler found (tokio < 1.17's current-thread \
                 scheduler parks from inside block_on): its idle time will not be traced"
            )));
        }
    }
    sites.extend(crate::block_on::sites(&code, &poll_returns)?);
    let uncovered = uncovered_schedulers(&sites, &poll_returns, &symbols);
    let poll_end_uretprobes = poll_returns.is_empty() || !uncovered.is_empty();
    if poll_returns.is_empty() {
        warnings.push(PlanWarning::new(
            WarningAbout::Polls,
            "no call of a task vtable's poll found (or the task header layout is unknown for \
             this tokio version): poll ends are traced by return probes (~0.2 µs more a poll)",
        ));
    } else if !uncovered.is_empty() {
        warnings.push(PlanWarning::new(WarningAbout::Polls, format!(
            "no call of a task vtable's poll found in {}'s code: poll ends are traced by return \
             probes as well (~0.2 µs more a poll)",
            uncovered.join(", ")
        )));
    }
    for site in poll_returns
        .iter()
        .filter(|site| site.cost == placement::Cost::SingleStep)
    {
        warnings.push(PlanWarning::new(
            WarningAbout::Polls,
            format!(
                "poll end probe after the call at {:#x} in {} single-steps `{}`: no emulated \
             instruction right after the return is safe to probe",
                site.call_address, site.function, site.instruction
            ),
        ));
    }

    Ok(ProbePlan {
        binary: binary.to_path_buf(),
        stripped: !symbols.has_symtab,
        debug_info: dwarf::has_debug_info(&file),
        tokio_version,
        sites,
        poll_returns,
        poll_end_uretprobes,
        skipped,
        task_id_layout,
        warnings,
    })
}

fn parse_x86_64_elf<'data>(
    binary: &Path,
    data: &'data [u8],
) -> anyhow::Result<object::File<'data>> {
    if !data.starts_with(b"\x7fELF") {
        bail!(
            "{} is not an ELF file (it doesn't start with the ELF magic bytes)",
            binary.display()
        );
    }
    let file = object::File::parse(data)
        .with_context(|| format!("{} is not a valid ELF file", binary.display()))?;
    if file.architecture() != Architecture::X86_64 {
        bail!(
            "{} is an ELF file for {:?}; only x86_64 binaries are supported",
            binary.display(),
            file.architecture()
        );
    }
    Ok(file)
}

/// One site per distinct address: identical code folding can give several
/// symbols (e.g. several `raw::poll` instances) the same code.
pub(crate) fn group_by_address<'a>(
    symbols: impl Iterator<Item = &'a FunctionSymbol>,
) -> BTreeMap<u64, Vec<&'a FunctionSymbol>> {
    let mut groups: BTreeMap<u64, Vec<&FunctionSymbol>> = BTreeMap::new();
    for symbol in symbols {
        groups.entry(symbol.address).or_default().push(symbol);
    }
    groups
}

/// "no wake function found (looked for: …): wakes will not be traced".
fn missing_event_warning(family: &catalog::EventFamily) -> String {
    let paths: Vec<&str> = family
        .alternatives
        .iter()
        .flat_map(|alternative| alternative.iter().map(|function| function.path))
        .collect();
    format!(
        "no {} function found (looked for: {}); {} will not be traced",
        family.kind.name(),
        paths.join(", "),
        family.untraced
    )
}

/// What placing a probe looks at: the file's bytes, and what its symbols and
/// unwind info say about the functions.
pub(crate) struct Code<'a> {
    pub(crate) image: &'a Image<'a>,
    pub(crate) symbols: &'a SymbolTable,
    pub(crate) unwind: &'a UnwindTable,
}

/// A site without a task type, its entry probe placed; `None` if the address
/// isn't backed by file bytes.
pub(crate) fn site(
    kind: SiteKind,
    task_arg: TaskArg,
    address: u64,
    group: &[&FunctionSymbol],
    code: &Code,
) -> Option<ProbeSite> {
    let image = code.image;
    let file_offset = image.file_offset(address)?;
    let mut names: Vec<&str> = group.iter().map(|symbol| symbol.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    // An x86-64 instruction is at most 15 bytes.
    let first_instruction = image
        .bytes(address, 15)
        .and_then(|code| disasm::first_instruction(code, address))
        .unwrap_or_else(|| "?".to_string());
    // Folded symbols share their code; the largest size covers all of it.
    let size = group.iter().map(|symbol| symbol.size).max().unwrap_or(15);
    let needs_return_probe = kind.needs_return_probe() || task_arg == TaskArg::ReturnValue;
    // A direct call to a panic function ends its path through the function.
    let never_returns = |target: u64| {
        code.symbols
            .at(target)
            .iter()
            .any(|symbol| placement::is_panic_function(&symbol.path))
    };
    let context = placement::FunctionContext {
        never_returns: &never_returns,
        has_landing_pads: code.unwind.may_have_landing_pads(address),
    };
    let placement = image
        .bytes(address, size)
        .and_then(|bytes| {
            // Await and spawn probes read the caller's address at [rsp]:
            // they may move only past instructions that leave RSP and the
            // stack alone.
            let mut inputs = task_arg.probe_inputs();
            if matches!(kind, SiteKind::AwaitPoint | SiteKind::Spawn) {
                inputs.reads_stack = true;
            }
            placement::place_entry(bytes, address, inputs, !needs_return_probe, &context)
        })
        .unwrap_or(placement::Placement {
            address,
            instruction: "?".to_string(),
            cost: placement::Cost::SingleStep,
            strategy: placement::Strategy::FirstInstruction,
        });
    Some(ProbeSite {
        kind,
        symbol: names.join(" | "),
        address,
        file_offset,
        first_instruction,
        probe_offset: file_offset + (placement.address - address),
        probe_instruction: placement.instruction,
        cost: placement.cost,
        needs_return_probe,
        task_arg,
        task_type: None,
    })
}

/// The schedulers (not the blocking pool) whose code is in the binary but
/// none of whose park functions is probed.
fn schedulers_without_park(sites: &[ProbeSite], symbols: &SymbolTable) -> Vec<&'static str> {
    let in_code = |function: &str, caller: &catalog::PollCaller| {
        caller
            .path_fragments
            .iter()
            .any(|fragment| function.contains(fragment))
    };
    catalog::POLL_CALLERS
        .iter()
        .filter(|caller| caller.name != "blocking pool")
        .filter(|caller| {
            symbols
                .functions()
                .any(|(_, group)| group.iter().any(|symbol| in_code(&symbol.path, caller)))
                && !sites
                    .iter()
                    .any(|site| site.kind == SiteKind::Park && in_code(&site.symbol, caller))
        })
        .map(|caller| caller.name)
        .collect()
}

/// The schedulers the binary has code of (for the blocking pool: a
/// `BlockingTask` is polled) whose `raw::poll` calls were not all found:
/// their poll ends would be missed at return sites.
///
/// A call is credited by the function holding it: a scheduler's own
/// (named by [`catalog::POLL_CALLERS`]), a shared task function (every
/// scheduler), the program's own code (current_thread: `block_on` inlined
/// into its caller, e.g. `main` under LTO), or std's thread start or
/// thread-local access (runtime threads' bodies inlined there: the
/// multi-thread workers and the blocking pool, never current_thread, which
/// runs on the thread that called `block_on`). The matrix test checks the
/// result: no poll abandoned in any cell.
fn uncovered_schedulers(
    sites: &[ProbeSite],
    returns: &[ReturnSite],
    symbols: &SymbolTable,
) -> Vec<&'static str> {
    let in_code = |function: &str, caller: &catalog::PollCaller| {
        caller
            .path_fragments
            .iter()
            .any(|fragment| function.contains(fragment))
    };
    let library = |function: &str| {
        ["tokio::", "std::", "core::", "alloc::", "<"]
            .iter()
            .any(|prefix| function.starts_with(prefix))
    };
    let credits = |function: &str, caller: &catalog::PollCaller| {
        if in_code(function, caller)
            || catalog::SHARED_POLL_CALLERS
                .iter()
                .any(|prefix| function.starts_with(prefix))
        {
            return true;
        }
        let named = catalog::POLL_CALLERS.iter().any(|c| in_code(function, c));
        match caller.name {
            "current_thread" => !named && !library(function),
            _ => !named && (function.starts_with("std::") || function.starts_with("core::")),
        }
    };
    catalog::POLL_CALLERS
        .iter()
        .filter(|caller| {
            let present = if caller.name == "blocking pool" {
                sites.iter().any(|site| {
                    site.task_type
                        .as_ref()
                        .is_some_and(|t| t.full.contains("BlockingTask<"))
                })
            } else {
                symbols
                    .functions()
                    .any(|(_, group)| group.iter().any(|symbol| in_code(&symbol.path, caller)))
            };
            present && !returns.iter().any(|site| credits(&site.function, caller))
        })
        .map(|caller| caller.name)
        .collect()
}

/// Every call of a task vtable's `poll` in the binary's functions, with
/// where its return probe goes; deduplicated, sorted by probed address.
fn find_poll_returns(code: &Code, vtable_offset: u64) -> Vec<ReturnSite> {
    let mut found: BTreeMap<u64, ReturnSite> = BTreeMap::new();
    for (address, symbols) in code.symbols.functions() {
        // Folded symbols share their code; the largest size covers all of it.
        let size = symbols.iter().map(|symbol| symbol.size).max().unwrap_or(0);
        let Some(bytes) = code.image.bytes(address, size) else {
            continue;
        };
        let placements = return_sites::poll_returns(bytes, address, vtable_offset);
        if placements.is_empty() {
            continue;
        }
        let mut names: Vec<&str> = symbols.iter().map(|symbol| symbol.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let function = names.join(" | ");
        for placement in placements {
            let Some(return_offset) = code.image.file_offset(placement.return_address) else {
                continue;
            };
            // A function nested in another (overlapping symbols) may find the
            // same call twice: keep the first, from the enclosing function.
            found
                .entry(placement.return_address)
                .or_insert_with(|| ReturnSite {
                    function: function.clone(),
                    call_address: placement.call_address,
                    return_address: placement.return_address,
                    address: placement.address,
                    file_offset: return_offset + (placement.address - placement.return_address),
                    instruction: placement.instruction,
                    cost: placement.cost,
                });
        }
    }
    let mut sites: Vec<ReturnSite> = found.into_values().collect();
    sites.sort_by_key(|site| (site.address, site.return_address));
    sites
}

/// Where the eBPF side finds the task id, for a tokio version (see
/// [`catalog::TASK_LAYOUTS`]). Unknown versions read no ids: guessing wrong
/// would report garbage as ids.
pub fn task_id_layout(tokio_version: Option<&str>) -> tracer_common::TaskIdLayout {
    match tokio_version
        .map(version::parse_version)
        .and_then(catalog::task_layout)
    {
        Some(catalog::TaskLayout {
            vtable_offset,
            id_offset_slot: Some(id_offset_slot),
            ..
        }) => tracer_common::TaskIdLayout {
            enabled: 1,
            _pad: 0,
            vtable_offset,
            id_offset_slot,
        },
        _ => tracer_common::TaskIdLayout::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_only_from_tokio_1_23() {
        assert_eq!(task_id_layout(Some("1.54.1")).enabled, 1);
        assert_eq!(task_id_layout(Some("1.54.1")).id_offset_slot, 9);
        assert_eq!(task_id_layout(Some("1.23.0")).enabled, 1);
        assert_eq!(task_id_layout(Some("1.22.9")).enabled, 0);
        assert_eq!(task_id_layout(None), tracer_common::TaskIdLayout::default());
    }
}
