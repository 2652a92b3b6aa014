//! Full NAT: a NAT VIP's packet leaves addressed to the backend's address
//! and port, from one of the balancer's NAT addresses and a port given to
//! the flow here; the backend's replies come back to that address and port
//! and are translated back to the client (`NAT`).
//!
//! Ports cannot collide: each CPU allocates only from its own slice of the
//! port range (so two CPUs never race for one port), and an entry is
//! written with `BPF_NOEXIST`, so a port still held by a flow to the same
//! backend address and port is never taken over. A port is reclaimed when
//! its flow closed (FIN/RST) `NAT_CLOSED_S` ago (the backend's TIME_WAIT)
//! or sat idle `NAT_IDLE_S`: here when an allocation meets it, and by the
//! agent's sweep. `NAT` is a plain hash, not an LRU: a full table refuses
//! new flows (counted) rather than evicting a live flow's port. The port
//! space is per (backend, backend port, NAT address): the same port serves
//! flows to different backends at once. Checksums are updated
//! incrementally (RFC 1624).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_csum_diff, bpf_get_smp_processor_id},
    programs::XdpContext,
};
use lb_common::{
    AF_INET, Backend, MAX_NAT_ADDRS, NAT_F_CLOSING, NAT_F_REPLIED, NAT_PORT_TRIES, NatEntry,
    NatKey, Settings,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum::{apply, delta, delta_ports, delta4},
    flow::now_s,
    forward::put_addr,
    maps::{NAT, NAT_ADDRS, NAT_CURSOR, NAT_SCRATCH},
    parse::{IPPROTO_TCP, IPPROTO_UDP, Packet, TCP_FIN, TCP_RST, field, fixed_l3_off, ptr_at},
    signal,
};

/// A flow's NAT source: which address (index into `NAT_ADDRS`) and port.
#[derive(Clone, Copy)]
pub(crate) struct Source {
    pub idx: u16,
    pub addr: [u8; 16],
    pub port: u16,
}

/// `*dst = *src` for byte arrays, as a non-overlapping copy: between two
/// map values (or a map value and the stack) the assignment compiles to a
/// call of `memmove`, a byte loop in a function of its own; the copy is
/// inlined.
#[inline(always)]
fn copy<const N: usize>(dst: &mut [u8; N], src: &[u8; N]) {
    // SAFETY: two distinct references: they cannot overlap.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, 1) }
}

/// The NAT source address at `idx`.
#[inline(always)]
pub(crate) fn source_addr(idx: u16) -> Option<[u8; 16]> {
    NAT_ADDRS.get(idx as u32).copied()
}

/// The backend's port for this flow (the VIP's when the backend has none).
#[inline(always)]
pub(crate) fn backend_port(pkt: &Packet, b: &Backend) -> u16 {
    if b.port != 0 { b.port } else { pkt.key.dport }
}

#[inline(always)]
fn reclaimable(e: &NatEntry, now: u32) -> bool {
    lb_common::nat_reclaimable(e.flags, e.last_seen_s, now)
}

/// Gives a new flow of `pkt` to backend `b` a NAT source and writes its
/// reply entry. `None` when no port is free in this CPU's slice within
/// `NAT_PORT_TRIES` tries, or there is no NAT address of the family.
#[inline(always)]
pub(crate) fn allocate(
    ctx: &XdpContext,
    pkt: &Packet,
    b: &Backend,
    s: &Settings,
    hash: u32,
    now: u32,
) -> Option<Source> {
    let (count, base_idx) = if pkt.family == AF_INET {
        (s.nat_v4_count as u32, 0)
    } else {
        (s.nat_v6_count as u32, MAX_NAT_ADDRS)
    };
    if count == 0 || count > MAX_NAT_ADDRS {
        return None;
    }
    let idx = (base_idx + hash % count) as u16;
    let addr = source_addr(idx)?;
    let (lo, hi) = (s.nat_port_lo as u32, s.nat_port_hi as u32);
    let cpus = (s.nat_cpus as u32).max(1);
    if lo == 0 || hi < lo {
        return None;
    }
    let slice = (hi - lo + 1) / cpus;
    if slice == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() } % cpus;
    let first = lo + cpu * slice;
    let cursor = NAT_CURSOR.get_ptr_mut(0)?;
    let sc = NAT_SCRATCH.get_ptr_mut(0)?;
    let eth: *const EthHdr = ptr_at(ctx, 0).ok()?;
    // SAFETY: ptr_at checked the packet bounds; `sc` is this CPU's scratch
    // slot and `cursor` its cursor, both ours while the program runs.
    unsafe {
        let e = &mut (*sc).entry;
        copy(&mut e.client, &pkt.key.src);
        copy(&mut e.vip, &pkt.key.dst);
        e.client_port = pkt.key.sport;
        e.vip_port = pkt.key.dport;
        copy(&mut e.client_mac, &(*eth).src_addr);
        copy(&mut e.lb_mac, &(*eth).dst_addr);
        e.flags = 0;
        e._pad = 0;
        e.ifindex = ctx.ingress_ifindex() as u32;
        e.last_seen_s = now;
        let k = &mut (*sc).key;
        copy(&mut k.backend, &b.addr);
        copy(&mut k.nat, &addr);
        k.backend_port = backend_port(pkt, b);
        k.nat_port = 0;
        k.proto = pkt.key.proto;
        k._pad = 0;
        k._pad2 = 0;
        let start = *cursor;
        let mut i = 0;
        while i < NAT_PORT_TRIES {
            let port = first + (start.wrapping_add(i)) % slice;
            (*sc).key.nat_port = port as u16;
            let key = &(*sc).key;
            let entry = &(*sc).entry;
            let mut free = NAT.insert(key, entry, BPF_NOEXIST as u64).is_ok();
            if !free {
                // Taken: by this very flow (a SYN retransmitted before its
                // table entry), or by one whose port may be reclaimed. Only
                // this CPU allocates in its slice, so the remove-then-insert
                // below races with no other allocation.
                let same_or_stale = match NAT.get(key) {
                    Some(old) => {
                        (old.client == entry.client
                            && old.client_port == entry.client_port
                            && old.vip == entry.vip
                            && old.vip_port == entry.vip_port)
                            || reclaimable(old, now)
                    }
                    None => true,
                };
                if same_or_stale {
                    let _ = NAT.remove(key);
                    free = NAT.insert(key, entry, BPF_NOEXIST as u64).is_ok();
                }
            }
            if free {
                *cursor = start.wrapping_add(i + 1);
                return Some(Source {
                    idx,
                    addr,
                    port: port as u16,
                });
            }
            i += 1;
        }
        // Every try held: jump ahead (a sixty-fourth of the slice) rather
        // than crawl through a run of ports held by recently closed flows.
        *cursor = start.wrapping_add(NAT_PORT_TRIES.max(slice / 64));
    }
    None
}

/// Keeps the reply entry of an established NAT flow current: its clock
/// (an idle port is reclaimed only when neither side sent for
/// `NAT_IDLE_S`), and closing once the client sends FIN or RST, so the
/// port is reclaimed early.
#[inline(always)]
pub(crate) fn note_forward(pkt: &Packet, b: &Backend, src: &Source, now: u32) {
    let Some(sc) = NAT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot.
    let key = unsafe {
        let k = &mut (*sc).key;
        copy(&mut k.backend, &b.addr);
        copy(&mut k.nat, &src.addr);
        k.backend_port = backend_port(pkt, b);
        k.nat_port = src.port;
        k.proto = pkt.key.proto;
        k._pad = 0;
        k._pad2 = 0;
        &*k
    };
    if let Some(e) = NAT.get_ptr_mut(key) {
        // SAFETY: a value pointer from a successful lookup.
        unsafe {
            if (*e).last_seen_s != now {
                (*e).last_seen_s = now;
            }
            if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                (*e).flags |= NAT_F_CLOSING;
            }
        }
    }
}

/// The `NAT` key of a packet going backend → NAT address (a reply, or the
/// quoted packet of an error, reversed), built in this CPU's scratch slot.
#[inline(always)]
fn reply_key(pkt: &Packet) -> Option<&'static NatKey> {
    let sc = NAT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot, ours while the program runs.
    unsafe {
        let k = &mut (*sc).key;
        copy(&mut k.backend, &pkt.key.src);
        copy(&mut k.nat, &pkt.key.dst);
        k.backend_port = pkt.key.sport;
        k.nat_port = pkt.key.dport;
        k.proto = pkt.key.proto;
        k._pad = 0;
        k._pad2 = 0;
        Some(&*k)
    }
}

/// The reply entry for a packet to a NAT address, if it belongs to a flow
/// (its clock and closing state brought up to date). A pointer into the
/// map: the entry is too large to copy onto the stack.
#[inline(always)]
pub(crate) fn reply_for(pkt: &Packet) -> Option<*mut NatEntry> {
    let e = NAT.get_ptr_mut(reply_key(pkt)?)?;
    let now = now_s();
    // SAFETY: a value pointer from a successful lookup.
    unsafe {
        if (*e).last_seen_s != now {
            (*e).last_seen_s = now;
        }
        let flags = (*e).flags;
        let mut kept = flags | NAT_F_REPLIED;
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            kept |= NAT_F_CLOSING;
            if flags & NAT_F_REPLIED == 0 && pkt.tcp_flags & TCP_RST != 0 {
                // The backend's first answer to the flow's SYN: refused.
                signal::rst_on_syn(pkt.family, &pkt.key, &*e);
            }
        }
        if kept != flags {
            (*e).flags = kept;
        }
    }
    Some(e)
}

/// Rewrites the packet's addresses and ports to `src:sport → dst:dport`,
/// updating the IPv4 header checksum and the TCP/UDP checksum in place.
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    src: &[u8; 16],
    sport: u16,
    dst: &[u8; 16],
    dport: u16,
) -> Result<(), ()> {
    let v4 = pkt.family == AF_INET;
    let words = if v4 { 2 } else { 8 };
    let d_addr = delta(&pkt.key.src, src, words) + delta(&pkt.key.dst, dst, words);
    let d_ports = (!pkt.key.sport) as u32 + sport as u32 + (!pkt.key.dport) as u32 + dport as u32;
    // 14 or 18: masked so the verifier sees the bound even after the
    // offset went through the stack.
    let l3_off = pkt.l3_off & 0x1f;
    let l4_off = if v4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l3_off)?;
        // SAFETY: ptr_at checked the bounds of the whole header.
        unsafe {
            let ihl = (((*ip).vihl & 0x0f) as usize) * 4;
            put_addr::<1>((&raw mut (*ip).src_addr).cast(), src);
            put_addr::<1>((&raw mut (*ip).dst_addr).cast(), dst);
            (*ip).check = apply((*ip).check, d_addr);
            l3_off + ihl
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l3_off)?;
        // SAFETY: as above.
        unsafe {
            put_addr::<4>((&raw mut (*ip).src_addr).cast(), src);
            put_addr::<4>((&raw mut (*ip).dst_addr).cast(), dst);
        }
        l3_off + Ipv6Hdr::LEN
    };
    if l4_off > 78 {
        return Err(());
    }
    let ports: *mut [u8; 4] = ptr_at(ctx, l4_off)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        let s = sport.to_be_bytes();
        let d = dport.to_be_bytes();
        *ports = [s[0], s[1], d[0], d[1]];
    }
    let d = d_addr + d_ports;
    if pkt.key.proto == IPPROTO_TCP {
        let c: *mut [u8; 2] = ptr_at(ctx, l4_off + field::TCP_CHECKSUM.start)?;
        // SAFETY: as above.
        unsafe { *c = apply(*c, d) };
    } else if pkt.key.proto == IPPROTO_UDP {
        let c: *mut [u8; 2] = ptr_at(ctx, l4_off + field::UDP_CHECKSUM.start)?;
        // SAFETY: as above.
        unsafe {
            // An IPv4 UDP checksum of 0 means "none" and stays so; a
            // computed 0 is sent as 0xffff.
            if !(v4 && *c == [0, 0]) {
                let n = apply(*c, d);
                *c = if n == [0, 0] { [0xff, 0xff] } else { n };
            }
        }
    }
    Ok(())
}

/// Where a translated ICMP error goes: its next hop and interface.
pub(crate) struct IcmpOut {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
}

/// An ICMP "fragmentation needed" / ICMPv6 "packet too big" about a NAT
/// flow (the parser recognised it, `pkt.key` is the quoted packet
/// reversed), translated to the other side: about a reply on its way to the
/// client (the error came to the VIP) it goes to the backend, about a
/// packet on its way to the backend (it came to a NAT address) to the
/// client. The error and the packet it quotes are rewritten as that side
/// sent and knows them, so path-MTU discovery works through the NAT.
/// `None`: not a NAT flow's. Every address is a reference into a map: the
/// program's stack has no room for copies.
#[inline(always)]
pub(crate) fn icmp_error(ctx: &XdpContext, pkt: &Packet) -> Option<IcmpOut> {
    type Ends = (&'static [u8; 16], u16);
    let (outer, from, to, out): ((&[u8; 16], &[u8; 16]), Ends, Ends, IcmpOut) =
        match crate::vip::lookup_vip(pkt) {
            Some(vip) if vip.flags & lb_common::VIP_F_NAT != 0 => {
                // About a reply VIP → client: the flow's entry says which
                // backend and NAT source it has.
                let p = crate::table::probe(&pkt.key);
                let f = crate::table::lookup(p.base, p.tag, &pkt.key)?;
                // SAFETY: a pointer into the flow's map value, read only.
                let f = unsafe { &*f.as_ptr() };
                if f.nat_port == 0 {
                    return None;
                }
                let b = crate::sched::backend(f.backend_id)?;
                if b.dst_mac == [0; 6] {
                    return None;
                }
                let nat = NAT_ADDRS.get(f.nat_addr as u32)?;
                (
                    (nat, &b.addr),
                    (&b.addr, backend_port(pkt, b)),
                    (nat, f.nat_port),
                    IcmpOut {
                        dmac: b.dst_mac,
                        smac: b.src_mac,
                        ifindex: b.ifindex,
                    },
                )
            }
            Some(_) => return None,
            None => {
                // About a packet NAT address → backend: the reply entry
                // says whose.
                // SAFETY: read-only use of the value.
                let e = unsafe { NAT.get(reply_key(pkt)?) }?;
                (
                    (&e.vip, &e.client),
                    (&e.client, e.client_port),
                    (&e.vip, e.vip_port),
                    IcmpOut {
                        dmac: e.client_mac,
                        smac: e.lb_mac,
                        ifindex: e.ifindex,
                    },
                )
            }
        };
    translate_icmp(ctx, pkt, outer, from, to).ok()?;
    Some(out)
}

/// Rewrites an ICMP error: the outer header to `outer` (source,
/// destination), the quoted packet to `from → to` (address, port), with
/// the outer and quoted IPv4 header checksums and the ICMP checksum
/// updated incrementally. Headers without options only (IPv4).
#[inline(always)]
fn translate_icmp(
    ctx: &XdpContext,
    pkt: &Packet,
    outer: (&[u8; 16], &[u8; 16]),
    from: (&[u8; 16], u16),
    to: (&[u8; 16], u16),
) -> Result<(), ()> {
    let l3 = fixed_l3_off(pkt.l3_off);
    if pkt.family == AF_INET {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l3)?;
        let icmp = l3 + Ipv4Hdr::LEN;
        let quote = icmp + field::ICMP_ERROR_HEADER.end;
        let inner: *mut Ipv4Hdr = ptr_at(ctx, quote)?;
        let ports: *mut [u8; 4] = ptr_at(ctx, quote + Ipv4Hdr::LEN)?;
        let check: *mut [u8; 2] = ptr_at(ctx, icmp + field::ICMP_CHECKSUM.start)?;
        // SAFETY: every pointer checked by ptr_at.
        unsafe {
            if (*ip).vihl != 0x45 || (*inner).vihl != 0x45 {
                return Err(());
            }
            let d_outer = delta4((*ip).src_addr, outer.0) + delta4((*ip).dst_addr, outer.1);
            put_addr::<1>((&raw mut (*ip).src_addr).cast(), outer.0);
            put_addr::<1>((&raw mut (*ip).dst_addr).cast(), outer.1);
            (*ip).check = apply((*ip).check, d_outer);
            let d_inner = delta4((*inner).src_addr, from.0) + delta4((*inner).dst_addr, to.0);
            put_addr::<1>((&raw mut (*inner).src_addr).cast(), from.0);
            put_addr::<1>((&raw mut (*inner).dst_addr).cast(), to.0);
            let old_check = u16::from_be_bytes((*inner).check);
            (*inner).check = apply((*inner).check, d_inner);
            let new_check = u16::from_be_bytes((*inner).check);
            let d_ports = delta_ports(*ports, from.1, to.1);
            let (f, t) = (from.1.to_be_bytes(), to.1.to_be_bytes());
            *ports = [f[0], f[1], t[0], t[1]];
            // The ICMP checksum covers the quoted header, its checksum
            // field included, not the outer addresses.
            *check = apply(
                *check,
                d_inner + d_ports + (!old_check) as u32 + new_check as u32,
            );
        }
    } else {
        // The addresses of each IPv6 header (outer at l3, quoted after the
        // ICMPv6 error's own header).
        let icmp = l3 + Ipv6Hdr::LEN;
        let inner = icmp + field::ICMP_ERROR_HEADER.end;
        let os: *mut [u8; 16] = ptr_at(ctx, l3 + field::IPV6_SRC.start)?;
        let od: *mut [u8; 16] = ptr_at(ctx, l3 + field::IPV6_DST.start)?;
        let is: *mut [u8; 16] = ptr_at(ctx, inner + field::IPV6_SRC.start)?;
        let id: *mut [u8; 16] = ptr_at(ctx, inner + field::IPV6_DST.start)?;
        let ports: *mut [u8; 4] = ptr_at(ctx, inner + Ipv6Hdr::LEN)?;
        let check: *mut [u8; 2] = ptr_at(ctx, icmp + field::ICMP_CHECKSUM.start)?;
        let (f, t) = (from.1.to_be_bytes(), to.1.to_be_bytes());
        let mut new_ports = [f[0], f[1], t[0], t[1]];
        // The differences by `bpf_csum_diff`, in the packet's byte order
        // (ones'-complement sums do not care which): a word-by-word sum of
        // four 16-byte addresses does not fit the stack here.
        let diff = |old: *mut [u8; 16], new: &[u8; 16]| -> u64 {
            // SAFETY: both are 16 readable bytes (packet, map value); the
            // helper only reads them.
            unsafe {
                bpf_csum_diff(
                    old.cast(),
                    16,
                    (new as *const [u8; 16]).cast_mut().cast(),
                    16,
                    0,
                ) as u32 as u64
            }
        };
        let mut d = diff(os, outer.0) + diff(od, outer.1) + diff(is, from.0) + diff(id, to.0);
        // SAFETY: 4 readable bytes each (packet, stack).
        d += unsafe { bpf_csum_diff(ports.cast(), 4, new_ports.as_mut_ptr().cast(), 4, 0) } as u32
            as u64;
        // SAFETY: every pointer checked by ptr_at.
        unsafe {
            *os = *outer.0;
            *od = *outer.1;
            *is = *from.0;
            *id = *to.0;
            *ports = new_ports;
            // ICMPv6: the pseudo-header's addresses count too.
            let mut sum = (!u16::from_ne_bytes(*check)) as u64 + d;
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            *check = (!(sum as u16)).to_ne_bytes();
        }
    }
    Ok(())
}
