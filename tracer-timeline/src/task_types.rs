//! What each probe site polls: the task's future type, by site index.
//!
//! Spawn, wake and task-end events carry no site; the timeline learns a
//! task's site from its polls and passes it along.

/// The name of a task's future type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskName {
    /// For tracks and tables, e.g. `handler::{{closure}}`.
    pub short: String,
    /// The full type path, for args and details.
    pub full: String,
}

/// `spawn_blocking` work runs as this task type, on blocking-pool threads.
pub const BLOCKING_TASK_PREFIX: &str = "tokio::runtime::blocking::task::BlockingTask<";

/// Task type names indexed by probe site (the attach cookie).
#[derive(Clone, Debug, Default)]
pub struct TaskTypes {
    names: Vec<Option<TaskName>>,
    blocking: Vec<bool>,
}

impl TaskTypes {
    /// `names[site]` names the future type that site polls, `None` where unknown.
    pub fn new(names: Vec<Option<TaskName>>) -> Self {
        let blocking = names
            .iter()
            .map(|name| {
                name.as_ref()
                    .is_some_and(|name| is_blocking_type(&name.full))
            })
            .collect();
        Self { names, blocking }
    }

    pub fn name(&self, site: u32) -> Option<&TaskName> {
        self.names.get(site as usize)?.as_ref()
    }

    /// A display name for a task of `site`: its short type name, "site #n"
    /// when the site has no name, "unknown" when the task was never polled.
    pub fn short_name(&self, site: Option<u32>) -> String {
        match site {
            None => "unknown".to_owned(),
            Some(site) => match self.name(site) {
                Some(name) => name.short.clone(),
                None => format!("site #{site}"),
            },
        }
    }

    /// The full type name, when known.
    pub fn full_name(&self, site: Option<u32>) -> Option<&str> {
        site.and_then(|site| self.name(site))
            .map(|name| name.full.as_str())
    }

    /// Whether the site polls `spawn_blocking` work.
    pub fn is_blocking(&self, site: u32) -> bool {
        self.blocking.get(site as usize).copied().unwrap_or(false)
    }
}

/// True if every name in `full` (several joined by " | " when identical code
/// folding merged them) is a `BlockingTask`.
fn is_blocking_type(full: &str) -> bool {
    full.split(" | ")
        .all(|one| one.trim().starts_with(BLOCKING_TASK_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(full: &str) -> Option<TaskName> {
        Some(TaskName {
            short: full.rsplit("::").next().unwrap().to_owned(),
            full: full.to_owned(),
        })
    }

    #[test]
    fn recognises_blocking_sites() {
        let types = TaskTypes::new(vec![
            name("app::handler::{{closure}}"),
            name("tokio::runtime::blocking::task::BlockingTask<app::load::{{closure}}>"),
            name(
                "tokio::runtime::blocking::task::BlockingTask<a::{{closure}}> | app::other::{{closure}}",
            ),
            None,
        ]);
        assert!(!types.is_blocking(0));
        assert!(types.is_blocking(1));
        assert!(!types.is_blocking(2), "folded with a non-blocking type");
        assert!(!types.is_blocking(3));
        assert!(!types.is_blocking(99), "out of range is not blocking");
        assert_eq!(types.short_name(Some(3)), "site #3");
        assert_eq!(types.short_name(None), "unknown");
        assert_eq!(types.full_name(Some(0)), Some("app::handler::{{closure}}"));
    }
}
