//! Where a process has mapped which executable file, from `/proc/PID/maps`.
//!
//! Both the unwinder and the symbolizer start here: an address means nothing
//! until we know which file's code sits there and how far that file was
//! shifted when it was loaded (its *load bias*).

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// One executable, file-backed mapping of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of the byte mapped at `start`.
    pub file_offset: u64,
    /// The path as the process sees it, inside its own mount namespace,
    /// without the kernel's " (deleted)" suffix.
    pub path: String,
    /// The kernel said " (deleted)": the file was removed or replaced (a
    /// rebuilt binary) after it was mapped; only `map_files` still reaches it.
    pub deleted: bool,
    /// The path the tracer should open to read the bytes that are mapped.
    /// `/proc/PID/map_files/START-END` reaches the mapped inode itself, even
    /// when deleted or in another mount namespace; `/proc/PID/root/PATH` is
    /// the fallback where map_files may not be opened. Equal to `path` when
    /// the maps were parsed without a pid.
    pub open_path: PathBuf,
    /// The file's inode, as the maps say: with the path, what tells a
    /// rebuilt binary (same path, new file) from the one mapped before.
    pub inode: u64,
}

/// The file-backed executable mappings of one file, taken together: that is
/// what a "module" is for the unwinder and the symbolizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Path as the process sees it (see [`Mapping::path`]).
    pub path: String,
    /// From the first executable mapping (see [`Mapping::open_path`]).
    pub open_path: PathBuf,
    /// From the lowest executable mapping start to the highest end.
    pub avma_range: Range<u64>,
    /// The lowest executable mapping, from which the load bias is computed.
    pub first_mapping_start: u64,
    pub first_mapping_offset: u64,
    /// See [`Mapping::inode`].
    pub inode: u64,
    /// See [`Mapping::deleted`].
    pub deleted: bool,
}

/// The executable mappings of a process, plus the two kernel-provided code
/// mappings a stack can point into: `[vdso]` and `[uprobes]`.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    pid: Option<u32>,
    /// Sorted by start address.
    mappings: Vec<Mapping>,
    uprobes: Option<Range<u64>>,
    vdso: Option<Range<u64>>,
}

impl ProcessMaps {
    /// Reads `/proc/PID/maps`. Needs the same access as ptrace (root will do).
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let maps_path = format!("/proc/{pid}/maps");
        let text =
            std::fs::read_to_string(&maps_path).with_context(|| format!("reading {maps_path}"))?;
        Ok(Self::parse_for_pid(&text, Some(pid)))
    }

    /// Parses the text of a maps file. Without a pid the files are opened by
    /// their plain paths (tests, or a process in our own mount namespace).
    pub fn parse(text: &str) -> Self {
        Self::parse_for_pid(text, None)
    }

    fn parse_for_pid(text: &str, pid: Option<u32>) -> Self {
        let mut maps = ProcessMaps {
            pid,
            ..Default::default()
        };
        for line in text.lines() {
            let Some(entry) = parse_line(line) else {
                continue;
            };
            let executable = entry.perms.as_bytes().get(2) == Some(&b'x');
            match entry.pathname {
                "[uprobes]" => maps.uprobes = Some(entry.start..entry.end),
                "[vdso]" => maps.vdso = Some(entry.start..entry.end),
                // inode 0: anonymous memory, the stack, JIT code, … nothing
                // on disk to read unwind info or symbols from.
                path if executable && entry.inode != 0 && !path.is_empty() => {
                    let (path, deleted) = match path.strip_suffix(" (deleted)") {
                        Some(p) => (p, true),
                        None => (path, false),
                    };
                    let open_path = match pid {
                        Some(pid) => choose_open_path(pid, entry.start, entry.end, path),
                        None => PathBuf::from(path),
                    };
                    maps.mappings.push(Mapping {
                        start: entry.start,
                        end: entry.end,
                        file_offset: entry.offset,
                        path: path.to_owned(),
                        deleted,
                        open_path,
                        inode: entry.inode,
                    });
                }
                _ => {}
            }
        }
        maps.mappings.sort_by_key(|m| m.start);
        maps
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The executable file mappings, sorted by start address.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// The mapping holding `address`, if it is file-backed executable code.
    pub fn find(&self, address: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= address);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (address < m.end).then_some(m)
    }

    /// The executable mappings grouped per file, in address order. A file
    /// normally has one executable mapping; linkers that split code over
    /// several segments give several, and they share one set of unwind info.
    pub fn modules(&self) -> Vec<Module> {
        let mut modules: Vec<Module> = Vec::new();
        for m in &self.mappings {
            match modules.iter_mut().find(|module| module.path == m.path) {
                Some(module) => {
                    module.avma_range.start = module.avma_range.start.min(m.start);
                    module.avma_range.end = module.avma_range.end.max(m.end);
                }
                None => modules.push(Module {
                    path: m.path.clone(),
                    open_path: m.open_path.clone(),
                    avma_range: m.start..m.end,
                    first_mapping_start: m.start,
                    first_mapping_offset: m.file_offset,
                    inode: m.inode,
                    deleted: m.deleted,
                }),
            }
        }
        modules
    }

    /// Where the kernel's uretprobe trampoline is mapped, if a uretprobe was
    /// ever hit in this process. Return addresses in here stand for the real
    /// ones the kernel saved (see [`crate::Unwinder::unwind_through_uretprobes`]).
    pub fn uprobes_trampoline(&self) -> Option<Range<u64>> {
        self.uprobes.clone()
    }

    /// Where the vDSO is mapped (clock_gettime and friends run there).
    pub fn vdso(&self) -> Option<Range<u64>> {
        self.vdso.clone()
    }

    /// The vDSO's bytes, a complete ELF image, read from the process's
    /// memory: it has no file on disk. `None` without a pid or access.
    pub fn read_vdso_image(&self) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (pid, range) = (self.pid?, self.vdso.clone()?);
        let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
        let mut image = vec![0; (range.end - range.start) as usize];
        mem.read_exact_at(&mut image, range.start).ok()?;
        Some(image)
    }

    /// A path as the process sees it, made openable from the tracer: through
    /// `/proc/PID/root` when we know the pid (other mount namespaces), as is
    /// otherwise.
    pub fn path_in_process_root(&self, path: &Path) -> PathBuf {
        match self.pid {
            Some(pid) => {
                let relative = path.strip_prefix("/").unwrap_or(path);
                PathBuf::from(format!("/proc/{pid}/root")).join(relative)
            }
            None => path.to_owned(),
        }
    }
}

/// The fields of one maps line.
struct MapsLine<'a> {
    start: u64,
    end: u64,
    perms: &'a str,
    offset: u64,
    inode: u64,
    pathname: &'a str,
}

/// `START-END PERMS OFFSET DEV INODE [PATHNAME]`; the pathname is whatever
/// follows the padding and may itself contain spaces.
fn parse_line(line: &str) -> Option<MapsLine<'_>> {
    let mut rest = line;
    let mut field = || {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        rest = tail;
        field
    };
    let (start, end) = field().split_once('-')?;
    let perms = field();
    let offset = field();
    let _dev = field();
    let inode = field();
    Some(MapsLine {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms,
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        pathname: rest.trim(),
    })
}

fn choose_open_path(pid: u32, start: u64, end: u64, path: &str) -> PathBuf {
    let map_file = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    // Opening map_files needs CAP_SYS_ADMIN on older kernels; stat tells.
    if std::fs::metadata(&map_file).is_ok() {
        map_file
    } else {
        PathBuf::from(format!("/proc/{pid}/root{path}"))
    }
}

/// The load bias of an ELF file: what to add to its addresses (SVMAs) to get
/// the addresses in the process (AVMAs). Found from the executable mapping at
/// `mapping_start`, which maps the file from `mapping_offset` on: the PT_LOAD
/// segment it maps starts `p_offset - mapping_offset` bytes in (the kernel
/// maps whole pages), at `p_vaddr + bias`.
pub(crate) fn load_bias(
    elf: &object::File,
    mapping_start: u64,
    mapping_offset: u64,
) -> Option<u64> {
    use object::{Object, ObjectSegment};
    const PAGE: u64 = 4096;
    // Prefer the executable segment; any segment mapped there gives the same
    // answer but a file can have non-executable ones in the same page.
    let mut candidates: Vec<_> = elf
        .segments()
        .filter(|s| {
            let (p_offset, _) = s.file_range();
            p_offset >= mapping_offset && p_offset < mapping_offset + PAGE
        })
        .collect();
    candidates.sort_by_key(|s| !is_executable(s));
    let segment = candidates.first()?;
    let (p_offset, _) = segment.file_range();
    Some(
        mapping_start
            .wrapping_add(p_offset - mapping_offset)
            .wrapping_sub(segment.address()),
    )
}

/// Whether an ELF segment holds code (PF_X).
pub(crate) fn is_executable<'data>(segment: &impl object::ObjectSegment<'data>) -> bool {
    match segment.flags() {
        object::SegmentFlags::Elf { p_flags, .. } => p_flags.0 & object::elf::PF_X.0 != 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
5581a2c00000-5581a2c1c000 r--p 00000000 08:01 1835081                    /usr/bin/my prog
5581a2c1c000-5581a2c9e000 r-xp 0001c000 08:01 1835081                    /usr/bin/my prog
5581a2c9e000-5581a2cb0000 r--p 0009e000 08:01 1835081                    /usr/bin/my prog
5581a3000000-5581a3021000 rw-p 00000000 00:00 0                          [heap]
7f1c4a000000-7f1c4a028000 r--p 00000000 08:01 2228290                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c4a028000-7f1c4a1bd000 r-xp 00028000 08:01 2228290                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c4b000000-7f1c4b001000 r-xp 00000000 00:2a 77                         /tmp/old build (deleted)
7f1c4c000000-7f1c4c001000 rwxp 00000000 00:00 0 
7ffd1c5e0000-7ffd1c601000 rw-p 00000000 00:00 0                          [stack]
7ffd1c7f8000-7ffd1c7fa000 r-xp 00000000 00:00 0                          [vdso]
7fffffffe000-7ffffffff000 --xp 00000000 00:00 0                          [uprobes]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn keeps_only_file_backed_executable_mappings() {
        let maps = ProcessMaps::parse(MAPS);
        let paths: Vec<_> = maps.mappings().iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/usr/bin/my prog",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/tmp/old build"
            ]
        );
        let prog = &maps.mappings()[0];
        assert_eq!(
            (prog.start, prog.end, prog.file_offset),
            (0x5581a2c1c000, 0x5581a2c9e000, 0x1c000)
        );
        assert!(!prog.deleted);
        assert_eq!(prog.open_path, Path::new("/usr/bin/my prog"));
        assert!(maps.mappings()[2].deleted);
    }

    #[test]
    fn finds_kernel_code_mappings() {
        let maps = ProcessMaps::parse(MAPS);
        assert_eq!(
            maps.uprobes_trampoline(),
            Some(0x7fffffffe000..0x7ffffffff000)
        );
        assert_eq!(maps.vdso(), Some(0x7ffd1c7f8000..0x7ffd1c7fa000));
        // Parsed text has no pid, so no memory to read the vDSO from.
        assert_eq!(maps.read_vdso_image(), None);
    }

    #[test]
    fn find_looks_up_by_address() {
        let maps = ProcessMaps::parse(MAPS);
        assert_eq!(
            maps.find(0x7f1c4a028000).unwrap().path,
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(
            maps.find(0x7f1c4a1bcfff).unwrap().path,
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert!(maps.find(0x7f1c4a1bd000).is_none());
        assert!(maps.find(0x5581a2c00000).is_none(), "not executable");
        assert!(maps.find(0).is_none());
    }

    #[test]
    fn modules_group_mappings_of_one_file() {
        let text = "\
1000-2000 r-xp 00001000 08:01 5 /lib/split.so
3000-4000 r-xp 00003000 08:01 5 /lib/split.so
";
        let modules = ProcessMaps::parse(text).modules();
        assert_eq!(modules.len(), 1);
        assert_eq!(modules[0].avma_range, 0x1000..0x4000);
        assert_eq!(modules[0].first_mapping_offset, 0x1000);
    }

    #[test]
    fn skips_malformed_lines() {
        let maps = ProcessMaps::parse("garbage\n\n1000-zz r-xp 0 0:0 1 /x\n");
        assert!(maps.mappings().is_empty());
    }

    #[test]
    fn reads_own_maps_with_openable_paths() {
        let maps = ProcessMaps::read(std::process::id()).unwrap();
        let here = maps
            .find(reads_own_maps_with_openable_paths as *const () as u64)
            .unwrap();
        assert_eq!(
            std::fs::canonicalize(&here.path).unwrap(),
            std::env::current_exe().unwrap().canonicalize().unwrap()
        );
        std::fs::File::open(&here.open_path).unwrap();
        let vdso = maps.read_vdso_image().expect("vDSO readable");
        assert_eq!(&vdso[..4], b"\x7fELF");
    }
}
