//! Client frames: decode, validate, admit (the client budget, the deadline), dispatch to the
//! coordinator or admin, count the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringkv_protocol::{ErrorKind, Frame, Request, Response};

use super::admin::Admin;
use super::{result_of, RequestMetrics};
use crate::admission::{Budget, ConnShare, Permit};
use crate::cluster::remote_admin_refusal;
use crate::config::Timeouts;
use crate::coordinator::Coordinator;
use crate::metrics::ListenerMetrics;
use crate::net::{FrameHandler, Reply};

/// Everything a client connection dispatches to (shared by all client connections).
pub struct ClientApi {
    pub node_id: String,
    pub coordinator: Arc<Coordinator>,
    pub admin: Arc<Admin>,
    pub requests: RequestMetrics,
    pub net: ListenerMetrics,
    /// The node-wide budget of client gets, puts and deletes in flight.
    pub budget: Arc<Budget>,
    /// The deadline of a request that names none, and the longest one may have.
    pub timeouts: Timeouts,
    /// Ring changes and repairs accepted from other hosts (`--cluster-admin-remote`).
    pub cluster_admin_remote: bool,
}

/// Why a data request was not run.
enum NotRun {
    Shed(Response),
    Expired(Response),
}

impl ClientApi {
    /// Answers one client request read at `arrived`, with its place in the budget if it was
    /// admitted (kept until the reply is written). Never panics on client input.
    pub async fn handle(
        &self,
        req: Request,
        body_len: usize,
        conn: &Arc<ConnShare>,
        from_this_host: bool,
        arrived: Instant,
    ) -> (Response, Option<Permit>) {
        let op = op_name(&req);
        if let Err((kind, msg)) = req.validate() {
            let resp = Response::error(kind, true, format!("node {}: {msg}", self.node_id));
            self.requests.count(op, result_of(&resp, op));
            return (resp, None);
        }
        if !matches!(
            req,
            Request::Get { .. } | Request::Put { .. } | Request::Delete { .. }
        ) {
            // Admin requests are never shed: status and health answer under any load.
            let may_change = from_this_host || self.cluster_admin_remote;
            let resp = self.admin_request(req, may_change).await;
            self.requests.count(op, result_of(&resp, op));
            return (resp, None);
        }
        let (req, mut permit) = match self.admit(req, body_len, conn, arrived) {
            Ok(admitted) => admitted,
            Err(NotRun::Shed(resp)) => {
                self.requests.count(op, "overloaded");
                return (resp, None);
            }
            Err(NotRun::Expired(resp)) => {
                self.requests.count(op, "expired");
                return (resp, None);
            }
        };
        let started = Instant::now();
        let resp = match req {
            Request::Get { key, opts } => self.coordinator.get(key, opts).await,
            req => self.coordinator.write(req).await,
        };
        permit.answered();
        if let Some(h) = self.requests.seconds(op) {
            h.observe(started.elapsed().as_secs_f64());
        }
        if let Response::Get(r) = &resp {
            self.requests.siblings.observe(r.siblings.len() as f64);
        }
        self.requests.count(op, result_of(&resp, op));
        (resp, Some(permit))
    }

    /// Takes the request's place in the budget and what is left of its deadline (counted
    /// from its arrival), or refuses it: `Overloaded` over budget, `Timeout` when its deadline
    /// passed before it could run (both definite: nothing was done).
    fn admit(
        &self,
        mut req: Request,
        body_len: usize,
        conn: &Arc<ConnShare>,
        arrived: Instant,
    ) -> Result<(Request, Permit), NotRun> {
        let timeout_ms = req
            .timeout_ms_mut()
            .expect("only data requests, which carry a timeout, are admitted");
        let total = self.timeouts.resolve(*timeout_ms);
        let waited = arrived.elapsed();
        let left = Duration::from_millis(total as u64).saturating_sub(waited);
        if left.is_zero() {
            self.budget.expired.inc();
            return Err(NotRun::Expired(Response::error(
                ErrorKind::Timeout { acks: 0, needed: 0 },
                true,
                format!(
                    "node {}: request dropped unexecuted: its {total} ms deadline passed \
                     before it was dispatched (it waited {} ms: the node was stalled or \
                     overloaded)",
                    self.node_id,
                    waited.as_millis()
                ),
            )));
        }
        *timeout_ms = left.as_millis().clamp(1, u32::MAX as u128) as u32;
        match self.budget.try_admit(conn, body_len) {
            Ok(permit) => Ok((req, permit)),
            Err(shed) => Err(NotRun::Shed(Response::error(
                ErrorKind::Overloaded {
                    retry_after_ms: self.budget.retry_after_ms(),
                },
                true,
                format!(
                    "node {}: {}; nothing was done, retry later or on another node",
                    self.node_id,
                    shed.describe("client")
                ),
            ))),
        }
    }

    async fn admin_request(&self, req: Request, may_change: bool) -> Response {
        match req {
            Request::Ping => Response::Pong,
            Request::Status => Response::Status(self.admin.status()),
            Request::Ring => Response::Ring(self.admin.ring()),
            Request::Members => self.admin.members().await,
            Request::Repair { .. } if !may_change => {
                self.admin.cluster.metrics.admin_refused_remote.inc();
                Response::error(
                    ErrorKind::Unauthenticated,
                    true,
                    format!("node {}: {}", self.node_id, remote_admin_refusal("repairs")),
                )
            }
            Request::Repair { range } => self.admin.repair(range),
            Request::Cluster(json) => {
                Response::Cluster(self.admin.cluster.admin(&json, may_change).await)
            }
            Request::Get { .. } | Request::Put { .. } | Request::Delete { .. } => {
                unreachable!("data requests are dispatched by handle")
            }
        }
    }
}

/// The `op` label of a request.
fn op_name(req: &Request) -> &'static str {
    match req {
        Request::Get { .. } => "get",
        Request::Put { .. } => "put",
        Request::Delete { .. } => "delete",
        Request::Ping => "ping",
        Request::Status => "status",
        Request::Ring => "ring",
        Request::Members => "members",
        Request::Repair { .. } => "repair",
        Request::Cluster(_) => "cluster",
    }
}

/// One client connection: its share of the client budget, and whether it comes from this
/// node's own host (`cluster::from_this_host`: may change the ring).
pub struct ClientHandler {
    pub api: Arc<ClientApi>,
    pub share: Arc<ConnShare>,
    pub from_this_host: bool,
}

impl ClientHandler {
    pub fn new(api: Arc<ClientApi>, from_this_host: bool) -> ClientHandler {
        ClientHandler {
            api,
            share: ConnShare::new(),
            from_this_host,
        }
    }
}

impl FrameHandler for ClientHandler {
    async fn handle(self: Arc<Self>, frame: Frame, arrived: Instant) -> Reply {
        let id = frame.request_id;
        let len = frame.body.len();
        let (resp, hold) = match Request::decode(frame.opcode, frame.body) {
            Ok(req) => {
                self.api
                    .handle(req, len, &self.share, self.from_this_host, arrived)
                    .await
            }
            Err(e) => {
                self.api.net.malformed.inc();
                let resp = Response::error(
                    ErrorKind::Malformed,
                    true,
                    format!("node {}: malformed request: {e}", self.api.node_id),
                );
                (resp, None)
            }
        };
        Reply {
            frame: resp.to_frame(id),
            close: false,
            hold,
        }
    }
}
