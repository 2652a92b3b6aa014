//! `lb backend-host`: the backend side of `ipip` and `gue` VIPs. It
//! attaches `lb_decap` to a backend's interface, where it strips the
//! balancer's IPIP/IP6IP6 header, or its outer IP, UDP and GUE headers (to
//! `--gue-port`), from packets to this host's addresses (everything else
//! passes untouched), and pins the link and its maps under
//! `/sys/fs/bpf/lb-backend/<instance>/`, as the agent pins the balancer: a
//! restarted `lb backend-host run` swaps its program into the pinned link
//! atomically (no packet meets a host without it) and keeps the counters.
//! While it runs it keeps the address list current (the interface's
//! addresses, unless given) and serves its counters on `/metrics`; stopped,
//! the program stays attached until `lb backend-host down`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, PerCpuArray},
};
use lb_common::decap_verdict;
use serde::{Deserialize, Serialize};

use crate::datapath::loader;
use crate::vocab::XdpMode;

/// What `lb backend-host run` attaches.
#[derive(Clone, Debug)]
pub struct Options {
    pub interface: String,
    /// The addresses the balancer encapsulates to (the backend's addresses
    /// in the VIPs' `[[vip.backend]]`); empty: every global address of
    /// `interface`, followed as it changes.
    pub addresses: Vec<IpAddr>,
    pub instance: String,
    pub xdp_mode: XdpMode,
    /// The UDP port `gue` packets arrive on (the balancers' `agent.gue_port`).
    pub gue_port: u16,
}

/// Where an instance's pins live.
pub fn pin_dir(instance: &str) -> PathBuf {
    std::path::Path::new("/sys/fs/bpf/lb-backend").join(instance)
}

const LINK: &str = "link";

/// Loads `lb_decap` (its maps from the pins), writes the address list and
/// attaches it to the interface, or swaps it into the link an earlier run
/// pinned. Returns the object (the caller keeps it while it updates the
/// addresses), the addresses and what was done.
pub fn attach(o: &Options) -> Result<(Ebpf, BTreeSet<IpAddr>, String)> {
    loader::ensure_bpffs()?;
    let dir = pin_dir(&o.instance);
    same_interface(o, &dir)?;
    let mut ebpf = loader::load_decap_pinned(&dir, o.gue_port)?;
    let addrs = wanted(o)?;
    sync_addrs(&mut ebpf, &addrs)?;
    let (_link, what) = loader::attach_pinned_program(
        &mut ebpf,
        lb_common::PROG_DECAP,
        &o.interface,
        o.xdp_mode,
        &dir,
        LINK,
    )
    .with_context(|| format!("attaching lb_decap to {}", o.interface))?;
    Ok((ebpf, addrs, what))
}

/// An instance's pinned link is swapped in place, whatever `--interface`
/// says: refuses when its program is not the one on the interface (the
/// instance runs on another one).
fn same_interface(o: &Options, dir: &std::path::Path) -> Result<()> {
    if !dir.join(LINK).exists() {
        return Ok(());
    }
    let pinned = aya::programs::ProgramInfo::from_pin(dir.join("prog"))
        .map(|i| i.id())
        .ok();
    let out = crate::host::iproute::run("ip", &["-j", "link", "show", "dev", &o.interface])
        .with_context(|| format!("no interface {}", o.interface))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    let on_it = v[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32);
    if pinned.is_some() && on_it == pinned {
        return Ok(());
    }
    bail!(
        "backend host `{}` is attached to another interface than {} (its program is not the one \
         there): give this interface its own --instance, or detach the other with `lb backend-host \
         down --instance {}`",
        o.instance,
        o.interface,
        o.instance
    )
}

/// The addresses to decapsulate for: the given ones, else the interface's.
fn wanted(o: &Options) -> Result<BTreeSet<IpAddr>> {
    if !o.addresses.is_empty() {
        return Ok(o.addresses.iter().copied().collect());
    }
    let a = interface_addrs(&o.interface)?;
    if a.is_empty() {
        bail!(
            "{} has no global address to decapsulate for: give one with --address (the backend's \
             address in the balancer's [[vip.backend]])",
            o.interface
        );
    }
    Ok(a)
}

/// Global-scope addresses of `dev` (iproute2's JSON).
fn interface_addrs(dev: &str) -> Result<BTreeSet<IpAddr>> {
    let out = crate::host::iproute::run("ip", &["-j", "addr", "show", "dev", dev])
        .with_context(|| format!("reading the addresses of {dev}"))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j addr")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().into_iter().flatten())
        .filter(|a| a["scope"] == "global")
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect())
}

fn key(a: &IpAddr) -> [u8; 16] {
    let mut k = [0u8; 16];
    match a {
        IpAddr::V4(v) => k[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => k = v.octets(),
    }
    k
}

/// Makes `DECAP_ADDRS` hold exactly `addrs`: new ones first, then the
/// stale ones out, so an address kept is never missing in between.
fn sync_addrs(ebpf: &mut Ebpf, addrs: &BTreeSet<IpAddr>) -> Result<()> {
    let name = lb_common::MAP_DECAP_ADDRS;
    let mut m: HashMap<_, [u8; 16], u32> = HashMap::try_from(
        ebpf.map_mut(name)
            .with_context(|| format!("the object has no map {name}"))?,
    )?;
    let want: BTreeSet<[u8; 16]> = addrs.iter().map(key).collect();
    for k in &want {
        m.insert(k, 1, 0)?;
    }
    let stale: Vec<[u8; 16]> = m
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !want.contains(k))
        .collect();
    for k in stale {
        m.remove(&k)?;
    }
    Ok(())
}

/// `lb backend-host stats`: the decap program's verdicts since its
/// instance was first attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Packets whose tunnel header was stripped.
    pub decapsulated: u64,
    /// Packets passed untouched (not a tunnel to this host).
    pub passed: u64,
    /// Tunnel packets too short or inconsistent to strip (passed as they are).
    pub malformed: u64,
    /// The second chance: packets with no connection here, forwarded once
    /// to the second hop their GUE header named.
    pub second_hop: u64,
    /// The second chance: no connection here and no route or neighbour to
    /// the second hop yet: delivered here.
    pub second_hop_unreachable: u64,
}

/// The counters of an instance, read from its pins (no daemon needed).
pub fn stats(instance: &str) -> Result<Stats> {
    let path = pin_dir(instance)
        .join("maps")
        .join(lb_common::MAP_DECAP_VERDICTS);
    let md = MapData::from_pin(&path).with_context(|| {
        format!(
            "no backend host `{instance}` here ({} is missing): start it with `lb backend-host run`",
            path.display()
        )
    })?;
    let m: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(md))?;
    let sum = |i: u32| -> Result<u64> { Ok(m.get(&i, 0)?.iter().sum()) };
    // An instance pinned by a version without the second chance has fewer
    // counters (they stay until `lb backend-host down`).
    let newer = |i: u32| sum(i).unwrap_or(0);
    Ok(Stats {
        decapsulated: sum(decap_verdict::DECAPSULATED)?,
        passed: sum(decap_verdict::PASS)?,
        malformed: sum(decap_verdict::MALFORMED)?,
        second_hop: newer(decap_verdict::SECOND_HOP),
        second_hop_unreachable: newer(decap_verdict::SECOND_HOP_UNREACHABLE),
    })
}

/// `lb backend-host down`: detaches the program and removes the pins.
pub fn down(instance: &str) -> Result<bool> {
    loader::remove_pins(&pin_dir(instance))
}

/// `lb backend-host run`: attaches (or adopts), then keeps the address
/// list current every 5 s and serves `/metrics` on `metrics_listen` until
/// SIGINT or SIGTERM; the program stays attached when it stops.
pub fn run(o: &Options, metrics_listen: Option<SocketAddr>) -> Result<()> {
    let (mut ebpf, mut addrs, what) = attach(o)?;
    tracing::info!(
        interface = %o.interface,
        instance = %o.instance,
        addresses = ?addrs,
        pins = %pin_dir(&o.instance).display(),
        "{what}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        if let Some(addr) = metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics on {addr}"))?;
            tracing::info!(url = %format!("http://{addr}/metrics"), "serving the decap counters");
            tokio::spawn(serve_metrics(l, o.instance.clone()));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    if !o.addresses.is_empty() {
                        continue;
                    }
                    match wanted(o).and_then(|now| {
                        if now != addrs {
                            sync_addrs(&mut ebpf, &now)?;
                            tracing::info!(addresses = ?now, "addresses to decapsulate for changed");
                            addrs = now;
                        }
                        Ok(())
                    }) {
                        Ok(()) => {}
                        Err(e) => tracing::warn!(error = format!("{e:#}"), "updating the addresses failed; the old ones stay"),
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    tracing::info!(
        "stopping; lb_decap stays attached (pinned), `lb backend-host down` detaches it"
    );
    Ok(())
}

/// `/metrics`: `lb_decap_packets_total{verdict}`.
async fn serve_metrics(listener: tokio::net::TcpListener, instance: String) {
    use axum::{http::StatusCode, response::IntoResponse, routing::get};
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let instance = instance.clone();
            async move {
                match stats(&instance) {
                    Ok(s) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics_text(&s),
                    )
                        .into_response(),
                    Err(e) => {
                        (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
                    }
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

/// The Prometheus text of `s`.
pub fn metrics_text(s: &Stats) -> String {
    let mut t = String::from(
        "# HELP lb_decap_packets Packets lb_decap saw on this backend host, by verdict.\n\
         # TYPE lb_decap_packets counter\n",
    );
    for (v, n) in [
        ("decapsulated", s.decapsulated),
        ("passed", s.passed),
        ("malformed", s.malformed),
        ("second_hop", s.second_hop),
        ("second_hop_unreachable", s.second_hop_unreachable),
    ] {
        t.push_str(&format!("lb_decap_packets_total{{verdict=\"{v}\"}} {n}\n"));
    }
    t.push_str("# EOF\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_as_prometheus_text() {
        let t = metrics_text(&Stats {
            decapsulated: 5,
            passed: 7,
            malformed: 1,
            second_hop: 3,
            second_hop_unreachable: 2,
        });
        assert!(t.contains("lb_decap_packets_total{verdict=\"decapsulated\"} 5\n"));
        assert!(t.contains("lb_decap_packets_total{verdict=\"malformed\"} 1\n"));
        assert!(t.contains("lb_decap_packets_total{verdict=\"second_hop\"} 3\n"));
        assert!(t.contains("lb_decap_packets_total{verdict=\"second_hop_unreachable\"} 2\n"));
    }

    #[test]
    fn address_keys_are_the_datapaths() {
        assert_eq!(key(&"198.18.2.1".parse().unwrap())[..5], [198, 18, 2, 1, 0]);
        assert_eq!(key(&"2001:2::1".parse().unwrap())[15], 1);
    }
}
