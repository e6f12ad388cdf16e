//! The futex words the workers park on, learnt as the watch runs.
//!
//! The switch program (eBPF `watch_switch`) takes a worker's sleep for a
//! park when it sleeps in epoll (the I/O driver) or in a futex wait on a
//! word in `PARK_FUTEX`. Those words are the workers' park condvars (and
//! the locks taken inside the park), one set per worker, so about as many
//! as workers: the first sleep on each is captured like a blocking call,
//! its stack shows the park function and no task poll
//! ([`Capture::in_park`]), and its word goes into the map here, so that the
//! next sleeps on it cost no capture. On the fixture both workers' words
//! were learnt within the first second.

use std::collections::HashSet;

use aya::maps::{HashMap, MapData};

use super::stacks::Capture;

/// x86_64 `futex`.
const SYS_FUTEX: u64 = 202;

pub struct ParkWords {
    map: HashMap<MapData, u64, u32>,
    /// The words put in the map (at most its 1024).
    learnt: HashSet<u64>,
}

impl ParkWords {
    pub fn new(map: HashMap<MapData, u64, u32>) -> Self {
        ParkWords {
            map,
            learnt: HashSet::new(),
        }
    }

    /// `capture` is a worker's sleep in its park: if on a futex word not
    /// learnt yet, the switch program takes that word for a park from now
    /// on. Captures of switches before the map had it may still arrive.
    pub fn learn(&mut self, capture: &Capture) {
        if capture.syscall != SYS_FUTEX || capture.arg0 == 0 || !self.learnt.insert(capture.arg0) {
            return;
        }
        match self.map.insert(capture.arg0, 1, 0) {
            Ok(()) => log::info!(
                "thread {} parks on the futex word at {:#x}",
                capture.tid,
                capture.arg0
            ),
            Err(err) => log::warn!("could not note a park futex word: {err}"),
        }
    }
}
