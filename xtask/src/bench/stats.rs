//! The statistics of a point's runs: medians (with min and max, as the
//! tables show them), the effect of a condition against the untraced runs
//! of its point, and the polls per op that turn an effect into a cost per
//! poll.

use super::plan::{Measured, Sample};

pub(super) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

pub(super) fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// One row's derived figures, against the untraced samples of its point.
pub(super) struct Effect {
    pub throughput_ratio: f64,
    pub p99_ratio: f64,
    /// Extra wall time per poll (flat out only: at a fixed load the wall
    /// time is the schedule's; none when no condition counted the polls).
    pub added_wall_ns: Option<f64>,
    /// Extra workload CPU time per poll (none when no condition counted the
    /// polls: a run of only `untraced` and `watch`, which has no poll probe).
    pub added_cpu_ns: Option<f64>,
}

pub(super) fn effect(
    traced: &[Sample],
    untraced: &[Sample],
    polls_per_op: f64,
    flat_out: bool,
) -> Effect {
    let med = |samples: &[Sample], f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f));
    let throughput = |s: &Sample| s.throughput();
    let p99 = |s: &Sample| s.p99_ns;
    let cpu_per_op = |s: &Sample| s.workload_cpu / s.ops;
    let wall_per_op = 1.0 / med(traced, &throughput) - 1.0 / med(untraced, &throughput);
    Effect {
        throughput_ratio: med(traced, &throughput) / med(untraced, &throughput),
        p99_ratio: med(traced, &p99) / med(untraced, &p99),
        added_wall_ns: (flat_out && polls_per_op > 0.0).then(|| wall_per_op / polls_per_op * 1e9),
        added_cpu_ns: (polls_per_op > 0.0)
            .then(|| (med(traced, &cpu_per_op) - med(untraced, &cpu_per_op)) / polls_per_op * 1e9),
    }
}

/// Task polls per op of a workload at a load: the most any condition saw.
/// A tracer that sees every poll (full mode, bpftrace) counts them all, a
/// light mode only some; the workload's own estimate is the fallback.
pub(super) fn polls_per_op(all: &[Measured], of: &Measured) -> f64 {
    let per_op = |samples: &[Sample], polls: &dyn Fn(&Sample) -> f64| {
        median(samples.iter().map(|s| polls(s) / s.ops))
    };
    all.iter()
        .filter(|m| m.workload == of.workload && m.load == of.load)
        .map(|m| {
            let traced = per_op(&m.samples, &|s| s.tracer.as_ref().map_or(0.0, |t| t.polls));
            traced.max(per_op(&m.samples, &|s| s.workload_polls))
        })
        .filter(|p| p.is_finite())
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
        assert_eq!(min_max([3.0, 1.0, 2.0].into_iter()), (1.0, 3.0));
    }

    fn sample(ops: f64, workload_cpu: f64) -> Sample {
        Sample {
            ops,
            seconds: 1.0,
            p99_ns: 1000.0,
            workload_cpu,
            ..Sample::default()
        }
    }

    #[test]
    fn the_effect_is_per_poll() {
        // Untraced: 1000 ops/s, 1 ms CPU per op; traced: 500 ops/s, 2 ms.
        let untraced = [sample(1000.0, 1.0)];
        let traced = [sample(500.0, 1.0)];
        let e = effect(&traced, &untraced, 2.0, true);
        assert_eq!(e.throughput_ratio, 0.5);
        assert_eq!(e.p99_ratio, 1.0);
        // 1 ms more wall and CPU per op, 2 polls an op.
        assert!((e.added_wall_ns.unwrap() - 500_000.0).abs() < 1e-6);
        assert!((e.added_cpu_ns.unwrap() - 500_000.0).abs() < 1e-6);
        assert_eq!(effect(&traced, &untraced, 2.0, false).added_wall_ns, None);
        // No condition counted polls: nothing per poll, rather than inf.
        let e = effect(&traced, &untraced, 0.0, true);
        assert_eq!((e.added_wall_ns, e.added_cpu_ns), (None, None));
    }
}
