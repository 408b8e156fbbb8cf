//! `orca-testpod`: the sandbox's test server (like kuard / agnhost netexec) and a matching small client.
//!
//! # Server: `orca-testpod serve [flags]`
//!
//! | flag | default | meaning |
//! | --- | --- | --- |
//! | `--name N` | `$POD_NAME`, else the hostname | pod name reported in every answer |
//! | `--namespace NS` | `$POD_NAMESPACE`, else `default` | |
//! | `--pod-ip IP` | `$POD_IP`, else empty | |
//! | `--node NODE` | `$NODE_NAME`, else empty | |
//! | `--http-port P` (repeatable) | 8080 | HTTP ports (multi-port / named targetPort scenarios) |
//! | `--udp-port P` (repeatable) | 8081 | UDP echo ports (`0` disables) |
//! | `--tcp-echo-port P` | 9000 | TCP echo (`0` disables) |
//! | `--tcp-sink-port P` | 9001 | TCP sink (`0` disables) |
//! | `--not-ready` | | start with `/ready` failing |
//! | `--on-sigterm fail-ready\|keep-ready\|exit` | `fail-ready` | what SIGTERM does: start failing `/ready` and keep serving (a draining app; the kubelet kills it after the grace period), keep everything as it is, or exit at once |
//!
//! HTTP (HTTP/1.1, keep-alive unless `Connection: close`):
//! * `GET /` → `200` JSON `{"pod","namespace","podIP","node","client":"ip:port","serverPort","ready","healthy"}`:
//!   `client` is the peer address the server saw (source-IP preservation checks), `serverPort` the local port
//!   that answered.
//! * `GET /hostname` → the pod name; `GET /clientip` → `ip:port` of the peer (plain text, like agnhost).
//! * `GET /ready`, `GET /healthy` → `200 ok` or `503 not ready` / `503 not healthy`.
//! * `POST /ready/fail`, `POST /ready/ok`, `POST /healthy/fail`, `POST /healthy/ok` → flip the state (200).
//! * `GET /stats` → JSON counters (HTTP requests, UDP datagrams, TCP sink bytes).
//!
//! UDP echo: each datagram is answered with one datagram, the JSON
//! `{"pod","podIP","node","client":"ip:port","payload":"<datagram, lossy UTF-8>"}`.
//!
//! TCP echo: every byte read is written back. TCP sink: bytes are read and counted until the client shuts its
//! write side; the server then writes the count as decimal plus `\n` and closes.
//!
//! # Client: `orca-testpod <get|post|udp|tcp-echo|tcp-sink> ...`
//!
//! Runs in whatever network namespace it is started in (`ip netns exec orca-... orca-testpod get ...`).
//! * `get URL [--timeout SECS]`, `post URL [--timeout SECS]`: prints the status line's code and the body
//!   (`200\n{...}`).
//! * `udp IP:PORT [PAYLOAD] [--timeout SECS]`: prints the reply.
//! * `tcp-echo IP:PORT [PAYLOAD] [--timeout SECS]`: prints what came back.
//! * `tcp-sink IP:PORT --bytes N [--timeout SECS]`: sends N bytes, prints `sent=N acked=M secs=S mbit_per_s=R`.
//!
//! Exit codes: 0 success, 2 connection refused, 3 timed out, 4 connection reset, 1 anything else (usage errors
//! included). Bad input is reported on stderr; nothing panics.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const USAGE: &str = "usage: orca-testpod serve [--name N] [--namespace NS] [--pod-ip IP] [--node NODE] \
[--http-port P]... [--udp-port P]... [--tcp-echo-port P] [--tcp-sink-port P] [--not-ready] \
[--on-sigterm fail-ready|keep-ready|exit]\n       \
orca-testpod get|post URL [--timeout SECS]\n       \
orca-testpod udp IP:PORT [PAYLOAD] [--timeout SECS]\n       \
orca-testpod tcp-echo IP:PORT [PAYLOAD] [--timeout SECS]\n       \
orca-testpod tcp-sink IP:PORT --bytes N [--timeout SECS]";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnSigterm {
    FailReady,
    KeepReady,
    Exit,
}

#[derive(Debug)]
struct ServeArgs {
    name: String,
    namespace: String,
    pod_ip: String,
    node: String,
    http_ports: Vec<u16>,
    udp_ports: Vec<u16>,
    tcp_echo_port: u16,
    tcp_sink_port: u16,
    not_ready: bool,
    on_sigterm: OnSigterm,
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn parse_port(flag: &str, v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .map_err(|_| format!("{flag}: {v:?} is not a port number"))
}

fn parse_serve(args: &[String]) -> Result<ServeArgs, String> {
    let mut a = ServeArgs {
        name: env_or("POD_NAME", &hostname()),
        namespace: env_or("POD_NAMESPACE", "default"),
        pod_ip: env_or("POD_IP", ""),
        node: env_or("NODE_NAME", ""),
        http_ports: Vec::new(),
        udp_ports: Vec::new(),
        tcp_echo_port: 9000,
        tcp_sink_port: 9001,
        not_ready: false,
        on_sigterm: OnSigterm::FailReady,
    };
    let mut udp_given = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--name" => a.name = value()?,
            "--namespace" => a.namespace = value()?,
            "--pod-ip" => a.pod_ip = value()?,
            "--node" => a.node = value()?,
            "--http-port" => a.http_ports.push(parse_port(flag, &value()?)?),
            "--udp-port" => {
                udp_given = true;
                a.udp_ports.push(parse_port(flag, &value()?)?)
            }
            "--tcp-echo-port" => a.tcp_echo_port = parse_port(flag, &value()?)?,
            "--tcp-sink-port" => a.tcp_sink_port = parse_port(flag, &value()?)?,
            "--not-ready" => a.not_ready = true,
            "--on-sigterm" => {
                a.on_sigterm = match value()?.as_str() {
                    "fail-ready" => OnSigterm::FailReady,
                    "keep-ready" => OnSigterm::KeepReady,
                    "exit" => OnSigterm::Exit,
                    other => return Err(format!("--on-sigterm: unknown mode {other:?}")),
                }
            }
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if a.http_ports.is_empty() {
        a.http_ports.push(8080);
    }
    if !udp_given {
        a.udp_ports.push(8081);
    }
    a.http_ports.retain(|p| *p != 0);
    a.udp_ports.retain(|p| *p != 0);
    let mut all: Vec<(u16, &str)> = a.http_ports.iter().map(|p| (*p, "tcp")).collect();
    all.extend(
        [a.tcp_echo_port, a.tcp_sink_port]
            .into_iter()
            .filter(|p| *p != 0)
            .map(|p| (p, "tcp")),
    );
    let mut seen = std::collections::HashSet::new();
    for p in &all {
        if !seen.insert(*p) {
            return Err(format!("TCP port {} is given twice", p.0));
        }
    }
    let mut useen = std::collections::HashSet::new();
    for p in &a.udp_ports {
        if !useen.insert(*p) {
            return Err(format!("UDP port {p} is given twice"));
        }
    }
    Ok(a)
}

struct State {
    args: ServeArgs,
    ready: AtomicBool,
    healthy: AtomicBool,
    http_requests: AtomicU64,
    udp_datagrams: AtomicU64,
    sink_bytes: AtomicU64,
    echo_bytes: AtomicU64,
}

fn json_escape(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Peer addresses come as IPv4-mapped IPv6 when a socket is dual-stack; report the plain IPv4 form.
fn plain(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn response(code: u16, content_type: &str, body: &str, close: bool) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let conn = if close { "close" } else { "keep-alive" };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn handle_request(
    st: &State,
    method: &str,
    path: &str,
    peer: SocketAddr,
    local_port: u16,
) -> (u16, &'static str, String) {
    st.http_requests.fetch_add(1, Ordering::Relaxed);
    let path = path.split('?').next().unwrap_or("");
    let text = "text/plain";
    let json = "application/json";
    let flip = |flag: &AtomicBool, v: bool, what: &str| {
        flag.store(v, Ordering::SeqCst);
        eprintln!("orca-testpod {}: {what}", st.args.name);
        (200, text, format!("{what}\n"))
    };
    match (method, path) {
        ("GET", "/") | ("HEAD", "/") => {
            let a = &st.args;
            let body = format!(
                "{{\"pod\":{},\"namespace\":{},\"podIP\":{},\"node\":{},\"client\":{},\"serverPort\":{local_port},\"ready\":{},\"healthy\":{}}}\n",
                json_escape(&a.name),
                json_escape(&a.namespace),
                json_escape(&a.pod_ip),
                json_escape(&a.node),
                json_escape(&peer.to_string()),
                st.ready.load(Ordering::SeqCst),
                st.healthy.load(Ordering::SeqCst),
            );
            (200, json, body)
        }
        ("GET", "/hostname") => (200, text, st.args.name.clone()),
        ("GET", "/clientip") => (200, text, peer.to_string()),
        ("GET", "/ready") => {
            if st.ready.load(Ordering::SeqCst) {
                (200, text, "ok\n".into())
            } else {
                (503, text, "not ready\n".into())
            }
        }
        ("GET", "/healthy") => {
            if st.healthy.load(Ordering::SeqCst) {
                (200, text, "ok\n".into())
            } else {
                (503, text, "not healthy\n".into())
            }
        }
        ("POST", "/ready/fail") => flip(&st.ready, false, "readiness set to failing"),
        ("POST", "/ready/ok") => flip(&st.ready, true, "readiness set to ok"),
        ("POST", "/healthy/fail") => flip(&st.healthy, false, "health set to failing"),
        ("POST", "/healthy/ok") => flip(&st.healthy, true, "health set to ok"),
        ("GET", "/stats") => (
            200,
            json,
            format!(
                "{{\"httpRequests\":{},\"udpDatagrams\":{},\"tcpSinkBytes\":{},\"tcpEchoBytes\":{}}}\n",
                st.http_requests.load(Ordering::Relaxed),
                st.udp_datagrams.load(Ordering::Relaxed),
                st.sink_bytes.load(Ordering::Relaxed),
                st.echo_bytes.load(Ordering::Relaxed),
            ),
        ),
        (
            _,
            "/" | "/hostname" | "/clientip" | "/ready" | "/healthy" | "/stats" | "/ready/fail" | "/ready/ok"
            | "/healthy/fail" | "/healthy/ok",
        ) => (405, text, format!("method {method} not allowed on {path}\n")),
        _ => (404, text, format!("no route for {path}\n")),
    }
}

/// Serve one HTTP/1.1 connection: requests without bodies (a Content-Length body is read and ignored).
async fn http_conn(st: Arc<State>, stream: TcpStream, peer: SocketAddr, local_port: u16) {
    let peer = plain(peer);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(60), rd.read_line(&mut line)).await {
            Ok(Ok(0)) | Err(_) => return,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
            let _ = wr
                .write_all(&response(400, "text/plain", "malformed request line\n", true))
                .await;
            return;
        };
        let (method, path) = (method.to_string(), path.to_string());
        let mut close = version == "HTTP/1.0";
        let mut content_length: usize = 0;
        loop {
            let mut h = String::new();
            match rd.read_line(&mut h).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
                if k == "connection" {
                    close = v == "close";
                } else if k == "content-length" {
                    content_length = v.parse().unwrap_or(0).min(1 << 20);
                }
            }
        }
        if content_length > 0 {
            let mut body = vec![0u8; content_length];
            if rd.read_exact(&mut body).await.is_err() {
                return;
            }
        }
        let (code, ctype, body) = handle_request(&st, &method, &path, peer, local_port);
        let body = if method == "HEAD" { String::new() } else { body };
        if wr.write_all(&response(code, ctype, &body, close)).await.is_err() || close {
            return;
        }
    }
}

async fn bind_tcp(port: u16) -> std::io::Result<TcpListener> {
    // `[::]` answers IPv4 as well (bindv6only is 0); peers are reported through `plain`.
    TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await
}

async fn serve_http(st: Arc<State>, l: TcpListener, port: u16) {
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(http_conn(st.clone(), s, peer, port));
            }
            Err(e) => {
                eprintln!("orca-testpod: accept on {port}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_udp(st: Arc<State>, sock: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("orca-testpod: udp recv: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        st.udp_datagrams.fetch_add(1, Ordering::Relaxed);
        let a = &st.args;
        let reply = format!(
            "{{\"pod\":{},\"podIP\":{},\"node\":{},\"client\":{},\"payload\":{}}}",
            json_escape(&a.name),
            json_escape(&a.pod_ip),
            json_escape(&a.node),
            json_escape(&plain(peer).to_string()),
            json_escape(&String::from_utf8_lossy(&buf[..n])),
        );
        if let Err(e) = sock.send_to(reply.as_bytes(), peer).await {
            eprintln!("orca-testpod: udp reply to {peer}: {e}");
        }
    }
}

async fn serve_tcp(st: Arc<State>, l: TcpListener, sink: bool) {
    loop {
        let (mut s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("orca-testpod: tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let st = st.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total: u64 = 0;
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                total += n as u64;
                if sink {
                    st.sink_bytes.fetch_add(n as u64, Ordering::Relaxed);
                } else {
                    st.echo_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
            if sink {
                let _ = s.write_all(format!("{total}\n").as_bytes()).await;
            }
            let _ = s.shutdown().await;
        });
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let ready = !args.not_ready;
    let on_sigterm = args.on_sigterm;
    let st = Arc::new(State {
        args,
        ready: AtomicBool::new(ready),
        healthy: AtomicBool::new(true),
        http_requests: AtomicU64::new(0),
        udp_datagrams: AtomicU64::new(0),
        sink_bytes: AtomicU64::new(0),
        echo_bytes: AtomicU64::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for &p in &st.args.http_ports {
        let l = bind_tcp(p).await.map_err(|e| format!("binding HTTP port {p}: {e}"))?;
        tasks.spawn(serve_http(st.clone(), l, p));
    }
    for &p in &st.args.udp_ports {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, p))
            .await
            .map_err(|e| format!("binding UDP port {p}: {e}"))?;
        tasks.spawn(serve_udp(st.clone(), s));
    }
    for (p, sink) in [(st.args.tcp_echo_port, false), (st.args.tcp_sink_port, true)] {
        if p != 0 {
            let l = bind_tcp(p).await.map_err(|e| format!("binding TCP port {p}: {e}"))?;
            tasks.spawn(serve_tcp(st.clone(), l, sink));
        }
    }
    eprintln!(
        "orca-testpod {} ({}) serving: http {:?} udp {:?} tcp-echo {} tcp-sink {} ready={ready}",
        st.args.name,
        st.args.pod_ip,
        st.args.http_ports,
        st.args.udp_ports,
        st.args.tcp_echo_port,
        st.args.tcp_sink_port
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("installing the SIGINT handler: {e}"))?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                match on_sigterm {
                    OnSigterm::Exit => {
                        eprintln!("orca-testpod {}: SIGTERM, exiting", st.args.name);
                        return Ok(());
                    }
                    OnSigterm::FailReady => {
                        st.ready.store(false, Ordering::SeqCst);
                        eprintln!("orca-testpod {}: SIGTERM, failing readiness, still serving", st.args.name);
                    }
                    OnSigterm::KeepReady => {
                        eprintln!("orca-testpod {}: SIGTERM, still ready and serving", st.args.name);
                    }
                }
            }
            _ = int.recv() => return Ok(()),
            Some(r) = tasks.join_next() => {
                return Err(format!("a listener task ended: {r:?}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Client

#[derive(Debug)]
enum ClientError {
    Refused(String),
    Timeout(String),
    Reset(String),
    Other(String),
}

impl ClientError {
    fn from_io(what: &str, e: std::io::Error) -> ClientError {
        use std::io::ErrorKind::*;
        let msg = format!("{what}: {e}");
        match e.kind() {
            ConnectionRefused => ClientError::Refused(msg),
            TimedOut | WouldBlock => ClientError::Timeout(msg),
            ConnectionReset | ConnectionAborted | BrokenPipe => ClientError::Reset(msg),
            _ => ClientError::Other(msg),
        }
    }
    fn exit(&self) -> ExitCode {
        let (code, msg) = match self {
            ClientError::Refused(m) => (2, m),
            ClientError::Timeout(m) => (3, m),
            ClientError::Reset(m) => (4, m),
            ClientError::Other(m) => (1, m),
        };
        eprintln!("orca-testpod: {msg}");
        ExitCode::from(code)
    }
}

async fn with_timeout<T>(
    t: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(t, f)
        .await
        .map_err(|_| ClientError::Timeout(format!("{what}: timed out after {t:?}")))?
}

fn parse_url(url: &str) -> Result<(SocketAddr, String), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Other(format!("{url:?}: only http:// URLs are supported")))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let addr = if hostport.contains(':') {
        hostport.parse::<SocketAddr>()
    } else {
        format!("{hostport}:80").parse::<SocketAddr>()
    }
    .map_err(|_| ClientError::Other(format!("{url:?}: host must be an IP address[:port]")))?;
    Ok((addr, path))
}

async fn http_client(method: &str, url: &str, timeout: Duration) -> Result<(), ClientError> {
    let (addr, path) = parse_url(url)?;
    with_timeout(timeout, url, async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::from_io(&format!("connecting to {addr}"), e))?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| ClientError::from_io("sending the request", e))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| ClientError::from_io("reading the response", e))?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| ClientError::Other(format!("malformed response {text:?}")))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| ClientError::Other(format!("malformed status line in {head:?}")))?;
        println!("{code}\n{body}");
        Ok(())
    })
    .await
}

async fn udp_client(addr: SocketAddr, payload: &str, timeout: Duration) -> Result<(), ClientError> {
    with_timeout(timeout, &addr.to_string(), async {
        let any: IpAddr = if addr.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let s = UdpSocket::bind((any, 0))
            .await
            .map_err(|e| ClientError::from_io("binding", e))?;
        s.connect(addr)
            .await
            .map_err(|e| ClientError::from_io("connecting", e))?;
        s.send(payload.as_bytes())
            .await
            .map_err(|e| ClientError::from_io("sending", e))?;
        let mut buf = vec![0u8; 65536];
        let n = s
            .recv(&mut buf)
            .await
            .map_err(|e| ClientError::from_io("receiving", e))?;
        println!("{}", String::from_utf8_lossy(&buf[..n]));
        Ok(())
    })
    .await
}

async fn tcp_echo_client(addr: SocketAddr, payload: &str, timeout: Duration) -> Result<(), ClientError> {
    with_timeout(timeout, &addr.to_string(), async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::from_io(&format!("connecting to {addr}"), e))?;
        s.write_all(payload.as_bytes())
            .await
            .map_err(|e| ClientError::from_io("sending", e))?;
        s.shutdown()
            .await
            .map_err(|e| ClientError::from_io("shutting down", e))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| ClientError::from_io("receiving", e))?;
        println!("{}", String::from_utf8_lossy(&buf));
        Ok(())
    })
    .await
}

async fn tcp_sink_client(addr: SocketAddr, bytes: u64, timeout: Duration) -> Result<(), ClientError> {
    with_timeout(timeout, &addr.to_string(), async {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| ClientError::from_io(&format!("connecting to {addr}"), e))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])
                .await
                .map_err(|e| ClientError::from_io("sending", e))?;
            left -= n as u64;
        }
        s.shutdown()
            .await
            .map_err(|e| ClientError::from_io("shutting down", e))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)
            .await
            .map_err(|e| ClientError::from_io("receiving the count", e))?;
        let secs = t0.elapsed().as_secs_f64();
        let acked: u64 = buf
            .trim()
            .parse()
            .map_err(|_| ClientError::Other(format!("sink answered {buf:?}")))?;
        let mbit = (bytes as f64 * 8.0 / 1e6) / secs.max(1e-9);
        println!("sent={bytes} acked={acked} secs={secs:.3} mbit_per_s={mbit:.1}");
        if acked != bytes {
            return Err(ClientError::Other(format!("sent {bytes} bytes, sink counted {acked}")));
        }
        Ok(())
    })
    .await
}

/// Split `--timeout SECS` and `--bytes N` out of the client arguments.
fn client_flags(args: &[String]) -> Result<(Vec<String>, HashMap<String, String>), String> {
    let mut pos = Vec::new();
    let mut flags = HashMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(name) = a.strip_prefix("--") {
            if !matches!(name, "timeout" | "bytes") {
                return Err(format!("unknown flag {a:?}"));
            }
            let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
            flags.insert(name.to_string(), v.clone());
        } else {
            pos.push(a.clone());
        }
    }
    Ok((pos, flags))
}

async fn client(cmd: &str, args: &[String]) -> ExitCode {
    let (pos, flags) = match client_flags(args) {
        Ok(x) => x,
        Err(e) => return ClientError::Other(format!("{e}\n{USAGE}")).exit(),
    };
    let timeout = match flags.get("timeout").map(|t| t.parse::<f64>()) {
        None => Duration::from_secs(5),
        Some(Ok(t)) if t > 0.0 && t < 3600.0 => Duration::from_secs_f64(t),
        Some(_) => return ClientError::Other("--timeout must be seconds in (0, 3600)".into()).exit(),
    };
    let Some(target) = pos.first() else {
        return ClientError::Other(format!("{cmd}: missing target\n{USAGE}")).exit();
    };
    let payload = pos.get(1).cloned().unwrap_or_else(|| "hello".into());
    let addr = || {
        target
            .parse::<SocketAddr>()
            .map_err(|_| ClientError::Other(format!("{target:?} is not IP:PORT")))
    };
    let r = match cmd {
        "get" => http_client("GET", target, timeout).await,
        "post" => http_client("POST", target, timeout).await,
        "udp" => match addr() {
            Ok(a) => udp_client(a, &payload, timeout).await,
            Err(e) => Err(e),
        },
        "tcp-echo" => match addr() {
            Ok(a) => tcp_echo_client(a, &payload, timeout).await,
            Err(e) => Err(e),
        },
        "tcp-sink" => {
            let bytes = flags.get("bytes").map(|b| b.parse::<u64>());
            match (addr(), bytes) {
                (Ok(a), Some(Ok(b))) => tcp_sink_client(a, b, timeout).await,
                (Err(e), _) => Err(e),
                _ => Err(ClientError::Other("tcp-sink needs --bytes N".into())),
            }
        }
        _ => Err(ClientError::Other(format!("unknown command {cmd:?}\n{USAGE}"))),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.exit(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(1);
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("orca-testpod: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cmd.as_str() {
        "serve" => {
            let a = match parse_serve(rest) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("orca-testpod: {e}\n{USAGE}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(serve(a)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("orca-testpod: {e}");
                    ExitCode::from(1)
                }
            }
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => rt.block_on(client(cmd, rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn serve_flags_parse_and_reject_bad_input() {
        let a = parse_serve(&s(&[
            "--name",
            "p1",
            "--http-port",
            "8080",
            "--http-port",
            "9090",
            "--udp-port",
            "0",
        ]))
        .unwrap();
        assert_eq!(a.name, "p1");
        assert_eq!(a.http_ports, vec![8080, 9090]);
        assert!(a.udp_ports.is_empty());
        assert_eq!(a.on_sigterm, OnSigterm::FailReady);
        let d = parse_serve(&[]).unwrap();
        assert_eq!((d.http_ports.clone(), d.udp_ports.clone()), (vec![8080], vec![8081]));
        assert!(parse_serve(&s(&["--http-port", "x"])).is_err());
        assert!(parse_serve(&s(&["--http-port"])).is_err());
        assert!(parse_serve(&s(&["--bogus"])).is_err());
        assert!(
            parse_serve(&s(&["--http-port", "9000"])).is_err(),
            "clashes with tcp-echo"
        );
        assert!(parse_serve(&s(&["--on-sigterm", "later"])).is_err());
    }

    #[test]
    fn routes_and_state_flips() {
        let st = State {
            args: parse_serve(&s(&["--name", "p", "--pod-ip", "10.244.1.2"])).unwrap(),
            ready: AtomicBool::new(true),
            healthy: AtomicBool::new(true),
            http_requests: AtomicU64::new(0),
            udp_datagrams: AtomicU64::new(0),
            sink_bytes: AtomicU64::new(0),
            echo_bytes: AtomicU64::new(0),
        };
        let peer: SocketAddr = "10.240.0.11:4242".parse().unwrap();
        let (c, _, body) = handle_request(&st, "GET", "/", peer, 8080);
        assert_eq!(c, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["pod"], "p");
        assert_eq!(v["client"], "10.240.0.11:4242");
        assert_eq!(v["serverPort"], 8080);
        assert_eq!(handle_request(&st, "GET", "/ready", peer, 8080).0, 200);
        assert_eq!(handle_request(&st, "POST", "/ready/fail", peer, 8080).0, 200);
        assert_eq!(handle_request(&st, "GET", "/ready", peer, 8080).0, 503);
        assert_eq!(handle_request(&st, "POST", "/ready/ok", peer, 8080).0, 200);
        assert_eq!(handle_request(&st, "GET", "/ready?x=1", peer, 8080).0, 200);
        assert_eq!(handle_request(&st, "POST", "/healthy/fail", peer, 8080).0, 200);
        assert_eq!(handle_request(&st, "GET", "/healthy", peer, 8080).0, 503);
        assert_eq!(handle_request(&st, "GET", "/nope", peer, 8080).0, 404);
        assert_eq!(handle_request(&st, "DELETE", "/ready", peer, 8080).0, 405);
        let v6: SocketAddr = "[::ffff:10.0.0.1]:5".parse().unwrap();
        assert_eq!(plain(v6).to_string(), "10.0.0.1:5");
    }

    #[test]
    fn urls_parse() {
        let (a, p) = parse_url("http://10.244.1.2:8080/ready").unwrap();
        assert_eq!((a.to_string(), p.as_str()), ("10.244.1.2:8080".into(), "/ready"));
        let (a, p) = parse_url("http://10.0.0.1").unwrap();
        assert_eq!((a.port(), p.as_str()), (80, "/"));
        let (a, _) = parse_url("http://[fd00:96::a]:80/").unwrap();
        assert_eq!(a.to_string(), "[fd00:96::a]:80");
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("http://name:80/").is_err());
    }
}
