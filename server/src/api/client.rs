//! Client frames: decode, validate, dispatch to the coordinator or admin, count the outcome.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use ringkv_protocol::{ErrorKind, Frame, Request, Response};

use super::admin::Admin;
use super::RequestMetrics;
use crate::coordinator::Coordinator;
use crate::metrics::{Counter, Histogram, ListenerMetrics};
use crate::net::{FrameHandler, Reply};

/// Everything a client connection dispatches to (shared by all client connections).
pub struct ClientApi {
    pub node_id: String,
    pub coordinator: Arc<Coordinator>,
    pub admin: Arc<Admin>,
    pub requests: RequestMetrics,
    pub net: ListenerMetrics,
}

impl ClientApi {
    /// Answers one client request. Never panics on client input.
    pub async fn handle(&self, req: Request) -> Response {
        let resp = self.dispatch(req).await;
        if let Response::Error(e) = &resp {
            self.requests.errors.inc();
            match e.kind {
                ErrorKind::Timeout { .. } => self.requests.timeouts.inc(),
                ErrorKind::Unavailable { .. } => self.requests.unavailable.inc(),
                _ => 0,
            };
        }
        resp
    }

    async fn dispatch(&self, req: Request) -> Response {
        if let Err((kind, msg)) = req.validate() {
            return Response::error(kind, true, format!("node {}: {msg}", self.node_id));
        }
        let m = &self.requests;
        match req {
            Request::Ping => {
                m.ping.inc();
                Response::Pong
            }
            Request::Status => {
                m.status.inc();
                Response::Status(self.admin.status())
            }
            Request::Ring => {
                m.ring.inc();
                Response::Ring(self.admin.ring())
            }
            Request::Members => {
                m.members.inc();
                self.admin.members().await
            }
            Request::Repair { range } => {
                m.repair.inc();
                self.admin.repair(range)
            }
            Request::Cluster(json) => {
                m.cluster.inc();
                Response::Cluster(self.admin.cluster.admin(&json).await)
            }
            Request::Get { key, opts } => {
                timed(&m.get, &m.get_seconds, self.coordinator.get(key, opts)).await
            }
            req @ Request::Put { .. } => {
                timed(&m.put, &m.put_seconds, self.coordinator.write(req)).await
            }
            req @ Request::Delete { .. } => {
                timed(&m.delete, &m.delete_seconds, self.coordinator.write(req)).await
            }
        }
    }
}

/// Counts a request and observes how long it took to answer.
async fn timed(
    count: &Counter,
    seconds: &Histogram,
    answer: impl Future<Output = Response>,
) -> Response {
    count.inc();
    let started = Instant::now();
    let resp = answer.await;
    seconds.observe(started.elapsed().as_secs_f64());
    resp
}

/// One client connection.
pub struct ClientHandler {
    pub api: Arc<ClientApi>,
}

impl FrameHandler for ClientHandler {
    async fn handle(self: Arc<Self>, frame: Frame) -> Reply {
        let id = frame.request_id;
        let resp = match Request::decode(frame.opcode, frame.body) {
            Ok(req) => self.api.handle(req).await,
            Err(e) => {
                self.api.net.malformed.inc();
                Response::error(
                    ErrorKind::Malformed,
                    true,
                    format!("node {}: malformed request: {e}", self.api.node_id),
                )
            }
        };
        Reply {
            frame: resp.to_frame(id),
            close: false,
        }
    }
}
