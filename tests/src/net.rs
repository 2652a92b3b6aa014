//! Network namespaces that are always removed, the tests' one topology
//! (`Dc`), a backend server and a client request through the VIP.

use anyhow::{Result, bail};
use aya::Ebpf;

use crate::{load, loader};

/// Runs a command, failing with its stderr if it fails.
pub use lb_user::host::iproute::run as sh;

/// A network namespace that is deleted when dropped (also when a test fails
/// and unwinds). Names carry the test's prefix and the pid, so parallel and
/// crashed runs never collide; [`Netns::sweep`] removes leftovers.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("lbt-{tag}-{}", std::process::id());
        let _ = sh("ip", &["netns", "del", &name]);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Runs `f` with the calling thread moved into the namespace, then moves
    /// it back. Sockets and BPF attachments made in `f` belong to it.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        lb_user::tools::lab::in_netns(&self.name, f)
    }

    /// Deletes every namespace an earlier (crashed) run of this tag left.
    pub fn sweep(tag: &str) {
        if let Ok(list) = sh("ip", &["netns", "list"]) {
            for line in list.lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(&format!("lbt-{tag}-")) {
                    let _ = sh("ip", &["netns", "del", name]);
                }
            }
        }
    }
}

/// A veth pair: `a_dev` in namespace `a`, its peer `b_dev` in `b`.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    let args = [
        "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns",
        &b.name,
    ];
    // `ip` occasionally fails to open a namespace created an instant before
    // while parallel tests add and delete theirs under /run/netns
    // ("Invalid netns value"); the namespace is there, so try again.
    let mut attempt = 0;
    loop {
        match sh("ip", &args) {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 4 && e.to_string().contains("Invalid \"netns\" value") => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

pub fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let s = ns
        .exec("cat", &[&format!("/sys/class/net/{dev}/address")])
        .expect("mac");
    let mut m = [0u8; 6];
    for (i, p) in s.trim().split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("hex");
    }
    m
}

pub fn ifindex_of(ns: &Netns, dev: &str) -> u32 {
    ns.exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")])
        .expect("ifindex")
        .trim()
        .parse()
        .expect("num")
}

pub fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The tests' one topology: a client, the LB, and `n` backends, each
/// backend in its own namespace behind its own veth from the LB: client
/// `c0` 198.18.10.2 / 2001:2:10::2 ── `l0` LB (198.18.10.1, 2001:2:10::1);
/// LB `l<i>` 198.18.1<i>.1 / 2001:2:1<i>::1 ── `b0` 198.18.1<i>.2 /
/// 2001:2:1<i>::2 in backend i (1-based), which owns VIPs 198.18.0.100 and
/// 2001:2::100 on loopback and has the `lb_pass` XDP program on `b0`
/// (native redirect into a veth needs a program on the receiving side;
/// [`dc_bare`] leaves `b0` free for a test's own program).
pub struct Dc {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    /// Keeps the backends' pass programs attached.
    _pass: Vec<Ebpf>,
}

pub fn backend_addr(i: usize) -> String {
    format!("198.18.{}.2", 10 + i)
}

pub fn dc(tag: &str, n: usize) -> Result<Dc> {
    dc_with(tag, n, true)
}

/// [`dc`] without the backends' `lb_pass` programs.
pub fn dc_bare(tag: &str, n: usize) -> Result<Dc> {
    dc_with(tag, n, false)
}

fn dc_with(tag: &str, n: usize, pass_programs: bool) -> Result<Dc> {
    Netns::sweep(tag);
    let client = Netns::new(&format!("{tag}-c"))?;
    let lb = Netns::new(&format!("{tag}-l"))?;
    veth(&client, "c0", &lb, "l0")?;
    let run = |ns: &Netns, cmd: &[&str]| ns.exec(cmd[0], &cmd[1..]).map(|_| ());
    let add6 = |ns: &Netns, addr: &str, dev: &str| {
        run(ns, &["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
    };
    run(
        &client,
        &["ip", "addr", "add", "198.18.10.2/24", "dev", "c0"],
    )?;
    add6(&client, "2001:2:10::2/64", "c0")?;
    run(&client, &["ip", "link", "set", "c0", "up"])?;
    run(
        &client,
        &["ip", "route", "add", "198.18.0.0/24", "via", "198.18.10.1"],
    )?;
    run(
        &client,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "2001:2::/64",
            "via",
            "2001:2:10::1",
        ],
    )?;
    // Packets the XDP program forwards must carry finished checksums: a
    // veth would otherwise hand over a partial one (TX offload).
    run(&client, &["ethtool", "-K", "c0", "tx", "off"])?;
    run(&lb, &["ip", "addr", "add", "198.18.10.1/24", "dev", "l0"])?;
    add6(&lb, "2001:2:10::1/64", "l0")?;
    run(&lb, &["ip", "link", "set", "l0", "up"])?;
    run(&lb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    run(&lb, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    let mut backends = Vec::new();
    let mut pass = Vec::new();
    for i in 1..=n {
        let b = Netns::new(&format!("{tag}-b{i}"))?;
        let l = format!("l{i}");
        veth(&lb, &l, &b, "b0")?;
        let (lb4, lb6) = (
            format!("198.18.{}.1", 10 + i),
            format!("2001:2:{}::1", 10 + i),
        );
        run(&lb, &["ip", "addr", "add", &format!("{lb4}/24"), "dev", &l])?;
        add6(&lb, &format!("{lb6}/64"), &l)?;
        run(&lb, &["ip", "link", "set", &l, "up"])?;
        let b6 = format!("2001:2:{}::2/64", 10 + i);
        run(
            &b,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", backend_addr(i)),
                "dev",
                "b0",
            ],
        )?;
        add6(&b, &b6, "b0")?;
        run(&b, &["ip", "addr", "add", "198.18.0.100/32", "dev", "lo"])?;
        run(
            &b,
            &["ip", "-6", "addr", "add", "2001:2::100/128", "dev", "lo"],
        )?;
        run(&b, &["ip", "link", "set", "b0", "up"])?;
        run(&b, &["ip", "route", "add", "default", "via", &lb4])?;
        run(&b, &["ip", "-6", "route", "add", "default", "via", &lb6])?;
        if pass_programs {
            let mut e = load()?;
            b.enter(|| {
                loader::attach(
                    &mut e,
                    lb_common::PROG_PASS,
                    "b0",
                    lb_user::vocab::XdpMode::Native,
                )
            })??;
            pass.push(e);
        }
        backends.push(b);
    }
    Ok(Dc {
        client,
        lb,
        backends,
        _pass: pass,
    })
}

/// A test backend server: on `0.0.0.0:8080` in its namespace it answers
/// every connection with its name and a newline, then echoes lines until
/// the client closes. `stop()` closes the listener (new connections are
/// refused, as when the server process dies); open connections go on.
pub struct TestServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(ns: &Netns, name: &str) -> Result<Self> {
        use std::io::{BufRead as _, Write as _};
        let l = ns.enter(|| std::net::TcpListener::bind("0.0.0.0:8080"))??;
        l.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let name = format!("{name}\n");
        let thread = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let name = name.clone();
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(20)));
                            if c.write_all(name.as_bytes()).is_err() {
                                return;
                            }
                            let Ok(r) = c.try_clone() else { return };
                            for line in std::io::BufReader::new(r).lines() {
                                let Ok(line) = line else { return };
                                if c.write_all(format!("{line}\n").as_bytes()).is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listener and waits until it is closed.
    pub fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One short request through the VIP from the calling thread's namespace:
/// the name of the backend that answered, or an error.
pub fn ask_vip(timeout: std::time::Duration) -> Result<String> {
    use std::io::BufRead as _;
    let vip: std::net::SocketAddr = "198.18.0.100:8080".parse().expect("literal");
    let s = std::net::TcpStream::connect_timeout(&vip, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        bail!("connection closed without an answer");
    }
    Ok(line.trim().to_string())
}

/// Pins the calling thread to CPU `cpu`: BPF_PROG_TEST_RUN runs the
/// program on the CPU that calls it, as veth and generic XDP run it on the
/// sender's.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}"
        );
        assert_eq!(libc::sched_getcpu(), cpu as i32, "running on CPU {cpu}");
    }
}
