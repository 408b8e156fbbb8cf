//! A tiny HTTP/1.1 server for /healthz, /livez and /metrics (and healthCheckNodePort answers): GET only, one
//! request per connection, bounded request size and time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A response: status code, extra headers and body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: String) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", content_type.to_string())],
            body,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Serves `handler(path)` on `listener` until the task is dropped.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(String) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send,
{
    let handler = Arc::new(handler);
    loop {
        let (mut sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    let n = sock.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
            let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let resp = if method != "GET" && method != "HEAD" {
                Response::new(405, "text/plain; charset=utf-8", "method not allowed\n".into())
            } else {
                let path = path.split('?').next().unwrap_or_default().to_string();
                handler(path).await
            };
            let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
            for (k, v) in &resp.headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                resp.body.len()
            ));
            if method != "HEAD" {
                out.push_str(&resp.body);
            }
            let _ = sock.write_all(out.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Binds `addr`. On failure the error reads like kube-proxy's ("failed to start proxy healthz on <addr>: ..."); the
/// caller logs it, records an Event and goes on without that server.
pub async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("failed to start {what} on {addr}: {e}"))
}
