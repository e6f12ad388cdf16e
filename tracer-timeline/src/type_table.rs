//! Totals per task type, kept in a `Vec` indexed by the probe site.
//!
//! Why not a map: every request on a server touches its task type's totals
//! three times (the wake, the poll's start, its end), and a site is a small
//! dense number (the index in the probe plan, which the eBPF side reports
//! as the attach cookie), so an index replaces three hash lookups a
//! request. A site beyond [`DENSE_SITES`] (only a malformed event would
//! carry one) and tasks never polled (`None`) go to a map, so a bad event
//! cannot make the table huge.

use crate::FastMap;
use crate::tasks::TaskTypeStats;

/// Sites below this are indexed; probe plans have a few hundred at most.
const DENSE_SITES: u32 = 1 << 12;

#[derive(Default)]
pub(crate) struct TypeTable {
    dense: Vec<Option<TaskTypeStats>>,
    /// Sites past `DENSE_SITES`, and `None`.
    other: FastMap<Option<u32>, TaskTypeStats>,
}

impl TypeTable {
    /// The totals of `site`'s type, created empty on first use.
    pub(crate) fn entry(&mut self, site: Option<u32>) -> &mut TaskTypeStats {
        match site {
            Some(site) if site < DENSE_SITES => {
                let index = site as usize;
                if index >= self.dense.len() {
                    self.dense.resize_with(index + 1, || None);
                }
                self.dense[index].get_or_insert_with(TaskTypeStats::default)
            }
            other => self.other.entry(other).or_default(),
        }
    }

    /// Every type with totals, dense sites first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Option<u32>, &TaskTypeStats)> {
        let dense = self.dense.iter().enumerate();
        dense
            .filter_map(|(site, stats)| Some((Some(site as u32), stats.as_ref()?)))
            .chain(self.other.iter().map(|(site, stats)| (*site, stats)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_found_again_by_site_dense_or_not() {
        let mut table = TypeTable::default();
        table.entry(Some(3)).polls += 1;
        table.entry(Some(3)).polls += 1;
        table.entry(None).tasks += 1;
        table.entry(Some(u32::MAX)).polls += 5;
        let mut seen: Vec<(Option<u32>, u64, u64)> = table
            .iter()
            .map(|(site, stats)| (site, stats.polls, stats.tasks))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [(None, 0, 1), (Some(3), 2, 0), (Some(u32::MAX), 5, 0)]
        );
        assert!(table.dense.len() <= 4, "a huge site is not indexed");
    }
}
