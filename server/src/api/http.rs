//! The admin HTTP listener (`--admin-listen`): `/metrics` (the registry in the Prometheus
//! text format), `/health` (the process is up and serving) and `/ready` (the node knows the
//! ring, its storage is open, and it is not draining or taken out of the ring), for
//! Prometheus, load balancers and orchestration. HTTP/1.1 by hyper; read-only: nothing here
//! reads or changes data, so it needs no secret (bind it to a private address).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{Counter, Registry};

/// Admin connections open at once; more wait in the kernel's accept queue.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A client must send its request headers within this (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the node should receive traffic now: `Err(why)` when not.
pub type ReadyFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the admin endpoints read.
pub struct AdminHttp {
    pub node_id: String,
    pub registry: Arc<Registry>,
    pub ready: ReadyFn,
    pub requests: [Counter; 4],
}

/// Paths served, as the `path` label of `admin_http.requests`.
const PATHS: [&str; 4] = ["metrics", "health", "ready", "other"];

impl AdminHttp {
    pub fn new(node_id: String, registry: Arc<Registry>, ready: ReadyFn) -> AdminHttp {
        let requests = PATHS.map(|p| {
            registry.counter_with(
                "admin_http.requests",
                "admin HTTP requests, by path",
                &[("path", p)],
            )
        });
        AdminHttp {
            node_id,
            registry,
            ready,
            requests,
        }
    }

    /// The response to one request (pure but for reading the registry and readiness).
    pub fn answer(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, content_type: &str, body: String| {
            Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("a response from a status, a fixed header and a body is valid")
        };
        let text = "text/plain; charset=utf-8";
        let which = PATHS
            .iter()
            .position(|p| path.strip_prefix('/') == Some(p))
            .unwrap_or(PATHS.len() - 1);
        self.requests[which].inc();
        if method != Method::GET && method != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                text,
                format!("node {}: only GET is served here\n", self.node_id),
            );
        }
        match path {
            "/metrics" => reply(
                StatusCode::OK,
                Registry::CONTENT_TYPE,
                self.registry.encode(),
            ),
            "/health" => reply(
                StatusCode::OK,
                text,
                format!("ok: node {} is up\n", self.node_id),
            ),
            "/ready" => match (self.ready)() {
                Ok(()) => reply(
                    StatusCode::OK,
                    text,
                    format!("ready: node {} serves requests\n", self.node_id),
                ),
                Err(why) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    format!("not ready: node {}: {why}\n", self.node_id),
                ),
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                text,
                format!(
                    "node {}: no such path {path:?}; try /metrics, /health or /ready\n",
                    self.node_id
                ),
            ),
        }
    }
}

/// Serves admin HTTP on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, http: Arc<AdminHttp>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(node = %http.node_id, error = %e, "admin HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let http = http.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = http.answer(req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%remote, error = %e, "admin HTTP connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
        while conns.try_join_next().is_some() {}
    }
    info!(node = %http.node_id, "admin HTTP listener stopped");
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(ready: Result<(), String>) -> AdminHttp {
        let registry = Arc::new(Registry::default());
        registry.counter("test.events", "events").inc();
        AdminHttp::new("n1".into(), registry, Box::new(move || ready.clone()))
    }

    fn body(r: Response<Full<Bytes>>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let status = r.status();
        let bytes = futures::executor::block_on(r.into_body().collect())
            .expect("a full body is infallible")
            .to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn metrics_health_and_ready_answer_and_other_paths_are_not_found() {
        let h = http(Ok(()));
        let (s, text) = body(h.answer(&Method::GET, "/metrics"));
        assert_eq!(s, StatusCode::OK);
        assert!(text.contains("ringkv_test_events_total 1"), "{text}");
        assert_eq!(body(h.answer(&Method::GET, "/health")).0, StatusCode::OK);
        assert_eq!(body(h.answer(&Method::GET, "/ready")).0, StatusCode::OK);
        let (s, text) = body(h.answer(&Method::GET, "/nope"));
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(text.contains("/metrics"), "{text}");
        assert_eq!(
            body(h.answer(&Method::POST, "/metrics")).0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        // The requests themselves are counted by path.
        assert_eq!(h.requests[0].get(), 2);
    }

    #[test]
    fn a_node_that_is_not_ready_says_why_with_503() {
        let h = http(Err("the ring is not known yet".into()));
        let (s, text) = body(h.answer(&Method::GET, "/ready"));
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            text.contains("node n1") && text.contains("ring is not known"),
            "{text}"
        );
        // Health is about the process, not readiness.
        assert_eq!(body(h.answer(&Method::GET, "/health")).0, StatusCode::OK);
    }
}
