//! The datapath's rare drops in the agent's log: each event `lb_drop_log`
//! sends (see `datapath::drop_log`) becomes one `tracing` event at `warn`
//! with the fields `reason`, `vip`, `client`, `backend` (when one was
//! chosen) and `suppressed` (drops of that reason the datapath's rate limit
//! held back on that CPU since its previous event), filtered and formatted
//! like every other event (`RUST_LOG`, `--log-format json`).

use std::net::{IpAddr, SocketAddr};

use super::{Shared, lock, state::vip_ref};
use crate::{
    api::VipRef,
    datapath::drop_log::{DropEvent, DropLog},
};

/// Reads `log` whenever the datapath writes to it, until the agent stops.
pub(super) fn spawn(shared: &Shared, log: DropLog) -> anyhow::Result<()> {
    let shared = shared.clone();
    super::rings::watch(log, "log ring", DropLog::read, move |got| {
        for item in got {
            match item {
                Ok(e) => {
                    let named = lock(&shared)
                        .ok()
                        .and_then(|s| s.backend_named(e.backend_id));
                    report(&e, named);
                }
                Err(text) => tracing::warn!(record = %text, "unrecognised datapath log record"),
            }
        }
        true
    })
}

/// Logs one drop. `named`: the VIP and address of the backend it names,
/// if the agent knows that backend id (the VIP is then the one configured,
/// every-port VIPs included; else the packet's destination and protocol).
fn report(e: &DropEvent, named: Option<(VipRef, IpAddr)>) {
    let (vip, backend) = match named {
        Some((v, b)) => (v.to_string(), Some(b)),
        None => (dst_named(e.dst, e.proto), None),
    };
    tracing::warn!(
        reason = e.reason,
        vip = %vip,
        client = %e.client,
        backend = backend.map(tracing::field::display),
        suppressed = e.suppressed,
        "datapath dropped a packet"
    );
}

/// `address:port/protocol`, as a VIP is written.
fn dst_named(dst: SocketAddr, proto: u8) -> String {
    let p = match proto {
        lb_common::PROTO_TCP => "tcp".to_string(),
        lb_common::PROTO_UDP => "udp".to_string(),
        n => format!("proto-{n}"),
    };
    format!("{dst}/{p}")
}

impl super::State {
    /// The VIP and address of backend `id` (0: none).
    pub(super) fn backend_named(&self, id: u32) -> Option<(VipRef, IpAddr)> {
        if id == 0 {
            return None;
        }
        self.vips.iter().find_map(|v| {
            v.backends
                .iter()
                .find(|b| b.id == id)
                .map(|b| (vip_ref(&v.cfg), b.cfg.address))
        })
    }
}
