//! The short report printed when recording ends.

use std::fmt;
use std::path::PathBuf;

use crate::timeline::ThreadStats;

/// One traced thread, as shown in the summary table.
pub struct WorkerSummary {
    pub tid: u32,
    pub name: String,
    pub stats: ThreadStats,
}

/// Everything the end-of-run report shows. Its `Display` is the report.
pub struct Summary {
    /// How long recording ran; the denominator of the busy percentages.
    pub duration_ns: u64,
    pub workers: Vec<WorkerSummary>,
    /// Events read from the ring buffer.
    pub events: u64,
    /// Events the kernel dropped because the ring buffer was full.
    pub lost_events: u64,
    /// Ends without a start (tracing began mid-poll or mid-park).
    pub unmatched_ends: u64,
    /// Polls left out because their end event never came (see
    /// `Timeline::abandoned`).
    pub abandoned_polls: u64,
    /// The trace file, if one was written.
    pub output: Option<PathBuf>,
    pub trace_bytes: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "recorded {}", human_duration(self.duration_ns))?;
        self.fmt_worker_table(f)?;
        self.fmt_event_counts(f)?;
        match &self.output {
            Some(path) => {
                writeln!(
                    f,
                    "trace: {} ({})",
                    path.display(),
                    human_bytes(self.trace_bytes)
                )?;
                writeln!(f, "  open it at https://ui.perfetto.dev (Open trace file)")
            }
            None => writeln!(f, "trace: none written"),
        }
    }
}

impl Summary {
    fn fmt_worker_table(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.workers.is_empty() {
            return writeln!(f, "no worker activity seen");
        }
        let name_width = self
            .workers
            .iter()
            .map(|w| w.name.chars().count())
            .max()
            .unwrap_or(0)
            .max("worker".len());
        writeln!(
            f,
            "  {:<name_width$}  {:>8}  {:>10}  {:>10}  {:>7}  {:>12}",
            "worker", "tid", "polls", "parks", "busy", "longest poll"
        )?;
        for worker in &self.workers {
            let stats = &worker.stats;
            writeln!(
                f,
                "  {:<name_width$}  {:>8}  {:>10}  {:>10}  {:>7}  {:>12}",
                worker.name,
                worker.tid,
                stats.polls,
                stats.parks,
                busy_percent(stats.busy_ns, self.duration_ns),
                human_duration(stats.longest_poll_ns),
            )?;
        }
        Ok(())
    }

    fn fmt_event_counts(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "events: {} ({} lost)", self.events, self.lost_events)?;
        if self.lost_events > 0 {
            writeln!(
                f,
                "WARNING: {} events were lost because the ring buffer was full, so the trace has gaps; \
                 raise --ring-buffer-size",
                self.lost_events
            )?;
        }
        if self.unmatched_ends > 0 {
            writeln!(
                f,
                "note: {} end events had no matching start (tracing began mid-poll or mid-park) and were dropped",
                self.unmatched_ends
            )?;
        }
        if self.abandoned_polls > 0 {
            writeln!(
                f,
                "note: {} polls were left out because their end event never arrived",
                self.abandoned_polls
            )?;
        }
        Ok(())
    }
}

/// `busy_ns` as a share of the recording, e.g. "45.2%"; "-" for an empty recording.
fn busy_percent(busy_ns: u64, duration_ns: u64) -> String {
    if duration_ns == 0 {
        return "-".to_owned();
    }
    let permille = div_round(u128::from(busy_ns) * 1000, u128::from(duration_ns));
    format!("{}.{}%", permille / 10, permille % 10)
}

/// A duration in the largest unit that keeps it readable:
/// "850 ns", "12.3 µs", "45.0 ms", "2.50 s".
pub fn human_duration(ns: u64) -> String {
    let ns = u128::from(ns);
    if ns < 1_000 {
        return format!("{ns} ns");
    }
    // Round first, then pick the unit, so 999_960 ns reads "1.0 ms", not "1000.0 µs".
    let tenths_of_us = div_round(ns, 100);
    if tenths_of_us < 10_000 {
        return format!("{}.{} µs", tenths_of_us / 10, tenths_of_us % 10);
    }
    let tenths_of_ms = div_round(ns, 100_000);
    if tenths_of_ms < 10_000 {
        return format!("{}.{} ms", tenths_of_ms / 10, tenths_of_ms % 10);
    }
    let hundredths_of_s = div_round(ns, 10_000_000);
    format!("{}.{:02} s", hundredths_of_s / 100, hundredths_of_s % 100)
}

/// A file size, e.g. "512 B", "3.4 MB" (decimal units, like `ls -h --si`).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut scale = 1000u128;
    let mut unit = 0;
    loop {
        let tenths = div_round(u128::from(bytes) * 10, scale);
        if tenths < 10_000 || unit == UNITS.len() - 1 {
            return format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit]);
        }
        scale *= 1000;
        unit += 1;
    }
}

/// `numerator / denominator`, rounded half up. u128 so callers can scale
/// any u64 without overflow.
fn div_round(numerator: u128, denominator: u128) -> u128 {
    (numerator + denominator / 2) / denominator
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(tid: u32, name: &str, busy_ns: u64, longest_poll_ns: u64) -> WorkerSummary {
        WorkerSummary {
            tid,
            name: name.to_owned(),
            stats: ThreadStats {
                polls: 1200 + u64::from(tid),
                parks: 30,
                busy_ns,
                longest_poll_ns,
                ..ThreadStats::default()
            },
        }
    }

    fn summary(lost_events: u64) -> Summary {
        Summary {
            duration_ns: 2_000_000_000,
            workers: vec![
                worker(101, "tokio-runtime-worker", 500_000_000, 12_345_678),
                worker(102, "my-pool-7", 1_998_000_000, 850),
            ],
            events: 123_456,
            lost_events,
            unmatched_ends: 0,
            abandoned_polls: 0,
            output: Some(PathBuf::from("/tmp/out/trace.json")),
            trace_bytes: 4_567_890,
        }
    }

    /// The table row that mentions `needle`.
    fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
        text.lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
    }

    #[test]
    fn lists_every_worker_with_busy_share_and_longest_poll() {
        let text = summary(0).to_string();
        assert!(text.contains("recorded 2.00 s"), "{text}");
        let first = line_with(&text, "tokio-runtime-worker");
        assert!(
            first.contains("101")
                && first.contains("1301")
                && first.contains("25.0%")
                && first.contains("12.3 ms"),
            "{first}"
        );
        let second = line_with(&text, "my-pool-7");
        assert!(
            second.contains("102")
                && second.contains("1302")
                && second.contains("99.9%")
                && second.contains("850 ns"),
            "{second}"
        );
    }

    #[test]
    fn table_columns_line_up() {
        let text = summary(0).to_string();
        let header = line_with(&text, "longest poll");
        let rows = [
            line_with(&text, "tokio-runtime-worker"),
            line_with(&text, "my-pool-7"),
        ];
        for row in rows {
            assert_eq!(
                row.chars().count(),
                header.chars().count(),
                "\n{header}\n{row}"
            );
        }
    }

    #[test]
    fn says_plainly_when_nothing_was_lost() {
        let text = summary(0).to_string();
        assert!(text.contains("123456 (0 lost)"), "{text}");
        assert!(!text.contains("WARNING"), "{text}");
    }

    #[test]
    fn warns_when_events_were_lost() {
        let text = summary(77).to_string();
        let warning = line_with(&text, "WARNING");
        assert!(
            warning.contains("77") && warning.contains("--ring-buffer-size"),
            "{warning}"
        );
    }

    #[test]
    fn points_to_the_trace_and_perfetto() {
        let text = summary(0).to_string();
        assert!(text.contains("/tmp/out/trace.json (4.6 MB)"), "{text}");
        assert!(text.contains("https://ui.perfetto.dev"), "{text}");

        let text = Summary {
            output: None,
            ..summary(0)
        }
        .to_string();
        assert!(!text.contains("perfetto"), "{text}");
    }

    #[test]
    fn mentions_unmatched_ends_only_when_there_are_some() {
        assert!(!summary(0).to_string().contains("no matching start"));
        let text = Summary {
            unmatched_ends: 4,
            abandoned_polls: 0,
            ..summary(0)
        }
        .to_string();
        assert!(
            line_with(&text, "no matching start").contains('4'),
            "{text}"
        );
    }

    #[test]
    fn empty_recording_does_not_divide_by_zero() {
        let text = Summary {
            duration_ns: 0,
            ..summary(0)
        }
        .to_string();
        assert!(line_with(&text, "my-pool-7").contains(" - "), "{text}");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(0), "0 ns");
        assert_eq!(human_duration(850), "850 ns");
        assert_eq!(human_duration(999), "999 ns");
        assert_eq!(human_duration(1_000), "1.0 µs");
        assert_eq!(human_duration(12_345), "12.3 µs");
        assert_eq!(
            human_duration(999_960),
            "1.0 ms",
            "rounding moves up a unit"
        );
        assert_eq!(human_duration(45_000_000), "45.0 ms");
        assert_eq!(human_duration(2_500_000_000), "2.50 s");
        assert_eq!(human_duration(3_600_000_000_000), "3600.00 s");
        assert_eq!(human_duration(u64::MAX), "18446744073.71 s");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(999_999), "1.0 MB");
        assert_eq!(human_bytes(4_567_890), "4.6 MB");
        assert_eq!(human_bytes(u64::MAX), "18446744.1 TB");
    }
}
