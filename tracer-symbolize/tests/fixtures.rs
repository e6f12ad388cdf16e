//! Symbolizes the project's fixture programs (`tests/fixtures`), built with
//! and without DWARF, with DWARF moved to separate debug files, and unwinds a
//! running one from the outside the way the tracer does.

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use test_support as support;

use object::{Object, ObjectSegment, ObjectSymbol};
use support::Profile;
use tempfile::TempDir;
use tracer_symbolize::{CapturedStack, DebugInfoLocator, Frame, ProcessMaps, Symbolizer, Unwinder};

fn dwarf_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| support::fixture_variant("dwarf", &[("CARGO_PROFILE_RELEASE_DEBUG", "2")]))
}

/// A fresh directory of this test's own, removed on drop.
fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tracer-symbolize-{name}-"))
        .tempdir()
        .unwrap()
}

/// Copies a fixture binary into `dir`: other tests may rebuild the original
/// while we read or run it.
fn copy_into(binary: &Path, dir: &TempDir) -> PathBuf {
    let copy = dir.path().join(binary.file_name().unwrap());
    std::fs::copy(binary, &copy).unwrap();
    copy
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {output:?}");
}

const BASE: u64 = 0x5555_0000_0000;

/// A maps file that has `binary`'s code loaded at `BASE` (as a PIE is), so
/// that a file's address `svma` is at `BASE + svma` in the "process".
fn maps_with_binary_at_base(binary: &Path) -> ProcessMaps {
    let data = std::fs::read(binary).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let code = elf
        .segments()
        .find(|s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags, .. } if p_flags.0 & 1 != 0))
        .unwrap();
    let (p_offset, _) = code.file_range();
    let start = BASE + (code.address() & !0xfff);
    let end = (BASE + code.address() + code.size() + 0xfff) & !0xfff;
    ProcessMaps::parse(&format!(
        "{start:x}-{end:x} r-xp {:08x} 08:01 42 {}\n",
        p_offset & !0xfff,
        binary.display()
    ))
}

/// The address range of the function whose demangled name is `name`.
fn function_range(binary: &Path, name: &str) -> Range<u64> {
    let data = std::fs::read(binary).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let symbol = elf
        .symbols()
        .find(|s| {
            s.name()
                .is_ok_and(|n| format!("{:#}", rustc_demangle::demangle(n)) == name)
        })
        .unwrap_or_else(|| panic!("no symbol {name} in {binary:?}"));
    assert!(symbol.size() > 0);
    symbol.address()..symbol.address() + symbol.size()
}

/// The lines of `fixtures::spin_for` in tests/fixtures/src/lib.rs.
fn spin_for_lines() -> Range<u32> {
    let source =
        std::fs::read_to_string(support::repo_root().join("tests/fixtures/src/lib.rs")).unwrap();
    let lines: Vec<&str> = source.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains("pub fn spin_for"))
        .unwrap();
    let end = start + lines[start..].iter().position(|l| *l == "}").unwrap();
    (start as u32 + 1)..(end as u32 + 2)
}

fn has_debug_info(binary: &Path) -> bool {
    let data = std::fs::read(binary).unwrap();
    object::File::parse(&*data)
        .unwrap()
        .section_by_name(".debug_info")
        .is_some()
}

/// Every address of spin_for must resolve to spin_for at a line of it, with
/// any inlined callees before it. Returns the longest chain seen.
fn check_spin_for_with_lines(symbolizer: &mut Symbolizer, spin_for: Range<u64>) -> Vec<Frame> {
    let lines = spin_for_lines();
    let mut longest = Vec::new();
    let mut without_line = 0;
    let len = spin_for.end - spin_for.start;
    for svma in spin_for {
        let frames = symbolizer.symbolize(BASE + svma, false);
        let outer = frames.last().unwrap();
        assert_eq!(
            outer.function.as_deref(),
            Some("fixtures::spin_for"),
            "{frames:#?}"
        );
        assert!(!outer.inlined);
        assert!(
            outer
                .file
                .as_deref()
                .is_some_and(|f| f.ends_with("tests/fixtures/src/lib.rs")),
            "{frames:#?}"
        );
        // Line 0 ("no source line": compiler-made code) reads as None.
        match outer.line {
            Some(line) => assert!(lines.contains(&line), "{outer:?} not in {lines:?}"),
            None => without_line += 1,
        }
        assert!(frames[..frames.len() - 1].iter().all(|f| f.inlined));
        if frames.len() > longest.len() {
            longest = frames.to_vec();
        }
    }
    eprintln!("{without_line} of {len} bytes without a line");
    assert!(
        without_line * 4 < len,
        "{without_line} of {len} bytes without a line"
    );
    longest
}

#[test]
fn release_build_without_dwarf_names_functions_from_symbols() {
    let dir = temp_dir("release");
    let binary = copy_into(&support::fixture("multi_worker", Profile::Release), &dir);
    assert!(!has_debug_info(&binary), "the release profile has no DWARF");
    let spin_for = function_range(&binary, "fixtures::spin_for");
    let mut symbolizer = Symbolizer::new(&maps_with_binary_at_base(&binary));
    for svma in [spin_for.start, spin_for.start + 7, spin_for.end - 1] {
        let frames = symbolizer.symbolize(BASE + svma, false);
        assert_eq!(frames.len(), 1, "{frames:#?}");
        assert_eq!(frames[0].function.as_deref(), Some("fixtures::spin_for"));
        assert_eq!((frames[0].file.as_deref(), frames[0].line), (None, None));
        assert_eq!(*frames[0].module, binary.display().to_string());
    }
    // Return address just past the function: the call is still in it.
    let after = symbolizer.symbolize(BASE + spin_for.end, true);
    assert_eq!(after[0].function.as_deref(), Some("fixtures::spin_for"));
    // And outside any module nothing is made up.
    assert_eq!(symbolizer.symbolize(0x1000, false)[0].function, None);
}

#[test]
fn dwarf_build_gives_lines_and_inline_chains() {
    let dir = temp_dir("dwarf");
    let binary = copy_into(&dwarf_fixtures().join("multi_worker"), &dir);
    assert!(has_debug_info(&binary));
    let spin_for = function_range(&binary, "fixtures::spin_for");
    let mut symbolizer = Symbolizer::new(&maps_with_binary_at_base(&binary));
    let longest = check_spin_for_with_lines(&mut symbolizer, spin_for);
    // spin_for's loop inlines std (Instant::elapsed, black_box, …).
    assert!(longest.len() >= 2, "no inlined frame anywhere in spin_for");
    assert!(
        longest.iter().any(|f| f
            .function
            .as_deref()
            .is_some_and(|n| n.starts_with("std::") || n.starts_with("core::"))),
        "{longest:#?}"
    );
}

#[test]
fn separate_debug_file_through_gnu_debuglink() {
    let dir = temp_dir("debuglink");
    let binary = copy_into(&dwarf_fixtures().join("multi_worker"), &dir);
    let debug = dir.path().join("multi_worker.debug");
    // Without build IDs, only the debuglink's CRC can tell a debug file
    // that belongs to the binary from one that does not.
    run(
        "objcopy",
        &[
            "--remove-section=.note.gnu.build-id",
            binary.to_str().unwrap(),
        ],
    );
    run(
        "objcopy",
        &[
            "--only-keep-debug",
            binary.to_str().unwrap(),
            debug.to_str().unwrap(),
        ],
    );
    run("objcopy", &["--strip-debug", binary.to_str().unwrap()]);
    // objcopy records the CRC of the file it is given and its base name.
    run(
        "objcopy",
        &[
            &format!("--add-gnu-debuglink={}", debug.display()),
            binary.to_str().unwrap(),
        ],
    );
    assert!(!has_debug_info(&binary));
    let spin_for = function_range(&binary, "fixtures::spin_for");
    let maps = maps_with_binary_at_base(&binary);
    // No build-id directory to help: only the debuglink can find the file.
    let no_dirs = DebugInfoLocator { debug_dirs: vec![] };
    let mut symbolizer = Symbolizer::with_debug_info_locator(&maps, no_dirs.clone());
    check_spin_for_with_lines(&mut symbolizer, spin_for.clone());

    // A debug file that is not this binary's (another build of another
    // program under the linked name) must be refused, not trusted.
    let other = copy_into(&dwarf_fixtures().join("current_thread"), &dir);
    run(
        "objcopy",
        &[
            "--remove-section=.note.gnu.build-id",
            other.to_str().unwrap(),
        ],
    );
    run(
        "objcopy",
        &[
            "--only-keep-debug",
            other.to_str().unwrap(),
            debug.to_str().unwrap(),
        ],
    );
    let mut symbolizer = Symbolizer::with_debug_info_locator(&maps, no_dirs);
    let frames = symbolizer.symbolize(BASE + spin_for.start, false);
    assert_eq!(frames.len(), 1);
    assert_eq!(
        frames[0].function.as_deref(),
        Some("fixtures::spin_for"),
        "from .symtab"
    );
    assert_eq!(frames[0].file, None, "{frames:?}");
}

#[test]
fn separate_debug_file_through_build_id() {
    let dir = temp_dir("build-id");
    let binary = copy_into(&dwarf_fixtures().join("multi_worker"), &dir);
    let build_id: String = {
        let data = std::fs::read(&binary).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        elf.build_id()
            .unwrap()
            .expect("build id")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let debug_dir = dir.path().join("debug");
    let id_dir = debug_dir.join(".build-id").join(&build_id[..2]);
    std::fs::create_dir_all(&id_dir).unwrap();
    let debug = id_dir.join(format!("{}.debug", &build_id[2..]));
    run(
        "objcopy",
        &[
            "--only-keep-debug",
            binary.to_str().unwrap(),
            debug.to_str().unwrap(),
        ],
    );
    // Fully stripped, .symtab too: names must come from the debug file.
    run("objcopy", &["--strip-all", binary.to_str().unwrap()]);
    let spin_for_in_debug = function_range(&debug, "fixtures::spin_for");

    let maps = maps_with_binary_at_base(&binary);
    let locator = DebugInfoLocator {
        debug_dirs: vec![debug_dir],
    };
    let mut symbolizer = Symbolizer::with_debug_info_locator(&maps, locator);
    check_spin_for_with_lines(&mut symbolizer, spin_for_in_debug.clone());

    // Without the directory, only .dynsym is left, which has no spin_for.
    let mut blind =
        Symbolizer::with_debug_info_locator(&maps, DebugInfoLocator { debug_dirs: vec![] });
    let frames = blind.symbolize(BASE + spin_for_in_debug.start, false);
    assert_ne!(frames[0].function.as_deref(), Some("fixtures::spin_for"));
    assert_eq!(frames[0].file, None);
}

// ---- A running fixture, sampled from outside with ptrace ----

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(binary: &Path) -> (Running, u32) {
    // A copy just written may be briefly held open for writing by a child
    // another test thread forked at that moment (until it execs): exec then
    // fails with ETXTBSY. Try again shortly.
    let mut attempts = 0;
    let mut child = loop {
        match Command::new(binary)
            .arg("30")
            .stdout(Stdio::piped())
            .spawn()
        {
            Err(err) if err.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            spawned => break spawned.unwrap(),
        }
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line
        .trim()
        .strip_prefix("ready pid=")
        .expect(&line)
        .parse()
        .unwrap();
    (Running(child), pid)
}

/// Registers and up to 16 KiB of stack of thread `tid`, as the probe takes
/// them: the thread is stopped with ptrace only for the copy.
fn sample_thread(pid: u32, tid: i32) -> Option<(u64, u64, u64, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    unsafe {
        let null = std::ptr::null_mut::<libc::c_void>();
        if libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) != 0 {
            let error = std::io::Error::last_os_error();
            // A blocking-pool thread may have exited since we listed it.
            assert_eq!(
                error.raw_os_error(),
                Some(libc::ESRCH),
                "ptrace seize {tid}: {error}"
            );
            return None;
        }
        libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null);
        let mut status = 0;
        libc::waitpid(tid, &mut status, libc::__WALL);
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        let got = libc::ptrace(
            libc::PTRACE_GETREGS,
            tid,
            null,
            &mut regs as *mut _ as *mut libc::c_void,
        );
        let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
        // Like the probe: as much of 16 KiB as lies below the stack's top.
        let mut stack = vec![0u8; 16 * 1024];
        let mut len = stack.len();
        while len > 0 && mem.read_exact_at(&mut stack[..len], regs.rsp).is_err() {
            len -= 4096.min(len);
        }
        stack.truncate(len);
        libc::ptrace(libc::PTRACE_DETACH, tid, null, null);
        (got == 0).then_some((regs.rip, regs.rsp, regs.rbp, stack))
    }
}

#[test]
fn unwinds_and_symbolizes_a_running_fixture_from_outside() {
    let dir = temp_dir("running");
    let binary = copy_into(&dwarf_fixtures().join("multi_worker"), &dir);
    let (_running, pid) = start(&binary);
    let maps = ProcessMaps::read(pid).unwrap();
    let mut unwinder = Unwinder::new(&maps).unwrap();
    assert!(
        unwinder.skipped_modules().is_empty(),
        "{:?}",
        unwinder.skipped_modules()
    );
    let mut symbolizer = Symbolizer::new(&maps);

    // The busy task spins 50 ms per poll: some worker is in spin_for almost
    // always. Sample all threads until one is caught there, and one in the
    // vDSO under it (clock_gettime for Instant::elapsed, ~1% of its time):
    // the vDSO's unwind info is read from the process's memory.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut caught_in_task, mut caught_in_vdso) = (false, false);
    let mut seen = Vec::new();
    let (mut unwinds, mut unwound_frames, mut unwind_time) = (0u32, 0, Duration::ZERO);
    while Instant::now() < deadline && !(caught_in_task && caught_in_vdso) {
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let tid: i32 = entry
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let Some((ip, sp, bp, stack)) = sample_thread(pid, tid) else {
                continue;
            };
            let started = Instant::now();
            let frames = unwinder.unwind(&CapturedStack {
                ip,
                sp,
                bp,
                stack: &stack,
            });
            unwind_time += started.elapsed();
            unwound_frames += frames.len();
            unwinds += 1;
            let symbolized: Vec<Frame> = frames
                .iter()
                .enumerate()
                .flat_map(|(i, &a)| symbolizer.symbolize(a, i > 0).to_vec())
                .collect();
            let names: Vec<&str> = symbolized
                .iter()
                .map(|f| f.function.as_deref().unwrap_or("?"))
                .collect();
            let Some(spin) = names.iter().position(|n| *n == "fixtures::spin_for") else {
                seen.push(names.join(" <- "));
                continue;
            };
            if maps.vdso().is_some_and(|v| v.contains(&ip)) {
                assert_eq!(&*symbolized[0].module, "[vdso]");
                assert!(names[0].contains("clock_gettime"), "{names:#?}");
                caught_in_vdso = true;
            }
            // Above spin_for: the async fn's body (a closure, which optimized
            // builds inline into tokio's poll), then tokio's worker.
            let task = names[spin..]
                .iter()
                .position(|n| n.starts_with("multi_worker::fixture_busy_task::{{closure}}"))
                .unwrap_or_else(|| panic!("{names:#?}"));
            let task_frame = &symbolized[spin + task];
            assert!(
                task_frame
                    .file
                    .as_deref()
                    .unwrap()
                    .ends_with("multi_worker.rs"),
                "{task_frame:?}"
            );
            assert!(
                names[spin + task..]
                    .iter()
                    .any(|n| n.starts_with("tokio::runtime::")),
                "{names:#?}"
            );
            if !caught_in_task {
                eprintln!("caught: {}", names.join("\n  <- "));
            }
            caught_in_task = true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!(
        "{unwinds} unwinds, {} frames each on average, {:?} each",
        unwound_frames / unwinds.max(1) as usize,
        unwind_time / unwinds.max(1)
    );
    assert!(
        caught_in_task && caught_in_vdso,
        "in task: {caught_in_task}, in vDSO: {caught_in_vdso}; last stacks: {:#?}",
        &seen[seen.len().saturating_sub(5)..]
    );
}
