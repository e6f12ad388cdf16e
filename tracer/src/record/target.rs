//! The traced process: an existing one found by pid, or a command we launch.
//! Either way we end up with its pid, the path of its executable (what the
//! uprobes attach to and the ELF we read), and a way to learn that it exited.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tokio::io::unix::AsyncFd;

use super::launch::{HeldChild, LaunchedChild};

pub struct Target {
    pub pid: u32,
    /// The executable as the kernel sees it. For a running process this is
    /// `/proc/PID/exe`, which stays valid even if the file was replaced or
    /// lives in another mount namespace.
    pub exe: PathBuf,
    /// `comm` of the process, for the trace's process name.
    pub name: String,
    /// Set when we launched the command ourselves. A command launched but
    /// never released does not linger, held forever: dropping a
    /// [`HeldChild`] closes its pipe and it exits.
    child: Option<Child>,
    exit: AsyncFd<OwnedFd>,
}

enum Child {
    Held(HeldChild),
    Running(LaunchedChild),
}

impl Target {
    /// An existing process.
    pub fn existing(pid: u32) -> Result<Self> {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        if pid == 0 || !proc_dir.exists() {
            bail!("no process with pid {pid}");
        }
        if process_state(pid).is_some_and(|state| state == 'Z' || state == 'X') {
            bail!("process {pid} has exited (it is a zombie, waiting for its parent to reap it)");
        }
        let exe = proc_dir.join("exe");
        if let Err(err) = std::fs::read_link(&exe) {
            if !proc_dir.exists() {
                bail!("process {pid} exited before tracing could start");
            }
            if err.kind() == std::io::ErrorKind::PermissionDenied {
                bail!(
                    "can't read the executable of process {pid} ({}: {err}): tracing a process \
                     of another user, or one with capabilities the tracer lacks, needs the \
                     capability CAP_SYS_PTRACE (root has it); run it with sudo",
                    exe.display()
                );
            }
            bail!(
                "can't read the executable of process {pid} ({}: {err}): \
                 it is a kernel thread, it is exiting, or you lack permission",
                exe.display()
            );
        }
        let name = read_comm(&proc_dir.join("comm")).unwrap_or_else(|| format!("pid {pid}"));
        let exit = pidfd(pid).with_context(|| format!("can't watch process {pid}"))?;
        Ok(Target {
            pid,
            exe,
            name,
            child: None,
            exit,
        })
    }

    /// Starts `command` but holds it before `exec`, so that probes can be
    /// attached before it runs a single instruction of its own.
    pub fn launch_held(command: &[OsString]) -> Result<Self> {
        let (program, args) = command.split_first().context("no command given after --")?;
        let exe = find_program(Path::new(program))?;
        let held = HeldChild::spawn(&exe, args)?;
        let pid = held.pid();
        let exit =
            pidfd(pid).with_context(|| format!("can't watch the launched command (pid {pid})"))?;
        let name = exe
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("pid {pid}"));
        Ok(Target {
            pid,
            exe,
            name,
            child: Some(Child::Held(held)),
            exit,
        })
    }

    /// Lets a held command go (a no-op for an existing process).
    pub fn release(&mut self) -> Result<()> {
        if let Some(Child::Held(_)) = &self.child {
            let Some(Child::Held(held)) = self.child.take() else {
                unreachable!()
            };
            self.child = Some(Child::Running(held.release()?));
        }
        Ok(())
    }

    /// An attach failure as the user should hear it: the process exiting
    /// while the probes went in is the likelier story than the error itself.
    pub fn attach_error(&self, err: anyhow::Error) -> anyhow::Error {
        if self.is_alive() {
            err
        } else {
            anyhow::anyhow!(
                "process {} exited while the probes were being attached",
                self.pid
            )
        }
    }

    pub fn is_alive(&self) -> bool {
        // The pidfd turns readable when the process exits (even before it is reaped).
        let mut poll = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(self.exit.get_ref()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready == 0
    }

    /// Resolves when the process exits.
    pub async fn exited(&self) {
        // Readiness is all we need; an error here means the fd is unusable,
        // which we can only treat as "gone".
        let _ = self.exit.readable().await;
    }

    /// For a launched command that has exited: its exit status, reaped.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        match &mut self.child {
            Some(Child::Running(child)) => child.try_wait(),
            _ => None,
        }
    }

    /// Ends a command we launched that is still running when tracing stops:
    /// SIGTERM, then SIGKILL if it has not exited after `grace`. We started
    /// it to trace it, so it must not outlive the tracer as an orphan.
    pub async fn terminate_launched(&mut self, grace: std::time::Duration) {
        if !matches!(self.child, Some(Child::Running(_))) || !self.is_alive() {
            return;
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            self.exited().await;
        }
    }

    /// Whether we started the process (and so own its lifetime).
    pub fn launched(&self) -> bool {
        self.child.is_some()
    }
}

/// The state letter of /proc/PID/stat (R, S, D, Z, …).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces; the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn read_comm(path: &Path) -> Option<String> {
    let comm = std::fs::read_to_string(path).ok()?;
    Some(comm.trim_end().to_string())
}

/// `pidfd_open(2)`: a file descriptor that becomes readable when `pid` exits.
fn pidfd(pid: u32) -> Result<AsyncFd<OwnedFd>> {
    // SAFETY: a plain syscall; the returned fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            bail!("no process with pid {pid}");
        }
        return Err(err).context("pidfd_open failed (Linux 5.3 or later is needed)");
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open while registered.
    Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? })
}

/// Resolves a command name the way a shell does: as a path if it has a
/// slash, else through `$PATH`.
fn find_program(program: &Path) -> Result<PathBuf> {
    let is_executable = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.components().count() > 1 || program.to_string_lossy().contains('/') {
        if !program.exists() {
            bail!("{}: no such file", program.display());
        }
        if !is_executable(program) {
            bail!("{}: not an executable file", program.display());
        }
        return program
            .canonicalize()
            .with_context(|| format!("{}", program.display()));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            return candidate
                .canonicalize()
                .with_context(|| format!("{}", candidate.display()));
        }
    }
    bail!("{}: command not found in $PATH", program.display())
}
