//! Writing runtime changes back into the configuration file, keeping the
//! user's comments and layout (toml_edit). The agent validates the edited
//! text with [`crate::config::parse`] before it applies or saves anything.

use std::{net::IpAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};

use serde::{Deserialize, Serialize};

use crate::vocab::{Forwarding, HashInput, VipRef};

/// Settings for `vip add` (the control API carries them, see `api`).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VipAdd {
    pub vip: VipRef,
    pub forwarding: Forwarding,
    pub hash: HashInput,
    pub ring_size: u32,
    pub flow_table: bool,
    /// Further VIP keys, as `lb vip set` takes them (`scheduler`,
    /// `health.interval_ms`, ...).
    #[serde(default)]
    pub settings: Vec<(String, String)>,
}

/// A change to the configuration: the one wire form of every edit (the
/// CLI's socket and the HTTP API). The agent applies it to the file's text,
/// validates the result like a file, applies it and saves it.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "edit", rename_all = "kebab-case")]
pub enum Edit {
    VipAdd(VipAdd),
    VipRemove {
        vip: VipRef,
    },
    /// Change VIP keys live (`KEY=VALUE`).
    VipSet {
        vip: VipRef,
        settings: Vec<(String, String)>,
    },
    BackendAdd {
        vip: VipRef,
        address: IpAddr,
        weight: u32,
        /// NAT VIPs: the backend's own port (absent or null: the VIP's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    BackendRemove {
        vip: VipRef,
        address: IpAddr,
    },
    /// Weight and/or drain of a backend (null: unchanged).
    BackendSet {
        vip: VipRef,
        address: IpAddr,
        weight: Option<u32>,
        drain: Option<bool>,
    },
}

fn vips(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables> {
    if doc.get("vip").is_none() {
        doc.insert("vip", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc.get_mut("vip")
        .and_then(Item::as_array_of_tables_mut)
        .context("`vip` in the config file is not an array of tables ([[vip]])")
}

fn matches(t: &Table, v: &VipRef) -> bool {
    let addr = t
        .get("address")
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse::<IpAddr>().ok());
    let port = t.get("port").and_then(|p| p.as_integer());
    let proto = t.get("protocol").and_then(|p| p.as_str()).unwrap_or("tcp");
    addr == Some(v.address) && port == Some(v.port as i64) && proto == v.protocol.name()
}

fn find_vip<'a>(doc: &'a mut DocumentMut, v: &VipRef) -> Result<&'a mut Table> {
    let arr = vips(doc)?;
    let idx = arr.iter().position(|t| matches(t, v));
    match idx {
        Some(i) => arr.get_mut(i).context("VIP vanished"),
        None => bail!("no VIP {v} in the configuration; `lb vip list` shows the VIPs"),
    }
}

fn backends(t: &mut Table) -> Result<&mut ArrayOfTables> {
    if t.get("backend").is_none() {
        t.insert("backend", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    t.get_mut("backend")
        .and_then(Item::as_array_of_tables_mut)
        .context("`backend` of this VIP is not an array of tables ([[vip.backend]])")
}

fn backend_index(arr: &ArrayOfTables, address: IpAddr) -> Option<usize> {
    arr.iter().position(|b| {
        b.get("address")
            .and_then(|a| a.as_str())
            .and_then(|a| a.parse::<IpAddr>().ok())
            == Some(address)
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
}

/// The VIP keys `lb vip set` (and `lb vip add`'s flags) may write, with
/// their TOML type. Address, port and protocol name the VIP: to change
/// them, remove it and add another.
const SETTABLE: &[(&str, Kind)] = &[
    ("forwarding", Kind::Str),
    ("hash", Kind::Str),
    ("scheduler", Kind::Str),
    ("ring_size", Kind::Int),
    ("flow_table", Kind::Bool),
    ("idle_timeout", Kind::Int),
    ("second_chance", Kind::Int),
    ("health.kind", Kind::Str),
    ("health.interval_ms", Kind::Int),
    ("health.timeout_ms", Kind::Int),
    ("health.rise", Kind::Int),
    ("health.fall", Kind::Int),
    ("health.port", Kind::Int),
    ("health.path", Kind::Str),
    ("health.expect_status", Kind::Str),
    ("health.via", Kind::Str),
];

/// Writes one VIP key; the value's meaning is checked afterwards by
/// [`crate::config::parse`] like any file's.
fn set_key(vip: &mut Table, key: &str, val: &str) -> Result<()> {
    let Some((_, kind)) = SETTABLE.iter().find(|(k, _)| *k == key) else {
        let all: Vec<&str> = SETTABLE.iter().map(|(k, _)| *k).collect();
        bail!(
            "`{key}` is not a VIP key `lb vip set` can change; one of: {}",
            all.join(", ")
        );
    };
    let v = match kind {
        Kind::Str => value(val),
        Kind::Int => value(
            val.parse::<i64>()
                .map_err(|_| anyhow::anyhow!("{key} takes a whole number, not `{val}`"))?,
        ),
        Kind::Bool => value(
            val.parse::<bool>()
                .map_err(|_| anyhow::anyhow!("{key} takes true or false, not `{val}`"))?,
        ),
    };
    let (table, key) = match key.split_once('.') {
        Some((sub, k)) => {
            if vip.get(sub).is_none() {
                vip.insert(sub, Item::Table(Table::new()));
            }
            let t = vip
                .get_mut(sub)
                .and_then(Item::as_table_mut)
                .with_context(|| format!("`{sub}` of this VIP is not a table"))?;
            (t, k)
        }
        None => (vip, key),
    };
    table.insert(key, v);
    Ok(())
}

/// Applies `edit` to the configuration text and returns the new text.
pub fn apply(text: &str, edit: &Edit) -> Result<String> {
    let mut doc: DocumentMut = text
        .parse()
        .context("the config file no longer parses as TOML")?;
    match edit {
        Edit::VipAdd(a) => {
            if vips(&mut doc)?.iter().any(|t| matches(t, &a.vip)) {
                bail!("VIP {} already exists", a.vip);
            }
            let mut t = Table::new();
            t.insert("address", value(a.vip.address.to_string()));
            t.insert("port", value(a.vip.port as i64));
            t.insert("protocol", value(a.vip.protocol.name()));
            t.insert("forwarding", value(a.forwarding.name()));
            t.insert("hash", value(a.hash.name()));
            t.insert("ring_size", value(a.ring_size as i64));
            t.insert("flow_table", value(a.flow_table));
            for (k, v) in &a.settings {
                set_key(&mut t, k, v)?;
            }
            vips(&mut doc)?.push(t);
        }
        Edit::VipSet { vip, settings } => {
            if settings.is_empty() {
                bail!("nothing to set: give KEY=VALUE pairs, e.g. `scheduler=least-connections`");
            }
            let t = find_vip(&mut doc, vip)?;
            for (k, v) in settings {
                set_key(t, k, v)?;
            }
        }
        Edit::VipRemove { vip: v } => {
            let arr = vips(&mut doc)?;
            let i = arr
                .iter()
                .position(|t| matches(t, v))
                .with_context(|| format!("no VIP {v} in the configuration"))?;
            arr.remove(i);
        }
        Edit::BackendAdd {
            vip,
            address,
            weight,
            port,
        } => {
            let arr = backends(find_vip(&mut doc, vip)?)?;
            if backend_index(arr, *address).is_some() {
                bail!("backend {address} is already in VIP {vip}");
            }
            let mut t = Table::new();
            t.insert("address", value(address.to_string()));
            if let Some(p) = port {
                t.insert("port", value(i64::from(*p)));
            }
            t.insert("weight", value(*weight as i64));
            arr.push(t);
        }
        Edit::BackendRemove { vip, address } => {
            let arr = backends(find_vip(&mut doc, vip)?)?;
            let i = backend_index(arr, *address)
                .with_context(|| format!("no backend {address} in VIP {vip}"))?;
            arr.remove(i);
        }
        Edit::BackendSet {
            vip,
            address,
            weight,
            drain,
        } => {
            let arr = backends(find_vip(&mut doc, vip)?)?;
            let i = backend_index(arr, *address)
                .with_context(|| format!("no backend {address} in VIP {vip}"))?;
            let t = arr.get_mut(i).context("backend vanished")?;
            if let Some(w) = weight {
                t.insert("weight", value(*w as i64));
            }
            match drain {
                Some(true) => {
                    t.insert("drain", value(true));
                }
                Some(false) => {
                    t.remove("drain");
                }
                None => {}
            }
        }
    }
    Ok(doc.to_string())
}

/// Replaces `path` with `text` atomically (write a sibling, then rename).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("toml.lb-tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# the LB
[agent]
interface = "eth1" # uplink

[[vip]]
# web
address = "198.18.0.100"
port = 80

[[vip.backend]]
address = "198.18.2.1" # rack 1
"#;

    #[test]
    fn backend_changes_keep_comments() {
        let vip: VipRef = "198.18.0.100:80".parse().unwrap();
        let t = apply(
            TEXT,
            &Edit::BackendAdd {
                vip: vip.clone(),
                address: "198.18.2.2".parse().unwrap(),
                weight: 3,
                port: None,
            },
        )
        .unwrap();
        assert!(
            t.contains("# rack 1") && t.contains("# uplink") && t.contains("# web"),
            "{t}"
        );
        let c = crate::config::parse(&t, "x").unwrap();
        assert_eq!(c.vips[0].backends.len(), 2);
        assert_eq!(c.vips[0].backends[1].weight, 3);
        let t = apply(
            &t,
            &Edit::BackendSet {
                vip: vip.clone(),
                address: "198.18.2.1".parse().unwrap(),
                weight: None,
                drain: Some(true),
            },
        )
        .unwrap();
        assert!(crate::config::parse(&t, "x").unwrap().vips[0].backends[0].drain);
        let t = apply(
            &t,
            &Edit::BackendRemove {
                vip: vip.clone(),
                address: "198.18.2.1".parse().unwrap(),
            },
        )
        .unwrap();
        let c = crate::config::parse(&t, "x").unwrap();
        assert_eq!(c.vips[0].backends.len(), 1);
        assert!(
            apply(
                &t,
                &Edit::BackendRemove {
                    vip,
                    address: "198.18.2.1".parse().unwrap()
                }
            )
            .unwrap_err()
            .to_string()
            .contains("no backend")
        );
    }

    #[test]
    fn vip_add_and_remove() {
        let add = VipAdd {
            vip: "[2001:2::100]:53/udp".parse().unwrap(),
            forwarding: crate::vocab::Forwarding::Ipip,
            hash: crate::vocab::HashInput::SourceIp,
            ring_size: 251,
            flow_table: false,
            settings: vec![("health.kind".into(), "http".into())],
        };
        let t = apply(TEXT, &Edit::VipAdd(add.clone())).unwrap();
        let c = crate::config::parse(&t, "x").unwrap();
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[1].ring_size, 251);
        assert!(
            apply(&t, &Edit::VipAdd(add.clone())).is_err(),
            "duplicate refused"
        );
        let t = apply(&t, &Edit::VipRemove { vip: add.vip }).unwrap();
        assert_eq!(crate::config::parse(&t, "x").unwrap().vips.len(), 1);
    }
}
