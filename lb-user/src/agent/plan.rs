//! The pure half of reconcile: [`plan`] decides from two VIP lists what
//! to change in the datapath, [`plan_settings`] whether every `agent.*`
//! setting can be applied live or must be refused (and where). No BPF, no
//! I/O: unit-tested here; `reconcile` applies the result.

use std::{collections::HashSet, net::IpAddr};

use lb_common::VipKey;

use crate::config::{self, Vip};

use super::state::{vip_flags, vip_key};

/// One step from one configuration to the next, in the order to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// The VIP is gone: its entry, ring and backend ids go.
    RemoveVip(VipKey),
    /// A new VIP: take a VIP id (the pinned one if there is one).
    AddVip(VipKey),
    /// Write the VIP's datapath entry (flags, scheduler, idle timeout).
    ConfigureVip(VipKey),
    /// Replace the VIP's regions (prefixes and their rings).
    SetRegions(VipKey),
    RemoveBackend(VipKey, IpAddr),
    /// A new backend: an id, its entry, a health task.
    AddBackend(VipKey, IpAddr),
    /// Weight or drain changed: rewrite its entry.
    UpdateBackend(VipKey, IpAddr),
    /// Health settings changed: a new health task, the state starts over.
    RestartHealth(VipKey, IpAddr),
    /// Rebuild the VIP's rings (Maglev or scheduler table, regions).
    RebuildRing(VipKey),
}

/// The datapath entry of a VIP depends on these settings only.
fn meta_of(v: &Vip) -> (u32, u32, u32) {
    (vip_flags(v), v.idle_timeout_s, v.scheduler.datapath())
}

/// An `agent.*` setting that the running agent cannot take on, and why:
/// the whole change is refused, nothing is applied.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Refusal {
    /// The key as the file spells it (under `[agent]`).
    pub key: &'static str,
    pub why: String,
}

/// What a new configuration does with the agent's own settings: `Ok(true)`
/// when the datapath's settings (`SETTINGS`, the NAT addresses) must be
/// rewritten, `Ok(false)` when they stay, a [`Refusal`] when a setting
/// cannot change while the agent runs. Every field is named, so a new
/// setting cannot be forgotten here. (`new_flow_limit` and `[announce]` are
/// applied by [`State::reconcile`] on every change.)
pub(super) fn plan_settings(old: &config::Agent, new: &config::Agent) -> Result<bool, Refusal> {
    let config::Agent {
        interface,
        xdp_mode,
        flow_table_size,
        control_socket,
        instance,
        metrics_listen,
        api_listen,
        api_token_file,
        netns,
        next_hop_fib,
        ipip_source_v4,
        ipip_source_v6,
        new_flow_limit: _,
        max_vips,
        max_backends,
        ring_slots,
        nat_source_v4,
        nat_source_v6,
        nat_ports,
        reply_interfaces,
        ipip_mtu,
        gue_port,
    } = new;
    let loaded = |key: &'static str| Refusal {
        key,
        why: format!(
            "fixed when the datapath is loaded; to change it, `lb down --instance {}` detaches the \
             datapath (traffic stops until the agent starts again), then start the agent",
            old.instance
        ),
    };
    let at_start = |key: &'static str| Refusal {
        key,
        why: "read when the agent starts: restart the agent to change it (the datapath keeps \
              forwarding while the agent restarts)"
            .into(),
    };
    if *interface != old.interface {
        return Err(Refusal {
            why: format!(
                "changed from {} to {}: the datapath stays attached to {}; detach it first with \
                 `lb down`, then start the agent again",
                old.interface, interface, old.interface
            ),
            ..loaded("interface")
        });
    }
    for (same, key) in [
        (*xdp_mode == old.xdp_mode, "xdp_mode"),
        (*flow_table_size == old.flow_table_size, "flow_table_size"),
        (*max_vips == old.max_vips, "max_vips"),
        (*max_backends == old.max_backends, "max_backends"),
        (*ring_slots == old.ring_slots, "ring_slots"),
    ] {
        if !same {
            return Err(loaded(key));
        }
    }
    if *instance != old.instance {
        return Err(Refusal {
            key: "instance",
            why: format!(
                "names this agent's pins and lock (`{}`): stop the agent, then start it with the new file",
                old.instance
            ),
        });
    }
    for (same, key) in [
        (*control_socket == old.control_socket, "control_socket"),
        (*metrics_listen == old.metrics_listen, "metrics_listen"),
        (*api_listen == old.api_listen, "api_listen"),
        (*api_token_file == old.api_token_file, "api_token_file"),
        (*netns == old.netns, "netns"),
        (
            *reply_interfaces == old.reply_interfaces,
            "reply_interfaces",
        ),
    ] {
        if !same {
            return Err(at_start(key));
        }
    }
    // A NAT flow names its source address by its place in the list.
    let why = "NAT flows name their source address by its place in this list, so an address \
               removed or moved would move live flows to another: add new addresses at the end \
               (to remove one, `lb down` and start the agent again)";
    if !nat_source_v4.starts_with(&old.nat_source_v4) {
        return Err(Refusal {
            key: "nat_source_v4",
            why: why.into(),
        });
    }
    if !nat_source_v6.starts_with(&old.nat_source_v6) {
        return Err(Refusal {
            key: "nat_source_v6",
            why: why.into(),
        });
    }
    Ok(*next_hop_fib != old.next_hop_fib
        || *ipip_source_v4 != old.ipip_source_v4
        || *ipip_source_v6 != old.ipip_source_v6
        || *nat_ports != old.nat_ports
        || *ipip_mtu != old.ipip_mtu
        || *gue_port != old.gue_port
        || nat_source_v4.len() != old.nat_source_v4.len()
        || nat_source_v6.len() != old.nat_source_v6.len())
}

/// What to change to go from `old` to `new` (VIPs as configured).
pub(super) fn plan(old: &[Vip], new: &[Vip]) -> Vec<Change> {
    use Change::*;
    let mut out = Vec::new();
    let new_keys: HashSet<VipKey> = new.iter().map(vip_key).collect();
    for o in old {
        if !new_keys.contains(&vip_key(o)) {
            out.push(RemoveVip(vip_key(o)));
        }
    }
    for n in new {
        let key = vip_key(n);
        let o = old.iter().find(|o| vip_key(o) == key);
        let mut ring = false;
        match o {
            None => {
                out.push(AddVip(key));
                out.push(ConfigureVip(key));
                ring = true;
            }
            Some(o) => {
                if meta_of(o) != meta_of(n) {
                    out.push(ConfigureVip(key));
                }
                ring |= o.ring_size != n.ring_size || o.scheduler != n.scheduler;
            }
        }
        let old_regions = o.map(|o| o.regions.as_slice()).unwrap_or(&[]);
        if old_regions != n.regions.as_slice() {
            out.push(SetRegions(key));
            ring = true;
        }
        let old_backends = o.map(|o| o.backends.as_slice()).unwrap_or(&[]);
        for b in old_backends {
            if !n.backends.iter().any(|x| x.address == b.address) {
                out.push(RemoveBackend(key, b.address));
                ring = true;
            }
        }
        // Probes follow the forwarding path: a new mode is a new probe.
        let health_changed =
            o.is_some_and(|o| o.health != n.health || o.forwarding != n.forwarding);
        for b in &n.backends {
            match old_backends.iter().find(|x| x.address == b.address) {
                None => {
                    out.push(AddBackend(key, b.address));
                    ring = true;
                }
                Some(ob) => {
                    if ob != b {
                        out.push(UpdateBackend(key, b.address));
                        ring = true;
                    }
                    if health_changed {
                        out.push(RestartHealth(key, b.address));
                    }
                }
            }
        }
        if ring {
            out.push(RebuildRing(key));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Change::*, *};

    fn cfg(text: &str) -> Vec<Vip> {
        let head = "[agent]\ninterface = \"eth0\"\n";
        config::parse(&format!("{head}{text}"), "t.toml")
            .expect("valid")
            .vips
    }

    fn agent(extra: &str) -> config::Agent {
        let text =
            format!("[agent]\ninterface = \"eth0\"\nnat_source_v4 = [\"198.18.11.1\"]\n{extra}");
        config::parse(&text, "t.toml").expect("valid").agent
    }

    #[test]
    fn every_agent_setting_is_applied_or_refused() {
        let old = agent("");
        assert_eq!(plan_settings(&old, &old), Ok(false), "nothing changed");
        for live in [
            "ipip_mtu = 1400",
            "next_hop = \"fib\"",
            "ipip_source_v4 = \"198.18.9.0\"",
            "ipip_source_v6 = \"2001:2:0:9::\"",
            "nat_ports = \"2000-3000\"",
            "nat_source_v6 = [\"2001:2::b:1\"]",
        ] {
            assert_eq!(plan_settings(&old, &agent(live)), Ok(true), "{live}");
        }
        // Applied by reconcile itself, not through SETTINGS.
        assert_eq!(plan_settings(&old, &agent("new_flow_limit = 5")), Ok(false));
        // A NAT address added at the end is applied; one removed is not.
        let two = config::parse(
            "[agent]\ninterface = \"eth0\"\nnat_source_v4 = [\"198.18.11.1\", \"198.18.11.2\"]\n",
            "t.toml",
        )
        .expect("valid")
        .agent;
        assert_eq!(plan_settings(&old, &two), Ok(true));
        assert_eq!(
            plan_settings(&two, &old).map_err(|r| r.key),
            Err("nat_source_v4")
        );
        for (text, key) in [
            ("xdp_mode = \"skb\"", "xdp_mode"),
            ("flow_table_size = 4096", "flow_table_size"),
            ("max_vips = 512", "max_vips"),
            ("max_backends = 512", "max_backends"),
            ("ring_slots = 1000000", "ring_slots"),
            ("instance = \"other\"", "instance"),
            ("control_socket = \"/run/lb/other.sock\"", "control_socket"),
            ("metrics_listen = \"198.18.0.1:9100\"", "metrics_listen"),
            ("netns = \"other\"", "netns"),
            ("reply_interfaces = [\"eth1\"]", "reply_interfaces"),
        ] {
            let r = plan_settings(&old, &agent(text)).expect_err(text);
            assert_eq!(r.key, key);
        }
        let mut moved = old.clone();
        moved.interface = "eth9".into();
        let r = plan_settings(&old, &moved).expect_err("interface");
        assert_eq!(r.key, "interface");
        assert!(r.why.contains("eth0 to eth9"), "{}", r.why);
    }

    #[test]
    fn a_refusal_points_at_the_key_or_its_table() {
        let text = "# x\n[agent]\ninterface = \"eth0\"\nmax_vips = 512\n";
        let e = config::error_at_key(text, "f.toml", "agent", "max_vips", "m".into());
        assert_eq!((e.line, e.col), (4, 1));
        let e = config::error_at_key(text, "f.toml", "agent", "ring_slots", "m".into());
        assert_eq!(e.line, 2, "a key left to its default: the table's header");
    }

    const ONE: &str = r#"
[[vip]]
address = "198.18.0.100"
port = 80
[[vip.backend]]
address = "198.18.2.1"
[[vip.backend]]
address = "198.18.2.2"
"#;

    fn key(v: &[Vip]) -> VipKey {
        vip_key(&v[0])
    }
    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn same_config_changes_nothing() {
        assert_eq!(plan(&cfg(ONE), &cfg(ONE)), vec![]);
    }

    #[test]
    fn from_nothing_everything_is_added_then_the_ring_built() {
        let new = cfg(ONE);
        let k = key(&new);
        assert_eq!(
            plan(&[], &new),
            vec![
                AddVip(k),
                ConfigureVip(k),
                AddBackend(k, a("198.18.2.1")),
                AddBackend(k, a("198.18.2.2")),
                RebuildRing(k)
            ]
        );
    }

    #[test]
    fn a_removed_vip_is_removed_first() {
        let two =
            format!("{ONE}\n[[vip]]\naddress = \"198.18.0.101\"\nport = 53\nprotocol = \"udp\"\n");
        let old = cfg(&two);
        let gone = vip_key(&old[1]);
        assert_eq!(plan(&old, &cfg(ONE)), vec![RemoveVip(gone)]);
    }

    #[test]
    fn backend_edits_rewrite_entries_and_the_ring() {
        let old = cfg(ONE);
        let k = key(&old);
        let weight = ONE.replacen(
            "address = \"198.18.2.2\"",
            "address = \"198.18.2.2\"\nweight = 3",
            1,
        );
        assert_eq!(
            plan(&old, &cfg(&weight)),
            vec![UpdateBackend(k, a("198.18.2.2")), RebuildRing(k)]
        );
        let drained = ONE.replacen(
            "address = \"198.18.2.1\"",
            "address = \"198.18.2.1\"\ndrain = true",
            1,
        );
        assert_eq!(
            plan(&old, &cfg(&drained)),
            vec![UpdateBackend(k, a("198.18.2.1")), RebuildRing(k)]
        );
        let swapped = ONE.replace("198.18.2.2", "198.18.2.3");
        assert_eq!(
            plan(&old, &cfg(&swapped)),
            vec![
                RemoveBackend(k, a("198.18.2.2")),
                AddBackend(k, a("198.18.2.3")),
                RebuildRing(k)
            ]
        );
    }

    #[test]
    fn health_settings_restart_probes_but_leave_the_ring() {
        let old = cfg(ONE);
        let k = key(&old);
        let new = format!("{ONE}\n[vip.health]\ninterval_ms = 500\n");
        assert_eq!(
            plan(&old, &cfg(&new)),
            vec![
                RestartHealth(k, a("198.18.2.1")),
                RestartHealth(k, a("198.18.2.2"))
            ]
        );
    }

    #[test]
    fn vip_settings_touch_the_entry_and_or_the_ring() {
        let old = cfg(ONE);
        let k = key(&old);
        let set = |extra: &str| ONE.replacen("port = 80", &format!("port = 80\n{extra}"), 1);
        // A new mode is a new path: the path probes start again.
        assert_eq!(
            plan(&old, &cfg(&set("forwarding = \"ipip\""))),
            vec![
                ConfigureVip(k),
                RestartHealth(k, a("198.18.2.1")),
                RestartHealth(k, a("198.18.2.2"))
            ]
        );
        assert_eq!(
            plan(&old, &cfg(&set("ring_size = 251"))),
            vec![RebuildRing(k)]
        );
        assert_eq!(
            plan(&old, &cfg(&set("scheduler = \"round-robin\""))),
            vec![ConfigureVip(k), RebuildRing(k)]
        );
        let region = format!(
            "{ONE}\n[[vip.region]]\nname = \"r\"\nprefixes = [\"198.19.1.0/24\"]\nbackends = [\"198.18.2.1\"]\n"
        );
        assert_eq!(
            plan(&old, &cfg(&region)),
            vec![ConfigureVip(k), SetRegions(k), RebuildRing(k)]
        );
    }
}
