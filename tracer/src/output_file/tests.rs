use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use super::*;

/// A fresh directory of the test's own (`tempfile`), removed on drop.
struct Dir {
    path: PathBuf,
    _removed_on_drop: tempfile::TempDir,
}

impl Dir {
    fn new(test: &str) -> Dir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("output-file-{test}-"))
            .tempdir()
            .unwrap();
        Dir {
            path: dir.path().to_path_buf(),
            _removed_on_drop: dir,
        }
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn write_and_publish(output: &OutputFile, text: &str) -> u64 {
    let mut temporary = output.temporary().unwrap();
    temporary.file.write_all(text.as_bytes()).unwrap();
    output.publish(temporary).unwrap()
}

#[test]
fn nothing_has_a_name_until_published_and_then_only_the_output() {
    let dir = Dir::new("unnamed");
    let path = dir.path.join("trace.json");
    let output = OutputFile::check(&path).unwrap();
    let mut temporary = output.temporary().unwrap();
    temporary.file.write_all(b"{}").unwrap();
    assert!(dir.names().is_empty(), "{:?}", dir.names());
    assert_eq!(output.publish(temporary).unwrap(), 2);
    assert_eq!(dir.names(), ["trace.json"]);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn an_existing_file_or_symlink_is_replaced_not_written_through() {
    let dir = Dir::new("replace");
    let victim = dir.path.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let path = dir.path.join("trace.json");
    symlink(&victim, &path).unwrap();
    let output = OutputFile::check(&path).unwrap();
    write_and_publish(&output, "new");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    // Again over the regular file now there.
    write_and_publish(&output, "newer");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "newer");
    assert_eq!(dir.names(), ["trace.json", "victim"]);
}

#[test]
fn without_o_tmpfile_random_names_are_used_and_cleaned_up() {
    let dir = Dir::new("fallback");
    let path = dir.path.join("trace.json");
    let mut output = OutputFile::check(&path).unwrap();
    let Destination::Named { tmpfile, .. } = &mut output.destination else {
        panic!("a regular output");
    };
    *tmpfile = false;
    let unused = output.temporary().unwrap();
    assert_eq!(dir.names().len(), 1);
    assert!(dir.names()[0].starts_with(".rt-ebpf-trace-"));
    drop(unused);
    assert!(dir.names().is_empty());
    std::fs::write(&path, "old").unwrap();
    write_and_publish(&output, "new");
    assert_eq!(dir.names(), ["trace.json"]);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
}

#[test]
fn the_sudo_user_gets_the_file() {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let dir = Dir::new("owner");
    let path = dir.path.join("trace.json");
    let mut output = OutputFile::check(&path).unwrap();
    output.owner = Some((65534, 65533));
    write_and_publish(&output, "x");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65533));
}

#[test]
fn bad_paths_are_refused_by_name() {
    let dir = Dir::new("bad");
    let cases = [
        (dir.path.clone(), "is a directory"),
        (dir.path.join("missing/trace.json"), "No such file"),
        (dir.path.join("t".repeat(256)), "too long"),
        (PathBuf::from("/dev/loop0"), "block device"),
        (PathBuf::from("/dev/mem"), "character device (1:1)"),
    ];
    for (path, expected) in cases {
        if !path.exists() && expected.contains("device") {
            continue;
        }
        let err = format!("{:#}", OutputFile::check(&path).err().expect("refused"));
        assert!(err.contains(expected), "{err}");
        assert!(err.contains(&*path.to_string_lossy()), "{err}");
    }
    assert!(dir.names().is_empty());
}
