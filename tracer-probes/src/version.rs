//! Which tokio the binary was built with, from the source paths that panic
//! locations leave in read-only data:
//! `/root/.cargo/registry/src/index.crates.io-…/tokio-1.54.1/src/runtime/…`.

use std::collections::HashMap;

const MARKER: &[u8] = b"tokio-1.";

/// The most common `tokio-1.X.Y` version in `data`, e.g. "1.54.1". Ties go to
/// the higher version, so the answer doesn't depend on scan order.
pub fn scan_tokio_version(data: &[u8]) -> Option<String> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut from = 0;
    while let Some(pos) = find(&data[from..], MARKER) {
        let start = from + pos;
        from = start + MARKER.len();
        // A crate directory, not e.g. `my-tokio-1.2`: the byte before is a path separator.
        if start > 0 && data[start - 1] != b'/' && data[start - 1] != b'\\' {
            continue;
        }
        if let Some(version) = version_at(&data[start + "tokio-".len()..]) {
            *counts.entry(version).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|(a_version, a_count), (b_version, b_count)| {
            a_count
                .cmp(b_count)
                .then_with(|| parse_version(a_version).cmp(&parse_version(b_version)))
        })
        .map(|(version, _)| version)
}

/// `1.54.1/src/…` → "1.54.1". Needs three numeric parts followed by `/` or `\`
/// (pre-release suffixes like `-alpha.1` are kept).
fn version_at(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == b'/' || b == b'\\')?;
    let text = std::str::from_utf8(&bytes[..end]).ok()?;
    let core = text.split_once('-').map_or(text, |(core, _)| core);
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    numeric.then(|| text.to_string())
}

/// "1.54.1" → (1, 54, 1); anything unparsable sorts first.
pub fn parse_version(version: &str) -> (u64, u64, u64) {
    let core = version.split_once('-').map_or(version, |(core, _)| core);
    let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_common_version_wins() {
        let data = b"\0/reg/tokio-1.54.1/src/a.rs\0/reg/tokio-1.54.1/src/b.rs\0/reg/tokio-1.8.0/src/c.rs\0";
        assert_eq!(scan_tokio_version(data).as_deref(), Some("1.54.1"));
    }

    #[test]
    fn ignores_lookalikes_and_truncated_paths() {
        assert_eq!(
            scan_tokio_version(b"/x/my-tokio-1.2.3/src\0/x/tokio-1.5"),
            None
        );
        assert_eq!(scan_tokio_version(b"/x/tokio-1.2/src/"), None);
        assert_eq!(
            scan_tokio_version(b"C:\\reg\\tokio-1.23.0\\src\\lib.rs").as_deref(),
            Some("1.23.0")
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("1.23.0") > parse_version("1.8.4"));
        assert_eq!(parse_version("1.0.0-alpha.1"), (1, 0, 0));
    }
}
