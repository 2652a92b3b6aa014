//! Next hops: the route, egress device and neighbour MAC of each backend
//! as the kernel knows them, written into the backend's datapath entry.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use lb_common::{BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, Backend};

use crate::api::BackendState;
use crate::host::netlink;

use super::state::{State, addr16};

/// The next hop towards an address as the kernel knows it.
pub(super) struct NextHop {
    pub(super) dev: String,
    pub(super) own_mac: [u8; 6],
    pub(super) ifindex: u32,
    /// The neighbour's MAC, once resolved.
    pub(super) mac: Option<[u8; 6]>,
}

/// The route, egress device and neighbour entry for `addr`, asked of the
/// kernel over netlink; `None` when there is no route or the egress device
/// has no MAC.
pub(super) fn next_hop(addr: IpAddr) -> Option<NextHop> {
    let route = netlink::route(addr).ok()??;
    let link = netlink::link_by_index(route.ifindex).ok()??;
    let mac = netlink::neighbour(route.via, route.ifindex).ok().flatten();
    Some(NextHop {
        dev: link.name,
        own_mac: link.mac?,
        ifindex: link.index,
        mac,
    })
}

/// The datapath's `BACKEND_*` value of a backend state.
pub(super) fn datapath_state(s: BackendState) -> u8 {
    match s {
        BackendState::Down | BackendState::Unchecked => BACKEND_DOWN,
        BackendState::Draining => BACKEND_DRAINING,
        BackendState::Up => BACKEND_UP,
    }
}

impl State {
    /// Writes backend `bi` of VIP `vi` with its next hop (asked of the
    /// kernel now, three netlink requests) and state.
    pub(super) fn write_backend(&mut self, vi: usize, bi: usize) -> Result<()> {
        let hop = next_hop(self.vips[vi].backends[bi].cfg.address);
        self.write_backend_with(vi, bi, hop)
    }

    /// [`State::write_backend`] with a next hop resolved by the caller
    /// (health tasks resolve it before they take the state lock).
    pub(super) fn write_backend_with(
        &mut self,
        vi: usize,
        bi: usize,
        hop: Option<NextHop>,
    ) -> Result<()> {
        let b = &self.vips[vi].backends[bi];
        let (addr, family) = addr16(b.cfg.address);
        let state = datapath_state(b.state());
        let mut entry = Backend {
            addr,
            family,
            state,
            port: b.cfg.port.unwrap_or(0),
            ..Default::default()
        };
        let id = b.id;
        let mut resolved = false;
        if let Some(NextHop {
            dev,
            own_mac,
            ifindex,
            mac,
        }) = hop
        {
            entry.src_mac = own_mac;
            entry.ifindex = if dev == self.cfg.agent.interface {
                0
            } else {
                ifindex
            };
            if let Some(m) = mac {
                entry.dst_mac = m;
                resolved = true;
            } else if let Ok(old) = self.dp.backend(id)
                && old.addr == addr
                && old.dst_mac != [0; 6]
            {
                // The kernel forgot the neighbour (a link flap flushes the
                // table; a restarted agent finds it empty): keep the MAC the
                // entry already has rather than blackhole the backend's
                // flows until a probe resolves it again. Still `resolved =
                // false`, so the next good probe refreshes it.
                entry.dst_mac = old.dst_mac;
            }
            if entry.ifindex != 0 {
                self.dp
                    .add_tx_port(ifindex)
                    .with_context(|| format!("adding {dev} as a redirect target"))?;
            }
        }
        self.dp.set_backend(id, &entry)?;
        self.vips[vi].backends[bi].resolved = resolved;
        Ok(())
    }
}
