//! Command-line arguments.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Trace the tokio runtime inside an unmodified, running Rust binary.
///
/// Attaches eBPF uprobes to tokio's task poll and worker park functions and
/// writes a trace that ui.perfetto.dev opens: which worker polled which task,
/// for how long, and when workers parked. Needs root (CAP_SYS_ADMIN).
#[derive(Parser, Debug)]
#[command(
    name = "rt-ebpf-trace",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  sudo rt-ebpf-trace --pid 1234\n  sudo rt-ebpf-trace --open --duration 10s -- ./my-app --flag\n  sudo rt-ebpf-trace --pid 1234 -o trace.json.gz\n  rt-ebpf-trace probes --binary ./my-app\n  sudo rt-ebpf-trace dump --pid 1234"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub record: RecordArgs,

    /// More log output (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the probe points found in a binary, without tracing anything.
    Probes(ProbesArgs),
    /// List the live tasks of a running tokio process and where each one
    /// waits (its await chain), without stopping it or writing to it.
    Dump(DumpArgs),
    /// Always on: watch a running process with no per-poll probe (CPU
    /// samples, parks, blocking switches), print findings and per-second
    /// health, and keep the last --keep seconds for a trace on SIGUSR1 and
    /// at exit.
    Watch(WatchArgs),
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// The process to dump.
    #[arg(short, long)]
    pub pid: u32,
    /// Print every task as JSON instead of the grouped text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Watch this running process.
    #[arg(short, long)]
    pub pid: u32,

    /// Where the kept window is written at exit: Perfetto protobuf, or
    /// Chrome JSON for a name ending in `.json` (gzipped for `.gz`). On
    /// SIGUSR1 it goes to FILE with `.usr1-N` before the extension.
    #[arg(short, long, default_value = "watch.pftrace")]
    pub output: PathBuf,

    /// Stop after this long; otherwise on Ctrl-C, SIGTERM, or the target's exit.
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// How much recent history to keep in memory for the trace.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub keep: Duration,

    /// At most this much memory for the kept history (oldest dropped first).
    #[arg(long, default_value = "64M", value_parser = parse_memory_size)]
    pub keep_memory: u64,

    /// CPU samples per second per CPU (each costs the sampled thread a
    /// stack copy: the watch tier's main cost).
    #[arg(long, default_value_t = 199, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub sample_hz: u64,

    /// Report a worker off CPU (asleep, not parked) at least this long as BLOCKING.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub blocking: Duration,

    /// Report a task type seen on one worker across samples at least this
    /// far apart, with no park in between, as HOG.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub hog: Duration,

    /// Bytes of user stack copied per capture.
    #[arg(long, default_value = "16K", value_parser = parse_stack_size)]
    pub stack_size: u32,

    /// No per-second health line on the terminal (findings are still printed).
    #[arg(long)]
    pub quiet: bool,

    /// Escalation: on a trigger, attach the full probes for this long and
    /// write one incident trace (FILE's stem with `.incident-N.pftrace`, or
    /// `.json` for a JSON FILE): the kept window before the trigger, then
    /// the full detail. SIGUSR1 is then a trigger too. Default 5s when
    /// --on-hog or --on-blocking is given.
    #[arg(long, value_parser = parse_duration)]
    pub detail: Option<Duration>,

    /// Escalate on a hog at least this long (e.g. 50ms).
    #[arg(long, value_parser = parse_duration)]
    pub on_hog: Option<Duration>,

    /// Escalate on a worker blocked at least this long (e.g. 10ms).
    #[arg(long, value_parser = parse_duration)]
    pub on_blocking: Option<Duration>,

    /// At most this many incident traces; later triggers are ignored.
    #[arg(long, default_value_t = 10)]
    pub max_incidents: u32,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct ProbesArgs {
    /// The executable of this running process.
    #[arg(long)]
    pub pid: Option<u32>,
    /// This executable file.
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RecordArgs {
    /// Trace this running process.
    #[arg(short, long)]
    pub pid: Option<u32>,

    /// Where to write the trace: Perfetto's native format (`.pftrace`), or
    /// Chrome JSON when the name ends in `.json`; gzipped when it ends in
    /// `.gz` (e.g. `trace.pftrace.gz`). Open it at ui.perfetto.dev. Repeat
    /// to write the same recording in several formats (`-o t.pftrace -o
    /// t.json`); the first is the one `--open` serves.
    #[arg(short, long, default_value = "trace.pftrace")]
    pub output: Vec<PathBuf>,

    /// When the trace is written, serve it on 127.0.0.1:9001 and print the
    /// ui.perfetto.dev link that loads it (until the UI has fetched it).
    #[arg(long)]
    pub open: bool,

    /// Stop after this long (e.g. 10s, 500ms, 2m); otherwise on Ctrl-C,
    /// SIGTERM, or when the target exits.
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// What to record: `full` (every poll and park, plus spawns, wakes, task
    /// ends, await points and CPU samples), `light` (parks, polls longer
    /// than --min-poll (default 1ms) and CPU samples, for always-on use), or
    /// `polls` (every poll and nothing else: the cheapest complete poll
    /// timeline).
    #[arg(long, value_enum, default_value_t = ModeArg::Full)]
    pub mode: ModeArg,

    /// Record only polls at least this long (e.g. 100us, 1ms); shorter ones
    /// are counted in the kernel and cost no ring-buffer traffic.
    #[arg(long, value_parser = parse_duration)]
    pub min_poll: Option<Duration>,

    /// CPU samples per second (per CPU) of the target's threads, each with
    /// its user stack, attributed to the task running at that moment.
    #[arg(long, default_value_t = 999, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub sample_hz: u64,

    /// Take no CPU samples.
    #[arg(long)]
    pub no_samples: bool,

    /// Bytes of user stack copied per capture (at most 16K); deeper frames
    /// are cut off.
    #[arg(long, default_value = "16K", value_parser = parse_stack_size)]
    pub stack_size: u32,

    /// Also write the CPU samples as folded stacks
    /// (`task;frame;…;frame count`), for flamegraph tools.
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,

    /// Also write the summary as JSON (workers, polls, tasks, scheduling
    /// delay, findings such as HOG and IMBALANCE), for scripts and CI gates.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,

    /// When recording stops, list the tasks still alive and where each one
    /// waits, as `dump` does (with `--pid` only: a launched command is
    /// stopped when recording ends).
    #[arg(long)]
    pub dump_at_end: bool,

    /// Size of the kernel-to-tracer ring buffer (e.g. 16M, 64MiB); rounded up
    /// to a power of two. Raise it if events are lost.
    #[arg(long, default_value = "16M", value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// Stop recording when the trace would reach about this size (e.g.
    /// 500M, 2G), with a whole trace and the summary saying why. The
    /// Perfetto UI opens JSON traces up to about 1 GB.
    #[arg(long, value_name = "SIZE", value_parser = parse_max_size)]
    pub max_size: Option<u64>,

    /// Launch this command and trace it from its first poll. If it is still
    /// running when tracing stops, it is sent SIGTERM.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Parses a stack capture size: 512 bytes to 16K, a multiple of 8.
/// A byte count with an optional K/M/G suffix (powers of 1024).
fn parse_memory_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("not a size: {text:?} (e.g. 64M)"))?;
    let factor: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("unknown size unit in {text:?} (use K, M or G)")),
    };
    let bytes = number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes < 1 << 20 {
        return Err(format!("{text:?} is too small: give at least 1M"));
    }
    Ok(bytes)
}

fn parse_stack_size(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let (number, multiplier) = match text.strip_suffix(['k', 'K']) {
        Some(number) => (number, 1024),
        None => (text, 1),
    };
    let bytes = number
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("'{text}' is not a size (try 16K)"))?;
    let max = tracer_common::STACK_BYTES_MAX as u32;
    if !(512..=max).contains(&bytes) {
        return Err(format!(
            "the stack size must be between 512 and {max} bytes"
        ));
    }
    Ok(bytes & !7)
}

/// Parses a file size: "500M", "2G", "1048576", 64K to 1T.
fn parse_max_size(text: &str) -> Result<u64, String> {
    match parse_bytes(text, "500M or 2G", true)? {
        Some(bytes) if (64 << 10..=1 << 40).contains(&bytes) => Ok(bytes),
        _ => Err(format!(
            "the size must be between 64K and 1T, not {}",
            text.trim()
        )),
    }
}

/// Parses a number of bytes with an optional unit (B, K, M, G and, where
/// `terabytes`, T; KB and KiB alike mean 1024): `None` when it overflows.
/// `example` is shown when `text` is not a size at all.
fn parse_bytes(text: &str, example: &str, terabytes: bool) -> Result<Option<u64>, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (try {example})"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" if terabytes => 1 << 40,
        other => {
            let units = if terabytes {
                "K, M, G or T"
            } else {
                "K, M or G"
            };
            return Err(format!("unknown size unit '{other}' (use {units})"));
        }
    };
    Ok(number.checked_mul(multiplier))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    Full,
    Light,
    Polls,
}

/// The longest duration taken: far beyond any trace, and far from where
/// adding it to a clock reading could overflow.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses "10s", "500ms", "2m" or a number of seconds ("1.5"), more than
/// zero and at most a year.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = match text.trim().parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("'{text}' is not a duration in seconds"))?,
        Err(_) => {
            humantime::parse_duration(text).map_err(|err| format!("{err} (try 10s, 500ms, 2m)"))?
        }
    };
    if duration.is_zero() {
        return Err("the duration must be more than zero".into());
    }
    if duration > MAX_DURATION {
        return Err("the duration must be at most a year (366d)".into());
    }
    Ok(duration)
}

/// Parses "16M", "64MiB", "1048576" into a power-of-two byte count that the
/// kernel accepts for a BPF ring buffer.
pub fn parse_ring_size(text: &str) -> Result<u32, String> {
    let bytes = parse_bytes(text, "16M", false)?.and_then(u64::checked_next_power_of_two);
    match bytes {
        Some(bytes) if (64 << 10..=1 << 30).contains(&bytes) => Ok(bytes as u32),
        _ => Err(format!(
            "ring buffer size must be between 64K and 1G, not {}",
            text.trim()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_round_up_to_powers_of_two() {
        assert_eq!(parse_ring_size("16M"), Ok(16 << 20));
        assert_eq!(parse_ring_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_ring_size("100k"), Ok(128 << 10));
        assert_eq!(parse_ring_size("1048576"), Ok(1 << 20));
        assert!(parse_ring_size("1k").is_err());
        assert!(parse_ring_size("2G").is_err());
        assert!(parse_ring_size("lots").is_err());
    }

    #[test]
    fn max_sizes_take_units() {
        assert_eq!(parse_max_size("2M"), Ok(2 << 20));
        assert_eq!(parse_max_size("1G"), Ok(1 << 30));
        for bad in ["1k", "2T", "99999999999999G", "lots", "-1M", ""] {
            assert!(parse_max_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_take_units_or_seconds() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        for huge in [
            "1e20",
            "1e308",
            "inf",
            "NaN",
            "-1",
            "400d",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
    }
}
