//! Bad input gets a clear, specific error, a non-zero exit, and no file.

mod support;
#[path = "support/trace.rs"]
mod trace;

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
