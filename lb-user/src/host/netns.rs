//! Network namespaces: running one piece of work inside a named namespace
//! (a name under /run/netns) from a thread, for the agent's `lb down` and
//! the lab.

use anyhow::{Context as _, Result, bail};

/// Moves the calling thread into network namespace `ns` for `f`, then back.
pub fn in_netns<T>(ns: &str, f: impl FnOnce() -> T) -> Result<T> {
    use std::os::fd::AsRawFd;
    let own = std::fs::File::open("/proc/thread-self/ns/net").context("opening own netns")?;
    let target = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("no netns {ns}"))?;
    // SAFETY: setns on fds we own; only this thread changes namespace.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {ns}: {}", std::io::Error::last_os_error());
    }
    let r = f();
    // SAFETY: as above.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns back: {}", std::io::Error::last_os_error());
    }
    Ok(r)
}
