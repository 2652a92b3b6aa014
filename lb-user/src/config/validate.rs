//! From the file as written (`raw`) to the validated model (`mod.rs`):
//! every check, each error located at the key or value it is about.

use std::{collections::HashSet, net::IpAddr, ops::Range};

use crate::policy::maglev::is_prime;

use super::{
    Agent, Announce, BackendCfg, CheckKind, Config, ConfigError, DEFAULT_ANNOUNCE_TABLE,
    DEFAULT_NAT_PORTS, Forwarding, HashInput, Health, MAX_MAX_BACKENDS, MAX_MAX_VIPS,
    MAX_RING_SLOTS, MAX_WEIGHT, Protocol, Region, Vip, XdpMode, locate, raw::RawFile,
};

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let err = |span: Option<Range<usize>>, msg: String| locate(text, file, span, msg);
    let raw: RawFile = toml::from_str(text).map_err(|e| err(e.span(), e.message().to_string()))?;

    let a = &raw.agent;
    let xdp_mode = a
        .xdp_mode
        .get_ref()
        .parse::<XdpMode>()
        .map_err(|e| err(Some(a.xdp_mode.span()), e))?;
    if *a.flow_table_size.get_ref() == 0 {
        return Err(err(
            Some(a.flow_table_size.span()),
            "flow_table_size must be at least 1".into(),
        ));
    }
    if a.interface.is_empty() {
        return Err(err(
            None,
            "agent.interface must name the interface to attach to".into(),
        ));
    }
    for (name, v, lo, hi) in [
        ("max_vips", &a.max_vips, 1, MAX_MAX_VIPS),
        ("max_backends", &a.max_backends, 2, MAX_MAX_BACKENDS),
        ("ring_slots", &a.ring_slots, 1, MAX_RING_SLOTS),
    ] {
        if !(lo..=hi).contains(v.get_ref()) {
            return Err(err(
                Some(v.span()),
                format!(
                    "agent.{name} = {} is out of range: {lo}..={hi}",
                    v.get_ref()
                ),
            ));
        }
    }
    let (max_vips, max_backends, ring_slots) = (
        *a.max_vips.get_ref(),
        *a.max_backends.get_ref(),
        *a.ring_slots.get_ref(),
    );
    // Running totals against the capacities, checked VIP by VIP so that an
    // error points at the VIP that does not fit.
    let (mut ring_ids, mut backend_ids, mut slots) = (0u64, 0u64, 0u64);
    let metrics_listen = match &a.metrics_listen {
        None => None,
        Some(s) => Some(s.get_ref().parse().map_err(|_| {
            err(
                Some(s.span()),
                format!(
                    "metrics_listen `{}` is not an address:port such as 127.0.0.1:9100",
                    s.get_ref()
                ),
            )
        })?),
    };
    let api_listen = match &a.api_listen {
        None => None,
        Some(s) => Some(s.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
            err(
                Some(s.span()),
                format!(
                    "api_listen `{}` is not an address:port such as 127.0.0.1:9200",
                    s.get_ref()
                ),
            )
        })?),
    };
    // The API is never served without tokens, and a token file without a
    // listener would be silently ignored.
    let api_token_file = match (&a.api_listen, &a.api_token_file) {
        (Some(l), None) => {
            return Err(err(
                Some(l.span()),
                "api_listen needs api_token_file: the HTTP API is never served without bearer                  tokens (see README \"The HTTP API\")"
                    .into(),
            ));
        }
        (None, Some(f)) => {
            return Err(err(
                Some(f.span()),
                "api_token_file has no effect without api_listen: set api_listen to serve the                  HTTP API, or remove api_token_file"
                    .into(),
            ));
        }
        (_, f) => f.as_ref().map(|f| std::path::PathBuf::from(f.get_ref())),
    };
    let ipip_source_v4 = a.ipip_source_v4.get_ref().parse().map_err(|_| {
        err(
            Some(a.ipip_source_v4.span()),
            format!(
                "ipip_source_v4 `{}` is not an IPv4 address",
                a.ipip_source_v4.get_ref()
            ),
        )
    })?;
    let ipip_source_v6 = a.ipip_source_v6.get_ref().parse().map_err(|_| {
        err(
            Some(a.ipip_source_v6.span()),
            format!(
                "ipip_source_v6 `{}` is not an IPv6 address",
                a.ipip_source_v6.get_ref()
            ),
        )
    })?;
    let mut nat_source_v4 = Vec::new();
    let mut nat_source_v6 = Vec::new();
    for (list, v6) in [(&a.nat_source_v4, false), (&a.nat_source_v6, true)] {
        for s in list {
            let key = if v6 { "nat_source_v6" } else { "nat_source_v4" };
            let bad = || {
                err(
                    Some(s.span()),
                    format!(
                        "{key} `{}` is not an IPv{} address",
                        s.get_ref(),
                        if v6 { 6 } else { 4 }
                    ),
                )
            };
            if v6 {
                nat_source_v6.push(s.get_ref().parse().map_err(|_| bad())?);
            } else {
                nat_source_v4.push(s.get_ref().parse().map_err(|_| bad())?);
            }
            if nat_source_v4.len().max(nat_source_v6.len()) > lb_common::MAX_NAT_ADDRS as usize {
                return Err(err(
                    Some(s.span()),
                    format!(
                        "{key}: at most {} addresses per family",
                        lb_common::MAX_NAT_ADDRS
                    ),
                ));
            }
        }
    }
    let nat_ports = {
        let s = &a.nat_ports;
        let bad = |why: &str| {
            err(
                Some(s.span()),
                format!(
                    "nat_ports `{}` {why}: give a range such as \"{DEFAULT_NAT_PORTS}\" (first-last, \
                     1024 or above, outside the kernel's ephemeral ports, net.ipv4.ip_local_port_range)",
                    s.get_ref()
                ),
            )
        };
        let (lo, hi) = s
            .get_ref()
            .split_once('-')
            .ok_or_else(|| bad("is not a range"))?;
        let lo: u16 = lo
            .trim()
            .parse()
            .map_err(|_| bad("is not a range of ports"))?;
        let hi: u16 = hi
            .trim()
            .parse()
            .map_err(|_| bad("is not a range of ports"))?;
        if lo < 1024 || hi < lo {
            return Err(bad("is empty or starts below 1024"));
        }
        (lo, hi)
    };
    let ipip_mtu = *a.ipip_mtu.get_ref();
    if !(1280..=9216).contains(&ipip_mtu) {
        return Err(err(
            Some(a.ipip_mtu.span()),
            format!(
                "ipip_mtu {ipip_mtu} is out of range 1280..=9216 (the MTU of the path to the \
                 backends: 1500 on plain Ethernet, 9000 with jumbo frames)"
            ),
        ));
    }
    let gue_port = *a.gue_port.get_ref();
    if gue_port == 0 {
        return Err(err(
            Some(a.gue_port.span()),
            "gue_port 0 is no port: the UDP port `gue` VIPs encapsulate to (default 6080; the \
             backends' `lb backend-host --gue-port` must match)"
                .into(),
        ));
    }
    let agent = Agent {
        ipip_mtu,
        gue_port,
        nat_source_v4,
        nat_source_v6,
        nat_ports,
        reply_interfaces: a.reply_interfaces.clone(),
        interface: a.interface.clone(),
        xdp_mode,
        flow_table_size: *a.flow_table_size.get_ref(),
        max_vips,
        max_backends,
        ring_slots,
        control_socket: a.control_socket.clone(),
        instance: a.instance.clone(),
        metrics_listen,
        api_listen,
        api_token_file,
        netns: a.netns.clone(),
        next_hop_fib: match a.next_hop.get_ref().as_str() {
            "map" => false,
            "fib" => true,
            other => {
                return Err(err(
                    Some(a.next_hop.span()),
                    format!("next_hop `{other}` is not \"map\" or \"fib\""),
                ));
            }
        },
        ipip_source_v4,
        ipip_source_v6,
        new_flow_limit: a.new_flow_limit,
    };

    let announce = match &raw.announce {
        None => None,
        Some(an) => {
            let table = *an.table.get_ref();
            if table == 0 || (253..=255).contains(&table) {
                return Err(err(
                    Some(an.table.span()),
                    format!(
                        "announce.table {table} is reserved (0 unspec, 253 default, 254 main, 255 local); \
                         use a table of its own such as {DEFAULT_ANNOUNCE_TABLE}, the one BIRD's kernel protocol learns"
                    ),
                ));
            }
            Some(Announce { table })
        }
    };

    let mut seen_vips = HashSet::new();
    let mut vips = Vec::new();
    for v in &raw.vip {
        let address: IpAddr = v.address.get_ref().parse().map_err(|_| {
            err(
                Some(v.address.span()),
                format!(
                    "VIP address `{}` is not an IPv4 or IPv6 address",
                    v.address.get_ref()
                ),
            )
        })?;
        let protocol = v
            .protocol
            .get_ref()
            .parse::<Protocol>()
            .map_err(|e| err(Some(v.protocol.span()), e))?;
        let forwarding = v
            .forwarding
            .get_ref()
            .parse::<Forwarding>()
            .map_err(|e| err(Some(v.forwarding.span()), e))?;
        let hash = v
            .hash
            .get_ref()
            .parse::<HashInput>()
            .map_err(|e| err(Some(v.hash.span()), e))?;
        if forwarding == Forwarding::Nat {
            let (have, key) = if address.is_ipv4() {
                (!agent.nat_source_v4.is_empty(), "nat_source_v4")
            } else {
                (!agent.nat_source_v6.is_empty(), "nat_source_v6")
            };
            if !have {
                return Err(err(
                    Some(v.forwarding.span()),
                    format!(
                        "VIP {address}: forwarding = \"nat\" needs a source address of its family: \
                         set agent.{key} (an address of this host the backends reach it by)"
                    ),
                ));
            }
            if !v.flow_table {
                return Err(err(
                    Some(v.forwarding.span()),
                    format!(
                        "VIP {address}: forwarding = \"nat\" keeps every flow in the connection \
                         table (its source port is there); remove flow_table = false"
                    ),
                ));
            }
        }
        let ring = *v.ring_size.get_ref();
        if !is_prime(ring) || ring > lb_common::MAX_RING_SIZE {
            return Err(err(
                Some(v.ring_size.span()),
                format!(
                    "ring_size {ring} must be a prime no larger than {} (Maglev needs a prime; e.g. 65537, 16381, 251)",
                    lb_common::MAX_RING_SIZE
                ),
            ));
        }
        if !seen_vips.insert((address, v.port, protocol)) {
            return Err(err(
                Some(v.address.span()),
                format!(
                    "duplicate VIP {address} port {} {:?}: each (address, port, protocol) may appear once",
                    v.port, protocol
                ),
            ));
        }
        let h = &v.health;
        let kind = match h.kind.get_ref().as_str() {
            "none" => CheckKind::None,
            "tcp" => CheckKind::Tcp,
            "http" => CheckKind::Http { path: h.path.clone(), status: parse_status(h.expect_status.get_ref()).ok_or_else(|| {
                err(Some(h.expect_status.span()), format!("expect_status `{}` is not a status or range such as \"200\" or \"200-399\"", h.expect_status.get_ref()))
            })? },
            other => return Err(err(Some(h.kind.span()), format!("health kind `{other}` is not \"tcp\", \"http\" or \"none\""))),
        };
        let via: crate::vocab::ProbeVia = h
            .via
            .get_ref()
            .parse()
            .map_err(|e: String| err(Some(h.via.span()), e))?;
        if h.interval_ms == 0 || h.timeout_ms == 0 || h.rise == 0 || h.fall == 0 {
            return Err(err(
                Some(h.kind.span()),
                "health interval_ms, timeout_ms, rise and fall must all be at least 1".into(),
            ));
        }
        let mut seen_b = HashSet::new();
        let mut backends = Vec::new();
        for b in &v.backend {
            let baddr: IpAddr = b.address.get_ref().parse().map_err(|_| {
                err(
                    Some(b.address.span()),
                    format!(
                        "backend address `{}` is not an IPv4 or IPv6 address",
                        b.address.get_ref()
                    ),
                )
            })?;
            if baddr.is_ipv4() != address.is_ipv4() {
                return Err(err(
                    Some(b.address.span()),
                    format!(
                        "backend {baddr} is {} but VIP {address} is {}: `{}` forwarding carries a VIP only to backends of its own family",
                        fam(&baddr),
                        fam(&address),
                        v.forwarding.get_ref()
                    ),
                ));
            }
            if !seen_b.insert(baddr) {
                return Err(err(
                    Some(b.address.span()),
                    format!("duplicate backend {baddr} in VIP {address}:{}", v.port),
                ));
            }
            let w = *b.weight.get_ref();
            if w > MAX_WEIGHT {
                return Err(err(
                    Some(b.weight.span()),
                    format!("weight {w} is out of range 0..={MAX_WEIGHT} (0 drains the backend)"),
                ));
            }
            if let Some(p) = &b.port
                && forwarding != Forwarding::Nat
            {
                return Err(err(
                    Some(p.span()),
                    format!(
                        "backend {baddr}: a backend port needs forwarding = \"nat\" (with `{}` the \
                         packet keeps the VIP's port)",
                        v.forwarding.get_ref()
                    ),
                ));
            }
            if b.port.as_ref().is_some_and(|p| *p.get_ref() == 0) {
                return Err(err(
                    Some(b.port.as_ref().expect("checked").span()),
                    format!("backend {baddr}: port 0 is not a port"),
                ));
            }
            backends.push(BackendCfg {
                address: baddr,
                port: b.port.as_ref().map(|p| *p.get_ref()),
                weight: w,
                drain: b.drain,
            });
        }
        use crate::vocab::Scheduler;
        let scheduler = v
            .scheduler
            .get_ref()
            .parse::<Scheduler>()
            .map_err(|e| err(Some(v.scheduler.span()), e))?;
        let second_chance_s = match &v.second_chance {
            None if forwarding == Forwarding::Gue && scheduler == Scheduler::Maglev => {
                super::DEFAULT_SECOND_CHANCE_S
            }
            None => 0,
            Some(s) if *s.get_ref() > 0 && forwarding != Forwarding::Gue => {
                return Err(err(
                    Some(s.span()),
                    format!(
                        "VIP {address}: second_chance needs forwarding = \"gue\" (the second hop \
                         travels in the GUE header; `{}` has no room for it): set forwarding = \
                         \"gue\" or second_chance = 0",
                        v.forwarding.get_ref()
                    ),
                ));
            }
            Some(s) if *s.get_ref() > 0 && scheduler != Scheduler::Maglev => {
                return Err(err(
                    Some(s.span()),
                    format!(
                        "VIP {address}: second_chance needs scheduler = \"maglev\" (a `{}` ring \
                         does not say which backend a flow went to): set second_chance = 0",
                        v.scheduler.get_ref()
                    ),
                ));
            }
            Some(s) => *s.get_ref(),
        };
        let mut regions = Vec::new();
        for r in &v.region {
            let mut prefixes = Vec::new();
            for p in &r.prefixes {
                let bad = || {
                    err(
                        Some(p.span()),
                        format!(
                            "region `{}`: `{}` is not a prefix such as 198.18.7.0/24 or 2001:2:7::/48",
                            r.name,
                            p.get_ref()
                        ),
                    )
                };
                let (a, l) = p.get_ref().split_once('/').ok_or_else(bad)?;
                let a: IpAddr = a.parse().map_err(|_| bad())?;
                let l: u8 = l.parse().map_err(|_| bad())?;
                if l > if a.is_ipv4() { 32 } else { 128 } {
                    return Err(bad());
                }
                if a.is_ipv4() != address.is_ipv4() {
                    return Err(err(
                        Some(p.span()),
                        format!(
                            "region `{}`: prefix {} is not of the VIP's address family",
                            r.name,
                            p.get_ref()
                        ),
                    ));
                }
                prefixes.push((a, l));
            }
            let mut rb = Vec::new();
            for b in &r.backends {
                let a: IpAddr = b.get_ref().parse().map_err(|_| {
                    err(
                        Some(b.span()),
                        format!("region `{}`: `{}` is not an address", r.name, b.get_ref()),
                    )
                })?;
                if !backends.iter().any(|x: &BackendCfg| x.address == a) {
                    return Err(err(
                        Some(b.span()),
                        format!(
                            "region `{}`: {a} is not one of this VIP's backends; add it as a [[vip.backend]] first",
                            r.name
                        ),
                    ));
                }
                rb.push(a);
            }
            ring_ids += 1;
            slots += 2 * u64::from(ring);
            regions.push(Region {
                name: r.name.clone(),
                prefixes,
                backends: rb,
            });
        }
        ring_ids += 1;
        slots += 2 * u64::from(ring);
        backend_ids += backends.len() as u64;
        if ring_ids > u64::from(max_vips) {
            return Err(err(
                Some(v.address.span()),
                format!(
                    "this VIP and its regions do not fit: VIPs plus regions come to {ring_ids}, \
                     agent.max_vips is {max_vips} (raise it; see README, \"Sizing\")"
                ),
            ));
        }
        if backend_ids >= u64::from(max_backends) {
            return Err(err(
                Some(v.address.span()),
                format!(
                    "this VIP's backends do not fit: backends over all VIPs come to {backend_ids}, \
                     agent.max_backends is {max_backends} (one id is reserved; raise it)"
                ),
            ));
        }
        if slots > u64::from(ring_slots) {
            return Err(err(
                Some(v.ring_size.span()),
                format!(
                    "this VIP's rings do not fit: two halves of ring_size per VIP and region come to \
                     {slots} slots, agent.ring_slots is {ring_slots} (raise it, 8 bytes a slot, or \
                     lower ring_size)"
                ),
            ));
        }
        vips.push(Vip {
            scheduler,
            regions,
            address,
            port: v.port,
            protocol,
            forwarding,
            hash,
            ring_size: ring,
            flow_table: v.flow_table,
            idle_timeout_s: v.idle_timeout,
            second_chance_s,
            health: Health {
                kind,
                interval_ms: h.interval_ms,
                timeout_ms: h.timeout_ms,
                rise: h.rise,
                fall: h.fall,
                port: h.port.unwrap_or(v.port),
                via,
            },
            backends,
        });
    }
    Ok(Config {
        agent,
        announce,
        vips,
    })
}

pub(super) fn fam(a: &IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// "200" or "200-399" → (low, high).
pub(super) fn parse_status(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = s.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}
