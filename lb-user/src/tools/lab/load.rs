//! Load on the lab: steady HTTP requests from every client address (one
//! connection each, or a keep-alive mix), sampled per request.

use std::{
    io::{BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{
    ADDRS_PER_CLIENT, CLIENTS, Lab, VIP4, VIP6, client4, client6, connect_from, http_get, in_netns,
    read_head,
};

/// One request's outcome in a load run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    /// How long the request took (connect to answer, or to the error).
    pub took: Duration,
    pub client: IpAddr,
    /// The answering backend's name, or the error.
    pub result: Result<String, String>,
}

/// Steady HTTP load from every client address of the lab, `rate` requests
/// per second in all, for `duration`; each request on a new connection.
/// Samples are appended to `out` as they complete.
pub fn load(
    lab: &Lab,
    v6: bool,
    rate: u32,
    duration: Duration,
    out: Arc<std::sync::Mutex<Vec<Sample>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    load_mix(lab, v6, rate, duration, None, out)
}

/// [`load`] for `duration`, calling `during` with the start time while it
/// runs; returns every sample once all senders are done.
pub fn load_during(
    lab: &Lab,
    v6: bool,
    rate: u32,
    duration: Duration,
    during: impl FnOnce(Instant),
) -> Vec<Sample> {
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now();
    let handles = load(lab, v6, rate, duration, samples.clone());
    during(start);
    for h in handles {
        // A sender only panics on a bug; let the caller see it.
        if let Err(p) = h.join() {
            std::panic::resume_unwind(p);
        }
    }
    samples.lock().map(|s| s.clone()).unwrap_or_default()
}

/// [`load`] where every `n`-th request of each sender is a long one
/// (`/sleep?ms=ms`), given `long = Some((n, ms))`. Each sender thread waits
/// for its request to finish, so long requests hold a connection open.
pub fn load_mix(
    lab: &Lab,
    v6: bool,
    rate: u32,
    duration: Duration,
    long: Option<(usize, u64)>,
    out: Arc<std::sync::Mutex<Vec<Sample>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let start = Instant::now();
    let senders = CLIENTS * ADDRS_PER_CLIENT;
    let gap = Duration::from_secs_f64(senders as f64 / rate.max(1) as f64);
    let vip: SocketAddr = if v6 {
        format!("[{VIP6}]:80")
    } else {
        format!("{VIP4}:80")
    }
    .parse()
    .expect("literal");
    let mut handles = Vec::new();
    for c in 1..=CLIENTS {
        for k in 0..ADDRS_PER_CLIENT {
            let ns = lab.client_ns(c);
            let src: IpAddr = if v6 { client6(c, k) } else { client4(c, k) }
                .parse()
                .expect("literal");
            let out = out.clone();
            handles.push(std::thread::spawn(move || {
                let entered = in_netns(&ns, || {
                    // Stagger the senders over one gap.
                    std::thread::sleep(
                        gap.mul_f64((k as f64 + c as f64 * 0.5) / ADDRS_PER_CLIENT as f64),
                    );
                    let mut next = Instant::now();
                    let mut n = 0usize;
                    while start.elapsed() < duration {
                        let at = start.elapsed();
                        n += 1;
                        let path = match long {
                            Some((every, ms)) if n.is_multiple_of(every) => {
                                format!("/sleep?ms={ms}")
                            }
                            _ => "/".to_string(),
                        };
                        let result = http_get(&vip, Some(src), &path).map_err(|e| e.to_string());
                        let took = start.elapsed().saturating_sub(at);
                        if let Ok(mut o) = out.lock() {
                            o.push(Sample {
                                at,
                                took,
                                client: src,
                                result,
                            });
                        }
                        next += gap;
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                    }
                });
                // A sender that could not enter its namespace sent nothing:
                // say so in the samples instead of silently sending less.
                if let Err(e) = entered
                    && let Ok(mut o) = out.lock()
                {
                    o.push(Sample {
                        at: start.elapsed(),
                        took: Duration::ZERO,
                        client: src,
                        result: Err(format!("sender could not enter {ns}: {e:#}")),
                    });
                }
            }));
        }
    }
    handles
}

/// A long-lived HTTP/1.1 keep-alive connection from one lab client address
/// to a VIP: every [`KeepAlive::ask`] sends one request on the same TCP
/// connection and returns the answering backend's name.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pub client: IpAddr,
}

impl KeepAlive {
    /// Opens the connection from client `c`'s address `k` (in its namespace).
    pub fn open(lab: &Lab, c: usize, k: usize, v6: bool) -> Result<Self> {
        let (src, vip): (IpAddr, SocketAddr) = if v6 {
            (client6(c, k).parse()?, format!("[{VIP6}]:80").parse()?)
        } else {
            (client4(c, k).parse()?, format!("{VIP4}:80").parse()?)
        };
        let s = in_netns(&lab.client_ns(c), || {
            connect_from(src, vip, Duration::from_secs(2))
        })??;
        // Longer than any failover: a request may wait out a node's loss.
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
            client: src,
        })
    }

    /// One request on the open connection; the body (the backend's name).
    pub fn ask(&mut self) -> Result<String> {
        write!(self.writer, "GET / HTTP/1.1\r\nHost: lab\r\n\r\n")?;
        let head = read_head(&mut self.reader)?;
        let (code, len) = (head.code, head.content_length.unwrap_or(0));
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        if code != 200 {
            bail!("status {code}");
        }
        Ok(String::from_utf8_lossy(&body).trim().to_string())
    }
}
