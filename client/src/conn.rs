//! One multiplexed connection to one node: a task owns the socket, matches reply frames to
//! requests by id, and coalesces queued requests into one flush (pipelining). Frame-level, so
//! the server's peer pool uses it for the peer protocol too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ringkv_protocol::limits::{MAX_PEER_BODY_LEN, MAX_REQUEST_BODY_LEN};
use ringkv_protocol::{Frame, FrameCodec, Inbound, Rejection, Response};

use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

/// Why a connection could not deliver a reply.
#[derive(Debug, Clone)]
pub enum ConnError {
    /// The request may or may not have reached the node.
    Lost(String),
    /// The reply frame could not be processed.
    Protocol(String),
    /// Not sent: the request's encoder ([`Conn::call_at_send`]) found its time had run out
    /// while it waited in the connection's queue.
    Expired,
}

/// What a caller queues: a frame, or a function that makes it when the connection sends it
/// (`None`: do not send).
enum Payload {
    Frame(Frame),
    AtSend(Box<dyn FnOnce() -> Option<Frame> + Send>),
}

struct Outgoing {
    payload: Payload,
    reply: oneshot::Sender<Result<Frame, ConnError>>,
}

/// A multiplexed connection; cheap to clone (clones share the socket).
#[derive(Clone)]
pub struct Conn {
    tx: mpsc::Sender<Outgoing>,
    alive: Arc<AtomicBool>,
    local: Option<SocketAddr>,
}

impl Conn {
    pub async fn connect(addr: &str, timeout: Duration, depth: usize) -> Result<Conn, String> {
        Conn::connect_from(addr, None, timeout, depth).await
    }

    /// Like `connect`, with the local side bound to `local` (port chosen by the kernel), so the
    /// connection's source address is that IP (nodes use their peer IP; without binding, any
    /// loopback destination gets source 127.0.0.1).
    pub async fn connect_from(
        addr: &str,
        local: Option<IpAddr>,
        timeout: Duration,
        depth: usize,
    ) -> Result<Conn, String> {
        let connect = async {
            match local {
                None => TcpStream::connect(addr).await,
                Some(ip) => {
                    let target = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                    })?;
                    let socket = if target.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(ip, 0))?;
                    socket.connect(target).await
                }
            }
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("connect timed out after {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let (rd, wr) = stream.into_split();
        // Sized for the largest peer reply (a forwarded client response or a whole state), which
        // is at least the largest client response.
        let reader = FramedRead::new(rd, FrameCodec::new(MAX_PEER_BODY_LEN));
        let writer = FramedWrite::new(wr, FrameCodec::new(MAX_REQUEST_BODY_LEN));
        let (tx, rx) = mpsc::channel(depth);
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(run(reader, writer, rx, alive.clone()));
        Ok(Conn { tx, alive, local })
    }

    /// This side's address of the connection (what the node logs as the remote address).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.tx.is_closed()
    }

    /// Sends `frame` and waits for the reply frame with the same request id. Request ids must
    /// be unique on the connection; the caller bounds the wait (dropping the future is safe).
    pub async fn call(&self, frame: Frame) -> Result<Frame, ConnError> {
        self.submit(Payload::Frame(frame)).await
    }

    /// Like [`Conn::call`], but the frame is made by `encode` only when the connection is
    /// about to send it, after whatever queued before it: a time the request carries (what
    /// is left of a deadline) then counts from the send, not from the call. `encode`
    /// returning `None` (its time ran out in the queue) drops the request unsent:
    /// [`ConnError::Expired`].
    pub async fn call_at_send(
        &self,
        encode: impl FnOnce() -> Option<Frame> + Send + 'static,
    ) -> Result<Frame, ConnError> {
        self.submit(Payload::AtSend(Box::new(encode))).await
    }

    async fn submit(&self, payload: Payload) -> Result<Frame, ConnError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Outgoing { payload, reply })
            .await
            .map_err(|_| ConnError::Lost("connection closed".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(ConnError::Lost("connection closed".into())))
    }
}

type Pending = HashMap<u64, oneshot::Sender<Result<Frame, ConnError>>>;

async fn run(
    mut reader: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    mut writer: FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>,
    mut rx: mpsc::Receiver<Outgoing>,
    alive: Arc<AtomicBool>,
) {
    let mut pending: Pending = HashMap::new();
    let cause = loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(out) = out else { break "client dropped".to_string() };
                let mut batch = vec![out];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                // Let the other tasks that are ready to send (typically the callers whose
                // replies were just delivered) queue their requests first: they then share
                // this flush, one write syscall for the batch.
                tokio::task::yield_now().await;
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let mut failed = None;
                for out in batch {
                    // A caller that timed out dropped its receiver; skip sending for it.
                    if out.reply.is_closed() {
                        continue;
                    }
                    // Made now, after everything queued before it was fed to the socket.
                    let frame = match out.payload {
                        Payload::Frame(frame) => frame,
                        Payload::AtSend(encode) => match encode() {
                            Some(frame) => frame,
                            None => {
                                let _ = out.reply.send(Err(ConnError::Expired));
                                continue;
                            }
                        },
                    };
                    pending.insert(frame.request_id, out.reply);
                    if let Err(e) = writer.feed(frame).await {
                        failed = Some(e.to_string());
                        break;
                    }
                }
                if failed.is_none() {
                    if let Err(e) = writer.flush().await {
                        failed = Some(e.to_string());
                    }
                }
                if let Some(e) = failed {
                    break format!("write failed: {e}");
                }
            }
            item = reader.next() => {
                match item {
                    None => break "connection closed by the node".to_string(),
                    Some(Err(e)) => break format!("read failed: {e}"),
                    Some(Ok(Inbound::Rejected { request_id, reason })) => {
                        let msg = match reason {
                            Rejection::TooLarge { body_len, limit } => format!("response frame of {body_len} bytes exceeds {limit}"),
                            Rejection::UnsupportedVersion { got } => format!("node answered with protocol version {got}"),
                        };
                        if let Some(tx) = pending.remove(&request_id) {
                            let _ = tx.send(Err(ConnError::Protocol(msg)));
                        }
                    }
                    Some(Ok(Inbound::Frame(frame))) => {
                        let id = frame.request_id;
                        if id == 0 {
                            // Connection-level error from the node (e.g. too many connections);
                            // the error body is the same in the client and peer protocols.
                            let msg = match Response::decode(frame.opcode, frame.body) {
                                Ok(Response::Error(e)) => format!("{}: {}", e.kind.name(), e.message),
                                other => format!("unexpected connection-level frame: {other:?}"),
                            };
                            break msg;
                        }
                        if let Some(tx) = pending.remove(&id) {
                            let _ = tx.send(Ok(frame));
                        }
                    }
                }
            }
        }
    };
    alive.store(false, Ordering::Release);
    rx.close();
    for (_, tx) in pending.drain() {
        let _ = tx.send(Err(ConnError::Lost(cause.clone())));
    }
    while let Ok(out) = rx.try_recv() {
        let _ = out.reply.send(Err(ConnError::Lost(cause.clone())));
    }
}
