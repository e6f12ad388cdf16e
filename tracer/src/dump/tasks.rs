//! Finding the live tasks in the target's heap.
//!
//! Why a heap scan and not a walk of the runtime's `OwnedTasks` lists: the
//! lists hang off the runtime handle, which sits in an `Arc` reachable only
//! from thread-local or user statics whose layout differs per tokio version
//! and scheduler; nothing in the binary says where a given program keeps
//! its runtime. The task headers, though, are self-describing: every header
//! holds a pointer to its type's static vtable (offset 16 in tokio ≥ 1.2x,
//! from DWARF when present), and the binary tells exactly which addresses
//! those vtables have ([`tracer_probes::vtables`]). So one pass over the
//! writable anonymous memory, comparing each aligned word against that small
//! set, finds every candidate header; reading big chunks keeps it cheap.
//!
//! A word equal to a vtable address can also be a stale copy in freed
//! memory, so each candidate is validated before it is printed:
//! - the state word is plausible: a reference count of at least one and
//!   below 2^20, not both RUNNING and COMPLETE, and the injection-queue
//!   link null or a user-space pointer (a freed cell's first two words are
//!   overwritten by the allocator's free-list pointer and key, which fail
//!   this: on the demo, freed cells read as ~5.4e8 references until this
//!   bound was added);
//! - the owner id (the `OwnedTasks` it was bound to) is set: a task never
//!   bound to a runtime (a blocking-pool task) is not a runtime task;
//! - the vtable's own offsets (trailer, scheduler, id) are small and aligned;
//! - the task is in its runtime's owned-task list, where the layout is
//!   known: its links point at other candidates whose links point back,
//!   with the same owner id, and the first of a list is pointed at by the
//!   list's `head`, next to a `tail` that is a candidate too (a second pass
//!   over the same memory finds those words). A complete task has left the
//!   list: something (its JoinHandle) must still point at it, and its
//!   owner id must be that of a runtime whose listed tasks were found. This is what
//!   rejects a freed cell that still looks alive: its links were cleared
//!   when it left the list. The dump fixture leaves 200 such cells behind.
//!
//! tokio's state bits (the same from 1.0 to 1.5x): RUNNING 1, COMPLETE 2,
//! NOTIFIED 4, JOIN_INTEREST 8, JOIN_WAKER 16, CANCELLED 32, the reference
//! count from bit 6.

use std::collections::{HashMap, HashSet};

use super::memory::{ProcessMemory, ReadError, Region};

pub const RUNNING: u64 = 1;
pub const COMPLETE: u64 = 2;
pub const NOTIFIED: u64 = 4;
pub const JOIN_INTEREST: u64 = 8;
pub const JOIN_WAKER: u64 = 16;
pub const CANCELLED: u64 = 32;
const REF_SHIFT: u32 = 6;

/// Bytes read per `process_vm_readv` while scanning.
const CHUNK: usize = 4 << 20;

/// Where the fields of a header are, and what a vtable pointer looks like.
#[derive(Clone, Debug)]
pub struct HeaderLayout {
    pub vtable: u64,
    pub owner_id: Option<u64>,
    pub queue_next: Option<u64>,
}

/// More references than this is not a task: a freed cell's first word is
/// the allocator's (mangled) free-list pointer, which reads as hundreds of
/// millions of references (seen: ~5.4e8 on the demo, glibc 2.41's tcache).
const MAX_REFERENCES: u64 = 1 << 20;

/// User-space addresses on x86-64 are below 2^47.
const USER_END: u64 = 1 << 47;

/// A task header found and validated.
#[derive(Clone, Debug)]
pub struct FoundTask {
    pub header: u64,
    /// The vtable's runtime address.
    pub vtable: u64,
    pub state: u64,
    pub owner_id: Option<u64>,
}

/// What the scan saw, for the report.
#[derive(Clone, Debug, Default)]
pub struct ScanStats {
    pub bytes: u64,
    pub regions: usize,
    /// Words equal to a vtable address that did not validate as a live task.
    pub rejected: usize,
    /// Valid headers never bound to a runtime (blocking-pool tasks).
    pub unbound: usize,
    /// Bytes that could not be read (unmapped meanwhile).
    pub unreadable: u64,
}

/// Scans `regions` for task headers whose vtable is in `vtables` (runtime
/// addresses). `links` gives, per vtable, where that task type's owned-list
/// links are (relative to the header), when known.
pub fn scan(
    memory: &ProcessMemory,
    regions: &[Region],
    vtables: &HashSet<u64>,
    layout: &HeaderLayout,
    links: &HashMap<u64, u64>,
) -> Result<(Vec<FoundTask>, ScanStats), ReadError> {
    let mut stats = ScanStats::default();
    let (Some(&low), Some(&high)) = (vtables.iter().min(), vtables.iter().max()) else {
        return Ok((Vec::new(), stats));
    };
    let mut candidates = Vec::new();
    let mut buffer = vec![0u8; CHUNK];
    for region in regions.iter().filter(|r| r.may_hold_tasks()) {
        stats.regions += 1;
        let mut address = region.start;
        while address < region.end {
            let len = CHUNK.min((region.end - address) as usize);
            let read = match memory.read_partial(address, &mut buffer[..len]) {
                Ok(read) => read,
                Err(ReadError::Unmapped) => 0,
                Err(other) => return Err(other),
            };
            stats.bytes += read as u64;
            for (index, word) in buffer[..read & !7].chunks_exact(8).enumerate() {
                let value = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                if value < low || value > high || !vtables.contains(&value) {
                    continue;
                }
                let header = (address + index as u64 * 8).wrapping_sub(layout.vtable);
                candidates.push(header);
            }
            if read < len {
                stats.unreadable += (region.end - address) - read as u64;
                break;
            }
            address += len as u64;
        }
    }

    let mut found: HashMap<u64, FoundTask> = HashMap::new();
    for header in candidates {
        match read_header(memory, header, layout) {
            Ok(Some(task)) if task.owner_id.is_some() || layout.owner_id.is_none() => {
                found.insert(header, task);
            }
            Ok(Some(_)) => stats.unbound += 1,
            Ok(None) | Err(ReadError::Unmapped) => stats.rejected += 1,
            Err(other) => return Err(other),
        }
    }

    // Every live task is in its runtime's owned-task list (a complete one
    // at least still referenced, by its JoinHandle): a freed cell whose
    // header happens to look alive is in no list.
    let references = find_references(memory, regions, &found)?;
    // Each task's links, read once.
    let mut link_cache: HashMap<u64, Option<(u64, u64)>> = HashMap::new();
    for task in found.values() {
        if let Some(&offset) = links.get(&task.vtable) {
            link_cache.insert(task.header, read_links(memory, task.header + offset).ok());
        }
    }
    let mut stale = HashSet::new();
    for task in found.values() {
        let Some(&task_links) = link_cache.get(&task.header) else {
            continue;
        };
        let Some((prev, next)) = task_links else {
            stale.insert(task.header);
            continue;
        };
        let in_list = if task.state & COMPLETE != 0 {
            references.contains_key(&task.header)
        } else if prev == 0 {
            // The list's head: a `LinkedList { head, tail }` pointing at it,
            // whose tail is the task itself (alone) or another task.
            references.get(&task.header).is_some_and(|tails| {
                tails.iter().any(|&tail| {
                    if next == 0 {
                        tail == task.header
                    } else {
                        found.contains_key(&tail)
                    }
                })
            })
        } else {
            true
        };
        let neighbours_agree =
            [(prev, true), (next, false)]
                .into_iter()
                .all(|(neighbour, back_is_next)| {
                    neighbour == 0
                        || found.get(&neighbour).is_some_and(|other| {
                            other.owner_id == task.owner_id
                                && link_cache
                                    .get(&other.header)
                                    .copied()
                                    .flatten()
                                    .is_some_and(
                                        |(p, n)| if back_is_next { n } else { p } == task.header,
                                    )
                        })
                });
        if !in_list || !neighbours_agree {
            stale.insert(task.header);
        }
    }
    // A complete task left its list, so only its owner id vouches for it:
    // it must be the id of a runtime whose listed tasks were found (a stale
    // cell's "owner id" is whatever the allocator left there; seen: 481).
    let live_owners: HashSet<Option<u64>> = found
        .values()
        .filter(|t| t.state & COMPLETE == 0 && !stale.contains(&t.header))
        .map(|t| t.owner_id)
        .collect();
    for task in found.values() {
        if task.state & COMPLETE != 0 && !live_owners.contains(&task.owner_id) {
            stale.insert(task.header);
        }
    }
    stats.rejected += stale.len();
    let mut tasks: Vec<FoundTask> = found
        .into_values()
        .filter(|t| !stale.contains(&t.header))
        .collect();
    tasks.sort_by_key(|t| t.header);
    Ok((tasks, stats))
}

/// Reads and checks one header; `None` if it is not a live task.
pub fn read_header(
    memory: &ProcessMemory,
    header: u64,
    layout: &HeaderLayout,
) -> Result<Option<FoundTask>, ReadError> {
    if !header.is_multiple_of(8) {
        return Ok(None);
    }
    // One read for all the fields (they are in the first few words).
    let end = [Some(layout.vtable), layout.owner_id, layout.queue_next]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
        + 8;
    let mut bytes = [0u8; 256];
    let Some(bytes) = bytes.get_mut(..end as usize) else {
        return Ok(None);
    };
    memory.read(header, bytes)?;
    let word = |offset: u64| {
        let at = offset as usize;
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    };
    let state = word(0);
    let vtable = word(layout.vtable);
    let owner_id = layout.owner_id.map(word).filter(|&id| id != 0);
    let queue_next = layout.queue_next.map_or(0, word);
    let references = state >> REF_SHIFT;
    let plausible = (1..MAX_REFERENCES).contains(&references)
        && (queue_next == 0 || queue_next < USER_END && queue_next.is_multiple_of(8))
        && state & (RUNNING | COMPLETE) != (RUNNING | COMPLETE)
        && owner_id.is_none_or(|id| id < 1 << 48);
    Ok(plausible.then_some(FoundTask {
        header,
        vtable,
        state,
        owner_id,
    }))
}

/// For each found header, the words that follow a word pointing at it
/// anywhere in `regions` outside the task's own first 64 bytes (a list
/// head's `tail`, or whatever follows a JoinHandle or a waker).
fn find_references(
    memory: &ProcessMemory,
    regions: &[Region],
    found: &HashMap<u64, FoundTask>,
) -> Result<HashMap<u64, Vec<u64>>, ReadError> {
    let mut references: HashMap<u64, Vec<u64>> = HashMap::new();
    let (Some(&low), Some(&high)) = (found.keys().min(), found.keys().max()) else {
        return Ok(references);
    };
    let mut buffer = vec![0u8; CHUNK + 8];
    for region in regions.iter().filter(|r| r.may_hold_tasks()) {
        let mut address = region.start;
        while address < region.end {
            // One word more than the chunk: the word after the last one.
            let len = (CHUNK + 8).min((region.end - address) as usize);
            let read = match memory.read_partial(address, &mut buffer[..len]) {
                Ok(read) => read & !7,
                Err(ReadError::Unmapped) => 0,
                Err(other) => return Err(other),
            };
            let words: Vec<u64> = buffer[..read]
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .collect();
            for (index, &value) in words.iter().enumerate().take(CHUNK / 8) {
                if value < low || value > high || !found.contains_key(&value) {
                    continue;
                }
                let at = address + index as u64 * 8;
                if (value..value + 64).contains(&at) {
                    continue;
                }
                let after = words.get(index + 1).copied().unwrap_or(0);
                references.entry(value).or_default().push(after);
            }
            if read < len.min(CHUNK) {
                break;
            }
            address += CHUNK as u64;
        }
    }
    Ok(references)
}

fn read_links(memory: &ProcessMemory, at: u64) -> Result<(u64, u64), ReadError> {
    Ok((memory.read_u64(at)?, memory.read_u64(at + 8)?))
}

/// The task's lifecycle, from its state word.
pub fn describe_state(state: u64) -> &'static str {
    if state & COMPLETE != 0 {
        if state & CANCELLED != 0 {
            "cancelled"
        } else {
            "complete"
        }
    } else if state & RUNNING != 0 {
        "running"
    } else if state & CANCELLED != 0 {
        "cancelling"
    } else if state & NOTIFIED != 0 {
        "scheduled"
    } else {
        "idle"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_as_tokio_defines_them() {
        let one_ref = 1 << REF_SHIFT;
        assert_eq!(describe_state(one_ref), "idle");
        assert_eq!(
            describe_state(one_ref | NOTIFIED | JOIN_INTEREST),
            "scheduled"
        );
        assert_eq!(describe_state(one_ref | RUNNING), "running");
        assert_eq!(
            describe_state(one_ref | COMPLETE | JOIN_INTEREST),
            "complete"
        );
        assert_eq!(describe_state(one_ref | COMPLETE | CANCELLED), "cancelled");
        assert_eq!(describe_state(one_ref | CANCELLED | NOTIFIED), "cancelling");
    }
}
