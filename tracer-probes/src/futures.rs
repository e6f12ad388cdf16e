//! Where each task's future lies in its task cell, and how to read where an
//! `async fn` is suspended: the layouts `dump` needs, from DWARF.
//!
//! Why DWARF: rustc compiles an `async fn` or block into a state machine and,
//! with `debug = true` (2), describes it exactly: a `{async_fn_env#0}` struct
//! whose variant part is selected by an artificial `__state` byte; one
//! variant per state (`Unresumed`, `Returned`, `Panicked`, `Suspend0`, …),
//! each variant's member carrying `DW_AT_decl_file`/`DW_AT_decl_line` — for a
//! suspend state, the line of its `.await` — and each suspend state's struct
//! holding the awaited future in `__awaitee`. Reading `__state` and following
//! `__awaitee` inward gives the await chain. Nothing else in the binary says
//! this: symbols and line tables describe code, not data. With
//! `line-tables-only` (or `debug = 1`) there are no type DIEs at all, and the
//! dump can only name the task's future type (from `tracer-probes`' naming).
//!
//! Where the future sits: `Cell<T, S>` (tokio's task allocation, header
//! first) is described with its template parameter `T`, so `Cell → core →
//! stage → stage → (UnsafeCell wrappers) → Stage<T> → Running.__0` gives the future's offset
//! from the task header for every tokio version whose field names those
//! are (1.x: `Core { scheduler, task_id, stage: CoreStage { stage:
//! UnsafeCell<Stage<T>> } }`), and `Stage`'s own variant part says whether
//! the future is still there (`Running`) or already gone (`Finished`,
//! `Consumed`).
//!
//! What is collected: only the types reachable from the task futures —
//! through suspend states' awaitees without limit (that is the chain), and
//! through other structs, enums and pointers a few levels deep (wrappers such
//! as tokio's taskdump `Root`, `PollFn` closures of `select!` that point at
//! the futures tuple, `Pin<Box<dyn Future>>`). `dyn Future` objects are
//! resolved through rustc's vtable variables (`<T as Future>::{vtable}`,
//! `DW_AT_containing_type` = `T`). On the comparison fixture (`debug = true`,
//! 4 M lines of `llvm-dwarfdump`) the dump's whole setup (symbols, vtables,
//! this) takes 0.2–0.5 s; on the demo service 0.13–0.2 s.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};

use gimli::{EndianSlice, RunTimeEndian};
use object::{Object, ObjectSection};

use crate::dwarf::{self, GlobalOffset, Reader, Unit};

mod dies;

/// A type, by its DIE's offset in `.debug_info`.
pub type TypeRef = usize;

/// How many non-state-machine types (structs, enums, pointers) deep to look
/// below a state machine for the next one.
const WRAPPER_DEPTH: u32 = 6;

/// An integer read from the target to tell variants apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discriminant {
    /// From the start of the value that holds it.
    pub offset: u64,
    /// 1, 2, 4 or 8 bytes.
    pub size: u8,
}

/// Where one task type's future is, relative to the task header.
#[derive(Clone, Debug)]
pub struct TaskFuture {
    pub future_type: TypeRef,
    pub future_offset: u64,
    /// `Stage<T>`'s discriminant, relative to the header, and the values
    /// meaning the future is gone (finished or consumed).
    pub stage: Option<(Discriminant, Vec<u64>)>,
    /// The task id (`core.task_id`), relative to the header; absent before
    /// tokio 1.21.
    pub id_offset: Option<u64>,
    /// The owned-task list links (`linked_list::Pointers`: `prev`, then
    /// `next`), relative to the header: in the trailer since tokio 1.2x, in
    /// the header before.
    pub links_offset: Option<u64>,
}

/// tokio's `Header`, as the debug info describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderLayout {
    pub vtable: u64,
    pub queue_next: Option<u64>,
    /// The `OwnedTasks` id; absent before tokio 1.14.
    pub owner_id: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub ty: TypeRef,
}

/// One state of an async state machine.
#[derive(Clone, Debug)]
pub struct CoroutineState {
    pub value: u64,
    /// `Unresumed`, `Returned`, `Panicked`, `Suspend0`, …
    pub name: String,
    /// Where the state is in the source: for a suspend state, its `.await`.
    pub file: Option<String>,
    pub line: Option<u64>,
    /// The awaited future (offset from the state machine's start).
    pub awaitee: Option<Member>,
}

#[derive(Clone, Debug)]
pub struct Variant {
    /// `None`: the variant taken when no other's value matches (niche layouts).
    pub value: Option<u64>,
    pub name: String,
    /// Offsets from the enum's start.
    pub members: Vec<Member>,
}

#[derive(Clone, Debug)]
pub enum TypeKind {
    /// An `async fn` or block.
    Coroutine {
        state: Discriminant,
        states: Vec<CoroutineState>,
        /// A method's `self` type (`&tokio::sync::mutex::Mutex<u64>`): the
        /// type path its `{impl#N}` scope leaves out.
        self_type: Option<String>,
    },
    /// A struct, tuple, closure or union: all of its members.
    Struct { members: Vec<Member> },
    Enum {
        discriminant: Discriminant,
        variants: Vec<Variant>,
    },
    /// A thin pointer (`&T`, `*const T`, `NonNull`'s inner pointer).
    Pointer { target: Option<TypeRef> },
    /// Anything else (integers, arrays, …): not followed.
    Other,
}

#[derive(Clone, Debug)]
pub struct TypeDesc {
    /// Qualified, e.g. `my_app::handler::{async_fn_env#0}`.
    pub name: String,
    pub size: u64,
    pub kind: TypeKind,
}

/// The layouts of every task type's future and the types below it.
#[derive(Clone, Debug, Default)]
pub struct FutureLayouts {
    /// By the `raw::poll::<T, S>` instance's address.
    pub tasks: HashMap<u64, TaskFuture>,
    pub types: HashMap<TypeRef, TypeDesc>,
    /// `dyn Future` vtable address (in the ELF's address space) → the
    /// concrete future type behind it.
    pub dyn_vtables: HashMap<u64, TypeRef>,
    pub header: Option<HeaderLayout>,
}

impl FutureLayouts {
    /// Reads the layouts from `file`'s DWARF (the binary or its separate
    /// debug file). Empty when there are no type DIEs.
    pub fn read(file: &object::File, poll_addresses: &[u64]) -> anyhow::Result<FutureLayouts> {
        let endian = if file.is_little_endian() {
            RunTimeEndian::Little
        } else {
            RunTimeEndian::Big
        };
        let load = |id: gimli::SectionId| -> gimli::Result<Cow<[u8]>> {
            Ok(file
                .section_by_name(id.name())
                .and_then(|section| section.uncompressed_data().ok())
                .unwrap_or(Cow::Borrowed(&[])))
        };
        let sections = gimli::DwarfSections::load(load)?;
        let dwarf = sections.borrow(|section| EndianSlice::new(section, endian));
        let mut units = Vec::new();
        let mut headers = dwarf.units();
        while let Some(header) = headers.next()? {
            units.push(dwarf.unit(header)?);
        }
        let mut reader = TypeReader {
            dwarf: &dwarf,
            units: &units,
            layouts: FutureLayouts::default(),
        };
        reader.read_all(poll_addresses)?;
        Ok(reader.layouts)
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

struct TypeReader<'a, 'data> {
    dwarf: &'a gimli::Dwarf<Reader<'data>>,
    units: &'a [Unit<'data>],
    layouts: FutureLayouts,
}

impl TypeReader<'_, '_> {
    fn read_all(&mut self, poll_addresses: &[u64]) -> anyhow::Result<()> {
        let wanted: HashSet<u64> = poll_addresses.iter().copied().collect();
        let mut polls = Vec::new();
        for unit in self.units {
            dwarf::find_poll_dies(self.dwarf, self.units, unit, &wanted, &mut polls)?;
        }
        // One pass over everything: task cells by their `T`, and dyn
        // Future vtables.
        let mut cells: HashMap<GlobalOffset, GlobalOffset> = HashMap::new();
        let mut cells_by_name: HashMap<String, GlobalOffset> = HashMap::new();
        for unit in self.units {
            let mut cursor = unit.entries();
            while let Some(entry) = cursor.next_dfs()? {
                let tag = entry.tag();
                if tag != gimli::DW_TAG_structure_type && tag != gimli::DW_TAG_variable {
                    continue;
                }
                let Some(name) = entry.attr_value(gimli::DW_AT_name) else {
                    continue;
                };
                let name = self.dwarf.attr_string(unit, name)?;
                let global = entry.offset().to_unit_section_offset(&unit.header).0;
                if tag == gimli::DW_TAG_structure_type && name.starts_with(b"Cell<") {
                    let name = name.to_string_lossy().into_owned();
                    if let Some(t) = self.template_t(unit, entry.offset())? {
                        cells.insert(t, global);
                    }
                    cells_by_name.insert(name, global);
                } else if tag == gimli::DW_TAG_variable
                    && name.ends_with(b"::{vtable}")
                    && name.windows(15).any(|w| w == b"future::Future>")
                {
                    let info = self.info(global)?;
                    let (Some(address), Some(vtable_type)) = (info.location, info.ty) else {
                        continue;
                    };
                    if let Some(concrete) = self.info(vtable_type)?.containing_type {
                        self.layouts.dyn_vtables.insert(address, concrete);
                    }
                }
            }
        }

        let mut roots: Vec<TypeRef> = self.layouts.dyn_vtables.values().copied().collect();
        let future_names = dwarf::qualified_names(
            self.dwarf,
            self.units,
            &polls.iter().filter_map(|p| p.task_type).collect(),
        )?;
        for poll in &polls {
            let Some(t) = poll.task_type else { continue };
            let cell = cells.get(&t).copied().or_else(|| {
                let name = future_names.get(&t)?;
                let prefix = format!("Cell<{name}, ");
                cells_by_name
                    .iter()
                    .find(|(cell_name, _)| cell_name.starts_with(&prefix))
                    .map(|(_, &cell)| cell)
            });
            let Some(cell) = cell else { continue };
            if let Some(task) = self.task_future(cell)? {
                roots.push(task.future_type);
                self.layouts.tasks.insert(poll.address, task);
            }
        }
        self.collect_types(roots)?;
        Ok(())
    }

    /// `Cell<T, S>` → where `T` is, from `core.stage.stage`'s (`Stage<T>`)
    /// `Running.__0`; the task id and list links; and `Header` itself.
    fn task_future(&mut self, cell: GlobalOffset) -> anyhow::Result<Option<TaskFuture>> {
        let Some((mut offset, mut ty)) = self.member_path(cell, &["core", "stage", "stage"])?
        else {
            return Ok(None);
        };
        // Through the `UnsafeCell`s (tokio's loom shim wraps std's) to `Stage<T>`.
        for _wrapper in 0..4 {
            if self.variant_part(ty)?.is_some() {
                break;
            }
            let members = self.members(ty)?;
            let [only] = members.as_slice() else {
                return Ok(None);
            };
            offset += only.offset;
            ty = only.ty;
        }
        let id_offset = self
            .member_path(cell, &["core", "task_id"])?
            .map(|(offset, _)| offset);
        let links_offset = match self.member_path(cell, &["trailer", "owned"])? {
            Some((offset, _)) => Some(offset),
            None => self
                .member_path(cell, &["header", "owned"])?
                .map(|(offset, _)| offset),
        };
        if self.layouts.header.is_none()
            && let Some((_, header)) = self.member_path(cell, &["header"])?
        {
            let member = |this: &mut Self, name: &str| -> anyhow::Result<Option<u64>> {
                Ok(this.member_path(header, &[name])?.map(|(offset, _)| offset))
            };
            if let Some(vtable) = member(self, "vtable")? {
                self.layouts.header = Some(HeaderLayout {
                    vtable,
                    queue_next: member(self, "queue_next")?,
                    owner_id: member(self, "owner_id")?,
                });
            }
        }
        // `ty` is `Stage<T>`.
        let Some((discriminant, variants)) = self.variant_part(ty)? else {
            return Ok(None);
        };
        let mut gone = Vec::new();
        let mut future = None;
        for variant in variants {
            if variant.name == "Running" {
                let inner = variant
                    .members
                    .iter()
                    .find(|m| m.name == "__0")
                    .map(|m| (m.offset, m.ty));
                future = inner;
            } else if let Some(value) = variant.value {
                gone.push(value);
            }
        }
        let Some((future_offset, future_type)) = future else {
            return Ok(None);
        };
        Ok(Some(TaskFuture {
            future_type,
            future_offset: offset + future_offset,
            stage: Some((
                Discriminant {
                    offset: offset + discriminant.offset,
                    size: discriminant.size,
                },
                gone,
            )),
            id_offset,
            links_offset,
        }))
    }

    /// Reads every type reachable from `roots` into `layouts.types`.
    fn collect_types(&mut self, roots: Vec<TypeRef>) -> anyhow::Result<()> {
        let mut queue: VecDeque<(TypeRef, u32)> = roots.into_iter().map(|r| (r, 0)).collect();
        let mut depth_seen: HashMap<TypeRef, u32> = HashMap::new();
        while let Some((ty, depth)) = queue.pop_front() {
            if depth_seen.get(&ty).is_some_and(|&seen| seen <= depth) {
                continue;
            }
            depth_seen.insert(ty, depth);
            let desc = match self.layouts.types.get(&ty) {
                Some(desc) => desc.clone(),
                None => {
                    let desc = self.describe(ty)?;
                    self.layouts.types.insert(ty, desc.clone());
                    desc
                }
            };
            let mut next = |target: TypeRef, reset: bool| {
                let depth = if reset { 0 } else { depth + 1 };
                if depth <= WRAPPER_DEPTH {
                    queue.push_back((target, depth));
                }
            };
            match &desc.kind {
                TypeKind::Coroutine { states, .. } => {
                    for awaitee in states.iter().filter_map(|s| s.awaitee.as_ref()) {
                        next(awaitee.ty, true);
                    }
                }
                TypeKind::Struct { members } => members.iter().for_each(|m| next(m.ty, false)),
                TypeKind::Enum { variants, .. } => variants
                    .iter()
                    .flat_map(|v| &v.members)
                    .for_each(|m| next(m.ty, false)),
                TypeKind::Pointer { target: Some(t) } => next(*t, false),
                TypeKind::Pointer { target: None } | TypeKind::Other => {}
            }
        }
        // Qualified names for everything collected.
        let all: HashSet<GlobalOffset> = self.layouts.types.keys().copied().collect();
        let names = dwarf::qualified_names(self.dwarf, self.units, &all)?;
        for (ty, desc) in self.layouts.types.iter_mut() {
            if let Some(name) = names.get(ty) {
                desc.name = name.clone();
            }
        }
        Ok(())
    }

    fn describe(&mut self, ty: TypeRef) -> anyhow::Result<TypeDesc> {
        let info = self.info(ty)?;
        let name = info.name.clone().unwrap_or_default();
        let size = info.size.unwrap_or(0);
        let kind = match info.tag.0 {
            gimli::DW_TAG_pointer_type | gimli::DW_TAG_reference_type => {
                TypeKind::Pointer { target: info.ty }
            }
            gimli::DW_TAG_typedef => {
                // Not emitted by rustc for these types; treat as its target.
                TypeKind::Struct {
                    members: info
                        .ty
                        .map(|t| Member {
                            name: String::new(),
                            offset: 0,
                            ty: t,
                        })
                        .into_iter()
                        .collect(),
                }
            }
            gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type => {
                match self.variant_part(ty)? {
                    Some((state, variants)) if self.is_coroutine(ty)? => {
                        let self_member = variants
                            .iter()
                            .flat_map(|v| &v.members)
                            .find(|m| m.name == "self")
                            .map(|m| m.ty);
                        let self_type = match self_member {
                            Some(member) => self.info(member)?.name,
                            None => None,
                        };
                        let states = self.coroutine_states(ty, variants)?;
                        TypeKind::Coroutine {
                            state,
                            states,
                            self_type,
                        }
                    }
                    Some((discriminant, variants)) => TypeKind::Enum {
                        discriminant,
                        variants,
                    },
                    None => TypeKind::Struct {
                        members: self.members(ty)?,
                    },
                }
            }
            _ => TypeKind::Other,
        };
        Ok(TypeDesc { name, size, kind })
    }

    fn is_coroutine(&mut self, ty: TypeRef) -> anyhow::Result<bool> {
        for child in self.children_at(ty)? {
            if child.tag.0 == gimli::DW_TAG_variant_part
                && let Some(discr) = child.discr
            {
                return Ok(self.info(discr)?.name.as_deref() == Some("__state"));
            }
        }
        Ok(false)
    }

    /// The suspend states of a state machine, with their `.await`s.
    fn coroutine_states(
        &mut self,
        ty: TypeRef,
        variants: Vec<Variant>,
    ) -> anyhow::Result<Vec<CoroutineState>> {
        let mut source: HashMap<u64, (Option<String>, Option<u64>)> = HashMap::new();
        for child in self.children_at(ty)? {
            if child.tag.0 != gimli::DW_TAG_variant_part {
                continue;
            }
            let part = child.die;
            for variant in self.children_at(part)? {
                let Some(value) = variant.discr_value else {
                    continue;
                };
                let variant_die = variant.die;
                if let Some(member) = self.children_at(variant_die)?.into_iter().next() {
                    source.insert(value, (member.file, member.line));
                }
            }
        }
        Ok(variants
            .into_iter()
            .filter_map(|variant| {
                let value = variant.value?;
                let awaitee = variant.members.into_iter().find(|m| m.name == "__awaitee");
                let (file, line) = source.remove(&value).unwrap_or_default();
                Some(CoroutineState {
                    value,
                    name: variant.name,
                    file,
                    line,
                    awaitee,
                })
            })
            .collect())
    }

    /// A struct's variant part: its discriminant and variants, each with the
    /// members of its variant struct (offsets from the enclosing type).
    fn variant_part(
        &mut self,
        ty: TypeRef,
    ) -> anyhow::Result<Option<(Discriminant, Vec<Variant>)>> {
        for child in self.children_at(ty)? {
            if child.tag.0 != gimli::DW_TAG_variant_part {
                continue;
            }
            let Some(discr) = child.discr else {
                return Ok(None);
            };
            let discr_info = self.info(discr)?;
            let discr_size = match discr_info.ty {
                Some(t) => self.info(t)?.size.unwrap_or(0),
                None => 0,
            };
            let (Some(discr_offset), 1 | 2 | 4 | 8) = (discr_info.offset, discr_size) else {
                return Ok(None);
            };
            let part = child.die;
            let mut variants = Vec::new();
            for variant in self.children_at(part)? {
                if variant.tag.0 != gimli::DW_TAG_variant {
                    continue;
                }
                let variant_die = variant.die;
                let Some(member) = self.children_at(variant_die)?.into_iter().next() else {
                    continue;
                };
                let (Some(member_type), base) = (member.ty, member.offset.unwrap_or(0)) else {
                    continue;
                };
                let name = self.info(member_type)?.name.unwrap_or_default();
                let members = self
                    .members(member_type)?
                    .into_iter()
                    .map(|m| Member {
                        offset: base + m.offset,
                        ..m
                    })
                    .collect();
                variants.push(Variant {
                    value: variant.discr_value,
                    name,
                    members,
                });
            }
            return Ok(Some((
                Discriminant {
                    offset: discr_offset,
                    size: discr_size as u8,
                },
                variants,
            )));
        }
        Ok(None)
    }
}
