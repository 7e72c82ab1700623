//! The `/metrics` endpoint, built to survive its clients: hyper on a tokio
//! runtime of its own thread, with timers enabled, at most
//! [`Bounds::connections`] connections at once (more are closed at accept),
//! a deadline for a request's headers and for each connection's whole life,
//! one request per connection, and an accept loop that backs off and goes on
//! when the process runs out of file descriptors.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The endpoint's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub connections: usize,
    /// Time a client has to send its request's headers.
    pub header_timeout: Duration,
    /// Time a connection may live, however slowly it reads or writes.
    pub connection_timeout: Duration,
    /// Pause of the accept loop after an accept error (file descriptors exhausted).
    pub accept_backoff: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            connections: 32,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            accept_backoff: Duration::from_millis(100),
        }
    }
}

/// Serve `/metrics` at `addr` from a thread of its own and return the address
/// bound (port 0 becomes the port the system picked). A port in use (or any
/// bind error) is a warning naming it, and training goes on without the endpoint.
pub fn serve(registry: Registry, addr: SocketAddr, bounds: Bounds) -> Option<SocketAddr> {
    let bind = |addr| {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok::<_, std::io::Error>((l.local_addr()?, l))
    };
    let (bound, listener) = match bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("metrics: cannot listen on {addr} ({e}); training goes on without /metrics");
            return None;
        }
    };
    let run = move || -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            accept_loop(listener, Arc::new(registry), bounds).await;
            Ok(())
        })
    };
    let thread = std::thread::Builder::new().name("metrics".into()).spawn(move || {
        // Not a data worker: a panic here is printed and ends only the endpoint, never the run.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("metrics: the endpoint stopped: {e}"),
            Err(_) => tracing::warn!("metrics: the endpoint panicked and stopped"),
        }
    });
    thread.ok()?;
    tracing::info!("metrics: http://{bound}/metrics");
    Some(bound)
}

async fn accept_loop(listener: tokio::net::TcpListener, registry: Arc<Registry>, bounds: Bounds) {
    let permits = Arc::new(tokio::sync::Semaphore::new(bounds.connections));
    let mut failing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(e) => {
                // EMFILE and the like: wait for descriptors to be freed, then go on.
                if !failing {
                    tracing::warn!("metrics: accept failed ({e}); retrying every {:?}", bounds.accept_backoff);
                    failing = true;
                }
                tokio::time::sleep(bounds.accept_backoff).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream); // over the cap: closed at once
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &registry)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(bounds.connection_timeout, conn).await;
            drop(permit);
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (200, super::encode(registry), "text/plain; version=0.0.4"),
        _ => (404, "not found: the metrics are at /metrics\n".to_string(), "text/plain"),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("a status");
    resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static(kind));
    resp
}
