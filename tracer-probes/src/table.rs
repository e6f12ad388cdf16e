//! The human table of `rt-ebpf-trace probes`: all columns left-aligned,
//! two spaces apart, laid out by the `tabular` crate (as the summary's
//! tables are, in tracer-timeline).

use std::io::{self, Write};

use tabular::Row;

use crate::features::{self, FeatureSupport, Support};
use crate::{Cost, NameSource, ProbePlan, ProbeSite, ReturnSite, SiteKind, TaskArg};

const COLUMNS: usize = 8;

const HEADERS: [&str; COLUMNS] = [
    "KIND",
    "SYMBOL",
    "ADDRESS",
    "FILE OFFSET",
    "PROBE AT",
    "PROBED INSTRUCTION",
    "COST",
    "TASK",
];

/// Writes a summary line, one row per site (kind, symbol, address, file
/// offset of the function, where its entry probe goes (`+0x0` = the first
/// instruction; `+ret` marks a uretprobe too: parks, spawns read on return,
/// and polls only when no return site was found), the probed instruction, its
/// cost class, and the task type or the register the task is read from),
/// then one `poll end` row per place `raw::poll` returns to (address = the
/// return address, probe at = where its probe goes from there, task = the
/// call's address) and a line counting them, then a warning per
/// single-stepped probe, the skipped sites and the plan's warnings.
pub fn write_table(plan: &ProbePlan, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{}: tokio {}, {} sites{}",
        plan.binary.display(),
        plan.tokio_version.as_deref().unwrap_or("version unknown"),
        plan.sites.len(),
        if plan.stripped { " (no .symtab)" } else { "" }
    )?;
    let rows: Vec<[String; COLUMNS]> = plan
        .sites
        .iter()
        .map(|site| row(site, uretprobe(plan, site)))
        .chain(plan.poll_returns.iter().map(return_row))
        .collect();
    let mut table = tabular::Table::new(&["{:<}"; COLUMNS].join("  "));
    table.add_row(
        HEADERS
            .iter()
            .fold(Row::new(), |row, cell| row.with_cell(cell)),
    );
    for cells in &rows {
        table.add_row(
            cells
                .iter()
                .fold(Row::new(), |row, cell| row.with_cell(cell)),
        );
    }
    write!(out, "{table}")?;
    writeln!(
        out,
        "{} call site(s) of a task vtable's poll found: poll ends are probed after them",
        plan.poll_returns.len()
    )?;
    for site in plan
        .sites
        .iter()
        .filter(|site| site.cost == Cost::SingleStep)
    {
        writeln!(
            out,
            "warning: {} probe on {} at {:#x} single-steps `{}` (~20x the cost of an emulated probe){}",
            site.kind.name(),
            site.symbol,
            site.address + (site.probe_offset - site.file_offset),
            site.probe_instruction,
            if site.needs_return_probe {
                ": a return-probed site must stay on its first instruction"
            } else {
                ": no emulated instruction it runs exactly once per call is safe to probe"
            }
        )?;
    }
    for (site, why) in &plan.skipped {
        let task = site.task_type.as_ref().map_or("?", |t| t.short.as_str());
        writeln!(
            out,
            "not probed: {} at {:#x} ({task}): {why}",
            site.symbol, site.address
        )?;
    }
    for warning in &plan.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    writeln!(out, "what a trace of this binary will hold:")?;
    for FeatureSupport { feature, support } in features::feature_support(plan) {
        let line = match support {
            Support::Supported => "supported".to_string(),
            Support::Degraded(why) => format!("degraded: {why}"),
            Support::Missing(why) => format!("MISSING: {why}"),
        };
        writeln!(out, "  {feature:<14} {line}")?;
    }
    Ok(())
}

/// Whether the tracer attaches a uretprobe to the site: polls end at their
/// return sites instead when the plan has them.
fn uretprobe(plan: &ProbePlan, site: &ProbeSite) -> bool {
    match site.kind {
        SiteKind::Poll => plan.poll_returns.is_empty(),
        _ => site.needs_return_probe,
    }
}

fn row(site: &ProbeSite, uretprobe: bool) -> [String; COLUMNS] {
    let task = match (&site.task_type, site.kind, site.task_arg) {
        (Some(task), _, _) => {
            let source = match task.source {
                NameSource::Dwarf => "dwarf",
                NameSource::Symbols => "symbols",
            };
            format!("{} ({source})", task.short)
        }
        (None, SiteKind::Poll, _) => format!("task@{:#x}", site.address),
        (None, _, TaskArg::Rdi) => "header in rdi".to_string(),
        (None, _, TaskArg::Rsi) => "header in rsi".to_string(),
        (None, _, TaskArg::RsiDeref) => "header at [rsi]".to_string(),
        (None, _, TaskArg::None) => "-".to_string(),
        (None, _, TaskArg::ReturnValue) => "header returned".to_string(),
    };
    let probe_at = format!(
        "+{:#x}{}",
        site.probe_offset - site.file_offset,
        if uretprobe { " +ret" } else { "" }
    );
    let cost = cost_name(site.cost);
    [
        site.kind.name().to_string(),
        site.symbol.clone(),
        format!("{:#x}", site.address),
        format!("{:#x}", site.file_offset),
        probe_at,
        site.probe_instruction.clone(),
        cost.to_string(),
        task,
    ]
}

fn return_row(site: &ReturnSite) -> [String; COLUMNS] {
    [
        "poll end".to_string(),
        site.function.clone(),
        format!("{:#x}", site.return_address),
        format!(
            "{:#x}",
            site.file_offset - (site.address - site.return_address)
        ),
        format!("+{:#x}", site.address - site.return_address),
        site.instruction.clone(),
        cost_name(site.cost).to_string(),
        format!("call at {:#x}", site.call_address),
    ]
}

fn cost_name(cost: Cost) -> &'static str {
    match cost {
        Cost::Emulated => "emulated",
        Cost::SingleStep => "SINGLE-STEP",
    }
}
