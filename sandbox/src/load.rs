//! Bounded load from inside network namespaces, for soak scenarios: many short TCP connections (HTTP `GET /`,
//! `Connection: close`), many UDP flows of distinct source ports, and one long-lived TCP connection that
//! exchanges a message at a fixed interval. Each runs on plain threads that entered the namespace once
//! (setns(2)), with blocking sockets: far cheaper per connection than a thread per socket.
//!
//! Every loop is bounded by a count and a deadline.
use crate::pods::NetError;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) -> std::io::Result<()> {
    let path = PathBuf::from("/run/netns").join(ns);
    let file = std::fs::File::open(&path)?;
    // SAFETY: setns on a descriptor we own; it changes only this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What a batch of requests or flows gave.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub ok: usize,
    /// Failure (as text) -> count.
    pub failures: BTreeMap<String, usize>,
    /// The first few failed requests or flows, described (which source port, when).
    pub failed_samples: Vec<String>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn failed(&self) -> usize {
        self.failures.values().sum()
    }

    fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
        for f in other.failed_samples {
            if self.failed_samples.len() < 10 {
                self.failed_samples.push(f);
            }
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ok, {} failed in {:.1}s",
            self.ok,
            self.failed(),
            self.elapsed.as_secs_f64()
        )?;
        if !self.failures.is_empty() {
            write!(f, " {:?} e.g. {:?}", self.failures, self.failed_samples)?;
        }
        Ok(())
    }
}

/// The load threads' outcomes, merged.
fn join_all(threads: Vec<JoinHandle<std::io::Result<Outcome>>>) -> Result<Outcome> {
    let mut total = Outcome::default();
    for t in threads {
        let o = t
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?
            .context("load thread")?;
        total.merge(o);
    }
    Ok(total)
}

fn classify(e: std::io::Error) -> String {
    NetError::io(e).to_string()
}

/// One `GET /` on a new connection; Ok when the answer is `200`. A failure is its kind (what failures are counted
/// by) and where it happened: the step and the connection's local port, to find the flow in a proxy's state.
fn http_get(addr: SocketAddr, timeout: Duration) -> Result<(), (String, String)> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        let kind = classify(e);
        (kind.clone(), format!("{kind} (connecting)"))
    })?;
    let local = s.local_addr().map(|a| a.port()).unwrap_or(0);
    exchange(s, addr, timeout).map_err(|(kind, step)| {
        let detail = format!("{kind} ({step}, local port {local})");
        (kind, detail)
    })
}

fn exchange(mut s: TcpStream, addr: SocketAddr, timeout: Duration) -> Result<(), (String, &'static str)> {
    let step = |what: &'static str| move |e: std::io::Error| (classify(e), what);
    s.set_read_timeout(Some(timeout)).map_err(step("setting up"))?;
    s.set_write_timeout(Some(timeout)).map_err(step("setting up"))?;
    let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(step("sending the request"))?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf).map_err(step("waiting for the answer"))?;
    if buf.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        let kind = format!("bad answer {:?}", String::from_utf8_lossy(&buf[..buf.len().min(40)]));
        Err((kind, "reading the answer"))
    }
}

/// `count` HTTP requests from namespace `ns` to `addr`, each on a new connection, spread evenly over `spread`
/// (as fast as possible when the machine is slower) by `workers` threads, stopping at `deadline`.
pub fn tcp_connections(
    ns: &str,
    addr: SocketAddr,
    count: usize,
    workers: usize,
    spread: Duration,
    deadline: Duration,
) -> Result<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..workers.max(1) {
        let (ns, next) = (ns.to_string(), next.clone());
        threads.push(std::thread::spawn(move || -> std::io::Result<Outcome> {
            enter(&ns)?;
            let mut out = Outcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || started.elapsed() > deadline {
                    return Ok(out);
                }
                // Request i starts no earlier than its share of `spread`.
                let due = spread.mul_f64(i as f64 / count as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
                let t = started.elapsed();
                match http_get(addr, Duration::from_secs(5)) {
                    Ok(()) => out.ok += 1,
                    Err((kind, detail)) => {
                        if out.failed_samples.len() < 10 {
                            out.failed_samples
                                .push(format!("request {i}: {detail}, started at {:.1}s", t.as_secs_f64()));
                        }
                        *out.failures.entry(kind).or_default() += 1;
                    }
                }
            }
        }));
    }
    let mut total = join_all(threads)?;
    let missing = count.saturating_sub(total.ok + total.failed());
    if missing > 0 {
        total
            .failures
            .insert(format!("not sent before the {deadline:?} deadline"), missing);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// UDP flows: from each namespace in `sources`, one datagram from each source port in `ports` (a socket bound
/// to it) to `addr`, waiting up to `reply_timeout` for the answer; `workers_per_source` threads per namespace,
/// the flows of each source spread evenly over `spread`. A datagram without an answer is counted, not retried.
pub fn udp_flows(
    sources: &[String],
    ports: std::ops::Range<u16>,
    addr: SocketAddr,
    workers_per_source: usize,
    reply_timeout: Duration,
    spread: Duration,
    deadline: Duration,
) -> Result<Outcome> {
    let count = usize::from(ports.end.saturating_sub(ports.start)).max(1);
    let started = Instant::now();
    let mut threads = Vec::new();
    for ns in sources {
        let next = Arc::new(AtomicUsize::new(usize::from(ports.start)));
        for _ in 0..workers_per_source.max(1) {
            let (ns, next, first, end) = (
                ns.clone(),
                next.clone(),
                usize::from(ports.start),
                usize::from(ports.end),
            );
            threads.push(std::thread::spawn(move || -> std::io::Result<Outcome> {
                enter(&ns)?;
                let mut out = Outcome::default();
                let mut buf = [0u8; 2048];
                loop {
                    let port = next.fetch_add(1, Ordering::Relaxed);
                    if port >= end || started.elapsed() > deadline {
                        return Ok(out);
                    }
                    let due = spread.mul_f64((port - first) as f64 / count as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    let r = (|| -> std::io::Result<()> {
                        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
                        s.set_reuse_address(true)?;
                        s.bind(&SocketAddr::from(([0, 0, 0, 0], port as u16)).into())?;
                        let s = UdpSocket::from(s);
                        s.connect(addr)?;
                        s.set_read_timeout(Some(reply_timeout))?;
                        s.send(b"soak")?;
                        s.recv(&mut buf)?;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => out.ok += 1,
                        Err(e) => {
                            let e = classify(e);
                            if out.failed_samples.len() < 10 {
                                out.failed_samples.push(format!(
                                    "{ns} port {port}: {e} at {:.1}s",
                                    started.elapsed().as_secs_f64()
                                ));
                            }
                            *out.failures.entry(e).or_default() += 1;
                        }
                    }
                }
            }));
        }
    }
    let mut total = join_all(threads)?;
    total.elapsed = started.elapsed();
    Ok(total)
}

/// A long-lived TCP connection to an echo server that sends a line every `interval` and expects it back within
/// `timeout`; it stops at the first failure (or when stopped) and reports it.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HeartbeatReport>>,
    state: Arc<Mutex<HeartbeatReport>>,
}

/// What a heartbeat saw.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatReport {
    pub exchanges: usize,
    pub max_rtt: Duration,
    /// The first failure, if any (the connection is then over).
    pub error: Option<String>,
    /// The local address of the connection (to show that it stayed one connection).
    pub local: Option<SocketAddr>,
}

impl Heartbeat {
    pub fn start(ns: &str, addr: SocketAddr, interval: Duration, timeout: Duration) -> Result<Heartbeat> {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(HeartbeatReport::default()));
        let (flag, shared, ns) = (stop.clone(), state.clone(), ns.to_string());
        let thread = std::thread::spawn(move || {
            let mut rep = HeartbeatReport::default();
            if let Err(e) = beat(&ns, addr, interval, timeout, &flag, &shared, &mut rep) {
                rep.error = Some(e);
                if let Ok(mut s) = shared.lock() {
                    *s = rep.clone();
                }
            }
            rep
        });
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
            state,
        })
    }

    /// What it saw so far.
    pub fn report(&self) -> HeartbeatReport {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops it and returns what it saw.
    pub fn finish(mut self) -> HeartbeatReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_else(|| self.report())
    }
}

/// The heartbeat's loop: `Err` with the first failure.
fn beat(
    ns: &str,
    addr: SocketAddr,
    interval: Duration,
    timeout: Duration,
    stop: &AtomicBool,
    shared: &Mutex<HeartbeatReport>,
    rep: &mut HeartbeatReport,
) -> Result<(), String> {
    enter(ns).map_err(|e| format!("entering {ns}: {e}"))?;
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {}", classify(e)))?;
    rep.local = s.local_addr().ok();
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_nodelay(true);
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut writer = s;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        let n = rep.exchanges;
        let msg = format!("heartbeat {n}\n");
        let t = Instant::now();
        writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("write #{n}: {}", classify(e)))?;
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(format!("closed by the peer after {n} exchanges")),
            Ok(_) if line == msg => {}
            Ok(_) => return Err(format!("echo #{n} came back as {line:?}")),
            Err(e) => return Err(format!("read #{n}: {}", classify(e))),
        }
        rep.exchanges += 1;
        rep.max_rtt = rep.max_rtt.max(t.elapsed());
        if let Ok(mut st) = shared.lock() {
            *st = rep.clone();
        }
        std::thread::sleep(interval.saturating_sub(t.elapsed()));
    }
    Ok(())
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
