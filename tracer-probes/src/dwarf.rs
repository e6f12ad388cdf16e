//! Task type names from DWARF debug info.
//!
//! rustc describes each `raw::poll::<T, S>` instance as a `DW_TAG_subprogram`
//! whose `DW_AT_low_pc` is the function's address, with a
//! `DW_TAG_template_type_parameter` named "T" pointing at the future's type.
//! That type DIE only carries its last segment (`{async_fn_env#0}`); the full
//! path comes from the namespaces around it. The subprogram's own
//! `DW_AT_name` (`poll<multi_worker::f::{async_fn_env#0}, …>`) is the fallback.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use gimli::{AttributeValue, EndianSlice, RunTimeEndian, UnitOffset, UnitSectionOffset};
use object::{Object, ObjectSection};

use crate::generics;

pub(crate) type Reader<'data> = EndianSlice<'data, RunTimeEndian>;
pub(crate) type Unit<'data> = gimli::Unit<Reader<'data>>;

/// A DIE anywhere in `.debug_info`, by its section offset.
pub(crate) type GlobalOffset = usize;

/// Does the binary carry DWARF describing its functions?
pub fn has_debug_info(file: &object::File) -> bool {
    file.section_by_name(".debug_info")
        .is_some_and(|section| section.size() > 0)
}

/// The full type path of `T` for each `raw::poll` instance address that the
/// debug info describes. Addresses it doesn't describe are absent. Malformed
/// debug info gives an empty map rather than an error: the caller falls back
/// to symbols.
pub fn poll_task_types(file: &object::File, poll_addresses: &[u64]) -> HashMap<u64, String> {
    read_poll_task_types(file, poll_addresses).unwrap_or_default()
}

/// A `raw::poll` instance as the debug info describes it.
pub(crate) struct PollDie {
    pub(crate) address: u64,
    /// `DW_AT_name`, e.g. `poll<m::f::{async_fn_env#0}, alloc::sync::Arc<…>>`.
    name: Option<String>,
    /// The DIE of `T`'s type.
    pub(crate) task_type: Option<GlobalOffset>,
}

fn read_poll_task_types(
    file: &object::File,
    poll_addresses: &[u64],
) -> gimli::Result<HashMap<u64, String>> {
    let endian = if file.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let load_section = |id: gimli::SectionId| -> gimli::Result<Cow<[u8]>> {
        Ok(file
            .section_by_name(id.name())
            .and_then(|section| section.uncompressed_data().ok())
            .unwrap_or(Cow::Borrowed(&[])))
    };
    let sections = gimli::DwarfSections::load(load_section)?;
    let dwarf = sections.borrow(|section| EndianSlice::new(section, endian));

    let mut units = Vec::new();
    let mut headers = dwarf.units();
    while let Some(header) = headers.next()? {
        units.push(dwarf.unit(header)?);
    }

    let wanted: HashSet<u64> = poll_addresses.iter().copied().collect();
    let mut polls = Vec::new();
    for unit in &units {
        find_poll_dies(&dwarf, &units, unit, &wanted, &mut polls)?;
    }

    let type_dies: HashSet<GlobalOffset> = polls.iter().filter_map(|poll| poll.task_type).collect();
    let type_names = qualified_names(&dwarf, &units, &type_dies)?;

    let mut names = HashMap::new();
    for poll in polls {
        let from_type_die = poll.task_type.and_then(|die| type_names.get(&die).cloned());
        let from_subprogram_name = poll.name.as_deref().and_then(first_generic_arg);
        if let Some(name) = from_type_die.or(from_subprogram_name) {
            names.entry(poll.address).or_insert(name);
        }
    }
    Ok(names)
}

/// `poll<A, B>` → `A`.
fn first_generic_arg(subprogram_name: &str) -> Option<String> {
    let open = subprogram_name.find('<')?;
    generics::generic_args_at(subprogram_name, open)?
        .into_iter()
        .next()
}

pub(crate) fn find_poll_dies(
    dwarf: &gimli::Dwarf<Reader>,
    units: &[Unit],
    unit: &Unit,
    wanted: &HashSet<u64>,
    polls: &mut Vec<PollDie>,
) -> gimli::Result<()> {
    let mut cursor = unit.entries();
    while let Some(entry) = cursor.next_dfs()? {
        if entry.tag() != gimli::DW_TAG_subprogram {
            continue;
        }
        let Some(low_pc) = entry.attr_value(gimli::DW_AT_low_pc) else {
            continue;
        };
        let Some(address) = dwarf.attr_address(unit, low_pc)? else {
            continue;
        };
        if !wanted.contains(&address) {
            continue;
        }
        let name = match entry.attr_value(gimli::DW_AT_name) {
            Some(value) => Some(
                dwarf
                    .attr_string(unit, value)?
                    .to_string_lossy()
                    .into_owned(),
            ),
            None => None,
        };
        let task_type = template_param_t(dwarf, units, unit, entry.offset())?;
        polls.push(PollDie {
            address,
            name,
            task_type,
        });
    }
    Ok(())
}

/// The type of the template parameter "T" among the children of `die`. An
/// out-of-line copy of an inlined function may keep its template parameters
/// on the abstract instance (`DW_AT_abstract_origin`/`DW_AT_specification`),
/// so follow those a few hops.
fn template_param_t(
    dwarf: &gimli::Dwarf<Reader>,
    units: &[Unit],
    unit: &Unit,
    die: UnitOffset,
) -> gimli::Result<Option<GlobalOffset>> {
    let (mut unit, mut die) = (unit, die);
    for _hop in 0..3 {
        let mut tree = unit.entries_tree(Some(die))?;
        let root = tree.root()?;
        let origin = root
            .entry()
            .attr_value(gimli::DW_AT_abstract_origin)
            .or_else(|| root.entry().attr_value(gimli::DW_AT_specification));
        let mut children = root.children();
        while let Some(child) = children.next()? {
            let entry = child.entry();
            if entry.tag() != gimli::DW_TAG_template_type_parameter {
                continue;
            }
            let is_t = match entry.attr_value(gimli::DW_AT_name) {
                Some(value) => dwarf.attr_string(unit, value)?.slice() == b"T",
                None => false,
            };
            if is_t {
                return Ok(entry
                    .attr_value(gimli::DW_AT_type)
                    .and_then(|value| global_offset(unit, value)));
            }
        }
        let Some(next) = origin
            .and_then(|value| global_offset(unit, value))
            .and_then(|g| locate(units, g))
        else {
            return Ok(None);
        };
        (unit, die) = next;
    }
    Ok(None)
}

/// A reference attribute as a `.debug_info` section offset.
pub(crate) fn global_offset(unit: &Unit, value: AttributeValue<Reader>) -> Option<GlobalOffset> {
    match value {
        AttributeValue::UnitRef(offset) => Some(offset.to_unit_section_offset(&unit.header).0),
        AttributeValue::DebugInfoRef(offset) => Some(offset.0),
        _ => None,
    }
}

/// The unit holding a DIE, and the DIE's offset in it.
pub(crate) fn locate<'u, 'data>(
    units: &'u [Unit<'data>],
    global: GlobalOffset,
) -> Option<(&'u Unit<'data>, UnitOffset)> {
    units.iter().find_map(|unit| {
        UnitSectionOffset(global)
            .to_unit_offset(&unit.header)
            .map(|offset| (unit, offset))
    })
}

/// The full path (`crate::module::fn_name::{async_fn_env#0}`) of each DIE in
/// `dies`, from the named namespaces, structs, enums and unions around it.
pub(crate) fn qualified_names(
    dwarf: &gimli::Dwarf<Reader>,
    units: &[Unit],
    dies: &HashSet<GlobalOffset>,
) -> gimli::Result<HashMap<GlobalOffset, String>> {
    let mut names = HashMap::new();
    for unit in units {
        let holds_a_wanted_die = dies.iter().any(|&global| {
            UnitSectionOffset(global)
                .to_unit_offset(&unit.header)
                .is_some()
        });
        if !holds_a_wanted_die {
            continue;
        }
        // The names of the enclosing scopes, with their depths.
        let mut scopes: Vec<(isize, String)> = Vec::new();
        let mut cursor = unit.entries();
        while let Some(entry) = cursor.next_dfs()? {
            let depth = entry.depth();
            while scopes
                .last()
                .is_some_and(|(scope_depth, _)| *scope_depth >= depth)
            {
                scopes.pop();
            }
            let name = match entry.attr_value(gimli::DW_AT_name) {
                Some(value) => dwarf
                    .attr_string(unit, value)?
                    .to_string_lossy()
                    .into_owned(),
                None => continue,
            };
            let global = entry.offset().to_unit_section_offset(&unit.header).0;
            if dies.contains(&global) {
                let mut path: Vec<&str> = scopes.iter().map(|(_, scope)| scope.as_str()).collect();
                path.push(&name);
                names.insert(global, path.join("::"));
            }
            let is_scope = matches!(
                entry.tag(),
                gimli::DW_TAG_namespace
                    | gimli::DW_TAG_structure_type
                    | gimli::DW_TAG_enumeration_type
                    | gimli::DW_TAG_union_type
            );
            if is_scope {
                scopes.push((depth, name));
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprogram_name_gives_first_generic_arg() {
        let name = "poll<multi_worker::fixture_sleeper::{async_fn_env#0}, alloc::sync::Arc<tokio::runtime::scheduler::current_thread::Handle, alloc::alloc::Global>>";
        assert_eq!(
            first_generic_arg(name).as_deref(),
            Some("multi_worker::fixture_sleeper::{async_fn_env#0}")
        );
        assert_eq!(first_generic_arg("poll"), None);
    }
}
