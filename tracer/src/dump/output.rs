//! A dump for people (tasks grouped by identical await chains, most common
//! first, like a goroutine dump) and for programs (`--json`: every task).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::chain::{Frame, Joined};
use super::{DebugLevel, Dump, Task, tasks};

/// Tasks print together when their future type, state, chain and missing
/// chain's reason are the same.
type GroupKey<'a> = (String, &'static str, &'a [Frame], Option<&'static str>);

/// The terminal text.
pub fn text(dump: &Dump) -> String {
    let mut out = String::new();
    let version = dump.tokio_version.as_deref().unwrap_or("version unknown");
    let _ = writeln!(
        out,
        "pid {} ({}), tokio {version}: {} live tasks, read in {:.1} ms without stopping it",
        dump.pid,
        dump.binary,
        dump.tasks.len(),
        dump.read_ms
    );
    for note in &dump.notes {
        let _ = writeln!(out, "note: {note}");
    }
    if dump.raced > 0 {
        let _ = writeln!(
            out,
            "note: {} tasks changed in every one of 3 reads (they were being polled); their chains may mix two moments",
            dump.raced
        );
    }

    // Group by (future type, state, chain, why no chain).
    let mut groups: BTreeMap<GroupKey, Vec<&Task>> = BTreeMap::new();
    for task in &dump.tasks {
        let key = (
            task.future_type.clone(),
            tasks::describe_state(task.state),
            task.chain.as_slice(),
            task.chain_note,
        );
        groups.entry(key).or_default().push(task);
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|(_, members)| std::cmp::Reverse(members.len()));
    for ((future_type, state, chain, note), members) in groups {
        let plural = if members.len() == 1 { "task" } else { "tasks" };
        let _ = writeln!(
            out,
            "\n{} {plural}, {state}{}: {}",
            members.len(),
            join_handle(members[0].state),
            super::chain::task_name(&future_type)
        );
        let ids: Vec<String> = members
            .iter()
            .take(12)
            .map(|t| {
                t.id.map_or_else(|| format!("{:#x}", t.header), |id| id.to_string())
            })
            .collect();
        let more = if members.len() > 12 { " …" } else { "" };
        let _ = writeln!(out, "  ids: {}{more}", ids.join(", "));
        if let Some(note) = note {
            let _ = writeln!(out, "  ({note})");
        }
        write_chain(&mut out, chain, "  ");
    }
    if dump.tasks.is_empty() {
        let _ = writeln!(out, "\nno live tasks");
    }
    out
}

fn join_handle(state: u64) -> &'static str {
    if state & tasks::JOIN_INTEREST != 0 {
        ", JoinHandle alive"
    } else {
        ""
    }
}

fn write_chain(out: &mut String, chain: &[Frame], indent: &str) {
    for (index, frame) in chain.iter().enumerate() {
        let arrow = if index == 0 { "" } else { "→ " };
        match frame {
            Frame::Branches { branches } => {
                let _ = writeln!(out, "{indent}{arrow}one of:");
                for (b, branch) in branches.iter().enumerate() {
                    let mark = if b + 1 == branches.len() {
                        "└"
                    } else {
                        "├"
                    };
                    let _ = writeln!(out, "{indent}  {mark} branch {}", b + 1);
                    write_chain(out, branch, &format!("{indent}    "));
                }
            }
            other => {
                let _ = writeln!(out, "{indent}{arrow}{}", frame_text(other));
            }
        }
    }
}

fn frame_text(frame: &Frame) -> String {
    match frame {
        Frame::Await {
            function,
            file,
            line,
        } => match (file, line) {
            (Some(file), Some(line)) => format!("{function} ({}:{line})", short_path(file)),
            _ => function.clone(),
        },
        Frame::NotStarted { function } => format!("{function} (not started)"),
        Frame::Finished { function } => format!("{function} (finished)"),
        Frame::Leaf {
            name,
            joins: Some(Joined::Task { id: Some(id), .. }),
        } => format!("{name} of task {id}"),
        Frame::Leaf {
            name,
            joins: Some(Joined::Task { id: None, header } | Joined::Header(header)),
        } => format!("{name} of the task at {header:#x}"),
        Frame::Leaf { name, joins: None } => name.clone(),
        Frame::Branches { .. } => "one of".to_string(),
    }
}

/// The last two components: `src/server.rs`.
fn short_path(path: &str) -> &str {
    let mut slashes = path.rmatch_indices('/');
    match (slashes.next(), slashes.next()) {
        (Some(_), Some((second, _))) => &path[second + 1..],
        _ => path,
    }
}

/// The `--json` document.
pub fn json(dump: &Dump) -> Value {
    let tasks: Vec<Value> = dump
        .tasks
        .iter()
        .map(|task| {
            json!({
                "id": task.id,
                "header": format!("{:#x}", task.header),
                "future_type": task.future_type,
                "name": super::chain::task_name(&task.future_type),
                "state": tasks::describe_state(task.state),
                "notified": task.state & tasks::NOTIFIED != 0,
                "cancelled": task.state & tasks::CANCELLED != 0,
                "join_handle_alive": task.state & tasks::JOIN_INTEREST != 0,
                "join_waker_set": task.state & tasks::JOIN_WAKER != 0,
                "references": task.state >> 6,
                "runtime": task.owner_id,
                "chain": task.chain.iter().map(frame_json).collect::<Vec<_>>(),
                "chain_note": task.chain_note,
                "raced": task.raced,
            })
        })
        .collect();
    json!({
        "pid": dump.pid,
        "binary": dump.binary,
        "tokio_version": dump.tokio_version,
        "debug_info": match dump.debug {
            DebugLevel::Types => "types",
            DebugLevel::NoTypes => "no-types",
            DebugLevel::None => "none",
        },
        "debug_file": dump.debug_file.as_ref().map(|p| p.display().to_string()),
        "notes": dump.notes,
        "tasks": tasks,
        "stats": {
            "tasks": dump.tasks.len(),
            "raced": dump.raced,
            "rejected_candidates": dump.stats.rejected,
            "unbound_tasks": dump.stats.unbound,
            "scanned_bytes": dump.stats.bytes,
            "scanned_regions": dump.stats.regions,
            "unreadable_bytes": dump.stats.unreadable,
            "setup_ms": dump.setup_ms,
            "read_ms": dump.read_ms,
        },
    })
}

fn frame_json(frame: &Frame) -> Value {
    match frame {
        Frame::Await {
            function,
            file,
            line,
        } => json!({"await": {"function": function, "file": file, "line": line}}),
        Frame::NotStarted { function } => json!({"not_started": function}),
        Frame::Finished { function } => json!({"finished": function}),
        Frame::Leaf { name, joins } => match joins {
            Some(Joined::Task { id, header }) => {
                json!({"leaf": name, "joins_task": id, "joins_header": format!("{header:#x}")})
            }
            Some(Joined::Header(header)) => {
                json!({"leaf": name, "joins_task": null, "joins_header": format!("{header:#x}")})
            }
            None => json!({"leaf": name}),
        },
        Frame::Branches { branches } => json!({
            "branches": branches
                .iter()
                .map(|b| b.iter().map(frame_json).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_shorten_to_their_last_two_components() {
        assert_eq!(short_path("/work/app/src/server.rs"), "src/server.rs");
        assert_eq!(short_path("main.rs"), "main.rs");
        assert_eq!(short_path("/main.rs"), "/main.rs");
    }
}
