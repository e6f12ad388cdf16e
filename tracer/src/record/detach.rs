//! Removing the probes where killing the tracer can't interrupt it.
//!
//! A uprobe is removed when the last reference to its perf event goes: the
//! kernel then writes the original instruction back over the 0xCC in every
//! process that has it (`uprobe_unregister_nosync` → `register_for_each_vma`
//! → `remove_breakpoint` → `uprobe_write_opcode`). That write faults the
//! target's page in through `get_user_pages_remote`, which gives up with
//! `-EINTR` when the task doing it has a fatal signal pending; the kernel
//! then logs "failed to unregister, leaking uprobe" and the breakpoint stays
//! in the target, trapping on every call, until some later trace of the same
//! file removes it. Each removal also waits for an RCU-tasks-trace grace
//! period, so 30 probes take 3–4.5 s here: a tracer killed (SIGKILL: `timeout
//! -k`, `systemctl stop`, the OOM killer) 0.2–1 s into its stop left 10–15
//! breakpoints of 30 in the target in our test, and the runs 15–25.
//!
//! A task that is *exiting* can't have a fatal signal pending: `exit_group`
//! marks the process as exiting and the kernel drops any later SIGKILL
//! (`prepare_signal`), and a SIGKILL that starts the exit is dequeued first.
//! So the removal is done by a process's exit: when recording stops, the
//! tracer forks a one-thread child that shares every descriptor, drops its
//! own references (instant: the child still holds each event), and closes a
//! pipe; the child, which waited on that pipe, exits, and the kernel
//! removes the probes in its `exit_files`, where no signal can interrupt the
//! page writes. If the tracer is killed first, its end of the pipe closes
//! all the same. The child ignores SIGINT/SIGTERM/SIGHUP and has a session
//! of its own (a second Ctrl-C or `timeout` signalling the process group
//! doesn't reach it). A child killed *before* the tracer dropped its
//! references would leave the tracer's drop as the last, interruptible one
//! (seen once: a test killed the child the instant it appeared, then the
//! tracer, and one breakpoint stayed): so the tracer checks the child is
//! still there right before it drops its references, and forks another if
//! not ([`Detacher::fork_live`]); what is left is the microseconds between
//! that check and the drop. The tracer waits for the child so that "the tool
//! exited" still means "the probes are gone".

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::Result;

/// A forked child holding copies of all our descriptors until released.
pub struct Detacher {
    pid: libc::pid_t,
    /// Closing this lets the child exit.
    release: OwnedFd,
}

impl Detacher {
    /// Forks the child (see [`fork_live`](Self::fork_live)); then drop the
    /// probes and call [`release`](Self::release).
    fn fork() -> Result<Detacher> {
        let mut fds = [0; 2];
        // SAFETY: a valid array for two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (wait_end, release) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child only makes async-signal-safe calls, then exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if pid == 0 {
            // SAFETY: we are the child; see `child`.
            unsafe { child(wait_end.as_raw_fd(), release.as_raw_fd()) }
        }
        drop(wait_end);
        Ok(Detacher { pid, release })
    }

    /// Forks the child, and forks again while the child is found gone
    /// (killed) right after: call it immediately before dropping the probes.
    pub fn fork_live() -> Result<Detacher> {
        const ATTEMPTS: usize = 3;
        let mut detacher = Detacher::fork()?;
        for _ in 1..ATTEMPTS {
            if detacher.alive() {
                break;
            }
            log::warn!("the process that removes the probes is gone; forking another");
            detacher = Detacher::fork()?;
        }
        Ok(detacher)
    }

    /// Whether the child has not exited (reaps it if it has).
    fn alive(&self) -> bool {
        let mut status = 0;
        // SAFETY: our own child; a valid out-pointer.
        unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) == 0 }
    }

    /// Lets the child exit, removing whatever probes only it still holds;
    /// returns once it has (the kernel reaps nothing before the exit's
    /// file closing is done).
    pub fn release(self) {
        drop(self.release);
        let mut status = 0;
        loop {
            // SAFETY: our own child; a valid out-pointer.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if rc >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
    }
}

/// The child: out of the tracer's session and signals' way, waits for the
/// pipe to close, exits.
///
/// # Safety
/// Only in the child of a fork: async-signal-safe calls only.
unsafe fn child(wait_end: libc::c_int, release: libc::c_int) -> ! {
    unsafe {
        libc::close(release);
        libc::setsid();
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGPIPE,
            libc::SIGQUIT,
        ] {
            libc::signal(signal, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, c"rt-ebpf-detach".as_ptr());
        // Don't hold the tracer's terminal or pipes open.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        let mut byte = 0u8;
        loop {
            let read = libc::read(wait_end, (&raw mut byte).cast(), 1);
            if read == 0 || (read < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_lives_until_released_and_a_killed_one_is_seen() {
        let detacher = Detacher::fork_live().expect("fork");
        assert!(detacher.alive());
        // SAFETY: our own child.
        unsafe { libc::kill(detacher.pid, libc::SIGKILL) };
        // The kill lands asynchronously: wait (boundedly) for the exit.
        let gone = (0..1000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            !detacher.alive()
        });
        assert!(gone, "a killed child still counted as alive");
        let detacher = Detacher::fork_live().expect("fork");
        assert!(detacher.alive());
        detacher.release();
    }
}
