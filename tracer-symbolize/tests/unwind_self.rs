//! Unwinds this test's own stack, captured the way the eBPF probe captures a
//! traced thread's: registers plus a copy of the stack from rsp up.
//!
//! The reference is libgcc's unwinder (`_Unwind_Backtrace`, what panics use),
//! run at the same spot on the live stack: both must find the same return
//! addresses. Then the symbolizer must name the known functions in order.

use std::arch::asm;
use std::ffi::{c_int, c_void};
use std::hint::black_box;
use std::time::Instant;

use tracer_symbolize::{CapturedStack, ProcessMaps, Symbolizer, Unwinder};

/// What the probe would capture, plus libgcc's answer for comparison.
struct Capture {
    ip: u64,
    sp: u64,
    bp: u64,
    stack: Vec<u8>,
    libgcc: Vec<u64>,
}

impl Capture {
    fn as_captured(&self) -> CapturedStack<'_> {
        CapturedStack {
            ip: self.ip,
            sp: self.sp,
            bp: self.bp,
            stack: &self.stack,
        }
    }
}

// Three frames of known names. `black_box(..) + 1` after each call keeps the
// calls from becoming tail jumps, which would drop the caller's frame.
#[inline(never)]
fn outer_frame(limit: usize) -> Capture {
    let mut c = middle_frame(limit);
    c.ip = black_box(c.ip);
    c
}

#[inline(never)]
fn middle_frame(limit: usize) -> Capture {
    let mut c = inner_frame(limit);
    c.sp = black_box(c.sp);
    c
}

#[inline(never)]
fn inner_frame(limit: usize) -> Capture {
    let (ip, sp, bp): (u64, u64, u64);
    // The probe's view at this instruction: rip is the next instruction, and
    // rsp stays put for the rest of this function (its frame is set up).
    unsafe {
        asm!(
            "lea {ip}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            ip = out(reg) ip,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags),
        );
    }
    let len = limit.min((stack_top() - sp) as usize);
    let mut stack = vec![0u8; len];
    // Everything above sp belongs to this frame and its callers, which are
    // all still live; the copy itself runs below sp.
    unsafe { std::ptr::copy_nonoverlapping(sp as *const u8, stack.as_mut_ptr(), len) };
    let libgcc = libgcc_backtrace();
    Capture {
        ip,
        sp,
        bp,
        stack,
        libgcc,
    }
}

/// The highest address of this thread's stack.
fn stack_top() -> u64 {
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
        let (mut addr, mut size) = (std::ptr::null_mut(), 0);
        assert_eq!(libc::pthread_attr_getstack(&attr, &mut addr, &mut size), 0);
        libc::pthread_attr_destroy(&mut attr);
        addr as u64 + size as u64
    }
}

unsafe extern "C" {
    fn _Unwind_Backtrace(
        trace: extern "C" fn(*mut c_void, *mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> c_int;
    fn _Unwind_GetIP(context: *mut c_void) -> usize;
}

#[inline(never)]
fn libgcc_backtrace() -> Vec<u64> {
    extern "C" fn each(context: *mut c_void, arg: *mut c_void) -> c_int {
        let ips = unsafe { &mut *(arg as *mut Vec<u64>) };
        ips.push(unsafe { _Unwind_GetIP(context) } as u64);
        0 // _URC_NO_REASON: go on
    }
    let mut ips = Vec::new();
    unsafe { _Unwind_Backtrace(each, &mut ips as *mut Vec<u64> as *mut c_void) };
    ips
}

/// The frames of `ours` from the return address into `middle_frame` on must
/// be libgcc's from the same address on.
fn assert_same_as_libgcc(ours: &[u64], libgcc: &[u64]) {
    let start = libgcc
        .iter()
        .position(|&a| a == ours[1])
        .unwrap_or_else(|| panic!("libgcc {libgcc:x?} lacks our frame 1 {:x}", ours[1]));
    let theirs = &libgcc[start..];
    // libgcc may report the outermost frame (the thread's start) once more
    // or less, depending on how the C library marks the end: compare the rest.
    let common = ours.len().min(theirs.len() + 1) - 1;
    assert!(common >= 4, "ours {ours:x?} libgcc {theirs:x?}");
    assert_eq!(
        &ours[1..=common],
        &theirs[..common],
        "ours {ours:x?} libgcc {theirs:x?}"
    );
    assert!(
        ours.len().abs_diff(theirs.len() + 1) <= 1,
        "ours {ours:x?} libgcc {theirs:x?}"
    );
}

fn function_names(symbolizer: &mut Symbolizer, frames: &[u64]) -> Vec<String> {
    frames
        .iter()
        .enumerate()
        .flat_map(|(i, &a)| symbolizer.symbolize(a, i > 0).to_vec())
        .map(|f| {
            f.function
                .map_or_else(|| "?".into(), |name| name.to_string())
        })
        .collect()
}

#[test]
fn unwinds_own_stack_like_libgcc_and_names_the_frames() {
    let capture = outer_frame(usize::MAX);
    let maps = ProcessMaps::read(std::process::id()).unwrap();
    let mut unwinder = Unwinder::new(&maps).unwrap();
    assert!(
        unwinder.skipped_modules().is_empty(),
        "{:?}",
        unwinder.skipped_modules()
    );

    let frames = unwinder.unwind(&capture.as_captured());
    assert_same_as_libgcc(&frames, &capture.libgcc);

    let mut symbolizer = Symbolizer::new(&maps);
    let names = function_names(&mut symbolizer, &frames);
    let expected = [
        "unwind_self::inner_frame",
        "unwind_self::middle_frame",
        "unwind_self::outer_frame",
        "unwind_self::unwinds_own_stack_like_libgcc_and_names_the_frames",
    ];
    assert_eq!(&names[..4], &expected, "{names:#?}");
    // The test binary has DWARF: frame 0 is in this file, past the asm.
    let inner = &symbolizer.symbolize(frames[0], false)[0];
    assert!(
        inner
            .file
            .as_deref()
            .unwrap()
            .ends_with("tests/unwind_self.rs"),
        "{inner:?}"
    );
    assert!((50..80).contains(&inner.line.unwrap()), "{inner:?}");
    assert!(inner.module.contains("unwind_self"), "{inner:?}");
    // And the thread goes back to std's thread start, through libc.
    assert!(
        names.iter().any(|n| n.contains("std::thread")),
        "{names:#?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.contains("start_thread") || n.contains("clone")),
        "{names:#?}"
    );
}

#[test]
fn sixteen_kib_copy_still_reaches_the_test_function() {
    let capture = outer_frame(16 * 1024);
    assert!(capture.stack.len() <= 16 * 1024);
    let maps = ProcessMaps::read(std::process::id()).unwrap();
    let mut unwinder = Unwinder::new(&maps).unwrap();
    let frames = unwinder.unwind(&capture.as_captured());
    let names = function_names(&mut Symbolizer::new(&maps), &frames[..4]);
    assert!(
        names[3].ends_with("sixteen_kib_copy_still_reaches_the_test_function"),
        "{names:#?}"
    );
}

#[test]
fn truncated_copy_gives_a_correct_prefix() {
    let full = outer_frame(usize::MAX);
    let maps = ProcessMaps::read(std::process::id()).unwrap();
    let mut unwinder = Unwinder::new(&maps).unwrap();
    let all = unwinder.unwind(&full.as_captured());
    for len in [0, 8, 64, 256, 1024] {
        let short = CapturedStack {
            stack: &full.stack[..len.min(full.stack.len())],
            ..full.as_captured()
        };
        let frames = unwinder.unwind(&short);
        assert!(frames.len() < all.len(), "{len} bytes: {frames:x?}");
        assert_eq!(frames[..], all[..frames.len()], "{len} bytes");
    }
}

#[test]
fn unwinds_through_a_uretprobe_trampoline() {
    let mut capture = outer_frame(usize::MAX);
    // A fake [uprobes] mapping where the kernel puts it, above the stacks.
    let trampoline = 0x7fff_ffff_e000u64;
    let mut text = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(!text.contains("[uprobes]"));
    text += "7fffffffe000-7ffffffff000 --xp 00000000 00:00 0 [uprobes]\n";
    let maps = ProcessMaps::parse(&text);
    let mut unwinder = Unwinder::new(&maps).unwrap();
    let all = unwinder.unwind(&capture.as_captured());

    // What a uretprobe on middle_frame does: its return address, into
    // outer_frame, is replaced by the trampoline's.
    let real_return = all[2];
    let mut replaced = 0;
    for slot in capture.stack.chunks_exact_mut(8) {
        if u64::from_le_bytes(slot.try_into().unwrap()) == real_return {
            slot.copy_from_slice(&trampoline.to_le_bytes());
            replaced += 1;
        }
    }
    assert!(replaced >= 1);

    let stopped = unwinder.unwind(&capture.as_captured());
    assert_eq!(
        stopped,
        [all[0], all[1], trampoline],
        "no unwind info in the trampoline"
    );
    let through = unwinder.unwind_through_uretprobes(&capture.as_captured(), &[real_return]);
    assert_eq!(through, all);
}

/// Prints what unwinding and symbolizing cost (run with `--nocapture` to
/// see; no timing is asserted), and checks that the caches the figures are
/// about change nothing: every unwind of the same capture gives the same
/// frames, a cached symbolization the same names as the first.
#[test]
fn repeated_unwinds_and_cached_symbols_agree_and_their_costs_are_shown() {
    let capture = outer_frame(16 * 1024);
    let maps = ProcessMaps::read(std::process::id()).unwrap();
    let started = Instant::now();
    let mut unwinder = Unwinder::new(&maps).unwrap();
    let setup = started.elapsed();
    let started = Instant::now();
    let frames = unwinder.unwind(&capture.as_captured());
    let first_unwind = started.elapsed();
    const N: u32 = 2000;
    let started = Instant::now();
    let mut again = Vec::new();
    for _ in 0..N {
        again = black_box(unwinder.unwind(&capture.as_captured()));
    }
    let per_unwind = started.elapsed() / N;
    assert_eq!(again, frames, "an unwind of the same capture differs");

    let mut symbolizer = Symbolizer::new(&maps);
    let started = Instant::now();
    let first = function_names(&mut symbolizer, &frames);
    let cold = started.elapsed();
    assert!(
        first.iter().any(|name| name.contains("outer_frame")),
        "the capture's own frames are named: {first:?}"
    );
    let started = Instant::now();
    let mut again = Vec::new();
    for _ in 0..N {
        again = black_box(function_names(&mut symbolizer, &frames));
    }
    let warm = started.elapsed() / N / frames.len() as u32;
    assert_eq!(again, first, "a cached symbolization differs");
    // Loaded modules but addresses not asked before: DWARF lookups proper.
    let mut fresh = Symbolizer::new(&maps);
    function_names(&mut fresh, &frames);
    let others: Vec<u64> = frames.iter().map(|a| a + 1).collect();
    let started = Instant::now();
    function_names(&mut fresh, &others);
    let uncached = started.elapsed() / frames.len() as u32;
    eprintln!(
        "unwinder setup {setup:?}; unwind of {} frames: first {first_unwind:?}, then {per_unwind:?}; \
         symbolize: first {cold:?} for all (loading modules), then per address {uncached:?} \
         uncached, {warm:?} cached; {first:?}",
        frames.len()
    );
}
