//! The summary's text tables: columns that line up, the first left-aligned
//! (names), the others right-aligned (figures).
//!
//! `rt-ebpf-trace probes` has its own table (tracer-probes' `table.rs`, all
//! columns left-aligned, no indent): sharing one renderer would need a crate
//! both depend on, and neither depends on the other.

use std::fmt;

/// A text table whose columns line up: the first column left-aligned, the
/// others right-aligned.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn write(&self, f: &mut fmt::Formatter<'_>, indent: usize) -> fmt::Result {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|column| {
                self.rows
                    .iter()
                    .map(|row| row.get(column).map_or(0, |cell| cell.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            write!(f, "{:indent$}", "")?;
            for (column, width) in widths.iter().enumerate() {
                let cell = row.get(column).map_or("", String::as_str);
                if column == 0 {
                    write!(f, "{cell:<width$}")?;
                } else {
                    write!(f, "  {cell:>width$}")?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
