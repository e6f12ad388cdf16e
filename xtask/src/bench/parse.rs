//! The text the external tools print, the only text the benchmark parses:
//! wrk's report, the `result key=value ...` line of the bench/ workloads
//! and load clients, and what bpftrace prints at exit (lost events, the poll
//! count map). rt-ebpf-trace's own figures come as JSON (see `tracer.rs`).

use anyhow::{Context, Result, bail};

use super::plan::Sample;

/// The `result key=value ...` line in a load client's output.
pub(super) fn result_in(output: &str) -> Result<Sample> {
    let line = output
        .lines()
        .find(|l| l.starts_with("result "))
        .with_context(|| format!("no result line in {output:?}"))?;
    result(line)
}

/// A workload's `result key=value ...` line.
pub(super) fn result(line: &str) -> Result<Sample> {
    let Some(fields) = line.strip_prefix("result ") else {
        bail!("expected a result line, got {line:?}");
    };
    let field = |name: &str| {
        fields
            .split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse::<f64>().ok())
            .with_context(|| format!("no {name} in {line:?}"))
    };
    Ok(Sample {
        ops: field("ops")?,
        seconds: field("elapsed_ns")? / 1e9,
        p99_ns: field("p99_ns")?,
        workload_polls: field("polls")?,
        ..Sample::default()
    })
}

/// wrk's request count, duration and p99 latency (it needs `--latency`).
pub(super) fn wrk(out: &str) -> Result<Sample> {
    // "  123456 requests in 2.00s, 12.34MB read"
    let totals = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .with_context(|| format!("no request count in wrk's output: {out}"))?;
    let mut words = totals.split_whitespace();
    let ops: f64 = words.next().unwrap_or("").parse()?;
    let seconds = words
        .nth(2)
        .map(|d| d.trim_end_matches(','))
        .and_then(wrk_duration)
        .context("wrk's duration")?;
    // "     99%    1.23ms"
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| wrk_duration(v.trim()))
        .with_context(|| format!("no p99 in wrk's output: {out}"))?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors: {out}");
    }
    Ok(Sample {
        ops,
        seconds,
        p99_ns: p99 * 1e9,
        ..Sample::default()
    })
}

/// "1.23ms", "2.00s", "450.00us", "1.50m" in seconds.
fn wrk_duration(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(number * scale)
}

/// The events bpftrace says it lost (its "Lost N events" lines).
pub(super) fn bpftrace_lost(output: &str) -> f64 {
    output
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Lost ")?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        // Not `sum()`: an empty f64 sum is -0, which the table shows as "-0".
        .fold(0.0, |sum, lost| sum + lost)
}

/// The `@polls` count map bpftrace prints at exit.
pub(super) fn bpftrace_polls(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("@polls: ")?.trim().parse::<f64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "  Latency Distribution\n     50%  200.00us\n     99%    1.50ms\n  \
                   60000 requests in 2.00s, 7.00MB read\nRequests/sec:  30000.00\n";
        let sample = wrk(out).unwrap();
        assert_eq!(sample.ops, 60000.0);
        assert_eq!(sample.seconds, 2.0);
        assert!((sample.p99_ns - 1.5e6).abs() < 1.0);
    }

    #[test]
    fn wrk_durations_have_units() {
        assert_eq!(wrk_duration("450.00us"), Some(450e-6));
        assert_eq!(wrk_duration("2.00s"), Some(2.0));
        assert_eq!(wrk_duration("1.50m"), Some(90.0));
        assert_eq!(wrk_duration("3"), None);
        assert_eq!(wrk_duration("3.0x"), None);
    }

    #[test]
    fn wrk_errors_are_an_error() {
        let out = "     99%    1.50ms\n  60000 requests in 2.00s, 7.00MB read\n  \
                   Socket errors: connect 0, read 3, write 0, timeout 0\n";
        assert!(wrk(out).is_err());
        assert!(wrk("nothing\n").is_err());
    }

    #[test]
    fn result_lines_give_a_sample() {
        let out = "connected 64\nresult ops=1000 elapsed_ns=2000000000 p99_ns=150000 polls=3000\n";
        let sample = result_in(out).unwrap();
        assert_eq!(sample.ops, 1000.0);
        assert_eq!(sample.seconds, 2.0);
        assert_eq!(sample.p99_ns, 150000.0);
        assert_eq!(sample.workload_polls, 3000.0);
        let error = format!("{:#}", result("result ops=1 elapsed_ns=2").unwrap_err());
        assert!(error.contains("no p99_ns"), "{error}");
        assert!(result_in("no result\n").is_err());
    }

    #[test]
    fn bpftrace_exit_lines_are_read() {
        let out =
            "Attaching 12 probes...\nLost 10 events\nLost 5 events\n\n@polls: 1234\n\n@wakes: 99\n";
        assert_eq!(bpftrace_lost(out), 15.0);
        assert_eq!(bpftrace_polls(out), Some(1234.0));
        let none = bpftrace_lost("@polls: 3\n");
        assert_eq!(none, 0.0);
        assert!(none.is_sign_positive(), "{none}");
        assert_eq!(bpftrace_polls("ready\n"), None);
    }
}
