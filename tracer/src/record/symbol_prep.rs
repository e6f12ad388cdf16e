//! Loading the target's symbols, and looking up the stacks' addresses,
//! while recording, so that the stop pays for next to nothing.
//!
//! Symbolizing has a fixed part that does not depend on how many stacks
//! there are: opening the binary, reading its symbol table, decompressing
//! its DWARF and indexing its compilation units (addr2line's context). It
//! took 0.1–0.35 s of CPU after the stop, which held short traces (5 s) at
//! 3.2–3.5 M rendered events per CPU-second against 5.5 M without it
//! (issue 9). So a thread started once the probes are attached loads the
//! main binary's module at nice 19 (it yields to the target and to the
//! drain; the eBPF side keeps recording whatever it does) and
//! [`stacks`](super::stacks) adopts it at the stop. Prepared: the main
//! binary (the tasks' code) and the C library (every thread's outermost
//! frames, so every stack reaches it: its symbol table only, see
//! `tracer_symbolize::is_c_library`; its DWARF, from its debug package,
//! was ~300 ms of this thread's CPU, which on a loaded machine a nice-19
//! thread had not had by the stop: the stop then paid it).
//!
//! Then the thread looks up every address of each new distinct stack (and
//! each new spawn call site) as the drain interns it, until the stop, which
//! adopts the answers with the modules. That also loads, while recording,
//! any other library a stack reaches (on the HTTP bench libm, whose debug
//! package made it ~25 ms of CPU after the stop), and takes the lookups
//! themselves off the stop: 5 s of HTTP flat out, symbolizing after the
//! stop went from 51–87 ms of CPU (30 of them freeing the symbolizer, which
//! is now left to the exit) to 6–22 ms. Distinct stacks are few (~8,000
//! addresses looked up in 5 s, ~37,000 in 60 s: 130–150 and ~450 ms of this
//! thread's CPU, all at nice 19), so the queue is short; whatever is still
//! queued at the stop is left to the stop.
//!
//! What can go wrong, and what happens then:
//! - the mapping changes while recording (an exec, a rebuilt binary): the
//!   module is only adopted if the stop's maps show the same file (path,
//!   inode) at the same place; otherwise it is loaded then, as before;
//! - the target exits while recording: the prepared module keeps its file
//!   mapped, so it still symbolizes (better than by path: that is the file
//!   that ran);
//! - still loading a module at the stop: the stop waits for it (the work
//!   is half done, redoing it would cost more), and `-v` says how long;
//! - it fails or panics: nothing is adopted and the stop loads the module
//!   itself, as it always did.
//!
//! Its CPU is counted where it is spent: in the recording's CPU, and on its
//! own as `symbolize_prepare_cpu_ms` (trace metadata, `--summary-json`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clock::thread_cpu_ns;
use tracer_symbolize::{ProcessMaps, Symbolizer, is_c_library};

/// How often the maps are read while the binary is not mapped yet (a
/// launched command is released just before this starts, and execs then).
const MAPPED_POLL: Duration = Duration::from_millis(5);
/// How long to wait for the binary to be mapped at all.
const MAPPED_WAIT: Duration = Duration::from_secs(2);

/// A preparing thread.
pub struct SymbolPrep {
    thread: JoinHandle<Prepared>,
    /// Tells the thread to stop waiting for the binary to be mapped, and
    /// to leave the addresses still queued to the stop.
    stopping: Arc<AtomicBool>,
    /// The thread's tid once it runs (0 before), to renice it at the stop.
    tid: Arc<AtomicI32>,
    /// New stacks' addresses (and whether each is a return address), for
    /// the thread to look up once its modules are loaded.
    addresses: Sender<Vec<(u64, bool)>>,
}

/// What the thread did.
struct Prepared {
    /// The symbolizer holding the loaded module, if it could be loaded.
    symbolizer: Option<Symbolizer>,
    /// The thread's own CPU time.
    cpu_ns: u64,
    /// Wall time from its start to the modules loaded.
    took: Duration,
    /// Addresses looked up while recording.
    looked_up: u64,
}

/// What the stop gets from the preparing.
pub struct PrepResult {
    pub symbolizer: Option<Symbolizer>,
    pub cpu_ns: u64,
}

impl SymbolPrep {
    /// Starts preparing the symbols of `exe` as mapped by process `pid`.
    /// None if no thread could be started (then the stop does it all).
    pub fn start(pid: u32, exe: &Path) -> Option<Self> {
        let stopping = Arc::new(AtomicBool::new(false));
        let exe = exe.to_path_buf();
        let flag = stopping.clone();
        let tid = Arc::new(AtomicI32::new(0));
        let its_tid = tid.clone();
        let (addresses, queued) = channel();
        let thread = std::thread::Builder::new()
            .name("symbol-prep".into())
            .spawn(move || {
                // SAFETY: a plain syscall.
                its_tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                prepare(pid, &exe, &flag, queued)
            })
            .inspect_err(|err| log::info!("symbols not prepared while recording: {err}"))
            .ok()?;
        Some(SymbolPrep {
            thread,
            stopping,
            tid,
            addresses,
        })
    }

    /// Queues addresses (and whether each is a return address) to be
    /// looked up while recording; the stop then finds them in the adopted
    /// cache.
    pub fn look_up_soon(&self, addresses: impl IntoIterator<Item = (u64, bool)>) {
        // The thread is gone if it failed: the stop looks them up itself.
        let _ = self.addresses.send(addresses.into_iter().collect());
    }

    /// At the stop: waits for the thread if it is still loading, and hands
    /// over what it loaded.
    pub fn finish(self) -> PrepResult {
        self.stopping.store(true, Ordering::Relaxed);
        // The stop waits for its current lookup or module now: back to a
        // normal priority, or on a busy machine a nice-19 thread kept the
        // stop waiting up to a second (60 s of HTTP at load average 9).
        // Before the queue closes: the thread runs until it is closed (see
        // `prepare`), so the tid is still its own.
        let tid = self.tid.load(Ordering::Relaxed);
        if tid > 0 && !self.thread.is_finished() {
            // SAFETY: a plain syscall; failing (no CAP_SYS_NICE) only
            // leaves it at nice 19.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 0) };
        }
        drop(self.addresses);
        let waiting = Instant::now();
        match self.thread.join() {
            Ok(prepared) => {
                log::info!(
                    "symbols prepared while recording: {} in {:?}, {} addresses looked up \
                     ({} ms of CPU); the stop waited {:?}",
                    if prepared.symbolizer.is_some() {
                        "loaded"
                    } else {
                        "nothing loaded"
                    },
                    prepared.took,
                    prepared.looked_up,
                    prepared.cpu_ns / 1_000_000,
                    waiting.elapsed(),
                );
                PrepResult {
                    symbolizer: prepared.symbolizer,
                    cpu_ns: prepared.cpu_ns,
                }
            }
            Err(_) => {
                log::warn!("preparing the symbols failed; loading them now");
                PrepResult {
                    symbolizer: None,
                    cpu_ns: 0,
                }
            }
        }
    }
}

fn prepare(
    pid: u32,
    exe: &Path,
    stopping: &AtomicBool,
    queued: Receiver<Vec<(u64, bool)>>,
) -> Prepared {
    let started = Instant::now();
    // Lowest priority for this thread only (on Linux nice is per thread).
    // SAFETY: plain syscalls on this thread's own id.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    let mut symbolizer = load_main_module(pid, exe, stopping);
    let took = started.elapsed();
    let mut looked_up = 0;
    // Until the stop closes the queue (also when nothing loaded: the stop
    // renices this thread by its tid, which must not be reused by then).
    // Whatever is queued at the stop, the stop looks up itself.
    for batch in queued {
        let Some(symbolizer) = &mut symbolizer else {
            continue;
        };
        if stopping.load(Ordering::Relaxed) {
            continue;
        }
        for (address, is_return_address) in batch {
            symbolizer.symbolize(address, is_return_address);
            looked_up += 1;
        }
    }
    Prepared {
        symbolizer,
        cpu_ns: thread_cpu_ns(),
        took,
        looked_up,
    }
}

/// Waits for `exe` to be mapped in `pid` and loads its module, then the
/// C library's.
fn load_main_module(pid: u32, exe: &Path, stopping: &AtomicBool) -> Option<Symbolizer> {
    use std::os::unix::fs::MetadataExt;
    let exe_file = std::fs::metadata(exe)
        .inspect_err(|err| log::debug!("symbol prep: {}: {err}", exe.display()))
        .ok()?;
    let identity = (exe_file.dev(), exe_file.ino());
    let waiting = Instant::now();
    let (maps, main) = loop {
        let maps = ProcessMaps::read(pid).ok()?;
        // The module whose mapped file is the binary the probes are in.
        let found = maps.modules().into_iter().find(|module| {
            std::fs::metadata(&module.open_path)
                .is_ok_and(|file| (file.dev(), file.ino()) == identity)
        });
        if let Some(module) = found {
            break (maps, module.avma_range.start);
        }
        if stopping.load(Ordering::Relaxed) || waiting.elapsed() > MAPPED_WAIT {
            log::debug!("symbol prep: {} is not mapped in {pid}", exe.display());
            return None;
        }
        std::thread::sleep(MAPPED_POLL);
    };
    let libc = maps
        .modules()
        .into_iter()
        .filter(|module| is_c_library(&module.path))
        .map(|module| module.avma_range.start);
    let mut symbolizer = Symbolizer::new(&maps);
    let mut loaded = 0;
    for address in std::iter::once(main).chain(libc) {
        match symbolizer.prepare(address) {
            Some(Ok(())) => loaded += 1,
            Some(Err(err)) => log::debug!("symbol prep: {err}"),
            None => {}
        }
    }
    (loaded > 0).then_some(symbolizer)
}
