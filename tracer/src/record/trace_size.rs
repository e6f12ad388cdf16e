//! How large the trace will be, known while recording, so that a trace too
//! large to open is warned about and `--max-size` can stop recording.
//!
//! The trace is rendered only after recording stops, so its size is
//! estimated from the events spilled so far. Measured on the fixtures
//! (2-second traces, Linux 6.18): 189–192 bytes of Chrome JSON per event in
//! full mode, stacks of CPU samples and await points included (175 for a
//! program with few samples), 121 in polls mode; Perfetto protobuf ~29
//! (BENCHMARKS.md). Each format states its figure, rounded up so the
//! estimate errs towards stopping early (`Format::bytes_per_event`).
//!
//! A 60-second trace of a busy server was 3.5 GB. The Perfetto UI loads a
//! JSON trace into the memory of a browser tab and fails on those much over
//! 1 GB (trace_processor_shell opens larger ones); hence the warning.

/// About the largest JSON trace the Perfetto UI opens in a browser tab.
pub const BROWSER_LIMIT_BYTES: u64 = 1 << 30;

/// The estimated trace size, checked as events come in.
pub struct SizeWatch {
    max_bytes: Option<u64>,
    /// Of the output's format (see above).
    bytes_per_event: u64,
    warned: bool,
}

/// What to do after a check.
#[derive(Debug, PartialEq, Eq)]
pub enum SizeCheck {
    Fine,
    /// Tell the user, once.
    Warn(String),
    /// `--max-size` is reached: stop recording.
    Stop,
}

impl SizeWatch {
    pub fn new(max_bytes: Option<u64>, bytes_per_event: u64) -> Self {
        SizeWatch {
            max_bytes,
            bytes_per_event,
            warned: false,
        }
    }

    /// The trace's estimated size after `events` events.
    pub fn estimate(&self, events: u64) -> u64 {
        events.saturating_mul(self.bytes_per_event)
    }

    pub fn check(&mut self, events: u64) -> SizeCheck {
        let bytes = self.estimate(events);
        if self.max_bytes.is_some_and(|max| bytes >= max) {
            return SizeCheck::Stop;
        }
        if bytes > BROWSER_LIMIT_BYTES && !self.warned {
            self.warned = true;
            return SizeCheck::Warn(format!(
                "the trace will be over {} MB ({events} events so far, about \
                 {} bytes each): the Perfetto UI can't open traces \
                 much over 1 GB in a browser tab. Stop soon, or use --max-size, --duration \
                 or --mode light",
                bytes / 1_000_000,
                self.bytes_per_event
            ));
        }
        SizeCheck::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chrome JSON's figure; the logic is the same for every format.
    const JSON_BYTES_PER_EVENT: u64 = 312;

    #[test]
    fn warns_once_past_what_a_browser_opens() {
        let mut watch = SizeWatch::new(None, JSON_BYTES_PER_EVENT);
        let at_limit = BROWSER_LIMIT_BYTES / JSON_BYTES_PER_EVENT;
        assert_eq!(watch.check(at_limit), SizeCheck::Fine);
        let SizeCheck::Warn(message) = watch.check(at_limit + 1) else {
            panic!("no warning past the limit");
        };
        assert!(message.contains("1 GB"), "{message}");
        assert_eq!(watch.check(at_limit * 2), SizeCheck::Fine);
    }

    #[test]
    fn stops_at_the_bound() {
        let mut watch = SizeWatch::new(Some(2 << 20), JSON_BYTES_PER_EVENT);
        let events = (2 << 20) / JSON_BYTES_PER_EVENT;
        assert_eq!(watch.check(events - 1), SizeCheck::Fine);
        assert_eq!(watch.check(events + 1), SizeCheck::Stop);
        // No overflow, however many events.
        assert!(matches!(
            SizeWatch::new(None, JSON_BYTES_PER_EVENT).check(u64::MAX),
            SizeCheck::Warn(_)
        ));
    }
}
