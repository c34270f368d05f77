//! Client listener and connections.
//!
//! Bounded everywhere: at most `max_connections` connections (extra ones get an `Overloaded`
//! error frame and are closed) and at most `max_in_flight` requests per connection (the reader
//! stops reading until one completes, so a fast pipeliner gets TCP backpressure, not unbounded
//! memory). Each request runs as its own task; responses are written by one writer task per
//! connection that coalesces whatever is ready into one flush.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ringkv_protocol::limits::{MAX_REQUEST_BODY_LEN, MAX_RESPONSE_BODY_LEN};
use ringkv_protocol::{
    ErrorKind, Frame, FrameCodec, FrameError, Inbound, Rejection, Request, Response,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::inc;
use crate::node::Node;

/// How long shutdown waits for in-flight requests to finish and be answered.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, node: Arc<Node>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(node.config.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning.
                warn!(node = %node.config.node_id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                inc(&node.metrics.connections_accepted);
                conns.spawn(connection(socket, node.clone(), shutdown.clone(), permit));
            }
            Err(_) => {
                inc(&node.metrics.connections_refused);
                warn!(node = %node.config.node_id, %peer, limit = node.config.max_connections,
                      "connection refused: too many connections");
                let node = node.clone();
                conns.spawn(async move {
                    let resp = Response::error(
                        ErrorKind::Overloaded,
                        true,
                        format!(
                            "node {}: too many connections (limit {})",
                            node.config.node_id, node.config.max_connections
                        ),
                    );
                    let mut w = FramedWrite::new(socket, FrameCodec::new(MAX_RESPONSE_BODY_LEN));
                    let _ = w.send(resp.to_frame(0)).await;
                });
            }
        }
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    info!(node = %node.config.node_id, open = conns.len(), "listener stopped; draining connections");
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(node = %node.config.node_id, "connections still busy after the shutdown grace; closing them");
    }
}

async fn connection(
    socket: TcpStream,
    node: Arc<Node>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let peer = socket
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    node.metrics
        .connections_active
        .fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = socket.into_split();
    let mut reader = FramedRead::new(rd, FrameCodec::new(MAX_REQUEST_BODY_LEN));
    let mut writer = FramedWrite::new(wr, FrameCodec::new(MAX_RESPONSE_BODY_LEN));
    let max_in_flight = node.config.max_in_flight;
    let (tx, mut rx) = mpsc::channel::<Frame>(max_in_flight);
    let write_task = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if writer.feed(frame).await.is_err() {
                return;
            }
            while let Ok(frame) = rx.try_recv() {
                if writer.feed(frame).await.is_err() {
                    return;
                }
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = in_flight.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let item = tokio::select! {
            _ = shutdown.cancelled() => break,
            item = reader.next() => item,
        };
        match item {
            None => break,
            Some(Ok(Inbound::Frame(frame))) => {
                let node = node.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let id = frame.request_id;
                    let resp = match Request::decode(frame.opcode, frame.body) {
                        Ok(req) => node.handle(req).await,
                        Err(e) => {
                            inc(&node.metrics.malformed);
                            Response::error(
                                ErrorKind::Malformed,
                                true,
                                format!("node {}: malformed request: {e}", node.config.node_id),
                            )
                        }
                    };
                    let _ = tx.send(resp.to_frame(id)).await;
                    drop(permit);
                });
            }
            Some(Ok(Inbound::Rejected { request_id, reason })) => {
                inc(&node.metrics.frames_rejected);
                let (kind, msg) = match reason {
                    Rejection::UnsupportedVersion { got } => (
                        ErrorKind::UnsupportedVersion {
                            got: got as u64,
                            supported: ringkv_protocol::PROTOCOL_VERSION as u64,
                        },
                        format!(
                            "protocol version {got} is not supported (this node speaks {})",
                            ringkv_protocol::PROTOCOL_VERSION
                        ),
                    ),
                    Rejection::TooLarge { body_len, limit } => (
                        ErrorKind::TooLarge {
                            size: body_len,
                            limit,
                        },
                        format!("request frame of {body_len} bytes exceeds the limit of {limit}"),
                    ),
                };
                let resp =
                    Response::error(kind, true, format!("node {}: {msg}", node.config.node_id));
                let _ = tx.send(resp.to_frame(request_id)).await;
            }
            Some(Err(FrameError::BadMagic { found })) => {
                inc(&node.metrics.malformed);
                warn!(node = %node.config.node_id, %peer, "closing connection: bad magic 0x{found:04x}");
                let resp = Response::error(
                    ErrorKind::Malformed,
                    true,
                    format!(
                        "node {}: not a ringkv frame (bad magic 0x{found:04x}); closing connection",
                        node.config.node_id
                    ),
                );
                let _ = tx.send(resp.to_frame(0)).await;
                break;
            }
            Some(Err(FrameError::Io(e))) => {
                debug!(node = %node.config.node_id, %peer, error = %e, "connection read error");
                break;
            }
        }
    }
    // Requests already running still answer: each holds a sender clone.
    drop(tx);
    let _ = write_task.await;
    node.metrics
        .connections_active
        .fetch_sub(1, Ordering::Relaxed);
}
