//! The node's network facts read in-process, and the one way into a named network namespace (`/run/netns/NAME`, as
//! `ip netns add` makes them; the agent's tests run dataplanes in such namespaces).
//!
//! Into a namespace: [`run_in`] runs a closure on a thread of its own that joins the namespace with `setns(2)`
//! (network namespaces are per thread, so the agent's other threads stay where they are), and [`command`] makes a
//! child process join it before `exec`. Sysctls are files under `/proc/sys` (which follows the namespace of the
//! thread that opens them) and addresses come from `getifaddrs(3)` (a netlink dump in the thread's namespace): no
//! `sysctl` or `ip` process.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// Errors of this module: which namespace could not be entered, or which sysctl read or written.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("joining network namespace {path}: {source}")]
    Join { path: PathBuf, source: io::Error },
    #[error("the thread working in network namespace {0} panicked")]
    Panicked(String),
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: io::Error },
    #[error("listing interface addresses: {0}")]
    Addresses(io::Error),
}

fn path_of(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

fn open(name: &str) -> Result<File, NetnsError> {
    let path = path_of(name);
    File::open(&path).map_err(|source| NetnsError::Open { path, source })
}

/// Runs `f` in network namespace `netns` (on a scoped thread that joins it), or right here when `None`.
pub fn run_in<R: Send>(netns: Option<&str>, f: impl FnOnce() -> R + Send) -> Result<R, NetnsError> {
    let Some(name) = netns else {
        return Ok(f());
    };
    let ns = open(name)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this scoped thread only, with a valid namespace file descriptor.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Join {
                    path: path_of(name),
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Panicked(name.to_string()))?
    })
}

/// A command for `program` that runs in network namespace `netns` (when `Some`): the child joins it before exec.
pub fn command(netns: Option<&str>, program: &str) -> Result<Command, NetnsError> {
    let mut c = Command::new(program);
    if let Some(name) = netns {
        let ns = open(name)?;
        // SAFETY: the closure only calls setns(2), which is async-signal-safe, on a descriptor the parent keeps open
        // until the command is dropped (the closure owns the File).
        unsafe {
            c.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Ok(c)
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Reads a sysctl (`net.ipv4.conf.all.route_localnet`) of the calling thread's network namespace.
pub fn sysctl_get(key: &str) -> Result<String, NetnsError> {
    std::fs::read_to_string(sysctl_path(key))
        .map(|v| v.trim().to_string())
        .map_err(|source| NetnsError::Sysctl {
            key: key.to_string(),
            source,
        })
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn sysctl_set(key: &str, value: &str) -> Result<(), NetnsError> {
    std::fs::write(sysctl_path(key), value).map_err(|source| NetnsError::Sysctl {
        key: key.to_string(),
        source,
    })
}

/// The addresses of the calling thread's network namespace's interfaces (every family), with the interface each is
/// on, in interface order (one `getifaddrs(3)` walk).
pub fn interface_addrs() -> Result<Vec<(String, IpAddr)>, NetnsError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list this function frees below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(NetnsError::Addresses(io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is an element of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which sockaddr_* it is.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: ifa_name is a NUL-terminated interface name that lives as long as the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        out.push((name, addr));
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The addresses of the calling thread's network namespace's interfaces (every family), in interface order.
pub fn local_addrs() -> Result<Vec<IpAddr>, NetnsError> {
    Ok(interface_addrs()?.into_iter().map(|(_, a)| a).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_namespaces_sysctls_and_addresses() {
        // Loopback is in every namespace; ip_forward is 0 or 1 everywhere.
        let addrs = local_addrs().unwrap();
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{addrs:?}");
        let fwd = sysctl_get("net.ipv4.ip_forward").unwrap();
        assert!(fwd == "0" || fwd == "1", "{fwd:?}");
        assert!(matches!(
            sysctl_get("net.ipv4.no_such_key"),
            Err(NetnsError::Sysctl { .. })
        ));
        assert!(matches!(
            run_in(Some("orca-no-such-namespace"), || ()),
            Err(NetnsError::Open { .. })
        ));
    }
}
