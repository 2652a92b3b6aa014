//! The control socket: one JSON request per line (see `api`), parsed
//! before anything is decided, and the edits and reloads it triggers, each
//! applied under the state lock from reading the file to saving it.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::api::{Request, Response};
use crate::config;
use crate::config::edit::{self, Edit};

use super::health_task::spawn_probe;
use super::{Shared, lock};

pub(super) fn reload(shared: &Shared) -> Result<()> {
    // The state lock is held from reading the file to applying it, so a
    // reload and a CLI edit cannot interleave.
    let spawns = {
        let mut s = lock(shared)?;
        let path = s.cfg_path.clone();
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {file}"))?;
        let cfg = config::parse(&text, &file)?;
        check_settings(&s.cfg.agent, &cfg.agent, &text, &file)?;
        s.reconcile(cfg)?
    };
    for s in spawns {
        spawn_probe(s);
    }
    Ok(())
}

/// Refuses, before anything changes, an `agent.*` setting the running
/// agent cannot take on, at the place in the file that sets it.
fn check_settings(old: &config::Agent, new: &config::Agent, text: &str, file: &str) -> Result<()> {
    match super::plan::plan_settings(old, new) {
        Ok(_) => Ok(()),
        Err(r) => Err(config::error_at_key(
            text,
            file,
            "agent",
            r.key,
            format!("agent.{}: {}", r.key, r.why),
        )
        .into()),
    }
}

/// Applies a CLI change: edit the file's text, validate it like a file,
/// save it atomically, then reconcile (a failed save leaves the datapath as
/// it was; a failed reconcile puts the old text back). The whole read →
/// edit → validate → save → apply runs under the state lock: the agent is
/// the file's only writer, and two concurrent edits are applied one after
/// the other, never one over the other.
pub(super) fn change(shared: &Shared, edit: Edit) -> Result<()> {
    let spawns = {
        let mut s = lock(shared)?;
        let path = s.cfg_path.clone();
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {file}"))?;
        let new_text = edit::apply(&text, &edit)?;
        let cfg = config::parse(&new_text, &file)?;
        check_settings(&s.cfg.agent, &cfg.agent, &new_text, &file)?;
        edit::write_atomic(&path, &new_text)?;
        match s.reconcile(cfg) {
            Ok(spawns) => spawns,
            Err(e) => {
                return Err(match edit::write_atomic(&path, &text) {
                    Ok(()) => e.context(format!("the change was not applied; {file} is as it was")),
                    Err(w) => e.context(format!(
                        "the change was not applied, and putting {file} back failed too ({w:#}): \
                         the file holds the change"
                    )),
                });
            }
        }
    };
    for s in spawns {
        spawn_probe(s);
    }
    Ok(())
}

pub(super) async fn serve_api(listener: UnixListener, shared: Shared, stop: Arc<Notify>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            // Only a request that parses as `Shutdown` stops the agent; the
            // word inside another request's arguments is just data.
            let parsed = serde_json::from_str::<Request>(&line);
            let shutdown = matches!(parsed, Ok(Request::Shutdown));
            let resp = match parsed {
                Err(e) => Response {
                    ok: false,
                    error: Some(format!("bad request: {e}")),
                    data: Default::default(),
                },
                Ok(req) => {
                    let sh = shared.clone();
                    let r = tokio::task::spawn_blocking(move || handle(&sh, req)).await;
                    match r {
                        Ok(Ok(data)) => Response {
                            ok: true,
                            error: None,
                            data,
                        },
                        Ok(Err(e)) => Response {
                            ok: false,
                            error: Some(format!("{e:#}")),
                            data: Default::default(),
                        },
                        Err(e) => Response {
                            ok: false,
                            error: Some(e.to_string()),
                            data: Default::default(),
                        },
                    }
                }
            };
            let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
            if shutdown {
                stop.notify_one();
            }
        });
    }
}

pub(super) fn handle(shared: &Shared, req: Request) -> Result<serde_json::Value> {
    use serde_json::to_value;
    Ok(match req {
        Request::Status => to_value(lock(shared)?.status())?,
        Request::VipList => to_value(lock(shared)?.vip_list())?,
        Request::BackendList { vip } => {
            let s = lock(shared)?;
            if let Some(v) = &vip {
                s.find_vip(v)?;
            }
            to_value(s.backend_list(vip.as_ref()))?
        }
        Request::Health => to_value(lock(shared)?.backend_list(None))?,
        Request::Stats => to_value(lock(shared)?.stats()?)?,
        Request::Edit(edit) => {
            let what = serde_json::to_string(&edit).unwrap_or_default();
            match change(shared, edit) {
                Ok(()) => tracing::info!(edit = %what, "change applied and saved"),
                Err(e) => {
                    tracing::warn!(edit = %what, error = format!("{e:#}"), "change refused, nothing changed");
                    return Err(e);
                }
            }
            serde_json::Value::Null
        }
        Request::Reload => {
            match reload(shared) {
                Ok(()) => tracing::info!(source = "lb reload", "configuration reloaded"),
                Err(e) => {
                    tracing::warn!(
                        source = "lb reload",
                        error = format!("{e:#}"),
                        "reload refused, nothing changed"
                    );
                    return Err(e);
                }
            }
            serde_json::Value::Null
        }
        Request::Explain { vip, client } => to_value(lock(shared)?.explain(&vip, client)?)?,
        Request::WhatIf { edit } => to_value(lock(shared)?.what_if(&edit)?)?,
        Request::NodeDrain => {
            lock(shared)?.set_drained(true)?;
            serde_json::Value::Null
        }
        Request::NodeResume => {
            lock(shared)?.set_drained(false)?;
            serde_json::Value::Null
        }
        Request::Shutdown => serde_json::Value::Null,
    })
}
