//! The `rt-ebpf-trace` command: a thin layer over the library crates.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;
use rt_ebpf_trace::record::{self, Mode, RecordOptions, Settings, TargetSpec};

use cli::{Cli, Command, DumpArgs, ModeArg, ProbesArgs, RecordArgs, WatchArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();

    let result = match cli.command {
        Some(Command::Probes(args)) => list_probes(args),
        Some(Command::Dump(args)) => dump_tasks(args),
        Some(Command::Watch(args)) => run_watch(args),
        None => run_record(cli.record),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn list_probes(args: ProbesArgs) -> Result<ExitCode> {
    let binary = match (args.pid, args.binary) {
        (Some(pid), _) => {
            let exe = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("no process with pid {pid}");
            }
            exe
        }
        (None, Some(binary)) => binary,
        (None, None) => bail!("give --pid PID or --binary PATH"),
    };
    let plan = tracer_probes::discover(&binary)?;
    let mut stdout = std::io::stdout().lock();
    tracer_probes::write_table(&plan, &mut stdout)?;
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Whether `path` is the file our stdout is (`-o /dev/stdout`, or the file
/// stdout is redirected to).
fn is_our_stdout(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(file) = std::fs::metadata(path) else {
        return false;
    };
    let stdout = std::io::stdout();
    let Ok(ours) = std::os::fd::AsFd::as_fd(&stdout).try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(ours)
        .metadata()
        .is_ok_and(|ours| ours.dev() == file.dev() && ours.ino() == file.ino())
}

/// The last line: how to look at the trace. Under sudo the trace sits in
/// a root session's directory but the browser runs as the user.
fn how_to_open(output: &std::path::Path) -> String {
    let shown = output.display();
    match std::env::var("SUDO_USER") {
        Ok(user) if !user.is_empty() => format!(
            "open {shown} at https://ui.perfetto.dev (Open trace file) as {user}, or rerun with --open to load it from this tracer"
        ),
        _ => format!(
            "open {shown} at https://ui.perfetto.dev (Open trace file), or rerun with --open"
        ),
    }
}

fn dump_tasks(args: DumpArgs) -> Result<ExitCode> {
    let dump = rt_ebpf_trace::dump::dump(args.pid)?;
    log::info!(
        "dump: setup {:.1} ms (binary and debug info), scan and read {:.1} ms ({} bytes in {} regions)",
        dump.setup_ms,
        dump.read_ms,
        dump.stats.bytes,
        dump.stats.regions
    );
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &rt_ebpf_trace::dump::output::json(&dump))?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{}", rt_ebpf_trace::dump::output::text(&dump))?;
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn run_record(args: RecordArgs) -> Result<ExitCode> {
    if args.dump_at_end && args.pid.is_none() {
        bail!("--dump-at-end needs --pid: a launched command is stopped when recording ends");
    }
    let dump_at_end = args.dump_at_end.then_some(args.pid).flatten();
    let target = match (args.pid, args.command.is_empty()) {
        (Some(_), false) => bail!("give either --pid or a command after --, not both"),
        (Some(pid), true) => TargetSpec::Pid(pid),
        (None, false) => TargetSpec::Command(args.command),
        (None, true) => {
            bail!("nothing to trace: give --pid PID, or a command after -- (see --help)")
        }
    };
    let mode = match args.mode {
        ModeArg::Full => Mode::Full,
        ModeArg::Light => Mode::Light,
        ModeArg::Polls => Mode::Polls,
    };
    // Light mode is for always-on use: only polls long enough to matter.
    let default_min_poll = match mode {
        Mode::Full | Mode::Polls => std::time::Duration::ZERO,
        Mode::Light => std::time::Duration::from_millis(1),
    };
    // Bind before recording, so a busy port fails before anything runs.
    let server = if args.open {
        Some(rt_ebpf_trace::serve::bind(rt_ebpf_trace::serve::PORT)?)
    } else {
        None
    };
    // The first output is the one the summary names and `--open` serves.
    let output = args.output[0].clone();
    let trace_on_stdout = args.output.iter().any(|path| is_our_stdout(path));
    let sample_hz = (!args.no_samples && mode != Mode::Polls).then_some(args.sample_hz);
    let options = RecordOptions {
        target,
        output: args.output,
        duration: args.duration,
        mode,
        settings: Settings {
            ring_bytes: args.ring_buffer_size,
            min_poll: args.min_poll.unwrap_or(default_min_poll),
            // Stacks are captured at await points (full mode) and by samples.
            stack_bytes: if mode == Mode::Full || sample_hz.is_some() {
                args.stack_size
            } else {
                0
            },
        },
        sample_hz,
        folded: args.folded,
        summary_json: args.summary_json,
        max_size: args.max_size,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(record::record(options))?;
    // The report goes where the trace doesn't: a trace written to our own
    // stdout (`-o /dev/stdout`) stays whole, the text goes to stderr.
    let mut out: Box<dyn Write> = if trace_on_stdout {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    writeln!(out, "{}", outcome.summary)?;
    if outcome.short_polls > 0 {
        writeln!(
            out,
            "{} polls shorter than --min-poll were counted in the kernel and not recorded",
            outcome.short_polls
        )?;
    }
    for (path, bytes) in &outcome.also_written {
        writeln!(
            out,
            "also written: {} ({})",
            path.display(),
            tracer_timeline::units::human_bytes(*bytes)
        )?;
    }
    writeln!(out, "stopped: {}", outcome.stop)?;
    if let Some(status) = outcome.command_status {
        writeln!(out, "command exited: {status}")?;
    }
    if let Some(pid) = dump_at_end {
        match rt_ebpf_trace::dump::dump(pid) {
            Ok(dump) => write!(
                out,
                "\ntasks at the end: {}",
                rt_ebpf_trace::dump::output::text(&dump)
            )?,
            Err(err) => writeln!(out, "\ntasks at the end: not read ({err:#})")?,
        }
    }
    // The trace is complete; the probes are still being removed.
    let _ = out.flush();
    let _ = outcome.detaching.join();
    match server {
        Some(server) => {
            let name = output
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            writeln!(
                out,
                "open {} (serving the trace on 127.0.0.1:{} until the UI has fetched it; Ctrl-C to stop)",
                rt_ebpf_trace::serve::ui_link(&name, rt_ebpf_trace::serve::PORT),
                rt_ebpf_trace::serve::PORT
            )?;
            let _ = out.flush();
            rt_ebpf_trace::serve::serve(&server, &output)?;
        }
        None => writeln!(out, "{}", how_to_open(&output))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn run_watch(args: WatchArgs) -> Result<ExitCode> {
    let options = rt_ebpf_trace::watch::WatchOptions {
        pid: args.pid,
        output: args.output,
        duration: args.duration,
        keep: args.keep,
        keep_memory: args.keep_memory,
        sample_hz: args.sample_hz,
        blocking: args.blocking,
        hog: args.hog,
        stack_bytes: args.stack_size,
        quiet: args.quiet,
        detail: args.detail,
        on_hog: args.on_hog,
        on_blocking: args.on_blocking,
        max_incidents: args.max_incidents,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(rt_ebpf_trace::watch::watch(options))?;
    println!(
        "stopped: {}; findings: {} blocking, {} hogs; incidents: {} ({} triggers ignored); peak kept memory {:.1} MiB",
        outcome.stop,
        outcome.blocking,
        outcome.hogs,
        outcome.incidents,
        outcome.ignored_triggers,
        outcome.peak_kept_bytes as f64 / (1u64 << 20) as f64
    );
    let _ = std::io::stdout().flush();
    let _ = outcome.detaching.join();
    Ok(ExitCode::SUCCESS)
}
