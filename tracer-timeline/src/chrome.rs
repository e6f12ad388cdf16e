//! Streams a Chrome trace-event JSON file (the format the Perfetto UI and
//! `chrome://tracing` open):
//!
//! ```text
//! {"displayTimeUnit":"ns","traceEvents":[
//! {"ph":"X",...},
//! ...
//! ],"metadata":{...}}
//! ```
//!
//! A recording can run for minutes and produce millions of events, so events
//! are written as they come, one per line, into the writer the caller gives
//! (buffered there); nothing is kept in memory. Files (where, how, when the
//! trace appears under its name) are the caller's business.

use std::io::{self, Write};

use anyhow::{Context, Result};
use serde_json::Value;

const HEADER: &[u8] = br#"{"displayTimeUnit":"ns","traceEvents":["#;

pub struct ChromeTraceWriter<W: Write> {
    out: W,
    events_written: u64,
}

impl<W: Write> ChromeTraceWriter<W> {
    /// Starts the trace in `out` (which should be buffered).
    pub fn new(out: W) -> Result<Self> {
        let mut writer = Self {
            out,
            events_written: 0,
        };
        writer.write_with(|out| out.write_all(HEADER))?;
        Ok(writer)
    }

    /// Names the process `pid` in the UI.
    pub fn process_name(&mut self, pid: u32, name: &str) -> Result<()> {
        self.event(|out| {
            write!(
                out,
                r#"{{"ph":"M","pid":{pid},"tid":0,"name":"process_name","args":{{"name":"#
            )?;
            serde_json::to_writer(&mut *out, name)?;
            out.write_all(b"}}")
        })
    }

    /// Names thread `tid` and sets its position among the process's tracks
    /// (`thread_name` and `thread_sort_index` metadata events).
    pub fn thread_name(&mut self, pid: u32, tid: u32, name: &str, sort_index: u32) -> Result<()> {
        self.event(|out| {
            write!(
                out,
                r#"{{"ph":"M","pid":{pid},"tid":{tid},"name":"thread_name","args":{{"name":"#
            )?;
            serde_json::to_writer(&mut *out, name)?;
            out.write_all(b"}}")
        })?;
        self.event(|out| {
            write!(
                out,
                r#"{{"ph":"M","pid":{pid},"tid":{tid},"name":"thread_sort_index","args":{{"sort_index":{sort_index}}}}}"#
            )
        })
    }

    /// A complete ("X") event: a slice with a start and a duration. Times are
    /// ns relative to the trace start. `args` should be a JSON object.
    #[allow(clippy::too_many_arguments)] // mirrors the fields of the JSON event one to one
    pub fn complete(
        &mut self,
        pid: u32,
        tid: u32,
        name: &str,
        category: &str,
        start_ns: u64,
        dur_ns: u64,
        args: &Value,
    ) -> Result<()> {
        self.event(|out| {
            write!(out, r#"{{"ph":"X","pid":{pid},"tid":{tid},"name":"#)?;
            serde_json::to_writer(&mut *out, name)?;
            out.write_all(br#","cat":"#)?;
            serde_json::to_writer(&mut *out, category)?;
            write!(
                out,
                r#","ts":{},"dur":{},"args":"#,
                Micros(start_ns),
                Micros(dur_ns)
            )?;
            serde_json::to_writer(&mut *out, args)?;
            out.write_all(b"}")
        })
    }

    /// An instant ("i") event on one thread's track, at `ts_ns` relative to
    /// the trace start. `args` should be a JSON object.
    pub fn instant(
        &mut self,
        pid: u32,
        tid: u32,
        name: &str,
        category: &str,
        ts_ns: u64,
        args: &Value,
    ) -> Result<()> {
        self.event(|out| {
            write!(out, r#"{{"ph":"i","s":"t","pid":{pid},"tid":{tid},"name":"#)?;
            serde_json::to_writer(&mut *out, name)?;
            out.write_all(br#","cat":"#)?;
            serde_json::to_writer(&mut *out, category)?;
            write!(out, r#","ts":{},"args":"#, Micros(ts_ns))?;
            serde_json::to_writer(&mut *out, args)?;
            out.write_all(b"}")
        })
    }

    /// Starts flow `id` (a Chrome flow event v1, "ph":"s") at `ts_ns` on
    /// thread `tid`. Perfetto binds it to the slice open on that thread at
    /// that time (the topmost one), so there must be one: the slice the flow
    /// comes from, or an instant written just before at the same time.
    pub fn flow_start(
        &mut self,
        pid: u32,
        tid: u32,
        name: &str,
        category: &str,
        id: u64,
        ts_ns: u64,
    ) -> Result<()> {
        self.flow_event(b's', pid, tid, name, category, id, ts_ns)
    }

    /// Ends flow `id` ("ph":"f") at `ts_ns` on thread `tid`, bound to the
    /// enclosing slice ("bp":"e"). Put `ts_ns` at the target slice's start:
    /// at equal timestamps Perfetto orders JSON "X" slices before flow
    /// events, so the slice is open when the end is bound.
    pub fn flow_end(
        &mut self,
        pid: u32,
        tid: u32,
        name: &str,
        category: &str,
        id: u64,
        ts_ns: u64,
    ) -> Result<()> {
        self.flow_event(b'f', pid, tid, name, category, id, ts_ns)
    }

    /// A counter sample ("ph":"C") on a process-wide track named
    /// "`name` `series`" in Perfetto.
    pub fn counter(
        &mut self,
        pid: u32,
        name: &str,
        series: &str,
        ts_ns: u64,
        value: u64,
    ) -> Result<()> {
        self.event(|out| {
            // `tid` only says which process the counter belongs to.
            write!(out, r#"{{"ph":"C","pid":{pid},"tid":{pid},"name":"#)?;
            serde_json::to_writer(&mut *out, name)?;
            write!(out, r#","ts":{},"args":{{"#, Micros(ts_ns))?;
            serde_json::to_writer(&mut *out, series)?;
            write!(out, ":{value}}}}}")
        })
    }

    #[allow(clippy::too_many_arguments)] // mirrors the fields of the JSON event one to one
    fn flow_event(
        &mut self,
        phase: u8,
        pid: u32,
        tid: u32,
        name: &str,
        category: &str,
        id: u64,
        ts_ns: u64,
    ) -> Result<()> {
        self.event(|out| {
            write!(
                out,
                r#"{{"ph":"{}","pid":{pid},"tid":{tid},"name":"#,
                phase as char
            )?;
            serde_json::to_writer(&mut *out, name)?;
            out.write_all(br#","cat":"#)?;
            serde_json::to_writer(&mut *out, category)?;
            write!(out, r#","id":{id},"ts":{}"#, Micros(ts_ns))?;
            if phase == b'f' {
                out.write_all(br#","bp":"e""#)?;
            }
            out.write_all(b"}")
        })
    }

    /// Closes the event array, adds a top-level `"metadata"` value (lost
    /// events, tracer version, target, ...) and flushes.
    pub fn finish(&mut self, metadata: &Value) -> Result<()> {
        self.write_with(|out| {
            out.write_all(
                br#"
],"metadata":"#,
            )?;
            serde_json::to_writer(&mut *out, metadata)?;
            out.write_all(b"}\n")?;
            out.flush()
        })
    }

    /// Entries written to `traceEvents` so far, metadata events included
    /// (`thread_name` counts two: the name and the sort index).
    pub fn events_written(&self) -> u64 {
        self.events_written
    }

    /// Writes one entry of the `traceEvents` array, with the separator that
    /// goes before it.
    fn event(&mut self, write_event: impl FnOnce(&mut W) -> io::Result<()>) -> Result<()> {
        let separator: &[u8] = if self.events_written == 0 {
            b"\n"
        } else {
            b",\n"
        };
        self.write_with(|out| {
            out.write_all(separator)?;
            write_event(out)
        })?;
        self.events_written += 1;
        Ok(())
    }

    /// Runs `write` on the output, naming the file in any error.
    fn write_with(&mut self, write: impl FnOnce(&mut W) -> io::Result<()>) -> Result<()> {
        write(&mut self.out).context("writing the trace")
    }
}

/// Nanoseconds shown as microseconds with exactly three decimals (the trace
/// format's unit is µs). Integer arithmetic, so no precision is lost the way
/// it would be through `f64` for large timestamps.
struct Micros(u64);

impl std::fmt::Display for Micros {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn writes_a_trace_perfetto_can_read() {
        let mut writer = ChromeTraceWriter::new(Vec::new()).unwrap();
        writer.process_name(42, "my \"server\"").unwrap();
        writer
            .thread_name(42, 43, "tokio-runtime-worker", 1)
            .unwrap();
        writer
            .complete(
                42,
                43,
                "poll handler::run",
                "poll",
                1_234_567,
                890,
                &json!({"task_id": 5, "task": "0x7f00"}),
            )
            .unwrap();
        writer
            .instant(
                42,
                43,
                "lost events",
                "tracer",
                9_000_000_001,
                &json!({"count": 3}),
            )
            .unwrap();
        assert_eq!(writer.events_written(), 5);
        writer
            .finish(&json!({"lost_events": 0, "tracer": "rt-ebpf-trace"}))
            .unwrap();

        let text = String::from_utf8(writer.out).unwrap();
        let trace: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(trace["displayTimeUnit"], "ns");
        assert_eq!(trace["metadata"]["tracer"], "rt-ebpf-trace");
        let events = trace["traceEvents"].as_array().unwrap();
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[0],
            json!({"ph": "M", "pid": 42, "tid": 0, "name": "process_name", "args": {"name": "my \"server\""}})
        );
        assert_eq!(
            events[2],
            json!({"ph": "M", "pid": 42, "tid": 43, "name": "thread_sort_index", "args": {"sort_index": 1}})
        );
        let poll = &events[3];
        assert_eq!(poll["ph"], "X");
        assert_eq!(poll["name"], "poll handler::run");
        assert_eq!(poll["args"], json!({"task_id": 5, "task": "0x7f00"}));
        assert_eq!(events[4]["s"], "t");
        // Times keep ns precision: check the literal text, not a float.
        assert!(text.contains(r#""ts":1234.567,"dur":0.890,"#), "{text}");
        assert!(text.contains(r#""ts":9000000.001,"#), "{text}");
    }

    #[test]
    fn micros_keep_every_nanosecond() {
        assert_eq!(Micros(0).to_string(), "0.000");
        assert_eq!(Micros(7).to_string(), "0.007");
        assert_eq!(Micros(1_234_567).to_string(), "1234.567");
        // Far beyond f64's 53-bit mantissa.
        assert_eq!(Micros(u64::MAX).to_string(), "18446744073709551.615");
    }

    #[test]
    fn write_errors_are_reported() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = ChromeTraceWriter::new(Full).err().expect("must fail");
        assert!(format!("{err:#}").contains("disk full"), "{err:#}");
    }
}
