//! What the tracer, running as root, does to the file system: it writes
//! only what it was asked to write, never follows a planted name, never
//! replaces a device or FIFO, checks every output path before attaching, and
//! leaves its files private to the user who asked for them.

use test_support::{self as support, trace};

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, symlink};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use support::Profile;
use trace::{Fixture, Trace, describe, require_root, run, scratch_dir, tracer};

/// The tracer, tracing `fixture` for a moment.
fn short_trace(fixture: &Fixture) -> Command {
    let mut command = tracer();
    command.args(["--pid", &fixture.pid().to_string(), "-d", "1s"]);
    command
}

fn mknod(path: &Path, mode: libc::mode_t, major: u32, minor: u32) {
    let name = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    let rc = unsafe { libc::mknod(name.as_ptr(), mode | 0o666, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod {}", path.display());
}

fn mkfifo(path: &Path) {
    let name = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o666) }, 0);
}

/// Reads what is written into a FIFO until its writer closes it, or, if
/// nothing ever came, until the tracer is done (a tracer that replaced the
/// FIFO never writes into it).
fn read_fifo(fifo: &Path, tracer_done: &AtomicBool) -> Vec<u8> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: opening a FIFO for reading waits for a writer.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .unwrap();
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 1 << 16];
    loop {
        match file.read(&mut buffer) {
            Ok(0) if !bytes.is_empty() => break,
            Ok(0) if tracer_done.load(Ordering::Relaxed) => break,
            Ok(0) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(err) => panic!("reading the FIFO: {err}"),
        }
    }
    bytes
}

/// Decodes a Perfetto trace that arrived as bytes (through a FIFO or
/// stdout), from a copy outside the test's directory.
fn load_trace_bytes(bytes: &[u8], name: &str) -> Trace {
    let copy = scratch_dir(&format!("{name}-copy")).join("trace.pftrace");
    std::fs::write(&copy, bytes).unwrap();
    Trace::load(&copy)
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn planted_symlinks_redirect_nothing_and_outputs_are_private_to_the_sudo_user() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("planted-symlinks");
    let victims = scratch_dir("planted-symlinks-victims");
    // A user who owns the working directory plants names the tracer might
    // create, pointing at files root can write and they can't.
    let planted = [
        "trace.json",
        "trace.json.partial",
        "trace.json.partial2",
        "folded.txt",
        "folded.txt.partial",
    ];
    for name in planted {
        let victim = victims.join(name);
        std::fs::write(&victim, "precious").unwrap();
        symlink(&victim, dir.join(name)).unwrap();
    }
    let output = dir.join("trace.json");
    let folded = dir.join("folded.txt");
    let result = run(short_trace(&fixture)
        .arg("-o")
        .arg(&output)
        .arg("--folded")
        .arg(&folded)
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65533"));
    assert!(result.status.success(), "{}", describe(&result));
    for name in planted {
        assert_eq!(
            std::fs::read_to_string(victims.join(name)).unwrap(),
            "precious",
            "the tracer wrote through the planted {name}"
        );
    }
    for path in [&output, &folded] {
        let meta = std::fs::symlink_metadata(path).unwrap();
        assert!(
            meta.file_type().is_file(),
            "{} is not a regular file",
            path.display()
        );
        assert_eq!(meta.mode() & 0o777, 0o600, "{} mode", path.display());
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65534, 65533),
            "{}",
            path.display()
        );
    }
    Trace::load(&output);
    // The planted temporary names are still the user's symlinks, untouched;
    // nothing else was left.
    assert_eq!(
        names_in(&dir),
        [
            "folded.txt",
            "folded.txt.partial",
            "trace.json",
            "trace.json.partial",
            "trace.json.partial2"
        ]
    );
}

#[test]
fn devices_and_fifos_are_written_into_never_replaced() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("special-outputs");
    // A device like /dev/null, made here so a bug can't break the machine's.
    let null = dir.join("null");
    mknod(&null, libc::S_IFCHR, 1, 3);
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let tracer_done = Arc::new(AtomicBool::new(false));
    let reader = {
        let fifo = fifo.clone();
        let tracer_done = tracer_done.clone();
        std::thread::spawn(move || read_fifo(&fifo, &tracer_done))
    };
    let result = run(short_trace(&fixture)
        .arg("-o")
        .arg(&fifo)
        .arg("--folded")
        .arg(&null));
    tracer_done.store(true, Ordering::Relaxed);
    let bytes = reader.join().unwrap();
    assert!(result.status.success(), "{}", describe(&result));
    // A whole Perfetto trace (no `.json` name: the default format).
    let trace = load_trace_bytes(&bytes, "fifo");
    assert!(!trace.polls().is_empty(), "no polls through the FIFO");
    let null_meta = std::fs::symlink_metadata(&null).unwrap();
    assert!(
        null_meta.file_type().is_char_device(),
        "the device was replaced"
    );
    assert_eq!(null_meta.rdev(), libc::makedev(1, 3));
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(names_in(&dir), ["fifo", "null"]);
}

#[test]
fn the_trace_can_go_to_stdout() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("stdout");
    // `> out.txt`: stdout is a regular file in another directory.
    let out = dir.join("out.txt");
    let _turn = trace::tracer_turn();
    let child = short_trace(&fixture)
        .args(["-o", "/dev/stdout"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let result = trace::wait_with_limit(child, std::time::Duration::from_secs(120));
    assert!(result.status.success(), "{}", describe(&result));
    // The trace alone on stdout (it would not be whole with text after
    // it); the summary on stderr.
    let trace = load_trace_bytes(&std::fs::read(&out).unwrap(), "stdout");
    assert!(!trace.polls().is_empty(), "no polls on stdout");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("stopped:"), "{stderr}");
    let link = std::fs::symlink_metadata("/dev/stdout").unwrap();
    assert!(link.file_type().is_symlink(), "/dev/stdout was replaced");
    assert_eq!(names_in(&dir), ["out.txt"]);
}

#[test]
fn a_block_device_is_refused_before_attaching() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("block-device");
    let disk = dir.join("disk");
    mknod(&disk, libc::S_IFBLK, 7, 0);
    let result = run(short_trace(&fixture).arg("-o").arg(&disk));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{}", describe(&result));
    assert!(stderr.contains("block device"), "{}", describe(&result));
    assert!(stderr.contains(&*disk.to_string_lossy()), "{stderr}");
    assert!(
        std::fs::symlink_metadata(&disk)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    assert_eq!(names_in(&dir), ["disk"]);
}

#[test]
fn bad_output_paths_are_refused_before_attaching() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("bad-output-paths");
    let too_long = dir.join(format!("{}.json", "t".repeat(252)));
    let a_directory = dir.join("a-directory");
    std::fs::create_dir(&a_directory).unwrap();
    let cases: [(&str, &Path, &str); 3] = [
        ("--folded", &a_directory, "is a directory"),
        (
            "--folded",
            Path::new("/nonexistent-dir/folded.txt"),
            "/nonexistent-dir",
        ),
        ("-o", &too_long, "name is too long"),
    ];
    for (option, path, expected) in cases {
        let mut command = tracer();
        command.args(["--pid", &fixture.pid().to_string(), "-d", "30s", "-v"]);
        if option != "-o" {
            command.arg("-o").arg(dir.join("trace.json"));
        }
        let result = run(command.arg(option).arg(path));
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(
            !result.status.success(),
            "{option} {}: {}",
            path.display(),
            describe(&result)
        );
        assert!(stderr.contains(expected), "{option}: {}", describe(&result));
        assert!(stderr.contains(&*path.to_string_lossy()), "{stderr}");
        // Found before any probe was attached, so nothing was recorded.
        assert!(
            !stderr.contains("attached"),
            "{option}: {}",
            describe(&result)
        );
    }
    assert_eq!(names_in(&dir), ["a-directory"]);
}

#[test]
fn a_name_near_the_length_limit_is_written() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("long-name");
    // 255 bytes: the longest name the file system takes.
    let output = dir.join(format!("{}.json", "t".repeat(250)));
    let result = run(short_trace(&fixture).arg("-o").arg(&output));
    assert!(result.status.success(), "{}", describe(&result));
    Trace::load(&output);
    assert_eq!(names_in(&dir).len(), 1);
}

#[test]
fn max_size_stops_recording_with_a_whole_trace() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("max-size");
    let output = dir.join("trace.json");
    let result = run(tracer()
        .args(["--pid", &fixture.pid().to_string(), "-d", "60s"])
        .args(["--max-size", "2M", "-o"])
        .arg(&output));
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains("stopped: the trace reached --max-size"),
        "{stdout}"
    );
    let trace = Trace::load(&output);
    assert!(!trace.polls().is_empty());
    let bytes = std::fs::metadata(&output).unwrap().len();
    // The bound is checked against an estimate, between drains.
    assert!(bytes < 4 << 20, "{bytes} bytes for --max-size 2M");
}

/// `-o t.pftrace -o t.json`: one recording rendered into both formats.
/// They must tell the same story: the same polls, the same wakes (the
/// protobuf's wake instants name their task through the flow, which the
/// checker follows), and the same flows — every JSON flow end is a
/// protobuf flow end on a thread; the protobuf also ends, on the process
/// track, the flows JSON leaves open (tasks not polled again).
#[test]
fn one_recording_into_both_formats_has_the_same_flows() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("both-formats");
    let (pftrace, json) = (dir.join("t.pftrace"), dir.join("t.json"));
    let result = run(short_trace(&fixture)
        .arg("-o")
        .arg(&pftrace)
        .arg("-o")
        .arg(&json));
    assert!(result.status.success(), "{}", describe(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("also written:"), "{stdout}");
    let (proto, json) = (Trace::load(&pftrace), Trace::load(&json));

    let count = |trace: &Trace, keep: &dyn Fn(&serde_json::Value) -> bool| {
        trace.events().iter().filter(|e| keep(e)).count()
    };
    let flow_starts = |e: &serde_json::Value| e["ph"] == "s";
    let flow_ends_on_threads = |e: &serde_json::Value| e["ph"] == "f" && e["tid"] != 0;
    let starts = count(&json, &flow_starts);
    assert!(
        starts > 50,
        "only {starts} flows in a second of multi_worker"
    );
    assert_eq!(count(&proto, &flow_starts), starts, "flow starts");
    assert_eq!(
        count(&proto, &flow_ends_on_threads),
        count(&json, &|e| e["ph"] == "f"),
        "flow ends at polls"
    );
    assert_eq!(proto.polls().len(), json.polls().len(), "polls");
    assert_eq!(proto.parks().len(), json.parks().len(), "parks");

    // Wakes outside a poll (the timer driver's, here): JSON writes an
    // instant naming the task; so does the protobuf, the task's id being
    // put back from the poll its flow ends at. That poll may know an id the
    // wake did not (JSON writes null then), so JSON's ids are a part of
    // the protobuf's.
    let woken = |trace: &Trace| -> Vec<Option<u64>> {
        let mut ids: Vec<Option<u64>> = trace
            .events()
            .iter()
            .filter(|e| e["ph"] == "i" && e["cat"] == "wake" && e["args"]["waker"].is_string())
            .map(|e| e["args"]["task_id"].as_u64())
            .collect();
        ids.sort_unstable();
        ids
    };
    let (json_woken, mut proto_woken) = (woken(&json), woken(&proto));
    assert!(json_woken.iter().flatten().count() > 10, "driver wakes");
    assert_eq!(proto_woken.len(), json_woken.len(), "wake instants");
    for id in json_woken.iter().filter(|id| id.is_some()) {
        let at = proto_woken
            .iter()
            .position(|proto| proto == id)
            .unwrap_or_else(|| {
                panic!("the JSON trace's wake of task {id:?} is not in the protobuf's")
            });
        proto_woken.swap_remove(at);
    }
    assert_eq!(
        proto.metadata()["events"],
        json.metadata()["events"],
        "one recording"
    );
    let mut names = names_in(&dir);
    names.sort();
    assert_eq!(names, ["t.json", "t.pftrace"]);
}

#[test]
fn the_same_output_twice_is_refused_before_attaching() {
    require_root();
    let fixture = Fixture::start("multi_worker", Profile::Release, 600.0);
    let dir = scratch_dir("output-twice");
    let output = dir.join("t.pftrace");
    let result = run(short_trace(&fixture)
        .arg("-v")
        .arg("-o")
        .arg(&output)
        .arg("-o")
        .arg(dir.join(".").join("t.pftrace")));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{}", describe(&result));
    assert!(stderr.contains("given twice"), "{}", describe(&result));
    assert!(!stderr.contains("attached"), "{}", describe(&result));
    assert!(names_in(&dir).is_empty());
}
