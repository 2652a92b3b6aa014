//! Reading a ring the datapath writes to (the drop log, the signals):
//! whenever it is readable, everything waiting is read and handed over as
//! one batch.

use std::os::fd::AsRawFd;

use tokio::io::{Interest, unix::AsyncFd};

/// Spawns the task that reads `ring` with `read` and gives each non-empty
/// batch to `batch`, until `batch` answers `false` (the agent is gone) or
/// the ring fails. `what` names the ring in an error.
pub(super) fn watch<R, T>(
    ring: R,
    what: &str,
    read: fn(&mut R) -> Vec<T>,
    mut batch: impl FnMut(Vec<T>) -> bool + Send + 'static,
) -> anyhow::Result<()>
where
    R: AsRawFd + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: the descriptor is the ring's, owned by `ring`, which the
    // `AsyncFd` owns until the task ends; it never changes.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the datapath's {what}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let got = read(guard.get_inner_mut());
            guard.clear_ready();
            if !got.is_empty() && !batch(got) {
                return;
            }
        }
    });
    Ok(())
}
