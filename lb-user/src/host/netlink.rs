//! What the kernel knows about links, routes and neighbours, and the host
//! routes the agent announces, through rtnetlink: messages from
//! `netlink-packet-route` over a `netlink-sys` socket.
//!
//! Synchronous on purpose: a request is one socket and tens of microseconds
//! (the unit test below prints one: 55 µs in a debug build here), so the
//! agent's one writer can ask under its lock without holding anyone up, where
//! an `ip` subprocess cost milliseconds. A socket is opened per request, in the calling thread's
//! network namespace, exactly as `ip` would be (the agent enters
//! `agent.netns` before any thread exists; `lb down` asks from a thread moved
//! into the namespace).

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context as _, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType, RouteVia,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Sends one request and collects the replies: every message of a dump, the
/// one answer of a get, nothing for an acknowledged change. A kernel error
/// comes back as an `std::io::Error` with its errno.
fn request(msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
    let mut sock = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    sock.bind_auto().context("binding a netlink socket")?;
    sock.connect(&SocketAddr::new(0, 0))
        .context("connecting a netlink socket")?;
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | flags;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0).context("netlink send")?;
    let mut out = Vec::new();
    loop {
        let (data, _) = sock.recv_from_full().context("netlink receive")?;
        if data.is_empty() {
            bail!("netlink: the kernel closed the exchange");
        }
        let mut off = 0;
        while off < data.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                .map_err(|e| anyhow!("netlink: undecodable reply: {e}"))?;
            let len = msg.header.length as usize;
            if len == 0 {
                bail!("netlink: zero-length message");
            }
            off += (len + 3) & !3;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(out),
                    Some(code) => {
                        return Err(std::io::Error::from_raw_os_error(-code.get()).into());
                    }
                },
                NetlinkPayload::InnerMessage(m) => {
                    out.push(m);
                    if flags & (NLM_F_DUMP | NLM_F_ACK) == 0 {
                        return Ok(out);
                    }
                }
                _ => {}
            }
        }
    }
}

/// The errno of a failed request, if it was the kernel's.
pub fn errno(e: &anyhow::Error) -> Option<i32> {
    e.downcast_ref::<std::io::Error>()
        .and_then(|e| e.raw_os_error())
}

fn family(a: IpAddr) -> (AddressFamily, u8) {
    match a {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

/// The route the kernel would use towards an address: `ip route get ADDR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Egress interface index.
    pub ifindex: u32,
    /// The gateway, or the address itself when it is on-link.
    pub via: IpAddr,
}

/// `ip route get ADDR`; `None` when the kernel has no route (unreachable).
pub fn route(addr: IpAddr) -> Result<Option<Route>> {
    let (fam, len) = family(addr);
    let mut m = RouteMessage::default();
    m.header.address_family = fam;
    m.header.destination_prefix_length = len;
    m.attributes.push(RouteAttribute::Destination(addr.into()));
    let replies = match request(RouteNetlinkMessage::GetRoute(m), 0) {
        Ok(r) => r,
        Err(e)
            if matches!(
                errno(&e),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL)
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("route lookup for {addr}")),
    };
    let Some(RouteNetlinkMessage::NewRoute(r)) = replies.into_iter().next() else {
        return Ok(None);
    };
    let mut ifindex = None;
    let mut via = addr;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::Gateway(g) => via = route_addr(g).unwrap_or(addr),
            RouteAttribute::Via(RouteVia::Inet6(g)) => via = IpAddr::V6(*g),
            RouteAttribute::Via(RouteVia::Inet(g)) => via = IpAddr::V4(*g),
            _ => {}
        }
    }
    Ok(ifindex.map(|ifindex| Route { ifindex, via }))
}

/// One interface as the kernel knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Its hardware address; `None` for links without one (`lo`, tunnels).
    pub mac: Option<[u8; 6]>,
}

fn link_of(m: LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(b) if b.len() == 6 => {
                link.mac = Some(b.try_into().expect("length checked"));
            }
            _ => {}
        }
    }
    link
}

fn get_link(m: LinkMessage) -> Result<Option<Link>> {
    match request(RouteNetlinkMessage::GetLink(m), 0) {
        Ok(r) => Ok(r.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(link_of(l)),
            _ => None,
        })),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `ip link show dev NAME`; `None` when there is no such interface here.
pub fn link_by_name(name: &str) -> Result<Option<Link>> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    get_link(m).with_context(|| format!("looking up interface {name}"))
}

/// The interface with index `index`, if any.
pub fn link_by_index(index: u32) -> Result<Option<Link>> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    get_link(m).with_context(|| format!("looking up interface #{index}"))
}

/// The MAC of neighbour `via` on interface `ifindex` if the kernel has
/// resolved it (an entry that is neither FAILED nor INCOMPLETE):
/// `ip neigh show to VIA dev DEV`.
pub fn neighbour(via: IpAddr, ifindex: u32) -> Result<Option<[u8; 6]>> {
    let (fam, _) = family(via);
    let mut m = NeighbourMessage::default();
    m.header.family = fam;
    m.header.ifindex = ifindex;
    let replies = request(RouteNetlinkMessage::GetNeighbour(m), NLM_F_DUMP)
        .with_context(|| format!("reading the neighbour table for {via}"))?;
    Ok(replies.into_iter().find_map(|m| {
        let RouteNetlinkMessage::NewNeighbour(n) = m else {
            return None;
        };
        if n.header.ifindex != ifindex
            || matches!(
                n.header.state,
                NeighbourState::Failed | NeighbourState::Incomplete
            )
        {
            return None;
        }
        let mut dst = None;
        let mut mac = None;
        for a in n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                    dst = Some(IpAddr::V4(v));
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                    dst = Some(IpAddr::V6(v));
                }
                NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                    mac = Some(<[u8; 6]>::try_from(b).expect("length checked"));
                }
                _ => {}
            }
        }
        (dst == Some(via)).then_some(mac).flatten()
    }))
}

/// Host routes (/32, /128) with route protocol `proto` in kernel table
/// `table`, both families: `ip route show table T proto P`.
pub fn host_routes(table: u32, proto: u8) -> Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut m = RouteMessage::default();
        m.header.address_family = fam;
        let replies = request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)
            .with_context(|| format!("reading route table {table}"))?;
        for r in replies {
            let RouteNetlinkMessage::NewRoute(r) = r else {
                continue;
            };
            if r.header.protocol != RouteProtocol::from(proto) {
                continue;
            }
            let mut t = u32::from(r.header.table);
            let mut dst = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(x) => t = *x,
                    RouteAttribute::Destination(d) => dst = route_addr(d),
                    _ => {}
                }
            }
            if t != table {
                continue;
            }
            if let Some(d) = dst
                && r.header.destination_prefix_length == family(d).1
            {
                out.insert(d);
            }
        }
    }
    Ok(out)
}

fn host_route(a: IpAddr, table: u32, proto: u8) -> RouteMessage {
    let (fam, len) = family(a);
    let mut m = RouteMessage::default();
    m.header.address_family = fam;
    m.header.destination_prefix_length = len;
    // Tables past 255 travel only in the attribute; the header says "see it".
    m.header.table = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
    m.header.protocol = RouteProtocol::from(proto);
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Destination(a.into()));
    m.attributes.push(RouteAttribute::Table(table));
    m
}

/// `RT_TABLE_COMPAT` from `linux/rtnetlink.h`.
const RT_TABLE_COMPAT: u8 = 252;

/// `ip route replace A/32 dev DEV table T proto P` (a host route through
/// device `ifindex`, scope link).
pub fn replace_host_route(a: IpAddr, ifindex: u32, table: u32, proto: u8) -> Result<()> {
    let mut m = host_route(a, table, proto);
    m.header.scope = RouteScope::Link;
    m.attributes.push(RouteAttribute::Oif(ifindex));
    request(
        RouteNetlinkMessage::NewRoute(m),
        NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK,
    )
    .with_context(|| format!("adding route {a} to table {table}"))?;
    Ok(())
}

/// `ip route del A/32 table T proto P`.
pub fn delete_host_route(a: IpAddr, table: u32, proto: u8) -> Result<()> {
    let mut m = host_route(a, table, proto);
    m.header.scope = RouteScope::NoWhere;
    request(RouteNetlinkMessage::DelRoute(m), NLM_F_ACK)
        .with_context(|| format!("removing route {a} from table {table}"))?;
    Ok(())
}

/// The loopback's index (the device announced routes point at).
pub fn loopback() -> Result<u32> {
    link_by_name("lo")?
        .map(|l| l.index)
        .ok_or_else(|| anyhow!("no loopback interface in this network namespace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs only a network namespace with `lo` (any test environment has
    /// one); also times a request, the figure quoted at the top.
    #[test]
    fn loopback_route_and_link() {
        let lo = link_by_name("lo").unwrap().expect("lo exists");
        assert_eq!(lo.name, "lo");
        assert_eq!(link_by_index(lo.index).unwrap(), Some(lo.clone()));
        assert_eq!(link_by_name("no-such-if0").unwrap(), None);
        let t = std::time::Instant::now();
        let r = route("127.0.0.1".parse().unwrap()).unwrap().unwrap();
        eprintln!("route get: {:?}", t.elapsed());
        assert_eq!(r.ifindex, lo.index);
        assert_eq!(r.via, "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
