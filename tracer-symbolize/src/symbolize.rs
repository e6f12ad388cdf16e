//! Turns code addresses into function names, source lines and inline chains.
//!
//! Per module, in order of preference:
//! 1. DWARF (in the binary, or a separate debug file, see [`crate::debuginfo`])
//!    through addr2line: file, line, and the functions inlined at the address;
//! 2. the ELF symbol table (`.symtab`, else `.dynsym`): the function name only.
//!
//! Modules are loaded on first use, and every answer is cached: a profile
//! repeats the same few thousand addresses many times.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use object::{Object, ObjectSymbol};

use crate::debuginfo::{DebugFile, DebugInfoLocator, is_c_library};
use crate::maps::{ProcessMaps, load_bias};

/// One function at an address; an address gives several when functions were
/// inlined into each other.
///
/// The names are shared (`Arc<str>`): a stack copies its frames out of the
/// symbolizer's cache, and at the stop that was thousands of stacks of tens
/// of frames each: copying the strings took most of the symbolizing there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The address asked about (the return address itself, not minus one).
    pub address: u64,
    /// Demangled, without the `::h0123…` hash. `None` when neither DWARF nor
    /// a symbol covers the address.
    pub function: Option<Arc<str>>,
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
    /// This function was inlined into the next frame of the chain.
    pub inlined: bool,
    /// Path of the file the address is in (as the process sees it),
    /// `[vdso]`, `[uprobes]`, or empty when in no known module.
    pub module: Arc<str>,
    /// The address's offset from the start of its symbol (`fn+0x1a3`), on
    /// the frame whose machine code this is (not on inlined frames), when
    /// the symbol table covers it. Without line tables it is what tells
    /// two calls in one function apart.
    pub symbol_offset: Option<u64>,
}

/// Symbolizes addresses of one process.
pub struct Symbolizer {
    maps: ProcessMaps,
    locator: DebugInfoLocator,
    /// Sorted by address range start.
    modules: Vec<ModuleEntry>,
    cache: HashMap<(u64, bool), Vec<Frame>>,
}

struct ModuleEntry {
    name: Arc<str>,
    avma_range: Range<u64>,
    source: Source,
    /// The file's inode and whether the kernel called it deleted (0 and
    /// false for the vDSO): with the name and place, what makes a module
    /// prepared by another symbolizer the same (see [`Symbolizer::adopt`]).
    inode: u64,
    deleted: bool,
    /// `None` until first used. A module that failed keeps its error, so
    /// that it is tried once, not once per address.
    loaded: Option<Result<ModuleSymbols, String>>,
}

enum Source {
    File {
        open_path: PathBuf,
        first_mapping_start: u64,
        first_mapping_offset: u64,
    },
    Vdso,
}

impl Source {
    /// The same mapping of a file (not necessarily opened the same way: a
    /// path once the process is gone, `/proc/PID/map_files` while it lives).
    fn same_place(&self, other: &Source) -> bool {
        match (self, other) {
            (
                Source::File {
                    first_mapping_start: a_start,
                    first_mapping_offset: a_offset,
                    ..
                },
                Source::File {
                    first_mapping_start: b_start,
                    first_mapping_offset: b_offset,
                    ..
                },
            ) => a_start == b_start && a_offset == b_offset,
            _ => false,
        }
    }
}

struct ModuleSymbols {
    /// Added to the file's addresses (SVMAs) to get the process's.
    bias: u64,
    symbols: SymbolTable,
    dwarf: Option<addr2line::Loader>,
}

impl Symbolizer {
    /// Prepares to symbolize addresses of the process `maps` describes.
    /// Nothing is read until an address needs it.
    pub fn new(maps: &ProcessMaps) -> Self {
        Self::with_debug_info_locator(maps, DebugInfoLocator::default())
    }

    /// Like [`Self::new`], with other places to find separate debug files.
    pub fn with_debug_info_locator(maps: &ProcessMaps, locator: DebugInfoLocator) -> Self {
        let mut modules: Vec<ModuleEntry> = maps
            .modules()
            .into_iter()
            .map(|m| ModuleEntry {
                name: m.path.into(),
                avma_range: m.avma_range,
                source: Source::File {
                    open_path: m.open_path,
                    first_mapping_start: m.first_mapping_start,
                    first_mapping_offset: m.first_mapping_offset,
                },
                inode: m.inode,
                deleted: m.deleted,
                loaded: None,
            })
            .collect();
        if let Some(range) = maps.vdso() {
            modules.push(ModuleEntry {
                name: "[vdso]".into(),
                avma_range: range,
                source: Source::Vdso,
                inode: 0,
                deleted: false,
                loaded: None,
            });
        }
        modules.sort_by_key(|m| m.avma_range.start);
        Symbolizer {
            maps: maps.clone(),
            locator,
            modules,
            cache: HashMap::new(),
        }
    }

    /// The functions at `address`, innermost (most deeply inlined) first; the
    /// last one is the function whose machine code this is. Always at least
    /// one frame. For a return address, the call instruction before it is
    /// looked up: the return address can already be the next line, or even
    /// the next function when the call does not return.
    pub fn symbolize(&mut self, address: u64, is_return_address: bool) -> &[Frame] {
        let key = (address, is_return_address);
        if !self.cache.contains_key(&key) {
            let frames = self.lookup(address, is_return_address);
            self.cache.insert(key, frames);
        }
        &self.cache[&key]
    }

    /// Why a module's symbols could not be loaded, if they could not; e.g.
    /// to warn once per module. Loads the module if not yet loaded.
    pub fn module_error(&mut self, address: u64) -> Option<String> {
        let i = self.module_index(address)?;
        self.load(i);
        self.modules[i].loaded.as_ref()?.as_ref().err().cloned()
    }

    /// Loads the module mapped at `address` now rather than at its first
    /// lookup: opening the file, reading its symbol table, decompressing its
    /// DWARF and indexing its units, the part of symbolizing that does not
    /// depend on how many addresses there are. Returns whether it loaded
    /// (the error otherwise); `None` if no module is mapped there.
    pub fn prepare(&mut self, address: u64) -> Option<Result<(), String>> {
        let i = self.module_index(address)?;
        self.load(i);
        match self.modules[i].loaded.as_ref()? {
            Ok(_) => Some(Ok(())),
            Err(err) => Some(Err(err.clone())),
        }
    }

    /// Takes over the modules `prepared` loaded (see [`Self::prepare`]) that
    /// this symbolizer has not loaded yet and that are the same file mapped
    /// at the same place: same path, inode, deleted or not, range and first
    /// mapping. Any other module is loaded here at its first use, as usual,
    /// so a changed mapping (an exec, a rebuilt library) cannot borrow the
    /// wrong file's symbols. The answers `prepared` cached for addresses in
    /// the modules taken come along (looked up while recording, they are
    /// what the stop would have looked up). Returns how many modules were
    /// taken.
    pub fn adopt(&mut self, prepared: Symbolizer) -> usize {
        let mut taken = 0;
        let mut cache = prepared.cache;
        for theirs in prepared.modules {
            let Some(Ok(symbols)) = theirs.loaded else {
                continue;
            };
            let same = |ours: &&mut ModuleEntry| {
                ours.loaded.is_none()
                    && ours.name == theirs.name
                    && ours.avma_range == theirs.avma_range
                    && ours.inode == theirs.inode
                    && ours.deleted == theirs.deleted
                    && ours.source.same_place(&theirs.source)
            };
            if let Some(ours) = self.modules.iter_mut().find(same) {
                ours.loaded = Some(Ok(symbols));
                taken += 1;
                // Keyed by the address asked about; the module is the one
                // the looked-up address (one byte back for a return) is in.
                cache.retain(|&(address, is_return), frames| {
                    let probe = if is_return {
                        address.saturating_sub(1)
                    } else {
                        address
                    };
                    if !ours.avma_range.contains(&probe) {
                        return true;
                    }
                    self.cache
                        .entry((address, is_return))
                        .or_insert_with(|| std::mem::take(frames));
                    false
                });
            }
        }
        taken
    }

    fn lookup(&mut self, address: u64, is_return_address: bool) -> Vec<Frame> {
        let probe = if is_return_address {
            address.saturating_sub(1)
        } else {
            address
        };
        let bare = |module: Arc<str>| Frame {
            address,
            function: None,
            file: None,
            line: None,
            inlined: false,
            module,
            symbol_offset: None,
        };
        if self
            .maps
            .uprobes_trampoline()
            .is_some_and(|t| t.contains(&probe))
        {
            return vec![bare("[uprobes]".into())];
        }
        let Some(i) = self.module_index(probe) else {
            return vec![bare("".into())];
        };
        self.load(i);
        let module = &self.modules[i];
        let Some(Ok(symbols)) = &module.loaded else {
            // Could not be read: the module name is all we know.
            return vec![bare(module.name.clone())];
        };
        let svma = probe.wrapping_sub(symbols.bias);

        let mut frames = Vec::new();
        if let Some(dwarf) = &symbols.dwarf {
            let inlined = Frame {
                inlined: true,
                ..bare(module.name.clone())
            };
            dwarf_frames(dwarf, svma, &inlined, &mut frames);
        }
        let symbol = symbols.symbols.lookup(svma);
        // The return address's own offset (not the call's, one byte back):
        // what a disassembly of the function shows after the call.
        let symbol_offset = symbol.map(|(start, _)| address.wrapping_sub(symbols.bias) - start);
        match frames.last_mut() {
            Some(outermost) => {
                outermost.inlined = false;
                outermost.symbol_offset = symbol_offset;
                // DWARF without a name for the outer function (e.g. code from
                // a unit compiled without debug info): the symbol knows.
                if outermost.function.is_none() {
                    outermost.function = symbol.map(|(_, name)| demangle(name));
                }
            }
            None => frames.push(Frame {
                function: symbol.map(|(_, name)| demangle(name)),
                symbol_offset,
                ..bare(module.name.clone())
            }),
        }
        frames
    }

    fn module_index(&self, address: u64) -> Option<usize> {
        let i = self
            .modules
            .partition_point(|m| m.avma_range.start <= address)
            .checked_sub(1)?;
        self.modules[i].avma_range.contains(&address).then_some(i)
    }

    /// Loads module `i` if not done yet, keeping the error if it fails.
    fn load(&mut self, i: usize) {
        if self.modules[i].loaded.is_none() {
            let module = &self.modules[i];
            let loaded = match &module.source {
                Source::File {
                    open_path,
                    first_mapping_start,
                    first_mapping_offset,
                } => self.load_file(
                    &module.name,
                    open_path,
                    *first_mapping_start,
                    *first_mapping_offset,
                ),
                Source::Vdso => load_vdso(&self.maps, module.avma_range.start),
            };
            self.modules[i].loaded = Some(loaded.map_err(|e| format!("{e:#}")));
        }
    }

    fn load_file(
        &self,
        name: &str,
        open_path: &Path,
        mapping_start: u64,
        mapping_offset: u64,
    ) -> anyhow::Result<ModuleSymbols> {
        let file = std::fs::File::open(open_path).with_context(|| format!("open {open_path:?}"))?;
        // Mapped, not read: a binary with debug info can be hundreds of MiB
        // and we only touch its headers and symbol table here.
        let data =
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("map {open_path:?}"))?;
        let elf = object::File::parse(&*data).with_context(|| format!("parse {name}"))?;
        let bias = load_bias(&elf, mapping_start, mapping_offset)
            .with_context(|| format!("{name}: no segment at the mapping's file offset"))?;
        use DebugFile::{Itself, Separate};
        let debug_file = self
            .locator
            .find(name.as_ref(), &data, &|p| self.maps.path_in_process_root(p));
        let mut symbols = SymbolTable::new(&elf);
        if elf.symbol_table().is_none()
            && let Some(Separate(path)) = &debug_file
        {
            // A fully stripped binary has only .dynsym (the exported
            // functions); the debug file kept the full symbol table.
            if let Ok(data) =
                std::fs::File::open(path).and_then(|f| unsafe { memmap2::Mmap::map(&f) })
                && let Ok(debug_elf) = object::File::parse(&*data)
            {
                symbols = SymbolTable::new(&debug_elf);
            }
        }
        // A broken debug file costs file:line, not the function names.
        // addr2line opens the binary again itself: through our descriptor, the
        // very file whose symbols were just read. By `open_path` it failed
        // when the process exited in between (its /proc/PID/map_files went
        // with it): a short-lived command's stacks then had symbols only.
        let own = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let dwarf = match debug_file {
            _ if is_c_library(name) => None,
            Some(Itself) => addr2line::Loader::new(self.dwarf_path(name, open_path, own)).ok(),
            Some(Separate(path)) => addr2line::Loader::new(path).ok(),
            None => None,
        };
        Ok(ModuleSymbols {
            bias,
            symbols,
            dwarf,
        })
    }
}

impl Symbolizer {
    /// Where addr2line opens the binary: it looks for split DWARF's package
    /// (`packed` split debuginfo) at that path plus `.dwp`, so through
    /// `/proc/PID/…` it found none (~35 % of `waits_at` right while the
    /// target lived, 99.8 % once it had exited). The real path inside the
    /// process's root is used when it holds the very file mapped (same
    /// device and inode) and a `.dwp` lies beside it; `otherwise` if not.
    fn dwarf_path(&self, name: &str, open_path: &Path, otherwise: PathBuf) -> PathBuf {
        use std::os::unix::fs::MetadataExt;
        let real = self.maps.path_in_process_root(Path::new(name));
        let mut dwp = real.clone().into_os_string();
        dwp.push(".dwp");
        let same_file = match (std::fs::metadata(&real), std::fs::metadata(open_path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same_file && Path::new(&dwp).exists() {
            real
        } else {
            otherwise
        }
    }
}

fn load_vdso(maps: &ProcessMaps, start: u64) -> anyhow::Result<ModuleSymbols> {
    let image = maps.read_vdso_image().context("vDSO image not readable")?;
    let elf = object::File::parse(&*image).context("parse vDSO")?;
    Ok(ModuleSymbols {
        bias: load_bias(&elf, start, 0).context("vDSO has no loaded segment")?,
        symbols: SymbolTable::new(&elf),
        dwarf: None,
    })
}

/// Pushes `like` with each frame's function, file and line that DWARF has
/// at `svma`, innermost first. Errors end the chain: what was found is
/// still right.
fn dwarf_frames(dwarf: &addr2line::Loader, svma: u64, like: &Frame, frames: &mut Vec<Frame>) {
    let Ok(mut iter) = dwarf.find_frames(svma) else {
        return;
    };
    while let Ok(Some(frame)) = iter.next() {
        let function = frame
            .function
            .as_ref()
            .and_then(|f| f.raw_name().ok())
            .map(|name| demangle(&name));
        let (file, line) = match frame.location {
            Some(loc) => (loc.file.map(Arc::from), loc.line),
            None => (None, None),
        };
        frames.push(Frame {
            function,
            file,
            line,
            ..like.clone()
        });
    }
}

/// Rust names without the hash (`{:#}`); other names as they are.
fn demangle(name: &str) -> Arc<str> {
    match rustc_demangle::try_demangle(name) {
        Ok(demangled) => format!("{demangled:#}").into(),
        Err(_) => name.into(),
    }
}

/// Function symbols of one file, sorted by address, owning their names so the
/// file need not stay mapped.
struct SymbolTable {
    /// (address, size, mangled name)
    entries: Vec<(u64, u64, String)>,
}

impl SymbolTable {
    fn new(elf: &object::File) -> Self {
        let text = |s: &object::Symbol| {
            s.kind() == object::SymbolKind::Text && s.is_definition() && s.address() != 0
        };
        let mut entries: Vec<(u64, u64, String)> = elf
            .symbols()
            .filter(text)
            .chain(elf.dynamic_symbols().filter(text))
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_owned())))
            .collect();
        entries.sort();
        // .symtab and .dynsym repeat each other; keep one per address, and
        // prefer a sized entry (an alias without size says less).
        entries.dedup_by(|later, kept| later.0 == kept.0);
        SymbolTable { entries }
    }

    /// The symbol covering `svma`: its start and its (mangled) name.
    fn lookup(&self, svma: u64) -> Option<(u64, &str)> {
        let i = self
            .entries
            .partition_point(|e| e.0 <= svma)
            .checked_sub(1)?;
        let (address, size, name) = &self.entries[i];
        // A size of 0 (hand-written assembly) gives no end: trust the nearest.
        (*size == 0 || svma < address + size).then_some((*address, name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_module_gives_its_name_and_why() {
        let maps = ProcessMaps::parse("1000-2000 r-xp 00000000 08:01 7 /nonexistent/lib.so\n");
        let mut symbolizer = Symbolizer::new(&maps);
        let frames = symbolizer.symbolize(0x1800, true);
        assert_eq!(frames.len(), 1);
        assert_eq!(&*frames[0].module, "/nonexistent/lib.so");
        assert_eq!(
            (frames[0].address, frames[0].function.as_deref()),
            (0x1800, None)
        );
        let error = symbolizer.module_error(0x1800).unwrap();
        assert!(error.contains("open"), "{error}");
        assert_eq!(symbolizer.module_error(0x3000), None, "in no module");
    }

    #[test]
    fn symbolizer_can_be_prepared_on_another_thread() {
        fn send<T: Send>() {}
        send::<Symbolizer>();
    }

    /// This test binary's own code, as mapped in this process.
    fn own_maps() -> (ProcessMaps, u64) {
        let maps = ProcessMaps::read(std::process::id()).unwrap();
        let here = own_maps as *const () as usize as u64;
        assert!(maps.find(here).is_some(), "own code not in the maps");
        (maps, here)
    }

    #[test]
    fn adopts_a_prepared_module_of_the_same_mapping() {
        let (maps, here) = own_maps();
        let mut prepared = Symbolizer::new(&maps);
        assert_eq!(prepared.prepare(here), Some(Ok(())));
        let expected = prepared.symbolize(here, false).to_vec();
        let mut symbolizer = Symbolizer::new(&maps);
        assert_eq!(symbolizer.adopt(prepared), 1);
        assert_eq!(symbolizer.symbolize(here, false), expected);
        assert!(
            expected[0]
                .function
                .as_deref()
                .is_some_and(|f| f.ends_with("own_maps")),
            "{expected:?}"
        );
    }

    #[test]
    fn adopting_takes_the_answers_for_the_modules_taken_only() {
        let (maps, here) = own_maps();
        let mut prepared = Symbolizer::new(&maps);
        assert_eq!(prepared.prepare(here), Some(Ok(())));
        // Marked answers, to tell a carried one from a new lookup: one in
        // the module taken, one in no module (looked up again after).
        let marked = |address| Frame {
            address,
            function: Some("looked up while recording".into()),
            file: None,
            line: None,
            inlined: false,
            module: "".into(),
            symbol_offset: None,
        };
        prepared.cache.insert((here, false), vec![marked(here)]);
        prepared.cache.insert((0x10, true), vec![marked(0x10)]);
        let mut symbolizer = Symbolizer::new(&maps);
        assert_eq!(symbolizer.adopt(prepared), 1);
        assert_eq!(symbolizer.symbolize(here, false), vec![marked(here)]);
        let elsewhere = symbolizer.symbolize(0x10, true);
        assert_eq!(elsewhere[0].function, None, "{elsewhere:?}");
    }

    #[test]
    fn does_not_adopt_another_file_at_the_same_place() {
        let (maps, here) = own_maps();
        let mut prepared = Symbolizer::new(&maps);
        assert_eq!(prepared.prepare(here), Some(Ok(())));
        // The same path and place, another inode: a rebuilt binary after
        // an exec.
        let module = maps
            .modules()
            .into_iter()
            .find(|m| m.avma_range.contains(&here))
            .unwrap();
        let m = maps.find(here).unwrap();
        let text = format!(
            "{:x}-{:x} r-xp {:08x} 08:01 {} {}\n",
            m.start,
            m.end,
            m.file_offset,
            module.inode + 1,
            module.path
        );
        let mut symbolizer = Symbolizer::new(&ProcessMaps::parse(&text));
        assert_eq!(symbolizer.adopt(prepared), 0);
    }

    #[test]
    fn demangles_without_hash() {
        assert_eq!(
            &*demangle("_ZN8fixtures8spin_for17h0123456789abcdefE"),
            "fixtures::spin_for"
        );
        assert_eq!(
            &*demangle("_RNvCs1234_8fixtures8spin_for"),
            "fixtures::spin_for"
        );
        assert_eq!(&*demangle("clock_gettime"), "clock_gettime");
    }
}
