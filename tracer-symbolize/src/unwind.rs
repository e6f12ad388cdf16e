//! Turns captured registers plus a copy of the stack into return addresses.
//!
//! Rust binaries have no frame pointers, so we follow the DWARF call frame
//! information (`.eh_frame`, which every binary keeps for panics, or
//! `.debug_frame`) with framehop, the unwinder samply uses. framehop caches
//! the unwind rule it found per address, so a second unwind through the same
//! code costs a hash lookup per frame.

use std::ops::Range;

use anyhow::{Context as _, bail};
use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, Unwinder as _};
use object::{Object, ObjectSection, ObjectSegment};

use crate::maps::{ProcessMaps, is_executable, load_bias};

/// Deeper than any real stack; stops a corrupt one from looping forever.
const MAX_FRAMES: usize = 1024;

/// What the probe captured on one thread at one moment.
#[derive(Clone, Copy, Debug)]
pub struct CapturedStack<'a> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// The stack memory from `sp` upwards, as far as it was copied.
    pub stack: &'a [u8],
}

impl CapturedStack<'_> {
    /// The 8 bytes at `address`, if the copy holds them.
    fn read_u64(&self, address: u64) -> Result<u64, ()> {
        let offset = usize::try_from(address.checked_sub(self.sp).ok_or(())?).map_err(|_| ())?;
        let bytes = self
            .stack
            .get(offset..offset.checked_add(8).ok_or(())?)
            .ok_or(())?;
        Ok(u64::from_le_bytes(bytes.try_into().unwrap()))
    }
}

/// A DWARF CFI unwinder for one process's address space.
pub struct Unwinder {
    inner: UnwinderX86_64<Vec<u8>>,
    cache: CacheX86_64,
    uprobes_trampoline: Option<Range<u64>>,
    skipped: Vec<(String, String)>,
}

impl Unwinder {
    /// Loads the unwind info of every executable file the process maps, and
    /// of its vDSO. A file that cannot be read is skipped (see
    /// [`Self::skipped_modules`]): frames in it end the unwind, the others
    /// still unwind. Fails only when no module at all could be loaded.
    pub fn new(maps: &ProcessMaps) -> anyhow::Result<Self> {
        let mut unwinder = Unwinder {
            inner: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            uprobes_trampoline: maps.uprobes_trampoline(),
            skipped: Vec::new(),
        };
        let mut loaded = 0;
        for module in maps.modules() {
            let result = std::fs::File::open(&module.open_path)
                .and_then(|file| unsafe { memmap2::Mmap::map(&file) })
                .context("open and map")
                .and_then(|data| {
                    framehop_module(
                        &module.path,
                        &data,
                        module.avma_range.clone(),
                        module.first_mapping_start,
                        module.first_mapping_offset,
                    )
                });
            match result {
                Ok(m) => {
                    unwinder.inner.add_module(m);
                    loaded += 1;
                }
                Err(e) => unwinder
                    .skipped
                    .push((module.path.clone(), format!("{e:#}"))),
            }
        }
        // The vDSO has no file; its image is in the process's memory.
        if let (Some(range), Some(image)) = (maps.vdso(), maps.read_vdso_image()) {
            match framehop_module("[vdso]", &image, range.clone(), range.start, 0) {
                Ok(m) => unwinder.inner.add_module(m),
                Err(e) => unwinder.skipped.push(("[vdso]".into(), format!("{e:#}"))),
            }
        }
        if loaded == 0 {
            bail!(
                "no executable module of the process could be loaded: {:?}",
                unwinder.skipped
            );
        }
        Ok(unwinder)
    }

    /// Modules whose unwind info could not be loaded, with the reason.
    /// Sets where the kernel's `[uprobes]` trampoline is mapped. The kernel
    /// maps it at a process's first uretprobe hit, which can come after the
    /// unwinder was made.
    pub fn set_uprobes_trampoline(&mut self, trampoline: Range<u64>) {
        self.uprobes_trampoline = Some(trampoline);
    }

    pub fn skipped_modules(&self) -> &[(String, String)] {
        &self.skipped
    }

    /// The frames of the captured stack: frame 0 is `ip`, then return
    /// addresses, innermost first. Stops where the copy ends, where a frame
    /// is in code without unwind info, or at the outermost frame.
    ///
    /// A return address that a uretprobe replaced points into `[uprobes]`,
    /// which has no unwind info, so unwinding stops right after it; see
    /// [`Self::unwind_through_uretprobes`].
    pub fn unwind(&mut self, stack: &CapturedStack) -> Vec<u64> {
        self.unwind_through_uretprobes(stack, &[])
    }

    /// Like [`Self::unwind`], but each return address found inside the
    /// `[uprobes]` trampoline is replaced, in order, by the next of
    /// `real_returns` (the addresses the probed functions were entered with,
    /// innermost first) *before* unwinding goes on, so the frames above a
    /// probed function are found too. Without a known trampoline, or once
    /// `real_returns` runs out, a trampoline address ends the stack.
    pub fn unwind_through_uretprobes(
        &mut self,
        stack: &CapturedStack,
        real_returns: &[u64],
    ) -> Vec<u64> {
        let mut regs = UnwindRegsX86_64::new(stack.ip, stack.sp, stack.bp);
        let mut read_stack = |address| stack.read_u64(address);
        let mut real_returns = real_returns.iter().copied();
        let mut frames = vec![stack.ip];
        let mut address = FrameAddress::from_instruction_pointer(stack.ip);
        while frames.len() < MAX_FRAMES {
            let next =
                self.inner
                    .unwind_frame(address, &mut regs, &mut self.cache, &mut read_stack);
            // Err: the copy ended, or no rule for this address. Either way
            // the frames so far are right, and that is all we can know.
            let Ok(Some(mut return_address)) = next else {
                break;
            };
            if self
                .uprobes_trampoline
                .as_ref()
                .is_some_and(|t| t.contains(&return_address))
            {
                match real_returns.next() {
                    Some(real) => return_address = real,
                    None => {
                        frames.push(return_address);
                        break;
                    }
                }
            }
            frames.push(return_address);
            match FrameAddress::from_return_address(return_address) {
                Some(a) => address = a,
                None => break,
            }
        }
        frames
    }
}

/// Builds framehop's view of one ELF image: where its code is, and its CFI.
/// Section data is copied out of `data` (a mapped file) so that the module
/// does not borrow it; that is the code segment plus the CFI sections, a
/// fraction of a binary with debug info.
fn framehop_module(
    name: &str,
    data: &[u8],
    avma_range: Range<u64>,
    mapping_start: u64,
    mapping_offset: u64,
) -> anyhow::Result<framehop::Module<Vec<u8>>> {
    let elf = object::File::parse(data).context("parse ELF")?;
    let bias = load_bias(&elf, mapping_start, mapping_offset)
        .context("no loaded segment at the mapping's file offset")?;

    let section = |name: &str| elf.section_by_name(name);
    let svma_range = |name: &str| section(name).map(|s| s.address()..s.address() + s.size());
    let section_data = |name: &str| {
        section(name)
            .and_then(|s| s.uncompressed_data().ok())
            .map(|d| d.into_owned())
    };
    // framehop reads instructions around an address to tell prologues and
    // epilogues apart, where CFI alone can be off by an instruction. Give it
    // the whole executable segment (.init, .plt, .text, …), not just .text.
    let code_segment = elf.segments().find(is_executable);
    let (text_svma, text) = match code_segment {
        Some(s) => (
            Some(s.address()..s.address() + s.size()),
            s.data().ok().map(<[u8]>::to_vec),
        ),
        None => (svma_range(".text"), section_data(".text")),
    };

    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma,
        text,
        got_svma: svma_range(".got"),
        eh_frame_svma: svma_range(".eh_frame"),
        eh_frame: section_data(".eh_frame"),
        eh_frame_hdr_svma: svma_range(".eh_frame_hdr"),
        eh_frame_hdr: section_data(".eh_frame_hdr"),
        debug_frame: section_data(".debug_frame"),
        ..Default::default()
    };
    if info.eh_frame.is_none() && info.debug_frame.is_none() {
        bail!("no .eh_frame or .debug_frame");
    }
    Ok(framehop::Module::new(
        name.to_owned(),
        avma_range,
        bias,
        info,
    ))
}
