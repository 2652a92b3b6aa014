//! This node's announcement state: what [`super::announce`] should keep
//! in the kernel table, `lb node drain`/`resume`, and the warning for
//! schedulers that are not consistent across nodes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{Result, bail};

use crate::config::{self, Config};

use super::announce;
use super::state::{State, vip_ref};

/// Schedulers whose choice depends on this node's own state pick different
/// backends on different nodes: a flow that ECMP moves loses its backend.
pub(super) fn warn_multi_node(cfg: &Config) {
    if cfg.announce.is_none() {
        return;
    }
    for v in &cfg.vips {
        if v.scheduler != crate::policy::sched::Scheduler::Maglev {
            tracing::warn!(
                vip = %vip_ref(v),
                scheduler = v.scheduler.name(),
                "scheduler not consistent across nodes while announcing: a flow moved to another node by ECMP \
                 may reach another backend; use \"maglev\""
            );
        }
    }
}

impl State {
    /// Switches announcement on, off, or to another table (withdrawing
    /// from the old one).
    pub(super) fn set_announce(&mut self, cfg: Option<&config::Announce>) -> Result<()> {
        let file = announce::NodeFile::of(&self.cfg.agent.instance);
        if let Some(old) = &self.announce
            && cfg.is_none_or(|c| c.table != old.table)
        {
            let n = old.flush()?;
            tracing::info!(
                routes = n,
                table = old.table,
                "announcement: withdrew every route"
            );
            file.remove();
        }
        self.announce = cfg.map(|c| announce::Routes { table: c.table });
        if let Some(c) = cfg {
            file.write(&announce::NodeState {
                table: c.table,
                drained: self.drained,
                netns: self.cfg.agent.netns.clone(),
            })?;
        }
        Ok(())
    }

    /// Per VIP address: announced, or why not.
    pub(super) fn announce_view(&self) -> BTreeMap<IpAddr, announce::Verdict> {
        let now = std::time::Instant::now();
        let views: Vec<announce::VipView> = self
            .vips
            .iter()
            .map(|v| announce::VipView {
                address: v.cfg.address,
                serving: v.backends.iter().filter(|b| b.in_ring()).count(),
                unsettled: v.backends.iter().filter(|b| b.unsettled(now)).count(),
            })
            .collect();
        announce::desired(&views, self.attached, self.drained)
    }

    /// Brings the kernel's announce table in line with what this node can
    /// serve; logs every change. Does nothing before the datapath is
    /// attached, so a restarting agent withdraws nothing.
    pub(super) fn sync_announce(&mut self) {
        let Some(routes) = &self.announce else { return };
        if !self.attached {
            return;
        }
        let view = self.announce_view();
        match routes.sync(&view) {
            Ok((added, removed)) => {
                for a in added {
                    tracing::info!(address = %a, table = routes.table, "announcement: announced");
                }
                for a in removed {
                    let why = match view.get(&a) {
                        Some(announce::Verdict::Withhold(r)) => *r,
                        _ => "no VIP on this address",
                    };
                    tracing::info!(address = %a, table = routes.table, reason = why, "announcement: withdrawn");
                }
            }
            Err(e) => tracing::error!(
                table = routes.table,
                error = format!("{e:#}"),
                "announcement: updating the table failed"
            ),
        }
    }

    pub(super) fn set_drained(&mut self, drained: bool) -> Result<()> {
        let Some(routes) = &self.announce else {
            bail!(
                "announcement is off: add an [announce] section to the config to use `lb node drain`"
            );
        };
        self.drained = drained;
        announce::NodeFile::of(&self.cfg.agent.instance).write(&announce::NodeState {
            table: routes.table,
            drained,
            netns: self.cfg.agent.netns.clone(),
        })?;
        if drained {
            tracing::info!("node drained: withdrawing every VIP");
        } else {
            tracing::info!("node resumed: announcing the VIPs it can serve");
        }
        self.sync_announce();
        Ok(())
    }
}
