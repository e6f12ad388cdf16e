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
//! are written as they come, one per line, through a single large buffer;
//! nothing is kept in memory. The writer writes into a file it is given (the
//! tracer gives it an unnamed temporary file) and hands it back, complete, from
//! [`ChromeTraceWriter::finish`]: giving the file its name, so that a name only
//! ever shows a complete, valid trace, is the caller's job.

use std::fs::File;
use std::io::{self, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

/// Large enough that writes reach the kernel in big chunks even at millions
/// of events per second.
const BUFFER_BYTES: usize = 1 << 20;

const HEADER: &[u8] = br#"{"displayTimeUnit":"ns","traceEvents":["#;

pub struct ChromeTraceWriter {
    /// Where the finished trace goes, for error messages.
    path: PathBuf,
    out: BufWriter<File>,
    events_written: u64,
    /// Whether any [`deferred`](Self::deferred) value was written, so that
    /// `finish_resolving` must rewrite the file.
    has_deferred: bool,
}

/// Marks a value written now and resolved at the end (see
/// [`ChromeTraceWriter::deferred`]). Not something a real name contains.
const DEFERRED_OPEN: &str = "@@deferred:";
const DEFERRED_CLOSE: &str = "@@";

impl ChromeTraceWriter {
    /// Starts a trace in `file` (empty, open for reading and writing: the
    /// deferred values are resolved by reading it back). `path` is where the
    /// trace will be published, for error messages.
    pub fn new(file: File, path: &Path) -> Result<Self> {
        let mut writer = Self {
            path: path.to_owned(),
            out: BufWriter::with_capacity(BUFFER_BYTES, file),
            events_written: 0,
            has_deferred: false,
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
    /// events, tracer version, target, ...), flushes, and returns the file,
    /// now a complete trace.
    pub fn finish(mut self, metadata: &Value) -> Result<File> {
        self.write_with(|out| {
            out.write_all(
                br#"
],"metadata":"#,
            )?;
            serde_json::to_writer(&mut *out, metadata)?;
            out.write_all(b"}\n")?;
            out.flush()
        })?;
        let path = self.path.clone();
        self.out.into_inner().map_err(|err| {
            anyhow::anyhow!("writing trace file {}: {}", path.display(), err.error())
        })
    }

    /// A placeholder for a value only known after recording (a symbolized
    /// stack: symbolization never runs while the target is traced). Put it in
    /// an event's args; [`finish_resolving`](Self::finish_resolving) replaces
    /// it with what its resolver returns for `key`.
    pub fn deferred(&mut self, key: &str) -> Value {
        self.has_deferred = true;
        Value::String(format!("{DEFERRED_OPEN}{key}{DEFERRED_CLOSE}"))
    }

    /// Like [`finish`](Self::finish), but first replaces every
    /// [`deferred`](Self::deferred) placeholder with `resolve(key)`, in one
    /// streaming pass over the written events (memory stays flat) into
    /// `scratch` (another empty file), which is completed and returned.
    pub fn finish_resolving(
        mut self,
        metadata: &Value,
        resolve: &mut dyn FnMut(&str) -> Value,
        scratch: File,
    ) -> Result<File> {
        if !self.has_deferred {
            return self.finish(metadata);
        }
        self.write_with(|out| out.flush())?;
        let written = std::mem::replace(
            &mut self.out,
            BufWriter::with_capacity(BUFFER_BYTES, scratch),
        );
        let mut written = written
            .into_inner()
            .map_err(|err| err.into_error())
            .and_then(|mut file| file.rewind().map(|()| file))
            .with_context(|| format!("reading back trace file {}", self.path.display()))?;
        resolve_deferred(&mut written, &mut self.out, resolve)
            .with_context(|| format!("writing trace file {}", self.path.display()))?;
        self.has_deferred = false;
        self.finish(metadata)
    }

    /// Entries written to `traceEvents` so far, metadata events included
    /// (`thread_name` counts two: the name and the sort index).
    pub fn events_written(&self) -> u64 {
        self.events_written
    }

    /// Writes one entry of the `traceEvents` array, with the separator that
    /// goes before it.
    fn event(
        &mut self,
        write_event: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
    ) -> Result<()> {
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
    fn write_with(
        &mut self,
        write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
    ) -> Result<()> {
        write(&mut self.out).with_context(|| format!("writing trace file {}", self.path.display()))
    }
}

/// Copies `from` to `output` line by line, replacing each
/// `"@@deferred:KEY@@"` JSON string with the JSON of `resolve(KEY)`.
fn resolve_deferred(
    from: &mut File,
    output: &mut BufWriter<File>,
    resolve: &mut dyn FnMut(&str) -> Value,
) -> Result<()> {
    use std::io::BufRead;
    let input = io::BufReader::with_capacity(BUFFER_BYTES, from);
    let open = format!("\"{DEFERRED_OPEN}");
    let close = format!("{DEFERRED_CLOSE}\"");
    for line in input.split(b'\n') {
        let line = line?;
        let mut rest = String::from_utf8(line).context("trace line is not UTF-8")?;
        while let Some(start) = rest.find(&open) {
            let key_start = start + open.len();
            let Some(key_len) = rest[key_start..].find(&close) else {
                break;
            };
            output.write_all(&rest.as_bytes()[..start])?;
            serde_json::to_writer(
                &mut *output,
                &resolve(&rest[key_start..key_start + key_len]),
            )?;
            rest = rest[key_start + key_len + close.len()..].to_string();
        }
        output.write_all(rest.as_bytes())?;
        output.write_all(b"\n")?;
    }
    output.flush()?;
    Ok(())
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

    use std::fs;

    use super::*;
    use crate::test_util::TempDir;

    /// A writer into a named file (the tracer gives it an unnamed one).
    fn create(path: &Path) -> ChromeTraceWriter {
        ChromeTraceWriter::new(new_file(path), path).unwrap()
    }

    fn new_file(path: &Path) -> File {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap()
    }

    fn read_json(path: &Path) -> Value {
        let text = fs::read_to_string(path).expect("read trace");
        serde_json::from_str(&text).expect("trace is valid JSON")
    }

    #[test]
    fn deferred_values_are_resolved_at_the_end() {
        let dir = TempDir::new();
        let path = dir.join("trace.json");
        let mut writer = create(&path);
        for key in ["a", "b", "a"] {
            let stack = writer.deferred(key);
            let args = serde_json::json!({ "stack": stack, "other": "@@not deferred" });
            writer.instant(1, 2, "sample", "sample", 10, &args).unwrap();
        }
        let mut asked = Vec::new();
        let resolved = dir.join("resolved.json");
        writer
            .finish_resolving(
                &serde_json::json!({}),
                &mut |key| {
                    asked.push(key.to_string());
                    serde_json::json!([format!("frame of {key}"), "main"])
                },
                new_file(&resolved),
            )
            .unwrap();
        assert_eq!(asked, ["a", "b", "a"]);
        let trace: Value = serde_json::from_str(&fs::read_to_string(&resolved).unwrap()).unwrap();
        let stacks: Vec<&Value> = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["args"]["stack"])
            .collect();
        assert_eq!(stacks[1], &serde_json::json!(["frame of b", "main"]));
        assert_eq!(trace["traceEvents"][0]["args"]["other"], "@@not deferred");
    }

    #[test]
    fn writes_a_trace_perfetto_can_read() {
        let dir = TempDir::new();
        let path = dir.join("trace.json");
        let mut writer = create(&path);
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

        let file = writer
            .finish(&json!({"lost_events": 0, "tracer": "rt-ebpf-trace"}))
            .unwrap();
        assert_eq!(
            file.metadata().unwrap().len(),
            fs::metadata(&path).unwrap().len()
        );
        let trace = read_json(&path);
        assert_eq!(trace["displayTimeUnit"], "ns");
        assert_eq!(trace["metadata"]["tracer"], "rt-ebpf-trace");
        let events = trace["traceEvents"].as_array().unwrap();
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[0],
            json!({"ph": "M", "pid": 42, "tid": 0, "name": "process_name", "args": {"name": "my \"server\""}})
        );
        assert_eq!(
            events[1],
            json!({"ph": "M", "pid": 42, "tid": 43, "name": "thread_name", "args": {"name": "tokio-runtime-worker"}})
        );
        assert_eq!(
            events[2],
            json!({"ph": "M", "pid": 42, "tid": 43, "name": "thread_sort_index", "args": {"sort_index": 1}})
        );
        let poll = &events[2 + 1];
        assert_eq!(poll["ph"], "X");
        assert_eq!(
            (poll["pid"].as_u64(), poll["tid"].as_u64()),
            (Some(42), Some(43))
        );
        assert_eq!(poll["name"], "poll handler::run");
        assert_eq!(poll["cat"], "poll");
        assert_eq!(poll["args"], json!({"task_id": 5, "task": "0x7f00"}));
        let instant = &events[4];
        assert_eq!(
            (instant["ph"].as_str(), instant["s"].as_str()),
            (Some("i"), Some("t"))
        );

        // Times keep ns precision: check the literal text, not a float.
        let text = fs::read_to_string(&path).unwrap();
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
    fn a_million_events_stream_to_disk() {
        const EVENTS: u64 = 1_000_000;
        let dir = TempDir::new();
        let path = dir.join("big.json");
        let mut writer = create(&path);
        let args = json!({"task_id": 1});
        for i in 0..EVENTS {
            writer
                .complete(1, (i % 16) as u32, "poll", "poll", i * 1_000, 500, &args)
                .unwrap();
        }
        assert_eq!(writer.events_written(), EVENTS);
        writer.finish(&json!({"events": EVENTS})).unwrap();

        let shape = TraceShape::read(&path);
        assert_eq!(shape.events, EVENTS);
        assert_eq!(shape.metadata, json!({"events": EVENTS}));
    }

    /// A trace checked for validity without holding its events in memory:
    /// parsing a million events into a `Value` takes far longer than writing them.
    #[derive(Default)]
    struct TraceShape {
        events: u64,
        metadata: Value,
    }

    impl TraceShape {
        fn read(path: &Path) -> Self {
            let text = fs::read(path).expect("read trace");
            serde_json::from_slice(&text).expect("trace is valid JSON")
        }
    }

    impl<'de> serde::Deserialize<'de> for TraceShape {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_map(TraceShapeVisitor)
        }
    }

    struct TraceShapeVisitor;

    impl<'de> serde::de::Visitor<'de> for TraceShapeVisitor {
        type Value = TraceShape;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a Chrome trace object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<TraceShape, A::Error> {
            let mut shape = TraceShape::default();
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "traceEvents" => shape.events = map.next_value::<EventCount>()?.0,
                    "metadata" => shape.metadata = map.next_value()?,
                    _ => map.next_value::<serde::de::IgnoredAny>().map(drop)?,
                }
            }
            Ok(shape)
        }
    }

    /// The length of a JSON array whose elements are parsed and discarded.
    struct EventCount(u64);

    impl<'de> serde::Deserialize<'de> for EventCount {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct CountVisitor;
            impl<'de> serde::de::Visitor<'de> for CountVisitor {
                type Value = EventCount;

                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an array of trace events")
                }

                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<EventCount, A::Error> {
                    let mut count = 0;
                    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                        count += 1;
                    }
                    Ok(EventCount(count))
                }
            }
            deserializer.deserialize_seq(CountVisitor)
        }
    }
}
