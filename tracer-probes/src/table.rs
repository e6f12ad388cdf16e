//! The human table of `rt-ebpf-trace probes`.

use std::io::{self, Write};

use crate::{NameSource, ProbePlan, ProbeSite, SiteKind};

const HEADERS: [&str; 6] = [
    "KIND",
    "SYMBOL",
    "ADDRESS",
    "FILE OFFSET",
    "FIRST INSTRUCTION",
    "TASK TYPE",
];

/// Writes a summary line, one row per site (kind, symbol, address, file
/// offset, first instruction, task type), then any warnings.
pub fn write_table(plan: &ProbePlan, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{}: tokio {}, {} sites{}",
        plan.binary.display(),
        plan.tokio_version.as_deref().unwrap_or("version unknown"),
        plan.sites.len(),
        if plan.stripped { " (no .symtab)" } else { "" }
    )?;
    let rows: Vec<[String; 6]> = plan.sites.iter().map(row).collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    write_row(out, &HEADERS.map(String::from), &widths)?;
    for row in &rows {
        write_row(out, row, &widths)?;
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
    Ok(())
}

fn row(site: &ProbeSite) -> [String; 6] {
    let kind = match site.kind {
        SiteKind::Poll => "poll",
        SiteKind::Park => "park",
    };
    let task_type = match (&site.task_type, site.kind) {
        (Some(task), _) => {
            let source = match task.source {
                NameSource::Dwarf => "dwarf",
                NameSource::Symbols => "symbols",
                NameSource::Unknown => "?",
            };
            format!("{} ({source})", task.short)
        }
        (None, SiteKind::Poll) => format!("task@{:#x}", site.address),
        (None, SiteKind::Park) => "-".to_string(),
    };
    [
        kind.to_string(),
        site.symbol.clone(),
        format!("{:#x}", site.address),
        format!("{:#x}", site.file_offset),
        site.first_instruction.clone(),
        task_type,
    ]
}

fn write_row(out: &mut dyn Write, cells: &[String; 6], widths: &[usize; 6]) -> io::Result<()> {
    let line: Vec<String> = cells
        .iter()
        .zip(widths)
        .map(|(cell, &width)| format!("{cell:<width$}"))
        .collect();
    writeln!(out, "{}", line.join("  ").trim_end())
}
