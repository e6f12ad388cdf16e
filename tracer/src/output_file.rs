//! Writing an output file as root without harming anything else.
//!
//! The tracer runs as root, often through `sudo` in a directory some other
//! user owns. A name there may be a symlink planted to redirect root's
//! writes (`trace.json.partial -> /etc/shadow`), or the output may be a
//! device or FIFO (`-o /dev/null` to want only the summary). Opening
//! `FILE.partial` with `O_CREAT|O_TRUNC` and renaming it over `FILE`, as the
//! tracer first did, wrote through planted links, replaced `/dev/null` with a
//! regular file, and left `.partial` files (937 MB after a 10-second trace)
//! when killed. So, like perf's `-o` but stricter:
//!
//! - Every output is checked when the tracer starts, before any probe is
//!   attached: its directory, its name's length, what it is now.
//! - A regular file is written as an *unnamed* temporary file in the
//!   output's directory (`O_TMPFILE`), which has no name a planted link
//!   could redirect and vanishes with the process if it is killed. It gets
//!   its name only when complete ([`OutputFile::publish`]): `linkat` (which
//!   never follows or replaces anything), or, when a file of that name
//!   exists, `linkat` to a fresh random name and `renameat` over it (which
//!   replaces the name itself, a symlink included, never what it points
//!   to). Where the file system lacks `O_TMPFILE`, the temporary file has a
//!   random name made with `O_CREAT|O_EXCL|O_NOFOLLOW` instead.
//! - An existing FIFO, terminal or `/dev/null` (or `/dev/stdout`, a link to
//!   one of them) is written into, never replaced: the finished trace is
//!   copied into it. Its node is pinned with an `O_PATH` descriptor at the
//!   start and reopened through that descriptor, so a swapped name can't
//!   redirect the write. Other devices (disks, `/dev/mem`, ...) are refused.
//!   The trace is assembled in an unnamed file in `$TMPDIR` or `/var/tmp`
//!   first (the stacks are resolved in a second pass over it).
//! - The file is made 0600, as perf makes its `perf.data`: a trace holds
//!   the stacks, task names and addresses of the traced process. Under
//!   `sudo` it is given to the invoking user (`SUDO_UID`/`SUDO_GID`) so that
//!   they can open it.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Seek};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

/// The longest file name Linux file systems take (NAME_MAX).
const NAME_MAX: usize = 255;

/// Character devices a trace may be written into: /dev/null, and terminals
/// (`/dev/tty*`, the console, pseudo-terminals). Opening or writing other
/// devices has effects (a watchdog, `/dev/mem`, a tape that rewinds).
fn is_harmless_char_device(rdev: u64) -> bool {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (major == 1 && minor == 3) || matches!(major, 4 | 5 | 136..=143)
}

/// An output file, checked and ready to be written, published by name only
/// when complete.
pub struct OutputFile {
    path: PathBuf,
    destination: Destination,
    /// Who gets the file: the user who ran `sudo`, if anyone.
    owner: Option<(u32, u32)>,
}

enum Destination {
    /// A regular file (or no file yet) called `name` in `dir`.
    Named {
        /// The directory, opened once: later steps are relative to it, so a
        /// renamed or replaced directory path can't redirect them.
        dir: OwnedFd,
        dir_path: PathBuf,
        name: CString,
        /// Whether the file system has `O_TMPFILE` (learned when checking).
        tmpfile: bool,
    },
    /// An existing FIFO, terminal or /dev/null, pinned by an `O_PATH`
    /// descriptor; written into at the end.
    Special { node: OwnedFd },
    /// One of our own open descriptors (`/dev/stdout`, `/dev/fd/N`), as the
    /// shell that started us opened it, with its user's rights: written
    /// into at its current position, whatever it is.
    Inherited { fd: OwnedFd },
}

/// An unnamed (or, without `O_TMPFILE`, randomly named) temporary file that
/// will become the output: write `file` (a writer may take it and give it
/// back), then [`OutputFile::publish`] the two together.
pub struct Temporary {
    /// Open for reading and writing.
    pub file: File,
    pub name: TemporaryName,
}

/// The name of a named temporary file (none for an unnamed one); removes it
/// when dropped unless it was published.
pub struct TemporaryName(Option<(CString, i32)>);

impl Drop for TemporaryName {
    fn drop(&mut self) {
        if let Some((name, dir)) = self.0.take() {
            // SAFETY: a valid C string and a directory descriptor that the
            // OutputFile holding it keeps open.
            unsafe { libc::unlinkat(dir, name.as_ptr(), 0) };
        }
    }
}

impl OutputFile {
    /// Checks `path` as an output and proves it writable by creating a
    /// temporary file where the output will go. Call before attaching.
    pub fn check(path: &Path) -> Result<OutputFile> {
        let shown = path.display();
        if path.as_os_str().is_empty() {
            bail!("the output file name is empty");
        }
        if let Some(name) = path.file_name()
            && name.len() > NAME_MAX
        {
            bail!(
                "cannot write {shown}: its name is too long ({} bytes; file systems take {NAME_MAX})",
                name.len()
            );
        }
        let destination = match inherited_descriptor(path) {
            Some(fd) => Destination::Inherited {
                fd: dup(fd).with_context(|| format!("cannot write {shown}"))?,
            },
            None => match std::fs::metadata(path) {
                Ok(meta) if meta.is_dir() => bail!("cannot write {shown}: it is a directory"),
                Ok(meta) if !meta.is_file() => special(path, &meta)?,
                Ok(_) => named(path)?,
                Err(err) if err.kind() == io::ErrorKind::NotFound => named(path)?,
                Err(err) => bail!("cannot write {shown}: {err}"),
            },
        };
        let output = OutputFile {
            path: path.to_owned(),
            destination,
            owner: sudo_user(),
        };
        // Proves the directory writable now rather than after recording.
        output.temporary()?;
        Ok(output)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where temporary files that belong with this output go (the spill
    /// file): the output's own directory, which must hold the output anyway;
    /// the system's temporary directory for a device or FIFO.
    pub fn scratch_dir(&self) -> PathBuf {
        match &self.destination {
            Destination::Named { dir_path, .. } => dir_path.clone(),
            Destination::Special { .. } | Destination::Inherited { .. } => special_scratch_dir(),
        }
    }

    /// A new empty temporary file to write the output (or an intermediate
    /// version of it) into.
    pub fn temporary(&self) -> Result<Temporary> {
        match &self.destination {
            Destination::Named {
                dir,
                dir_path,
                tmpfile,
                ..
            } => {
                let made = if *tmpfile {
                    open_tmpfile(dir).map(|file| Temporary {
                        file,
                        name: TemporaryName(None),
                    })
                } else {
                    open_random_name(dir)
                };
                made.map_err(|err| {
                    anyhow!(
                        "cannot write {}: cannot create a file in {}: {err}",
                        self.path.display(),
                        dir_path.display()
                    )
                })
            }
            Destination::Special { .. } | Destination::Inherited { .. } => {
                let dir = special_scratch_dir();
                let file = tempfile::tempfile_in(&dir).map_err(|err| {
                    anyhow!(
                        "cannot create a temporary file in {} for {}: {err}",
                        dir.display(),
                        self.path.display()
                    )
                })?;
                Ok(Temporary {
                    file,
                    name: TemporaryName(None),
                })
            }
        }
    }

    /// Gives the finished output its name (or copies it into the device or
    /// FIFO). Returns its size in bytes.
    pub fn publish(&self, temporary: Temporary) -> Result<u64> {
        let Temporary { mut file, name } = temporary;
        let shown = self.path.display();
        let bytes = file
            .metadata()
            .with_context(|| format!("writing {shown}"))?
            .len();
        match &self.destination {
            Destination::Special { node } => {
                let mut out =
                    reopen_for_writing(node).with_context(|| format!("opening {shown}"))?;
                file.rewind().with_context(|| format!("writing {shown}"))?;
                io::copy(&mut file, &mut out).with_context(|| format!("writing {shown}"))?;
            }
            Destination::Inherited { fd } => {
                let mut out =
                    File::from(fd.try_clone().with_context(|| format!("writing {shown}"))?);
                file.rewind().with_context(|| format!("writing {shown}"))?;
                io::copy(&mut file, &mut out).with_context(|| format!("writing {shown}"))?;
            }
            Destination::Named {
                dir,
                name: final_name,
                ..
            } => {
                // SAFETY (both): a valid descriptor of a file we own.
                if unsafe { libc::fchmod(file.as_raw_fd(), 0o600) } != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("writing {shown}"));
                }
                if let Some((uid, gid)) = self.owner
                    && unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } != 0
                {
                    let err = io::Error::last_os_error();
                    return Err(err).with_context(|| format!("giving {shown} to user {uid}"));
                }
                // The trace is the point of the run: on disk before named.
                file.sync_all()
                    .with_context(|| format!("writing {shown}"))?;
                let mut name = name;
                publish_named(&file, &mut name, dir, final_name)
                    .with_context(|| format!("cannot name the finished file {shown}"))?;
            }
        }
        Ok(bytes)
    }
}

/// The descriptor `path` names if it is one of ours: `/dev/stdout`,
/// `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`. Resolving such a link
/// would reach a name in some other directory (the file the shell opened
/// for `> out.json`), or `/dev` itself, which must not be replaced.
fn inherited_descriptor(path: &Path) -> Option<libc::c_int> {
    let text = path.to_str()?;
    let fd = match text {
        "/dev/stdout" => 1,
        "/dev/stderr" => 2,
        _ => text
            .strip_prefix("/dev/fd/")
            .or_else(|| text.strip_prefix("/proc/self/fd/"))?
            .parse()
            .ok()?,
    };
    Some(fd)
}

fn dup(fd: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; a bad one fails.
    let copy = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Where the trace of a device or FIFO is assembled: `$TMPDIR` if set,
/// else `/var/tmp` (on disk, where `/tmp` is often memory) if present.
fn special_scratch_dir() -> PathBuf {
    if std::env::var_os("TMPDIR").is_none() && Path::new("/var/tmp").is_dir() {
        return PathBuf::from("/var/tmp");
    }
    std::env::temp_dir()
}

/// Checks an existing non-regular, non-directory output.
fn special(path: &Path, meta: &std::fs::Metadata) -> Result<Destination> {
    let shown = path.display();
    let kind = meta.file_type();
    let refuse = |what: String| -> Result<Destination> {
        bail!(
            "refusing to write a trace into {shown}: it is {what}; give a regular file, \
             a FIFO, a terminal or /dev/null"
        )
    };
    if kind.is_block_device() {
        return refuse("a block device (a disk)".into());
    }
    if kind.is_socket() {
        return refuse("a socket".into());
    }
    if kind.is_char_device() && !is_harmless_char_device(meta.rdev()) {
        return refuse(format!(
            "a character device ({}:{}) other than /dev/null or a terminal",
            libc::major(meta.rdev()),
            libc::minor(meta.rdev())
        ));
    }
    let node = open_path(path).with_context(|| format!("cannot write {shown}"))?;
    // The name may have changed since the check: judge what was opened.
    let pinned = File::from(node.try_clone()?).metadata()?;
    if pinned.dev() != meta.dev() || pinned.ino() != meta.ino() {
        bail!("cannot write {shown}: it changed while being checked");
    }
    Ok(Destination::Special { node })
}

/// Checks the directory and name of a regular (or new) output.
fn named(path: &Path) -> Result<Destination> {
    let shown = path.display();
    let Some(name) = path.file_name() else {
        bail!("cannot write {shown}: it names no file");
    };
    let dir_path = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = open_dir(&dir_path)
        .map_err(|err| anyhow!("cannot write {shown}: {}: {err}", dir_path.display()))?;
    let tmpfile = match open_tmpfile(&dir) {
        Ok(_) => true,
        // Older kernels and some file systems (FUSE, NFS before 4.x, ...).
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            false
        }
        Err(err) => bail!(
            "cannot write {shown}: cannot create a file in {}: {err}",
            dir_path.display()
        ),
    };
    Ok(Destination::Named {
        dir,
        dir_path,
        name: c_string(name)?,
        tmpfile,
    })
}

fn c_string(text: &OsStr) -> Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| anyhow!("{text:?} contains a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens `path` as an `O_PATH` descriptor (no side effects, following links).
fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; the descriptor is owned from here.
    let fd = check(unsafe { libc::open(name.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes())?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: a valid C string; the descriptor is owned from here.
    let fd = check(unsafe { libc::open(name.as_ptr(), flags) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An unnamed file in `dir`, which can be linked in later (no `O_EXCL`).
fn open_tmpfile(dir: &OwnedFd) -> io::Result<File> {
    let flags = libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC;
    // SAFETY: a valid directory descriptor and C string.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), c".".as_ptr(), flags, 0o600) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A new file of a random name in `dir`, made so that no existing name
/// (a planted symlink included) can be opened instead.
fn open_random_name(dir: &OwnedFd) -> io::Result<Temporary> {
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_RDWR | libc::O_CLOEXEC;
    for _ in 0..100 {
        let name = random_name();
        // SAFETY: a valid directory descriptor and C string.
        match check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o600) }) {
            Ok(fd) => {
                return Ok(Temporary {
                    file: unsafe { File::from_raw_fd(fd) },
                    name: TemporaryName(Some((name, dir.as_raw_fd()))),
                });
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::other("no free temporary name"))
}

/// `.rt-ebpf-trace-XXXXXXXXXXXXXXXX`: short, whatever the output's name.
fn random_name() -> CString {
    let mut bytes = [0u8; 8];
    // SAFETY: writes at most 8 bytes into the buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        bytes = (nanos ^ u64::from(std::process::id()) << 40).to_ne_bytes();
    }
    CString::new(format!(".rt-ebpf-trace-{:016x}", u64::from_ne_bytes(bytes))).expect("no NUL")
}

/// Names the finished temporary file `final_name` in `dir`.
fn publish_named(
    file: &File,
    temporary: &mut TemporaryName,
    dir: &OwnedFd,
    final_name: &CStr,
) -> io::Result<()> {
    let dir = dir.as_raw_fd();
    if let Some((random, _)) = temporary.0.take() {
        // SAFETY: valid descriptors and C strings.
        return check(unsafe { libc::renameat(dir, random.as_ptr(), dir, final_name.as_ptr()) })
            .map(drop)
            .inspect_err(|_| drop(TemporaryName(Some((random, dir)))));
    }
    match link_unnamed(file, dir, final_name) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            // Replace the existing name: link under a fresh random name,
            // then rename that over it in one step.
            loop {
                let random = random_name();
                match link_unnamed(file, dir, &random) {
                    Ok(()) => {
                        // SAFETY: valid descriptors and C strings.
                        let renamed = check(unsafe {
                            libc::renameat(dir, random.as_ptr(), dir, final_name.as_ptr())
                        });
                        if renamed.is_err() {
                            drop(TemporaryName(Some((random, dir))));
                        }
                        return renamed.map(drop);
                    }
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(err) => return Err(err),
                }
            }
        }
        Err(err) => Err(err),
    }
}

/// Gives an `O_TMPFILE` file the name `name` in `dir`. `AT_EMPTY_PATH`
/// needs CAP_DAC_READ_SEARCH on older kernels; `/proc/self/fd` does not.
fn link_unnamed(file: &File, dir: libc::c_int, name: &CStr) -> io::Result<()> {
    // SAFETY: valid descriptors and C strings.
    let direct = check(unsafe {
        libc::linkat(
            file.as_raw_fd(),
            c"".as_ptr(),
            dir,
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    });
    match direct {
        Ok(_) => Ok(()),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::EPERM)) => {
            let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
            // SAFETY: valid descriptors and C strings.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path.as_ptr(),
                    dir,
                    name.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })
            .map(drop)
        }
        Err(err) => Err(err),
    }
}

/// Opens the pinned node for writing, through its descriptor.
fn reopen_for_writing(node: &OwnedFd) -> io::Result<File> {
    let proc_path = CString::new(format!("/proc/self/fd/{}", node.as_raw_fd()))?;
    let flags = libc::O_WRONLY | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: a valid C string; the descriptor is owned from here.
    let fd = check(unsafe { libc::open(proc_path.as_ptr(), flags) })?;
    let file = unsafe { File::from_raw_fd(fd) };
    if file.metadata()?.is_file() {
        return Err(io::Error::other("it is now a regular file"));
    }
    Ok(file)
}

/// The user who ran `sudo`, when we run as root through it.
fn sudo_user() -> Option<(u32, u32)> {
    // SAFETY: plain getters.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |name: &str| std::env::var(name).ok()?.trim().parse::<u32>().ok();
    Some((id("SUDO_UID")?, id("SUDO_GID")?))
}

#[cfg(test)]
mod tests;
