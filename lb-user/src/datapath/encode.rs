//! The configuration as the datapath holds it: the pure translation of the
//! agent's settings into the `SETTINGS` entry and the NAT source addresses
//! (no BPF here: unit-tested on its own). The agent writes what these
//! return at start and on every reload that changes them.

use std::net::IpAddr;

use lb_common::{AF_INET, AF_INET6, SETTINGS_F_FIB, Settings};

use crate::config::Agent;

/// An address as the datapath stores it: 16 bytes in network order, IPv4
/// in the first four (the rest zero), and its family tag.
pub fn addr16(a: IpAddr) -> ([u8; 16], u8) {
    match a {
        IpAddr::V4(v) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v.octets());
            (o, AF_INET)
        }
        IpAddr::V6(v) => (v.octets(), AF_INET6),
    }
}

/// The `SETTINGS` entry for `agent` on a host with `cpus` CPUs (each CPU
/// gives out NAT ports from its own slice of the range).
pub fn settings(agent: &Agent, cpus: u16) -> Settings {
    Settings {
        ipip_src_v4: agent.ipip_source_v4.octets(),
        ipip_src_v6: agent.ipip_source_v6.octets(),
        flags: if agent.next_hop_fib {
            SETTINGS_F_FIB
        } else {
            0
        },
        nat_port_lo: agent.nat_ports.0,
        nat_port_hi: agent.nat_ports.1,
        nat_v4_count: agent.nat_source_v4.len() as u8,
        nat_v6_count: agent.nat_source_v6.len() as u8,
        nat_cpus: cpus.max(1),
        ipip_mtu: agent.ipip_mtu,
        gue_port: agent.gue_port,
    }
}

/// The NAT source addresses of `agent` as `NAT_ADDRS` holds them: (IPv4,
/// IPv6), in the order of the file (a NAT flow names its address by index).
pub fn nat_addrs(agent: &Agent) -> (Vec<[u8; 16]>, Vec<[u8; 16]>) {
    (
        agent
            .nat_source_v4
            .iter()
            .map(|a| addr16(IpAddr::V4(*a)).0)
            .collect(),
        agent
            .nat_source_v6
            .iter()
            .map(|a| addr16(IpAddr::V6(*a)).0)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(extra: &str) -> Agent {
        crate::config::parse(&format!("[agent]\ninterface = \"eth0\"\n{extra}"), "t.toml")
            .expect("valid")
            .agent
    }

    #[test]
    fn every_setting_reaches_its_field() {
        let a = agent(
            "ipip_mtu = 1400\nipip_source_v4 = \"198.18.9.0\"\nipip_source_v6 = \"2001:2:0:9::\"\n\
             next_hop = \"fib\"\nnat_ports = \"2000-3000\"\n\
             nat_source_v4 = [\"198.18.11.1\", \"198.18.11.2\"]\nnat_source_v6 = [\"2001:2::b:1\"]\n",
        );
        let s = settings(&a, 3);
        assert_eq!(s.ipip_mtu, 1400);
        assert_eq!(s.ipip_src_v4, [198, 18, 9, 0]);
        assert_eq!(s.ipip_src_v6[..8], [0x20, 0x01, 0, 2, 0, 0, 0, 9]);
        assert_eq!(s.flags, SETTINGS_F_FIB);
        assert_eq!((s.nat_port_lo, s.nat_port_hi), (2000, 3000));
        assert_eq!((s.nat_v4_count, s.nat_v6_count, s.nat_cpus), (2, 1, 3));
        let (v4, v6) = nat_addrs(&a);
        assert_eq!(v4[1][..4], [198, 18, 11, 2]);
        assert_eq!(v4[1][4..], [0; 12]);
        assert_eq!(v6[0][15], 1);
        // The defaults: next hops from the map, no NAT sources.
        let d = settings(&agent(""), 0);
        assert_eq!((d.flags, d.nat_v4_count, d.nat_cpus), (0, 0, 1));
    }
}
