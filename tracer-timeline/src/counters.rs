//! Counter tracks ("ph":"C") sampled on change, rate-limited so that a trace
//! with millions of polls does not get a counter sample for each of them.
//!
//! Rule: a counter emits at most one sample per [`COUNTER_MIN_INTERVAL_NS`] of
//! trace time. A change inside the window is held back and emitted when the
//! window has passed (stamped at the end of the window, or at the change if
//! that is later), so the drawn value is never more than one interval late.
//! [`finish`](RateLimitedCounter::finish) always emits the last value.
//!
//! `RuntimeCounters` holds the timeline's three counters (tasks alive,
//! busy workers, busy blocking threads) and feeds them to their samplers.

/// The shortest gap between two samples of one counter.
pub const COUNTER_MIN_INTERVAL_NS: u64 = 100_000;

/// The counters the timeline keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Tasks seen (spawned or polled) and not yet ended.
    TasksAlive,
    /// Runtime worker threads inside a poll.
    WorkersBusy,
    /// Blocking-pool threads inside a poll of a `spawn_blocking` task.
    BlockingBusy,
}

impl Counter {
    /// The counter's event name and series (argument) name. Perfetto names
    /// the track "<name> <series>", e.g. "tasks alive".
    pub fn name_and_series(self) -> (&'static str, &'static str) {
        match self {
            Counter::TasksAlive => ("tasks", "alive"),
            Counter::WorkersBusy => ("workers", "busy"),
            Counter::BlockingBusy => ("blocking threads", "busy"),
        }
    }
}

/// One counter value to draw from `ts_ns` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSample {
    pub counter: Counter,
    pub ts_ns: u64,
    pub value: u64,
}

/// One counter's sampling state.
pub(crate) struct RateLimitedCounter {
    counter: Counter,
    /// The value now and when it became the value; `None` until first set.
    current: Option<(u64, u64)>,
    /// The last sample emitted: (timestamp, value).
    shown: Option<(u64, u64)>,
}

impl RateLimitedCounter {
    pub(crate) fn new(counter: Counter) -> Self {
        Self {
            counter,
            current: None,
            shown: None,
        }
    }

    /// The value became `value` at `ts_ns`.
    pub(crate) fn set(&mut self, ts_ns: u64, value: u64, out: &mut Vec<CounterSample>) {
        if self.current.is_some_and(|(_, current)| current == value) {
            return;
        }
        self.current = Some((ts_ns, value));
        self.tick(ts_ns, out);
    }

    /// Trace time has reached `now_ns`: emit a held-back value if its window passed.
    pub(crate) fn tick(&mut self, now_ns: u64, out: &mut Vec<CounterSample>) {
        let Some((changed_ns, value)) = self.pending() else {
            return;
        };
        let ts_ns = match self.shown {
            None => changed_ns,
            Some((shown_ns, _)) => {
                let window_end = shown_ns.saturating_add(COUNTER_MIN_INTERVAL_NS);
                if now_ns < window_end {
                    return;
                }
                changed_ns.max(window_end)
            }
        };
        self.emit(ts_ns, value, out);
    }

    /// Recording ended: emit the last value if it was held back.
    pub(crate) fn finish(&mut self, out: &mut Vec<CounterSample>) {
        if let Some((changed_ns, value)) = self.pending() {
            self.emit(changed_ns, value, out);
        }
    }

    /// The current value, if it differs from what was last emitted.
    fn pending(&self) -> Option<(u64, u64)> {
        let (changed_ns, value) = self.current?;
        match self.shown {
            Some((_, shown)) if shown == value => None,
            _ => Some((changed_ns, value)),
        }
    }

    fn emit(&mut self, ts_ns: u64, value: u64, out: &mut Vec<CounterSample>) {
        // Never step back in time: other threads' events may arrive a little
        // out of timestamp order.
        let ts_ns = self
            .shown
            .map_or(ts_ns, |(shown_ns, _)| ts_ns.max(shown_ns));
        self.shown = Some((ts_ns, value));
        out.push(CounterSample {
            counter: self.counter,
            ts_ns,
            value,
        });
    }
}

/// What a thread is doing, for the busy counters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    Idle,
    /// Inside a poll of runtime work.
    Worker,
    /// Inside a poll of `spawn_blocking` work.
    Blocking,
}

/// The timeline's three counters (tasks alive, busy workers, busy blocking
/// threads): their current values and their samplers.
pub(crate) struct RuntimeCounters {
    pub(crate) tasks_alive: u64,
    workers_busy: u64,
    blocking_busy: u64,
    tasks_alive_track: RateLimitedCounter,
    workers_busy_track: RateLimitedCounter,
    blocking_busy_track: RateLimitedCounter,
}

impl Default for RuntimeCounters {
    fn default() -> Self {
        Self {
            tasks_alive: 0,
            workers_busy: 0,
            blocking_busy: 0,
            tasks_alive_track: RateLimitedCounter::new(Counter::TasksAlive),
            workers_busy_track: RateLimitedCounter::new(Counter::WorkersBusy),
            blocking_busy_track: RateLimitedCounter::new(Counter::BlockingBusy),
        }
    }
}

impl RuntimeCounters {
    pub(crate) fn thread_changed(&mut self, before: Activity, after: Activity) {
        if before == after {
            return;
        }
        match before {
            Activity::Worker => self.workers_busy -= 1,
            Activity::Blocking => self.blocking_busy -= 1,
            Activity::Idle => {}
        }
        match after {
            Activity::Worker => self.workers_busy += 1,
            Activity::Blocking => self.blocking_busy += 1,
            Activity::Idle => {}
        }
    }

    /// Offers the current values at `now_ns` (each sampler decides whether
    /// to emit, see [`crate::counters`]).
    pub(crate) fn sample(&mut self, now_ns: u64, out: &mut Vec<CounterSample>) {
        self.tasks_alive_track.set(now_ns, self.tasks_alive, out);
        self.workers_busy_track.set(now_ns, self.workers_busy, out);
        self.blocking_busy_track
            .set(now_ns, self.blocking_busy, out);
        self.tasks_alive_track.tick(now_ns, out);
        self.workers_busy_track.tick(now_ns, out);
        self.blocking_busy_track.tick(now_ns, out);
    }

    pub(crate) fn finish(&mut self, out: &mut Vec<CounterSample>) {
        self.tasks_alive_track.finish(out);
        self.workers_busy_track.finish(out);
        self.blocking_busy_track.finish(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_change_is_shown_at_once_and_later_ones_wait_for_the_window() {
        let mut counter = RateLimitedCounter::new(Counter::WorkersBusy);
        let mut out = Vec::new();
        counter.set(1_000, 1, &mut out);
        counter.set(2_000, 2, &mut out); // inside the window: held back
        counter.set(3_000, 3, &mut out);
        assert_eq!(out.len(), 1);
        counter.tick(50_000, &mut out);
        assert_eq!(out.len(), 1, "window not over yet");
        counter.tick(200_000, &mut out);
        assert_eq!(
            out[1],
            CounterSample {
                counter: Counter::WorkersBusy,
                ts_ns: 101_000,
                value: 3
            },
            "stamped at the end of the window"
        );
    }

    #[test]
    fn a_change_back_to_the_shown_value_emits_nothing() {
        let mut counter = RateLimitedCounter::new(Counter::TasksAlive);
        let mut out = Vec::new();
        counter.set(10, 4, &mut out);
        counter.set(20, 5, &mut out);
        counter.set(30, 4, &mut out);
        counter.tick(1_000_000, &mut out);
        counter.finish(&mut out);
        assert_eq!(out.len(), 1, "{out:?}");
    }

    #[test]
    fn finish_always_shows_the_last_value() {
        let mut counter = RateLimitedCounter::new(Counter::TasksAlive);
        let mut out = Vec::new();
        counter.set(10, 1, &mut out);
        counter.set(20, 0, &mut out);
        counter.finish(&mut out);
        assert_eq!(out.last().map(|s| (s.ts_ns, s.value)), Some((20, 0)));
        counter.finish(&mut out);
        assert_eq!(out.len(), 2, "finishing twice adds nothing");
    }
}
