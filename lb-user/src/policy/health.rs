//! Health checks: the rise/fall state machine (pure) and the probes (tokio).
//!
//! A backend starts unchecked (no new flows): its first probe decides, up
//! at once if it succeeds (one probe, not `rise`), down otherwise. Then
//! `fall` failed probes in a row take it down, `rise` good ones bring it
//! back; every transition carries the reason of the last probe so the
//! agent can log it.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

use crate::vocab::CheckKind;

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Fail(String),
}

/// A change of a backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
    /// The first verdict of an unchecked backend: up (it takes new flows
    /// from now on) or down.
    Checked {
        up: bool,
    },
}

/// Rise/fall counting for one backend.
#[derive(Clone, Debug)]
pub struct HealthState {
    pub up: bool,
    /// Whether any probe has given a verdict (see the module).
    checked: bool,
    rise: u32,
    fall: u32,
    good: u32,
    bad: u32,
}

impl HealthState {
    /// Not probed yet: down until its first probe succeeds.
    pub fn unchecked(rise: u32, fall: u32) -> Self {
        Self {
            up: false,
            checked: false,
            rise: rise.max(1),
            fall: fall.max(1),
            good: 0,
            bad: 0,
        }
    }

    /// A state already known (an adopted datapath's, or no checks at all).
    pub fn known(up: bool, rise: u32, fall: u32) -> Self {
        Self {
            up,
            checked: true,
            ..Self::unchecked(rise, fall)
        }
    }

    /// Whether a probe (or the state it was adopted with) gave a verdict.
    pub fn checked(&self) -> bool {
        self.checked
    }

    /// Records one probe result; returns the transition it caused, if any.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        if !self.checked {
            self.checked = true;
            self.up = ok;
            (self.good, self.bad) = if ok { (1, 0) } else { (0, 1) };
            return Some(Transition::Checked { up: ok });
        }
        if ok {
            self.bad = 0;
            self.good = self.good.saturating_add(1);
            if !self.up && self.good >= self.rise {
                self.up = true;
                return Some(Transition::Up);
            }
        } else {
            self.good = 0;
            self.bad = self.bad.saturating_add(1);
            if self.up && self.bad >= self.fall {
                self.up = false;
                return Some(Transition::Down);
            }
        }
        None
    }
}

/// Runs one probe of `kind` against `addr` within `limit`.
pub async fn probe(kind: &CheckKind, addr: SocketAddr, limit: Duration) -> Outcome {
    match kind {
        CheckKind::None => Outcome::Ok,
        CheckKind::Tcp => match timeout(limit, TcpStream::connect(addr)).await {
            Err(_) => Outcome::Fail("timeout".into()),
            Ok(Err(e)) => Outcome::Fail(io_reason(&e)),
            Ok(Ok(_)) => Outcome::Ok,
        },
        CheckKind::Http { path, status } => match timeout(limit, http_status(addr, path)).await {
            Err(_) => Outcome::Fail("timeout".into()),
            Ok(Err(e)) => Outcome::Fail(io_reason(&e)),
            Ok(Ok(code)) if (status.0..=status.1).contains(&code) => Outcome::Ok,
            Ok(Ok(code)) => Outcome::Fail(format!("status {code}")),
        },
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        std::io::ErrorKind::ConnectionReset => "reset".into(),
        _ => e.to_string(),
    }
}

/// `GET path` over HTTP/1.0 and the status code of the answer. A health
/// probe needs only the status line, so this stays a few lines rather than
/// pulling an HTTP client into the agent.
async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let code = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP status line")
        })?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut h = HealthState::known(true, 2, 3);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(Transition::Down));
        assert_eq!(h.observe(false), None, "no repeated transition");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(Transition::Up));
        assert!(h.up);
    }

    #[test]
    fn flapping_resets_the_streaks() {
        let mut h = HealthState::known(true, 2, 2);
        for _ in 0..10 {
            assert_eq!(h.observe(false), None);
            assert_eq!(h.observe(true), None);
        }
        assert!(h.up, "alternating results never reach fall=2");
        h.observe(false);
        assert_eq!(h.observe(false), Some(Transition::Down));
        for _ in 0..10 {
            assert_eq!(h.observe(true), None);
            assert_eq!(h.observe(false), None);
        }
        assert!(!h.up);
    }

    /// The first probe decides at once, either way; after a failed first
    /// probe the backend needs `rise` good ones like any down backend.
    #[test]
    fn an_unchecked_backend_is_decided_by_its_first_probe() {
        let mut h = HealthState::unchecked(3, 3);
        assert!(!h.up && !h.checked());
        assert_eq!(h.observe(true), Some(Transition::Checked { up: true }));
        assert!(h.up && h.checked());
        assert_eq!(h.observe(false), None, "then fall as usual");

        let mut h = HealthState::unchecked(2, 3);
        assert_eq!(h.observe(false), Some(Transition::Checked { up: false }));
        assert!(!h.up && h.checked());
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(Transition::Up), "rise = 2");
    }

    #[tokio::test]
    async fn tcp_probe_reports_refused_and_ok() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(
            probe(&CheckKind::Tcp, addr, Duration::from_secs(1)).await,
            Outcome::Ok
        );
        drop(l);
        assert_eq!(
            probe(&CheckKind::Tcp, addr, Duration::from_secs(1)).await,
            Outcome::Fail("refused".into())
        );
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for code in [200, 503] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 256];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let kind = CheckKind::Http {
            path: "/healthz".into(),
            status: (200, 399),
        };
        assert_eq!(
            probe(&kind, addr, Duration::from_secs(2)).await,
            Outcome::Ok
        );
        assert_eq!(
            probe(&kind, addr, Duration::from_secs(2)).await,
            Outcome::Fail("status 503".into())
        );
    }

    /// On tokio's paused clock: a backend that accepts but never answers
    /// fails its http probe with "timeout" after exactly the probe's limit,
    /// and `fall` such probes take it down.
    #[tokio::test(start_paused = true)]
    async fn silent_backend_times_out_and_falls() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s); // accept, never answer
            }
        });
        let kind = CheckKind::Http {
            path: "/healthz".into(),
            status: (200, 399),
        };
        let mut h = HealthState::known(true, 2, 3);
        let t0 = tokio::time::Instant::now();
        let mut down_after = None;
        for i in 1..=3 {
            let r = probe(&kind, addr, Duration::from_millis(150)).await;
            assert_eq!(r, Outcome::Fail("timeout".into()));
            if h.observe(false) == Some(Transition::Down) {
                down_after = Some(i);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(down_after, Some(3), "down after `fall` = 3 timeouts");
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(3 * (150 + 50)),
            "virtual time: 3 probes of 150 ms + 50 ms gaps"
        );
    }
}
