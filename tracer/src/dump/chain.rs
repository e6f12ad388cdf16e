//! Where a task is suspended: its await chain, read from the live future
//! with the layouts `tracer_probes::futures` took from DWARF.
//!
//! From the task's future inward: an `async fn`'s state machine says which
//! `.await` it is stopped at (its `__state`, and that state's file:line) and
//! holds the awaited future (`__awaitee`), which is read the same way, until
//! a leaf: a future of tokio's own (Sleep, Notified, Acquire, Readiness, a
//! channel's `recv`, a JoinHandle, `Mutex::lock`), named and not entered.
//! Other futures in between — wrappers (tokio's taskdump `Root`, `Timeout`,
//! `select!`'s `PollFn` closure, which points at the futures it races),
//! `Pin<Box<…>>`, `dyn Future` (its vtable says the concrete type) — are
//! looked through, member by member; when more than one member leads to a
//! future, the chain forks into branches (`select!`, `join!`, a timeout and
//! its inner future).
//!
//! Reads stay within what the layouts allow: a pointer is followed only into
//! a type DWARF describes, and a walk visits at most [`MAX_NODES`] values,
//! so a stale pointer in a racing target gives a short chain, not a hang.

use tracer_probes::futures::{Discriminant, FutureLayouts, Member, TypeKind, TypeRef};

use super::memory::{ProcessMemory, ReadError};

/// Values looked at per task, at most.
const MAX_NODES: usize = 400;
/// Non-state-machine values between two state machines, at most.
const MAX_WRAPPERS: u32 = 6;

/// One step of a chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frame {
    /// An `async fn`/block stopped at an `.await`.
    Await {
        function: String,
        file: Option<String>,
        line: Option<u64>,
    },
    /// An `async fn`/block not polled yet, or already finished.
    NotStarted {
        function: String,
    },
    Finished {
        function: String,
    },
    /// A future of tokio's own (or one without a layout): the end.
    Leaf {
        name: String,
        /// A `JoinHandle`'s task: its header while reading, then its id
        /// (see [`resolve_joins`]).
        joins: Option<Joined>,
    },
    /// Several futures awaited at once.
    Branches {
        branches: Vec<Vec<Frame>>,
    },
}

/// The awaited task of a `JoinHandle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Joined {
    /// Its header's address, as read.
    Header(u64),
    /// The live task with that header.
    Task { id: Option<u64>, header: u64 },
}

const JOIN_HANDLE: &str = "tokio::runtime::task::join::JoinHandle";

/// Turns the `JoinHandle` headers in `chain` into the tasks found at them
/// (`task_at`: header → id); a header that is no live task stays a header.
pub fn resolve_joins(chain: &mut [Frame], task_at: &dyn Fn(u64) -> Option<Option<u64>>) {
    for frame in chain {
        match frame {
            Frame::Leaf {
                joins: Some(joined),
                ..
            } => {
                if let Joined::Header(header) = *joined
                    && let Some(id) = task_at(header)
                {
                    *joined = Joined::Task { id, header };
                }
            }
            Frame::Branches { branches } => {
                for branch in branches {
                    resolve_joins(branch, task_at);
                }
            }
            _ => {}
        }
    }
}

/// Types not entered: their contents are not what the task awaits, and
/// following their pointers would reach unrelated values.
const NOT_ENTERED: &[&str] = &[
    "alloc::sync::",
    "alloc::rc::",
    "alloc::vec::",
    "alloc::collections::",
    "alloc::string::",
    "std::collections::",
    "hashbrown::",
    "core::task::wake::",
    "core::marker::",
];

/// How a value was reached, and through how many non-state-machine
/// values since the last state machine.
#[derive(Clone, Copy)]
enum Reached {
    /// As an awaitee, a member, or a `dyn Future`'s object.
    ByValue(u32),
    /// Through a thin pointer (`&mut F` in a `select!`, or any captured
    /// reference).
    ByPointer(u32),
}

impl Reached {
    fn wrappers(self) -> u32 {
        match self {
            Reached::ByValue(n) | Reached::ByPointer(n) => n,
        }
    }
}

/// tokio futures that a pointer may lead to (`tokio::pin!(sleep)` then
/// `&mut sleep` in a `select!`). Other tokio types behind a pointer (a
/// captured `&Notify`, `&Mutex`) are not what the task awaits.
const POINTED_AT_FUTURES: &[&str] = &[
    "tokio::time::sleep::Sleep",
    "tokio::sync::notify::Notified",
    "tokio::sync::batch_semaphore::Acquire",
    "tokio::runtime::io::scheduled_io::Readiness",
    "tokio::runtime::task::join::JoinHandle",
    "tokio::sync::oneshot::Receiver",
    "tokio::io::util::",
];

/// tokio types looked through rather than named as leaves.
const TOKIO_WRAPPERS: &[&str] = &[
    "tokio::runtime::task::trace::Root",
    "tokio::future::poll_fn::PollFn",
    "tokio::future::maybe_done::MaybeDone",
    "tokio::time::timeout::Timeout",
    "tokio::task::task_local::TaskLocalFuture",
    "tokio::task::unconstrained::Unconstrained",
    "tokio::runtime::coop::Coop",
];

pub struct ChainReader<'a> {
    pub memory: &'a ProcessMemory,
    pub layouts: &'a FutureLayouts,
    /// Runtime address minus ELF address of the executable.
    pub bias: u64,
    nodes: usize,
}

impl<'a> ChainReader<'a> {
    pub fn new(memory: &'a ProcessMemory, layouts: &'a FutureLayouts, bias: u64) -> Self {
        ChainReader {
            memory,
            layouts,
            bias,
            nodes: 0,
        }
    }

    /// The chain of the future of type `ty` at `address`.
    pub fn chain(&mut self, address: u64, ty: TypeRef) -> Result<Vec<Frame>, ReadError> {
        self.nodes = 0;
        self.walk(address, ty, Reached::ByValue(0))
    }

    fn walk(
        &mut self,
        address: u64,
        ty: TypeRef,
        reached: Reached,
    ) -> Result<Vec<Frame>, ReadError> {
        let wrappers = reached.wrappers();
        self.nodes += 1;
        if self.nodes > MAX_NODES || wrappers > MAX_WRAPPERS {
            return Ok(Vec::new());
        }
        let Some(desc) = self.layouts.types.get(&ty) else {
            return Ok(Vec::new());
        };
        let name = desc.name.as_str();
        match &desc.kind {
            TypeKind::Coroutine {
                state,
                states,
                self_type,
            } => {
                let function = method_name(&function_name(name), self_type.as_deref());
                if name.starts_with("tokio::") {
                    return Ok(vec![Frame::Leaf {
                        name: function,
                        joins: None,
                    }]);
                }
                let value = self.read_discriminant(address, state)?;
                let Some(current) = states.iter().find(|s| s.value == value) else {
                    return Ok(vec![Frame::Leaf {
                        name: format!("{function} (unknown state {value})"),
                        joins: None,
                    }]);
                };
                match current.name.as_str() {
                    "Unresumed" => Ok(vec![Frame::NotStarted { function }]),
                    "Returned" | "Panicked" => Ok(vec![Frame::Finished { function }]),
                    _ => {
                        let mut chain = vec![Frame::Await {
                            function,
                            file: current.file.clone(),
                            line: current.line,
                        }];
                        if let Some(awaitee) = &current.awaitee {
                            chain.extend(self.walk(
                                address + awaitee.offset,
                                awaitee.ty,
                                Reached::ByValue(0),
                            )?);
                        }
                        Ok(chain)
                    }
                }
            }
            // Through a pointer, only known futures: a captured `&Notify`
            // is not something the task awaits.
            _ if is_tokio_leaf(name)
                && matches!(reached, Reached::ByPointer(_))
                && !POINTED_AT_FUTURES.iter().any(|f| name.starts_with(f)) =>
            {
                Ok(Vec::new())
            }
            _ if is_tokio_leaf(name) => {
                let joins = match &desc.kind {
                    TypeKind::Struct { members } if name.starts_with(JOIN_HANDLE) => {
                        self.join_handle_task(address, members)?
                    }
                    _ => None,
                };
                Ok(vec![Frame::Leaf {
                    name: leaf_name(name),
                    joins,
                }])
            }
            _ if NOT_ENTERED.iter().any(|prefix| name.starts_with(prefix)) => Ok(Vec::new()),
            TypeKind::Struct { members } => {
                if let Some(chain) = self.dyn_future(address, members, wrappers)? {
                    return Ok(chain);
                }
                self.members(address, members, wrappers)
            }
            TypeKind::Enum {
                discriminant,
                variants,
            } => {
                let value = self.read_discriminant(address, discriminant)?;
                let variant = variants
                    .iter()
                    .find(|v| v.value == Some(value))
                    .or_else(|| variants.iter().find(|v| v.value.is_none()));
                match variant {
                    Some(variant) => self.members(address, &variant.members, wrappers),
                    None => Ok(Vec::new()),
                }
            }
            TypeKind::Pointer {
                target: Some(target),
            } => {
                let pointer = self.memory.read_u64(address)?;
                if pointer == 0 || pointer % 8 != 0 || !self.layouts.types.contains_key(target) {
                    return Ok(Vec::new());
                }
                // A dangling pointer is not the task's problem: no chain.
                match self.walk(pointer, *target, Reached::ByPointer(wrappers + 1)) {
                    Err(ReadError::Unmapped) => Ok(Vec::new()),
                    other => other,
                }
            }
            TypeKind::Pointer { target: None } | TypeKind::Other => Ok(Vec::new()),
        }
    }

    /// The header a `JoinHandle` points at (`JoinHandle { raw: RawTask {
    /// ptr } }`: its `raw` member's first word).
    fn join_handle_task(
        &self,
        address: u64,
        members: &[Member],
    ) -> Result<Option<Joined>, ReadError> {
        let Some(raw) = members.iter().find(|m| m.name == "raw") else {
            return Ok(None);
        };
        let header = self.memory.read_u64(address + raw.offset)?;
        Ok((header != 0).then_some(Joined::Header(header)))
    }

    /// A `*mut dyn Future` (members `pointer` and `vtable`): the concrete
    /// future behind it, by its vtable.
    fn dyn_future(
        &mut self,
        address: u64,
        members: &[Member],
        wrappers: u32,
    ) -> Result<Option<Vec<Frame>>, ReadError> {
        let (Some(data), Some(vtable)) = (
            members.iter().find(|m| m.name == "pointer"),
            members.iter().find(|m| m.name == "vtable"),
        ) else {
            return Ok(None);
        };
        if members.len() != 2 {
            return Ok(None);
        }
        let data = self.memory.read_u64(address + data.offset)?;
        let vtable = self.memory.read_u64(address + vtable.offset)?;
        let Some(&concrete) = self
            .layouts
            .dyn_vtables
            .get(&vtable.wrapping_sub(self.bias))
        else {
            return Ok(Some(Vec::new()));
        };
        if data == 0 {
            return Ok(Some(Vec::new()));
        }
        self.walk(data, concrete, Reached::ByValue(wrappers + 1))
            .map(Some)
    }

    /// Every member that leads to a future; several make branches.
    fn members(
        &mut self,
        address: u64,
        members: &[Member],
        wrappers: u32,
    ) -> Result<Vec<Frame>, ReadError> {
        let mut found = Vec::new();
        for member in members {
            let chain = self.walk(
                address + member.offset,
                member.ty,
                Reached::ByValue(wrappers + 1),
            )?;
            if !chain.is_empty() {
                found.push(chain);
            }
        }
        Ok(match found.len() {
            0 => Vec::new(),
            1 => found.pop().expect("one"),
            _ => vec![Frame::Branches { branches: found }],
        })
    }

    fn read_discriminant(&self, address: u64, at: &Discriminant) -> Result<u64, ReadError> {
        self.memory.read_uint(address + at.offset, at.size)
    }
}

fn is_tokio_leaf(name: &str) -> bool {
    name.starts_with("tokio::") && !TOKIO_WRAPPERS.iter().any(|w| name.starts_with(w))
}

/// `tokio::sync::notify::Notified<'_>` → `tokio::sync::notify::Notified`.
fn leaf_name(name: &str) -> String {
    match name.find('<') {
        Some(open) => name[..open].to_string(),
        None => name.to_string(),
    }
}

/// `tokio::sync::mutex::{impl#10}::lock` with `self: &tokio::sync::mutex::Mutex<u64>`
/// → `tokio::sync::mutex::Mutex::lock`; generic arguments are dropped.
pub fn method_name(function: &str, self_type: Option<&str>) -> String {
    let function = match function.find('<') {
        Some(open) if function.ends_with('>') => &function[..open],
        _ => function,
    };
    let Some(start) = function.find("::{impl#") else {
        return function.to_string();
    };
    let Some(len) = function[start + 2..].find('}') else {
        return function.to_string();
    };
    let rest = &function[start + 2 + len + 1..];
    let self_name = self_type
        .map(|t| {
            t.trim_start_matches('&')
                .trim_start_matches("mut ")
                .trim_start_matches('*')
        })
        .map(|t| t.trim_start_matches("const ").trim_start_matches("mut "))
        .map(|t| t.split('<').next().unwrap_or(t))
        .and_then(|t| t.rsplit("::").next())
        .filter(|t| !t.is_empty());
    match self_name {
        Some(self_name) => format!("{}::{self_name}{rest}", &function[..start]),
        None => format!("{}{rest}", &function[..start]),
    }
}

/// The task's name for people: its future's function, without tokio's
/// taskdump `Root<…>` wrapper.
pub fn task_name(future_type: &str) -> String {
    let inner = future_type
        .strip_prefix("tokio::runtime::task::trace::Root<")
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(future_type);
    function_name(inner)
}

/// `app::handler::{async_fn_env#0}` → `app::handler`;
/// `app::main::{async_block_env#0}` → `app::main::{async block}`.
pub fn function_name(type_name: &str) -> String {
    if let Some(at) = type_name.rfind("::{async_fn_env#0}") {
        // Generic async fns end in their arguments: `…::{async_fn_env#0}<u64>`.
        return type_name[..at].to_string();
    }
    // A block inside an async fn or block:
    // `app::serve::{async_fn#0}::{async_block_env#0}`.
    let mut type_name = type_name.replace("::{async_fn#0}", "");
    while let Some(at) = type_name.find("::{async_block#") {
        let Some(close) = type_name[at..].find('}') else {
            break;
        };
        type_name.replace_range(at + 2..at + close + 1, "{async block}");
    }
    match type_name.rfind("::{async_block_env#") {
        Some(at) => format!("{}::{{async block}}", &type_name[..at]),
        None => type_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_like_code() {
        assert_eq!(
            function_name("app::handler::{async_fn_env#0}"),
            "app::handler"
        );
        assert_eq!(
            function_name("app::main::{async_block_env#1}"),
            "app::main::{async block}"
        );
        assert_eq!(
            function_name("app::serve::{async_fn#0}::{async_block_env#0}"),
            "app::serve::{async block}"
        );
        assert_eq!(
            function_name("app::main::{async_block#0}::{async_block_env#0}"),
            "app::main::{async block}::{async block}"
        );
        assert_eq!(
            leaf_name("tokio::sync::notify::Notified<'_>"),
            "tokio::sync::notify::Notified"
        );
        assert_eq!(
            method_name(
                &function_name("tokio::sync::mutex::{impl#10}::lock::{async_fn_env#0}<u64>"),
                Some("&tokio::sync::mutex::Mutex<u64>")
            ),
            "tokio::sync::mutex::Mutex::lock"
        );
        assert_eq!(method_name("a::{impl#2}::run", None), "a::run");
        assert_eq!(
            task_name("tokio::runtime::task::trace::Root<app::idle::{async_fn_env#0}>"),
            "app::idle"
        );
        assert!(is_tokio_leaf("tokio::time::sleep::Sleep"));
        assert!(!is_tokio_leaf(
            "tokio::runtime::task::trace::Root<app::f::{async_fn_env#0}>"
        ));
        assert!(!is_tokio_leaf("app::Sleep"));
    }
}
