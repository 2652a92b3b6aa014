//! wrk, the HTTP load generator, run in a namespace and read: for the
//! benchmarks (`tests/bench.rs`) and the lab's NAT scenario.

use std::process::Command;

/// Busy CPU time of the whole VM so far, in seconds (/proc/stat: user,
/// nice, system, irq, softirq; XDP runs in softirq).
pub fn busy_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum::<f64>();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    busy / hz.max(1.0)
}

/// One wrk run: requests/s, p50 and p99 latency in ms, and the whole VM's
/// busy CPU microseconds per request (clients, balancer and backends share
/// it, so differences between paths are the paths' own cost).
pub type WrkRun = (f64, f64, f64, f64, f64);

/// One wrk run: (requests/s, p50 ms, p99 ms, VM CPU µs per request, errors:
/// connect, write and timeout errors plus non-2xx/3xx answers). Fails loudly when wrk is
/// missing, exits with an error, or reports no request.
pub fn wrk(ns: &str, url: &str, secs: u32) -> WrkRun {
    // `timeout`: wrk can hang past its duration when nothing connects.
    let limit = (secs + 10).to_string();
    let cpu0 = busy_cpu_s();
    let out = Command::new("timeout")
        .args([
            limit.as_str(),
            "ip",
            "netns",
            "exec",
            ns,
            "wrk",
            "-t2",
            "-c32",
            &format!("-d{secs}s"),
            "--latency",
        ])
        .args(["-H", "Connection: close", url])
        .output()
        .expect("running timeout/ip/wrk");
    let cpu = busy_cpu_s() - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk against {url} failed ({}; `cargo xtask setup` installs wrk): {}{}",
        out.status,
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let ms = |s: &str| -> f64 {
        let s = s.trim();
        if let Some(v) = s.strip_suffix("us") {
            v.parse::<f64>().unwrap_or(f64::NAN) / 1000.0
        } else if let Some(v) = s.strip_suffix("ms") {
            v.parse().unwrap_or(f64::NAN)
        } else if let Some(v) = s.strip_suffix('s') {
            v.parse::<f64>().unwrap_or(f64::NAN) * 1000.0
        } else {
            f64::NAN
        }
    };
    let mut rps = f64::NAN;
    let (mut p50, mut p99) = (f64::NAN, f64::NAN);
    let mut requests = f64::NAN;
    let mut errors = 0.0;
    for line in text.lines() {
        let l = line.trim();
        // "Socket errors: connect 0, read 3, write 0, timeout 1" and
        // "Non-2xx or 3xx responses: 5". Read errors are left out: with
        // `Connection: close` wrk counts every connection the server closes
        // first as one, whoever serves.
        if let Some(v) = l.strip_prefix("Socket errors:") {
            errors += v
                .split(',')
                .filter_map(|p| {
                    let mut w = p.split_whitespace();
                    let kind = w.next()?;
                    let n = w.next()?.parse::<f64>().ok()?;
                    (kind != "read").then_some(n)
                })
                .sum::<f64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<f64>().unwrap_or(0.0);
        }
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("50%") {
            p50 = ms(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            p99 = ms(v);
        } else if l.contains(" requests in ") {
            requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(f64::NAN);
        }
    }
    assert!(
        rps.is_finite() && rps > 0.0 && requests > 0.0 && p50.is_finite() && p99.is_finite(),
        "wrk against {url} measured nothing: {text}"
    );
    if errors > 0.0 {
        // Which kind, for whoever reads a failed test's output.
        println!("wrk against {url} counted {errors} errors:\n{text}");
    }
    (rps, p50, p99, cpu * 1e6 / requests, errors)
}
