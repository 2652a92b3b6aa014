//! The lab's HTTP: a client that connects from a chosen address, reads a
//! response head, and the tiny server each lab backend runs (`lb lab serve`).

use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::sessions;

/// A TCP connection to `to` from local address `from` (any port), made in
/// the calling thread's network namespace.
pub(crate) fn connect_from(from: IpAddr, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    sock.bind(&SocketAddr::new(from, 0).into())?;
    sock.connect_timeout(&to.into(), timeout)?;
    Ok(sock.into())
}

/// The status line and headers of an HTTP/1.x response.
pub(crate) struct ResponseHead {
    pub code: u16,
    pub content_length: Option<usize>,
    /// The value of a `Set-Cookie: session=...` header, if any.
    pub session_cookie: Option<String>,
}

/// Reads a response's status line and headers from `r` (the body follows).
pub(crate) fn read_head(r: &mut impl BufRead) -> Result<ResponseHead> {
    let mut status = String::new();
    if r.read_line(&mut status)? == 0 {
        bail!("connection closed by the peer");
    }
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {status:?}"))?;
    let mut head = ResponseHead {
        code,
        content_length: None,
        session_cookie: None,
    };
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(v.trim().parse().context("bad Content-Length")?);
        } else if k.eq_ignore_ascii_case("set-cookie") {
            head.session_cookie = v
                .trim()
                .split(';')
                .next()
                .and_then(|kv| kv.strip_prefix("session="))
                .map(str::to_string);
        }
    }
    Ok(head)
}

/// One HTTP/1.0 GET over a new connection, optionally from a given local
/// address; returns the body.
pub fn http_get(to: &SocketAddr, from: Option<IpAddr>, path: &str) -> Result<String> {
    let timeout = Duration::from_millis(1000);
    let s = match from {
        None => TcpStream::connect_timeout(to, timeout)?,
        Some(src) => connect_from(src, *to, timeout)?,
    };
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut w = s.try_clone()?;
    write!(w, "GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let code = read_head(&mut r)?.code;
    let mut body = String::new();
    r.read_to_string(&mut body)?;
    if code != 200 {
        bail!("status {code}");
    }
    Ok(body.trim().to_string())
}

/// `lb lab serve`: the lab's backend HTTP server. `/` answers the server's
/// name; `/sleep?ms=N` answers it after N ms (a long request);
/// `/healthz` answers 200 (or 503 after `/admin/fail-health`, until
/// `/admin/ok`); `/admin/slow?ms=N` delays every answer by N ms;
/// `/admin/inflight` tells how many requests are being served;
/// `/session?store=local|redis` counts requests per session cookie (see
/// [`sessions`]; `redis` is the lab Redis's `ADDR:PORT`).
pub fn serve(name: &str, listen: &str, redis: Option<&str>) -> Result<()> {
    let sessions = Arc::new(sessions::Sessions::new(name, redis));
    let server = Arc::new(
        tiny_http::Server::http(listen)
            .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?,
    );
    let failing = Arc::new(AtomicBool::new(false));
    let slow_ms = Arc::new(AtomicU64::new(0));
    let inflight = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..64 {
        let server = server.clone();
        let failing = failing.clone();
        let slow_ms = slow_ms.clone();
        let inflight = inflight.clone();
        let sessions = sessions.clone();
        let name = name.to_string();
        threads.push(std::thread::spawn(move || {
            while let Ok(req) = server.recv() {
                let url = req.url().to_string();
                if url.starts_with("/session") {
                    let cookie = req
                        .headers()
                        .iter()
                        .find(|h| h.field.equiv("Cookie"))
                        .map(|h| h.value.as_str().to_string());
                    let (code, body, set) = sessions.handle(&url, cookie.as_deref());
                    let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
                    if let Some(id) = set {
                        resp = resp.with_header(
                            tiny_http::Header::from_bytes(
                                &b"Set-Cookie"[..],
                                format!("session={id}; Path=/").as_bytes(),
                            )
                            .expect("header"),
                        );
                    }
                    let _ = req.respond(resp);
                    continue;
                }
                inflight.fetch_add(1, Ordering::Relaxed);
                let (code, body) = match url.split('?').next().unwrap_or("") {
                    "/admin/inflight" => {
                        (200, format!("{}\n", inflight.load(Ordering::Relaxed) - 1))
                    }
                    "/sleep" => {
                        let ms = url
                            .split("ms=")
                            .nth(1)
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        std::thread::sleep(Duration::from_millis(ms));
                        (200, format!("{name}\n"))
                    }
                    "/healthz" if failing.load(Ordering::Relaxed) => (503, "failing\n".to_string()),
                    "/healthz" => (200, "ok\n".to_string()),
                    "/admin/fail-health" => {
                        failing.store(true, Ordering::Relaxed);
                        (200, "health now fails\n".into())
                    }
                    "/admin/ok" => {
                        failing.store(false, Ordering::Relaxed);
                        slow_ms.store(0, Ordering::Relaxed);
                        (200, "healthy\n".into())
                    }
                    "/admin/slow" => {
                        let ms = url
                            .split("ms=")
                            .nth(1)
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        slow_ms.store(ms, Ordering::Relaxed);
                        (200, format!("slow {ms} ms\n"))
                    }
                    _ => {
                        let ms = slow_ms.load(Ordering::Relaxed);
                        if ms > 0 {
                            std::thread::sleep(Duration::from_millis(ms));
                        }
                        (200, format!("{name}\n"))
                    }
                };
                let resp = tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(
                        tiny_http::Header::from_bytes(&b"X-Backend"[..], name.as_bytes())
                            .expect("header"),
                    );
                let _ = req.respond(resp);
                inflight.fetch_sub(1, Ordering::Relaxed);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
