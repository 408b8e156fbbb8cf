//! Deleting stale UDP conntrack entries over ctnetlink (NETLINK_NETFILTER, `IPCTNL_MSG_CT_GET` dump +
//! `IPCTNL_MSG_CT_DELETE` per match), hand-rolled; when netlink fails, the `conntrack -D` binary is the fallback.
//!
//! UDP has no connection teardown, so an entry keeps DNATing a flow to an endpoint that is gone (or keeps the
//! flow un-DNATed after a REJECT) until it times out; kube-proxy deletes such entries after every sync, so does
//! Orca.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::model::IpFamily;

/// One kind of entry to delete: UDP, original destination `orig_dst` (any when `None`) and port `orig_dport`,
/// DNATed to `reply_src` (any when `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpFilter {
    pub orig_dst: Option<IpAddr>,
    pub orig_dport: u16,
    pub reply_src: Option<IpAddr>,
}

impl UdpFilter {
    fn matches(&self, e: &Entry) -> bool {
        e.proto == 17
            && e.orig_dport == self.orig_dport
            && self.orig_dst.is_none_or(|d| d == e.orig_dst)
            && self.reply_src.is_none_or(|s| s == e.reply_src)
    }

    /// The `conntrack -D` arguments of this filter.
    fn cli_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["-D".into(), "-p".into(), "udp".into()];
        if let Some(d) = self.orig_dst {
            a.extend(["--orig-dst".into(), d.to_string()]);
        }
        a.extend(["--dport".into(), self.orig_dport.to_string()]);
        if let Some(s) = self.reply_src {
            a.extend(["--dst-nat".into(), s.to_string()]);
        }
        a
    }
}

/// What every UDP Service port may point to now: per frontend (IP, port) and per NodePort, the endpoint IPs a
/// conntrack entry may be DNATed to. Checked against the whole table when the deltas cannot be trusted: on the
/// first sync after a start (endpoints removed while no agent ran) and after a cleanup that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpState {
    pub frontends: std::collections::HashMap<(IpAddr, u16), std::collections::HashSet<IpAddr>>,
    pub node_ports: std::collections::HashMap<u16, std::collections::HashSet<IpAddr>>,
}

impl UdpState {
    /// An entry to a frontend not DNATed to one of its endpoints (a removed endpoint, or no DNAT at all while the
    /// port has endpoints now), or to a NodePort DNATed to an address that is no endpoint.
    fn stale(&self, proto: u8, orig_dst: IpAddr, orig_dport: u16, reply_src: IpAddr) -> bool {
        if proto != 17 {
            return false;
        }
        if let Some(eps) = self.frontends.get(&(orig_dst, orig_dport)) {
            return !eps.contains(&reply_src);
        }
        if let Some(eps) = self.node_ports.get(&orig_dport) {
            return reply_src != orig_dst && !eps.contains(&reply_src);
        }
        false
    }
}

/// How stale entries were deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    #[default]
    None,
    Netlink,
    /// The `conntrack` binary, after netlink failed.
    Cli,
}

/// Deletes every UDP conntrack entry of `family` matching one of `filters`, or stale by `state`, in namespace
/// `netns` (or the current one). Returns how many were deleted, and how.
pub fn delete_udp(
    netns: Option<&str>,
    family: IpFamily,
    filters: &[UdpFilter],
    state: Option<&UdpState>,
) -> Result<(usize, Method)> {
    if filters.is_empty() && state.is_none() {
        return Ok((0, Method::None));
    }
    match delete_netlink(netns, family, filters, state) {
        Ok(n) => Ok((n, Method::Netlink)),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "ctnetlink failed, falling back to the conntrack binary");
            let mut n = delete_cli(netns, family, filters)?;
            if let Some(st) = state {
                n += delete_cli_stale(netns, family, st)?;
            }
            Ok((n, Method::Cli))
        }
    }
}

/// `conntrack -f ipv4|ipv6` (the binary lists and deletes IPv4 entries only unless told otherwise).
fn conntrack_command(netns: Option<&str>, family: IpFamily) -> Result<std::process::Command> {
    let mut c = crate::netns::command(netns, "conntrack")?;
    c.stdin(Stdio::null());
    c.args([
        "-f",
        match family {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        },
    ]);
    Ok(c)
}

/// One line of `conntrack -L -p udp`: (orig src, orig dst, sport, dport, reply src).
fn parse_cli_line(line: &str) -> Option<(IpAddr, IpAddr, u16, u16, IpAddr)> {
    let field = |key: &str, nth: usize| -> Option<&str> {
        line.split_whitespace().filter_map(|w| w.strip_prefix(key)).nth(nth)
    };
    Some((
        field("src=", 0)?.parse().ok()?,
        field("dst=", 0)?.parse().ok()?,
        field("sport=", 0)?.parse().ok()?,
        field("dport=", 0)?.parse().ok()?,
        field("src=", 1)?.parse().ok()?,
    ))
}

/// [`UdpState`] through the `conntrack` binary: list the UDP entries, delete the stale ones one by one.
fn delete_cli_stale(netns: Option<&str>, family: IpFamily, state: &UdpState) -> Result<usize> {
    let out = conntrack_command(netns, family)?
        .args(["-L", "-p", "udp"])
        .output()
        .context("running conntrack -L")?;
    if !out.status.success() {
        bail!("conntrack -L failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut deleted = 0;
    for (src, dst, sport, dport, reply_src) in String::from_utf8_lossy(&out.stdout).lines().filter_map(parse_cli_line) {
        if !state.stale(17, dst, dport, reply_src) {
            continue;
        }
        let (src, dst, sport, dport) = (src.to_string(), dst.to_string(), sport.to_string(), dport.to_string());
        let del = conntrack_command(netns, family)?
            .args([
                "-D", "-p", "udp", "-s", &src, "-d", &dst, "--sport", &sport, "--dport", &dport,
            ])
            .output()
            .context("running conntrack -D")?;
        // Exit 1 with "0 flow entries": gone in the meantime.
        if del.status.success() {
            deleted += 1;
        }
    }
    Ok(deleted)
}

fn delete_cli(netns: Option<&str>, family: IpFamily, filters: &[UdpFilter]) -> Result<usize> {
    let mut deleted = 0;
    for f in filters {
        let mut c = conntrack_command(netns, family)?;
        c.args(f.cli_args());
        let out = c.output().context("running conntrack -D")?;
        let err = String::from_utf8_lossy(&out.stderr);
        // "N flow entries have been deleted." (exit 1 when N is 0).
        let n = err.split_whitespace().next().and_then(|w| w.parse::<usize>().ok());
        match (out.status.success(), n) {
            (_, Some(n)) => deleted += n,
            (true, None) => {}
            (false, None) => bail!("conntrack {:?} failed: {}", f.cli_args(), err.trim()),
        }
    }
    Ok(deleted)
}

// --- ctnetlink -----------------------------------------------------------------------------------------------

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The parts of a conntrack entry we match on, plus the raw attributes needed to delete it.
#[derive(Debug, Clone)]
struct Entry {
    proto: u8,
    orig_dst: IpAddr,
    orig_dport: u16,
    reply_src: IpAddr,
    /// The raw CTA_TUPLE_ORIG attribute (header included), and CTA_ZONE when present.
    raw_orig: Vec<u8>,
    raw_zone: Vec<u8>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates the netlink attributes of `buf`: (type without flags, payload, whole attribute bytes).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let whole = &buf[..len];
        let payload = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, payload, whole))
    })
}

/// (src, dst, proto, dport) of a CTA_TUPLE_* payload.
fn parse_tuple(t: &[u8]) -> (IpAddr, IpAddr, u8, u16) {
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let (mut src, mut dst, mut proto, mut dport) = (unspecified, unspecified, 0u8, 0u16);
    for (ty, p, _) in attrs(t) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, p, _) in attrs(p) {
                    let a = if let Ok(b) = <[u8; 4]>::try_from(p) {
                        IpAddr::V4(Ipv4Addr::from(b))
                    } else if let Ok(b) = <[u8; 16]>::try_from(p) {
                        IpAddr::V6(Ipv6Addr::from(b))
                    } else {
                        continue;
                    };
                    match ty {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = a,
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = a,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, p, _) in attrs(p) {
                    match (ty, p.len()) {
                        (CTA_PROTO_NUM, 1) => proto = p[0],
                        (CTA_PROTO_DST_PORT, 2) => dport = u16::from_be_bytes([p[0], p[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (src, dst, proto, dport)
}

fn parse_entry(payload: &[u8]) -> Option<Entry> {
    // nfgenmsg (4 bytes) then attributes.
    let mut e = Entry {
        proto: 0,
        orig_dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        orig_dport: 0,
        reply_src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        raw_orig: Vec::new(),
        raw_zone: Vec::new(),
    };
    let mut have_orig = false;
    for (ty, p, whole) in attrs(payload.get(4..)?) {
        match ty {
            CTA_TUPLE_ORIG => {
                let (_, dst, proto, dport) = parse_tuple(p);
                e.orig_dst = dst;
                e.proto = proto;
                e.orig_dport = dport;
                e.raw_orig = whole.to_vec();
                have_orig = true;
            }
            CTA_TUPLE_REPLY => {
                let (src, _, _, _) = parse_tuple(p);
                e.reply_src = src;
            }
            CTA_ZONE => e.raw_zone = whole.to_vec(),
            _ => {}
        }
    }
    have_orig.then_some(e)
}

struct NlSocket {
    fd: OwnedFd,
    seq: u32,
    /// The nfgenmsg family: the dump lists, and the deletes name, entries of this family only.
    family: u8,
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
    // SAFETY: valid fd, pointer to a live timeval of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Opens the socket inside `/run/netns/NAME` (a netlink socket stays in the namespace it was created in).
fn open_socket_in(netns: Option<&str>) -> Result<OwnedFd> {
    Ok(crate::netns::run_in(netns, open_socket)??)
}

impl NlSocket {
    fn send(&mut self, msg_type: u16, flags: u16, attrs: &[&[u8]]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let body: usize = attrs.iter().map(|a| align4(a.len())).sum();
        let len = 16 + 4 + body;
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg_type).to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[self.family, 0, 0, 0]);
        for a in attrs {
            m.extend_from_slice(a);
            m.resize(align4(m.len()), 0);
        }
        // SAFETY: zeroed sockaddr_nl is valid; the kernel is pid 0.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid fd, buffer and address of the sizes passed.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives messages for `seq` and hands each (type, payload) to `f` until DONE (dump) or an ACK/error.
    fn recv(&mut self, seq: u32, mut f: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: valid fd and buffer of the length passed.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut b = &buf[..n as usize];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let ty = u16::from_ne_bytes([b[4], b[5]]);
                let mseq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if len < 16 || len > b.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let payload = &b[16..len];
                b = &b[align4(len).min(b.len())..];
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                            .unwrap_or(0);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => f(ty, payload),
                }
            }
        }
    }
}

fn delete_netlink(
    netns: Option<&str>,
    family: IpFamily,
    filters: &[UdpFilter],
    state: Option<&UdpState>,
) -> Result<usize> {
    let mut sock = NlSocket {
        fd: open_socket_in(netns)?,
        seq: std::process::id(),
        family: match family {
            IpFamily::V4 => AF_INET,
            IpFamily::V6 => AF_INET6,
        },
    };
    let seq = sock
        .send(IPCTNL_MSG_CT_GET, NLM_F_DUMP, &[])
        .context("sending the conntrack dump request")?;
    let mut victims = Vec::new();
    let mut total = 0usize;
    sock.recv(seq, |_, payload| {
        total += 1;
        if let Some(e) = parse_entry(payload) {
            if filters.iter().any(|f| f.matches(&e))
                || state.is_some_and(|st| st.stale(e.proto, e.orig_dst, e.orig_dport, e.reply_src))
            {
                victims.push(e);
            }
        }
    })
    .context("reading the conntrack dump")?;
    let mut deleted = 0;
    for e in &victims {
        let mut parts: Vec<&[u8]> = vec![&e.raw_orig];
        if !e.raw_zone.is_empty() {
            parts.push(&e.raw_zone);
        }
        let seq = sock.send(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, &parts)?;
        match sock.recv(seq, |_, _| {}) {
            Ok(()) => deleted += 1,
            // Gone in the meantime.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).context("deleting a conntrack entry"),
        }
    }
    tracing::debug!(scanned = total, deleted, "conntrack cleanup");
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn state_marks_entries_that_point_to_no_current_endpoint() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut st = UdpState::default();
        st.frontends.insert((ip("10.96.0.10"), 53), [ip("10.244.1.5")].into());
        st.frontends.insert((ip("10.96.0.11"), 53), Default::default());
        st.node_ports.insert(30053, [ip("10.244.1.5")].into());
        // Frontend: DNATed to the endpoint stays; to a removed one, or not DNATed at all, goes.
        assert!(!st.stale(17, ip("10.96.0.10"), 53, ip("10.244.1.5")));
        assert!(st.stale(17, ip("10.96.0.10"), 53, ip("10.244.1.9")));
        assert!(st.stale(17, ip("10.96.0.10"), 53, ip("10.96.0.10")));
        assert!(
            st.stale(17, ip("10.96.0.11"), 53, ip("10.244.1.5")),
            "no endpoints left"
        );
        // TCP, other ports and other addresses are never touched.
        assert!(!st.stale(6, ip("10.96.0.10"), 53, ip("10.244.1.9")));
        assert!(!st.stale(17, ip("10.96.0.10"), 54, ip("10.244.1.9")));
        assert!(!st.stale(17, ip("8.8.8.8"), 53, ip("8.8.8.8")));
        // NodePort: a DNATed entry to a non-endpoint goes; an un-DNATed flow to that port (not ours) stays.
        assert!(st.stale(17, ip("10.240.0.11"), 30053, ip("10.244.1.9")));
        assert!(!st.stale(17, ip("10.240.0.11"), 30053, ip("10.244.1.5")));
        assert!(!st.stale(17, ip("192.0.2.1"), 30053, ip("192.0.2.1")));
    }

    #[test]
    fn conntrack_list_lines_parse() {
        let l = "udp      17 28 src=10.244.1.2 dst=10.96.0.10 sport=40053 dport=53 src=10.244.2.5 dst=10.244.1.2 \
                 sport=8081 dport=40053 mark=0 use=1";
        assert_eq!(
            parse_cli_line(l),
            Some((
                "10.244.1.2".parse().unwrap(),
                "10.96.0.10".parse().unwrap(),
                40053,
                53,
                "10.244.2.5".parse().unwrap()
            ))
        );
        assert_eq!(
            parse_cli_line("conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown."),
            None
        );
    }

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize(align4(v.len()), 0);
        v
    }

    fn tuple(src: [u8; 4], dst: [u8; 4], proto: u8, dport: u16) -> Vec<u8> {
        let ip = [attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)].concat();
        let pr = [
            attr(CTA_PROTO_NUM, &[proto]),
            attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        [attr(CTA_TUPLE_IP | 0x8000, &ip), attr(CTA_TUPLE_PROTO | 0x8000, &pr)].concat()
    }

    #[test]
    fn parses_entries_and_matches_filters() {
        let orig = attr(CTA_TUPLE_ORIG | 0x8000, &tuple([10, 0, 0, 9], [10, 96, 0, 10], 17, 53));
        let reply = attr(
            CTA_TUPLE_REPLY | 0x8000,
            &tuple([10, 244, 1, 5], [10, 0, 0, 9], 17, 40000),
        );
        let payload = [vec![AF_INET, 0, 0, 0], orig.clone(), reply].concat();
        let e = parse_entry(&payload).unwrap();
        assert_eq!((e.proto, e.orig_dst, e.orig_dport), (17, a("10.96.0.10"), 53));
        assert_eq!(e.reply_src, a("10.244.1.5"));
        assert_eq!(e.raw_orig, orig);
        let svc = UdpFilter {
            orig_dst: Some(a("10.96.0.10")),
            orig_dport: 53,
            reply_src: None,
        };
        assert!(svc.matches(&e));
        assert!(UdpFilter {
            reply_src: Some(a("10.244.1.5")),
            ..svc
        }
        .matches(&e));
        assert!(!UdpFilter {
            reply_src: Some(a("10.244.1.6")),
            ..svc
        }
        .matches(&e));
        assert!(!UdpFilter { orig_dport: 54, ..svc }.matches(&e));
        assert!(UdpFilter { orig_dst: None, ..svc }.matches(&e));
        assert_eq!(
            UdpFilter {
                reply_src: Some(a("10.244.1.5")),
                ..svc
            }
            .cli_args()
            .join(" "),
            "-D -p udp --orig-dst 10.96.0.10 --dport 53 --dst-nat 10.244.1.5"
        );
        // Garbage never panics.
        assert!(parse_entry(&[1, 2]).is_none());
        assert!(parse_entry(&[0, 0, 0, 0, 255, 255, 1]).is_none());
    }

    #[test]
    fn parses_ipv6_entries() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap().octets();
        let tuple6 = |src: [u8; 16], dst: [u8; 16], dport: u16| {
            let ip = [attr(CTA_IP_V6_SRC, &src), attr(CTA_IP_V6_DST, &dst)].concat();
            let pr = [
                attr(CTA_PROTO_NUM, &[17]),
                attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
            ]
            .concat();
            [attr(CTA_TUPLE_IP | 0x8000, &ip), attr(CTA_TUPLE_PROTO | 0x8000, &pr)].concat()
        };
        let orig = attr(
            CTA_TUPLE_ORIG | 0x8000,
            &tuple6(v6("fd00:244:1::9"), v6("fd00:96::a"), 53),
        );
        let reply = attr(
            CTA_TUPLE_REPLY | 0x8000,
            &tuple6(v6("fd00:244:2::5"), v6("fd00:244:1::9"), 40000),
        );
        let e = parse_entry(&[vec![AF_INET6, 0, 0, 0], orig, reply].concat()).unwrap();
        assert_eq!((e.proto, e.orig_dst, e.orig_dport), (17, a("fd00:96::a"), 53));
        assert_eq!(e.reply_src, a("fd00:244:2::5"));
        let f = UdpFilter {
            orig_dst: Some(a("fd00:96::a")),
            orig_dport: 53,
            reply_src: Some(a("fd00:244:2::5")),
        };
        assert!(f.matches(&e));
        assert_eq!(
            f.cli_args().join(" "),
            "-D -p udp --orig-dst fd00:96::a --dport 53 --dst-nat fd00:244:2::5"
        );
    }
}
