//! What a task waits *on* (`waits_on`, the tokio primitive on its polls)
//! and, without line tables, *where* (`waits_at` as `function+0x…`, the
//! await's return offset), on the `awaits` fixture: a task that sleeps, one
//! that reads an mpsc channel, one that waits on a `Notify` under a
//! timeout. In cargo's default release profile (no DWARF: names from the
//! symbol table only), with line tables, and under fat LTO.

use test_support::{self as support, trace};

use support::Profile;
use trace::{Trace, TraceSlice};

/// Traces a running `awaits` fixture for 2 s (native Perfetto trace: the
/// annotations are read back through Perfetto's own schema).
fn record(profile: Profile) -> Trace {
    trace::record_running(
        "awaits",
        profile,
        &format!("waits-on-{profile:?}"),
        "2s",
        &[],
    )
    .trace
}

/// The `waits_on` of the polls of `task` (those that have one), after
/// checking, if `required`, that at least half of its polls have one:
/// every poll of these tasks but the last ends Pending at the same
/// primitive.
fn waits_on<'a>(polls: &'a [TraceSlice], task: &str, required: bool) -> Vec<&'a str> {
    let all: Vec<&TraceSlice> = polls.iter().filter(|p| p.name.contains(task)).collect();
    let with: Vec<&str> = all
        .iter()
        .filter_map(|p| p.args["waits_on"].as_str())
        .collect();
    assert!(
        !required || (with.len() >= 3 && with.len() * 2 >= all.len()),
        "{} of {} polls of {task} have waits_on; some polls: {:#?}",
        with.len(),
        all.len(),
        all.iter().take(3).collect::<Vec<_>>()
    );
    with
}

/// `mpsc_recv`: whether the build keeps a frame that shows an mpsc
/// receive (fat LTO inlines all of it into the program's function: the
/// capture is then `clone_waker` ← `fixture_reader::{{closure}}`, and no
/// answer is the right one).
fn check_waits_on(profile: Profile, mpsc_recv: bool) -> Trace {
    let trace = record(profile);
    let polls = trace.polls();
    for waits_on in waits_on(&polls, "fixture_sleepy", true) {
        assert_eq!(waits_on, "timer: time::Sleep", "{profile:?}");
    }
    for waits_on in waits_on(&polls, "fixture_reader", mpsc_recv) {
        assert_eq!(waits_on, "recv: mpsc::Receiver::recv", "{profile:?}");
    }
    // `timeout(notified)`: the Notify registers first, then the deadline.
    let outer = waits_on(&polls, "fixture_outer", true);
    for waits_on in &outer {
        assert!(
            ["notify: Notify::notified", "timer: time::Sleep"].contains(waits_on),
            "{profile:?}: fixture_outer waits on {waits_on}"
        );
    }
    // The sender sleeps, and sends into a channel that always has room.
    for waits_on in polls
        .iter()
        .filter(|p| p.name.contains("fixture_sender"))
        .filter_map(|p| p.args["waits_on"].as_str())
    {
        assert!(
            waits_on.starts_with("timer: ") || waits_on.starts_with("send: "),
            "{profile:?}: fixture_sender waits on {waits_on}"
        );
    }
    trace
}

/// Without line tables, `waits_at` is the function and the await's offset
/// in it, e.g. `awaits::fixture_sleepy::{{closure}}+0x4c` (or, for a
/// future inlined into tokio's harness, `… (inlined into tokio's task
/// harness at tokio::runtime::task::raw::poll+0x203)`).
fn check_offsets(trace: &Trace) {
    let polls = trace.polls();
    let sleepy: Vec<&str> = polls
        .iter()
        .filter(|p| p.name.contains("fixture_sleepy"))
        .filter_map(|p| p.args["waits_at"].as_str())
        .collect();
    assert!(!sleepy.is_empty(), "no waits_at on fixture_sleepy's polls");
    for waits_at in sleepy {
        let (function, offset) = waits_at
            .trim_end_matches(')')
            .rsplit_once("+0x")
            .unwrap_or_else(|| panic!("waits_at {waits_at:?} has no +0x offset"));
        assert!(function.contains("fixture_sleepy"), "{waits_at}");
        let offset = u64::from_str_radix(offset, 16)
            .unwrap_or_else(|_| panic!("waits_at {waits_at:?}: offset is not hex"));
        assert!(
            offset > 0,
            "{waits_at}: the return address is past the call"
        );
    }
}

#[test]
fn waits_on_from_symbol_names_alone_release() {
    let trace = check_waits_on(Profile::Release, true);
    check_offsets(&trace);
}

#[test]
fn waits_on_with_line_tables_release_debug() {
    let trace = check_waits_on(Profile::ReleaseDebug, true);
    // With lines, the line says where: no offset.
    let polls = trace.polls();
    let lined = polls
        .iter()
        .filter_map(|p| p.args["waits_at"].as_str())
        .filter(|w| w.contains("awaits.rs:"))
        .count();
    assert!(lined > 0, "no waits_at with a line");
    assert!(
        polls
            .iter()
            .filter_map(|p| p.args["waits_at"].as_str())
            .all(|w| !w.contains("+0x")),
        "an offset where the line tables say the line"
    );
}

#[test]
fn waits_on_under_fat_lto() {
    let trace = check_waits_on(Profile::Lto, false);
    check_offsets(&trace);
}
