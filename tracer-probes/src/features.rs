//! What a trace of this binary will hold, feature by feature: supported,
//! degraded (and why) or missing (and why), from its [`ProbePlan`] alone, so
//! that `probes --binary` tells a user before they take a trace. Findings as
//! data ([`FeatureSupport`]); the table prints them.
//!
//! The verdicts mirror the compatibility matrix (`tests/compat`): tokio
//! < 1.23 has no readable task id, < 1.17's current-thread scheduler no park
//! function, and poll ends cost ~0.2 µs more a poll where a scheduler's
//! `raw::poll` call sites are not found and uretprobes end its polls.

use crate::{ProbePlan, SiteKind, TaskArg, catalog};

/// How well a feature will be traced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    Supported,
    /// Traced, with a limit or a cost worth knowing.
    Degraded(String),
    /// Not traced.
    Missing(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureSupport {
    pub feature: &'static str,
    pub support: Support,
}

/// The verdict for every feature, in the order the table shows them.
pub fn feature_support(plan: &ProbePlan) -> Vec<FeatureSupport> {
    let sites = |kind: SiteKind| plan.sites.iter().filter(move |site| site.kind == kind);
    let mut out = Vec::new();
    let mut push = |feature, support| out.push(FeatureSupport { feature, support });

    let polls: Vec<_> = sites(SiteKind::Poll).collect();
    let unnamed = polls.iter().filter(|site| site.task_type.is_none()).count();
    push(
        "polls",
        match (polls.len(), unnamed) {
            (0, _) => Support::Missing("no `raw::poll` instance left to probe".into()),
            (_, 0) => Support::Supported,
            (n, unnamed) => Support::Degraded(format!(
                "{unnamed} of {n} task types unnamed (shown as task@ADDRESS)"
            )),
        },
    );
    push(
        "poll ends",
        if !plan.poll_end_uretprobes {
            Support::Supported
        } else if plan.poll_returns.is_empty() {
            Support::Degraded(
                "by uretprobes (~0.2 µs more a poll): no `raw::poll` call site found".into(),
            )
        } else {
            Support::Degraded(
                "by uretprobes as well (~0.2 µs more a poll): a scheduler's `raw::poll` call sites were not found"
                    .into(),
            )
        },
    );
    let schedulers: Vec<&str> = catalog::POLL_CALLERS
        .iter()
        .filter(|caller| {
            sites(SiteKind::Park).any(|site| {
                caller
                    .path_fragments
                    .iter()
                    .any(|fragment| site.symbol.contains(fragment))
            })
        })
        .map(|caller| caller.name)
        .collect();
    push(
        "parks",
        match schedulers.as_slice() {
            [] => Support::Missing("no scheduler park function found".into()),
            [_, _, ..] => Support::Supported,
            [only] => Support::Degraded(format!(
                "only {only}'s park function was found: the other scheduler's idle time is not traced{}",
                if version_below(plan, (1, 17, 0)) {
                    " (tokio < 1.17's current-thread scheduler parks from inside block_on)"
                } else {
                    ""
                }
            )),
        },
    );
    push(
        "task ids",
        if plan.task_id_layout.enabled != 0 {
            Support::Supported
        } else if plan.tokio_version.is_none() {
            Support::Missing("the tokio version is unknown, so the task header layout is".into())
        } else {
            Support::Missing(
                "tokio < 1.23 keeps no task id where it can be read (tasks are told apart by header address)"
                    .into(),
            )
        },
    );
    for (kind, feature) in [
        (SiteKind::Spawn, "spawns"),
        (SiteKind::Wake, "wakes"),
        (SiteKind::TaskEnd, "task ends"),
        (SiteKind::Unpark, "unparks"),
        (SiteKind::AwaitPoint, "waits_at"),
    ] {
        let found: Vec<_> = sites(kind).collect();
        let support = if found.is_empty() {
            Support::Missing(format!(
                "no {} function found (inlined, or not in the catalog)",
                kind.name()
            ))
        } else if kind == SiteKind::TaskEnd
            && found.iter().all(|s| s.symbol.contains("raw::dealloc"))
        {
            Support::Degraded(
                "from `raw::dealloc` (`OwnedTasks::remove` is inlined): tasks freed inside tokio's harness are missed"
                    .into(),
            )
        } else if kind == SiteKind::Spawn
            && found.iter().all(|s| s.task_arg == TaskArg::ReturnValue)
        {
            Support::Degraded("read on the spawn function's return (a uretprobe)".into())
        } else {
            Support::Supported
        };
        push(feature, support);
    }
    push(
        "file:line",
        if plan.debug_info {
            Support::Supported
        } else {
            Support::Missing("the binary has no DWARF line tables (build with debug = \"line-tables-only\" or more)".into())
        },
    );
    push(
        "blocking pool",
        if polls.iter().any(|site| {
            site.task_type
                .as_ref()
                .is_some_and(|t| t.full.contains("BlockingTask<"))
        }) {
            Support::Supported
        } else {
            Support::Missing("no `spawn_blocking` task type in the binary".into())
        },
    );
    push(
        "samples",
        if plan.task_id_layout.enabled != 0 {
            Support::Supported
        } else {
            Support::Degraded("attributed by the poll open on the thread, not by task id".into())
        },
    );
    let loops: Vec<_> = sites(SiteKind::BlockOn).collect();
    let root_polls: Vec<_> = sites(SiteKind::RootPoll).collect();
    let unnamed = loops
        .iter()
        .chain(&root_polls)
        .all(|site| site.task_type.as_ref().is_none_or(|t| t.full.is_empty()));
    let current_thread = if version_below(plan, (1, 20, 0)) {
        "the current-thread scheduler (`basic_scheduler`) polls its root future inline in its loop: not traced"
    } else {
        "the current-thread scheduler's root poll is inlined (no `Context::enter` instance of its own): not traced"
    };
    push(
        "block_on root",
        match (loops.is_empty(), root_polls.is_empty()) {
            (true, true) => Support::Missing(
                "no `block_on` loop, thread parker or current-thread root poll found (inlined, e.g. under fat LTO, or not in the catalog)"
                    .into(),
            ),
            (false, true) => Support::Degraded(format!("multi-thread `block_on` only; {current_thread}")),
            (true, false) => Support::Degraded(
                "current-thread only: the multi-thread `block_on` loop or the thread parker's park is inlined"
                    .into(),
            ),
            (false, false) if unnamed => {
                Support::Degraded("the root future's type is unknown (shown as \"block_on root\")".into())
            }
            (false, false) => Support::Supported,
        },
    );
    out
}

fn version_below(plan: &ProbePlan, version: (u64, u64, u64)) -> bool {
    plan.tokio_version
        .as_deref()
        .is_some_and(|v| crate::version::parse_version(v) < version)
}
