//! What each task type's polls ended waiting on, for the summary: the
//! `waits_on` of their await points (`Symbols`), counted per primitive,
//! and its lines in the text report.

use std::collections::HashMap;
use std::fmt;

use crate::summary::TaskTypeSummary;
use crate::symbols::{Symbols, WaitsOn};

/// What polls ended waiting on, most polls first.
pub(crate) fn waits_on(
    await_points: &crate::FastMap<(u64, u64), u64>,
    symbols: &Symbols,
) -> Vec<(WaitsOn, u64)> {
    let mut counts: HashMap<WaitsOn, u64> = HashMap::new();
    for (&(task_id, key), &polls) in await_points {
        if let Some(waits_on) = symbols
            .await_point(task_id, key)
            .and_then(|(_, point)| point.waits_on)
        {
            *counts.entry(waits_on).or_default() += polls;
        }
    }
    let mut counts: Vec<(WaitsOn, u64)> = counts.into_iter().collect();
    counts.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then_with(|| a.0.kind.cmp(&b.0.kind))
            .then_with(|| a.0.name.cmp(b.0.name))
    });
    counts
}

/// "waits on (share of the type's polls):" and a line per task type that
/// has any, its four commonest primitives with their share of its polls.
pub(crate) fn fmt_waits_on(
    f: &mut fmt::Formatter<'_>,
    task_types: &[TaskTypeSummary],
) -> fmt::Result {
    let waiting: Vec<&TaskTypeSummary> = task_types
        .iter()
        .filter(|t| !t.waits_on.is_empty())
        .collect();
    if !waiting.is_empty() {
        writeln!(f, "waits on (share of the type's polls):")?;
    }
    for task_type in waiting {
        let polls = task_type.stats.polls.max(1);
        let parts: Vec<String> = task_type
            .waits_on
            .iter()
            .take(4)
            .map(|(waits_on, n)| format!("{} {}%", waits_on.label(), n * 100 / polls))
            .collect();
        writeln!(f, "  {}: {}", task_type.name, parts.join(", "))?;
    }
    Ok(())
}
