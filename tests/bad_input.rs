//! Bad input gets a clear, specific error, a non-zero exit, and no file.

use test_support::{self as support, trace};

use std::os::unix::process::CommandExt;
use std::process::Command;

use support::Profile;
use trace::{Fixture, describe, require_root, run, scratch_dir, tracer};

/// Runs the tracer expecting failure; returns stderr.
fn expect_failure(command: &mut Command, output: &std::path::Path) -> String {
    let result = run(command);
    assert!(
        !result.status.success(),
        "expected failure\n{}",
        describe(&result)
    );
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(
        stderr.starts_with("error: "),
        "no clear error:\n{}",
        describe(&result)
    );
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    assert!(
        !output.exists(),
        "a trace file was left at {}",
        output.display()
    );
    let partial = output.with_file_name(format!(
        "{}.partial",
        output.file_name().unwrap().to_string_lossy()
    ));
    assert!(!partial.exists(), "a partial file was left behind");
    stderr
}

#[test]
fn no_such_pid() {
    require_root();
    let dir = scratch_dir("no-such-pid");
    let output = dir.join("trace.pftrace");
    // pid_max is at most 4194304: this pid can't exist.
    let stderr = expect_failure(
        tracer().args(["--pid", "4194304", "-o"]).arg(&output),
        &output,
    );
    assert!(stderr.contains("no process with pid 4194304"), "{stderr}");
}

#[test]
fn not_root() {
    require_root();
    let dir = scratch_dir("not-root");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let output = dir.join("trace.pftrace");
    let fixture = Fixture::start("multi_worker", Profile::Release, 30.0);
    let mut command = tracer();
    command
        .args(["--pid", &fixture.pid().to_string(), "-o"])
        .arg(&output)
        .uid(65534)
        .gid(65534);
    let stderr = expect_failure(&mut command, &output);
    assert!(stderr.contains("needs root"), "{stderr}");
}

#[test]
fn not_a_tokio_program() {
    require_root();
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let dir = scratch_dir("not-tokio");
    let output = dir.join("trace.pftrace");
    let stderr = expect_failure(
        tracer()
            .args(["--pid", &sleeper.id().to_string(), "-o"])
            .arg(&output),
        &output,
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert!(
        stderr.contains("does not look like a tokio program") || stderr.contains("stripped"),
        "{stderr}"
    );
}

#[test]
fn stripped_binary() {
    require_root();
    let dir = scratch_dir("stripped");
    let stripped = dir.join("multi_worker_stripped");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(support::fixture("multi_worker", Profile::Release))
        .status()
        .expect("run strip");
    assert!(status.success());
    let mut target = Command::new(&stripped)
        .arg("30")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let output = dir.join("trace.pftrace");
    let stderr = expect_failure(
        tracer()
            .args(["--pid", &target.id().to_string(), "-o"])
            .arg(&output),
        &output,
    );
    target.kill().unwrap();
    target.wait().unwrap();
    assert!(stderr.contains("stripped"), "{stderr}");
}

#[test]
fn output_not_writable() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 30.0);
    let output = std::path::PathBuf::from("/nonexistent-dir/trace.pftrace");
    let stderr = expect_failure(
        tracer()
            .args(["--pid", &fixture.pid().to_string(), "-o"])
            .arg(&output),
        &output,
    );
    assert!(
        stderr.contains("/nonexistent-dir/trace.pftrace"),
        "{stderr}"
    );
}

#[test]
fn command_that_does_not_exist() {
    require_root();
    let dir = scratch_dir("no-command");
    let output = dir.join("trace.pftrace");
    let stderr = expect_failure(
        tracer()
            .arg("-o")
            .arg(&output)
            .arg("--")
            .arg("./no-such-program"),
        &output,
    );
    assert!(stderr.contains("no-such-program"), "{stderr}");
}

#[test]
fn nothing_to_trace() {
    let dir = scratch_dir("nothing");
    let output = dir.join("trace.pftrace");
    let stderr = expect_failure(tracer().arg("-o").arg(&output), &output);
    assert!(stderr.contains("nothing to trace"), "{stderr}");
}

#[test]
fn target_exits_during_attach() {
    require_root();
    // A target that lives only a moment: depending on timing the tracer
    // either sees it go while attaching (a clear error, no file) or right
    // after (a complete, possibly empty trace). Never a panic or a partial file.
    let _turn = trace::tracer_turn();
    let fixture = Fixture::start("current_thread", Profile::Release, 0.05);
    let dir = scratch_dir("exit-during-attach");
    let output = dir.join("trace.pftrace");
    let result = trace::run_holding_turn(
        tracer()
            .args(["--pid", &fixture.pid().to_string(), "-o"])
            .arg(&output),
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!stderr.contains("panicked"), "{}", describe(&result));
    assert!(!dir.join("trace.pftrace.partial").exists());
    if result.status.success() {
        trace::Trace::load(&output);
    } else {
        assert!(
            stderr.contains("exited") || stderr.contains("no process"),
            "{}",
            describe(&result)
        );
        assert!(!output.exists());
    }
}

/// Runs the tracer with `args` and checks it failed cleanly: exit code 2
/// (clap's usage error) or 1 (our own error), a message, no panic.
fn fails_cleanly(args: &[&str]) -> String {
    let result = trace::wait_with_limit(
        tracer()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        std::time::Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(
        matches!(result.status.code(), Some(1 | 2)),
        "{args:?}: {}",
        describe(&result)
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(stderr.contains("error"), "{args:?}: {}", describe(&result));
    stderr
}

#[test]
fn no_option_value_panics() {
    // The pid can't exist, so a value that is accepted fails right after.
    let base = ["--pid", "4194304", "-o", "/nonexistent-dir/trace.json"];
    let numbers = [
        "1e20",
        "1e308",
        "-1e20",
        "inf",
        "-inf",
        "NaN",
        "-1",
        "0",
        "-0",
        "1e-20",
        "",
        " ",
        "18446744073709551616",
        "99999999999999999999999h",
        "4294967296K",
        "9223372036854775807s",
        "1e15",
        "1.5.5",
        "0x10",
        "16MM",
        "1GiGiB",
        "٣",
        "9999999999999999999999999999999G",
    ];
    let options = [
        "--duration",
        "--min-poll",
        "--ring-buffer-size",
        "--stack-size",
        "--sample-hz",
        "--max-size",
        "--pid",
    ];
    for option in options {
        for value in numbers {
            let mut args: Vec<&str> = base.to_vec();
            if option == "--pid" {
                args.drain(..2);
            }
            args.extend([option, value]);
            fails_cleanly(&args);
        }
    }
    for args in [
        &["--pid", "4194304", "-o", ""][..],
        &["--pid", "4194304", "--folded", ""],
        &["--pid", "4194304", "--mode", "nonsense"],
        &["probes"],
        &["probes", "--binary", ""],
        &["probes", "--pid", "0"],
        &["probes", "--pid", "4194304"],
    ] {
        fails_cleanly(args);
    }
}

#[test]
fn probes_needs_a_regular_file() {
    let dir = scratch_dir("probes-special-files");
    let fifo = dir.join("fifo");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    for binary in ["/dev/zero", fifo.to_str().unwrap(), dir.to_str().unwrap()] {
        let stderr = fails_cleanly(&["probes", "--binary", binary]);
        assert!(stderr.contains(binary), "{stderr}");
        assert!(stderr.contains("not a regular file"), "{stderr}");
    }
}

/// Runs `command` with every capability dropped except `keep`.
fn with_only_capabilities(keep: &[&str], command: &[&str]) -> Command {
    let script = command
        .iter()
        .map(|arg| format!("'{arg}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let drop: Vec<String> = (0..=last_cap)
        .map(|cap| format!("{cap}"))
        .filter(|cap| !keep.contains(&cap.as_str()))
        .collect();
    let mut capsh = Command::new("capsh");
    capsh
        .arg(format!("--drop={}", drop.join(",")))
        .args(["--", "-c", &script]);
    capsh
}

#[test]
fn a_missing_capability_is_named_before_anything_is_attached() {
    require_root();
    // Long-lived: the test may wait a while for its turns at tracing.
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("capabilities");
    let output = dir.join("trace.json");
    let exe = env!("CARGO_BIN_EXE_rt-ebpf-trace");
    let pid = fixture.pid().to_string();
    let record = [
        exe,
        "--pid",
        &pid,
        "-d",
        "1s",
        "-v",
        "-o",
        output.to_str().unwrap(),
    ];
    // CAP_BPF (39) and CAP_PERFMON (38) are not enough on this kernel; the
    // uprobe perf events need CAP_SYS_ADMIN (21).
    let stderr = expect_failure(
        &mut with_only_capabilities(&["38", "39", "19"], &record),
        &output,
    );
    assert!(stderr.contains("CAP_SYS_ADMIN"), "{stderr}");
    assert!(!stderr.contains("could not attach"), "{stderr}");
    // Another user's process (this one has capabilities the tracer lacks):
    // reading its executable needs CAP_SYS_PTRACE (19).
    let stderr = expect_failure(&mut with_only_capabilities(&["21"], &record), &output);
    assert!(stderr.contains("CAP_SYS_PTRACE"), "{stderr}");
    // CAP_SYS_ADMIN and CAP_SYS_PTRACE are enough.
    let result = run(&mut with_only_capabilities(&["21", "19"], &record));
    assert!(result.status.success(), "{}", describe(&result));
    trace::Trace::load(&output);
}
