//! Finding the DWARF for a binary that does not carry its own.
//!
//! Distributions, and projects that ship small binaries, strip the debug
//! info into a separate file (`objcopy --only-keep-debug`) and leave one of
//! two pointers in the binary, which gdb's rules resolve:
//! - a build ID note: the file is `DEBUG_DIR/.build-id/xx/yyyy….debug`;
//! - a `.gnu_debuglink` section (file name + CRC32): the file is next to the
//!   binary, in its `.debug/` folder, or under `DEBUG_DIR/<binary's folder>/`.
//!
//! A candidate is only taken if it really belongs to the binary (same build
//! ID, or the CRC matches) and really has DWARF: a stale debug file gives
//! confidently wrong lines, which is worse than none.

use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

/// Where to look for separate debug files.
#[derive(Clone, Debug)]
pub struct DebugInfoLocator {
    /// Searched in this order. Each is tried inside the traced process's root
    /// (its mount namespace) and then as is (debug files installed on the
    /// host for a containerized program).
    pub debug_dirs: Vec<PathBuf>,
}

impl Default for DebugInfoLocator {
    fn default() -> Self {
        DebugInfoLocator {
            debug_dirs: vec![PathBuf::from("/usr/lib/debug")],
        }
    }
}

impl DebugInfoLocator {
    /// The file to read DWARF from for the binary at `path` (as the process
    /// sees it), whose bytes are `binary`: the binary itself if it has
    /// DWARF, else a matching separate debug file, else `None`.
    ///
    /// `in_root` maps a path as the process sees it to one we can open (see
    /// [`crate::ProcessMaps::path_in_process_root`]).
    pub fn find(
        &self,
        path: &Path,
        binary: &[u8],
        in_root: &dyn Fn(&Path) -> PathBuf,
    ) -> Option<DebugFile> {
        let elf = object::File::parse(binary).ok()?;
        if has_dwarf(&elf) {
            return Some(DebugFile::Itself);
        }
        let build_id = elf.build_id().ok().flatten();

        let mut candidates: Vec<(PathBuf, Check)> = Vec::new();
        if let Some(id) = build_id.filter(|id| id.len() >= 2) {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            for dir in &self.debug_dirs {
                let file = dir
                    .join(".build-id")
                    .join(&hex[..2])
                    .join(format!("{}.debug", &hex[2..]));
                candidates.push((file, Check::BuildId));
            }
        }
        if let Ok(Some((name, crc))) = elf.gnu_debuglink() {
            let name = Path::new(std::str::from_utf8(name).ok()?);
            let dir = path.parent().unwrap_or(Path::new("/"));
            let check = Check::Crc(crc);
            candidates.push((dir.join(name), check));
            candidates.push((dir.join(".debug").join(name), check));
            for debug_dir in &self.debug_dirs {
                let relative = dir.strip_prefix("/").unwrap_or(dir);
                candidates.push((debug_dir.join(relative).join(name), check));
            }
        }

        for (candidate, check) in candidates {
            for file in [in_root(&candidate), candidate.clone()] {
                if matches(&file, check, build_id) {
                    return Some(DebugFile::Separate(file));
                }
            }
        }
        None
    }
}

/// Where a binary's DWARF is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DebugFile {
    /// In the binary.
    Itself,
    /// In this file (openable by the tracer).
    Separate(PathBuf),
}

#[derive(Clone, Copy)]
enum Check {
    BuildId,
    /// The debuglink's CRC32 of the whole debug file.
    Crc(u32),
}

fn has_dwarf(elf: &object::File) -> bool {
    elf.section_by_name(".debug_info")
        .is_some_and(|s| s.size() > 0 && s.kind() != object::SectionKind::UninitializedData)
}

fn matches(file: &Path, check: Check, build_id: Option<&[u8]>) -> bool {
    let Ok(data) = std::fs::read(file) else {
        return false;
    };
    let Ok(elf) = object::File::parse(&*data) else {
        return false;
    };
    if !has_dwarf(&elf) {
        return false;
    }
    let candidate_id = elf.build_id().ok().flatten();
    match (check, build_id, candidate_id) {
        // Build IDs, when both have one, are the stronger and cheaper test.
        (_, Some(want), Some(have)) => want == have,
        (Check::BuildId, _, _) => false,
        (Check::Crc(crc), _, _) => crc32(&data) == crc,
    }
}

/// The CRC-32 (IEEE, reflected, as zlib's) that `.gnu_debuglink` records.
/// The table is rebuilt per call: this runs once per debug file, off the hot path.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let table: [u32; 256] = std::array::from_fn(|i| {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        c
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The C library (glibc, with libpthread before 2.34; musl). Every thread's
/// outermost frames are there (`start_thread`, `clone3`), so every stack
/// reaches it, but its DWARF is not read, its symbol table is enough: with
/// its debug package installed, decompressing and indexing that DWARF was
/// ~300 ms of CPU (most of the symbols' preparing while recording, or of
/// the stop when that was not done yet), for file:line in glibc's own frames.
pub fn is_c_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    [
        "libc.so",
        "libc-",
        "libpthread.so",
        "libpthread-",
        "ld-musl-",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn knows_the_c_library() {
        assert!(is_c_library("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_c_library("/lib/x86_64-linux-gnu/libpthread-2.31.so"));
        assert!(is_c_library("/lib/ld-musl-x86_64.so.1"));
        assert!(!is_c_library("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"));
        assert!(!is_c_library("/usr/lib/x86_64-linux-gnu/libcap.so.2"));
    }
}
