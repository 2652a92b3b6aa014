//! The datapath's drop log read back: the aya-log records `lb_drop_log`
//! writes (one per rare drop, rate-limited in the datapath; the format is
//! `lb_common::drop_log`'s) as [`DropEvent`]s, for the agent's log.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;

/// One logged drop, as the datapath saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// The verdict reason (`lb stats` names), e.g. `nat_no_port`.
    pub reason: &'static str,
    /// The client's address and port (the packet's source).
    pub client: SocketAddr,
    /// The packet's destination: the VIP's address and the port.
    pub dst: SocketAddr,
    /// IP protocol number.
    pub proto: u8,
    /// The backend chosen before the drop (0: none was).
    pub backend_id: u32,
    /// Drops of this reason on this CPU not logged since its last event
    /// (the datapath's rate limit).
    pub suppressed: u64,
}

impl DropEvent {
    /// Parses a record's message; `None` for any other text.
    pub fn parse(msg: &str) -> Option<Self> {
        let mut words = msg.split_whitespace();
        if words.next()? != "drop" {
            return None;
        }
        let mut field = |key: &str| {
            words
                .next()?
                .strip_prefix(key)?
                .strip_prefix('=')
                .map(str::to_string)
        };
        let reason: u32 = field("reason")?.parse().ok()?;
        let reason = *lb_common::verdict::NAMES.get(reason as usize)?;
        Some(Self {
            reason,
            client: field("client")?.parse().ok()?,
            dst: field("dst")?.parse().ok()?,
            proto: field("proto")?.parse().ok()?,
            backend_id: field("backend_id")?.parse().ok()?,
            suppressed: field("suppressed")?.parse().ok()?,
        })
    }
}

/// What the reader got: events, and the text of any record that was not
/// one (a datapath of another version), kept rather than lost.
type Got = Arc<Mutex<Vec<Result<DropEvent, String>>>>;

/// Receives aya-log's records (the `log::Log` it writes to).
struct Collect(Got);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        let item = DropEvent::parse(&text).ok_or(text);
        if let Ok(mut g) = self.0.lock() {
            g.push(item);
        }
    }
    fn flush(&self) {}
}

/// The reader of one loaded datapath's drop log; readable (as a file
/// descriptor: poll it) when records wait.
pub struct DropLog {
    logger: EbpfLogger<Collect>,
    got: Got,
}

impl DropLog {
    /// Takes the log ring of a loaded datapath object (once per object).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let got = Got::default();
        let logger = EbpfLogger::init_with_logger(ebpf, Collect(got.clone()))
            .context("opening the datapath's log ring (AYA_LOGS)")?;
        Ok(Self { logger, got })
    }

    /// Every record written since the last call, in order.
    pub fn read(&mut self) -> Vec<Result<DropEvent, String>> {
        self.logger.flush();
        self.got
            .lock()
            .map(|mut g| std::mem::take(&mut *g))
            .unwrap_or_default()
    }
}

impl AsFd for DropLog {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.logger.as_fd()
    }
}

impl AsRawFd for DropLog {
    fn as_raw_fd(&self) -> RawFd {
        self.logger.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_families_and_refuses_other_text() {
        let e = DropEvent::parse(
            "drop reason=13 client=198.18.1.7:40000 dst=198.18.0.10:80 proto=6 backend_id=3 suppressed=12",
        )
        .expect("v4");
        assert_eq!(e.reason, "nat_no_port");
        assert_eq!(e.client, "198.18.1.7:40000".parse().unwrap());
        assert_eq!(e.dst, "198.18.0.10:80".parse().unwrap());
        assert_eq!((e.proto, e.backend_id, e.suppressed), (6, 3, 12));
        let e = DropEvent::parse(
            "drop reason=9 client=[2001:2::7]:40000 dst=[2001:2::10]:53 proto=17 backend_id=0 suppressed=0",
        )
        .expect("v6");
        assert_eq!(e.reason, "encap_failed");
        assert_eq!(e.client, "[2001:2::7]:40000".parse().unwrap());
        for bad in [
            "",
            "hello",
            "drop reason=99 client=1.2.3.4:1 dst=1.2.3.4:2 proto=6 backend_id=0 suppressed=0",
            "drop reason=9 dst=1.2.3.4:2 client=1.2.3.4:1 proto=6 backend_id=0 suppressed=0",
            "drop reason=9 client=1.2.3.4 dst=1.2.3.4:2 proto=6 backend_id=0 suppressed=0",
        ] {
            assert_eq!(DropEvent::parse(bad), None, "{bad:?}");
        }
    }
}
