//! CPU time, memory and exits of the processes a run starts, read from
//! /proc. Every process is a child of ours, so its CPU time is read
//! exactly: the kernel adds a child's utime+stime to our `cutime`+`cstime`
//! when we reap it. Peak memory is sampled (VmHWM every 20 ms).

use std::fs;
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Clock ticks per second of /proc's CPU times: USER_HZ, 100 on Linux.
pub(super) const TICKS_PER_SECOND: f64 = 100.0;

/// utime+stime of our reaped children, in seconds (/proc/self/stat fields
/// 16 and 17).
pub(super) fn children_cpu() -> Result<f64> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    stat_cpu(&stat, 13).context("reading /proc/self/stat")
}

/// utime+stime of a live process, in seconds; 0 if it is gone.
pub(super) fn process_cpu(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_cpu(&stat, 11))
        .unwrap_or(0.0)
}

/// The sum of two consecutive CPU time fields of a stat line, `first`
/// counting from after the command name (which may hold spaces).
fn stat_cpu(stat: &str, first: usize) -> Option<f64> {
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks =
        fields.get(first)?.parse::<f64>().ok()? + fields.get(first + 1)?.parse::<f64>().ok()?;
    Some(ticks / TICKS_PER_SECOND)
}

/// The CPUs this process may run on.
pub(super) fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// The highest VmHWM seen while the process lives, in KiB. It is sampled,
/// so a peak in the last few milliseconds before the exit may be missed.
pub(super) fn sample_peak_rss(pid: u32) -> f64 {
    let mut peak = 0.0_f64;
    while let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        match hwm {
            Some(kib) => peak = peak.max(kib),
            None => break, // a zombie: its memory is gone
        }
        thread::sleep(Duration::from_millis(20));
    }
    peak
}

/// Waits for a child's exit, killing it after `timeout`.
pub(super) fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            return Ok(child.wait()?);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_skips_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime
        let stat = "42 (a b) S 1 1 1 0 -1 0 0 0 0 0 150 50 7 3 20 0";
        assert_eq!(stat_cpu(stat, 11), Some(2.0));
        assert_eq!(stat_cpu(stat, 13), Some(0.1));
    }
}
