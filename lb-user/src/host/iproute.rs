//! Running commands (`ip`, `sysctl`, `ethtool`, daemons) for the lab, the
//! demo and the tests. The agent asks the kernel through [`crate::host::netlink`].

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

/// `02:00:00:00:00:01` → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
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
