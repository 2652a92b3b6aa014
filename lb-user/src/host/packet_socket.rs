//! A packet socket (`AF_PACKET`) for path probes: frames sent as they are
//! on one interface, and the frames a classic BPF filter lets in read back
//! from every interface. One socket serves many probes: closing one waits
//! for an RCU grace period.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Result, bail};

/// A packet socket of one family (IPv4 or IPv6 frames).
pub struct PacketSocket {
    fd: OwnedFd,
    v4: bool,
}

impl PacketSocket {
    /// Opens one that lets nothing in until [`PacketSocket::set_filter`].
    pub fn open(v4: bool) -> Result<Self> {
        Ok(Self {
            fd: open_fd(v4)?,
            v4,
        })
    }

    /// Replaces the filter of what is read.
    pub fn set_filter(&self, prog: &[libc::sock_filter]) -> Result<()> {
        attach(&self.fd, prog)
    }

    /// Drops whatever waits to be read.
    pub fn drain(&self) {
        let mut buf = [0u8; 2048];
        // SAFETY: `buf` is valid for its length.
        while unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }

    /// Sends `frame` (Ethernet header included) out of interface
    /// `ifindex` to `dmac`.
    pub fn send(&self, frame: &[u8], ifindex: u32, dmac: [u8; 6]) -> Result<()> {
        // SAFETY: a zeroed sockaddr_ll, filled in below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        // Tunnels stay in their family (IPv4 in IPv4, IPv6 in IPv6).
        to.sll_protocol = (if self.v4 {
            libc::ETH_P_IP
        } else {
            libc::ETH_P_IPV6
        } as u16)
            .to_be();
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&dmac);
        // SAFETY: `frame` and `to` are valid for the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            bail!("{}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame the filter lets in, within `left`: its length in
    /// `buf`, or `None` once the time is up.
    pub fn recv(&self, buf: &mut [u8], left: Duration) -> Option<usize> {
        let t0 = std::time::Instant::now();
        loop {
            let rest = left.saturating_sub(t0.elapsed());
            if rest.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, rest.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            // SAFETY: `buf` is valid for its length.
            let got =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got > 0 {
                return Some(got as usize);
            }
        }
    }
}

/// A classic BPF filter that passes only TCP from the VIP's address and
/// port to `sport` (the answers to our SYN), so the socket is not handed
/// the host's other traffic.
pub fn tcp_answers(vip: SocketAddr, sport: u16) -> Vec<libc::sock_filter> {
    const LD_H: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const LD_B: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LD_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
    const LDX_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    // Each check falls through on a match and jumps to the final "reject"
    // otherwise; jump offsets are filled in once the program is complete.
    let mut p: Vec<libc::sock_filter> = Vec::new();
    let mut checks: Vec<usize> = Vec::new();
    let mut check = |p: &mut Vec<libc::sock_filter>, k: u32| {
        checks.push(p.len());
        p.push(op(JEQ, k));
    };
    match vip.ip() {
        IpAddr::V4(a) => {
            p.push(op(LD_H, 12));
            check(&mut p, 0x0800);
            p.push(op(LD_B, 23));
            check(&mut p, 6);
            p.push(op(LD_W, 26));
            check(&mut p, u32::from(a));
            p.push(op(LDX_MSH, 14));
            p.push(op(LD_H_IND, 14));
            check(&mut p, vip.port() as u32);
            p.push(op(LD_H_IND, 16));
            check(&mut p, sport as u32);
        }
        IpAddr::V6(a) => {
            p.push(op(LD_H, 12));
            check(&mut p, 0x86dd);
            p.push(op(LD_B, 20));
            check(&mut p, 6);
            for (i, w) in a.octets().chunks(4).enumerate() {
                p.push(op(LD_W, 22 + 4 * i as u32));
                check(&mut p, u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
            }
            p.push(op(LD_H, 54));
            check(&mut p, vip.port() as u32);
            p.push(op(LD_H, 56));
            check(&mut p, sport as u32);
        }
    }
    p.push(op(RET, 0xffff));
    let reject = p.len();
    p.push(op(RET, 0));
    for i in checks {
        p[i].jf = (reject - i - 1) as u8;
    }
    p
}

/// A packet socket for IPv4 or IPv6 frames, passing nothing until a probe
/// attaches its filter.
fn open_fd(v4: bool) -> Result<OwnedFd> {
    let proto = if v4 { libc::ETH_P_IP } else { libc::ETH_P_IPV6 } as u16;
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto.to_be() as i32,
        )
    };
    if fd < 0 {
        bail!(
            "opening a packet socket: {} (path probes need root)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let reject = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    attach(&fd, &reject)?;
    Ok(fd)
}

/// Attaches (replaces) the socket's filter.
fn attach(fd: &OwnedFd, prog: &[libc::sock_filter]) -> Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel
    // copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "attaching the probe filter: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_checks_every_field_and_ends_in_reject() {
        let f = tcp_answers("198.18.0.100:80".parse().unwrap(), 41000);
        assert_eq!(f.last().map(|i| i.k), Some(0), "reject last");
        assert_eq!(f[f.len() - 2].k, 0xffff, "accept before it");
        let f6 = tcp_answers("[2001:2::100]:80".parse().unwrap(), 41000);
        assert!(f6.len() > f.len());
    }
}
