//! Launching the command to trace, held just before `exec`.
//!
//! `-- cmd` must be traced from its first poll, so the probes have to be in
//! place before the program starts. We fork, and the child waits on a pipe
//! until the tracer has attached; then it execs. A second, close-on-exec pipe
//! tells the parent whether `exec` worked: it sees EOF on success, an errno
//! otherwise.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitStatus;

use anyhow::{Context, Result, bail};

pub struct HeldChild {
    pid: u32,
    /// Writing a byte releases the child; closing it unwritten makes it exit.
    go: OwnedFd,
    /// Carries the errno of a failed exec; EOF means exec succeeded.
    exec_error: OwnedFd,
}

pub struct LaunchedChild {
    pid: u32,
    status: Option<ExitStatus>,
}

impl HeldChild {
    pub fn spawn(program: &Path, args: &[OsString]) -> Result<Self> {
        // Everything the child needs is prepared before fork: after it, only
        // async-signal-safe calls are allowed.
        let c_program =
            CString::new(program.as_os_str().as_bytes()).context("command has a NUL byte")?;
        let mut c_args = vec![c_program.clone()];
        for arg in args {
            c_args.push(CString::new(arg.as_bytes()).context("argument has a NUL byte")?);
        }
        let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());

        let (go_read, go_write) = pipe()?;
        let (error_read, error_write) = pipe()?;

        // SAFETY: the child only calls async-signal-safe functions (close,
        // read, execv, write, _exit) on data prepared above.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork failed");
        }
        if pid == 0 {
            unsafe {
                libc::close(go_write.as_raw_fd());
                libc::close(error_read.as_raw_fd());
                let mut byte = 0u8;
                let n = libc::read(go_read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
                if n != 1 {
                    // The tracer gave up before releasing us.
                    libc::_exit(127);
                }
                libc::execv(c_program.as_ptr(), argv.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(error_write.as_raw_fd(), (&errno as *const i32).cast(), 4);
                libc::_exit(127);
            }
        }
        drop(go_read);
        drop(error_write);
        Ok(HeldChild {
            pid: pid as u32,
            go: go_write,
            exec_error: error_read,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Lets the child exec, and reports whether the exec worked.
    pub fn release(self) -> Result<LaunchedChild> {
        let byte = 1u8;
        // SAFETY: writing one byte from a valid buffer to an fd we own.
        let written = unsafe { libc::write(self.go.as_raw_fd(), (&byte as *const u8).cast(), 1) };
        if written != 1 {
            return Err(std::io::Error::last_os_error())
                .context("could not release the launched command");
        }
        let mut errno = 0i32;
        // SAFETY: reading into a valid 4-byte buffer from an fd we own.
        let n = unsafe {
            libc::read(
                self.exec_error.as_raw_fd(),
                (&mut errno as *mut i32).cast(),
                4,
            )
        };
        let mut child = LaunchedChild {
            pid: self.pid,
            status: None,
        };
        if n == 4 {
            let _ = child.wait();
            bail!(
                "could not run the command: {}",
                std::io::Error::from_raw_os_error(errno)
            );
        }
        Ok(child)
    }
}

impl LaunchedChild {
    /// The exit status if the child has exited (reaping it), else None.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.waitpid(libc::WNOHANG);
        }
        self.status
    }

    fn wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.waitpid(0);
        }
        self.status
    }

    fn waitpid(&self, flags: i32) -> Option<ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        let mut status = 0;
        // SAFETY: waiting on our own child.
        let reaped = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, flags) };
        (reaped == self.pid as libc::pid_t).then(|| ExitStatus::from_raw(status))
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2 failed");
    }
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
