//! Reading the few DIE attributes `futures` needs, and a DIE's children.

use gimli::{AttributeValue, UnitOffset};

use super::{Member, TypeReader, TypeRef};
use crate::dwarf::{self, GlobalOffset, Reader, Unit};

/// A DIE tag with a default, for `DieInfo`'s `Default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tag(pub(super) gimli::DwTag);

impl Default for Tag {
    fn default() -> Self {
        Tag(gimli::DW_TAG_null)
    }
}

/// A DIE's attributes that matter here.
#[derive(Default)]
pub(super) struct DieInfo {
    /// The DIE's own offset.
    pub(super) die: GlobalOffset,
    pub(super) tag: Tag,
    pub(super) name: Option<String>,
    pub(super) size: Option<u64>,
    pub(super) ty: Option<GlobalOffset>,
    pub(super) offset: Option<u64>,
    pub(super) discr: Option<GlobalOffset>,
    pub(super) discr_value: Option<u64>,
    pub(super) file: Option<String>,
    pub(super) line: Option<u64>,
    pub(super) containing_type: Option<GlobalOffset>,
    pub(super) location: Option<u64>,
}

impl TypeReader<'_, '_> {
    /// The offset and type of `path`'s last member, from `ty`'s start.
    pub(super) fn member_path(
        &mut self,
        ty: TypeRef,
        path: &[&str],
    ) -> anyhow::Result<Option<(u64, TypeRef)>> {
        let (mut offset, mut ty) = (0, ty);
        for field in path {
            let Some(member) = self
                .children_at(ty)?
                .into_iter()
                .find(|c| c.tag.0 == gimli::DW_TAG_member && c.name.as_deref() == Some(*field))
            else {
                return Ok(None);
            };
            let (Some(member_offset), Some(member_type)) = (member.offset, member.ty) else {
                return Ok(None);
            };
            offset += member_offset;
            ty = member_type;
        }
        Ok(Some((offset, ty)))
    }

    /// A struct's members (all of them, for a union).
    pub(super) fn members(&mut self, ty: TypeRef) -> anyhow::Result<Vec<Member>> {
        Ok(self
            .children_at(ty)?
            .into_iter()
            .filter(|c| c.tag.0 == gimli::DW_TAG_member)
            .filter_map(|c| {
                Some(Member {
                    name: c.name.unwrap_or_default(),
                    offset: c.offset.unwrap_or(0),
                    ty: c.ty?,
                })
            })
            .collect())
    }

    pub(super) fn template_t(
        &self,
        unit: &Unit,
        die: UnitOffset,
    ) -> gimli::Result<Option<GlobalOffset>> {
        let mut tree = unit.entries_tree(Some(die))?;
        let mut children = tree.root()?.children();
        while let Some(child) = children.next()? {
            let entry = child.entry();
            if entry.tag() != gimli::DW_TAG_template_type_parameter {
                continue;
            }
            let is_t = match entry.attr_value(gimli::DW_AT_name) {
                Some(value) => self.dwarf.attr_string(unit, value)?.slice() == b"T",
                None => false,
            };
            if is_t {
                return Ok(entry
                    .attr_value(gimli::DW_AT_type)
                    .and_then(|value| dwarf::global_offset(unit, value)));
            }
        }
        Ok(None)
    }

    /// The direct children of a DIE.
    pub(super) fn children_at(&self, die: GlobalOffset) -> anyhow::Result<Vec<DieInfo>> {
        let Some((unit, offset)) = dwarf::locate(self.units, die) else {
            return Ok(Vec::new());
        };
        let mut tree = unit.entries_tree(Some(offset))?;
        let mut children = tree.root()?.children();
        let mut out = Vec::new();
        while let Some(child) = children.next()? {
            out.push(self.read_entry(unit, child.entry())?);
        }
        Ok(out)
    }

    pub(super) fn info(&self, die: GlobalOffset) -> anyhow::Result<DieInfo> {
        let Some((unit, offset)) = dwarf::locate(self.units, die) else {
            return Ok(DieInfo::default());
        };
        let entry = unit.entry(offset)?;
        Ok(self.read_entry(unit, &entry)?)
    }

    pub(super) fn read_entry(
        &self,
        unit: &Unit,
        entry: &gimli::DebuggingInformationEntry<Reader>,
    ) -> gimli::Result<DieInfo> {
        let mut info = DieInfo {
            die: entry.offset().to_unit_section_offset(&unit.header).0,
            tag: Tag(entry.tag()),
            ..DieInfo::default()
        };
        for attr in entry.attrs() {
            let value = attr.value();
            match attr.name() {
                gimli::DW_AT_name => {
                    info.name = Some(
                        self.dwarf
                            .attr_string(unit, value)?
                            .to_string_lossy()
                            .into_owned(),
                    )
                }
                gimli::DW_AT_byte_size => info.size = value.udata_value(),
                gimli::DW_AT_type => info.ty = dwarf::global_offset(unit, value),
                gimli::DW_AT_data_member_location => info.offset = value.udata_value(),
                gimli::DW_AT_discr => info.discr = dwarf::global_offset(unit, value),
                gimli::DW_AT_discr_value => info.discr_value = value.udata_value(),
                gimli::DW_AT_containing_type => {
                    info.containing_type = dwarf::global_offset(unit, value)
                }
                gimli::DW_AT_decl_line => info.line = value.udata_value(),
                gimli::DW_AT_decl_file => info.file = self.file_name(unit, value),
                gimli::DW_AT_location => {
                    if let AttributeValue::Exprloc(expr) = value {
                        let mut ops = expr.operations(unit.encoding());
                        if let Ok(Some(gimli::Operation::Address { address })) = ops.next() {
                            info.location = Some(address);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }

    pub(super) fn file_name(&self, unit: &Unit, value: AttributeValue<Reader>) -> Option<String> {
        let index = match value {
            AttributeValue::FileIndex(index) => index,
            other => other.udata_value()?,
        };
        let program = unit.line_program.as_ref()?;
        let header = program.header();
        let file = header.file(index)?;
        let mut path = String::new();
        if let Some(dir) = file.directory(header) {
            let dir = self.dwarf.attr_string(unit, dir).ok()?;
            path.push_str(&dir.to_string_lossy());
        }
        let name = self.dwarf.attr_string(unit, file.path_name()).ok()?;
        let name = name.to_string_lossy();
        if name.starts_with('/') || path.is_empty() {
            return Some(name.into_owned());
        }
        Some(format!("{}/{}", path.trim_end_matches('/'), name))
    }
}
