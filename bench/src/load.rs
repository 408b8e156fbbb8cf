//! The load generator: `orca-bench load ...`, started by the orchestrator inside the client pod's network
//! namespace (`ip netns exec <pod netns> orca-bench load ...`). Every run is bounded in time (`--duration-ms`)
//! and in count (`--max-ops`); it prints one JSON line ([`LoadResult`]) on stdout.
//!
//! Modes:
//! * `connect`: each op is a new TCP connection, one `GET /hostname`, the answer read (by its Content-Length),
//!   close by the client (abortive, SO_LINGER 0: no TIME_WAIT accumulates on either side). Reports connections/s, connect latency (SYN to established) and whole-op latency.
//! * `rr`: each worker keeps one connection to a TCP echo server and does `--size`-byte request/response
//!   round trips. Reports round trips/s and their latency.
//! * `stream`: one connection to a TCP sink; bytes are written for the duration, then the write side is shut and
//!   the sink's count read back. Reports the throughput the sink acknowledged.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most ops one run may do, whatever the flags say.
pub const MAX_OPS_CAP: u64 = 1_000_000;
/// Longest run, whatever the flags say.
pub const MAX_DURATION: Duration = Duration::from_secs(60);
/// Most bytes one stream run may send.
pub const MAX_STREAM_BYTES: u64 = 64 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Connect,
    Rr,
    Stream,
}

#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Target(s); ops go round-robin over them (repeatable).
    #[arg(long = "addr", required = true)]
    pub addrs: Vec<SocketAddr>,
    /// Concurrent workers (stream mode always uses one).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    #[arg(long, default_value_t = 2000)]
    pub duration_ms: u64,
    #[arg(long, default_value_t = 50_000)]
    pub max_ops: u64,
    /// Limit of one op (connect + exchange).
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Request size in rr mode.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
}

/// What one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub ops: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Successful ops per second.
    pub rate: f64,
    /// Whole-op latency, microseconds.
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    /// Connect latency (connect mode), microseconds.
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    /// Bytes acknowledged (stream mode) and the throughput.
    pub bytes: u64,
    pub mbit_s: f64,
}

impl LoadResult {
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The `p`-quantile (0..=1) of sorted samples (nearest rank); 0 for none.
pub fn quantile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

fn err_kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused".into(),
        TimedOut => "timeout".into(),
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset".into(),
        _ => format!("io: {}", e.kind()),
    }
}

#[derive(Default)]
struct WorkerOut {
    lat: Vec<u32>,
    conn: Vec<u32>,
    errors: BTreeMap<String, u64>,
    bytes: u64,
}

impl WorkerOut {
    fn error(&mut self, what: String) {
        *self.errors.entry(what).or_default() += 1;
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Read one HTTP/1.1 response with a `Content-Length` body: whether its status is 200, and the body.
pub async fn read_response(s: &mut TcpStream) -> Result<(bool, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| err_kind(&e))?;
        if n == 0 {
            return Err(format!("connection closed after {} bytes", buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > 16 * 1024 {
                return Err("response head over 16 KiB".into());
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| "response without Content-Length".to_string())?;
        let want = end + 4 + len;
        while buf.len() < want {
            let n = s.read(&mut chunk).await.map_err(|e| err_kind(&e))?;
            if n == 0 {
                return Err("connection closed inside the body".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Ok((head.starts_with("http/1.1 200"), buf[end + 4..want].to_vec()));
    }
}

async fn connect_op(addr: SocketAddr, timeout: Duration, out: &mut WorkerOut) {
    let t0 = Instant::now();
    let op = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| err_kind(&e))?;
        let tc = t0.elapsed();
        let _ = s.set_nodelay(true);
        // The client closes, and with RST (SO_LINGER 0) once the answer is read: no side keeps TIME_WAIT.
        // Had the server closed first (`Connection: close`), its TIME_WAIT entries would collide with the
        // client's reused ports after a few ten thousand connections, and those SYNs would stall for a
        // retransmission (1 s).
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        s.write_all(b"GET /hostname HTTP/1.1\r\nHost: bench\r\n\r\n")
            .await
            .map_err(|e| err_kind(&e))?;
        if !read_response(&mut s).await?.0 {
            return Err("HTTP status not 200".to_string());
        }
        Ok::<Duration, String>(tc)
    };
    match tokio::time::timeout(timeout, op).await {
        Ok(Ok(tc)) => {
            out.conn.push(micros(tc));
            out.lat.push(micros(t0.elapsed()));
        }
        Ok(Err(e)) => out.error(e),
        Err(_) => out.error("timeout".into()),
    }
}

async fn rr_worker(addr: SocketAddr, a: Arc<Shared>, size: usize, timeout: Duration) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut s = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            out.error(err_kind(&e));
            return out;
        }
        Err(_) => {
            out.error("timeout".into());
            return out;
        }
    };
    let _ = s.set_nodelay(true);
    let req = vec![b'x'; size.max(1)];
    let mut resp = vec![0u8; req.len()];
    while a.take() {
        let t0 = Instant::now();
        let op = async {
            s.write_all(&req).await?;
            s.read_exact(&mut resp).await?;
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(timeout, op).await {
            Ok(Ok(())) => out.lat.push(micros(t0.elapsed())),
            Ok(Err(e)) => {
                out.error(err_kind(&e));
                break;
            }
            Err(_) => {
                out.error("timeout".into());
                break;
            }
        }
    }
    out
}

async fn stream_run(addr: SocketAddr, a: Arc<Shared>, timeout: Duration) -> WorkerOut {
    let mut out = WorkerOut::default();
    let r = async {
        let mut s = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| err_kind(&e))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0u64;
        while Instant::now() < a.deadline && sent < MAX_STREAM_BYTES {
            tokio::time::timeout(timeout, s.write_all(&chunk))
                .await
                .map_err(|_| "timeout".to_string())?
                .map_err(|e| err_kind(&e))?;
            sent += chunk.len() as u64;
        }
        s.shutdown().await.map_err(|e| err_kind(&e))?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .map_err(|_| "timeout waiting for the sink's count".to_string())?
            .map_err(|e| err_kind(&e))?;
        let acked: u64 = String::from_utf8_lossy(&buf)
            .trim()
            .parse()
            .map_err(|_| format!("sink answered {:?}", String::from_utf8_lossy(&buf)))?;
        if acked != sent {
            return Err(format!("sent {sent} bytes, the sink counted {acked}"));
        }
        Ok::<u64, String>(acked)
    };
    match r.await {
        Ok(b) => {
            out.bytes = b;
            out.lat.push(0);
        }
        Err(e) => out.error(e),
    }
    out
}

struct Shared {
    issued: AtomicU64,
    max_ops: u64,
    deadline: Instant,
}

impl Shared {
    /// Claim one op; false when the count or the time is used up.
    fn take(&self) -> bool {
        Instant::now() < self.deadline && self.issued.fetch_add(1, Ordering::Relaxed) < self.max_ops
    }
}

/// Run the load described by `args` (in the current network namespace).
pub async fn run(args: &LoadArgs) -> Result<LoadResult> {
    if args.addrs.is_empty() {
        bail!("no --addr");
    }
    if args.workers == 0 || args.workers > 256 {
        bail!("--workers must be 1..=256, not {}", args.workers);
    }
    let duration = Duration::from_millis(args.duration_ms).min(MAX_DURATION);
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let start = Instant::now();
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        max_ops: args.max_ops.min(MAX_OPS_CAP),
        deadline: start + duration,
    });
    let mut tasks = tokio::task::JoinSet::new();
    let workers = if args.mode == Mode::Stream { 1 } else { args.workers };
    for w in 0..workers {
        let a = shared.clone();
        let addrs = args.addrs.clone();
        let (mode, size) = (args.mode, args.size);
        tasks.spawn(async move {
            match mode {
                Mode::Connect => {
                    let mut out = WorkerOut::default();
                    let mut i = w;
                    while a.take() {
                        connect_op(addrs[i % addrs.len()], timeout, &mut out).await;
                        i += 1;
                    }
                    out
                }
                Mode::Rr => rr_worker(addrs[w % addrs.len()], a, size, timeout).await,
                Mode::Stream => stream_run(addrs[0], a, timeout).await,
            }
        });
    }
    let mut all = WorkerOut::default();
    while let Some(r) = tasks.join_next().await {
        let o = r.context("a load worker panicked")?;
        all.lat.extend(o.lat);
        all.conn.extend(o.conn);
        all.bytes += o.bytes;
        for (k, v) in o.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.lat.sort_unstable();
    all.conn.sort_unstable();
    let ops = if args.mode == Mode::Stream {
        0
    } else {
        all.lat.len() as u64
    };
    Ok(LoadResult {
        ops,
        errors: all.errors,
        elapsed_s: elapsed,
        rate: if elapsed > 0.0 { ops as f64 / elapsed } else { 0.0 },
        lat_p50_us: quantile(&all.lat, 0.50),
        lat_p99_us: quantile(&all.lat, 0.99),
        connect_p50_us: quantile(&all.conn, 0.50),
        connect_p99_us: quantile(&all.conn, 0.99),
        bytes: all.bytes,
        mbit_s: if elapsed > 0.0 {
            all.bytes as f64 * 8.0 / elapsed / 1e6
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(quantile(&[7], 0.99), 7.0);
    }

    /// The generator against local servers: an HTTP answer, an echo, a sink; and a refused port.
    #[tokio::test]
    async fn modes_against_local_servers() {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = http.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 512];
                    let _ = s.read(&mut b).await;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                    // Keep-alive: wait for the client to close.
                    let _ = s.read(&mut b).await;
                });
            }
        });
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink_addr = sink.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = sink.accept().await {
                tokio::spawn(async move {
                    let mut n = 0u64;
                    let mut b = vec![0u8; 65536];
                    while let Ok(k) = s.read(&mut b).await {
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                    }
                    let _ = s.write_all(format!("{n}\n").as_bytes()).await;
                });
            }
        });
        let base = |mode, addr| LoadArgs {
            mode,
            addrs: vec![addr],
            workers: 2,
            duration_ms: 300,
            max_ops: 200,
            timeout_ms: 1000,
            size: 64,
        };
        let c = run(&base(Mode::Connect, http_addr)).await.unwrap();
        assert!(c.ops > 0 && c.ops <= 200, "{c:?}");
        assert_eq!(c.failed(), 0, "{c:?}");
        assert!(c.connect_p50_us <= c.lat_p50_us, "{c:?}");
        let r = run(&base(Mode::Rr, echo_addr)).await.unwrap();
        assert!(r.ops > 0 && r.ops <= 200 + 2, "{r:?}");
        assert_eq!(r.failed(), 0, "{r:?}");
        let s = run(&base(Mode::Stream, sink_addr)).await.unwrap();
        assert!(s.bytes > 0 && s.mbit_s > 0.0, "{s:?}");
        // A closed port: every op fails as refused, nothing counts as done.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let f = run(&base(Mode::Connect, closed)).await.unwrap();
        assert_eq!(f.ops, 0);
        assert!(f.errors.get("refused").copied().unwrap_or(0) > 0, "{f:?}");
    }
}
