//! What the kernel knows about links, routes and neighbours, read through
//! iproute2's JSON output. That is netlink, so it follows the caller's
//! network namespace; /sys follows the mount namespace instead (and under
//! `ip netns exec` or `agent.netns` the two differ).

use std::net::IpAddr;

/// Runs `cmd ARGS...`; its stdout, or an error with the command line and
/// its stderr. The one runner for `ip`, `sysctl`, `ethtool` and daemons.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -j ARGS...`, parsed; `None` if `ip` fails or prints no JSON.
pub fn json(args: &[&str]) -> Option<serde_json::Value> {
    let out = std::process::Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// `02:00:00:00:00:01` → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// An interface's own MAC and index.
pub fn link(dev: &str) -> Option<([u8; 6], u32)> {
    let links = json(&["link", "show", "dev", dev])?;
    let link = links.get(0)?;
    let mac = parse_mac(link.get("address")?.as_str()?)?;
    let ifindex = link.get("ifindex")?.as_u64()? as u32;
    Some((mac, ifindex))
}

/// The route towards `addr`: (egress device, next-hop address, which is the
/// gateway or `addr` itself when it is on-link).
pub fn route(addr: IpAddr) -> Option<(String, String)> {
    let routes = json(&["route", "get", &addr.to_string()])?;
    let r = routes.get(0)?;
    let dev = r.get("dev")?.as_str()?.to_string();
    let via = r
        .get("gateway")
        .and_then(|g| g.as_str())
        .map(str::to_string)
        .unwrap_or(addr.to_string());
    Some((dev, via))
}

/// The MAC of neighbour `via` on `dev`, if resolved (not FAILED or INCOMPLETE).
pub fn neighbour(via: &str, dev: &str) -> Option<[u8; 6]> {
    let neigh = json(&["neigh", "show", "to", via, "dev", dev])?;
    neigh
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n.get("state")
                .and_then(|s| s.as_array())
                .is_none_or(|s| !s.iter().any(|x| x == "FAILED" || x == "INCOMPLETE"))
        })
        .find_map(|n| n.get("lladdr").and_then(|m| m.as_str()).and_then(parse_mac))
}

#[cfg(test)]
mod tests {
    #[test]
    fn macs() {
        assert_eq!(
            super::parse_mac("02:00:0a:ff:00:01"),
            Some([2, 0, 0x0a, 0xff, 0, 1])
        );
        assert_eq!(super::parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(super::parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(super::parse_mac("zz:00:0a:ff:00:01"), None);
    }
}
