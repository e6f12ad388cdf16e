//! Helpers shared by the tests.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use tracer_common::{Event, EventKind};

/// An event of `kind` at `ts_ns` on thread `tid`, every other field zero.
pub fn event(ts_ns: u64, tid: u32, kind: EventKind) -> Event {
    Event {
        ts_ns,
        tid,
        kind: kind as u32,
        ..Event::default()
    }
}

pub fn poll_end(ts_ns: u64, tid: u32) -> Event {
    event(ts_ns, tid, EventKind::PollEnd)
}

pub fn park_start(ts_ns: u64, tid: u32) -> Event {
    event(ts_ns, tid, EventKind::ParkStart)
}

pub fn park_end(ts_ns: u64, tid: u32) -> Event {
    event(ts_ns, tid, EventKind::ParkEnd)
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tracer-timeline-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(name);
        fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
