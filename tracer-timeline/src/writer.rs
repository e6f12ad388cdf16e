//! The one interface between the timeline and a trace file format.
//!
//! The [`Timeline`](crate::timeline::Timeline) decides what a trace shows
//! ([`TimelineOutput`]s); a [`TraceWriter`] only says it in its format:
//! [`perfetto`](crate::perfetto) writes Perfetto's native protobuf (the
//! default), [`json`](crate::json) the Chrome JSON trace-event format. A new
//! kind of event touches the timeline and these two writers, nothing else.
//!
//! Writers write into any `W: Write` they are given and never touch files:
//! where the bytes go, whether they are compressed, and when the file
//! appears under its name are the caller's business.

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::output::TimelineOutput;
use crate::symbols::Symbols;
use crate::task_types::TaskTypes;

/// What every writer needs besides the outputs: who was traced, what the
/// task types are called, and the recording's stacks, already symbolized.
pub struct TraceInfo {
    pub pid: u32,
    /// The process track's name.
    pub process_name: String,
    /// When recording started (`CLOCK_MONOTONIC` ns): JSON's time zero.
    pub start_ns: u64,
    pub types: TaskTypes,
    pub symbols: Symbols,
}

pub trait TraceWriter {
    /// Writes one output. Outputs come in the timeline's order.
    fn write(&mut self, output: &TimelineOutput) -> Result<()>;

    /// Writes the trace's metadata (a JSON object of numbers and strings:
    /// lost events, tokio version, recording cost…) and the format's
    /// trailer, and flushes. The writer must not be used afterwards.
    fn finish(&mut self, metadata: &Value) -> Result<()>;
}

/// The trace file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Perfetto's native protobuf (`.pftrace`, also `.perfetto-trace`).
    Perfetto,
    /// Chrome's JSON trace-event format (`.json`).
    Json,
}

impl Format {
    /// The format a path asks for, and whether it is gzip-compressed
    /// (`.gz`): `.json` is JSON, anything else Perfetto's protobuf.
    pub fn for_path(path: &Path) -> (Format, bool) {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let (name, gzip) = match name.strip_suffix(".gz") {
            Some(name) => (name.to_owned(), true),
            None => (name, false),
        };
        let format = if name.ends_with(".json") {
            Format::Json
        } else {
            Format::Perfetto
        };
        (format, gzip)
    }

    /// Average bytes an event takes in this format (uncompressed), measured
    /// on full-mode traces of the HTTP benchmark workload (BENCHMARKS.md):
    /// for size estimates while recording.
    pub fn bytes_per_event(self) -> u64 {
        match self {
            Format::Perfetto => 31,
            Format::Json => 312,
        }
    }

    /// A writer for this format into `out` (which should be buffered).
    pub fn writer<'a, W: Write + 'a>(
        self,
        out: W,
        info: &'a TraceInfo,
    ) -> Result<Box<dyn TraceWriter + 'a>> {
        Ok(match self {
            Format::Perfetto => Box::new(crate::perfetto::PerfettoWriter::new(out, info)?),
            Format::Json => Box::new(crate::json::JsonWriter::new(out, info)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_picks_the_format() {
        let cases = [
            ("trace.pftrace", Format::Perfetto, false),
            ("x/trace.pftrace.gz", Format::Perfetto, true),
            ("trace.json", Format::Json, false),
            ("TRACE.JSON.GZ", Format::Json, true),
            ("trace", Format::Perfetto, false),
        ];
        for (path, format, gzip) in cases {
            assert_eq!(Format::for_path(Path::new(path)), (format, gzip), "{path}");
        }
    }
}
