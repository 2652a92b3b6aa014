//! `lb explain --what-if EDIT`: the edit is parsed as the `lb` command that
//! would make it, and the agent predicts it (see `agent::what_if`).

use anyhow::{Result, bail};
use clap::Parser as _;

use crate::api::{self, Edit, Request};

use super::{
    args::{Cli, Cmd, Conn, VipCmd},
    backend_edit,
    render::{self, print_json},
};

/// How a `lb vip set` is reported: `VIP 198.18.0.100:80/tcp: ring_size = 1021`.
pub(super) fn vip_set_what(vip: &api::VipRef, settings: &[(String, String)]) -> String {
    format!(
        "VIP {vip}: {}",
        settings
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `lb explain --what-if EDIT`: `EDIT` is parsed as the `lb` command that
/// would make the change, and the agent predicts it.
pub(super) fn what_if_cmd(text: &str, conn: &Conn) -> Result<()> {
    let words = std::iter::once("lb").chain(text.split_whitespace());
    let usage = "--what-if takes a backend edit (`backend add|remove|drain|undrain|weight VIP ADDRESS ...`) \
                 or `vip set VIP ring_size=N`";
    let cli = Cli::try_parse_from(words).map_err(|e| {
        let first = e.to_string().lines().next().unwrap_or_default().to_string();
        anyhow::anyhow!("--what-if '{text}': {first}\n{usage}")
    })?;
    let (edit, what) = match cli.cmd {
        Cmd::Backend { cmd, .. } => {
            backend_edit(cmd).ok_or_else(|| anyhow::anyhow!("`{text}` edits nothing; {usage}"))?
        }
        Cmd::Vip {
            cmd: VipCmd::Set { vip, settings },
            ..
        } => {
            let what = vip_set_what(&vip, &settings);
            (Edit::VipSet { vip, settings }, what)
        }
        _ => bail!("`{text}` is no edit --what-if predicts; {usage}"),
    };
    let v = api::call(&conn.socket, &Request::WhatIf { edit })?;
    if conn.json {
        return print_json(&v);
    }
    let w: api::WhatIfInfo = serde_json::from_value(v)?;
    render::what_if(&w, &what);
    Ok(())
}
