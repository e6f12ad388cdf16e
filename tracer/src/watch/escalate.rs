//! The watcher's side of escalation: which findings trigger an incident,
//! and writing the incident trace (the kept window, then the detail window
//! that [`incident`](super::incident) recorded, in one file).

use std::time::Duration;

use anyhow::Result;

use super::detect::Finding;
use super::{Watcher, trace};
use crate::clock::monotonic_ns;

impl Watcher {
    /// Starts an incident if `finding` is over an `--on-*` threshold.
    pub(super) fn check_trigger(&mut self, finding: &Finding) {
        let at_least = |threshold: Option<Duration>, ns: u64| {
            threshold.is_some_and(|threshold| ns >= threshold.as_nanos() as u64)
        };
        let trigger = match finding {
            Finding::Blocking(b) if at_least(self.options.on_blocking, b.duration_ns) => (
                format!(
                    "BLOCKING for {} ms on tid {}",
                    b.duration_ns / 1_000_000,
                    b.tid
                ),
                b.ts_ns + b.duration_ns,
            ),
            // Announced while running already (`take_ongoing`) when it was
            // long enough then; a run that crossed the threshold only with
            // a preemption at its end is triggered here.
            Finding::Hog(h)
                if !h.announced && at_least(self.options.on_hog, h.lower_bound_ns()) =>
            {
                (
                    format!(
                        "HOG for at least {} ms on tid {}",
                        h.lower_bound_ns() / 1_000_000,
                        h.tid
                    ),
                    h.last_ns,
                )
            }
            _ => return,
        };
        self.start_incident(trigger.0, trigger.1);
    }

    /// Starts attaching the full probes, unless an incident runs (or can't yet).
    pub(super) fn start_incident(&mut self, what: String, when: u64) {
        let Some(escalation) = &mut self.escalation else {
            return;
        };
        match escalation.trigger(what.clone(), when) {
            Some(number) => log::info!("incident {number}: attaching the full probes: {what}"),
            None => log::debug!("trigger ignored (an incident is running or none is left): {what}"),
        }
    }

    /// Reports an incident whose full probes started recording, and ends
    /// one whose detail window is over (any, `at_exit`).
    pub(super) fn escalate(
        &mut self,
        process: &str,
        at_exit: bool,
        lost: impl Fn() -> u64,
    ) -> Result<()> {
        let Some(escalation) = &mut self.escalation else {
            return Ok(());
        };
        // An incident that fails is reported; watching goes on.
        let (started, over) = match escalation.drain(at_exit) {
            Ok(drained) => drained,
            Err(err) => {
                eprintln!("incident: {err:#}");
                return Ok(());
            }
        };
        if let Some((incident, took)) = started {
            println!(
                "incident {}: full probes recording {:.0} ms after the trigger (attached in {:.0} ms): {}",
                incident.number,
                incident.start_ns.saturating_sub(incident.trigger_ns) as f64 / 1e6,
                took.as_secs_f64() * 1e3,
                incident.trigger
            );
        }
        if over && let Err(err) = self.finish_incident(process, lost()) {
            eprintln!("incident: could not write its trace: {err:#}");
        }
        Ok(())
    }

    /// Writes the running incident's trace: the kept window up to the
    /// detail's start, then the detail window (rendered by
    /// [`incident`](super::incident)), in one file.
    pub(super) fn finish_incident(&mut self, process: &str, lost: u64) -> Result<()> {
        let Some(detail_start) = self.escalation.as_ref().and_then(|e| e.detail_start()) else {
            return Ok(());
        };
        let end_ns = monotonic_ns();
        let window_start = self
            .recorder
            .span()
            .map_or(detail_start, |(first, _)| first.min(detail_start));
        let number = self.escalation.as_ref().map_or(0, |e| e.incidents);
        let reason = format!("incident {number}");
        let info = trace::WindowInfo {
            process,
            reason: &reason,
            keep_memory: self.options.keep_memory,
            lost,
            sample_hz: self.options.sample_hz,
            events: self.drained,
            malformed: self.malformed + self.reader.malformed,
            until_ns: Some(detail_start),
        };
        let window = trace::window(
            self.options.pid,
            &self.recorder,
            &mut self.names,
            &mut self.reader,
            &info,
        );
        let Some(escalation) = &mut self.escalation else {
            return Ok(());
        };
        let Some((incident, events)) = escalation.finish(end_ns, process, window)? else {
            return Ok(());
        };
        println!(
            "incident {}: wrote {} ({:.1} s kept before it, then {:.1} s of full detail, {events} events)",
            incident.number,
            incident.path.display(),
            (detail_start - window_start) as f64 / 1e9,
            (end_ns - detail_start) as f64 / 1e9,
        );
        Ok(())
    }
}
