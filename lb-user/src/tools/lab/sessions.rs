//! Sessions for the lab's backend servers: `/session?store=local|redis`
//! counts requests per session (named by a `session` cookie the server sets
//! on the first request). `local` keeps the counter in the server's own
//! memory, as a stateful server would; `redis` keeps it in the lab's Redis,
//! so any backend continues any session. Also the Redis server the lab
//! starts in its own namespace, and the client side of a session.

use std::{
    collections::HashMap,
    io::{BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Lab, VIP4, client4, connect_from, in_netns, read_head, run_ok};

pub const REDIS4: &str = "198.18.0.40";
pub const REDIS6: &str = "2001:2::40";
pub const REDIS_PORT: u16 = 6379;

/// Where a backend keeps its session counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Local,
    Redis,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Local => "local",
            Store::Redis => "redis",
        }
    }
}

/// The server side: one per backend process.
pub struct Sessions {
    name: String,
    local: Mutex<HashMap<String, u64>>,
    redis_url: Option<String>,
    seq: AtomicU64,
}

impl Sessions {
    pub fn new(name: &str, redis: Option<&str>) -> Self {
        Self {
            name: name.to_string(),
            local: Mutex::new(HashMap::new()),
            redis_url: redis.map(|a| format!("redis://{a}/")),
            seq: AtomicU64::new(0),
        }
    }

    /// Handles `/session?store=...` with the request's `Cookie` header:
    /// (status, body "NAME COUNT", cookie to set if the session is new).
    pub fn handle(&self, url: &str, cookie: Option<&str>) -> (u16, String, Option<String>) {
        let store = if url.contains("store=redis") {
            Store::Redis
        } else {
            Store::Local
        };
        let (id, new) = match cookie
            .into_iter()
            .flat_map(|c| c.split(';'))
            .find_map(|kv| kv.trim().strip_prefix("session="))
        {
            Some(id) if !id.is_empty() => (id.to_string(), false),
            _ => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                (format!("{}-{nanos:x}-{n}", self.name), true)
            }
        };
        let count = match store {
            Store::Local => {
                let mut m = self.local.lock().unwrap_or_else(|e| e.into_inner());
                let c = m.entry(id.clone()).or_insert(0);
                *c += 1;
                Ok(*c)
            }
            Store::Redis => self.incr_redis(&id),
        };
        match count {
            Ok(c) => (200, format!("{} {c}\n", self.name), new.then_some(id)),
            Err(e) => (503, format!("{} store: {e:#}\n", store.name()), None),
        }
    }

    fn incr_redis(&self, id: &str) -> Result<u64> {
        let url = self
            .redis_url
            .as_deref()
            .context("no Redis configured (lb lab serve --redis ADDR:PORT)")?;
        let client = redis::Client::open(url)?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(1))?;
        let n: u64 = redis::cmd("INCR")
            .arg(format!("lb-lab:session:{id}"))
            .query(&mut con)?;
        Ok(n)
    }
}

/// One answer of a session request.
#[derive(Clone, Debug)]
pub struct SessionReply {
    pub backend: String,
    pub count: u64,
}

/// A client's session: each [`Session::request`] is a new TCP connection
/// from the client's address carrying the session cookie.
pub struct Session {
    pub client: IpAddr,
    ns: String,
    store: Store,
    cookie: Option<String>,
}

impl Session {
    /// Client `c`'s address `k` (IPv4), counters kept in `store`.
    pub fn new(lab: &Lab, c: usize, k: usize, store: Store) -> Result<Self> {
        Ok(Self {
            client: client4(c, k).parse()?,
            ns: lab.client_ns(c),
            store,
            cookie: None,
        })
    }

    pub fn request(&mut self) -> Result<SessionReply> {
        let vip: SocketAddr = format!("{VIP4}:80").parse()?;
        let (src, store) = (self.client, self.store.name());
        let cookie = self.cookie.clone();
        let (code, set_cookie, body) = in_netns(&self.ns, || -> Result<_> {
            let s = connect_from(src, vip, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut w = s.try_clone()?;
            let c = cookie
                .map(|c| format!("Cookie: session={c}\r\n"))
                .unwrap_or_default();
            write!(
                w,
                "GET /session?store={store} HTTP/1.0\r\nHost: lab\r\n{c}\r\n"
            )?;
            let mut r = BufReader::new(s);
            let head = read_head(&mut r)?;
            let mut body = String::new();
            r.read_to_string(&mut body)?;
            Ok((head.code, head.session_cookie, body))
        })??;
        if code != 200 {
            bail!("status {code}: {}", body.trim());
        }
        if set_cookie.is_some() {
            self.cookie = set_cookie;
        }
        let (backend, count) = body
            .trim()
            .split_once(' ')
            .with_context(|| format!("unexpected session answer {body:?}"))?;
        Ok(SessionReply {
            backend: backend.to_string(),
            count: count.parse().context("session count")?,
        })
    }
}

impl Lab {
    /// The lab's Redis: its own namespace `<p>-rd` on the segment.
    pub fn redis_ns(&self) -> String {
        self.ns("rd")
    }

    /// Starts Redis (no persistence) in `<p>-rd`, bound to [`REDIS4`] and
    /// [`REDIS6`], and waits until it answers.
    pub(crate) fn start_redis(&self) -> Result<()> {
        let ns = self.redis_ns();
        let pid = self.run_dir().join("redis.pid");
        let log = self.run_dir().join("redis.log");
        let bind = format!("{REDIS4} {REDIS6}");
        let port = REDIS_PORT.to_string();
        run_ok(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "redis-server",
                "--bind",
                &bind,
                "--port",
                &port,
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "yes",
                "--pidfile",
                &pid.display().to_string(),
                "--logfile",
                &log.display().to_string(),
            ],
        )
        .context("starting redis-server (`cargo xtask setup` installs it)")?;
        let t0 = Instant::now();
        let addr: SocketAddr = format!("{REDIS4}:{REDIS_PORT}").parse()?;
        loop {
            let ok = in_netns(&ns, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if ok {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("the lab's Redis did not answer; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the lab's Redis (also done by `down`).
    pub fn stop_redis(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.run_dir().join("redis.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_sessions_count_per_cookie() {
        let s = Sessions::new("b1", None);
        let (code, body, cookie) = s.handle("/session?store=local", None);
        assert_eq!((code, body.as_str()), (200, "b1 1\n"));
        let id = cookie.expect("a new session gets a cookie");
        let c = format!("other=1; session={id}");
        let (_, body, again) = s.handle("/session?store=local", Some(&c));
        assert_eq!((body.as_str(), again), ("b1 2\n", None));
        let (_, body, _) = s.handle("/session", None);
        assert_eq!(body, "b1 1\n", "no cookie: a new session");
    }

    #[test]
    fn redis_store_without_redis_says_so() {
        let (code, body, _) = Sessions::new("b1", None).handle("/session?store=redis", None);
        assert_eq!(code, 503);
        assert!(body.contains("no Redis configured"), "{body}");
    }
}
