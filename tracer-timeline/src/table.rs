//! The summary's text tables: columns that line up, the first left-aligned
//! (names), the others right-aligned (figures), indented under their
//! heading. The layout is the `tabular` crate's, as for `rt-ebpf-trace
//! probes` (tracer-probes' table), so the two tables are drawn by one
//! renderer; this only says which columns align how.

use std::fmt;

use tabular::Row;

/// A table with a header row.
pub struct Table {
    columns: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            columns: header.len(),
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Adds a row; missing cells are empty, extra ones are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn write(&self, f: &mut fmt::Formatter<'_>, indent: usize) -> fmt::Result {
        let spec = format!("{:indent$}{{:<}}", "") + &"  {:>}".repeat(self.columns - 1);
        let mut table = tabular::Table::new(&spec);
        for cells in &self.rows {
            let mut row = Row::new();
            for column in 0..self.columns {
                row.add_cell(cells.get(column).map_or("", String::as_str));
            }
            table.add_row(row);
        }
        write!(f, "{table}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Shown(Table);

    impl fmt::Display for Shown {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.write(f, 2)
        }
    }

    #[test]
    fn names_left_figures_right_indented() {
        let mut table = Table::new(&["worker", "tid", "polls", "longest poll"]);
        table.row(vec![
            "tokio-runtime-w #0".into(),
            "101".into(),
            "1000".into(),
            "1.0 ms".into(),
        ]);
        table.row(vec!["w".into(), "7".into(), "23".into(), "2.0 µs".into()]);
        assert_eq!(
            Shown(table).to_string(),
            "  worker              tid  polls  longest poll\n  \
               tokio-runtime-w #0  101   1000        1.0 ms\n  \
               w                     7     23        2.0 µs\n"
        );
    }
}
