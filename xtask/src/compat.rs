//! The compatibility matrix's dev side: building the compat service for
//! every cell (as the user, before the tests run as root) and writing the
//! README's table from the results the matrix test leaves in each cell's
//! directory. The matrix itself is data in `tests/compat/matrix.rs`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow};

#[path = "../../tests/compat/matrix.rs"]
mod matrix;

pub use matrix::{Cell, all_cells, fast_cells};

use crate::cmd::{self, step};

/// Builds the compat service for `cells`, one after the other (2 cores:
/// cargo already uses both).
pub fn build(cells: &[Cell]) -> Result<()> {
    let repo = cmd::repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut built = std::collections::BTreeSet::new();
    for cell in cells {
        if !built.insert(cell.build_slug()) {
            continue;
        }
        step(&format!("building the compat service for {}", cell.slug()));
        matrix::build(&repo, cell, Path::new(&cargo)).map_err(|e| anyhow!(e))?;
    }
    Ok(())
}

const START: &str = "<!-- compat-table:start (cargo xtask test --matrix writes this) -->";
const END: &str = "<!-- compat-table:end -->";

/// Rewrites the table between the README's markers from the results of
/// the last matrix run; cells without results are shown as not run.
pub fn write_table() -> Result<()> {
    let repo = cmd::repo_root();
    let table = table(&repo)?;
    let readme_path = repo.join("README.md");
    let readme = std::fs::read_to_string(&readme_path).context("read README.md")?;
    let (Some(start), Some(end)) = (readme.find(START), readme.find(END)) else {
        return Err(anyhow!("README.md has no compat-table markers"));
    };
    let updated = format!("{}{START}\n{table}{}", &readme[..start], &readme[end..]);
    std::fs::write(&readme_path, updated).context("write README.md")?;
    step("README.md: compatibility table updated");
    Ok(())
}

fn table(repo: &Path) -> Result<String> {
    let mut header = String::from("| tokio | scheduler | profile |");
    let mut rule = String::from("| --- | --- | --- |");
    for feature in matrix::FEATURES {
        header.push_str(&format!(" {} |", feature.name()));
        rule.push_str(" :-: |");
    }
    let mut notes: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows = String::new();
    for cell in all_cells() {
        let results = read_results(&matrix::result_file(repo, &cell));
        let mut row = format!(
            "| {} | {} | {} |",
            results
                .get("tokio")
                .map(|(version, _)| version.clone())
                .unwrap_or_else(|| cell.version.label.to_owned()),
            match cell.flavour {
                matrix::Flavour::Multi => "multi-thread",
                matrix::Flavour::Current => "current-thread",
            },
            cell.profile.label
        );
        for feature in matrix::FEATURES {
            let mark = match results.get(feature.name()) {
                None => "not run".to_owned(),
                Some((status, note)) => match status.as_str() {
                    "ok" => "✓".to_owned(),
                    "n/a" => "–".to_owned(),
                    "gap" => {
                        let next = notes.len() + 1;
                        let n = *notes.entry(note.clone()).or_insert(next);
                        format!("✗ [{n}](#compat-note-{n})")
                    }
                    _ => "FAIL".to_owned(),
                },
            };
            row.push_str(&format!(" {mark} |"));
        }
        rows.push_str(&row);
        rows.push('\n');
    }
    let mut text = format!("{header}\n{rule}\n{rows}\n");
    let mut ordered: Vec<(usize, String)> = notes.into_iter().map(|(n, i)| (i, n)).collect();
    ordered.sort();
    for (n, note) in ordered {
        text.push_str(&format!("<a id=\"compat-note-{n}\"></a>{n}. {note}\n"));
    }
    Ok(text)
}

/// `feature \t status \t note` lines, as the matrix test writes them.
fn read_results(path: &Path) -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            Some((
                parts.next()?.to_owned(),
                (
                    parts.next()?.to_owned(),
                    parts.next().unwrap_or("").to_owned(),
                ),
            ))
        })
        .collect()
}
