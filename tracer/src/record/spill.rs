//! The spill file: the raw event stream, kept on disk while recording and
//! read back afterwards to render the trace.
//!
//! Rendering an event (timeline, trace writer) costs 150–300 ns; encoding it
//! here a few. So while the target runs, the drain loop only appends each
//! `EVENTS` ring-buffer record to this file, and the trace is rendered from
//! it once recording has stopped (as Go's execution tracer does). That keeps
//! the tracer's CPU per event low while it competes with the target for the
//! machine.
//!
//! Format: the events in drain order, each as a compact record
//! ([`spill_codec`](super::spill_codec): ~13 bytes where the event is 56, so
//! writing, reading back and the kernel's freeing of the file's pages at the
//! end cost a quarter). No header: the file is private to one process and
//! never outlives it.
//!
//! The file is an unnamed temporary file (`O_TMPFILE` where the file system
//! has it) in the output's directory: nothing is left behind if the tracer is
//! killed, and it sits on the file system the trace is about to be written
//! to, which has room for something larger than it.
//!
//! Reading back maps the file (`mmap`) rather than `pread`ing it into a
//! buffer: the records are decoded where the page cache holds them, with no
//! copy (the kernel's copy and the buffer's refills were ~3 % of rendering;
//! `read_rate` below: see NOTES.md, "Rendering rate, third round"). Mapping
//! is safe here because the file is this process's alone: it has no name
//! (or, where the file system has no `O_TMPFILE`, is unlinked the moment
//! it is created), so nothing else opens, writes or truncates it, and it
//! is not written once mapped. The cost of that choice: an I/O error reading a page back
//! (evicted from the page cache, then unreadable from disk) would be a
//! `SIGBUS`, where `pread` returned an error.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use anyhow::{Result, anyhow};
use tracer_common::{EVENT_SIZE, Event};

use super::spill_codec::{self, Context, MAX_RECORD};

/// Large enough that the drain loop reaches the kernel in big chunks even at
/// millions of events per second.
const BUFFER_BYTES: usize = 1 << 20;

/// Reading back drops the pages read from the mapping every this many
/// bytes: they stay in the page cache until the file is closed, but leave
/// the tracer's resident set, which otherwise grew by the whole spill and
/// with it its peak RSS (20 s of the HTTP benchmark: 165 MB with `pread`,
/// 231 MB mapped, 168 MB dropping every 4 MiB).
const RELEASE_BYTES: usize = 4 << 20;

/// Appends ring-buffer records to the spill file.
pub struct SpillWriter {
    file: File,
    /// Encoded records not yet written.
    buf: Vec<u8>,
    context: Context,
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
            file,
            buf: Vec::with_capacity(BUFFER_BYTES + MAX_RECORD),
            context: Context::default(),
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
        // SAFETY: `Event` is plain `repr(C)` data of EVENT_SIZE bytes, and
        // these are the bytes the eBPF side wrote for one; read_unaligned
        // copes with the ring buffer's alignment.
        let event = unsafe { std::ptr::read_unaligned::<Event>(record.as_ptr().cast()) };
        spill_codec::encode(&mut self.context, &event, &mut self.buf);
        if self.buf.len() >= BUFFER_BYTES {
            self.flush().map_err(|err| self.io_error(err))?;
        }
        self.events += 1;
        Ok(Some(event.tid))
    }

    /// Events written so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Malformed records seen so far (not written).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Writes what is buffered and maps the file for reading from its start.
    pub fn finish(mut self) -> Result<SpillReader> {
        self.flush().map_err(|err| self.io_error(err))?;
        // Nothing to map in an empty file (and `mmap` refuses length 0).
        let map = if self.events == 0 {
            None
        } else {
            // SAFETY: the file is this process's alone (unnamed, see the
            // module docs) and nothing writes or truncates it from here on.
            let map = unsafe { Mmap::map(&self.file) }.map_err(|err| {
                anyhow!(
                    "cannot map the temporary event file in {}: {err}",
                    self.dir.display()
                )
            })?;
            // Read once, front to back: read ahead, and drop what was read.
            let _ = map.advise(Advice::Sequential);
            Some(map)
        };
        Ok(SpillReader {
            map,
            dir: self.dir,
            remaining: self.events,
            context: Context::default(),
            at: 0,
            released: 0,
            event: Event::default(),
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    fn io_error(&self, err: io::Error) -> anyhow::Error {
        anyhow!(
            "writing the temporary event file in {}: {err}",
            self.dir.display()
        )
    }
}

/// Reads the spill file back, one event at a time, from its mapping (it can
/// hold far more than fits in memory: the page cache pages it in and out).
pub struct SpillReader {
    /// The file, mapped; `None` when it is empty. The mapping keeps the
    /// unnamed file alive: it is freed when the reader is dropped.
    map: Option<Mmap>,
    dir: PathBuf,
    /// Events not read yet: the file holds exactly what was written.
    remaining: u64,
    context: Context,
    /// Where the next record starts in the mapping.
    at: usize,
    /// The mapping's pages before this were dropped ([`RELEASE_BYTES`]).
    released: usize,
    /// The event last read, decoded in place.
    event: Event,
}

impl SpillReader {
    /// Events not read yet.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next event, or `None` after the last. Decoded into the reader's
    /// own `event` and lent out: the render loop's way through the file (an
    /// event returned by value as `Option<Result<Event>>` cost a
    /// store-forwarding stall on each of its moves; see `spill_codec::decode`).
    #[inline]
    pub fn next_event(&mut self) -> Result<Option<&Event>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let bytes = self.map.as_deref().unwrap_or_default();
        match spill_codec::decode(
            &mut self.context,
            bytes.get(self.at..).unwrap_or_default(),
            &mut self.event,
        ) {
            Some(used) => {
                self.at += used;
                self.remaining -= 1;
                if self.at - self.released >= RELEASE_BYTES {
                    self.release();
                }
                Ok(Some(&self.event))
            }
            None => {
                self.remaining = 0;
                let cut = io::Error::new(io::ErrorKind::UnexpectedEof, "a record is cut short");
                Err(self.read_error(cut))
            }
        }
    }

    /// Drops the pages read so far, in whole [`RELEASE_BYTES`], from the
    /// mapping (not from the page cache).
    #[cold]
    fn release(&mut self) {
        // A multiple of RELEASE_BYTES, so of the page size.
        let end = self.at - self.at % RELEASE_BYTES;
        if let Some(map) = &self.map {
            // SAFETY: a private read-only mapping of a file nothing writes:
            // dropping its pages only makes a later access read them from
            // the file again, and no reference into them outlives
            // `next_event` (the event is decoded into the reader's own).
            let _ = unsafe {
                map.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    self.released,
                    end - self.released,
                )
            };
        }
        self.released = end;
    }

    fn read_error(&self, err: io::Error) -> anyhow::Error {
        anyhow!(
            "reading the temporary event file in {}: {err}",
            self.dir.display()
        )
    }
}

/// The events by value, for code that wants an iterator (tests).
impl Iterator for SpillReader {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        match self.next_event() {
            Ok(event) => event.copied().map(Ok),
            Err(err) => {
                self.remaining = 0;
                Some(Err(err))
            }
        }
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
    fn a_file_larger_than_the_buffers_reads_back_whole() {
        // Records (~25 bytes each) cross the write buffer's flushes many
        // times and the reader's page release at least once.
        let count = RELEASE_BYTES / 16 + 5;
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
        assert!(reader.released >= RELEASE_BYTES, "{}", reader.released);
    }

    #[test]
    fn a_record_cut_short_is_an_error_not_a_panic() {
        let mut spill = writer();
        for i in 1..=3 {
            spill.push(&bytes(&[event(i, 1, 2)])).expect("push");
        }
        // The last record loses its last byte before it reaches the file.
        spill.buf.pop();
        let mut reader = spill.finish().expect("finish");
        assert_eq!(
            reader.next_event().expect("first").map(|e| e.ts_ns),
            Some(1)
        );
        assert_eq!(
            reader.next_event().expect("second").map(|e| e.ts_ns),
            Some(2)
        );
        let err = reader.next_event().expect_err("cut short");
        assert!(err.to_string().contains("cut short"), "{err:#}");
        assert!(reader.next_event().expect("after the error").is_none());
    }

    #[test]
    fn an_empty_recording_reads_back_as_no_events() {
        assert_eq!(read_all(writer()), []);
    }

    /// How fast the spill reads back (`cargo test --release -p rt-ebpf-trace
    /// --lib -- --ignored --nocapture read_rate`): CPU time of this thread,
    /// the read and the decode together, events shaped like the HTTP
    /// benchmark's (see `spill_codec::decode_rate`).
    #[test]
    #[ignore = "a measurement: run by hand in release mode"]
    fn read_rate() {
        let mut spill = writer();
        for event in spill_codec::http_shaped_events(1_000_000) {
            spill.push(&bytes(&[event])).expect("push");
        }
        let mut reader = spill.finish().expect("finish");
        let count = reader.remaining();
        let started = crate::clock::thread_cpu_ns();
        let mut sum = 0u64;
        while let Some(event) = reader.next_event().expect("read") {
            sum = sum.wrapping_add(event.task ^ event.ts_ns ^ event.addr);
        }
        let took = crate::clock::thread_cpu_ns() - started;
        println!(
            "{count} events read back in {:.1} ms of CPU: {:.1} ns an event ({sum})",
            took as f64 / 1e6,
            took as f64 / count as f64
        );
    }

    #[test]
    fn a_directory_that_cannot_hold_the_file_is_a_clear_error() {
        let err = SpillWriter::create_in(Path::new("/nonexistent/dir"))
            .err()
            .expect("no such directory");
        assert!(err.to_string().contains("/nonexistent/dir"), "{err:#}");
    }
}
