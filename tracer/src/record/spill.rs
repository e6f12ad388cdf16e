//! The spill file: the raw event stream, kept on disk while recording and
//! read back afterwards to render the trace.
//!
//! Rendering an event (timeline, JSON) costs about a microsecond; copying its
//! 56 bytes costs a few nanoseconds. So while the target runs, the drain loop
//! only appends each `EVENTS` ring-buffer record to this file, and the trace
//! is rendered from it once recording has stopped (as Go's execution tracer
//! does). That keeps the tracer's CPU per event low while it competes with
//! the target for the machine.
//!
//! Format: the `tracer_common::Event` records exactly as the eBPF side wrote
//! them, back to back, in drain order, in this machine's byte order. No
//! header: the file is private to one process and never outlives it.
//!
//! The file is an unnamed temporary file (`O_TMPFILE` where the file system
//! has it) in the output's directory: nothing is left behind if the tracer is
//! killed, and it sits on the file system the trace is about to be written
//! to, which has room for something larger than it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use memmap2::{Mmap, MmapOptions};
use tracer_common::{EVENT_SIZE, Event};

/// Large enough that the drain loop reaches the kernel in big chunks even at
/// millions of events per second.
const BUFFER_BYTES: usize = 1 << 20;

/// Events per window of the file mapped while reading back: 3.5 MiB, a
/// whole number of events and of pages (a mapping starts at a multiple of
/// the page size; 56 × 65,536 bytes is one of 4, 16 and 64 KiB).
const WINDOW_EVENTS: u64 = 1 << 16;
const _: () = assert!((WINDOW_EVENTS as usize * EVENT_SIZE).is_multiple_of(64 * 1024));

/// Appends ring-buffer records to the spill file.
pub struct SpillWriter {
    out: BufWriter<File>,
    /// The directory the file is in, for error messages (it has no name).
    dir: PathBuf,
    events: u64,
    malformed: u64,
}

impl SpillWriter {
    /// Creates an unnamed spill file in `dir`.
    pub fn create_in(dir: &Path) -> Result<Self> {
        let file = tempfile::tempfile_in(dir).map_err(|err| {
            anyhow!(
                "cannot create the temporary event file in {}: {err}",
                dir.display()
            )
        })?;
        Ok(SpillWriter {
            out: BufWriter::with_capacity(BUFFER_BYTES, file),
            dir: dir.to_path_buf(),
            events: 0,
            malformed: 0,
        })
    }

    /// Appends one `EVENTS` ring-buffer record (the eBPF side writes one
    /// event per record) and returns the event's thread, or None for a
    /// malformed record (counted in [`malformed`](Self::malformed), not
    /// written): not exactly one event long, so its fields can't be trusted
    /// to be where we read them.
    pub fn push(&mut self, record: &[u8]) -> Result<Option<u32>> {
        if record.len() != EVENT_SIZE {
            self.malformed += 1;
            return Ok(None);
        }
        self.out
            .write_all(record)
            .map_err(|err| self.io_error(err))?;
        self.events += 1;
        const TID: usize = std::mem::offset_of!(Event, tid);
        let tid = u32::from_ne_bytes(record[TID..TID + 4].try_into().expect("4 bytes"));
        Ok(Some(tid))
    }

    /// Events written so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Malformed records seen so far (not written).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Flushes the file and opens it for reading from its start.
    pub fn finish(self) -> Result<SpillReader> {
        let dir = self.dir.clone();
        let events = self.events;
        let file = self.out.into_inner().map_err(|err| {
            anyhow!(
                "writing the temporary event file in {}: {}",
                dir.display(),
                err.error()
            )
        })?;
        Ok(SpillReader {
            file,
            dir,
            remaining: events,
            window: None,
            window_offset: 0,
            at: 0,
        })
    }

    fn io_error(&self, err: io::Error) -> anyhow::Error {
        anyhow!(
            "writing the temporary event file in {}: {err}",
            self.dir.display()
        )
    }
}

/// Reads the spill file back, one event at a time (it can hold far more
/// than fits in memory), through a window of it mapped at a time: the
/// events are read where the page cache holds them, where `read` copied
/// every byte out first (the copy and the buffered reader's per-event work
/// were ~11 % of rendering), and memory stays bounded by the window.
pub struct SpillReader {
    file: File,
    dir: PathBuf,
    /// Events not read yet: the file holds exactly what was written.
    remaining: u64,
    /// The mapped window and the next event's index in it.
    window: Option<Mmap>,
    /// Where the window starts in the file, in bytes.
    window_offset: u64,
    at: usize,
}

impl SpillReader {
    /// Events not read yet.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Maps the window after the current one (the previous is unmapped).
    fn map_next_window(&mut self) -> io::Result<()> {
        let start = match &self.window {
            // Windows are whole: the next starts where this one ends.
            Some(window) => window.len() as u64,
            None => 0,
        };
        let offset = self.window_offset + start;
        let events = self.remaining.min(WINDOW_EVENTS);
        self.window = None;
        // SAFETY: the file is an unnamed temporary file that only this
        // process has (see the module docs) and nothing writes it any
        // more, so the mapped bytes cannot change under us.
        let window = unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(events as usize * EVENT_SIZE)
                // The whole window is read right away: map its pages in
                // one go rather than fault by fault.
                .populate()
                .map(&self.file)?
        };
        self.window_offset = offset;
        self.window = Some(window);
        self.at = 0;
        Ok(())
    }
}

impl Iterator for SpillReader {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        if self.remaining == 0 {
            return None;
        }
        let window_len = self.window.as_ref().map_or(0, |w| w.len() / EVENT_SIZE);
        if self.at == window_len
            && let Err(err) = self.map_next_window()
        {
            self.remaining = 0;
            return Some(Err(anyhow!(
                "reading the temporary event file in {}: {err}",
                self.dir.display()
            )));
        }
        let window = self.window.as_ref().expect("mapped above");
        let bytes = &window[self.at * EVENT_SIZE..][..EVENT_SIZE];
        self.at += 1;
        self.remaining -= 1;
        // SAFETY: `Event` is plain `repr(C)` data of EVENT_SIZE bytes, and
        // these are the bytes the eBPF side wrote for one; read_unaligned
        // copes with any alignment.
        Some(Ok(unsafe {
            std::ptr::read_unaligned::<Event>(bytes.as_ptr().cast())
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let remaining = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        (remaining, Some(remaining))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ts_ns: u64, tid: u32, kind: u32) -> Event {
        Event {
            ts_ns,
            tid,
            kind,
            site: 3,
            _pad: 0,
            task: 0x7f00_0000_1000 + ts_ns,
            task_id: ts_ns * 10,
            other_task_id: 7,
            addr: 0xdead_beef,
        }
    }

    fn bytes(events: &[Event]) -> Vec<u8> {
        // SAFETY: plain repr(C) data viewed as bytes.
        unsafe {
            std::slice::from_raw_parts(events.as_ptr().cast::<u8>(), size_of_val(events)).to_vec()
        }
    }

    fn writer() -> SpillWriter {
        SpillWriter::create_in(&std::env::temp_dir()).expect("temporary file")
    }

    fn read_all(spill: SpillWriter) -> Vec<Event> {
        spill
            .finish()
            .expect("finish")
            .collect::<Result<_>>()
            .expect("read back")
    }

    #[test]
    fn events_round_trip_in_order() {
        let events: Vec<Event> = (1..=1000)
            .map(|i| event(i, i as u32 % 7, 1 + i as u32 % 8))
            .collect();
        let mut spill = writer();
        for event in &events {
            let record = bytes(std::slice::from_ref(event));
            let pushed = spill.push(&record).expect("push");
            assert_eq!(pushed, Some(event.tid));
        }
        assert_eq!(spill.events(), 1000);
        assert_eq!(read_all(spill), events);
    }

    #[test]
    fn malformed_records_are_counted_and_skipped() {
        let mut spill = writer();
        let whole = bytes(&[event(1, 1, 1)]);
        assert!(
            spill
                .push(&whole[..EVENT_SIZE - 8])
                .expect("push")
                .is_none()
        );
        assert!(spill.push(&[]).expect("push").is_none());
        // Longer than an event: not something the eBPF side writes.
        let two = bytes(&[event(2, 1, 1), event(3, 1, 2)]);
        assert!(spill.push(&two).expect("push").is_none());
        assert_eq!(spill.push(&whole).expect("push"), Some(1));
        assert_eq!((spill.events(), spill.malformed()), (1, 3));
        assert_eq!(read_all(spill), [event(1, 1, 1)]);
    }

    #[test]
    fn reading_streams_through_a_file_larger_than_a_window() {
        // Two whole windows and a partial third.
        let count = 2 * WINDOW_EVENTS as usize + 5;
        assert!(count * EVENT_SIZE > 3 * BUFFER_BYTES);
        let mut spill = writer();
        for i in 0..count as u64 {
            spill.push(&bytes(&[event(i, 1, 2)])).expect("push");
        }
        let mut reader = spill.finish().expect("finish");
        assert_eq!(reader.remaining(), count as u64);
        let mut expected = 0;
        for event in &mut reader {
            assert_eq!(event.expect("read").ts_ns, expected);
            expected += 1;
        }
        assert_eq!(expected, count as u64);
    }

    #[test]
    fn an_empty_recording_reads_back_as_no_events() {
        assert_eq!(read_all(writer()), []);
    }

    #[test]
    fn a_directory_that_cannot_hold_the_file_is_a_clear_error() {
        let err = SpillWriter::create_in(Path::new("/nonexistent/dir"))
            .err()
            .expect("no such directory");
        assert!(err.to_string().contains("/nonexistent/dir"), "{err:#}");
    }
}
