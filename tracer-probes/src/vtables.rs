//! Where each task type's vtable is: the statics whose first word is a
//! `raw::poll::<T, S>` instance.
//!
//! Why: every task header holds a pointer to its type's `Vtable` (offset 16
//! in every tokio 1.x `Header`, a `repr(C)` struct), and `Vtable::poll` is
//! its first field. So the binary itself says which word values in the heap
//! can be a task's vtable pointer — a scan of the heap for those values
//! finds task headers (`dump`). In a position-independent executable the
//! word is 0 in the file and filled by an `R_X86_64_RELATIVE` relocation
//! whose addend is the function's address; in a fixed-address executable
//! the file holds the address itself. Both are looked for.

use std::collections::{BTreeSet, HashSet};

use object::{Object, ObjectSection, SectionKind};

/// A task vtable: its address (in the ELF's address space) and the
/// `raw::poll` instance it starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskVtable {
    pub address: u64,
    pub poll: u64,
}

/// All task vtables of `file` whose first word is one of `poll_addresses`.
pub fn task_vtables(file: &object::File, poll_addresses: &[u64]) -> Vec<TaskVtable> {
    let polls: HashSet<u64> = poll_addresses.iter().copied().collect();
    let mut found = BTreeSet::new();
    if let Some(relocations) = file.dynamic_relocations() {
        for (offset, relocation) in relocations {
            let addend = relocation.addend();
            if addend > 0 && polls.contains(&(addend as u64)) {
                found.insert(TaskVtable {
                    address: offset,
                    poll: addend as u64,
                });
            }
        }
    }
    for section in file.sections() {
        if section.address() == 0
            || !matches!(
                section.kind(),
                SectionKind::Data | SectionKind::ReadOnlyData
            )
        {
            continue;
        }
        let Ok(data) = section.data() else { continue };
        for (index, word) in data.chunks_exact(8).enumerate() {
            let value = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if polls.contains(&value) && section.address() % 8 == 0 {
                found.insert(TaskVtable {
                    address: section.address() + index as u64 * 8,
                    poll: value,
                });
            }
        }
    }
    found.into_iter().collect()
}
