//! VIP announcement. The agent decides *what* this node announces; the
//! routing daemon (BIRD) speaks BGP and BFD. The agent keeps one host route
//! per servable VIP address in a kernel table of its own (`announce.table`),
//! marked with route protocol [`RT_PROTO`]; BIRD's kernel protocol learns
//! that table and exports its routes to the upstream router.
//!
//! Kernel routes outlive the agent: a restarted agent finds them in place
//! and changes only the difference, so a restart withdraws nothing. `lb down`
//! and `lb node drain` remove them; when the node dies, BFD (or the BGP hold
//! timer) withdraws them on the router.
//!
//! Layout: [`desired`] (pure: which addresses to announce and why not),
//! [`Routes`] (the kernel side, over netlink), [`NodeFile`] (what outlives the
//! agent: table and drain state, for `lb down` and restarts).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{Context as _, Result};

use crate::host::netlink;

/// Route protocol number marking the agent's routes (`ip route ... proto 201`).
pub const RT_PROTO: u8 = 201;

/// Whether one VIP address is announced, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Announce,
    /// Not announced: the reason, for `lb status`.
    Withhold(&'static str),
}

/// One VIP as announcement sees it.
pub struct VipView {
    pub address: IpAddr,
    /// Backends that can take new flows (up, not draining, weight > 0).
    pub serving: usize,
    /// Backends still waiting for their first probe's verdict (for a
    /// bounded time: see `BackendRt::unsettled`).
    pub unsettled: usize,
}

/// Which VIP addresses this node should announce. An address is announced
/// when the node is not drained, the datapath is attached, and at least one
/// VIP on that address has a backend that takes new flows (several VIPs,
/// one per port, can share one address and so one route), and no VIP on
/// that address has a backend still waiting for its first verdict (a node
/// that starts or returns announces once it knows which backends serve,
/// not before: a node that announced sooner would take connections it
/// then sends to a backend that turns out dead, or refuses).
pub fn desired(vips: &[VipView], attached: bool, drained: bool) -> BTreeMap<IpAddr, Verdict> {
    let mut out: BTreeMap<IpAddr, Verdict> = BTreeMap::new();
    for v in vips {
        let verdict = if drained {
            Verdict::Withhold("node drained (`lb node resume` announces again)")
        } else if !attached {
            Verdict::Withhold("datapath not attached")
        } else if v.serving == 0 {
            Verdict::Withhold("no backend up")
        } else {
            Verdict::Announce
        };
        let e = out.entry(v.address).or_insert(verdict.clone());
        if verdict == Verdict::Announce {
            *e = Verdict::Announce;
        }
    }
    for v in vips {
        if v.unsettled > 0
            && let Some(e) = out.get_mut(&v.address)
            && *e == Verdict::Announce
        {
            *e = Verdict::Withhold("waiting for the first health verdicts");
        }
    }
    out
}

/// The agent's routes in one kernel table.
pub struct Routes {
    pub table: u32,
}

impl Routes {
    /// Addresses with a route of ours in the table.
    pub fn installed(&self) -> Result<BTreeSet<IpAddr>> {
        netlink::host_routes(self.table, RT_PROTO)
    }

    /// `ip route replace A/32 dev lo table T proto 201`.
    pub fn add(&self, a: IpAddr) -> Result<()> {
        netlink::replace_host_route(a, netlink::loopback()?, self.table, RT_PROTO)
    }

    /// `ip route del A/32 table T proto 201`.
    pub fn remove(&self, a: IpAddr) -> Result<()> {
        netlink::delete_host_route(a, self.table, RT_PROTO)
    }

    /// Makes the table hold exactly the addresses `want` announces;
    /// returns (added, removed).
    pub fn sync(&self, want: &BTreeMap<IpAddr, Verdict>) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
        let have = self.installed()?;
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for (a, v) in want {
            if *v == Verdict::Announce && !have.contains(a) {
                self.add(*a)?;
                added.push(*a);
            }
        }
        for a in &have {
            if want.get(a) != Some(&Verdict::Announce) {
                self.remove(*a)?;
                removed.push(*a);
            }
        }
        Ok((added, removed))
    }

    /// Removes every route of ours from the table.
    pub fn flush(&self) -> Result<usize> {
        let have = self.installed()?;
        for a in &have {
            self.remove(*a)?;
        }
        Ok(have.len())
    }
}

/// What outlives the agent for announcement: the table (so `lb down` can
/// withdraw without the config) and whether the node is drained (so a
/// restarted agent does not announce a drained node again).
pub struct NodeFile {
    path: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    pub table: u32,
    pub drained: bool,
    /// The network namespace the agent runs in (`agent.netns`), if any:
    /// its routes live there.
    pub netns: Option<String>,
}

impl NodeFile {
    pub fn of(instance: &str) -> Self {
        Self {
            path: PathBuf::from(format!("/run/lb/{instance}.announce")),
        }
    }

    pub fn read(&self) -> Option<NodeState> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let mut st = NodeState::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("table", v)) => st.table = v.trim().parse().ok()?,
                Some(("drained", v)) => st.drained = v.trim() == "1",
                Some(("netns", v)) if !v.trim().is_empty() => st.netns = Some(v.trim().into()),
                _ => {}
            }
        }
        (st.table != 0).then_some(st)
    }

    pub fn write(&self, st: &NodeState) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("announce.tmp");
        std::fs::write(
            &tmp,
            format!(
                "table={}\ndrained={}\nnetns={}\n",
                st.table,
                u8::from(st.drained),
                st.netns.as_deref().unwrap_or("")
            ),
        )?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &str, serving: usize) -> VipView {
        VipView {
            address: a.parse().unwrap(),
            serving,
            unsettled: 0,
        }
    }

    /// A backend without a verdict yet holds back its VIP's address, even
    /// when another VIP on it serves; once it has one, the address goes.
    #[test]
    fn waits_for_every_first_verdict_on_the_address() {
        let unsettled = VipView {
            unsettled: 1,
            ..v("198.18.0.100", 1)
        };
        let d = desired(
            &[v("198.18.0.100", 2), unsettled, v("198.18.0.101", 1)],
            true,
            false,
        );
        assert_eq!(
            d[&"198.18.0.100".parse().unwrap()],
            Verdict::Withhold("waiting for the first health verdicts")
        );
        assert_eq!(d[&"198.18.0.101".parse().unwrap()], Verdict::Announce);
    }

    #[test]
    fn announced_only_while_a_backend_serves() {
        let d = desired(&[v("198.18.0.100", 2), v("198.18.0.101", 0)], true, false);
        assert_eq!(d[&"198.18.0.100".parse().unwrap()], Verdict::Announce);
        assert_eq!(
            d[&"198.18.0.101".parse().unwrap()],
            Verdict::Withhold("no backend up")
        );
    }

    #[test]
    fn one_serving_port_keeps_the_shared_address() {
        let d = desired(
            &[
                v("198.18.0.100", 0),
                v("198.18.0.100", 1),
                v("198.18.0.100", 0),
            ],
            true,
            false,
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[&"198.18.0.100".parse().unwrap()], Verdict::Announce);
    }

    #[test]
    fn drained_or_detached_node_announces_nothing() {
        let vips = [v("198.18.0.100", 3), v("2001:2::100", 3)];
        for (attached, drained) in [(true, true), (false, false)] {
            let d = desired(&vips, attached, drained);
            assert!(d.values().all(|x| *x != Verdict::Announce), "{d:?}");
        }
        assert!(matches!(
            desired(&vips, true, true)[&"2001:2::100".parse().unwrap()],
            Verdict::Withhold(r) if r.contains("drained")
        ));
    }
}
