//! Reading tokio's task id (`tokio::task::Id`) from a task's header.
//!
//! tokio ≥ 1.23 keeps the id's offset from the header in the task vtable:
//! header → vtable (at `TaskIdLayout::vtable_offset`) → `id_offset` (word
//! `id_offset_slot`) → id, three user-memory reads of ~150 ns each. The
//! offset is fixed per `raw::poll::<T, S>` instance, so polls cache it per
//! poll site (`SITE_ID_OFFSET`) and pay one read; scheduler events, which
//! have no site of that kind, pay three.

use aya_ebpf::{EbpfContext, helpers::bpf_probe_read_user};
use aya_log_ebpf::warn;

use crate::config::task_id_layout;
use crate::maps::{SITE_ID_OFFSET, WARNED};

/// The id of the task whose header is `header` (0 when not read).
#[inline(always)]
pub fn read_task_id<C: EbpfContext>(ctx: &C, header: u64) -> u64 {
    match id_offset(ctx, header) {
        0 => 0,
        offset => read_id(header, offset),
    }
}

/// The id of the task polled at poll site `site`, with the site's id offset
/// read once and cached in `SITE_ID_OFFSET`.
#[inline(always)]
pub fn read_polled_task_id<C: EbpfContext>(ctx: &C, site: u32, header: u64) -> u64 {
    let Some(cached) = SITE_ID_OFFSET.get_ptr_mut(site) else {
        return read_task_id(ctx, header);
    };
    let mut offset = unsafe { *cached };
    if offset == 0 {
        offset = id_offset(ctx, header);
        unsafe { *cached = offset };
    }
    if offset == 0 {
        return 0;
    }
    read_id(header, offset)
}

#[inline(always)]
fn read_id(header: u64, id_offset: u64) -> u64 {
    unsafe { bpf_probe_read_user((header + id_offset) as *const u64) }.unwrap_or(0)
}

/// The byte offset of the task id from the header, read from the task's
/// vtable; 0 when ids are not read or the vtable holds no plausible offset.
#[inline(always)]
fn id_offset<C: EbpfContext>(ctx: &C, header: u64) -> u64 {
    let layout = task_id_layout();
    if layout.enabled == 0 || header == 0 {
        return 0;
    }
    let vtable: u64 =
        match unsafe { bpf_probe_read_user((header + layout.vtable_offset) as *const u64) } {
            Ok(v) => v,
            Err(_) => return 0,
        };
    let id_offset: u64 =
        match unsafe { bpf_probe_read_user((vtable + layout.id_offset_slot * 8) as *const u64) } {
            Ok(v) => v,
            Err(_) => return 0,
        };
    // A task is a few hundred bytes to a few KiB; anything larger is not an
    // offset: this tokio's task layout is not the one user space expected.
    if id_offset == 0 || id_offset > 1 << 16 {
        if let Some(warned) = WARNED.get_ptr_mut(0)
            && unsafe { *warned } == 0
        {
            unsafe { *warned = 1 };
            warn!(
                ctx,
                "task ids can't be read: the task vtable at {:x} holds {} where id_offset was expected",
                vtable,
                id_offset
            );
        }
        return 0;
    }
    id_offset
}
