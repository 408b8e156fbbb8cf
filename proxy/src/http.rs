//! The HTTP server of /healthz, /livez, /metrics and the healthCheckNodePort answers: hyper's HTTP/1.1 server, GET
//! and HEAD only, one request per connection (as before hyper, so clients that read to the end keep working), a
//! bounded request head and time, and a bounded number of connections per listener: `:10256` and the
//! healthCheckNodePorts are reachable from outside the node.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

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

/// Connections one listener serves at once; further ones wait in the kernel's accept queue until one is done.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may last, answer included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head read (hyper's minimum buffer).
const MAX_HEAD: usize = 8192;

/// Serves `handler(path)` on `listener` until the task is dropped, [`MAX_CONNECTIONS`] at a time.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(String) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send,
{
    serve_limited(listener, MAX_CONNECTIONS, handler).await
}

async fn serve_limited<H, F>(listener: TcpListener, limit: usize, handler: H)
where
    H: Fn(String) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(limit));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(respond(handler.as_ref(), &req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                // Header names as Go's net/http (kube-proxy) writes them: `Content-Type`, not `content-type`.
                .title_case_headers(true)
                .serve_connection(TokioIo::new(sock), service);
            // A client that stops reading, or a slow error, must not hold its slot for ever.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

/// The answer to one request: 405 for methods other than GET and HEAD (hyper leaves out a HEAD answer's body).
async fn respond<H, F>(handler: &H, req: &Request<Incoming>) -> hyper::Response<Full<Bytes>>
where
    H: Fn(String) -> F,
    F: Future<Output = Response>,
{
    let resp = if req.method() == Method::GET || req.method() == Method::HEAD {
        handler(req.uri().path().to_string()).await
    } else {
        Response::new(405, "text/plain; charset=utf-8", "method not allowed\n".into())
    };
    let mut out = hyper::Response::new(Full::new(Bytes::from(resp.body)));
    *out.status_mut() = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in resp.headers {
        if let Ok(v) = value.parse() {
            out.headers_mut().insert(name, v);
        }
    }
    out
}

/// A server that could not listen; reads like kube-proxy's ("failed to start proxy healthz on <addr>: ...").
#[derive(Debug, thiserror::Error)]
#[error("failed to start {what} on {addr}: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` for the server `what`. On failure the caller logs the error, records an Event and goes on without
/// that server.
pub async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { what, addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server(limit: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_limited(l, limit, |path: String| async move {
            match path.as_str() {
                "/healthz" => Response::new(200, "application/json", "{\"healthy\":true}".into()),
                _ => Response::new(404, "text/plain; charset=utf-8", "404 page not found\n".into()),
            }
        }));
        addr
    }

    async fn request(addr: SocketAddr, head: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_get_head_and_refuses_other_methods() {
        let addr = server(4).await;
        let get = request(addr, "GET /healthz?x=1 HTTP/1.1\r\nHost: n\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(
            get.to_ascii_lowercase().contains("content-type: application/json"),
            "{get}"
        );
        assert!(get.to_ascii_lowercase().contains("content-length: 16"), "{get}");
        assert!(get.ends_with("{\"healthy\":true}"), "{get}");
        let head = request(addr, "HEAD /healthz HTTP/1.1\r\nHost: n\r\n\r\n").await;
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let post = request(addr, "POST /healthz HTTP/1.1\r\nHost: n\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
        let missing = request(addr, "GET /nope HTTP/1.1\r\nHost: n\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"), "{missing}");
        let garbage = request(addr, "NOT HTTP\r\n\r\n").await;
        assert!(garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    }

    #[tokio::test]
    async fn connections_over_the_limit_wait_for_a_free_slot() {
        let addr = server(2).await;
        // Two clients that connect and send nothing hold both slots.
        let idle1 = TcpStream::connect(addr).await.unwrap();
        let _idle2 = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let third = tokio::spawn(request(addr, "GET /healthz HTTP/1.1\r\nHost: n\r\n\r\n"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !third.is_finished(),
            "a third connection was served beside two held ones"
        );
        // One leaves: the waiting one is answered.
        drop(idle1);
        let answer = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    }
}
