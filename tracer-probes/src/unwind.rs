//! Which functions an unwinding panic may resume in: those whose `.eh_frame`
//! entry (FDE) points at an LSDA, the table of their landing pads.

use gimli::{BaseAddresses, CieOrFde, EhFrame, LittleEndian, UnwindSection};
use object::{Object, ObjectSection};

/// The address ranges `.eh_frame` describes, and whether each has an LSDA.
pub struct UnwindTable {
    /// (start, end, has an LSDA), sorted by start.
    ranges: Vec<(u64, u64, bool)>,
}

impl UnwindTable {
    /// Reads `.eh_frame`; stops at the first entry it can't parse (the
    /// functions after it are then unknown).
    pub fn read(file: &object::File) -> Self {
        let mut ranges = Vec::new();
        if let Some(section) = file.section_by_name(".eh_frame")
            && let Ok(data) = section.data()
        {
            let mut eh_frame = EhFrame::new(data, LittleEndian);
            eh_frame.set_address_size(8);
            let mut bases = BaseAddresses::default().set_eh_frame(section.address());
            if let Some(text) = file.section_by_name(".text") {
                bases = bases.set_text(text.address());
            }
            let mut entries = eh_frame.entries(&bases);
            while let Ok(Some(entry)) = entries.next() {
                let CieOrFde::Fde(partial) = entry else {
                    continue;
                };
                let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else {
                    break;
                };
                ranges.push((
                    fde.initial_address(),
                    fde.end_address(),
                    fde.lsda().is_some(),
                ));
            }
        }
        ranges.sort_unstable();
        UnwindTable { ranges }
    }

    /// May an unwinding panic resume inside the function at `address`? Yes
    /// if its FDE has an LSDA, and when no FDE covers it (nothing says no).
    pub fn may_have_landing_pads(&self, address: u64) -> bool {
        let after = self
            .ranges
            .partition_point(|&(start, _, _)| start <= address);
        match after.checked_sub(1).map(|index| self.ranges[index]) {
            Some((start, end, has_lsda)) if (start..end).contains(&address) => has_lsda,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test program (panic=unwind) has functions with landing pads
    /// and functions without.
    #[test]
    fn reads_which_functions_have_landing_pads() {
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let table = UnwindTable::read(&file);
        assert!(table.ranges.len() > 100, "{} FDEs", table.ranges.len());
        let with = table.ranges.iter().filter(|range| range.2).count();
        assert!(with > 0 && with < table.ranges.len(), "{with} with an LSDA");
        for &(start, end, has_lsda) in table.ranges.iter().take(50) {
            if start < end {
                assert_eq!(table.may_have_landing_pads(start), has_lsda);
            }
        }
        // Nothing describes address 0: unknown, so maybe.
        assert!(table.may_have_landing_pads(0));
    }
}
