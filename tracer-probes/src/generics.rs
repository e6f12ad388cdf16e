//! Pure string parsing of demangled Rust names: generic argument lists and
//! path segments. Types nest (`Cell<A<B,C>,D>`), so everything here tracks the
//! `<…>`/`(…)`/`[…]` depth instead of splitting naively.

/// Finds the `>` (or `)`/`]`) that closes the bracket opened at `open`.
/// Skips the `>` of a `->` arrow (function types in generic arguments).
fn matching_close(s: &str, open: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    for i in open..bytes.len() {
        match bytes[i] {
            b'<' | b'(' | b'[' => depth += 1,
            b'>' if i > 0 && bytes[i - 1] == b'-' => {}
            b'>' | b')' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits `s` at every top-level (depth 0) occurrence of `separator`.
pub fn split_top_level<'a>(s: &'a str, separator: &str) -> Vec<&'a str> {
    let bytes = s.as_bytes();
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'<' | b'(' | b'[' => depth += 1,
            b'>' if i > 0 && bytes[i - 1] == b'-' => {}
            b'>' | b')' | b']' => depth = depth.saturating_sub(1),
            _ if depth == 0 && s[i..].starts_with(separator) => {
                parts.push(&s[start..i]);
                i += separator.len();
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts
}

/// The generic arguments of the list that opens with the `<` at `open`,
/// trimmed. Legacy demangling prints `Cell<A,B>`, v0 prints `Cell<A, B>`;
/// both give `["A", "B"]`.
pub fn generic_args_at(s: &str, open: usize) -> Option<Vec<String>> {
    let close = matching_close(s, open)?;
    let inner = &s[open + 1..close];
    Some(
        split_top_level(inner, ",")
            .into_iter()
            .map(|arg| arg.trim().to_string())
            .collect(),
    )
}

/// For every occurrence of the generic type `type_path<…>` in `name`, its
/// first generic argument. `type_path` must match a whole path (it is not
/// preceded by an identifier character or `:`).
pub fn first_args_of(name: &str, type_path: &str) -> Vec<String> {
    let needle = format!("{type_path}<");
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(pos) = name[from..].find(&needle) {
        let start = from + pos;
        let open = start + needle.len() - 1;
        let preceded_by_path_char = name[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        if !preceded_by_path_char
            && let Some(first) =
                generic_args_at(name, open).and_then(|args| args.into_iter().next())
        {
            found.push(first);
        }
        from = open + 1;
    }
    found
}

/// Removes generic arguments from a demangled function path so it can be
/// compared with the catalog: v0's turbofish `::<…>` segments, the argument
/// list of a generic type in the path (legacy's literal `OwnedTasks<S>`, v0's
/// `OwnedTasks<alloc::sync::Arc<…>>`), and v0's `<Type>::method` form of an
/// inherent method (not `<A as Trait>::method`).
///
/// `tokio::runtime::task::raw::poll::<F, S>` → `tokio::runtime::task::raw::poll`;
/// `<tokio::…::Context>::park` → `tokio::…::Context::park`;
/// `tokio::…::OwnedTasks<S>::bind_inner` → `tokio::…::OwnedTasks::bind_inner`.
pub fn strip_generic_args(path: &str) -> String {
    let mut path = path.to_string();
    // `<Type>::rest` → `Type::rest`, for inherent impls.
    if path.starts_with('<')
        && let Some(close) = matching_close(&path, 0)
        && path[close + 1..].starts_with("::")
        && split_top_level(&path[1..close], " as ").len() == 1
    {
        path = format!("{}{}", &path[1..close], &path[close + 1..]);
    }
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i..].starts_with("::<")
            && let Some(close) = matching_close(&path, i + 2)
        {
            i = close + 1;
            continue;
        }
        let after_type_name = out
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if path[i..].starts_with('<')
            && after_type_name
            && let Some(close) = matching_close(&path, i)
        {
            i = close + 1;
            continue;
        }
        let c = path[i..].chars().next().expect("in bounds");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Is this path segment an anonymous part (closure, async body, shim) rather
/// than a name a person wrote? e.g. `{{closure}}`, `{closure#0}`, `{async_fn_env#0}`.
fn is_anonymous_segment(segment: &str) -> bool {
    segment.starts_with('{')
}

/// A short display name for a type path: the anonymous tail segments plus the
/// last named segment before them (the function or type name), with the same
/// shortening applied inside generic arguments.
///
/// `multi_worker::fixture_busy_task::{{closure}}` → `fixture_busy_task::{{closure}}`;
/// `tokio::runtime::blocking::task::BlockingTask<a::b::launch::{{closure}}>` →
/// `BlockingTask<launch::{{closure}}>`.
pub fn short_name(full: &str) -> String {
    // Several names joined by " | " (identical code folding): shorten each.
    if full.contains(" | ") {
        return full
            .split(" | ")
            .map(short_name)
            .collect::<Vec<_>>()
            .join(" | ");
    }
    let full = full.trim();
    let segments = split_top_level(full, "::");
    let first_kept = segments
        .iter()
        .rposition(|segment| !is_anonymous_segment(segment))
        .unwrap_or(0);
    segments[first_kept..]
        .iter()
        .map(|segment| shorten_generic_args(segment))
        .collect::<Vec<_>>()
        .join("::")
}

/// `Name<a::B,c::D>` → `Name<B, D>`; anything else unchanged.
fn shorten_generic_args(segment: &str) -> String {
    let Some(open) = segment.find('<') else {
        return segment.to_string();
    };
    match (
        matching_close(segment, open),
        generic_args_at(segment, open),
    ) {
        (Some(close), Some(args)) if close + 1 == segment.len() => {
            let args: Vec<String> = args.iter().map(|arg| short_name(arg)).collect();
            format!("{}<{}>", &segment[..open], args.join(", "))
        }
        _ => segment.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_args_handle_nesting_and_legacy_commas() {
        let name = "core::ptr::drop_in_place<tokio::runtime::task::core::Cell<tokio::runtime::blocking::task::BlockingTask<a::b::{{closure}}>,tokio::runtime::blocking::schedule::BlockingSchedule>>";
        assert_eq!(
            first_args_of(name, "tokio::runtime::task::core::Cell"),
            ["tokio::runtime::blocking::task::BlockingTask<a::b::{{closure}}>"]
        );
    }

    #[test]
    fn first_args_with_v0_spacing_and_fn_arrows() {
        let name = "core::ptr::drop_in_place::<tokio::runtime::task::core::Stage<x::Wrap<fn() -> u8, u8>>>";
        assert_eq!(
            first_args_of(name, "tokio::runtime::task::core::Stage"),
            ["x::Wrap<fn() -> u8, u8>"]
        );
    }

    #[test]
    fn first_args_match_whole_paths_only() {
        // `CoreStage<` must not be found when looking for `Stage<`.
        let name =
            "core::ptr::drop_in_place<tokio::runtime::task::core::CoreStage<m::f::{{closure}}>>";
        assert!(first_args_of(name, "core::Stage").is_empty());
        assert_eq!(
            first_args_of(name, "tokio::runtime::task::core::CoreStage"),
            ["m::f::{{closure}}"]
        );
    }

    #[test]
    fn strip_turbofish_and_inherent_impl_brackets() {
        assert_eq!(
            strip_generic_args(
                "tokio::runtime::task::raw::poll::<m::f::{closure#0}, alloc::sync::Arc<h::Handle>>"
            ),
            "tokio::runtime::task::raw::poll"
        );
        assert_eq!(
            strip_generic_args(
                "<tokio::runtime::scheduler::current_thread::Context>::park_internal"
            ),
            "tokio::runtime::scheduler::current_thread::Context::park_internal"
        );
        let trait_method = "<a::B as core::future::Future>::poll";
        assert_eq!(strip_generic_args(trait_method), trait_method);
        // A generic type's parameters, legacy (literal) and v0 (real types).
        assert_eq!(
            strip_generic_args("tokio::runtime::task::list::OwnedTasks<S>::bind_inner"),
            "tokio::runtime::task::list::OwnedTasks::bind_inner"
        );
        assert_eq!(
            strip_generic_args(
                "<tokio::runtime::task::list::OwnedTasks<alloc::sync::Arc<tokio::runtime::scheduler::multi_thread::handle::Handle>>>::bind_inner"
            ),
            "tokio::runtime::task::list::OwnedTasks::bind_inner"
        );
        assert_eq!(
            strip_generic_args("<a::B<T> as core::future::Future>::poll"),
            trait_method
        );
        assert_eq!(
            strip_generic_args("tokio::runtime::task::raw::poll"),
            "tokio::runtime::task::raw::poll"
        );
    }

    #[test]
    fn short_names_keep_the_function_name() {
        assert_eq!(
            short_name("multi_worker::fixture_busy_task::{{closure}}"),
            "fixture_busy_task::{{closure}}"
        );
        assert_eq!(
            short_name("m::fixture_sleeper::{async_fn_env#0}"),
            "fixture_sleeper::{async_fn_env#0}"
        );
        assert_eq!(
            short_name("m::outer::{{closure}}::{{closure}}"),
            "outer::{{closure}}::{{closure}}"
        );
        assert_eq!(
            short_name(
                "tokio::runtime::blocking::task::BlockingTask<tokio::runtime::scheduler::multi_thread::worker::Launch::launch::{{closure}}>"
            ),
            "BlockingTask<launch::{{closure}}>"
        );
        assert_eq!(short_name("my_app::Server"), "Server");
        assert_eq!(
            short_name("a::b::{{closure}} | a::c::{{closure}}"),
            "b::{{closure}} | c::{{closure}}"
        );
    }
}
