//! Signs of backend failure for the agent (`SIGNALS`, a ring it reads):
//! a client's SYN sent again on an entry that has seen nothing but SYNs
//! (no SYN-ACK reached the client: the backend is gone, hung, or lost the
//! VIP), and a NAT backend answering a new connection with RST (nothing
//! listens). The agent probes the backend at once; only failed probes take
//! it down. Rare paths, so not inlined: the hot path carries a call, not
//! the ring code, and the verifier walks each body once per call site.

use lb_common::{FlowKey, NatEntry, SIGNAL_RST_ON_SYN, SIGNAL_SYN_AGAIN, Signal};

use crate::maps::SIGNALS;

#[inline(always)]
fn send(kind: u32, backend_id: u32, family: u8, key: &FlowKey, vip: &[u8; 16], vip_port: u16) {
    // A full ring drops the signal: the agent is behind, and the next SYN
    // signals again.
    let Some(mut e) = SIGNALS.reserve::<Signal>(0) else {
        return;
    };
    let s = e.as_mut_ptr();
    // SAFETY: `s` points at a reserved record of the right size; every
    // field is written before submit.
    unsafe {
        (*s).kind = kind;
        (*s).backend_id = backend_id;
        (*s).family = family;
        (*s).proto = key.proto;
        (*s).vip_port = vip_port;
        (*s)._pad = 0;
        (*s).vip = *vip;
        (*s).backend = if kind == SIGNAL_RST_ON_SYN {
            key.src
        } else {
            [0; 16]
        };
    }
    e.submit(0);
}

/// The SYN of `key` came again while its entry (backend `backend_id`) had
/// seen only SYNs.
#[inline(never)]
pub(crate) fn syn_again(backend_id: u32, family: u8, key: &FlowKey) {
    send(
        SIGNAL_SYN_AGAIN,
        backend_id,
        family,
        key,
        &key.dst,
        key.dport,
    );
}

/// The first answer of a NAT backend (the source of `key`, a reply) to
/// the flow of `e` was a RST.
#[inline(never)]
pub(crate) fn rst_on_syn(family: u8, key: &FlowKey, e: &NatEntry) {
    send(SIGNAL_RST_ON_SYN, 0, family, key, &e.vip, e.vip_port);
}
