//! CPU samples' stacks, interned on the sample sequence: callstacks of
//! frames (function name, source file and line, inlined frames as frames of
//! their own) in mappings (the module's path), each sent once, in the packet
//! of the first sample that needs it. The UI builds flamegraphs from these.
//!
//! A sample taken inside a task's poll gets one more, outermost frame: the
//! task's type, in a mapping named [`TASK_MAPPING`]. `PerfSample` has no
//! field for it, and this way the flamegraph of any selection splits by
//! task type first, as `--folded` does.

use std::collections::HashMap;
use std::sync::Arc;

use super::proto::{Encoder, interned, profile};
use crate::symbols::{StackId, SymbolFrame, Symbols};

/// The pseudo-module of the task-type root frames.
pub const TASK_MAPPING: &str = "[tokio task]";

#[derive(Default)]
pub struct Callstacks {
    /// By (stack, task type site).
    callstacks: HashMap<(StackId, Option<u32>), u64>,
    /// Task-type root frames, by site.
    task_frames: HashMap<u32, u64>,
    /// By (address, function): an address has one frame per function
    /// inlined there. The name is the symbolizer's shared one, not a copy.
    frames: HashMap<(u64, Option<Arc<str>>), u64>,
    function_names: HashMap<String, u64>,
    source_paths: HashMap<String, u64>,
    mappings: HashMap<String, u64>,
}

impl Callstacks {
    /// The callstack's iid on the sample sequence, interning it (and its
    /// frames, names, files, mappings) into the current packet on first use.
    pub fn intern(
        &mut self,
        interned: &mut Encoder,
        symbols: &Symbols,
        stack: StackId,
        task: Option<(u32, &str)>,
    ) -> u64 {
        let key = (stack, task.map(|(site, _)| site));
        if let Some(&iid) = self.callstacks.get(&key) {
            return iid;
        }
        let frames = symbols.stack(stack);
        // Outermost ("bottom") frame first.
        let mut frame_ids: Vec<u64> = Vec::with_capacity(frames.len() + 1);
        if let Some((site, name)) = task {
            frame_ids.push(self.task_frame(interned, site, name));
        }
        frame_ids.extend(frames.iter().rev().map(|f| self.frame(interned, f)));
        let iid = self.callstacks.len() as u64 + 1;
        self.callstacks.insert(key, iid);
        let i = &mut *interned;
        i.begin(interned::CALLSTACKS);
        i.varint(profile::CALLSTACK_IID, iid);
        for id in frame_ids {
            i.varint(profile::CALLSTACK_FRAME_IDS, id);
        }
        i.end();
        iid
    }

    fn frame(&mut self, interned: &mut Encoder, frame: &SymbolFrame) -> u64 {
        let key = (frame.address, frame.function.clone());
        if let Some(&iid) = self.frames.get(&key) {
            return iid;
        }
        let name_iid = intern_string(
            &mut self.function_names,
            interned,
            interned::FUNCTION_NAMES,
            &frame.function_name(),
        );
        let source_iid = frame.file.as_deref().map(|file| {
            intern_string(
                &mut self.source_paths,
                interned,
                interned::SOURCE_PATHS,
                file,
            )
        });
        let mapping_iid = self.mapping(interned, &frame.module);
        let iid = self.frames.len() as u64 + 1;
        let i = &mut *interned;
        i.begin(interned::FRAMES);
        i.varint(profile::FRAME_IID, iid);
        i.varint(profile::FRAME_FUNCTION_NAME_ID, name_iid);
        i.varint(profile::FRAME_MAPPING_ID, mapping_iid);
        i.varint(profile::FRAME_REL_PC, frame.address);
        if let Some(source_iid) = source_iid {
            i.varint(profile::FRAME_SOURCE_PATH_IID, source_iid);
            if let Some(line) = frame.line {
                i.varint(profile::FRAME_LINE_NUMBER, line as u64);
            }
        }
        i.end();
        self.frames.insert(key, iid);
        iid
    }

    /// The root frame that names a task type.
    fn task_frame(&mut self, interned: &mut Encoder, site: u32, name: &str) -> u64 {
        if let Some(&iid) = self.task_frames.get(&site) {
            return iid;
        }
        let frame = SymbolFrame {
            function: Some(name.into()),
            module: TASK_MAPPING.into(),
            // Not an address: keeps task frames apart from real ones.
            address: u64::MAX - site as u64,
            ..SymbolFrame::default()
        };
        let iid = self.frame(interned, &frame);
        self.task_frames.insert(site, iid);
        iid
    }

    fn mapping(&mut self, interned: &mut Encoder, module: &str) -> u64 {
        if let Some(&iid) = self.mappings.get(module) {
            return iid;
        }
        // One path "component": trace processor joins them with '/'.
        let path = module.trim_start_matches('/');
        let path_iid = self.mappings.len() as u64 + 1;
        let i = &mut *interned;
        i.begin(interned::MAPPING_PATHS);
        i.varint(interned::IID, path_iid);
        i.string(interned::NAME, path);
        i.end();
        i.begin(interned::MAPPINGS);
        i.varint(profile::MAPPING_IID, path_iid);
        i.varint(profile::MAPPING_PATH_STRING_IDS, path_iid);
        i.end();
        self.mappings.insert(module.to_owned(), path_iid);
        path_iid
    }
}

/// `text`'s iid among the `InternedString`s of `field`, interning it into
/// `interned` on first use.
fn intern_string(
    table: &mut HashMap<String, u64>,
    interned: &mut Encoder,
    field: u32,
    text: &str,
) -> u64 {
    if let Some(&iid) = table.get(text) {
        return iid;
    }
    let iid = table.len() as u64 + 1;
    table.insert(text.to_owned(), iid);
    interned.begin(field);
    interned.varint(interned::IID, iid);
    interned.string(interned::NAME, text);
    interned.end();
    iid
}
