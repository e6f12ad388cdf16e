//! Maps virtual addresses of the binary to bytes of the file.

use std::collections::HashMap;

use object::{Object, ObjectSection, RelocationFlags, SectionKind};

/// One section loaded from the file (`.bss`-like sections have no bytes and
/// are left out).
struct LoadedSection {
    address: u64,
    size: u64,
    file_offset: u64,
}

/// The file's bytes and where its sections sit in memory.
pub struct Image<'data> {
    data: &'data [u8],
    sections: Vec<LoadedSection>,
    read_only_ranges: Vec<(u64, u64)>,
    /// Pointers the dynamic loader fills in (a PIE's GOT slots and
    /// vtables hold 0 in the file): slot address → target address, from
    /// `R_X86_64_RELATIVE` addends.
    relocated: HashMap<u64, u64>,
}

impl<'data> Image<'data> {
    pub fn new(data: &'data [u8], file: &object::File<'data>) -> Self {
        let mut sections = Vec::new();
        let mut read_only_ranges = Vec::new();
        for section in file.sections() {
            let Some((file_offset, size)) = section.file_range() else {
                continue;
            };
            // Address 0 means "not loaded" (debug info, symbol tables).
            if section.address() == 0 {
                continue;
            }
            sections.push(LoadedSection {
                address: section.address(),
                size,
                file_offset,
            });
            if matches!(
                section.kind(),
                SectionKind::ReadOnlyData | SectionKind::ReadOnlyString
            ) {
                read_only_ranges.push((file_offset, size));
            }
        }
        Image {
            data,
            sections,
            read_only_ranges,
            relocated: relocated_pointers(file),
        }
    }

    /// The pointer stored at virtual `address` once the program is loaded:
    /// the relocation's target, else the file's 8 bytes there (a
    /// fixed-address executable); `None` if it is 0 or not in the file.
    pub fn pointer_at(&self, address: u64) -> Option<u64> {
        if let Some(&target) = self.relocated.get(&address) {
            return Some(target);
        }
        let bytes = self.bytes(address, 8)?;
        let value = u64::from_le_bytes(bytes.try_into().ok()?);
        (value != 0).then_some(value)
    }

    /// Where the byte at virtual `address` is in the file: address − section
    /// address + section file offset, for the section holding it.
    pub fn file_offset(&self, address: u64) -> Option<u64> {
        self.sections
            .iter()
            .find(|section| address >= section.address && address - section.address < section.size)
            .map(|section| address - section.address + section.file_offset)
    }

    /// `len` bytes from virtual `address`, cut short at the end of the section.
    pub fn bytes(&self, address: u64, len: u64) -> Option<&'data [u8]> {
        let section = self.sections.iter().find(|section| {
            address >= section.address && address - section.address < section.size
        })?;
        let start = address - section.address + section.file_offset;
        let section_end = section.file_offset + section.size;
        let end = start.saturating_add(len).min(section_end);
        self.data
            .get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }

    /// The bytes of the read-only data sections (string literals, panic locations).
    pub fn read_only_data(&self) -> impl Iterator<Item = &'data [u8]> + '_ {
        self.read_only_ranges.iter().filter_map(|&(offset, size)| {
            self.data
                .get(usize::try_from(offset).ok()?..usize::try_from(offset + size).ok()?)
        })
    }
}

/// Slot → target for the dynamic relocations that store a known address:
/// `R_X86_64_RELATIVE` (a PIE's pointers to its own functions; symbol
/// relocations point into other files, which the naming does not follow).
fn relocated_pointers(file: &object::File) -> HashMap<u64, u64> {
    let mut pointers = HashMap::new();
    let Some(relocations) = file.dynamic_relocations() else {
        return pointers;
    };
    for (slot, relocation) in relocations {
        let RelocationFlags::Elf { r_type } = relocation.flags() else {
            continue;
        };
        if r_type == object::elf::R_X86_64_RELATIVE
            && let Ok(target) = u64::try_from(relocation.addend())
            && target != 0
        {
            pointers.insert(slot, target);
        }
    }
    pointers
}
