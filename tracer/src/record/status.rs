//! The one-line live status shown on a terminal while recording.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct StatusLine {
    enabled: bool,
    started: Instant,
    last_tick: Instant,
    events_at_last_tick: u64,
}

impl StatusLine {
    /// Shown only when stderr is a terminal, so logs and CI output stay clean.
    pub fn new() -> Self {
        let now = Instant::now();
        StatusLine {
            enabled: std::io::stderr().is_terminal(),
            started: now,
            last_tick: now,
            events_at_last_tick: 0,
        }
    }

    pub fn update(&mut self, events: u64, lost: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let interval = now.duration_since(self.last_tick).as_secs_f64().max(1e-3);
        let rate = (events - self.events_at_last_tick) as f64 / interval;
        self.last_tick = now;
        self.events_at_last_tick = events;
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let lost = if lost == 0 {
            "0 lost".to_string()
        } else {
            format!("{lost} LOST")
        };
        eprint!(
            "\r\x1b[2Krecording {elapsed:6.1} s  {rate:>10.0} events/s  {events:>10} events  {lost}  (Ctrl-C to stop)"
        );
        let _ = std::io::stderr().flush();
    }

    pub fn clear(&mut self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }
}

impl Default for StatusLine {
    fn default() -> Self {
        Self::new()
    }
}
