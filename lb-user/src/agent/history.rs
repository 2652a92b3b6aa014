//! The second chance's memory on disk: for each VIP whose ring changed, the
//! backends (address, weight) of the ring before the change and until when
//! (wall clock) it counts, in `/var/lib/lb/<instance>.previous-rings.json`.
//! A node that starts without a datapath to adopt (a reboot empties bpffs)
//! knows no previous ring of its own; with this file it takes the one it
//! had before, for what is left of `second_chance`, once every backend has
//! its first verdict. A missing or unreadable file is an empty memory (a
//! warning, not an error: the second chance is a help, not a duty).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// A VIP's previous ring, by its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    /// Seconds since the Unix epoch until which it counts.
    pub(super) until_unix: u64,
    /// (address, weight) of the ring's backends.
    pub(super) backends: Vec<(IpAddr, u32)>,
}

pub(super) struct History {
    path: PathBuf,
    vips: BTreeMap<String, Record>,
}

/// Where instance `instance` keeps it.
pub fn path_of(instance: &str) -> PathBuf {
    Path::new("/var/lib/lb").join(format!("{instance}.previous-rings.json"))
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl History {
    pub(super) fn load(instance: &str) -> Self {
        let path = path_of(instance);
        let vips = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "previous rings unreadable: starting without");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Self { path, vips }
    }

    /// VIP `vip`'s previous ring and the seconds it still counts, if any.
    pub(super) fn get(&self, vip: &str) -> Option<(&Record, u64)> {
        let r = self.vips.get(vip)?;
        let left = r.until_unix.saturating_sub(now_unix());
        (left > 0).then_some((r, left))
    }

    /// Remembers VIP `vip`'s previous ring (expired ones are forgotten).
    pub(super) fn set(&mut self, vip: &str, record: Record) {
        let now = now_unix();
        self.vips.retain(|_, r| r.until_unix > now);
        self.vips.insert(vip.to_string(), record);
        if let Err(e) = self.save() {
            tracing::warn!(file = %self.path.display(), error = %e, "could not keep the previous rings");
        }
    }

    fn save(&self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.vips)?)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_forgets_expired_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("lb-history-{}", std::process::id()));
        let mut h = History {
            path: dir.join("x.previous-rings.json"),
            vips: BTreeMap::new(),
        };
        let rec = |until_unix| Record {
            until_unix,
            backends: vec![("198.18.0.31".parse().unwrap(), 1)],
        };
        h.vips.insert("old".into(), rec(1));
        h.set("198.18.0.100:80/tcp", rec(now_unix() + 60));
        assert!(
            h.get("198.18.0.100:80/tcp")
                .is_some_and(|(_, left)| left > 50)
        );
        assert!(!h.vips.contains_key("old"), "an expired ring is forgotten");
        let back: BTreeMap<String, Record> =
            serde_json::from_str(&std::fs::read_to_string(&h.path).unwrap()).unwrap();
        assert_eq!(back, h.vips);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
