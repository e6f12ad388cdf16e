//! Stacks without frame pointers, symbolized to file:line: where each task
//! waits (`waits_at`, `await_stack` on its polls), what a long poll runs (CPU
//! `sample` instants, `--folded` output) and `--no-samples`. The fixtures are
//! built with line tables and without frame pointers (`release-debug`,
//! `lto-debug`), so the tracer must unwind from .eh_frame.

use test_support::{self as support, trace};

use std::ops::RangeInclusive;
use std::path::PathBuf;

use serde_json::Value;
use support::Profile;
use trace::{Trace, TraceSlice};

/// How long each recording lasts.
const RECORD_FOR: &str = "2s";

/// Attaches to a running `name` fixture for `RECORD_FOR` with `extra` flags;
/// returns the trace and the scratch directory (for other output files).
fn record(name: &str, profile: Profile, test: &str, extra: &[&str]) -> (Trace, PathBuf) {
    let scratch = format!("stacks-{test}-{profile:?}");
    let recorded = trace::record_running(name, profile, &scratch, RECORD_FOR, extra);
    (recorded.trace, recorded.dir)
}

/// One frame as the tracer prints it: `"<function> (<file>:<line>)"`, or
/// just `"<function>"` without debug info.
#[derive(Debug)]
struct Frame {
    function: String,
    file: Option<String>,
    line: Option<u32>,
}

impl Frame {
    fn parse(text: &str) -> Frame {
        let located = text
            .strip_suffix(')')
            .and_then(|rest| rest.rsplit_once(" ("))
            .and_then(|(function, location)| {
                let (file, line) = location.rsplit_once(':')?;
                Some((function, file, line.parse::<u32>().ok()?))
            });
        match located {
            Some((function, file, line)) => Frame {
                function: function.to_string(),
                file: Some(file.to_string()),
                line: Some(line),
            },
            None => Frame {
                function: text.to_string(),
                file: None,
                line: None,
            },
        }
    }

    fn names(&self, function: &str) -> bool {
        self.function.contains(function)
    }

    /// In fixture source `file` (a file name), at a line of `body`.
    fn is_in(&self, file: &str, body: &RangeInclusive<u32>) -> bool {
        self.file.as_deref().is_some_and(|f| f.ends_with(file))
            && self.line.is_some_and(|line| body.contains(&line))
    }
}

/// Frames of the runtime and the standard library, which the tracer trims
/// off the top of a stack to find the innermost *user* frame.
fn is_library_frame(frame: &Frame) -> bool {
    // Methods of built-in types (`<u64>::wrapping_mul`, `<[T]>::iter`) are
    // the standard library's.
    if let Some(inner) = frame.function.strip_prefix('<') {
        let self_type = inner.split(['>', ' ']).next().unwrap_or("");
        if !self_type.contains("::") {
            return true;
        }
    }
    let path = frame.function.trim_start_matches('<');
    // Frames outside Rust code (the vDSO, unknown addresses) have no path.
    !path.contains("::")
        || ["core::", "std::", "alloc::", "tokio::"]
            .iter()
            .any(|prefix| path.starts_with(prefix))
}

fn innermost_user_frame(stack: &[Frame]) -> Option<&Frame> {
    stack.iter().find(|frame| !is_library_frame(frame))
}

fn frames(value: &Value) -> Option<Vec<Frame>> {
    value
        .as_array()?
        .iter()
        .map(|frame| frame.as_str().map(Frame::parse))
        .collect()
}

/// The lines of `function`'s definition in fixture source `file`, from its
/// `fn` line to its closing brace, found by scanning the source text.
fn body_lines(file: &str, function: &str) -> RangeInclusive<u32> {
    let path = support::repo_root()
        .join("tests/fixtures/src/bin")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("read fixture source");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|line| line.contains(&format!("fn {function}(")))
        .unwrap_or_else(|| panic!("no fn {function} in {}", path.display()));
    let mut depth = 0i32;
    let mut opened = false;
    for (index, line) in lines.iter().enumerate().skip(start) {
        for c in line.chars() {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        if opened && depth == 0 {
            return (start as u32 + 1)..=(index as u32 + 1);
        }
    }
    panic!("fn {function} in {} does not end", path.display())
}

/// Polls whose task type names `function`.
fn polls_of<'a>(polls: &'a [TraceSlice], function: &str) -> Vec<&'a TraceSlice> {
    polls.iter().filter(|p| p.name.contains(function)).collect()
}

/// The `waits_at` frame and `await_stack` of one poll that registered its
/// waker, checked for shape: `waits_at` is the first of the stack.
fn wait_of(poll: &TraceSlice) -> Option<(Frame, Vec<Frame>)> {
    let waits_at = poll.args["waits_at"].as_str()?;
    let stack = frames(&poll.args["await_stack"])
        .unwrap_or_else(|| panic!("waits_at without an await_stack of strings: {poll:?}"));
    assert!(
        stack
            .first()
            .is_some_and(|f| Frame::parse(waits_at).function == f.function),
        "await_stack does not start at waits_at: {poll:?}"
    );
    Some((Frame::parse(waits_at), stack))
}

/// The polls of the task spawned as `task` that say where it waits. Every
/// poll of these fixtures' tasks ends Pending with a waker registered, so
/// most of them must.
fn waits_of(polls: &[TraceSlice], task: &str) -> Vec<(Frame, Vec<Frame>)> {
    let all = polls_of(polls, task);
    let waits: Vec<_> = all.iter().filter_map(|p| wait_of(p)).collect();
    assert!(
        waits.len() >= 3 && waits.len() * 4 >= all.len() * 3,
        "{} of {} polls of {task} have waits_at; some polls: {:#?}",
        waits.len(),
        all.len(),
        all.iter().take(3).collect::<Vec<_>>()
    );
    waits
}

fn check_await_stacks(profile: Profile) {
    let (trace, _) = record("awaits", profile, "awaits", &[]);
    let polls = trace.polls();
    let file = "awaits.rs";

    // fixture_outer's task waits inside fixture_middle (inlined into it):
    // the stack shows both, middle first, each at a line of its own body.
    let middle = body_lines(file, "fixture_middle");
    let outer = body_lines(file, "fixture_outer");
    for (waits_at, stack) in waits_of(&polls, "fixture_outer") {
        assert!(
            waits_at.names("fixture_middle") && waits_at.is_in(file, &middle),
            "outer task waits at {waits_at:?}, not in fixture_middle (lines {middle:?}); stack {stack:#?}"
        );
        let middle_at = stack.iter().position(|f| f.names("fixture_middle"));
        let outer_at = stack.iter().position(|f| f.names("fixture_outer"));
        assert!(
            matches!((middle_at, outer_at), (Some(m), Some(o)) if m < o),
            "await_stack does not go fixture_middle → fixture_outer: {stack:#?}"
        );
        let outer_frame = &stack[outer_at.unwrap()];
        assert!(
            outer_frame.is_in(file, &outer),
            "fixture_outer frame {outer_frame:?} not at a line of its body {outer:?}"
        );
    }

    let sleepy = body_lines(file, "fixture_sleepy");
    for (waits_at, stack) in waits_of(&polls, "fixture_sleepy") {
        assert!(
            waits_at.names("fixture_sleepy") && waits_at.is_in(file, &sleepy),
            "sleepy task waits at {waits_at:?}, not in fixture_sleepy (lines {sleepy:?}); stack {stack:#?}"
        );
    }

    let reader = body_lines(file, "fixture_reader");
    for (waits_at, stack) in waits_of(&polls, "fixture_reader") {
        assert!(
            waits_at.names("fixture_reader") && waits_at.is_in(file, &reader),
            "reader task waits at {waits_at:?}, not in fixture_reader (lines {reader:?}); stack {stack:#?}"
        );
    }
}

#[test]
fn await_stacks_name_where_each_task_waits_release_debug() {
    check_await_stacks(Profile::ReleaseDebug);
}

#[test]
fn await_stacks_name_where_each_task_waits_lto_debug() {
    check_await_stacks(Profile::LtoDebug);
}

/// A CPU sample: an instant on the sampled thread.
struct Sample<'a> {
    event: &'a Value,
    tid: u64,
    ts_ns: f64,
    stack: Vec<Frame>,
}

fn samples(trace: &Trace) -> Vec<Sample<'_>> {
    trace
        .events()
        .iter()
        .filter(|e| e["ph"] == "i" && e["cat"] == "sample")
        .map(|event| Sample {
            event,
            tid: event["tid"].as_u64().expect("sample with a tid"),
            ts_ns: event["ts"].as_f64().expect("sample with a ts") * 1000.0,
            stack: frames(&event["args"]["stack"])
                .unwrap_or_else(|| panic!("sample without a stack of strings: {event}")),
        })
        .collect()
}

fn check_hot_samples(profile: Profile) {
    let (trace, _) = record("hot_loop", profile, "hot", &["--sample-hz", "999"]);
    let hot_polls = trace
        .polls()
        .into_iter()
        .filter(|p| p.name.contains("fixture_hot_task"))
        .collect::<Vec<_>>();
    assert!(!hot_polls.is_empty(), "no polls of fixture_hot_task");
    let all = samples(&trace);
    // Samples taken while the hot task was being polled, with that poll.
    let inside: Vec<(&Sample, &TraceSlice)> = all
        .iter()
        .filter_map(|s| {
            let poll = hot_polls
                .iter()
                .find(|p| p.tid == s.tid && p.start_ns <= s.ts_ns && s.ts_ns <= p.end_ns())?;
            Some((s, poll))
        })
        .collect();
    // The hot task runs nearly all of the 2 s: ~2000 samples at 999 Hz.
    assert!(
        inside.len() >= 200,
        "only {} samples (of {}) inside the hot task's {} polls",
        inside.len(),
        all.len(),
        hot_polls.len()
    );

    // Samples say which task they caught: their callstack's root frame is
    // the task's type.
    let attributed = inside
        .iter()
        .filter(|(s, poll)| s.event["args"]["task_type"] == poll.name.as_str())
        .count();
    assert!(
        attributed * 10 >= inside.len() * 9,
        "only {attributed} of {} samples inside hot polls carry the hot task's type; first: {}",
        inside.len(),
        inside[0].0.event
    );

    let hot = body_lines("hot_loop.rs", "fixture_hot_function");
    let hits: Vec<&Sample> = inside
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| innermost_user_frame(&s.stack).is_some_and(|f| f.names("fixture_hot_function")))
        .collect();
    // For the message: a frame may name the function yet not be taken for
    // the innermost user frame (e.g. printed without its module path).
    let anywhere = inside
        .iter()
        .filter(|(s, _)| s.stack.iter().any(|f| f.names("fixture_hot_function")))
        .count();
    assert!(
        hits.len() * 2 > inside.len(),
        "only {} of {} samples inside hot polls are in fixture_hot_function as the \
         innermost user frame ({anywhere} name it in some frame); e.g. {:#?}",
        hits.len(),
        inside.len(),
        inside
            .iter()
            .take(3)
            .map(|(s, _)| &s.stack)
            .collect::<Vec<_>>()
    );
    for sample in hits {
        let frame = innermost_user_frame(&sample.stack).unwrap();
        assert!(
            frame.is_in("hot_loop.rs", &hot),
            "fixture_hot_function frame {frame:?} not at a line of its body {hot:?}"
        );
    }
}

#[test]
fn cpu_samples_in_hot_polls_name_the_hot_function_release_debug() {
    check_hot_samples(Profile::ReleaseDebug);
}

#[test]
fn cpu_samples_in_hot_polls_name_the_hot_function_lto_debug() {
    check_hot_samples(Profile::LtoDebug);
}

/// One line of `--folded` output: `task_type;outermost;…;innermost COUNT`.
fn parse_folded_line(line: &str) -> (Vec<&str>, u64) {
    let (stack, count) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("folded line without a count: {line:?}"));
    let count: u64 = count
        .parse()
        .unwrap_or_else(|_| panic!("folded line does not end in a count: {line:?}"));
    assert!(count > 0, "zero count: {line:?}");
    assert!(
        !stack.starts_with(' ') && !stack.ends_with(' ') && !stack.contains("  "),
        "stray spaces in folded line {line:?}"
    );
    let frames: Vec<&str> = stack.split(';').collect();
    assert!(
        frames.len() >= 2 && frames.iter().all(|f| !f.is_empty()),
        "folded line needs a task type and frames, none empty: {line:?}"
    );
    (frames, count)
}

fn check_folded(profile: Profile) {
    let (_, dir) = record(
        "hot_loop",
        profile,
        "folded",
        &["--folded", "{dir}/folded.txt"],
    );
    let path = dir.join("folded.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    let lines: Vec<(Vec<&str>, u64)> = text.lines().map(parse_folded_line).collect();
    assert!(!lines.is_empty(), "empty folded file");

    // The hot task's lines: most of its samples end in fixture_hot_function,
    // below (after, outermost first) the task's own future.
    let of_hot_task: Vec<&(Vec<&str>, u64)> = lines
        .iter()
        .filter(|(frames, _)| frames[0].contains("fixture_hot_task"))
        .collect();
    let total: u64 = of_hot_task.iter().map(|(_, count)| count).sum();
    let in_hot_function: u64 = of_hot_task
        .iter()
        .filter(|(frames, _)| {
            let future = frames[1..]
                .iter()
                .position(|f| f.contains("fixture_hot_task"));
            let function = frames[1..]
                .iter()
                .rposition(|f| f.contains("fixture_hot_function"));
            matches!((future, function), (Some(a), Some(b)) if a < b)
        })
        .map(|(_, count)| count)
        .sum();
    assert!(
        in_hot_function * 2 > total,
        "{in_hot_function} of {total} samples of fixture_hot_task go fixture_hot_task → fixture_hot_function:\n{text}"
    );

    // The unwinding goes on past `raw::poll` through the worker's loop to
    // the thread's start (where a uretprobe replaced a return address with
    // the kernel's trampoline, the real one is restored or the stack is cut
    // there), and no frame is the trampoline's bare address.
    let through_worker: u64 = of_hot_task
        .iter()
        .filter(|(frames, _)| {
            frames
                .iter()
                .any(|f| f.contains("start_thread") || f.contains("clone"))
        })
        .map(|(_, count)| count)
        .sum();
    assert!(
        through_worker * 2 > total,
        "{through_worker} of {total} hot samples unwound to the thread's start:\n{text}"
    );
    assert!(
        !text.contains(";0x7fff"),
        "a frame is a bare trampoline address:\n{text}"
    );
}

#[test]
fn folded_output_is_collapsed_stacks_with_the_hot_function_release_debug() {
    check_folded(Profile::ReleaseDebug);
}

#[test]
fn folded_output_is_collapsed_stacks_with_the_hot_function_lto_debug() {
    check_folded(Profile::LtoDebug);
}

#[test]
fn no_samples_flag_records_no_sample_events() {
    let (trace, _) = record(
        "hot_loop",
        Profile::ReleaseDebug,
        "no-samples",
        &["--no-samples"],
    );
    assert!(
        trace
            .polls()
            .iter()
            .any(|p| p.name.contains("fixture_hot_task")),
        "no polls of fixture_hot_task: nothing was recorded"
    );
    let samples = samples(&trace);
    assert!(
        samples.is_empty(),
        "{} sample events with --no-samples; first: {}",
        samples.len(),
        samples[0].event
    );
}
