//! The datapath's signals of backend failure read back (`SIGNALS`, a ring
//! buffer; see `lb-ebpf/src/signal.rs`): one [`Signal`] per sign, for the
//! agent to probe that backend at once.

use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use lb_common::{AF_INET, SIGNAL_RST_ON_SYN, SIGNAL_SYN_AGAIN};

/// One signal as the agent reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// A client sent its SYN again: no SYN-ACK reached it (backend id).
    SynAgain { backend_id: u32 },
    /// A NAT backend answered a new connection to VIP `vip:vip_port` with
    /// RST.
    RstOnSyn {
        vip: IpAddr,
        vip_port: u16,
        proto: u8,
        backend: IpAddr,
    },
}

impl Signal {
    /// The name `lb_backend_signals_total{signal}` and the log use.
    pub fn name(&self) -> &'static str {
        match self {
            Signal::SynAgain { .. } => "syn_again",
            Signal::RstOnSyn { .. } => "rst_on_syn",
        }
    }

    /// A record as the datapath writes it; `None` for a kind this agent
    /// does not know.
    pub fn decode(s: &lb_common::Signal) -> Option<Self> {
        let addr = |a: &[u8; 16]| -> IpAddr {
            if s.family == AF_INET {
                IpAddr::from([a[0], a[1], a[2], a[3]])
            } else {
                IpAddr::from(*a)
            }
        };
        match s.kind {
            SIGNAL_SYN_AGAIN => Some(Signal::SynAgain {
                backend_id: s.backend_id,
            }),
            SIGNAL_RST_ON_SYN => Some(Signal::RstOnSyn {
                vip: addr(&s.vip),
                vip_port: s.vip_port,
                proto: s.proto,
                backend: addr(&s.backend),
            }),
            _ => None,
        }
    }
}

/// The reader of one loaded datapath's signal ring; readable (as a file
/// descriptor: poll it) when signals wait.
pub struct SignalRing(RingBuf<MapData>);

impl SignalRing {
    /// Takes the ring of a loaded datapath object (once per object).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf
            .take_map(lb_common::MAP_SIGNALS)
            .with_context(|| format!("the datapath has no map {}", lb_common::MAP_SIGNALS))?;
        Ok(Self(
            RingBuf::try_from(map).context("SIGNALS is not a ring buffer")?,
        ))
    }

    /// Every signal waiting, in order.
    pub fn read(&mut self) -> Vec<Signal> {
        let mut out = Vec::new();
        while let Some(item) = self.0.next() {
            if item.len() >= std::mem::size_of::<lb_common::Signal>() {
                // SAFETY: the record holds a `Signal` (plain integers and
                // bytes), perhaps unaligned: read it so.
                let s =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<lb_common::Signal>()) };
                out.extend(Signal::decode(&s));
            }
        }
        out
    }
}

impl AsFd for SignalRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for SignalRing {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_kinds_and_skips_unknown_ones() {
        let mut s = lb_common::Signal {
            kind: SIGNAL_SYN_AGAIN,
            backend_id: 7,
            family: AF_INET,
            ..Default::default()
        };
        assert_eq!(Signal::decode(&s), Some(Signal::SynAgain { backend_id: 7 }));
        s.kind = SIGNAL_RST_ON_SYN;
        s.vip[..4].copy_from_slice(&[198, 18, 0, 10]);
        s.backend[..4].copy_from_slice(&[198, 18, 2, 1]);
        s.vip_port = 80;
        s.proto = 6;
        assert_eq!(
            Signal::decode(&s),
            Some(Signal::RstOnSyn {
                vip: "198.18.0.10".parse().unwrap(),
                vip_port: 80,
                proto: 6,
                backend: "198.18.2.1".parse().unwrap(),
            })
        );
        s.kind = 99;
        assert_eq!(Signal::decode(&s), None);
    }
}
