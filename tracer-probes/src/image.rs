//! Maps virtual addresses of the binary to bytes of the file.

use object::{Object, ObjectSection, SectionKind};

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
        }
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
