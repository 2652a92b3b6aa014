//! `lb trace`: the filter from the command line, the tracer, and each
//! record explained as text or JSON (see `datapath::trace`).

use super::*;

/// `--vip ADDR[:PORT[/PROTO]]` and `--client ADDR[/LEN]` as a trace filter.
fn filter(
    vip: Option<String>,
    client: Option<String>,
    client_port: Option<u16>,
) -> Result<crate::datapath::trace::Filter> {
    use crate::vocab::Protocol;
    let mut f = crate::datapath::trace::Filter {
        client_port,
        ..Default::default()
    };
    if let Some(v) = vip {
        let (rest, proto) = match v.rsplit_once('/') {
            Some((r, p)) => (
                r.to_string(),
                Some(
                    p.parse::<Protocol>()
                        .map_err(|e| anyhow::anyhow!("--vip {v}: {e}"))?,
                ),
            ),
            None => (v.clone(), None),
        };
        if let Ok(sa) = rest.parse::<std::net::SocketAddr>() {
            (f.dst, f.dport) = (Some(sa.ip()), Some(sa.port()));
        } else {
            let a = rest.trim_start_matches('[').trim_end_matches(']');
            f.dst = Some(a.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--vip {v}: expected ADDR, ADDR:PORT or ADDR:PORT/PROTO ([v6]:PORT for IPv6)"
                )
            })?);
        }
        f.proto = proto;
    }
    if let Some(c) = client {
        let (a, len) = match c.split_once('/') {
            Some((a, l)) => (
                a,
                Some(
                    l.parse::<u8>()
                        .map_err(|_| anyhow::anyhow!("--client {c}: bad prefix length"))?,
                ),
            ),
            None => (c.as_str(), None),
        };
        let a: IpAddr = a
            .parse()
            .map_err(|_| anyhow::anyhow!("--client {c}: expected ADDR or ADDR/LEN"))?;
        f.client = Some((a, len.unwrap_or(if a.is_ipv4() { 32 } else { 128 })));
    }
    Ok(f)
}

pub(super) fn trace(
    instance: &str,
    vip: Option<String>,
    client: Option<String>,
    client_port: Option<u16>,
    count: usize,
    duration: f64,
    conn: &Conn,
) -> Result<()> {
    use crate::datapath::trace::{Tracer, explain};
    if duration.is_nan() || duration <= 0.0 {
        bail!("--duration must be positive");
    }
    let filter = filter(vip, client, client_port)?;
    // Backend names from the agent, if it answers; ids otherwise.
    let names: std::collections::HashMap<u32, IpAddr> =
        api::call(&conn.socket, &Request::BackendList { vip: None })
            .ok()
            .and_then(|v| serde_json::from_value::<Vec<api::BackendInfo>>(v).ok())
            .map(|l| l.into_iter().map(|b| (b.id, b.address)).collect())
            .unwrap_or_default();
    // The datapath traces packets for VIP addresses only; say so rather
    // than wait for records that cannot come.
    if let Some(dst) = filter.dst
        && let Ok(v) = api::call(&conn.socket, &Request::VipList)
        && let Ok(vips) = serde_json::from_value::<Vec<api::VipInfo>>(v)
        && !vips.iter().any(|v| v.vip.address == dst)
    {
        eprintln!(
            "note: {dst} is no VIP's address on this instance: its packets pass to the kernel \
             untouched (counted as pass_non_vip) and are not traced"
        );
    }
    let mut tracer = Tracer::start(instance, &filter)?;
    if !conn.json {
        eprintln!(
            "tracing instance `{instance}` (up to {count} packets or {duration} s; Ctrl-C stops)"
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(duration);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        // Ctrl-C (or SIGTERM) ends the trace cleanly: the tracer's drop
        // switches the datapath's filter off.
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::Relaxed))
            .context("installing the Ctrl-C handler")?;
    }
    let mut t0 = None;
    let mut seen = 0;
    while seen < count && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let until = deadline.min(std::time::Instant::now() + std::time::Duration::from_millis(200));
        let Some(r) = tracer.next(until) else {
            if std::time::Instant::now() >= deadline {
                break;
            }
            continue;
        };
        let t = *t0.get_or_insert(r.ts_ns);
        let e = explain(&r, t, |id| names.get(&id).copied());
        if conn.json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            println!("{e}");
        }
        seen += 1;
    }
    if !conn.json {
        eprintln!("{seen} packet(s) traced");
    }
    Ok(())
}
